#!/usr/bin/env python3
"""loadclient.py: the scale-chat terminal client and load generator.

    python loadclient.py [--server-url ws://host:8080/ws] [--name N] [--room R]
        A terminal chat client: prints what arrives, sends each line typed.
    python loadclient.py --load-test --rooms 25 --room-size 4 --rate 1 --duration 30
        Simulated clients in rooms, an open-model send schedule, one CSV of
        message events per scenario (see docs/loadclient.md).

Framing, masking and the handshake come from the protocol core in
scalechat.py; this file adds only the client side's sockets and bookkeeping.
Standard library only.
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import errno
import gc
import gzip
import heapq
import ipaddress
import json
import math
import multiprocessing
import os
import random
import re
import resource
import secrets
import select
import selectors
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, urlencode, urlsplit

from scalechat import (
    CLOSE_ABNORMAL,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NO_STATUS,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN_LATER,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    ROOM_NAME,
    FrameParser,
    HandshakeError,
    ProtocolError,
    client_handshake_request,
    encode_close,
    encode_frame,
    new_key,
    new_mask_key,
    parse_close,
    parse_handshake_response,
    raise_fd_limit,
)

__version__ = "1.0.0"

# The event CSV's columns: csvprocess.py and the tests read them from here. Rows are
# Sent, Received, and Order: a client's room began an order (its epoch; see docs/loadclient.md).
EVENT_COLUMNS = ("message_id", "sender_id", "client_id", "type", "timestamp_us", "room", "seq", "intended_us",
                 "epoch")
CSV_HEADER = (",".join(EVENT_COLUMNS) + "\n").encode()
DEFAULT_URL = "ws://127.0.0.1:8080/ws"
# Close codes after which a client comes back with since=<last seq>: the server
# went away, cut a slow reader, closed a client over its rate (which a paced client
# should never be, but its unacked messages must not be abandoned), or the
# connection broke.
RECONNECT_CODES = frozenset({CLOSE_GOING_AWAY, CLOSE_TRY_AGAIN_LATER, CLOSE_ABNORMAL,
                             CLOSE_INTERNAL_ERROR, CLOSE_POLICY})
# One source address holds about 28k connections to one destination (ports
# 32768-60999), but connect() slows down long before: the kernel walks the ports
# in use to find a free one, and at 25,000 per address that walk took 69% of the
# machine's CPU (SCALING.md, section 13). Above this many clients of a loopback
# target, bind to 127.0.0.2, 127.0.0.3, ... as well (--clients-per-address).
CLIENTS_PER_SOURCE_ADDRESS = 10_000
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
# Below glibc's 128 KiB mmap threshold: a 256 KiB recv buffer is mapped and
# unmapped on every call, which cost ~12 us per recv here (six times the rest).
RECV_SIZE = 1 << 16
MAX_MESSAGE_SIZE = 1 << 24


class SettingsError(Exception):
    """A bad command line or an unreachable server: one line to stderr, exit code 2."""


def now_us() -> int:
    """Wall clock in integer microseconds since the epoch (the CSV's clock)."""
    return time.time_ns() // 1000


def iso_time(us: int) -> str:
    """RFC 3339 UTC time with microseconds for an epoch-microsecond stamp."""
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------------------
# Target: the server URL, split into what a connection needs
# ---------------------------------------------------------------------------

# A server name is resolved again at most this often (seconds).
RESOLVE_INTERVAL = 1.0


def addresses_of(host: str, port: int, family: int = socket.AF_UNSPEC) -> tuple[int, list]:
    """The family of host's first address, and every (address, port) of it in that family, sorted."""
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    family = infos[0][0]
    return family, sorted({info[4][:2] for info in infos if info[0] == family})


class ServerAddresses:
    """Every address of the server's name, one connection after another (client-side DNS round robin).

    A Swarm service with endpoint_mode dnsrr answers with one address per
    replica: taken in turn, they spread the clients over the replicas. The name
    is resolved again (at most every RESOLVE_INTERVAL), so clients that come
    back after a rolling update find the replicas that replaced the old ones.
    """

    def __init__(self, host: str, port: int, family: int, addresses: list) -> None:
        self.host, self.port, self.family, self.addresses = host, port, family, addresses
        self.fixed = is_ip_address(host)
        self.resolved = time.monotonic()
        self.turn = 0

    def next(self) -> tuple:
        """The address for the next connection."""
        now = time.monotonic()
        if not self.fixed and now - self.resolved >= RESOLVE_INTERVAL:
            self.resolved = now
            # On an error, keep the last answer: DNS down is no reason to stop reconnecting.
            with contextlib.suppress(OSError):
                self.addresses = addresses_of(self.host, self.port, self.family)[1]
        address = self.addresses[self.turn % len(self.addresses)]
        self.turn += 1
        return address


def is_ip_address(host: str) -> bool:
    """Whether host is an IP address rather than a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Target:
    """A ws:// server URL resolved: its addresses, Host header, base path, room."""
    url: str
    host_header: str
    address: tuple                      # the first address: the probe's
    family: int
    base_path: str
    room: str | None
    servers: ServerAddresses            # every address, in turn, for each connection

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.address[0]).is_loopback

    def resource(self, room: str | None, name: str | None = None, since: int | None = None,
                 client: str | None = None, epoch: str | None = None) -> str:
        """The request target for a room, with name, since (and the epoch it counts in) and client id
        as query parameters."""
        path = f"{self.base_path}/{quote(room)}" if room else self.base_path
        if since is None:
            epoch = None
        query = {k: v for k, v in (("name", name), ("since", since), ("epoch", epoch), ("client", client))
                 if v is not None}
        return f"{path}?{urlencode(query)}" if query else path


def parse_server_url(url: str) -> Target:
    """Validate and resolve a ws:// URL; a room in the path (/ws/<room>) becomes the default room."""
    parts = urlsplit(url)
    if parts.scheme == "wss":
        raise SettingsError(f"--server-url {url}: wss:// is not supported; use ws:// (TLS ends in front)")
    if parts.scheme != "ws" or not parts.hostname:
        raise SettingsError(f"--server-url {url}: expected ws://host[:port]/ws[/room]")
    try:
        port = parts.port or 80
    except ValueError:
        raise SettingsError(f"--server-url {url}: bad port") from None
    try:
        family, addresses = addresses_of(parts.hostname, port)
    except socket.gaierror as exc:
        raise SettingsError(f"--server-url {url}: cannot resolve {parts.hostname}: {exc.strerror}") from None
    path = parts.path.rstrip("/") or "/ws"
    base_path, room = path, None
    head, _, tail = path.rpartition("/")
    if head.endswith("/ws") and ROOM_NAME.fullmatch(tail):
        base_path, room = head, tail
    host_header = parts.netloc.rpartition("@")[2]
    servers = ServerAddresses(parts.hostname, port, family, addresses)
    return Target(url, host_header, addresses[0], family, base_path, room, servers)


# ---------------------------------------------------------------------------
# Event loop: one selectors loop with a timer heap per process
# ---------------------------------------------------------------------------

