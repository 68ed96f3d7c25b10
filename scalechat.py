#!/usr/bin/env python3
"""scale-chat: a WebSocket chat server on one selectors loop, in one file.

Layers, top to bottom (see the section headers):

1. Protocol core (sans-IO): RFC 6455 handshake, framing, UTF-8 and close rules.
   Bytes in, events or bytes out; no sockets. loadclient.py imports it.
2. Chat logic: rooms, names, sequence numbers, history, client JSON validation.
3. Bus: how a message reaches every member of its room (one process here).
4. I/O loop: accept, read, parse, dispatch, coalesced writes, timers, signals.
5. Edges: metrics, configuration, logging, main().

Run ``python scalechat.py --help`` for every setting.
"""
from __future__ import annotations

import argparse
import base64
import bisect
import codecs
import errno
import hashlib
import json
import logging
import mimetypes
import os
import re
import resource
import selectors
import signal
import socket
import struct
import sys
import time
from collections import deque
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlsplit

__version__ = "1.0.0"

log = logging.getLogger("scalechat")

# ---------------------------------------------------------------------------
# 1. Protocol core (sans-IO): RFC 6455
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
    """A peer broke the protocol; ``code`` is the close code to answer with."""

    def __init__(self, code: int, reason: str):
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class HandshakeError(Exception):
    """An opening handshake failed; ``status`` is the HTTP status it deserves."""

    def __init__(self, status: int, reason: str, headers: tuple = ()):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers


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
    payload = b"" if code == CLOSE_NO_STATUS else struct.pack("!H", code) + reason.encode()[:123]
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


class FrameParser:
    """Turns a byte stream, cut anywhere, into complete messages and control frames.

    ``feed`` returns ``(opcode, payload)`` pairs: OP_TEXT / OP_BINARY with the
    whole (defragmented, unmasked) message, or a control frame. Text is
    validated as UTF-8 while it arrives, so invalid text fails at the first bad
    byte, even inside an unfinished frame. Violations raise ProtocolError.
    """

    __slots__ = ("expect_masked", "max_message_size", "accept_binary",
                 "_buf", "_frame", "_msg_op", "_parts", "_size", "_decoder")

    def __init__(self, expect_masked: bool = True, max_message_size: int = 1 << 20,
                 accept_binary: bool = True):
        self.expect_masked = expect_masked
        self.max_message_size = max_message_size
        self.accept_binary = accept_binary
        self._buf = b""
        self._frame = None      # [fin, remaining, key, offset] of a frame being streamed
        self._msg_op = None     # opcode of the message in progress (fragmented or streamed)
        self._parts = []
        self._size = 0
        self._decoder = None

    def feed(self, data: bytes) -> list:
        """Consume data; return the messages and control frames it completed."""
        buf = self._buf + data if self._buf else data
        pos, end, out = 0, len(buf), []
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
                if opcode == OP_TEXT:
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
            self._size += n
            self._frame = [fin, n, key, 0]
            if not n:
                self._stream(buf, pos, end, out)
        self._buf = buf[pos:] if pos < end else b""
        return out

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
        if (0 if opcode else self._size) + n > self.max_message_size:
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
                try:
                    self._decoder.decode(chunk)
                except UnicodeDecodeError:
                    raise ProtocolError(CLOSE_INVALID_DATA, "text is not valid UTF-8") from None
            self._parts.append(chunk)
            frame[1] = remaining = remaining - take
            frame[3] = offset + take
        if remaining:
            return end
        self._frame = None
        if fin:
            if self._decoder is not None:
                try:
                    self._decoder.decode(b"", True)
                except UnicodeDecodeError:
                    raise ProtocolError(CLOSE_INVALID_DATA, "text ends inside a character") from None
            out.append((self._msg_op, b"".join(self._parts)))
            self._msg_op, self._parts, self._size, self._decoder = None, [], 0, None
        return pos + take


