#!/usr/bin/env python3
"""What each kind of hostile client input costs the server, and what a victim in another room sees.

    python bench/bench_abuse.py                    # one process, about 2 minutes
    python bench/bench_abuse.py --mode all         # one process, --workers 2, --redis: about 7 minutes
    python bench/bench_abuse.py --quick            # a smoke run, under a minute per mode
    python bench/bench_abuse.py --server old.py    # another copy of the server (e.g. git show REV:scalechat.py)

Each attack is one row, run on a fresh server (and, with --redis, a fresh
redis-server) on free loopback ports. A victim pair in an unrelated room sends
20 messages a second throughout and times its own echoes: first a quiet
baseline, then while the attack runs, then until the server has gone quiet
again (bounded). Meanwhile this script reads from /proc the CPU time
(utime + stime) and RSS of the server's process tree (supervisor and workers)
and of redis-server, and Redis's used_memory. Per row: the bytes the attacker
sent, the server CPU it cost above the baseline (and per KiB sent), the memory
it made the server hold, the victim's echo latency before and during, whether
the server survived (no process gone, no worker restarted), and every answer
the attacker got (HTTP statuses, error codes, close codes). SECURITY.md quotes
the table. Each run appends a dated section per mode to
bench/results/abuse.md and its raw rows to bench/results/abuse.json.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from run_bench import (
    CLIENT_CPU,
    CORE0,
    SERVER_CPU,
    SERVER_RSS,
    Watch,
)

from loadclient import iso_time, now_us
from scalechat import (
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    HandshakeError,
    ProtocolError,
    RespParser,
    client_handshake_request,
    encode_frame,
    new_key,
    new_mask_key,
    parse_close,
    parse_handshake_response,
    resp_command,
)
from testkit import (
    BAD_PAYLOADS,
    RedisServer,
    ServerProc,
    cores_busy,
    cpu_seconds,
    free_port,
    machine,
    machine_line,
    percentile,
    process_tree,
    scrape,
    wait_http,
)

RESULTS = HERE / "results"
MODES = ("single", "workers", "redis")
COMMON_FLAGS = ("--log-level", "WARNING", "--drain-timeout", "1")
MODE_FLAGS = {"single": (), "workers": ("--workers", "2"), "redis": ()}    # redis: its URL, per row
VICTIM_INTERVAL = 0.05          # the victim pair sends 20 messages a second, taking turns
QUIET_ABOVE_BASELINE = 0.1      # cores: the server has settled when it uses no more than this above its baseline
BUSY_ATTACKER = 0.85            # share of a core: past it the attacker, not the server, may have been the limit
RATE, BURST = 50, 100           # the server's default --rate-limit and --rate-burst (row 4 alone raises them)
MAX_TEXT = 65536                # the server's default --max-message-size
# 64 KiB of \x01: six bytes each once JSON-escaped, the most a text can weigh (about 393 KB a frame).
HEAVY_TEXT = b'"' + b"\\u0001" * MAX_TEXT + b'"'
# 64 KiB of x: of the texts that fill a room, the one that makes a scan for a resent key slowest per byte.
PLAIN_TEXT = b'"' + b"x" * MAX_TEXT + b'"'
MESSAGE_ID = re.compile(rb'"message_id":(\d+)')


@dataclass(frozen=True)
class Plan:
    """Durations and sizes of one run."""
    baseline: float = 2.0           # seconds of victim traffic before each attack
    attack: float = 5.0             # seconds an attack may run
    settle: float = 5.0             # seconds at most after it for the server to go quiet again
    grace: float = 1.0              # seconds the victim waits for late echoes at the end
    big_messages: int = 100         # snapshot stall: messages of 64 KiB of \x01 in the room
    replay_history: int = 16 << 20  # replay hold: the server's --history-bytes, all of it in one room
    replays: int = 20
    replay_hold: float = 5.0
    resend_history: int = 64 << 20  # resend scan: the server's --history-bytes (64 MiB is its default)
    resend_rate: float = 50.0
    rooms_max: int = 15_000         # room creation flood: handshakes at most (ephemeral ports are ~28k)
    flood_threads: int = 4
    fragment_conns: int = 4
    slowloris: int = 500
    slowloris_hold: float = 12.0    # past the default --handshake-timeout of 10 s
    busy_rate: float = 40.0         # slow consumer: 64 KiB messages a second in the busy room
    burst_conns: int = 8            # heavy bursts: connections, each in a room of its own
    burst_messages: int = 100       # messages of 64 KiB of \x01 each one writes at once (the message burst)
    burst_every: float = 2.0        # seconds between one connection's bursts: 50 messages/s, the rate limit
    burst_seconds: float = 15.0     # how long the bursts go on


QUICK = Plan(baseline=1.0, attack=2.0, settle=2.0, grace=0.5, big_messages=30, replay_history=4 << 20,
             replay_hold=2.0, resend_history=8 << 20, rooms_max=3000, slowloris=100, slowloris_hold=2.0,
             burst_seconds=6.0)

# ---------------------------------------------------------------------------
# Raw clients on the project's own codec
# ---------------------------------------------------------------------------


class Tally:
    """What one attack sent (bytes) and every answer it got, counted by kind; thread-safe."""

    def __init__(self) -> None:
        self.sent = 0
        self.answers: Counter = Counter()
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        """Count n bytes sent."""
        with self.lock:
            self.sent += n

    def note(self, what: str) -> None:
        """Count one answer (or failure) of a kind."""
        with self.lock:
            self.answers[what] += 1


class Peer:
    """A WebSocket client on a raw socket: masked frames out, frames in, every answer tallied.

    Non-blocking once the handshake is read, so that one thread can flood
    without stalling on a server that stopped reading.
    """

    def __init__(self, port: int, resource: str, tally: Tally | None = None, rcvbuf: int = 0,
                 sndbuf: int = 0, timeout: float = 5.0) -> None:
        self.tally = tally or Tally()
        self.closed = False
        self.pending: list = []
        self.parser = FrameParser(expect_masked=False, max_message_size=1 << 26)
        self.key = new_key()
        self.sock = socket.socket()
        if rcvbuf:      # before connect: the window is agreed in the handshake
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(("127.0.0.1", port))
            request = client_handshake_request(f"127.0.0.1:{port}", resource, self.key)
            self.sock.sendall(request)
        except OSError:
            self.sock.close()
            self.tally.note("connect failed")
            raise
        self.tally.add(len(request))

    def handshake(self, timeout: float = 5.0) -> int:
        """Read the answer to the upgrade: its HTTP status (101: upgraded), 0 when none came."""
        buf = b""
        self.sock.settimeout(max(timeout, 0.01))
        try:
            while (end := parse_handshake_response(buf, self.key)) is None:
                data = self.sock.recv(65536)
                if not data:
                    raise HandshakeError(0, "closed before answering")
                buf += data
        except HandshakeError as e:
            status = e.status
        except OSError:
            status = 0
        else:
            status = 101
        self.tally.note(f"HTTP {status}" if status else "no HTTP answer")
        if status != 101:
            self.close()
            return status
        self.sock.setblocking(False)
        self.pending = self._feed(buf[end:])
        return status

    def welcome(self, timeout: float) -> float | None:
        """Seconds until the welcome frame arrived, None if it did not within timeout."""
        start = time.monotonic()
        while not self.closed and (left := start + timeout - time.monotonic()) > 0:
            for opcode, payload in self.read(left):
                if opcode == OP_TEXT and payload.startswith(b'{"type":"welcome"'):
                    return time.monotonic() - start
        return None

    def send(self, data: bytes, timeout: float = 5.0, reading: bool = False) -> bool:
        """Send all of data within timeout; False if the connection failed or stayed full.

        reading: meanwhile read (and drop) what arrives, as a client that reads its echoes does.
        """
        if self.closed:
            return False
        view, end = memoryview(data), time.monotonic() + timeout
        while view:
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                left = end - time.monotonic()
                if left > 0 and ready(self.sock, select.POLLOUT | (select.POLLIN if reading else 0), left):
                    if reading:
                        self.read()
                    if not self.closed:
                        continue
                return False            # the server is not reading (or the deadline came)
            except OSError:
                self._end("reset while sending")
                return False
            self.tally.add(n)
            view = view[n:]
        return True

    def read(self, timeout: float = 0.0) -> list:
        """The frames that have arrived, waiting up to timeout for some; tallies errors and closes."""
        frames, self.pending = self.pending, []
        if frames or self.closed:
            return frames
        if not ready(self.sock, select.POLLIN, timeout):
            return frames
        for _ in range(8):          # what is there now, up to 8 MiB a call
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError:
                self._end("reset")
                break
            if not data:
                self._end("EOF without a close frame")
                break
            frames += self._feed(data)
        return frames

    def linger(self, seconds: float) -> None:
        """Read and drop what arrives for seconds, or until the connection ends."""
        end = time.monotonic() + seconds
        while not self.closed and (left := end - time.monotonic()) > 0:
            self.read(left)

    def close(self) -> None:
        """Close the socket (no closing handshake)."""
        self.closed = True
        self.sock.close()

    def _feed(self, data: bytes) -> list:
        try:
            frames = self.parser.feed(data)
        except ProtocolError as e:
            frames = e.frames
            self._end(f"bad frame from the server ({e.code})")
        for opcode, payload in frames:
            if opcode == OP_TEXT and payload.startswith(b'{"type":"error"'):
                self.tally.note("error " + str(json.loads(payload).get("code")))
            elif opcode == OP_TEXT and payload.startswith(b'{"type":"ack"'):
                self.tally.note("ack (duplicate)" if b'"duplicate":true' in payload else "ack")
            elif opcode == OP_CLOSE:
                try:
                    self._end(f"close {parse_close(payload)[0]}")
                except ProtocolError:
                    self._end("close (malformed)")
            elif opcode == OP_PING:
                self.send(masked(OP_PONG, payload))
        return frames

    def _end(self, how: str) -> None:
        if not self.closed:
            self.closed = True
            self.tally.note(how)


def ready(sock: socket.socket, events: int, timeout: float) -> bool:
    """Whether sock is ready for events within timeout (poll: descriptors past 1024 too)."""
    poller = select.poll()
    poller.register(sock, events)
    return bool(poller.poll(max(timeout, 0) * 1000))


def masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One client frame (masked)."""
    return encode_frame(opcode, payload, fin=fin, mask_key=new_mask_key())


