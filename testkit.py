"""What the tests and the bench scripts share, one of each.

A server factory (start_server) and a private Redis (RedisServer); one raw
WebSocket client on the project's own codec (RawClient, with frame builders);
one metrics scrape (scrape: {'name{label="value",...}': value}); one set of
/proc readers; one description of the machine for bench results (machine); the
oracles of the protocol-core property tests, which bench/fuzz_protocol.py runs
too; and the abuse data bench/bench_abuse.py shares with test_hostile.py.

test_conformance.py keeps its own, independent codec on purpose: it checks
scalechat's framing against a second implementation.
"""
from __future__ import annotations

import asyncio
import functools
import glob
import hashlib
import itertools
import json
import os
import platform
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.protocol import State

import scalechat as sc

HERE = os.path.dirname(os.path.abspath(__file__))
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# Servers: scalechat.py and redis-server on free loopback ports
# ---------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on host right now, below the ephemeral range.

    bind(0) hands out ports from the ephemeral range, which every outgoing
    connection on the machine draws from too: between this call and the
    server's bind, a client socket could take the port.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    for port in random.sample(range(10000, ephemeral_low), 100):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError("no free port below the ephemeral range")


def wait_http(url: str, timeout: float = 10.0) -> None:
    """Poll url until it answers (any HTTP status) or raise after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass
class ServerProc:
    """A running scalechat.py process."""
    proc: subprocess.Popen
    port: int
    metrics_port: int
    host: str = "127.0.0.1"
    args: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(*args: str, port: int | None = None, metrics_port: int | None = None,
                 env: dict | None = None, wrapper: tuple = (), script: str | None = None) -> ServerProc:
    """Start scalechat.py (or another copy of it, script) with args on free ports and wait until
    /healthz answers; wrapper is a command that runs it (e.g. unshare)."""
    port = port or free_port()
    metrics_port = metrics_port or free_port()
    cmd = [*wrapper, sys.executable, str(script or os.path.join(HERE, "scalechat.py")), "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", str(metrics_port), *args]
    proc = subprocess.Popen(cmd, cwd=HERE, env={**os.environ, **(env or {})})
    server = ServerProc(proc, port, metrics_port, args=list(args))
    try:
        wait_http(f"{server.http}/healthz")
    except Exception:
        server.stop(signal.SIGKILL)
        raise
    return server


class RedisServer:
    """A private redis-server on a free loopback port (never a system-wide one).

    persistent: an append-only file fsynced on every write, so the seq counters
    and histories survive a kill, as in a real deployment.
    """

    def __init__(self, workdir: str, persistent: bool = False):
        self.port = free_port()
        self.workdir = workdir
        self.persistent = persistent
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, key_load_delay_us: int = 0) -> RedisServer:
        """Start (or start again) on the same port; return once it answers, maybe still
        loading its data. key_load_delay_us slows loading each key down, and makes Redis
        answer LOADING meanwhile, as a big dataset would."""
        durability = ("--appendonly", "yes", "--appendfsync", "always") if self.persistent \
            else ("--appendonly", "no")
        slow = ("--key-load-delay", str(key_load_delay_us),
                "--loading-process-events-interval-bytes", "1024") if key_load_delay_us else ()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", self.workdir, *durability, *slow], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not self.answers():
            assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
        return self

    def answers(self) -> bool:
        """Whether PING gets PONG (or LOADING) right now."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-LOADING"))
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: Redis vanishes without a word to anyone."""
        self.proc.kill()
        self.proc.wait()

    def stall_and_kill(self, stall: float) -> None:
        """SIGSTOP, then SIGKILL after stall seconds: what the nodes sent meanwhile is on the
        wire, never run and never answered (a bare kill leaves that to chance)."""
        self.proc.send_signal(signal.SIGSTOP)
        time.sleep(stall)
        self.kill()

    def cli(self, *args: str) -> str:
        """The output of one redis-cli command against this server."""
        return subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                              text=True, timeout=5, check=True).stdout

    def subscribers(self, room: str) -> int:
        """PUBSUB NUMSUB of the room's channel: how many nodes receive its traffic."""
        return int(self.cli("PUBSUB", "NUMSUB", f"scalechat:{{{room}}}").split()[-1])


# ---------------------------------------------------------------------------
# Plain HTTP, byte for byte
# ---------------------------------------------------------------------------

