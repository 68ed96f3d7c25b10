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
import gc
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
import subprocess
import sys
import time
from collections import deque
from datetime import UTC, datetime
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
    """A peer broke the protocol; ``code`` is the close code to answer with.

    ``frames`` are those the same ``FrameParser.feed`` call completed before the
    violation: they were valid, so they are handled before failing.
    """

    def __init__(self, code: int, reason: str, frames: list | None = None):
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason
        self.frames = frames or []


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

    __slots__ = (
        "_buf",
        "_decoder",
        "_frame",
        "_msg_op",
        "_parts",
        "_size",
        "accept_binary",
        "error",
        "expect_masked",
        "max_message_size",
    )

    def __init__(self, expect_masked: bool = True, max_message_size: int = 1 << 20,
                 accept_binary: bool = True):
        self.expect_masked = expect_masked
        self.max_message_size = max_message_size
        self.accept_binary = accept_binary
        self.error: tuple | None = None         # (code, reason) once the stream is broken
        self._buf = b""
        self._frame = None      # [fin, remaining, key, offset] of a frame being streamed
        self._msg_op = None     # opcode of the message in progress (fragmented or streamed)
        self._parts = []
        self._size = 0
        self._decoder = None

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
            self._size += n
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
                _validate_utf8(self._decoder, chunk)
            self._parts.append(chunk)
            frame[1] = remaining = remaining - take
            frame[3] = offset + take
        if remaining:
            return end
        self._frame = None
        if fin:
            if self._decoder is not None:
                _validate_utf8(self._decoder, b"", True)
            out.append((self._msg_op, b"".join(self._parts)))
            self._msg_op, self._parts, self._size, self._decoder = None, [], 0, None
        return pos + take


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
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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


_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode   # skips dumps()'s checks


def message_parts(room: str, sender: str, message_id, text: str, sent_at) -> tuple[bytes, bytes]:
    """A ``message`` frame's JSON split around its seq: ``prefix + b"17" + suffix``.

    The sequencer (this process, the supervisor or a Redis script) splices the
    seq in, so the JSON is encoded once, wherever the seq is assigned.
    """
    rest = _encode_json({"sender": sender, "message_id": message_id, "text": text, "sent_at": sent_at})
    return (b'{"type":"message","room":"' + room.encode() + b'","seq":',   # room: [A-Za-z0-9_.-]
            b"," + rest[1:].encode())


MESSAGE_ID = re.compile(rb'"message_id"\s*:\s*(-?\d{1,19})\b')
RESEND_TRUE = re.compile(rb'"resend"\s*:\s*true')   # outside a string: quotes in text are escaped


def resend_key(suffix: bytes) -> bytes:
    """The part of a message's JSON that names it: sender and message_id.

    A client that reconnects may send again what it never saw confirmed, marked
    ``"resend": true``; the sequencer drops it if its history already holds a
    message with this key. (Inside the text, quotes are escaped, so the text
    cannot contain the key.)
    """
    return suffix[:suffix.find(b',"text":') + 8]


class Room:
    """A room on this process: members, the last seq delivered here, recent history.

    With a remote bus a room is not ``ready`` until the bus has sent its
    snapshot (seq and history); joiners wait in ``waiting`` meanwhile, and
    messages that arrive while ``syncing`` wait in ``early``.
    """

    __slots__ = (
        "count_dirty",
        "early",
        "history",
        "members",
        "name",
        "ready",
        "seq",
        "syncing",
        "waiting",
    )

    def __init__(self, name: str, history: int, ready: bool):
        self.name = name
        self.members: dict = {}             # Connection -> None: ordered, O(1) removal
        self.seq = 0
        self.history: deque = deque(maxlen=history)   # (seq, frame)
        self.count_dirty = False
        self.ready = ready
        self.syncing = False
        self.early: list = []               # (seq, frame, t0) held while syncing
        self.waiting: list = []             # (conn, since) held until ready

    def frames_since(self, since: int) -> list:
        """Frames of held messages with seq > since, oldest first."""
        hist = self.history
        if not hist or since >= hist[-1][0]:
            return []
        start = max(0, since - hist[0][0] + 1)
        return [hist[i][1] for i in range(start, len(hist))]

    def oldest_seq(self) -> int:
        """The seq of the oldest message still held (seq + 1 when none is)."""
        return self.history[0][0] if self.history else self.seq + 1

    def holds(self, key: bytes) -> bool:
        """Whether a held message has this resend_key."""
        return any(key in frame for _, frame in self.history)


