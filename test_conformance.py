"""RFC 6455 conformance of scalechat.py, case by case in the style of the Autobahn|Testsuite.

The client here writes every frame by hand (it does not use scalechat.py's own
framing), so a bug in the server's protocol core cannot hide behind the same
bug in the test. The server is a chat server, not an echo server: where
Autobahn expects an echo, a case sends a JSON chat message and expects the
room's ``message`` frame carrying the same text; valid text that is not JSON
gets an ``error`` frame and the connection stays open.

Each case runs on a fresh connection in a room of its own and asserts the whole
outcome: every frame the server answered (member-count notices aside), the
close code, and that the server closed the TCP connection.
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import socket
import struct
import time
from dataclasses import dataclass

import pytest

from testkit import closed_by_peer, send_in_chops, start_server

# ---------------------------------------------------------------------------
# A raw WebSocket client: any bytes, any frame, even wrong ones
# ---------------------------------------------------------------------------

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
RFC_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_XOR_TABLES = [bytes(i ^ k for i in range(256)) for k in range(256)]


def xor_mask(payload: bytes, key: bytes) -> bytes:
    """Mask payload with a 4-byte key: every 4th byte through one translation table."""
    out = bytearray(payload)
    for i in range(4):
        out[i::4] = out[i::4].translate(_XOR_TABLES[key[i]])
    return bytes(out)


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
          masked: bool = True, length: int | None = None) -> bytes:
    """One client frame (RFC 6455 5.2) with every field settable, even to wrong values."""
    n = len(payload) if length is None else length
    head = bytes(((0x80 if fin else 0) | rsv << 4 | opcode,))
    m = 0x80 if masked else 0
    if n < 126:
        head += bytes((m | n,))
    elif n < 1 << 16:
        head += bytes((m | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((m | 127,)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + xor_mask(payload, key)


def close_frame(code: int | None = None, reason: bytes = b"") -> bytes:
    """A client Close frame; no payload at all when code is None."""
    return frame(OP_CLOSE, b"" if code is None else struct.pack("!H", code) + reason)


def chat_json(text: str, message_id: int = 1) -> bytes:
    """A client chat message as the protocol wants it (UTF-8 JSON, non-ASCII kept raw)."""
    return json.dumps({"message_id": message_id, "text": text}, ensure_ascii=False).encode()


class RawClient:
    """A WebSocket client on a plain socket: sends exactly what it is told, reads server frames."""

    def __init__(self, port: int, resource: str = "/ws", *, timeout: float = 5.0,
                 rcvbuf: int | None = None, host: str = "127.0.0.1"):
        self.sock = socket.socket()
        if rcvbuf:      # before connect, so the TCP window stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {resource} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        status, *lines = self._read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        assert status.startswith("HTTP/1.1 101 "), status
        assert headers["upgrade"].lower() == "websocket" and "upgrade" in headers["connection"].lower()
        assert headers["sec-websocket-accept"] == base64.b64encode(
            hashlib.sha1(key.encode() + RFC_GUID).digest()).decode()
        self.welcome = self.recv_json()
        assert self.welcome["type"] == "welcome", self.welcome

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(marker)
        return head

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("the server closed the connection")
        self.buf += data

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def send(self, data: bytes, chop: int = 0, pause: float = 0.0) -> None:
        """Send bytes at once, or in chops of that many bytes (one TCP segment each)."""
        send_in_chops(self.sock, data, chop, pause)

    def recv_frame(self) -> tuple[int, bytes]:
        """The next server frame as (opcode, payload); server frames are final and unmasked."""
        b0, b1 = self._read(2)
        assert b0 & 0xF0 == 0x80, f"server frame with FIN unset or RSV bits: {b0:#x}"
        assert not b1 & 0x80, "server frame is masked"
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self._read(2), "big")
        elif n == 127:
            n = int.from_bytes(self._read(8), "big")
        return b0 & 0x0F, self._read(n)

    def recv_json(self, skip: tuple = ("members", "ack")) -> dict:
        """The next JSON text frame that is not a member-count notice or (by default) an ack."""
        while True:
            opcode, payload = self.recv_frame()
            assert opcode == OP_TEXT, (opcode, payload)
            obj = json.loads(payload)
            if obj["type"] not in skip:
                return obj

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True when the server ends the TCP connection (FIN or reset) within timeout."""
        return closed_by_peer(self.sock, timeout)

    def close(self) -> None:
        """Drop the socket."""
        self.sock.close()