def http(port: int, request: bytes) -> tuple[int, dict, bytes]:
    """Send a raw HTTP request; the (status, headers, body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def get(port: int, target: str, headers: str = "", method: str = "GET") -> tuple[int, dict, bytes]:
    """A request for target with a Host header and any extra header lines."""
    return http(port, f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode())


# ---------------------------------------------------------------------------
# Metrics: one scrape, one key shape
# ---------------------------------------------------------------------------

def sample_key(name: str, **labels: str) -> str:
    """The key of one sample in a scrape: its name, then its labels sorted, as Prometheus writes them."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def parse_samples(text: str) -> dict[str, float]:
    """A Prometheus text exposition (checked by prometheus_client's parser) as {sample_key: value}."""
    return {sample_key(s.name, **s.labels): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Every sample of one metrics scrape, keyed 'name' or 'name{label="value",...}' (labels sorted)."""
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return parse_samples(answer.read().decode())


def sample(samples: dict, name: str, **labels: str) -> float:
    """One sample's value from a scrape; 0 when the server has not written it."""
    return samples.get(sample_key(name, **labels), 0.0)


def total(samples: dict, name: str) -> float:
    """A sample summed over all its labels (the name alone and every name{...})."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def sample_names(samples: dict) -> set[str]:
    """The sample names of a scrape, labels left out."""
    return {k.partition("{")[0] for k in samples}


# ---------------------------------------------------------------------------
# A raw WebSocket client, on scalechat's own codec
# ---------------------------------------------------------------------------

def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
          masked: bool = True, length: int | None = None) -> bytes:
    """One client frame; rsv bits, an unmasked frame or a declared length other than the
    payload's make it a wrong one on purpose."""
    key = sc.new_mask_key() if masked else None
    if length is None:
        data = bytearray(sc.encode_frame(opcode, payload, fin, key))
    else:       # a header that declares length, whatever follows
        data = bytearray(sc.encode_frame(opcode, b"", fin))
        m = 0x80 if masked else 0
        data[1:] = (bytes((m | length,)) if length < 126 else
                    struct.pack("!BH", m | 126, length) if length < 1 << 16 else
                    struct.pack("!BQ", m | 127, length))
        data += (key + sc.mask(payload, key)) if masked else payload
    data[0] |= rsv << 4
    return bytes(data)


def close_frame(code: int | None = None, reason: bytes = b"") -> bytes:
    """A client Close frame; no payload at all when code is None."""
    return frame(sc.OP_CLOSE, b"" if code is None else struct.pack("!H", code) + reason)


def chat_json(text: str, message_id: int = 1) -> bytes:
    """A client chat message as the protocol wants it (UTF-8 JSON, non-ASCII kept raw)."""
    return json.dumps({"message_id": message_id, "text": text}, ensure_ascii=False).encode()


def chat_frame(text: str, message_id: int = 1) -> bytes:
    """A masked text frame with one chat message."""
    return frame(sc.OP_TEXT, chat_json(text, message_id))


def pieces(data: bytes, cuts) -> list:
    """data cut at the given offsets."""
    return [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)])]


def send_in_chops(sock: socket.socket, data: bytes, chop: int = 0, pause: float = 0.0) -> None:
    """Send bytes at once, or in chops of that many bytes (one TCP segment each)."""
    if not chop:
        sock.sendall(data)
        return
    for i in range(0, len(data), chop):
        sock.sendall(data[i:i + chop])
        if pause:
            time.sleep(pause)


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the peer ends the TCP connection (FIN or reset) within timeout; reads and
    drops what arrives until then."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass        # a reset is the peer closing too
    return True