class Chat:
    """Rooms and their members on this process; knows nothing of sockets.

    ``send(conn, bytes)`` queues bytes for a connection; ``dirty`` is the
    loop's list of connections with newly queued bytes (the hot path appends
    to it directly).
    """

    def __init__(self, config, stats: Stats, send, dirty: list):
        self.config = config
        self.stats = stats
        self.send = send
        self.dirty = dirty
        self.rooms: dict[str, Room] = {}
        self.bus = LocalBus(self)
        self.guest_counter = 0
        self.history_bytes = 0              # bytes of frames held in every room's history
        self.by_activity: dict[str, Room] = {}   # rooms holding history, least recently active first

    def assign_name(self, requested: str | None) -> str:
        """The requested name, or a fresh ``guest-<n>``."""
        if requested:
            return requested
        self.guest_counter += 1
        return f"guest-{self.guest_counter}"

    def join(self, conn, room_name: str, since: int | None) -> None:
        """Put conn in a room: welcome and replay now, or once the bus has the room."""
        room = self.rooms.get(room_name)
        if room is None:
            room = self.rooms[room_name] = Room(room_name, self.config.history, self.bus.local)
        opened = not room.members and not room.waiting
        conn.room = room
        if room.ready:
            self._admit(conn, room, since)
        else:
            room.waiting.append((conn, since))
        if opened:
            self.bus.room_opened(room)

    def _admit(self, conn, room: Room, since: int | None) -> None:
        room.members[conn] = None
        room.count_dirty = True
        self.send(conn, encode_json_frame({"type": "welcome", "room": room.name, "name": conn.name,
                                           "seq": room.seq, "members": len(room.members),
                                           "oldest": room.oldest_seq()}))
        if since is not None:
            for frame in room.frames_since(since):
                self.send(conn, frame)

    def leave(self, conn) -> None:
        """Take conn out of its room; forget a room nobody here needs."""
        room = conn.room
        if room is None:
            return
        conn.room = None
        if room.members.pop(conn, 0) is not None:
            room.waiting = [w for w in room.waiting if w[0] is not conn]
        room.count_dirty = True
        if not room.members and not room.waiting:
            self.bus.room_closed(room)
            if not self.bus.local or not room.history:
                self._forget(room)

    def _forget(self, room: Room) -> None:
        self.history_bytes -= sum(len(frame) for _, frame in room.history)
        self.by_activity.pop(room.name, None)
        del self.rooms[room.name]

    def _trim_history(self) -> None:
        """Over --history-bytes: drop the oldest messages of the least recently active rooms.

        Anyone can open rooms and fill their history, so only a budget across
        rooms bounds the memory; a room left with no history and no members is
        forgotten (its seq starts again at 1).
        """
        active = self.by_activity
        while self.history_bytes > self.config.history_bytes and active:
            name, room = next(iter(active.items()))
            self.history_bytes -= len(room.history.popleft()[1])
            if not room.history:
                del active[name]
                if not room.members and not room.waiting:
                    del self.rooms[name]

    def receive(self, conn, payload: bytes, t0: float) -> bytes | None:
        """Handle a client text frame; an error frame for the sender if refused."""
        try:
            message_id, text, sent_at = parse_chat_message(payload, self.config.max_message_size)
        except ChatError as e:
            self.stats.refused["too_big" if e.code == "too_big" else "bad_message"] += 1
            return error_frame(e.code, e.reason, e.message_id)
        self.stats.messages_in += 1
        prefix, suffix = message_parts(conn.room.name, conn.name, message_id, text, sent_at)
        resend = b'"resend"' in payload and RESEND_TRUE.search(payload) is not None
        return self.bus.publish(conn.room, prefix, suffix, t0, conn, message_id, resend)

    def deliver(self, room: Room, seq: int, frame: bytes, t0: float | None) -> None:
        """Record a sequenced frame in history and queue it for every member (the hot path)."""
        room.seq = seq
        history = room.history
        if len(history) == history.maxlen:
            self.history_bytes -= len(history[0][1])
        history.append((seq, frame))
        self.history_bytes += len(frame)
        self.by_activity.pop(room.name, None)
        self.by_activity[room.name] = room          # now the most recently active
        if self.history_bytes > self.config.history_bytes:
            self._trim_history()
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
            self.stats.deliveries += len(members)
        if t0 is not None:
            self.stats.broadcast.observe(time.monotonic() - t0)

    def on_bus_message(self, room_name: str, seq: int, payload: bytes, t0: float | None) -> None:
        """A sequenced message from a remote bus: deliver in order, once."""
        room = self.rooms.get(room_name)
        if room is None:
            return                          # unsubscribed meanwhile
        frame = encode_frame(OP_TEXT, payload)
        if room.syncing or not room.ready:
            room.early.append((seq, frame, t0))
        elif seq == room.seq + 1:
            self.deliver(room, seq, frame, t0)
        elif seq > room.seq + 1:            # a gap: hold it and catch up from history
            room.early.append((seq, frame, t0))
            self.bus.resync(room)
        # seq <= room.seq: a duplicate, already delivered

    def on_snapshot(self, room_name: str, seq: int, payloads: list) -> None:
        """The bus's view of a room: its seq and its last messages (ending at seq)."""
        room = self.rooms.get(room_name)
        if room is None:
            return
        first = seq - len(payloads) + 1
        if not room.ready:
            room.history.extend((first + i, encode_frame(OP_TEXT, p)) for i, p in enumerate(payloads))
            if room.history:
                self.history_bytes += sum(len(frame) for _, frame in room.history)
                self.by_activity[room.name] = room
                self._trim_history()
            room.seq = seq
            room.ready = True
            waiting, room.waiting = room.waiting, []
            for conn, since in waiting:
                self._admit(conn, room, since)
        else:                               # catching up: deliver what members missed
            for i, p in enumerate(payloads):
                if first + i > room.seq:
                    self.deliver(room, first + i, encode_frame(OP_TEXT, p), None)
            if seq > room.seq:              # older than the history still held: lost for good
                log.warning("room %s: messages %d-%d are no longer in history", room.name,
                            room.seq + 1, first - 1)
                room.seq = seq
        room.syncing = False
        early, room.early = sorted(room.early, key=lambda e: e[0]), []
        for s, frame, t0 in early:
            if s == room.seq + 1:
                self.deliver(room, s, frame, t0)
            elif s > room.seq + 1:
                room.early.append((s, frame, t0))
        if room.early:
            self.bus.resync(room)

    def member_count_frames(self):
        """(room, frame) for each room whose member count changed since the last call."""
        for room in list(self.rooms.values()):
            if room.count_dirty:
                room.count_dirty = False
                if room.members:
                    yield room, encode_json_frame({"type": "members", "room": room.name,
                                                   "count": len(room.members)})


# ---------------------------------------------------------------------------
# 3. Bus: how a message reaches every member of its room
#
#    LocalBus   one process: this process assigns seq and delivers.
#    HubBus     --workers: the supervisor process assigns seq, keeps history and
#               forwards each message to the workers with members in its room.
#    RedisBus   --redis: a Lua script assigns seq, keeps history and publishes on
#               a per-room channel; a node subscribes only to its own rooms.
#    Every bus has the same face: publish, room_opened, room_closed, resync.
# ---------------------------------------------------------------------------