def chat_frame(message_id: int, text_json: bytes, extra: bytes = b"") -> bytes:
    """A masked chat message; text_json is the text as a JSON string literal."""
    return masked(OP_TEXT, b'{"message_id":%d,"text":%s,"sent_at":"%s"%s}'
                  % (message_id, text_json, iso_time(now_us()).encode(), extra))


def fill_room(port: int, room: str, count: int, text_json: bytes = HEAVY_TEXT, rate: float | None = RATE - 5,
              name: str = "filler") -> Peer:
    """Post count messages of text_json into room from one connection; the connection, still open.

    At most 512 KiB of echoes are awaited at once: more would queue past the
    server's --max-buffer and get the filler cut off. rate: messages per second
    after the first BURST - 10, to stay inside the server's rate limit (None:
    the row raised the limit).
    """
    peer = Peer(port, f"/ws/{room}?name={name}&client={name}-{os.urandom(8).hex()}")
    if peer.handshake() != 101 or peer.welcome(10) is None:
        raise RuntimeError(f"filler could not join {room}")
    frame_size = len(chat_frame(0, text_json))
    window = max(1, (512 << 10) // frame_size)
    start, echoed, deadline = time.monotonic(), 0, time.monotonic() + 15
    for i in range(count):
        if rate:
            time.sleep(max(0.0, start + (i - (BURST - 10)) / rate - time.monotonic()))
        peer.send(chat_frame(i, text_json))
        while echoed < i + 1 - (window if i + 1 < count else 0):
            if peer.closed or time.monotonic() > deadline:
                raise RuntimeError(f"fill of {room} stalled at message {echoed} of {count}: {dict(peer.tally.answers)}")
            for opcode, payload in peer.read(1.0):
                found = MESSAGE_ID.search(payload, 0, 400) if payload.startswith(b'{"type":"message"') else None
                if found is not None:
                    echoed, deadline = int(found.group(1)) + 1, time.monotonic() + 15
    return peer

# ---------------------------------------------------------------------------
# The victim: two members of a quiet room, in a process of their own
# ---------------------------------------------------------------------------


def victim_pair(port: int, pipe, grace: float) -> None:
    """Take turns sending a message every VICTIM_INTERVAL; time each member's own echo.

    Runs until told to stop, then waits grace for late echoes and sends back
    [(wall-clock send time, echo latency in s or None)] and the error frames it got, by code.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # the parent ends this process
    try:
        peers = [Peer(port, f"/ws/victim?name=victim-{who}") for who in "ab"]
        for peer in peers:
            if peer.handshake() != 101 or peer.welcome(10) is None:
                raise RuntimeError("the victim could not join its room")
    except (OSError, RuntimeError) as e:
        pipe.send(f"victim: {e}")
        return
    pipe.send("ready")
    sends: dict = {}            # message_id -> (wall time, monotonic time)
    echoes: dict = {}           # message_id -> latency in seconds
    i, next_send, stop_at = 0, time.monotonic(), None
    while stop_at is None or time.monotonic() < stop_at:
        if stop_at is None and pipe.poll():
            pipe.recv()
            stop_at = time.monotonic() + grace
        now = time.monotonic()
        if stop_at is None and now >= next_send:
            peer = peers[i % 2]
            sends[i] = (time.time(), now)
            peer.send(chat_frame(i, b'"hello from a quiet room"'), timeout=0.05)
            i += 1
            next_send += VICTIM_INTERVAL     # open model: late sends do not push the schedule back
        live = [p for p in peers if not p.closed]
        if not live:
            time.sleep(0.01)
            continue
        readable = select.select([p.sock for p in live], [], [], max(0.0, min(0.01, next_send - now)))[0]
        for peer in live:
            if peer.sock not in readable and not peer.pending:
                continue
            for opcode, payload in peer.read():
                if opcode == OP_TEXT and payload.startswith(b'{"type":"message"'):
                    message = json.loads(payload)
                    mid = message.get("message_id")
                    if message.get("sender") == f"victim-{'ab'[mid % 2]}" and mid in sends:
                        echoes.setdefault(mid, time.monotonic() - sends[mid][1])
    errors = sum((Counter({k: v for k, v in p.tally.answers.items() if k.startswith("error")}) for p in peers),
                 Counter())
    pipe.send(([(wall, echoes.get(mid)) for mid, (wall, _) in sends.items()], dict(errors)))


class Victim:
    """The victim pair's process (forked: it starts at once, with everything already imported)."""

    def __init__(self, port: int, grace: float) -> None:
        context = multiprocessing.get_context("fork")
        self.pipe, child = context.Pipe()
        self.grace = grace
        self.proc = context.Process(target=victim_pair, args=(port, child, grace), daemon=True)
        self.proc.start()

    def ready(self) -> None:
        """Wait until both members are in the room."""
        answer = self.pipe.recv() if self.pipe.poll(20) else "victim: no answer in 20 s"
        if answer != "ready":
            raise RuntimeError(answer)

    def stop(self) -> tuple[list, dict]:
        """Stop sending; [(send time, latency or None)] once late echoes had their grace, and
        the error frames the victim got, by code."""
        self.pipe.send("stop")
        sends = self.pipe.recv() if self.pipe.poll(self.grace + 10) else ([], {})
        self.kill()
        return sends

    def kill(self) -> None:
        """End the process, whatever it is doing."""
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()


def echo_figures(sends: list, t0: float, t1: float) -> dict:
    """Echo latency (ms) and missing echoes of the messages the victim sent between t0 and t1."""
    window = [latency for wall, latency in sends if t0 <= wall < t1]
    got = [latency * 1e3 for latency in window if latency is not None]
    return {"sent": len(window), "missing": len(window) - len(got),
            "p50_ms": round(percentile(got, 0.5), 2) if got else None,
            "p99_ms": round(percentile(got, 0.99), 2) if got else None,
            "max_ms": round(max(got), 2) if got else None}

# ---------------------------------------------------------------------------
# Attacks: each runs until t.deadline at most and leaves no socket open
# ---------------------------------------------------------------------------


@dataclass
class Target:
    """What an attack needs: the server's port, the plan, its deadline, its tally, and setup's state."""
    port: int
    plan: Plan
    deadline: float = 0.0           # time.monotonic()
    tally: Tally = field(default_factory=Tally)
    state: dict = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)      # ends setup's background threads

    def left(self) -> float:
        """Seconds left before the deadline."""
        return self.deadline - time.monotonic()


