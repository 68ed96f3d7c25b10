"""The chat fuzzer: structure-aware cases, a reference model of docs/protocol.md, live servers.

bench/fuzz_chat.py runs it for minutes per mode; test_chat_fuzz.py runs a few
hundred cases per mode, and tests the model and the checks themselves.

A Target starts the live servers of a mode on free loopback ports: one
scalechat.py process (single), a --workers 2 supervisor (workers), or two
instances that share a private redis-server (redis; senders on one, the watcher
on the other). A seeded generator that knows the structure of what it breaks
makes four kinds of case:

- json: one chat frame, every field varied: message_id at the 64-bit edges, of
  thousands of digits, float, NaN, bool, string, nested; text with lone
  surrogates, NUL, control characters and direction marks, at and past the size
  limit, empty; sent_at valid, nearly valid, huge or not a string; resend;
  unknown and duplicate keys; deep nesting; non-objects; invalid JSON; a BOM;
  odd whitespace; escaped keys, quotes and backslashes.
- query: the upgrade's room, name, since and client: percent-encoded surrogates,
  control characters, one character too long, repeated, empty.
- frames: fragmented messages with pings and pongs between the fragments, empty
  continuations, unsolicited pongs, close frames with odd codes, binary and
  malformed frames, invalid UTF-8, oversized headers, frames after a close.
- resend: clients that reconnect and resend, with and without a client id, and
  two clients under one name.

The oracle is a reference model written from docs/protocol.md and the
interface of issue 12: every frame must get an answer the model allows (its
echo and its ack, a duplicate ack, an error frame with a documented code, a
close code, an HTTP status); every server frame must be strict JSON with the
documented fields; a watcher in the room must receive exactly the messages
accepted, in seq order; the server processes must stay up (workers: no worker
restarted); a victim in another room must get its own echo within 2 s. After a
failure the Fuzzer looks, on fresh servers, for a smaller input that fails the
same way.
"""
from __future__ import annotations

import base64
import codecs
import itertools
import json
import os
import random
import re
import struct
import sys
import time
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl, quote, unquote

import scalechat as sc
from testkit import (
    TCP_LISTEN,
    RawClient,
    RedisServer,
    ServerProc,
    alive,
    children,
    scrape,
    start_server,
    tcp_sockets,
    total,
)

MODES = ("single", "workers", "redis")
CATEGORIES = ("json", "frames", "query", "resend")
WEIGHTS = (10, 5, 3, 2)
MAX_MESSAGE_SIZE = 1024         # small: texts at and past the limit stay cheap to send
# The fuzzer is one fast client: the rate limit must not be what answers it.
SERVER_ARGS = ("--log-level", "WARNING", "--drain-timeout", "1", "--max-message-size", str(MAX_MESSAGE_SIZE),
               "--rate-limit", "100000", "--rate-burst", "100000", "--rate-limit-bytes", "0")
BOUND = 2.0                     # seconds any answer may take
BATCH = 40                      # cases per room (a room's history stays far below its bounds)
# A text of N bytes is at most 6N once JSON-escaped. Frames up to SOFT bytes must be
# read and answered; a header declaring more than HARD must get 1009. The generators
# stay out of the band between, where the envelope the server allows decides.
SOFT = 6 * MAX_MESSAGE_SIZE + 64
HARD = 6 * MAX_MESSAGE_SIZE + 4096


class Finding(Exception):
    """The server broke the contract. kind: crash, stall, json or answer."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


# ---------------------------------------------------------------------------
# The reference model: what the server may answer
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Accept:
    """A chat frame the room must take."""
    message_id: int | None
    text: str
    sent_at: str | None
    resend: bool


@dataclass(frozen=True)
class Refuse:
    """A chat frame refused with an ``error`` frame of this code (and message_id, when known)."""
    code: str
    message_id: int | None = None


BAD_JSON = Refuse("bad_json")
# The model's own patterns, as the interface states them: the server's would test it against itself.
SENT_AT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
                     r"([Zz]|[+-][0-9]{2}:[0-9]{2})")
# The same with any Unicode digit, as the interface's \d reads: either answer is clear.
SENT_AT_ANY_DIGIT = re.compile(SENT_AT.pattern.replace("[0-9]", r"\d"))
ROOM = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CLIENT = re.compile(r"[A-Za-z0-9_-]{16,64}")
MAX_INT_DIGITS = 4300           # CPython refuses to read longer integers (sys.get_int_max_str_digits)
_MISSING = object()


class _Object(dict):
    """A JSON object that remembers its members in order, duplicates included."""
    pairs: list


class _Extension:
    """A value only a lenient parser reads: NaN, Infinity, an integer too long for CPython."""


def _parse(text: str, strict: bool) -> tuple:
    """(value, whether it used an extension) of one JSON text; ValueError if it is not JSON."""
    used = []

    def pairs(items):
        obj = _Object(items)
        obj.pairs = items
        return obj

    def extension(_text):
        used.append(True)
        return _Extension()

    def integer(digits):
        return extension(digits) if len(digits.lstrip("-")) > MAX_INT_DIGITS else int(digits)

    value = json.loads(text, object_pairs_hook=pairs, parse_constant=extension, parse_int=integer, strict=strict)
    return value, bool(used)


def _nesting(text: str) -> int:
    """The deepest nesting of arrays and objects in a JSON text."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _valid_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _has_lone_surrogate(value) -> bool:
    if isinstance(value, str):
        return not _valid_unicode(value)
    if isinstance(value, _Object):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.pairs)
    return isinstance(value, list) and any(map(_has_lone_surrogate, value))


def _message_id_options(value) -> list:
    if value is None or value is _MISSING:
        return [("ok", None)]
    if type(value) is int and abs(value) < 1 << 63:
        return [("ok", value)]
    return [("err", "bad_message")]


def _text_options(value, max_size: int) -> list:
    if value is _MISSING or value is None or value == "":
        return [("err", "missing_text")]
    if type(value) is not str:
        return [("err", "missing_text"), ("err", "bad_message")]
    if not _valid_unicode(value):
        return [("err", "bad_message")]
    if len(value.encode()) > max_size:
        return [("err", "too_big")]
    return [("ok", value)]


def _sent_at_options(value) -> list:
    if value is None or value is _MISSING:
        return [("ok", None)]
    if type(value) is str and SENT_AT.fullmatch(value):
        return [("ok", value)]
    if type(value) is str and SENT_AT_ANY_DIGIT.fullmatch(value) and _valid_unicode(value):
        return [("ok", value), ("err", "bad_message")]
    return [("err", "bad_message")]


def _field_outcomes(view: dict, max_size: int) -> set:
    """What one reading of an object's fields allows: any of its violations, or the message."""
    resend = view.get("resend") is True
    out = set()
    for mid in _message_id_options(view.get("message_id", _MISSING)):
        for text in _text_options(view.get("text", _MISSING), max_size):
            for sent_at in _sent_at_options(view.get("sent_at", _MISSING)):
                errors = [o[1] for o in (mid, text, sent_at) if o[0] == "err"]
                known = mid[1] if mid[0] == "ok" else None
                if errors:
                    out.update(Refuse(code, known) for code in errors)
                else:
                    out.add(Accept(mid[1], text[1], sent_at[1], resend))
    return out


KNOWN_FIELDS = ("message_id", "text", "sent_at", "resend")


def _readings(pairs: list) -> list:
    """Every dict a parser could make of the members: for a key given twice, the first or the last."""
    readings = [{}]
    for key in KNOWN_FIELDS:
        values = [v for k, v in pairs if k == key]
        options = [values[0], values[-1]] if len(values) > 1 else values
        if len(options) == 2 and options[0] is options[1]:
            options = options[:1]
        readings = [dict(r, **{key: v}) for r in readings for v in options] if options else readings
    return readings


def classify(payload: bytes, max_size: int = MAX_MESSAGE_SIZE) -> frozenset:
    """Every answer (Accept or Refuse) the server may give a chat frame's UTF-8 payload.

    Where JSON or the protocol leave a choice, each choice is allowed: a BOM may
    be skipped (RFC 8259 section 8.1), NaN, Infinity, raw control characters in
    strings, very deep nesting and integers of thousands of digits may be read
    or refused as bad_json, a key given twice may be read as its first or its
    last value or refused, a lone surrogate in a field the server ignores may
    be ignored or refused, and a violation of several fields may be reported
    for any of them.
    """
    text = payload.decode()
    lenient = set()
    if text.startswith("\ufeff"):
        text = text[1:]
        lenient.add(BAD_JSON)
    if text.count("[") + text.count("{") > 200 and _nesting(text) > 200:
        lenient.add(BAD_JSON)
    try:
        value, extended = _parse(text, strict=True)
    except RecursionError:
        return frozenset({BAD_JSON})
    except ValueError:
        try:
            value, extended = _parse(text, strict=False)
        except (ValueError, RecursionError):
            return frozenset({BAD_JSON})
        extended = True
    if extended:
        lenient.add(BAD_JSON)
    if type(value) is not _Object:
        return frozenset({Refuse("bad_message")} | lenient)
    out = set(lenient)
    keys = [k for k, _ in value.pairs]
    if len(set(keys)) != len(keys):
        out.update((BAD_JSON, Refuse("bad_message")))
    surrogates = _has_lone_surrogate(value)
    for reading in _readings(value.pairs):
        answers = _field_outcomes(reading, max_size)
        if surrogates:          # "lone surrogates anywhere": in a field the server ignores too, or not
            answers |= {Refuse("bad_message", m[1] if m[0] == "ok" else None)
                        for m in _message_id_options(reading.get("message_id", _MISSING))}
        out |= answers
    return frozenset(out)


