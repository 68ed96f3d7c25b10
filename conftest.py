"""Shared pytest fixtures: real server processes on free loopback ports."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


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


@pytest.fixture
def server():
    """A fresh single-process server for one test."""
    s = start_server()
    yield s
    s.stop()