class LocalBus:
    """Sequences and delivers a room's messages inside one process."""

    local = True
    up = True

    def __init__(self, chat: Chat):
        self.chat = chat

    def publish(self, room: Room, prefix: bytes, suffix: bytes, t0: float, conn, message_id,
                resend: bool = False):
        """Assign the room's next seq and deliver the message to every member."""
        if resend and room.holds(resend_key(suffix)):
            return
        seq = room.seq + 1
        self.chat.deliver(room, seq, encode_frame(OP_TEXT, prefix + str(seq).encode() + suffix), t0)

    def room_opened(self, room: Room) -> None:
        """The first local member joined room."""

    def room_closed(self, room: Room) -> None:
        """The last local member left room."""

    def resync(self, room: Room) -> None:
        """Never needed: nothing is lost inside one process."""


class Link:
    """A non-blocking stream socket on the loop: buffered writes flushed once a turn."""

    def __init__(self, loop: EventLoop, sock: socket.socket, on_data, on_close, connecting: bool = False):
        self.loop, self.sock, self.on_data, self.on_close = loop, sock, on_data, on_close
        self.out: list = []
        self.connecting = connecting
        self.writing = connecting
        self.closed = False
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

    def write(self, data: bytes) -> None:
        """Queue data; it is sent at the end of the loop turn."""
        self.out.append(data)

    def flush(self) -> None:
        """Send what is queued; watch for writability if the socket is full."""
        if self.writing or self.closed:
            return
        data = b"".join(self.out)
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent == len(data):
            self.out.clear()
            return
        self.out[:] = [data[sent:]]
        self.writing = True
        self.loop.sel.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self.on_event)

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
            try:
                data = self.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if data:
                self.on_data(data)
            else:
                self.close()

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


# Records between the supervisor and its workers: length, type, body.
REC_SUBSCRIBE, REC_UNSUBSCRIBE, REC_PUBLISH, REC_STATS = b"S", b"U", b"P", b"T"
REC_SNAPSHOT, REC_MESSAGE = b"N", b"M"
REC_HEADER = struct.Struct("!Ic")
PUBLISH_HEAD = struct.Struct("!BdI?")       # room length, t0, prefix length, resend
MESSAGE_HEAD = struct.Struct("!BQd")        # room length, seq, t0
SNAPSHOT_HEAD = struct.Struct("!BQI")       # room length, seq, count
LENGTH = struct.Struct("!I")


def record(kind: bytes, body: bytes) -> bytes:
    """One supervisor/worker record."""
    return REC_HEADER.pack(len(body), kind) + body


class RecordReader:
    """Splits a byte stream into (kind, body) records."""

    def __init__(self):
        self.buf = b""

    def feed(self, data: bytes) -> list:
        """The records completed by data."""
        buf = self.buf + data if self.buf else data
        pos, end, out = 0, len(buf), []
        while end - pos >= 5:
            n, kind = REC_HEADER.unpack_from(buf, pos)
            if end - pos - 5 < n:
                break
            out.append((kind, buf[pos + 5:pos + 5 + n]))
            pos += 5 + n
        self.buf = buf[pos:]
        return out


class RemoteBus:
    """What HubBus and RedisBus share: holding messages while the bus is down."""

    local = False

    def __init__(self, loop: Server, chat: Chat):
        self.loop, self.chat, self.config = loop, chat, loop.config
        self.held: deque = deque()          # (room, prefix, suffix, t0, conn, message_id, since)
        self.up = False
        loop.every(0.5, self._expire_held)

    def publish(self, room: Room, prefix: bytes, suffix: bytes, t0: float, conn, message_id,
                resend: bool = False):
        """Send to the sequencer now, or hold while it is unreachable."""
        if self.up:
            self.send_publish(room.name, prefix, suffix, t0, resend)
            return None
        if len(self.held) >= self.config.bus_hold_count:
            self.loop.stats.refused["bus_down"] += 1
            return error_frame("unavailable", "message bus unavailable: send again later", message_id)
        self.held.append((room.name, prefix, suffix, t0, conn, message_id, self.loop.now, resend))
        return None

    def _expire_held(self) -> None:
        held, limit = self.held, self.loop.now - self.config.bus_hold_seconds
        while held and held[0][6] < limit:
            _, _, _, _, conn, message_id, _, _ = held.popleft()
            self.loop.stats.refused["bus_down"] += 1
            if conn.state == OPEN:
                self.loop.send(conn, error_frame("unavailable", "message bus unavailable: send again later",
                                                 message_id))

    def set_up(self, up: bool) -> None:
        """Record the bus state; on coming up, send what was held, in order."""
        self.up = up
        self.loop.stats.bus_up = int(up)
        if up:
            while self.held:
                room, prefix, suffix, t0, _, _, _, resend = self.held.popleft()
                self.send_publish(room, prefix, suffix, t0, resend)

    def send_publish(self, room: str, prefix: bytes, suffix: bytes, t0: float, resend: bool) -> None:
        raise NotImplementedError


class HubBus(RemoteBus):
    """A worker's side of the supervisor link: publish, subscribe, receive in order."""

    def __init__(self, loop: Server, chat: Chat, sock: socket.socket):
        super().__init__(loop, chat)
        self.reader = RecordReader()
        self.link = Link(loop, sock, self._on_data, self._on_closed)
        self.set_up(True)

    def send_publish(self, room: str, prefix: bytes, suffix: bytes, t0: float, resend: bool) -> None:
        """Hand a message to the supervisor, which sequences it."""
        r = room.encode()
        self.link.write(record(REC_PUBLISH, PUBLISH_HEAD.pack(len(r), t0, len(prefix), resend) +
                               r + prefix + suffix))

    def room_opened(self, room: Room) -> None:
        """Subscribe; the supervisor answers with a snapshot, then live messages."""
        room.syncing = True
        self.link.write(record(REC_SUBSCRIBE, room.name.encode()))

    def room_closed(self, room: Room) -> None:
        """Unsubscribe."""
        self.link.write(record(REC_UNSUBSCRIBE, room.name.encode()))

    def resync(self, room: Room) -> None:
        """The supervisor link is ordered; a gap cannot happen, so this only logs."""
        log.error("room %s: gap on the supervisor link", room.name)

    def send_stats(self, stats: Stats) -> None:
        """Report this worker's counters to the supervisor."""
        self.link.write(record(REC_STATS, json.dumps(stats.to_dict()).encode()))

    def _on_data(self, data: bytes) -> None:
        chat = self.chat
        for kind, body in self.reader.feed(data):
            if kind == REC_MESSAGE:
                rlen, seq, t0 = MESSAGE_HEAD.unpack_from(body)
                start = MESSAGE_HEAD.size
                chat.on_bus_message(body[start:start + rlen].decode(), seq, body[start + rlen:], t0 or None)
            elif kind == REC_SNAPSHOT:
                room, seq, payloads = parse_snapshot(body)
                chat.on_snapshot(room, seq, payloads)

    def _on_closed(self) -> None:
        log.warning("supervisor link closed: draining")
        self.set_up(False)
        self.loop.request_stop()