class Request:
    """A parsed HTTP/1.1 request head."""

    __slots__ = ("method", "target", "path", "query", "version", "headers")

    def __init__(self, method: str, target: str, version: str, headers: dict):
        self.method, self.target, self.version, self.headers = method, target, version, headers
        parts = urlsplit(target)
        self.path = parts.path
        self.query = parse_qs(parts.query, keep_blank_values=True)

    def header_tokens(self, name: str) -> set:
        """The comma-separated, case-insensitive tokens of a header."""
        return {t.strip().lower() for t in self.headers.get(name, "").split(",")}


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def parse_request_head(head: bytes) -> Request:
    """Parse a request head (without the blank line); HandshakeError(400) if malformed."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise HandshakeError(400, "request head is not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1].startswith("/"):
        raise HandshakeError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HandshakeError(400, "unsupported HTTP version")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise HandshakeError(400, "malformed header line")
        name = name.lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return Request(method, target, version, headers)


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


HTTP_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
                405: "Method Not Allowed", 426: "Upgrade Required",
                431: "Request Header Fields Too Large", 500: "Internal Server Error",
                503: "Service Unavailable"}


def http_response(status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8",
                  headers: tuple = (), head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    lines = [f"HTTP/1.1 {status} {HTTP_REASONS.get(status, 'Error')}",
             f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
             "Connection: close", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body)


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
    if headers.get("sec-websocket-accept") != accept_key(key):
        raise HandshakeError(101, "wrong Sec-WebSocket-Accept")
    return end + 4


# ---------------------------------------------------------------------------
# 2. Chat logic: rooms, names, sequence numbers, history, validation
# ---------------------------------------------------------------------------

ROOM_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_NAME_CHARS = 32
MAX_SENT_AT_CHARS = 64
# A text of N UTF-8 bytes takes at most 6N bytes once JSON-escaped (\u00XX);
# frames larger than that plus this envelope can only hold a too-long text.
JSON_ENVELOPE_BYTES = 1024


def max_frame_size(max_message_size: int) -> int:
    """The largest client frame that could still hold a text of max_message_size bytes."""
    return 6 * max_message_size + JSON_ENVELOPE_BYTES


def valid_name(name: str) -> bool:
    """A display name: 1-32 printable characters, not only spaces."""
    return 0 < len(name) <= MAX_NAME_CHARS and name.isprintable() and not name.isspace()


def utc_now_rfc3339() -> str:
    """The current UTC time, RFC 3339 with microseconds."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ChatError(Exception):
    """A client frame was refused: answered with an ``error`` frame."""

    def __init__(self, code: str, reason: str, message_id=None):
        super().__init__(reason)
        self.code, self.reason, self.message_id = code, reason, message_id


def parse_chat_message(payload: bytes, max_message_size: int) -> tuple:
    """(message_id, text, sent_at) from a client's JSON frame; ChatError if refused."""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        raise ChatError("bad_json", "frame is not valid JSON") from None
    if type(obj) is not dict:
        raise ChatError("bad_message", "frame must be a JSON object")
    message_id = obj.get("message_id")
    if message_id is not None and (type(message_id) is not int or abs(message_id) >= 1 << 63):
        raise ChatError("bad_message", "message_id must be a 64-bit integer")
    text = obj.get("text")
    if type(text) is not str or not text:
        raise ChatError("missing_text", "text must be a non-empty string", message_id)
    try:
        size = len(text.encode())
    except UnicodeEncodeError:      # a lone surrogate from a JSON \ud800 escape
        raise ChatError("bad_message", "text must be valid Unicode", message_id) from None
    if size > max_message_size:
        raise ChatError("too_big", f"text longer than {max_message_size} bytes", message_id)
    sent_at = obj.get("sent_at")
    if sent_at is not None and (type(sent_at) is not str or len(sent_at) > MAX_SENT_AT_CHARS):
        raise ChatError("bad_message", "sent_at must be an RFC 3339 string", message_id)
    return message_id, text, sent_at


def encode_json_frame(obj: dict) -> bytes:
    """One server text frame holding obj as compact JSON."""
    return encode_frame(OP_TEXT, json.dumps(obj, separators=(",", ":")).encode())


def error_frame(code: str, reason: str, message_id=None) -> bytes:
    """An ``error`` frame for a refused client frame."""
    obj = {"type": "error", "code": code, "reason": reason}
    if message_id is not None:
        obj["message_id"] = message_id
    return encode_json_frame(obj)


class Room:
    """A room: its members on this process, its sequence and its recent history."""

    __slots__ = ("name", "members", "seq", "history", "count_dirty")

    def __init__(self, name: str, history: int):
        self.name = name
        self.members: dict = {}             # Connection -> None: ordered, O(1) removal
        self.seq = 0
        self.history: deque = deque(maxlen=history)   # (seq, frame)
        self.count_dirty = False

    def frames_since(self, since: int) -> list:
        """Frames of held messages with seq > since, oldest first."""
        hist = self.history
        if not hist or since >= hist[-1][0]:
            return []
        first = hist[0][0]
        start = max(0, since - first + 1)
        return [hist[i][1] for i in range(start, len(hist))]

    def oldest_seq(self) -> int:
        """The seq of the oldest message still held (seq + 1 when none is)."""
        return self.history[0][0] if self.history else self.seq + 1


# ---------------------------------------------------------------------------
# 3. Bus: one process delivers to its own members directly
# ---------------------------------------------------------------------------

class LocalBus:
    """Sequences and delivers a room's messages inside one process."""

    up = True

    def __init__(self, chat: "Chat"):
        self.chat = chat

    def publish(self, room: Room, sender: str, message_id, text: str, sent_at, t0: float) -> None:
        """Assign the room's next seq and deliver the message to every member."""
        seq = room.seq + 1
        payload = json.dumps({"type": "message", "room": room.name, "seq": seq, "sender": sender,
                              "message_id": message_id, "text": text, "sent_at": sent_at},
                             separators=(",", ":"), ensure_ascii=False).encode()
        self.chat.deliver(room, seq, encode_frame(OP_TEXT, payload), t0)

    def room_opened(self, room: Room) -> None:
        """The first local member joined room."""

    def room_closed(self, room: Room) -> None:
        """The last local member left room."""


