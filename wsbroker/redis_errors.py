"""What a call to Redis, single or Cluster, can fail with: one tuple to catch.

redis-py's cluster client raises ``RedisClusterException`` (a cluster it
cannot reach, slots it cannot cover), which is not a ``RedisError``; code that
catches only ``RedisError`` lets a cluster outage escape as a crash (seen: a
node's shutdown failing after a failover). Timeouts come as ``TimeoutError``
from our own deadlines and sockets as ``OSError``.
"""

from __future__ import annotations

from redis.exceptions import RedisClusterException, RedisError

REDIS_FAILURES: tuple[type[Exception], ...] = (
    RedisError, RedisClusterException, OSError, TimeoutError,
)
