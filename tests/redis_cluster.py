"""A real three-master Redis Cluster on loopback for tests: build, kill a shard, heal.

Like ``tests/redis_server.py`` this owns real ``redis-server`` processes
(``--cluster-enabled yes``, no persistence, one temporary directory each) and
waits on observable state (``CLUSTER INFO`` says ``cluster_state:ok`` on every
node) instead of sleeping. A killed shard restarts on the same port from the
same directory, so it reloads its ``nodes.conf`` (same node id, same slots) and
the cluster heals by itself.

Use :func:`start_local_cluster` (skips with a clear reason when redis-server
lacks cluster support) or the ``redis_cluster_module`` fixture (shared by a
module; a test that kills a shard must restart it and wait for ``ok``).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import free_port
from tests.redis_server import RedisServer, find_executable

HEAL_TIMEOUT = 20.0
NODE_TIMEOUT_MS = 2000


class ClusterNode(RedisServer):
    """One ``redis-server --cluster-enabled yes`` process; restartable on the same port."""

    def __init__(self, executable: str, root: Path) -> None:
        port = free_port()
        directory = root / f"node-{port}"
        directory.mkdir()
        super().__init__(port=port, executable=executable, directory=directory)
        self.bus_port = free_port()  # explicit: port + 10000 may be taken or > 65535

    def extra_args(self) -> list[str]:
        return [
            "--cluster-enabled", "yes",
            "--cluster-port", str(self.bus_port),
            "--cluster-config-file", f"nodes-{self.port}.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--repl-diskless-sync-delay", "0",  # a replica syncs at once
        ]

    def info(self) -> dict[str, str]:
        text = self.command("CLUSTER", "INFO")
        text = text.decode() if isinstance(text, bytes) else str(text)
        return dict(line.split(":", 1) for line in text.split() if ":" in line)


class LocalCluster:
    """Three masters, no replicas, slots split evenly by ``redis-cli --cluster create``."""

    def __init__(self, masters: int = 3) -> None:
        server = find_executable("redis-server")
        self.cli = find_executable("redis-cli")
        self._root = tempfile.TemporaryDirectory(prefix="wsb-cluster-")
        self.nodes = [ClusterNode(server, Path(self._root.name)) for _ in range(masters)]
        self.replicas: list[ClusterNode] = []

    @property
    def all_nodes(self) -> list[ClusterNode]:
        return [*self.nodes, *self.replicas]

    @property
    def url(self) -> str:
        """The URL a node is given: it names one cluster node (the first)."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        with self.nodes[0].client() as client:
            info = client.info()
        if str(info.get("cluster_enabled")) != "1":
            raise ClusterUnsupported("redis-server does not run in cluster mode")
        if int(str(info.get("redis_version", "0")).split(".")[0]) < 7:
            raise ClusterUnsupported("sharded pub/sub (SSUBSCRIBE) needs Redis 7 or later")
        created = subprocess.run(
            [self.cli, "--cluster", "create",
             *(f"127.0.0.1:{node.port}" for node in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False,
        )
        if created.returncode != 0:
            raise RuntimeError("redis-cli --cluster create failed: "
                               + created.stdout.decode(errors="replace")[-2000:]
                               + created.stderr.decode(errors="replace")[-2000:])
        self.wait_ok()

    def wait_ok(self, within: float = HEAL_TIMEOUT) -> None:
        """Return once every node reports ``cluster_state:ok`` and sees every master."""
        deadline = time.monotonic() + within
        while True:
            try:
                infos = [node.info() for node in self.all_nodes]
                if all(info.get("cluster_state") == "ok"
                       and info.get("cluster_known_nodes") == str(len(self.all_nodes))
                       for info in infos):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not reach cluster_state:ok in {within:g} s")
            time.sleep(0.05)

    def wait_state(self, node: ClusterNode, state: str, within: float = HEAL_TIMEOUT) -> None:
        """Poll ``node`` until its ``cluster_state`` is ``state`` (``ok`` or ``fail``)."""
        deadline = time.monotonic() + within
        while node.info().get("cluster_state") != state:
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node.port} never reached cluster_state:{state}")
            time.sleep(0.05)

    # -- who owns what -----------------------------------------------------

    def slot(self, key: str) -> int:
        return int(self.live_node().command("CLUSTER", "KEYSLOT", key))

    def add_replica(self, master: ClusterNode) -> ClusterNode:
        """Start one more node and make it a replica of ``master``; wait until it is synced."""
        replica = ClusterNode(master.executable, Path(self._root.name))
        self.replicas.append(replica)
        replica.start()
        master_id = master.command("CLUSTER", "MYID").decode()
        replica.command("CLUSTER", "MEET", "127.0.0.1", master.port, master.bus_port)
        deadline = time.monotonic() + HEAL_TIMEOUT
        while master_id.encode() not in replica.command("CLUSTER", "NODES"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {replica.port} never met {master.port}")
            time.sleep(0.02)
        replica.command("CLUSTER", "REPLICATE", master_id)
        while replica.command("INFO", "replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica.port} never synced with {master.port}")
            time.sleep(0.05)
        # Every master must know it as the replica of ``master`` to vote for it.
        replica_id = replica.command("CLUSTER", "MYID").decode()
        while not all(_is_replica_line(node.command("CLUSTER", "NODES"), replica_id, master_id)
                      for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the masters never learnt replica {replica.port}")
            time.sleep(0.02)
        self.wait_ok()
        return replica

    def failover(self, replica: ClusterNode, within: float = HEAL_TIMEOUT) -> None:
        """``CLUSTER FAILOVER`` (graceful) on ``replica``; return once every node says so."""
        deadline = time.monotonic() + within
        while True:
            replica.command("CLUSTER", "FAILOVER")
            retry_at = time.monotonic() + 3
            while time.monotonic() < retry_at:
                if all(replica.port in {int(entry[2][1]) for entry in
                                        node.command("CLUSTER", "SLOTS")}
                       for node in self.all_nodes):
                    self.wait_ok()  # and every node agrees
                    return
                time.sleep(0.02)
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica.port} never took over")

    def live_node(self) -> ClusterNode:
        for node in self.all_nodes:
            if node.running:
                return node
        raise RuntimeError("no cluster node is running")

    def owner(self, key: str) -> ClusterNode:
        """The master whose slot range holds ``key`` (per ``CLUSTER SLOTS``)."""
        slot = self.slot(key)
        for start, end, master, *_ in self.live_node().command("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                port = int(master[1])
                return next(node for node in self.all_nodes if node.port == port)
        raise RuntimeError(f"slot {slot} is not covered")

    def names_per_shard(self, base: str, prefix: str = "") -> list[str]:
        """One channel name per master (``base.0``, ``base.1``…), in node order.

        ``prefix`` is prepended when hashing (the Redis name is ``prefix + name``).
        """
        found: dict[int, str] = {}
        for i in range(1000):
            name = f"{base}.{i}"
            port = self.owner(prefix + name).port
            found.setdefault(port, name)
            if len(found) == len(self.nodes):
                return [found[node.port] for node in self.nodes]
        raise RuntimeError("could not find a channel name for every shard")

    def shardnumsub(self, *keys: str) -> dict[str, int]:
        """``PUBSUB SHARDNUMSUB`` for each Redis channel name, asked on its owner."""
        counts: dict[str, int] = {}
        for key in keys:
            reply = self.owner(key).command("PUBSUB", "SHARDNUMSUB", key)
            counts[key] = int(reply[1])
        return counts

    def shardchannels(self, pattern: str = "*") -> set[str]:
        """Every sharded channel with a subscriber, across all running masters."""
        names: set[str] = set()
        for node in self.all_nodes:
            if node.running:
                names.update(name.decode() for name in
                             node.command("PUBSUB", "SHARDCHANNELS", pattern))
        return names

    def spublish(self, key: str, payload: bytes | str) -> int:
        """``SPUBLISH`` on the owning master, as a backend would; returns receivers."""
        return int(self.owner(key).command("SPUBLISH", key, payload))

    def close(self) -> None:
        for node in self.all_nodes:
            node.kill()
        self._root.cleanup()


def _is_replica_line(nodes: bytes, replica_id: str, master_id: str) -> bool:
    """Whether a ``CLUSTER NODES`` listing shows ``replica_id`` replicating ``master_id``."""
    for line in nodes.decode().splitlines():
        fields = line.split()
        if fields and fields[0] == replica_id:
            return "slave" in fields[2].split(",") and fields[3] == master_id
    return False


class ClusterUnsupported(RuntimeError):
    """redis-server cannot run a cluster here; the tests skip with this reason."""


def start_local_cluster() -> LocalCluster:
    """A healthy cluster, a skip when cluster mode is unsupported, else a clear failure."""
    try:
        cluster = LocalCluster()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        cluster.start()
    except ClusterUnsupported as exc:
        cluster.close()
        pytest.skip(f"Redis Cluster tests need cluster support: {exc}")
    except BaseException as exc:
        cluster.close()
        if isinstance(exc, RuntimeError | redis.RedisError | subprocess.SubprocessError):
            pytest.fail(str(exc), pytrace=False)
        raise
    return cluster


@pytest.fixture
def cluster_with_replica() -> Iterator[tuple[LocalCluster, ClusterNode]]:
    """A cluster of its own (it is reshaped): the second master has one replica."""
    local = start_local_cluster()
    try:
        yield local, local.add_replica(local.nodes[1])
    finally:
        local.close()


@pytest.fixture(scope="module")
def redis_cluster_module() -> Iterator[LocalCluster]:
    """A cluster shared by a module's tests; a test that kills a shard heals it."""
    cluster = start_local_cluster()
    try:
        yield cluster
    finally:
        cluster.close()
