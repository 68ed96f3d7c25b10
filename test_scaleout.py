"""Scale-out of scalechat.py: --workers N on one machine, --redis across instances.

Real processes only: the tests start their own server processes
(conftest.start_server) and their own redis-server processes on free loopback
ports, kill them with real signals, and look at what real WebSocket clients
received. One property is checked everywhere: every member of a room ends with
the room's messages as seq 1, 2, 3, ... with no gap and no duplicate, in one
order for all members, whatever died on the way.

Where a member sits is read from /proc, not guessed: the kernel spreads
SO_REUSEPORT connections by a hash, and /proc/net/tcp with /proc/<pid>/fd says
which worker process holds each client's socket.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Self

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.protocol import State

from scalechat import (
    OP_CLOSE,
    OP_TEXT,
    FrameParser,
    client_handshake_request,
    new_key,
    parse_close,
    parse_handshake_response,
    room_owner,
)
from testkit import (
    BIG_TEXT,
    CLIENT_A,
    HERE,
    TCP_LISTEN,
    RawClient,
    RedisServer,
    ServerProc,
    chat_frame,
    chat_json,
    children,
    connection_owners,
    echo_time,
    fill_room,
    frame,
    sample_names,
    scrape,
    start_server,
    tcp_sockets,
)

DRAIN = 2.0                     # --drain-timeout of every server here, in seconds
SERVER_ARGS = ("--drain-timeout", str(DRAIN), "--log-level", "WARNING")


# ---------------------------------------------------------------------------
# Waiting, processes and sockets
# ---------------------------------------------------------------------------

async def until(predicate, timeout: float, what: str) -> None:
    """Poll predicate (without blocking the loop for long) until true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        await asyncio.sleep(0.02)