class RawClient:
    """A WebSocket client on a plain blocking socket: sends exactly what it is told
    (scalechat.encode_frame for frames), reads server frames with scalechat.FrameParser.

    The handshake must end in 101 (HandshakeError with the status otherwise),
    and the first JSON frame is the welcome.
    """

    def __init__(self, port: int, resource: str = "/ws", *, origin: str | None = None,
                 source: str = "127.0.0.1", rcvbuf: int = 0, sndbuf: int = 0, timeout: float = 5.0,
                 host: str = "127.0.0.1"):
        self.sock = socket.socket()
        if rcvbuf:      # before connect, so the TCP window stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.sock.settimeout(timeout)
        self.parser = sc.FrameParser(expect_masked=False, max_message_size=1 << 26)
        self.frames: list = []
        try:
            self.sock.bind((source, 0))
            self.sock.connect((host, port))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            key = sc.new_key()
            self.sock.sendall(sc.client_handshake_request(f"{host}:{port}", resource, key, origin))
            buf = b""
            while (end := sc.parse_handshake_response(buf, key)) is None:
                data = self.sock.recv(65536)
                if not data:
                    raise sc.HandshakeError(0, "closed during the handshake")
                buf += data
            self.frames.extend(self.parser.feed(buf[end:]))
            self.welcome = self.recv_json()
        except BaseException:
            self.sock.close()
            raise
        assert self.welcome["type"] == "welcome", self.welcome
        self.name = self.welcome.get("name")

    def send(self, data: bytes, chop: int = 0, pause: float = 0.0) -> None:
        """Send bytes at once, or in chops of that many bytes (one TCP segment each)."""
        send_in_chops(self.sock, data, chop, pause)

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        """Send one masked frame."""
        self.sock.sendall(sc.encode_frame(opcode, payload, fin, sc.new_mask_key()))

    def send_json(self, obj) -> None:
        """Send obj as one text frame."""
        self.send_frame(sc.OP_TEXT, json.dumps(obj).encode())

    def recv_frame(self) -> tuple[int, bytes]:
        """The next (opcode, payload) from the server, messages whole; ConnectionError at EOF."""
        while not self.frames:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("server closed the connection")
            self.frames.extend(self.parser.feed(data))
        return self.frames.pop(0)

    def recv_json(self, skip: tuple = ("members", "ack")) -> dict:
        """The next text frame as JSON, skipping member counts (and acks, unless asked) and
        pongs, answering pings; ConnectionError when the server closes."""
        while True:
            opcode, payload = self.recv_frame()
            if opcode == sc.OP_TEXT:
                obj = json.loads(payload)
                if obj.get("type") not in skip:     # member counts come on a timer, between any two frames
                    return obj
            elif opcode == sc.OP_CLOSE:
                raise ConnectionError(f"closed with {sc.parse_close(payload)}")
            elif opcode == sc.OP_PING:
                self.send_frame(sc.OP_PONG, payload)
            elif opcode != sc.OP_PONG:
                raise AssertionError(f"a frame of opcode {opcode} from the server")

    def recv_message(self) -> dict:
        """The next chat message, skipping everything else."""
        while (obj := self.recv_json())["type"] != "message":
            pass
        return obj

    def recv_close_code(self) -> int:
        """Skip frames until the server's Close; its status code (1005 when it has none)."""
        while True:
            opcode, payload = self.recv_frame()
            if opcode == sc.OP_CLOSE:
                return sc.parse_close(payload)[0]

    def read_until_close(self) -> tuple[list, int | None]:
        """(JSON objects received, close code) up to the server's Close frame or EOF; echoes
        the Close, then closes the socket."""
        objects = []
        try:
            while True:
                opcode, payload = self.recv_frame()
                if opcode == sc.OP_TEXT:
                    objects.append(json.loads(payload))
                elif opcode == sc.OP_CLOSE:
                    self.send_frame(sc.OP_CLOSE, payload[:2])
                    return objects, sc.parse_close(payload)[0]
        except OSError:
            return objects, None
        finally:
            self.sock.close()

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True when the server ends the TCP connection (FIN or reset) within timeout."""
        return closed_by_peer(self.sock, timeout)

    def close(self) -> None:
        """Drop the socket, without a closing handshake."""
        self.sock.close()


CLIENT_A, CLIENT_B = "A" * 22, "B" * 22      # client ids: 16-64 of [A-Za-z0-9_-]
BIG_TEXT = "\x01" * 65536                    # 64 KiB that JSON-escapes to 393 KB


def echo_time(client: RawClient, message_id: int) -> float:
    """Seconds from sending a message to receiving it back."""
    t0 = time.monotonic()
    client.send_json({"message_id": message_id, "text": "ping"})
    while (m := client.recv_message())["message_id"] != message_id or m["sender"] != client.name:
        pass
    return time.monotonic() - t0


def fill_room(port: int, room: str, count: int, text: str = BIG_TEXT) -> None:
    """Post count messages to room from one client (within the default burst), then leave."""
    client = RawClient(port, f"/ws/{room}", timeout=30)
    for i in range(count):
        client.send_json({"message_id": i, "text": text})
        client.recv_message()
    client.close()


def handshake_status(port: int, **client_options) -> int:
    """The HTTP status the server answers an upgrade with (101 when it accepts)."""
    try:
        RawClient(port, **client_options).close()
    except sc.HandshakeError as e:
        return e.status
    return 101


# ---------------------------------------------------------------------------
# Room members: real WebSocket clients (the websockets library) on asyncio
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
        self.acks: list[dict] = []
        self.welcomes: list[tuple[int, dict]] = []     # (url index, welcome frame)
        self.closes: list[int] = []     # close code of each lost connection (1006: none received)
        self.sent: list[int] = []       # message ids sent while the connection was open
        self.next_id = 0
        self.leaving = False

    async def join(self, since: int | None = None) -> Member:
        """Connect and wait for the welcome (since counts in the order of the last message received)."""
        return await self.join_at(since, self.messages[-1]["epoch"] if since is not None and self.messages else None)

    async def join_at(self, since: int | None, epoch: str | None) -> Member:
        """Connect with since=<seq> of the order epoch, and wait for the welcome."""
        query = f"?name={self.name}" + ("" if since is None else f"&since={since}")
        if epoch is not None:
            query += f"&epoch={epoch}"
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
                elif event["type"] == "ack":
                    self.acks.append(event)
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

    @property
    def epochs(self) -> list[str]:
        """The order (epoch) of every message received, in arrival order."""
        return [m["epoch"] for m in self.messages]

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


async def talk_through(members: list[Member], action, period: float = 0.02, settle: float = 0.5) -> set:
    """Every member chats (chatter) for settle seconds, then while action() runs in a thread,
    then settle seconds more; the keys of every message sent."""
    stop = asyncio.Event()
    talk = asyncio.create_task(chatter(members, stop, period))
    await asyncio.sleep(settle)
    await asyncio.to_thread(action)
    await asyncio.sleep(settle)
    stop.set()
    await talk
    return set().union(*(m.sent_keys() for m in members))


async def all_received(members: list[Member], keys: set, timeout: float = 10.0) -> None:
    """Wait until every member has every message of keys, then a moment for any stray extra."""
    await until(lambda: all(keys <= m.keys() for m in members), timeout,
                f"{len(keys)} messages to reach {len(members)} members")
    await asyncio.sleep(0.2)


def assert_one_order(members: list[Member], keys: set | None = None) -> int:
    """Every member got seq 1..N, no gap, no duplicate, all in one order; with keys, exactly
    those messages. Returns N. Where the room's order began again (a new epoch: its Redis
    state was lost), the new order counts from 1 again, after every message of the old one."""
    reference = members[0].log
    n = len(reference)
    for m in members:
        seqs = [e[0] for e in m.log]
        epochs = [e for e, _ in itertools.groupby(m.epochs)]
        assert len(epochs) == len(set(epochs)), f"{m.name}: an order came back after another: {epochs}"
        restarts = [i for i in range(len(seqs)) if i == 0 or m.epochs[i] != m.epochs[i - 1]]
        for start, end in zip(restarts, [*restarts[1:], len(seqs)]):
            assert seqs[start:end] == list(range(1, end - start + 1)), \
                f"{m.name}: gap or duplicate in seqs {seqs[start:end]} of epoch {m.epochs[start]}"
        assert m.log == reference and m.epochs == members[0].epochs, \
            f"{m.name} saw another order or another set than {members[0].name}"
    sequenced = [(sender, mid) for _, sender, mid in reference]
    assert len(set(sequenced)) == n, "a message was sequenced twice"
    if keys is not None:
        assert set(sequenced) == keys, f"lost {keys - set(sequenced)}, foreign {set(sequenced) - keys}"
    return n


def assert_acked_as_delivered(members: list[Member]) -> None:
    """Every ack a member got names the order (epoch) and seq its message was delivered with."""
    for m in members:
        delivered = {(e["sender"], e["message_id"]): (e["epoch"], e["seq"]) for e in m.messages}
        for ack in m.acks:
            assert delivered.get((m.name, ack["message_id"])) == (ack["epoch"], ack["seq"]), \
                f"{m.name}: acked {ack}, delivered as {delivered.get((m.name, ack['message_id']))}"


# ---------------------------------------------------------------------------
# /proc: processes, memory, CPU time, sockets
# ---------------------------------------------------------------------------

def _pids(pids) -> list:
    return [pids] if isinstance(pids, int) else list(pids)


def children(pid: int) -> list[int]:
    """The child processes of pid (the workers of a supervisor), sorted; [] once it is gone."""
    found = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(path) as f:
                found += [int(p) for p in f.read().split()]
        except OSError:
            pass        # the thread ended meanwhile
    return sorted(found)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    pids, i = [pid], 0
    while i < len(pids):
        pids.extend(children(pids[i]))
        i += 1
    return pids


def alive(pid: int) -> bool:
    """Whether pid is a live process (a zombie waiting for its reaper counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def memory_kib(pids, key: str = "VmRSS") -> int:
    """A /proc/<pid>/status memory figure (VmRSS, VmHWM) of a pid, or summed over pids, in KiB;
    processes that are gone count 0."""
    total_kib = 0
    for pid in _pids(pids):
        try:
            with open(f"/proc/{pid}/status") as f:
                total_kib += next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
        except (OSError, StopIteration):
            continue
    return total_kib


def rss_kib(pids) -> int:
    """Resident set size (VmRSS) of a pid, or summed over pids, in KiB."""
    return memory_kib(pids, "VmRSS")


def peak_rss_kib(pids) -> int:
    """Peak resident set size (VmHWM) of a pid, or summed over pids, in KiB."""
    return memory_kib(pids, "VmHWM")


def cpu_times(pids) -> dict[int, tuple[float, float]]:
    """{pid: (utime + stime, stime)} in seconds, for each process that still exists."""
    seconds = {}
    for pid in _pids(pids):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()       # the name may hold spaces
        utime, stime = int(fields[11]), int(fields[12])     # fields 14 and 15 of proc(5)
        seconds[pid] = ((utime + stime) / CLK_TCK, stime / CLK_TCK)
    return seconds


def cpu_seconds(pids) -> float:
    """utime + stime of a pid, or summed over pids, in seconds."""
    return sum(total_s for total_s, _ in cpu_times(pids).values())


def cores_busy() -> list[float]:
    """Seconds each core has spent not idle since boot, from /proc/stat (whoever ran there)."""
    busy = []
    with open("/proc/stat") as f:
        for line in f:
            name, *ticks = line.split()
            if name.startswith("cpu") and name != "cpu":
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, ticks[:8])
                busy.append((user + nice + system + irq + softirq + steal) / CLK_TCK)
    return busy


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages: how busy the shared machine was."""
    return [round(x, 2) for x in os.getloadavg()]


TCP_ESTABLISHED, TCP_LISTEN = "01", "0A"


def tcp_sockets(port: int, state: str) -> dict[str, int]:
    """Socket inode -> remote port of the IPv4 sockets on local port in state (01 established, 0A listen)."""
    found = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[3] == state and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found[fields[9]] = int(fields[2].rsplit(":", 1)[1], 16)
    return found


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets pid holds open; none once it has exited."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return set()
    inodes = set()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def named_unix_sockets(pids) -> list[str]:
    """The addresses ('@' for abstract ones) of the unix sockets of a pid, or of pids, that are bound
    to a name: any process on the host could send to those."""
    inodes = set().union(*map(socket_inodes, _pids(pids)))
    with open("/proc/net/unix") as f:
        next(f)
        return [fields[7] for fields in map(str.split, f) if len(fields) > 7 and fields[6] in inodes]


# ---------------------------------------------------------------------------
# Bench results: the machine they come from
# ---------------------------------------------------------------------------

def connection_owners(port: int, pids: list[int]) -> dict[int, int]:
    """Client port -> pid of the process that holds that client's connection to port."""
    inodes = tcp_sockets(port, TCP_ESTABLISHED)
    return {inodes[inode]: pid for pid in pids for inode in socket_inodes(pid) if inode in inodes}


