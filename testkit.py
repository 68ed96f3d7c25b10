"""What the tests and the bench scripts share: servers, a raw client, metrics and /proc readings.

One of each: a server factory (start_server), a private Redis (RedisServer),
one raw WebSocket client on the project's own codec (RawClient), one metrics
scrape (scrape), one set of /proc readers, and one description of the machine
for bench results. test_conformance.py keeps its own, independent codec on
purpose: it checks scalechat's framing against a second implementation.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))


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
                 env: dict | None = None) -> ServerProc:
    """Start scalechat.py with args on free ports and wait until /healthz answers."""
    port = port or free_port()
    metrics_port = metrics_port or free_port()
    cmd = [sys.executable, os.path.join(HERE, "scalechat.py"), "--host", "127.0.0.1",
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
