#!/usr/bin/env python3
"""scale-chat: a WebSocket chat server on one selectors loop, in one file.

Sections, top to bottom; each uses only what stands above it:

1. Wire (RFC 6455), sans-IO: frames, close codes, UTF-8, the opening handshake.
   Bytes in, events or bytes out; no sockets. loadclient.py imports it.
2. HTTP: request heads, the routes, static files, what a chat upgrade may carry.
   A request in, an answer or an upgrade out.
3. Chat core: messages, history, rooms, the order of each room. Knows nothing
   of sockets: it writes to an outbox and hands messages to a bus.
4. Connection, sans-IO: states, rate limits, strikes, pings, deadlines. Bytes
   and the time in, what to do out; closing is one table of moves.
5. Loop and server: counters, the selectors loop, links, the server. Sockets,
   accept, read, write, timers, the hand-off of a socket to its room's worker.
6. Supervisor (--workers): the record codec, the remote bus, the hub.
7. Redis (--redis): RESP, the scripts, the cluster, the bus.
8. Edges: metrics, settings, logging, main.

Run ``python scalechat.py --help`` for every setting.
"""
from __future__ import annotations

import argparse
import base64
import bisect
import codecs
import errno
import functools
import gc
import hashlib
import itertools
import json
import logging
import math
import mimetypes
import mmap
import os
import re
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections import deque
from enum import IntEnum, StrEnum
from typing import NamedTuple, Protocol
from urllib.parse import parse_qs

__version__ = "1.0.0"

log = logging.getLogger("scalechat")


# ---------------------------------------------------------------------------
# 1. Wire (RFC 6455), sans-IO: frames, close codes, UTF-8, the opening handshake
# ---------------------------------------------------------------------------

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
DATA_OPCODES = (OP_CONTINUATION, OP_TEXT, OP_BINARY)
CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013

# Codes a peer may put in a Close frame (RFC 6455 7.4.1, 7.4.2 and the IANA
# registry): 1004-1006 and 1015 are reserved and never sent on the wire.
VALID_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010,
                               1011, 1012, 1013, 1014))

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_CONTROL_PAYLOAD = 125


class ProtocolError(Exception):
    """A peer broke the protocol; ``code`` is the close code to answer with.

    ``frames`` are those the same ``FrameParser.feed`` call completed before the
    violation: they were valid, so they are handled before failing.
    """

    def __init__(self, code: int, reason: str, frames: list | None = None):
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason
        self.frames = frames or []


class Refused(StrEnum):
    """Why a request or a frame was refused: the reason label of scalechat_refused_total, one each."""

    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    METHOD = "method"
    VERSION = "version"
    HEADER_TOO_LARGE = "header_too_large"
    ORIGIN = "origin"
    MAX_CONNECTIONS = "max_connections"
    DRAINING = "draining"
    RATE_LIMIT = "rate_limit"
    BAD_MESSAGE = "bad_message"
    TOO_BIG = "too_big"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    BUS_DOWN = "bus_down"
    HOST = "host"


# What each refusal status counts as, unless the refusal names its own reason.
REFUSAL_COUNTERS = {400: Refused.BAD_REQUEST, 403: Refused.ORIGIN, 404: Refused.NOT_FOUND, 405: Refused.METHOD,
                    426: Refused.VERSION, 431: Refused.HEADER_TOO_LARGE, 503: Refused.MAX_CONNECTIONS}


class HandshakeError(Exception):
    """A request is refused; ``status`` is the HTTP status it deserves, ``counter`` the refused{reason} it counts as."""

    def __init__(self, status: int, reason: str, headers: tuple = (), counter: Refused | None = None):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers
        self.counter = counter or REFUSAL_COUNTERS.get(status, Refused.BAD_REQUEST)


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept value for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WS_GUID).digest()).decode()


def new_key() -> str:
    """A fresh random Sec-WebSocket-Key."""
    return base64.b64encode(os.urandom(16)).decode()


def new_mask_key() -> bytes:
    """A fresh random 4-byte masking key."""
    return os.urandom(4)


def mask(data: bytes, key: bytes) -> bytes:
    """XOR data with a 4-byte key (masking and unmasking are the same).

    One big-integer XOR instead of a per-byte Python loop: linear, in C.
    """
    n = len(data)
    if not n:
        return b""
    k = key * (n // 4 + 1)
    return (int.from_bytes(data, "little") ^ int.from_bytes(k[:n], "little")).to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes, fin: bool = True, mask_key: bytes | None = None) -> bytes:
    """One complete frame; masked (client to server) when mask_key is given."""
    b0 = opcode | 0x80 if fin else opcode
    n = len(payload)
    m = 0x80 if mask_key else 0
    if n < 126:
        header = bytes((b0, m | n))
    elif n < 65536:
        header = struct.pack("!BBH", b0, m | 126, n)
    else:
        header = struct.pack("!BBQ", b0, m | 127, n)
    if mask_key:
        return header + mask_key + mask(payload, mask_key)
    return header + payload


def encode_close(code: int, reason: str = "", mask_key: bytes | None = None) -> bytes:
    """A Close frame with a status code and a UTF-8 reason cut to fit 125 bytes."""
    # Cut on a character boundary: half a character would make the reason invalid UTF-8.
    reason_bytes = reason.encode()[:123].decode(errors="ignore").encode()
    payload = b"" if code == CLOSE_NO_STATUS else struct.pack("!H", code) + reason_bytes
    return encode_frame(OP_CLOSE, payload, mask_key=mask_key)


def parse_close(payload: bytes) -> tuple[int, str]:
    """The (code, reason) of a Close frame's payload; 1005 when it carries none."""
    if not payload:
        return CLOSE_NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "close payload of one byte")
    code = int.from_bytes(payload[:2], "big")
    if code not in VALID_CLOSE_CODES and not 3000 <= code <= 4999:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise ProtocolError(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
    return code, reason


_new_utf8_decoder = codecs.getincrementaldecoder("utf-8")


def _validate_utf8(decoder, chunk: bytes, final: bool = False) -> None:
    """Feed part of a text message to an incremental UTF-8 decoder; 1007 at the first bad byte.

    CPython's decoder fails at once on every impossible prefix but one: after
    ED A0..BF (a UTF-16 surrogate, never valid) it waits for one more byte.
    """
    try:
        decoder.decode(chunk, final)
    except UnicodeDecodeError:
        raise ProtocolError(CLOSE_INVALID_DATA, "text is not valid UTF-8") from None
    pending = decoder.buffer
    if pending[:1] == b"\xed" and pending[1:2] >= b"\xa0":
        raise ProtocolError(CLOSE_INVALID_DATA, "text holds a UTF-16 surrogate")


class FrameParser:
    """Turns a byte stream, cut anywhere, into complete messages and control frames.

    ``feed`` returns ``(opcode, payload)`` pairs: OP_TEXT / OP_BINARY with the
    whole (defragmented, unmasked) message, or a control frame. Text is
    validated as UTF-8 while it arrives, so invalid text fails at the first bad
    byte, even inside an unfinished frame. Violations raise ProtocolError; a
    failed parser stays failed (RFC 6455 7.1.7: no more data is processed).
    """

    __slots__ = ("_buf", "_decoder", "_frame", "_msg_op", "_parts", "accept_binary", "error", "expect_masked",
                 "fragments", "frame_limit", "frames", "max_message_size")

    def __init__(self, expect_masked: bool = True, max_message_size: int = 1 << 20,
                 accept_binary: bool = True):
        self.expect_masked = expect_masked
        self.max_message_size = max_message_size
        self.accept_binary = accept_binary
        self.error: tuple | None = None         # (code, reason) once the stream is broken
        self._buf = b""
        self._frame = None      # [fin, remaining, key, offset] of a frame being streamed
        self._msg_op = None     # opcode of the message in progress (fragmented or streamed)
        self._parts = bytearray()   # the message in progress: memory is what the peer sent
        self._decoder = None
        self.frames = 0             # frame headers parsed so far: every frame pays the rate limit
        self.fragments = 0          # of them, data frames without FIN: each one completes nothing
        self.frame_limit = 1 << 62  # past this count, fail with 1008: the owner sets what it can pay for

    def feed(self, data: bytes) -> list:
        """Consume data; return the messages and control frames it completed."""
        if self.error is not None:
            raise ProtocolError(*self.error)
        out: list = []
        try:
            self._parse(data, out)
        except ProtocolError as e:
            e.frames = out
            # Not the exception itself: its traceback holds this frame, and so
            # this parser, a reference cycle only the cyclic collector could free.
            self.error = (e.code, e.reason)
            raise
        return out

    def _parse(self, data: bytes, out: list) -> None:
        buf = self._buf + data if self._buf else data
        pos, end = 0, len(buf)
        while pos < end:
            if self._frame is not None:
                pos = self._stream(buf, pos, end, out)
                continue
            if end - pos < 2:
                break
            b0, b1 = buf[pos], buf[pos + 1]
            n, hlen = b1 & 0x7F, 2
            if n == 126:
                hlen = 4
                if end - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 4], "big")
            elif n == 127:
                hlen = 10
                if end - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 10], "big")
                if n >> 63:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "64-bit length has its top bit set")
            opcode, fin = b0 & 0x0F, b0 & 0x80
            self._check_header(b0, b1, opcode, fin, n)
            if b1 & 0x80:
                hlen += 4
                if end - pos < hlen:
                    break
                key = buf[pos + hlen - 4:pos + hlen]
            else:
                key = None
            self.frames += 1                       # once, even if the header came in pieces
            if self.frames > self.frame_limit:
                raise ProtocolError(CLOSE_POLICY, "too many frames")
            start = pos + hlen
            if opcode >= 8:                        # control: always whole, may interleave
                if end - start < n:
                    break
                payload = buf[start:start + n]
                if key:
                    payload = mask(payload, key)
                if opcode == OP_CLOSE:
                    parse_close(payload)           # validate: code and UTF-8 reason
                out.append((opcode, payload))
                pos = start + n
                continue
            pos = start
            if fin and opcode and end - start >= n:      # fast path: a whole one-frame message
                payload = buf[start:start + n]
                if key:
                    payload = mask(payload, key)
                if opcode == OP_TEXT and not payload.isascii():    # ASCII is UTF-8: 6x cheaper
                    try:
                        payload.decode()
                    except UnicodeDecodeError:
                        raise ProtocolError(CLOSE_INVALID_DATA, "text is not valid UTF-8") from None
                out.append((opcode, payload))
                pos += n
                continue
            if opcode:
                self._msg_op = opcode
                self._decoder = _new_utf8_decoder() if opcode == OP_TEXT else None
            if not fin:
                self.fragments += 1
            self._frame = [fin, n, key, 0]
            if not n:
                self._stream(buf, pos, end, out)
        self._buf = buf[pos:] if pos < end else b""

    def _check_header(self, b0: int, b1: int, opcode: int, fin: int, n: int) -> None:
        if b0 & 0x70:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set without an extension")
        if bool(b1 & 0x80) != self.expect_masked:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR,
                                "client frames must be masked" if self.expect_masked
                                else "server frames must not be masked")
        if opcode >= 8:
            if opcode not in CONTROL_OPCODES:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"reserved opcode {opcode}")
            if not fin:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
            if n > MAX_CONTROL_PAYLOAD:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "control frame longer than 125 bytes")
            return
        if opcode not in DATA_OPCODES:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"reserved opcode {opcode}")
        if opcode == OP_CONTINUATION:
            if self._msg_op is None:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation frame without a message")
        elif self._msg_op is not None:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
        if opcode == OP_BINARY and not self.accept_binary:
            raise ProtocolError(CLOSE_UNSUPPORTED_DATA, "binary frames are not accepted")
        if (0 if opcode else len(self._parts)) + n > self.max_message_size:
            raise ProtocolError(CLOSE_TOO_BIG, f"message larger than {self.max_message_size} bytes")

    def _stream(self, buf: bytes, pos: int, end: int, out: list) -> int:
        """Take what has arrived of the current data frame's payload."""
        frame = self._frame
        fin, remaining, key, offset = frame
        take = min(remaining, end - pos)
        if take:
            chunk = buf[pos:pos + take]
            if key:
                r = offset & 3
                chunk = mask(chunk, key[r:] + key[:r])
            if self._decoder is not None:
                _validate_utf8(self._decoder, chunk)
            self._parts += chunk
            frame[1] = remaining = remaining - take
            frame[3] = offset + take
        if remaining:
            return end
        self._frame = None
        if fin:
            if self._decoder is not None:
                _validate_utf8(self._decoder, b"", True)
            out.append((self._msg_op, bytes(self._parts)))
            self._msg_op, self._decoder = None, None
            self._parts = bytearray()
        return pos + take