@dataclass(frozen=True)
class New:
    """An accepted message: broadcast to the room, the sender included; acked when it has a message_id."""
    message_id: int | None
    text: str
    sent_at: str | None
    key: tuple | None           # (client, message_id): what a later resend is checked against


@dataclass(frozen=True)
class Dup:
    """A resend the room already holds: only a duplicate ack, with the first message's seq."""
    message_id: int
    seqs: frozenset | None      # None: the first one's seq is not known yet


def resolve(outcomes, identity: str, anon: bool, held: dict) -> list:
    """The answers to expect on the wire, given the (client, message_id) keys the room holds.

    A connection without a client id has a random one of its own: whether its
    resend on the same connection is dropped is left open.
    """
    alternatives = []
    for o in outcomes:
        if isinstance(o, Refuse):
            alternatives.append(o)
            continue
        key = (identity, o.message_id) if o.message_id is not None else None
        new = New(o.message_id, o.text, o.sent_at, key)
        seqs = held.get(key)
        if o.resend and seqs:
            known = frozenset(s for s in seqs if type(s) is int)
            alternatives.append(Dup(o.message_id, known if known and len(known) == len(seqs) else None))
            if anon or "?" in seqs:
                alternatives.append(new)
        else:
            alternatives.append(new)
    return alternatives


# -- frames ------------------------------------------------------------------

OP_NAMES = {0: "cont", 1: "text", 2: "binary", 8: "close", 9: "ping", 10: "pong"}
VALID_CLOSE = frozenset((1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)))


@dataclass(frozen=True)
class Frame:
    """One client frame, possibly malformed on purpose."""
    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0                # RSV1-3 bits, set without an extension
    masked: bool = True
    declared: int | None = None  # a length header with nothing after it

    def encode(self) -> bytes:
        """The bytes on the wire."""
        if self.declared is not None:
            return struct.pack("!BBQ", (0x80 if self.fin else 0) | self.rsv | self.opcode, 0xFF,
                               self.declared) + sc.new_mask_key()
        data = sc.encode_frame(self.opcode, self.payload, self.fin, sc.new_mask_key() if self.masked else None)
        return bytes((data[0] | self.rsv,)) + data[1:] if self.rsv else data

    def __str__(self) -> str:
        flags = "".join((" (more)" if not self.fin else "", f" rsv={self.rsv:#x}" if self.rsv else "",
                         " unmasked" if not self.masked else "",
                         f" declaring {self.declared} bytes" if self.declared is not None else ""))
        body = self.payload if len(self.payload) <= 120 else self.payload[:120] + b"..."
        return f"{OP_NAMES.get(self.opcode, f'opcode {self.opcode}')}{flags} {body!r}" + \
            (f" ({len(self.payload)} bytes)" if len(self.payload) > 120 else "")


def close_answer(payload: bytes) -> frozenset:
    """The close codes the server may answer a client's Close frame with (1005: none)."""
    if not payload:
        return frozenset({sc.CLOSE_NO_STATUS, sc.CLOSE_NORMAL})
    if len(payload) == 1:
        return frozenset({sc.CLOSE_PROTOCOL_ERROR})
    code, codes = int.from_bytes(payload[:2], "big"), set()
    if code not in VALID_CLOSE:
        codes.add(sc.CLOSE_PROTOCOL_ERROR)
    try:
        payload[2:].decode()
    except UnicodeDecodeError:
        codes.add(sc.CLOSE_INVALID_DATA)
    return frozenset(codes or {code, sc.CLOSE_NORMAL})


def frame_events(frames: list, fragment: tuple = ()) -> tuple[list, frozenset | None, int, tuple]:
    """What RFC 6455 and the protocol make of a client's frames.

    fragment: the data frames of a message the connection left unfinished.
    Returns the answers in order, ("pong", payload) or ("chat", message
    payload); the close codes the server may end with (None: it stays open);
    how many of frames it reads (those after a close or a violation are not);
    and the data frames of the message left unfinished.
    """
    events: list = []
    parts, decoder, size = None, None, 0
    for f in fragment:
        parts, decoder, size = _data_frame(f, parts, decoder, size)[1:]
    for i, f in enumerate(frames):
        n = len(f.payload) if f.declared is None else f.declared
        codes: tuple = ()
        if n >> 63:
            codes = (sc.CLOSE_PROTOCOL_ERROR, sc.CLOSE_TOO_BIG)
        elif f.rsv or not f.masked:
            codes = (sc.CLOSE_PROTOCOL_ERROR,)
        elif f.opcode >= 8:
            if f.opcode not in (sc.OP_CLOSE, sc.OP_PING, sc.OP_PONG) or not f.fin or n > 125:
                codes = (sc.CLOSE_PROTOCOL_ERROR,)
            elif f.opcode == sc.OP_CLOSE:
                return events, close_answer(f.payload), i + 1, ()
            elif f.opcode == sc.OP_PING:
                events.append(("pong", f.payload))
        else:
            codes, parts, decoder, size = _data_frame(f, parts, decoder, size)
            if not codes and f.fin:
                events.append(("chat", b"".join(p.payload for p in parts)))
                parts = None
        if codes:
            return events, frozenset(codes), i + 1, ()
    return events, None, len(frames), tuple(parts or ())


def _data_frame(f: Frame, parts, decoder, size) -> tuple:
    """One data frame into the message being read: (close codes if it breaks the rules, parts, decoder, size)."""
    if f.opcode not in (sc.OP_CONTINUATION, sc.OP_TEXT, sc.OP_BINARY):
        return (sc.CLOSE_PROTOCOL_ERROR,), parts, decoder, size
    if f.opcode == sc.OP_CONTINUATION and parts is None:
        return (sc.CLOSE_PROTOCOL_ERROR,), parts, decoder, size
    if f.opcode != sc.OP_CONTINUATION and parts is not None:
        binary = (sc.CLOSE_UNSUPPORTED_DATA,) if f.opcode == sc.OP_BINARY else ()
        return (sc.CLOSE_PROTOCOL_ERROR, *binary), parts, decoder, size
    if f.opcode == sc.OP_BINARY:
        return (sc.CLOSE_UNSUPPORTED_DATA,), parts, decoder, size
    n = len(f.payload) if f.declared is None else f.declared
    total = (size if f.opcode == sc.OP_CONTINUATION else 0) + n
    if total > HARD:
        return (sc.CLOSE_TOO_BIG,), parts, decoder, size
    if total > SOFT or f.declared is not None:
        raise ValueError(f"a generator made a message of {total} bytes, between {SOFT} and {HARD}")
    if f.opcode == sc.OP_TEXT:
        parts, decoder = [], codecs.getincrementaldecoder("utf-8")()
    parts = [*parts, f]
    try:
        decoder.decode(f.payload, f.fin)
    except UnicodeDecodeError:
        return (sc.CLOSE_INVALID_DATA,), parts, decoder, total
    pending = decoder.getstate()[0]
    if pending[:1] == b"\xed" and pending[1:2] >= b"\xa0":      # a UTF-16 surrogate: never valid
        return (sc.CLOSE_INVALID_DATA,), parts, decoder, total
    return (), parts, decoder, total


# -- the upgrade's query string ---------------------------------------------

@dataclass(frozen=True)
class Upgrade:
    """An upgrade the server may make: into room, under name (None: a guest name), replaying after since
    of the order epoch (None: the room's order, whatever it is)."""
    room: str
    name: str | None
    since: int | None
    epoch: str | None = None


def _name_verdict(name: str | None) -> str:
    if not name:
        return "ok"
    if not (len(name) <= 32 and name.isprintable()):
        return "bad"
    return "maybe" if name.isspace() else "ok"


def _since_verdict(since: str | None) -> str:
    if since is None:
        return "ok"
    if not (since.isascii() and since.isdigit()):
        return "maybe" if since == "" else "bad"
    return "ok" if len(since) <= 19 else "maybe"


def query_outcomes(resource: str) -> tuple[frozenset, list]:
    """(HTTP statuses that may refuse an upgrade to resource, the upgrades the server may make instead).

    Query values are read as a browser encodes them (application/x-www-form-urlencoded,
    UTF-8, bad bytes as U+FFFD). Where the protocol leaves a choice either answer is
    allowed: a parameter given twice (first, last or 400), an empty since, a name of
    spaces, since past 19 digits, raw characters a URL may not hold.
    """
    if " " in resource or not resource.isascii() or "\r\n" in resource:
        return frozenset({400}), []
    refuse = set()
    if any(not "!" <= c <= "~" for c in resource) or "#" in resource:
        refuse.add(400)
    path, _, query = resource.partition("?")
    if path == "/ws":
        rooms = ["lobby"]
    elif path.startswith("/ws/"):
        room = path[4:]
        rooms = [room] if ROOM.fullmatch(room) else []
        decoded = unquote(room)
        if decoded != room and ROOM.fullmatch(decoded):
            rooms.append(decoded)
            refuse.add(400)
        if not rooms:
            return frozenset({400}), []
    else:
        return frozenset({400, 404}), []
    params = parse_qsl(query, keep_blank_values=True)
    choices = {}
    for key in ("name", "since", "client", "epoch"):
        values = [v for k, v in params if k == key]
        if len(values) > 1:
            refuse.add(400)
        choices[key] = sorted({values[0], values[-1]}) if values else [None]
    upgrades = []
    for room in rooms:
        for name in choices["name"]:
            for since in choices["since"]:
                for client, epoch in itertools.product(choices["client"], choices["epoch"]):
                    verdicts = {_name_verdict(name), _since_verdict(since),
                                "ok" if client is None or CLIENT.fullmatch(client) else "bad",
                                "ok" if epoch is None or sc.EPOCH.fullmatch(epoch) else "bad"}
                    if verdicts != {"ok"}:
                        refuse.add(400)
                    if "bad" not in verdicts:
                        upgrades.append(Upgrade(room, name or None, int(since) if since else None, epoch))
    return frozenset(refuse), upgrades