def encode_snapshot(room: str, seq: int, payloads) -> bytes:
    """A snapshot record body: the room's seq and its last messages."""
    r = room.encode()
    parts = [SNAPSHOT_HEAD.pack(len(r), seq, len(payloads)), r]
    for p in payloads:
        parts.append(LENGTH.pack(len(p)))
        parts.append(p)
    return b"".join(parts)


def parse_snapshot(body: bytes) -> tuple[str, int, list]:
    """(room, seq, payloads) from a snapshot record body."""
    rlen, seq, count = SNAPSHOT_HEAD.unpack_from(body)
    pos = SNAPSHOT_HEAD.size
    room = body[pos:pos + rlen].decode()
    pos += rlen
    payloads = []
    for _ in range(count):
        (n,) = LENGTH.unpack_from(body, pos)
        payloads.append(body[pos + 4:pos + 4 + n])
        pos += 4 + n
    return room, seq, payloads


# -- Redis: RESP spoken on the loop's own non-blocking sockets ---------------

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
    """Incremental RESP2 reply parser: bytes in, replies out."""

    class Incomplete(Exception):
        pass

    def __init__(self):
        self.buf = b""

    def feed(self, data: bytes) -> list:
        """The replies completed by data (RespError objects for error replies)."""
        self.buf += data
        out, pos = [], 0
        while pos < len(self.buf):
            try:
                value, pos2 = self._parse(pos)
            except self.Incomplete:
                break
            out.append(value)
            pos = pos2
        self.buf = self.buf[pos:]
        return out

    def _parse(self, pos: int):
        buf = self.buf
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            raise self.Incomplete
        kind, line = buf[pos:pos + 1], buf[pos + 1:eol]
        pos = eol + 2
        if kind == b"+":
            return line.decode(), pos
        if kind == b"-":
            return RespError(line.decode()), pos
        if kind == b":":
            return int(line), pos
        if kind == b"$":
            n = int(line)
            if n < 0:
                return None, pos
            if len(buf) < pos + n + 2:
                raise self.Incomplete
            return buf[pos:pos + n], pos + n + 2
        if kind == b"*":
            n = int(line)
            if n < 0:
                return None, pos
            items = []
            for _ in range(n):
                item, pos = self._parse(pos)
                items.append(item)
            return items, pos
        raise ValueError(f"bad RESP type byte {kind!r}")


# Drop a resent message already in history; INCR the room's seq, splice it into
# the JSON, keep bounded history, publish "<seq> <origin tag>\n<json>" so nodes
# learn the seq without parsing JSON.
PUBLISH_SCRIPT = b"""
if ARGV[6] ~= '' then
  for _, m in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    if string.find(m, ARGV[6], 1, true) then return 0 end
  end
end
local seq = redis.call('INCR', KEYS[1])
local msg = ARGV[1] .. seq .. ARGV[2]
redis.call('RPUSH', KEYS[2], msg)
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
redis.call('PUBLISH', ARGV[4], seq .. ' ' .. ARGV[5] .. '\\n' .. msg)
return seq
"""
# A Redis that restarted empty would count seq from 1 again, and nodes would
# drop those messages as duplicates: each node first raises the seq to what it
# has delivered, so a room's seq never goes backwards.
SEQ_FLOOR_SCRIPT = b"""
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return cur
"""
SNAPSHOT_SCRIPT = b"""
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
return {seq, redis.call('LRANGE', KEYS[2], -tonumber(ARGV[1]), -1)}
"""