def check_upgrade(request: Request) -> str:
    """Validate a WebSocket opening handshake; return the Sec-WebSocket-Accept value."""
    if request.method != "GET":
        raise HandshakeError(405, "WebSocket upgrades use GET", (("Allow", "GET"),))
    if request.version != "HTTP/1.1":
        raise HandshakeError(400, "WebSocket upgrades need HTTP/1.1")
    if "host" not in request.headers:
        raise HandshakeError(400, "missing Host header")
    if "websocket" not in request.header_tokens("upgrade") or \
            "upgrade" not in request.header_tokens("connection"):
        raise HandshakeError(426, "this endpoint speaks WebSocket only",
                             (("Upgrade", "websocket"), ("Connection", "Upgrade")))
    if request.headers.get("sec-websocket-version") != "13":
        raise HandshakeError(426, "only WebSocket version 13 is supported",
                             (("Sec-WebSocket-Version", "13"),))
    key = request.headers.get("sec-websocket-key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        raise HandshakeError(400, "Sec-WebSocket-Key must be 16 bytes in base64") from None
    return accept_key(key)


def upgrade_response(accept: str) -> bytes:
    """The 101 answer that completes a server handshake."""
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n")


def client_handshake_request(host: str, resource: str, key: str, origin: str | None = None) -> bytes:
    """The opening handshake a client sends for resource (path and query) on host."""
    lines = [f"GET {resource} HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if origin:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_handshake_response(buf: bytes, key: str) -> int | None:
    """None until the response head is complete; then its length in bytes.

    Raises HandshakeError for any answer but a valid 101.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 65536:
            raise HandshakeError(0, "response head too large")
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    status_parts = lines[0].split(" ", 2)
    try:
        status = int(status_parts[1])
    except (IndexError, ValueError):
        raise HandshakeError(0, "malformed status line") from None
    if status != 101:
        raise HandshakeError(status, status_parts[2] if len(status_parts) > 2 else "")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    # RFC 6455 4.1: fail unless the server upgraded to WebSocket and confirmed our key.
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if headers.get("upgrade", "").lower() != "websocket" or "upgrade" not in connection:
        raise HandshakeError(101, "no Upgrade: websocket and Connection: Upgrade")
    if headers.get("sec-websocket-accept") != accept_key(key):
        raise HandshakeError(101, "wrong Sec-WebSocket-Accept")
    # We ask for no extension or subprotocol: one in the answer would change the framing.
    if "sec-websocket-extensions" in headers or "sec-websocket-protocol" in headers:
        raise HandshakeError(101, "an extension or subprotocol that was not asked for")
    return end + 4


# ---------------------------------------------------------------------------
# 2. HTTP: request heads, the routes, static files, what a chat upgrade may carry
# ---------------------------------------------------------------------------

class Request:
    """A parsed HTTP/1.1 request head."""

    __slots__ = ("headers", "method", "path", "query", "target", "version")

    def __init__(self, method: str, target: str, version: str, headers: dict):
        self.method, self.target, self.version, self.headers = method, target, version, headers
        # origin-form (RFC 9112 3.2.1) is path ["?" query]: urlsplit would read "//x"
        # as a host, and raise ValueError on "//[".
        self.path, _, query = target.partition("?")
        self.query = parse_qs(query, keep_blank_values=True)

    def header_tokens(self, name: str) -> set:
        """The comma-separated, case-insensitive tokens of a header."""
        return {t.strip().lower() for t in self.headers.get(name, "").split(",")}


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")      # used with fullmatch
_TARGET = re.compile(r"/[\x21-\x7e]*")                      # origin-form, visible ASCII
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")                # visible ASCII, spaces and tabs
# Headers that name one thing: two of them (merged by a proxy or smuggled past
# one) would be read differently by different parties, so they are refused.
SINGLE_HEADERS = frozenset(("host", "origin", "sec-websocket-key", "sec-websocket-version",
                            "content-length"))


def parse_request_head(head: bytes) -> Request:
    """Parse a request head (without the blank line); HandshakeError(400) if malformed."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise HandshakeError(400, "request head is not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise HandshakeError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HandshakeError(400, "unsupported HTTP version")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise HandshakeError(400, "malformed header line")
        name = name.lower()
        value = value.strip(" \t")
        if name in headers:
            if name in SINGLE_HEADERS:
                raise HandshakeError(400, f"more than one {name} header")
            value = f"{headers[name]}, {value}"
        headers[name] = value
    return Request(method, target, version, headers)


def take_request_head(buf: bytes, limit: int) -> tuple[bytes, bytes] | None:
    """(the request head, the bytes after its blank line) once buf holds it all, None until then;
    HandshakeError(431) as soon as the head is longer than limit bytes."""
    end = buf.find(b"\r\n\r\n")
    if end > limit or (end < 0 and len(buf) > limit):
        raise HandshakeError(431, "request head too large")
    return None if end < 0 else (buf[:end], buf[end + 4:])


HTTP_REASONS = {101: "Switching Protocols", 200: "OK", 400: "Bad Request", 403: "Forbidden",
                404: "Not Found", 405: "Method Not Allowed", 426: "Upgrade Required",
                431: "Request Header Fields Too Large", 500: "Internal Server Error",
                503: "Service Unavailable"}
HTTP_STATUSES = tuple(str(status) for status in HTTP_REASONS)      # every status the server answers


def http_response(status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8",
                  headers: tuple = (), head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    lines = [f"HTTP/1.1 {status} {HTTP_REASONS.get(status, 'Error')}",
             f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
             "Connection: close", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body)


STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml",
                ".json": "application/json", ".png": "image/png", ".ico": "image/x-icon",
                ".txt": "text/plain; charset=utf-8"}
PAGE_HEADERS = (("Content-Security-Policy",
                 ("default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
                 "style-src 'self'; script-src 'self'; frame-ancestors 'none'")),
                ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
                ("Cache-Control", "no-cache"))


def load_static(directory: str) -> dict:
    """Map '/static/<rel>' to (content type, bytes) for regular files under directory.

    Built once at start: a request can only name a key of this map, so no path
    (encoded '..', absolute, NUL, symlink) can ever reach outside the folder.
    """
    files = {}
    if not os.path.isdir(directory):
        return files
    for root, dirs, names in os.walk(directory, followlinks=False):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
        for name in names:
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            rel = os.path.relpath(path, directory).replace(os.sep, "/")
            ctype = STATIC_TYPES.get(os.path.splitext(name)[1]) or \
                mimetypes.guess_type(name)[0] or "application/octet-stream"
            with open(path, "rb") as f:
                files["/static/" + rel] = (ctype, f.read())
    return files


class Front:
    """What requests are answered from, fixed at start: static files, allowed hosts and origins."""

    __slots__ = ("allow_no_origin", "allowed_hosts", "allowed_origins", "static")

    def __init__(self, static: dict, allowed_hosts: str = "", allowed_origins: str = "",
                 allow_no_origin: bool = True):
        self.static = static                # '/static/<rel>' -> (content type, bytes)
        self.allowed_hosts = {h.strip().lower() for h in allowed_hosts.split(",") if h.strip()}
        self.allowed_origins = {o.strip().rstrip("/").lower() for o in allowed_origins.split(",") if o.strip()}
        self.allow_no_origin = allow_no_origin


ROOM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")          # every pattern that validates: fullmatch
CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")

# A room's order: its seqs count 1, 2, 3, ... within one epoch. An order that
# starts again (the room was forgotten, or its Redis keys expired or were
# evicted) gets a new epoch, so nobody takes its seq 1 for an old seq 1. An
# epoch is 16 hex digits, milliseconds then a counter: a process's epochs only
# grow, and a Redis script keeps a room's new epoch above the one before.
EPOCH = re.compile(r"[0-9a-f]{16}")          # fullmatch

MAX_NAME_CHARS = 32


def valid_name(name: str) -> bool:
    """A display name: 1-32 printable characters, not only spaces."""
    return 0 < len(name) <= MAX_NAME_CHARS and name.isprintable() and not name.isspace()


class Upgrade(NamedTuple):
    """A WebSocket upgrade that passed every check: where to, as whom, from which seq."""

    room: str
    name: str
    since: int | None
    client: str | None
    accept: str
    epoch: bytes | None = None


def server_full() -> HandshakeError:
    """The refusal of a WebSocket when the server holds --max-connections."""
    return HandshakeError(503, "too many connections", (("Retry-After", "1"),))


def route(request: Request, front: Front, draining: bool = False, full: bool = False,
          bus_up: bool = True) -> Upgrade | tuple[int, bytes]:
    """The answer to a request: an Upgrade, or (status, response bytes); HandshakeError if refused.

    ``draining``, ``full`` and ``bus_up`` are the server's state when the request
    arrives: no socket, no clock, so every answer can be tested with bytes.
    """
    path = request.path
    if front.allowed_hosts and path != "/healthz" and \
            request.headers.get("host", "").lower() not in front.allowed_hosts:
        raise HandshakeError(400, "host not allowed", counter=Refused.HOST)    # DNS rebinding
    if path == "/ws" or path.startswith("/ws/"):
        upgrade = check_chat_upgrade(request, front)
        if draining:
            raise HandshakeError(503, "server is draining", (("Retry-After", "1"),), counter=Refused.DRAINING)
        if full:
            raise server_full()
        return upgrade
    if request.method not in ("GET", "HEAD"):
        raise HandshakeError(405, "only GET and HEAD", (("Allow", "GET, HEAD"),))
    head = request.method == "HEAD"
    if path == "/healthz":
        status = 503 if draining else 200
        bus = "up" if bus_up else "down (holding messages)"
        body = f"{'draining' if draining else 'ok'}\nbus: {bus}\n".encode()
        return status, http_response(status, body, head_only=head)
    target = "/static/index.html" if path in ("/", "/index.html") else path
    entry = front.static.get(target)
    if entry is None:
        raise HandshakeError(404, "not found")
    ctype, body = entry
    headers = PAGE_HEADERS if ctype.startswith("text/html") else PAGE_HEADERS[1:]
    return 200, http_response(200, body, ctype, headers, head_only=head)


def check_chat_upgrade(request: Request, front: Front) -> Upgrade:
    """Validate a chat upgrade (/ws[/room]?name=&since=&epoch=&client=): each field once, where it enters."""
    room = "lobby" if request.path == "/ws" else request.path[4:]
    if not ROOM_NAME.fullmatch(room):
        raise HandshakeError(400, "room must be 1-64 characters of A-Z a-z 0-9 _ . -")
    accept = check_upgrade(request)
    name = request.query.get("name", [""])[-1]
    if name and not valid_name(name):
        raise HandshakeError(400, "name must be 1-32 printable characters")
    since = request.query.get("since", [None])[-1]
    if since is not None:
        if not (since.isascii() and since.isdigit()) or len(since) > 19:
            raise HandshakeError(400, "since must be a non-negative integer")
        since = int(since)
    epoch = request.query.get("epoch", [None])[-1]
    if epoch is not None:
        if EPOCH.fullmatch(epoch) is None:
            raise HandshakeError(400, "epoch must be 16 hex digits, as the server sent it")
        epoch = epoch.encode()
    client = request.query.get("client", [None])[-1]
    if client is not None and CLIENT_ID.fullmatch(client) is None:
        raise HandshakeError(400, "client must be 16-64 characters of A-Z a-z 0-9 _ -")
    if not origin_allowed(request, front):
        raise HandshakeError(403, "origin not allowed")
    return Upgrade(room, name, since, client, accept, epoch)


def origin_allowed(request: Request, front: Front) -> bool:
    """Whether a browser page from the request's Origin may open a WebSocket here.

    Default: the server's own host, whatever the scheme; ``--allowed-origins``
    adds others ('*' for any); a request without Origin (not a browser) passes
    unless ``--allow-no-origin`` is off.
    """
    origin = request.headers.get("origin")
    if origin is None:
        return front.allow_no_origin
    origin = origin.rstrip("/").lower()
    if "*" in front.allowed_origins or origin in front.allowed_origins:
        return True
    host = request.headers.get("host", "").lower()
    return origin in (f"http://{host}", f"https://{host}")


# ---------------------------------------------------------------------------
# 3. Chat core: messages, history, rooms, the order of each room
# ---------------------------------------------------------------------------

SENT_AT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
                     r"([Zz]|[+-][0-9]{2}:[0-9]{2})")          # RFC 3339 date-time

# A text of N UTF-8 bytes takes at most 6N bytes once JSON-escaped (\u00XX);
# frames larger than that plus this envelope can only hold a too-long text.
JSON_ENVELOPE_BYTES = 1024
# What history costs in memory beyond the bytes of its frames and keys (CPython
# 3.11, 64-bit): an entry's tuple, list slot, bytes headers, seq int and index
# slot; a room's objects while it holds history. --history-bytes counts these,
# so it bounds what the memory really is (test_scalechat.py measures both).
HISTORY_ENTRY_COST = 240
ROOM_COST = 2048


def max_frame_size(max_message_size: int) -> int:
    """The largest client frame that could still hold a text of max_message_size bytes."""
    return 6 * max_message_size + JSON_ENVELOPE_BYTES


class ErrorCode(StrEnum):
    """The code of an `error` frame (docs/protocol.md): what kind of frame was refused."""

    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    MISSING_TEXT = "missing_text"
    TOO_BIG = "too_big"
    RATE_LIMIT = "rate_limit"
    UNAVAILABLE = "unavailable"             # the message bus is down: send it again later


class ChatError(Exception):
    """A client frame was refused: answered with an ``error`` frame."""

    def __init__(self, code: str, reason: str, message_id=None):
        super().__init__(reason)
        self.code, self.reason, self.message_id = code, reason, message_id


def parse_chat_message(payload: bytes, max_message_size: int) -> tuple:
    """(message_id, text, sent_at, resend) from a client's JSON frame; ChatError if refused.

    Each field is checked here, once, for every later use: the JSON it is
    encoded into again (no lone surrogate, no control character in sent_at),
    the resend index (a 64-bit message_id), the frame (the text's size).
    """
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        raise ChatError(ErrorCode.BAD_JSON, "frame is not valid JSON") from None
    if type(obj) is not dict:
        raise ChatError(ErrorCode.BAD_MESSAGE, "frame must be a JSON object")
    message_id = obj.get("message_id")
    if message_id is not None and (type(message_id) is not int or abs(message_id) >= 1 << 63):
        raise ChatError(ErrorCode.BAD_MESSAGE, "message_id must be a 64-bit integer")
    text = obj.get("text")
    if type(text) is not str or not text:
        raise ChatError(ErrorCode.MISSING_TEXT, "text must be a non-empty string", message_id)
    try:
        size = len(text.encode())
    except UnicodeEncodeError:      # a lone surrogate from a JSON \ud800 escape
        raise ChatError(ErrorCode.BAD_MESSAGE, "text must be valid Unicode", message_id) from None
    if size > max_message_size:
        raise ChatError(ErrorCode.TOO_BIG, f"text longer than {max_message_size} bytes", message_id)
    sent_at = obj.get("sent_at")
    if sent_at is not None and (type(sent_at) is not str or SENT_AT.fullmatch(sent_at) is None):
        raise ChatError(ErrorCode.BAD_MESSAGE, "sent_at must be an RFC 3339 date-time", message_id)
    return message_id, text, sent_at, obj.get("resend") is True


def encode_json_frame(obj: dict) -> bytes:
    """One server text frame holding obj as compact JSON."""
    return encode_frame(OP_TEXT, json.dumps(obj, separators=(",", ":")).encode())


def error_frame(code: str, reason: str, message_id=None, retry_after: float | None = None) -> bytes:
    """An ``error`` frame for a refused client frame; retry_after: seconds until it would pass."""
    obj = {"type": "error", "code": code, "reason": reason}
    if message_id is not None:
        obj["message_id"] = message_id
    if retry_after is not None:
        obj["retry_after"] = retry_after
    return encode_json_frame(obj)


def ack_frame(message_id: int, epoch: bytes, seq: int, duplicate: bool = False) -> bytes:
    """An ``ack`` frame: the sender's message_id was sequenced as seq of the room's order epoch
    (or already had been)."""
    return encode_frame(OP_TEXT, b'{"type":"ack","message_id":%d,"epoch":"%s","seq":%d%s}'
                        % (message_id, epoch, seq, b',"duplicate":true' if duplicate else b""))


_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode   # skips dumps()'s checks


def message_parts(room: str, sender: str, message_id, text: str, sent_at) -> tuple[bytes, bytes]:
    """A ``message`` frame's JSON split where the sequencer puts the room's order and seq:
    ``prefix + order_field(epoch) + b"17" + suffix``.

    The sequencer (this process, the supervisor or a Redis script) splices them
    in, so the JSON is encoded once, wherever the seq is assigned.
    """
    rest = _encode_json({"sender": sender, "message_id": message_id, "text": text, "sent_at": sent_at})
    return (b'{"type":"message","room":"' + room.encode() + b'",',   # room: [A-Za-z0-9_.-]
            b"," + rest[1:].encode())


def order_field(epoch: bytes) -> bytes:
    """What goes between a message's prefix and its seq: the epoch of the order the seq counts in.
    (PUBLISH_SCRIPT writes the same bytes in Lua.)"""
    return b'"epoch":"%s","seq":' % epoch


_last_epoch = [0, 0]                          # [milliseconds, counter] of this process's newest epoch


def new_epoch() -> bytes:
    """A fresh epoch, greater than every epoch this process made before."""
    ms = time.time_ns() // 1_000_000
    last = _last_epoch
    if ms > last[0]:
        last[0], last[1] = ms, 0
    else:
        last[1] += 1
        if last[1] > 0xFFFFF:
            last[0], last[1] = last[0] + 1, 0
    return b"%011x%05x" % (last[0], last[1])


def resend_key(client: bytes, message_id) -> bytes:
    """What names a message for the resend check: the sender's client id and message_id.

    The client id is a secret of the sending client (``client=`` on connect)
    that the server never broadcasts, so nobody else can claim a message_id in
    its name; without one, or without a message_id, a message has no key.
    """
    return b"%s:%d" % (client, message_id) if client and message_id is not None else b""


class History:
    """A room's recent messages, oldest first, bounded in count and in bytes.

    Entries are ``(seq, item, key)`` in a list read from ``head`` on: dropping
    the oldest moves the offset, and the list is compacted only when half of
    it is dead, so finding where a replay starts is a bisection. ``index``
    maps the resend key of every held message to its seq: a resend is checked
    in O(1), and the index shrinks with the history. ``cost`` is what the
    entries take in memory (HISTORY_ENTRY_COST each beyond their bytes).
    """

    __slots__ = ("cost", "entries", "head", "index", "max_bytes", "max_count")

    def __init__(self, max_count: int, max_bytes: int):
        self.max_count, self.max_bytes = max_count, max_bytes
        self.entries: list = []
        self.head = 0
        self.index: dict = {}
        self.cost = 0

    def __len__(self) -> int:
        return len(self.entries) - self.head

    def oldest_seq(self) -> int:
        """The seq of the oldest entry (the history must not be empty)."""
        return self.entries[self.head][0]

    def append(self, seq: int, item: bytes, key: bytes = b"") -> int:
        """Add the newest message, drop the oldest past the bounds; the change in cost."""
        entries = self.entries
        entries.append((seq, item, key))
        added = len(item) + len(key) + HISTORY_ENTRY_COST
        self.cost += added
        if key:
            self.index[key] = seq
        held = len(entries) - self.head
        while held > self.max_count or (self.cost > self.max_bytes and held > 1):
            added -= self.popleft()
            held -= 1
        return added

    def popleft(self) -> int:
        """Drop the oldest message; the cost freed."""
        entries, head = self.entries, self.head
        seq, item, key = entries[head]
        entries[head] = None
        self.head = head = head + 1
        if key and self.index.get(key) == seq:
            del self.index[key]
        if head > 64 and 2 * head > len(entries):
            del entries[:head]
            self.head = 0
        freed = len(item) + len(key) + HISTORY_ENTRY_COST
        self.cost -= freed
        return freed

    def seq_of(self, key: bytes) -> int | None:
        """The seq of the held message with this resend key, if any."""
        return self.index.get(key) if key else None

    def after(self, since: int, budget: int) -> tuple[list, int]:
        """(items with seq > since, oldest first, about budget bytes of them; the last seq taken)."""
        entries = self.entries
        i = bisect.bisect_right(entries, since, lo=self.head, key=_entry_seq)
        items, size, last = [], 0, since
        while i < len(entries) and size < budget:
            last, item, _ = entries[i]
            items.append(item)
            size += len(item)
            i += 1
        return items, last

    def items(self) -> list:
        """Every (seq, item), oldest first."""
        return [e[:2] for e in self.entries[self.head:]]

    def items_and_keys(self) -> list:
        """Every (item, resend key), oldest first."""
        return [e[1:] for e in self.entries[self.head:]]


def _entry_seq(entry: tuple) -> int:
    return entry[0]


class HistoryBudget:
    """--history-bytes over every room of a process: the least recently active lose history first.

    Anyone can open rooms and fill their history, so only a budget across rooms
    bounds the memory. A room costs ROOM_COST while it holds history, on top of
    its entries; ``forget(room)`` hears of a room whose history ran out, so the
    owner can drop it if nobody needs it (its seq then starts again at 1).
    """

    def __init__(self, limit: int, forget):
        self.limit, self.forget = limit, forget
        self.used = 0
        self.by_activity: dict = {}         # name -> room holding history, least recently active first

    def added(self, room, delta: int) -> None:
        """room's history grew by delta (a message was added): it is now the most recently active."""
        by_activity = self.by_activity
        if by_activity.pop(room.name, None) is None:
            self.used += ROOM_COST
        by_activity[room.name] = room
        self.used += delta
        if self.used > self.limit:
            self._trim()

    def _trim(self) -> None:
        by_activity = self.by_activity
        while self.used > self.limit and by_activity:
            name, room = next(iter(by_activity.items()))
            self.used -= room.history.popleft()
            if not room.history:
                del by_activity[name]
                self.used -= ROOM_COST
                self.forget(room)

    def removed(self, room) -> None:
        """room is dropped with its history."""
        if self.by_activity.pop(room.name, None) is not None:
            self.used -= room.history.cost + ROOM_COST


class Sequenced:
    """A room as its sequencer sees it: its name, its order (epoch, last seq) and its history.

    The one sequencer of LocalBus (a Room) and of the --workers supervisor (a
    HubRoom); the Redis bus runs the same steps in its Lua script. A room's
    order starts with an epoch; ``b""`` until it is known (a remote room not
    yet synced, or a room Redis has no order for yet).
    """

    __slots__ = ("epoch", "history", "name", "order", "seq")

    def __init__(self, name: str, config, epoch: bytes = b""):
        self.name = name
        self.history = History(config.history, config.room_history_bytes)
        self.restart(epoch)

    def restart(self, epoch: bytes) -> None:
        """Begin the order epoch, at seq 0 (the caller empties history)."""
        self.epoch, self.order, self.seq = epoch, order_field(epoch), 0

    def sequence(self, prefix: bytes, suffix: bytes, key: bytes, resend: bool) -> tuple[int, bytes | None]:
        """(the next seq, the payload with the order and it between prefix and suffix) for a published
        message, or (the seq it already has, None) for a resend of a message still held."""
        seen = self.history.seq_of(key) if resend else None
        if seen is not None:
            return seen, None
        seq = self.seq + 1
        return seq, prefix + self.order + str(seq).encode() + suffix

    def keep(self, budget: HistoryBudget, seq: int, item: bytes, key: bytes = b"") -> None:
        """seq is now the room's last: keep item in history, within the process's budget."""
        self.seq = seq
        budget.added(self, self.history.append(seq, item, key))


class Room(Sequenced):
    """A room on this process: members, the last seq delivered here, recent history.

    With a remote bus a room is not ``ready`` until the bus has sent its
    snapshot (epoch, seq and history); joiners wait in ``waiting`` meanwhile, and
    messages that arrive while ``syncing`` wait in ``early``. A member that
    resumes with ``since`` is ``catching_up`` until its replay reaches the
    room's seq, and only then joins ``members`` (who get live frames).
    """

    __slots__ = ("catching_up", "early", "idle_since", "leased", "members", "others", "others_version", "ready",
                 "reported", "syncing", "waiting")

    def __init__(self, name: str, config, ready: bool, epoch: bytes = b""):
        super().__init__(name, config, epoch)   # history items: frames
        self.members: dict = {}             # Connection -> None: ordered, O(1) removal
        self.catching_up: dict = {}         # Connection -> None: replaying history
        self.others = 0                     # members on other processes, as the bus last said
        self.others_version = 0             # the version of the total that said it (Redis numbers them)
        self.reported = 0                   # members here, as last told to the bus
        self.ready = ready
        self.syncing = False
        self.early: list = []               # (epoch, seq, frame, t0) held while syncing, as they came
        self.waiting: list = []             # (conn, since, epoch) held until ready
        self.idle_since = 0.0               # when its last member here left (a lingering room)
        self.leased = False                 # --workers: this worker sequences it (HubBus)

    def oldest_seq(self) -> int:
        """The seq of the oldest message still held (seq + 1 when none is)."""
        return self.history.oldest_seq() if self.history else self.seq + 1

    def in_use(self) -> bool:
        """Whether any connection here is in the room (live, catching up or waiting)."""
        return bool(self.members or self.catching_up or self.waiting)

    def local_count(self) -> int:
        """Members on this process, those catching up included."""
        return len(self.members) + len(self.catching_up)

    def held_here(self) -> int:
        """Connections in the room on this process, those waiting for its snapshot included."""
        return self.local_count() + len(self.waiting)

    def member_count(self) -> int:
        """Members everywhere: here, and on the other processes the bus counts."""
        return len(self.members) + len(self.catching_up) + self.others


# A remote room nobody here is in any more stays followed for --room-linger
# seconds, so members that come back (a reload, a reconnect storm, a client
# joining and leaving in a loop) find it ready, without asking the bus for a
# snapshot again; at most this many such rooms per process, the oldest dropped first.
LINGER_ROOMS = 1024


class LocalBus:
    """Sequences and delivers a room's messages inside one process: its rooms are its own."""

    up = True

    def __init__(self, chat: Chat):
        self.chat = chat

    def new_room(self, name: str) -> Room:
        """A room this process sequences: ready at once, in a new order."""
        return Room(name, self.chat.config, True, new_epoch())

    def publish(self, room: Room, prefix: bytes, suffix: bytes, t0: float, conn, message_id,
                key: bytes = b"", resend: bool = False):
        """Assign the room's next seq, deliver the message to every member, ack it to its sender."""
        seq, payload = room.sequence(prefix, suffix, key, resend)
        if payload is not None:
            self.chat.deliver(room, seq, encode_frame(OP_TEXT, payload), t0, key)
        if message_id is not None:
            self.chat.send(conn, ack_frame(message_id, room.epoch, seq, payload is None))

    def room_opened(self, room: Room) -> None:
        """The first local member joined room."""

    def room_unused(self, room: Room, now: float) -> None:
        """Nobody is in room any more: it is kept while it holds history (its order lives here)."""
        if not room.history:
            self.chat.close(room)

    def room_closed(self, room: Room) -> None:
        """room is forgotten."""

    def resync(self, room: Room) -> None:
        """Never needed: nothing is lost inside one process."""

    def report_members(self, room: Room, count: int) -> None:
        """Never needed: every member is here."""

    def sequenced_rooms(self) -> int:
        """Rooms whose order this process keeps: all of its rooms."""
        return len(self.chat.rooms)


class Bus(Protocol):
    """How a room's messages are sequenced and reach every member: LocalBus in this process,
    HubBus through the --workers supervisor (section 6), RedisBus through Redis (section 7)."""

    up: bool                                # the sequencer is reachable

    def publish(self, room: Room, prefix: bytes, suffix: bytes, t0: float, conn, message_id,
                key: bytes = b"", resend: bool = False) -> bytes | None:
        """Sequence a client's message (its JSON around the order and seq); an error frame if refused."""

    def new_room(self, name: str) -> Room:
        """A room for this process: ready at once, or once its snapshot came (Chat.on_snapshot)."""

    def room_opened(self, room: Room) -> None:
        """Someone here joined a room nobody here was in."""

    def room_unused(self, room: Room, now: float) -> None:
        """Nobody here is in room any more: keep it, or Chat.linger or Chat.close it."""

    def room_closed(self, room: Room) -> None:
        """room is forgotten here: stop sending it."""

    def resync(self, room: Room) -> None:
        """A gap in room's order: catch up (with Chat.on_snapshot)."""

    def report_members(self, room: Room, count: int) -> None:
        """This process has count members of room now."""

    def sequenced_rooms(self) -> int:
        """How many rooms' orders this process keeps."""


class Outbox(Protocol):
    """Where the chat queues frames for connections (the server writes them out)."""

    def send(self, conn, data: bytes) -> None:
        """Queue data for one connection."""

    def broadcast(self, members, frame: bytes) -> None:
        """Queue the same frame for every member (the hot path)."""


class Chat:
    """Rooms and their members on this process; knows nothing of sockets: it queues frames in an
    Outbox and hands messages to a Bus (LocalBus until the server gives it another)."""

    def __init__(self, config, stats: Stats, outbox: Outbox):
        self.config = config
        self.stats = stats
        self.outbox = outbox
        self.send = outbox.send
        self.rooms: dict[str, Room] = {}
        self.bus = LocalBus(self)
        self.guest_counter = 0
        self.budget = HistoryBudget(config.history_bytes, self._forget_if_unused)
        # Rooms whose member count moved since the last member_count_frames(): only
        # they are visited, so idle rooms cost nothing however many there are.
        self.recount: dict[Room, None] = {}
        self.lingering: dict[str, Room] = {}    # remote rooms nobody here is in, the longest idle first
        # What every connection is held to (Connection's token buckets), told in each welcome so
        # that a client can pace what it sends within it and is never refused (docs/protocol.md).
        self.limits = {"rate": config.rate_limit, "burst": config.rate_burst, "rate_bytes": config.rate_limit_bytes,
                       "burst_bytes": config.rate_burst_bytes, "max_message_size": config.max_message_size}

    def assign_name(self, requested: str | None) -> str:
        """The requested name, or a fresh ``guest-<n>``."""
        if requested:
            return requested
        self.guest_counter += 1
        return f"guest-{self.guest_counter}"

    def join(self, conn, room_name: str, since: int | None, epoch: bytes | None = None) -> None:
        """Put conn in a room: welcome and replay now, or once the bus has the room.

        since counts in the order epoch; in another order (the room's started
        again meanwhile) it means nothing, and the replay starts at the oldest held.
        """
        room = self.rooms.get(room_name)
        if room is None:
            room = self.rooms[room_name] = self.bus.new_room(room_name)
        opened = not room.in_use() and self.lingering.pop(room_name, None) is None
        conn.room = room
        if room.ready:
            self._admit(conn, room, since, epoch)
        else:
            room.waiting.append((conn, since, epoch))
        if opened:
            self.bus.room_opened(room)

    def _admit(self, conn, room: Room, since: int | None, epoch: bytes | None) -> None:
        history = room.history
        if since is not None and epoch is not None and epoch != room.epoch:
            since = 0
        if since is not None and history and since < room.seq:
            conn.replay = max(since + 1, history.oldest_seq())
            room.catching_up[conn] = None
        else:
            room.members[conn] = None
        self.recount[room] = None
        self.send(conn, encode_json_frame({"type": "welcome", "room": room.name, "name": conn.name,
                                           "epoch": room.epoch.decode(), "seq": room.seq,
                                           "members": room.member_count(), "oldest": room.oldest_seq(),
                                           "limits": self.limits}))

    def replay(self, conn, budget: int) -> list | None:
        """The next frames of conn's replay, about budget bytes; None if history dropped them.

        Replays are produced as the socket drains, never all at once: live
        messages land in history, so the replay reaches them too, and conn
        turns live once it has caught up, with one order and no gap.
        """
        room = conn.room
        history = room.history
        if conn.replay <= room.seq and (not history or history.oldest_seq() > conn.replay):
            return None                     # trimmed while this reader was slow: a gap
        frames, last = history.after(conn.replay - 1, budget)
        if frames:
            conn.replay = last + 1
        if not frames or conn.replay > room.seq:
            del room.catching_up[conn]
            room.members[conn] = None
            conn.replay = None
        return frames

    def leave(self, conn, now: float = 0.0) -> None:
        """Take conn out of its room; the bus says what becomes of a room nobody here is in."""
        room = conn.room
        if room is None:
            return
        conn.room = conn.replay = None
        if room.members.pop(conn, 0) is not None and room.catching_up.pop(conn, 0) is not None:
            room.waiting = [w for w in room.waiting if w[0] is not conn]
        self.recount[room] = None
        if not room.in_use():
            self.bus.room_unused(room, now)

    def linger(self, room: Room, now: float) -> None:
        """Keep following a remote room nobody here is in, for --room-linger seconds (0: close it)."""
        if self.config.room_linger <= 0:
            self.close(room)
            return
        room.idle_since = now
        self.lingering[room.name] = room
        if len(self.lingering) > LINGER_ROOMS:
            self.close(next(iter(self.lingering.values())))

    def close_idle(self, now: float) -> None:
        """Stop following the remote rooms that lingered --room-linger seconds with nobody here."""
        limit = now - self.config.room_linger
        lingering = self.lingering
        while lingering and (room := next(iter(lingering.values()))).idle_since <= limit:
            self.close(room)

    def active_rooms(self) -> int:
        """Rooms here that someone is in (or, in one process, that hold history)."""
        return len(self.rooms) - len(self.lingering)

    def close(self, room: Room) -> None:
        """Forget a room nobody here needs (the bus stops sending it)."""
        self.lingering.pop(room.name, None)
        self.bus.room_closed(room)
        self.budget.removed(room)
        del self.rooms[room.name]

    def _forget_if_unused(self, room: Room) -> None:
        """The history budget took room's last message: forget it unless someone is in it."""
        if not room.in_use():
            self.close(room)

    def receive(self, conn, payload: bytes, t0: float) -> bytes | None:
        """Handle a client text frame; an error frame for the sender if refused."""
        try:
            message_id, text, sent_at, resend = parse_chat_message(payload, self.config.max_message_size)
        except ChatError as e:
            self.stats.refused[Refused.TOO_BIG if e.code == ErrorCode.TOO_BIG else Refused.BAD_MESSAGE] += 1
            return error_frame(e.code, e.reason, e.message_id)
        self.stats.messages_in += 1
        prefix, suffix = message_parts(conn.room.name, conn.name, message_id, text, sent_at)
        return self.bus.publish(conn.room, prefix, suffix, t0, conn, message_id,
                                resend_key(conn.client, message_id), resend)

    def deliver(self, room: Room, seq: int, frame: bytes, t0: float | None, key: bytes = b"") -> None:
        """Record a sequenced frame in history and queue it for every member (the hot path)."""
        room.keep(self.budget, seq, frame, key)
        members = room.members
        if members:
            self.outbox.broadcast(members, frame)
            self.stats.deliveries += len(members)
        if t0 is not None:
            self.stats.broadcast.observe(time.monotonic() - t0)

    def on_bus_message(self, room_name: str, epoch: bytes, seq: int, payload: bytes, t0: float | None) -> None:
        """A sequenced message from a remote bus: deliver in order, once.

        A room's messages reach this process in the order the sequencer gave
        them, so a message of another epoch than the room's begins a new order:
        it is never taken for a duplicate of the old order's seq.
        """
        room = self.rooms.get(room_name)
        if room is None:
            return                          # unsubscribed meanwhile
        frame = encode_frame(OP_TEXT, payload)
        if room.syncing or not room.ready:
            room.early.append((epoch, seq, frame, t0))
            return
        if epoch != room.epoch:
            self._new_order(room, epoch)
        if seq == room.seq + 1:
            self.deliver(room, seq, frame, t0)
        elif seq > room.seq + 1:            # a gap: hold it and catch up from history
            room.early.append((epoch, seq, frame, t0))
            self.bus.resync(room)
        # seq <= room.seq: a duplicate, already delivered

    def _new_order(self, room: Room, epoch: bytes) -> None:
        """The room's order started again at the sequencer (its state there was lost): follow it.

        The old order's history means nothing in the new one; a member still
        replaying it goes on with the new order's messages from the first.
        """
        if room.seq:
            log.warning("room %s: a new order began (epoch %s) after seq %d of the old one",
                        room.name, epoch.decode(), room.seq)
        self.budget.removed(room)
        room.history = History(self.config.history, self.config.room_history_bytes)
        room.restart(epoch)
        for conn in room.catching_up:
            conn.replay = 1

    def on_members(self, room_name: str, total: int, version: int | None = None) -> None:
        """The bus counted total members in a room, over every process (this one as last reported).

        version orders the totals (Redis numbers each new one): a total comes both in the answer
        to this process's report and on the room's channel, on two links, so an older one can
        arrive after a newer one, and is then ignored. Without a version (the supervisor's one
        link keeps them in order), each total is the latest."""
        room = self.rooms.get(room_name)
        if room is None:
            return
        if version is not None:
            if version <= room.others_version:
                return
            room.others_version = version
        if (others := max(0, total - room.reported)) != room.others:
            room.others = others
            self.recount[room] = None

    def on_snapshot(self, room_name: str, epoch: bytes, seq: int, payloads: list,
                    members: int | None = None, keys: list | None = None,
                    members_version: int | None = None) -> None:
        """The bus's view of a room: its order (epoch, seq), its last messages (ending at seq), its members.

        Messages that came while the snapshot was on its way (``early``) are
        merged in the order they came: those of the room's order that precede
        the snapshot's first, then the snapshot, then the rest. A message of an
        order older than the snapshot's was published before it and is dropped;
        one of a newer order begins it.
        """
        room = self.rooms.get(room_name)
        if room is None:
            return
        if members is not None:
            self.on_members(room_name, members, members_version)
        early, room.early = room.early, []
        first = seq - len(payloads) + 1
        if not room.ready:
            room.restart(epoch)
            keys = keys or [b""] * len(payloads)
            delta = sum(room.history.append(first + i, encode_frame(OP_TEXT, p), k)
                        for i, (p, k) in enumerate(zip(payloads, keys)))
            if room.history:
                self.budget.added(room, delta)
            room.seq = seq
            room.ready = True
            waiting, room.waiting = room.waiting, []
            for conn, since, conn_epoch in waiting:
                self._admit(conn, room, since, conn_epoch)
        else:                               # catching up: deliver what members missed
            if epoch != room.epoch:
                done = 0
                for e, s, frame, t0 in early:
                    if e != room.epoch:
                        break
                    done += 1
                    if s > room.seq:
                        self.deliver(room, s, frame, t0)
                del early[:done]
                self._new_order(room, epoch)
            for i, p in enumerate(payloads):
                if first + i > room.seq:
                    self.deliver(room, first + i, encode_frame(OP_TEXT, p), None)
            if seq > room.seq:              # older than the history still held: lost for good
                log.warning("room %s: messages %d-%d are no longer in history", room.name,
                            room.seq + 1, first - 1)
                room.seq = seq
        room.syncing = False
        for e, s, frame, t0 in early:
            if e != room.epoch:
                if e < room.epoch:
                    continue                # of an order the snapshot's replaced
                if not room.early:
                    self._new_order(room, e)
            if room.early or s > room.seq + 1:
                room.early.append((e, s, frame, t0))
            elif s == room.seq + 1:
                self.deliver(room, s, frame, t0)
        if room.early:
            self.bus.resync(room)

    def member_count_frames(self):
        """(room, frame) for each room whose member count changed since the last call.

        Called once a second: a room's changes here reach the bus at most that
        often (it sums every process's count), and its members hear of any
        change, here or elsewhere, at most that often. Only rooms that changed
        are visited.
        """
        bus, rooms = self.bus, self.rooms
        changed, self.recount = self.recount, {}
        for room in changed:
            if rooms.get(room.name) is not room:
                continue                    # forgotten meanwhile: the bus heard of it then
            if room.reported != (n := room.local_count()):
                room.reported = n
                bus.report_members(room, n)
            if room.members:
                yield room, encode_json_frame({"type": "members", "room": room.name,
                                               "count": room.member_count()})

    def send_member_counts(self, now: float) -> None:
        """Once a second: each room whose member count moved tells its members; the rooms that
        lingered long enough with nobody here are let go."""
        for room, frame in self.member_count_frames():
            self.outbox.broadcast(room.members, frame)
        if self.lingering:
            self.close_idle(now)


# ---------------------------------------------------------------------------
# 4. Connection, sans-IO: states, rate limits, strikes, pings, deadlines
# ---------------------------------------------------------------------------

# A connection's states. It moves only forward, and only as CLOSING lists.
HTTP, OPEN, CLOSE_SENT, FLUSHING, REFUSING, LINGERING, CLOSED = range(7)
STATE_NAMES = ("HTTP", "OPEN", "CLOSE_SENT", "FLUSHING", "REFUSING", "LINGERING", "CLOSED")

# What moves a connection.
ANSWERED = "answered"       # an HTTP answer queued: the connection closes once it is sent
REFUSED = "refused"         # an HTTP refusal queued: the client may still be sending
UPGRADED = "upgraded"       # a WebSocket now
CLOSE = "close"             # the server starts the closing handshake (1001 when draining)
PEER_CLOSE = "peer close"   # the peer's Close frame came
TOO_SLOW = "too slow"       # its queue passed --max-buffer: 1013, the queue dropped
FAIL = "fail"               # a protocol error, the rate limit, a bug (RFC 6455 7.1.7)
SENT = "sent"               # everything queued went out
ABORT = "abort"             # EOF, a socket error, a deadline, a hand-off: closed now

# Every move a connection can make; any other (state, event) is a bug and raises.
#
# In CLOSE_SENT the peer's frames are still parsed, to find its Close (RFC 6455
# 7.1.2). REFUSING and LINGERING drop what the peer still sends (up to
# MAX_DISCARD) but read it: closing a socket with unread input makes the kernel
# send RST, and the peer's kernel then drops the answer unread. HTTP has the
# handshake deadline (--handshake-timeout), every closing state the close
# deadline (--close-timeout).
CLOSING = {
    (HTTP, ANSWERED): FLUSHING,         # a page, /healthz, a 500
    (HTTP, REFUSED): REFUSING,          # 4xx, 503
    (HTTP, UPGRADED): OPEN,
    (OPEN, CLOSE): CLOSE_SENT,          # draining: 1001
    (OPEN, PEER_CLOSE): FLUSHING,       # its Close echoed
    (OPEN, TOO_SLOW): FLUSHING,         # 1013
    (OPEN, FAIL): REFUSING,             # 1002, 1003, 1007, 1008, 1009, 1011
    (CLOSE_SENT, PEER_CLOSE): CLOSED,
    (FLUSHING, PEER_CLOSE): CLOSED,     # while its last frames go out: closed now
    (FLUSHING, SENT): CLOSED,
    (REFUSING, SENT): LINGERING,        # half-closed: shutdown(SHUT_WR)
    **{(state, ABORT): CLOSED for state in (HTTP, OPEN, CLOSE_SENT, FLUSHING, REFUSING, LINGERING)},
}
CLOSING_STATES = (CLOSE_SENT, FLUSHING, REFUSING, LINGERING)

FRAME_TOKEN = 1 / 32          # rate-limit tokens a frame costs that is not a message or ping
MAX_DISCARD = 8 << 20         # bytes read and dropped after a refusal (more than a socket buffer) before closing
MESSAGE_ID = re.compile(rb'"message_id"\s*:\s*(-?\d{1,19})\b')

# What Connection.receive asks of its server, each as (kind, ...).
MESSAGE = "message"           # (MESSAGE, payload): a chat message for the room
SEND = "send"                 # (SEND, bytes): queue these for the peer (a pong)
REFUSE = "refuse"             # (REFUSE, error frame or None): a frame over the rate, refused
CLOSED_BY_PEER = "closed"     # (CLOSED_BY_PEER, payload): the peer's Close frame
FAILED = "failed"             # (FAILED, code, reason): fail the connection with this close code
DROP = "drop"                 # (DROP,): close the socket now (it kept sending after a refusal)


class Limits(NamedTuple):
    """What a connection may send, from the settings: messages and bytes per second, and bursts."""

    rate: float
    burst: float
    byte_rate: float
    byte_burst: float
    max_frame: int


class Connection:
    """One client, sans-IO: bytes and the time in, what to do out (the server does the I/O).

    HTTP until upgraded, then a WebSocket member of a room; its ``state``
    moves as CLOSING says, applied by Connections.move. It owns the frame
    parser, the rate limit's token buckets (messages and bytes), the strikes of
    refused frames, the ping it waits an answer to, and its deadline. The
    server's part rides along: its socket and queue of frames to send, and the
    chat's (room, name, client id, replay position).
    """

    __slots__ = ("byte_tokens", "client", "deadline", "discarded", "fd", "handed", "inbuf", "last_seen",
                 "name", "out", "out_bytes", "out_pos", "parser", "peer", "ping_sent", "replay", "room",
                 "sock", "state", "strikes", "token_time", "tokens", "writing")

    def __init__(self, sock, peer: str, now: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.state = HTTP
        self.inbuf = b""
        self.parser = None
        self.out: list = []           # frames to send, the first one from out_pos on
        self.out_pos = 0
        self.out_bytes = 0            # bytes of out still to send
        self.writing = False          # registered for write readiness
        self.replay = None            # next seq of a since= replay still to send
        self.client = b""             # client id: names its messages for the resend check
        self.room = None
        self.name = ""
        self.last_seen = now
        self.ping_sent = 0.0
        self.deadline = 0.0           # handshake, write or close deadline
        self.tokens = 0.0
        self.byte_tokens = 0.0
        self.token_time = now
        self.strikes = 0
        self.discarded = 0            # bytes dropped since a refusal or a failure
        self.peer = peer
        self.handed = False           # handed over by the worker that accepted it

    def take_request(self, data: bytes, limit: int) -> tuple | None:
        """(request head, the bytes after it, all bytes read) once the head is whole, None until then;
        HandshakeError (431) as soon as it is longer than limit."""
        buf = self.inbuf + data
        head = take_request_head(buf, limit)
        self.inbuf = b"" if head is not None else buf
        return None if head is None else (head[0], head[1], buf)

    def upgraded(self, limits: Limits) -> None:
        """Now a WebSocket: its parser, and full buckets."""
        self.parser = FrameParser(True, limits.max_frame, accept_binary=False)
        self.tokens, self.byte_tokens = limits.burst, limits.byte_burst

    def receive(self, data: bytes, now: float, limits: Limits) -> list:
        """What the peer's bytes ask of the server: MESSAGE, SEND, REFUSE, CLOSED_BY_PEER, FAILED or
        DROP actions, in order; nothing follows a FAILED, CLOSED_BY_PEER or DROP."""
        self.last_seen = now
        parser = self.parser
        if parser is None:                  # refused or failed: a reply is on its way out
            self.discarded += len(data)
            return [(DROP,)] if self.discarded > MAX_DISCARD else []
        frames_before, fragments_before = parser.frames, parser.fragments
        if limits.rate > 0:
            # Parse no more frames than the connection can pay for (at the cheapest price, a
            # fragment's) or be refused for: each refusal is a strike, and past --rate-burst of
            # them it is closed, so the frames one read costs the server stay bounded.
            strikes_left = int(limits.burst - self.strikes)
            parser.frame_limit = frames_before + int(self._refill(now, limits) / FRAME_TOKEN) + strikes_left + 1
        try:
            frames, error = parser.feed(data), None
        except ProtocolError as e:
            # Frames completed before the violation still count. Keep code and reason,
            # not e: its traceback holds this frame, a cycle with the local.
            frames, error = e.frames, (e.code, e.reason)
        actions: list = []
        # Frames that complete nothing (fragments) pay too, or a stream of empty
        # continuations would cost the server a core at no cost to the client.
        fragments = parser.fragments - fragments_before
        if fragments > 0 and self.state == OPEN and not self._take(now, limits, fragments * FRAME_TOKEN):
            return [(REFUSE, None), (FAILED, CLOSE_POLICY, "too many frames")]
        for opcode, payload in frames:
            if self.state != OPEN:
                if opcode == OP_CLOSE:      # the answer to our close: done
                    actions.append((CLOSED_BY_PEER, payload))
                    return actions
            elif opcode == OP_TEXT:
                over = self._take_message(now, limits, len(payload))
                if over is None:
                    actions.append((MESSAGE, payload))
                elif self._strike(actions, limits, payload, over):
                    return actions
            elif opcode == OP_PING:
                if self._take(now, limits, 1.0):      # each ping costs a pong: limited like messages
                    actions.append((SEND, encode_frame(OP_PONG, payload)))
                elif self._strike(actions, limits, b"", "messages"):
                    return actions
            elif opcode == OP_PONG:
                self.ping_sent = 0.0
                if not self._take(now, limits, FRAME_TOKEN) and self._strike(actions, limits, None, "messages"):
                    return actions
            elif opcode == OP_CLOSE:
                actions.append((CLOSED_BY_PEER, payload))
                return actions
            else:                           # unreachable: the parser refuses binary frames
                actions.append((FAILED, CLOSE_UNSUPPORTED_DATA, "binary frames are not accepted"))
                return actions
        if error is not None:
            actions.append((FAILED, *error))
        return actions

    def keepalive(self, now: float, ping_interval: float, pong_timeout: float) -> int:
        """For the ping sweep: 1 to ping now (silent past ping_interval), -1 to drop (a ping went
        unanswered past pong_timeout), 0 for nothing."""
        if self.ping_sent:
            return -1 if now - self.ping_sent > pong_timeout else 0
        if now - self.last_seen > ping_interval:
            self.ping_sent = now
            return 1
        return 0

    def _refill(self, now: float, limits: Limits) -> float:
        """Tokens now: refilled at --rate-limit per second since the last look, up to --rate-burst
        (and byte tokens at --rate-limit-bytes, up to --rate-burst-bytes)."""
        elapsed = now - self.token_time
        self.byte_tokens = min(limits.byte_burst, self.byte_tokens + elapsed * limits.byte_rate)
        self.tokens = min(limits.burst, self.tokens + elapsed * limits.rate)
        self.token_time = now
        if self.strikes:
            # Forgiven as tokens come back (one a second without a message rate): a client that
            # waits out each retry_after is never closed, one that keeps on past its refusals is.
            self.strikes = max(0.0, self.strikes - elapsed * (limits.rate or 1.0))
        return self.tokens

    def _take(self, now: float, limits: Limits, cost: float) -> bool:
        """Whether the message bucket can pay cost (a message or a ping costs 1); if so, it does."""
        if limits.rate <= 0:
            return True
        if self._refill(now, limits) >= cost:
            self.tokens -= cost
            return True
        return False

    def _take_message(self, now: float, limits: Limits, size: int) -> str | None:
        """Charge a message of size bytes to both buckets: None, or what it is over ("messages" or "bytes").

        size is the frame's payload, what the client sent: it is at least what the text
        weighs re-encoded, in history and on the bus (escapes and all: a client must
        escape what the server escapes), short only of the envelope (room, sender, seq).
        """
        if limits.rate <= 0 and limits.byte_rate <= 0:
            return None
        self._refill(now, limits)
        if limits.rate > 0 and self.tokens < 1:
            return "messages"
        if limits.byte_rate > 0 and self.byte_tokens < size:
            return "bytes"
        self.tokens -= 1
        self.byte_tokens -= size
        return None

    def _retry_after(self, limits: Limits, size: int) -> float:
        """Seconds until both buckets could pay for a message of size bytes, rounded up to the ms."""
        wait = (1.0 - self.tokens) / limits.rate if limits.rate > 0 else 0.0
        if limits.byte_rate > 0:
            wait = max(wait, (min(size, limits.byte_burst) - self.byte_tokens) / limits.byte_rate)
        return math.ceil(round(max(0.0, wait) * 1000, 6)) / 1000      # round(): no 0.151 for 0.15000000000000002

    def _strike(self, actions: list, limits: Limits, payload: bytes | None, over: str) -> bool:
        """A frame over the rate (of messages or of bytes): refused with an error frame (none for a
        pong), and FAILED with 1008 once it keeps on; whether it failed."""
        self.strikes += 1
        if self.strikes > limits.burst:
            actions.append((REFUSE, None))
            actions.append((FAILED, CLOSE_POLICY, "rate limit exceeded repeatedly"))
            return True
        error = None
        if payload is not None:
            found = MESSAGE_ID.search(payload)     # cheap: a flood is not worth a JSON parse
            limit = limits.rate if over == "messages" else limits.byte_rate
            error = error_frame(ErrorCode.RATE_LIMIT, f"more than {limit:g} {over} per second",
                                int(found.group(1)) if found else None, self._retry_after(limits, len(payload)))
        actions.append((REFUSE, error))
        return False


class Dropped(StrEnum):
    """Why the server cut a client off: the reason label of scalechat_dropped_clients_total."""

    SLOW_CONSUMER = "slow_consumer"
    PING_TIMEOUT = "ping_timeout"
    WRITE_TIMEOUT = "write_timeout"
    CLOSE_TIMEOUT = "close_timeout"


class Connections:
    """Every connection of a process by descriptor, and the ones a timer must look at: those
    handshaking, closing and blocked (writes stalled). move() keeps them, and each deadline."""

    def __init__(self, config):
        self.all: dict[int, Connection] = {}
        self.handshaking: dict[int, Connection] = {}
        self.closing: dict[int, Connection] = {}
        self.blocked: dict[int, Connection] = {}
        self.handshake_timeout = config.handshake_timeout
        self.close_timeout = config.close_timeout
        self.write_timeout = config.write_timeout

    def add(self, conn: Connection, now: float) -> None:
        """A new connection (HTTP): its handshake deadline starts now."""
        conn.deadline = now + self.handshake_timeout
        self.all[conn.fd] = self.handshaking[conn.fd] = conn

    def move(self, conn: Connection, event: str, now: float) -> int:
        """Apply one move of CLOSING to conn (ValueError if the table has none for its state); the
        state it left."""
        old = conn.state
        new = CLOSING.get((old, event))
        if new is None:
            raise ValueError(f"no move from {STATE_NAMES[old]} on {event!r}")
        conn.state = new
        fd = conn.fd
        if old == HTTP:
            self.handshaking.pop(fd, None)
        if new == CLOSED:
            self.all.pop(fd, None)
            self.closing.pop(fd, None)
            self.blocked.pop(fd, None)
        elif new in CLOSING_STATES and old not in CLOSING_STATES:
            conn.deadline = now + self.close_timeout
            self.closing[fd] = conn
        return old

    def stalled(self, conn: Connection, now: float) -> None:
        """conn's socket is full: it is blocked, and an open one has the write deadline from now."""
        if conn.fd not in self.blocked:
            if conn.state == OPEN:
                conn.deadline = now + self.write_timeout
            self.blocked[conn.fd] = conn

    def unstalled(self, conn: Connection) -> None:
        """conn's socket took all it had."""
        self.blocked.pop(conn.fd, None)

    def expired(self, now: float, max_buffer: int) -> list:
        """(conn, why) for each connection past its deadline (why: a Refused or Dropped reason), or
        blocked and open with more than max_buffer queued (Dropped.SLOW_CONSUMER)."""
        found = [(c, Refused.HANDSHAKE_TIMEOUT) for c in self.handshaking.values() if c.deadline < now]
        found += [(c, Dropped.CLOSE_TIMEOUT) for c in self.closing.values() if c.deadline < now]
        for c in self.blocked.values():
            if c.state == OPEN:
                if c.deadline < now:
                    found.append((c, Dropped.WRITE_TIMEOUT))
                elif c.out_bytes > max_buffer:      # stalled writers are not flushed, so check here
                    found.append((c, Dropped.SLOW_CONSUMER))
        return found


# ---------------------------------------------------------------------------
# 5. Loop and server: counters, the selectors loop, links, the server
# ---------------------------------------------------------------------------

RECV_SIZE = 65536
ACCEPT_BATCH = 128
IOV_BATCH = 512               # frames handed to one sendmsg() (Linux's IOV_MAX is 1024)
JOIN_MAX = 16 << 10           # bytes of queued frames joined into one send() rather than sendmsg()
REPLAY_CHUNK = 64 << 10       # bytes of a since= replay queued at a time, as the socket drains


class Histogram:
    """A Prometheus-style histogram kept as plain numbers (cheap to observe)."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1


BROADCAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
GC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Label values, as strings (the supervisor adds up workers' counters sent as JSON).
PROTOCOL_ERROR_CODES = tuple(str(c) for c in (CLOSE_PROTOCOL_ERROR, CLOSE_UNSUPPORTED_DATA, CLOSE_INVALID_DATA,
                                              CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_INTERNAL_ERROR))


class Stats:
    """The server's counters as plain attributes; the metrics collector reads them."""

    COUNTERS = ("connections", "connections_total", "messages_in", "deliveries", "bytes_in",
                "bytes_out", "draining", "rooms", "bus_up", "gc_frozen", "internal_errors", "history_bytes",
                "sequenced_rooms", "bus_unreplicated", "pings", "handoffs", "room_syncs", "leased_messages",
                "replica_full")
    TABLES = ("dropped", "protocol_errors", "refused", "http_requests")
    HISTOGRAMS = ("broadcast", "loop_lag", "gc0", "gc1", "gc2")

    def __init__(self):
        for name in self.COUNTERS:
            setattr(self, name, 0)
        self.bus_up = 1
        self.dropped = dict.fromkeys(Dropped, 0)
        # Every label value a fixed set allows is there from the start, at 0: a series
        # that appears mid-range loses its first increment to rate().
        self.protocol_errors = dict.fromkeys(PROTOCOL_ERROR_CODES, 0)
        self.refused = dict.fromkeys(Refused, 0)
        self.http_requests = dict.fromkeys(HTTP_STATUSES, 0)
        self.broadcast = Histogram(BROADCAST_BUCKETS)
        self.loop_lag = Histogram(LAG_BUCKETS)
        self.gc0, self.gc1, self.gc2 = (Histogram(GC_BUCKETS) for _ in range(3))

    def to_dict(self) -> dict:
        """Everything as plain JSON-able data."""
        d = {name: getattr(self, name) for name in self.COUNTERS + self.TABLES}
        for name in self.HISTOGRAMS:
            h = getattr(self, name)
            d[name] = [h.counts, h.total, h.count]
        return d

    def add(self, d: dict) -> None:
        """Add another process's to_dict() into this one (gauges add up too)."""
        for name in self.COUNTERS:
            setattr(self, name, getattr(self, name) + d[name])
        for name in self.TABLES:
            table = getattr(self, name)
            for key, value in d[name].items():
                table[key] = table.get(key, 0) + value
        for name in self.HISTOGRAMS:
            h, (counts, total, count) = getattr(self, name), d[name]
            h.counts = [a + b for a, b in zip(h.counts, counts)]
            h.total += total
            h.count += count


class GcWatch:
    """Times each pause of the cyclic garbage collector, by generation, into Stats.

    A full (generation 2) collection walks every tracked object, and a process
    holding many connections holds many: about 15 ms at 17k connections, 66 ms
    at 100k (bench/bench_gc.py), a pause every member of the process feels. With
    freeze, what survives a full collection is moved out of the collector's
    sight (gc.freeze()) by the loop's next quarter-second timer (not inside the
    collection, which may run on the metrics thread), so the next full collection
    walks only what was allocated since. That is safe because the server's
    objects form no reference cycles once released (test_scalechat.py checks
    this): frozen objects are still freed by reference counting.
    """

    def __init__(self, stats: Stats, freeze: bool):
        self.stats, self.freeze = stats, freeze
        self.started = 0.0
        self.freeze_due = False
        self.hists = (stats.gc0, stats.gc1, stats.gc2)
        gc.callbacks.append(self.on_gc)

    def on_gc(self, phase: str, info: dict) -> None:
        """gc.callbacks hook: note the start, observe the pause at the stop."""
        if phase == "start":
            self.started = time.perf_counter()
            return
        generation = info["generation"]
        self.hists[generation].observe(time.perf_counter() - self.started)
        if generation == 2 and self.freeze:
            self.freeze_due = True

    def freeze_if_due(self) -> None:
        """Loop timer: after a full collection, freeze what survived it."""
        if self.freeze_due:
            self.freeze_due = False
            gc.freeze()
            self.stats.gc_frozen = gc.get_freeze_count()

    def close(self) -> None:
        """Stop watching (a process may run more than one loop in its life, e.g. tests)."""
        if self.on_gc in gc.callbacks:
            gc.callbacks.remove(self.on_gc)


class EventLoop:
    """A selectors loop with timers, links and a signal-safe wake-up.

    Handlers registered with the selector are callables ``handler(events)``;
    client connections are dispatched by the Server subclass directly.
    """

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.timers: list = []              # [due, interval (0: once), fn]
        self.next_due = 0.0
        self.links: list = []
        self.now = time.monotonic()
        self.running = True
        self.stop_requested = False
        self.stats = Stats()
        self.errors_logged: dict = {}       # (exception type, file, line) -> when last logged
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, self._on_wake)

    def every(self, interval: float, fn) -> list:
        """Call fn every interval seconds."""
        return self._add_timer([self.now + interval, interval, fn])

    def call_later(self, delay: float, fn) -> list:
        """Call fn once, delay seconds from now."""
        return self._add_timer([self.now + delay, 0, fn])

    def _add_timer(self, timer: list) -> list:
        self.timers.append(timer)
        self.next_due = min(self.next_due, timer[0])
        return timer

    def run_timers(self) -> None:
        """Run due timers and note when the next one is due."""
        now = self.now
        for timer in [t for t in self.timers if t[0] <= now]:
            if timer[1]:
                timer[0] = max(timer[0] + timer[1], now)
            else:
                self.timers.remove(timer)
            try:
                timer[2]()
            except Exception:  # noqa: BLE001 - the barrier: any bug, one victim
                self.internal_error()
        self.next_due = min((t[0] for t in self.timers), default=now + 1.0)

    def run(self) -> None:
        """Turn the loop until ``running`` is false."""
        select, monotonic = self.sel.select, time.monotonic
        while self.running:
            self.now = monotonic()
            if self.now >= self.next_due:   # most turns have no timer due: skip the list
                self.run_timers()
                self.end_turn()
            for key, events in select(max(0.0, self.next_due - monotonic())):
                handler = key.data
                self.now = monotonic()
                if handler.__class__ is Connection:
                    self.on_connection_event(handler, events)
                else:
                    try:
                        handler(events)
                    except Exception:  # noqa: BLE001 - the barrier: any bug, one victim
                        self.internal_error()
                        owner = getattr(handler, "__self__", None)
                        if isinstance(owner, Link):
                            owner.close()       # its owner reconnects or restarts, from a clean state
            self.end_turn()
            self.after_turn()

    def internal_error(self) -> None:
        """Count the exception being handled; log it with its traceback, once a minute per place.

        A bug that one client can trigger must not end the loop, nor flood the log.
        """
        self.stats.internal_errors += 1
        exc = sys.exc_info()[1]
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        place = (type(exc).__name__, frame.filename, frame.lineno)
        last = self.errors_logged.get(place)
        if last is None or self.now - last > 60:
            self.errors_logged[place] = self.now
            log.error("internal error (%d so far; this place is logged at most once a minute)",
                      self.stats.internal_errors, exc_info=exc)

    def end_turn(self) -> None:
        """Flush what the turn queued."""
        for link in self.links:
            if link.pending:
                link.flush()

    def after_turn(self) -> None:
        """Hook: decide whether to keep running."""

    def on_connection_event(self, conn: Connection, events: int) -> None:
        raise NotImplementedError

    def wake(self) -> None:
        """Make select return (safe from signal handlers)."""
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass

    def request_stop(self, *_args) -> None:
        """Signal handler: begin stopping on the loop's next turn; twice: stop now."""
        if self.stop_requested:
            self.on_stop_again()
        self.stop_requested = True
        self.wake()

    def _on_wake(self, _events: int) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except OSError:
            pass
        if self.stop_requested:
            self.on_stop()

    def on_stop(self) -> None:
        """Hook: a stop was requested."""
        self.running = False

    def on_stop_again(self) -> None:
        """Hook: a second stop was requested."""
        self.running = False


def compact(buf: bytearray, pos: int) -> int:
    """Drop the consumed (parsed or sent) start of a buffer once it is most of it; the new position.

    Dropping it on every read or send would copy the rest each time: a large
    message arriving, or leaving, in many pieces would cost quadratic time.
    """
    if pos == len(buf):
        buf.clear()
        return 0
    if pos > 65536 and 2 * pos > len(buf):
        del buf[:pos]
        return 0
    return pos


# Bytes a link's queue must fall below before it takes the next chunk of a
# lazily produced answer (a snapshot): live records are never queued behind more.
LINK_CHUNK = 64 << 10
# Bytes a link reads in one loop turn at most: it drains its socket, so that its
# peer never buffers for us (Redis drops a subscriber past its output-buffer
# limit), yet one busy link cannot keep the loop from everything else. Its
# SO_RCVBUF is left to the kernel: a fixed size would turn off the receive
# buffer's autotuning (up to net.ipv4.tcp_rmem's maximum) and cap it at
# net.core.rmem_max, and measured, 4 MiB did no better than autotuning.
LINK_READ_MAX = 4 << 20


def recv_some(sock: socket.socket) -> bytes | None:
    """What a non-blocking socket has (up to RECV_SIZE): None if nothing yet, b"" if it closed or failed."""
    try:
        return sock.recv(RECV_SIZE)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


class Link:
    """A non-blocking stream socket on the loop: buffered writes flushed once a turn.

    ``out`` is a bytearray sent from ``sent`` on: a partial send moves the
    offset, and the sent part is dropped only when it is most of the buffer,
    so no byte is copied more than a constant number of times. Large answers
    are queued as iterators (``write_lazily``) and pulled a chunk at a time
    only when the socket has taken everything else.
    """

    def __init__(self, loop: EventLoop, sock: socket.socket, on_data, on_close, connecting: bool = False):
        self.loop, self.sock, self.on_data, self.on_close = loop, sock, on_data, on_close
        self.out = bytearray()
        self.sent = 0
        self.lazy: dict = {}                # key -> iterator of byte chunks, oldest first
        self.connecting = connecting
        self.writing = connecting
        self.closed = False
        self.on_drained = None              # called when the socket took everything queued
        self.on_full = None                 # called when the socket stops taking bytes (it is full)
        self.behind = None                  # a Link whose queued bytes must go first (HubBus.replica)
        sock.setblocking(False)
        loop.sel.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if connecting else 0),
                          self.on_event)
        loop.links.append(self)

    @classmethod
    def connect(cls, loop: EventLoop, host: str, port: int, on_data, on_close, on_connect) -> Link:
        """Start a non-blocking TCP connect; on_connect() runs once it succeeds."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        err = sock.connect_ex((host, port))
        link = cls(loop, sock, on_data, on_close, connecting=True)
        link.on_connect = on_connect
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            loop.call_later(0, link.close)
        return link

    @property
    def pending(self) -> bool:
        """Whether anything waits to be sent."""
        return len(self.out) > self.sent or bool(self.lazy)

    def write(self, data: bytes) -> None:
        """Queue data; it is sent at the end of the loop turn."""
        self.out += data

    def write_lazily(self, key, chunks) -> None:
        """Queue an iterator of byte chunks, pulled one at a time as the socket drains."""
        self.lazy[key] = chunks

    def write_after(self, key, data: bytes) -> None:
        """Queue data behind what is left of the lazy answer key (as write() when none is left)."""
        chunks = self.lazy.get(key)
        if chunks is None:
            self.write(data)
        else:
            self.lazy[key] = itertools.chain(chunks, (data,))

    def cancel(self, key) -> None:
        """Drop what is left of a lazy answer."""
        self.lazy.pop(key, None)

    def flush(self) -> None:
        """Send what is queued; watch for writability if the socket is full."""
        if self.writing or self.closed or self.behind is not None and self.behind.pending:
            return
        out = self.out
        while True:
            if len(out) - self.sent < LINK_CHUNK and self.lazy:
                key = next(iter(self.lazy))
                chunk = next(self.lazy[key], None)
                if chunk is None:
                    del self.lazy[key]
                    continue
                out += chunk
            if len(out) == self.sent:
                if self.on_drained is not None:
                    self.on_drained()
                break
            try:
                n = self.sock.send(memoryview(out)[self.sent:])
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self.close()
                return
            self.sent = compact(out, self.sent + n)
            if not out:
                continue                    # the socket took it all: maybe a next chunk
            self.writing = True
            self.loop.sel.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self.on_event)
            if self.on_full is not None:
                self.on_full()
            return

    def on_event(self, events: int) -> None:
        """Selector callback."""
        if self.closed:                     # closed earlier this turn (its sibling link failed)
            return
        if events & selectors.EVENT_WRITE:
            if self.connecting:
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self.close()
                    return
                self.connecting = False
                self.on_connect()
            self.writing = False
            self.loop.sel.modify(self.sock, selectors.EVENT_READ, self.on_event)
            self.flush()
        if events & selectors.EVENT_READ and not self.closed and not self.connecting:
            self._read()

    def _read(self) -> None:
        """Hand the owner what has arrived, until the socket is empty or LINK_READ_MAX was read."""
        read = 0
        while read < LINK_READ_MAX and not self.closed:
            data = recv_some(self.sock)
            if data is None:
                return
            if not data:
                self.close()
                return
            self.on_data(data)
            if len(data) < RECV_SIZE:       # the socket is empty: spare the recv that would say so
                return
            read += len(data)

    def close(self) -> None:
        """Close the socket and tell the owner (once)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        self.loop.links.remove(self)
        self.on_close()