# ---------------------------------------------------------------------------
# Cases: bytes to send, the answers expected, and how the connection ends
# ---------------------------------------------------------------------------

PAUSE = 0.001           # between the separately sent parts of a case
CLOSE_WAIT = 1.0        # the server must end TCP this soon after the closing handshake
MAX_TEXT = 1 << 20      # the shared server's --max-message-size


@dataclass(frozen=True)
class Case:
    """A conformance case: parts sent one after the other, then the exact answers."""
    id: str
    send: tuple
    expect: tuple
    chop: int = 0               # send each part in TCP pieces of this many bytes
    client_closes: bool = True  # the case ends with the client's own Close frame


def ok(case_id: str, *parts: bytes, expect: tuple = (), chop: int = 0) -> Case:
    """A case the connection survives: the client then closes with 1000, which is echoed."""
    return Case(case_id, (*parts, close_frame(1000)), (*expect, ("close", 1000)), chop)


def fails(case_id: str, *parts: bytes, code: int, expect: tuple = (), chop: int = 0) -> Case:
    """A case the server must fail with code (after answering expect)."""
    return Case(case_id, parts, (*expect, ("close", code)), chop, client_closes=False)


def closes(case_id: str, *parts: bytes, code: int, expect: tuple = ()) -> Case:
    """A case that sends its own Close frame; the server answers with code."""
    return Case(case_id, parts, (*expect, ("close", code)))


def text(s: str, message_id: int = 1) -> bytes:
    """One text frame holding a chat message."""
    return frame(OP_TEXT, chat_json(s, message_id))


def message(s: str) -> tuple:
    """The answer to a chat message: the room's message frame with the same text."""
    return ("message", s)


def pong(payload: bytes) -> tuple:
    """The answer to a ping: a pong with the same payload."""
    return ("pong", payload)


def stars(n: int) -> str:
    """The text that makes a chat message exactly n bytes long."""
    return "*" * (n - len(chat_json("")))


def fragmented(*parts: bytes, opcode: int = OP_TEXT) -> bytes:
    """One message as consecutive fragments holding parts, the first carrying opcode."""
    last = len(parts) - 1
    return b"".join(frame(OP_CONT if i else opcode, p, fin=i == last) for i, p in enumerate(parts))


def split(payload: bytes, size: int) -> list:
    """payload in pieces of size bytes."""
    return [payload[i:i + size] for i in range(0, len(payload), size)]


BAD_JSON = ("error", "bad_json")
HELLO = "Hello, world!"
SIZES = (0, 125, 126, 127, 128, 65535, 65536)

FRAMING = [
    ok("1.1.1", frame(OP_TEXT), expect=(BAD_JSON,)),
    *[ok(f"1.1.{i}", text(stars(n)), expect=(message(stars(n)),)) for i, n in enumerate(SIZES[1:], 2)],
    ok("1.1.8", text(stars(65536)), expect=(message(stars(65536)),), chop=997),
    *[fails(f"1.2.{i}", frame(OP_BINARY, b"\xfe" * n), code=1003) for i, n in enumerate(SIZES, 1)],
    fails("1.2.8", frame(OP_BINARY, b"\xfe" * 65536), code=1003, chop=997),
    fails("1.3.1", frame(OP_TEXT, chat_json(HELLO), masked=False), code=1002),
    fails("1.3.2", frame(OP_TEXT, length=1 << 63), code=1002),
]