# ---------------------------------------------------------------------------
# What the server sends: strict JSON, documented fields
# ---------------------------------------------------------------------------

ERROR_CODES = frozenset(sc.ErrorCode)
# type -> {field: (types, required)}; None in types: null allowed
SCHEMA = {
    "message": {"type": (str,), "room": (str,), "epoch": (str,), "seq": (int,), "sender": (str,), "text": (str,),
                "message_id": (int, None), "sent_at": (str, None)},
    "ack": {"type": (str,), "message_id": (int,), "epoch": (str,), "seq": (int,), "duplicate": (bool,)},
    "error": {"type": (str,), "code": (str,), "reason": (str,), "message_id": (int,), "retry_after": (float,)},
    "welcome": {"type": (str,), "room": (str,), "name": (str,), "epoch": (str,), "seq": (int,), "members": (int,),
                "oldest": (int,), "limits": (dict,)},
    "members": {"type": (str,), "room": (str,), "count": (int,)},
}
OPTIONAL = {"message": {"message_id", "sent_at"}, "ack": {"duplicate"}, "error": {"message_id", "retry_after"},
            "welcome": {"oldest"}}


def strict_json(payload: bytes):
    """A server frame's JSON, read strictly: no NaN, no key twice, no raw control character, no lone surrogate."""
    def pairs(items):
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise ValueError(f"a key appears twice in {keys}")
        return dict(items)

    def constant(name):
        raise ValueError(f"{name} is not JSON")

    def walk(value):
        if isinstance(value, str):
            value.encode()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(k)
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
    try:
        value = json.loads(payload.decode(), object_pairs_hook=pairs, parse_constant=constant)
        walk(value)
    except (ValueError, RecursionError) as e:
        raise Finding("json", f"a client received invalid JSON ({e}): {payload[:300]!r}") from None
    return value


def check_server_object(obj, room: str | None) -> None:
    """A frame from the server: a documented type with its documented fields, in this room."""
    kind = obj.get("type") if type(obj) is dict else None
    if kind not in SCHEMA:
        raise Finding("answer", f"not a documented server frame: {obj!r:.300}")
    fields = SCHEMA[kind]
    if obj.keys() - fields.keys():
        raise Finding("answer", f"{kind} frame with undocumented fields {sorted(obj.keys() - fields.keys())}: "
                                f"{obj!r:.300}")
    if fields.keys() - OPTIONAL.get(kind, set()) - obj.keys():
        raise Finding("answer", f"{kind} frame without {sorted(fields.keys() - obj.keys())}: {obj!r:.300}")
    for key, value in obj.items():
        if not any(value is None if t is None else type(value) is t for t in fields[key]):
            raise Finding("answer", f"{kind} frame with {key}={value!r:.80}: {obj!r:.300}")
    if room is not None and obj.get("room", room) != room:
        raise Finding("answer", f"{kind} frame of room {obj['room']!r} in room {room!r}")
    if kind == "error" and obj["code"] not in ERROR_CODES:
        raise Finding("answer", f"undocumented error code {obj['code']!r}")
    if obj.get("seq", 1) < (0 if kind == "welcome" else 1):
        raise Finding("answer", f"{kind} frame with seq {obj['seq']}")
    if "epoch" in obj and sc.EPOCH.fullmatch(obj["epoch"]) is None and not (kind == "welcome" and obj["epoch"] == ""):
        raise Finding("answer", f"{kind} frame with epoch {obj['epoch']!r:.40}")


class Peer(RawClient):
    """A RawClient that holds every frame from the server to the protocol and reads it as events."""

    def __init__(self, port: int, resource: str, room: str | None = None):
        self.room = room
        self.identity = ""          # what names this connection's messages for the resend check
        self.anon = False
        self.fragment: tuple = ()     # data frames of a message sent in part
        self.skip = lambda obj: False   # messages of the room that other connections answer for
        super().__init__(port, resource, timeout=BOUND)
        if self.room is None:
            self.room = self.welcome["room"]

    def recv_json(self) -> dict:
        """The next JSON frame (the welcome, when RawClient asks)."""
        kind, value = self.next_event(time.monotonic() + BOUND)
        if kind != "json":
            raise Finding("answer", f"{kind} {value!r} instead of a welcome")
        return value

    def next_event(self, deadline: float) -> tuple:
        """("json", object), ("pong", payload) or ("close", code); answers pings, skips member counts."""
        while True:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                opcode, payload = self.recv_frame()
            except sc.ProtocolError as e:
                raise Finding("answer", f"the server broke RFC 6455: {e.reason}") from None
            if opcode == sc.OP_TEXT:
                obj = strict_json(payload)
                check_server_object(obj, self.room)
                if obj["type"] != "members":
                    return "json", obj
            elif opcode == sc.OP_PING:
                try:
                    self.send_frame(sc.OP_PONG, payload)
                except OSError:
                    pass
            elif opcode == sc.OP_PONG:
                return "pong", payload
            elif opcode == sc.OP_CLOSE:
                return "close", sc.parse_close(payload)[0]
            else:
                raise Finding("answer", f"the server sent a frame of opcode {opcode}")


def new_client_id(rng: random.Random | None = None) -> str:
    """A client id as the browser client makes one: 128 random bits, base64url."""
    raw = rng.randbytes(16) if rng else os.urandom(16)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# ---------------------------------------------------------------------------
# Matching answers to what was sent
# ---------------------------------------------------------------------------

def echoes(new: New, obj: dict) -> bool:
    """Whether a message frame carries new's content."""
    return obj.get("message_id") == new.message_id and obj["text"] == new.text and obj.get("sent_at") == new.sent_at


class Pending:
    """One message sent: the answers the model allows, narrowed as answers arrive."""

    def __init__(self, alternatives: list, required: bool, peer: Peer, payload: bytes):
        self.alternatives = list(alternatives)
        self.required = required            # False: a close came right after and may cut its answers short
        self.peer, self.payload = peer, payload
        self.echo = self.ack = self.error = None

    def complete(self) -> bool:
        """Whether one alternative has had all its answers."""
        for a in self.alternatives:
            if isinstance(a, Refuse) and self.error or isinstance(a, Dup) and self.ack or \
                    isinstance(a, New) and self.echo and (a.message_id is None or self.ack):
                return True
        return False

    def take(self, obj: dict) -> bool:
        """Whether obj answers this message; if so, keep the alternatives it fits."""
        fits = [a for a in self.alternatives if self._fits(a, obj)]
        if not fits:
            return False
        self.alternatives = fits
        setattr(self, {"message": "echo", "ack": "ack", "error": "error"}[obj["type"]], obj)
        return True

    def _fits(self, a, obj: dict) -> bool:
        kind = obj["type"]
        if kind == "error":
            return isinstance(a, Refuse) and self.error is None and obj["code"] == a.code and \
                obj.get("message_id") == a.message_id
        if kind == "message":
            return isinstance(a, New) and self.echo is None and obj["sender"] == self.peer.name and \
                echoes(a, obj) and (self.ack is None or self.ack["seq"] == obj["seq"])
        if kind != "ack" or self.ack is not None or not isinstance(a, New | Dup) or obj["message_id"] != a.message_id:
            return False
        if isinstance(a, New):
            return not obj.get("duplicate") and (self.echo is None or self.echo["seq"] == obj["seq"])
        return obj.get("duplicate") is True and self.echo is None and (a.seqs is None or obj["seq"] in a.seqs)

    def seq(self) -> int | None:
        """The seq the room gave this message, once known."""
        return (self.echo or self.ack or {}).get("seq") if not self.error else None

    def __str__(self) -> str:
        return f"{self.payload[:200]!r} -> one of {self.alternatives}"