def parse_redis_url(url: str) -> tuple[str, int, int, str | None]:
    """(host, port, db, password) from redis://[:password@]host[:port][/db]."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"not a redis:// URL: {url!r}")
    db = int(parts.path.lstrip("/") or 0)
    return parts.hostname, parts.port or 6379, db, parts.password


class RedisBus(RemoteBus):
    """Rooms shared by every node on one Redis: per-room channels, seq and history in Redis."""

    def __init__(self, loop: Server, chat: Chat, url: str):
        super().__init__(loop, chat)
        self.host, self.port, self.db, self.password = parse_redis_url(url)
        self.prefix = "scalechat:"
        self.tag = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.cmd = self.sub = None
        self.callbacks: deque = deque()     # (callback, sent_at) per command in flight
        self.unacked: deque = deque()       # (room, prefix, suffix, t0) published, not yet answered
        self.backoff = 0.0
        self.publish_sha = hashlib.sha1(PUBLISH_SCRIPT).hexdigest()
        self.snapshot_sha = hashlib.sha1(SNAPSHOT_SCRIPT).hexdigest()
        self.floor_sha = hashlib.sha1(SEQ_FLOOR_SCRIPT).hexdigest()
        self.connected_links = 0
        loop.every(1.0, self._keepalive)
        self._connect()

    # -- connection management

    def _connect(self) -> None:
        self.cmd_parser, self.sub_parser = RespParser(), RespParser()
        self.callbacks.clear()
        self.connected_links = 0
        self.cmd = Link.connect(self.loop, self.host, self.port, self._on_cmd_data, self._on_link_lost,
                                self._on_link_connected)
        self.sub = Link.connect(self.loop, self.host, self.port, self._on_sub_data, self._on_link_lost,
                                self._on_link_connected)

    def _on_link_connected(self) -> None:
        self.connected_links += 1
        if self.connected_links < 2:
            return
        if self.password:
            self.sub.write(resp_command("AUTH", self.password))   # its "+OK" is skipped
            self._call(("AUTH", self.password), None)
        if self.db:
            self._call(("SELECT", self.db), None)
        self._call(("SCRIPT", "LOAD", PUBLISH_SCRIPT), None)
        self._call(("SCRIPT", "LOAD", SEQ_FLOOR_SCRIPT), None)
        self._call(("SCRIPT", "LOAD", SNAPSHOT_SCRIPT), self._on_ready)

    def _on_ready(self, reply) -> None:
        if isinstance(reply, RespError):
            log.error("redis: cannot load scripts: %s", reply)
            self._on_link_lost()            # e.g. LOADING while Redis reads its data: retry later
            return
        log.info("redis %s:%d connected", self.host, self.port)
        self.backoff = 0.0
        for room in self.chat.rooms.values():       # before held messages get their seq
            if room.seq:
                self._call(("EVALSHA", self.floor_sha, 1, self._keys(room.name)[0], room.seq), None)
        # Publishes the lost link never answered may or may not have run: send them again,
        # first and in order, as resends, so the script drops those already in history.
        unacked, self.unacked = self.unacked, deque()
        for room, prefix, suffix, t0 in unacked:
            self.send_publish(room, prefix, suffix, t0, True)
        self.set_up(True)
        for room in self.chat.rooms.values():
            self._subscribe(room)

    def _on_link_lost(self) -> None:
        if self.cmd is None:
            return
        was_up = self.up
        self._drop_links()
        if was_up:
            log.warning("redis %s:%d lost: holding messages (at most %d for %gs)", self.host, self.port,
                        self.config.bus_hold_count, self.config.bus_hold_seconds)
        # Exponential backoff with full jitter, so a fleet does not reconnect in lockstep.
        self.backoff = min(max(self.backoff * 2, 0.1), 5.0)
        self.loop.call_later(self.backoff * (0.5 + 0.5 * int.from_bytes(os.urandom(2), "big") / 65535),
                             self._connect)

    def _drop_links(self) -> None:
        self.set_up(False)
        links, self.cmd, self.sub = (self.cmd, self.sub), None, None
        for link in links:
            if link is not None:
                link.close()
        for room in self.chat.rooms.values():
            room.syncing = True             # catch up from history once back

    def _keepalive(self) -> None:
        if self.up and self.callbacks and self.loop.now - self.callbacks[0][1] > self.config.bus_timeout:
            log.warning("redis: no reply for %.1fs", self.config.bus_timeout)
            self._on_link_lost()
        elif self.up and not self.callbacks:
            self._call(("PING",), None)

    def _call(self, args: tuple, callback) -> None:
        self.cmd.write(resp_command(*args))
        self.callbacks.append((callback, self.loop.now))

    # -- bus face

    def _keys(self, room: str) -> tuple[str, str, str]:
        p = f"{self.prefix}{{{room}}}"
        return p + ":seq", p + ":history", p

    def send_publish(self, room: str, prefix: bytes, suffix: bytes, t0: float, resend: bool) -> None:
        """One round trip: the script sequences, stores and publishes."""
        self.unacked.append((room, prefix, suffix, t0))
        seq_key, hist_key, channel = self._keys(room)
        self._call(("EVALSHA", self.publish_sha, 2, seq_key, hist_key, prefix, suffix,
                    self.config.history, channel, f"{self.tag} {t0!r}",
                    resend_key(suffix) if resend else b""), self._on_published)

    def _on_published(self, reply) -> None:
        self.unacked.popleft()
        if isinstance(reply, RespError):
            log.error("redis: publish failed: %s", reply)

    def room_opened(self, room: Room) -> None:
        """Subscribe to the room's channel; a snapshot follows the confirmation."""
        if self.up:
            self._subscribe(room)
        else:
            room.syncing = True

    def _subscribe(self, room: Room) -> None:
        room.syncing = True
        self.sub.write(resp_command("SUBSCRIBE", self._keys(room.name)[2]))

    def room_closed(self, room: Room) -> None:
        """Unsubscribe: this node stops receiving the room's traffic."""
        if self.up:
            self.sub.write(resp_command("UNSUBSCRIBE", self._keys(room.name)[2]))

    def resync(self, room: Room) -> None:
        """Fetch the room's recent history to fill a gap."""
        if self.up and not room.syncing:
            room.syncing = True
            self._request_snapshot(room.name)

    def _request_snapshot(self, room: str) -> None:
        seq_key, hist_key, _ = self._keys(room)
        self._call(("EVALSHA", self.snapshot_sha, 2, seq_key, hist_key, self.config.history),
                   lambda reply: self._on_snapshot(room, reply))

    def _on_snapshot(self, room: str, reply) -> None:
        if isinstance(reply, RespError):
            log.error("redis: snapshot of %s failed: %s", room, reply)
            return
        self.chat.on_snapshot(room, int(reply[0]), reply[1])

    # -- replies

    def _on_cmd_data(self, data: bytes) -> None:
        for reply in self.cmd_parser.feed(data):
            if not self.callbacks:
                continue
            callback, _ = self.callbacks.popleft()
            if callback is not None:
                callback(reply)
            elif isinstance(reply, RespError):
                log.error("redis: %s", reply)

    def _on_sub_data(self, data: bytes) -> None:
        plen = len(self.prefix) + 1
        for reply in self.sub_parser.feed(data):
            if not isinstance(reply, list):
                continue                    # AUTH's answer
            kind = reply[0]
            if kind == b"message":
                head, _, payload = reply[2].partition(b"\n")
                seq, tag, t0 = head.split(b" ", 2)
                room = reply[1][plen:-1].decode()
                mine = tag.decode() == self.tag
                self.chat.on_bus_message(room, int(seq), payload, float(t0) if mine else None)
            elif kind == b"subscribe":
                room = self.chat.rooms.get(reply[1][plen:-1].decode())
                if room is not None and room.syncing:
                    self._request_snapshot(room.name)


# ---------------------------------------------------------------------------
# 4. I/O loop: the event loop, connections, accept, read, write, timers
# ---------------------------------------------------------------------------