def fd_limit() -> int:
    """The open-file soft limit."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_fd_limit() -> int:
    """Raise the open-file soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


def make_listener(host: str, port: int, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A listening TCP socket (IPv6 when host contains ':'); SO_REUSEPORT for workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        if listen:
            sock.listen(4096)
    except OSError:
        sock.close()
        raise
    return sock


# Each room has an owner among the workers; the worker that accepts a WebSocket
# passes it to the owner over a datagram socket with SCM_RIGHTS. A room's members
# then share one worker, which sequences it (SCALING.md, sections 13 and 14).
HANDOFF_MAX = 16384           # request bytes a hand-off carries (a head is at most --max-header-size)
LOAD = struct.Struct("=q")    # a worker's open WebSockets, in the shared table of loads


def room_owner(room: str, workers: int, key: bytes) -> int:
    """The worker slot that owns room: the same answer in every process of one server, and one no
    client can aim at (a hash keyed with the server's secret, not crc32)."""
    return int.from_bytes(hashlib.blake2b(room.encode(), digest_size=8, key=key).digest(), "big") % workers


class Handoff:
    """A worker's ends of the hand-off links: its own inbox, and a way into each other worker's.

    The supervisor makes one unix datagram socketpair per worker slot, keeps it
    for its whole life and never reads it; a worker gets its own slot's
    receiving end and the other slots' sending ends, nothing else. No end has a
    name (abstract or on disk), so no process outside this server can reach an
    inbox, and a restarted worker finds its predecessor's inbox with what was
    queued there (sockets in flight and their requests): it serves them. An
    inbox holds what the buffer of the end others send on does (SO_SNDBUF,
    208 KiB by default: some 160 requests); past that a send fails at once and
    the accepting worker serves the client itself.
    """

    def __init__(self, ends: list[socket.socket], slot: int, key: bytes, loads=None):
        self.ends = ends                # per slot, the sending end into that worker; at our slot, our inbox
        self.inbox = ends[slot]
        self.slot, self.key = slot, key
        self.loads = loads              # shared memory: every worker's open WebSockets (LOAD each)
        self.spread: set = set()        # rooms so big that new members stay where accepted

    def owner(self, room: str) -> int:
        """The slot of the worker that owns room."""
        return room_owner(room, len(self.ends), self.key)

    def load(self, slot: int) -> int:
        """How many WebSockets the worker in slot holds (as it last wrote)."""
        return LOAD.unpack_from(self.loads, slot * LOAD.size)[0] if self.loads is not None else 0

    def roomiest(self) -> int:
        """The slot of the worker that holds the fewest WebSockets."""
        return min(range(len(self.ends)), key=self.load)

    def set_load(self, count: int) -> None:
        """Say how many WebSockets this worker holds."""
        if self.loads is not None:
            LOAD.pack_into(self.loads, self.slot * LOAD.size, count)

    def send(self, conn_fd: int, request: bytes, owner: int) -> bool:
        """Pass a client socket and the request bytes read from it to another worker; whether it went."""
        try:
            self.ends[owner].sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", conn_fd))],
                                     socket.MSG_DONTWAIT)
        except OSError:                 # its inbox is full (EAGAIN), or the like
            return False
        return True

    def receive(self, batch: int):
        """Up to batch (socket, peer address, request bytes) handed to this worker, as they are read.

        Who sent a datagram is not checked (no SO_PASSCRED): only the processes
        of this server hold a sending end, and one that could take an end from
        them (ptrace) could do anything they can. What it carries is checked all
        the same: one TCP socket, or it is closed.
        """
        for _ in range(batch):
            try:
                request, ancillary, _flags, _addr = self.inbox.recvmsg(
                    HANDOFF_MAX, socket.CMSG_SPACE(4), socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            fds = [fd for level, kind, data in ancillary if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                   for (fd,) in struct.iter_unpack("i", data[:len(data) - len(data) % 4])]
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            try:
                sock = socket.socket(fileno=fds[0])
            except OSError:             # not a socket
                os.close(fds[0])
                continue
            try:
                if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                    raise OSError("not a TCP socket")
                peer = sock.getpeername()[0]
            except OSError:             # not TCP, or the client left meanwhile
                sock.close()
                continue
            sock.setblocking(False)
            yield sock, peer, request

    def close(self) -> None:
        """Close this worker's ends (the supervisor keeps its own)."""
        for end in self.ends:
            end.close()
        if self.loads is not None:
            self.loads.close()


class ConnectionLoop(EventLoop):
    """The loop's side of client connections: accept (and adopt) sockets, read them into
    Connection.receive and do what it asks, queue and write frames, close each as CLOSING says
    with what its new state asks of the socket, and visit deadlines and pings. What a request or
    a message means, and what leaving means, is for the subclass (Server) to say."""

    def __init__(self, config, reuse_port: bool):
        super().__init__()
        self.config = config
        self.connections = Connections(config)
        self.limits = Limits(config.rate_limit, config.rate_burst, config.rate_limit_bytes,
                             config.rate_burst_bytes, max_frame_size(config.max_message_size))
        self.per_ip: dict[str, int] = {}
        self.dirty: list = []               # connections with bytes newly queued this turn
        self.write_barrier = None           # whether clients may be written to now (Server: the supervisor's copy)
        self.held_writes: dict = {}         # connections that waited for the barrier
        self.sweep_queue: list = []
        self.listener = make_listener(config.host, config.port, reuse_port=reuse_port)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, self._accept)
        self.every(0.25, self._check_deadlines)
        # Each open connection is looked at once per sweep period, a quarter of the
        # shorter of the two intervals: a ping goes out at most that late, and an idle
        # connection costs sweep visits in proportion to its pings, not to the clock.
        self.sweep_period = min(config.ping_interval, config.pong_timeout) / 4
        self.sweep_tick = min(1.0, self.sweep_period)
        self.every(self.sweep_tick, self._sweep)

    def on_http_data(self, conn: Connection, data: bytes) -> None:
        """Bytes of a request (conn is HTTP)."""
        raise NotImplementedError

    def on_message(self, conn: Connection, payload: bytes) -> None:
        """A chat message from conn, within its rate."""
        raise NotImplementedError

    def next_replay(self, conn: Connection) -> list | None:
        """The next frames of conn's since= replay."""
        raise NotImplementedError

    def on_leave(self, conn: Connection) -> None:
        """conn was OPEN and is closing."""
        raise NotImplementedError

    def on_connection_event(self, conn: Connection, events: int) -> None:
        """Selector callback for a client socket: the exception barrier of one connection."""
        try:
            if events & selectors.EVENT_WRITE:
                self._flush(conn)
            if events & selectors.EVENT_READ and conn.state != CLOSED:
                self._on_readable(conn)
        except Exception:  # noqa: BLE001 - the barrier: any bug, one victim
            self._internal_failure(conn)

    def _internal_failure(self, conn: Connection) -> None:
        """A bug met while serving conn: close it with 1011 (or 500), count and log it, serve the rest."""
        self.internal_error()
        try:
            if conn.state == OPEN:
                self._fail(conn, CLOSE_INTERNAL_ERROR, "internal error")
            elif conn.state == HTTP:
                self._http_reply(conn, http_response(500, b"internal error\n"), 500)
            else:
                self._abort(conn)
        except Exception:
            log.exception("dropping %s after a second internal error", conn.peer)
            if conn.state != CLOSED:        # the same move as any abort, each step on its own
                self._release(conn, self.connections.move(conn, ABORT, self.now), careful=True)

    def end_turn(self) -> None:
        """Send what links and connections queued this turn (links first: see write_barrier)."""
        super().end_turn()
        if self.dirty:
            self._flush_dirty()

    def release_writes(self) -> None:
        """The write barrier opened: the connections that waited for it are written at the turn's end."""
        if self.held_writes:
            self.dirty.extend(self.held_writes)
            self.held_writes.clear()

    def _accept(self, _events: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the connection stays in the backlog, and
                    # accepting again at once would spin at 100% CPU. Pause a little.
                    log.warning("accept: %s; pausing accepts for 100 ms", os.strerror(e.errno))
                    self.sel.unregister(self.listener)
                    self.call_later(0.1, lambda: self.sel.register(self.listener, selectors.EVENT_READ,
                                                                   self._accept))
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._adopt(sock, addr[0])

    def _adopt(self, sock: socket.socket, peer: str) -> Connection:
        """A new client socket (accepted, or handed over): its handshake deadline starts now."""
        conn = Connection(sock, peer, self.now)
        self.connections.add(conn, self.now)
        self.sel.register(sock, selectors.EVENT_READ, conn)
        # Every socket of an address counts, not only upgraded ones: otherwise one
        # address could hold any number of sockets in the handshake (slowloris).
        self.per_ip[conn.peer] = n = self.per_ip.get(conn.peer, 0) + 1
        if self.config.max_per_ip and n > self.config.max_per_ip:
            self._http_error(conn, 503, "too many connections from this address",
                             Refused.MAX_CONNECTIONS, (("Retry-After", "1"),))
        return conn

    def _on_readable(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._abort(conn)
            return
        if not data:
            self._abort(conn)
            return
        self.stats.bytes_in += len(data)
        if conn.state == HTTP:
            conn.last_seen = self.now
            self.on_http_data(conn, data)
        else:
            self._act(conn, conn.receive(data, self.now, self.limits))

    def _act(self, conn: Connection, actions: list) -> None:
        """Do what conn's bytes asked (Connection.receive)."""
        for action in actions:
            kind = action[0]
            if kind is MESSAGE:
                self.on_message(conn, action[1])
            elif kind is SEND:
                self.send(conn, action[1])
            elif kind is REFUSE:
                self.stats.refused[Refused.RATE_LIMIT] += 1
                if action[1] is not None:
                    self.send(conn, action[1])
            elif kind is CLOSED_BY_PEER:
                # Echo the peer's status code (RFC 6455 5.5.1), then close TCP ourselves.
                self._move(conn, PEER_CLOSE, encode_frame(OP_CLOSE, action[1][:2]) if conn.state == OPEN else b"")
            elif kind is FAILED:
                self._fail(conn, action[1], action[2])
            else:                           # DROP: it keeps sending after a refusal
                self._abort(conn)

    def _http_error(self, conn: Connection, status: int, reason: str, counter: str,
                    headers: tuple = ()) -> None:
        """Refuse a request: the client may still be sending, so let it read the answer."""
        self.stats.refused[counter] += 1
        self._http_reply(conn, http_response(status, (reason + "\n").encode(), headers=headers), status,
                         REFUSED)

    def _http_reply(self, conn: Connection, response: bytes, status: int, event: str = ANSWERED) -> None:
        self.stats.http_requests[str(status)] += 1
        self._move(conn, event, response)

    def send(self, conn: Connection, data: bytes) -> None:
        """Queue bytes for conn; they go out at the end of this loop turn."""
        out = conn.out
        if not out:
            self.dirty.append(conn)
        out.append(data)
        conn.out_bytes += len(data)

    def broadcast(self, members, frame: bytes) -> None:
        """Queue one frame for every member (the hot path: the same bytes object for all)."""
        n = len(frame)
        dirty = self.dirty
        for c in members:
            out = c.out
            if not out:
                dirty.append(c)
            out.append(frame)
            c.out_bytes += n

    def _flush_dirty(self) -> None:
        dirty = self.dirty
        cap = self.config.max_buffer
        batch = dirty[:]
        dirty.clear()
        if self.write_barrier is not None and not self.write_barrier():     # once for the turn's writes
            self.held_writes.update(dict.fromkeys(batch))
            return
        for conn in batch:
            try:
                if conn.writing or conn.state == CLOSED:
                    if conn.out_bytes > cap and conn.state == OPEN:
                        self._cut_off(conn)
                    continue
                self._write(conn)
            except Exception:  # noqa: BLE001 - the barrier: any bug, one victim
                self._internal_failure(conn)

    def _flush(self, conn: Connection) -> None:
        """Send what conn has queued in as few system calls as it takes; watch for writability if it stalls.

        Frames go out from the list itself (send, or sendmsg for several; a few
        small ones are joined once, which is cheaper), never sliced: a partial
        send only moves ``out_pos``, so no byte is copied twice. A since= replay
        is pulled from history a chunk at a time, once all queued before it went.
        Nothing is sent while the write barrier (if any) is closed: conn waits for it.
        """
        if self.write_barrier is not None and not self.write_barrier():
            self.held_writes[conn] = None
            return
        self._write(conn)

    def _write(self, conn: Connection) -> None:
        """_flush once the write barrier is open."""
        out = conn.out
        if not out and conn.replay is not None:
            frames = self.next_replay(conn)
            if frames is None:
                self._cut_off(conn)
                return
            out.extend(frames)
            conn.out_bytes += sum(map(len, frames))
        while out:
            pos = conn.out_pos
            try:
                if len(out) == 1:
                    attempted = conn.out_bytes
                    sent = conn.sock.send(memoryview(out[0])[pos:] if pos else out[0])
                elif not pos and conn.out_bytes <= JOIN_MAX:    # a few small frames: one copy is cheaper
                    out[:] = [b"".join(out)]
                    attempted = conn.out_bytes
                    sent = conn.sock.send(out[0])
                else:
                    batch = out[:IOV_BATCH]
                    if pos:
                        batch[0] = memoryview(batch[0])[pos:]
                    attempted = conn.out_bytes if len(out) <= IOV_BATCH else sum(map(len, batch))
                    sent = conn.sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                attempted, sent = 1, 0
            except OSError:
                self._abort(conn)
                return
            self.stats.bytes_out += sent
            conn.out_bytes -= sent
            if not conn.out_bytes:
                out.clear()
                conn.out_pos = 0
                break
            stalled = sent < attempted
            sent += pos
            done = 0
            while sent >= len(out[done]):
                sent -= len(out[done])
                done += 1
            del out[:done]
            conn.out_pos = sent
            if stalled:                     # the socket is full: wait until it can take more
                self.connections.stalled(conn, self.now)
                self._watch_writable(conn)
                if conn.out_bytes > self.config.max_buffer and conn.state == OPEN:
                    self._cut_off(conn)     # a partly sent frame is kept
                return
        self.connections.unstalled(conn)
        if conn.replay is not None:         # more to replay: go on when the socket can take it
            self._watch_writable(conn)
            return
        if conn.writing:
            conn.writing = False
            self.sel.modify(conn.sock, selectors.EVENT_READ, conn)
        if conn.state in (FLUSHING, REFUSING):
            self._move(conn, SENT)

    def _watch_writable(self, conn: Connection) -> None:
        """Wake up when conn can take more."""
        if not conn.writing:
            conn.writing = True
            self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _move(self, conn: Connection, event: str, last: bytes = b"") -> None:
        """Move conn as CLOSING says (Connections.move keeps its tables and deadline), with last as
        its last bytes, and do what its new state asks of the socket and of the chat."""
        old = self.connections.move(conn, event, self.now)
        new = conn.state
        if new == CLOSED:
            self._release(conn, old)
            return
        if old == OPEN:
            self.on_leave(conn)
        if new == LINGERING:                # a refusal is sent: half-close, and close at the peer's EOF
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._move(conn, ABORT)
            return
        if new == REFUSING:
            conn.parser = None              # out of step with the peer: drop what it still sends
        if last:
            self.send(conn, last)
        if new in (FLUSHING, REFUSING):     # CLOSE_SENT goes out with the turn's writes (a drain sends many)
            self._flush(conn)

    def _release(self, conn: Connection, old: int, careful: bool = False) -> None:
        """conn is CLOSED: it leaves its room, its address's count and the selector; its socket closes.
        careful: after a second bug, each step on its own, so the rest still happens."""
        steps = (lambda: old == OPEN and self.on_leave(conn), lambda: self.sel.unregister(conn.sock))
        for step in steps:
            try:
                step()
            except (KeyError, ValueError):  # not registered (a hand-off not adopted yet)
                pass
            except Exception:
                if not careful:
                    raise
                log.exception("releasing %s", conn.peer)
        n = self.per_ip.get(conn.peer, 0) - 1
        if n > 0:
            self.per_ip[conn.peer] = n
        else:
            self.per_ip.pop(conn.peer, None)
        conn.sock.close()
        conn.out.clear()
        conn.out_bytes = conn.out_pos = 0

    def _abort(self, conn: Connection) -> None:
        """Close the socket now and forget the connection."""
        if conn.state != CLOSED:
            self._move(conn, ABORT)

    def _fail(self, conn: Connection, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): send Close, then close TCP without waiting."""
        self.stats.protocol_errors[str(code)] += 1
        log.debug("closing %s with %d: %s", conn.peer, code, reason)
        if conn.state == OPEN:
            self._move(conn, FAIL, encode_close(code, reason))
        else:
            self._abort(conn)

    def _cut_off(self, conn: Connection) -> None:
        """A slow consumer: drop what it has not been sent, tell it 1013, close."""
        self.stats.dropped[Dropped.SLOW_CONSUMER] += 1
        if conn.out_pos:                    # a partly sent frame must finish
            del conn.out[1:]
            conn.out_bytes = len(conn.out[0]) - conn.out_pos
        else:
            conn.out.clear()
            conn.out_bytes = 0
        self._move(conn, TOO_SLOW, encode_close(CLOSE_TRY_AGAIN_LATER, "too slow: reconnect with since"))

    def _check_deadlines(self) -> None:
        for conn, why in self.connections.expired(self.now, self.config.max_buffer):
            if why is Dropped.SLOW_CONSUMER:
                self._cut_off(conn)
                continue
            (self.stats.refused if why is Refused.HANDSHAKE_TIMEOUT else self.stats.dropped)[why] += 1
            self._abort(conn)

    def _sweep(self) -> None:
        """Ping quiet connections, drop those that never answered; a slice per tick."""
        conns = self.connections.all
        if not self.sweep_queue:
            self.sweep_queue = list(conns.values())
        slice_size = max(256, math.ceil(len(conns) * self.sweep_tick / self.sweep_period))
        batch = self.sweep_queue[-slice_size:]
        del self.sweep_queue[-slice_size:]
        now, cfg = self.now, self.config
        ping = encode_frame(OP_PING, b"")
        for conn in batch:
            if conn.state != OPEN:
                continue
            due = conn.keepalive(now, cfg.ping_interval, cfg.pong_timeout)
            if due > 0:
                self.stats.pings += 1
                self.send(conn, ping)
            elif due < 0:
                self.stats.dropped[Dropped.PING_TIMEOUT] += 1
                self._abort(conn)


class Server(ConnectionLoop):
    """One process's server: HTTP and the routes, the upgrade into the chat, the hand-off of a
    WebSocket to the worker that owns its room, draining, and the chat's timers."""

    def __init__(self, config, make_buses=None, handoff: Handoff | None = None):
        """make_buses(server, chat): (the link to the --workers supervisor or None, the bus the chat
        uses or None for its own LocalBus), chosen by main(); handoff: the worker's hand-off links."""
        super().__init__(config, reuse_port=config.worker_id is not None)
        self.gc_watch = GcWatch(self.stats, config.gc_freeze)
        self.chat = Chat(config, self.stats, self)
        self.front = Front(load_static(config.static_dir), config.allowed_hosts, config.allowed_origins,
                           config.allow_no_origin)
        self.draining = False
        self.drain_deadline = 0.0
        self.max_conns = config.max_connections or max(16, fd_limit() - 64)
        self.handoff = handoff
        if handoff is not None:
            self.sel.register(handoff.inbox, selectors.EVENT_READ, self._on_handoff)
        self.hub, bus = make_buses(self, self.chat) if make_buses is not None else (None, None)
        if bus is not None:
            self.chat.bus = bus
        if bus is not None and bus is self.hub and config.room_affinity:
            self.write_barrier = self._supervisor_has_all    # a worker sequences its rooms
        if self.hub is not None:
            self.every(1.0, lambda: self.hub.send_stats(self.stats))
        self.every(0.25, self._tick_lag)
        self.every(0.25, self.gc_watch.freeze_if_due)
        self.every(1.0, self._each_second)

    def _supervisor_has_all(self) -> bool:
        """The write barrier of a worker that sequences rooms: every record queued for the supervisor
        on the replica (the messages sequenced here) is in its socket before a byte leaves for a client. So what a
        client was sent or acked, the supervisor has, even if this worker is killed the next instant."""
        replica = self.hub.replica
        if replica.pending:
            replica.flush()
        return not replica.pending

    def _tick_lag(self) -> None:
        """Measure how late the loop runs a timer due every 0.25 s."""
        self.stats.loop_lag.observe(max(0.0, self.now - self._lag_due))
        self._lag_due = self.now + 0.25

    _lag_due = 0.0

    def serve_forever(self) -> None:
        """Run until stopped and drained."""
        self._lag_due = self.now + 0.25
        self.run()
        for conn in list(self.connections.all.values()):
            self._abort(conn)
        if self.hub is not None:
            self.hub.send_stats(self.stats)
            self.end_turn()
        self.sel.close()
        self.listener.close()
        if self.handoff is not None:
            self.handoff.close()
        self.gc_watch.close()
        log.info("stopped")

    def after_turn(self) -> None:
        """Stop once draining is done."""
        if self.draining and (not self.connections.all or self.now > self.drain_deadline):
            self.running = False

    def on_stop(self) -> None:
        """SIGTERM/SIGINT: drain."""
        if not self.draining:
            self.drain()

    def on_stop_again(self) -> None:
        """A second signal: stop without waiting."""
        self.drain_deadline = 0.0

    def drain(self) -> None:
        """Refuse new WebSockets, say 1001 to every client, stop when they are gone."""
        log.info("draining %d connections (timeout %.1fs)", len(self.connections.all), self.config.drain_timeout)
        self.draining = True
        self.stats.draining = 1
        self.drain_deadline = self.now + self.config.drain_timeout
        for conn in list(self.connections.all.values()):
            if conn.state == OPEN:
                self._move(conn, CLOSE, encode_close(CLOSE_GOING_AWAY, "server shutting down"))
            elif conn.state == HTTP and not conn.out:
                self._abort(conn)

    def _hand_off(self, conn: Connection, room: str, request: bytes) -> bool:
        """Pass conn (its socket and the request bytes read so far) to the worker owning room.

        Whether it went: not when this worker owns the room, the request is too big
        for one datagram, the room is big enough to spread over every worker, the
        owner holds --max-connections already, or its inbox is full: then this
        worker serves it, and the supervisor's order still holds. A worker that is
        full itself, or already holds --spread-members of the room (a burst of joins
        that came before word of the room's size), passes the client on to the
        worker holding the fewest: the cap counts what the whole server holds, and a
        big room's fan-out uses every core. Only the owner passes on a client handed
        to it, and never back to itself: a client moves twice at most.
        """
        handoff, me = self.handoff, self.config.worker_id
        owner = target = handoff.owner(room)
        if conn.handed and owner != me:
            return False
        if room in handoff.spread or handoff.load(target) >= self.max_conns:
            target = me
        if target == me and (self.stats.connections >= self.max_conns or self._big_here(room)):
            target = handoff.roomiest()
        if target == me or conn.handed and target == owner or len(request) > HANDOFF_MAX:
            return False
        if not handoff.send(conn.fd, request, target):
            return False
        self.stats.handoffs += 1
        self._abort(conn)                   # our descriptor; the owner has its own
        return True

    def _big_here(self, name: str) -> bool:
        """Whether this worker holds --spread-members of room name already."""
        room = self.chat.rooms.get(name)
        return bool(self.config.spread_members) and room is not None and \
            room.held_here() >= self.config.spread_members

    def _on_handoff(self, _events: int) -> None:
        """Adopt the sockets other workers handed over, and read their requests again."""
        for sock, peer, request in self.handoff.receive(ACCEPT_BATCH):
            conn = self._adopt(sock, peer)
            conn.handed = True
            if conn.state == HTTP:
                self.on_http_data(conn, request)

    def on_http_data(self, conn: Connection, data: bytes) -> None:
        """Bytes of a request: once its head is whole, the route's answer, or the upgrade."""
        try:
            request = conn.take_request(data, self.config.max_header_size)
            if request is not None:
                head, rest, raw = request
                self._route(conn, parse_request_head(head), rest, raw)
        except HandshakeError as e:
            self._http_error(conn, e.status, e.reason, e.counter, e.headers)

    def _route(self, conn: Connection, request: Request, rest: bytes, raw: bytes = b"") -> None:
        handoff, full = self.handoff, self.stats.connections >= self.max_conns
        answer = route(request, self.front, draining=self.draining, bus_up=self.chat.bus.up,
                       full=full and (handoff is None or handoff.load(handoff.roomiest()) >= self.max_conns))
        if isinstance(answer, Upgrade):
            if handoff is None or not self._hand_off(conn, answer.room, raw):
                if full:                    # another worker had room, but the client could not go there
                    raise server_full()
                self._upgrade(conn, answer, rest)
        else:
            status, response = answer
            self._http_reply(conn, response, status)

    def _upgrade(self, conn: Connection, upgrade: Upgrade, rest: bytes) -> None:
        self._move(conn, UPGRADED)
        conn.upgraded(self.limits)
        conn.name = self.chat.assign_name(upgrade.name)
        # Without a client id of its own, a connection's messages still need a key
        # nobody else has (a resend after a bus failure); '.' is never in a client's.
        conn.client = upgrade.client.encode() if upgrade.client else b".%s" % os.urandom(8).hex().encode()
        self.stats.connections += 1
        self.stats.connections_total += 1
        self.stats.http_requests["101"] += 1
        if self.handoff is not None:
            self.handoff.set_load(self.stats.connections)
        self.send(conn, upgrade_response(upgrade.accept))
        self.chat.join(conn, upgrade.room, upgrade.since, upgrade.epoch)
        self.stats.rooms = self.chat.active_rooms()
        if self.handoff is not None and self.chat.bus is self.hub:
            self._report_if_big(upgrade.room)
        if rest:
            self._act(conn, conn.receive(rest, self.now, self.limits))

    def _report_if_big(self, name: str) -> None:
        """A room that just reached --spread-members here: tell the supervisor now, not with the
        once-a-second counts, so that a burst of joins (a class logging in, clients coming back
        after a restart) spreads over the workers too instead of landing on the owner whole."""
        threshold, room = self.config.spread_members, self.chat.rooms.get(name)
        if threshold and room is not None and room.reported < threshold <= (n := room.held_here()):
            room.reported = n
            self.hub.report_members(room, n)

    def on_message(self, conn: Connection, payload: bytes) -> None:
        """A chat message from conn, within its rate: to the chat (an error frame back if refused)."""
        err = self.chat.receive(conn, payload, self.now)
        if err is not None:
            self.send(conn, err)

    def next_replay(self, conn: Connection) -> list | None:
        """The next frames of conn's since= replay (None: history dropped them)."""
        return self.chat.replay(conn, REPLAY_CHUNK)

    def on_leave(self, conn: Connection) -> None:
        """conn is no longer a member: it leaves its room."""
        self.chat.leave(conn, self.now)
        self.stats.connections -= 1
        self.stats.rooms = self.chat.active_rooms()
        if self.handoff is not None:
            self.handoff.set_load(self.stats.connections)

    def _each_second(self) -> None:
        """Member counts to the rooms whose count moved; the rooms nobody came back to are let go."""
        chat = self.chat
        chat.send_member_counts(self.now)
        self.stats.rooms = chat.active_rooms()
        self.stats.history_bytes = chat.budget.used
        self.stats.sequenced_rooms = chat.bus.sequenced_rooms()


# ---------------------------------------------------------------------------
# 6. Supervisor (--workers): the record codec, the remote bus, the hub
# ---------------------------------------------------------------------------

class Rec(IntEnum):
    """The kinds of record between the supervisor and its workers (each: length, kind, body)."""

    SUBSCRIBE = 1       # worker: follow a room (answered with MEMBERS, then its SNAPSHOT)
    UNSUBSCRIBE = 2     # worker: stop following a room
    PUBLISH = 3         # worker: sequence a message
    ACK = 4             # supervisor: the worker's oldest PUBLISH in flight was sequenced so
    MESSAGE = 5         # supervisor: a sequenced message of a room the worker follows
    SNAPSHOT = 6        # supervisor: part of a room's order and history
    MEMBERS = 7         # a worker's member count of a room; from the supervisor, the room's total
    STATS = 8           # worker: its counters, as JSON
    REPLICATE = 9       # worker, on its replica socket: a message it sequenced in a room leased to it
    REVOKE = 10         # supervisor: stop sequencing a room (another worker follows it now)
    RELEASED = 11       # worker, on its replica socket: it stopped (every REPLICATE of the room came before)
    SPREAD = 12         # supervisor: a room is big (1) or no longer (0): its new members stay where accepted


REC_HEADER = struct.Struct("!IB")           # body length, kind
PUBLISH_HEAD = struct.Struct("!BdIH?")      # room length, t0, prefix length, key length, resend
MESSAGE_HEAD = struct.Struct("!B16sQd")     # room length, epoch, seq, t0
SNAPSHOT_HEAD = struct.Struct("!BB16sQI")   # room length, flags, epoch, seq, count
ACK_HEAD = struct.Struct("!16sQ?")          # epoch, seq, duplicate
MEMBERS_HEAD = struct.Struct("!BI")         # room length, count
LENGTH = struct.Struct("!I")
KEY_LENGTH = struct.Struct("!H")
SNAPSHOT_FIRST, SNAPSHOT_LAST, SNAPSHOT_LEASED = 1, 2, 4


def record(kind: Rec, body: bytes) -> bytes:
    """One supervisor/worker record."""
    return REC_HEADER.pack(len(body), kind) + body


class RecordReader:
    """Splits a byte stream into (kind, body) records.

    Input gathers in a bytearray read from ``pos`` on; the consumed part is
    dropped only when it is most of the buffer, so a large record arriving in
    many reads is neither rebuilt nor re-scanned on each of them.
    """

    def __init__(self):
        self.buf = bytearray()
        self.pos = 0

    def feed(self, data: bytes) -> list:
        """The records completed by data."""
        buf = self.buf
        buf += data
        pos, end, out = self.pos, len(buf), []
        while end - pos >= REC_HEADER.size:
            n, kind = REC_HEADER.unpack_from(buf, pos)
            if end - pos - REC_HEADER.size < n:
                break
            out.append((kind, bytes(buf[pos + REC_HEADER.size:pos + REC_HEADER.size + n])))
            pos += REC_HEADER.size + n
        self.pos = compact(buf, pos)
        return out


def publish_record(room: str, t0: float, prefix: bytes, suffix: bytes, key: bytes, resend: bool) -> bytes:
    """A PUBLISH record: a message's JSON around its order and seq, its resend key, when it came."""
    r = room.encode()
    return record(Rec.PUBLISH, PUBLISH_HEAD.pack(len(r), t0, len(prefix), len(key), resend) + r + key + prefix + suffix)


def parse_publish(body: bytes) -> tuple[bytes, float, bytes, bytes, bytes, bool]:
    """(room, t0, prefix, suffix, key, resend) of a PUBLISH record's body."""
    rlen, t0, plen, klen, resend = PUBLISH_HEAD.unpack_from(body)
    pos = PUBLISH_HEAD.size
    key_at = pos + rlen
    text_at = key_at + klen
    return (body[pos:key_at], t0, body[text_at:text_at + plen], body[text_at + plen:], body[key_at:text_at],
            resend)


def message_record(room: bytes, epoch: bytes, seq: int, t0: float, payload: bytes) -> bytes:
    """A MESSAGE record: a sequenced message, for every worker that follows its room."""
    return record(Rec.MESSAGE, MESSAGE_HEAD.pack(len(room), epoch, seq, t0) + room + payload)


def parse_message(body: bytes) -> tuple[str, bytes, int, bytes, float]:
    """(room, epoch, seq, payload, t0) of a MESSAGE record's body."""
    rlen, epoch, seq, t0 = MESSAGE_HEAD.unpack_from(body)
    start = MESSAGE_HEAD.size
    return body[start:start + rlen].decode(), epoch, seq, body[start + rlen:], t0


def ack_record(epoch: bytes, seq: int, duplicate: bool) -> bytes:
    """An ACK record: the order and seq the worker's oldest message in flight was given."""
    return record(Rec.ACK, ACK_HEAD.pack(epoch, seq, duplicate))


def replicate_record(room: str, epoch: bytes, seq: int, key: bytes, payload: bytes) -> bytes:
    """A REPLICATE record: a message the worker sequenced, with its resend key."""
    r = room.encode()
    return record(Rec.REPLICATE, MESSAGE_HEAD.pack(len(r), epoch, seq, 0.0) + r + KEY_LENGTH.pack(len(key))
                  + key + payload)


def parse_replicate(body: bytes) -> tuple[str, bytes, int, bytes, bytes]:
    """(room, epoch, seq, key, payload) of a REPLICATE record's body."""
    room, epoch, seq, rest, _ = parse_message(body)
    (klen,) = KEY_LENGTH.unpack_from(rest)
    return room, epoch, seq, rest[2:2 + klen], rest[2 + klen:]


def parse_ack(body: bytes) -> tuple[bytes, int, bool]:
    """(epoch, seq, duplicate) of an ACK record's body."""
    return ACK_HEAD.unpack(body)


def members_record(room: str, count: int) -> bytes:
    """A MEMBERS record: a room's member count (a worker's own, or the supervisor's total)."""
    r = room.encode()
    return record(Rec.MEMBERS, MEMBERS_HEAD.pack(len(r), count) + r)


def parse_members(body: bytes) -> tuple[str, int]:
    """(room, count) of a MEMBERS record's body."""
    rlen, count = MEMBERS_HEAD.unpack_from(body)
    return body[MEMBERS_HEAD.size:MEMBERS_HEAD.size + rlen].decode(), count


def encode_snapshot(room: str, flags: int, epoch: bytes, seq: int, items) -> bytes:
    """A snapshot record body: part of a room's last messages, each (payload, resend key); each part
    carries the room's order."""
    r = room.encode()
    parts = [SNAPSHOT_HEAD.pack(len(r), flags, epoch, seq, len(items)), r]
    for payload, key in items:
        parts += (LENGTH.pack(len(payload)), payload, KEY_LENGTH.pack(len(key)), key)
    return b"".join(parts)


def snapshot_records(room: str, epoch: bytes, seq: int, items: list, chunk: int = LINK_CHUNK, leased: bool = False):
    """A room's snapshot, items (payload, resend key), as records of about chunk bytes each, made one at
    a time; leased: the worker that gets it sequences the room from then on."""
    flags, i = SNAPSHOT_FIRST, 0
    while True:
        part, size = [], 0
        while i < len(items) and (not part or size + len(items[i][0]) <= chunk):
            part.append(items[i])
            size += len(items[i][0])
            i += 1
        if i == len(items):
            flags |= SNAPSHOT_LAST | (SNAPSHOT_LEASED if leased else 0)
        yield record(Rec.SNAPSHOT, encode_snapshot(room, flags, epoch, seq, part))
        if flags & SNAPSHOT_LAST:
            return
        flags = 0


def parse_snapshot(body: bytes) -> tuple[str, int, bytes, int, list]:
    """(room, flags, epoch, seq, items (payload, resend key)) from a snapshot record body."""
    rlen, flags, epoch, seq, count = SNAPSHOT_HEAD.unpack_from(body)
    pos = SNAPSHOT_HEAD.size
    room = body[pos:pos + rlen].decode()
    pos += rlen
    items = []
    for _ in range(count):
        (n,) = LENGTH.unpack_from(body, pos)
        payload = body[pos + 4:pos + 4 + n]
        pos += 4 + n
        (k,) = KEY_LENGTH.unpack_from(body, pos)
        items.append((payload, body[pos + 2:pos + 2 + k]))
        pos += 2 + k
    return room, flags, epoch, seq, items


class Pending:
    """A message handed to a remote bus (or held for it), until the sequencer answers.

    ``lane``: messages of one lane (a Redis Cluster hash slot; one lane otherwise)
    are sent in the order they came, never overtaking each other. ``attempt``
    counts sends, so a late reply to an earlier one is ignored; ``ask`` is the
    node a Redis Cluster ASK redirection named; ``epoch`` is the room's order
    as this process knew it when the message came (a new order must begin above
    it), then the sequencer's; ``seq`` and ``duplicate`` keep the sequencer's
    answer while the bus waits for replication.
    """

    __slots__ = ("ask", "attempt", "conn", "duplicate", "epoch", "key", "lane", "message_id", "prefix",
                 "resend", "room", "seq", "since", "size", "suffix", "t0")

    def __init__(self, room: Room, prefix: bytes, suffix: bytes, t0: float, conn, message_id,
                 key: bytes, resend: bool, since: float, lane: int = 0):
        self.room, self.epoch, self.prefix, self.suffix, self.t0 = room.name, room.epoch, prefix, suffix, t0
        self.conn, self.message_id, self.key, self.resend, self.since = conn, message_id, key, resend, since
        self.size = len(prefix) + len(suffix) + len(key) + HISTORY_ENTRY_COST
        self.lane, self.attempt, self.ask, self.seq, self.duplicate = lane, 0, None, 0, False


BUS_UNAVAILABLE = (ErrorCode.UNAVAILABLE, "message bus unavailable: send again later")


class RemoteBus:
    """What HubBus and RedisBus share: messages in flight and held while the bus is down.

    Both are bounded in bytes by --bus-hold-bytes (and the held ones in count by
    --bus-hold-count): past them a message is refused ``unavailable``. A message
    goes out at once when ``target(msg)`` names a way to its sequencer and none
    of its lane is held; otherwise it is held, and sent in order once the way
    opens. ``inflight`` maps each message sent and not yet answered to where
    it went, oldest first.
    """

    def __init__(self, loop: Server, chat: Chat):
        self.loop, self.chat, self.config = loop, chat, loop.config
        self.held: deque = deque()          # Pending, waiting for the bus
        self.held_bytes = 0
        self.held_lanes: dict = {}          # lane -> messages of it held: newer ones wait behind them
        self.capped = False                 # a held message waits for in-flight bytes to fall
        self.retry: list = []               # Pending to send again, oldest first, once the turn ends
        self.inflight: dict = {}            # Pending -> where it was sent, oldest first
        self.inflight_bytes = 0
        self.up = False
        loop.every(0.5, self._expire_held)

    def new_room(self, name: str) -> Room:
        """A room this process follows: ready once the sequencer sent its snapshot (Chat.on_snapshot)."""
        return Room(name, self.config, False)

    def room_opened(self, room: Room) -> None:
        """Someone here joined: subscribe; the sequencer answers with a snapshot, then live messages."""
        self.loop.stats.room_syncs += 1
        room.syncing = True
        self._subscribe(room.name)

    def room_unused(self, room: Room, now: float) -> None:
        """Nobody here is in room any more: follow it a while (a member coming back costs no snapshot)."""
        self.chat.linger(room, now)

    def sequenced_rooms(self) -> int:
        """None: the sequencer is elsewhere."""
        return 0

    def lane(self, room: str) -> int:
        """Messages of one lane keep their order (a remote bus with one way has one lane)."""
        return 0

    def target(self, msg: Pending):
        """Where msg can be sent now, or None to hold it."""
        return self if self.up else None

    def send_publish(self, msg: Pending, target) -> None:
        raise NotImplementedError

    def publish(self, room: Room, prefix: bytes, suffix: bytes, t0: float, conn, message_id,
                key: bytes = b"", resend: bool = False):
        """Send to the sequencer now, or hold while it is unreachable or busy."""
        msg = Pending(room, prefix, suffix, t0, conn, message_id, key, resend, self.loop.now,
                      self.lane(room.name))
        if not self.held_lanes.get(msg.lane):
            if self.inflight_bytes + msg.size <= self.config.bus_hold_bytes:
                target = self.target(msg)
                if target is not None:
                    self._send(msg, target)
                    return None
            else:
                self.capped = True
        if len(self.held) >= self.config.bus_hold_count or \
                self.held_bytes + msg.size > self.config.bus_hold_bytes:
            self.loop.stats.refused[Refused.BUS_DOWN] += 1
            return error_frame(*BUS_UNAVAILABLE, message_id)
        self._hold(msg)
        return None

    def _hold(self, msg: Pending) -> None:
        self.held.append(msg)
        self.held_bytes += msg.size
        self.held_lanes[msg.lane] = self.held_lanes.get(msg.lane, 0) + 1

    def _unhold(self, msg: Pending) -> None:
        self.held_bytes -= msg.size
        n = self.held_lanes[msg.lane] - 1
        if n:
            self.held_lanes[msg.lane] = n
        else:
            del self.held_lanes[msg.lane]

    def _send(self, msg: Pending, target) -> None:
        self.inflight[msg] = target
        self.inflight_bytes += msg.size
        msg.attempt += 1
        self.send_publish(msg, target)

    def _release_held(self) -> None:
        """Send the held messages whose way is open, oldest first; a lane never overtakes itself."""
        self.capped = False
        if not self.held:
            return
        cap, keep, blocked = self.config.bus_hold_bytes, deque(), set()
        for msg in self.held:
            target = None
            if msg.lane not in blocked:
                if self.inflight_bytes + msg.size > cap:
                    self.capped = True
                else:
                    target = self.target(msg)
            if target is None:
                blocked.add(msg.lane)
                keep.append(msg)
            else:
                self._unhold(msg)
                self._send(msg, target)
        self.held = keep

    def send_again(self, msg: Pending, delay: float = 0.0) -> None:
        """msg went unanswered (its way was lost or redirected): send it again, as a resend, before
        its lane's newer messages. Messages given here keep their order."""
        if self.inflight.pop(msg, None) is None:
            return
        self.inflight_bytes -= msg.size
        msg.resend = True                   # it may have been sequenced: the sequencer checks
        if not self.retry:
            self.loop.call_later(delay, self._flush_retry)
        self.retry.append(msg)
        self.held_lanes[msg.lane] = self.held_lanes.get(msg.lane, 0) + 1
        self.held_bytes += msg.size

    def _flush_retry(self) -> None:
        retry, self.retry = self.retry, []
        self.held.extendleft(reversed(retry))
        self._release_held()

    def on_answer(self, msg: Pending, epoch: bytes, seq: int | None, duplicate: bool = False) -> None:
        """The sequencer answered msg: ack it to its sender (or tell it the bus failed)."""
        if self.inflight.pop(msg, None) is None:
            return                          # answered already, or being sent again
        self.inflight_bytes -= msg.size
        conn = msg.conn
        if conn.state == OPEN and msg.message_id is not None:
            self.loop.send(conn, ack_frame(msg.message_id, epoch, seq, duplicate) if seq is not None else
                           error_frame(ErrorCode.UNAVAILABLE, "message bus failed: send again later", msg.message_id))
        if self.capped:
            self._release_held()

    def _expire_held(self) -> None:
        held, limit = self.held, self.loop.now - self.config.bus_hold_seconds
        while held and held[0].since < limit:
            msg = held.popleft()
            self._unhold(msg)
            self.loop.stats.refused[Refused.BUS_DOWN] += 1
            if msg.conn.state == OPEN:
                self.loop.send(msg.conn, error_frame(*BUS_UNAVAILABLE, msg.message_id))

    def set_up(self, up: bool) -> None:
        """Record the bus state; on coming up, send what was held, in order."""
        self.up = up
        self.loop.stats.bus_up = int(up)
        if up:
            self._release_held()


class HubBus(RemoteBus):
    """A worker's side of the supervisor link: publish, subscribe, receive in order.

    A room that no other worker follows (with --room-affinity: every room whose
    members all reach their room's worker) is leased to this one: it sequences
    the room itself, as LocalBus does, and writes each message to the
    supervisor on a socket of its own (``replica``, REPLICATE records), which the
    supervisor reads every REPLICA_READ_INTERVAL, not per message: writing to it
    wakes no one. When a burst fills that socket, the worker rings the supervisor's
    doorbell (a pipe it watches) to have it read now. No byte leaves for a client
    before the records queued before it are in that socket (Server.write_barrier),
    so the supervisor's copy holds every
    message delivered or acknowledged: if this worker dies, its successor takes
    the room over from that copy and continues the order. When another worker
    follows the room too, the supervisor takes it back (REVOKE); this worker
    answers RELEASED behind the room's last REPLICATE, and the supervisor
    sequences the room as any other. Nothing on the main link overtakes the
    replica (``Link.behind``), and the supervisor reads the replica before what
    the main link brings, so every record of a lease comes before what follows it.
    """

    def __init__(self, loop: Server, chat: Chat, sock: socket.socket, replica: socket.socket,
                 doorbell: int | None = None):
        super().__init__(loop, chat)
        self.reader = RecordReader()
        self.snapshots: dict = {}           # room -> items of a snapshot still arriving
        self.replica = Link(loop, replica, self._on_data, self._on_closed)    # first: flushed first
        self.link = Link(loop, sock, self._on_data, self._on_closed)
        self.link.behind = self.replica
        self.replica.on_drained = self._replica_drained
        self.doorbell = doorbell
        self.replica.on_full = self._ring
        # Messages of a room whose snapshot has not come: whether this worker sequences
        # them is not known yet. Bounded by the rate limit of its joiners, for a round trip.
        self.unready: dict = {}             # room -> [publish arguments, ...]
        self.set_up(True)

    def publish(self, room: Room, prefix: bytes, suffix: bytes, t0: float, conn, message_id,
                key: bytes = b"", resend: bool = False):
        """Sequence it here if the room is leased to this worker, else send it to the supervisor
        (RemoteBus); once the room's snapshot said which."""
        if not room.ready:
            self.unready.setdefault(room.name, []).append((room, prefix, suffix, t0, conn, message_id, key, resend))
            return None
        if not room.leased:
            return super().publish(room, prefix, suffix, t0, conn, message_id, key, resend)
        seq, payload = room.sequence(prefix, suffix, key, resend)
        if payload is not None:
            self.replica.write(replicate_record(room.name, room.epoch, seq, key, payload))
            self.loop.stats.leased_messages += 1
            self.chat.deliver(room, seq, encode_frame(OP_TEXT, payload), t0, key)
        if message_id is not None:
            self.chat.send(conn, ack_frame(message_id, room.epoch, seq, payload is None))
        return None

    def _ring(self) -> None:
        """The replica socket is full: client writes wait for the supervisor to read it, so ask now."""
        self.loop.stats.replica_full += 1
        if self.doorbell is not None:
            try:
                os.write(self.doorbell, b"!")
            except OSError:                 # full (rung already and not heard yet), or the supervisor is gone
                pass

    def _replica_drained(self) -> None:
        """The supervisor's socket took every record: the main link and held client writes may go."""
        if self.link.pending:
            self.link.flush()
        self.loop.release_writes()

    def _publish_unready(self, name: str) -> None:
        """The room's snapshot came: its messages that waited for it go as any other."""
        for room, prefix, suffix, t0, conn, message_id, key, resend in self.unready.pop(name, ()):
            if conn.state == OPEN and conn.room is room:
                error = self.publish(room, prefix, suffix, t0, conn, message_id, key, resend)
                if error is not None:
                    self.loop.send(conn, error)

    def send_publish(self, msg: Pending, _target) -> None:
        """Hand a message to the supervisor, which sequences it (and answers in order)."""
        self.link.write(publish_record(msg.room, msg.t0, msg.prefix, msg.suffix, msg.key, msg.resend))

    def _subscribe(self, name: str) -> None:
        self.link.write(record(Rec.SUBSCRIBE, name.encode()))

    def room_closed(self, room: Room) -> None:
        """Unsubscribe (a lease ends with it)."""
        room.leased = False
        self.snapshots.pop(room.name, None)
        self.unready.pop(room.name, None)
        self.link.write(record(Rec.UNSUBSCRIBE, room.name.encode()))

    def resync(self, room: Room) -> None:
        """The supervisor link is ordered; a gap cannot happen, so this only logs."""
        log.error("room %s: gap on the supervisor link", room.name)

    def report_members(self, room: Room, count: int) -> None:
        """Tell the supervisor how many of room's members are on this worker; it sums them."""
        self.link.write(members_record(room.name, count))

    def send_stats(self, stats: Stats) -> None:
        """Report this worker's counters to the supervisor."""
        self.link.write(record(Rec.STATS, json.dumps(stats.to_dict()).encode()))

    def _on_data(self, data: bytes) -> None:
        chat = self.chat
        for kind, body in self.reader.feed(data):
            if kind == Rec.MESSAGE:
                room, epoch, seq, payload, t0 = parse_message(body)
                chat.on_bus_message(room, epoch, seq, payload, t0 or None)
            elif kind == Rec.ACK:
                self.on_answer(next(iter(self.inflight)), *parse_ack(body))
            elif kind == Rec.MEMBERS:
                chat.on_members(*parse_members(body))
            elif kind == Rec.SNAPSHOT:
                room, flags, epoch, seq, items = parse_snapshot(body)
                if flags & SNAPSHOT_FIRST:
                    self.snapshots[room] = []
                parts = self.snapshots.get(room)
                if parts is None:
                    continue                # the rest of a snapshot for a room closed meanwhile
                parts.extend(items)
                if flags & SNAPSHOT_LAST:
                    del self.snapshots[room]
                    if flags & SNAPSHOT_LEASED and (ready := chat.rooms.get(room)) is not None:
                        ready.leased = True
                    chat.on_snapshot(room, epoch, seq, [p for p, _ in parts], keys=[k for _, k in parts])
                    self._publish_unready(room)
            elif kind == Rec.SPREAD:
                handoff = self.loop.handoff
                if handoff is not None:
                    (handoff.spread.add if body[0] else handoff.spread.discard)(body[1:].decode())
            elif kind == Rec.REVOKE:        # another worker follows the room now: the supervisor sequences it
                room = chat.rooms.get(body.decode())
                if room is not None:
                    room.leased = False
                self.replica.write(record(Rec.RELEASED, body))

    def _on_closed(self) -> None:
        log.warning("supervisor link closed: draining")
        self.set_up(False)
        self.loop.request_stop()


class HubRoom(Sequenced):
    """A room as the --workers supervisor sequences it, or keeps it while a worker does (leased): its
    order and history of payloads, the workers that follow it, and the members each has."""

    __slots__ = ("counts", "leased", "revoking", "spread", "subs", "total")

    def __init__(self, name: str, config):
        super().__init__(name, config, new_epoch())
        self.subs: dict = {}                          # Worker -> None
        self.counts: dict = {}                        # Worker -> members there
        self.total = 0
        self.leased = None                            # the Worker that sequences it, if one does
        self.revoking: list = []                      # Workers whose snapshot waits for the lease to end
        self.spread = False                           # big: new members stay on the worker that accepted them

    def count(self, worker, members: int) -> bool:
        """worker has this many members here now (0: none, or gone); whether the total changed."""
        if members:
            self.counts[worker] = members
        else:
            self.counts.pop(worker, None)
        total = sum(self.counts.values())
        changed, self.total = total != self.total, total
        return changed


class Worker:
    """A worker process as the supervisor sees it."""

    def __init__(self, slot: int, proc: subprocess.Popen, link: Link, replica: socket.socket):
        self.slot, self.proc, self.link = slot, proc, link
        self.reader = RecordReader()
        self.replica = replica              # what it sequenced (HubBus.replica), read by Supervisor.read_replica
        self.replica_reader = RecordReader()
        self.leases = 0                     # rooms leased to it: its replica socket is read only then
        self.stats: dict | None = None
        self.started = time.monotonic()


REPLICA_READ_INTERVAL = 0.02  # seconds between the supervisor's reads of what its workers sequenced


class Supervisor(EventLoop):
    """--workers N: starts N server processes on one port (SO_REUSEPORT), restarts
    any that dies, and keeps the order of every room. A room followed by one
    worker only (with --room-affinity, nearly all) is leased to it: the worker
    sequences it and this supervisor keeps a copy, read from the worker's replica
    socket every REPLICA_READ_INTERVAL (or at once when the worker rings: its socket
    is full), off the message's path; a successor continues from that copy. Any
    other room it sequences itself: a worker sends it each message, it assigns the
    seq, keeps the history and forwards the message to the workers with members in
    the room, in one order for all."""

    def __init__(self, config, worker_flags: list, worker_env: dict):
        """worker_flags and worker_env: every worker's command line flags and environment."""
        super().__init__()
        self.config = config
        self.worker_flags, self.worker_env = worker_flags, worker_env
        self.workers: dict[int, Worker] = {}
        self.rooms: dict[str, HubRoom] = {}
        self.budget = HistoryBudget(config.history_bytes, self._forget_if_unused)
        self.retired = Stats()               # counters of workers that have exited
        self.retired.bus_up = 0
        self.stats = Stats()                 # the supervisor's own: collector pauses, internal errors
        self.stats.bus_up = 0
        self.gc_watch = GcWatch(self.stats, config.gc_freeze)
        self.every(0.25, self.gc_watch.freeze_if_due)
        self.draining = False
        self.drain_deadline = 0.0
        self.backoff: dict[int, float] = {}
        # --room-affinity: each slot's hand-off link (its inbox, the end others send on), made
        # once and never read here: a restarted worker gets the same inbox, and the others'
        # sending ends stay valid (Handoff).
        self.handoff_links = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                              for _ in range(config.workers)] if config.room_affinity else []
        # Which worker owns a room is a hash keyed with this secret, so no client can aim its rooms
        # at one worker; and the workers share a table of their loads, so a full owner is passed over.
        key = os.environ.get("SCALECHAT_AFFINITY_KEY") or os.urandom(16).hex()
        self.worker_env = {**worker_env, "SCALECHAT_AFFINITY_KEY": key}
        self.loads = os.memfd_create("scalechat-loads")
        os.ftruncate(self.loads, LOAD.size * config.workers)
        # One pipe for every worker: a worker whose replica socket is full writes a byte to it.
        self.doorbell, self.doorbell_w = os.pipe()
        for end in (self.doorbell, self.doorbell_w):
            os.set_blocking(end, False)
        self.sel.register(self.doorbell, selectors.EVENT_READ, self._on_doorbell)
        for slot in range(config.workers):
            self._spawn(slot)
        self.every(0.2, self._reap)
        self.every(REPLICA_READ_INTERVAL, self.read_replicas)

    def _spawn(self, slot: int) -> None:
        ours, theirs = socket.socketpair()
        replica, their_replica = socket.socketpair()
        replica.setblocking(False)
        handoff = [inbox if s == slot else into for s, (inbox, into) in enumerate(self.handoff_links)]
        fds = [theirs.fileno(), their_replica.fileno(), *(end.fileno() for end in handoff)]
        cmd = [sys.executable, os.path.abspath(__file__), *self.worker_flags, "--workers", "1",
               "--metrics-port", "0", "--worker-id", str(slot), "--worker-count", str(self.config.workers),
               "--hub-fd", str(theirs.fileno()), "--replica-fd", str(their_replica.fileno()),
               "--doorbell-fd", str(self.doorbell_w)]
        if handoff:
            fds.append(self.loads)
            cmd += ["--handoff-fds", ",".join(map(str, fds[2:]))]
        proc = subprocess.Popen(cmd, pass_fds=[*fds, self.doorbell_w],    # these alone: the rest are close-on-exec
                                env=self.worker_env)
        theirs.close()
        their_replica.close()
        worker = Worker(slot, proc, None, replica)
        worker.link = Link(self, ours, lambda data: self._on_data(worker, data),
                           lambda: self._unsubscribe_all(worker))
        self.workers[slot] = worker
        log.info("worker %d started (pid %d)", slot, proc.pid)

    def _reap(self) -> None:
        for slot, worker in list(self.workers.items()):
            code = worker.proc.poll()
            if code is None:
                if self.draining and self.now > self.drain_deadline + 5:
                    worker.proc.kill()
                continue
            del self.workers[slot]
            worker.link.close()
            self.read_replica(worker)       # nothing of it may be left unread (_unsubscribe_all read it)
            worker.replica.close()
            self._retire(worker)
            if self.draining:
                continue
            lived = time.monotonic() - worker.started
            delay = 0.0 if lived > 5 else min(max(self.backoff.get(slot, 0.1) * 2, 0.2), 5.0)
            self.backoff[slot] = delay
            log.warning("worker %d (pid %d) exited with %s after %.1fs; restarting in %.1fs",
                        slot, worker.proc.pid, code, lived, delay)
            self.call_later(delay, lambda s=slot: None if self.draining else self._spawn(s))
        if self.draining and not self.workers:
            self.running = False

    def _retire(self, worker: Worker) -> None:
        if worker.stats:
            counters = dict(worker.stats, connections=0, rooms=0, draining=0, bus_up=0, history_bytes=0,
                            sequenced_rooms=0)
            self.retired.add(counters)

    def _unsubscribe_all(self, worker: Worker) -> None:
        self.read_replica(worker)           # what it sequenced before it went: its successor continues from it
        for room in list(self.rooms.values()):
            self._unsubscribe(worker, room)

    def _unsubscribe(self, worker: Worker, room: HubRoom) -> None:
        if room.leased is worker:           # everything it sequenced came before
            self._end_lease(room)
        if room.subs.pop(worker, 0) is None:
            worker.link.cancel(room.name)
            if room.count(worker, 0):
                self._send_total(room)
            if not room.subs and not room.history:
                del self.rooms[room.name]

    def _send_total(self, room: HubRoom) -> None:
        rec = members_record(room.name, room.total)
        for sub in room.subs:
            sub.link.write(rec)
        threshold = self.config.spread_members
        if threshold and room.spread != (room.total >= (threshold // 2 if room.spread else threshold)):
            room.spread = not room.spread   # every worker hears: any of them may accept a member
            rec = record(Rec.SPREAD, bytes((room.spread,)) + room.name.encode())
            for worker in self.workers.values():
                worker.link.write(rec)

    def _forget_if_unused(self, room: HubRoom) -> None:
        if not room.subs:
            del self.rooms[room.name]

    def _subscribe(self, worker: Worker, name: str) -> None:
        """worker follows a room: its snapshot, and the lease when it is the only one (--room-affinity).

        First, what every worker has sequenced so far: the snapshot holds all that any
        member anywhere was sent, and the history budget counts it (reading one
        early is safe: a lease's records all answer something this supervisor sent)."""
        self.read_replicas()
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = HubRoom(name, self.config)
        room.subs[worker] = None
        worker.link.write(members_record(name, room.total))     # before the snapshot: its welcome counts all
        if room.leased is not None:         # the worker that sequences it must stop first
            if not room.revoking:           # behind the lease's snapshot, if it is still on its way
                room.leased.link.write_after(name, record(Rec.REVOKE, name.encode()))
            room.revoking.append(worker)
            return
        lease = self.config.room_affinity and len(room.subs) == 1
        if lease:
            room.leased = worker
            worker.leases += 1
        self._send_snapshot(worker, room, lease)

    def _send_snapshot(self, worker: Worker, room: HubRoom, lease: bool = False) -> None:
        worker.link.write_lazily(room.name, snapshot_records(room.name, room.epoch, room.seq,
                                                             room.history.items_and_keys(), leased=lease))

    def _end_lease(self, room: HubRoom) -> None:
        """The leaseholder stopped (or left): this supervisor sequences the room; the workers waiting
        for it get their snapshot."""
        room.leased.leases -= 1
        room.leased = None
        waiting, room.revoking = room.revoking, []
        for worker in waiting:
            if worker in room.subs:
                self._send_snapshot(worker, room)

    def _replicate(self, worker: Worker, body: bytes) -> None:
        """Keep a message that a leaseholder sequenced."""
        name, epoch, seq, key, payload = parse_replicate(body)
        room = self.rooms.get(name)
        if room is None or room.leased is not worker or epoch != room.epoch or seq != room.seq + 1:
            log.error("room %s: worker %d sent seq %d of a room it does not sequence", name, worker.slot, seq)
            return
        room.keep(self.budget, seq, payload, key)

    def _on_doorbell(self, _events: int) -> None:
        """A worker's replica socket is full, and its clients' writes wait for it: read them all now."""
        try:
            while os.read(self.doorbell, 4096):
                pass
        except BlockingIOError:
            pass
        self.read_replicas()

    def read_replicas(self) -> None:
        """Every REPLICA_READ_INTERVAL: keep what each worker sequenced since the last time."""
        for worker in list(self.workers.values()):
            self.read_replica(worker)

    def read_replica(self, worker: Worker) -> None:
        """Keep what worker sequenced (REPLICATE) up to now, and end the leases it gave back (RELEASED).

        Called before anything the worker's main link brings is handled: a record
        there was written after every replica record before it, which is in the
        socket by then (HubBus), so the leases' records always come first. A worker
        without a lease writes nothing there: its socket is not read."""
        while worker.leases and worker.replica.fileno() != -1 and (data := recv_some(worker.replica)):
            for kind, body in worker.replica_reader.feed(data):
                if kind == Rec.REPLICATE:
                    self._replicate(worker, body)
                elif kind == Rec.RELEASED:
                    room = self.rooms.get(body.decode())
                    if room is not None and room.leased is worker:
                        self._end_lease(room)

    def _on_data(self, worker: Worker, data: bytes) -> None:
        self.read_replica(worker)
        for kind, body in worker.reader.feed(data):
            if kind == Rec.PUBLISH:
                self._sequence(worker, body)
            elif kind == Rec.SUBSCRIBE:
                self._subscribe(worker, body.decode())
            elif kind == Rec.UNSUBSCRIBE:
                room = self.rooms.get(body.decode())
                if room is not None:
                    self._unsubscribe(worker, room)
            elif kind == Rec.STATS:
                worker.stats = json.loads(body)
            elif kind == Rec.MEMBERS:
                name, count = parse_members(body)
                room = self.rooms.get(name)
                if room is not None and worker in room.subs:
                    if room.count(worker, count):
                        self._send_total(room)
                    else:                   # the reporter still needs it: its own share moved
                        worker.link.write(members_record(name, room.total))

    def _sequence(self, worker: Worker, body: bytes) -> None:
        """Assign a published message its room's next seq, keep it, forward it, ack it."""
        name, t0, prefix, suffix, key, resend = parse_publish(body)
        room = self.rooms.get(room_name := name.decode())
        if room is None:                    # its members left before the message got here
            room = self.rooms[room_name] = HubRoom(room_name, self.config)
        seq, payload = room.sequence(prefix, suffix, key, resend)
        if payload is None:
            worker.link.write(ack_record(room.epoch, seq, True))
            return
        room.keep(self.budget, seq, payload, key)
        rec = message_record(name, room.epoch, seq, t0, payload)
        for sub in room.subs:
            sub.link.write(rec)
        worker.link.write(ack_record(room.epoch, seq, False))

    def total_stats(self) -> Stats:
        """All workers' counters added up, with those of workers that exited."""
        total = Stats()
        total.bus_up = 0
        total.add(self.retired.to_dict())
        total.add(self.stats.to_dict())
        live = [w.stats for w in list(self.workers.values()) if w.stats]
        for d in live:
            total.add(d)
        total.bus_up = int(bool(live) and all(d["bus_up"] for d in live))
        total.draining = int(self.draining)
        if not self.config.redis:
            total.rooms = sum(1 for r in list(self.rooms.values()) if r.subs)
            total.history_bytes += self.budget.used
            total.sequenced_rooms = len(self.rooms)
        return total

    def pids(self) -> list:
        """The supervisor's and its workers' process ids."""
        return [os.getpid(), *(w.proc.pid for w in list(self.workers.values()))]

    def on_stop(self) -> None:
        """SIGTERM/SIGINT: every worker drains; stop when all have exited."""
        if self.draining:
            return
        log.info("draining %d workers", len(self.workers))
        self.draining = True
        self.drain_deadline = self.now + self.config.drain_timeout
        for worker in self.workers.values():
            worker.proc.send_signal(signal.SIGTERM)

    def on_stop_again(self) -> None:
        """A second signal: pass it on, so workers stop without waiting."""
        for worker in self.workers.values():
            worker.proc.send_signal(signal.SIGTERM)


# ---------------------------------------------------------------------------
# 7. Redis (--redis): RESP, the scripts, the cluster, the bus
# ---------------------------------------------------------------------------

class RespError(Exception):
    """An error reply from Redis."""


def resp_command(*args) -> bytes:
    """A RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)


class RespParser:
    """Incremental RESP2 reply parser: bytes in, replies out.

    It keeps the arrays being filled on a stack and the length of the bulk
    string it waits for, so each byte is parsed once however replies are cut
    (a large snapshot arrives in many reads).
    """

    def __init__(self):
        self.buf = bytearray()
        self.pos = 0
        self.stack: list = []               # [items, still expected] of each open array
        self.bulk = -1                      # length of the bulk string awaited, or -1

    def feed(self, data: bytes) -> list:
        """The replies completed by data (RespError objects for error replies)."""
        buf = self.buf
        buf += data
        pos, end, out, stack = self.pos, len(buf), [], self.stack
        while True:
            if self.bulk >= 0:
                if end - pos < self.bulk + 2:
                    break
                value = bytes(buf[pos:pos + self.bulk])
                pos += self.bulk + 2
                self.bulk = -1
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                kind, line = buf[pos], bytes(buf[pos + 1:eol])
                pos = eol + 2
                if kind == 0x24:            # $ bulk string
                    self.bulk = int(line)
                    if self.bulk >= 0:
                        continue
                    value = None
                elif kind == 0x2A:          # * array
                    n = int(line)
                    if n > 0:
                        stack.append([[], n])
                        continue
                    value = [] if n == 0 else None
                elif kind == 0x2B:          # + simple string
                    value = line.decode()
                elif kind == 0x2D:          # - error
                    value = RespError(line.decode())
                elif kind == 0x3A:          # : integer
                    value = int(line)
                else:
                    raise ValueError(f"bad RESP type byte {kind!r}")
            while stack:                    # place the value; close the arrays it completes
                top = stack[-1]
                top[0].append(value)
                top[1] -= 1
                if top[1]:
                    break
                value = stack.pop()[0]
            else:
                out.append(value)
        self.pos = compact(buf, pos)
        return out


# A room's state is one hash: its order's epoch ("e"), its last seq ("n") and
# the resend index (key -> seq, one field per held message with a key), so the
# seq, its epoch and the index are kept, expire and are evicted together. With
# no state (a new room, or its state expired, was evicted or flushed) the script
# begins a new order: a new epoch (Redis's clock in ms, above the epoch the
# publishing node knew, ARGV[11], then ARGV[12]'s random digits), at seq 1, and
# drops whatever keys of the old order outlived it. The history, its order
# entries ("<seq> <key>[ <origin>]") and their byte count must agree; if one was
# evicted apart from the others they start over (history is only ever trimmed,
# never wrong). Then: drop a resent message whose key (client id and message_id)
# the index holds, answering its seq; else count the seq, splice the order and
# seq into the JSON, keep history bounded in count and bytes (the index shrinking
# with it), let the room expire when idle, and publish "<seq> <epoch> <origin
# tag>\n<json>" so nodes learn the order without parsing JSON. Every step is O(1)
# per message (trimming is paid once per message trimmed). With ARGV[10] empty (a
# Redis Cluster shard with replicas) it publishes nothing: FLUSH_SCRIPT does, once
# the write is on the replicas, and the origin tag waits in the order entry till then.
# KEYS: state, history, order, bytes, published (the last seq published, kept on a cluster)
# ARGV: prefix, suffix, max count, channel, origin tag, key, resend, max bytes, ttl,
#       publish now: 'P' (PUBLISH), 'S' (SPUBLISH) or '' (later), epoch floor, epoch digits
# Returns {seq, 1 if a resend already held else 0, epoch}.
PUBLISH_SCRIPT = b"""
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if ARGV[11] ~= '' then ms = math.max(ms, tonumber(string.sub(ARGV[11], 1, 11), 16) + 1) end
  e = string.format('%011x', ms) .. ARGV[12]
  redis.call('HSET', KEYS[1], 'e', e)
elseif ARGV[7] == '1' and ARGV[6] ~= '' then
  local seen = redis.call('HGET', KEYS[1], ARGV[6])
  if seen then return {tonumber(seen), 1, e} end
end
local seq = redis.call('HINCRBY', KEYS[1], 'n', 1)
local msg = ARGV[1] .. '"epoch":"' .. e .. '","seq":' .. seq .. ARGV[2]
local entry = seq .. ' ' .. ARGV[6]
if ARGV[10] == '' then entry = entry .. ' ' .. ARGV[5] end
local size = #msg + #ARGV[6]
local n = redis.call('RPUSH', KEYS[2], msg)
local bytes = redis.call('INCRBY', KEYS[4], size)
if redis.call('RPUSH', KEYS[3], entry) ~= n or (n > 1 and bytes == size) then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[1])
  redis.call('HSET', KEYS[1], 'e', e, 'n', seq)
  n = redis.call('RPUSH', KEYS[2], msg)
  redis.call('RPUSH', KEYS[3], entry)
  bytes = redis.call('INCRBY', KEYS[4], size)
end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], ARGV[6], seq) end
while n > tonumber(ARGV[3]) or (bytes > tonumber(ARGV[8]) and n > 1) do
  local old = redis.call('LPOP', KEYS[2])
  local oldentry = redis.call('LPOP', KEYS[3])
  local sp = string.find(oldentry, ' ', 1, true)
  local sp2 = string.find(oldentry, ' ', sp + 1, true)
  local oldkey = string.sub(oldentry, sp + 1, sp2 and sp2 - 1 or -1)
  if oldkey ~= '' and redis.call('HGET', KEYS[1], oldkey) == string.sub(oldentry, 1, sp - 1) then
    redis.call('HDEL', KEYS[1], oldkey)
  end
  bytes = redis.call('DECRBY', KEYS[4], #old + #oldkey)
  n = n - 1
end
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[9]) end
if ARGV[10] == 'P' then
  redis.call('PUBLISH', ARGV[4], seq .. ' ' .. e .. ' ' .. ARGV[5] .. '\\n' .. msg)