def await_answers(peer: Peer, pongs: list, pendings: list, close_codes: frozenset | None,
                  may_vanish: bool = False, replay: tuple | None = None) -> int | None:
    """Read peer's frames until every answer the model requires has come, or the close it expects.

    replay: (seq, list): messages up to that seq are collected in the list, not matched.
    Returns the close code (None while open, or when the connection vanished as allowed).
    """
    deadline = time.monotonic() + BOUND
    got, code = 0, None
    while True:
        if close_codes is None and got == len(pongs) and all(p.complete() for p in pendings if p.required):
            return None
        try:
            kind, value = peer.next_event(deadline)
        except TimeoutError:
            missing = [str(p) for p in pendings if p.required and not p.complete()] + \
                [f"pong {p!r}" for p in pongs[got:]] + ([f"close {sorted(close_codes)}"] if close_codes else [])
            raise Finding("answer", f"no answer within {BOUND:g} s: waiting for {'; '.join(missing)}") from None
        except OSError as e:
            if close_codes is not None and may_vanish:
                return None
            raise Finding("answer", f"the server dropped the connection without a close frame ({e})") from None
        if kind == "pong":
            if got < len(pongs) and value == pongs[got]:
                got += 1
                continue
            raise Finding("answer", f"pong {value!r}, expected {pongs[got:]!r}")
        if kind == "close":
            if close_codes is not None and value in close_codes:
                code = value
                break
            raise Finding("answer", f"closed with {value}; expected "
                                    f"{sorted(close_codes) if close_codes else 'the connection to stay open'}"
                                    f" (pending: {'; '.join(map(str, pendings))})")
        if value["type"] == "message" and peer.skip(value):
            continue
        if replay is not None and value["type"] == "message" and value["seq"] <= replay[0]:
            replay[1].append(value)
            continue
        if value["type"] == "welcome" or not any(p.take(value) for p in pendings):
            raise Finding("answer", f"unexpected {json.dumps(value)[:300]} (pending: {'; '.join(map(str, pendings))})")
    if got < len(pongs):
        raise Finding("answer", f"closed with {code} before the pongs {pongs[got:]!r}")
    missing = [str(p) for p in pendings if p.required and not p.complete()]
    if missing:
        raise Finding("answer", f"closed with {code} before the answers to {'; '.join(missing)}")
    return code


class Ledger:
    """What a room must show: the keys it holds, who sent each seq, what its watcher must still see."""

    def __init__(self):
        self.held: dict = {}        # (client, message_id) -> seqs ("?": maybe held, None: seq not yet known)
        self.owner: dict = {}       # seq -> the Peer that sent it
        self.expect: list = []      # (peer, [New], seq or None, required), in seq order

    def record(self, pendings: list) -> None:
        """Note what the room took of an exchange, for its watcher and for later resends.

        A message whose echo or ack came was sequenced: the room must show it, before
        anything sent later. One cut short by a close was never acked: the room may show
        it, even after later messages from other connections, or not at all (its client
        sends it again, resend and all, as docs/protocol.md says).
        """
        for p in pendings:
            news = [a for a in p.alternatives if isinstance(a, New)]
            if not news or p.error or (p.ack and p.ack.get("duplicate")):
                continue
            seq = p.seq()
            self.expect.append((p.peer, news, seq, seq is not None))
            if seq is not None:
                self.owner[seq] = p.peer
            for a in news:
                if a.key is not None:
                    self.held.setdefault(a.key, set()).add(seq if seq is not None and len(news) == 1 else "?")


def exchange(peer: Peer, frames: list, ledger: Ledger, split: bool = False) -> bool:
    """Send frames on peer and check every answer against the model; whether peer stays open."""
    events, close_codes, consumed, peer.fragment = frame_events(frames, peer.fragment)
    pongs = [value for kind, value in events if kind == "pong"]
    pendings, held = [], dict(ledger.held)
    for kind, value in events:
        if kind == "chat":
            alternatives = resolve(classify(value), peer.identity, peer.anon, held)
            required = close_codes is None or all(isinstance(a, Refuse) for a in alternatives)
            pendings.append(Pending(alternatives, required, peer, value))
            for a in alternatives:
                if isinstance(a, New) and a.key is not None:
                    sure = len(alternatives) == 1 and close_codes is None
                    held[a.key] = held.get(a.key, set()) | {None if sure else "?"}
    data = [f.encode() for f in frames]
    try:
        for chunk in (data if split else [b"".join(data)]):
            peer.sock.sendall(chunk)
    except OSError as e:
        if close_codes is None:
            raise Finding("answer", f"the server closed the connection while it was sent frames ({e})") from None
    try:
        await_answers(peer, pongs, pendings, close_codes, may_vanish=consumed < len(frames))
    finally:
        ledger.record(pendings)
    if close_codes is not None:
        peer.close()
        return False
    return True


def text_frame(obj: dict) -> Frame:
    """A text frame holding obj as JSON."""
    return Frame(sc.OP_TEXT, json.dumps(obj).encode())


# ---------------------------------------------------------------------------
# Live servers
# ---------------------------------------------------------------------------

class Victim:
    """A client in a room of its own that must keep getting its echo within BOUND."""

    def __init__(self, port: int):
        self.peer = Peer(port, f"/ws/victim?name=victim&client={new_client_id()}", "victim")
        self.ledger = Ledger()
        self.n = 0
        self.worst = 0.0

    def check(self) -> None:
        """One message and its echo; a Finding if it took longer than BOUND."""
        self.n += 1
        t0 = time.monotonic()
        try:
            exchange(self.peer, [text_frame({"message_id": self.n, "text": f"victim {self.n}"})], self.ledger)
        except Finding as e:
            raise Finding("stall", f"the victim in another room: {e.message}") from None
        self.ledger.expect.clear()
        self.worst = max(self.worst, time.monotonic() - t0)


class Target:
    """The live servers of one mode, the victim, and what must not change while fuzzing."""

    def __init__(self, mode: str, workdir: str):
        self.mode, self.workdir = mode, workdir
        self.servers: list[ServerProc] = []
        self.redis: RedisServer | None = None
        self.pids: list[int] = []
        self.victim: Victim | None = None
        self.starts = 0
        self.worst = 0.0            # the victim's slowest echo, in seconds, over every start

    @property
    def front(self) -> int:
        """The port senders connect to."""
        return self.servers[0].port

    @property
    def back(self) -> int:
        """The port watchers connect to (the other instance under --redis)."""
        return self.servers[-1].port

    def start(self) -> Target:
        """Start the servers (and redis-server) and connect the victim."""
        self.starts += 1
        if self.mode == "redis":
            self.redis = RedisServer(self.workdir).start()
            self.servers = [start_server(*SERVER_ARGS, "--redis", self.redis.url) for _ in range(2)]
        elif self.mode == "workers":
            self.servers = [start_server(*SERVER_ARGS, "--workers", "2")]
            deadline = time.monotonic() + 20
            while len(tcp_sockets(self.front, TCP_LISTEN)) < 2 or len(children(self.servers[0].proc.pid)) < 2:
                if time.monotonic() > deadline:
                    raise RuntimeError("the two workers did not start listening")
                time.sleep(0.05)
            self.pids = children(self.servers[0].proc.pid)
        else:
            self.servers = [start_server(*SERVER_ARGS)]
        self.victim = Victim(self.front)
        return self

    def stop(self) -> None:
        """Stop everything this target started."""
        if self.victim:
            self.worst = max(self.worst, self.victim.worst)
            self.victim.peer.close()
            self.victim = None
        for server in self.servers:
            server.stop(timeout=5)
        self.servers = []
        if self.redis:
            self.redis.kill()
            self.redis = None

    def check(self) -> None:
        """A Finding if a process exited or a worker was restarted."""
        for server in self.servers:
            if server.proc.poll() is not None:
                raise Finding("crash", f"the server (pid {server.proc.pid}) exited with {server.proc.returncode}")
        if self.redis and self.redis.proc.poll() is not None:
            raise Finding("crash", "redis-server exited")
        if self.mode == "workers":
            dead = [pid for pid in self.pids if not alive(pid)]
            if dead or children(self.servers[0].proc.pid) != self.pids:
                raise Finding("crash", f"a worker exited and was restarted: pids {self.pids} -> "
                                       f"{[p for p in children(self.servers[0].proc.pid) if alive(p)]}")

    def explain(self, finding: Finding) -> Finding:
        """The finding, or the crash behind it when a process died meanwhile."""
        if finding.kind == "crash":
            return finding
        time.sleep(0.3)                     # a dying process takes a moment to be seen
        try:
            self.check()
        except Finding as crash:
            return Finding("crash", f"{crash.message} (first seen as: {finding.message})")
        return finding

    def internal_errors(self) -> float:
        """scalechat_internal_errors_total over every server process (0 where not exported)."""
        return sum(total(scrape(server.metrics_url), "scalechat_internal_errors_total") for server in self.servers)