def machine() -> dict:
    """The machine the numbers come from, for a bench result."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release(), "os": platform.platform(),
            "open_files_limit": os.sysconf("SC_OPEN_MAX"),
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def machine_line(m: dict | str) -> str:
    """A machine() record as one line of a report; also reads the older records
    (a plain line, or cpus/cpu_model for cores/cpu)."""
    if isinstance(m, str):
        return m
    cores, cpu = m.get("cores", m.get("cpus")), m.get("cpu", m.get("cpu_model"))
    system = m.get("os") or f"Linux {m.get('kernel', '?')}"
    return f"{cores} cores ({cpu}), Python {m.get('python', '?')}, {system}"


# ---------------------------------------------------------------------------
# Oracles for the protocol core: test_hostile.py's properties and bench/fuzz_protocol.py
# ---------------------------------------------------------------------------

# Close codes the server's own parser may answer a violation with.
PARSER_CLOSE_CODES = {sc.CLOSE_PROTOCOL_ERROR, sc.CLOSE_UNSUPPORTED_DATA,
                      sc.CLOSE_INVALID_DATA, sc.CLOSE_TOO_BIG}
# The codes a client frame's own content can earn (the rate and the bus aside).
CHAT_ERROR_CODES = set(sc.ErrorCode) - {sc.ErrorCode.RATE_LIMIT, sc.ErrorCode.UNAVAILABLE}
HANDSHAKE_STATUSES = {400, 405, 426}


def feed_chunks(chunks: list, **parser_options) -> tuple[list, int | None]:
    """Feed chunks to a fresh FrameParser: (frames completed, close code of the error or None)."""
    parser = sc.FrameParser(**parser_options)
    frames: list = []
    for chunk in chunks:
        try:
            frames.extend(parser.feed(chunk))
        except sc.ProtocolError as e:
            assert e.code in PARSER_CLOSE_CODES, f"close code {e.code} for {e.reason}"
            assert isinstance(e.reason, str) and len(e.reason.encode()) <= 123
            frames.extend(e.frames)                 # completed in the same call, before the error
            try:
                parser.feed(b"\x81\x80abcd")        # a failed parser stays failed
            except sc.ProtocolError as again:
                assert again.code == e.code
            else:
                raise AssertionError("a failed parser took more data")
            return frames, e.code
    return frames, None


def split_at(data: bytes, cuts: list) -> list:
    """data cut at the given offsets (taken modulo its length, in order)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[i:j] for i, j in zip([0, *points], [*points, len(data)], strict=True)]