PINGS = [
    ok("2.1", frame(OP_PING), expect=(pong(b""),)),
    ok("2.2", frame(OP_PING, HELLO.encode()), expect=(pong(HELLO.encode()),)),
    ok("2.3", frame(OP_PING, b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff"),
       expect=(pong(b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff"),)),
    ok("2.4", frame(OP_PING, b"\xfe" * 125), expect=(pong(b"\xfe" * 125),)),
    fails("2.5", frame(OP_PING, b"\xfe" * 126), code=1002),
    ok("2.6", frame(OP_PING, b"\xfe" * 125), expect=(pong(b"\xfe" * 125),), chop=1),
    ok("2.7", frame(OP_PONG)),
    ok("2.8", frame(OP_PONG, b"unsolicited pong payload")),
    ok("2.9", frame(OP_PONG, b"unsolicited") + frame(OP_PING, b"solicited"), expect=(pong(b"solicited"),)),
    ok("2.10", b"".join(frame(OP_PING, b"payload-%d" % i) for i in range(10)),
       expect=tuple(pong(b"payload-%d" % i) for i in range(10))),
    ok("2.11", b"".join(frame(OP_PING, b"payload-%d" % i) for i in range(10)),
       expect=tuple(pong(b"payload-%d" % i) for i in range(10)), chop=1),
]


def before_violation(case_id: str, bad: bytes, chop: int = 0) -> Case:
    """Autobahn's pattern: a message, the violation, a ping, all sent together. The message
    is answered (even when it completes in the same read as the violation); the ping is not."""
    return fails(case_id, text(HELLO) + bad + frame(OP_PING), code=1002, expect=(message(HELLO),),
                 chop=chop)


RESERVED = [
    fails("3.1", frame(OP_TEXT, chat_json(HELLO), rsv=1), code=1002),
    before_violation("3.2", frame(OP_TEXT, chat_json(HELLO), rsv=2)),
    before_violation("3.3", frame(OP_TEXT, chat_json(HELLO), rsv=3)),
    before_violation("3.4", frame(OP_TEXT, chat_json(HELLO), rsv=4), chop=1),
    fails("3.5", frame(OP_BINARY, b"\x00\xff", rsv=5), code=1002),
    fails("3.6", frame(OP_PING, HELLO.encode(), rsv=6), code=1002),
    fails("3.7", frame(OP_CLOSE, struct.pack("!H", 1000), rsv=7), code=1002),
]

OPCODES = [
    case
    for group, ops in (("4.1", (3, 4, 5, 6, 7)), ("4.2", (11, 12, 13, 14, 15)))
    for case in (
        fails(f"{group}.1", frame(ops[0]), code=1002),
        fails(f"{group}.2", frame(ops[1], b"reserved opcode payload"), code=1002),
        before_violation(f"{group}.3", frame(ops[2])),
        before_violation(f"{group}.4", frame(ops[3], b"reserved opcode payload")),
        before_violation(f"{group}.5", frame(ops[4], b"reserved opcode payload"), chop=1),
    )
]

FRAG_JSON = chat_json("fragment one, fragment two")
FRAG_A, FRAG_B = FRAG_JSON[:20], FRAG_JSON[20:]
FRAG_TEXT = message("fragment one, fragment two")
TWO_FRAGMENTS = fragmented(FRAG_A, FRAG_B)
WITH_PING = (frame(OP_TEXT, FRAG_A, fin=False), frame(OP_PING, b"between"), frame(OP_CONT, FRAG_B))
NOTHING_TO_CONTINUE = frame(OP_CONT, b"fragment", fin=True)
DANGLING = frame(OP_CONT, b"fragment", fin=False)
FIVE_TEXT = "five fragments with two pings between them"
FIVE = split(chat_json(FIVE_TEXT), len(chat_json(FIVE_TEXT)) // 5 + 1)
FIVE_WITH_PINGS = (frame(OP_TEXT, FIVE[0], fin=False), frame(OP_CONT, FIVE[1], fin=False),
                   frame(OP_PING, b"pongme 1!"), frame(OP_CONT, FIVE[2], fin=False),
                   frame(OP_CONT, FIVE[3], fin=False), frame(OP_PING, b"pongme 2!"), frame(OP_CONT, FIVE[4]))
FIVE_ANSWERS = (pong(b"pongme 1!"), pong(b"pongme 2!"), message(FIVE_TEXT))

FRAGMENTATION = [
    fails("5.1", frame(OP_PING, b"frag", fin=False) + frame(OP_CONT, b"ment"), code=1002),
    fails("5.2", frame(OP_PONG, b"frag", fin=False) + frame(OP_CONT, b"ment"), code=1002),
    ok("5.3", TWO_FRAGMENTS, expect=(FRAG_TEXT,)),
    ok("5.4", TWO_FRAGMENTS, expect=(FRAG_TEXT,), chop=1),
    ok("5.5", frame(OP_TEXT, FRAG_A, fin=False), frame(OP_CONT, FRAG_B), expect=(FRAG_TEXT,)),
    ok("5.6", b"".join(WITH_PING), expect=(pong(b"between"), FRAG_TEXT)),
    ok("5.7", b"".join(WITH_PING), expect=(pong(b"between"), FRAG_TEXT), chop=1),
    ok("5.8", *WITH_PING, expect=(pong(b"between"), FRAG_TEXT)),
    fails("5.9", NOTHING_TO_CONTINUE + text(HELLO), code=1002),
    fails("5.10", NOTHING_TO_CONTINUE, text(HELLO), code=1002),
    fails("5.11", NOTHING_TO_CONTINUE + text(HELLO), code=1002, chop=1),
    fails("5.12", DANGLING + text(HELLO), code=1002),
    fails("5.13", DANGLING, text(HELLO), code=1002),
    fails("5.14", DANGLING + text(HELLO), code=1002, chop=1),
    fails("5.15", TWO_FRAGMENTS + DANGLING + text(HELLO), code=1002, expect=(FRAG_TEXT,)),
    fails("5.16", (DANGLING + NOTHING_TO_CONTINUE + text(HELLO)) * 2, code=1002),
    fails("5.17", (NOTHING_TO_CONTINUE * 2 + text(HELLO)) * 2, code=1002),
    fails("5.18", frame(OP_TEXT, FRAG_A, fin=False) + frame(OP_TEXT, FRAG_B), code=1002),
    # Two fragments and a ping, a pause, two more fragments, a ping and the last one ...
    ok("5.19", b"".join(FIVE_WITH_PINGS[:3]), b"".join(FIVE_WITH_PINGS[3:]), expect=FIVE_ANSWERS),
    # ... and every frame on its own.
    ok("5.20", *FIVE_WITH_PINGS, expect=FIVE_ANSWERS),
]

KOSME = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5"     # "κόσμε", as Kuhn spells it
MIXED = "Hello-µ@ßöäüàá-UTF-8!!"
JSON_HEAD = b'{"message_id": 1, "text": "'
JSON_TAIL = b'", "sent_at": "2026-11-28T10:00:00.123456Z"}'


def with_text(raw: bytes) -> bytes:
    """A chat message whose text is raw, put between the quotes byte for byte."""
    return JSON_HEAD + raw + JSON_TAIL


def valid_answer(raw: bytes) -> tuple:
    """What valid UTF-8 text earns: the message, or bad_json for a raw control character."""
    return BAD_JSON if any(b < 0x20 for b in raw) else message(raw.decode())


# Markus Kuhn's UTF-8 decoder stress test, as Autobahn's cases 6.5 to 6.23 use it.
VALID_UTF8 = [
    ("6.5.1", KOSME),
    ("6.7.1", b"\x00"), ("6.7.2", b"\xc2\x80"), ("6.7.3", b"\xe0\xa0\x80"), ("6.7.4", b"\xf0\x90\x80\x80"),
    ("6.9.1", b"\x7f"), ("6.9.2", b"\xdf\xbf"), ("6.9.3", b"\xef\xbf\xbf"), ("6.9.4", b"\xf4\x8f\xbf\xbf"),
    ("6.11.1", b"\xed\x9f\xbf"), ("6.11.2", b"\xee\x80\x80"), ("6.11.3", b"\xef\xbf\xbd"),
    ("6.11.4", b"\xf4\x8f\xbf\xbf"),
    ("6.22.1", b"".join(chr(plane << 16 | low).encode() for plane in range(17) for low in (0xFFFE, 0xFFFF))),
    ("6.22.2", b"".join(chr(c).encode() for c in range(0xFDD0, 0xFDF0))),
    ("6.23.1", b"\xef\xbf\xbd" * 3), ("6.23.2", b"\xef\xbb\xbf" + KOSME),
]
CUT_KOSME = [KOSME[:n] for n in (1, 3, 4, 6, 8, 10)]     # each ends inside a character
MISSING_LAST = [b"\xc0", b"\xe0\x80", b"\xf0\x80\x80", b"\xf8\x80\x80\x80", b"\xfc\x80\x80\x80\x80",
                b"\xdf", b"\xef\xbf", b"\xf7\xbf\xbf", b"\xfb\xbf\xbf\xbf", b"\xfd\xbf\xbf\xbf\xbf"]
SURROGATES = [b"\xed\xa0\x80", b"\xed\xad\xbf", b"\xed\xae\x80", b"\xed\xaf\xbf", b"\xed\xb0\x80",
              b"\xed\xbe\x80", b"\xed\xbf\xbf"]
INVALID_UTF8 = [
    ("6.3.1", KOSME + b"\xed\xa0\x80edited"),
    *[(f"6.6.{i}", cut) for i, cut in enumerate(CUT_KOSME, 1)],
    ("6.8.1", b"\xf8\x88\x80\x80\x80"), ("6.8.2", b"\xfc\x84\x80\x80\x80\x80"),
    ("6.10.1", b"\xf7\xbf\xbf\xbf"), ("6.10.2", b"\xfb\xbf\xbf\xbf\xbf"),
    ("6.10.3", b"\xfd\xbf\xbf\xbf\xbf\xbf"), ("6.11.5", b"\xf4\x90\x80\x80"),
    *[(f"6.12.{i}", (b"\x80\xbf" * 4)[:n]) for i, n in enumerate(range(1, 8), 1)],
    ("6.12.8", bytes(range(0x80, 0xC0))),
    *[(f"6.13.{i}", b"".join(bytes((c, 0x20)) for c in range(lo, hi))) for i, (lo, hi) in
      enumerate(((0xC0, 0xE0), (0xE0, 0xF0), (0xF0, 0xF8), (0xF8, 0xFC), (0xFC, 0xFE)), 1)],
    *[(f"6.14.{i}", seq) for i, seq in enumerate(MISSING_LAST, 1)],
    ("6.15.1", b"".join(MISSING_LAST)),
    ("6.16.1", b"\xfe"), ("6.16.2", b"\xff"), ("6.16.3", b"\xfe\xfe\xff\xff"),
    *[(f"6.17.{i}", seq) for i, seq in enumerate((b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf0\x80\x80\xaf",
                                                   b"\xf8\x80\x80\x80\xaf", b"\xfc\x80\x80\x80\x80\xaf"), 1)],
    *[(f"6.18.{i}", seq) for i, seq in enumerate((b"\xc1\xbf", b"\xe0\x9f\xbf", b"\xf0\x8f\xbf\xbf",
                                                   b"\xf8\x87\xbf\xbf\xbf", b"\xfc\x83\xbf\xbf\xbf\xbf"), 1)],
    *[(f"6.19.{i}", seq) for i, seq in enumerate((b"\xc0\x80", b"\xe0\x80\x80", b"\xf0\x80\x80\x80",
                                                   b"\xf8\x80\x80\x80\x80", b"\xfc\x80\x80\x80\x80\x80"), 1)],
    *[(f"6.20.{i}", seq) for i, seq in enumerate(SURROGATES, 1)],
    *[(f"6.21.{i}", high + low) for i, (high, low) in
      enumerate(((h, lo) for h in SURROGATES[:4] for lo in (SURROGATES[4], SURROGATES[6])), 1)],
]


def pieces(data: bytes, cuts) -> list:
    """data cut at the given offsets."""
    return [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)])]


def cut_frame(payload: bytes, *offsets: int) -> list:
    """One masked text frame holding payload, cut into parts at these payload offsets."""
    data = frame(OP_TEXT, payload)
    header = len(data) - len(payload)
    return pieces(data, [header + o for o in offsets])


MIXED_JSON = chat_json(MIXED)
MIXED_CUT = MIXED_JSON.index("ß".encode())      # a character boundary inside the text
BAD_KOSME = with_text(KOSME + b"\xed\xa0\x80edited")
UTF8 = [
    ok("6.1.1", frame(OP_TEXT), expect=(BAD_JSON,)),
    ok("6.1.2", fragmented(b"", b"", b""), expect=(BAD_JSON,)),
    ok("6.1.3", fragmented(b"", chat_json(HELLO), b""), expect=(message(HELLO),)),
    ok("6.2.1", frame(OP_TEXT, MIXED_JSON), expect=(message(MIXED),)),
    ok("6.2.2", fragmented(MIXED_JSON[:MIXED_CUT], MIXED_JSON[MIXED_CUT:]), expect=(message(MIXED),)),
    ok("6.2.3", fragmented(*split(MIXED_JSON, 1)), expect=(message(MIXED),)),
    ok("6.2.4", fragmented(*split(chat_json(KOSME.decode()), 1)), expect=(message(KOSME.decode()),)),
    fails("6.3.2", fragmented(*split(BAD_KOSME, 1)), code=1007),
    *[ok(case_id, frame(OP_TEXT, with_text(raw)), expect=(valid_answer(raw),)) for case_id, raw in VALID_UTF8],
    *[fails(case_id, frame(OP_TEXT, with_text(raw)), code=1007) for case_id, raw in INVALID_UTF8],
]

# Fail fast: the server must answer 1007 although the message (or even the frame)
# is unfinished; what would complete it is never sent.
HEAD_KOSME = JSON_HEAD + KOSME
FAIL_FAST = [
    fails("6.4.1", frame(OP_TEXT, HEAD_KOSME, fin=False), frame(OP_CONT, b"\xf4\x90\x80\x80", fin=False),
          code=1007),
    fails("6.4.2", frame(OP_TEXT, HEAD_KOSME + b"\xf4", fin=False), frame(OP_CONT, b"\x90", fin=False),
          code=1007),
    fails("6.4.3", *cut_frame(HEAD_KOSME + b"\xf4\x90\x80\x80edited\"}", len(HEAD_KOSME),
                              len(HEAD_KOSME) + 4)[:2], code=1007),
    fails("6.4.4", *cut_frame(HEAD_KOSME + b"\xf4\x90\x80\x80edited\"}", len(HEAD_KOSME) + 1,
                              len(HEAD_KOSME) + 2)[:2], code=1007),
    fails("6.4.5", *cut_frame(HEAD_KOSME + b"\xed\xa0\x80edited\"}", len(HEAD_KOSME) + 1,
                              len(HEAD_KOSME) + 2)[:2], code=1007),
    # Every invalid sequence, followed by the closing quote, in a frame not yet complete ...
    *[fails(f"{case_id}-frame", cut_frame(with_text(raw), len(JSON_HEAD) + len(raw) + 1)[0], code=1007)
      for case_id, raw in INVALID_UTF8],
    # ... and split after its first byte across two fragments of an unfinished message.
    *[fails(f"{case_id}-fragments", frame(OP_TEXT, JSON_HEAD + raw[:1], fin=False)
            + frame(OP_CONT, raw[1:] + b'"', fin=False), code=1007)
      for case_id, raw in INVALID_UTF8],
]

VALID_CODES = (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
               3000, 3999, 4000, 4999)
INVALID_CODES = (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535)
K64, K256, LIMIT_TEXT = "*" * (64 << 10), "*" * (256 << 10), "*" * MAX_TEXT


def bad_close(case_id: str, payload: bytes, code: int) -> Case:
    """The client closes with an invalid Close frame: the server fails with code and, as
    RFC 6455 7.1.7 says, closes TCP without waiting for another Close."""
    return closes(case_id, frame(OP_CLOSE, payload), code=code)


CLOSING = [
    closes("7.1.1", text(HELLO) + close_frame(1000), code=1000, expect=(message(HELLO),)),
    closes("7.1.2", close_frame(1000) + close_frame(1000), code=1000),
    closes("7.1.3", close_frame(1000) + frame(OP_PING, b"after close"), code=1000),
    closes("7.1.4", close_frame(1000) + text(HELLO), code=1000),
    closes("7.1.5", frame(OP_TEXT, FRAG_A, fin=False) + close_frame(1000) + frame(OP_CONT, FRAG_B),
           code=1000),
    closes("7.1.6", text(K256) + close_frame(1000) + frame(OP_PING), code=1000, expect=(message(K256),)),
    closes("7.3.1", close_frame(None), code=1005),
    bad_close("7.3.2", b"\x03", code=1002),
    closes("7.3.3", close_frame(1000), code=1000),
    closes("7.3.4", close_frame(1000, b"Hello World!"), code=1000),
    closes("7.3.5", close_frame(1000, b"*" * 123), code=1000),
    bad_close("7.3.6", struct.pack("!H", 1000) + b"*" * 124, code=1002),
    bad_close("7.5.1", struct.pack("!H", 1000) + BAD_KOSME[len(JSON_HEAD):len(JSON_HEAD) + 20], code=1007),
    *[closes(f"7.7.{i}", close_frame(code), code=code) for i, code in enumerate(VALID_CODES, 1)],
    *[bad_close(f"7.9.{i}", struct.pack("!H", code), code=1002) for i, code in enumerate(INVALID_CODES, 1)],
]

LIMITS = [
    ok("9.1.1", text(K64), expect=(message(K64),)),
    ok("9.1.2", text(K256), expect=(message(K256),)),
    ok("9.1.3", text(LIMIT_TEXT), expect=(message(LIMIT_TEXT),)),
    ok("9.1.4", text(LIMIT_TEXT + "*"), expect=(("error", "too_big"),)),
    # Only the header of a frame far too big: refused before any of its payload.
    fails("9.1.5", frame(OP_TEXT, length=64 * MAX_TEXT), code=1009),
    fails("9.1.6", frame(OP_TEXT, b" " * (4 * MAX_TEXT), fin=False)
          + frame(OP_CONT, length=4 * MAX_TEXT), code=1009),
    fails("9.2.1", frame(OP_BINARY, b"\xfe" * (64 << 10)), code=1003),
    *[ok(f"9.3.{i}", fragmented(*split(chat_json(K256), size)), expect=(message(K256),))
      for i, size in enumerate((64, 256, 1024, 4096, 16384, 65536, 262144), 1)],
    fails("9.4.1", fragmented(*split(b"\xfe" * (64 << 10), 1024), opcode=OP_BINARY), code=1003),
    *[ok(f"9.5.{i}", text(K64), expect=(message(K64),), chop=chop)
      for i, chop in enumerate((64, 128, 256, 512, 1024, 2048), 1)],
    *[ok(f"9.7.{i}", b"".join(text(f"{k:06d}".ljust(size, "*"), k) for k in range(1000)),
         expect=tuple(message(f"{k:06d}".ljust(size, "*")) for k in range(1000)))
      for i, size in enumerate((16, 64, 256, 1024, 4096), 1)],
]


# ---------------------------------------------------------------------------
# Running a case against one shared server
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_server():
    """One server for every case: no rate limits, room for the 9.x sizes, no stray pings."""
    s = start_server("--rate-limit", "0", "--rate-limit-bytes", "0", "--ping-interval", "60",
                     "--max-message-size", str(MAX_TEXT),
                     "--max-buffer", str(64 << 20), "--log-level", "WARNING")
    yield s
    s.stop()


def answer(opcode: int, payload: bytes) -> tuple | None:
    """A server frame as a comparable answer; None for a member count or an ack (chat, not framing)."""
    if opcode == OP_TEXT:
        obj = json.loads(payload)
        if obj["type"] in ("members", "ack"):
            return None
        return ("message", obj["text"]) if obj["type"] == "message" else (obj["type"], obj.get("code"))
    if opcode == OP_CLOSE:
        assert len(payload) != 1, "a Close payload of one byte"
        payload[2:].decode()        # the reason must be UTF-8
        return ("close", struct.unpack("!H", payload[:2])[0] if payload else 1005)
    return ({OP_PONG: "pong", OP_PING: "ping", OP_BINARY: "binary"}[opcode], payload)


def run_case(port: int, case: Case) -> tuple[list, bool]:
    """Play a case; return the server's answers up to its Close, and whether it closed TCP."""
    c = RawClient(port, f"/ws/case-{case.id}")
    try:
        try:
            for i, part in enumerate(case.send):
                if i:
                    time.sleep(PAUSE)
                # Octet-wise cases pause between bytes so that each is a read of its own.
                c.send(part, case.chop, PAUSE if case.chop == 1 else 0.0)
        except (BrokenPipeError, ConnectionResetError):
            pass        # the server failed the connection while the case was still sending
        answers, seqs = [], []
        while not answers or answers[-1][0] != "close":
            opcode, payload = c.recv_frame()
            a = answer(opcode, payload)
            if a is not None:
                answers.append(a)
                if a[0] == "message":
                    seqs.append(json.loads(payload)["seq"])
        assert seqs == list(range(1, len(seqs) + 1)), f"seq with gaps or out of order: {seqs[:20]}"
        if not case.client_closes:
            try:        # answer the server's Close, as a peer must (RFC 6455 5.5.1)
                code = answers[-1][1]
                c.send(close_frame(None if code == 1005 else code))
            except OSError:
                pass
        return answers, c.closed_by_server(CLOSE_WAIT)
    finally:
        c.close()


def params(cases: list) -> list:
    """pytest parameters named by case id."""
    return [pytest.param(c, id=c.id) for c in cases]


@pytest.mark.parametrize("case", params(FRAMING + PINGS + RESERVED + OPCODES + FRAGMENTATION + UTF8
                                         + FAIL_FAST + CLOSING + LIMITS))
def test_case(shared_server, case):
    """One case's exact outcome: the answers, the close code, TCP closed by the server."""
    answers, closed = run_case(shared_server.port, case)
    assert answers == list(case.expect)
    assert closed, "the server did not close the TCP connection"