def run_async(test):
    """Run an async test function in a fresh event loop (pytest sees its fixtures)."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return wrapper


async def start_workers(n: int, *args: str, **kwargs) -> ServerProc:
    """A --workers n server, returned once all n workers listen on the port."""
    server = start_server("--workers", str(n), *SERVER_ARGS, *args, **kwargs)
    await until(lambda: len(tcp_sockets(server.port, TCP_LISTEN)) == n, 20, f"{n} workers listening")
    return server


def healthz(server: ServerProc) -> str:
    """The body of /healthz, whatever its status."""
    try:
        return urllib.request.urlopen(server.http + "/healthz", timeout=5).read().decode()
    except urllib.error.HTTPError as e:
        return e.read().decode()


@pytest.fixture
def redis(tmp_path):
    """A fresh Redis without persistence."""
    r = RedisServer(str(tmp_path)).start()
    yield r
    r.kill()


@pytest.fixture
def durable_redis(tmp_path):
    """A fresh Redis that keeps its data across a kill (AOF, fsync always)."""
    r = RedisServer(str(tmp_path), persistent=True).start()
    yield r
    r.kill()


@pytest.fixture
def redis_pair(redis):
    """Two server instances sharing one Redis."""
    nodes = [start_server("--redis", redis.url, *SERVER_ARGS) for _ in range(2)]
    yield nodes
    for node in nodes:
        node.stop()


# ---------------------------------------------------------------------------
# Room members: real WebSocket clients that record what they get
# ---------------------------------------------------------------------------

class Member:
    """A member of a room that records every frame; with resume it comes back
    with since=<last seq> (to the next URL of its list) when its connection is lost."""

    def __init__(self, urls: list[str], room: str, name: str, resume: bool = False,
                 away: float = 0.05):
        self.urls, self.room, self.name, self.resume = urls, room, name, resume
        self.away = away                # seconds before coming back
        self.turn = 0                   # index in urls of the current connection
        self.ws = None
        self.reader: asyncio.Task | None = None
        self.messages: list[dict] = []  # message frames, as they arrived
        self.errors: list[dict] = []
        self.welcomes: list[tuple[int, dict]] = []     # (url index, welcome frame)
        self.closes: list[int] = []     # close code of each lost connection (1006: none received)
        self.sent: list[int] = []       # message ids sent while the connection was open
        self.next_id = 0
        self.leaving = False

    async def join(self, since: int | None = None) -> Member:
        """Connect and wait for the welcome."""
        query = f"?name={self.name}" + ("" if since is None else f"&since={since}")
        ws = await connect(f"{self.urls[self.turn]}/{self.room}{query}", open_timeout=10,
                           ping_interval=None, close_timeout=2)
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert welcome["type"] == "welcome", welcome
        self.welcomes.append((self.turn, welcome))
        self.ws = ws
        self.reader = asyncio.create_task(self._read(ws))
        return self

    async def _read(self, ws) -> None:
        try:
            async for raw in ws:
                event = json.loads(raw)
                if event["type"] == "message":
                    self.messages.append(event)
                elif event["type"] == "error":
                    self.errors.append(event)
        except ConnectionClosed:
            pass
        if self.leaving:
            return
        self.closes.append(ws.close_code)
        if self.resume:
            await self._come_back()

    async def _come_back(self) -> None:
        deadline = time.monotonic() + 15
        while True:
            self.turn = (self.turn + 1) % len(self.urls)
            await asyncio.sleep(self.away)
            try:
                await self.join(since=self.last_seq)
                return
            except (OSError, TimeoutError, WebSocketException):
                if time.monotonic() > deadline:
                    raise

    @property
    def connected(self) -> bool:
        return self.ws is not None and self.ws.state is State.OPEN

    @property
    def last_seq(self) -> int:
        """The seq of the last message received (the first welcome's before any)."""
        return self.messages[-1]["seq"] if self.messages else self.welcomes[0][1]["seq"]

    @property
    def log(self) -> list[tuple[int, str, int]]:
        """(seq, sender, message_id) of every message received, in arrival order."""
        return [(m["seq"], m["sender"], m["message_id"]) for m in self.messages]

    def keys(self) -> set[tuple[str, int]]:
        """(sender, message_id) of every message received."""
        return {(m["sender"], m["message_id"]) for m in self.messages}

    def sent_keys(self) -> set[tuple[str, int]]:
        """(sender, message_id) of the messages this member sent."""
        return {(self.name, i) for i in self.sent}

    async def say(self) -> bool:
        """Send the next chat message if the connection is open; whether it was sent."""
        if not self.connected:
            return False
        self.next_id += 1
        try:
            await self.ws.send(json.dumps({"message_id": self.next_id,
                                           "text": f"{self.name} says {self.next_id}"}))
        except ConnectionClosed:
            return False
        self.sent.append(self.next_id)
        return True

    async def leave(self) -> None:
        """Close with 1000 and stop coming back."""
        self.leaving = True
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            await self.reader


class Crowd:
    """The members a test opens; all leave when the test ends, whatever happened."""

    def __init__(self):
        self.members: list[Member] = []

    async def join(self, urls: list[str], room: str, count: int, prefix: str, resume: bool = False,
                   since: int | None = None, away: float = 0.05) -> list[Member]:
        """count new members of room, named prefix0, prefix1, ..., connected concurrently."""
        start = len(self.members)
        new = [Member(urls, room, f"{prefix}{start + i}", resume, away) for i in range(count)]
        self.members += new
        await asyncio.gather(*(m.join(since) for m in new))
        return new

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.gather(*(m.leave() for m in self.members), return_exceptions=True)


async def everyone_says(members: list[Member], times: int = 1) -> set[tuple[str, int]]:
    """Each member sends times messages, all at once; the keys of those that went out."""
    before = {m.name: len(m.sent) for m in members}
    for _ in range(times):
        await asyncio.gather(*(m.say() for m in members))
    return {(m.name, i) for m in members for i in m.sent[before[m.name]:]}


async def chatter(members: list[Member], stop: asyncio.Event, period: float = 0.05,
                  rounds: int = 400) -> None:
    """Every connected member sends one message each period until stop (at most rounds times)."""
    for _ in range(rounds):
        if stop.is_set():
            return
        await asyncio.gather(*(m.say() for m in members))
        await asyncio.sleep(period)


async def all_received(members: list[Member], keys: set, timeout: float = 10.0) -> None:
    """Wait until every member has every message of keys, then a moment for any stray extra."""
    await until(lambda: all(keys <= m.keys() for m in members), timeout,
                f"{len(keys)} messages to reach {len(members)} members")
    await asyncio.sleep(0.2)


def assert_one_order(members: list[Member], keys: set | None = None) -> int:
    """Every member got seq 1..N, no gap, no duplicate, all in one order; with keys, exactly
    those messages. Returns N."""
    reference = members[0].log
    n = len(reference)
    for m in members:
        seqs = [e[0] for e in m.log]
        assert seqs == list(range(1, len(seqs) + 1)), f"{m.name}: gap or duplicate in seqs {seqs}"
        assert m.log == reference, f"{m.name} saw another order or another set than {members[0].name}"
    sequenced = [(sender, mid) for _, sender, mid in reference]
    assert len(set(sequenced)) == n, "a message was sequenced twice"
    if keys is not None:
        assert set(sequenced) == keys, f"lost {keys - set(sequenced)}, foreign {set(sequenced) - keys}"
    return n


def placement(server: ServerProc, members: list[Member]) -> dict[str, int]:
    """Member name -> pid of the worker process that holds its connection."""
    owners = connection_owners(server.port, children(server.proc.pid))
    return {m.name: owners.get(m.ws.local_address[1]) for m in members}


# ---------------------------------------------------------------------------
# --workers N: one machine, one port, one order per room
# ---------------------------------------------------------------------------

@pytest.fixture
def two_workers():
    """A fresh --workers 2 server."""
    server = asyncio.run(start_workers(2))
    yield server
    server.stop()


@run_async
async def test_workers_one_room_across_both_workers_one_order():
    """Members on both workers (no --room-affinity: where the kernel put them): every message
    reaches each member once, seq 1..60 in one order."""
    server = await start_workers(2, "--room-affinity", "false")
    try:
        async with Crowd() as crowd:
            members = await crowd.join([server.url], "spread", 20, "w")
            where = placement(server, members)
            assert None not in where.values(), f"a connection held by no worker: {where}"
            assert set(where.values()) == set(children(server.proc.pid)), \
                f"20 connections did not land on both workers: {where}"
            keys = await everyone_says(members, 3)
            await all_received(members, keys)
            assert assert_one_order(members, keys) == 60
    finally:
        server.stop()


def room_per_worker(prefix: str, workers: int) -> list[str]:
    """A room name owned by each worker slot: with --room-affinity their members land on every worker."""
    return [next(f"{prefix}{i}" for i in itertools.count() if room_owner(f"{prefix}{i}", workers) == slot)
            for slot in range(workers)]


def worker_slots(server: ServerProc) -> dict[int, int]:
    """Worker slot (its --worker-id) -> pid."""
    slots = {}
    for pid in children(server.proc.pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        slots[int(args[args.index(b"--worker-id") + 1])] = pid
    return slots


def pipelined_join(port: int, room: str) -> dict:
    """Send the upgrade request and a chat message in one write; the echo of that message."""
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = new_key()
    client.sendall(client_handshake_request(f"127.0.0.1:{port}", f"/ws/{room}?name=p", key)
                   + chat_frame("pipelined"))
    buf, parser, seen = b"", FrameParser(expect_masked=False), []
    while (end := parse_handshake_response(buf, key)) is None:
        buf += client.recv(65536)
    seen += parser.feed(buf[end:])
    while not any(b'"pipelined"' in payload for _, payload in seen):
        seen += parser.feed(client.recv(65536))
    client.close()
    return next(json.loads(payload) for _, payload in seen if b'"pipelined"' in payload)


def hand_over(address: bytes, fd: int, request: bytes, uid: int | None = None) -> None:
    """Send fd and request to a worker's inbox, as uid (from a forked child) or as this process."""
    pid = os.fork() if uid is not None else 0
    if pid:
        assert os.waitpid(pid, 0)[1] == 0
        return
    try:
        if uid is not None:
            os.setuid(uid)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as out:
            out.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))], 0, address)
    finally:
        if uid is not None:
            os._exit(0)