class Chat:
    """Rooms and their members on this process; knows nothing of sockets."""

    def __init__(self, config, stats: "Stats"):
        self.config = config
        self.stats = stats
        self.rooms: dict[str, Room] = {}
        self.bus = LocalBus(self)
        self.guest_counter = 0

    def assign_name(self, requested: str | None) -> str:
        """The requested name, or a fresh ``guest-<n>``."""
        if requested:
            return requested
        self.guest_counter += 1
        return f"guest-{self.guest_counter}"

    def join(self, conn, room_name: str, since: int | None) -> list:
        """Add conn to a room; return the frames it gets first (welcome, then replay)."""
        room = self.rooms.get(room_name)
        if room is None:
            room = self.rooms[room_name] = Room(room_name, self.config.history)
        if not room.members:
            self.bus.room_opened(room)
        room.members[conn] = None
        room.count_dirty = True
        conn.room = room
        frames = [encode_json_frame({"type": "welcome", "room": room.name, "name": conn.name,
                                     "seq": room.seq, "members": len(room.members),
                                     "oldest": room.oldest_seq()})]
        if since is not None:
            frames.extend(room.frames_since(since))
        return frames

    def leave(self, conn) -> None:
        """Remove conn from its room; forget an empty room that holds no history."""
        room = conn.room
        if room is None:
            return
        conn.room = None
        room.members.pop(conn, None)
        room.count_dirty = True
        if not room.members:
            self.bus.room_closed(room)
            if not room.history:
                del self.rooms[room.name]

    def receive(self, conn, payload: bytes, t0: float) -> bytes | None:
        """Handle a client text frame; an error frame for the sender if refused."""
        try:
            message_id, text, sent_at = parse_chat_message(payload, self.config.max_message_size)
        except ChatError as e:
            self.stats.refused["too_big" if e.code == "too_big" else "bad_message"] += 1
            return error_frame(e.code, e.reason, e.message_id)
        self.stats.messages_in += 1
        self.bus.publish(conn.room, conn.name, message_id, text, sent_at, t0)
        return None

    def deliver(self, room: Room, seq: int, frame: bytes, t0: float) -> None:
        """Record a sequenced frame in history and queue it for every local member."""
        room.seq = seq
        room.history.append((seq, frame))
        members = room.members
        if members:
            n = len(frame)
            dirty = self.dirty
            for c in members:
                out = c.out
                if not out:
                    dirty.append(c)
                out.append(frame)
                c.out_bytes += n
            stats = self.stats
            stats.deliveries += len(members)
            stats.broadcast.observe(time.monotonic() - t0)

    def member_count_frames(self):
        """(room, frame) for each room whose member count changed since the last call."""
        for room in list(self.rooms.values()):
            if room.count_dirty:
                room.count_dirty = False
                if room.members:
                    yield room, encode_json_frame({"type": "members", "room": room.name,
                                                   "count": len(room.members)})

    dirty: list = None   # set by the loop: connections with newly queued frames


# ---------------------------------------------------------------------------
# 4. I/O loop: connections, accept, read, write, timers, signals
# ---------------------------------------------------------------------------

HTTP, OPEN, CLOSING, CLOSED = range(4)
RECV_SIZE = 65536
ACCEPT_BATCH = 128


class Histogram:
    """A Prometheus-style histogram kept as plain numbers (cheap to observe)."""

    __slots__ = ("bounds", "counts", "total", "count")

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