class Loop:
    """A selectors loop and a heap of timers: everything one process does runs on it."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.timers: list = []
        self._tiebreak = 0
        self.ready_us = 0           # wall clock (µs) when the last select() returned
        # epoll waits in whole milliseconds, rounded up, so a timer due in 0.2 ms would
        # fire up to 0.8 ms late; select() on the epoll descriptor itself waits to the
        # microsecond (it only takes descriptors below FD_SETSIZE, 1024).
        fd = self.selector.fileno() if isinstance(self.selector, selectors.EpollSelector) else -1
        self.fine_wait_fd = fd if 0 <= fd < 1024 else None

    def call_later(self, delay: float, fn, *args) -> None:
        """Run fn(*args) after delay seconds; callbacks check their own state instead of being cancelled."""
        self._tiebreak += 1
        heapq.heappush(self.timers, (time.monotonic() + delay, self._tiebreak, fn, args))

    def run_once(self, max_wait: float) -> None:
        """Wait for sockets up to max_wait (or the next timer), dispatch them, then run due timers."""
        timers = self.timers
        wait = max_wait
        if timers:
            wait = max(0.0, min(wait, timers[0][0] - time.monotonic()))
        if 0.0 < wait < 0.005 and self.fine_wait_fd is not None:
            select.select((self.fine_wait_fd,), (), (), wait)
            wait = 0.0
        events = self.selector.select(wait)
        self.ready_us = time.time_ns() // 1000
        for key, mask in events:
            key.data(mask)
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            _, _, fn, args = heapq.heappop(timers)
            fn(*args)


# ---------------------------------------------------------------------------
# Client connection: connect, handshake, frames, close (non-blocking)
# ---------------------------------------------------------------------------

IDLE, CONNECTING, HANDSHAKE, OPEN, CLOSING = range(5)


def new_client_id() -> str:
    """A random client id: 128 bits, base64url without padding (22 characters)."""
    return secrets.token_urlsafe(16)


class ClientConnection:
    """One non-blocking WebSocket client connection on a Loop; subclasses handle text frames and endings."""

    __slots__ = ("attempt", "client_id", "close_code", "close_reason", "close_sent", "closed_by_us",
                 "inbuf", "key", "loop", "name", "outbuf", "parser", "room", "sock", "source", "started",
                 "state", "target", "timeout", "writing")

    def __init__(self, loop: Loop, target: Target, room: str | None, name: str | None,
                 source: str | None = None, timeout: float = 10.0) -> None:
        self.loop, self.target, self.room, self.name = loop, target, room, name
        # Sent as client= on every connect: the server de-duplicates our resends by it
        # and never shows it to anyone, so no other client can claim our message_ids.
        self.client_id = new_client_id()
        self.source, self.timeout = source, timeout
        self.sock = self.parser = None
        self.state = IDLE
        self.attempt = 0
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.writing = self.close_sent = self.closed_by_us = False
        self.close_code, self.close_reason, self.key, self.started = CLOSE_ABNORMAL, "", "", 0.0

    # -- hooks for subclasses ------------------------------------------------
    def on_frames(self, frames: list) -> None:
        """Handle a batch of (opcode, payload) frames from one read (text frames at least)."""
        raise NotImplementedError

    def on_ended(self, code: int, reason: str, by_us: bool) -> None:
        """The connection is gone (or never came up): code 1006 for a lost or failed connection."""

    # -- connecting ------------------------------------------------------------
    def connect(self, since: int | None = None, epoch: str = "") -> None:
        """Start a non-blocking connect and handshake; since (a seq of the order epoch) asks the
        server to replay what was missed."""
        self.attempt += 1
        self.state, self.close_sent, self.closed_by_us, self.writing = CONNECTING, False, False, False
        self.close_code, self.close_reason = CLOSE_ABNORMAL, ""
        self.inbuf.clear()
        self.outbuf.clear()
        self.started = time.monotonic()
        try:
            sock = socket.socket(self.target.family, socket.SOCK_STREAM)
        except OSError as exc:
            self.state = IDLE
            self.on_ended(CLOSE_ABNORMAL, f"socket: {exc.strerror}", False)
            return
        self.sock = sock
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self.source:
                # Defer the port choice to connect(), so the 4-tuple, not the
                # source address alone, has to be unique.
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((self.source, 0))
            err = sock.connect_ex(self.target.servers.next())
        except OSError as exc:
            self._fail(f"connect: {exc.strerror}")
            return
        if err not in (0, errno.EINPROGRESS):
            self._fail(f"connect: {os.strerror(err)}")
            return
        self.key = new_key()
        resource_ = self.target.resource(self.room, self.name, since, self.client_id, epoch or None)
        self.outbuf += client_handshake_request(self.target.host_header, resource_, self.key)
        self.loop.selector.register(sock, selectors.EVENT_WRITE, self._on_event)
        self.writing = True
        self.loop.call_later(self.timeout, self._check_open_in_time, self.attempt)

    def _check_open_in_time(self, attempt: int) -> None:
        if attempt == self.attempt and self.state in (CONNECTING, HANDSHAKE):
            self._fail("timeout: no TCP connect" if self.state == CONNECTING
                       else "timeout: no handshake answer")

    def _fail(self, reason: str) -> None:
        self._drop(CLOSE_ABNORMAL, reason, False)

    # -- events ----------------------------------------------------------------
    def _on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = self.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as exc:
                self._drop(CLOSE_ABNORMAL, f"lost: {exc.strerror}", False)
                return
            if data == b"":
                if self.close_sent:
                    self._drop(self.close_code, self.close_reason, self.closed_by_us)
                else:
                    self._drop(CLOSE_ABNORMAL, "lost: connection closed", False)
                return
            if data:
                self._on_data(data)
        if mask & selectors.EVENT_WRITE and self.sock is not None:
            if self.state == CONNECTING:
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._fail(f"connect: {os.strerror(err)}")
                    return
                self.state = HANDSHAKE
            self._flush()

    def _on_data(self, data: bytes) -> None:
        if self.state == HANDSHAKE:
            self.inbuf += data
            try:
                used = parse_handshake_response(self.inbuf, self.key)
            except HandshakeError as exc:
                self._fail(f"handshake: {exc.status} {exc.reason}".rstrip())
                return
            if used is None:
                return
            data = bytes(self.inbuf[used:])
            self.inbuf.clear()
            self.parser = FrameParser(expect_masked=False, max_message_size=MAX_MESSAGE_SIZE)
            self.state = OPEN
            if not data:
                return
        try:
            frames = self.parser.feed(data)
        except ProtocolError as exc:
            self.close(exc.code, exc.reason)
            self._drop(exc.code, f"protocol: {exc.reason}", False)
            return
        if frames:
            self.on_frames(frames)

    def on_control(self, opcode: int, payload: bytes) -> None:
        """Answer pings, complete closing handshakes."""
        if opcode == OP_PING:
            self.send(encode_frame(OP_PONG, payload, mask_key=new_mask_key()))
        elif opcode == OP_CLOSE:
            try:
                code, reason = parse_close(payload)
            except ProtocolError as exc:
                code, reason = exc.code, exc.reason
            if not self.close_sent:
                self.close_code, self.close_reason = code, reason
                self._send_close(CLOSE_NORMAL if code in (CLOSE_NO_STATUS, CLOSE_ABNORMAL) else code, "")
            # The server closes TCP first (RFC 6455 7.1.1); wait for its FIN so
            # TIME_WAIT stays on its side, or give up after the timeout.
            self.state = CLOSING

    # -- sending ---------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Queue bytes; write at once when nothing is waiting, else when the socket is writable."""
        if self.sock is None:
            return
        if self.outbuf or self.state not in (OPEN, CLOSING):
            self.outbuf += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._drop(CLOSE_ABNORMAL, f"lost: {exc.strerror}", False)
            return
        if sent < len(data):
            self.outbuf += data[sent:]
            self._want_write(True)

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(CLOSE_ABNORMAL, f"lost: {exc.strerror}", False)
            return
        del self.outbuf[:sent]
        self._want_write(bool(self.outbuf))

    def _want_write(self, on: bool) -> None:
        if on != self.writing:
            self.writing = on
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
            self.loop.selector.modify(self.sock, events, self._on_event)

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Start the closing handshake (or drop a connection that is not open yet)."""
        if self.state in (CONNECTING, HANDSHAKE):
            self._drop(code, reason, True)
            return
        if self.sock is None or self.close_sent:
            return
        self.close_code, self.close_reason, self.closed_by_us = code, reason, True
        self._send_close(code, reason)

    def _send_close(self, code: int, reason: str) -> None:
        self.close_sent = True
        self.send(encode_close(code, reason, mask_key=new_mask_key()))
        self.state = CLOSING
        self.loop.call_later(min(self.timeout, 2.0), self._force_close, self.attempt)

    def _force_close(self, attempt: int) -> None:
        if attempt == self.attempt and self.sock is not None:
            self._drop(self.close_code, self.close_reason or "timeout: closing handshake",
                       self.closed_by_us)

    def _drop(self, code: int, reason: str, by_us: bool) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                self.loop.selector.unregister(sock)
            except (KeyError, ValueError):
                pass  # the connect failed before the socket was registered
            sock.close()
        self.state = IDLE
        self.attempt += 1  # stale timers of this attempt now do nothing
        self.on_ended(code, reason, by_us)


# ---------------------------------------------------------------------------
# Pacing: the server's rate limit, kept on the client's side
# ---------------------------------------------------------------------------

# A client's bucket is this share of the server's (its rate and its burst), so that
# messages bunched on their way (a stalled reader, the network) still find tokens there.
PACE_MARGIN = 0.9
RETRY_AFTER_DEFAULT = 1.0     # seconds to wait after a rate_limit error that does not say
UNAVAILABLE_RETRY = 3.0       # seconds before sending again what the server could not pass on (unavailable)


def limit_of(limits: dict, key: str) -> float:
    """One number of welcome.limits; 0.0 (no limit) when it is absent or not a number."""
    value = limits.get(key) if isinstance(limits, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else 0.0


class Pacer:
    """The server's token buckets (messages and bytes) as welcome.limits announces them, kept a
    little smaller on the client's side: what it lets out, the server never refuses
    (docs/protocol.md, "Pacing"). A refusal's retry_after holds it back until then."""

    __slots__ = ("burst", "byte_burst", "byte_rate", "byte_tokens", "rate", "time", "tokens")

    def __init__(self, limits: dict | None, now: float) -> None:
        self.rate = PACE_MARGIN * limit_of(limits, "rate")
        self.burst = max(1.0, math.floor(PACE_MARGIN * limit_of(limits, "burst")))
        self.byte_rate = PACE_MARGIN * limit_of(limits, "rate_bytes")
        self.byte_burst = max(1.0, math.floor(PACE_MARGIN * limit_of(limits, "burst_bytes")))
        self.tokens, self.byte_tokens, self.time = self.burst, self.byte_burst, now   # full, as the server's

    def wait(self, size: int, now: float) -> float:
        """Seconds until a message of size bytes may go: 0.0 for now."""
        if now < self.time:                         # held back by a retry_after
            return self.time - now
        elapsed, self.time = now - self.time, now
        wait = 0.0
        if self.rate:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            if self.tokens < 1.0:
                wait = (1.0 - self.tokens) / self.rate
        if self.byte_rate:
            self.byte_tokens = min(self.byte_burst, self.byte_tokens + elapsed * self.byte_rate)
            need = min(float(size), self.byte_burst)    # the server's bucket holds the largest message
            if self.byte_tokens < need:
                wait = max(wait, (need - self.byte_tokens) / self.byte_rate)
        return wait

    def take(self, size: int, now: float) -> bool:
        """Whether a message of size bytes may go now; if so, it is paid for."""
        if self.wait(size, now) > 0.0:
            return False
        self.tokens -= 1.0
        self.byte_tokens -= size
        return True

    def hold(self, retry_after, now: float) -> None:
        """The server refused a message: its bucket holds one token again retry_after seconds from now."""
        seconds = retry_after if isinstance(retry_after, (int, float)) and retry_after >= 0 else RETRY_AFTER_DEFAULT
        self.wait(0, now)
        self.tokens = min(self.tokens, 1.0)
        self.time = max(self.time, now + seconds)


# ---------------------------------------------------------------------------
# Receive path: the fields of a chat message without json.loads
# ---------------------------------------------------------------------------

# The server encodes every message with the same field order and no spaces,
# so splitting at the first 23 quotes puts epoch, seq, sender and message_id at
# fixed places, and the two send stamps the load client wrote at the start of
# its text right after them: far cheaper than json.loads or a regex. The key
# names are checked; anything else (another type or field order, a quote
# escaped inside a name, someone else's text) takes the json.loads path.
STAMP_DIGITS = 16  # epoch microseconds until the year 2286; senders zero-pad to it
STAMPS_END = 2 * STAMP_DIGITS + 1


def split_message(payload: bytes) -> tuple | None:
    """(epoch, seq, sender, message_id, sent_us, intended_us) as bytes from a server message frame, or None."""
    parts = payload.split(b'"', 23)
    if len(parts) < 24 or parts[3] != b"message" or parts[9] != b"epoch" or parts[19] != b"message_id" \
            or parts[21] != b"text":
        return None
    if b"\\" in parts[17]:  # an escape in the name: only json.loads reads it right
        return None
    text = parts[23]
    sent, intended = text[:STAMP_DIGITS], text[STAMP_DIGITS + 1:STAMPS_END]
    if not (sent.isdigit() and intended.isdigit() and text[STAMPS_END:STAMPS_END + 1] in (b" ", b'"')):
        return None
    return parts[11], parts[14].strip(b": ,"), parts[17], parts[20].strip(b": ,"), sent, intended


# An ack (our own message sequenced) comes to its sender alone. The server writes
# it as compact JSON with "type" first, so a prefix test recognises it and the
# message_id follows at a fixed place, up to the next comma.
ACK_PREFIX = b'{"type":"ack","message_id":'
ACK_ID_AT = len(ACK_PREFIX)

STAMPS_RE = re.compile(rf"(\d{{{STAMP_DIGITS}}}) (\d{{{STAMP_DIGITS}}})(?: |\Z)")


def message_fields(event: dict) -> tuple | None:
    """split_message's fields from a decoded message (the slow path), or None if it is not ours."""
    stamps = STAMPS_RE.match(event.get("text", ""))
    if stamps is None or not isinstance(event.get("seq"), int):
        return None
    return (str(event.get("epoch", "")).encode(), b"%d" % event["seq"], str(event.get("sender", "")).encode(),
            b"%d" % event.get("message_id", 0), stamps[1].encode(), stamps[2].encode())


# ---------------------------------------------------------------------------
# Latency histogram
# ---------------------------------------------------------------------------

def _bucket_bounds() -> list:
    bounds = list(range(1, 101))
    while bounds[-1] < 3_600_000_000:
        bounds.append(max(bounds[-1] + 1, int(bounds[-1] * 1.01)))
    return bounds