@run_async
async def test_a_worker_adopts_handed_sockets_only_from_its_own_user():
    """The hand-off inbox takes a TCP socket from a process of the server's user and serves it;
    one from another user, a pipe or a unix socket is closed unanswered, and the worker serves on."""
    server = await start_workers(2)
    try:
        inbox = b"\0scalechat-%d-%d" % (server.proc.pid, 0)
        listener = socket.create_server(("127.0.0.1", 0))
        key = new_key()
        request = client_handshake_request(f"127.0.0.1:{server.port}", "/ws/inbox-test", key)

        def handed(uid: int | None) -> bytes:
            client = socket.create_connection(listener.getsockname(), timeout=5)
            accepted, _ = listener.accept()
            hand_over(inbox, accepted.fileno(), request, uid)
            accepted.close()
            try:
                return client.recv(1024)
            except OSError:
                return b""
            finally:
                client.close()
        assert handed(65534) == b""                                 # nobody's: closed unanswered
        read, write = os.pipe()
        hand_over(inbox, read, request)
        pair = socket.socketpair()
        pair[1].settimeout(10)
        hand_over(inbox, pair[0].fileno(), request)
        pair[0].close()                                             # the worker's copy is the last
        assert pair[1].recv(1024) == b""                            # closed unanswered
        assert handed(None).startswith(b"HTTP/1.1 101")             # our own user's: served
        for fd in (read, write):
            os.close(fd)
        for sock in (pair[1], listener):
            sock.close()
        assert scrape(server.metrics_url)["scalechat_internal_errors_total"] == 0
    finally:
        server.stop()


@run_async
async def test_room_affinity_puts_every_member_of_a_room_on_the_worker_that_owns_it():
    """--workers 3: the worker that accepts a WebSocket hands it (SCM_RIGHTS) to the worker that
    owns its room, so each room's members sit on room_owner()'s worker and a message crosses to
    one worker; a request with a message written behind it is handed over whole."""
    server = await start_workers(3)
    try:
        slots = worker_slots(server)
        async with Crowd() as crowd:
            rooms = {f"aff{r}": await crowd.join([server.url], f"aff{r}", 4, f"r{r}-") for r in range(6)}
            for room, members in rooms.items():
                where = set(placement(server, members).values())
                assert where == {slots[room_owner(room, 3)]}, (room, where, slots)
            keys = await everyone_says(rooms["aff0"], 2)
            await all_received(rooms["aff0"], keys)
            assert assert_one_order(rooms["aff0"], keys) == 8
            await until(lambda: scrape(server.metrics_url)["scalechat_handoffs_total"] > 0, 5,
                        "hand-offs counted (workers report every second)")
            assert scrape(server.metrics_url)["scalechat_handoffs_total"] <= 24
        echoes = [pipelined_join(server.port, f"pipe{r}") for r in range(6)]
        assert [(e["text"], e["seq"]) for e in echoes] == [("pipelined", 1)] * 6
    finally:
        server.stop()


@run_async
async def test_workers_metrics_are_one_scrape_with_single_process_names(two_workers):
    """One scrape of the supervisor sums both workers, under the names a single process uses."""
    single = start_server(*SERVER_ARGS)
    try:
        single_names = sample_names(scrape(single.metrics_url))
    finally:
        single.stop()
    names = sample_names(scrape(two_workers.metrics_url))
    scalechat = {n for n in single_names if n.startswith("scalechat_")}
    assert scalechat and scalechat == {n for n in names if n.startswith("scalechat_")}
    # The process_* families the dashboards read, summed over the supervisor and its workers.
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
            "process_max_fds"} <= names & single_names

    before = scrape(two_workers.metrics_url)
    # Two rooms of 8, one owned by each worker (--room-affinity puts a room on its owner).
    rooms = room_per_worker("metrics", 2)
    async with Crowd() as crowd:
        members = [m for room in rooms for m in await crowd.join([two_workers.url], room, 8, f"m{room}-")]
        assert len(set(placement(two_workers, members).values())) == 2, "members on one worker only"
        keys = await everyone_says(members, 2)
        for room in rooms:
            await all_received([m for m in members if m.room == room], {k for k in keys if k[0].startswith(f"m{room}-")})

        def summed() -> bool:
            now = scrape(two_workers.metrics_url)
            delta = {k: now[k] - before.get(k, 0) for k in now}
            return (now["scalechat_connections"] == 16 and delta["scalechat_messages_received_total"] == 32
                    and delta["scalechat_deliveries_total"] == 32 * 8
                    and delta["scalechat_connections_accepted_total"] == 16)
        # Workers report every second; the sums must match what both workers did.
        await until(summed, 5, "the scrape to add up both workers' counters")
        now = scrape(two_workers.metrics_url)
        assert now["scalechat_bus_up"] == 1
        # Garbage-collector pauses of every process, by generation, in one histogram.
        young = now['scalechat_gc_pause_seconds_count{generation="0"}']
        assert young > 0 and now['scalechat_gc_pause_seconds_bucket{generation="0",le="+Inf"}'] == young