elseif ARGV[10] == 'S' then
  redis.call('SPUBLISH', ARGV[4], seq .. ' ' .. e .. ' ' .. ARGV[5] .. '\\n' .. msg)
  redis.call('SET', KEYS[5], seq, 'EX', ARGV[9])
end
return {seq, 0, e}
"""
# A Redis Cluster shard with replicas: publish, in seq order, every message up
# to ARGV[1] not yet published. The caller's WAIT has seen its own write (seq
# ARGV[1] of order ARGV[4]) on the replicas, and every lower seq was written
# before it, so a failover cannot take back anything published. Whoever flushes
# first publishes the others' messages too: the channel never runs out of order.
# -1 if that order is gone (the room's state was lost after the write): the
# message was never published, and must be sent again.
# KEYS: state, history, order, published (the last seq published). ARGV: up to, channel, ttl, epoch
FLUSH_SCRIPT = b"""
local e = redis.call('HGET', KEYS[1], 'e')
if e ~= ARGV[4] then return -1 end
local seq = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
local upto = math.min(tonumber(ARGV[1]), seq)
local pub = tonumber(redis.call('GET', KEYS[4]) or '0')
if upto <= pub then return 0 end
local first = math.max(pub + 1, seq - redis.call('LLEN', KEYS[2]) + 1)
local msgs = redis.call('LRANGE', KEYS[2], first - seq - 1, upto - seq - 1)
local order = redis.call('LRANGE', KEYS[3], first - seq - 1, upto - seq - 1)
for i = 1, #msgs do
  local entry = order[i] or ''
  local sp = string.find(entry, ' ', 1, true)
  local sp2 = sp and string.find(entry, ' ', sp + 1, true)
  local origin = sp2 and string.sub(entry, sp2 + 1) or '- 0'
  redis.call('SPUBLISH', ARGV[2], (first + i - 1) .. ' ' .. e .. ' ' .. origin .. '\\n' .. msgs[i])