def in_threads(fns: list) -> None:
    """Run each callable in a thread of its own and wait for all."""
    threads = [threading.Thread(target=fn, daemon=True) for fn in fns]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def reconnecting(t: Target, resources, body, conns: int = 1, sndbuf: int = 0) -> None:
    """Run body(peer) on one upgraded connection after another until the deadline, conns at once.

    resources: an iterator of request targets (a new one for each connection; when it ends, so
    does the attack).
    """
    lock = threading.Lock()

    def loop():
        while t.left() > 0:
            with lock:
                resource = next(resources, None)
            if resource is None:
                return
            try:
                peer = Peer(t.port, resource, t.tally, sndbuf=sndbuf, timeout=min(5.0, max(t.left(), 0.1)))
            except OSError:
                time.sleep(0.05)            # refused: the server is gone or full
                continue
            if peer.handshake(min(5.0, max(t.left(), 0.1))) == 101:
                body(peer)
            else:
                time.sleep(0.05)
            peer.close()
    in_threads([loop] * conns)


def paced(t: Target, peer: Peer, frames: list, rate: float) -> None:
    """Send frames in turn at rate per second until the peer closes or the deadline; read meanwhile."""
    start = time.monotonic()
    for i in itertools.count():
        if peer.closed or t.left() <= 0:
            return
        peer.send(frames[i % len(frames)], timeout=max(t.left(), 0.01))
        peer.linger(min(start + (i + 1) / rate - time.monotonic(), t.left()))


# Floods write through a small send buffer: what sits in the kernel's buffers when the server
# closes is still counted as sent (the server reads and drops it), so keep it near one TCP window.
FLOOD_SNDBUF = 16384


def blast(t: Target, peer: Peer, opening: bytes, chunk: bytes, answers: int = 0) -> None:
    """Send opening, then chunk after chunk as fast as the server reads, until it closes or the deadline.

    answers: the frames the server answers each chunk with (pongs, errors); then at most two
    chunks go unanswered, so that the flood stops soon after the server's close.
    """
    peer.send(opening)
    owed = 0
    while not peer.closed and t.left() > 0:
        if answers and owed > answers:
            owed -= len(peer.read(min(t.left(), 1.0)))
            continue
        if not peer.send(chunk, timeout=max(t.left(), 0.01)):
            return
        owed += answers - len(peer.read())


SURROGATE_FRAMES = [            # JSON escapes of a lone surrogate, in each field of a message
    b'{"message_id":1,"text":"hi","sent_at":"\\ud800"}',
    b'{"message_id":2,"text":"\\ud800"}',
    b'{"message_id":"\\ud800","text":"hi"}',
    b'{"\\ud800":3,"text":"hi"}',
    b'{"message_id":4,"text":"hi \\udfff there","sent_at":"2026-01-01T00:00:00Z"}',
]


def attack_surrogates(t: Target) -> str:
    """Lone surrogates in every field, 40 frames/s on each of two connections, one of them named
    with a lone surrogate too."""
    resources = itertools.cycle(["/ws/surrogates?name=%ED%A0%80", "/ws/surrogates"])
    frames = [masked(OP_TEXT, p) for p in SURROGATE_FRAMES]
    reconnecting(t, resources, lambda peer: paced(t, peer, frames, 40), conns=2)
    return "frames: " + ", ".join(p.decode() for p in SURROGATE_FRAMES[:4]) + ", ...; name=%ED%A0%80"


def attack_snapshot(t: Target, joins: int) -> str:
    """Open and close plain handshakes to the filled room; then time a newcomer's welcome elsewhere."""
    reconnecting(t, iter(["/ws/big"] * joins), lambda peer: None)
    started = time.monotonic()
    waited = newcomer_welcome(t.port, "/ws/newcomer", max(t.left(), 1.0))
    welcome = f"{waited:.2f} s" if waited is not None else f"none within {time.monotonic() - started:.1f} s"
    return (f"{t.state['filled']} messages of 64 KiB \\x01 filled first (not counted); {joins} joins, "
            f"then a newcomer to another room got its welcome after: {welcome}")


def setup_big_room(t: Target) -> None:
    """Fill the room, then everyone leaves."""
    fill_room(t.port, "big", t.plan.big_messages).close()
    t.state["filled"] = t.plan.big_messages
    time.sleep(0.5)


def setup_replay(t: Target) -> None:
    """Fill one room with the server's whole --history-bytes, then everyone leaves."""
    count = math.ceil(t.plan.replay_history / len(HEAVY_TEXT)) + 1
    fill_room(t.port, "replay", count).close()
    t.state["filled"] = count