@run_async
async def test_worker_killed_is_restarted_and_its_clients_miss_nothing():
    """SIGKILL a worker: a new one replaces it; its clients come back with since and miss nothing,
    and the room's members on the other worker (no --room-affinity) see no break."""
    server = await start_workers(2, "--room-affinity", "false")
    try:
        async with Crowd() as crowd:
            members = await crowd.join([server.url], "phoenix", 16, "k", resume=True)
            where = placement(server, members)
            assert None not in where.values(), f"a connection held by no worker: {where}"
            victim = where["k0"]
            hit = [m for m in members if where[m.name] == victim]
            spared = [m for m in members if where[m.name] != victim]
            assert spared, "all members landed on one worker"
            await all_received(members, await everyone_says(members, 2))

            stop = asyncio.Event()
            talk = asyncio.create_task(chatter(members, stop))
            os.kill(victim, signal.SIGKILL)
            await until(lambda: victim not in children(server.proc.pid) and len(children(server.proc.pid)) == 2
                        and len(tcp_sockets(server.port, TCP_LISTEN)) == 2, 10, "a new worker")
            await until(lambda: all(len(m.welcomes) == 2 and m.connected for m in hit), 10,
                        "the killed worker's members to come back")
            await asyncio.sleep(0.3)
            stop.set()
            await talk
            after = await everyone_says(members, 1)
            await all_received(members, after)

            assert server.proc.poll() is None
            assert all(m.closes == [1006] for m in hit)
            assert all(m.closes == [] and len(m.welcomes) == 1 for m in spared)
            assert_one_order(members)
            # Nothing the spared members sent can be lost; the hit ones may lose only
            # what the dead worker had read but not yet passed on (never sequenced).
            got = members[0].keys()
            assert set().union(*(m.sent_keys() for m in spared)) <= got
    finally:
        server.stop()


@run_async
async def test_sigterm_on_supervisor_drains_every_worker():
    """SIGTERM on the supervisor: every client gets 1001 and all exit within the drain timeout."""
    # A close timeout far past the drain timeout: only the drain deadline can end the wait
    # for the silent client.
    server = await start_workers(2, "--close-timeout", "60")
    try:
        async with Crowd() as crowd:
            members = [m for room in room_per_worker("drain", 2) for m in await crowd.join([server.url], room, 8, "d")]
            workers = children(server.proc.pid)
            assert set(placement(server, members).values()) == set(workers)
            mute = RawClient(server.port, "/ws/drain", timeout=10)   # never answers: keeps its worker waiting
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            await until(lambda: server.proc.poll() is not None, DRAIN + 10, "the supervisor to exit")
            took = time.monotonic() - started
            await until(lambda: all(m.closes for m in members), 2, "every close")
            assert [m.closes for m in members] == [[1001]] * len(members)
            assert server.proc.returncode == 0
            assert took < DRAIN + 3.0, f"exit took {took:.2f} s with --drain-timeout {DRAIN:g}"
            assert not any(os.path.exists(f"/proc/{pid}") for pid in workers), "a worker outlived the drain"
            assert mute.recv_close_code() == 1001
            mute.close()
    finally:
        server.stop(signal.SIGKILL)


# ---------------------------------------------------------------------------
# --redis: several instances, per-room channels, seq and history in Redis
# ---------------------------------------------------------------------------

@run_async
async def test_two_instances_one_room_one_order_and_only_member_nodes_subscribe(redis, redis_pair):
    """Two nodes, one Redis: one order per room; only nodes with members get a room's traffic."""
    a, b = redis_pair
    async with Crowd() as crowd:
        shared = await crowd.join([a.url], "shared", 3, "a")
        shared += await crowd.join([b.url], "shared", 3, "b")
        assert redis.subscribers("shared") == 2
        keys = await everyone_says(shared, 3)
        await all_received(shared, keys)
        assert assert_one_order(shared, keys) == 18

        # History lives in Redis: a newcomer on either node replays the room.
        late = await crowd.join([b.url], "shared", 1, "late", since=0)
        await all_received(late, keys)
        assert late[0].log == shared[0].log

        solo = await crowd.join([a.url], "solo", 4, "s")
        assert redis.subscribers("solo") == 1
        quiet = scrape(b.metrics_url)
        keys = await everyone_says(solo, 3)
        await all_received(solo, keys)
        assert_one_order(solo, keys)
        assert scrape(b.metrics_url)["scalechat_deliveries_total"] == quiet["scalechat_deliveries_total"], \
            "a node without members of the room received its traffic"

        for m in crowd.members:
            await m.leave()
        await until(lambda: redis.subscribers("shared") == 0 and redis.subscribers("solo") == 0, 5,
                    "both nodes to unsubscribe after the last member left")