end
redis.call('SET', KEYS[4], upto, 'EX', ARGV[3])
return #msgs
"""
# A replica promoted before it had every write keeps the room's order but a
# lower seq, and nodes would drop the next messages as duplicates: each node
# first raises the seq of the order it knows (ARGV[3]) to what it has delivered.
# Nothing below the floor is published again. A room with no state, or in
# another order, is left alone: its next message begins a new order anyway.
# KEYS: state, published. ARGV: floor, ttl, epoch
SEQ_FLOOR_SCRIPT = b"""
if redis.call('HGET', KEYS[1], 'e') ~= ARGV[3] then return -1 end
local cur = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
if cur < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'n', ARGV[1])
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
end
return cur
"""
# A room's member total in its members hash ("=": "<total> <version>"; a total
# kept before versions has none: version 0). Both scripts that read it start so.
MEMBER_TOTAL_LUA = b"""
local function total_and_version(sum)
  local sp = string.find(sum, ' ', 1, true)
  if not sp then return tonumber(sum), 0 end
  return tonumber(string.sub(sum, 1, sp - 1)), tonumber(string.sub(sum, sp + 1))
end
"""
# The room's order (epoch, '' if it has none, and seq) and its last ARGV[1]
# messages. On a shard with replicas (ARGV[2] empty) only up to the last seq
# published: a message no member has been sent yet may still be lost in a
# failover, so no joiner sees it first. The fourth item is the room's member
# count, as the last presence report summed it, and the fifth that sum's version.
# KEYS: state, history, published, members
SNAPSHOT_SCRIPT = MEMBER_TOTAL_LUA + b"""
local e = redis.call('HGET', KEYS[1], 'e') or ''
local seq = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
local members, version = total_and_version(redis.call('HGET', KEYS[4], '=') or '0')
local upto = seq
if ARGV[2] == '' then upto = math.min(seq, tonumber(redis.call('GET', KEYS[3]) or '0')) end
if upto == 0 then return {e, 0, {}, members, version} end
return {e, upto, redis.call('LRANGE', KEYS[2], upto - seq - tonumber(ARGV[1]), upto - seq - 1), members, version}
"""

# Presence: each process keeps "<count> <expiry ms>" under its tag in the room's
# members hash; a report sums the fields not expired (dropping the others), keeps
# "<total> <version>" under "=", and publishes "m <total> <version>" when the
# total moved. Each new total gets a higher version (Redis's clock in ms, or the
# last one + 1), so a process that hears totals on two links (this answer, and
# the room's channel) keeps the newest. The hash and every field expire when no
# process refreshes them, so a process that dies is forgotten.
# KEYS: members. ARGV: tag, count, ttl ms, channel, 'P' or 'S' (PUBLISH or SPUBLISH)
# Returns {total, version}.
PRESENCE_SCRIPT = MEMBER_TOTAL_LUA + b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. (now + tonumber(ARGV[3])))
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local fields = redis.call('HGETALL', KEYS[1])
local total, last, version = 0, -1, 0
for i = 1, #fields, 2 do
  if fields[i] == '=' then
    last, version = total_and_version(fields[i + 1])
  else
    local sp = string.find(fields[i + 1], ' ', 1, true)
    if tonumber(string.sub(fields[i + 1], sp + 1)) < now then
      redis.call('HDEL', KEYS[1], fields[i])
    else
      total = total + tonumber(string.sub(fields[i + 1], 1, sp - 1))
    end
  end
end
if total ~= last then
  version = math.max(version + 1, now)
  redis.call('HSET', KEYS[1], '=', total .. ' ' .. version)
  local note = 'm ' .. total .. ' ' .. version .. '\\n'
  if ARGV[5] == 'S' then redis.call('SPUBLISH', ARGV[4], note)
  else redis.call('PUBLISH', ARGV[4], note) end
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {total, version}
"""
PRESENCE_REFRESH = 10.0       # seconds between a process's refreshes of its member counts in Redis
PRESENCE_TTL_MS = 30_000      # a process that stops refreshing is no longer counted after this