def attack_replay(t: Target) -> str:
    """Upgrade requests with since=0 on sockets that never read, held; then close."""
    peers = []
    for _ in range(t.plan.replays):
        try:
            peers.append(Peer(t.port, "/ws/replay?since=0", t.tally, rcvbuf=4096))
        except OSError:
            pass
    time.sleep(max(0.0, min(t.plan.replay_hold, t.left())))
    for peer in peers:
        peer.handshake(0.2)             # only now: to count the answers
        peer.close()
    return (f"room filled first with {t.state['filled']} messages of 64 KiB \\x01 (not counted); "
            f"{len(peers)} sockets with SO_RCVBUF 4096 held {t.plan.replay_hold:g} s")


HISTORY = 1000                  # the server's default --history: messages one room keeps


def setup_resend(t: Target) -> None:
    """Fill one room to the server's --history-bytes (or --history); the filler stays, to resend."""
    count = min(HISTORY, math.ceil(t.plan.resend_history / len(PLAIN_TEXT)))
    t.state["peer"] = fill_room(t.port, "resend", count, PLAIN_TEXT, rate=None)
    t.state["filled"] = count


def attack_resend(t: Target) -> str:
    """The room's newest message again and again, marked as a resend, at the rate limit."""
    peer, newest = t.state["peer"], t.state["filled"] - 1
    peer.tally = t.tally
    frame = chat_frame(newest, b'"x"', b',"resend":true')
    paced(t, peer, [frame], t.plan.resend_rate)
    peer.close()
    return (f"room filled first with {t.state['filled']} messages of 64 KiB of x (not counted; the rate "
            f"limit raised for that); {t.plan.resend_rate:g} resends/s of message_id {newest} on the filler's "
            "connection")


CHURN_ROOMS = 8


def setup_full_rooms(t: Target) -> None:
    """Fill CHURN_ROOMS rooms with 1 MiB of history each (3 texts of 64 KiB \\x01), then everyone leaves."""
    for i in range(CHURN_ROOMS):
        fill_room(t.port, f"full-{i}", 3).close()
    time.sleep(0.5)


def attack_churn(t: Target) -> str:
    """Join and leave the full rooms in turn, from several threads, as fast as the server answers."""
    start = time.monotonic()
    reconnecting(t, itertools.cycle(f"/ws/full-{i}" for i in range(CHURN_ROOMS)), lambda peer: None,
                 conns=t.plan.flood_threads)
    joins = t.tally.answers["HTTP 101"]
    return (f"{CHURN_ROOMS} rooms filled first with 3 messages of 64 KiB \\x01 each (not counted); "
            f"{joins:,} joins from {t.plan.flood_threads} threads, {joins / (time.monotonic() - start):,.0f}/s")


def attack_rooms(t: Target) -> str:
    """Handshakes to ever new rooms, each closed once upgraded, from several threads."""
    start = time.monotonic()
    reconnecting(t, (f"/ws/room-{n}" for n in range(t.plan.rooms_max)), lambda peer: None,
                 conns=t.plan.flood_threads)
    rooms = t.tally.answers["HTTP 101"]
    return f"{rooms:,} rooms opened, {rooms / (time.monotonic() - start):,.0f} rooms/s"


FRAGMENT = masked(OP_CONTINUATION, b"ab", fin=False)         # 8 bytes on the wire, 2 of payload
FRAGMENT_CHUNK = FRAGMENT * 8192                            # 64 KiB sent, 16 KiB of message
FRAGMENT_CHUNKS = 24                                        # 1.5 MiB sent: just under the message cap


def attack_fragments(t: Target) -> str:
    """Never-finished messages of 2-byte continuation frames, 1.5 MiB sent each, held to the end."""
    def body(peer):
        peer.send(masked(OP_TEXT, b"ab", fin=False))
        for _ in range(FRAGMENT_CHUNKS):
            if peer.closed or t.left() <= 0 or not peer.send(FRAGMENT_CHUNK, timeout=max(t.left(), 0.01)):
                return
            peer.read()
        peer.linger(t.left())
    reconnecting(t, itertools.repeat("/ws/fragments"), body, t.plan.fragment_conns, FLOOD_SNDBUF)
    return f"{t.plan.fragment_conns} connections at once, each reconnecting if closed"


EMPTY_CONTINUATION_AND_PONG = (masked(OP_CONTINUATION, b"", fin=False) + masked(OP_PONG, b"")) * 5000


def attack_empty_frames(t: Target) -> str:
    """Empty continuation frames (of an open message) and unsolicited pongs, as fast as the server reads."""
    reconnecting(t, itertools.repeat("/ws/empty"),
                 lambda peer: blast(t, peer, masked(OP_TEXT, b"a", fin=False), EMPTY_CONTINUATION_AND_PONG),
                 sndbuf=FLOOD_SNDBUF)
    return "one connection at a time, 6-byte frames, reconnecting if closed"


def attack_pings(t: Target) -> str:
    """Pings as fast as the server reads, reading the pongs."""
    pings = 1000
    reconnecting(t, itertools.repeat("/ws/pings"),
                 lambda peer: blast(t, peer, b"", masked(OP_PING, b"ping") * pings, answers=pings),
                 sndbuf=FLOOD_SNDBUF)
    return f"one connection at a time, 10-byte pings, at most {2 * pings} unanswered, reconnecting if closed"


def attack_max_size(t: Target) -> str:
    """Texts of the largest size and weight (64 KiB of \\x01) at the rate limit, reading the echoes."""
    frame = chat_frame(1, HEAVY_TEXT)
    reconnecting(t, itertools.repeat("/ws/heavy"), lambda peer: paced(t, peer, [frame], RATE))
    return f"{RATE} messages/s of {len(frame):,} B, one connection, reading its echoes"


WRONG_TYPES = [
    b'{"text":5}', b'{"text":"hi","message_id":"7"}', b'{"text":"hi","message_id":1e400}',
    b'{"text":"hi","message_id":1' + b"0" * 5000 + b"}", b'{"text":"hi","sent_at":["x"]}',
    b'{"text":"ok","text":null}', b'{"text":"hi","message_id":-9223372036854775809}',
    b'{"text":{"a":[1,2,{"b":null}]}}', b'{"text":"hi","sent_at":"' + b"9" * 60 + b'"}',
]


def attack_bad_json(t: Target) -> str:
    """Malformed JSON, nesting bombs and wrong types in turn, at just under the rate limit."""
    frames = [masked(OP_TEXT, p) for p, _ in BAD_PAYLOADS] + [masked(OP_TEXT, p) for p in WRONG_TYPES]
    reconnecting(t, itertools.repeat("/ws/badjson"), lambda peer: paced(t, peer, frames, RATE - 5))
    return (f"{len(frames)} payloads in turn (testkit.BAD_PAYLOADS: nesting bombs of 300 KB, "
            f"non-objects; wrong types, huge numbers), {RATE - 5}/s")


SLOW_HEAD = b"GET /ws/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 8000


