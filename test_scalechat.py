"""Tests of scalechat.py.

1. The protocol core with bytes alone: every RFC 6455 rule with the close code it
   must produce, the parser fed whole streams and every split of them, handshakes.
2. The chat logic as plain functions: client JSON, history, names.
3. The server end to end over real sockets: the wire protocol of docs/protocol.md,
   HTTP answers, static files, limits, timeouts, draining, metrics.
4. Interop with independent client libraries (websockets, websocket-client).

Frames sent by tests are built with testkit.py on scalechat's own encoder, which
the RFC 6455 examples below pin byte for byte; test_conformance.py plays the
server against an independent, hand-written codec. Time limits, connection caps,
protocol-error counting and static path escapes are tested in test_hostile.py.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import json
import os
import pathlib
import random
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import websocket
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from websockets.sync.client import connect

from scalechat import (
    ACK_HEAD,
    CLOSE_INTERNAL_ERROR,
    EPOCH,
    HISTORY_ENTRY_COST,
    HTTP_STATUSES,
    LINGER_ROOMS,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    OPEN,
    PROTOCOL_ERROR_CODES,
    ROOM_COST,
    Chat,
    ChatError,
    Connection,
    EventLoop,
    FrameParser,
    Front,
    HandshakeError,
    Histogram,
    History,
    HistoryBudget,
    Link,
    ProtocolError,
    Rec,
    RecordReader,
    RespError,
    RespParser,
    Room,
    Sequenced,
    Server,
    Stats,
    Upgrade,
    accept_key,
    check_upgrade,
    client_handshake_request,
    encode_close,
    encode_frame,
    http_response,
    key_slot,
    max_frame_size,
    new_epoch,
    new_key,
    new_mask_key,
    open_fds,
    parse_args,
    parse_chat_message,
    parse_close,
    parse_handshake_response,
    parse_redis_url,
    parse_request_head,
    parse_snapshot,
    record,
    route,
    snapshot_records,
    take_request_head,
    upgrade_response,
    valid_name,
)
from testkit import (
    RawClient,
    chat_frame,
    chat_json,
    close_frame,
    frame,
    free_port,
    get,
    http,
    pieces,
    rss_kib,
    sample,
    sample_names,
    scrape,
)

# ---------------------------------------------------------------------------
# 1. Protocol core: RFC 6455 with bytes alone
# ---------------------------------------------------------------------------

# RFC 6455 section 5.7, byte for byte.
RFC_KEY = bytes.fromhex("37fa213d")
RFC_HELLO = bytes.fromhex("810548656c6c6f")
RFC_HELLO_MASKED = bytes.fromhex("818537fa213d7f9f4d5158")
RFC_FRAGMENTED = bytes.fromhex("010348656c" "80026c6f")
RFC_PING = bytes.fromhex("890548656c6c6f")
RFC_PONG_MASKED = bytes.fromhex("8a8537fa213d7f9f4d5158")


def feed_chunks(parser: FrameParser, chunks) -> list:
    """Everything the parser completes while fed chunks in order."""
    return [event for chunk in chunks for event in parser.feed(chunk)]


def failure(data: bytes, **parser_args) -> tuple[int, int]:
    """Feed data byte by byte; (close code, offset of the byte that made the parser fail)."""
    parser = FrameParser(**parser_args)
    for i in range(len(data)):
        try:
            parser.feed(data[i:i + 1])
        except ProtocolError as e:
            return e.code, i
    raise AssertionError("the parser accepted everything")


def test_accept_key_rfc_example():
    """RFC 6455 section 1.3's own example."""
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_encode_frame_rfc_examples():
    """encode_frame writes the RFC's example frames exactly."""
    assert encode_frame(OP_TEXT, b"Hello") == RFC_HELLO
    assert encode_frame(OP_TEXT, b"Hello", mask_key=RFC_KEY) == RFC_HELLO_MASKED
    assert encode_frame(OP_TEXT, b"Hel", fin=False) + encode_frame(OP_CONTINUATION, b"lo") == RFC_FRAGMENTED
    assert encode_frame(OP_PING, b"Hello") == RFC_PING
    assert encode_frame(OP_PONG, b"Hello", mask_key=RFC_KEY) == RFC_PONG_MASKED
    assert encode_frame(OP_BINARY, bytes(256))[:4] == bytes.fromhex("827e0100")
    assert encode_frame(OP_BINARY, bytes(65536))[:10] == bytes.fromhex("827f0000000000010000")


@pytest.mark.parametrize("n, header", [
    (0, "8100"), (125, "817d"), (126, "817e007e"), (65535, "817effff"),
    (65536, "817f0000000000010000"), (70000, "817f0000000000011170"),
])
def test_length_classes_round_trip(n, header):
    """7-, 16- and 64-bit lengths at their edges, written and parsed back."""
    payload = b"a" * n
    data = encode_frame(OP_TEXT, payload)
    assert data[:len(header) // 2] == bytes.fromhex(header)
    assert FrameParser(expect_masked=False).feed(data) == [(OP_TEXT, payload)]
    assert FrameParser().feed(frame(OP_TEXT, payload)) == [(OP_TEXT, payload)]


def test_parser_rfc_examples():
    """The RFC's example frames parse (client side: unmasked; server side: masked)."""
    client_side = FrameParser(expect_masked=False)
    assert client_side.feed(RFC_HELLO + RFC_FRAGMENTED + RFC_PING) == [
        (OP_TEXT, b"Hello"), (OP_TEXT, b"Hello"), (OP_PING, b"Hello")]
    assert FrameParser().feed(RFC_HELLO_MASKED + RFC_PONG_MASKED) == [(OP_TEXT, b"Hello"), (OP_PONG, b"Hello")]


def test_parser_every_split_of_a_frame():
    """All 2**10 ways to cut the RFC's masked frame give the same message."""
    n = len(RFC_HELLO_MASKED)
    for bits in range(1 << (n - 1)):
        cuts = [i + 1 for i in range(n - 1) if bits >> i & 1]
        assert feed_chunks(FrameParser(), pieces(RFC_HELLO_MASKED, cuts)) == [(OP_TEXT, b"Hello")], cuts


KOSME = "κόσμε".encode()
# A fragmented text cut inside a character, with a ping and an empty fragment between;
# then every length class and a close.
STREAM = (frame(OP_TEXT, b"Hello") + frame(OP_TEXT, KOSME[:3], fin=False) + frame(OP_PING, b"in between")
          + frame(OP_CONTINUATION, b"", fin=False) + frame(OP_CONTINUATION, KOSME[3:])
          + frame(OP_PONG) + frame(OP_TEXT, KOSME * 12) + close_frame(1000, b"bye"))
STREAM_EVENTS = [(OP_TEXT, b"Hello"), (OP_PING, b"in between"), (OP_TEXT, KOSME), (OP_PONG, b""),
                 (OP_TEXT, KOSME * 12), (OP_CLOSE, b"\x03\xe8bye")]


def test_parser_stream_whole_and_byte_by_byte():
    """Fragments, interleaved control frames and a 16-bit length: at once or byte by byte."""
    assert FrameParser().feed(STREAM) == STREAM_EVENTS
    assert feed_chunks(FrameParser(), pieces(STREAM, range(1, len(STREAM)))) == STREAM_EVENTS


def test_parser_stream_every_split_in_two_and_three():
    """Every cut, and every pair of cuts, of the stream gives the same events."""
    for cuts in itertools.chain(itertools.combinations(range(1, len(STREAM)), 1),
                                itertools.combinations(range(1, len(STREAM)), 2)):
        assert feed_chunks(FrameParser(), pieces(STREAM, cuts)) == STREAM_EVENTS, cuts


def test_parser_64_bit_length_in_pieces():
    """A 64-bit-length frame arriving in uneven pieces, then another frame."""
    payload = "€".encode() * 30000
    data = frame(OP_TEXT, payload) + frame(OP_PING, b"after")
    assert feed_chunks(FrameParser(), pieces(data, [1, 5, 9, 14, 1000, 45001, 90000])) == [
        (OP_TEXT, payload), (OP_PING, b"after")]


@st.composite
def streams(draw):
    """A random client stream (messages, some fragmented with pings between) and its events."""
    data, events = b"", []
    for text in draw(st.lists(st.text(max_size=200), max_size=6)):
        payload = text.encode()
        cuts = sorted(draw(st.sets(st.integers(0, len(payload)), max_size=3)))
        parts = pieces(payload, cuts)
        for i, part in enumerate(parts):
            data += frame(OP_CONTINUATION if i else OP_TEXT, part, fin=i == len(parts) - 1)
            if i < len(parts) - 1 and draw(st.booleans()):
                data += frame(OP_PING, b"%d" % i)
                events.append((OP_PING, b"%d" % i))
        events.append((OP_TEXT, payload))
    return data, events


@settings(max_examples=200, deadline=None)
@given(streams(), st.data())
def test_parser_any_stream_any_chunking(stream, data):
    """Property: however a valid stream is cut, the parser completes the same events."""
    raw, events = stream
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(raw) - 1)), max_size=12)))
    assert feed_chunks(FrameParser(), pieces(raw, cuts)) == events


VIOLATIONS = [
    ("unmasked client frame", frame(OP_TEXT, b"hi", masked=False), 1002),
    *[(f"reserved bits {rsv}", frame(OP_TEXT, b"hi", rsv=rsv), 1002) for rsv in range(1, 8)],
    *[(f"reserved opcode {op}", frame(op, b"x"), 1002) for op in (3, 4, 5, 6, 7, 11, 12, 13, 14, 15)],
    ("ping longer than 125 bytes", frame(OP_PING, b"x" * 126), 1002),
    ("close longer than 125 bytes", frame(OP_CLOSE, b"\x03\xe8" + b"x" * 124), 1002),
    ("fragmented ping", frame(OP_PING, b"x", fin=False), 1002),
    ("fragmented close", frame(OP_CLOSE, b"\x03\xe8", fin=False), 1002),
    ("continuation without a message", frame(OP_CONTINUATION, b"x"), 1002),
    ("new message inside a fragmented one", frame(OP_TEXT, b"a", fin=False) + frame(OP_TEXT, b"b"), 1002),
    ("binary frame", frame(OP_BINARY, b"\x00"), 1003),
    ("binary after text fragments", frame(OP_TEXT, b"a", fin=False) + frame(OP_BINARY, b"b"), 1002),
    ("invalid UTF-8", frame(OP_TEXT, b"ok\xff"), 1007),
    ("text ending inside a character", frame(OP_TEXT, KOSME[:3]), 1007),
    ("fragments ending inside a character", frame(OP_TEXT, KOSME[:3], fin=False) + frame(OP_CONTINUATION), 1007),
    ("UTF-16 surrogate", frame(OP_TEXT, b"\xed\xa0\x80"), 1007),
    ("close payload of one byte", frame(OP_CLOSE, b"\x03"), 1002),
    *[(f"close code {code}", close_frame(code), 1002) for code in (0, 999, 1004, 1005, 1006, 1015, 2999, 5000)],
    ("close reason not UTF-8", close_frame(1000, b"\xc0\xaf"), 1007),
    ("message over the limit", frame(OP_TEXT, b"x" * 101), 1009),
    ("fragments over the limit", frame(OP_TEXT, b"x" * 60, fin=False) + frame(OP_CONTINUATION, b"x" * 41), 1009),
    ("64-bit length with its top bit set", frame(OP_TEXT, length=1 << 63), 1002),
]


@pytest.mark.parametrize("data, code", [pytest.param(d, c, id=name) for name, d, c in VIOLATIONS])
def test_parser_violations(data, code):
    """Each rule's close code, whether the bytes come at once or one by one."""
    with pytest.raises(ProtocolError) as e:
        FrameParser(max_message_size=100, accept_binary=False).feed(data)
    assert e.value.code == code
    assert failure(data, max_message_size=100, accept_binary=False)[0] == code