def check_any_split(data: bytes, cuts: list, **parser_options) -> tuple[list, int | None]:
    """Assert that a stream parses alike whole, byte by byte and cut at cuts; return the result.

    The result is the frames completed and, when the stream breaks the
    protocol, the close code: both must not depend on how the stream was cut.
    """
    one_by_one = feed_chunks([data[i:i + 1] for i in range(len(data))], **parser_options)
    for chunks in ([data], split_at(data, cuts)):
        assert feed_chunks(chunks, **parser_options) == one_by_one
    for opcode, payload in one_by_one[0]:
        if opcode == sc.OP_TEXT:
            payload.decode()                     # text messages are always valid UTF-8
        if opcode == sc.OP_CLOSE:
            sc.parse_close(payload)
        assert parser_options.get("accept_binary", True) or opcode != sc.OP_BINARY
    return one_by_one


def check_close_payload(payload: bytes) -> None:
    """parse_close either returns a valid (code, reason) or raises ProtocolError 1002/1007."""
    try:
        code, reason = sc.parse_close(payload)
    except sc.ProtocolError as e:
        assert e.code in (sc.CLOSE_PROTOCOL_ERROR, sc.CLOSE_INVALID_DATA)
        return
    assert code == sc.CLOSE_NO_STATUS or code in sc.VALID_CLOSE_CODES or 3000 <= code <= 4999
    assert reason.encode() == payload[2:]


def check_request_head(head: bytes) -> None:
    """A request head either parses and upgrades or raises HandshakeError with a 4xx status."""
    try:
        request = sc.parse_request_head(head)
    except sc.HandshakeError as e:
        assert e.status == 400
        return
    try:
        accept = sc.check_upgrade(request)
    except sc.HandshakeError as e:
        assert e.status in HANDSHAKE_STATUSES
        return
    assert accept == sc.accept_key(request.headers["sec-websocket-key"])


def check_chat_payload(payload: bytes, max_message_size: int) -> None:
    """parse_chat_message either returns a valid message or raises ChatError with a known code."""
    try:
        message_id, text, sent_at, resend = sc.parse_chat_message(payload, max_message_size)
    except sc.ChatError as e:
        assert e.code in CHAT_ERROR_CODES
        return
    assert type(resend) is bool
    assert message_id is None or type(message_id) is int
    assert type(text) is str and 0 < len(text.encode()) <= max_message_size
    assert sent_at is None or type(sent_at) is str


# ---------------------------------------------------------------------------
# Shared data and figures: test_hostile.py and bench/bench_abuse.py
# ---------------------------------------------------------------------------

BAD_PAYLOADS = [              # (text frame payload, error code expected; the connection stays)
    (b"[" * 300_000, "bad_json"), (b'{"text":' * 40_000, "bad_json"),
    (b"[1,2,3]", "bad_message"), (b"42", "bad_message"), (b'"text"', "bad_message"),
    (b"null", "bad_message"), (b"{not json", "bad_json"),
]


