"""History through the ``wsbroker`` Redis Function library: what both Redis engines share.

A history publish, a read after an offset and a read of the newest entries
are each one ``FCALL`` of the library the engines load at connect
(:mod:`wsbroker.history`). The classic and the Cluster engine differ only in
where the call goes and in the publishing function's name (``wsb_publish``
publishes, ``wsb_spublish`` publishes to the shard), so each supplies
:meth:`FunctionHistory.fcall` and :attr:`FunctionHistory.publish_function`.
"""

from __future__ import annotations

import abc
from typing import Any

from wsbroker.history import HistoryRule, Published, Stream, parse_stream


class FunctionHistory(abc.ABC):
    """The backplane's history capability, as ``FCALL``s of the ``wsbroker`` library."""

    publish_function: str
    """``wsb_publish`` (classic pub/sub) or ``wsb_spublish`` (sharded pub/sub)."""

    @abc.abstractmethod
    async def fcall(self, function: str, channel: str, *args: bytes | int) -> Any:
        """One ``FCALL`` on the Redis that owns ``channel``; BackplaneUnavailable if down."""

    async def publish_history(self, channel: str, data: bytes, sender: str | None,
                              rule: HistoryRule) -> Published:
        reply = await self.fcall(self.publish_function, channel, data, rule.size, rule.ttl,
                                 *((sender.encode(),) if sender is not None else ()))
        return Published(int(reply[0]), reply[1].decode())

    async def read_since(self, channel: str, after: int, count: int,
                         rule: HistoryRule) -> Stream:
        return parse_stream(await self.fcall("wsb_since", channel, after, count, rule.ttl))

    async def read_newest(self, channel: str, count: int, rule: HistoryRule) -> Stream:
        return parse_stream(await self.fcall("wsb_newest", channel, count, rule.ttl))