@run_async
async def test_joining_a_busy_room_on_another_node_opens_no_gap(redis_pair):
    """Subscribing and reading history while messages flow: no gap, no duplicate for joiners."""
    a, b = redis_pair
    async with Crowd() as crowd:
        talkers = await crowd.join([a.url], "busy", 3, "t")
        stop = asyncio.Event()
        talk = asyncio.create_task(chatter(talkers, stop, period=0.005))
        await asyncio.sleep(0.3)
        # The first joiner makes node b subscribe and read the history while messages flow.
        joiners = [(await crowd.join([b.url], "busy", 1, "j"))[0] for _ in range(3)]
        await asyncio.sleep(0.3)
        stop.set()
        await talk
        keys = set().union(*(m.sent_keys() for m in talkers))
        await all_received(talkers, keys)
        assert_one_order(talkers, keys)
        full = talkers[0].log
        for j in joiners:
            start = j.welcomes[0][1]["seq"]
            assert j.log == full[start:], f"{j.name} joined at seq {start} and saw a gap or a duplicate"
            assert len(j.log) > 10, "too little traffic after the join to mean anything"


async def redis_outage(redis: RedisServer, nodes: list[ServerProc], members: list[Member]) -> None:
    """Stall and kill Redis while everyone keeps talking, check every node reports it, start
    it again and check every node recovers."""
    stop = asyncio.Event()
    talk = asyncio.create_task(chatter(members, stop))
    await asyncio.sleep(0.5)
    await asyncio.to_thread(redis.stall_and_kill, 0.3)
    await until(lambda: all("bus: down" in healthz(n) and scrape(n.metrics_url)["scalechat_bus_up"] == 0
                            for n in nodes), 5, "every node to report the bus down")
    await asyncio.sleep(0.5)                # messages pile up, held by the nodes
    redis.start()
    await until(lambda: all("bus: up" in healthz(n) and scrape(n.metrics_url)["scalechat_bus_up"] == 1
                            for n in nodes), 10, "every node to report the bus up again")
    await asyncio.sleep(0.5)
    stop.set()
    await talk


@pytest.mark.parametrize("durable", [
    pytest.param(True, id="aof"),
    pytest.param(False, id="no-persistence"),
])
@run_async
async def test_redis_killed_and_restarted_while_clients_talk(tmp_path, durable):
    """Redis stalls and dies mid-chat: nodes hold, report the bus down, recover, lose nothing."""
    redis = RedisServer(str(tmp_path), persistent=durable).start()
    nodes = [start_server("--redis", redis.url, *SERVER_ARGS) for _ in range(2)]
    try:
        async with Crowd() as crowd:
            members = await crowd.join([nodes[0].url], "storm", 3, "a")
            members += await crowd.join([nodes[1].url], "storm", 3, "b")
            await all_received(members, await everyone_says(members))
            await redis_outage(redis, nodes, members)
            after = await everyone_says(members)
            await all_received(members, after, timeout=15)

            assert all(n.proc.poll() is None for n in nodes), "a node died with Redis"
            assert all(m.closes == [] for m in members), "a client was disconnected"
            assert all(not m.errors for m in members)
            # Sent before the stall, during it (never answered), while Redis was away
            # (held), or after: every message once, in one order.
            assert_one_order(members, set().union(*(m.sent_keys() for m in members)))
    finally:
        for n in nodes:
            n.stop()
        redis.kill()


LOADCLIENT = os.path.join(HERE, "loadclient.py")


async def start_load_client(url: str, tmp_path, rooms: int, room_size: int, seconds: int):
    """loadclient.py --load-test at 10 msg/s per client; returns (process, summary path)."""
    summary = tmp_path / "summary.json"
    run = await asyncio.create_subprocess_exec(
        sys.executable, LOADCLIENT, "--load-test", "--server-url", url, "--rooms", str(rooms),
        "--room-size", str(room_size), "--rate", "10", "--duration", str(seconds),
        "--grace", str(seconds), "--seed", "7", "--out", str(tmp_path / "run"),
        "--summary-json", str(summary), stdout=subprocess.DEVNULL, cwd=str(tmp_path))
    return run, summary


@run_async
async def test_load_client_run_survives_a_redis_restart(durable_redis, tmp_path):
    """A loadclient.py run through a Redis stall, kill and restart: delivery ratio 1.0."""
    node = start_server("--redis", durable_redis.url, *SERVER_ARGS)
    try:
        run, summary = await start_load_client(node.url, tmp_path, 3, 4, 4)
        await asyncio.sleep(1.5)
        await asyncio.to_thread(durable_redis.stall_and_kill, 0.3)
        await asyncio.sleep(0.7)
        durable_redis.start()
        assert await asyncio.wait_for(run.wait(), 30) == 0
        assert node.proc.poll() is None
        (result,) = json.loads(summary.read_text())["scenarios"]
        assert result["sent"] > 300
        assert (result["delivery_ratio"], result["duplicates"], result["reconnects"]) == (1.0, 0, 0), result
        assert not result["errors"], result["errors"]
    finally:
        node.stop()