class LatencyHistogram:
    """Microsecond values in buckets 1% wide (exact below 100 us); merges exactly across processes."""

    BOUNDS = _bucket_bounds()  # bucket b holds BOUNDS[b-1] <= v < BOUNDS[b]
    __slots__ = ("count", "counts", "max", "total")

    def __init__(self, state: dict | None = None) -> None:
        state = state or {}
        self.counts = dict(state.get("counts", {}))
        self.count, self.total, self.max = state.get("count", 0), state.get("total", 0), state.get("max", 0)

    def add_sorted(self, values: list) -> None:
        """Add a sorted list of values: one bisect per occupied bucket, not one per value."""
        if not values:
            return
        bounds, counts, n, i = self.BOUNDS, self.counts, len(values), 0
        last = len(bounds)
        while i < n:
            b = bisect.bisect_right(bounds, values[i])
            j = n if b >= last else bisect.bisect_left(values, bounds[b], i)
            counts[b] = counts.get(b, 0) + j - i
            i = j
        self.count += n
        self.total += sum(values)
        self.max = max(self.max, values[-1])

    def merge(self, other: LatencyHistogram) -> None:
        """Add another histogram's counts to this one."""
        for b, c in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + c
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def percentile(self, q: float) -> float:
        """The q-th percentile (0-100) in microseconds; 0 when empty."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(self.count * q / 100))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                low = self.BOUNDS[b - 1] if b > 0 else 0
                high = self.BOUNDS[b] - 1 if b < len(self.BOUNDS) else low
                return float(min(self.max, (low + high) / 2 if b > 100 else low))
        return float(self.max)

    def summary_ms(self) -> dict:
        """p50/p90/p99/p99.9/max/mean in milliseconds, and the count."""
        out = {f"p{q:g}": round(self.percentile(q) / 1000, 3) for q in (50, 90, 99, 99.9)}
        out["max"] = round(self.max / 1000, 3)
        out["mean"] = round(self.total / self.count / 1000, 3) if self.count else 0.0
        out["count"] = self.count
        return out

    def state(self) -> dict:
        """A picklable copy (for the pipe to the parent process)."""
        return {"counts": self.counts, "count": self.count, "total": self.total, "max": self.max}


# ---------------------------------------------------------------------------
# CSV part file of one worker process
# ---------------------------------------------------------------------------

class CsvSink:
    """Rows appended to a bytearray and streamed to a part file, never all in memory.

    bytearray += is the cheapest way to collect small rows here: several times
    cheaper than a list of rows (or of pieces) joined at flush time.
    """

    FLUSH_BYTES = 1 << 22

    def __init__(self, path: str, compress: bool) -> None:
        self.path = path
        # Open for the whole run, closed by close(): no with-block can span it.
        self.file = gzip.open(path, "wb", compresslevel=1) if compress else open(path, "wb")  # noqa: SIM115
        self.buf = bytearray()

    def flush(self) -> None:
        """Write the buffered rows."""
        if self.buf:
            self.file.write(self.buf)
            self.buf.clear()

    def close(self) -> None:
        """Flush and close the part file."""
        self.flush()
        self.file.close()


def merge_parts(parts: list, path: str) -> None:
    """Concatenate worker part files under one header into path (gzip members concatenate too)."""
    with open(path, "wb") as out:
        out.write(gzip.compress(CSV_HEADER, 1) if path.endswith(".gz") else CSV_HEADER)
        for part in parts:
            if os.path.exists(part):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
                os.remove(part)


# ---------------------------------------------------------------------------
# Load test: simulated clients and the worker process that runs them
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ScenarioPlan:
    """Everything a worker process needs to run its share of one scenario."""
    scenario: str
    rooms: int
    room_size: int
    procs: int
    target: Target
    room_prefix: str
    interval_us: int
    msg_size: int
    jitter: float
    seed: int
    ramp: float
    record_fraction: float
    connect_timeout: float
    part_template: str
    per_address: int                # clients per source address; 0: the kernel picks the source
    segment: int = 1                # this machine's share of the rooms' members: segment of segments
    segments: int = 1

    @property
    def room_members(self) -> int:
        """Members of each room in this segment."""
        return segment_room_members(self.room_size, self.segment, self.segments)

    @property
    def clients(self) -> int:
        """Clients of this segment (all of the scenario's without --segment)."""
        return self.rooms * self.room_members

    def positions(self, worker: int) -> list:
        """The positions (in this segment) that worker process runs, in order (whole_rooms)."""
        rooms, procs = self.rooms, self.procs
        if whole_rooms(rooms, procs):
            return [block * rooms + room for block in range(self.room_members) for room in range(worker, rooms, procs)]
        return list(range(worker, self.clients, procs))

    def member(self, position: int) -> int:
        """The scenario-wide index of this segment's position-th client. Client i is member
        i // rooms of room i % rooms, so member j of every room is the block j * rooms ..
        (j + 1) * rooms - 1; the segment holds the blocks j = segment - 1, + segments, ..."""
        block, room = divmod(position, self.rooms)
        return (self.segment - 1 + block * self.segments) * self.rooms + room

    def own_sender(self, name: bytes) -> bool:
        """Whether a message's sender is a client of this segment (c<index>), not another's."""
        index = name[1:]
        return name[:1] == b"c" and index.isdigit() and \
            int(index) // self.rooms % self.segments == self.segment - 1

    def records(self, index: int) -> bool:
        """Whether client index records latencies and Received rows (a seeded, stable sample)."""
        if self.record_fraction >= 1:
            return True
        return random.Random(self.seed * 1_000_003 + index).random() < self.record_fraction

    def source_address(self, index: int) -> str | None:
        """127.0.0.{2,3,...} for every further block of clients of a loopback target, else None."""
        block = index // self.per_address if self.per_address else 0
        return f"127.0.0.{1 + block}" if block else None


def whole_rooms(rooms: int, procs: int) -> bool:
    """Whether each load-client process runs whole rooms: when they split evenly enough over the
    processes (the busiest holds at most a tenth more than the mean). A message then wakes one
    process, which reads every member's copy in one turn of its loop, instead of a process per
    member (SCALING.md section 13). Else each process runs every procs-th client, so that a few
    big rooms still spread over every process."""
    return procs <= rooms and math.ceil(rooms / procs) * procs <= rooms * 1.1


def busiest_process(rooms: int, members: int, procs: int) -> int:
    """The most clients one of procs processes runs."""
    procs = min(procs, rooms * members)
    return math.ceil(rooms / procs) * members if whole_rooms(rooms, procs) else math.ceil(rooms * members / procs)


def segment_room_members(room_size: int, segment: int, segments: int) -> int:
    """How many of a room's members segment (1-based) of segments holds: member j is segment's
    when j % segments == segment - 1."""
    return len(range(segment - 1, room_size, segments))


class LoadClient(ClientConnection):
    """One simulated chat client: sends on its schedule, counts and records what arrives."""

    __slots__ = ("again", "backlog", "epoch", "ever_welcomed", "failures", "finished", "index", "lag_end", "lag_seq",
                 "last_seq", "message_id", "name_b", "pacer", "phase_us", "pump_due", "recording", "replay_until",
                 "resend_due", "room_b", "scheduled", "settled", "unconfirmed", "welcomed", "worker")

    def __init__(self, worker: LoadWorker, index: int, position: int) -> None:
        """Client index of the scenario (its name and room), position-th of this segment."""
        plan = worker.plan
        room = f"{plan.room_prefix}{index % plan.rooms}"
        name = f"c{index}"
        super().__init__(worker.loop, plan.target, room, name, plan.source_address(position),
                         plan.connect_timeout)
        self.worker, self.index = worker, index
        self.name_b, self.room_b = name.encode(), room.encode()
        self.recording = plan.records(index)
        self.last_seq = self.replay_until = self.message_id = self.scheduled = self.failures = 0
        self.phase_us = 0
        # The room's order that last_seq counts in (b"": none known yet). After a welcome that
        # lagged behind what we had (a seq below last_seq in this order), the server still owes
        # us seq lag_seq + 1 .. lag_end, which we have: those come once more and are dropped.
        self.epoch = b""
        self.lag_seq = self.lag_end = 0
        self.backlog: list = []             # intended send times of messages not sent yet
        # message_id (bytes) -> payload, until the server acks it. Only an ack settles a
        # message: anyone may connect with our name and post a message_id of ours.
        self.unconfirmed: dict = {}
        self.again: list = []               # message_ids of unconfirmed messages to send again, in turn
        self.pacer: Pacer | None = None     # this connection's pace within the server's limits
        self.welcomed = self.ever_welcomed = self.finished = self.settled = False
        self.resend_due = self.pump_due = False

    def start(self) -> None:
        """Connect, with since=<last seq>&epoch=<its order> after the first time so nothing is missed."""
        self.connect(self.last_seq if self.ever_welcomed else None, self.epoch.decode())

    # -- receiving (the hot path) -------------------------------------------
    def on_frames(self, frames: list) -> None:
        ts = self.loop.ready_us
        worker = self.worker
        last_seq, replay_until, held = self.last_seq, self.replay_until, self.epoch
        received = late = others = 0
        own = worker.own_sender      # None: one machine, every sender is ours
        recording = self.recording
        if recording:
            buf = worker.sink.buf
            lat_append, ilat_append = worker.latencies.append, worker.intended_latencies.append
            tail = b",%s,Received,%d,%s," % (self.name_b, ts, self.room_b)
        for opcode, payload in frames:
            if opcode != OP_TEXT:
                self.on_control(opcode, payload)
                continue
            fields = split_message(payload)
            if fields is None:
                if payload.startswith(ACK_PREFIX):
                    self.unconfirmed.pop(payload[ACK_ID_AT:payload.find(b",", ACK_ID_AT)], None)
                    continue
                self.last_seq = last_seq
                fields = self.on_other_text(payload)
                last_seq, replay_until, held = self.last_seq, self.replay_until, self.epoch
                if fields is None:
                    continue
            epoch, seq_b, sender, mid, sent, intended = fields
            if epoch != held:   # compared as bytes, never decoded: the room's order began (again)
                self.begin_order(epoch, 0)
                last_seq = replay_until = 0
                held = epoch
            seq = int(seq_b)
            if seq != last_seq + 1:
                if seq <= last_seq:
                    if seq == self.lag_seq + 1 <= self.lag_end:   # owed by a lagging server, seen before
                        self.lag_seq = seq
                    else:
                        worker.duplicates += 1
                    continue
                worker.count_error("seq gap (messages missing)", seq - last_seq - 1)
            last_seq = seq
            if own is not None and not own(sender):
                others += 1     # another segment's message: its ratio and its clock, not ours
                if recording:
                    buf += b"%s,%s%s%s,,\n" % (mid, sender, tail, seq_b)
                continue
            received += 1
            if seq <= replay_until:
                late += 1
            if recording:
                buf += b"%s,%s%s%s,,\n" % (mid, sender, tail, seq_b)
                lat_append(ts - int(sent))
                ilat_append(ts - int(intended))
        self.last_seq = last_seq
        worker.received += received
        worker.late += late
        worker.other_segments += others
        if self.resend_due and last_seq >= replay_until:
            self.resend_unconfirmed()

    def resend_unconfirmed(self) -> None:
        """After a reconnect's replay: send again what was never acked, marked as a resend.

        The server drops a resend it already holds from this client id (and acks
        it again), so a message in flight when the connection broke is delivered
        exactly once (see docs/protocol.md).
        """
        self.resend_due = False
        self.again = list(self.unconfirmed)
        self.pump()

    def on_other_text(self, payload: bytes) -> tuple | None:
        """The json.loads path: welcome, members, error, and messages the regex did not match."""
        try:
            event = json.loads(payload)
            kind = event.get("type")
        except (ValueError, AttributeError):
            self.worker.count_error("bad frame from server")
            return None
        if kind == "message":
            fields = message_fields(event)
            if fields is None:  # someone else's message in our room: keep its place, count nothing
                epoch = str(event.get("epoch", "")).encode()
                if epoch and epoch != self.epoch:
                    self.begin_order(epoch, 0)
                self.last_seq = max(self.last_seq, event.get("seq", 0))
                self.worker.foreign += 1
            return fields
        if kind == "welcome":
            self.on_welcome(event)
        elif kind == "error":
            code = event.get("code", "?")
            self.worker.count_error(f"error {code}")
            if code in ("rate_limit", "unavailable"):
                self.send_again_later(event)
        return None

    def send_again_later(self, event: dict) -> None:
        """A message of ours was refused over the rate (or while the bus was away): it goes again
        once the server's bucket holds a token (retry_after), after what waits before it."""
        message_id = event.get("message_id")
        key = b"%d" % message_id if isinstance(message_id, int) else None
        if key not in self.unconfirmed or self.pacer is None:
            return
        now = time.monotonic()
        self.pacer.hold(event.get("retry_after") if event.get("code") == "rate_limit" else UNAVAILABLE_RETRY, now)
        self.again.append(key)
        self.pump_later(self.pacer.time - now)

    def on_welcome(self, event: dict) -> None:
        """Joined: start counting, or after a reconnect mark the replayed range as late."""
        worker = self.worker
        room_seq = int(event.get("seq", 0))
        epoch = str(event.get("epoch", "")).encode()   # "": the room has no order yet
        if self.ever_welcomed:
            worker.reconnects += 1
            if epoch and epoch != self.epoch:   # a new order, replayed from its start
                self.begin_order(epoch, 0)
            elif epoch == self.epoch and room_seq < self.last_seq:   # this server lags: it owes us what we have
                self.lag_seq, self.lag_end = room_seq, self.last_seq
            self.replay_until = room_seq
        else:
            self.last_seq = room_seq
            if epoch:
                self.begin_order(epoch, room_seq)
            worker.connect_times.append(int((time.monotonic() - self.started) * 1e6))
        if event.get("name") not in (None, self.name):
            worker.count_error("server renamed client")
        self.welcomed = self.ever_welcomed = True
        self.failures = 0
        self.settle()
        worker.connected += 1
        self.pacer = Pacer(event.get("limits"), time.monotonic())
        self.again = []
        if self.unconfirmed:
            self.resend_due = True
            if self.last_seq >= self.replay_until:
                self.resend_unconfirmed()
        self.pump()

    def begin_order(self, epoch: bytes, seq: int) -> None:
        """The room's order is epoch from now on, counting from seq: its first order, or a new one
        after the server lost the room's state (the old order's seqs mean nothing now, and what
        of it this client had not received is gone). Recording clients write an Order row."""
        if self.epoch:
            self.worker.orders_restarted += 1
        self.epoch, self.last_seq = epoch, seq
        self.replay_until = self.lag_seq = self.lag_end = 0
        if self.recording:
            self.worker.sink.buf += b",%s,%s,Order,%d,%s,%d,,%s\n" % (
                self.name_b, self.name_b, self.loop.ready_us, self.room_b, seq, epoch)

    # -- sending ---------------------------------------------------------------
    def send_message(self, intended: int) -> None:
        """Send one scheduled message now, or queue it: until the connection is back, or until the
        pacer has a token for it (behind what is queued already)."""
        if self.backlog or not self.welcomed or self.state != OPEN or \
                not self.pacer.take(self.worker.message_bytes, time.monotonic()):
            self.backlog.append(intended)
            self.worker.queued += 1
            if self.welcomed and self.state == OPEN:
                self.pump_later(self.pacer.wait(self.worker.message_bytes, time.monotonic()))
            return
        self.send_now(intended)

    def pump(self) -> None:
        """Send what waits, as fast as the pacer lets it: messages to send again first (once a
        reconnect's replay is over), then the backlog; then wait for the next token."""
        self.pump_due = False
        if not self.welcomed or self.state != OPEN:
            return
        now = time.monotonic()
        waiting = self._send_again(now) if self.again and not self.resend_due else 0
        if not waiting and self.backlog:
            waiting = self._send_backlog(now)
        if waiting and self.state == OPEN:
            self.pump_later(self.pacer.wait(waiting, now))

    def _send_again(self, now: float) -> int:
        """Send what again lists, marked as resends; the size of the next one if it must wait, else 0."""
        done = 0
        for key in self.again:
            payload = self.unconfirmed.get(key)
            if payload is not None:                         # else acked meanwhile
                payload = payload[:-1] + b', "resend": true}'
                if self.state != OPEN or not self.pacer.take(len(payload), now):
                    break
                self.send(encode_frame(OP_TEXT, payload, mask_key=new_mask_key()))
                self.worker.resent += 1
            done += 1
        del self.again[:done]
        return len(payload) if self.again else 0

    def _send_backlog(self, now: float) -> int:
        """Send the backlog's messages; the size of the next one if it must wait, else 0."""
        worker, done = self.worker, 0
        for intended in self.backlog:
            if self.state != OPEN or not self.pacer.take(worker.message_bytes, now):
                break
            self.send_now(intended)
            done += 1
        del self.backlog[:done]
        worker.queued -= done
        return worker.message_bytes if self.backlog else 0

    def pump_later(self, delay: float) -> None:
        """Pump again after delay seconds (once, however often asked)."""
        if not self.pump_due:
            self.pump_due = True
            self.loop.call_later(max(0.0, delay), self.pump)

    def send_now(self, intended: int) -> None:
        """Send one scheduled message, its Sent row stamped now."""
        worker = self.worker
        ts = time.time_ns() // 1000
        self.message_id += 1
        payload = b'{"message_id": %d, "text": "%016d %016d%s", "sent_at": "%s"}' % (
            self.message_id, ts, intended, worker.text_tail, worker.rfc3339(ts))
        self.send(encode_frame(OP_TEXT, payload, mask_key=new_mask_key()))
        self.unconfirmed[b"%d" % self.message_id] = payload
        worker.sink.buf += b"%d,%s,%s,Sent,%d,%s,,%d,\n" % (
            self.message_id, self.name_b, self.name_b, ts, self.room_b, intended)
        worker.sent += 1

    # -- endings ----------------------------------------------------------------
    def on_ended(self, code: int, reason: str, by_us: bool) -> None:
        worker = self.worker
        if self.welcomed:
            self.welcomed = False
            worker.connected -= 1
        if by_us and code == CLOSE_NORMAL:
            self.finish()
            return
        worker.count_error(reason if code == CLOSE_ABNORMAL else f"close {code}")
        # A first connect that failed retries and stays unsettled: the send phase waits for
        # it (up to the ramp's deadline), as its room's messages would otherwise count lost.
        comes_back = code in RECONNECT_CODES or not self.ever_welcomed  # first connects retry too
        if worker.closing or not comes_back:
            self.finish()
            return
        self.failures += 1
        delay = min(5.0, 0.1 * 2 ** min(self.failures - 1, 6)) * worker.rng.uniform(0.5, 1.5)
        worker.loop.call_later(delay, self.retry)

    def retry(self) -> None:
        """Reconnect after a backoff, unless the run is closing meanwhile."""
        if self.worker.closing:
            self.finish()
        elif self.state == IDLE:
            self.start()

    # The worker counts instead of scanning thousands of clients every loop turn.
    def settle(self) -> None:
        """Joined for the first time, or given up: the ramp need not wait for this client."""
        if not self.settled:
            self.settled = True
            self.worker.unsettled -= 1

    def finish(self) -> None:
        """Closed for good: neither the ramp nor the close phase need wait for this client."""
        self.settle()
        if not self.finished:
            self.finished = True
            self.worker.unfinished -= 1


RAMP, READY, SEND, DRAIN, CLOSE, DONE = "ramp", "ready", "send", "drain", "close", "done"
HOLD = "hold"                 # the parent's: every client connected, none sending yet (--hold)
START_AT_LEAD = 0.3           # seconds before --start-at that the parent tells the workers when to start
SEGMENT_SETTLE_S = 1.0        # with --segment, seconds (at most --grace) the drain waits for other segments
# Connections kept in their TCP and HTTP handshake at once: at most 1,024 per process,
# and 6,144 over all processes of a run. Past the machine's pace, a ramp that opened
# every due connection at once left the requests of thousands unsent while the server's
# --handshake-timeout ran (SCALING.md, section 4); with 14 processes at 1,024 each the
# queue was again longer than the timeout (section 13).
HANDSHAKES_IN_FLIGHT = 1024
HANDSHAKES_IN_FLIGHT_PER_RUN = 6144


def handshakes_in_flight(procs: int) -> int:
    """How many handshakes one of procs load-client processes keeps in flight at once."""
    return max(32, min(HANDSHAKES_IN_FLIGHT, HANDSHAKES_IN_FLIGHT_PER_RUN // procs))


class LoadWorker:
    """The clients of one process in one selectors loop; talks to the parent over a pipe."""

    def __init__(self, plan: ScenarioPlan, index: int, channel) -> None:
        self.plan, self.index, self.channel = plan, index, channel
        self.loop = Loop()
        # Each segment draws its own phases from the common seed: the same draws would put the
        # k-th client of every segment in step.
        self.rng = random.Random(f"{plan.seed}:{index}" if plan.segments == 1
                                 else f"{plan.seed}:{plan.segment}/{plan.segments}:{index}")
        self.sink = CsvSink(plan.part_template.format(index=index), plan.part_template.endswith(".gz"))
        self.clients = [LoadClient(self, plan.member(k), k) for k in plan.positions(index)]
        self.own_sender = plan.own_sender if plan.segments > 1 else None
        self.unsettled = self.unfinished = len(self.clients)
        # The text is the two stamps, then " xxx..." up to msg_size bytes.
        self.text_tail = b" " + b"x" * (plan.msg_size - STAMPS_END - 1) if plan.msg_size > STAMPS_END else b""
        self.phase, self.closing = RAMP, False
        self.connected = self.sent = self.received = self.late = self.duplicates = self.resent = 0
        self.reconnects = self.foreign = self.orders_restarted = self.other_segments = 0
        self.queued = 0             # scheduled messages that wait in the clients' backlogs
        # What a message frame's payload weighs, for the pacers' byte buckets (the longest
        # message_id; the payload's format is send_now's).
        self.message_bytes = STAMPS_END + len(self.text_tail) + 90
        self.errors: dict = {}
        self.latencies: list = []
        self.intended_latencies: list = []
        self.connect_times: list = []
        self.connects_reported = 0
        self.hist_actual, self.hist_intended = LatencyHistogram(), LatencyHistogram()
        self.schedule: list = []
        self.t0 = self.end_us = 0
        self.ramped = 0
        self.in_flight_cap = handshakes_in_flight(plan.procs)
        self.ramp_started = time.monotonic()
        self.next_report = math.floor(self.ramp_started) + 1.0
        self._second, self._stamp_prefix = -1, b""

    def count_error(self, kind: str, n: int = 1) -> None:
        """Count an error by kind (a short phrase: the summary prints them as they are)."""
        self.errors[kind] = self.errors.get(kind, 0) + n

    def rfc3339(self, us: int) -> bytes:
        """sent_at for a stamp; the date part is formatted once a second."""
        second = us // 1_000_000
        if second != self._second:
            self._second = second
            self._stamp_prefix = iso_time(second * 1_000_000)[:19].encode()     # up to the seconds
        return b"%s.%06dZ" % (self._stamp_prefix, us % 1_000_000)

    # -- the loop --------------------------------------------------------------
    def run(self) -> None:
        """Ramp up, send on schedule, drain, close; report to the parent all along."""
        self.loop.selector.register(self.channel, selectors.EVENT_READ, self._on_channel)
        try:
            while self.phase != DONE:
                wait = 0.05
                if self.schedule:
                    wait = min(wait, max(0.0, (self.schedule[0][0] - now_us()) / 1e6))
                self.loop.run_once(wait)
                if self.phase == RAMP:
                    self._ramp()
                elif self.phase == SEND:
                    self._send_due()
                elif self.phase == CLOSE and not self.unfinished:
                    self.phase = DONE
                if len(self.sink.buf) > CsvSink.FLUSH_BYTES:
                    self.sink.flush()
                if time.monotonic() >= self.next_report:
                    self.report()
        finally:
            self.sink.close()
        unsent = sum(len(c.backlog) for c in self.clients)
        if unsent:
            self.count_error("not sent (still queued at the end)", unsent)
        self.report(final=True)

    def _ramp(self) -> None:
        due = min(len(self.clients),
                  int((time.monotonic() - self.ramp_started) * self.plan.ramp / self.plan.procs) + 1)
        # Started and not yet joined: beyond in_flight_cap, wait for some to finish.
        in_flight = self.ramped - (len(self.clients) - self.unsettled)
        due = min(due, self.ramped + max(0, self.in_flight_cap - in_flight))
        while self.ramped < due:
            self.clients[self.ramped].start()
            self.ramped += 1
        if self.ramped == len(self.clients) and not self.unsettled:
            self.phase = READY
            # Every client's objects live until the end: out of the collector's sight, a full
            # collection during the chat walks only what the chat allocates, not 18,000
            # clients (56 processes at once at a million; SCALING.md, section 13).
            gc.collect()
            gc.freeze()
            self.report()

    def _send_due(self) -> None:
        schedule, clients, now = self.schedule, self.clients, now_us()
        interval, jitter = self.plan.interval_us, self.plan.jitter * self.plan.interval_us
        while schedule and schedule[0][0] <= now:
            intended, i = schedule[0]
            if intended >= self.end_us:
                schedule.clear()
                break
            client = clients[i]
            client.send_message(intended)
            client.scheduled += 1
            base = self.t0 + client.phase_us + client.scheduled * interval
            heapq.heapreplace(schedule, (base + int(self.rng.uniform(-jitter, jitter) / 2), i))
        # Past the window nothing more may be sent, even if no send came due in it
        # (an interval longer than --duration).
        if not schedule or now >= self.end_us:
            self._drain()

    def _drain(self) -> None:
        self.schedule.clear()
        self.phase = DRAIN
        self.report()

    # -- the parent's commands -------------------------------------------------
    def _on_channel(self, mask: int) -> None:
        try:
            while self.channel.poll():
                self._command(*self.channel.recv())
        # The parent is gone (ECONNRESET if it died with reports unread): end as after a second Ctrl-C.
        except (EOFError, OSError):
            self.loop.selector.unregister(self.channel)
            self._command("close")

    def _command(self, name: str, arg=None) -> None:
        if name == "go" and self.phase in (RAMP, READY):
            self.t0, self.end_us = arg
            self.phase = SEND
            for i, client in enumerate(self.clients):
                client.phase_us = int(self.rng.random() * self.plan.interval_us)
                self.schedule.append((self.t0 + client.phase_us, i))
            heapq.heapify(self.schedule)
        elif name == "stop" and self.phase in (RAMP, READY, SEND):
            self._drain()
        elif name == "close" and not self.closing:
            self.closing = True
            self.phase = CLOSE
            self.schedule.clear()
            for client in self.clients:
                if client.state == IDLE:
                    client.finish()
                else:
                    client.close(CLOSE_NORMAL)

    # -- reports -----------------------------------------------------------------
    def report(self, final: bool = False) -> None:
        """Fold this second's latencies into the histograms and send totals to the parent."""
        # Whole seconds of the system-wide monotonic clock: every worker reports
        # at the same moments, just before the parent prints its progress line.
        now = time.monotonic()
        self.next_report = now + 0.2 if self.phase in (DRAIN, CLOSE) else math.floor(now) + 1.0
        window, handshakes = LatencyHistogram(), LatencyHistogram()
        window.add_sorted(sorted(self.intended_latencies))
        handshakes.add_sorted(sorted(self.connect_times[self.connects_reported:]))
        self.connects_reported = len(self.connect_times)
        self.hist_intended.merge(window)
        self.hist_actual.add_sorted(sorted(self.latencies))
        self.latencies, self.intended_latencies = [], []
        self.sink.flush()
        totals = {"phase": self.phase, "time": time.monotonic(), "ramped": self.ramped, "connected": self.connected,
                  "sent": self.sent, "received": self.received, "late": self.late,
                  "duplicates": self.duplicates, "reconnects": self.reconnects, "foreign": self.foreign,
                  "resent": self.resent, "orders_restarted": self.orders_restarted, "queued": self.queued,
                  "other_segments": self.other_segments, "errors": dict(self.errors),
                  "window": window.state(), "handshakes": handshakes.state()}
        if final:
            connect = LatencyHistogram()
            connect.add_sorted(sorted(self.connect_times))
            totals.update(hist_intended=self.hist_intended.state(), hist_actual=self.hist_actual.state(),
                          hist_connect=connect.state(),
                          recorded_clients=sum(c.recording for c in self.clients))
        try:
            self.channel.send(("final" if final else "tick", totals))
        except OSError:
            pass  # the parent is gone; the CSV part is complete all the same


def worker_main(plan: ScenarioPlan, index: int, channel, parent_ends: list) -> None:
    """Entry point of a worker process: the parent handles Ctrl-C and tells it what to do."""
    # A forked worker holds copies of the parent's pipe ends (its own and the
    # earlier workers'); while they are open, no worker sees EOF when the parent
    # dies without a word (SIGKILL, OOM), and would run on forever.
    for conn in parent_ends:
        conn.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise_fd_limit()
    LoadWorker(plan, index, channel).run()


# ---------------------------------------------------------------------------
# Load test: the parent process (phases, progress line, results)
# ---------------------------------------------------------------------------

class Interrupts:
    """SIGINT/SIGTERM handler that counts: the first stops sending, the second skips the grace period."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum, frame) -> None:
        self.count += 1


def sum_totals(reports: list) -> dict:
    """Add up the workers' counters and error counts."""
    out = {"connected": 0, "sent": 0, "received": 0, "late": 0, "duplicates": 0, "reconnects": 0,
           "foreign": 0, "resent": 0, "orders_restarted": 0, "other_segments": 0, "queued": 0, "errors": {}}
    for report in reports:
        for key in out:
            if key == "errors":
                for kind, n in report["errors"].items():
                    out["errors"][kind] = out["errors"].get(kind, 0) + n
            else:
                out[key] += report[key]
    return out


def merged_histogram(reports: list, key: str) -> LatencyHistogram:
    """One histogram from the same histogram of every worker report."""
    hist = LatencyHistogram()
    for report in reports:
        hist.merge(LatencyHistogram(report[key]))
    return hist


class ScenarioRun:
    """The parent's side of one scenario: start workers, pace the phases, show progress, build the result."""

    WINDOW_S = 5.0

    def __init__(self, settings: argparse.Namespace, plan: ScenarioPlan, run_dir: str,
                 interrupts: Interrupts) -> None:
        self.settings, self.plan, self.run_dir, self.interrupts = settings, plan, run_dir, interrupts
        self.latest: list = [None] * plan.procs
        self.finals: list = [None] * plan.procs
        self.windows: list = []
        self.phase = RAMP
        self.t0 = self.send_end = 0
        self.start_at_us = int(settings.start_at * 1e6) if settings.start_at else 0
        self.drain_deadline = self.hold_end = self.settle_until = 0.0
        self.ramp_progress = 0
        self.started_us = now_us()
        self.tty = sys.stderr.isatty()
        self.shown: list = [None] * plan.procs  # each worker's report at the last progress line
        self.rates = [(0.0, 0.0)] * plan.procs

    def run(self) -> dict:
        """Run the scenario to its end and return its result (also written as <scenario>.meta.json)."""
        ctx = multiprocessing.get_context("fork")
        self.conns, procs = {}, []
        for i in range(self.plan.procs):
            parent_end, child_end = ctx.Pipe()
            # The worker closes its copies of the parent's ends: its own and the earlier ones.
            proc = ctx.Process(target=worker_main,
                               args=(self.plan, i, child_end, [parent_end, *self.conns]),
                               name=f"loadclient-worker-{i}", daemon=True)
            proc.start()
            child_end.close()
            self.conns[parent_end] = i
            procs.append(proc)
        ramp_s = self.plan.clients / self.plan.ramp
        self.ramp_deadline = time.monotonic() + ramp_s + self.plan.connect_timeout + 2
        self.close_deadline = math.inf
        next_progress = math.floor(time.monotonic()) + 1.15  # just after the workers' reports
        while self.conns:
            for conn in multiprocessing.connection.wait(list(self.conns), 0.1):
                self._receive(conn)
            self._advance()
            if time.monotonic() >= next_progress:
                next_progress = math.floor(time.monotonic()) + 1.15
                self._progress()
            if time.monotonic() > self.close_deadline:
                break
        for proc in procs:
            proc.join(1.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if self.tty:
            sys.stderr.write("\n")
        return self._result()

    def _receive(self, conn) -> None:
        index = self.conns[conn]
        try:
            while conn.poll():
                kind, report = conn.recv()
                self.latest[index] = report
                if kind == "final":
                    self.finals[index] = report
                else:
                    self.windows.append((time.monotonic(), LatencyHistogram(report["window"]),
                                         LatencyHistogram(report["handshakes"])))
        except (EOFError, OSError):
            del self.conns[conn]
            if self.finals[index] is None:
                print(f"loadclient: worker {index} ended without its report", file=sys.stderr)

    def _broadcast(self, *command) -> None:
        for conn in self.conns:
            try:
                conn.send(command)
            except OSError:
                pass  # that worker is gone; _receive notices

    def _phases(self) -> set:
        return {report["phase"] if report else RAMP for report in self.latest}

    def _advance(self) -> None:
        ctrl_c, now = self.interrupts.count, time.monotonic()
        if self.phase == RAMP:
            # The ramp ends when every client has joined, or once it stops moving: while
            # clients are still being started or joining, the machine sets its pace, not --ramp.
            progress = sum(r["ramped"] + r["connected"] for r in self.latest if r)
            if progress > self.ramp_progress:
                self.ramp_progress = progress
                self.ramp_deadline = max(self.ramp_deadline, now + self.plan.connect_timeout + 2)
            if ctrl_c:
                self._close()
            elif self._phases() == {READY} or now > self.ramp_deadline:
                # --start-at: wait for it, a little ahead so that the workers have the command in time.
                until_start = (self.start_at_us - now_us()) / 1e6 - START_AT_LEAD if self.start_at_us else 0.0
                self.phase, self.hold_end = HOLD, now + max(self.settings.hold, until_start)
        elif self.phase == HOLD:
            if ctrl_c:
                self._close()
            elif now >= self.hold_end:
                # every worker has the command before its first send
                self.t0 = max(now_us() + 100_000, self.start_at_us)
                if self.start_at_us and self.t0 > self.start_at_us:
                    print(f"loadclient: warning: {self.plan.scenario}: sending starts "
                          f"{(self.t0 - self.start_at_us) / 1e6:.1f} s after --start-at (the ramp took longer)",
                          file=sys.stderr)
                duration = self.settings.duration
                end = self.t0 + int(duration * 1e6) if duration else 1 << 62
                self._broadcast("go", (self.t0, end))
                self.phase = SEND
        elif self.phase == SEND:
            if ctrl_c:
                self._broadcast("stop")
            if ctrl_c or self._phases() == {DRAIN}:
                self.phase, self.send_end = DRAIN, now_us()
                self.drain_deadline = now + self.settings.grace
                # Other segments' last messages are not counted here: give them time to arrive.
                self.settle_until = now + min(self.settings.grace, SEGMENT_SETTLE_S) if self.plan.segments > 1 \
                    else now
        elif self.phase == CLOSE:
            # Closing a million connections takes longer than one timeout: wait while
            # they keep closing, and give up on the rest once that stops.
            still_open = sum(r["connected"] for r in self.latest if r)
            if still_open < self.still_open:
                self.still_open = still_open
                self.close_deadline = max(self.close_deadline, now + self.plan.connect_timeout + 5)
        elif self.phase == DRAIN:
            totals = sum_totals([r for r in self.latest if r])
            drained = self._phases() == {DRAIN} and now >= self.settle_until and not totals["queued"] \
                and totals["received"] >= totals["sent"] * self.plan.room_members
            if drained or ctrl_c >= 2 or now > self.drain_deadline:
                self._close()

    def _close(self) -> None:
        self._broadcast("close")
        self.phase = CLOSE
        self.close_deadline = time.monotonic() + self.plan.connect_timeout + 5
        self.still_open = math.inf

    def _progress(self) -> None:
        reports = [r for r in self.latest if r]
        if not reports:
            return
        totals = sum_totals(reports)
        for i, (report, shown) in enumerate(zip(self.latest, self.shown)):
            # Rates from each worker's own report times, so a report that lands
            # just before or after this line does not skew them.
            if report and shown and report["time"] > shown["time"]:
                dt = report["time"] - shown["time"]
                self.rates[i] = ((report["sent"] - shown["sent"]) / dt,
                                 (report["received"] - shown["received"]) / dt)
        self.shown = list(self.latest)
        send_rate, receive_rate = (sum(r[k] for r in self.rates) for k in (0, 1))
        now = time.monotonic()
        self.windows = [w for w in self.windows if w[0] > now - self.WINDOW_S]
        window, handshakes = LatencyHistogram(), LatencyHistogram()
        for _, hist, connects in self.windows:
            window.merge(hist)
            handshakes.merge(connects)
        elapsed = (now_us() - (self.t0 or self.started_us)) / 1e6
        line = (f"{self.plan.scenario} {self.phase:5} {elapsed:5.0f}s  "
                f"conn {totals['connected']}/{self.plan.clients}  "
                f"send/s {send_rate:.0f}  recv/s {receive_rate:.0f}  "
                f"p50 {window.percentile(50) / 1000:.1f}ms p99 {window.percentile(99) / 1000:.1f}ms  "
                f"connect p99 {handshakes.percentile(99) / 1000:.0f}ms  "
                f"late {totals['late']}  err {sum(totals['errors'].values())}  "
                f"reconn {totals['reconnects']}")
        sys.stderr.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        sys.stderr.flush()

    def _result(self) -> dict:
        plan, settings = self.plan, self.settings
        reports = [f or l for f, l in zip(self.finals, self.latest) if f or l]
        totals = sum_totals(reports)
        missing = sum(f is None for f in self.finals)
        if missing:
            totals["errors"]["worker without final report"] = missing
        finals = [f for f in self.finals if f]
        end = now_us()
        send_end = self.send_end or end
        duration_s = max(0.0, (send_end - self.t0) / 1e6) if self.t0 else 0.0
        expected = totals["sent"] * plan.room_members
        received = totals["received"]
        ext = ".csv.gz" if settings.gzip else ".csv"
        csv_path = os.path.join(self.run_dir, plan.scenario + ext)
        merge_parts([plan.part_template.format(index=i) for i in range(plan.procs)], csv_path)
        result = {
            "scenario": plan.scenario, "rooms": plan.rooms, "room_size": plan.room_size,
            "clients": plan.clients, "procs": plan.procs,
            "connect_ms": merged_histogram(finals, "hist_connect").summary_ms(),
            "sent": totals["sent"], "expected": expected, "received": received,
            "late": totals["late"], "resent": totals["resent"], "lost": max(0, expected - received),
            "duplicates": totals["duplicates"], "foreign": totals["foreign"],
            "delivery_ratio": round(received / expected, 6) if expected else None,
            "duration_s": round(duration_s, 3),
            "deliveries_per_s": round(received / duration_s, 1) if duration_s else 0.0,
            "latency_ms": merged_histogram(finals, "hist_intended").summary_ms(),
            "latency_actual_ms": merged_histogram(finals, "hist_actual").summary_ms(),
            "recorded_clients": sum(f["recorded_clients"] for f in finals),
            "reconnects": totals["reconnects"], "orders_restarted": totals["orders_restarted"],
            "errors": totals["errors"],
            "interrupted": self.interrupts.count > 0, "csv": csv_path,
            "segment": f"{plan.segment}/{plan.segments}", "room_members": plan.room_members,
            "from_other_segments": totals["other_segments"],
        }
        meta = {
            "scenario": plan.scenario, "rooms": plan.rooms, "room_size": plan.room_size,
            "clients": plan.clients, "msg_interval_ms": plan.interval_us / 1000,
            "msg_size": plan.msg_size, "duration_s": result["duration_s"], "ramp": plan.ramp,
            "start_time": iso_time(self.t0 or self.started_us), "end_time": iso_time(end),
            "start_us": self.t0 or self.started_us, "end_us": end, "server_url": plan.target.url,
            "tool": "loadclient.py", "version": __version__, "seed": plan.seed,
            "settings": {k: v for k, v in vars(settings).items() if k not in ("target", "scenarios")},
            "sent": totals["sent"], "received": received, "errors": totals["errors"],
            "record_receivers": plan.record_fraction, "room_prefix": plan.room_prefix,
            "segment": {"index": plan.segment, "count": plan.segments, "room_members": plan.room_members},
            "start_at": settings.start_at,
            "start_late_s": round(max(0, self.t0 - self.start_at_us) / 1e6, 3) if self.start_at_us and self.t0
            else None,
            "summary": result,
        }
        result["meta"] = os.path.join(self.run_dir, plan.scenario + ".meta.json")
        with open(result["meta"], "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        return result


# ---------------------------------------------------------------------------
# Load test: summary, thresholds, the whole run
# ---------------------------------------------------------------------------

def format_summary(r: dict) -> str:
    """The human-readable summary of one scenario."""
    def lat(d: dict) -> str:
        return "  ".join(f"{k} {d[k]:.2f}" for k in ("p50", "p90", "p99", "p99.9", "max")) + " ms"
    ratio = "n/a" if r["delivery_ratio"] is None else f"{r['delivery_ratio']:.6f}"
    errors = ", ".join(f"{k}: {n}" for k, n in sorted(r["errors"].items())) or "none"
    c = r["connect_ms"]
    return "\n".join([
        (f"== scenario {r['scenario']}: {r['clients']} clients, {r['rooms']} rooms of {r['room_size']},"
         f" {r['procs']} process(es), {r['duration_s']:.1f} s of sending"
         + (" (interrupted)" if r["interrupted"] else "")),
        (f"  connected      {c['count']}/{r['clients']}   connect p50 {c['p50']:.1f} ms"
         f"  p99 {c['p99']:.1f} ms  max {c['max']:.1f} ms"),
        f"  sent           {r['sent']}",
        f"  expected       {r['expected']} deliveries",
        (f"  received       {r['received']}   delivery ratio {ratio}"
         f"   {r['deliveries_per_s']:.0f} deliveries/s"),
        f"  late           {r['late']}   (replayed after a reconnect with since)",
        f"  resent         {r['resent']}   (sent again: never acked before a reconnect, or refused over the rate)",
        f"  lost           {r['lost']}   duplicates {r['duplicates']}",
        *([(f"  segment        {r['segment']}   ({r['room_members']} of each room's {r['room_size']} members;"
            " the counts above are of this segment's senders only)"),
           f"                 received from other segments: {r['from_other_segments']}"]
          if r["segment"] != "1/1" else []),
        (f"  latency        {lat(r['latency_ms'])}   (from the intended send time,"
         f" {r['recorded_clients']} recording clients)"),
        f"  latency/actual {lat(r['latency_actual_ms'])}",
        f"  reconnects     {r['reconnects']}",
        (f"  new orders     {r['orders_restarted']}   (a client saw its room's order begin again:"
         " the server had lost the room's state)"),
        f"  errors         {errors}",
        f"  files          {r['csv']}  {r['meta']}",
    ])


def missed_thresholds(results: list, settings: argparse.Namespace) -> list:
    """One line per threshold a scenario missed (--max-p99 on intended-time latency, --min-delivery)."""
    missed = []
    for r in results:
        p99, ratio = r["latency_ms"]["p99"], r["delivery_ratio"]
        if settings.max_p99 is not None:
            if not r["latency_ms"]["count"]:
                missed.append(f"{r['scenario']}: no latency measured for --max-p99 {settings.max_p99} ms")
            elif p99 > settings.max_p99:
                missed.append(f"{r['scenario']}: p99 {p99:.2f} ms > --max-p99 {settings.max_p99} ms")
        if settings.min_delivery is not None and (ratio is None or ratio < settings.min_delivery):
            missed.append(f"{r['scenario']}: delivery ratio {ratio} < --min-delivery {settings.min_delivery}")
    return missed


def probe(target: Target, room: str, timeout: float) -> None:
    """Open and close one WebSocket (blocking), so a wrong or unreachable server fails in one line."""
    try:
        with socket.create_connection(target.address, timeout=timeout) as sock:
            key = new_key()
            sock.sendall(client_handshake_request(target.host_header, target.resource(room, "probe"), key))
            buf = bytearray()
            while parse_handshake_response(buf, key) is None:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError(0, "connection closed during the handshake")
                buf += chunk
            sock.sendall(encode_close(CLOSE_NORMAL, mask_key=new_mask_key()))
    except HandshakeError as exc:
        raise SettingsError(f"{target.url}: no WebSocket there: {exc.status} {exc.reason}") from None
    except OSError as exc:
        raise SettingsError(f"cannot connect to {target.url}: {exc.strerror or exc}") from None


def run_load_test(settings: argparse.Namespace) -> int:
    """Run every scenario, print summaries, write --summary-json; exit code 1 when a threshold is missed."""
    prefix = settings.room_prefix or f"lt{os.urandom(3).hex()}-"
    segment, segments = settings.segment
    probe(settings.target, f"{prefix}probe", settings.connect_timeout)
    run_dir = settings.out or os.path.join("results", datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(run_dir, exist_ok=True)
    interrupts = Interrupts()
    # SIGTERM (a container or CI stopping the run) ends it like Ctrl-C: results still complete.
    previous = {sig: signal.signal(sig, interrupts) for sig in (signal.SIGINT, signal.SIGTERM)}
    spread = settings.target.loopback and settings.target.family == socket.AF_INET
    interval_us = int(settings.msg_frequency * 1000)
    ext = ".csv.gz" if settings.gzip else ".csv"
    results = []
    try:
        for k, (rooms, room_size) in enumerate(settings.scenarios):
            if interrupts.count:
                break
            if k:
                pause_until = time.monotonic() + settings.pause
                while time.monotonic() < pause_until and not interrupts.count:
                    time.sleep(0.1)
            scenario = f"{rooms}x{room_size}"
            clients = rooms * segment_room_members(room_size, segment, segments)
            plan = ScenarioPlan(
                scenario, rooms, room_size, min(settings.procs, clients), settings.target,
                f"{prefix}{scenario}-", interval_us, settings.msg_size, settings.jitter,
                settings.seed, settings.ramp, settings.record_receivers, settings.connect_timeout,
                os.path.join(run_dir, f"{scenario}.part{{index}}{ext}"),
                settings.clients_per_address if spread and clients > settings.clients_per_address else 0,
                segment, segments)
            results.append(ScenarioRun(settings, plan, run_dir, interrupts).run())
            print(format_summary(results[-1]), flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    missed = missed_thresholds(results, settings)
    if settings.summary_json:
        with open(settings.summary_json, "w") as f:
            json.dump({"tool": "loadclient.py", "version": __version__, "server_url": settings.target.url,
                       "run_dir": run_dir, "seed": settings.seed, "scenarios": results,
                       "thresholds_missed": missed, "passed": not missed}, f, indent=2)
            f.write("\n")
    for line in missed:
        print(f"loadclient: threshold missed: {line}", file=sys.stderr)
    return 1 if missed else 0


# ---------------------------------------------------------------------------
# Terminal chat
# ---------------------------------------------------------------------------

class ChatClient(ClientConnection):
    """The terminal client's connection: prints the room, reconnects with since after a drop.

    What you type stays in an outbox until the server acks it: lines typed while
    disconnected go out once joined again, and lines sent but never acked are
    sent again after a reconnect, marked ``resend`` (the server drops those it
    already has). The outbox goes out paced within the limits the welcome
    announces, and a line refused with ``rate_limit`` goes again after its
    ``retry_after``. Quitting, or the end of piped input, waits for the outbox to
    empty: QUIT_WAIT seconds plus the time the backlog takes at the server's
    rate. What was not delivered by then, or was refused, is told on stderr and
    the exit code is 1.
    """

    __slots__ = ("epoch", "exit_code", "failures", "fatal", "give_up_at", "last_seq", "message_id", "out",
                 "outbox", "pacer", "pump_due", "quitting", "refused", "sent", "to_send", "told_waiting",
                 "was_open")

    def __init__(self, loop: Loop, target: Target, room: str | None, name: str | None, out) -> None:
        super().__init__(loop, target, room, name)
        self.out = out
        self.last_seq: int | None = None
        self.epoch = ""                     # the room's order last_seq counts in ("": none yet)
        self.message_id = self.failures = self.refused = 0
        self.outbox: dict = {}              # message_id -> text, typed and not yet acked
        self.to_send: list = []             # heap of the outbox's message_ids still to send on this connection
        self.sent: set = set()              # message_ids sent at least once: sent again as resends
        self.pacer: Pacer | None = None     # this connection's pace, once joined
        self.quitting = self.was_open = self.pump_due = self.told_waiting = False
        self.give_up_at = 0.0
        self.exit_code: int | None = None
        self.fatal = ""

    def say(self, line: str) -> None:
        """Print one line to the terminal."""
        self.out.write(line + "\n")
        self.out.flush()

    def on_frames(self, frames: list) -> None:
        for opcode, payload in frames:
            if opcode != OP_TEXT:
                self.on_control(opcode, payload)
                continue
            try:
                event = json.loads(payload)
                kind = event["type"]
            except (ValueError, KeyError, TypeError):
                self.say(f"! unreadable frame from the server: {payload[:80]!r}")
                continue
            if kind == "message":
                self.on_message(event)
            elif kind == "ack":
                self.settle(event.get("message_id"))
            elif kind == "welcome":
                self.on_welcome(event)
            elif kind == "members":
                self.say(f"* members in {event.get('room')}: {event.get('count')}")
            elif kind == "error":
                self.on_error(event)

    def on_message(self, event: dict) -> None:
        """Print a message of the room, once: in a new order (another epoch) whatever its seq."""
        epoch, seq = event.get("epoch") or "", event.get("seq")
        if epoch and epoch != self.epoch:
            self.new_order(epoch)
        elif isinstance(seq, int) and self.last_seq is not None and seq <= self.last_seq:
            return                          # had it: a server that lagged behind the one we saw it from
        if isinstance(seq, int):
            self.last_seq = seq
        stamp = time.strftime("%H:%M:%S")
        self.say(f"{stamp} {event.get('sender', '?')}: {event.get('text', '')}")

    def new_order(self, epoch: str) -> None:
        """The room's order began again (the server lost its state): count from its start."""
        if self.epoch:
            self.say("* the room's history was lost on the server: its messages count from 1 again,"
                     " and any you had not received are gone")
        self.epoch, self.last_seq = epoch, 0

    def on_welcome(self, event: dict) -> None:
        """Joined (again): say so, then send what is not acked yet, at the server's pace."""
        again = self.was_open
        self.was_open, self.failures, self.told_waiting = True, 0, False
        epoch = event.get("epoch") or ""    # "": the room has no order yet
        if not again:
            self.epoch, self.last_seq = epoch, event.get("seq", 0)
        elif epoch and epoch != self.epoch:
            self.new_order(epoch)           # and the server replays the new order from its start
        verb = "reconnected to" if again else "joined"
        self.say(f"* {verb} {event.get('room')} as {event.get('name')}"
                 f" ({event.get('members', '?')} here); type /quit to leave")
        now = time.monotonic()
        self.pacer = Pacer(event.get("limits"), now)
        self.to_send = sorted(self.outbox)  # a sorted list is a heap
        if self.quitting:
            self.give_up_at = max(self.give_up_at, now + self.patience())
        self.pump()

    def on_error(self, event: dict) -> None:
        """A frame of ours was refused: over the rate (or the bus away), it goes again later;
        otherwise sending it again would be refused again, and it is not delivered."""
        code, reason, message_id = event.get("code"), event.get("reason"), event.get("message_id")
        if code in ("rate_limit", "unavailable") and message_id in self.outbox and self.pacer is not None:
            retry_after = event.get("retry_after") if code == "rate_limit" else UNAVAILABLE_RETRY
            self.pacer.hold(retry_after, time.monotonic())
            heapq.heappush(self.to_send, message_id)
            self.say(f"! {code}: {reason}; sending it again shortly")
            self.pump_later(self.pacer.time - time.monotonic())
            return
        self.say(f"! {code}: {reason}")
        if self.outbox.pop(message_id, None) is not None:
            self.refused += 1
            self.leave_if_done()

    def send_text(self, text: str) -> None:
        """Queue a typed line; it goes out at the server's pace, now or once (re)joined."""
        self.message_id += 1
        self.outbox[self.message_id] = text
        if self.pacer is None:
            if not self.told_waiting:
                self.told_waiting = True
                self.say("* not connected: will send after reconnecting" if self.was_open else
                         "* joining: will send once joined")
            return
        heapq.heappush(self.to_send, self.message_id)
        self.pump()

    def pump(self) -> None:
        """Send what is due on this connection, as fast as the pacer lets it; then wait for tokens."""
        self.pump_due = False
        pacer = self.pacer
        while pacer is not None and self.to_send and self.state == OPEN:
            message_id = self.to_send[0]
            text = self.outbox.get(message_id)
            if text is None:                # acked meanwhile
                heapq.heappop(self.to_send)
                continue
            body = {"message_id": message_id, "text": text, "sent_at": iso_time(now_us())}
            if message_id in self.sent:
                body["resend"] = True
            payload = json.dumps(body).encode()
            now = time.monotonic()
            if not pacer.take(len(payload), now):
                self.pump_later(pacer.wait(len(payload), now))
                return
            heapq.heappop(self.to_send)
            self.sent.add(message_id)
            self.send(encode_frame(OP_TEXT, payload, mask_key=new_mask_key()))

    def pump_later(self, delay: float) -> None:
        """Pump again after delay seconds (once, however often asked)."""
        if not self.pump_due:
            self.pump_due = True
            self.loop.call_later(max(0.0, delay), self.pump)

    def settle(self, message_id) -> None:
        """The server acked one of ours: it is delivered."""
        if self.outbox.pop(message_id, None) is not None:
            self.sent.discard(message_id)
            self.leave_if_done()

    def patience(self) -> float:
        """Seconds quitting waits for the outbox: QUIT_WAIT, plus the backlog at the server's rate."""
        rate = self.pacer.rate if self.pacer is not None else 0.0
        return QUIT_WAIT + (len(self.outbox) / rate if rate else 0.0)

    def quit(self, now: bool = False) -> None:
        """Close with 1000 once what was typed is acked (or at once), and let the loop end."""
        first = not self.quitting
        self.quitting = True
        if self.outbox and not now:
            if first:
                patience = self.patience()
                self.give_up_at = time.monotonic() + patience
                later = " (longer once joined, at the server's rate)" if self.pacer is None else ""
                self.say(f"* sending what is left ({len(self.outbox)}), at most {patience:.0f} s{later}")
                self.loop.call_later(0.5, self._give_up_in_time)
        elif self.state == IDLE:
            self.finish(None)
        else:
            self.close(CLOSE_NORMAL)

    def _give_up_in_time(self) -> None:
        if self.exit_code is not None:
            return
        left = self.give_up_at - time.monotonic()
        if left <= 0:
            self.quit(now=True)
        else:
            self.loop.call_later(min(left, 0.5), self._give_up_in_time)

    def leave_if_done(self) -> None:
        """Quitting and nothing left to deliver: leave."""
        if self.quitting and not self.outbox and self.state == OPEN:
            self.close(CLOSE_NORMAL)

    def undelivered(self) -> str:
        """What of the typed lines did not reach the room ("": all did)."""
        lost = len(self.outbox) + self.refused
        if not lost:
            return ""
        why = [f"{self.refused} refused by the server"] if self.refused else []
        why += [f"{len(self.outbox)} not acknowledged in time"] if self.outbox else []
        return f"{lost} of {self.message_id} messages typed were not delivered ({', '.join(why)})"

    def finish(self, code: int | None) -> None:
        """Leave for good: exit code 1 when something typed was not delivered."""
        if code is not None:
            self.say(f"* closed ({code})")
        self.exit_code = 1 if self.undelivered() else 0

    def on_ended(self, code: int, reason: str, by_us: bool) -> None:
        self.pacer = None
        if self.quitting and (by_us or not self.outbox):
            self.finish(code)
            return
        if not self.was_open and self.failures == 0:
            self.fatal = f"cannot connect to {self.target.url}: {reason}"
            self.exit_code = 2
            return
        self.failures += 1
        delay = min(10.0, 0.5 * 2 ** min(self.failures - 1, 5))
        why = reason if code == CLOSE_ABNORMAL else f"closed by the server: {code} {reason}".rstrip()
        self.say(f"* {why}; reconnecting in {delay:.1f} s")
        self.loop.call_later(delay, self.reconnect)

    def reconnect(self) -> None:
        """Try again, asking for the messages missed meanwhile."""
        if self.exit_code is None and self.state == IDLE:
            self.connect(self.last_seq if self.was_open else None, self.epoch)


QUIT_WAIT = 5.0               # seconds quitting waits for acks, beyond the backlog's time at the server's rate


def ask(prompt: str, default: str) -> str:
    """Read one answer from the terminal, the default on an empty line."""
    answer = input(f"{prompt} [{default}]: " if default else f"{prompt}: ").strip()
    return answer or default


def run_terminal(settings: argparse.Namespace) -> int:
    """The interactive chat: stdin and the socket in one selectors loop."""
    interactive = sys.stdin.isatty()
    url, name, room = settings.server_url, settings.name, settings.room
    try:
        if url is None and interactive:
            url = ask("server", DEFAULT_URL)
        if name is None and interactive:
            name = ask("name (empty: the server picks one)", "") or None
        target = parse_server_url(url or DEFAULT_URL)
        if room is None and interactive and target.room is None:
            room = ask("room", "lobby")
    except EOFError:
        return 0
    room = room or target.room
    if room is not None and not ROOM_NAME.fullmatch(room):
        raise SettingsError(f"--room {room!r}: 1-64 characters of A-Z a-z 0-9 _ . -")
    loop = Loop()
    client = ChatClient(loop, target, room, name, sys.stdout)
    lines = LineReader(sys.stdin.fileno(), client)
    loop.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, lines.on_readable)
    client.connect()
    while client.exit_code is None:
        try:
            loop.run_once(0.5)
        except KeyboardInterrupt:
            client.quit(now=client.quitting)        # a second Ctrl-C does not wait
    if client.fatal:
        raise SettingsError(client.fatal)
    if client.undelivered():
        print(f"loadclient: {client.undelivered()}", file=sys.stderr)
    return client.exit_code


class LineReader:
    """Typed lines from stdin (a terminal or a pipe), fed to the chat client."""

    def __init__(self, fd: int, client: ChatClient) -> None:
        self.fd, self.client, self.buf = fd, client, b""

    def on_readable(self, mask: int) -> None:
        """Read what is there; each full line is a message, /quit or end of input leaves."""
        data = os.read(self.fd, 65536)
        if not data:
            self.client.loop.selector.unregister(self.fd)
            self.client.quit()
            return
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for raw in lines:
            text = raw.decode("utf-8", "replace").rstrip("\r")
            if text.strip() == "/quit":
                self.client.quit()
                return
            if text.strip():
                self.client.send_text(text)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad setting as one line (SettingsError), not usage plus error."""

    def error(self, message: str) -> None:
        raise SettingsError(message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows a default only where there is one to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


EXAMPLES = """examples:
  python loadclient.py --server-url ws://127.0.0.1:8080/ws --name alice --room tea
  python loadclient.py --load-test --rooms 25 --room-size 4 --rate 1 --duration 30
  python loadclient.py --load-test --sweep 25x2,25x4,50x8 --duration 20 --max-p99 250 --min-delivery 0.999
  python loadclient.py --load-test --rooms 1000 --room-size 20 --procs 4 --record-receivers 0.1 --gzip
"""


def build_parser() -> ArgumentParser:
    """The command line of both modes."""
    p = ArgumentParser(prog="loadclient.py", description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                       formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--server-url",
                   help=f"ws:// URL of the server (default {DEFAULT_URL}; asked when interactive)")
    chat = p.add_argument_group("terminal chat")
    chat.add_argument("--name", help="display name (asked when interactive; empty: the server picks one)")
    chat.add_argument("--room", help="room to join (asked when interactive; default lobby)")
    load = p.add_argument_group("load test")
    add = load.add_argument
    add("--load-test", action="store_true", help="simulate many clients instead of chatting")
    add("--rooms", type=int, default=10, help="rooms in the scenario")
    add("--room-size", type=int, default=10, help="clients per room")
    add("--sweep", help="scenarios ROOMSxSIZE,... to run one after another (e.g. 25x2,25x4,50x8)")
    rate = load.add_mutually_exclusive_group()
    rate.add_argument("--msg-frequency", type=float, metavar="MS",
                      help="each client sends one message every MS ms (default 1000)")
    rate.add_argument("--rate", type=float, metavar="PER_S", help="each client sends PER_S messages per second")
    add("--msg-size", type=int, default=100, help="bytes of text per message (the first 33 carry send stamps)")
    add("--duration", type=float, metavar="S", help="seconds of sending per scenario (default: until Ctrl-C)")
    add("--ramp", type=float, default=1000.0, help="connections opened per second")
    add("--procs", type=int, default=1, help="processes that share the clients")
    add("--out", help="results folder (default results/<YYYYmmdd-HHMMSS>)")
    add("--gzip", action="store_true", help="write <scenario>.csv.gz")
    add("--hold", type=float, default=0.0, metavar="S",
        help="seconds every client stays connected and quiet (answering pings) between the ramp and sending")
    add("--grace", type=float, default=5.0, help="seconds to wait for messages in flight after sending stops")
    add("--pause", type=float, default=5.0, help="seconds between the scenarios of a sweep")
    add("--room-prefix", metavar="PREFIX",
        help="rooms are named PREFIX<scenario>-<n>, e.g. to watch one in the browser "
             "(default: lt<random hex>-, fresh rooms every run)")
    add("--seed", type=int, help="seed of the schedule's phases and jitter (default: random, in the metadata)")
    add("--segment", type=parse_segment, default="1/1", metavar="I/N",
        help="run segment I of N (1 <= I <= N) of the scenario from this machine: member j of every room "
             "is segment j %% N + 1's; needs --seed and --start-at, the same on every segment")
    add("--start-at", type=float, metavar="UNIX_TIME",
        help="start sending at this Unix time (seconds), so that several machines start together; "
             "no later than a day ahead")
    add("--jitter", type=float, default=0.1, help="send-time jitter as a fraction of the interval (0 <= J < 1)")
    add("--record-receivers", type=float, default=1.0, metavar="FRACTION",
        help="fraction of clients that record latencies and Received rows (all are counted)")
    add("--connect-timeout", type=float, default=10.0, help="seconds for a connect and handshake")
    add("--clients-per-address", type=int, default=CLIENTS_PER_SOURCE_ADDRESS, metavar="N",
        help="with a loopback server, each further N clients connect from 127.0.0.2, 127.0.0.3, ...")
    add("--summary-json", metavar="FILE", help="also write the summary as JSON")
    add("--max-p99", type=float, metavar="MS", help="exit 1 when a scenario's p99 latency exceeds MS")
    add("--min-delivery", type=float, metavar="RATIO", help="exit 1 when a scenario's delivery ratio < RATIO")
    return p


def parse_sweep(text: str) -> list:
    """'25x2,25x4' -> [(25, 2), (25, 4)]."""
    scenarios = []
    for item in text.split(","):
        rooms, _, size = item.strip().lower().partition("x")
        if not (rooms.isdigit() and size.isdigit()):
            raise SettingsError(f"--sweep {text}: expected ROOMSxSIZE,... (e.g. 25x2,50x8), got {item!r}")
        scenarios.append((int(rooms), int(size)))
    return scenarios


SEGMENT = re.compile(r"([1-9][0-9]{0,5})/([1-9][0-9]{0,5})")
MAX_START_AHEAD_S = 86_400    # a --start-at further ahead is taken for a typo


def parse_segment(text: str) -> tuple:
    """'2/3' -> (2, 3): the second of three segments (1-based)."""
    match = SEGMENT.fullmatch(text)
    if match is None or int(match[1]) > int(match[2]):
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N with 1 <= I <= N, e.g. 1/2")
    return int(match[1]), int(match[2])


def check_segment(s: argparse.Namespace) -> None:
    """--segment and --start-at: segments of one run need a common seed, rooms and start."""
    segment, segments = s.segment
    if s.start_at is not None:
        if not math.isfinite(s.start_at):
            raise SettingsError(f"--start-at {s.start_at}: not a Unix time")
        ahead = s.start_at - time.time()
        if ahead < 0:
            raise SettingsError(f"--start-at {s.start_at:.0f}: {-ahead:.0f} s in the past")
        if ahead > MAX_START_AHEAD_S:
            raise SettingsError(f"--start-at {s.start_at}: more than a day ahead (a Unix time in seconds?)")
        if len(s.scenarios) > 1:
            raise SettingsError("--start-at starts one scenario: not with --sweep")
    if segments == 1:
        return
    if s.seed is None or s.start_at is None:
        raise SettingsError(f"--segment {segment}/{segments} needs --seed and --start-at, the same on every segment")
    if min(n for _, n in s.scenarios) < segments:
        raise SettingsError(f"--segment {segment}/{segments}: rooms of {min(n for _, n in s.scenarios)} members "
                            f"cannot be split over {segments} segments (--room-size >= {segments})")
    # Without --room-prefix, every segment names the rooms after the common seed.
    s.room_prefix = s.room_prefix or f"lt{s.seed}-"


def parse_settings(argv: list | None = None) -> argparse.Namespace:
    """Parse and validate the command line; every problem is a SettingsError."""
    parser = build_parser()
    s = parser.parse_args(argv)
    if not s.load_test:
        defaults = vars(parser.parse_args([]))
        chat_only = {"server_url", "name", "room", "load_test"}
        stray = [k for k, v in vars(s).items() if k not in chat_only and v != defaults[k]]
        if stray:
            raise SettingsError(f"--{stray[0].replace('_', '-')} needs --load-test")
        return s
    if s.rate is not None:
        if not s.rate > 0:
            raise SettingsError(f"--rate {s.rate}: must be > 0 messages per second")
        s.msg_frequency = 1000.0 / s.rate
    elif s.msg_frequency is None:
        s.msg_frequency = 1000.0
    s.scenarios = parse_sweep(s.sweep) if s.sweep else [(s.rooms, s.room_size)]
    check_segment(s)
    checks = [
        (all(r >= 1 for r, _ in s.scenarios), "--rooms: must be >= 1"),
        (all(n >= 1 for _, n in s.scenarios), "--room-size: must be >= 1"),
        (s.msg_frequency > 0, "--msg-frequency: must be > 0 ms"),
        (0 <= s.msg_size <= MAX_MESSAGE_SIZE, f"--msg-size: must be 0..{MAX_MESSAGE_SIZE}"),
        (s.duration is None or s.duration > 0, "--duration: must be > 0 seconds"),
        (s.ramp > 0, "--ramp: must be > 0 connections per second"),
        (s.procs >= 1, "--procs: must be >= 1"),
        (s.grace >= 0 and s.pause >= 0 and s.hold >= 0, "--grace, --pause and --hold: must be >= 0"),
        (0 <= s.jitter < 1, "--jitter: must be in [0, 1)"),
        (s.room_prefix is None or ROOM_NAME.fullmatch(s.room_prefix + "0x0-0") is not None,
         "--room-prefix: must be up to 50 characters of A-Z a-z 0-9 _ . -"),
        (0 <= s.record_receivers <= 1, "--record-receivers: must be in [0, 1]"),
        (s.connect_timeout > 0, "--connect-timeout: must be > 0"),
        (1 <= s.clients_per_address, "--clients-per-address: must be >= 1"),
        (s.max_p99 is None or s.max_p99 > 0, "--max-p99: must be > 0 ms"),
        (s.min_delivery is None or 0 <= s.min_delivery <= 1, "--min-delivery: must be in [0, 1]"),
        (s.max_p99 is None or s.record_receivers > 0, "--max-p99 needs --record-receivers > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise SettingsError(message)
    largest = max(r * segment_room_members(n, *s.segment) for r, n in s.scenarios)
    per_proc = max(busiest_process(r, segment_room_members(n, *s.segment), s.procs) for r, n in s.scenarios)
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 64
    if per_proc > files:
        raise SettingsError(f"{largest} clients need {per_proc} sockets per process, over the open-file"
                            f" limit ({files}); use --procs {math.ceil(largest / files)} or more")
    if s.seed is None:
        s.seed = random.SystemRandom().randrange(1 << 31)
    s.target = parse_server_url(s.server_url or DEFAULT_URL)
    if s.target.loopback and largest > 254 * s.clients_per_address:
        raise SettingsError(f"{largest} clients at --clients-per-address {s.clients_per_address} need more "
                            "source addresses than 127.0.0.1-254")
    return s


def main(argv: list | None = None) -> int:
    """Entry point: terminal chat, or --load-test; exit code 2 for bad settings."""
    try:
        settings = parse_settings(argv)
        return run_load_test(settings) if settings.load_test else run_terminal(settings)
    except SettingsError as exc:
        print(f"loadclient: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