def percentile(values: list, q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


NODE_TIMEOUT_MS = 1000          # cluster-node-timeout: how soon a dead master is failed over
CLUSTER_SLOTS = sc.CLUSTER_SLOTS


# ---------------------------------------------------------------------------
# A private Redis Cluster: redis-server processes on loopback, and a few commands
# ---------------------------------------------------------------------------

class RedisError(Exception):
    """An error reply (-ERR, -MOVED, -BUSYKEY, ...)."""


def _text(reply):
    """A reply of scalechat's RespParser with bytes as str, and an error reply raised."""
    if isinstance(reply, sc.RespError):
        raise RedisError(str(reply))
    if isinstance(reply, bytes):
        return reply.decode()
    if isinstance(reply, list):
        return [_text(item) for item in reply]
    return reply


def command(port: int, *args, timeout: float = 5.0, asking: bool = False):
    """One command to the Redis on 127.0.0.1:port and its reply; RedisError for an error reply.
    asking: send ASKING first on the same connection (after an -ASK redirection)."""
    parser, replies = sc.RespParser(), []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall((sc.resp_command("ASKING") if asking else b"") + sc.resp_command(*args))
        while len(replies) < 1 + asking:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed by Redis")
            replies += parser.feed(data)
    return _text(replies[-1])


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


def room_key(room: str) -> str:
    """A key of room's state (the contract: keys scalechat:{<room>}:...)."""
    return f"scalechat:{{{room}}}:state"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll predicate until it returns something true (errors from Redis count as false)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (OSError, RedisError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(interval)


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


class LoopbackProxy:
    """A TCP proxy on a free loopback port (``url`` is its ws:// address): each accepted client
    goes to ``link(client, index)`` (index: 0 for the first), which subclasses write."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"ws://127.0.0.1:{self.listener.getsockname()[1]}/ws"
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            self.link(client, self.accepted - 1)

    def link(self, client: socket.socket, index: int) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------
# A Docker engine and the stack, on this machine: test_swarm.py and bench/bench_swarm.py
# ---------------------------------------------------------------------------
#
# The machine has Debian's Docker engine but no image registry and no IPVS (see
# test_swarm.compose.yml for what that forces on the stack): Engine starts dockerd
# and a swarm when none runs, build_images builds stand-ins from Debian for what
# cannot be pulled and the project's image on them, Stack deploys
# docker-compose.yml with test_swarm.compose.yml on top.

OVERRIDE = "test_swarm.compose.yml"
CHAT_IMAGE = "scalechat:swarm-test"
PROMETHEUS = "http://127.0.0.1:9090"
DOCKERD_LOG = Path("/tmp/scalechat-test-dockerd.log")
SUITE = "bookworm"  # its python3 is 3.11, as in python:3.11-slim


class DockerUnavailable(RuntimeError):
    """No engine, swarm, tool or port for the stack on this machine."""


# The official Redis image's entrypoint turns protected mode off when Redis runs
# without a configuration file (as the stack runs it): the stand-in does the same,
# or Redis would refuse the chat replicas, which reach it from other containers.
REDIS_ENTRYPOINT = """#!/bin/sh
if [ "$1" = redis-server ]; then
  case "$2" in ""|-*) shift; set -- redis-server --protected-mode no "$@" ;; esac
fi
exec "$@"
"""

# Stand-in images: (Debian packages, mmdebstrap customize hooks, docker import --change lines).
# Each image is labelled with a hash of its recipe and rebuilt only when that changes.
STANDINS = {
    "scalechat-standin/python:3.11": (
        ["python3", "python3-pip", "python-is-python3"],
        # The project's Dockerfile runs pip as root, as python:3.11-slim allows; Debian
        # marks its Python as externally managed. pip reaches PyPI through this
        # machine's network, so it trusts this machine's CA bundle.
        ['rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
         'cp /etc/ssl/certs/ca-certificates.crt "$1"/etc/ssl/certs/ca-certificates.crt'],
        ["ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt", 'CMD ["python3"]'],
    ),
    "scalechat-standin/redis:7": (
        ["redis-server"],
        ['mkdir -p "$1"/data',
         f"printf '%s' '{REDIS_ENTRYPOINT}' > \"$1\"/usr/local/bin/docker-entrypoint.sh",
         'chmod 755 "$1"/usr/local/bin/docker-entrypoint.sh'],
        ["WORKDIR /data", 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]', 'CMD ["redis-server"]'],
    ),
    "scalechat-standin/prometheus:2": (
        ["prometheus"],
        ['mkdir -p "$1"/prometheus'],
        ["WORKDIR /prometheus", 'ENTRYPOINT ["/usr/bin/prometheus"]',
         'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'],
    ),
}
PYTHON_STANDIN = "scalechat-standin/python:3.11"


# ---- running commands

def run(*cmd: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run cmd, bounded in time; on failure raise with its output."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{' '.join(cmd)}: no answer in {timeout} s") from None
    if check and done.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr or done.stdout}")
    return done


def docker(*args: str, timeout: float = 120, check: bool = True, **kwargs) -> str:
    """The output of one docker CLI command."""
    return run("docker", *args, timeout=timeout, check=check, **kwargs).stdout.strip()


# ---- the engine

class Engine:
    """A Docker engine in Swarm mode: the one running, or one this test starts and stops.

    A daemon the test starts runs with --iptables=false and --ip-forward=false.
    With its defaults, dockerd adds NAT and filter rules to the host (MASQUERADE
    for its bridges, FORWARD's policy set to DROP), turns IP forwarding on, and
    leaves all of that behind when it stops; a NAT rule also makes the kernel
    track every connection in the host's conntrack table, loopback ones included,
    and other tests here open tens of thousands of them. Without them, nothing
    changes on the host's netfilter, containers have no route out of this
    machine, and everything the stack needs still works: containers reach each
    other over the overlay network, and a host-mode port is forwarded by
    docker-proxy, which loopback reaches.
    """

    def __init__(self) -> None:
        self.dockerd: subprocess.Popen | None = None
        self.links_before: set[str] = set()
        self.swarm_started = False
        self.networks_before: set[str] = set()

    def start(self) -> None:
        install_missing()
        if shutil.which("docker") is None:
            raise DockerUnavailable("no docker CLI on PATH (Debian's docker.io has one)")
        if run("docker", "info", timeout=30, check=False).returncode != 0:
            self.start_daemon()
        client = docker("version", "--format", "{{.Client.Version}}")
        if int(client.split(".")[0]) < 23:
            raise DockerUnavailable(f"docker CLI {client}: its `docker stack deploy` reads only Compose files with a "
                        "`version:` line, and docker-compose.yml follows the Compose specification, which "
                        "has none; put a docker CLI 23 or later first on PATH")
        state = docker("info", "--format", "{{.Swarm.LocalNodeState}}")
        if state == "inactive":
            self.networks_before = set(docker("network", "ls", "--format", "{{.Name}}").split())
            docker("swarm", "init", "--advertise-addr", "127.0.0.1")
            self.swarm_started = True
        elif state != "active":
            raise DockerUnavailable(f"the engine's swarm is {state!r}, neither inactive nor active")

    def start_daemon(self) -> None:
        if os.geteuid() != 0:
            raise DockerUnavailable("no Docker daemon answers, and only root can start one")
        self.links_before = network_links()
        log = open(DOCKERD_LOG, "w")  # noqa: SIM115 (kept open for the daemon's lifetime)
        self.dockerd = subprocess.Popen(
            ["dockerd", "--iptables=false", "--ip-forward=false"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while run("docker", "info", timeout=30, check=False).returncode != 0:
            if self.dockerd.poll() is not None or time.monotonic() > deadline:
                status = self.dockerd.poll()
                self.stop()
                tail = DOCKERD_LOG.read_text(errors="replace").splitlines()[-15:]
                why = "no answer in 60 s" if status is None else f"exit status {status}"
                raise DockerUnavailable(f"dockerd did not start ({why}); the end of {DOCKERD_LOG}:\n" + "\n".join(tail))
            time.sleep(0.5)

    def stop(self) -> None:
        """Leave the swarm and stop the daemon, if this test began them (twice is harmless)."""
        if self.swarm_started:
            docker("swarm", "leave", "--force", timeout=60, check=False)
            # Leaving removes the ingress network, not the bridge that swarm init made.
            if "docker_gwbridge" not in self.networks_before:
                docker("network", "rm", "docker_gwbridge", check=False)
            self.swarm_started = False
        if self.dockerd is not None:
            if self.dockerd.poll() is None:
                self.dockerd.send_signal(signal.SIGTERM)
                try:
                    self.dockerd.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(self.dockerd.pid, signal.SIGKILL)
                    self.dockerd.wait()
            # The daemon leaves its bridges (docker0, docker_gwbridge) up when it stops.
            for link in network_links() - self.links_before:
                run("ip", "link", "delete", link, check=False)
            self.dockerd = None


def install_missing() -> None:
    """apt-get install docker.io and mmdebstrap when a command of theirs is missing."""
    if shutil.which("dockerd") and shutil.which("mmdebstrap"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise DockerUnavailable("dockerd or mmdebstrap is missing, and only root can apt-get install docker.io mmdebstrap")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", "update", "-qq", timeout=600, env=env)
    run("apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker.io", "mmdebstrap",
        timeout=900, env=env)


def network_links() -> set[str]:
    """Names of the host's network interfaces."""
    return set(os.listdir("/sys/class/net"))


# ---- images

def recipe_hash(tag: str) -> str:
    return hashlib.sha256(json.dumps([SUITE, *STANDINS[tag]]).encode()).hexdigest()[:16]


def debian_sources() -> str:
    """The apt sources this machine installs from: mmdebstrap builds from the same mirror."""
    for path in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        if os.path.exists(path) and os.path.getsize(path):
            return path
    return "http://deb.debian.org/debian"


def build_standin(tag: str) -> None:
    """A Debian root filesystem with the recipe's packages, imported as image tag (unless already there)."""
    wanted = recipe_hash(tag)
    label = docker("image", "inspect", "--format", '{{index .Config.Labels "scalechat.recipe"}}', tag,
                   check=False)
    if label == wanted:
        return
    packages, hooks, changes = STANDINS[tag]
    with tempfile.TemporaryFile() as errors:
        rootfs = subprocess.Popen(
            ["mmdebstrap", "--quiet", "--variant=minbase", "--include=" + ",".join(packages),
             *(f"--customize-hook={hook}" for hook in hooks), SUITE, "-", debian_sources()],
            stdout=subprocess.PIPE, stderr=errors)
        try:
            imported = subprocess.run(
                ["docker", "import", *(arg for change in [*changes, f"LABEL scalechat.recipe={wanted}"]
                                       for arg in ("--change", change)), "-", tag],
                stdin=rootfs.stdout, capture_output=True, text=True, timeout=600, check=False)
        finally:
            rootfs.stdout.close()
            try:
                rootfs.wait(60)
            except subprocess.TimeoutExpired:
                rootfs.kill()
                rootfs.wait()
        errors.seek(0)
        assert rootfs.returncode == 0, f"mmdebstrap for {tag} failed: {errors.read()[-2000:].decode()}"
    assert imported.returncode == 0, f"docker import {tag} failed: {imported.stderr}"


def build_images() -> None:
    """The stand-ins (in parallel), then the project's image from its Dockerfile on the Python one."""
    with ThreadPoolExecutor(len(STANDINS)) as pool:
        for future in [pool.submit(build_standin, tag) for tag in STANDINS]:
            future.result()
    # The classic builder: what an engine 20.10 has without buildx. --network host: pip
    # inside the build reaches PyPI the way this machine does.
    run("docker", "build", "--network", "host", "--build-arg", f"BASE={PYTHON_STANDIN}",
        "-t", CHAT_IMAGE, HERE, timeout=600, env={**os.environ, "DOCKER_BUILDKIT": "0"})


# ---- the stack

class Stack:
    """A deployed stack: its tasks' containers, Prometheus's API, load runs on its network.

    docker-compose.yml with test_swarm.compose.yml on top, the chat service on
    CHAT_IMAGE; env adds settings read at deploy time (SCALECHAT_REPLICAS, ...).
    """

    def __init__(self, name: str, env: dict[str, str] | None = None) -> None:
        self.name, self.env = name, dict(env or {})
        self.network, self.chat_service = f"{name}_default", f"{name}_chat"
        self.deployed = False

    def deploy(self) -> None:
        self.remove()  # what a run killed before its cleanup left
        self.deployed = True
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as docker-proxy binds
            try:
                s.bind(("0.0.0.0", 9090))
            except OSError:
                raise DockerUnavailable("port 9090 is taken: the stack's Prometheus publishes it")
        docker("stack", "deploy", "--resolve-image", "never", "--detach=true",
               "-c", "docker-compose.yml", "-c", OVERRIDE, self.name,
               cwd=HERE, env={**os.environ, **self.env, "SCALECHAT_IMAGE": CHAT_IMAGE})

    def remove(self) -> None:
        """Remove the stack, wait for its containers and network to go, then its volumes."""
        self.deployed = False
        docker("rm", "-f", f"{self.name}-load", check=False)
        docker("stack", "rm", self.name, check=False)
        wait_for(lambda: not docker("ps", "-aq", "--filter", f"label=com.docker.stack.namespace={self.name}"),
                 90, "the stack's containers gone", interval=1.0)
        wait_for(lambda: not docker("network", "ls", "-q", "--filter", f"name={self.network}"),
                 60, "the stack's network gone", interval=1.0)
        volumes = docker("volume", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={self.name}")
        if volumes:
            docker("volume", "rm", *volumes.split())

    def loadclient(self, out: Path, *args: str, log: str = "loadclient.log",
                   options: tuple[str, ...] = ()) -> subprocess.Popen:
        """Start loadclient.py with args in a container on the stack's network.

        out is its working folder (/out in there); its output goes to out/log;
        options go to docker run."""
        out.mkdir(parents=True, exist_ok=True)
        with open(out / log, "w") as output:
            return subprocess.Popen(
                ["docker", "run", "--rm", "--name", f"{self.name}-load", "--network", self.network,
                 "--user", "0:0", *options, "-v", f"{HERE}:/src:ro", "-v", f"{out}:/out", "-w", "/out",
                 CHAT_IMAGE, "python", "/src/loadclient.py", *args],
                stdout=output, stderr=subprocess.STDOUT)

    def chat_containers(self) -> list[dict]:
        """docker inspect of every running chat task's container."""
        ids = docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={self.chat_service}")
        return json.loads(docker("inspect", *ids.split())) if ids else []

    def healthy_chat_addresses(self) -> list[str]:
        """Overlay addresses of the chat containers that the image's HEALTHCHECK calls healthy."""
        return [c["NetworkSettings"]["Networks"][self.network]["IPAddress"] for c in self.chat_containers()
                if (c["State"].get("Health") or {}).get("Status") == "healthy"]

    def query(self, promql: str) -> dict[str, float]:
        """An instant query to the stack's Prometheus: {instance: value}."""
        url = f"{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as answer:
            result = json.load(answer)["data"]["result"]
        return {r["metric"].get("instance", ""): float(r["value"][1]) for r in result}

    def resolve(self, name: str) -> set[str]:
        """The addresses name has on the stack's network, as its containers see them."""
        answer = docker("run", "--rm", "--network", self.network, CHAT_IMAGE, "python", "-c",
                        f"import socket; print(*{{i[4][0] for i in socket.getaddrinfo({name!r}, 8081)}})")
        return set(answer.split())

    def update_state(self) -> str:
        return docker("service", "inspect", "--format",
                      "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}", self.chat_service)