def attack_slowloris(t: Target) -> str:
    """Sockets that send their request head one byte a second; one dropped is replaced."""
    def connect():
        try:
            sock = socket.create_connection(("127.0.0.1", t.port), timeout=2)
        except OSError:
            t.tally.note("connect failed")
            return
        sock.setblocking(False)
        socks[sock.fileno()] = [sock, 0, time.monotonic()]      # socket, bytes sent, opened at
        poller.register(sock, select.POLLIN)

    def answered(timeout: float) -> None:
        for fd, _ in poller.poll(timeout * 1000):
            sock, _, opened = socks.pop(fd)
            poller.unregister(fd)
            try:
                answer = sock.recv(4096)
            except OSError:
                answer = b""
            t.tally.note(f"answered {answer[:12].decode(errors='replace')}" if answer
                         else "dropped without an answer")
            lifetimes.append(time.monotonic() - opened)
            sock.close()
    socks: dict = {}
    poller, lifetimes = select.poll(), []
    for _ in range(t.plan.slowloris):
        connect()
    while t.left() > 0:
        for _ in range(t.plan.slowloris - len(socks)):
            connect()
        for state in socks.values():
            try:
                state[1] += state[0].send(SLOW_HEAD[state[1]:state[1] + 1])
                t.tally.add(1)
            except OSError:
                pass
        tick = time.monotonic() + min(1.0, max(t.left(), 0))
        while (left := tick - time.monotonic()) > 0:
            answered(left)          # a drop is seen when it happens, not at the next byte
    answered(0.5)               # drops that came with the deadline
    for sock, _, _ in socks.values():
        sock.close()
    dropped = (f", dropped after {min(lifetimes):.1f}-{max(lifetimes):.1f} s" if lifetimes
               else ", none dropped")
    return f"{t.plan.slowloris} sockets, one byte a second each, for {t.plan.slowloris_hold:g} s{dropped}"


def attack_bursts(t: Target) -> str:
    """Connections in rooms of their own, each writing plan.burst_messages texts of 64 KiB of \\x01 at
    once every plan.burst_every seconds (at the message rate limit), reading their echoes;
    reconnecting if closed."""
    plan = t.plan
    burst = b"".join(chat_frame(i, HEAVY_TEXT) for i in range(plan.burst_messages))

    def body(peer):
        start = time.monotonic()
        for i in itertools.count():
            if peer.closed or t.left() <= 0:
                return
            peer.send(burst, max(t.left(), 0.01), reading=True)
            peer.linger(min(start + (i + 1) * plan.burst_every - time.monotonic(), t.left()))
    rooms = itertools.cycle([f"/ws/bursts-{i}" for i in range(plan.burst_conns)])
    reconnecting(t, rooms, body, conns=plan.burst_conns)
    return (f"{plan.burst_conns} connections at once in {plan.burst_conns} rooms: {plan.burst_messages} x {len(burst) // 100:,} B "
            f"at once every {plan.burst_every:g} s, reading the echoes, reconnecting if closed")


def setup_busy_room(t: Target) -> None:
    """A member that posts 64 KiB texts at plan.busy_rate into the busy room, until the row ends."""
    talker = Peer(t.port, "/ws/busy?name=talker")
    if talker.handshake() != 101:
        raise RuntimeError("the talker could not join")
    frame = chat_frame(1, PLAIN_TEXT)

    def talk():
        start = time.monotonic()
        for i in itertools.count():
            if t.stop.is_set() or talker.closed:
                break
            talker.send(frame)
            talker.linger(start + (i + 1) / t.plan.busy_rate - time.monotonic())
        talker.close()
    t.state["talker"] = threading.Thread(target=talk, daemon=True)
    t.state["talker"].start()


def attack_never_reader(t: Target) -> str:
    """A new member of the busy room every second that never reads; what each got, read at the end."""
    peers = []
    while t.left() > 0:
        try:
            peers.append(Peer(t.port, "/ws/busy", t.tally, rcvbuf=4096))
        except OSError:
            pass
        time.sleep(min(1.0, max(t.left(), 0)))
    def read_at_last(peer):
        if peer.handshake(0.5) == 101:
            peer.linger(0.5)
        peer.close()
    in_threads([functools.partial(read_at_last, peer) for peer in peers])
    return (f"the room's other member posts {t.plan.busy_rate:g} texts/s of 64 KiB (also in the baseline); "
            f"{len(peers)} never-readers, one a second, SO_RCVBUF 4096, read only at the end")

# ---------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One attack: its setup (not measured), the attack, the server flags it needs, the modes it skips."""
    key: str
    title: str
    attack: Callable
    setup: Callable | None = None
    flags: Callable = lambda plan: ()
    seconds: Callable = lambda plan: plan.attack        # the attack's deadline
    skip: dict = field(default_factory=dict)            # mode -> why this row means nothing there
    env: dict = field(default_factory=dict)             # the server's environment: settings older servers lack


# Fills a room from one connection faster than the byte rate allows (setup, not the attack).
NO_BYTE_RATE = {"SCALECHAT_RATE_LIMIT_BYTES": "0"}

ROWS = [
    Row("1", "lone surrogates in each field and in ?name=", attack_surrogates),
    Row("2", "snapshot stall: 6 joins to a room of 64 KiB \\x01 messages", lambda t: attack_snapshot(t, 6),
        setup_big_room, env=NO_BYTE_RATE),
    Row("2b", "snapshot stall, worst case: 10 joins", lambda t: attack_snapshot(t, 10), setup_big_room,
        skip={"single": "one process sends no snapshot: row 2 shows the same joins"}, env=NO_BYTE_RATE),
    Row("3", "replay hold: since=0 on sockets that never read", attack_replay, setup_replay,
        flags=lambda plan: ("--history-bytes", str(plan.replay_history)), env=NO_BYTE_RATE),
    Row("4", "resend scan: the newest message_id, resent", attack_resend, setup_resend,
        flags=lambda plan: ("--history-bytes", str(plan.resend_history), "--rate-limit", "1000",
                            "--rate-burst", "1000"), env=NO_BYTE_RATE),
    Row("5", "room creation flood: handshakes to new rooms, no message", attack_rooms),
    Row("6", "fragment flood: 2-byte continuation frames, never finished", attack_fragments),
    Row("7", "empty continuation frames and unsolicited pongs", attack_empty_frames),
    Row("8", "ping flood", attack_pings),
    Row("9", "max-size messages (64 KiB of \\x01) at the rate limit", attack_max_size),
    Row("10", "bad JSON and wrong types at the rate limit", attack_bad_json),
    Row("11", "slowloris handshakes", attack_slowloris, seconds=lambda plan: plan.slowloris_hold),
    Row("12", "never-reading members of a busy room", attack_never_reader, setup_busy_room, env=NO_BYTE_RATE),
    Row("13", "bursts of 100 max-size messages (64 KiB of \\x01) on 8 connections", attack_bursts,
        seconds=lambda plan: plan.burst_seconds),
    Row("14", "join and leave churn on 8 full rooms", attack_churn, setup_full_rooms, env=NO_BYTE_RATE,
        skip={"single": "one process sends no snapshot: row 5 shows what joins cost"}),
]

# ---------------------------------------------------------------------------
# Measuring one row
# ---------------------------------------------------------------------------


@dataclass
class Meter(Watch):
    """run_bench's Watch (server tree, this process's tree, cores) plus redis-server's CPU and
    this process's own, the attacker's, as the last two columns of each sample."""
    redis_pid: int = 0

    def sample(self) -> None:
        """Take one sample now."""
        super().sample()
        own = cpu_seconds(os.getpid())
        redis = cpu_seconds(self.redis_pid) if self.redis_pid else 0.0
        self.samples[-1] = (*self.samples[-1], redis, own)


REDIS_CPU, OWN_CPU = -2, -1         # Meter's two extra columns; Watch's client column is this
                                    # process's tree: attacker, victim and redis-server