class Batch:
    """A room for some cases, with a watcher that must see exactly what the room accepted."""

    def __init__(self, target: Target, n: int):
        self.target, self.n = target, n
        self.room = f"b{n}-{os.urandom(3).hex()}"   # fresh even in a Redis that outlives restarts
        self.ledger = Ledger()
        self.watcher = Peer(target.back, f"/ws/{self.room}?name=w{n}&client={new_client_id()}", self.room)
        self.last_seq = self.watcher.welcome["seq"]
        self.client = new_client_id()
        self.sender: Peer | None = None
        self.late: list = []        # messages cut short by a close, that may still come
        self.cases = self.peers = self.sentinels = 0

    def open_peer(self, client: str | None, name: str | None = None) -> Peer:
        """A new connection into the room (client None: without a client id)."""
        self.peers += 1
        query = f"name={name or f'p{self.n}-{self.peers}'}" + (f"&client={client}" if client else "")
        peer = Peer(self.target.front, f"/ws/{self.room}?{query}", self.room)
        peer.identity, peer.anon = client or f"anon-{self.peers}", client is None
        owner = self.ledger.owner
        peer.skip = lambda obj: obj["sender"] != peer.name or owner.get(obj["seq"], peer) is not peer
        return peer

    def sending_peer(self) -> Peer:
        """The room's long-lived sender, reconnected under the same client id if it was closed."""
        if self.sender is None:
            self.sender = self.open_peer(self.client, f"s{self.n}")
        return self.sender

    def watch(self) -> None:
        """The watcher posts a sentinel: what it got before must be what the room accepted, in seq order."""
        self.sentinels += 1
        text = f"sentinel {self.sentinels}"
        w = self.watcher
        w.send_json({"message_id": self.sentinels, "text": text})
        sentinel = Pending([New(self.sentinels, text, None, None)], True, w, b"sentinel")
        expect, self.ledger.expect = self.ledger.expect, []
        deadline = time.monotonic() + BOUND
        while not sentinel.complete():
            try:
                kind, obj = w.next_event(deadline)
            except TimeoutError:
                raise Finding("answer", f"the watcher did not get its own message within {BOUND:g} s") from None
            if kind != "json" or obj["type"] not in ("message", "ack"):
                raise Finding("answer", f"the watcher got {kind} {obj!r:.300}")
            if obj["type"] == "message":
                if obj["seq"] != self.last_seq + 1:
                    raise Finding("answer", f"the watcher got seq {obj['seq']} after {self.last_seq}: {obj}")
                self.last_seq = obj["seq"]
            if sentinel.take(obj):
                continue
            if obj["type"] == "ack":
                raise Finding("answer", f"the watcher got an ack for someone else's message: {obj}")
            self._match(obj, expect)
        missing = [(peer.name, news) for peer, news, _, required in expect if required]
        if missing:
            raise Finding("answer", f"the room's member never got {missing}")
        self.late = (self.late + expect)[-BATCH:]

    def _match(self, obj: dict, expect: list) -> None:
        """Which message sent obj is: one that may come late, or the next ones expected in order."""
        for i, item in enumerate(self.late):
            if self._settle(item, obj):
                del self.late[i]
                return
        while expect:
            item = expect.pop(0)
            if self._settle(item, obj):
                return
            if item[3]:
                raise Finding("answer", f"the room's member got {obj}, expected one of {item[1]} from {item[0].name}")
            self.late.append(item)
        raise Finding("answer", f"the room's member got a message no client sent: {obj}")

    def _settle(self, item: tuple, obj: dict) -> bool:
        """Whether obj is the message of item; if so, note its seq and sender."""
        peer, news, seq, _ = item
        fits = [a for a in news if echoes(a, obj)]
        if obj["sender"] != peer.name or seq not in (None, obj["seq"]) or not fits:
            return False
        self.ledger.owner[obj["seq"]] = peer
        for a in fits:
            if a.key is not None:
                seqs = self.ledger.held.setdefault(a.key, set())
                seqs.difference_update((None, "?"))
                seqs.add(obj["seq"])
        return True

    def close(self) -> None:
        """Close the watcher and the sender."""
        for peer in (self.watcher, self.sender):
            if peer is not None:
                peer.close()


# ---------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------

SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                 "/": "\\/"}
ESCAPE_MODES = ["min"] * 6 + ["some"] * 3 + ["all", "raw"]


def json_string(rng: random.Random, s: str, mode: str = "min") -> str:
    """s as a JSON string: min escapes what must be, some escapes more, all escapes every
    character (\\u, surrogate pairs above U+FFFF), raw leaves control characters raw (not JSON)."""
    out = ['"']
    for ch in s:
        o = ord(ch)
        hexa = rng.choice(("\\u{:04x}", "\\u{:04X}"))
        if o > 0xFFFF:
            if mode == "all" or mode == "some" and rng.random() < 0.3:
                o -= 0x10000
                out.append(hexa.format(0xD800 | o >> 10) + hexa.format(0xDC00 | o & 0x3FF))
            else:
                out.append(ch)
        elif 0xD800 <= o <= 0xDFFF or mode == "all":
            out.append(hexa.format(o))
        elif ch in '"\\' or o < 0x20:
            if mode == "raw" and o < 0x20:
                out.append(ch)
            else:
                out.append(SHORT_ESCAPES[ch] if ch in SHORT_ESCAPES and rng.random() < 0.6 else hexa.format(o))
        elif mode == "some" and rng.random() < 0.2:
            out.append(SHORT_ESCAPES.get(ch) or hexa.format(o))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


TEXT_PIECES = ["hello", "x", " ", "\x00", "\x01", "\x1f", "\x7f", "\t", "\n", "\r\n", "\x85", "\xa0", "\u2028",
               "\u2029", "\u200e", "\u200f", "\u202e", "\u2066", "\ufeff", "\ufffd", "\uffff", "\ufdd0", "é", "€",
               "名前", "😀", "\U0010ffff", '"', "\\", "/", "\\u0000", "\\ud800", "</script>", '{"type":"ack"}',
               "%ED%A0%80", "'", "`", "e\u0301", "\u0000\u0000"]
LONE_SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff", "\ude00\ud83d"]
SIZE_UNITS = ["a", "é", "€", "😀", "\x01", "\u200f"]
MID_EDGES = [0, 1, -1, 42, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63 - 1), 2**63, -(2**63), 2**63 + 1,
             2**64 - 1, 2**64, -(2**64)]
MID_ODD = ["-0", "1.0", "1e2", "4.2E1", "-1.5", "1e400", "NaN", "Infinity", "-Infinity", "true", "false", "null",
           '"1"', '"42"', "[1]", '{"id":1}', "01", "+1", "0x10", ".5", "1.", "1_000"]
EXTRA_KEYS = ["sender", "room", "type", "seq", "client", "duplicate", "ack", "x", "", "\x00", "text ", "Text",
              "message_id\x00", "\ud800", "__proto__", "constructor", "sentAt"]
TOP_JUNK = ["", " ", "{", "}", "[", '{"text":"x"', "{'text':'x'}", '{text:"x"}', '{"text":"x",}',
            '{"text":"x"} {}', '/**/{"text":"x"}', '"\\ud800"', "\x00", '{"text" "x"}', '{"text":"x"]',
            '{"text":"\\x41"}', '{"text":"\\u12"}', '{"text":"x"}\x00', '{"text":tru}']
TAILS = [" x", ",", "}", "{}", "\x00", "//", "\n", " \t\r\n"]
WHITESPACE = ["", " ", "  ", "\t", "\n", "\r\n", " \t\n\r "]
BAD_WHITESPACE = ["\xa0", "\x0b", "\x0c", "\u2028", "\u3000", "\ufeff"]
PLAIN = {"message_id": "1", "text": '"x"', "sent_at": '"2026-11-28T10:00:00.123456Z"', "resend": "true"}


def _pieces(rng: random.Random) -> str:
    return "".join(rng.choice(TEXT_PIECES) for _ in range(rng.randint(1, 6)))


def sized_text(rng: random.Random, size: int) -> str:
    """A text of exactly size UTF-8 bytes."""
    unit = rng.choice(SIZE_UNITS)
    n = size // len(unit.encode())
    return unit * n + "a" * (size - n * len(unit.encode()))


def rfc3339(rng: random.Random) -> str:
    """A date-time the interface's pattern takes (not always a real date: the pattern is the contract)."""
    d = rng.randint
    fraction = "." + "".join(rng.choice("0123456789") for _ in range(d(1, 9))) if rng.random() < 0.7 else ""
    offset = rng.choice(["Z", "z", "+00:00", "-23:59", f"+{d(0, 99):02d}:{d(0, 99):02d}"])
    return (f"{d(0, 9999):04d}-{d(1, 12):02d}-{d(1, 31):02d}{rng.choice('Tt ')}{d(0, 23):02d}:{d(0, 59):02d}:"
            f"{d(0, 60):02d}{fraction}{offset}")


def near_rfc3339(rng: random.Random) -> str:
    """A date-time one step from valid."""
    s = rfc3339(rng)
    i = rng.randrange(len(s))
    return rng.choice([
        s + "\n", " " + s, s + "Z", s[:-1], s[:i], s[:i] + s[i + 1:], s.replace("-", "/", 1),
        s[:19] + ".0123456789Z", s[:19] + "+0000", s[:19] + ".Z", s[:10] + "_" + s[11:],
        s.replace("0", "\u0663", 1), s.replace("1", "\uff11", 1), s[:i] + "\ud800" + s[i:], s + "\x00",
        "x" * rng.choice([30, 5000]), "", "2026-11-28", "2026-11-28T10:00:00", s.replace("T", "\u0000", 1)])