REDIS_NODE = re.compile(r"([A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?")     # fullmatch
REDIS_URL_FORM = "--redis must be redis://[:password@]host[:port][,host[:port]...][/db]"


def parse_redis_url(url: str) -> tuple[list, int, str | None]:
    """([(host, port), ...], db, password) from redis://[:password@]host[:port][,host[:port]...][/db].

    One node is a Redis; several are seeds of a Redis Cluster (any one finds the
    rest). The URL may hold a password: no error echoes it.
    """
    scheme, sep, rest = url.partition("://")
    netloc, _, db = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    nodes = []
    for item in hosts.split(","):
        found = REDIS_NODE.fullmatch(item)
        if found is None:
            raise ValueError(REDIS_URL_FORM)
        port = int(found.group(2) or 6379)
        if not 0 < port < 65536:
            raise ValueError(REDIS_URL_FORM)
        nodes.append((found.group(1).strip("[]"), port))
    if scheme != "redis" or not sep or not (db.isascii() and db.isdigit() or db == ""):
        raise ValueError(REDIS_URL_FORM)
    password = userinfo.partition(":")[2] if at and ":" in userinfo else None
    return nodes, int(db or 0), password or None


CLUSTER_SLOTS = 16384


def _crc16_table() -> list:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = (crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


CRC16_TABLE = _crc16_table()


def key_slot(key: bytes) -> int:
    """The Redis Cluster hash slot of a key: CRC16 (XMODEM) of its {hash tag} if it has one, mod 16384."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    crc = 0
    for byte in key:
        crc = ((crc << 8) & 0xFF00) ^ CRC16_TABLE[(crc >> 8) ^ byte]
    return crc % CLUSTER_SLOTS


@functools.lru_cache(maxsize=4096)
def room_slot(room: str) -> int:
    """A room's hash slot (its name is the hash tag of its keys), remembered for busy rooms:
    the slot is asked for every message on a cluster."""
    return key_slot(room.encode())


class RedisNode:
    """One Redis server of the bus: a command link and a subscriber link, replies matched in order."""

    __slots__ = ("addr", "backoff", "callbacks", "cmd", "cmd_parser", "connected", "replicas", "sub",
                 "sub_parser", "unsubscribing", "up")

    def __init__(self, addr: tuple):
        self.addr = addr
        self.cmd = self.sub = None
        self.cmd_parser = self.sub_parser = None
        self.callbacks: deque = deque()     # (callback, sent_at) per command in flight
        self.connected = 0                  # links connected
        self.up = False                     # scripts loaded: messages may go here
        self.replicas = 0                   # a cluster master's replicas: WAIT for them
        self.backoff = 0.0
        self.unsubscribing: dict = {}       # channel -> our unsubscribes not yet confirmed

    def call(self, now: float, args: tuple, callback) -> None:
        """Send a command; callback(reply) runs when its reply comes (None: only errors are logged)."""
        self.cmd.write(resp_command(*args))
        self.callbacks.append((callback, now))

    def __repr__(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"


# Replies of a Redis Cluster node that mean "not here, or not now": the message
# was not run, so it is sent again (after the slot map is refreshed, if it moved).
REDIS_SCRIPTS = (PUBLISH_SCRIPT, FLUSH_SCRIPT, SEQ_FLOOR_SCRIPT, PRESENCE_SCRIPT, SNAPSHOT_SCRIPT)
TOPOLOGY_REFRESH = 5.0       # seconds between slot-map refreshes of a healthy cluster
RETRY_LATER = ("TRYAGAIN", "CLUSTERDOWN", "LOADING", "MASTERDOWN", "NOSCRIPT", "READONLY")


class RedisTopology:
    """Where a room's keys live: one Redis, or the masters of a Redis Cluster and the slots each owns.

    Each node gets a command link and a subscriber link, authenticated, with the
    scripts loaded; a cluster's slot map is read (CLUSTER SLOTS) at the start,
    every few seconds, and at once when a master is lost or answers MOVED. A
    node that is lost is connected again with backoff. The bus hears when a
    node is up (node_up) or lost (node_lost), and when the map changed (map_changed).
    """

    def __init__(self, loop: EventLoop, bus, url: str):
        self.loop, self.bus = loop, bus
        self.seeds, self.db, self.password = parse_redis_url(url)
        self.cluster: bool | None = None    # None until the first node says
        self.nodes: dict = {}               # (host, port) -> RedisNode: the masters in use
        self.slots: list = []               # cluster: slot -> (host, port) of its master
        self.refreshing = False
        self.next_refresh = 0.0
        self.seed_turn = 0
        loop.every(1.0, self._keepalive)
        loop.every(0.25, self._check)
        self.node(self.seeds[0])

    def lane(self, room: str) -> int:
        """A room's hash slot: its messages keep their order on the way to its master."""
        return room_slot(room) if self.cluster else 0

    def owner(self, slot: int) -> RedisNode | None:
        """The node that holds a slot (the one Redis, when not a cluster)."""
        if self.cluster:
            return self.nodes.get(self.slots[slot]) if self.slots else None
        return next(iter(self.nodes.values()), None) if self.cluster is False else None

    def node_of(self, room: str) -> RedisNode | None:
        """The node that holds room's keys, if it is up."""
        node = self.owner(self.lane(room))
        return node if node is not None and node.up else None

    def reachable(self) -> bool:
        """Whether every room has a node up: every slot's master, or the one Redis."""
        if self.cluster:
            return bool(self.slots) and None not in self.slots and all(
                self.nodes.get(addr) is not None and self.nodes[addr].up for addr in set(self.slots))
        return any(n.up for n in self.nodes.values())

    # -- nodes: connect, lose, reconnect

    def node(self, addr: tuple) -> RedisNode:
        """The node at addr, connecting to it if it is new."""
        node = self.nodes.get(addr)
        if node is None:
            node = self.nodes[addr] = RedisNode(addr)
            self._connect(node)
        return node

    def _connect(self, node: RedisNode) -> None:
        node.cmd_parser, node.sub_parser = RespParser(), RespParser()
        node.callbacks.clear()
        node.unsubscribing.clear()
        node.connected = 0
        host, port = node.addr
        node.cmd = Link.connect(self.loop, host, port, lambda data: self._on_cmd_data(node, data),
                                lambda: self.lost(node), lambda: self._on_link_connected(node))
        node.sub = Link.connect(self.loop, host, port, lambda data: self.bus.on_sub_data(node, data),
                                lambda: self.lost(node), lambda: self._on_link_connected(node))

    def _on_link_connected(self, node: RedisNode) -> None:
        node.connected += 1
        if node.connected < 2:
            return
        now = self.loop.now
        if self.password:
            node.sub.write(resp_command("AUTH", self.password))   # its "+OK" is skipped
            node.call(now, ("AUTH", self.password), None)
        if self.db and not self.cluster:
            node.call(now, ("SELECT", self.db), None)
        for script in REDIS_SCRIPTS:        # the node is used once the last one is loaded
            node.call(now, ("SCRIPT", "LOAD", script),
                      lambda reply, last=script is REDIS_SCRIPTS[-1]: self._on_script(node, reply, last))

    def _on_script(self, node: RedisNode, reply, last: bool) -> None:
        if isinstance(reply, RespError):
            log.error("redis %r: cannot load scripts: %s", node, reply)
            self.lost(node)                 # e.g. LOADING while Redis reads its data: retry later
            return
        if not last or node.cmd is None:
            return
        if self.cluster is False:
            self._up(node)
            self.bus.node_up(node)
        else:                               # unknown yet, or a cluster: learn where the slots are
            self.refreshing = True
            node.call(self.loop.now, ("CLUSTER", "SLOTS"), lambda r: self._on_slots(node, r))

    def _up(self, node: RedisNode) -> bool:
        """Mark node up; whether it was not (and is still in use)."""
        if node.up or self.nodes.get(node.addr) is not node:
            return False
        log.info("redis %r connected%s", node, " (cluster master)" if self.cluster else "")
        node.up = True
        node.backoff = 0.0
        return True

    def lost(self, node: RedisNode) -> None:
        """node's links failed (or it stopped answering): close them, tell the bus, reconnect later."""
        if node.cmd is None:
            return
        was_up = node.up
        node.up = False
        links, node.cmd, node.sub = (node.cmd, node.sub), None, None
        for link in links:
            link.close()
        self.bus.node_lost(node, was_up)
        if self.cluster:
            self.refreshing = False         # an answer from it will not come
        # Exponential backoff with full jitter, so a fleet does not reconnect in lockstep.
        node.backoff = min(max(node.backoff * 2, 0.1), 5.0)
        self.loop.call_later(node.backoff * (0.5 + 0.5 * int.from_bytes(os.urandom(2), "big") / 65535),
                             lambda: self._reconnect(node))

    def _reconnect(self, node: RedisNode) -> None:
        if self.nodes.get(node.addr) is not node or node.cmd is not None:
            return
        if self.cluster is None and len(self.seeds) > 1:    # not one answered yet: try the next seed
            del self.nodes[node.addr]
            self.seed_turn += 1
            self.node(self.seeds[self.seed_turn % len(self.seeds)]).backoff = node.backoff
            return
        self._connect(node)

    def _keepalive(self) -> None:
        for node in list(self.nodes.values()):
            if node.cmd is None or node.connected < 2:
                continue
            if node.callbacks and self.loop.now - node.callbacks[0][1] > self.loop.config.bus_timeout:
                log.warning("redis %r: no reply for %.1fs", node, self.loop.config.bus_timeout)
                self.lost(node)
            elif node.up and not node.callbacks:
                node.call(self.loop.now, ("PING",), None)

    def _on_cmd_data(self, node: RedisNode, data: bytes) -> None:
        for reply in node.cmd_parser.feed(data):
            if not node.callbacks:
                continue
            callback, _ = node.callbacks.popleft()
            if callback is not None:
                callback(reply)
            elif isinstance(reply, RespError):
                log.error("redis %r: %s", node, reply)

    # -- the cluster's slot map

    def _check(self) -> None:
        """Ask for the slot map again: soon while a master is unreachable, else every few seconds
        (a shard's replicas count once they have data, and WAIT waits for those)."""
        if self.cluster and not self.refreshing and (not self.bus.up or self.loop.now >= self.next_refresh):
            self.next_refresh = self.loop.now + TOPOLOGY_REFRESH
            self.refresh()

    def refresh(self) -> None:
        """Read the slot map again (from a master that answers, else from the seeds in turn)."""
        if not self.cluster or self.refreshing:
            return
        node = next((n for n in self.nodes.values() if n.up), None)
        if node is not None:
            self.refreshing = True
            node.call(self.loop.now, ("CLUSTER", "SLOTS"), lambda reply: self._on_slots(node, reply))
            return
        # No master answers: try the seeds (and the masters it knew) in turn.
        known = [*self.seeds, *(a for a in dict.fromkeys(self.slots) if a is not None)]
        addr = known[self.seed_turn % len(known)]
        self.seed_turn += 1
        if addr not in self.nodes:
            self.node(addr)

    def _on_slots(self, asked: RedisNode, reply) -> None:
        self.refreshing = False
        if isinstance(reply, RespError):
            if self.cluster is None and "cluster support disabled" in str(reply):
                self.cluster = False        # one Redis
                for addr in [a for a in self.nodes if a != asked.addr]:
                    self._drop(self.nodes[addr])
                if self._up(asked):
                    self.bus.node_up(asked)
            else:
                log.warning("redis %r: CLUSTER SLOTS: %s", asked, reply)
            return
        slots, replicas = [None] * CLUSTER_SLOTS, {}
        for entry in reply:
            host = entry[2][0].decode() or asked.addr[0]
            addr = (host, int(entry[2][1]))
            slots[int(entry[0]):int(entry[1]) + 1] = [addr] * (int(entry[1]) - int(entry[0]) + 1)
            replicas[addr] = len(entry) - 3
        first = self.cluster is None
        self.cluster = True
        self.slots = slots
        if first:
            log.info("redis: a cluster of %d masters", len(replicas))
        for addr, n in replicas.items():
            self.node(addr).replicas = n
        for addr in [a for a in self.nodes if a not in replicas]:
            self._drop(self.nodes[addr])    # no longer a master: e.g. failed over
        self.bus.map_changed(first, [asked] if asked.addr in replicas and self._up(asked) else [])

    def _drop(self, node: RedisNode) -> None:
        """Stop using a node: what it has in flight goes elsewhere, as resends."""
        if self.nodes.get(node.addr) is node:
            del self.nodes[node.addr]
        self.lost(node)

    def redirected(self, node: RedisNode, text: str) -> tuple | None:
        """A MOVED or ASK answer from node: (kind, the address it names); the map follows a MOVED."""
        kind, slot, where = text.split(" ")
        host, _, port = where.rpartition(":")
        addr = (host or node.addr[0], int(port))
        self.node(addr)
        if kind == "MOVED":
            self.slots[int(slot)] = addr
            self.refresh()
        return kind, addr


class RedisBus(RemoteBus):
    """Rooms shared by every node on one Redis or one Redis Cluster.

    A room's state, history and channel live in one hash slot (the room is the
    hash tag), so one script call sequences a message wherever the slot is
    (RedisTopology says where). On a cluster messages go to their slot's
    master, in order per slot (the slot is the lane), following MOVED and ASK;
    rooms are subscribed with SSUBSCRIBE on the master of their slot. A shard
    with replicas publishes a message only once WAIT has seen it on them.
    """

    def __init__(self, loop: Server, chat: Chat, url: str):
        super().__init__(loop, chat)
        self.prefix = "scalechat:"
        self.tag = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.subscribed: dict = {}          # room -> the RedisNode its channel is subscribed on
        self.unflushed: dict = {}           # room -> (epoch, seq) its messages must still be published up to
        self.publish_sha = hashlib.sha1(PUBLISH_SCRIPT).hexdigest()
        self.flush_sha = hashlib.sha1(FLUSH_SCRIPT).hexdigest()
        self.snapshot_sha = hashlib.sha1(SNAPSHOT_SCRIPT).hexdigest()
        self.floor_sha = hashlib.sha1(SEQ_FLOOR_SCRIPT).hexdigest()
        self.presence_sha = hashlib.sha1(PRESENCE_SCRIPT).hexdigest()
        loop.every(PRESENCE_REFRESH, self._refresh_presence)
        self.topology = RedisTopology(loop, self, url)

    # -- where a room lives

    def lane(self, room: str) -> int:
        return self.topology.lane(room)

    def target(self, msg: Pending):
        topology = self.topology
        if msg.ask is not None:
            node = topology.nodes.get(msg.ask)
        else:
            if topology.cluster and msg.lane == 0:      # held before the bus knew it was a cluster
                msg.lane = topology.lane(msg.room)
            node = topology.owner(msg.lane)
        return node if node is not None and node.up else None

    def _keys(self, room: str) -> tuple[str, str, str]:
        """The room's state and history keys and its channel (one hash slot: the room is the tag)."""
        p = f"{self.prefix}{{{room}}}"
        return p + ":state", p + ":history", p

    # -- what the topology tells

    def node_up(self, node: RedisNode) -> None:
        """node answers, with the scripts loaded: what it holds is caught up, and what waited goes."""
        self._restore(node)
        self._release_held()
        self._subscribe_all()
        self._update_up()

    def _restore(self, node: RedisNode) -> None:
        """Before held messages get their seq: raise each room's seq on node to what this process
        delivered in that order (SEQ_FLOOR_SCRIPT), and count its members there again."""
        for room in self.chat.rooms.values():
            if self.topology.owner(self.lane(room.name)) is node:
                if room.seq:
                    state_key, _, channel = self._keys(room.name)
                    node.call(self.loop.now, ("EVALSHA", self.floor_sha, 2, state_key, channel + ":published",
                                              room.seq, self.config.redis_room_ttl, room.epoch), None)
                if room.reported:
                    self.report_members(room, room.reported)

    def node_lost(self, node: RedisNode, was_up: bool) -> None:
        """node's links are gone: what it never answered goes again, its rooms catch up once back."""
        # Publishes it never answered may or may not have run: send them again, first and in
        # order, as resends, so the script drops those already in history.
        for msg in [m for m, where in self.inflight.items() if where is node]:
            self.send_again(msg)
        for name in [r for r, n in self.subscribed.items() if n is node]:
            del self.subscribed[name]
            room = self.chat.rooms.get(name)
            if room is not None:
                room.syncing = True         # catch up from history once subscribed again
        self._update_up()
        if was_up:
            log.warning("redis %r lost: holding its messages (at most %d for %gs)", node,
                        self.config.bus_hold_count, self.config.bus_hold_seconds)

    def map_changed(self, first: bool, up: list) -> None:
        """The cluster's slot map was read (first: the bus learned it is a cluster); up: the nodes it
        found up. Rooms whose slot moved are subscribed where it is now, and what waited goes."""
        if first:                           # held before the bus knew: their lanes are slots now
            for msg in self.held:
                msg.lane = self.lane(msg.room)
            self.held_lanes = {}
            for msg in (*self.held, *self.retry):
                self.held_lanes[msg.lane] = self.held_lanes.get(msg.lane, 0) + 1
        for name, node in list(self.subscribed.items()):
            if self.topology.owner(self.lane(name)) is not node:     # the slot moved: subscribe at its master
                self._unsubscribe(node, name)
        for msg in self.held:
            msg.ask = None                  # the map now says where each slot is
        for node in up:
            self._restore(node)
        self._subscribe_all()
        self._release_held()
        self._update_up()

    def _update_up(self) -> None:
        up = self.topology.reachable()
        if up != self.up:
            self.set_up(up)

    def _redirected(self, node: RedisNode, msg: Pending, error: RespError) -> bool:
        """Follow a cluster's answer that msg belongs elsewhere, or later; False if it is a real error."""
        text = str(error)
        kind = text.split(" ", 1)[0]
        if kind in ("MOVED", "ASK"):
            kind, addr = self.topology.redirected(node, text)
            msg.ask = addr if kind == "ASK" else None
            self.send_again(msg)
            return True
        if kind in RETRY_LATER:
            if kind in ("CLUSTERDOWN", "READONLY", "MASTERDOWN"):
                self.topology.refresh()
            elif kind == "NOSCRIPT":
                for script in REDIS_SCRIPTS:
                    node.call(self.loop.now, ("SCRIPT", "LOAD", script), None)
            msg.ask = None
            self.send_again(msg, delay=0.05)
            return True
        return False

    # -- bus face

    def send_publish(self, msg: Pending, node: RedisNode) -> None:
        """One script call sequences and stores (and publishes, unless replicas must have it first)."""
        state_key, hist_key, channel = self._keys(msg.room)
        cfg, now, attempt = self.config, self.loop.now, msg.attempt
        wait = self.topology.cluster and node.replicas
        if msg.ask is not None:
            node.call(now, ("ASKING",), None)
        node.call(now, ("EVALSHA", self.publish_sha, 5, state_key, hist_key, channel + ":order",
                        channel + ":bytes", channel + ":published", msg.prefix, msg.suffix, cfg.history, channel,
                        f"{self.tag} {msg.t0!r}", msg.key, "1" if msg.resend else "", cfg.room_history_bytes,
                        cfg.redis_room_ttl, "" if wait else "S" if self.topology.cluster else "P", msg.epoch,
                        b"%05x" % (int.from_bytes(os.urandom(3), "big") & 0xFFFFF)),
                  lambda reply: self._on_published(node, msg, attempt, reply, wait))
        if wait:
            node.call(now, ("WAIT", node.replicas, cfg.redis_wait_ms),
                      lambda reply: self._on_replicated(node, msg, attempt, reply))

    def _current(self, node: RedisNode, msg: Pending, attempt: int) -> bool:
        return msg.attempt == attempt and self.inflight.get(msg) is node

    def _on_published(self, node: RedisNode, msg: Pending, attempt: int, reply, wait: bool) -> None:
        if not self._current(node, msg, attempt):
            return
        if isinstance(reply, RespError):
            if not self._redirected(node, msg, reply):
                log.error("redis %r: publish failed: %s", node, reply)
                self.on_answer(msg, b"", None)
        elif wait:                          # answered once replicated and published
            msg.seq, msg.duplicate, msg.epoch = int(reply[0]), bool(reply[1]), reply[2]
        else:
            self.on_answer(msg, reply[2], int(reply[0]), bool(reply[1]))

    def _on_replicated(self, node: RedisNode, msg: Pending, attempt: int, reply) -> None:
        if not self._current(node, msg, attempt) or not msg.seq:
            return
        if not isinstance(reply, int) or reply < node.replicas:
            self.loop.stats.bus_unreplicated += 1   # published anyway: a failover now could lose it
        self._flush_room(node, msg.room, msg.epoch, msg.seq, asking=msg.ask is not None,
                         then=(msg, attempt))

    def _flush_room(self, node: RedisNode, room: str, epoch: bytes, upto: int, asking: bool = False,
                    then: tuple | None = None) -> None:
        """Publish room's messages of order epoch up to seq upto (FLUSH_SCRIPT) on node; if that fails,
        again soon. then: (the message at upto, its attempt), acked once it is published."""
        state_key, hist_key, channel = self._keys(room)
        if asking:
            node.call(self.loop.now, ("ASKING",), None)
        node.call(self.loop.now, ("EVALSHA", self.flush_sha, 4, state_key, hist_key, channel + ":order",
                                  channel + ":published", upto, channel, self.config.redis_room_ttl, epoch),
                  lambda reply: self._on_flushed(node, room, epoch, upto, reply, then))

    def _on_flushed(self, node: RedisNode, room: str, epoch: bytes, upto: int, reply,
                    then: tuple | None) -> None:
        msg = then[0] if then is not None and self._current(node, *then) else None
        if reply == -1:                     # the room's state was lost before the message was published
            if msg is not None:
                self.send_again(msg)        # sequenced again, in the room's new order
            else:
                log.warning("room %s: its order %s ended before seq %d was published", room,
                            epoch.decode(), upto)
            return
        if not isinstance(reply, RespError):
            if msg is not None:
                self.on_answer(msg, epoch, msg.seq, msg.duplicate)
            return
        text = str(reply)
        if msg is not None:                 # stored and replicated: the flush below publishes it
            self.on_answer(msg, epoch, msg.seq, msg.duplicate)
        if text.startswith("ASK "):         # mid-migration: the keys are already on the target
            host, _, port = text.split(" ")[2].rpartition(":")
            target = self.topology.nodes.get((host or node.addr[0], int(port)))
            if target is not None and target.up:
                self._flush_room(target, room, epoch, upto, asking=True)
                return
        # The message is acked and in history: it must still reach the room's members.
        # One retry timer for every room (the highest seq each), whatever the outage's length.
        if not self.unflushed:
            self.loop.call_later(0.05, self._retry_flushes)
        known = self.unflushed.get(room)
        self.unflushed[room] = (epoch, max(upto, known[1]) if known and known[0] == epoch else upto)
        if text.startswith(("MOVED ", "CLUSTERDOWN", "READONLY")):
            self.topology.refresh()

    def _retry_flushes(self) -> None:
        pending, self.unflushed = self.unflushed, {}
        for room, (epoch, upto) in pending.items():
            node = self.topology.node_of(room)
            if node is not None:
                self._flush_room(node, room, epoch, upto)
            else:
                if not self.unflushed:
                    self.loop.call_later(0.05, self._retry_flushes)
                self.unflushed[room] = (epoch, upto)

    def _subscribe_all(self) -> None:
        for name in self.chat.rooms:
            if name not in self.subscribed:
                self._subscribe(name)

    def _subscribe(self, name: str) -> None:
        node = self.topology.node_of(name)
        if node is None or name in self.subscribed:
            return
        room = self.chat.rooms.get(name)
        if room is not None:
            room.syncing = True
        self.subscribed[name] = node
        node.sub.write(resp_command("SSUBSCRIBE" if self.topology.cluster else "SUBSCRIBE", self._keys(name)[2]))

    def _unsubscribe(self, node: RedisNode, name: str) -> None:
        if self.subscribed.get(name) is node:
            del self.subscribed[name]
        if node.up:
            channel = self._keys(name)[2].encode()
            node.unsubscribing[channel] = node.unsubscribing.get(channel, 0) + 1
            node.sub.write(resp_command("SUNSUBSCRIBE" if self.topology.cluster else "UNSUBSCRIBE", channel))

    def room_closed(self, room: Room) -> None:
        """Unsubscribe: this node stops receiving the room's traffic, and counts no member there."""
        if room.reported:
            room.reported = 0
            self.report_members(room, 0)
        node = self.subscribed.get(room.name)
        if node is not None:
            self._unsubscribe(node, room.name)

    def report_members(self, room: Room, count: int) -> None:
        """Count this process's members of room in Redis; the answer is the room's total."""
        node = self.topology.node_of(room.name)
        if node is None:
            return                          # reported again once its node is up
        name = room.name
        node.call(self.loop.now, ("EVALSHA", self.presence_sha, 1, self._keys(name)[2] + ":members", self.tag,
                                  count, PRESENCE_TTL_MS, self._keys(name)[2], "S" if self.topology.cluster else "P"),
                  lambda reply: None if isinstance(reply, RespError) else self.chat.on_members(name, *reply))

    def _refresh_presence(self) -> None:
        """Keep this process's counts alive in Redis (they expire, so a dead process is forgotten)."""
        for room in list(self.chat.rooms.values()):
            if room.reported:
                self.report_members(room, room.reported)

    def resync(self, room: Room) -> None:
        """Fetch the room's recent history to fill a gap."""
        if not room.syncing and room.name in self.subscribed:
            room.syncing = True
            self._request_snapshot(room.name)

    def _request_snapshot(self, room: str) -> None:
        node = self.subscribed.get(room)
        if node is None or not node.up:
            return                          # asked again once subscribed
        state_key, hist_key, channel = self._keys(room)
        node.call(self.loop.now, ("EVALSHA", self.snapshot_sha, 4, state_key, hist_key, channel + ":published",
                                  channel + ":members", self.config.history,
                                  "" if self.topology.cluster and node.replicas else "1"),
                  lambda reply: self._on_snapshot(node, room, reply))

    def _on_snapshot(self, node: RedisNode, room: str, reply) -> None:
        if isinstance(reply, RespError):
            log.warning("redis %r: snapshot of %s failed: %s", node, room, reply)
            if self.subscribed.get(room) is node:
                self._unsubscribe(node, room)       # subscribed again where the map says
                self.topology.refresh()
            return
        self.chat.on_snapshot(room, reply[0], int(reply[1]), reply[2], int(reply[3]), members_version=int(reply[4]))

    # -- replies

    def on_sub_data(self, node: RedisNode, data: bytes) -> None:
        """What came on node's subscriber link: room messages and member counts, confirmations."""
        plen = len(self.prefix) + 1
        for reply in node.sub_parser.feed(data):
            if not isinstance(reply, list):
                continue                    # AUTH's answer
            kind = reply[0]
            if kind == b"message" or kind == b"smessage":
                head, _, payload = reply[2].partition(b"\n")
                room = reply[1][plen:-1].decode()
                if head[:2] == b"m ":        # presence: the room's new total, and its version
                    total, _, version = head[2:].partition(b" ")
                    self.chat.on_members(room, int(total), int(version) if version else None)
                    continue
                seq, epoch, tag, t0 = head.split(b" ", 3)
                mine = tag.decode() == self.tag
                self.chat.on_bus_message(room, epoch, int(seq), payload, float(t0) if mine else None)
            elif kind == b"subscribe" or kind == b"ssubscribe":
                room = self.chat.rooms.get(reply[1][plen:-1].decode())
                if room is not None and room.syncing and self.subscribed.get(room.name) is node:
                    self._request_snapshot(room.name)
            elif kind == b"sunsubscribe" or kind == b"unsubscribe":
                channel = reply[1]
                ours = node.unsubscribing.get(channel, 0)
                if ours > 1:
                    node.unsubscribing[channel] = ours - 1
                elif ours:
                    del node.unsubscribing[channel]
                else:                       # the cluster moved the slot away: subscribe at its new master
                    name = channel[plen:-1].decode()
                    if self.subscribed.get(name) is node:
                        del self.subscribed[name]
                        room = self.chat.rooms.get(name)
                        if room is not None:
                            room.syncing = True
                    self.topology.refresh()


# ---------------------------------------------------------------------------
# 8. Edges: metrics, settings, logging, main
# ---------------------------------------------------------------------------

class StatsCollector:
    """Exposes Stats to prometheus-client at scrape time (no hot-path cost)."""

    def __init__(self, get_stats):
        self.get_stats = get_stats

    def collect(self):
        """Yield the metric families (called from the metrics thread)."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        s = self.get_stats()
        for name, doc, value in (
                ("scalechat_connections", "Open WebSocket connections", s.connections),
                ("scalechat_rooms", "Rooms with members here (or history, in one process)", s.rooms),
                ("scalechat_bus_up", "1 when the message bus is connected", s.bus_up),
                ("scalechat_draining", "1 while the server drains", s.draining),
                ("scalechat_history_bytes", "Memory history takes, as --history-bytes counts it (all processes)",
                 s.history_bytes),
                ("scalechat_sequenced_rooms", "Rooms this process or supervisor sequences (0 with --redis)",
                 s.sequenced_rooms)):
            yield GaugeMetricFamily(name, doc, value=value)
        info = GaugeMetricFamily("scalechat_info", "Server version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        for name, doc, value in (
                ("scalechat_connections_accepted", "WebSocket connections accepted",
                 s.connections_total),
                ("scalechat_messages_received", "Chat messages accepted from clients", s.messages_in),
                ("scalechat_deliveries", "Message frames queued to members", s.deliveries),
                ("scalechat_pings_sent", "Pings sent to quiet connections (--ping-interval)", s.pings),
                ("scalechat_handoffs", "WebSockets handed to the worker that owns their room (--room-affinity)",
                 s.handoffs),
                ("scalechat_room_syncs", ("Rooms opened here from the bus (--workers, --redis): each asks the "
                                          "supervisor or Redis for the room's snapshot"), s.room_syncs),
                ("scalechat_leased_messages", ("Messages a --workers worker sequenced itself, in a room leased to it "
                                               "(the supervisor keeps a copy, off the message's path)"),
                 s.leased_messages),
                ("scalechat_replica_full", ("Times a worker's socket of sequenced messages to the supervisor was "
                                            "full: it rang the supervisor to read it now, not at its next tick"),
                 s.replica_full),
                ("scalechat_bytes_received", "Bytes read from client sockets", s.bytes_in),
                ("scalechat_bytes_sent", "Bytes written to client sockets", s.bytes_out),
                ("scalechat_internal_errors", "Exceptions caught by the loop's barriers (a bug: see the log)",
                 s.internal_errors),
                ("scalechat_bus_unreplicated", ("Messages a Redis Cluster shard published before its replicas "
                                                "confirmed them (WAIT timed out)"), s.bus_unreplicated)):
            yield CounterMetricFamily(name, doc, value=value)
        for name, doc, label, values in (
                ("scalechat_dropped_clients", "Clients cut off by the server", "reason", s.dropped),
                ("scalechat_protocol_errors", "Connections closed for protocol violations",
                 "code", s.protocol_errors),
                ("scalechat_refused", "Requests or frames refused", "reason", s.refused),
                ("scalechat_http_requests", "HTTP responses by status", "status", s.http_requests)):
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, value in list(values.items()):
                family.add_metric([str(key)], value)
            yield family
        for name, doc, hist in (
                ("scalechat_broadcast_seconds",
                 "Time from receiving a message to queueing it for its last member", s.broadcast),
                ("scalechat_loop_lag_seconds", "How late the event loop runs its timers", s.loop_lag)):
            yield HistogramMetricFamily(name, doc, buckets=histogram_buckets(hist), sum_value=hist.total)
        pauses = HistogramMetricFamily("scalechat_gc_pause_seconds",
                                       "Pauses of the cyclic garbage collector, by generation",
                                       labels=["generation"])
        for generation, hist in enumerate((s.gc0, s.gc1, s.gc2)):
            pauses.add_metric([str(generation)], histogram_buckets(hist), sum_value=hist.total)
        yield pauses
        yield GaugeMetricFamily("scalechat_gc_frozen_objects",
                                "Objects frozen by --gc-freeze, counted at the last freeze", value=s.gc_frozen)


def histogram_buckets(hist: Histogram) -> list:
    """Cumulative (le, count) pairs of a Histogram, ending with +Inf."""
    acc, buckets = 0, []
    for bound, n in zip((*hist.bounds, float("inf")), list(hist.counts)):
        acc += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
    return buckets


def open_fds(pid: int) -> int:
    """How many descriptors pid has open: the size Linux 6.2+ gives its /proc fd folder, O(1);
    older kernels give 0 there, and the folder is counted (O(descriptors): 160 ms at 10,000)."""
    return os.stat(f"/proc/{pid}/fd").st_size or len(os.listdir(f"/proc/{pid}/fd"))


class ProcessTreeCollector:
    """process_* metrics summed over the supervisor and its workers, from /proc."""

    def __init__(self, get_pids):
        self.get_pids = get_pids
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.page = resource.getpagesize()

    def collect(self):
        """Yield CPU seconds, resident memory and open descriptors of all processes."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        cpu = rss = fds = 0
        for pid in self.get_pids():
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                cpu += (int(fields[11]) + int(fields[12])) / self.ticks
                rss += int(fields[21]) * self.page
                fds += open_fds(pid)
            except OSError:
                continue                    # exited meanwhile
        yield CounterMetricFamily("process_cpu_seconds", "CPU seconds of all server processes", value=cpu)
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory of all server processes",
                                value=rss)
        yield GaugeMetricFamily("process_open_fds", "Open descriptors of all server processes", value=fds)
        yield GaugeMetricFamily("process_max_fds", "Open-file limit of each process", value=fd_limit())