HTTP, OPEN, CLOSING, CLOSED = range(4)
RECV_SIZE = 65536
ACCEPT_BATCH = 128


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
DROP_REASONS = ("slow_consumer", "ping_timeout", "write_timeout", "close_timeout")
REFUSE_REASONS = ("bad_request", "not_found", "method", "version", "header_too_large", "origin",
                  "max_connections", "draining", "rate_limit", "bad_message", "too_big",
                  "handshake_timeout", "bus_down")


class Stats:
    """The server's counters as plain attributes; the metrics collector reads them."""

    COUNTERS = ("connections", "connections_total", "messages_in", "deliveries", "bytes_in",
                "bytes_out", "draining", "rooms", "bus_up", "gc_frozen")
    TABLES = ("dropped", "protocol_errors", "refused", "http_requests")
    HISTOGRAMS = ("broadcast", "loop_lag", "gc0", "gc1", "gc2")

    def __init__(self):
        for name in self.COUNTERS:
            setattr(self, name, 0)
        self.bus_up = 1
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.protocol_errors: dict = {}
        self.refused = dict.fromkeys(REFUSE_REASONS, 0)
        self.http_requests: dict = {}
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
            timer[2]()
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
                    handler(events)
            self.end_turn()
            self.after_turn()

    def end_turn(self) -> None:
        """Flush what the turn queued."""
        for link in self.links:
            if link.out:
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


class Connection:
    """One client socket: HTTP until upgraded, then a WebSocket member of a room."""

    __slots__ = (
        "close_after_flush",
        "deadline",
        "fd",
        "inbuf",
        "last_seen",
        "linger",
        "name",
        "out",
        "out_bytes",
        "parser",
        "peer",
        "ping_sent",
        "room",
        "sock",
        "state",
        "strikes",
        "token_time",
        "tokens",
        "writing",
    )

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
        self.linger = False           # half-close after the flush, close at the peer's EOF
        self.room = None
        self.name = ""
        self.last_seen = now
        self.ping_sent = 0.0
        self.deadline = 0.0           # handshake, write or close deadline
        self.tokens = 0.0
        self.token_time = now
        self.strikes = 0
        self.peer = peer


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