def any_value(rng: random.Random, depth: int = 0) -> str:
    """A raw JSON value of any type, odd ones first."""
    r = rng.random()
    if depth > 2 or r < 0.6:
        return rng.choice([
            lambda: str(rng.choice(MID_EDGES)), lambda: "9" * rng.choice([20, 400, 4300, 4301]),
            lambda: rng.choice(["1.5", "-0.0", "1e400", "1E-400", "0.1e1", "NaN", "Infinity", "-Infinity"]),
            lambda: rng.choice(["true", "false", "null"]),
            lambda: json_string(rng, _pieces(rng), rng.choice(ESCAPE_MODES[:-1])),
            lambda: json_string(rng, rng.choice(LONE_SURROGATES) + "x"),
        ])()
    if r < 0.75:
        return "[" + ",".join(any_value(rng, depth + 1) for _ in range(rng.randint(0, 3))) + "]"
    if r < 0.9:
        keys = [rng.choice(EXTRA_KEYS + ["a", "a"]) for _ in range(rng.randint(0, 3))]
        return "{" + ",".join(f"{json_string(rng, k)}:{any_value(rng, depth + 1)}" for k in keys) + "}"
    d = rng.choice([2, 10, 100, 200, 2900])
    if d <= 200 and rng.random() < 0.5:
        return '{"a":' * d + "1" + "}" * d
    return "[" * d + rng.choice(["", "1", '"x"', "{}"]) + "]" * d


def message_id_raw(rng: random.Random) -> str:
    """A raw JSON message_id: mostly from a small pool, so resends meet their originals."""
    r = rng.random()
    if r < 0.45:
        return str(rng.randint(1, 5))
    if r < 0.7:
        return str(rng.choice(MID_EDGES))
    if r < 0.8:
        return rng.choice(MID_ODD)
    if r < 0.9:
        return rng.choice(["", "-"]) + "9" * rng.choice([19, 20, 39, 100, 4300, 4301])
    return any_value(rng)


def text_raw(rng: random.Random) -> str:
    """A raw JSON text: odd characters, sizes at the limit, lone surrogates, empty, not a string."""
    r = rng.random()
    mode = rng.choice(ESCAPE_MODES)
    if r < 0.55:
        s = _pieces(rng)
    elif r < 0.72:
        s = sized_text(rng, MAX_MESSAGE_SIZE + rng.choice([-1, 0, 0, 1, 1, 3]))
        mode = rng.choice(["min", "min", "some", "all"])
    elif r < 0.82:
        s = _pieces(rng)
        i = rng.randint(0, len(s))
        s = s[:i] + rng.choice(LONE_SURROGATES) + s[i:]
    elif r < 0.87:
        s = ""
    else:
        return any_value(rng)
    return json_string(rng, s, mode)


def sent_at_raw(rng: random.Random) -> str:
    """A raw JSON sent_at: valid, one step from valid, null, or anything."""
    r = rng.random()
    if r < 0.5:
        return json_string(rng, rfc3339(rng), rng.choice(ESCAPE_MODES[:-1]))
    if r < 0.85:
        return json_string(rng, near_rfc3339(rng), rng.choice(ESCAPE_MODES[:-1]))
    if r < 0.9:
        return "null"
    return any_value(rng)


def resend_raw(rng: random.Random) -> str:
    """A raw JSON resend flag: only true means a resend."""
    return rng.choice(["true", "true", "true", "false", '"true"', "1", "null", "[true]"])


FIELD_VALUES = {"message_id": message_id_raw, "text": text_raw, "sent_at": sent_at_raw, "resend": resend_raw}
# Valid values, for the fields a case does not aim at: one fault at a time reaches deeper.
GOOD_VALUES = {
    "message_id": lambda rng: str(rng.choice([rng.randint(1, 5), rng.randint(1, 5), 0, 2**63 - 1, -(2**63 - 1)])),
    "text": lambda rng: json_string(rng, _pieces(rng), rng.choice(ESCAPE_MODES[:-1])),
    "sent_at": lambda rng: json_string(rng, rfc3339(rng), rng.choice(ESCAPE_MODES[:-1])),
    "resend": resend_raw,
}


@dataclass
class JsonCase:
    """One chat frame: the members as raw JSON (key, raw key, raw value), in order, with its wrapping."""
    fields: list = field(default_factory=list)
    top: str | None = None          # a top level that is not one object
    bom: bool = False
    spacing: int = 0                # seed of the whitespace between tokens (0: none)
    bad_space: str = ""             # whitespace JSON does not allow, after the opening brace
    tail: str = ""
    category = "json"

    def payload(self) -> bytes:
        """The frame's payload."""
        if self.top is not None:
            body = self.top
        else:
            ws = random.Random(self.spacing) if self.spacing else None

            def gap() -> str:
                return ws.choice(WHITESPACE) if ws else ""
            parts = ["{", self.bad_space]
            for i, (_key, raw_key, raw_value) in enumerate(self.fields):
                parts += [gap(), ","] if i else []
                parts += [gap(), raw_key, gap(), ":", gap(), raw_value]
            body = gap() + "".join(parts) + gap() + "}" + gap()
        return (("\ufeff" if self.bom else "") + body + self.tail).encode()

    def run(self, fuzzer: Fuzzer) -> None:
        """Send it on the room's long-lived sender."""
        batch = fuzzer.batch
        if not exchange(batch.sending_peer(), [Frame(sc.OP_TEXT, self.payload())], batch.ledger):
            batch.sender = None

    def simpler(self):
        """Smaller cases, one step each."""
        for attr in ("bom", "spacing", "bad_space", "tail"):
            if getattr(self, attr):
                yield replace(self, **{attr: type(getattr(self, attr))()})
        if self.top is not None:
            yield replace(self, top=None, fields=[("text", '"x"', '"x"')])
            return
        for i in range(len(self.fields)):
            yield replace(self, fields=self.fields[:i] + self.fields[i + 1:])
        for i, (key, raw_key, raw_value) in enumerate(self.fields):
            plain = PLAIN.get(key, "1")
            if raw_value != plain:
                yield replace(self, fields=[*self.fields[:i], (key, raw_key, plain), *self.fields[i + 1:]])
            if raw_key != json.dumps(key):
                yield replace(self, fields=[*self.fields[:i], (key, json.dumps(key), raw_value), *self.fields[i + 1:]])
        for i, (key, raw_key, raw_value) in enumerate(self.fields):
            for shorter in shorter_strings(raw_value):
                yield replace(self, fields=[*self.fields[:i], (key, raw_key, shorter), *self.fields[i + 1:]])

    def __str__(self) -> str:
        payload = self.payload()
        return f"text frame {payload[:1500]!r}" + (f" ({len(payload)} bytes)" if len(payload) > 1500 else "")


_STRING_UNIT = re.compile(r"\\u[0-9a-fA-F]{4}|\\.|.", re.DOTALL)


def shorter_strings(raw: str):
    """A raw JSON string with parts of its content left out: halves first, down to single characters."""
    if len(raw) < 3 or raw[0] != '"' or raw[-1] != '"':
        return
    units = _STRING_UNIT.findall(raw[1:-1])
    size = len(units) // 2
    while size:
        for start in range(0, len(units), size):
            yield '"' + "".join(units[:start] + units[start + size:]) + '"'
        size //= 2


def _json_case(rng: random.Random) -> JsonCase:
    if rng.random() < 0.06:
        return JsonCase(top=rng.choice(TOP_JUNK) if rng.random() < 0.6 else any_value(rng))
    keys = [k for k, p in (("message_id", 0.75), ("text", 0.95), ("sent_at", 0.6), ("resend", 0.3))
            if rng.random() < p]
    aim = rng.choice(keys) if keys and rng.random() < 0.5 else None   # fuzz this field alone
    keys += [rng.choice(EXTRA_KEYS) for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 3] if aim is None else [0]))]
    if keys and rng.random() < 0.1:
        keys.append(rng.choice(keys))                       # a key twice
    rng.shuffle(keys)
    values = {k: FIELD_VALUES.get(k, any_value) if aim in (None, k) else GOOD_VALUES[k] for k in keys}
    fields = [(k, json_string(rng, k, "some" if rng.random() < 0.15 else "min"), values[k](rng)) for k in keys]
    return JsonCase(fields, bom=rng.random() < 0.04,
                    spacing=rng.randrange(1, 1 << 30) if rng.random() < 0.3 else 0,
                    bad_space=rng.choice(BAD_WHITESPACE) if rng.random() < 0.03 else "",
                    tail=rng.choice(TAILS) if rng.random() < 0.04 else "")


def gen_json(rng: random.Random) -> JsonCase:
    """A chat frame that the server must read (no larger than SOFT)."""
    for _ in range(10):
        case = _json_case(rng)
        while len(case.payload()) > SOFT and len(case.fields) > 1:
            case.fields.pop(rng.randrange(len(case.fields)))
        if len(case.payload()) <= SOFT:
            return case
    return JsonCase([("text", '"x"', '"x"')])


def plain_payload(rng: random.Random) -> bytes:
    """A chat payload with one answer only, for frame sequences (whose echoes a close may cut short)."""
    for _ in range(10):
        payload = gen_json(rng).payload()
        if len(payload) <= 2048 and len(classify(payload)) == 1:
            return payload
    return json.dumps({"message_id": rng.randint(1, 5), "text": f"plain {rng.random()}"}).encode()


def _cut(rng: random.Random, data: bytes, pieces: int, end: int | None = None) -> list:
    points = sorted(rng.randint(0, len(data) if end is None else end) for _ in range(pieces - 1))
    return [data[i:j] for i, j in zip([0, *points], [*points, len(data)], strict=True)]


def _control(rng: random.Random) -> Frame:
    opcode = rng.choice([sc.OP_PING, sc.OP_PING, sc.OP_PONG])
    return Frame(opcode, rng.randbytes(rng.choice([0, 1, 8, 125])))


