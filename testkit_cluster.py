"""A private Redis Cluster: redis-server processes on loopback, and a few commands.

RedisCluster starts masters x (1 + replicas) nodes, creates the cluster and
waits until it is whole; it kills a master, revives nodes and migrates a slot
live; redirected sends a command where -MOVED or -ASK points. test_cluster.py
and bench/bench_cluster.py use it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import scalechat as sc
from testkit import RedisError, command, free_port, room_key, wait_for

NODE_TIMEOUT_MS = 1000          # cluster-node-timeout: how soon a dead master is failed over
CLUSTER_SLOTS = sc.CLUSTER_SLOTS


# ---------------------------------------------------------------------------
# Commands to a cluster
# ---------------------------------------------------------------------------

def redirected(port: int, *args, timeout: float = 5.0):
    """One command sent to port first, then wherever -MOVED or -ASK points (as a cluster
    client does), again after -TRYAGAIN; the reply."""
    asking = False
    deadline = time.monotonic() + timeout
    while True:
        try:
            return command(port, *args, asking=asking)
        except RedisError as e:
            kind, *rest = str(e).split()
            if time.monotonic() > deadline or kind not in ("MOVED", "ASK", "TRYAGAIN"):
                raise
            if kind == "TRYAGAIN":
                time.sleep(0.01)
            else:
                port, asking = int(rest[1].rsplit(":", 1)[1]), kind == "ASK"


# ---------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------

@dataclass
class Node:
    """One redis-server of the cluster; its port and files stay the same across restarts."""
    index: int
    port: int
    bus_port: int
    workdir: str
    proc: subprocess.Popen | None = None
    id: str = ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __repr__(self) -> str:
        return f"node{self.index}(:{self.port})"


@dataclass
class View:
    """One line of CLUSTER NODES: a node as another node sees it."""
    id: str
    port: int
    flags: set
    master_id: str
    slots: list = field(default_factory=list)       # (first, last) ranges

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})

    def owns(self, slot: int) -> bool:
        return any(first <= slot <= last for first, last in self.slots)


def parse_cluster_nodes(text: str) -> list[View]:
    views = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        address = fields[1].split(",")[0].split("@")[0]
        slots = []
        for item in fields[8:]:
            if item.startswith("["):         # a slot being migrated or imported
                continue
            first, _, last = item.partition("-")
            slots.append((int(first), int(last or first)))
        views.append(View(fields[0], int(address.rsplit(":", 1)[1]), set(fields[2].split(",")),
                          fields[3], slots))
    return views


@dataclass
class Migration:
    slot: int
    source: Node
    target: Node
    keys: int                   # keys moved by MIGRATE
    batches: int
    seconds: float


class RedisCluster:
    """A private Redis Cluster: masters x (1 + replicas) redis-server processes on loopback.

    Nodes keep their index, port and files for the module; a killed node can
    be started again (revive) and rejoins as a replica of whoever took over.
    """

    def __init__(self, masters: int = 3, replicas: int = 1):
        self.masters_wanted, self.replicas_wanted = masters, replicas
        self.workdir = tempfile.mkdtemp(prefix="scalechat-cluster-")
        self.nodes: list[Node] = []
        for i in range(masters * (1 + replicas)):
            workdir = os.path.join(self.workdir, f"node{i}")
            os.mkdir(workdir)
            port = free_port()
            bus_port = free_port()
            while bus_port == port or any(bus_port in (n.port, n.bus_port) or port in (n.port, n.bus_port)
                                          for n in self.nodes):
                port, bus_port = free_port(), free_port()
            self.nodes.append(Node(i, port, bus_port, workdir))
        self.created_in: float | None = None

    # -- processes -----------------------------------------------------------
    def _spawn(self, node: Node) -> None:
        node.proc = subprocess.Popen(
            ["redis-server", "--port", str(node.port), "--bind", "127.0.0.1", "--protected-mode", "no",
             "--cluster-enabled", "yes", "--cluster-port", str(node.bus_port),
             "--cluster-config-file", os.path.join(node.workdir, "nodes.conf"),
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
             "--cluster-replica-validity-factor", "0",       # a replica may always take over
             "--cluster-allow-replica-migration", "no",       # the topology changes only when told
             "--repl-diskless-sync-delay", "0",                # replicas sync at once
             "--save", "", "--appendonly", "no", "--dir", node.workdir,
             "--logfile", os.path.join(node.workdir, "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: node.alive and command(node.port, "PING") == "PONG", 10, f"{node} to answer")
        node.id = command(node.port, "CLUSTER", "MYID")

    def start(self) -> float:
        """Start every node, create the cluster, wait until it is whole; the seconds it took."""
        started = time.monotonic()
        for node in self.nodes:
            self._spawn(node)
        if self.masters_wanted >= 3:
            created = subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", str(self.replicas_wanted), "--cluster-yes"],
                check=False, capture_output=True, text=True, timeout=60)
            assert created.returncode == 0, created.stdout + created.stderr
        else:
            self._create_small()
        self.wait_whole()
        self.created_in = time.monotonic() - started
        return self.created_in

    def _create_small(self) -> None:
        """What redis-cli --cluster create refuses (fewer than 3 masters), by hand: the first
        nodes take the slots in even ranges, every node meets the first, the rest replicate."""
        masters = self.nodes[:self.masters_wanted]
        for i, node in enumerate(masters):
            first = i * CLUSTER_SLOTS // len(masters)
            last = (i + 1) * CLUSTER_SLOTS // len(masters) - 1
            command(node.port, "CLUSTER", "ADDSLOTSRANGE", first, last)
        for node in self.nodes[1:]:
            command(node.port, "CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port, self.nodes[0].bus_port)
        wait_for(lambda: all(len(self.views(n)) == len(self.nodes) for n in self.nodes), 20,
                 "every node to know every other")
        for i, node in enumerate(self.nodes[len(masters):]):
            command(node.port, "CLUSTER", "REPLICATE", masters[i % len(masters)].id)

    def close(self) -> None:
        """SIGKILL every node and remove every file."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    # -- what the nodes say ----------------------------------------------------
    def views(self, node: Node) -> list[View]:
        return parse_cluster_nodes(command(node.port, "CLUSTER", "NODES"))

    def info(self, node: Node, *section: str) -> dict[str, str]:
        text = command(node.port, "CLUSTER", "INFO") if not section else command(node.port, "INFO", *section)
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def slot_map(self, node: Node) -> tuple:
        """(first, last, master port) of every slot range, as node sees them."""
        return tuple(sorted((first, last, v.port) for v in self.views(node) if v.is_master
                            for first, last in v.slots))

    def agreed(self) -> tuple | None:
        """The slot map if every live node is in state ok and sees the same map, every slot
        owned by a live node that no live node thinks is failing; else None."""
        live = self.live()
        ports = {n.port for n in live}
        maps = set()
        for node in live:
            if self.info(node).get("cluster_state") != "ok":
                return None
            views = self.views(node)
            if any(v.failing for v in views if v.port in ports):
                return None
            maps.add(self.slot_map(node))
        if len(maps) != 1:
            return None
        (slot_map,) = maps
        covered = sum(last - first + 1 for first, last, _ in slot_map)
        return slot_map if covered == CLUSTER_SLOTS and all(port in ports for _, _, port in slot_map) else None

    def whole(self) -> bool:
        """Every node up, the map agreed, and every master with its replicas linked and synced."""
        if len(self.live()) != len(self.nodes) or not self.agreed():
            return False
        views = self.views(self.nodes[0])
        masters = [v for v in views if v.is_master and v.slots]
        if len(masters) != self.masters_wanted:
            return False
        for m in masters:
            replicas = [v for v in views if v.master_id == m.id]
            if len(replicas) != self.replicas_wanted:
                return False
            for r in replicas:
                if self.info(self.node(r.port), "replication").get("master_link_status") != "up":
                    return False
        return True

    def wait_whole(self, timeout: float = 30) -> None:
        wait_for(self.whole, timeout, "the cluster to be whole: every node up, linked and agreed")

    # -- the harness API ---------------------------------------------------------
    def url(self, *indexes: int) -> str:
        """redis://127.0.0.1:p1,127.0.0.1:p2/0 for some of the nodes (default: the first two)."""
        chosen = [self.nodes[i] for i in (indexes or (0, 1))]
        return "redis://" + ",".join(f"127.0.0.1:{n.port}" for n in chosen) + "/0"

    def slot_of(self, key: str) -> int:
        """CLUSTER KEYSLOT key, asked of a live node."""
        return command(self.live()[0].port, "CLUSTER", "KEYSLOT", key)

    def room_slot(self, room: str) -> int:
        """The slot of room's keys and channel (its hash tag), computed here."""
        return sc.key_slot(room_key(room).encode())

    def masters(self) -> list[Node]:
        """The live masters that own slots, in node order."""
        views = self.views(self.live()[0])
        ports = {v.port for v in views if v.is_master and v.slots and not v.failing}
        return [n for n in self.live() if n.port in ports]

    def master_of(self, slot: int) -> Node:
        """The node that owns slot, as a live node sees it."""
        (port,) = {v.port for v in self.views(self.live()[0]) if v.is_master and v.owns(slot)}
        return self.node(port)

    def replicas_of(self, master: Node) -> list[Node]:
        views = self.views(self.live()[0])
        return [self.node(v.port) for v in views if v.master_id == master.id]

    def shard_nodes(self, slot: int) -> list[Node]:
        """The master of slot and its live replicas."""
        master = self.master_of(slot)
        return [master] + [n for n in self.replicas_of(master) if n.alive]

    def kill_master(self, slot: int, timeout: float = 30) -> float:
        """SIGKILL the master owning slot; return the seconds until its replica owns the slot
        in every live node's view and every live node says cluster_state:ok."""
        master = self.master_of(slot)
        replicas = self.replicas_of(master)
        assert replicas, f"{master} has no replica to take over"
        started = time.monotonic()
        master.proc.kill()
        master.proc.wait()
        wait_for(lambda: (m := self.agreed()) and any(first <= slot <= last and port in {r.port for r in replicas}
                                                      for first, last, port in m),
                 timeout, f"a replica of {master} to take over slot {slot}")
        return time.monotonic() - started

    def revive(self, timeout: float = 30) -> float:
        """Start every dead node again (it rejoins as a replica), wait until the cluster is
        whole; the seconds it took."""
        started = time.monotonic()
        for node in self.nodes:
            if not node.alive:
                self._spawn(node)
        self.wait_whole(timeout)
        return time.monotonic() - started

    def migrate_slot(self, slot: int, to_master: Node, batch: int = 1, pause: float = 0.1,
                     timeout: float = 30) -> Migration:
        """Move slot to to_master as a live resharding does: IMPORTING/MIGRATING, then the keys
        batch by batch with MIGRATE ... KEYS while clients go on writing (and get ASK), then
        SETSLOT NODE on the target, the source and every other master."""
        source = self.master_of(slot)
        assert source.port != to_master.port, f"slot {slot} is already on {to_master}"
        started = time.monotonic()
        command(to_master.port, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.id)
        command(source.port, "CLUSTER", "SETSLOT", slot, "MIGRATING", to_master.id)
        moved = batches = 0
        while keys := command(source.port, "CLUSTER", "GETKEYSINSLOT", slot, batch):
            command(source.port, "MIGRATE", "127.0.0.1", to_master.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            batches += 1
            time.sleep(pause)
        others = [m for m in self.masters() if m.port not in (source.port, to_master.port)]
        for node in (to_master, source, *others):
            command(node.port, "CLUSTER", "SETSLOT", slot, "NODE", to_master.id)
        wait_for(lambda: (m := self.agreed()) and any(first <= slot <= last and port == to_master.port
                                                      for first, last, port in m),
                 timeout, f"every node to see slot {slot} on {to_master}")
        return Migration(slot, source, to_master, moved, batches, time.monotonic() - started)

    def shards_of(self, rooms: list[str]) -> dict[int, list[str]]:
        """Master port -> the rooms (of rooms) whose slot it owns."""
        slot_map = self.agreed() or self.slot_map(self.live()[0])
        shards = {port: [] for _, _, port in slot_map}
        for room in rooms:
            slot = self.room_slot(room)
            (port,) = [p for first, last, p in slot_map if first <= slot <= last]
            shards[port].append(room)
        return shards

    def room_names_covering_shards(self, n: int, prefix: str = "room-") -> list[str]:
        """n room names (n >= the number of masters), spread round-robin over the masters:
        every master owns the slot of at least one of them."""
        masters = [m.port for m in self.masters()]
        assert n >= len(masters)
        per_master: dict[int, list[str]] = {port: [] for port in masters}
        k = 0
        while min(len(names) for names in per_master.values()) < -(-n // len(masters)):
            room = f"{prefix}{k}"
            per_master[self.master_of(self.room_slot(room)).port].append(room)
            k += 1
        names = [per_master[port][i] for i in range(-(-n // len(masters))) for port in masters]
        return names[:n]