@run_async
async def test_load_client_run_survives_a_worker_sigkill(tmp_path):
    """A loadclient.py run while a worker is killed: its clients resume and resend, ratio 1.0."""
    sup = start_server("--workers", "2", *SERVER_ARGS)
    try:
        run, summary = await start_load_client(sup.url, tmp_path, 10, 6, 5)
        await asyncio.sleep(2.5)
        victim = children(sup.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        assert await asyncio.wait_for(run.wait(), 40) == 0
        (result,) = json.loads(summary.read_text())["scenarios"]
        assert result["reconnects"] > 0, "nobody was on the killed worker"
        assert (result["delivery_ratio"], result["duplicates"], result["lost"]) == (1.0, 0, 0), result
    finally:
        sup.stop()


@run_async
async def test_instance_restarted_its_clients_resume_on_the_other(redis, redis_pair):
    """A node drains and restarts: its clients resume on the other node with since, missing nothing."""
    a, b = redis_pair
    async with Crowd() as crowd:
        movers = await crowd.join([a.url, b.url], "move", 4, "a", resume=True, away=0.5)
        stayers = await crowd.join([b.url], "move", 4, "b")
        members = movers + stayers
        before = await everyone_says(members, 2)
        await all_received(members, before)

        a.proc.send_signal(signal.SIGTERM)     # drain: close 1001 to every client
        await until(lambda: all(m.closes for m in movers), DRAIN, "a's clients to be told")
        assert all(m.closes == [1001] for m in movers)
        missed = await everyone_says(stayers, 3)   # while the movers are away
        await until(lambda: all(len(m.welcomes) == 2 and m.connected for m in movers), 10,
                    "a's clients to come back on b")
        for m in movers:
            turn, welcome = m.welcomes[1]
            assert turn == 1, f"{m.name} came back to {m.urls[turn]}"
            assert welcome["seq"] >= len(before | missed), "the missed messages were not replayed"
        await until(lambda: a.proc.poll() is not None, DRAIN + 3, "node a to exit")

        restarted = start_server("--redis", redis.url, *SERVER_ARGS, port=a.port)
        try:
            fresh = await crowd.join([restarted.url], "move", 1, "n", since=0)
            after = await everyone_says(members + fresh, 1)
            await all_received(members + fresh, before | missed | after)
            assert_one_order(members + fresh, before | missed | after)
        finally:
            restarted.stop()


@run_async
async def test_redis_down_holds_a_bounded_number_then_refuses(redis):
    """With Redis down, past --bus-hold-count or --bus-hold-seconds a message is refused."""
    node = start_server("--redis", redis.url, "--bus-hold-count", "2", "--bus-hold-seconds", "2",
                        *SERVER_ARGS)
    try:
        async with Crowd() as crowd:
            (member,) = await crowd.join([node.url], "hold", 1, "h")
            redis.kill()
            await until(lambda: "bus: down" in healthz(node), 5, "the node to see Redis gone")
            for _ in range(3):
                await member.say()
            await until(lambda: member.errors, 1.5, "the refusal of the third message")
            assert [(e["code"], e["message_id"]) for e in member.errors] == [("unavailable", 3)]
            # The two held messages age out after --bus-hold-seconds and are refused too.
            await until(lambda: len(member.errors) == 3, 5, "the held messages to expire")
            assert sorted(e["message_id"] for e in member.errors[1:]) == [1, 2]
            assert all(e["code"] == "unavailable" for e in member.errors)
            assert scrape(node.metrics_url)["scalechat_refused_total{reason=\"bus_down\"}"] == 3

            redis.start()
            await until(lambda: "bus: up" in healthz(node), 10, "the node to reconnect")
            assert member.connected and not member.messages
            await member.say()
            await until(lambda: member.messages, 5, "a message after the bus came back")
            assert member.log == [(1, "h0", 4)]
    finally:
        node.stop()


@run_async
async def test_redis_restarted_and_still_loading_nodes_retry_until_ready(redis):
    """A Redis that answers LOADING for a while: nodes keep retrying and deliver what they held."""
    node = start_server("--redis", redis.url, *SERVER_ARGS)
    try:
        async with Crowd() as crowd:
            (member,) = await crowd.join([node.url], "load", 1, "l")
            await member.say()
            await until(lambda: member.messages, 5, "the first message")
            # Enough data that loading it at 1 ms a key takes about a second.
            redis.cli("EVAL", "for i = 1, 1000 do redis.call('SET', 'filler:' .. i, i) end", "0")
            redis.cli("SAVE")
            redis.kill()
            await until(lambda: "bus: down" in healthz(node), 5, "the node to see Redis gone")
            await member.say()                     # held
            redis.start(key_load_delay_us=1000)
            assert "LOADING" in redis.cli("GET", "filler:1")
            await until(lambda: "bus: up" in healthz(node), 15, "the node to connect once loaded")
            await member.say()
            await until(lambda: len(member.messages) == 3, 5, "the held and the next message")
            assert member.log == [(1, "l0", 1), (2, "l0", 2), (3, "l0", 3)]
            assert member.closes == [] and not member.errors
    finally:
        node.stop()


# ---------------------------------------------------------------------------
# What one client can make the sequencer (supervisor or Redis) do: bounded
# ---------------------------------------------------------------------------

def victim_echoes(port: int, seconds: float) -> list:
    """Echo times of one member of an unrelated room, messaging for seconds."""
    victim = RawClient(port, "/ws/calm", timeout=60)
    times, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        times.append(echo_time(victim, len(times)))
        time.sleep(0.02)
    victim.close()
    return times


@pytest.mark.parametrize("bus", ["workers", "redis"])
def test_joins_to_a_room_of_big_messages_do_not_stall_other_rooms(bus, redis):
    """100 messages of 64 KiB that JSON-escape to 393 KB each, then 6 plain joins: each welcome
    comes at once, and a member of another room keeps its echo time (before: 27-31 s)."""
    import concurrent.futures

    args = ("--workers", "2") if bus == "workers" else ("--redis", redis.url)
    server = start_server(*args, "--rate-limit-bytes", "0", *SERVER_ARGS)     # one member fills the room
    try:
        fill_room(server.port, "big", 100)
        welcomes = []

        def joins():
            for _ in range(6):
                t0 = time.monotonic()
                client = RawClient(server.port, "/ws/big", timeout=30)
                welcomes.append((time.monotonic() - t0, client.welcome))
                client.close()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            joined = pool.submit(joins)
            echoes = victim_echoes(server.port, 3.0)
            joined.result()
        print(f"\n{bus}: welcome in at most {max(w for w, _ in welcomes) * 1e3:.0f} ms, other room's echo "
              f"max {max(echoes) * 1e3:.0f} ms over {len(echoes)} messages")
        assert max(w for w, _ in welcomes) < 1.0 and max(echoes) < 0.5
        (_, welcome) = welcomes[-1]
        held = welcome["seq"] - welcome["oldest"] + 1           # what a snapshot may carry: 1 MiB
        assert welcome["seq"] == 100 and 1 <= held <= 3, welcome
    finally:
        server.stop()


def heavy_bursts(port: int, room: str, until: float, burst: bytes) -> Counter:
    """Until then, write burst every 2 s on one connection to room, reading every answer
    meanwhile, and connect again when closed; the answers, by kind."""
    answers: Counter = Counter()

    def read(client: RawClient) -> None:
        try:
            while (received := client.recv_frame())[0] != OP_CLOSE:
                payload = received[1]
                if received[0] == OP_TEXT and not payload.startswith(b'{"type":"message"'):
                    obj = json.loads(payload)
                    answers[" ".join(filter(None, (obj["type"], obj.get("code"))))] += 1
            answers[f"close {parse_close(received[1])[0]}"] += 1
        except OSError:                         # reset, or shut down at the end
            pass
    while time.monotonic() < until:
        client = RawClient(port, f"/ws/{room}", timeout=30)
        reader = threading.Thread(target=read, args=(client,))
        reader.start()
        try:
            while reader.is_alive() and time.monotonic() < until:
                client.sock.sendall(burst)
                time.sleep(max(0.0, min(2.0, until - time.monotonic())))
        except OSError:                         # closed by the server while sending
            pass
        try:
            client.sock.shutdown(socket.SHUT_RDWR)      # wakes the reader
        except OSError:                         # already reset
            pass
        reader.join()
        client.close()
    return answers


def pubsub_clients(redis: RedisServer) -> list[str]:
    """The ids of Redis's pub/sub connections (a node's subscriber link is one)."""
    return re.findall(r"\bid=(\d+)", redis.cli("CLIENT", "LIST", "TYPE", "pubsub"))


@pytest.mark.slow
@pytest.mark.parametrize("byte_rate", [True, False], ids=["byte-rate", "drain-alone"])
def test_bursts_of_heavy_messages_do_not_make_redis_drop_the_subscriber(redis, byte_rate):
    """8 connections write 100 texts of 64 KiB of \\x01 (393 KB frames) at once every 2 s, within the
    message rate. The node reads the bus as fast as it comes, so Redis never drops its subscriber
    at the pub/sub output-buffer limit (32 MB) and the bus stays up, even with no byte rate (before:
    a drop every 1-2 s). With it, most of the bursts are refused, and a member of another room
    is never refused and misses nothing."""
    import concurrent.futures

    burst = b"".join(frame(OP_TEXT, chat_json(BIG_TEXT, i)) for i in range(100))    # 50 messages/s
    node = start_server("--redis", redis.url, *(() if byte_rate else ("--rate-limit-bytes", "0")), *SERVER_ARGS)
    try:
        victim = RawClient(node.port, "/ws/calm", timeout=30)
        victim.send_json({"message_id": 0, "text": "before"})
        assert victim.recv_message()["seq"] == 1
        subscriber = pubsub_clients(redis)
        assert len(subscriber) == 1
        until = time.monotonic() + 6
        answers, bus_up = [], []
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            attackers = [pool.submit(heavy_bursts, node.port, f"heavy-{i}", until, burst) for i in range(8)]
            while time.monotonic() < until:
                victim.send_json({"message_id": len(answers) + 1, "text": "still here"})
                answers.append(victim.recv_json())
                bus_up.append(scrape(node.metrics_url)["scalechat_bus_up"])
                time.sleep(0.1)
            attacked = sum((a.result() for a in attackers), Counter())
        print(f"\nattackers got {dict(attacked)}; the victim sent {len(answers)} messages")
        assert set(bus_up) == {1} and pubsub_clients(redis) == subscriber
        if byte_rate:       # without it, the attackers can fill what the node holds for the bus
            assert [(a["type"], a.get("message_id"), a.get("seq")) for a in answers] == \
                [("message", i, i + 1) for i in range(1, len(answers) + 1)]
            assert attacked["error rate_limit"] > 0 and attacked["ack"] > 0
        victim.close()
    finally:
        node.stop()


def test_the_supervisor_forgets_rooms_nobody_uses():
    """Joins to many rooms without a message leave nothing behind in the supervisor."""
    server = start_server("--workers", "2", *SERVER_ARGS)
    try:
        RawClient(server.port, "/ws/kept").send_json({"message_id": 1, "text": "stays in history"})
        for i in range(300):
            RawClient(server.port, f"/ws/passing-{i}").close()
        deadline = time.monotonic() + 10
        while scrape(server.metrics_url).get("scalechat_sequenced_rooms") != 1:
            assert time.monotonic() < deadline, scrape(server.metrics_url).get("scalechat_sequenced_rooms")
            time.sleep(0.2)
    finally:
        server.stop()


def test_redis_keeps_a_room_bounded_in_bytes_indexed_and_expiring(redis):
    node = start_server("--redis", redis.url, "--room-history-bytes", "200000", "--redis-room-ttl", "100",
                        *SERVER_ARGS)
    try:
        client = RawClient(node.port, f"/ws/capped?client={CLIENT_A}")
        for i in range(1, 11):
            client.send_json({"message_id": i, "text": "a" * 65000})
            assert client.recv_json(skip=("members", "message"))["seq"] == i       # its ack
        keys = [f"scalechat:{{capped}}{suffix}" for suffix in (":seq", ":history", ":index", ":order", ":bytes")]
        length = int(redis.cli("LLEN", keys[1]))
        assert 1 <= length <= 3 and int(redis.cli("GET", keys[4])) <= 200000
        assert int(redis.cli("HLEN", keys[2])) == length == int(redis.cli("LLEN", keys[3]))
        assert all(0 < int(redis.cli("TTL", key)) <= 100 for key in keys)
        client.send_json({"message_id": 10, "text": "a" * 65000, "resend": True})
        # (with Redis an ack may come before the message itself: messages are skipped here)
        assert client.recv_json(skip=("members", "message")) == {"type": "ack", "message_id": 10, "seq": 10,
                                                                 "duplicate": True}
        client.send_json({"message_id": 1, "text": "trimmed long ago", "resend": True})
        assert client.recv_json(skip=("members", "message")) == {"type": "ack", "message_id": 1, "seq": 11}
        client.close()
    finally:
        node.stop()


def test_messages_held_for_a_dead_redis_are_bounded_in_bytes(redis):
    node = start_server("--redis", redis.url, "--bus-hold-bytes", "300000", *SERVER_ARGS)
    try:
        client = RawClient(node.port, "/ws/held")
        redis.kill()
        deadline = time.monotonic() + 5
        while "bus: down" not in healthz(node):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for i in range(1, 6):                   # 65 KB each: four fit in 300,000 bytes
            client.send_json({"message_id": i, "text": "b" * 65000})
        assert client.recv_json() == {"type": "error", "code": "unavailable", "message_id": 5,
                                      "reason": "message bus unavailable: send again later"}
        client.close()
    finally:
        node.stop()


# ---------------------------------------------------------------------------
# Presence: member counts over every process
# ---------------------------------------------------------------------------

MEMBERS_WITHIN = 3.0      # seconds: a change is reported within a second, and told within another


async def assert_room_counted_everywhere(urls: list[str], owners) -> None:
    """Members spread over urls (and over the processes behind them) are each told the room's
    whole count within MEMBERS_WITHIN; so is a later joiner; leaving lowers it. owners() is
    the set of processes holding the members' connections, checked to be more than one."""
    room = f"presence-{os.urandom(3).hex()}"
    latest: dict = {}

    async def join(i: int):
        ws = await connect(f"{urls[i % len(urls)]}/{room}", open_timeout=10, ping_interval=None, close_timeout=2)
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
        latest[ws] = welcome["members"]

        async def read():
            try:
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame["type"] == "members":
                        latest[ws] = frame["count"]
            except ConnectionClosed:
                pass
        asyncio.get_running_loop().create_task(read())
        return ws, welcome

    members = [(await join(i))[0] for i in range(8)]
    assert len(owners()) > 1, "every member is on one process: nothing to sum"
    await until(lambda: all(latest[ws] == 8 for ws in members), MEMBERS_WITHIN,
                f"every member to count 8: {[latest[ws] for ws in members]}")
    late, welcome = await join(8)
    assert welcome["members"] in (8, 9), welcome
    members.append(late)
    await until(lambda: all(latest[ws] == 9 for ws in members), MEMBERS_WITHIN, "everyone to count 9")
    for ws in members[:3]:
        await ws.close()
    await until(lambda: all(latest[ws] == 6 for ws in members[3:]), MEMBERS_WITHIN,
                f"the rest to count 6: {[latest[ws] for ws in members[3:]]}")
    for ws in members[3:]:
        await ws.close()


@run_async
async def test_member_counts_sum_every_worker():
    """--workers: the supervisor sums each worker's members of a room and tells every worker (a room
    spans workers without --room-affinity, or while its owner restarts)."""
    server = await start_workers(2, "--room-affinity", "false")
    try:
        await assert_room_counted_everywhere(
            [server.url], lambda: set(connection_owners(server.port, children(server.proc.pid)).values()))
    finally:
        server.stop()


@run_async
async def test_member_counts_sum_every_instance_on_redis(redis_pair):
    """--redis: each instance keeps its count of a room in Redis, which sums them."""
    await assert_room_counted_everywhere([node.url for node in redis_pair], lambda: {n.port for n in redis_pair})
