"""--redis on a Redis Cluster (issue 15): real cluster, real processes, real faults.

The tests start their own cluster: six Debian redis-server processes (three
masters, three replicas) on free loopback ports, joined with
`redis-cli --cluster create`, once for the module (RedisCluster below). Against
it run two scale-chat instances, one of them with --workers 2, each given a
different part of the node list (any node is enough to find the rest).

loadclient.py runs its load through SpreadingProxy, a loopback TCP proxy that
sends client c<i> to instance (i // rooms) % 2, so every room has members on
both instances. Its room names are chosen so that the rooms cover all three
shards. The checks, from the summary, csvprocess.py and the CSV itself:
delivery ratio 1.0, no duplicate, no reconnect, and per room one contiguous
seq order 1..N that every member saw and that the room's history replays.
The same holds when a busy room's master is SIGKILLed mid-run (its replica
takes over) and when a busy room's slot is migrated key batch by key batch
mid-run. Member counts (welcome.members, members frames) are the room's
member count over every instance and worker within MEMBERS_STALENESS.

test_harness_fails_over_and_migrates checks the cluster harness on its own,
with no scale-chat process.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest
import websocket

import csvprocess
from scalechat import key_slot
from testkit import (
    HERE,
    TCP_LISTEN,
    Crowd,
    LoopbackProxy,
    RedisError,
    ServerProc,
    all_received,
    assert_acked_as_delivered,
    assert_one_order,
    children,
    command,
    connection_owners,
    everyone_says,
    free_port,
    room_key,
    run_async,
    start_server,
    talk_through,
    tcp_sockets,
    until,
    wait_for,
)
from testkit_cluster import NODE_TIMEOUT_MS, RedisCluster, redirected

pytestmark = pytest.mark.slow

MEMBERS_STALENESS = 3.0         # seconds a member count may lag the room's real membership
MEMBERS_COALESCING = 1.0        # members frames come at most about once a second per room
SERVER_ARGS = ("--drain-timeout", "2", "--log-level", "WARNING")
LOADCLIENT = os.path.join(HERE, "loadclient.py")


@pytest.fixture(scope="module")
def redis_cluster():
    """One cluster for the module: 3 masters, 3 replicas."""
    cluster = RedisCluster()
    try:
        print(f"\ncluster of {len(cluster.nodes)} nodes created in {cluster.start():.2f} s")
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def cluster(redis_cluster):
    """The module's cluster, whole again: nodes an earlier test killed rejoin as replicas."""
    redis_cluster.revive()
    return redis_cluster


# ---------------------------------------------------------------------------
# The harness on its own
# ---------------------------------------------------------------------------