@pytest.mark.parametrize("data, where", [
    pytest.param(frame(OP_TEXT, length=101), 2, id="7-bit"),
    pytest.param(frame(OP_TEXT, length=200), 4, id="16-bit"),
    pytest.param(frame(OP_TEXT, length=1 << 40), 10, id="64-bit"),
    pytest.param(frame(OP_TEXT, b"x" * 90, fin=False) + frame(OP_CONTINUATION, length=11), 96 + 2, id="fragment"),
])
def test_too_big_fails_at_the_header(data, where):
    """1009 as soon as the length is read: before the mask key, long before the payload."""
    assert failure(data, max_message_size=100) == (1009, where - 1)


def test_top_bit_length_fails_at_the_header():
    """A 64-bit length with the most significant bit set is refused once it is read."""
    assert failure(frame(OP_TEXT, length=1 << 63)) == (1002, 9)


def test_limit_itself_is_accepted():
    """A message of exactly the limit, whole or fragmented, passes."""
    parser = FrameParser(max_message_size=100)
    assert parser.feed(frame(OP_TEXT, b"x" * 100)) == [(OP_TEXT, b"x" * 100)]
    assert parser.feed(frame(OP_TEXT, b"x" * 60, fin=False) + frame(OP_CONTINUATION, b"x" * 40)) == [
        (OP_TEXT, b"x" * 100)]


@pytest.mark.parametrize("bad, at", [
    (b"\xff", 0), (b"\x80", 0), (b"\xc0", 0), (b"\xf5", 0), (b"\xce\x41", 1), (b"\xe0\x80", 1),
    (b"\xf0\x80", 1), (b"\xf4\x90", 1), (b"\xed\xa0", 1), (b"\xed\xbf", 1),
])
def test_utf8_fails_at_the_first_bad_byte(bad, at):
    """Invalid UTF-8 fails at its first impossible byte, inside a frame still unfinished."""
    payload = b"text " + bad + b" and much more"
    data = frame(OP_TEXT, payload)
    header = len(data) - len(payload)
    assert failure(data) == (1007, header + 5 + at)


def test_utf8_fails_fast_across_fragments():
    """A character begun in one fragment and broken in the next fails at that byte."""
    first = frame(OP_TEXT, b"ok \xf4", fin=False)
    data = first + frame(OP_CONTINUATION, b"\x90 and the rest")
    assert failure(data) == (1007, len(first) + 6)


def test_failed_parser_keeps_earlier_frames_and_stays_failed():
    """Frames completed before a violation come with the error; later data is refused."""
    parser = FrameParser()
    with pytest.raises(ProtocolError) as e:
        parser.feed(frame(OP_TEXT, b"first") + frame(OP_PING, b"p") + frame(OP_TEXT, b"x", rsv=2) + frame(OP_PING))
    assert (e.value.code, e.value.frames) == (1002, [(OP_TEXT, b"first"), (OP_PING, b"p")])
    with pytest.raises(ProtocolError) as again:
        parser.feed(close_frame(1002))
    assert (again.value.code, again.value.frames) == (1002, [])


def test_client_side_parser_refuses_masked_frames():
    """A client parses unmasked server frames and fails on masked ones."""
    with pytest.raises(ProtocolError) as e:
        FrameParser(expect_masked=False).feed(RFC_HELLO_MASKED)
    assert e.value.code == 1002


@pytest.mark.parametrize("payload, expected", [
    (b"", (1005, "")), (b"\x03\xe8", (1000, "")), (b"\x03\xe9going", (1001, "going")),
    (b"\x0b\xb8", (3000, "")), (b"\x13\x87" + KOSME, (4999, "κόσμε")), (b"\x03\xf5", (1013, "")),
])
def test_parse_close(payload, expected):
    """Status code and reason of valid Close payloads."""
    assert parse_close(payload) == expected


def test_encode_close():
    """Close frames: code and reason, none for 1005, reason cut on a character boundary."""
    assert encode_close(1000, "bye") == bytes.fromhex("880503e8") + b"bye"
    assert encode_close(1005) == b"\x88\x00"
    long_close = encode_close(1001, "é" * 100)
    assert len(long_close) == 2 + 124
    assert parse_close(long_close[2:]) == (1001, "é" * 61)
    masked = encode_close(1000, "bye", mask_key=RFC_KEY)
    assert FrameParser().feed(masked) == [(OP_CLOSE, b"\x03\xe8bye")]