def sampling(meter: Meter, stop: threading.Event, redis_port: int, redis_memory: list) -> threading.Thread:
    """A thread that samples /proc every 0.1 s, and Redis's used_memory every 0.25 s, until stop."""
    def run():
        for tick in itertools.count():
            meter.sample()
            if redis_port and tick % 3 == 0:
                used = redis_used_memory(redis_port)
                if used is not None:
                    redis_memory.append((time.time(), used))
            if stop.wait(0.1):
                return
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def redis_used_memory(port: int) -> int | None:
    """Redis's used_memory in bytes (INFO memory), None if it does not answer within a second."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(resp_command("INFO", "memory"))
            parser, replies = RespParser(), []
            while not replies:
                data = sock.recv(65536)
                if not data:
                    return None
                replies = parser.feed(data)
    except OSError:
        return None
    found = re.search(rb"used_memory:(\d+)", replies[0] if isinstance(replies[0], bytes) else b"")
    return int(found.group(1)) if found else None


def settle(meter: Meter, port: int, base: float, base_redis: float, limit: float) -> tuple[float, str]:
    """Wait, at most limit seconds, until the server (and Redis) use no more than
    QUIET_ABOVE_BASELINE above their baseline, twice in a row, and a newcomer to a new room gets
    its welcome within a second (with workers or Redis that takes the sequencer too).

    Returns the time it ended and how: "quiet", "still busy" or "stalled" (idle, and no welcome).
    """
    start, quiet_checks = time.monotonic(), 0
    time.sleep(0.5)
    for probe in itertools.count():
        now = time.time()
        server = meter.busy(now - 0.5, now, SERVER_CPU) / 0.5
        redis = meter.busy(now - 0.5, now, REDIS_CPU) / 0.5
        quiet = server <= base + QUIET_ABOVE_BASELINE and redis <= base_redis + QUIET_ABOVE_BASELINE
        quiet_checks = quiet_checks + 1 if quiet else 0
        welcomed = quiet_checks >= 2 and newcomer_welcome(port, f"/ws/settle-{probe}", 1.0) is not None
        if welcomed:
            return time.time(), "quiet"
        if time.monotonic() - start >= limit:
            return time.time(), "stalled" if quiet_checks >= 2 else "still busy"
        time.sleep(0.2)


def newcomer_welcome(port: int, resource: str, timeout: float) -> float | None:
    """Seconds a new member of resource's room waits for its welcome; None if it got none in time."""
    start = time.monotonic()
    try:
        peer = Peer(port, resource, timeout=timeout)
    except OSError:
        return None
    waited = peer.welcome(max(0.01, start + timeout - time.monotonic())) if peer.handshake(timeout) == 101 else None
    peer.close()
    return waited


def launch(server_file: Path, flags: list, log, env: dict) -> ServerProc:
    """Start the server under test on free ports with env added to its environment, its log to log;
    return once /healthz answers and every worker is up."""
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, str(server_file), "--host", "127.0.0.1", "--port", str(port),
                             "--metrics-port", str(metrics_port), "--static-dir", str(ROOT / "static"), *flags],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    server = ServerProc(proc, port, metrics_port, args=flags)
    workers = int(flags[flags.index("--workers") + 1]) if "--workers" in flags else 0
    try:
        wait_http(f"{server.http}/healthz", timeout=20)
        deadline = time.monotonic() + 10
        while workers and len(process_tree(proc.pid)) < workers + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3 if workers else 0.0)         # let the second worker reach its loop
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: ServerProc) -> None:
    """SIGTERM, then SIGKILL for whatever of its process tree is left."""
    tree = process_tree(server.proc.pid)
    server.stop(timeout=5)
    for pid in tree[1:]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def health(server: ServerProc) -> str:
    """The /healthz answer: its status and what it says of the bus, or why there was none."""
    try:
        with urllib.request.urlopen(f"{server.http}/healthz", timeout=3) as answer:
            status, body = answer.status, answer.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        status, body = e.code, ""
    except OSError as e:
        return f"no answer in 3 s ({type(e).__name__})"
    bus = next((line for line in body.splitlines() if line.startswith("bus:")), "")
    return f"{status}" + (f" ({bus})" if bus and "up" not in bus.split(":", 1)[1].split() else "")


KEPT_METRICS = ("scalechat_refused_total", "scalechat_protocol_errors_total", "scalechat_dropped_clients_total",
                "scalechat_internal_errors_total", "scalechat_rooms", "scalechat_connections")


def server_counters(server: ServerProc) -> dict:
    """The server's non-zero counters of refusals, protocol errors, drops and internal errors,
    and its rooms and connections, keyed as testkit.scrape keys them."""
    try:
        samples = scrape(server.metrics_url, timeout=3)
    except OSError:
        return {}
    return {key: value for key, value in samples.items() if key.partition("{")[0] in KEPT_METRICS and value}