def _message_frames(rng: random.Random, payload: bytes, pieces: int, cut_end: int | None = None) -> list:
    """payload as a text message in pieces, with pings, pongs and empty continuations between."""
    frames = []
    for i, piece in enumerate(_cut(rng, payload, pieces, cut_end)):
        last = i == pieces - 1
        frames.append(Frame(sc.OP_CONTINUATION if i else sc.OP_TEXT, piece, fin=last))
        if not last:
            for _ in range(rng.choice([0, 0, 1, 2])):
                frames.append(_control(rng) if rng.random() < 0.8 else Frame(sc.OP_CONTINUATION, b"", fin=False))
    return frames


CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999,
               0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
CLOSE_REASONS = [b"", b"bye", "é".encode() * 61, b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"x" * 123]
BAD_UTF8 = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80",
            b"\xf8\x88\x80\x80\x80"]


def _unit(rng: random.Random) -> list:
    """One piece of a frame sequence."""
    kind = rng.choices(["message", "control", "close", "binary", "bad", "utf8", "big", "after_close", "empty"],
                       [40, 10, 8, 3, 12, 6, 5, 5, 3])[0]
    if kind == "message":
        frames = _message_frames(rng, plain_payload(rng), rng.choice([1, 1, 2, 3, 4]))
        if rng.random() < 0.05:
            frames[-1] = replace(frames[-1], fin=False)      # never finished
        if len(frames) > 1 and rng.random() < 0.05:
            frames.insert(rng.randrange(1, len(frames)), Frame(sc.OP_CLOSE, struct.pack("!H", 1000)))
        return frames
    if kind == "control":
        return [_control(rng)]
    if kind == "close":
        body = rng.choice([b"", b"\x03", struct.pack("!H", rng.choice(CLOSE_CODES)) + rng.choice(CLOSE_REASONS)])
        return [Frame(sc.OP_CLOSE, body[:125])]
    if kind == "binary":
        return [Frame(sc.OP_BINARY, rng.randbytes(rng.choice([0, 5, 300])), fin=rng.random() < 0.8)]
    if kind == "bad":
        text = Frame(sc.OP_TEXT, b'{"text":"x"}')
        return [rng.choice([
            replace(text, masked=False), replace(text, rsv=rng.choice([0x10, 0x20, 0x40])),
            Frame(rng.choice([3, 7, 11, 15]), b"x"), Frame(sc.OP_PING, b"p" * 126),
            Frame(sc.OP_PING, b"p", fin=False), Frame(sc.OP_CLOSE, b"c", fin=False),
            Frame(sc.OP_CONTINUATION, b'{"text":"x"}'), Frame(sc.OP_PONG, b"p" * 126)])]
    if kind == "utf8":
        prefix = plain_payload(rng)
        return _message_frames(rng, prefix + rng.choice(BAD_UTF8), rng.choice([1, 2, 3]), cut_end=len(prefix))
    if kind == "big":
        return rng.choice([
            [Frame(sc.OP_TEXT, declared=rng.choice([HARD + 1, 1 << 20, 1 << 32, (1 << 63) - 1, 1 << 63]))],
            [Frame(sc.OP_TEXT, b" " * 5000, fin=False), Frame(sc.OP_CONTINUATION, declared=HARD - 4999)]])
    if kind == "after_close":
        return [Frame(sc.OP_CLOSE, struct.pack("!H", rng.choice([1000, 1001, 4000]))),
                text_frame({"message_id": 1, "text": "after close"}), _control(rng)]
    return rng.choice([[Frame(sc.OP_TEXT, b"")], [Frame(sc.OP_TEXT, b"", fin=False), Frame(sc.OP_CONTINUATION, b"")]])


@dataclass
class FramesCase:
    """A sequence of frames on a new connection to the room; then, if open, a message and a close."""
    frames: list
    client: bool = True             # False: connect without a client id
    split: bool = False             # one write per frame, not one for all
    category = "frames"

    def run(self, fuzzer: Fuzzer) -> None:
        """Connect, send, check; a probe message and a clean close when the sequence left it open."""
        batch = fuzzer.batch
        peer = batch.open_peer(new_client_id(fuzzer.rng) if self.client else None)
        try:
            if exchange(peer, self.frames, batch.ledger, self.split):
                fuzzer.probes += 1
                probe = text_frame({"message_id": 10**6 + fuzzer.probes, "text": f"probe {fuzzer.probes}"})
                if exchange(peer, [probe], batch.ledger):
                    exchange(peer, [Frame(sc.OP_CLOSE, struct.pack("!H", 1000))], batch.ledger)
        finally:
            peer.close()

    def simpler(self):
        """Smaller cases, one step each."""
        if self.split:
            yield replace(self, split=False)
        if not self.client:
            yield replace(self, client=True)
        for i, start in enumerate(self.frames):            # a whole message, its fragments together
            if start.opcode in (sc.OP_TEXT, sc.OP_BINARY) and not start.fin:
                rest = self.frames[i + 1:]
                end = next((j for j, f in enumerate(rest) if f.opcode == sc.OP_CONTINUATION and f.fin), len(rest))
                yield replace(self, frames=self.frames[:i] + [f for f in rest[:end + 1] if f.opcode >= 8] +
                              rest[end + 1:])
        for i in range(len(self.frames)):
            yield replace(self, frames=self.frames[:i] + self.frames[i + 1:])

    def __str__(self) -> str:
        return (f"frames on a new connection{'' if self.client else ' without client id'}"
                f"{', one write each' if self.split else ''}: " + "; ".join(map(str, self.frames)))


def gen_frames(rng: random.Random) -> FramesCase:
    """A frame sequence of one to four pieces."""
    frames = [f for _ in range(rng.randint(1, 4)) for f in _unit(rng)]
    return FramesCase(frames, client=rng.random() < 0.8, split=rng.random() < 0.5)


ROOMS_OK = ["lobby", ".", "..", "-", "_", "a" * 64, "A.b-c_9", "..."]
ROOMS_BAD = ["", "a" * 65, "lobby\n", "lobby%0A", "%0A", "lobby\t", "lobby\x00", "\u00fcmlaut", "%C3%BC", "a/b",
             "/", "lobby#x", "lo%62by", "lobby\r", "\u202e", "lob by", "lobby%20", "%2e%2e", "lobby\x7f"]
NAMES_OK = ["alice", "a", "x" * 32, "\u00e9lodie", "名前", "😀", "a b", "O'Brien", "<b>", '"', "\\", "%", "+",
            "\ufffd", "😀" * 32]
NAMES = NAMES_OK + ["x" * 33, "\x00", "a\nb", "\x1f", "\x7f", "\u200f", "\u202e", "\u2028", " ", "   ", "😀" * 33,
                    "\u00a0", "tab\there"]
RAW_NAMES = ["%ED%A0%80", "%ED%BF%BF", "%FF", "%C0%AF", "%E2%80%8F", "%00", "%0A", "%0D%0A", "%", "%zz", "+", "++",
             "a+b", "%2B", "%26", "%3D", "a%", "%e9", "\n", "a#b"]
SINCE = ["0", "1", "3", "007", str(2**63 - 1), "9" * 19, "9" * 20, "9" * 100, "-1", "+1", "1.5", "0x10", "", "abc",
         "%31", "%D9%A1", "1e3", "%201", "1%00", "%EF%BC%91", "\n1"]
CLIENT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
# epoch=: two well formed (an order no room has), then near misses.
EPOCHS = ["0123456789abcdef", "ffffffffffffffff", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0",
          "", "%30123456789abcdef", "0123456789abcdeg", "0123456789abcde%0A", "0123456789abcdef%00"]


def _client_value(rng: random.Random, good: bool) -> str:
    size = rng.choice([16, 22, 22, 64] if good else [16, 22, 64, 15, 65, 0])
    value = "".join(rng.choice(CLIENT_ALPHABET) for _ in range(size))
    if not good and rng.random() < 0.25:
        value = value[:-1] + rng.choice(["=", "%0A", ".", "+", "%00", "%C3%A9", "~", "%2D", "\n", "%ED%A0%80"])
    return value


def _param(rng: random.Random, key: str, good: bool) -> tuple:
    if key == "name":
        value = quote(rng.choice(NAMES_OK if good else NAMES), safe="") if good or rng.random() < 0.7 \
            else rng.choice(RAW_NAMES)
    elif key == "since":
        value = rng.choice(SINCE[:6] if good else SINCE)
    elif key == "client":
        value = _client_value(rng, good)
    elif key == "epoch":
        value = rng.choice(EPOCHS[:2] if good else EPOCHS)
    else:
        return rng.choice([("x", "1"), ("foo", None), ("", ""), ("a", "b=c"), ("name", None), ("since", None),
                           ("NAME", "x"), ("client", None)])
    return key, value