class Server(EventLoop):
    """One process's loop serving HTTP, WebSocket and the chat."""

    def __init__(self, config, hub_sock: socket.socket | None = None):
        super().__init__()
        self.config = config
        self.stats = Stats()
        self.gc_watch = GcWatch(self.stats, config.gc_freeze)
        self.dirty: list = []
        self.chat = Chat(config, self.stats, self.send, self.dirty)
        self.conns: dict[int, Connection] = {}
        self.handshaking: dict[int, Connection] = {}
        self.closing: dict[int, Connection] = {}
        self.blocked: dict[int, Connection] = {}
        self.per_ip: dict[str, int] = {}
        self.static = load_static(config.static_dir)
        self.draining = False
        self.drain_deadline = 0.0
        self.max_conns = config.max_connections or max(16, fd_limit() - 64)
        self.sweep_queue: list = []
        self.listener = make_listener(config.host, config.port, reuse_port=hub_sock is not None)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, self._accept)
        self.allowed_origins = {o.strip().rstrip("/").lower()
                                for o in config.allowed_origins.split(",") if o.strip()}
        self.hub = HubBus(self, self.chat, hub_sock) if hub_sock is not None else None
        if config.redis:
            self.chat.bus = RedisBus(self, self.chat, config.redis)
        elif self.hub is not None:
            self.chat.bus = self.hub
        if self.hub is not None:
            self.every(1.0, lambda: self.hub.send_stats(self.stats))
        self.every(0.25, self._tick_lag)
        self.every(0.25, self.gc_watch.freeze_if_due)
        self.every(0.25, self._check_deadlines)
        self.every(min(1.0, config.ping_interval / 4), self._sweep)
        self.every(1.0, self._send_member_counts)

    def _tick_lag(self) -> None:
        """Measure how late the loop runs a timer due every 0.25 s."""
        self.stats.loop_lag.observe(max(0.0, self.now - self._lag_due))
        self._lag_due = self.now + 0.25

    _lag_due = 0.0

    # -- the loop -----------------------------------------------------------

    def serve_forever(self) -> None:
        """Run until stopped and drained."""
        self._lag_due = self.now + 0.25
        self.run()
        for conn in list(self.conns.values()):
            self._abort(conn)
        if self.hub is not None:
            self.hub.send_stats(self.stats)
            self.end_turn()
        self.sel.close()
        self.listener.close()
        self.gc_watch.close()
        log.info("stopped")

    def end_turn(self) -> None:
        """Send what connections and links queued this turn."""
        if self.dirty:
            self._flush_dirty()
        super().end_turn()

    def after_turn(self) -> None:
        """Stop once draining is done."""
        if self.draining and (not self.conns or self.now > self.drain_deadline):
            self.running = False

    def on_connection_event(self, conn: Connection, events: int) -> None:
        """Selector callback for a client socket."""
        if events & selectors.EVENT_WRITE:
            self._flush(conn)
        if events & selectors.EVENT_READ and conn.state != CLOSED:
            self._on_readable(conn)

    def on_stop(self) -> None:
        """SIGTERM/SIGINT: drain."""
        if not self.draining:
            self.drain()

    def on_stop_again(self) -> None:
        """A second signal: stop without waiting."""
        self.drain_deadline = 0.0

    def drain(self) -> None:
        """Refuse new WebSockets, say 1001 to every client, stop when they are gone."""
        log.info("draining %d connections (timeout %.1fs)", len(self.conns), self.config.drain_timeout)
        self.draining = True
        self.stats.draining = 1
        self.drain_deadline = self.now + self.config.drain_timeout
        for conn in list(self.conns.values()):
            if conn.state == OPEN:
                self.close(conn, CLOSE_GOING_AWAY, "server shutting down")
            elif conn.state == HTTP and not conn.out:
                self._abort(conn)

    # -- accept -------------------------------------------------------------

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
            conn = Connection(sock, addr[0], self.now)
            conn.deadline = self.now + self.config.handshake_timeout
            self.conns[conn.fd] = conn
            self.handshaking[conn.fd] = conn
            self.sel.register(sock, selectors.EVENT_READ, conn)
            # Every socket of an address counts, not only upgraded ones: otherwise one
            # address could hold any number of sockets in the handshake (slowloris).
            self.per_ip[conn.peer] = n = self.per_ip.get(conn.peer, 0) + 1
            if self.config.max_per_ip and n > self.config.max_per_ip:
                self._http_error(conn, 503, "too many connections from this address",
                                 "max_connections", (("Retry-After", "1"),))

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
        if conn.parser is not None:        # None: an HTTP reply is on its way out
            self._on_websocket_data(conn, data)

    def _on_websocket_data(self, conn: Connection, data: bytes) -> None:
        try:
            frames, error = conn.parser.feed(data), None
        except ProtocolError as e:
            # Frames completed before the violation still count. Keep code and reason,
            # not e: its traceback holds this frame, a cycle with the local.
            frames, error = e.frames, (e.code, e.reason)
        for opcode, payload in frames:
            if conn.state == OPEN:
                self._on_frame(conn, opcode, payload)
            elif opcode == OP_CLOSE:        # the answer to our close: done
                self._abort(conn)
                return
        if error is not None and conn.state != CLOSED:
            self._fail(conn, *error)

    def _on_frame(self, conn: Connection, opcode: int, payload: bytes) -> None:
        if opcode == OP_TEXT:
            if not self._take_token(conn, payload):
                return
            err = self.chat.receive(conn, payload, self.now)
            if err is not None:
                self.send(conn, err)
        elif opcode == OP_PING:
            if self._take_token(conn):      # each ping costs a pong: limited like messages
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

    def _take_token(self, conn: Connection, payload: bytes = b"") -> bool:
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
            found = MESSAGE_ID.search(payload)     # cheap: a flood is not worth a JSON parse
            self.send(conn, error_frame("rate_limit", f"more than {rate:g} messages per second",
                                        int(found.group(1)) if found else None))
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
        conn.linger = True              # the client may still be sending: let it read the answer
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
            bus = "up" if self.chat.bus.up else "down (holding messages)"
            body = f"{'draining' if self.draining else 'ok'}\nbus: {bus}\n".encode()
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
            if not (since.isascii() and since.isdigit()) or len(since) > 19:
                raise HandshakeError(400, "since must be a non-negative integer")
            since = int(since)
        if not self._origin_allowed(request):
            raise HandshakeError(403, "origin not allowed")
        if self.draining:
            raise HandshakeError(503, "server is draining", (("Retry-After", "1"),))
        if self.stats.connections >= self.max_conns:
            raise HandshakeError(503, "too many connections", (("Retry-After", "1"),))
        self.handshaking.pop(conn.fd, None)
        conn.state = OPEN
        conn.name = self.chat.assign_name(name)
        conn.parser = FrameParser(True, max_frame_size(cfg.max_message_size), accept_binary=False)
        conn.tokens = cfg.rate_burst
        self.stats.connections += 1
        self.stats.connections_total += 1
        self.stats.http_requests[101] = self.stats.http_requests.get(101, 0) + 1
        self.send(conn, upgrade_response(accept))
        self.chat.join(conn, room, since)
        self.stats.rooms = len(self.chat.rooms)
        if rest:
            self._on_websocket_data(conn, rest)

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
                self._finish(conn)
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
                self._finish(conn)
            return
        rest = data[sent:]
        out[:] = [rest]
        conn.out_bytes = len(rest)
        if not conn.writing:
            conn.writing = True
            conn.deadline = self.now + self.config.write_timeout if conn.state == OPEN else conn.deadline
            self.blocked[conn.fd] = conn
            self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
        if conn.out_bytes > self.config.max_buffer and conn.state == OPEN:
            self._cut_off(conn)             # writing is set: the partly sent frame is kept

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
        """Fail the connection (RFC 6455 7.1.7): send Close, then close TCP without waiting."""
        self.stats.protocol_errors[code] = self.stats.protocol_errors.get(code, 0) + 1
        log.debug("closing %s with %d: %s", conn.peer, code, reason)
        if conn.state == OPEN:
            self.close(conn, code, reason)
            conn.parser = None          # out of step with the peer: drop what it still sends
            conn.close_after_flush = conn.linger = True
            self._flush(conn)
        else:
            self._abort(conn)

    def _finish(self, conn: Connection) -> None:
        """Everything is sent: close, or half-close and wait (close-timeout) for the peer's EOF.

        Closing a socket that still has unread input makes the kernel send RST,
        and the peer's kernel then drops the Close frame before it is read.
        """
        if not conn.linger:
            self._abort(conn)
            return
        conn.linger = conn.close_after_flush = False
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
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

    def _abort(self, conn: Connection) -> None:
        """Close the socket now and forget the connection."""
        if conn.state == CLOSED:
            return
        if conn.state == OPEN:
            self._leave(conn)
        conn.state = CLOSED
        n = self.per_ip.get(conn.peer, 0) - 1
        if n > 0:
            self.per_ip[conn.peer] = n
        else:
            self.per_ip.pop(conn.peer, None)
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


# -- --workers N: the supervisor ---------------------------------------------

class HubRoom:
    """The supervisor's view of a room: the seq, history, and subscribed workers."""

    __slots__ = ("history", "seq", "subs")

    def __init__(self, history: int):
        self.seq = 0
        self.history: deque = deque(maxlen=history)   # payloads ending at seq
        self.subs: dict = {}                          # Worker -> None


class Worker:
    """A worker process as the supervisor sees it."""

    def __init__(self, slot: int, proc: subprocess.Popen, link: Link):
        self.slot, self.proc, self.link = slot, proc, link
        self.reader = RecordReader()
        self.stats: dict | None = None
        self.started = time.monotonic()