def run_row(mode: str, row: Row, plan: Plan, server_file: Path, work: Path) -> dict:
    """Start what the row needs, measure baseline, attack and settling; the row's figures."""
    result = {"row": row.key, "attack": row.title, "mode": mode}
    if mode in row.skip:
        result["skipped"] = row.skip[mode]
        return result
    started = time.monotonic()
    redis = server = victim = sampler = None
    flags = [*COMMON_FLAGS, *MODE_FLAGS[mode], *row.flags(plan)]
    result["flags"] = list(flags) + (["--redis", "redis://127.0.0.1:<port>/0"] if mode == "redis" else [])
    result["env"] = row.env
    target, stop_sampling = Target(0, plan), threading.Event()
    log_path = work / f"{mode}-{row.key}.log"
    try:
        if mode == "redis":
            redis = RedisServer(str(work)).start()
            flags += ["--redis", redis.url]
        with open(log_path, "wb") as log:
            server = launch(server_file, flags, log, row.env)
        target.port = server.port
        victim = Victim(server.port, plan.grace)      # forked now, while this process has one thread
        victim.ready()
        if row.setup:
            row.setup(target)
        meter = Meter(server.proc.pid, os.getpid(), redis_pid=redis.proc.pid if redis else 0)
        redis_memory: list = []
        sampler = sampling(meter, stop_sampling, redis.port if redis else 0, redis_memory)
        time.sleep(plan.baseline)
        t_attack, pids_before = time.time(), set(process_tree(server.proc.pid))
        target.deadline = time.monotonic() + row.seconds(plan)
        result["note"] = row.attack(target)
        t_attack_end = time.time()
        t_base = t_attack - plan.baseline
        base = meter.busy(t_base, t_attack, SERVER_CPU) / plan.baseline
        base_redis = meter.busy(t_base, t_attack, REDIS_CPU) / plan.baseline
        t_end, ending = settle(meter, server.port, base, base_redis, plan.settle)
        sends, victim_errors = victim.stop()
        stop_sampling.set()
        sampler.join()
        alive = server.proc.poll() is None
        pids_after = set(process_tree(server.proc.pid)) if alive else set()
        result.update(
            figures(meter, redis_memory, t_base, t_attack, t_attack_end, t_end),
            sent_bytes=target.tally.sent, answers=dict(target.tally.answers.most_common()),
            ending=ending, victim_before=echo_figures(sends, t_base, t_attack),
            victim_during=echo_figures(sends, t_attack, t_end),
            victim_errors=victim_errors,
            exit_code=server.proc.returncode, health=health(server) if alive else "exited",
            processes_gone=len(pids_before - pids_after), processes_new=len(set(meter.server_seen) - pids_before),
            metrics=server_counters(server) if alive else {})
        result["cpu_us_per_kib"] = (round(max(result["server_cpu_s"], 0) * 1e6 / (result["sent_bytes"] / 1024))
                                    if result["sent_bytes"] else None)
    except Exception as e:  # noqa: BLE001 - one row failing must not lose the others
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        target.stop.set()
        if target.state.get("talker"):
            target.state["talker"].join(5)
        if target.state.get("peer"):
            target.state["peer"].close()
        stop_sampling.set()
        if sampler:
            sampler.join()
        if victim:
            victim.kill()
        if server:
            stop_server(server)
        if redis:
            redis.kill()
    log_text = log_path.read_text(errors="replace") if log_path.exists() else ""
    result["tracebacks_logged"] = log_text.count("Traceback (most recent call last)")
    result["redis_lost"] = log_text.count(" lost: holding its messages")   # the node's link to Redis dropped
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def figures(meter: Meter, redis_memory: list, t_base: float, t0: float, t_attack_end: float, t1: float) -> dict:
    """CPU, memory and attacker figures of the window t0..t1 (the attack and its settling), against
    the baseline t_base..t0."""
    span, base_span = t1 - t0, t0 - t_base
    server_cpu = meter.busy(t0, t1, SERVER_CPU)
    base_rate = meter.busy(t_base, t0, SERVER_CPU) / base_span
    redis_cpu = meter.busy(t0, t1, REDIS_CPU)
    redis_base = meter.busy(t_base, t0, REDIS_CPU) / base_span
    inside = [s for s in meter.samples if t0 <= s[0] <= t1]
    rss0 = meter.at(t0, SERVER_RSS)
    attacking = max(t_attack_end - t0, 0.1)
    cores = sum(cores_busy_between(meter, t0, t1)) / span
    own_tree = meter.busy(t0, t1, CLIENT_CPU) / span
    before_mem = [used for t, used in redis_memory if t <= t0]
    during_mem = [used for t, used in redis_memory if t0 <= t <= t1]
    return {
        "attack_s": round(t_attack_end - t0, 2), "window_s": round(span, 2),
        "server_cpu_raw_s": round(server_cpu, 3), "server_baseline_cores": round(base_rate, 3),
        "server_cpu_s": round(server_cpu - base_rate * span, 3),
        "redis_cpu_s": round(redis_cpu - redis_base * span, 3) if meter.redis_pid else None,
        "rss_before_mib": round(rss0 / 1024, 1),
        "rss_peak_growth_mib": round((max((s[SERVER_RSS] for s in inside), default=rss0) - rss0) / 1024, 1),
        "rss_kept_mib": round((meter.at(t1, SERVER_RSS) - rss0) / 1024, 1),
        "redis_mem_before_mib": round(before_mem[-1] / 2**20, 1) if before_mem else None,
        "redis_mem_peak_growth_mib": (round((max(during_mem) - before_mem[-1]) / 2**20, 1)
                                      if before_mem and during_mem else None),
        "attacker_busy": round(meter.busy(t0, t0 + attacking, OWN_CPU) / attacking, 2),
        "others_cores": round(cores - (server_cpu / span) - own_tree, 2),
    }


def cores_busy_between(meter: Meter, t0: float, t1: float) -> list:
    """Busy seconds of each core between t0 and t1 (whoever ran there)."""
    return [meter.busy(t0, t1, CORE0 + i) for i in range(len(cores_busy()))]

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


HOW_TO_READ = """# Abuse benchmark: what each kind of client input costs the server

Written by `python bench/bench_abuse.py` (see `bench/README.md`); newest section last, one
section per server mode and run, each naming the server file and commit it measured.

How to read a table:

- Each row is one attack on a fresh server (and, in redis mode, a fresh redis-server), at the
  server's default limits unless the row's notes name a flag. A victim pair in another room
  sends 20 messages a second throughout and times its own echoes.
- **sent**: every byte the attacker wrote (handshakes included; a room filled before the
  attack is not counted, the notes say with what). Floods write through a 16 KiB send
  buffer, so that little is still in flight when the server closes them.
- **server CPU s**: utime + stime of the server's process tree (supervisor and workers) from
  the attack's start until the server was quiet again (at most the settle time), minus what
  the baseline (victim traffic alone) used over as long. **µs per KiB** divides it by the
  KiB sent: what a byte of this input costs the server.
- **RSS peak / kept**: VmRSS summed over the tree, sampled every 0.1 s: its highest value in
  that window and its value at the end, minus its value when the attack began. The kernel's
  socket buffers are not in it: what the server has handed to the kernel for a client that
  does not read is held there.
- **Redis** (redis mode): redis-server's CPU the same way, and the growth of its used_memory
  (INFO memory, sampled every 0.3 s).
- **victim echo**: p50 / p99 / max of the victim's echo latency in ms, in the baseline →
  from the attack's start to the window's end; **missing**: echoes of messages sent in that
  window that had not come back a grace second after it.
- **survived**: `yes` when no server process ended or was restarted; then what /healthz said
  if not 200, and how the window ended if not quiet: "still busy" (the server or Redis still
  used CPU at the end of the settle time: its CPU and the victim's latency are a floor) or
  "stalled" (idle, yet a newcomer to a new room got no welcome within a second).
  **attacker got**: the answers counted, most first.
- Compare rows within a section, and a section with another of the same mode. A row is
  bounded when the server stops the attack from paying off: a close, a cap, a limit.
"""


def fmt_bytes(n: int) -> str:
    """n bytes, in B, KiB or MiB."""
    if n < 10 * 1024:
        return f"{n:,} B"
    if n < 10 * 2**20:
        return f"{n / 1024:,.0f} KiB"
    return f"{n / 2**20:,.1f} MiB"


def fmt(value, spec: str = "") -> str:
    """A table cell: the value formatted, or a dash when it is missing."""
    return "-" if value is None else format(value, spec)


def survived(r: dict) -> str:
    """Whether the server lived through the row (no process ended or restarted), and in what state."""
    if r["health"] == "exited":
        return f"**no**: exited with {r['exit_code']}"
    if r["processes_gone"] or r["processes_new"]:
        verdict = f"**no**: {r['processes_new']} worker restart(s)"
    else:
        verdict = "yes"
    if r["health"] != "200":
        verdict += f"; /healthz: {r['health']}"
    if r["ending"] != "quiet":
        verdict += f"; {r['ending']} at the end"
    return verdict