GOOD_REQUEST = (b"GET /ws/room?name=al%20ice&since=3 HTTP/1.1\r\nHost: example.com\r\n"
                b"Upgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                b"X-Twice: a\r\nX-Twice: b")


def test_parse_request_head():
    """Request line, path, decoded query, lower-case header names, repeated headers joined."""
    req = parse_request_head(GOOD_REQUEST)
    assert (req.method, req.target, req.path, req.version) == (
        "GET", "/ws/room?name=al%20ice&since=3", "/ws/room", "HTTP/1.1")
    assert req.query == {"name": ["al ice"], "since": ["3"]}
    assert req.headers["x-twice"] == "a, b"
    assert req.header_tokens("connection") == {"keep-alive", "upgrade"}


@pytest.mark.parametrize("head", [
    b"GET /ws", b"GET  /ws HTTP/1.1", b"GET ws HTTP/1.1", b"GET /ws HTTP/2.0", b"G(T /ws HTTP/1.1",
    b"GET /ws HTTP/1.1\r\nHost example.com", b"GET /ws HTTP/1.1\r\nHost : example.com",
    b"GET /ws HTTP/1.1\r\n folded: value", "GET /wş HTTP/1.1".encode(),
])
def test_parse_request_head_refuses_malformed(head):
    """Malformed request heads are 400."""
    with pytest.raises(HandshakeError) as e:
        parse_request_head(head)
    assert e.value.status == 400


def test_check_upgrade_accepts_rfc_request():
    """A valid opening handshake yields the RFC's accept value; tokens are case-insensitive."""
    assert check_upgrade(parse_request_head(GOOD_REQUEST)) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("change, status, header", [
    ((b"GET /ws/room", b"POST /ws/room"), 405, ("Allow", "GET")),
    ((b"HTTP/1.1\r\n", b"HTTP/1.0\r\n"), 400, None),
    ((b"Host: example.com\r\n", b""), 400, None),
    ((b"Upgrade: WebSocket\r\n", b""), 426, ("Upgrade", "websocket")),
    ((b"keep-alive, Upgrade", b"keep-alive"), 426, ("Upgrade", "websocket")),
    ((b"Version: 13", b"Version: 8"), 426, ("Sec-WebSocket-Version", "13")),
    ((b"Sec-WebSocket-Version: 13\r\n", b""), 426, ("Sec-WebSocket-Version", "13")),
    ((b"dGhlIHNhbXBsZSBub25jZQ==", b""), 400, None),
    ((b"dGhlIHNhbXBsZSBub25jZQ==", b"dGhlIHNhbXBsZQ=="), 400, None),
    ((b"dGhlIHNhbXBsZSBub25jZQ==", b"dGhlIHNhbXBsZSBub25jZQ!!"), 400, None),
])
def test_check_upgrade_refusals(change, status, header):
    """Each broken handshake gets its HTTP status, and the headers that status needs."""
    with pytest.raises(HandshakeError) as e:
        check_upgrade(parse_request_head(GOOD_REQUEST.replace(*change)))
    assert e.value.status == status
    if header:
        assert header in e.value.headers


def test_responses():
    """The 101 answer and plain HTTP answers are complete and close the connection."""
    assert upgrade_response("abc=") == (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                        b"Connection: Upgrade\r\nSec-WebSocket-Accept: abc=\r\n\r\n")
    response = http_response(404, b"nope\n", headers=(("X-A", "1"),))
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 404 Not Found" and body == b"nope\n"
    assert {b"Content-Length: 5", b"Connection: close", b"X-A: 1"} <= set(head.split(b"\r\n"))
    assert http_response(200, b"ok", head_only=True).endswith(b"Content-Length: 2\r\nConnection: close\r\n\r\n")


def test_client_handshake_helpers():
    """The client's request passes the server's checks; its response parser checks the accept."""
    key = new_key()
    assert key != new_key() and len(key) == 24 and len(new_mask_key()) == 4
    request = client_handshake_request("127.0.0.1:8080", "/ws/r?name=a", key, origin="http://127.0.0.1:8080")
    head = request[:request.index(b"\r\n\r\n")]
    parsed = parse_request_head(head)
    assert parsed.headers["origin"] == "http://127.0.0.1:8080"
    response = upgrade_response(check_upgrade(parsed))
    assert parse_handshake_response(response[:-1], key) is None
    assert parse_handshake_response(response + RFC_HELLO, key) == len(response)
    for wrong in ((accept_key(key).encode(), accept_key(new_key()).encode()),
                  (b"Upgrade: websocket", b"Upgrade: h2c"), (b"Connection: Upgrade", b"Connection: close"),
                  (b"\r\n\r\n", b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"),
                  (b"\r\n\r\n", b"\r\nSec-WebSocket-Protocol: chat\r\n\r\n")):
        with pytest.raises(HandshakeError):
            parse_handshake_response(response.replace(*wrong), key)
    other_case = response.replace(b"Upgrade: websocket", b"UPGRADE: WebSocket").replace(
        b"Connection: Upgrade", b"connection: keep-alive, upgrade")
    assert parse_handshake_response(other_case, key) == len(other_case)
    with pytest.raises(HandshakeError) as e:
        parse_handshake_response(http_response(503, b"busy"), key)
    assert e.value.status == 503
    with pytest.raises(HandshakeError):
        parse_handshake_response(b"x" * 70000, key)


# ---------------------------------------------------------------------------
# 2. Chat logic
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("payload, expected", [
    (b'{"message_id": 42, "text": "hello", "sent_at": "2026-11-28T10:00:00.123456Z"}',
     (42, "hello", "2026-11-28T10:00:00.123456Z", False)),
    (b'{"text": "hi", "sender": "mallory", "room": "elsewhere"}', (None, "hi", None, False)),
    ('{"message_id": 1, "text": "%s"}' % ("é" * 50), (1, "é" * 50, None, False)),
    (b'{"message_id": 7, "text": "a", "sent_at": "2026-11-28t10:00:00+01:00", "resend": true}',
     (7, "a", "2026-11-28t10:00:00+01:00", True)),
    (b'{"message_id": 7, "text": "a", "resend": "true", "x": {"resend": true}}', (7, "a", None, False)),
])
def test_parse_chat_message(payload, expected):
    """Valid client messages; sender and room from a client are ignored."""
    if isinstance(payload, str):
        payload = payload.encode()
    assert parse_chat_message(payload, 100) == expected


@pytest.mark.parametrize("payload, code, message_id", [
    (b"not json", "bad_json", None), (b"[1, 2]", "bad_message", None), (b"", "bad_json", None),
    (b'{"message_id": true, "text": "a"}', "bad_message", None),
    (b'{"message_id": 1.5, "text": "a"}', "bad_message", None),
    (b'{"message_id": 9223372036854775808, "text": "a"}', "bad_message", None),
    (b'{"message_id": 3}', "missing_text", 3), (b'{"message_id": 3, "text": ""}', "missing_text", 3),
    (b'{"message_id": 3, "text": 5}', "missing_text", 3),
    (b'{"message_id": 4, "text": "' + "é".encode() * 51 + b'"}', "too_big", 4),
    (b'{"message_id": 5, "text": "\\ud800"}', "bad_message", 5),
    (b'{"message_id": 6, "text": "a", "sent_at": 7}', "bad_message", 6),
    (b'{"message_id": 6, "text": "a", "sent_at": "' + b"9" * 65 + b'"}', "bad_message", 6),
    (b'{"message_id": 1, "text": "hi", "sent_at": "\\ud800"}', "bad_message", 1),
    (b'{"message_id": 1, "text": "hi", "sent_at": "2026-11-28T10:00:00Z\\n"}', "bad_message", 1),
    (b'{"message_id": 1, "text": "hi", "sent_at": "2026-11-28T10:00:00"}', "bad_message", 1),
    ('{"message_id": 1, "text": "hi", "sent_at": "٢٠٢٦-11-28T10:00:00Z"}'.encode(), "bad_message", 1),
    (b'{"message_id": 1, "text": "hi", "sent_at": ["2026-11-28T10:00:00Z"]}', "bad_message", 1),
    (b"[" * 100000, "bad_json", None),
])
def test_parse_chat_message_refusals(payload, code, message_id):
    """Refused frames: the error code, and the message_id when it is known."""
    with pytest.raises(ChatError) as e:
        parse_chat_message(payload, 100)
    assert (e.value.code, e.value.message_id) == (code, message_id)


def test_max_frame_size_holds_the_worst_escaped_text():
    """A text of the maximum size still fits the frame limit when every byte is escaped."""
    for text in ("\x01" * 1000, '"' * 1000, "é" * 500, "\U0001f600" * 250):
        assert len(json.dumps({"message_id": -(1 << 62), "text": text, "sent_at": "9" * 64})) <= max_frame_size(1000)


def test_history_replays_after_a_seq_within_its_bounds():
    """Replay: held messages after since, oldest first, a budget at a time; history bounded in count."""
    history = History(max_count=3, max_bytes=1 << 20)
    assert len(history) == 0
    for seq in range(1, 6):
        history.append(seq, b"f%d" % seq)
    assert len(history) == 3 and history.oldest_seq() == 3
    assert history.after(0, 1 << 20) == ([b"f3", b"f4", b"f5"], 5)
    assert history.after(3, 1 << 20) == ([b"f4", b"f5"], 5)
    assert history.after(3, 1) == ([b"f4"], 4)             # at least one item per call
    assert history.after(5, 1 << 20) == ([], 5)              # nothing after the newest
    assert history.after(99, 1 << 20) == ([], 99)            # nor after a seq not reached yet


def test_history_is_bounded_in_bytes_and_keeps_the_newest():
    """Past max_bytes the oldest go, counted with their overhead; one message is always kept."""
    history = History(max_count=1000, max_bytes=10 * (100 + HISTORY_ENTRY_COST))
    for seq in range(1, 101):
        history.append(seq, b"x" * 100)
    assert len(history) == 10 and history.oldest_seq() == 91
    assert history.cost == 10 * (100 + HISTORY_ENTRY_COST)
    history.append(101, b"y" * 100000)
    assert len(history) == 1 and history.after(0, 1 << 20)[0] == [b"y" * 100000]


def test_history_resend_index_is_exact_and_shrinks_with_the_history():
    """seq_of finds a held key in O(1); a key trimmed away is forgotten; a reused key points to the newest."""
    history = History(max_count=4, max_bytes=1 << 20)
    for seq in range(1, 11):
        history.append(seq, b"m", b"c:%d" % seq)
    assert history.seq_of(b"c:10") == 10 and history.seq_of(b"c:7") == 7
    assert history.seq_of(b"c:6") is None and history.seq_of(b"") is None
    assert len(history.index) == 4                          # bounded with the history
    history.append(11, b"m", b"c:9")                        # the same key again: the newest wins
    history.append(12, b"m")
    history.append(13, b"m")
    assert history.seq_of(b"c:9") == 11                     # the trimmed seq-9 entry did not remove it
    assert history.entries.count(None) <= history.head      # compaction keeps only dead slots before head


def test_history_budget_trims_the_least_recently_active_room_first():
    """--history-bytes across rooms: the idle room loses its oldest, and is forgotten when empty."""
    class R:
        def __init__(self, name):
            self.name, self.history = name, History(1000, 1 << 20)
    forgotten = []
    cost = 100 + HISTORY_ENTRY_COST
    budget = HistoryBudget(2 * ROOM_COST + 6 * cost, forgotten.append)
    idle, busy = R("idle"), R("busy")
    for seq in range(1, 4):
        budget.added(idle, idle.history.append(seq, b"i" * 100))
    for seq in range(1, 4):
        budget.added(busy, busy.history.append(seq, b"b" * 100))
    assert budget.used == 2 * ROOM_COST + 6 * cost and not forgotten
    budget.added(busy, busy.history.append(4, b"b" * 100))
    assert len(idle.history) == 2 and len(busy.history) == 4
    for seq in range(5, 8):
        budget.added(busy, busy.history.append(seq, b"b" * 100))
    assert forgotten == [idle] and len(idle.history) == 0 and "idle" not in budget.by_activity
    assert budget.used <= budget.limit
    budget.removed(busy)
    assert budget.used == 0


def test_history_cost_constants_match_what_the_memory_is():
    """HISTORY_ENTRY_COST and ROOM_COST are not below what tracemalloc measures for them."""
    import tracemalloc
    cfg = parse_args([])
    tracemalloc.start()
    rooms = {}
    budget = HistoryBudget(1 << 40, lambda room: None)
    before = tracemalloc.get_traced_memory()[0]
    for i in range(200):
        room = rooms[f"room-{i}"] = Room(f"room-{i}", cfg, True)
        budget.added(room, room.history.append(1, b"x" * 10, b"client-id-0123456789:1"))
    per_room = (tracemalloc.get_traced_memory()[0] - before) / 200
    room = rooms["room-0"]
    before = tracemalloc.get_traced_memory()[0]
    for seq in range(2, 1002):
        room.history.append(seq, bytes(10), b"client-id-0123456789:%d" % seq)
    per_entry = (tracemalloc.get_traced_memory()[0] - before) / 1000
    tracemalloc.stop()
    key_bytes = len(b"client-id-0123456789:1000")
    assert per_entry - 10 - key_bytes <= HISTORY_ENTRY_COST, per_entry
    assert per_room - per_entry <= ROOM_COST, per_room


@pytest.mark.parametrize("name, ok", [
    ("alice", True), ("a", True), ("x" * 32, True), ("Zoë 2", True), ("", False), ("x" * 33, False),
    ("   ", False), ("tab\there", False), ("nul\x00", False), ("new\nline", False),
])
def test_valid_name(name, ok):
    """Names: 1-32 printable characters, not only spaces."""
    assert valid_name(name) is ok


# ---------------------------------------------------------------------------
# 2b. The bus's codecs and the chat's ordering, with bytes alone
# ---------------------------------------------------------------------------

def every_split(data: bytes):
    """data cut in two at every byte, and cut into single bytes."""
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]
    yield [data[i:i + 1] for i in range(len(data))]


RESP_REPLIES = (b"+OK\r\n-ERR wrong\r\n:42\r\n$-1\r\n*-1\r\n*0\r\n$0\r\n\r\n"
                b"$7\r\nhas\r\n\r\n\r\n*2\r\n:17\r\n*3\r\n$1\r\na\r\n$-1\r\n*1\r\n:-3\r\n"
                b"*3\r\n$7\r\nmessage\r\n$4\r\nroom\r\n$5\r\n1 t\nx\r\n")


def test_resp_parser_gives_the_same_replies_however_the_bytes_are_cut():
    """Nested arrays, nulls, errors, CR LF inside a bulk string: each byte parsed once, in any cut."""
    expected = None
    for chunks in every_split(RESP_REPLIES):
        parser = RespParser()
        replies = [r for chunk in chunks for r in parser.feed(chunk)]
        shown = [repr(r) if isinstance(r, RespError) else r for r in replies]
        expected = expected or shown
        assert shown == expected
        assert parser.stack == [] and parser.bulk == -1 and parser.pos == 0
    assert expected == ["OK", "RespError('ERR wrong')", 42, None, None, [], b"", b"has\r\n\r\n",
                        [17, [b"a", None, [-3]]], [b"message", b"room", b"1 t\nx"]]


def test_resp_parser_takes_a_large_bulk_string_in_many_reads_without_rescanning(seed):
    """A 4 MiB reply in 4 KiB reads: the buffer grows, the parser waits on the length it knows."""
    body = random.Random(seed).randbytes(4 << 20)
    data = b"*2\r\n:1\r\n$%d\r\n%s\r\n" % (len(body), body)
    parser = RespParser()
    replies = []
    for i in range(0, len(data), 4096):
        replies += parser.feed(data[i:i + 4096])
        if not replies:
            assert parser.bulk == len(body)     # known from the header on: no rescanning
    assert replies == [[1, body]]


def test_record_reader_gives_the_same_records_however_the_bytes_are_cut():
    records = [(Rec.MESSAGE, b"x" * 300), (Rec.ACK, ACK_HEAD.pack(b"0123456789abcdef", 7, True)), (Rec.STATS, b""),
               (Rec.SNAPSHOT, b"\x00" * 5)]
    data = b"".join(record(kind, body) for kind, body in records)
    for chunks in every_split(data):
        reader = RecordReader()
        assert [r for chunk in chunks for r in reader.feed(chunk)] == records
        assert reader.pos == 0 and not reader.buf


def test_snapshots_go_in_chunks_that_rebuild_the_history():
    """A room's snapshot in records of about a chunk each: first and last flagged, order on each."""
    payloads = [b"p%d" % i * (i * 10) for i in range(1, 30)]
    items = [(p, b"c:%d" % i if i % 2 else b"") for i, p in enumerate(payloads)]     # with resend keys
    epoch = new_epoch()
    recs = list(snapshot_records("r", epoch, 29, items, chunk=1000))
    assert len(recs) > 3
    parts = [parse_snapshot(RecordReader().feed(rec)[0][1]) for rec in recs]
    assert [flags for _, flags, _, _, _ in parts] == [1] + [0] * (len(parts) - 2) + [2]
    assert all(room == "r" and e == epoch and seq == 29 for room, _, e, seq, _ in parts)
    assert [p for *_, ps in parts for p, _ in ps] == payloads
    assert [item for *_, ps in parts for item in ps] == items
    assert all(sum(len(p) for p, _ in ps) <= 1000 or len(ps) == 1 for *_, ps in parts)
    (only,) = snapshot_records("r", epoch, 0, [])
    assert parse_snapshot(RecordReader().feed(only)[0][1]) == ("r", 3, epoch, 0, [])
    (leased,) = snapshot_records("r", epoch, 0, [], leased=True)
    assert parse_snapshot(RecordReader().feed(leased)[0][1])[1] == 7


def test_a_record_written_after_a_lazy_snapshot_arrives_after_all_of_it():
    """The supervisor writes a room's snapshot lazily (a chunk at a time as the link drains) and a
    REVOKE of the lease it carries right after: the REVOKE must not overtake it, while records of
    other rooms go at once."""
    loop = EventLoop()
    ours, theirs = socket.socketpair()
    try:
        link = Link(loop, ours, lambda data: None, lambda: None)
        items = [(b"m%d" % i * 400, b"") for i in range(300)]
        link.write_lazily("r", snapshot_records("r", new_epoch(), 300, items, chunk=4000, leased=True))
        link.write_after("r", record(Rec.REVOKE, b"r"))
        link.write_after("other", record(Rec.REVOKE, b"other"))
        theirs.setblocking(False)
        reader, got = RecordReader(), []
        for _ in range(10_000):
            link.flush()
            link.writing = False                # as the loop does once the socket is writable again
            with contextlib.suppress(BlockingIOError):
                while data := theirs.recv(1 << 20):
                    got += reader.feed(data)
            if not link.pending:
                break
        kinds = [(kind, body if kind == Rec.REVOKE else None) for kind, body in got]
        assert kinds[0] == (Rec.REVOKE, b"other")
        assert kinds[-1] == (Rec.REVOKE, b"r") and kinds[1:-1] == [(Rec.SNAPSHOT, None)] * (len(kinds) - 2)
        assert parse_snapshot(got[-2][1])[1] & 2, "the REVOKE came before the snapshot's last part"
    finally:
        ours.close()
        theirs.close()


def test_a_link_says_when_its_socket_is_full_each_time_it_fills():
    """Link.on_full (a worker's replica rings the supervisor with it): called whenever a flush
    leaves bytes the socket would not take, so the reader is asked again as long as the writer
    waits for it; never for a flush that sent everything, nor while the link waits to be writable."""
    loop = EventLoop()
    ours, theirs = socket.socketpair()
    fills = []
    try:
        link = Link(loop, ours, lambda data: None, lambda: None)
        link.on_full = lambda: fills.append(link.pending)
        link.write(b"x" * 100)
        link.flush()
        assert fills == [] and not link.pending
        theirs.setblocking(False)
        link.write(b"y" * (8 << 20))
        link.flush()
        link.flush()                                    # waiting for the socket: no second call
        assert fills == [True]
        refills = 1
        while link.pending:
            with contextlib.suppress(BlockingIOError):
                while theirs.recv(1 << 20):
                    pass
            link.on_event(selectors.EVENT_WRITE)        # as the loop does once the socket is writable
            refills += link.pending
        assert fills == [True] * refills and refills > 2
        link.write(b"z" * 100)
        link.flush()
        assert len(fills) == refills, "told of a fill when the socket took everything"
    finally:
        ours.close()
        theirs.close()


class RecordingBus:
    """The bus face of a remote bus, recording what the chat asks of it."""

    up = True

    def __init__(self, chat):
        self.chat, self.calls = chat, []

    def new_room(self, name):
        return Room(name, self.chat.config, False)

    def room_opened(self, room):
        self.calls.append(("opened", room.name))

    def room_unused(self, room, now):
        self.chat.linger(room, now)

    def report_members(self, room, count):
        """Heard, and nothing more (CountingBus records them)."""

    def sequenced_rooms(self):
        return 0

    def room_closed(self, room):
        self.calls.append(("closed", room.name))

    def resync(self, room):
        self.calls.append(("resync", room.name))
        room.syncing = True


class ListOutbox:
    """The chat's outbox, queueing frames in each Member's out list."""

    @staticmethod
    def send(conn, data: bytes) -> None:
        conn.out.append(data)

    @staticmethod
    def broadcast(members, frame: bytes) -> None:
        for conn in members:
            conn.out.append(frame)


def remote_chat(bus_class, *flags: str):
    """A Chat with the settings of flags, writing to a ListOutbox, on a bus_class (a remote bus's face)."""
    chat = Chat(parse_args(list(flags)), Stats(), ListOutbox())
    chat.bus = bus_class(chat)
    return chat, chat.bus


class Member:
    """What the chat layer knows of a connection (hashed by identity, like Connection)."""

    def __init__(self, name: str):
        self.out, self.out_bytes, self.name, self.room, self.replay, self.client = [], 0, name, None, None, b""



def texts(conn) -> list:
    """The JSON objects queued for conn (every frame is a small unmasked text frame)."""
    return [json.loads(FrameParser(expect_masked=False).feed(f)[0][1]) for f in conn.out]


def test_bus_messages_reach_members_once_in_seq_order_through_gaps_and_snapshots():
    """Messages before the snapshot wait; a gap asks for a resync; duplicates are dropped."""
    chat, bus = remote_chat(RecordingBus)
    alice = Member("alice")
    chat.join(alice, "r", None)
    room = chat.rooms["r"]
    assert bus.calls == [("opened", "r")] and not room.ready and alice.out == []
    payload = '{{"type":"message","room":"r","seq":{},"text":"m{}"}}'.format
    e = new_epoch()
    for seq in (5, 6):                                   # live, before the snapshot: held
        chat.on_bus_message("r", e, seq, payload(seq, seq).encode(), None)
    chat.on_snapshot("r", e, 4, [payload(s, s).encode() for s in range(1, 5)])
    assert [o["type"] for o in texts(alice)] == ["welcome", "message", "message"]
    assert texts(alice)[0]["seq"] == 4 and [o["seq"] for o in texts(alice)[1:]] == [5, 6]
    assert texts(alice)[0]["epoch"] == e.decode()
    chat.on_bus_message("r", e, 6, payload(6, 6).encode(), None)       # a duplicate
    chat.on_bus_message("r", e, 9, payload(9, 9).encode(), None)       # a gap: 7 and 8 missing
    assert bus.calls[-1] == ("resync", "r") and len(texts(alice)) == 3
    chat.on_bus_message("r", e, 10, payload(10, 10).encode(), None)    # held while syncing
    chat.on_snapshot("r", e, 9, [payload(s, s).encode() for s in range(5, 10)])
    assert [o["seq"] for o in texts(alice)[1:]] == [5, 6, 7, 8, 9, 10]
    late = Member("bob")                                 # resumes: replayed from history, then live
    chat.join(late, "r", 7, e)
    assert chat.replay(late, 1 << 20) is not None and late.replay is None
    chat.on_bus_message("r", e, 11, payload(11, 11).encode(), None)
    assert late in room.members and alice in room.members
    chat.leave(alice, 100.0)
    chat.leave(late, 100.0)
    assert bus.calls[-1] == ("resync", "r") and chat.lingering == {"r": room}   # still followed a while
    chat.close_idle(100.0 + chat.config.room_linger)
    assert bus.calls[-1] == ("closed", "r") and "r" not in chat.rooms and not chat.lingering


def test_a_new_order_on_the_bus_is_followed_never_taken_for_duplicates():
    """The sequencer's state of a room was lost (its Redis keys expired or were evicted): its next
    messages come as seq 1, 2, ... of a new epoch. Members get every one of them; a member still
    replaying the old order goes on with the new one from its first message; a joiner that names
    the old epoch with since gets the new order's history from its start."""
    chat, _ = remote_chat(RecordingBus)
    payload = '{{"type":"message","room":"r","epoch":"{}","seq":{}}}'.format
    old, new = new_epoch(), new_epoch()
    assert old < new and EPOCH.fullmatch(old.decode()) and EPOCH.fullmatch(new.decode())
    alice, bob = Member("alice"), Member("bob")
    chat.join(alice, "r", None)
    chat.on_snapshot("r", old, 3, [payload(old.decode(), s).encode() for s in (1, 2, 3)])
    chat.join(bob, "r", 0, old)                          # catching up on the old order
    room = chat.rooms["r"]
    assert bob in room.catching_up
    for s in (1, 2):
        chat.on_bus_message("r", new, s, payload(new.decode(), s).encode(), None)
    assert [(o["epoch"], o["seq"]) for o in texts(alice)[1:]] == [(new.decode(), 1), (new.decode(), 2)]
    assert room.epoch == new and room.seq == 2 and [s for s, _ in room.history.items()] == [1, 2]
    assert [json.loads(FrameParser(expect_masked=False).feed(f)[0][1])["seq"]
            for f in chat.replay(bob, 1 << 20)] == [1, 2] and bob in room.members
    carol = Member("carol")
    chat.join(carol, "r", 3, old)                        # since counts in an order that ended
    assert texts(carol)[0]["epoch"] == new.decode() and carol.replay == 1
    dave = Member("dave")
    chat.join(dave, "r", 2, new)                         # since in the room's order: nothing to replay
    assert dave in room.members


def test_a_snapshot_merges_what_came_meanwhile_in_the_order_it_came():
    """While a snapshot is on its way, messages wait in the order they came: those of the room's
    own order that precede a new one go first, then the snapshot's, then a newer order."""
    chat, bus = remote_chat(RecordingBus)
    payload = '{{"type":"message","room":"r","epoch":"{}","seq":{}}}'.format
    e1, e2, e3 = new_epoch(), new_epoch(), new_epoch()
    alice = Member("alice")
    chat.join(alice, "r", None)
    chat.on_snapshot("r", e1, 2, [payload(e1.decode(), s).encode() for s in (1, 2)])
    chat.on_bus_message("r", e1, 4, payload(e1.decode(), 4).encode(), None)   # a gap: resync
    assert bus.calls[-1] == ("resync", "r")
    for e, s in ((e1, 5), (e2, 1), (e2, 2), (e3, 1)):
        chat.on_bus_message("r", e, s, payload(e.decode(), s).encode(), None)
    chat.on_snapshot("r", e2, 1, [payload(e2.decode(), 1).encode()])
    got = [(o["epoch"], o["seq"]) for o in texts(alice)[1:]]
    assert got == [(e1.decode(), 4), (e1.decode(), 5), (e2.decode(), 1), (e2.decode(), 2), (e3.decode(), 1)]
    bob = Member("bob")                                   # a fresh room: what the snapshot replaced is dropped
    chat.join(bob, "q", None)
    chat.on_bus_message("q", e1, 9, payload(e1.decode(), 9).encode(), None)
    chat.on_bus_message("q", e2, 3, payload(e2.decode(), 3).encode(), None)
    chat.on_snapshot("q", e2, 2, [payload(e2.decode(), s).encode() for s in (1, 2)])
    assert [(o["type"], o.get("epoch"), o["seq"]) for o in texts(bob)] == [
        ("welcome", e2.decode(), 2), ("message", e2.decode(), 3)]


def test_a_room_left_lingers_so_a_member_coming_back_costs_no_snapshot():
    """With a remote bus, a room whose last member here left stays followed for --room-linger
    seconds: a member joining again is welcomed at once, without a new subscription or snapshot.
    Idle rooms are let go once they lingered that long, the oldest first past LINGER_ROOMS, and
    when the history budget takes their last message."""
    chat, bus = remote_chat(RecordingBus, "--room-linger", "5", "--history-bytes", "200000")
    payload = '{{"type":"message","room":"r","epoch":"0123456789abcdef","seq":{}}}'.format
    alice = Member("alice")
    chat.join(alice, "r", None)
    chat.on_snapshot("r", b"0123456789abcdef", 1, [payload(1).encode()])
    chat.leave(alice, 10.0)
    assert "r" in chat.rooms and chat.active_rooms() == 0
    for churn in range(50):                               # a join and leave loop
        bob = Member(f"bob{churn}")
        chat.join(bob, "r", None)
        assert [o["type"] for o in texts(bob)] == ["welcome"] and texts(bob)[0]["seq"] == 1
        chat.leave(bob, 11.0)
    assert bus.calls == [("opened", "r")]                 # one subscription, one snapshot
    chat.close_idle(15.9)
    assert "r" in chat.rooms
    chat.close_idle(16.0)
    assert bus.calls[-1] == ("closed", "r") and "r" not in chat.rooms
    for i in range(LINGER_ROOMS + 2):                     # too many idle rooms: the oldest go
        m = Member(f"m{i}")
        chat.join(m, f"q{i}", None)
        chat.on_snapshot(f"q{i}", b"", 0, [])
        chat.leave(m, 20.0)
    assert len(chat.lingering) == LINGER_ROOMS and "q0" not in chat.rooms and "q1" not in chat.rooms
    big = '{{"type":"message","room":"q9","epoch":"0123456789abcdef","seq":{},"x":"{}"}}'.format
    chat.on_bus_message("q9", b"0123456789abcdef", 1, big(1, "x" * 150000).encode(), None)
    chat.on_bus_message("q8", b"0123456789abcdef", 1, big(1, "x" * 150000).encode(), None)
    assert "q9" not in chat.rooms and ("closed", "q9") in bus.calls   # its history went to the budget


class CountingBus(RecordingBus):
    """A remote bus that records member-count reports."""

    def report_members(self, room, count):
        self.calls.append(("members", room.name, count))


def test_member_counts_visit_only_rooms_whose_count_moved():
    """The once-a-second member count pass reports and frames the rooms that changed, and
    nothing else: 2,000 idle rooms cost it nothing."""
    chat, bus = remote_chat(CountingBus, "--room-linger", "0")
    members = [Member(f"m{i}") for i in range(2000)]
    for i, m in enumerate(members):
        chat.join(m, f"r{i}", None)
        chat.on_snapshot(f"r{i}", b"", 0, [])
    assert len(list(chat.member_count_frames())) == 2000
    assert sum(c[0] == "members" for c in bus.calls) == 2000
    bus.calls.clear()
    assert list(chat.member_count_frames()) == [] and bus.calls == [] and chat.recount == {}
    late = Member("late")
    chat.join(late, "r7", None)
    chat.on_members("r9", 5)                            # 4 members elsewhere
    chat.leave(members[11])                             # r11 is forgotten: the bus heard of it
    frames = {room.name: json.loads(frame[2:]) for room, frame in chat.member_count_frames()}
    assert frames == {"r7": {"type": "members", "room": "r7", "count": 2},
                      "r9": {"type": "members", "room": "r9", "count": 5}}
    assert bus.calls == [("closed", "r11"), ("members", "r7", 2)]
    assert list(chat.member_count_frames()) == []


def test_an_older_member_total_arriving_after_a_newer_one_is_ignored():
    """Redis numbers each room total; one can come in the answer to this process's report after a
    newer one came on the room's channel (two links): the newest stays. Without a version (the
    supervisor's one ordered link) every total applies."""
    chat, _ = remote_chat(CountingBus, "--room-linger", "0")
    here = [Member(f"m{i}") for i in range(2)]
    for m in here:
        chat.join(m, "r", None)
    chat.on_snapshot("r", b"", 0, [], members=3, members_version=100)
    list(chat.member_count_frames())                    # reports the 2 here
    chat.on_members("r", 7, 300)                        # on the channel: another process's report
    chat.on_members("r", 5, 200)                        # the answer to ours, sent before it
    counts = [json.loads(frame[2:])["count"] for _, frame in chat.member_count_frames()]
    assert counts == [7] and chat.rooms["r"].others == 5
    chat.on_members("r", 7, 300)                        # the same total again: nothing moves
    assert list(chat.member_count_frames()) == []
    chat.on_members("r", 4)                             # no version: the latest by its link's order
    assert [json.loads(frame[2:])["count"] for _, frame in chat.member_count_frames()] == [4]


# ---------------------------------------------------------------------------
# 3. The server end to end, over real sockets
# ---------------------------------------------------------------------------

STATIC = pathlib.Path(__file__).parent / "static"
WS_HEADERS = ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
QUIET = ("--ping-interval", "60")          # no stray pings between the frames a test reads


@pytest.fixture(scope="module")
def chat_server(serve_shared):
    """One server with default limits for the tests that need nothing special (a room each)."""
    return serve_shared(*QUIET)


@pytest.fixture
def server_with(serve):
    """A fresh server started with the settings a test passes: server_with("--history", "3")."""
    return functools.partial(serve, *QUIET)


def join(server, room: str, query: str = "", **options) -> RawClient:
    """A raw WebSocket client in room; its welcome frame is already read."""
    return RawClient(server.port, f"/ws/{room}" + (f"?{query}" if query else ""), **options)


@contextlib.contextmanager
def library_client(url: str):
    """A websockets client (no proxy, no pings of its own) past its welcome frame."""
    with connect(url, proxy=None, ping_interval=None, max_size=None, open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "welcome"
        yield ws


def closed_with(ws) -> int:
    """Read a websockets client until the server closes it; the close code received."""
    with pytest.raises((ConnectionClosedOK, ConnectionClosedError)):
        while True:
            ws.recv(timeout=5)
    return ws.close_code


def next_message(recv) -> dict:
    """The next frame that is not a member-count notice or an ack, from a library's recv."""
    while (obj := json.loads(recv(timeout=5)))["type"] in ("members", "ack"):
        pass
    return obj


def chat(client: RawClient, text: str, message_id: int) -> None:
    """Send one chat message."""
    client.send(chat_frame(text, message_id))


def seqs_of(client: RawClient, n: int) -> list:
    """The seqs of the next n message frames."""
    return [client.recv_json()["seq"] for _ in range(n)]


# welcome.limits of a server with default settings: what --rate-limit and the others default to.
DEFAULT_LIMITS = {"rate": 50.0, "burst": 100.0, "rate_bytes": 65536, "burst_bytes": 1 << 20,
                  "max_message_size": 65536}


def test_welcome_announces_the_limits_the_connection_is_held_to():
    """welcome.limits says the settings the connection's buckets use, whatever they are, on
    every welcome (a resume's too), so a client can pace what it sends within them."""
    flags = ["--rate-limit", "7.5", "--rate-burst", "3", "--rate-limit-bytes", "5000",
             "--rate-burst-bytes", str(6 * 1000 + 1024), "--max-message-size", "1000"]
    chat = Chat(parse_args(flags), Stats(), ListOutbox())
    alice, again = Member("alice"), Member("alice")
    chat.join(alice, "r", None)
    chat.join(again, "r", 0)
    expected = {"rate": 7.5, "burst": 3.0, "rate_bytes": 5000, "burst_bytes": 7024, "max_message_size": 1000}
    assert texts(alice)[0]["limits"] == texts(again)[0]["limits"] == expected
    assert parse_args([]).rate_limit == DEFAULT_LIMITS["rate"]      # the defaults the next test expects


def test_welcome_message_and_server_assigned_sender(chat_server):
    """welcome, then message frames to every member, the sender set by the server."""
    alice = join(chat_server, "t-welcome", "name=alice")
    epoch = alice.welcome["epoch"]
    assert EPOCH.fullmatch(epoch)
    assert alice.welcome == {"type": "welcome", "room": "t-welcome", "name": "alice", "epoch": epoch,
                             "seq": 0, "members": 1, "oldest": 1, "limits": DEFAULT_LIMITS}
    guest = join(chat_server, "t-welcome")
    assert re.fullmatch(r"guest-\d+", guest.welcome["name"]) and guest.welcome["members"] == 2
    alice.send_json({"message_id": 42, "text": "hello", "sent_at": "2026-11-28T10:00:00.123456Z",
                     "sender": guest.welcome["name"], "room": "elsewhere"})
    expected = {"type": "message", "room": "t-welcome", "epoch": epoch, "seq": 1, "sender": "alice",
                "message_id": 42, "text": "hello", "sent_at": "2026-11-28T10:00:00.123456Z"}
    assert alice.recv_json() == expected == guest.recv_json()
    assert alice.recv_json(skip=("members",)) == {"type": "ack", "message_id": 42, "epoch": epoch, "seq": 1}
    guest.send_json({"text": "hi"})             # no message_id: nothing to acknowledge
    expected = {"type": "message", "room": "t-welcome", "epoch": epoch, "seq": 2, "sender": guest.welcome["name"],
                "message_id": None, "text": "hi", "sent_at": None}
    assert alice.recv_json() == expected == guest.recv_json()


def test_guest_names_are_distinct(chat_server):
    """Every connection without a name gets a name of its own."""
    names = {join(chat_server, "t-guests").welcome["name"] for _ in range(5)}
    assert len(names) == 5


def test_every_member_sees_one_order(chat_server):
    """Interleaved senders: every member gets the same seq 1..n order, each sender's in its order."""
    members = [join(chat_server, "t-order", f"name=m{i}") for i in range(3)]
    for k in range(10):
        for i, m in enumerate(members):
            chat(m, f"{i}:{k}", k)
    seen = [[(f["seq"], f["sender"], f["message_id"]) for f in (m.recv_json() for _ in range(30))]
            for m in members]
    assert seen[0] == seen[1] == seen[2]
    assert [s for s, _, _ in seen[0]] == list(range(1, 31))
    for i in range(3):
        assert [mid for _, sender, mid in seen[0] if sender == f"m{i}"] == list(range(10))


def test_error_frames_keep_the_connection_open(chat_server):
    """Refused frames get error frames (with message_id when known); the connection goes on."""
    c = join(chat_server, "t-errors")
    c.send(frame(OP_TEXT, b"not json"))
    assert c.recv_json() == {"type": "error", "code": "bad_json", "reason": "frame is not valid JSON"}
    for refused, code in (({"message_id": 3}, "missing_text"), ({"message_id": 4, "text": "x" * 65537}, "too_big")):
        c.send_json(refused)
        error = c.recv_json()
        assert (error["type"], error["code"], error["message_id"]) == ("error", code, refused["message_id"])
    chat(c, "still here", 5)
    assert c.recv_json()["seq"] == 1


def test_since_replays_without_gap_or_duplicate(chat_server):
    """since=<seq> replays what follows it, then goes live; since at or past the end replays nothing."""
    writer = join(chat_server, "t-since")
    for k in range(5):
        chat(writer, f"m{k}", k)
    assert seqs_of(writer, 5) == [1, 2, 3, 4, 5]
    readers = {since: join(chat_server, "t-since", f"since={since}") for since in (0, 2, 5, 99)}
    chat(writer, "live", 5)
    assert seqs_of(readers[0], 6) == [1, 2, 3, 4, 5, 6]
    assert seqs_of(readers[2], 4) == [3, 4, 5, 6]
    assert seqs_of(readers[5], 1) == seqs_of(readers[99], 1) == [6]
    assert readers[2].welcome["seq"] == 5


def test_since_during_traffic_loses_nothing(chat_server):
    """A member joining with since=0 while messages flow gets each seq exactly once."""
    writer = join(chat_server, "t-since-live")

    def send_all():
        for k in range(60):
            chat(writer, f"m{k}", k)
            time.sleep(0.001)
    sender = threading.Thread(target=send_all)
    sender.start()
    time.sleep(0.02)
    reader = join(chat_server, "t-since-live", "since=0")
    got = seqs_of(reader, 60)
    sender.join()
    assert got == list(range(1, 61))


def test_history_is_bounded(server_with):
    """--history N keeps the last N messages; welcome.oldest says where replay starts."""
    server = server_with("--history", "3")
    writer = join(server, "t-history")
    for k in range(6):
        chat(writer, f"m{k}", k)
    assert seqs_of(writer, 6) == list(range(1, 7))
    reader = join(server, "t-history", "since=0")
    assert (reader.welcome["seq"], reader.welcome["oldest"]) == (6, 4)
    assert seqs_of(reader, 3) == [4, 5, 6]


@pytest.mark.parametrize("request_text, status, header", [
    (f"GET /ws/bad%20room HTTP/1.1\r\nHost: x\r\n{WS_HEADERS}\r\n", 400, None),
    (f"GET /ws/ HTTP/1.1\r\nHost: x\r\n{WS_HEADERS}\r\n", 400, None),
    (f"GET /ws/{'a' * 65} HTTP/1.1\r\nHost: x\r\n{WS_HEADERS}\r\n", 400, None),
    (f"GET /ws/a/b HTTP/1.1\r\nHost: x\r\n{WS_HEADERS}\r\n", 400, None),
    (f"GET /ws/r?name=%00 HTTP/1.1\r\nHost: x\r\n{WS_HEADERS}\r\n", 400, None),
    (f"GET /ws/r?name={'x' * 33} HTTP/1.1\r\nHost: x\r\n{WS_HEADERS}\r\n", 400, None),
    (f"GET /ws/r?name=%20%20 HTTP/1.1\r\nHost: x\r\n{WS_HEADERS}\r\n", 400, None),
    *[(f"GET /ws/r?since={v} HTTP/1.1\r\nHost: x\r\n{WS_HEADERS}\r\n", 400, None)
      for v in ("-1", "abc", "9" * 20, "", "1.5")],
    (f"GET /ws HTTP/1.1\r\n{WS_HEADERS}\r\n", 400, None),
    ("GARBAGE\r\n\r\n", 400, None),
    ("GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404, None),
    (f"POST /ws HTTP/1.1\r\nHost: x\r\n{WS_HEADERS}\r\n", 405, ("allow", "GET")),
    ("DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 405, ("allow", "GET, HEAD")),
    ("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", 426, ("upgrade", "websocket")),
    (f"GET /ws HTTP/1.1\r\nHost: x\r\n{WS_HEADERS.replace('Version: 13', 'Version: 8')}\r\n", 426,
     ("sec-websocket-version", "13")),
    (f"GET /ws HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 9000}\r\n{WS_HEADERS}\r\n", 431, None),
    (f"GET /ws HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 9000}", 431, None),
], ids=lambda v: v.split("\r\n")[0][:40] if isinstance(v, str) else None)
def test_http_refusals(chat_server, request_text, status, header):
    """Bad requests get their status before any upgrade, and the headers that status needs."""
    got, headers, _ = http(chat_server.port, request_text.encode())
    assert got == status
    if header:
        assert headers[header[0]] == header[1]


def test_static_files(chat_server):
    """The demo client at / and /static/, HEAD without a body, a CSP on the page."""
    index = (STATIC / "index.html").read_bytes()
    status, headers, body = get(chat_server.port, "/")
    assert (status, body) == (200, index)
    assert headers["content-type"].startswith("text/html") and "default-src 'self'" in headers[
        "content-security-policy"]
    status, headers, body = get(chat_server.port, "/", method="HEAD")
    assert (status, headers["content-length"], body) == (200, str(len(index)), b"")
    status, headers, body = get(chat_server.port, "/static/app.js")
    assert (status, body) == (200, (STATIC / "app.js").read_bytes())
    assert headers["content-type"].startswith("text/javascript")


def test_healthz(chat_server):
    """/healthz is 200 while the server accepts connections."""
    status, _, body = get(chat_server.port, "/healthz")
    assert status == 200 and body.startswith(b"ok\n")


def test_sigterm_drains_with_1001_and_exits_in_time(server_with):
    """SIGTERM: 1001 to every client, /healthz 503 and no upgrades while draining, exit by the timeout."""
    server = server_with("--drain-timeout", "1", "--close-timeout", "30")
    with library_client(server.url) as polite:
        stubborn = join(server, "t-drain")     # reads, but never answers the Close
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert stubborn.recv_close_code() == 1001
        assert closed_with(polite) == 1001
        status, _, body = get(server.port, "/healthz")
        assert status == 503 and body.startswith(b"draining\n")
        assert get(server.port, "/ws", WS_HEADERS)[0] == 503
        assert server.proc.wait(5) == 0
        assert time.monotonic() - start < 1 + 1.0
        assert stubborn.closed_by_server(0.5)


def test_sigterm_exits_once_clients_are_gone(server_with):
    """When every client answers the 1001, the process exits at once."""
    server = server_with("--drain-timeout", "10")
    with library_client(server.url) as a, library_client(server.url) as b:
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert closed_with(a) == closed_with(b) == 1001
        assert server.proc.wait(5) == 0
        assert time.monotonic() - start < 2.0


def test_max_message_size(server_with):
    """A text of exactly the maximum passes, even fully escaped; a frame too big for one is 1009
    before its payload is sent."""
    limit = 1000
    server = server_with("--max-message-size", str(limit))
    c = join(server, "t-size")
    for k, text in enumerate(("\x01" * limit, "é" * (limit // 2), "€" * (limit // 3))):
        c.send_json({"message_id": k, "text": text})
        assert c.recv_json()["text"] == text
    chat(c, "x" * (limit + 1), 7)
    assert c.recv_json()["code"] == "too_big"
    padded = json.dumps({"message_id": 8, "text": "x"}).encode()
    c.send(frame(OP_TEXT, padded[:-1] + b" " * (max_frame_size(limit) - len(padded)) + b"}"))
    assert c.recv_json()["text"] == "x"
    for length in (max_frame_size(limit) + 1, 1 << 40):
        c = join(server, "t-size")
        c.send(frame(OP_TEXT, length=length))       # the header alone
        assert c.recv_close_code() == 1009
        c.send(close_frame(1009))
        assert c.closed_by_server()


def test_slow_consumer_is_cut_off_while_others_keep_receiving(server_with):
    """A client that stops reading gets 1013 at a frame boundary, the others lose nothing, and
    since=<seq> brings the cut-off client back without loss."""
    # History must hold what the kernel buffers took past the cut, for since= to bring it back.
    server = server_with("--max-buffer", str(256 << 10), "--rate-limit", "0", "--rate-limit-bytes", "0",
                         "--room-history-bytes", str(64 << 20))
    # A small receive window keeps the kernel from absorbing much for the slow client.
    slow = join(server, "t-slow", rcvbuf=64 << 10)  # never reads until it has been cut off
    sender = join(server, "t-slow")                 # reads each batch: a quarter of the cap
    text, sent, cut = "x" * (16 << 10), 0, False
    while not cut and sent < 2400:                  # bounded: ~38 MB at most
        for _ in range(4):
            sent += 1
            chat(sender, text, sent)
        assert seqs_of(sender, 4) == list(range(sent - 3, sent + 1))
        cut = sample(scrape(server.metrics_url), "scalechat_dropped_clients_total", reason="slow_consumer") == 1
    assert cut, "the slow client was never cut off"
    chat(sender, "after the cut", sent + 1)
    assert seqs_of(sender, 1) == [sent + 1]
    got = []
    while (f := slow.recv_frame())[0] != OP_CLOSE:
        message = json.loads(f[1])
        if message["type"] == "message":
            got.append(message["seq"])
    assert struct.unpack("!H", f[1][:2])[0] == 1013
    assert got == list(range(1, len(got) + 1)) and len(got) < sent
    back = join(server, "t-slow", f"since={got[-1]}")
    assert seqs_of(back, sent + 1 - len(got)) == list(range(len(got) + 1, sent + 2))


def test_cut_off_never_splits_a_frame(server_with):
    """A frame larger than the kernel takes at once, then the cut-off: frames stay whole."""
    kernel_buffer = int(pathlib.Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    size = kernel_buffer + (2 << 20)
    server = server_with("--max-buffer", str(64 << 10), "--max-message-size", str(size), "--rate-limit", "0",
                         "--rate-limit-bytes", "0")
    c = join(server, "t-split", rcvbuf=8192)
    chat(c, "x" * size, 1)
    time.sleep(0.3)                                 # the server tries to send it before we read
    frames = []
    while (f := c.recv_frame())[0] != OP_CLOSE:
        frames.append(json.loads(f[1])["type"])
    assert "message" in frames and struct.unpack("!H", f[1][:2])[0] == 1013


def test_metrics_counters_move(server_with):
    """The metrics endpoint counts connections, messages, deliveries, bytes, errors and requests."""
    server = server_with()
    before = scrape(server.metrics_url)
    a, b = join(server, "t-metrics"), join(server, "t-metrics")
    for k in range(3):
        chat(a, f"m{k}", k)
    assert seqs_of(a, 3) == seqs_of(b, 3) == [1, 2, 3]
    assert get(server.port, "/nope")[0] == 404
    c = join(server, "t-metrics")
    c.send(frame(OP_BINARY, b"\x00"))
    assert c.recv_close_code() == 1003
    after = scrape(server.metrics_url)
    expected = {
        "scalechat_connections": 2, "scalechat_rooms": 1,
        "scalechat_connections_accepted_total": 3, "scalechat_messages_received_total": 3,
        "scalechat_deliveries_total": 6, "scalechat_broadcast_seconds_count": 3,
        'scalechat_protocol_errors_total{code="1003"}': 1,
        'scalechat_refused_total{reason="not_found"}': 1,
        'scalechat_http_requests_total{status="404"}': 1,
        'scalechat_http_requests_total{status="101"}': 3,
    }
    assert {k: after.get(k) for k in expected} == expected
    assert before["scalechat_connections_accepted_total"] == 0
    for name in ("scalechat_bytes_received_total", "scalechat_bytes_sent_total"):
        assert after[name] > before[name] + 3 * 30
    # The process's own resident memory, as /proc tells it (read just after: within 20 %).
    assert 0.8 < after["process_resident_memory_bytes"] / (rss_kib(server.proc.pid) * 1024) < 1.25
    assert "scalechat_info" in sample_names(after)


# ---------------------------------------------------------------------------
# 4. Interop with independent client libraries
# ---------------------------------------------------------------------------

# Texts whose client frames fall in each length class: 7-bit, 16-bit, 64-bit (the limit).
# Text sizes (bytes of UTF-8) whose chat frames fall in each length class of RFC 6455 5.2.
TEXT_SIZES = [pytest.param(size, length_class, id=f"{size}-{length_class}") for size, length_class in
              ((1, "7-bit"), (60, "7-bit"), (100, "16-bit"), (65000, "16-bit"), (65536, "64-bit"))]


def sized_text(n: int) -> str:
    """A text of n UTF-8 bytes, mostly two-byte characters."""
    return "é" * (n // 2) + "a" * (n % 2)


def length_class(payload: bytes) -> str:
    """The length field a frame of this payload needs: 7-bit (< 126), 16-bit or 64-bit."""
    return "7-bit" if len(payload) < 126 else "16-bit" if len(payload) < 65536 else "64-bit"


@pytest.mark.parametrize("size, frame_class", TEXT_SIZES)
def test_websockets_library_text_sizes(chat_server, size, frame_class):
    """The websockets client sends and receives text of every length class, up to the limit."""
    assert length_class(chat_json(sized_text(size))) == frame_class
    with library_client(f"{chat_server.url}/i-websockets-{size}") as ws:
        ws.send(chat_json(sized_text(size)).decode())
        message = next_message(ws.recv)
        assert (message["text"], message["seq"]) == (sized_text(size), 1)


@pytest.mark.parametrize("size, frame_class", TEXT_SIZES)
def test_websocket_client_library_text_sizes(chat_server, size, frame_class):
    """websocket-client does the same."""
    assert length_class(chat_json(sized_text(size))) == frame_class
    ws = websocket.create_connection(f"{chat_server.url}/i-wsclient-{size}", timeout=5)
    try:
        assert json.loads(ws.recv())["type"] == "welcome"
        ws.send(chat_json(sized_text(size)).decode())
        assert next_message(lambda timeout: ws.recv())["text"] == sized_text(size)
    finally:
        ws.close()


def test_websockets_library_fragments_ping_and_close(chat_server):
    """Fragmented send, ping/pong, an empty text refused, and the client's close code echoed."""
    with library_client(f"{chat_server.url}/i-frag") as ws:
        ws.send(iter(['{"message_id": 1, ', '"text": "in three ', 'fragments"}']))
        assert next_message(ws.recv)["text"] == "in three fragments"
        assert ws.ping(b"are you there").wait(5)
        ws.send(chat_json("").decode())
        assert next_message(ws.recv)["code"] == "missing_text"
        ws.close(4000, "bye")
        assert ws.close_code == 4000


@pytest.mark.parametrize("payload, code", [
    pytest.param(b"\x00\x01", 1003, id="binary-1003"),
    pytest.param("x" * (max_frame_size(65536) + 1), 1009, id="too-big-1009"),
])
def test_websockets_library_sees_server_close_codes(chat_server, payload, code):
    """The server's close codes reach the library."""
    with library_client(f"{chat_server.url}/i-codes") as ws:
        ws.send(payload)
        assert closed_with(ws) == code


def websocket_client_close_code(ws) -> int:
    """Read a websocket-client connection up to the server's Close; its status code."""
    while (reply := ws.recv_data(control_frame=True))[0] != websocket.ABNF.OPCODE_CLOSE:
        pass
    ws.shutdown()
    return struct.unpack("!H", reply[1][:2])[0]


def test_websocket_client_library_fragments_ping_and_close(chat_server):
    """websocket-client: fragments with a ping between them, pong payload, close codes both ways."""
    ws = websocket.create_connection(f"{chat_server.url}/i-wsclient-frag", timeout=5)
    json.loads(ws.recv())
    ws.send_frame(websocket.ABNF.create_frame('{"message_id": 1, "text": "fr', websocket.ABNF.OPCODE_TEXT, 0))
    ws.ping("between")
    ws.send_frame(websocket.ABNF.create_frame('agmented"}', websocket.ABNF.OPCODE_CONT, 1))
    assert ws.recv_data(control_frame=True) == (websocket.ABNF.OPCODE_PONG, b"between")
    assert next_message(lambda timeout: ws.recv())["text"] == "fragmented"
    ws.send_close(4001, b"bye")
    assert websocket_client_close_code(ws) == 4001
    bad = websocket.create_connection(f"{chat_server.url}/i-wsclient-utf8", timeout=5)
    json.loads(bad.recv())
    bad.send(b'{"text": "\xff"}', opcode=websocket.ABNF.OPCODE_TEXT)
    assert websocket_client_close_code(bad) == 1007


# ---------------------------------------------------------------------------
# 6. The garbage collector: no reference cycles, pauses measured, survivors frozen
# ---------------------------------------------------------------------------

@pytest.fixture
def in_process_server():
    """A Server on a thread of this process, so its objects can be inspected."""
    port = free_port()
    server = Server(parse_args(["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
                                "--log-level", "ERROR", "--handshake-timeout", "0.5",
                                "--close-timeout", "0.5"]))
    server.port = port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.request_stop()
    server.request_stop()
    thread.join(10)
    assert not thread.is_alive()
    gc.unfreeze()


def wait_for(predicate, timeout: float = 10.0) -> None:
    """Poll until predicate() is true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_open_descriptors_are_counted_without_listing_them():
    """The metrics' open-descriptor count of a process matches its /proc/<pid>/fd listing, and
    follows 300 more sockets (on Linux 6.2+ it is read as the folder's size: a scrape does not
    list 20,000 fds). Counted in idle child processes, so no thread opens one meanwhile."""
    code = ("import socket, sys, time\n"
            "socks = [socket.socket() for _ in range(int(sys.argv[1]))]\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    counts = []
    for n in (0, 300):
        child = subprocess.Popen([sys.executable, "-c", code, str(n)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline() == "ready\n"
            counts.append(open_fds(child.pid))
            assert counts[-1] == len(os.listdir(f"/proc/{child.pid}/fd"))
        finally:
            child.kill()
            child.wait()
    assert counts[1] == counts[0] + 300


class IdleConn:
    """An open, quiet connection as the ping sweep reads it; counts the sweep's visits."""

    visits = 0

    keepalive = Connection.keepalive

    def __init__(self, last_seen: float):
        self.last_seen, self.ping_sent, self._state = last_seen, 0.0, OPEN

    @property
    def state(self) -> int:
        IdleConn.visits += 1
        return self._state


def test_ping_sweep_visits_each_connection_once_per_period_not_per_second():
    """With --ping-interval 120 and --pong-timeout 60, the sweep looks at each of 30,000
    connections once per 15 s (a quarter of the shorter interval), 2,000 a tick, not a
    quarter of them every second; a connection silent past the interval is pinged within
    that period, and one that never answers is dropped within it after the pong timeout."""
    server = Server(parse_args(["--host", "127.0.0.1", "--port", str(free_port()), "--metrics-port", "0",
                                "--ping-interval", "120", "--pong-timeout", "60"]))
    try:
        assert (server.sweep_tick, server.sweep_period) == (1.0, 15.0)
        pinged, aborted = [], []
        server.send = lambda conn, data: pinged.append(conn)
        server._abort = aborted.append
        now = server.now
        server.connections.all = {fd: IdleConn(now - (121 if fd % 1000 == 0 else 1)) for fd in range(30000)}
        IdleConn.visits = 0
        for tick in range(15):
            server._sweep()
            assert IdleConn.visits == 2000 * (tick + 1)
        assert len(pinged) == 30 and {c.last_seen for c in pinged} == {now - 121}
        server.now += 61                                # nobody answered its ping
        for _ in range(15):
            server._sweep()
        assert aborted == pinged and IdleConn.visits == 60000
    finally:
        server.listener.close()
        server.sel.close()


def test_released_connections_form_no_reference_cycles(in_process_server):
    """Connections that end in every way the server knows are freed by reference counting
    alone: none of their objects is left for the cyclic collector. --gc-freeze relies on it,
    since a frozen object in a cycle would never be freed."""
    server = in_process_server
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        clients = [join(server, f"t-cycles-{k % 3}", f"name=u{k}") for k in range(12)]
        for k, c in enumerate(clients):
            chat(c, f"hello {k}", 1)
        for c in clients:
            seqs_of(c, 1)
        clients[0].send(frame(OP_TEXT, b"not json"))           # refused with an error frame
        while clients[0].recv_json()["type"] != "error":       # past the room's other messages
            pass
        assert get(server.port, "/ws", "Upgrade: websocket\r\n")[0] == 426      # no version
        for c in clients[:4]:                                   # a clean closing handshake
            c.send(close_frame(1000))
            assert c.closed_by_server()
        for c in clients[4:7]:                                  # protocol errors
            c.send(frame(OP_BINARY, b"\x00"))
            assert c.recv_close_code() == 1003
        for c in clients[7:]:                                   # vanished peers
            c.sock.close()
        idle = socket.create_connection(("127.0.0.1", server.port))     # never sends a request
        assert get(server.port, "/nope")[0] == 404
        assert get(server.port, "/")[0] == 200
        c = server.connections
        wait_for(lambda: not c.all and not c.handshaking and not c.closing)
        idle.close()
        gc.collect()
        ours = (Connection, FrameParser, Room, Histogram)
        leaked = [type(o).__name__ for o in gc.garbage if isinstance(o, ours)]
        assert leaked == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_full_collection_is_timed_and_its_survivors_frozen(in_process_server):
    """Each collection's pause is observed by generation; after a full one, the loop freezes
    what survived (and says how much) on its next turn."""
    server = in_process_server
    a = join(server, "t-freeze")
    before = server.stats.gc2.count
    gc.collect()
    assert server.stats.gc2.count == before + 1
    assert server.stats.gc2.total > 0
    chat(a, "wake the loop", 1)                               # a turn runs after the collection
    seqs_of(a, 1)
    wait_for(lambda: server.stats.gc_frozen > 0)
    assert gc.get_freeze_count() > 0
    assert not server.gc_watch.freeze_due
    chat(a, "still serving", 2)
    assert seqs_of(a, 1) == [2]


def test_a_bug_met_serving_one_connection_closes_it_with_1011_and_the_loop_goes_on(in_process_server,
                                                                                   caplog):
    """The exception barrier: the connection that triggered an exception is closed with 1011,
    the exception is counted and logged with its traceback, everyone else is served."""
    server = in_process_server
    receive = server.chat.receive

    def buggy_receive(conn, payload, t0):
        if b"boom" in payload:
            raise KeyError("a bug")
        return receive(conn, payload, t0)
    server.chat.receive = buggy_receive
    victim, bystander = join(server, "t-barrier"), join(server, "t-barrier")
    for _ in range(2):                                  # twice: logged once, counted twice
        victim.send(chat_frame("boom", 1))
        assert victim.recv_close_code() == CLOSE_INTERNAL_ERROR
        victim = join(server, "t-barrier")
    chat(bystander, "still here", 2)
    assert [m["text"] for m in (bystander.recv_json(), victim.recv_json())] == ["still here"] * 2
    assert server.stats.internal_errors == 2
    logged = [r for r in caplog.records if r.getMessage().startswith("internal error")]
    assert len(logged) == 1 and logged[0].exc_info[0] is KeyError


def test_the_parser_stops_at_the_frames_its_owner_can_pay_for():
    """frame_limit: a flood of empty fragments is refused with 1008 after that many frames,
    not after the whole read (the server sets it from the connection's rate-limit tokens)."""
    flood = encode_frame(OP_TEXT, b"{", fin=False, mask_key=RFC_KEY) + \
        encode_frame(OP_CONTINUATION, b"", fin=False, mask_key=RFC_KEY) * 100_000
    parser = FrameParser()
    parser.frame_limit = 10
    with pytest.raises(ProtocolError) as e:
        parser.feed(flood)
    assert e.value.code == 1008 and parser.frames == 11
    unlimited = FrameParser()
    assert unlimited.feed(flood) == [] and unlimited.frames == 100_001


def test_the_parser_counts_as_fragments_only_frames_without_fin():
    """frames and fragments, what the owner charges for: a one-frame message split across reads
    (even inside its header) is one frame and no fragment; a message of n frames has n - 1."""
    message = encode_frame(OP_TEXT, b"x" * 1000, mask_key=RFC_KEY)
    parser = FrameParser()
    for piece in pieces(message, (3, 6, 300, 600, 900)):      # cut in the length and in the mask key
        parser.feed(piece)
    assert (parser.frames, parser.fragments) == (1, 0)
    second = encode_frame(OP_CONTINUATION, b"bb", fin=False, mask_key=RFC_KEY)
    parser.feed(encode_frame(OP_TEXT, b"a", fin=False, mask_key=RFC_KEY) + second[:7])
    assert (parser.frames, parser.fragments) == (3, 2)
    assert parser.feed(second[7:] + encode_frame(OP_CONTINUATION, b"c", mask_key=RFC_KEY)) == [(OP_TEXT, b"abbc")]
    assert (parser.frames, parser.fragments) == (4, 2)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_every_fixed_label_value_is_exported_at_zero_from_the_start(server_with, workers):
    """A fresh server's scrape has every close code and HTTP status the server can count, at 0
    (the dashboards' rate() would otherwise lose each series' first increment)."""
    server = server_with("--workers", workers)
    samples = scrape(server.metrics_url)
    for family, label, values in (("scalechat_protocol_errors_total", "code", PROTOCOL_ERROR_CODES),
                                  ("scalechat_http_requests_total", "status", HTTP_STATUSES)):
        series = {k[len(f'{family}{{{label}="'):-2]: v for k, v in samples.items() if k.startswith(family + "{")}
        assert set(series) == set(values) and all(v == 0 for s, v in series.items() if s != "200"), series


# ---------------------------------------------------------------------------
# The HTTP front with bytes alone: scalechat.route
# ---------------------------------------------------------------------------

def _request(target: str, method: str = "GET", **headers) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: chat.example:8080"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return "\r\n".join(lines).encode()


def _upgrade_request(target: str, **headers) -> bytes:
    return _request(target, Upgrade="websocket", Connection="Upgrade", Sec_WebSocket_Version="13",
                    Sec_WebSocket_Key=RFC_ACCEPT_KEY, **headers)


RFC_ACCEPT_KEY = "dGhlIHNhbXBsZSBub25jZQ=="     # RFC 6455 1.3
FRONT_STATIC = {"/static/index.html": ("text/html; charset=utf-8", b"<!doctype html>"),
                "/static/app.js": ("text/javascript; charset=utf-8", b"1;")}


def _route(head: bytes, front: Front | None = None, **state):
    return route(parse_request_head(head), front or Front(FRONT_STATIC), **state)


def _refusal(head: bytes, front: Front | None = None, **state) -> tuple[int, str, tuple]:
    with pytest.raises(HandshakeError) as e:
        _route(head, front, **state)
    return e.value.status, e.value.counter, e.value.headers


def test_route_serves_the_page_static_files_and_health_as_complete_responses():
    status, response = _route(_request("/"))
    head, _, body = response.partition(b"\r\n\r\n")
    assert status == 200 and body == b"<!doctype html>"
    assert b"Content-Security-Policy: default-src 'self'" in head and b"Content-Length: 15" in head
    status, response = _route(_request("/static/app.js?v=2", method="HEAD"))
    assert status == 200 and response.endswith(b"\r\n\r\n") and b"Content-Length: 2" in response
    assert b"Content-Security-Policy" not in response and b"X-Content-Type-Options: nosniff" in response
    assert _route(_request("/healthz"))[1].endswith(b"ok\nbus: up\n")
    assert _route(_request("/healthz"), bus_up=False)[1].endswith(b"ok\nbus: down (holding messages)\n")
    status, response = _route(_request("/healthz"), draining=True)
    assert status == 503 and response.endswith(b"draining\nbus: up\n")


@pytest.mark.parametrize(("head", "status", "counter"), [
    (_request("/static/../scalechat.py"), 404, "not_found"),
    (_request("/static/%2e%2e/scalechat.py"), 404, "not_found"),
    (_request("/nope"), 404, "not_found"),
    (_request("/", method="POST"), 405, "method"),
    (_upgrade_request("/ws/bad%20room"), 400, "bad_request"),
    (_upgrade_request("/ws/" + "r" * 65), 400, "bad_request"),
    *((_upgrade_request(target), 400, "bad_request") for target in (
        "/ws/a%2fb", "/ws/a/b", "/ws/", "/ws/caf%C3%A9", "/ws?name=" + "n" * 33, "/ws?name=%20%20",
        "/ws?since=1e3", "/ws?since=%C2%B2", "/ws?epoch=0123456789abcde%0a", "/ws?epoch=xyz")),
    (_upgrade_request("/ws?since=-1"), 400, "bad_request"),
    (_upgrade_request("/ws?since=" + "9" * 20), 400, "bad_request"),
    (_upgrade_request("/ws?client=short"), 400, "bad_request"),
    (_upgrade_request("/ws?since=3&epoch=0123456789ABCDEF"), 400, "bad_request"),
    (_upgrade_request("/ws?since=3&epoch=0123456789abcdef0"), 400, "bad_request"),
    (_upgrade_request("/ws?name=%0a"), 400, "bad_request"),
    (_upgrade_request("/ws", Origin="http://evil.example"), 403, "origin"),
    (_request("/ws"), 426, "version"),
    (_upgrade_request("/ws", method="POST"), 405, "method"),
])
def test_route_refuses_with_the_status_and_counter_of_each_refusal(head, status, counter):
    assert _refusal(head)[:2] == (status, counter)


def test_route_upgrade_carries_each_validated_field():
    upgrade = _route(_upgrade_request("/ws/r1?name=ann&since=7&client=" + "c" * 16,
                                      Origin="https://chat.example:8080"))
    assert upgrade == Upgrade("r1", "ann", 7, "c" * 16, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    assert _route(_upgrade_request("/ws")) == Upgrade("lobby", "", None, None, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")


def test_route_checks_the_request_before_the_servers_state():
    """A malformed upgrade is a 400 even while draining or full; a good one gets 503 with Retry-After."""
    assert _refusal(_upgrade_request("/ws/bad%20room"), draining=True)[:2] == (400, "bad_request")
    assert _refusal(_upgrade_request("/ws"), draining=True) == (503, "draining", (("Retry-After", "1"),))
    assert _refusal(_upgrade_request("/ws"), full=True) == (503, "max_connections", (("Retry-After", "1"),))
    assert _route(_request("/"), full=True)[0] == 200        # pages are served when full


def test_route_host_and_origin_allow_lists():
    front = Front(FRONT_STATIC, allowed_hosts="chat.example:8080, other:1", allowed_origins="https://app.example/")
    assert _route(_request("/"), front)[0] == 200
    rebound = _request("/").replace(b"chat.example:8080", b"attacker.example")
    assert _refusal(rebound, front)[:2] == (400, "host")
    assert _route(rebound.replace(b"GET / ", b"GET /healthz "), front)[0] == 200   # health checks by address
    assert isinstance(_route(_upgrade_request("/ws", Origin="HTTPS://APP.EXAMPLE"), front), Upgrade)
    assert isinstance(_route(_upgrade_request("/ws", Origin="http://chat.example:8080"), front), Upgrade)
    assert _refusal(_upgrade_request("/ws", Origin="https://evil.example"), front)[:2] == (403, "origin")
    assert isinstance(_route(_upgrade_request("/ws", Origin="https://evil.example"),
                             Front(FRONT_STATIC, allowed_origins="*")), Upgrade)
    assert _refusal(_upgrade_request("/ws"), Front(FRONT_STATIC, allow_no_origin=False))[:2] == (403, "origin")


def test_each_way_a_connection_ends_walks_the_documented_states(in_process_server):
    """Connection's state map, walked for real: each ending's states in order, keyed by the
    client's port (the loop thread records every transition as it makes it)."""
    import scalechat as sc
    server = in_process_server
    walked: dict[int, list] = {}
    ports: dict[int, int] = {}                          # id(conn) -> the client's port

    def learn(conn) -> None:
        if id(conn) not in ports:
            ports[id(conn)] = conn.sock.getpeername()[1]

    def note(conn, state: int) -> None:
        learn(conn)
        walked.setdefault(ports[id(conn)], []).append(state)

    def move(conn, event, now):                        # every change of state is one move of the table
        learn(conn)
        old = moved(conn, event, now)
        if conn.state != sc.OPEN:
            note(conn, conn.state)
        if conn.state == sc.CLOSED:
            del ports[id(conn)]                         # ids are reused once conn is freed
        return old
    moved = server.connections.move
    server.connections.move = move

    def last_state(port: int):
        return walked.get(port, [None])[-1]

    page = socket.create_connection(("127.0.0.1", server.port))
    page.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    refused = socket.create_connection(("127.0.0.1", server.port))
    refused.sendall(b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    polite, rude, drained = (join(server, "t-states") for _ in range(3))
    polite.send(close_frame(1000))
    assert polite.recv_close_code() == 1000 and polite.closed_by_server()
    rude.send(frame(OP_BINARY, b"\x00"))
    assert rude.recv_close_code() == 1003
    while page.recv(65536):                             # FLUSHING: closed once sent
        pass
    assert refused.recv(65536).startswith(b"HTTP/1.1 404")
    ends = [s.getsockname()[1] for s in (page, refused, polite.sock, rude.sock, drained.sock)]
    wait_for(lambda: all(sc.LINGERING in walked.get(port, ()) for port in (ends[1], ends[3])))
    refused.close()                                     # LINGERING ends at the peer's EOF
    rude.sock.close()
    server.request_stop()                               # a drain: CLOSE_SENT, then the peer's Close
    assert drained.recv_close_code() == 1001
    drained.send(close_frame(1001))
    wait_for(lambda: all(last_state(port) == sc.CLOSED for port in ends))
    assert [walked[port] for port in ends] == [
        [sc.FLUSHING, sc.CLOSED],                       # a page: sent, closed
        [sc.REFUSING, sc.LINGERING, sc.CLOSED],         # a 404: sent, half-closed, closed at EOF
        [sc.FLUSHING, sc.CLOSED],                       # the peer's Close echoed, closed
        [sc.REFUSING, sc.LINGERING, sc.CLOSED],         # a protocol error: 1003, half-closed
        [sc.CLOSE_SENT, sc.CLOSED],                     # drained: 1001, closed at the peer's Close
    ]
    page.close()


def test_the_one_sequencer_numbers_keeps_and_knows_resends_while_held():
    """Sequenced, shared by LocalBus and the supervisor: the next seq goes between the parts,
    a resend of a held message gets its first seq back, and once history drops it, a new one."""
    room = Sequenced("r", parse_args(["--history", "2"]), b"0123456789abcdef")
    budget = HistoryBudget(1 << 20, lambda _room: None)
    first = b'{"epoch":"0123456789abcdef","seq":1}'
    assert room.sequence(b"{", b"}", b"c:1", False) == (1, first)
    room.keep(budget, 1, first, b"c:1")
    assert room.seq == 1 and budget.used == ROOM_COST + len(first + b"c:1") + HISTORY_ENTRY_COST
    assert room.sequence(b"", b"", b"c:1", True) == (1, None)          # the resend: not sequenced again
    assert room.sequence(b"", b"", b"c:1", False)[0] == 2              # not marked a resend: a new message
    order = b'"epoch":"0123456789abcdef","seq":'
    assert room.sequence(b"", b"", b"c:2", True) == (2, order + b"2")  # a resend never received: new
    for seq in (2, 3):
        room.keep(budget, seq, b"x", b"c:%d" % seq)
    assert room.sequence(b"", b"", b"c:1", True) == (4, order + b"4")  # dropped from history: new
    assert room.sequence(b"", b"", b"c:3", True) == (3, None)


def test_take_request_head_waits_for_the_blank_line_and_refuses_past_the_limit():
    head = b"GET / HTTP/1.1\r\nHost: h"
    whole = head + b"\r\n\r\nrest"
    for cut in range(len(whole) - 4):                   # every read that stops short of the blank line
        assert take_request_head(whole[:cut], 1024) is None
    assert take_request_head(whole, 1024) == (head, b"rest")
    assert take_request_head(whole, len(head)) == (head, b"rest")
    for buf in (whole, whole[:len(head)]):              # too long, with or without its end
        with pytest.raises(HandshakeError) as e:
            take_request_head(buf + b"x" * 8, len(head) - 1)
        assert (e.value.status, e.value.counter) == (431, "header_too_large")


# ---------------------------------------------------------------------------
# Redis Cluster: where a room lives, and the --redis URL
# ---------------------------------------------------------------------------

def test_key_slot_is_redis_clusters_crc16_of_the_hash_tag():
    """Values from the Redis Cluster specification and `CLUSTER KEYSLOT`; a room's keys share its slot."""
    assert key_slot(b"123456789") == 0x31C3                 # the spec's CRC16 check value
    assert key_slot(b"foo") == 12182 and key_slot(b"bar") == 5061
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers") == key_slot(b"user1000")
    assert key_slot(b"foo{}{bar}") == key_slot(b"foo{}{bar}")   # an empty tag: the whole key
    assert key_slot(b"foo{}{bar}") != key_slot(b"bar")
    assert key_slot(b"foo{{bar}}zap") == key_slot(b"{bar")      # the first { to the first } after it
    for room in ("lobby", "r.1", "x" * 64):
        assert len({key_slot(f"scalechat:{{{room}}}{suffix}".encode())
                    for suffix in (":seq", ":history", ":index", ":order", ":bytes", ":published", "")}) == 1


@pytest.mark.parametrize(("url", "parsed"), [
    ("redis://localhost", ([("localhost", 6379)], 0, None)),
    ("redis://:secret@10.0.0.1:7000/2", ([("10.0.0.1", 7000)], 2, "secret")),
    ("redis://a:7000,b:7001,[::1]:7002/0", ([("a", 7000), ("b", 7001), ("::1", 7002)], 0, None)),
    ("redis://user:pw@a,b", ([("a", 6379), ("b", 6379)], 0, "pw")),
])
def test_redis_url_names_one_redis_or_the_seeds_of_a_cluster(url, parsed):
    assert parse_redis_url(url) == parsed


@pytest.mark.parametrize("url", ["http://a", "redis://", "redis://a,", "redis://a:0", "redis://a:70000",
                                 "redis://a:1/x", "redis://a b", "redis://:s3cret@a:1/x", "redis:/a"])
def test_bad_redis_urls_are_refused_without_echoing_them(url):
    with pytest.raises(ValueError) as e:
        parse_redis_url(url)
    assert "s3cret" not in str(e.value) and "redis://[:password@]host" in str(e.value)