def start_metrics(get_stats, host: str, port: int, get_pids=None) -> None:
    """Serve /metrics from a daemon thread on its own port."""
    from prometheus_client import PROCESS_COLLECTOR, REGISTRY, start_http_server
    REGISTRY.register(StatsCollector(get_stats))
    if get_pids is not None:
        REGISTRY.unregister(PROCESS_COLLECTOR)
        REGISTRY.register(ProcessTreeCollector(get_pids))
    start_http_server(port, addr=host)


SETTINGS = (
    # flag, type, default, help
    ("host", str, "0.0.0.0", "address to listen on"),
    ("port", int, 8080, "public port: HTTP, the demo client and WebSocket"),
    ("metrics-host", str, "127.0.0.1", "address for the metrics port (loopback: only this host scrapes)"),
    ("metrics-port", int, 8081, "Prometheus metrics port (0 disables metrics)"),
    ("workers", str, "1", "server processes sharing the port ('auto': one per core)"),
    ("redis", str, "", ("redis://host:port/db: share rooms with every instance on this Redis; "
                        "redis://host:port,host:port,.../0: on this Redis Cluster (any node finds the rest)")),
    ("static-dir", str, os.path.join(os.path.dirname(os.path.abspath(__file__)), "static"),
     "folder served at / and /static/"),
    ("max-message-size", int, 65536, "largest message text in UTF-8 bytes"),
    ("max-header-size", int, 8192, "largest HTTP request head in bytes (431 past it)"),
    ("history", int, 1000, "messages kept per room for since=<seq> resume"),
    ("history-bytes", int, 64 << 20, ("bytes of memory history may take in one process (and the "
     "supervisor) across all rooms; past it the least recently active rooms lose their oldest messages")),
    ("room-history-bytes", int, 1 << 20, ("bytes of history one room keeps (here, in the supervisor and "
     "in Redis): bounds what one replay or snapshot carries")),
    ("room-linger", float, 30.0, ("with --workers or --redis: seconds a process keeps following a room after "
     "its last member there left, so a member coming back costs no new snapshot (0: stop at once)")),
    ("max-connections", int, 0, "WebSocket connections per process at most (0: what the open-file limit allows)"),
    ("max-per-ip", int, 0, "WebSocket connections per client address at most (0: no cap)"),
    ("max-buffer", int, 1 << 20, "bytes queued for one client before it is cut off with 1013"),
    ("handshake-timeout", float, 10.0, "seconds a client has to complete its HTTP request"),
    ("ping-interval", float, 20.0, "seconds of silence before the server pings a client"),
    ("pong-timeout", float, 20.0, "seconds to wait for a pong before dropping a client"),
    ("write-timeout", float, 30.0, "seconds a client may keep the server from writing to it"),
    ("close-timeout", float, 3.0, "seconds to wait for the peer's Close before dropping it"),
    ("drain-timeout", float, 10.0, "seconds to wait for clients to leave on SIGTERM"),
    ("rate-limit", float, 50.0, "messages per second per connection (0: no limit)"),
    ("rate-burst", float, 100.0, "messages a connection may send at once"),
    ("rate-limit-bytes", int, 64 << 10, ("bytes of messages per second per connection, as sent (0: no "
     "limit); a refusal is a rate_limit error and a strike, as for messages")),
    ("rate-burst-bytes", int, 1 << 20, ("bytes of messages a connection may send at once: at least the "
     "largest frame a message may take (6 x --max-message-size + 1024)")),
    ("allowed-origins", str, "", "comma-separated Origins allowed besides the server's own host ('*': any)"),
    ("allowed-hosts", str, "", ("comma-separated Host header values served (host[:port]); empty: any. "
     "Set it where DNS rebinding matters (intranets)")),
    ("allow-no-origin", "bool", True, "accept clients that send no Origin header (non-browsers)"),
    ("bus-hold-count", int, 10000, "messages held while the bus is down, at most"),
    ("bus-hold-seconds", float, 30.0, "seconds a held message waits for the bus before it is refused"),
    ("bus-hold-bytes", int, 16 << 20, ("bytes of messages held while the bus is down, and, apart, sent "
     "to it but not yet answered, at most")),
    ("redis-room-ttl", int, 86400, "seconds after its last message that Redis forgets a room"),
    ("redis-wait-ms", int, 500, ("milliseconds a Redis Cluster shard waits for its replicas to confirm a "
                                 "message before publishing it anyway")),
    ("bus-timeout", float, 5.0, "seconds without a Redis reply before the link counts as lost"),
    ("gc-freeze", "bool", True, ("after each full garbage collection, freeze the survivors so the "
     "next one does not walk every connection again")),
    ("room-affinity", "bool", True, ("with --workers: the worker that accepts a WebSocket hands it to the "
     "worker that owns its room (SCM_RIGHTS), so a room's members share one worker, which sequences it")),
    ("spread-members", int, 200, ("with --room-affinity: a room with this many members (over every worker) "
     "takes its new members on the worker that accepted them, so its fan-out uses every core (0: never)")),
    ("log-level", str, "INFO", "DEBUG, INFO, WARNING or ERROR"),
)