def table_row(r: dict, redis: bool) -> str:
    """One Markdown row of a result."""
    if "skipped" in r:
        return f"| {r['row']} | {r['attack']} | skipped: {r['skipped']} |" + " |" * (11 if redis else 9)
    if "error" in r:
        return f"| {r['row']} | {r['attack']} | error: {r['error'][:200]} |" + " |" * (11 if redis else 9)
    before, during = r["victim_before"], r["victim_during"]
    echo = (f"{fmt(before['p50_ms'], '.1f')} / {fmt(before['p99_ms'], '.1f')} / {fmt(before['max_ms'], '.1f')} → "
            f"{fmt(during['p50_ms'], '.1f')} / {fmt(during['p99_ms'], '.1f')} / {fmt(during['max_ms'], '.1f')}")
    answers = ", ".join(f"{k} ×{v:,}" for k, v in list(r["answers"].items())[:5]) or "nothing"
    extra = [r.get("note", "")]
    special = [f for f in r["flags"] if f not in COMMON_FLAGS and f not in MODE_FLAGS["workers"]
               and not f.startswith(("redis://", "--redis"))]
    if special or r.get("env"):
        extra.append("server " + " ".join([*special, *(f"{k}={v}" for k, v in r.get("env", {}).items())]))
    if r["tracebacks_logged"]:
        extra.append(f"{r['tracebacks_logged']} traceback(s) in the server's log")
    if r.get("redis_lost"):
        extra.append(f"the server lost its Redis link {r['redis_lost']} time(s)")
    if r.get("victim_errors"):
        extra.append("the victim got " + ", ".join(f"{k} ×{v}" for k, v in r["victim_errors"].items()))
    if r["attacker_busy"] >= BUSY_ATTACKER:
        extra.append(f"attacker busy {r['attacker_busy']:.0%}: it may have been the limit")
    if r["others_cores"] >= 0.3:
        extra.append(f"other processes used {r['others_cores']:.1f} cores")
    # Below zero is noise around the baseline: shown as 0, kept as measured in the JSON.
    kept = "exited" if r["health"] == "exited" else f"{r['rss_kept_mib']:.1f}"
    cells = [r["row"], r["attack"], fmt_bytes(r["sent_bytes"]), f"{max(r['server_cpu_s'], 0):.2f}",
             fmt(r["cpu_us_per_kib"], ","), f"{max(r['rss_peak_growth_mib'], 0):.1f} / {kept}"]
    if redis:
        cells += [f"{max(r['redis_cpu_s'], 0):.2f}", fmt(r["redis_mem_peak_growth_mib"], ".1f")]
    cells += [echo, f"{during['missing']} of {during['sent']}", survived(r), answers,
              "; ".join(e for e in extra if e)]
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def section(run: dict) -> str:
    """The Markdown section of one mode's run."""
    redis = run["mode"] == "redis"
    m, plan = run["machine"], run["plan"]
    head = ["| # | attack | sent | server CPU s | µs per KiB | RSS peak / kept MiB |"
            + (" Redis CPU s | Redis mem peak MiB |" if redis else "")
            + " victim echo ms p50 / p99 / max: before → during | victim missing | survived | attacker got | notes |",
            "| --- | --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if redis else "")
            + " --- | ---: | --- | --- | --- |"]
    return "\n".join([
        f"## {run['date']} · mode {run['mode']} · {run['server']}", "",
        f"- command: `{run['command']}`",
        (f"- machine: {machine_line(m)}; "
         f"load average {m['loadavg']} at the start"),
        f"- server flags of every row: `{' '.join(run['flags'])}`, plus the row's own (notes)",
        (f"- plan: baseline {plan['baseline']:g} s, attacks of at most {plan['attack']:g} s (slowloris "
         f"{plan['slowloris_hold']:g} s), then at most {plan['settle']:g} s for the server to go quiet; "
         f"{run['minutes']} min in all"), "",
        *head, *(table_row(r, redis) for r in run["rows"]), ""])


def server_description(server_file: Path) -> str:
    """Which server was measured: the commit, and whether the file differs from it (the server
    may change while a run goes on)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    head = git("rev-parse", "--short", "HEAD")
    digest = hashlib.sha256(server_file.read_bytes()).hexdigest()[:12]
    if server_file.resolve() == (ROOT / "scalechat.py").resolve():
        dirty = " with uncommitted changes" if git("status", "--porcelain", "scalechat.py") else ""
        return f"scalechat.py at {head}{dirty} (sha256 {digest})"
    blob = git("hash-object", str(server_file))
    commit = next((c for c in git("rev-list", "-n", "30", "HEAD", "--", "scalechat.py").split()
                   if git("rev-parse", f"{c}:scalechat.py") == blob), None)
    same = f"scalechat.py as committed in {commit[:7]}" if commit else "no recent commit's scalechat.py"
    return f"{server_file} (sha256 {digest}) = {same}; HEAD is {head}"


def run_mode(mode: str, plan: Plan, server_file: Path, command: str) -> dict:
    """Every row in one mode; the run, with the server it measured noted before and after."""
    started, before = datetime.now(UTC), server_description(server_file)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-abuse-") as work:
        for row in ROWS:
            result = run_row(mode, row, plan, server_file, Path(work))
            rows.append(result)
            shown = {k: result.get(k) for k in ("sent_bytes", "server_cpu_s", "cpu_us_per_kib",
                                                "rss_peak_growth_mib", "redis_cpu_s", "victim_during",
                                                "health", "processes_new", "skipped", "error", "seconds")
                     if result.get(k) is not None}
            print(f"[{mode} {row.key}] {row.title}: {shown}", flush=True)
    after = server_description(server_file)
    return {"mode": mode, "date": started.strftime("%Y-%m-%d %H:%M UTC"), "command": command,
            "server": before if before == after else f"{before}; by the end: {after}",
            "minutes": round((datetime.now(UTC) - started).total_seconds() / 60, 1),
            "machine": machine(), "plan": asdict(plan),
            "flags": [*COMMON_FLAGS, *MODE_FLAGS[mode]] + (["--redis", "redis://127.0.0.1:<port>/0"]
                                                          if mode == "redis" else []),
            "rows": rows}


def save(run: dict, results: Path) -> None:
    """Append the run's section to abuse.md and its rows to abuse.json."""
    results.mkdir(parents=True, exist_ok=True)
    md = results / "abuse.md"
    text = md.read_text() if md.exists() else HOW_TO_READ
    md.write_text(text.rstrip("\n") + "\n\n" + section(run))
    data = results / "abuse.json"
    runs = json.loads(data.read_text())["runs"] if data.exists() else []
    data.write_text(json.dumps({"runs": [*runs, run]}, indent=1) + "\n")


def main() -> int:
    """Run the modes asked for, writing each mode's section as soon as it is done."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=(*MODES, "all"), default="single")
    parser.add_argument("--quick", action="store_true", help="shorter attacks and smaller rooms: a smoke run")
    parser.add_argument("--server", type=Path, default=ROOT / "scalechat.py",
                        help="the server file to run (default: the repo's scalechat.py)")
    parser.add_argument("--rows", default="", help="comma-separated row numbers to run (default: all)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of abuse.md and abuse.json")
    args = parser.parse_args()
    plan = QUICK if args.quick else Plan()
    if args.rows:
        wanted = set(args.rows.split(","))
        ROWS[:] = [row for row in ROWS if row.key in wanted]
    command = " ".join(["python bench/bench_abuse.py", *sys.argv[1:]])
    try:
        for mode in MODES if args.mode == "all" else (args.mode,):
            run = run_mode(mode, plan, args.server.resolve(), command)
            save(run, args.results)
            print(section(run), flush=True)
    except KeyboardInterrupt:       # run_row has stopped every process it started
        print("interrupted: the modes already done are written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