@dataclass
class QueryCase:
    """One upgrade request: /ws or /ws/<room>, and its query parameters (raw, as sent)."""
    room: str | None
    params: list
    query_mark: bool = False        # a '?' with nothing after it
    category = "query"

    def resource(self) -> str:
        """The request target."""
        path = "/ws" if self.room is None else "/ws/" + self.room
        query = "&".join(k if v is None else f"{k}={v}" for k, v in self.params)
        return path + ("?" + query if query or self.query_mark else "")

    def run(self, fuzzer: Fuzzer) -> None:
        """Upgrade (or not, as the model says); when upgraded, the replay, one message and a close."""
        resource = self.resource()
        statuses, upgrades = query_outcomes(resource)
        try:
            peer = Peer(fuzzer.target.front, resource)
        except sc.HandshakeError as e:
            if e.status in statuses:
                return
            raise Finding("answer", f"GET {resource!r} answered {e.status} ({e.reason!r}); expected "
                                    f"{sorted(statuses) or ''}{' or an upgrade' if upgrades else ''}") from None
        except (TimeoutError, ConnectionError) as e:
            raise Finding("answer", f"GET {resource!r}: no answer to the upgrade ({e})") from None
        try:
            self._check_upgrade(fuzzer, peer, resource, statuses, upgrades)
        finally:
            peer.close()

    @staticmethod
    def _check_upgrade(fuzzer: Fuzzer, peer: Peer, resource: str, statuses, upgrades) -> None:
        welcome = peer.welcome
        fits = [u for u in upgrades if u.room == welcome["room"] and
                (welcome["name"] == u.name if u.name else welcome["name"].startswith("guest-"))]
        if not fits:
            raise Finding("answer", f"GET {resource!r} upgraded to {welcome}; expected "
                                    f"{upgrades or ''}{' or ' if upgrades else ''}{sorted(statuses)}")
        peer.identity = "query"
        fuzzer.probes += 1
        ledger, replayed = Ledger(), []
        probe = {"message_id": 1, "text": f"probe {fuzzer.probes}", "sent_at": "2026-11-28T10:00:00Z"}
        peer.send_json(probe)
        pending = Pending([New(1, probe["text"], probe["sent_at"], None)], True, peer, b"probe")
        await_answers(peer, [], [pending], None, replay=(welcome["seq"], replayed))
        seqs = [m["seq"] for m in replayed]
        # since counts in the order epoch: in another one the replay starts at the oldest held.
        allowed = [list(range(max((u.since if u.epoch in (None, welcome["epoch"]) else 0) + 1,
                                  welcome.get("oldest", 1)), welcome["seq"] + 1))
                   if u.since is not None else [] for u in fits]
        if seqs not in allowed:
            raise Finding("answer", f"GET {resource!r}: replayed seqs {seqs} after {welcome}; expected one of {allowed}")
        exchange(peer, [Frame(sc.OP_CLOSE, struct.pack("!H", 1000))], ledger)

    def simpler(self):
        """Smaller cases, one step each."""
        if self.query_mark:
            yield replace(self, query_mark=False)
        for i in range(len(self.params)):
            yield replace(self, params=self.params[:i] + self.params[i + 1:])
        if self.room not in (None, "r"):
            yield replace(self, room="r")

    def __str__(self) -> str:
        return f"GET {self.resource()!r}"


def gen_query(rng: random.Random) -> QueryCase:
    """An upgrade with odd room, name, since and client values."""
    r = rng.random()
    room = None if r < 0.2 else rng.choice(ROOMS_OK) if r < 0.5 else rng.choice(ROOMS_BAD) if r < 0.7 else \
        "q" + "".join(rng.choice(CLIENT_ALPHABET + ".") for _ in range(rng.randint(0, 63)))
    keys = [k for k in ("name", "since", "client", "epoch") if rng.random() < 0.5]
    keys += ["extra"] * rng.choice([0, 0, 0, 1, 2])
    if keys and rng.random() < 0.15:
        keys.append(rng.choice(keys))                       # a parameter twice
    rng.shuffle(keys)
    aim = rng.randrange(len(keys)) if keys and rng.random() < 0.5 else None    # only this one may be odd
    return QueryCase(room, [_param(rng, k, aim not in (None, i)) for i, k in enumerate(keys)],
                     query_mark=rng.random() < 0.05)


@dataclass
class ResendCase:
    """Clients that send, reconnect and resend in the room: (client id or None, name) each."""
    actors: list
    actions: list                   # (actor, reconnect first, payload)
    category = "resend"

    def run(self, fuzzer: Fuzzer) -> None:
        """Play the actions in order, each on its actor's connection."""
        batch, peers = fuzzer.batch, {}
        try:
            for actor, reconnect, payload in self.actions:
                peer = peers.get(actor)
                if peer is None or reconnect:
                    if peer is not None:
                        peer.close()
                    peer = peers[actor] = batch.open_peer(*self.actors[actor])
                if not exchange(peer, [Frame(sc.OP_TEXT, payload)], batch.ledger):
                    del peers[actor]
        finally:
            for peer in peers.values():
                peer.close()

    def simpler(self):
        """Smaller cases, one step each."""
        for i in range(len(self.actions)):
            yield replace(self, actions=self.actions[:i] + self.actions[i + 1:])
        for i, (actor, reconnect, payload) in enumerate(self.actions):
            if reconnect:
                yield replace(self, actions=[*self.actions[:i], (actor, False, payload), *self.actions[i + 1:]])

    def __str__(self) -> str:
        return f"clients {self.actors}: " + "; ".join(
            f"{'reconnect, ' if reconnect else ''}{actor} sends {payload!r}" for actor, reconnect, payload in self.actions)


def gen_resend(rng: random.Random) -> ResendCase:
    """Two or three clients, some under one name, some without a client id, resending a few message_ids."""
    actors = [(new_client_id(rng) if rng.random() < 0.75 else None, rng.choice(["alice", "alice", "bob"]))
              for _ in range(rng.randint(2, 3))]
    actions = []
    for _ in range(rng.randint(3, 8)):
        resend = rng.choice(["true", "true", "true", "false", '"true"', "1", None])
        body = {"message_id": rng.randint(1, 3), "text": rng.choice(["one", "two", "one"])}
        raw = json.dumps(body)[:-1] + (f', "resend": {resend}' if resend else "") + "}"
        actions.append((rng.randrange(len(actors)), rng.random() < 0.3, raw.encode()))
    return ResendCase(actors, actions)


GENERATORS = {"json": gen_json, "frames": gen_frames, "query": gen_query, "resend": gen_resend}


# ---------------------------------------------------------------------------
# Running cases
# ---------------------------------------------------------------------------

class Fuzzer:
    """Runs cases against a target, each followed by the checks that hold for any case."""

    def __init__(self, target: Target, rng: random.Random, categories: tuple = CATEGORIES):
        self.target, self.rng = target, rng
        self.categories = categories
        self.weights = [WEIGHTS[CATEGORIES.index(c)] for c in categories]
        self.batch: Batch | None = None
        self.batches = self.probes = 0
        self.counts = {c: 0 for c in CATEGORIES}

    def run(self, case) -> None:
        """One case, then: processes alive, the watcher saw what the room took, the victim's echo."""
        try:
            if self.batch is None or self.batch.cases >= BATCH:
                self.drop_batch()
                self.batches += 1
                self.batch = Batch(self.target, self.batches)
            self.batch.cases += 1
            case.run(self)
            self.target.check()
            self.batch.watch()
            self.target.victim.check()
        except Finding as finding:
            self.drop_batch()
            raise self.target.explain(finding) from None
        except (OSError, sc.HandshakeError) as e:
            self.drop_batch()
            raise self.target.explain(Finding("answer", f"{type(e).__name__}: {e}")) from None
        self.counts[case.category] += 1

    def drop_batch(self) -> None:
        """Leave the current room (after a failure its state is unknown)."""
        if self.batch is not None:
            self.batch.close()
            self.batch = None

    def next_case(self):
        """A case of a category drawn by weight."""
        return GENERATORS[self.rng.choices(self.categories, self.weights)[0]](self.rng)

    def attempt(self, case) -> Finding | None:
        """Run case on sound servers (restarted if they are not); its finding, or None."""
        try:
            self.target.check()
            self.target.victim.check()
        except (Finding, OSError):
            self.target.stop()
            self.target.start()
        try:
            self.run(case)
        except Finding as finding:
            return finding
        return None

    def reduce(self, case, finding: Finding, seconds: float) -> tuple:
        """The smallest case found within seconds that fails the same way, and its finding."""
        deadline = time.monotonic() + seconds
        again = self.attempt(case)
        if again is None:
            return case, Finding(finding.kind, f"{finding.message} (not seen again when the case ran alone)")
        finding = again
        while time.monotonic() < deadline:
            for smaller in case.simpler():
                if time.monotonic() > deadline:
                    break
                found = self.attempt(smaller)
                if found is not None and found.kind == finding.kind:
                    case, finding = smaller, found
                    break
            else:
                break
        return case, finding

    def fuzz(self, until: float | None = None, counts: dict | None = None, reduce_seconds: float = 60.0):
        """Run generated cases until a time, or a number per category; the first failure, reduced, or None."""
        todo = [c for c, n in (counts or {}).items() for _ in range(n)]
        self.rng.shuffle(todo)
        while (todo if counts else time.monotonic() < until):
            case = GENERATORS[todo.pop()](self.rng) if counts else self.next_case()
            try:
                self.run(case)
            except Finding as finding:
                print(f"failure: {finding}\n  input: {case}", file=sys.stderr, flush=True)
                return self.reduce(case, finding, reduce_seconds)
        self.drop_batch()
        errors = self.target.internal_errors()
        if errors:
            return None, Finding("crash", f"scalechat_internal_errors_total is {errors:g}: a connection was "
                                          "closed with 1011 (see the server's log)")
        return None