class Stats:
    """The server's counters as plain attributes; the metrics collector reads them."""

    def __init__(self):
        self.connections = 0
        self.connections_total = 0
        self.messages_in = 0
        self.deliveries = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.dropped = dict.fromkeys(("slow_consumer", "ping_timeout", "write_timeout", "close_timeout"), 0)
        self.protocol_errors: dict[int, int] = {}
        self.refused = dict.fromkeys(("bad_request", "not_found", "method", "version",
                                      "header_too_large", "origin", "max_connections",
                                      "draining", "rate_limit", "bad_message", "too_big",
                                      "handshake_timeout"), 0)
        self.http_requests: dict[int, int] = {}
        self.broadcast = Histogram((0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                    0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
        self.loop_lag = Histogram((0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.draining = 0
        self.rooms = 0
        self.bus_up = 1


class Connection:
    """One client socket: HTTP until upgraded, then a WebSocket member of a room."""

    __slots__ = ("sock", "fd", "state", "inbuf", "parser", "out", "out_bytes", "writing",
                 "close_after_flush", "room", "name", "last_seen", "ping_sent", "deadline",
                 "tokens", "token_time", "strikes", "peer", "__weakref__")

    def __init__(self, sock: socket.socket, peer: str, now: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.state = HTTP
        self.inbuf = b""
        self.parser = None
        self.out: list = []
        self.out_bytes = 0
        self.writing = False          # registered for write readiness
        self.close_after_flush = False
        self.room = None
        self.name = ""
        self.last_seen = now
        self.ping_sent = 0.0
        self.deadline = 0.0           # handshake or close deadline
        self.tokens = 0.0
        self.token_time = now
        self.strikes = 0
        self.peer = peer


STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml",
                ".json": "application/json", ".png": "image/png", ".ico": "image/x-icon",
                ".txt": "text/plain; charset=utf-8"}
PAGE_HEADERS = (("Content-Security-Policy",
                 "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
                 "style-src 'self'; script-src 'self'; frame-ancestors 'none'"),
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


class Server:
    """One selectors loop serving HTTP, WebSocket and the chat."""

    def __init__(self, config, listen_sock: socket.socket | None = None):
        self.config = config
        self.stats = Stats()
        self.chat = Chat(config, self.stats)
        self.dirty: list = []
        self.chat.dirty = self.dirty
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, Connection] = {}
        self.handshaking: dict[int, Connection] = {}
        self.closing: dict[int, Connection] = {}
        self.blocked: dict[int, Connection] = {}
        self.per_ip: dict[str, int] = {}
        self.static = load_static(config.static_dir)
        self.running = True
        self.draining = False
        self.drain_deadline = 0.0
        self.timers: list = []
        self.now = time.monotonic()
        self.max_conns = config.max_connections or max(16, fd_limit() - 64)
        self.accept_paused_until = 0.0
        self.sweep_queue: list = []
        self.listener = listen_sock or make_listener(config.host, config.port)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, self.wake_r)
        self.allowed_origins = {o.strip().rstrip("/").lower()
                                for o in config.allowed_origins.split(",") if o.strip()}

    # -- timers -------------------------------------------------------------

    def every(self, interval: float, fn) -> None:
        """Call fn every interval seconds from the loop."""
        self.timers.append([self.now + interval, interval, fn])

    def _run_timers(self) -> float:
        next_due = self.now + 1.0
        for t in self.timers:
            if t[0] <= self.now:
                lateness = self.now - t[0]
                t[0] = max(t[0] + t[1], self.now)
                if t[2] is self._tick_lag:
                    self.stats.loop_lag.observe(lateness)
                t[2]()
            next_due = min(next_due, t[0])
        return next_due

    def _tick_lag(self) -> None:
        """Only measures how late the loop runs its timers."""

    # -- the loop -----------------------------------------------------------

    def serve_forever(self) -> None:
        """Run until stopped and drained."""
        cfg = self.config
        self.every(0.25, self._tick_lag)
        self.every(0.25, self._check_deadlines)
        self.every(min(1.0, cfg.ping_interval / 4), self._sweep)
        self.every(1.0, self._send_member_counts)
        select = self.sel.select
        dirty = self.dirty
        listener = self.listener
        while self.running:
            self.now = time.monotonic()
            next_due = self._run_timers()
            if dirty:
                self._flush_dirty()
            timeout = max(0.0, next_due - time.monotonic())
            for key, events in select(timeout):
                conn = key.data
                self.now = time.monotonic()
                if conn is None:
                    if key.fileobj is listener:
                        self._accept()
                elif conn is self.wake_r:
                    self._on_wake()
                else:
                    if events & selectors.EVENT_WRITE:
                        self._on_writable(conn)
                    if events & selectors.EVENT_READ and conn.state != CLOSED:
                        self._on_readable(conn)
                if dirty and len(dirty) > 4096:
                    self._flush_dirty()
            if dirty:
                self._flush_dirty()
            if self.draining and (not self.conns or self.now > self.drain_deadline):
                self.running = False
        self._shutdown()

    def wake(self) -> None:
        """Make select return (safe from signal handlers and other threads)."""
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass

    def _on_wake(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except OSError:
            pass
        if self.stop_requested and not self.draining:
            self.drain()

    stop_requested = False

    def request_stop(self, *_args) -> None:
        """Signal handler: begin draining on the loop's next turn."""
        if self.stop_requested:
            # A second signal: stop now.
            self.drain_deadline = 0.0
        self.stop_requested = True
        self.wake()

    def drain(self) -> None:
        """Stop accepting WebSockets, say 1001 to every client, exit when they are gone."""
        log.info("draining %d connections (timeout %.1fs)", len(self.conns), self.config.drain_timeout)
        self.draining = True
        self.stats.draining = 1
        self.drain_deadline = self.now + self.config.drain_timeout
        for conn in list(self.conns.values()):
            if conn.state == OPEN:
                self.close(conn, CLOSE_GOING_AWAY, "server shutting down")
            elif conn.state == HTTP and not conn.out:
                self._abort(conn)

    def _shutdown(self) -> None:
        for conn in list(self.conns.values()):
            self._abort(conn)
        self.sel.close()
        self.listener.close()
        log.info("stopped")

    # -- accept -------------------------------------------------------------

    def _accept(self) -> None:
        if self.now < self.accept_paused_until:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the pending connection stays in the backlog,
                    # and accepting again at once would spin. Pause a little.
                    log.warning("accept: %s; pausing accepts for 100 ms", os.strerror(e.errno))
                    self._pause_accept(0.1)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ip = addr[0] if isinstance(addr, tuple) else "unix"
            conn = Connection(sock, ip, self.now)
            conn.deadline = self.now + self.config.handshake_timeout
            self.conns[conn.fd] = conn
            self.handshaking[conn.fd] = conn
            self.sel.register(sock, selectors.EVENT_READ, conn)

    def _pause_accept(self, seconds: float) -> None:
        self.accept_paused_until = self.now + seconds
        self.sel.unregister(self.listener)

        def resume():
            self.sel.register(self.listener, selectors.EVENT_READ, None)
            self.timers.remove(timer)
        timer = [self.now + seconds, seconds, resume]
        self.timers.append(timer)

    # -- read ---------------------------------------------------------------

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
        conn.last_seen = self.now
        if conn.state == HTTP:
            self._on_http_data(conn, data)
            return
        if conn.parser is None:            # an HTTP reply is on its way out: ignore input
            return
        try:
            frames = conn.parser.feed(data)
        except ProtocolError as e:
            self._fail(conn, e.code, e.reason)
            return
        for opcode, payload in frames:
            if conn.state == OPEN:
                self._on_frame(conn, opcode, payload)
            elif opcode == OP_CLOSE:        # the answer to our close: done
                self._abort(conn)
                return

    def _on_frame(self, conn: Connection, opcode: int, payload: bytes) -> None:
        if opcode == OP_TEXT:
            if not self._take_token(conn):
                return
            err = self.chat.receive(conn, payload, self.now)
            if err is not None:
                self.send(conn, err)
        elif opcode == OP_PING:
            self.send(conn, encode_frame(OP_PONG, payload))
        elif opcode == OP_PONG:
            conn.ping_sent = 0.0
        elif opcode == OP_CLOSE:
            # Echo the peer's status code (RFC 6455 5.5.1), then close TCP ourselves.
            self._begin_close(conn, encode_frame(OP_CLOSE, payload[:2]))
            conn.close_after_flush = True
            self._flush(conn)
        elif opcode == OP_BINARY:          # unreachable: the parser refuses binary frames
            self._fail(conn, CLOSE_UNSUPPORTED_DATA, "binary frames are not accepted")

    def _take_token(self, conn: Connection) -> bool:
        """Token bucket per connection: rate limit client messages."""
        rate = self.config.rate_limit
        if rate <= 0:
            return True
        burst = self.config.rate_burst
        tokens = min(burst, conn.tokens + (self.now - conn.token_time) * rate)
        conn.token_time = self.now
        if tokens >= 1.0:
            conn.tokens = tokens - 1.0
            return True
        conn.tokens = tokens
        conn.strikes += 1
        self.stats.refused["rate_limit"] += 1
        if conn.strikes > burst:
            self._fail(conn, CLOSE_POLICY, "rate limit exceeded repeatedly")
        else:
            self.send(conn, error_frame("rate_limit", f"more than {rate:g} messages per second"))
        return False

    # -- HTTP ---------------------------------------------------------------

    def _on_http_data(self, conn: Connection, data: bytes) -> None:
        buf = conn.inbuf + data
        end = buf.find(b"\r\n\r\n")
        limit = self.config.max_header_size
        if end < 0:
            if len(buf) > limit:
                self._http_error(conn, 431, "request head too large", "header_too_large")
            else:
                conn.inbuf = buf
            return
        if end > limit:
            self._http_error(conn, 431, "request head too large", "header_too_large")
            return
        conn.inbuf = b""
        try:
            request = parse_request_head(buf[:end])
            self._route(conn, request, buf[end + 4:])
        except HandshakeError as e:
            reason = {400: "bad_request", 404: "not_found", 405: "method", 426: "version",
                      403: "origin", 503: "max_connections"}.get(e.status, "bad_request")
            if self.draining and e.status == 503:
                reason = "draining"
            self._http_error(conn, e.status, e.reason, reason, e.headers)

    def _http_error(self, conn: Connection, status: int, reason: str, counter: str,
                    headers: tuple = ()) -> None:
        self.stats.refused[counter] += 1
        self._http_reply(conn, http_response(status, (reason + "\n").encode(), headers=headers), status)

    def _http_reply(self, conn: Connection, response: bytes, status: int) -> None:
        self.stats.http_requests[status] = self.stats.http_requests.get(status, 0) + 1
        self.handshaking.pop(conn.fd, None)
        conn.state = CLOSING
        conn.deadline = self.now + self.config.close_timeout
        self.closing[conn.fd] = conn
        conn.close_after_flush = True
        self.send(conn, response)
        self._flush(conn)

    def _route(self, conn: Connection, request: Request, rest: bytes) -> None:
        path = request.path
        if path == "/ws" or path.startswith("/ws/"):
            self._upgrade(conn, request, rest)
            return
        if request.method not in ("GET", "HEAD"):
            raise HandshakeError(405, "only GET and HEAD", (("Allow", "GET, HEAD"),))
        head = request.method == "HEAD"
        if path == "/healthz":
            status = 503 if self.draining else 200
            body = b"draining\n" if self.draining else b"ok\n"
            self._http_reply(conn, http_response(status, body, head_only=head), status)
            return
        target = "/static/index.html" if path in ("/", "/index.html") else request.target.split("?")[0]
        entry = self.static.get(target)
        if entry is None:
            raise HandshakeError(404, "not found")
        ctype, body = entry
        headers = PAGE_HEADERS if ctype.startswith("text/html") else PAGE_HEADERS[1:]
        self._http_reply(conn, http_response(200, body, ctype, headers, head_only=head), 200)

    def _origin_allowed(self, request: Request) -> bool:
        origin = request.headers.get("origin")
        if origin is None:
            return self.config.allow_no_origin
        origin = origin.rstrip("/").lower()
        if "*" in self.allowed_origins or origin in self.allowed_origins:
            return True
        # Default: the server's own host, whatever the scheme.
        host = request.headers.get("host", "").lower()
        return origin in (f"http://{host}", f"https://{host}")

    def _upgrade(self, conn: Connection, request: Request, rest: bytes) -> None:
        cfg = self.config
        room = "lobby" if request.path == "/ws" else request.path[4:]
        if not ROOM_NAME.match(room):
            raise HandshakeError(400, "room must be 1-64 characters of A-Z a-z 0-9 _ . -")
        accept = check_upgrade(request)
        name = request.query.get("name", [""])[-1]
        if name and not valid_name(name):
            raise HandshakeError(400, "name must be 1-32 printable characters")
        since = request.query.get("since", [None])[-1]
        if since is not None:
            if not since.isdigit() or len(since) > 19:
                raise HandshakeError(400, "since must be a non-negative integer")
            since = int(since)
        if not self._origin_allowed(request):
            raise HandshakeError(403, "origin not allowed")
        if self.draining:
            raise HandshakeError(503, "server is draining", (("Retry-After", "1"),))
        if self.stats.connections >= self.max_conns:
            raise HandshakeError(503, "too many connections", (("Retry-After", "1"),))
        if cfg.max_per_ip and self.per_ip.get(conn.peer, 0) >= cfg.max_per_ip:
            raise HandshakeError(503, "too many connections from this address",
                                 (("Retry-After", "1"),))
        self.handshaking.pop(conn.fd, None)
        conn.state = OPEN
        conn.name = self.chat.assign_name(name)
        conn.parser = FrameParser(True, max_frame_size(cfg.max_message_size), accept_binary=False)
        conn.tokens = cfg.rate_burst
        self.per_ip[conn.peer] = self.per_ip.get(conn.peer, 0) + 1
        self.stats.connections += 1
        self.stats.connections_total += 1
        self.stats.http_requests[101] = self.stats.http_requests.get(101, 0) + 1
        self.send(conn, upgrade_response(accept))
        for frame in self.chat.join(conn, room, since):
            self.send(conn, frame)
        self.stats.rooms = len(self.chat.rooms)
        if rest:
            try:
                frames = conn.parser.feed(rest)
            except ProtocolError as e:
                self._fail(conn, e.code, e.reason)
                return
            for opcode, payload in frames:
                if conn.state == OPEN:
                    self._on_frame(conn, opcode, payload)

    # -- write --------------------------------------------------------------

    def send(self, conn: Connection, data: bytes) -> None:
        """Queue bytes for conn; they go out at the end of this loop turn."""
        out = conn.out
        if not out:
            self.dirty.append(conn)
        out.append(data)
        conn.out_bytes += len(data)

    def _flush_dirty(self) -> None:
        dirty = self.dirty
        cap = self.config.max_buffer
        batch = dirty[:]
        dirty.clear()
        for conn in batch:
            if conn.writing or conn.state == CLOSED:
                if conn.out_bytes > cap and conn.state == OPEN:
                    self._cut_off(conn)
                continue
            self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        """Send what conn has queued in one system call; watch for writability if it stalls."""
        out = conn.out
        if not out:
            if conn.close_after_flush:
                self._abort(conn)
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._abort(conn)
            return
        self.stats.bytes_out += sent
        if sent == len(data):
            out.clear()
            conn.out_bytes = 0
            if conn.writing:
                conn.writing = False
                self.blocked.pop(conn.fd, None)
                self.sel.modify(conn.sock, selectors.EVENT_READ, conn)
            if conn.close_after_flush:
                self._abort(conn)
            return
        rest = data[sent:]
        out[:] = [rest]
        conn.out_bytes = len(rest)
        if conn.out_bytes > self.config.max_buffer and conn.state == OPEN:
            self._cut_off(conn)
            return
        if not conn.writing:
            conn.writing = True
            conn.deadline = self.now + self.config.write_timeout if conn.state == OPEN else conn.deadline
            self.blocked[conn.fd] = conn
            self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _on_writable(self, conn: Connection) -> None:
        self._flush(conn)

    # -- closing ------------------------------------------------------------

    def _begin_close(self, conn: Connection, frame: bytes) -> None:
        if conn.state == OPEN:
            self._leave(conn)
        conn.state = CLOSING
        conn.deadline = self.now + self.config.close_timeout
        self.closing[conn.fd] = conn
        self.send(conn, frame)

    def close(self, conn: Connection, code: int, reason: str = "") -> None:
        """Start the closing handshake: send Close, wait for the peer's (bounded)."""
        if conn.state != OPEN:
            return
        self._begin_close(conn, encode_close(code, reason))

    def _fail(self, conn: Connection, code: int, reason: str) -> None:
        """Close after a protocol violation: count it, stop reading data frames."""
        self.stats.protocol_errors[code] = self.stats.protocol_errors.get(code, 0) + 1
        log.debug("closing %s with %d: %s", conn.peer, code, reason)
        if conn.state == OPEN:
            self.close(conn, code, reason)
        else:
            self._abort(conn)

    def _cut_off(self, conn: Connection) -> None:
        """A slow consumer: drop what it has not been sent, tell it 1013, close."""
        self.stats.dropped["slow_consumer"] += 1
        head = conn.out[0] if conn.writing else b""    # a partly sent frame must finish
        conn.out[:] = [head] if head else []
        conn.out_bytes = len(head)
        self._begin_close(conn, encode_close(CLOSE_TRY_AGAIN_LATER, "too slow: reconnect with since"))
        conn.close_after_flush = True
        if not conn.writing:
            self._flush(conn)

    def _leave(self, conn: Connection) -> None:
        self.chat.leave(conn)
        self.stats.connections -= 1
        self.stats.rooms = len(self.chat.rooms)
        n = self.per_ip.get(conn.peer, 0) - 1
        if n > 0:
            self.per_ip[conn.peer] = n
        else:
            self.per_ip.pop(conn.peer, None)

    def _abort(self, conn: Connection) -> None:
        """Close the socket now and forget the connection."""
        if conn.state == CLOSED:
            return
        if conn.state == OPEN:
            self._leave(conn)
        conn.state = CLOSED
        fd = conn.fd
        self.conns.pop(fd, None)
        self.handshaking.pop(fd, None)
        self.closing.pop(fd, None)
        self.blocked.pop(fd, None)
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        conn.out.clear()
        conn.out_bytes = 0

    # -- timers: deadlines, pings, member counts ----------------------------

    def _check_deadlines(self) -> None:
        now = self.now
        for conn in [c for c in self.handshaking.values() if c.deadline < now]:
            self.stats.refused["handshake_timeout"] += 1
            self._abort(conn)
        for conn in [c for c in self.closing.values() if c.deadline < now]:
            self.stats.dropped["close_timeout"] += 1
            self._abort(conn)
        cap = self.config.max_buffer
        for conn in [c for c in self.blocked.values() if c.state == OPEN]:
            if conn.deadline < now:
                self.stats.dropped["write_timeout"] += 1
                self._abort(conn)
            elif conn.out_bytes > cap:      # stalled writers are not flushed, so check here
                self._cut_off(conn)

    def _sweep(self) -> None:
        """Ping quiet connections, drop those that never answered; a slice per tick."""
        if not self.sweep_queue:
            self.sweep_queue = list(self.conns.values())
        slice_size = max(256, len(self.conns) // 4)
        batch = self.sweep_queue[-slice_size:]
        del self.sweep_queue[-slice_size:]
        now, cfg = self.now, self.config
        ping = encode_frame(OP_PING, b"")
        for conn in batch:
            if conn.state != OPEN:
                continue
            if conn.ping_sent:
                if now - conn.ping_sent > cfg.pong_timeout:
                    self.stats.dropped["ping_timeout"] += 1
                    self._abort(conn)
            elif now - conn.last_seen > cfg.ping_interval:
                conn.ping_sent = now
                self.send(conn, ping)

    def _send_member_counts(self) -> None:
        for room, frame in self.chat.member_count_frames():
            for conn in room.members:
                self.send(conn, frame)


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


def make_listener(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket (IPv6 when host contains ':')."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    return sock


# ---------------------------------------------------------------------------
# 5. Edges: metrics, configuration, logging, main
# ---------------------------------------------------------------------------

class StatsCollector:
    """Exposes a Stats object to prometheus-client at scrape time (no hot-path cost)."""

    def __init__(self, stats: Stats):
        self.stats = stats

    def collect(self):
        """Yield the metric families (called from the metrics thread)."""
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        s = self.stats
        for name, doc, value in (
                ("scalechat_connections", "Open WebSocket connections", s.connections),
                ("scalechat_rooms", "Rooms with members or history", s.rooms),
                ("scalechat_bus_up", "1 when the message bus is connected", s.bus_up),
                ("scalechat_draining", "1 while the server drains", s.draining)):
            yield GaugeMetricFamily(name, doc, value=value)
        info = GaugeMetricFamily("scalechat_info", "Server version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        for name, doc, value in (
                ("scalechat_connections_accepted", "WebSocket connections accepted",
                 s.connections_total),
                ("scalechat_messages_received", "Chat messages accepted from clients", s.messages_in),
                ("scalechat_deliveries", "Message frames queued to members", s.deliveries),
                ("scalechat_bytes_received", "Bytes read from client sockets", s.bytes_in),
                ("scalechat_bytes_sent", "Bytes written to client sockets", s.bytes_out)):
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


def histogram_buckets(hist: Histogram) -> list:
    """Cumulative (le, count) pairs of a Histogram, ending with +Inf."""
    counts, acc, buckets = list(hist.counts), 0, []
    for bound, n in zip((*hist.bounds, float("inf")), counts):
        acc += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
    return buckets


def start_metrics(stats: Stats, host: str, port: int) -> None:
    """Serve /metrics from a daemon thread on its own port."""
    from prometheus_client import REGISTRY, start_http_server
    REGISTRY.register(StatsCollector(stats))
    start_http_server(port, addr=host)


SETTINGS = (
    # flag, type, default, help
    ("host", str, "0.0.0.0", "address to listen on"),
    ("port", int, 8080, "public port: HTTP, the demo client and WebSocket"),
    ("metrics-host", str, None, "address for the metrics port (default: --host)"),
    ("metrics-port", int, 8081, "Prometheus metrics port (0 disables metrics)"),
    ("static-dir", str, os.path.join(os.path.dirname(os.path.abspath(__file__)), "static"),
     "folder served at / and /static/"),
    ("max-message-size", int, 65536, "largest message text in UTF-8 bytes"),
    ("max-header-size", int, 8192, "largest HTTP request head in bytes (431 past it)"),
    ("history", int, 1000, "messages kept per room for since=<seq> resume"),
    ("max-connections", int, 0, "WebSocket connections at most (0: what the open-file limit allows)"),
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
    ("allowed-origins", str, "", "comma-separated Origins allowed besides the server's own host ('*': any)"),
    ("allow-no-origin", "bool", True, "accept clients that send no Origin header (non-browsers)"),
    ("log-level", str, "INFO", "DEBUG, INFO, WARNING or ERROR"),
)


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
                            metavar=kind.upper() if kind == "bool" else kind.__name__.upper(),
                            help=f"{help_text} [env {env_name(flag)}]")
    parser.add_argument("--version", action="version", version=f"scalechat {__version__}")
    args = parser.parse_args(argv)
    if args.metrics_host is None:
        args.metrics_host = args.host
    for flag in ("max-message-size", "max-header-size", "history", "max-buffer"):
        if getattr(args, flag.replace("-", "_")) <= 0:
            parser.error(f"--{flag} must be positive")
    for flag in ("handshake-timeout", "ping-interval", "pong-timeout", "write-timeout",
                 "close-timeout", "drain-timeout"):
        if getattr(args, flag.replace("-", "_")) <= 0:
            parser.error(f"--{flag} must be positive")
    if args.rate_limit < 0 or args.rate_burst < 1:
        parser.error("--rate-limit must be >= 0 and --rate-burst >= 1")
    return args


def main(argv: list | None = None) -> int:
    """Run the server until SIGTERM or SIGINT."""
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    limit = raise_fd_limit()
    try:
        server = Server(args)
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, e.strerror)
        return 2
    if args.metrics_port:
        try:
            start_metrics(server.stats, args.metrics_host, args.metrics_port)
        except OSError as e:
            log.error("cannot serve metrics on %s:%d: %s", args.metrics_host, args.metrics_port, e.strerror)
            return 2
    signal.signal(signal.SIGTERM, server.request_stop)
    signal.signal(signal.SIGINT, server.request_stop)
    log.info("scalechat %s listening on http://%s:%d/ (metrics on :%s); open-file limit %d, "
             "so up to %d connections", __version__, args.host, args.port,
             args.metrics_port or "off", limit, server.max_conns)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