def test_harness_fails_over_and_migrates(cluster):
    """3 masters + 3 replicas agree on the slots; a SIGKILLed master's replica takes over in
    a few seconds; the dead node rejoins as a replica; a slot with keys migrates batch by batch."""
    assert len(cluster.masters()) == 3 and cluster.whole()
    for key in ("scalechat:{lobby}:state", "scalechat:{lobby}:history", "plain", "a{}b", "{x}{y}"):
        assert cluster.slot_of(key) == key_slot(key.encode()), key
    assert cluster.slot_of("scalechat:{lobby}:state") == cluster.slot_of("scalechat:{lobby}:history")
    rooms = cluster.room_names_covering_shards(6)
    assert len(set(rooms)) == 6
    assert sorted(len(r) for r in cluster.shards_of(rooms).values()) == [2, 2, 2]
    url = cluster.url(0, 4)
    assert url == f"redis://127.0.0.1:{cluster.nodes[0].port},127.0.0.1:{cluster.nodes[4].port}/0"

    # Keys in one room's slot, written through the master that owns it.
    room = rooms[0]
    slot = cluster.room_slot(room)
    master = cluster.master_of(slot)
    for suffix in ("state", "history", "order"):
        command(master.port, "SET", f"scalechat:{{{room}}}:{suffix}", suffix)
    with pytest.raises(RedisError, match="MOVED"):
        command(cluster.masters()[(cluster.masters().index(master) + 1) % 3].port, "GET", room_key(room))
    (replica,) = cluster.replicas_of(master)
    wait_for(lambda: int(cluster.info(replica, "replication").get("slave_repl_offset", -1))
             >= int(cluster.info(master, "replication")["master_repl_offset"]), 5, "the replica to catch up")

    took = cluster.kill_master(slot)
    print(f"\nfailover of {master}: {replica} owns slot {slot} after {took:.2f} s")
    assert not master.alive and cluster.master_of(slot) == replica
    assert took < 10 * NODE_TIMEOUT_MS / 1000
    assert command(replica.port, "GET", room_key(room)) == "state"      # replicated before the kill
    back = cluster.revive()
    print(f"{master} back as a replica of {replica} after {back:.2f} s")
    assert cluster.replicas_of(replica) == [master]

    # The slot moves while a writer keeps appending to two of its keys, following MOVED and
    # ASK: every write lands once, on one side or the other, and all end up on the target.
    target = next(m for m in cluster.masters() if m != replica)
    counter, log = f"scalechat:{{{room}}}:n", f"scalechat:{{{room}}}:log"
    writes, failed, stop = [], [], threading.Event()

    def writer():
        try:
            while not stop.is_set():
                n = redirected(replica.port, "INCR", counter)
                assert redirected(replica.port, "RPUSH", log, n) == n
                writes.append(n)
                time.sleep(0.002)
        except (AssertionError, OSError, RedisError) as e:
            failed.append(e)
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_for(lambda: len(writes) > 20 or failed, 5, "the writer to start")
        before = len(writes)
        moved = cluster.migrate_slot(slot, target, batch=1, pause=0.05)
        during = len(writes) - before
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join(10)
    print(f"slot {slot} migrated {replica} -> {target}: {moved.keys} keys in {moved.batches} batches, "
          f"{moved.seconds:.2f} s, {during} writes meanwhile")
    assert not failed and not thread.is_alive(), failed
    assert (moved.keys, moved.batches) == (5, 5) and during > 20
    assert cluster.master_of(slot) == target
    assert command(target.port, "CLUSTER", "COUNTKEYSINSLOT", slot) == 5
    assert command(replica.port, "CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    assert command(target.port, "GET", f"scalechat:{{{room}}}:history") == "history"
    assert writes == list(range(1, len(writes) + 1))
    assert command(target.port, "LRANGE", log, 0, -1) == [str(n) for n in writes]
    # Put the slot back so the module's later tests start from an even map.
    cluster.migrate_slot(slot, replica, batch=10, pause=0)
    for suffix in ("seq", "history", "index", "n", "log"):
        command(replica.port, "DEL", f"scalechat:{{{room}}}:{suffix}")
    assert cluster.whole()


# ---------------------------------------------------------------------------
# scale-chat instances, and a proxy that spreads a load client's rooms over them
# ---------------------------------------------------------------------------

def start_instance(redis_url: str, workers: int = 1, *more: str) -> ServerProc:
    """A scale-chat instance on the cluster, returned once all its workers listen."""
    args = ("--workers", str(workers)) if workers > 1 else ()
    server = start_server("--redis", redis_url, *args, *more, *SERVER_ARGS)
    try:
        wait_for(lambda: len(tcp_sockets(server.port, TCP_LISTEN)) == workers, 20, f"{workers} workers listening")
    except AssertionError:
        server.stop(signal.SIGKILL)
        raise
    return server


@pytest.fixture
def instances(cluster):
    """Two instances: a single process given two nodes, and --workers 2 given one other node
    (without --room-affinity, so that a room's members sit on both workers, each a node)."""
    single = start_instance(cluster.url(0, 1))
    try:
        pair = start_instance(cluster.url(5), 2, "--room-affinity", "false")
    except Exception:
        single.stop()
        raise
    yield [single, pair]
    for server in (single, pair):
        server.stop()


CLIENT_NAME = re.compile(rb"[?&]name=c([0-9]+)")


class SpreadingProxy(LoopbackProxy):
    """A loopback TCP proxy in front of several instances: load client c<i> (the name in its
    GET) goes to backend (i // rooms) % len(backends); client ci is in room i % rooms, so
    every room of room_size >= 2 has members on two instances. Anything else: backend 0."""

    def __init__(self, backends: list[int], rooms: int):
        self.backends, self.rooms = backends, rooms
        self.placed: dict[str, int] = {}           # client name -> backend port
        self.sockets: list[socket.socket] = []
        super().__init__()

    def link(self, client: socket.socket, _index: int) -> None:
        threading.Thread(target=self._link, args=(client,), daemon=True).start()

    def _link(self, client: socket.socket) -> None:
        self.sockets.append(client)
        head = b""
        try:
            while b"\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    client.close()
                    return
                head += chunk
            match = CLIENT_NAME.search(head.split(b"\r\n", 1)[0])
            backend = self.backends[(int(match[1]) // self.rooms) % len(self.backends)] if match \
                else self.backends[0]
            if match:
                self.placed[f"c{int(match[1])}"] = backend
            server = socket.create_connection(("127.0.0.1", backend))
        except OSError:
            client.close()
            return
        self.sockets.append(server)
        server.sendall(head)
        threading.Thread(target=self._pump, args=(server, client), daemon=True).start()
        self._pump(client, server)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()


# ---------------------------------------------------------------------------
# Load runs and what their CSVs must show
# ---------------------------------------------------------------------------

ROOMS, ROOM_SIZE, RATE, SECONDS = 6, 4, 10, 8
SCENARIO = f"{ROOMS}x{ROOM_SIZE}"


def load_rooms(prefix: str) -> list[str]:
    """The rooms of one load-client scenario with --room-prefix prefix."""
    return [f"{prefix}{SCENARIO}-{i}" for i in range(ROOMS)]


def prefix_covering_shards(cluster: RedisCluster) -> str:
    """A fresh --room-prefix whose rooms land on every master, at least one room per master."""
    token = os.urandom(3).hex()
    for j in range(1000):
        prefix = f"cl{token}{j}-"
        if all(cluster.shards_of(load_rooms(prefix)).values()):
            return prefix
    raise AssertionError("no room prefix covers every shard")


@dataclass
class LoadRun:
    proc: subprocess.Popen
    out: str
    prefix: str
    proxy: SpreadingProxy

    @property
    def rooms(self) -> list[str]:
        return load_rooms(self.prefix)


def start_load(instances: list[ServerProc], cluster: RedisCluster, tmp_path) -> LoadRun:
    """loadclient.py --load-test: ROOMS rooms of ROOM_SIZE over both instances, every shard
    covered, RATE messages/s per client for SECONDS; it stops by itself."""
    prefix = prefix_covering_shards(cluster)
    proxy = SpreadingProxy([s.port for s in instances], ROOMS)
    out = str(tmp_path / "run")
    proc = subprocess.Popen(
        [sys.executable, LOADCLIENT, "--load-test", "--server-url", proxy.url, "--rooms", str(ROOMS),
         "--room-size", str(ROOM_SIZE), "--rate", str(RATE), "--duration", str(SECONDS),
         "--grace", "20", "--seed", "7", "--room-prefix", prefix, "--out", out,
         "--summary-json", os.path.join(out, "summary.json")],
        stdout=subprocess.DEVNULL, cwd=str(tmp_path))
    return LoadRun(proc, out, prefix, proxy)


def wait_sending(run: LoadRun, timeout: float = 15) -> None:
    """Wait until every client joined (the proxy placed them all) and messages flow."""
    wait_for(lambda: len(run.proxy.placed) == ROOMS * ROOM_SIZE, timeout, "every load client to connect")
    time.sleep(1.5)                         # the send phase starts once all are welcomed


@dataclass
class RunResult:
    summary: dict                           # the load client's summary of the scenario
    processed: dict                         # csvprocess.py's summary
    logs: dict                              # room -> [(seq, sender, message_id)] in seq order
    received_us: dict                       # room -> sorted Received timestamps (us)
    sent_end_us: int                        # the last Sent timestamp


def finish_load(run: LoadRun, timeout: float = 60) -> RunResult:
    """Wait for the load client, then check what every run must show: delivery ratio 1.0, no
    duplicate, no loss, no reconnect, no error; csvprocess.py agrees; and in every room each
    member received seq 1..N in each order (epoch) of the room, the orders one after another,
    the same as every other member: exactly the room's sent messages."""
    try:
        code = run.proc.wait(timeout)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        run.proxy.close()
    assert code == 0, f"loadclient.py exited {code}"

    with open(os.path.join(run.out, "summary.json")) as f:
        (summary,) = json.load(f)["scenarios"]
    assert summary["sent"] >= ROOMS * ROOM_SIZE * RATE * SECONDS * 0.9, summary
    assert (summary["delivery_ratio"], summary["duplicates"], summary["lost"]) == (1.0, 0, 0), summary
    assert summary["reconnects"] == 0, f"clients were disconnected: {summary}"
    assert not summary["errors"], summary["errors"]

    (processed,) = csvprocess.process([run.out], out=os.path.join(run.out, "processed"))
    assert processed["delivery_ratio"] == 1.0, processed
    assert (processed["duplicated"], processed["lost"], processed["receipts_without_send"]) == (0, 0, 0)
    assert processed["messages"] == summary["sent"]

    # Each room spans both instances.
    for room_index in range(ROOMS):
        members = [f"c{i}" for i in range(room_index, ROOMS * ROOM_SIZE, ROOMS)]
        assert len({run.proxy.placed[m] for m in members}) == 2, f"room {room_index} on one instance"

    sent: dict[str, set] = {}
    got: dict[tuple[str, str], list] = {}               # (room, client) -> [(epoch, seq, sender, id)]
    epoch_of: dict[str, str] = {}                       # client -> the order its Received rows count in
    received_us: dict[str, list] = {}
    sent_end_us = 0
    with open(os.path.join(run.out, f"{SCENARIO}.csv"), newline="") as f:
        for row in csv.DictReader(f):
            if row["type"] == "Order":
                epoch_of[row["client_id"]] = row["epoch"]
                continue
            key = (row["sender_id"], int(row["message_id"]))
            if row["type"] == "Sent":
                sent.setdefault(row["room"], set()).add(key)
                sent_end_us = max(sent_end_us, int(row["timestamp_us"]))
            else:
                got.setdefault((row["room"], row["client_id"]), []).append(
                    (epoch_of[row["client_id"]], int(row["seq"]), *key))
                received_us.setdefault(row["room"], []).append(int(row["timestamp_us"]))
    assert set(sent) == set(run.rooms)
    logs = {}
    for room in run.rooms:
        members = {client: log for (r, client), log in got.items() if r == room}
        assert len(members) == ROOM_SIZE, f"{room}: {len(members)} members received anything"
        reference = next(iter(members.values()))
        for client, log in members.items():
            epochs = [epoch for epoch, _ in itertools.groupby(e[0] for e in log)]
            assert len(epochs) == len(set(epochs)), f"{room} {client}: an order came back after another"
            for epoch, order in itertools.groupby(log, key=lambda e: e[0]):
                seqs = [seq for _, seq, _, _ in order]
                assert seqs == list(range(1, len(seqs) + 1)), f"{room} {client}: seqs of {epoch} not 1..N"
            assert log == reference, f"{room}: {client} saw another order than the room's first member"
        assert len({(s, m) for _, _, s, m in reference}) == len(reference), f"{room}: a message got two seqs"
        assert {(s, m) for _, _, s, m in reference} == sent[room], f"{room}: lost or foreign messages"
        logs[room] = [(seq, s, m) for _, seq, s, m in reference]
        received_us[room].sort()
    return RunResult(summary, processed, logs, received_us, sent_end_us)


def longest_pause(result: RunResult, room: str) -> float:
    """The longest time, in seconds, no member of room received anything while messages were sent."""
    times = [t for t in result.received_us[room] if t <= result.sent_end_us]
    return max((b - a for a, b in itertools.pairwise(times)), default=0) / 1e6


def replay(url: str, room: str, last_seq: int) -> list[tuple[int, str, int]]:
    """Join room with since=0 and read its history up to last_seq: (seq, sender, message_id)."""
    ws = websocket.create_connection(f"{url}/{room}?name=auditor&since=0", timeout=10)
    try:
        welcome = json.loads(ws.recv())
        assert welcome["type"] == "welcome" and welcome["seq"] == last_seq, welcome
        assert welcome.get("oldest", 1) <= 1, f"{room}: history starts at {welcome['oldest']}"
        log = []
        while not log or log[-1][0] < last_seq:
            frame = json.loads(ws.recv())
            if frame["type"] == "message":
                log.append((frame["seq"], frame["sender"], frame["message_id"]))
        return log
    finally:
        ws.close()


def assert_history_kept(cluster: RedisCluster, result: RunResult, rooms: list[str]) -> None:
    """A fresh instance, given one node, replays each room's history exactly as its members saw it."""
    auditor = start_instance(cluster.url(cluster.live()[-1].index))
    try:
        for room in rooms:
            assert replay(auditor.url, room, len(result.logs[room])) == result.logs[room], \
                f"{room}: the history differs from what its members saw"
    finally:
        auditor.stop()


def assert_rooms_in_their_slots(cluster: RedisCluster, rooms: list[str]) -> None:
    """Each room's keys sit in its hash tag's slot, on the master that owns the slot."""
    for room in rooms:
        slot = cluster.room_slot(room)
        keys = command(cluster.master_of(slot).port, "CLUSTER", "GETKEYSINSLOT", slot, 100)
        assert any(k.startswith(f"scalechat:{{{room}}}:") for k in keys), f"{room}: no key in slot {slot}: {keys}"


def shard_channels(cluster: RedisCluster, room: str) -> list[str]:
    """The sharded pub/sub channels in room's slot, named after the room, that have
    subscribers on the nodes of the room's shard (SSUBSCRIBE may go to a replica too)."""
    slot = cluster.room_slot(room)
    return sorted({c for n in cluster.shard_nodes(slot) for c in command(n.port, "PUBSUB", "SHARDCHANNELS")
                   if room in c and key_slot(c.encode()) == slot})


def test_a_dead_seed_first_in_the_list_is_passed_over(cluster):
    """--redis lists seeds: while none has answered, the server tries each in turn."""
    dead = free_port()
    server = start_instance(f"redis://127.0.0.1:{dead},127.0.0.1:{cluster.nodes[-1].port}/0")
    try:
        ws = websocket.create_connection(f"{server.url}/seeds", timeout=10)
        assert json.loads(ws.recv())["type"] == "welcome"
        ws.send(json.dumps({"message_id": 1, "text": "through the second seed"}))
        frames = [json.loads(ws.recv()) for _ in range(2)]
        assert {f["type"] for f in frames} == {"ack", "message"}, frames
        ws.close()
    finally:
        server.stop()


# ---------------------------------------------------------------------------
# Load runs: plain, through a failover, through a slot migration
# ---------------------------------------------------------------------------

def test_load_run_over_two_instances_and_three_shards(cluster, instances, tmp_path):
    """Rooms on both instances (one with 2 workers) and all 3 shards: ratio 1.0, no duplicate,
    one contiguous seq order per room; each room's keys and channel in its hash tag's slot."""
    run = start_load(instances, cluster, tmp_path)
    wait_sending(run)
    for room in run.rooms:
        assert shard_channels(cluster, room), f"{room}: no sharded channel on its shard"
    result = finish_load(run)
    assert_rooms_in_their_slots(cluster, run.rooms)
    assert_history_kept(cluster, result, run.rooms)
    print(f"\n{result.summary['sent']} messages, p99 {result.processed['latency_us']['p99'] / 1000:.1f} ms")


def test_load_run_through_a_master_sigkill(cluster, instances, tmp_path):
    """The master of a busy room's shard is SIGKILLed mid-run; its replica takes over: nothing
    lost from what clients saw or from history, no seq reused, no duplicate, no reconnect."""
    run = start_load(instances, cluster, tmp_path)
    wait_sending(run)
    busy = run.rooms[0]
    victim = cluster.master_of(cluster.room_slot(busy))
    affected = cluster.shards_of(run.rooms)[victim.port]
    took = cluster.kill_master(cluster.room_slot(busy))
    result = finish_load(run)
    assert_history_kept(cluster, result, run.rooms)
    pauses = {room: longest_pause(result, room) for room in run.rooms}
    print(f"\nfailover of {victim} in {took:.2f} s; longest delivery pause: rooms on it "
          f"{max(pauses[r] for r in affected):.2f} s ({', '.join(f'{pauses[r]:.2f}' for r in affected)}), "
          f"other rooms {max(p for r, p in pauses.items() if r not in affected):.2f} s")
    assert all(s.proc.poll() is None for s in instances), "an instance died with a Redis master"


def test_load_run_through_a_slot_migration(cluster, instances, tmp_path):
    """A busy room's slot moves to another master, key batch by key batch, mid-run: nothing
    lost, nothing duplicated, one order, no reconnect; its keys end up on the new master."""
    run = start_load(instances, cluster, tmp_path)
    wait_sending(run)
    busy = run.rooms[0]
    slot = cluster.room_slot(busy)
    source = cluster.master_of(slot)
    target = next(m for m in cluster.masters() if m != source)
    moved = cluster.migrate_slot(slot, target, batch=1, pause=0.2)
    print(f"\nslot {slot} of {busy} moved {source} -> {target}: {moved.keys} keys in {moved.seconds:.2f} s")
    assert moved.keys > 0, f"{busy} had no key in slot {slot} to move"
    wait_for(lambda: shard_channels(cluster, busy), 5, f"a sharded channel of {busy} on its new shard")
    result = finish_load(run)
    assert command(source.port, "CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    assert_rooms_in_their_slots(cluster, run.rooms)
    assert_history_kept(cluster, result, run.rooms)
    print(f"longest delivery pause of {busy}: {longest_pause(result, busy):.2f} s")
    cluster.migrate_slot(slot, source, batch=100, pause=0)     # back, for the tests after this one


# ---------------------------------------------------------------------------
# Presence: member counts over every instance and worker
# ---------------------------------------------------------------------------

class Watcher:
    """A raw WebSocket member of a room that remembers the last member count it was told
    (welcome.members, then each members frame's count)."""

    def __init__(self, url: str, room: str, name: str):
        self.name = name
        self.ws = websocket.create_connection(f"{url}/{room}?name={name}", timeout=10)
        self.welcome = json.loads(self.ws.recv())
        assert self.welcome["type"] == "welcome", self.welcome
        self.count = self.welcome["members"]
        self.ws.settimeout(None)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            while raw := self.ws.recv():
                frame = json.loads(raw)
                if frame["type"] == "members":
                    self.count = frame["count"]
        except (websocket.WebSocketException, OSError):
            pass

    @property
    def local_port(self) -> int:
        return self.ws.sock.getsockname()[1]

    def leave(self, abrupt: bool = False) -> None:
        """Close with 1000, or (abrupt) drop the TCP connection without a close frame."""
        if abrupt:
            self.ws.sock.shutdown(socket.SHUT_RDWR)
        else:
            self.ws.send_close()
        self.reader.join(5)
        self.ws.shutdown()


def worker_of(server: ServerProc) -> dict[int, int]:
    """Client port -> pid of the --workers worker that holds its connection."""
    return connection_owners(server.port, children(server.proc.pid))


def wait_counts(watchers: list[Watcher], n: int, what: str) -> float:
    """Wait until every watcher was told n members (within the staleness and a frame's
    coalescing), check it stays so; the seconds it took."""
    started = time.monotonic()
    wait_for(lambda: all(w.count == n for w in watchers), MEMBERS_STALENESS + MEMBERS_COALESCING,
             f"every member to be told {n} members ({what}): {[w.count for w in watchers]}")
    took = time.monotonic() - started
    time.sleep(MEMBERS_COALESCING + 0.5)
    assert [w.count for w in watchers] == [n] * len(watchers), f"{what}: counts changed after settling"
    return took


def test_members_count_the_room_over_every_instance_and_worker(cluster, instances):
    """Members on a single-process instance and on both workers of the other: each is told the
    room's whole member count within the staleness; so is a later joiner; leaving lowers it."""
    single, pair = instances
    room = f"presence-{os.urandom(3).hex()}"
    watchers = [Watcher(single.url, room, f"s{i}") for i in range(3)]
    try:
        for i in range(30):                 # until each of the two workers holds two members
            watchers.append(Watcher(pair.url, room, f"p{i}"))
            held = worker_of(pair)
            on_pair = [held.get(w.local_port) for w in watchers[3:]]
            if len(set(on_pair)) == 2 and min(on_pair.count(pid) for pid in set(on_pair)) >= 2:
                break
        assert None not in on_pair and len(set(on_pair)) == 2, f"members not on both workers: {on_pair}"
        n = len(watchers)
        took = wait_counts(watchers, n, "after the joins")
        print(f"\n{n} members (3 + {n - 3} on 2 workers) counted everywhere after {took:.2f} s")

        late = Watcher(pair.url, room, "late")
        watchers.append(late)
        assert late.welcome["members"] in (n, n + 1), late.welcome
        wait_counts(watchers, n + 1, "after a later joiner")

        pids = worker_of(pair)
        first_worker = pids[watchers[3].local_port]
        other_worker = next(pids[w.local_port] for w in watchers[3:] if pids[w.local_port] != first_worker)
        leaving = [watchers[0],                                                   # the single instance
                   next(w for w in watchers[3:] if pids[w.local_port] == first_worker),
                   next(w for w in watchers[3:] if pids[w.local_port] == other_worker)]
        leaving[0].leave()
        leaving[1].leave()
        leaving[2].leave(abrupt=True)
        staying = [w for w in watchers if w not in leaving]
        took = wait_counts(staying, n + 1 - 3, "after three left")
        print(f"three left (one without a close frame): counted after {took:.2f} s")
    finally:
        for w in watchers:
            w.ws.shutdown()


# ---------------------------------------------------------------------------
# A room's state lost on its shard: a new order, nothing acked lost
# ---------------------------------------------------------------------------

def delete_room_keys(cluster: RedisCluster, room: str) -> int:
    """DEL every key of room on the master of its slot (what an eviction or an operator does); how many."""
    slot = cluster.room_slot(room)
    master = cluster.master_of(slot)
    keys = [k for k in command(master.port, "CLUSTER", "GETKEYSINSLOT", slot, 1000)
            if k.startswith(f"scalechat:{{{room}}}")]
    return command(master.port, "DEL", *keys) if keys else 0


@pytest.mark.parametrize("how", ["deleted-under-load", "expired"])
@run_async
async def test_a_room_whose_state_is_lost_on_its_shard_loses_no_acked_message(cluster, how):
    """A room's keys on its shard (with a replica: messages are published after WAIT) are deleted
    while its members, on a single-process instance and on both workers of another, chat; or
    they expire (--redis-room-ttl 1) while the members stay. Every acked message reaches every
    member once; the order after the loss is a new one (a new epoch), after all of the old."""
    ttl = ("--redis-room-ttl", "1") if how == "expired" else ()
    single = start_instance(cluster.url(0, 1), 1, *ttl)
    pair = start_instance(cluster.url(5), 2, "--room-affinity", "false", *ttl)
    room = f"lost-{os.urandom(3).hex()}"
    try:
        async with Crowd() as crowd:
            members = await crowd.join([single.url], room, 2, "a")
            members += await crowd.join([pair.url], room, 4, "b")
            before = await everyone_says(members, 3)
            await all_received(members, before)
            master = cluster.master_of(cluster.room_slot(room))
            if how == "expired":
                await until(lambda: command(master.port, "EXISTS", room_key(room)) == 0, 10, "the state to expire")
                await everyone_says(members, 3)
                sent = set().union(*(m.sent_keys() for m in members))
            else:
                deleted = []
                sent = await talk_through(members, lambda: deleted.append(delete_room_keys(cluster, room)))
                assert deleted[0] >= 4, f"{deleted[0]} keys of {room} deleted"
            await all_received(members, sent, timeout=15)
            assert_one_order(members, sent)
            assert len(set(members[0].epochs)) == 2, "the room's order did not begin again"
            assert_acked_as_delivered(members)
            assert sum(len(m.acks) for m in members) == len(sent)
            assert all(not m.errors and not m.closes for m in members)
    finally:
        single.stop()
        pair.stop()