class Supervisor(EventLoop):
    """--workers N: starts N server processes on one port (SO_REUSEPORT), restarts
    any that dies, and is the sequencer of every room: a worker sends it each
    message, it assigns the seq, keeps the history and forwards the message to
    the workers with members in the room, in one order for all."""

    def __init__(self, config, argv: list):
        super().__init__()
        self.config = config
        self.argv = argv
        self.workers: dict[int, Worker] = {}
        self.rooms: dict[str, HubRoom] = {}
        self.retired = Stats()               # counters of workers that have exited
        self.retired.bus_up = 0
        self.own = Stats()                   # the supervisor's own garbage-collector pauses
        self.own.bus_up = 0
        self.gc_watch = GcWatch(self.own, config.gc_freeze)
        self.every(0.25, self.gc_watch.freeze_if_due)
        self.draining = False
        self.drain_deadline = 0.0
        self.backoff: dict[int, float] = {}
        for slot in range(config.workers):
            self._spawn(slot)
        self.every(0.2, self._reap)

    def _spawn(self, slot: int) -> None:
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, os.path.abspath(__file__), *self.argv, "--workers", "1",
               "--metrics-port", "0", "--worker-id", str(slot), "--hub-fd", str(theirs.fileno())]
        proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),))
        theirs.close()
        worker = Worker(slot, proc, None)
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
            counters = dict(worker.stats, connections=0, rooms=0, draining=0, bus_up=0)
            self.retired.add(counters)

    def _unsubscribe_all(self, worker: Worker) -> None:
        for room in self.rooms.values():
            room.subs.pop(worker, None)

    def _room(self, name: str) -> HubRoom:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = HubRoom(self.config.history)
        return room

    def _on_data(self, worker: Worker, data: bytes) -> None:
        for kind, body in worker.reader.feed(data):
            if kind == REC_PUBLISH:
                rlen, t0, plen, resend = PUBLISH_HEAD.unpack_from(body)
                start = PUBLISH_HEAD.size
                name = body[start:start + rlen]
                room = self._room(name.decode())
                suffix = body[start + rlen + plen:]
                if resend:
                    key = resend_key(suffix)
                    if any(key in p for p in room.history):
                        continue
                room.seq += 1
                payload = body[start + rlen:start + rlen + plen] + str(room.seq).encode() + suffix
                room.history.append(payload)
                rec = record(REC_MESSAGE, MESSAGE_HEAD.pack(rlen, room.seq, t0) + name + payload)
                for sub in room.subs:
                    sub.link.write(rec)
            elif kind == REC_SUBSCRIBE:
                name = body.decode()
                room = self._room(name)
                room.subs[worker] = None
                worker.link.write(record(REC_SNAPSHOT, encode_snapshot(name, room.seq, room.history)))
            elif kind == REC_UNSUBSCRIBE:
                room = self.rooms.get(body.decode())
                if room is not None:
                    room.subs.pop(worker, None)
            elif kind == REC_STATS:
                worker.stats = json.loads(body)

    def total_stats(self) -> Stats:
        """All workers' counters added up, with those of workers that exited."""
        total = Stats()
        total.bus_up = 0
        total.add(self.retired.to_dict())
        total.add(self.own.to_dict())
        live = [w.stats for w in list(self.workers.values()) if w.stats]
        for d in live:
            total.add(d)
        total.bus_up = int(bool(live) and all(d["bus_up"] for d in live))
        total.draining = int(self.draining)
        if not self.config.redis:
            total.rooms = sum(1 for r in list(self.rooms.values()) if r.subs)
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
# 5. Edges: metrics, configuration, logging, main
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
                fds += len(os.listdir(f"/proc/{pid}/fd"))
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
    ("metrics-host", str, None, "address for the metrics port (default: --host)"),
    ("metrics-port", int, 8081, "Prometheus metrics port (0 disables metrics)"),
    ("workers", str, "1", "server processes sharing the port ('auto': one per core)"),
    ("redis", str, "", "redis://host:port/db: share rooms with every instance on this Redis"),
    ("static-dir", str, os.path.join(os.path.dirname(os.path.abspath(__file__)), "static"),
     "folder served at / and /static/"),
    ("max-message-size", int, 65536, "largest message text in UTF-8 bytes"),
    ("max-header-size", int, 8192, "largest HTTP request head in bytes (431 past it)"),
    ("history", int, 1000, "messages kept per room for since=<seq> resume"),
    ("history-bytes", int, 64 << 20, ("bytes of history one process keeps across all rooms; past it "
     "the least recently active rooms lose their oldest messages")),
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
    ("allowed-origins", str, "", "comma-separated Origins allowed besides the server's own host ('*': any)"),
    ("allow-no-origin", "bool", True, "accept clients that send no Origin header (non-browsers)"),
    ("bus-hold-count", int, 10000, "messages held while the bus is down, at most"),
    ("bus-hold-seconds", float, 30.0, "seconds a held message waits for the bus before it is refused"),
    ("bus-timeout", float, 5.0, "seconds without a Redis reply before the link counts as lost"),
    ("gc-freeze", "bool", True, ("after each full garbage collection, freeze the survivors so the "
     "next one does not walk every connection again")),
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
                            metavar="BOOL" if kind == "bool" else kind.__name__.upper(),
                            help=f"{help_text} [env {env_name(flag)}]")
    parser.add_argument("--worker-id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hub-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"scalechat {__version__}")
    args = parser.parse_args(argv)
    if args.metrics_host is None:
        args.metrics_host = args.host
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
                 "close-timeout", "drain-timeout", "bus-hold-seconds", "bus-timeout"):
        if getattr(args, flag.replace("-", "_")) <= 0:
            parser.error(f"--{flag} must be positive")
    if args.rate_limit < 0 or args.rate_burst < 1:
        parser.error("--rate-limit must be >= 0 and --rate-burst >= 1")
    return args


def main(argv: list | None = None) -> int:
    """Run the server (or the supervisor of --workers) until SIGTERM or SIGINT."""
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    limit = raise_fd_limit()
    supervising = args.workers > 1 and args.hub_fd is None
    try:
        if supervising:
            make_listener(args.host, args.port, reuse_port=True, listen=False).close()
            loop = Supervisor(args, list(sys.argv[1:] if argv is None else argv))
        else:
            hub = socket.socket(fileno=args.hub_fd) if args.hub_fd is not None else None
            loop = Server(args, hub)
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