def worker_settings(config) -> tuple[list, dict]:
    """A worker's flags (every setting the supervisor has) and environment.

    The Redis URL, which may hold a password, goes in the environment: a
    command line is visible to every user of the host (ps).
    """
    flags, env = [], dict(os.environ)
    for flag, kind, _, _ in SETTINGS:
        value = getattr(config, flag.replace("-", "_"))
        if flag == "redis":
            env[env_name(flag)] = value
        elif flag not in ("workers", "metrics-port"):
            flags += [f"--{flag}", str(value).lower() if kind == "bool" else str(value)]
    return flags, env


def env_name(flag: str) -> str:
    """The environment variable that backs a flag: SCALECHAT_<FLAG>."""
    return "SCALECHAT_" + flag.upper().replace("-", "_")


def parse_bool(text: str) -> bool:
    """A boolean from text: 1/true/yes/on or 0/false/no/off."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def parse_args(argv: list | None = None) -> argparse.Namespace:
    """Settings from flags, then SCALECHAT_* environment variables, then defaults."""
    parser = argparse.ArgumentParser(
        prog="scalechat.py", description="scale-chat: a WebSocket chat server.",
        epilog="Every flag falls back to an environment variable SCALECHAT_<FLAG>, "
               "e.g. SCALECHAT_PORT=9000.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for flag, kind, default, help_text in SETTINGS:
        env = os.environ.get(env_name(flag))
        convert = parse_bool if kind == "bool" else kind
        if env is not None:
            try:
                default = convert(env)
            except (ValueError, argparse.ArgumentTypeError):
                parser.error(f"{env_name(flag)}={env!r} is not a valid {flag}")
        parser.add_argument("--" + flag, type=convert, default=default,
                            metavar="BOOL" if kind == "bool" else kind.__name__.upper(),
                            help=f"{help_text} [env {env_name(flag)}]")
    parser.add_argument("--worker-id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--hub-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--replica-fd", type=int, default=None, help=argparse.SUPPRESS)   # HubBus.replica
    parser.add_argument("--doorbell-fd", type=int, default=None, help=argparse.SUPPRESS)  # HubBus.doorbell
    parser.add_argument("--handoff-fds", default=None, help=argparse.SUPPRESS)     # Handoff's ends, by slot
    parser.add_argument("--version", action="version", version=f"scalechat {__version__}")
    args = parser.parse_args(argv)
    if args.workers == "auto":
        args.workers = os.cpu_count() or 1
    elif not args.workers.isdigit() or int(args.workers) < 1:
        parser.error("--workers must be a positive integer or 'auto'")
    args.workers = int(args.workers)
    if args.redis:
        try:
            parse_redis_url(args.redis)
        except ValueError as e:
            parser.error(str(e))
    for flag in ("max-message-size", "max-header-size", "history", "max-buffer", "bus-hold-count",
                 "handshake-timeout", "ping-interval", "pong-timeout", "write-timeout",
                 "close-timeout", "drain-timeout", "bus-hold-seconds", "bus-timeout", "room-history-bytes",
                 "bus-hold-bytes", "redis-room-ttl", "redis-wait-ms"):
        if getattr(args, flag.replace("-", "_")) <= 0:
            parser.error(f"--{flag} must be positive")
    if args.room_linger < 0 or args.spread_members < 0:
        parser.error("--room-linger and --spread-members must be 0 or more")
    if args.rate_limit < 0 or args.rate_burst < 1 or args.rate_limit_bytes < 0:
        parser.error("--rate-limit and --rate-limit-bytes must be >= 0 and --rate-burst >= 1")
    if args.rate_limit_bytes and args.rate_burst_bytes < max_frame_size(args.max_message_size):
        parser.error(f"--rate-burst-bytes must hold the largest message frame, "
                     f"{max_frame_size(args.max_message_size)} bytes for --max-message-size {args.max_message_size}")
    return args


def main(argv: list | None = None) -> int:
    """Run the server (or the supervisor of --workers) until SIGTERM or SIGINT."""
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    limit = raise_fd_limit()
    supervising = args.workers > 1 and args.hub_fd is None
    handoff = None
    if args.handoff_fds:
        try:
            *ends, loads = map(int, args.handoff_fds.split(","))
            handoff = Handoff([socket.socket(fileno=fd) for fd in ends], args.worker_id,
                              bytes.fromhex(os.environ["SCALECHAT_AFFINITY_KEY"]),
                              mmap.mmap(loads, LOAD.size * len(ends)))
        except (OSError, KeyError, ValueError) as e:
            log.error("worker %d: cannot use its hand-off link: %s", args.worker_id, getattr(e, "strerror", e))
            return 2
    hub_sock = socket.socket(fileno=args.hub_fd) if args.hub_fd is not None else None
    replica_sock = socket.socket(fileno=args.replica_fd) if args.replica_fd is not None else None

    def make_buses(server: Server, chat: Chat) -> tuple:
        """A worker's link to its supervisor (its stats; its bus without Redis), and the chat's bus."""
        hub = HubBus(server, chat, hub_sock, replica_sock, args.doorbell_fd) if hub_sock is not None else None
        return hub, RedisBus(server, chat, args.redis) if args.redis else hub
    try:
        if supervising:
            make_listener(args.host, args.port, reuse_port=True, listen=False).close()
            loop = Supervisor(args, *worker_settings(args))
        else:
            loop = Server(args, make_buses, handoff)
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, e.strerror)
        return 2
    if args.metrics_port:
        try:
            if supervising:
                start_metrics(loop.total_stats, args.metrics_host, args.metrics_port, loop.pids)
            else:
                start_metrics(lambda: loop.stats, args.metrics_host, args.metrics_port)
        except OSError as e:
            log.error("cannot serve metrics on %s:%d: %s", args.metrics_host, args.metrics_port, e.strerror)
            return 2
    signal.signal(signal.SIGTERM, loop.request_stop)
    signal.signal(signal.SIGINT, loop.request_stop)
    if supervising:
        log.info("scalechat %s: %d workers on http://%s:%d/ (metrics on :%s); open-file limit %d "
                 "per worker", __version__, args.workers, args.host, args.port,
                 args.metrics_port or "off", limit)
        loop.run()
        log.info("all workers stopped")
    elif args.worker_id is None:
        log.info("scalechat %s listening on http://%s:%d/ (metrics on :%s); open-file limit %d, "
                 "so up to %d connections", __version__, args.host, args.port,
                 args.metrics_port or "off", limit, loop.max_conns)
        loop.serve_forever()
    else:
        log.debug("worker %d listening, up to %d connections", args.worker_id, loop.max_conns)
        loop.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
