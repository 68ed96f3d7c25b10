"""The harness every test uses, one of each; bench/ uses it too.

A server factory (start_server), a private Redis (RedisServer), a Prometheus
scraping servers (start_prometheus) and one Redis
command on the project's own RESP codec; plain HTTP byte for byte; one metrics
scrape (scrape: {'name{label="value",...}': value}); one raw WebSocket client
on the project's own codec (RawClient, with frame builders); a loopback TCP
proxy; room members on the websockets library (Member, Crowd) and the checks of
one order; one set of /proc readers; one description of the machine for bench
results (machine); and the abuse data bench/bench_abuse.py shares with
test_hostile.py.

Beside it, one module per audience: testkit_oracles.py (the protocol core's
property oracles), testkit_fuzz_chat.py (the chat fuzzer), testkit_cluster.py
(a Redis Cluster), testkit_docker.py (a Docker engine and the stack),
testkit_browser.py (Chromium pages), testkit_csv.py (synthetic load-test runs).

test_conformance.py keeps its own, independent codec on purpose: it checks
scalechat's framing against a second implementation.
"""
from __future__ import annotations

import asyncio
import functools
import glob
import itertools
import json
import os
import platform
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
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


def room_key(room: str) -> str:
    """A key of room's state (the contract: keys scalechat:{<room>}:...)."""
    return f"scalechat:{{{room}}}:state"


@dataclass
class PrometheusServer:
    """A prometheus process on loopback scraping chat servers (job "chat") every second."""
    proc: subprocess.Popen
    url: str

    def query(self, expr: str) -> list:
        """Result vector of an instant query; fails on a PromQL error."""
        params = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=5) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of an instant query, None when it has no result."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def scraping(self) -> bool:
        """Whether Prometheus is ready and its last scrape of the chat server worked."""
        try:
            return self.value('up{job="chat"}') == 1
        except OSError:  # not listening yet, or 503 while it starts
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def start_prometheus(metrics_ports: list[int], folder: str) -> PrometheusServer:
    """Prometheus with its config and data in folder, scraping scalechat.py's metrics ports every
    second as job "chat" (the dashboards' job); returns once its first scrape worked."""
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": "chat", "static_configs": [
                  {"targets": [f"127.0.0.1:{port}" for port in metrics_ports]}]}]}
    config_file = os.path.join(folder, "prometheus.yml")
    with open(config_file, "w") as f:
        json.dump(config, f)                  # JSON is YAML too
    port = free_port()
    with open(os.path.join(folder, "prometheus.log"), "w") as log:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={config_file}", f"--storage.tsdb.path={os.path.join(folder, 'data')}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    prometheus = PrometheusServer(proc, f"http://127.0.0.1:{port}")
    try:
        # Discovery hands the first targets to the scraper about 5 s after start.
        wait_for(prometheus.scraping, 30, "Prometheus's first scrape of the chat server", interval=0.25)
    except BaseException:
        prometheus.stop()
        raise
    return prometheus


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
# A TCP proxy on loopback: test_loadclient.py and test_cluster.py
# ---------------------------------------------------------------------------

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

    async def say(self, size: int = 0) -> bool:
        """Send the next chat message (its text padded to size bytes) if the connection is open;
        whether it was sent."""
        if not self.connected:
            return False
        self.next_id += 1
        text = f"{self.name} says {self.next_id}"
        try:
            await self.ws.send(json.dumps({"message_id": self.next_id, "text": text.ljust(size, ".")}))
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


async def everyone_says(members: list[Member], times: int = 1, size: int = 0) -> set[tuple[str, int]]:
    """Each member sends times messages (of size bytes of text, at least), all at once; the keys
    of those that went out."""
    before = {m.name: len(m.sent) for m in members}
    for _ in range(times):
        await asyncio.gather(*(m.say(size) for m in members))
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
# Shared data and figures: test_hostile.py, test_connection.py and bench/bench_abuse.py
# ---------------------------------------------------------------------------

BAD_PAYLOADS = [              # (text frame payload, error code expected; the connection stays)
    (b"[" * 300_000, "bad_json"), (b'{"text":' * 40_000, "bad_json"),
    (b"[1,2,3]", "bad_message"), (b"42", "bad_message"), (b'"text"', "bad_message"),
    (b"null", "bad_message"), (b"{not json", "bad_json"),
]

BROKEN_FRAMES = [             # (bytes sent after the upgrade, close code expected)
    (b"\xff" * 16, sc.CLOSE_PROTOCOL_ERROR),                                   # reserved bits
    (sc.encode_frame(sc.OP_TEXT, b'{"text":"x"}'), sc.CLOSE_PROTOCOL_ERROR),   # unmasked
    (sc.encode_frame(0x3, b"", mask_key=b"abcd"), sc.CLOSE_PROTOCOL_ERROR),    # reserved opcode
    (sc.encode_frame(sc.OP_CONTINUATION, b"x", mask_key=b"abcd"), sc.CLOSE_PROTOCOL_ERROR),
    (sc.encode_frame(sc.OP_PING, b"p" * 126, mask_key=b"abcd"), sc.CLOSE_PROTOCOL_ERROR),
    (sc.encode_frame(sc.OP_CLOSE, b"\x03\xe7", mask_key=b"abcd"), sc.CLOSE_PROTOCOL_ERROR),
    (sc.encode_frame(sc.OP_BINARY, b"\x00\x01", mask_key=b"abcd"), sc.CLOSE_UNSUPPORTED_DATA),
    (sc.encode_frame(sc.OP_TEXT, b"\xc3\x28", mask_key=b"abcd"), sc.CLOSE_INVALID_DATA),
    (struct.pack("!BBQ", 0x81, 0xFF, 1 << 62) + b"abcd", sc.CLOSE_TOO_BIG),   # giant 64-bit length
    (struct.pack("!BBQ", 0x81, 0xFF, (1 << 64) - 1) + b"abcd", sc.CLOSE_PROTOCOL_ERROR),
    (struct.pack("!BBQ", 0x81, 0xFF, 500_000) + b"abcd", sc.CLOSE_TOO_BIG),  # past the frame cap
]


def percentile(values: list, q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
