"""Hostile clients: property tests of the protocol core, and attacks on a real server.

Part one feeds the sans-IO core (FrameParser, encode_frame, mask, parse_close,
parse_request_head, check_upgrade, parse_chat_message) bytes made by
hypothesis: any split of a stream yields the same frames, arbitrary bytes only
ever raise the protocol's own errors, and encoding round-trips. The example
count is modest so the suite stays fast; SCALECHAT_FUZZ_EXAMPLES raises it, and
bench/fuzz_protocol.py runs the long coverage-guided fuzzing with the same
checks.

Part two attacks a real server process over loopback sockets: Origin checks,
rate limits, connection caps, static path escapes, size and time limits, and
finally every attacker at once while two normal clients keep chatting.
SECURITY.md describes each defense and the answer each test expects.
"""
from __future__ import annotations

import base64
import concurrent.futures
import json
import multiprocessing
import os
import random
import re
import select
import socket
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import scalechat as sc
from loadclient import iso_time, now_us
from testkit import (
    BAD_PAYLOADS,
    BROKEN_FRAMES,
    CLIENT_A,
    CLIENT_B,
    RawClient,
    children,
    close_frame,
    echo_time,
    fill_room,
    frame,
    get,
    handshake_status,
    http,
    peak_rss_kib,
    percentile,
    sample,
    scrape,
)
from testkit_oracles import (
    PARSER_CLOSE_CODES,
    check_any_split,
    check_chat_payload,
    check_close_payload,
    check_request_head,
    feed_chunks,
    split_at,
)

pytestmark = pytest.mark.timeout(180)

FUZZ_EXAMPLES = int(os.environ.get("SCALECHAT_FUZZ_EXAMPLES", "150"))
fuzz_settings = settings(max_examples=FUZZ_EXAMPLES, deadline=2000, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

close_codes = st.sampled_from(sorted(sc.VALID_CLOSE_CODES) + [0, 999, 1004, 1005, 1006, 1015,
                                                             2999, 3000, 4999, 5000, 65535])
close_payloads = st.builds(lambda code, reason: struct.pack("!H", code) + reason,
                           close_codes, st.one_of(st.text(max_size=20).map(str.encode),
                                                  st.binary(max_size=8)))
frame_payloads = st.one_of(st.binary(max_size=200), st.text(max_size=60).map(str.encode),
                           close_payloads)
cut_lists = st.lists(st.integers(0, 1 << 16), max_size=12)
mask_keys = st.binary(min_size=4, max_size=4)
parser_options = st.fixed_dictionaries({
    "expect_masked": st.booleans(),
    "max_message_size": st.one_of(st.integers(0, 300), st.just(1 << 20)),
    "accept_binary": st.booleans()})


@st.composite
def raw_frames(draw, masked: bool) -> bytes:
    """One frame, valid or not: any header bits, length form, declared length, mask and payload."""
    payload = draw(frame_payloads)
    b0 = (draw(st.booleans()) << 7) | draw(st.sampled_from([0, 0, 0, 0x10, 0x20, 0x40])) | \
        draw(st.sampled_from([0, 1, 1, 2, 8, 9, 10, 3, 7, 11, 15]))
    declared = draw(st.one_of(st.just(len(payload)), st.just(len(payload)),
                              st.integers(0, 300), st.integers(0, (1 << 64) - 1)))
    form = draw(st.sampled_from(["short", "16", "64"])) if declared < 126 else "64"
    if form == "short":
        header = bytes((b0, declared))
    elif form == "16" or declared < 65536:
        header = struct.pack("!BBH", b0, 126, declared & 0xFFFF)
    else:
        header = struct.pack("!BBQ", b0, 127, declared)
    if masked != (draw(st.integers(0, 9)) == 0):       # now and then the wrong masking
        key = draw(mask_keys)
        return bytes((header[0], header[1] | 0x80)) + header[2:] + key + sc.mask(payload, key)
    return header + payload


@st.composite
def frame_streams(draw) -> tuple[bytes, dict]:
    """A stream of mostly well-formed frames, sometimes with junk around them, and parser options."""
    options = draw(parser_options)
    frames = draw(st.lists(raw_frames(options["expect_masked"]), max_size=8))
    junk = draw(st.one_of(st.just(b""), st.binary(max_size=16)))
    return (junk + b"".join(frames) if draw(st.booleans()) else b"".join(frames) + junk), options


@st.composite
def payload_of_size(draw, opcode: int) -> bytes:
    """A message payload whose size may sit on the 7/16/64-bit length boundaries."""
    size = draw(st.one_of(st.integers(0, 300),
                          st.sampled_from([125, 126, 127, 65535, 65536, 65537, 200_000])))
    if opcode == sc.OP_TEXT:
        unit = draw(st.text(min_size=1, max_size=8)).encode()
        return (unit * (size // len(unit) + 1))[:size].decode(errors="ignore").encode()
    return random.Random(draw(st.integers(0, 1 << 32))).randbytes(size)


hostile_targets = st.lists(st.sampled_from(
    ["/", "/ws", "//", "[", "]", "::1", "%", "%2e", "%00", "%C2%B2", "%ff", "?", "#", "&", "=",
     "since=", "name=", "a", "..", "@", ":", "\\", "ws", "static", "é"]),
    min_size=1, max_size=10).map(lambda parts: "/" + "".join(parts))


@st.composite
def request_heads(draw) -> bytes:
    """A request head built from hostile pieces: near-valid upgrades with one thing off."""
    key = draw(st.one_of(st.just(sc.new_key()), st.text(max_size=30)))
    headers = {"Host": draw(st.sampled_from(["127.0.0.1:8080", "", "[::1]", "a b"])),
               "Upgrade": draw(st.sampled_from(["websocket", "WebSocket", "h2c", ""])),
               "Connection": draw(st.sampled_from(["Upgrade", "keep-alive, Upgrade", "close"])),
               "Sec-WebSocket-Key": key,
               "Sec-WebSocket-Version": draw(st.sampled_from(["13", "8", "", "13, 8"]))}
    dropped = draw(st.sets(st.sampled_from(sorted(headers))))
    lines = [(f"{draw(st.sampled_from(['GET', 'POST', 'HEAD', 'G(T', '']))} {draw(hostile_targets)} "
             f"{draw(st.sampled_from(['HTTP/1.1', 'HTTP/1.0', 'HTTP/2', 'http/1.1']))}")]
    lines += [f"{k}: {v}" for k, v in headers.items() if k not in dropped]
    lines += draw(st.lists(st.text(max_size=20), max_size=3))
    return "\r\n".join(lines).encode("utf-8", "surrogatepass")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                      max_size=4),
    max_leaves=12)
chat_objects = st.fixed_dictionaries({}, optional={
    "message_id": st.one_of(st.integers(), st.booleans(), st.text(max_size=5), st.floats()),
    "text": st.one_of(st.text(max_size=40), st.integers(), st.none(), json_values),
    "sent_at": st.one_of(st.text(max_size=80), st.integers()),
    "sender": st.text(max_size=10), "room": st.text(max_size=10)})


# ---------------------------------------------------------------------------
# Property tests: frames
# ---------------------------------------------------------------------------

@fuzz_settings
@given(stream=frame_streams(), cuts=cut_lists)
def test_frame_stream_parses_alike_however_it_is_split(stream, cuts):
    data, options = stream
    check_any_split(data, cuts, **options)


@fuzz_settings
@given(data=st.binary(max_size=2048), cuts=cut_lists, options=parser_options)
def test_arbitrary_bytes_raise_only_protocol_errors(data, cuts, options):
    check_any_split(data, cuts, **options)


@fuzz_settings
@given(data=st.data(), opcode=st.sampled_from([sc.OP_TEXT, sc.OP_BINARY]),
       masked=st.booleans(), cuts=cut_lists)
def test_fragmented_message_with_interleaved_controls_round_trips(data, opcode, masked, cuts):
    payload = data.draw(payload_of_size(opcode))
    pieces = split_at(payload, data.draw(st.lists(st.integers(0, 1 << 18), max_size=4)))
    items, expected = [], []
    for i, piece in enumerate(pieces):
        for _ in range(data.draw(st.integers(0, 2 if i else 0))):   # controls inside the message
            control = data.draw(st.sampled_from([sc.OP_PING, sc.OP_PONG]))
            body = data.draw(st.binary(max_size=sc.MAX_CONTROL_PAYLOAD))
            items.append(sc.encode_frame(control, body, mask_key=data.draw(mask_keys) if masked else None))
            expected.append((control, body))
        last = i == len(pieces) - 1
        items.append(sc.encode_frame(opcode if i == 0 else sc.OP_CONTINUATION, piece, fin=last,
                                     mask_key=data.draw(mask_keys) if masked else None))
    expected.append((opcode, payload))
    # A message of exactly the maximum size is allowed; one byte less of room refuses it.
    frames, code = feed_chunks(split_at(b"".join(items), cuts), expect_masked=masked,
                               max_message_size=len(payload))
    assert (frames, code) == (expected, None)
    if payload:
        frames, code = feed_chunks([b"".join(items)], expect_masked=masked,
                                   max_message_size=len(payload) - 1)
        assert code == sc.CLOSE_TOO_BIG


def is_valid_close(payload: bytes) -> bool:
    """True when payload is a Close body that parse_close accepts."""
    try:
        sc.parse_close(payload)
    except sc.ProtocolError:
        return False
    return True


@fuzz_settings
@given(opcode=st.sampled_from(sorted(set(sc.DATA_OPCODES + sc.CONTROL_OPCODES) - {0})),
       data=st.data(), key=st.one_of(st.none(), mask_keys))
def test_encode_frame_round_trips_every_opcode_size_and_mask(opcode, data, key):
    if opcode in sc.CONTROL_OPCODES:
        payload = data.draw(close_payloads.filter(is_valid_close)
                            if opcode == sc.OP_CLOSE else st.binary(max_size=sc.MAX_CONTROL_PAYLOAD))
    else:
        payload = data.draw(payload_of_size(opcode))
    frame = sc.encode_frame(opcode, payload, mask_key=key)
    assert len(frame) == len(payload) + (2 if len(payload) < 126 else 4 if len(payload) < 65536
                                         else 10) + (4 if key else 0)
    assert feed_chunks([frame], expect_masked=key is not None) == ([(opcode, payload)], None)


RFC_MASK_KEY = bytes.fromhex("37fa213d")        # RFC 6455 5.7's example key


@fuzz_settings
@given(data=st.binary(max_size=1000), key=mask_keys)
@example(data=b"Hello", key=RFC_MASK_KEY)
@example(data=RFC_MASK_KEY[:2], key=RFC_MASK_KEY)       # masks to zero bytes, which stay
@example(data=b"", key=RFC_MASK_KEY)
@example(data=bytes(range(256)) * 4, key=RFC_MASK_KEY)  # longer than the strategy draws
def test_mask_is_a_cyclic_xor_and_its_own_inverse(data, key):
    masked = sc.mask(data, key)
    assert masked == bytes(b ^ key[i % 4] for i, b in enumerate(data))
    assert sc.mask(masked, key) == data
    if (data, key) == (b"Hello", RFC_MASK_KEY):
        assert masked == bytes.fromhex("7f9f4d5158")        # the RFC's own bytes


def test_giant_declared_length_fails_at_the_header_without_allocating():
    parser = sc.FrameParser(max_message_size=1 << 20)
    header = struct.pack("!BBQ", 0x81, 0xFF, (1 << 63) - 1)
    with pytest.raises(sc.ProtocolError) as e:
        parser.feed(header[:10])              # the mask key has not even arrived yet
    assert e.value.code == sc.CLOSE_TOO_BIG
    with pytest.raises(sc.ProtocolError) as e:
        sc.FrameParser().feed(struct.pack("!BBQ", 0x81, 0xFF, 1 << 63))
    assert e.value.code == sc.CLOSE_PROTOCOL_ERROR


# ---------------------------------------------------------------------------
# Property tests: close frames, handshakes, chat JSON
# ---------------------------------------------------------------------------

@fuzz_settings
@given(payload=st.one_of(st.binary(max_size=sc.MAX_CONTROL_PAYLOAD), close_payloads))
def test_parse_close_accepts_valid_bodies_and_refuses_the_rest(payload):
    check_close_payload(payload)


@fuzz_settings
@given(code=st.sampled_from(sorted(sc.VALID_CLOSE_CODES)), reason=st.text(max_size=200))
@example(code=1008, reason="é" * 100)
def test_encode_close_always_makes_a_valid_close_frame(code, reason):
    (_opcode, payload), = feed_chunks([sc.encode_close(code, reason)], expect_masked=False)[0]
    parsed_code, parsed_reason = sc.parse_close(payload)
    assert parsed_code == code and reason.startswith(parsed_reason)


@fuzz_settings
@given(head=st.binary(max_size=600))
def test_arbitrary_request_heads_raise_only_handshake_errors(head):
    check_request_head(head)


@fuzz_settings
@given(head=request_heads())
@example(head=b"GET //[ HTTP/1.1\r\nHost: x")
def test_hostile_request_targets_raise_only_handshake_errors(head):
    check_request_head(head)


@fuzz_settings
@given(key=st.binary(min_size=16, max_size=16), resource=st.sampled_from(["/ws", "/ws/r?name=a&since=3"]))
def test_client_handshake_is_accepted_with_the_right_key(key, resource):
    b64 = base64.b64encode(key).decode()
    head = sc.client_handshake_request("127.0.0.1:8080", resource, b64, origin="http://x")
    request = sc.parse_request_head(head[:-4])
    assert sc.check_upgrade(request) == sc.accept_key(b64)
    assert sc.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="   # RFC 6455 1.3


@fuzz_settings
@given(payload=st.one_of(st.binary(max_size=300), chat_objects.map(json.dumps).map(str.encode),
                         json_values.map(json.dumps).map(str.encode)),
       max_size=st.integers(1, 64))
def test_chat_payloads_raise_only_chat_errors(payload, max_size):
    check_chat_payload(payload, max_size)


@pytest.mark.parametrize("payload, code", [
    (b"[" * 300_000, "bad_json"),
    (b'{"text":' * 100_000, "bad_json"),
    (b'{"text":"x","a":' + b"[" * 100_000, "bad_json"),
    (b"[1, 2, 3]", "bad_message"), (b'"hello"', "bad_message"), (b"42", "bad_message"),
    (b"null", "bad_message"), (b"true", "bad_message"),
    (b'{"text":"' + b"9" * 5000 + b'"}', None),
    (b'{"message_id":' + b"9" * 5000 + b',"text":"x"}', "bad_json"),
    (b'{"text":"\\ud800"}', "bad_message"),
])
def test_nesting_bombs_and_non_objects_are_refused_quickly(payload, code):
    t0 = time.perf_counter()
    if code is None:
        assert sc.parse_chat_message(payload, 65536)[1] == "9" * 5000
    else:
        with pytest.raises(sc.ChatError) as e:
            sc.parse_chat_message(payload, 65536)
        assert e.value.code == code
    assert time.perf_counter() - t0 < 0.5


# ---------------------------------------------------------------------------
# Reading the server's counters; a shared server
# ---------------------------------------------------------------------------

def refused(samples: dict, reason: str) -> float:
    """scalechat_refused_total for one reason."""
    return sample(samples, "scalechat_refused_total", reason=reason)


def protocol_errors(samples: dict, code: int) -> float:
    """scalechat_protocol_errors_total for one close code (0 when never sent)."""
    return sample(samples, "scalechat_protocol_errors_total", code=str(code))


def dropped(samples: dict, reason: str) -> float:
    """scalechat_dropped_clients_total for one reason."""
    return sample(samples, "scalechat_dropped_clients_total", reason=reason)


def gauge(samples: dict, name: str) -> float:
    """A sample without labels."""
    return samples[name]


@pytest.fixture(scope="module")
def shared_server(serve_shared):
    """A server with default settings, shared by the tests that refuse before the upgrade."""
    return serve_shared()


# ---------------------------------------------------------------------------
# Cross-site WebSocket hijacking: the Origin check
# ---------------------------------------------------------------------------

def test_wrong_origin_is_refused_with_403_before_the_upgrade(serve):
    server = serve()
    status, headers, body = http(server.port, sc.client_handshake_request(
        f"127.0.0.1:{server.port}", "/ws", sc.new_key(), origin="https://evil.example"))
    assert status == 403 and b"origin" in body
    assert "sec-websocket-accept" not in headers and "upgrade" not in headers
    assert handshake_status(server.port, origin="null") == 403
    metrics = scrape(server.metrics_url)
    assert refused(metrics, "origin") == 2
    assert gauge(metrics, "scalechat_connections_accepted_total") == 0


def test_own_host_is_an_allowed_origin(serve):
    server = serve()
    for origin in (f"http://127.0.0.1:{server.port}", f"https://127.0.0.1:{server.port}/",
                   f"HTTP://127.0.0.1:{server.port}"):
        assert handshake_status(server.port, origin=origin) == 101, origin
    assert handshake_status(server.port, origin=f"http://127.0.0.1:{server.port + 1}") == 403
    assert handshake_status(server.port, origin="http://127.0.0.1") == 403


def test_allowed_origins_list(serve):
    server = serve("--allowed-origins", "https://chat.example.com, http://other.example:8000")
    for origin in ("https://chat.example.com", "http://other.example:8000", "https://Chat.Example.com/"):
        assert handshake_status(server.port, origin=origin) == 101, origin
    for origin in ("http://chat.example.com", "https://chat.example.com.evil.example",
                   "https://evil.example", "http://other.example"):
        assert handshake_status(server.port, origin=origin) == 403, origin
    assert handshake_status(server.port, origin=f"http://127.0.0.1:{server.port}") == 101


def test_no_origin_is_allowed_by_default_and_refused_when_disabled(serve):
    assert handshake_status(serve().port) == 101
    assert handshake_status(serve("--allow-no-origin", "false").port) == 403
    strict = serve(env={"SCALECHAT_ALLOW_NO_ORIGIN": "false"})
    assert handshake_status(strict.port) == 403
    assert refused(scrape(strict.metrics_url), "origin") == 1


# ---------------------------------------------------------------------------
# Rate limit
# ---------------------------------------------------------------------------

def flood_once(port: int, room: str, count: int) -> tuple[int, int, int | None]:
    """Send count messages at once; (accepted, rate_limit errors, close code)."""
    client = RawClient(port, f"/ws/{room}")
    client.sock.sendall(b"".join(sc.encode_frame(sc.OP_TEXT, b'{"text":"flood %d"}' % i,
                                                 mask_key=sc.new_mask_key()) for i in range(count)))
    objects, code = client.read_until_close()
    accepted = sum(o["type"] == "message" for o in objects)
    errors = sum(o["type"] == "error" and o["code"] == "rate_limit" for o in objects)
    return accepted, errors, code


def test_flooder_gets_error_frames_then_1008(serve):
    server = serve("--rate-limit", "5", "--rate-burst", "5")
    accepted, errors, code = flood_once(server.port, "flood", 40)
    assert 5 <= accepted <= 6 and errors == 5 and code == sc.CLOSE_POLICY
    metrics = scrape(server.metrics_url)
    assert refused(metrics, "rate_limit") == 6
    assert protocol_errors(metrics, sc.CLOSE_POLICY) == 1


# ---------------------------------------------------------------------------
# Connection caps
# ---------------------------------------------------------------------------

def test_per_ip_cap_answers_503_and_counts_per_address(serve):
    server = serve("--max-per-ip", "2")
    first, second = RawClient(server.port), RawClient(server.port)
    status, headers, _body = http(server.port, sc.client_handshake_request(
        f"127.0.0.1:{server.port}", "/ws", sc.new_key()))
    assert status == 503 and headers.get("retry-after") == "1"
    assert handshake_status(server.port, source="127.0.0.2") == 101     # another address
    first.close()
    deadline, refusals = time.monotonic() + 5, 1
    while (status := handshake_status(server.port)) != 101:              # its slot frees up
        assert status == 503 and time.monotonic() < deadline
        refusals += 1
        time.sleep(0.05)
    second.close()
    assert refused(scrape(server.metrics_url), "max_connections") == refusals


def test_global_cap_answers_503_and_a_freed_slot_is_usable_again(serve):
    """Past --max-connections (from any address) an upgrade gets 503 with Retry-After, and
    /healthz still answers; once a client leaves, its slot takes a new one."""
    server = serve("--max-connections", "2")
    first, second = (RawClient(server.port, "/ws/max", source=f"127.0.0.{i}") for i in (1, 2))
    assert second.welcome["members"] == 2
    status, headers, _body = http(server.port, sc.client_handshake_request(
        f"127.0.0.1:{server.port}", "/ws/max", sc.new_key()))
    assert (status, headers.get("retry-after")) == (503, "1")
    assert handshake_status(server.port, source="127.0.0.3") == 503      # not a per-address cap
    assert get(server.port, "/healthz")[0] == 200
    metrics = scrape(server.metrics_url)
    assert refused(metrics, "max_connections") == 2 and gauge(metrics, "scalechat_connections") == 2
    first.send(close_frame(sc.CLOSE_NORMAL))
    assert first.recv_close_code() == sc.CLOSE_NORMAL and first.closed_by_server()
    assert RawClient(server.port, "/ws/max", source="127.0.0.3").welcome["members"] == 2
    second.close()


def test_per_ip_cap_also_bounds_sockets_still_in_the_handshake(serve):
    server = serve("--max-per-ip", "4", "--handshake-timeout", "30")
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(12)]
    time.sleep(1.0)
    answered = select.select(idle, [], [], 0)[0]          # a 503 or a close is readable
    answers = [s.recv(4096) for s in answered]
    for s in idle:
        s.close()
    # Four sockets wait for their handshake within the cap; the eight past it get a 503 at once.
    assert len(answered) == 8 and all(a.startswith(b"HTTP/1.1 503 ") for a in answers), answers
    assert refused(scrape(server.metrics_url), "max_connections") == 8


# ---------------------------------------------------------------------------
# Static files: no escapes, right types, CSP on the page
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def static_server(serve_shared, tmp_path_factory):
    """A server on a static folder that holds symlinks pointing outside it."""
    tmp_path = tmp_path_factory.mktemp("static_root")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "inner.txt").write_text("TOP-SECRET inner\n")
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<!doctype html><title>t</title>")
    (static / "app.js").write_text("export {};\n")
    (static / "style.css").write_text("body{}\n")
    (static / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (static / "data.json").write_text("{}")
    (static / "sub").mkdir()
    (static / "sub" / "inner.js").write_text("export const inner = 1;\n")
    (static / "link.txt").symlink_to(secret)                    # absolute
    (static / "rel.txt").symlink_to("../secret.txt")            # relative
    (static / "linkdir").symlink_to(tmp_path / "outside")
    server = serve_shared("--static-dir", str(static))
    server.static_dir = static
    server.secret = str(secret)
    return server


@pytest.mark.parametrize("target", [
    "/static/../secret.txt", "/static/%2e%2e/secret.txt", "/static/%2E%2E%2Fsecret.txt",
    "/static/..%2fsecret.txt", "/static/..%5csecret.txt", "/static/.%2e/.%2e/secret.txt",
    "/static//etc/passwd", "/static/%2fetc%2fpasswd", "//etc/passwd", "/etc/passwd", "/static/SECRET",
    "/static/app.js%00", "/static/app.js%00.html", "/static/app.js\x00", "/static/link.txt",
    "/static/rel.txt", "/static/linkdir/inner.txt", "/static/", "/static", "/../secret.txt",
    "/%2e%2e/secret.txt", "/static/./app.js", "/static/app.js/.",
    # the server's own files, beside its working directory
    "/scalechat.py", "/../scalechat.py", "/static/../scalechat.py", "/static/%2e%2e/scalechat.py",
    "/static/%2E%2E%2Fscalechat.py", "/static/..%2fscalechat.py",
])
def test_static_paths_never_escape_the_folder(static_server, target):
    """Encoded dot-dot, absolute paths, NUL, symlinks out: never anything but the folder's files."""
    status, headers, body = get(static_server.port, target.replace("SECRET", static_server.secret))
    assert status == (400 if "\x00" in target else 404)
    assert b"SECRET" not in body and b"root:" not in body and b"import" not in body
    assert headers["content-type"].startswith("text/plain")


def test_static_map_is_fixed_at_start(static_server):
    assert get(static_server.port, "/static/app.js")[0] == 200
    (static_server.static_dir / "late.js").write_text("1;\n")
    assert get(static_server.port, "/static/late.js")[0] == 404


@pytest.mark.parametrize("target, content_type", [
    ("/", "text/html; charset=utf-8"), ("/index.html", "text/html; charset=utf-8"),
    ("/static/app.js", "text/javascript; charset=utf-8"), ("/static/style.css", "text/css; charset=utf-8"),
    ("/static/logo.svg", "image/svg+xml"), ("/static/data.json", "application/json"),
    ("/static/sub/inner.js", "text/javascript; charset=utf-8"),
])
def test_static_content_types_and_nosniff(static_server, target, content_type):
    status, headers, body = get(static_server.port, target)
    assert status == 200 and headers["content-type"] == content_type
    assert headers["x-content-type-options"] == "nosniff"
    name = "index.html" if target in ("/", "/index.html") else target.removeprefix("/static/")
    assert body == (static_server.static_dir / name).read_bytes()


def test_demo_page_has_a_strict_content_security_policy(shared_server):
    status, headers, body = get(shared_server.port, "/")
    assert status == 200 and headers["x-content-type-options"] == "nosniff"
    policy = dict(d.strip().split(" ", 1) for d in headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'self'" and policy["script-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in headers["content-security-policy"]
    assert "unsafe-eval" not in headers["content-security-policy"]
    # Nothing inline that the policy would block: scripts come from files, no on* handlers.
    assert not re.search(rb"<script(?![^>]*\bsrc=)[^>]*>", body, re.IGNORECASE)
    assert not re.search(rb"\son[a-z]+\s*=", body, re.IGNORECASE)


# ---------------------------------------------------------------------------
# Size limits: header, message, room, name
# ---------------------------------------------------------------------------

def test_oversized_request_head_gets_431(serve):
    server = serve()
    assert http(server.port, b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 9000)[0] == 431
    assert http(server.port, b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n")[0] == 431
    assert get(server.port, "/healthz")[0] == 200
    assert refused(scrape(server.metrics_url), "header_too_large") == 2


def test_text_of_exactly_the_maximum_passes_and_one_byte_more_is_refused(serve):
    server = serve("--max-message-size", "1000")
    client = RawClient(server.port)
    client.send_json({"message_id": 1, "text": "é" * 500})
    assert client.recv_message()["text"] == "é" * 500
    client.send_json({"message_id": 2, "text": "x" * 1001})
    error = client.recv_json()
    assert (error["type"], error["code"], error["message_id"]) == ("error", "too_big", 2)
    client.send_json({"message_id": 3, "text": "still open"})
    assert client.recv_message()["message_id"] == 3
    assert refused(scrape(server.metrics_url), "too_big") == 1


def test_bad_room_name_or_since_gets_400_before_the_upgrade(shared_server):
    """The wiring of route()'s refusals (each case is test_scalechat.py's): a 400, no connection."""
    for resource in ("/ws/a%2fb", "/ws?since=1e3"):
        assert handshake_status(shared_server.port, resource=resource) == 400
    assert gauge(scrape(shared_server.metrics_url), "scalechat_connections_accepted_total") == 0


@pytest.mark.parametrize("target, status", [("//[", 404), ("/ws?since=%C2%B2", 400)])
def test_hostile_request_target_gets_4xx_and_the_server_lives(serve, target, status):
    server = serve()
    answer = handshake_status(server.port, resource=target)
    assert server.proc.poll() is None, "the server process died"
    assert answer == status and get(server.port, "/healthz")[0] == 200


# ---------------------------------------------------------------------------
# Broken frames: each gets its close code, before any payload is read
# ---------------------------------------------------------------------------


def garbage_sender(port: int) -> list:
    """Send each kind of broken frame on its own connection; [(close code expected, got)]."""
    results = []
    for data, code in BROKEN_FRAMES:
        client = RawClient(port, "/ws/garbage")
        client.sock.sendall(data)
        results.append((code, client.read_until_close()[1]))
    return results


def test_each_broken_frame_gets_its_close_code(serve):
    """The wiring of the parser's failures over a real socket: each close code reaches the peer
    (test_connection.py walks every kind through Connection.receive)."""
    server = serve()
    results = garbage_sender(server.port)
    assert [got for _, got in results] == [code for _, code in BROKEN_FRAMES]
    assert get(server.port, "/healthz")[0] == 200


def test_declared_length_past_the_cap_is_refused_before_the_payload(serve):
    server = serve("--max-message-size", "1000")
    client = RawClient(server.port)
    client.sock.sendall(struct.pack("!BBH", 0x81, 0xFE, 60_000) + b"abcd")    # no payload follows
    assert client.read_until_close()[1] == sc.CLOSE_TOO_BIG


def send_what_fits(sock: socket.socket, data: bytes) -> int:
    """Send as much of data as the socket takes without blocking; the bytes sent."""
    sock.setblocking(False)
    sent = 0
    try:
        while sent < len(data):
            sent += sock.send(data[sent:sent + 65536])
    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
        pass
    sock.settimeout(5.0)
    return sent


def test_client_still_sending_when_refused_still_reads_the_1009(serve):
    server = serve()
    for _ in range(3):
        client = RawClient(server.port)
        send_what_fits(client.sock, struct.pack("!BBQ", 0x81, 0xFF, 4_000_000) + b"abcd" + bytes(4_000_000))
        time.sleep(0.3)                          # all the server sends arrives before we read
        assert client.read_until_close()[1] == sc.CLOSE_TOO_BIG


def test_a_violation_is_counted_once_when_the_peer_answers_the_close(serve):
    """Each failed connection whose peer answers the Close counts one protocol error, under its
    close code; the server ends TCP once the Close is answered."""
    server = serve()
    garbage_sender(server.port)                 # echoes each Close, as RFC 6455 asks
    # Invalid UTF-8 in a frame not yet finished fails at once, not when the frame ends.
    client = RawClient(server.port)
    client.send(frame(sc.OP_TEXT, b'{"text": "\xff and more')[:-4])
    assert client.recv_close_code() == sc.CLOSE_INVALID_DATA
    client.send(close_frame(sc.CLOSE_INVALID_DATA))
    assert client.closed_by_server()
    time.sleep(0.2)
    metrics = scrape(server.metrics_url)
    for code in PARSER_CLOSE_CODES:
        expected = sum(c == code for _, c in BROKEN_FRAMES) + (code == sc.CLOSE_INVALID_DATA)
        assert protocol_errors(metrics, code) == expected, code


# ---------------------------------------------------------------------------
# Time limits: handshake, ping/pong, write
# ---------------------------------------------------------------------------

def test_slow_half_or_silent_handshake_is_dropped_without_an_answer(serve):
    """A handshake dribbled a byte at a time, half a handshake, or none at all: each socket is
    closed after --handshake-timeout without a byte of answer; an upgraded client stays."""
    server = serve("--handshake-timeout", "0.5")
    upgraded = RawClient(server.port, "/ws/hs")
    start = time.monotonic()
    slow = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    half = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    half.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sockets = {"slowloris": slow, "half": half, "silent": silent}
    ended: dict = {}                        # name -> (what it received, seconds until then)
    dribble = iter(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000)
    while len(ended) < len(sockets) and time.monotonic() - start < 3:
        if "slowloris" not in ended:
            try:
                slow.send(bytes((next(dribble),)))
            except (BrokenPipeError, ConnectionResetError):
                pass
        for name, s in sockets.items():
            if name not in ended and select.select([s], [], [], 0)[0]:
                try:
                    received = s.recv(4096)
                except ConnectionResetError:
                    received = b""
                ended[name] = (received, time.monotonic() - start)
        time.sleep(0.05)
    for s in sockets.values():
        s.close()
    assert set(ended) == set(sockets), f"still open after 3 s: {set(sockets) - set(ended)}"
    assert all(received == b"" for received, _ in ended.values()), ended
    assert 0.4 < ended["slowloris"][1] < 2.0
    assert all(0.4 < ended[name][1] < 1.5 for name in ("half", "silent")), ended
    upgraded.send_json({"message_id": 1, "text": "still here"})
    assert upgraded.recv_message()["seq"] == 1
    assert refused(scrape(server.metrics_url), "handshake_timeout") == 3


def test_client_that_never_answers_pings_is_dropped(serve):
    """A client that never answers pings is dropped within --pong-timeout of its first ping;
    one that answers stays, and still chats."""
    server = serve("--ping-interval", "0.3", "--pong-timeout", "0.3")
    mute, polite = RawClient(server.port, "/ws/dead"), RawClient(server.port, "/ws/dead")
    first_ping = dropped_at = None
    polite_pings = 0
    deadline = time.monotonic() + 5
    while dropped_at is None:
        assert time.monotonic() < deadline, "the mute client was never dropped"
        for client in (mute, polite):
            client.sock.settimeout(0.02)
            try:
                opcode, payload = client.recv_frame()
            except TimeoutError:
                continue
            except ConnectionError:                     # EOF or reset: the server ended it
                assert client is mute, "the polite client was dropped"
                dropped_at = time.monotonic()
                break
            if opcode == sc.OP_PING and client is polite:
                polite.send_frame(sc.OP_PONG, payload)  # read, and answer pings: stays
                polite_pings += 1
            elif opcode == sc.OP_PING:
                first_ping = first_ping or time.monotonic()
            else:
                assert opcode in (sc.OP_TEXT, sc.OP_CLOSE), opcode    # member counts; the close
    assert first_ping is not None, "the mute client was dropped before any ping"
    assert dropped_at - first_ping < 1.5
    assert polite_pings >= 1
    polite.sock.settimeout(5)
    polite.send_json({"message_id": 1, "text": "still here"})
    assert polite.recv_message()["text"] == "still here"
    metrics = scrape(server.metrics_url)
    assert dropped(metrics, "ping_timeout") == 1
    assert gauge(metrics, "scalechat_connections") == 1
    mute.close()
    polite.close()


def post_without_reading(client: RawClient, seconds: float) -> tuple[bool, int]:
    """Post 64 KiB messages within the rate limit, never reading the echoes, for at most
    seconds; (whether the server cut the client off, messages sent). Closes the client."""
    frame_text = b'{"text":"' + b"x" * 65536 + b'"}'
    deadline, sent = time.monotonic() + seconds, 0
    try:
        while time.monotonic() < deadline:
            client.send_frame(sc.OP_TEXT, frame_text)
            sent += 1
            time.sleep(0.075)         # 13 messages a second: under every rate limit used here
    except OSError:                   # reset or broken pipe: the server has cut it off
        return True, sent
    finally:
        client.close()
    return False, sent


@pytest.mark.slow
def test_client_whose_buffer_never_drains_hits_the_write_timeout(serve):
    server = serve("--write-timeout", "1", "--max-buffer", str(256 << 20), "--close-timeout", "1",
                   "--rate-limit-bytes", "0")
    assert post_without_reading(RawClient(server.port, rcvbuf=4096, timeout=10), 15)[0]
    metrics = scrape(server.metrics_url)
    assert dropped(metrics, "write_timeout") == 1 and dropped(metrics, "slow_consumer") == 0
    assert gauge(metrics, "scalechat_connections") == 0


@pytest.mark.slow
def test_client_that_never_reads_is_cut_off_at_the_buffer_cap(serve):
    server = serve("--max-buffer", "65536", "--write-timeout", "30", "--close-timeout", "1",
                   "--rate-limit-bytes", "0")
    assert post_without_reading(RawClient(server.port, rcvbuf=4096, timeout=10), 15)[0]
    metrics = scrape(server.metrics_url)
    assert dropped(metrics, "slow_consumer") == 1 and dropped(metrics, "write_timeout") == 0
    assert peak_rss_kib(server.proc.pid) < 200_000


def test_filling_the_history_of_many_rooms_does_not_grow_memory_without_bound(serve):
    server = serve("--rate-limit-bytes", "0")
    rss_start = peak_rss_kib(server.proc.pid)
    text = "x" * 65536
    for r in range(48):                           # 192 MiB of text, 64 messages a room
        client = RawClient(server.port, f"/ws/hoard{r}")
        for i in range(64):                       # within the default message burst: never rate limited
            client.send_json({"message_id": i, "text": text})
            client.recv_message()
        client.close()
    growth = peak_rss_kib(server.proc.pid) - rss_start
    print(f"\nserver peak RSS grew by {growth / 1024:.0f} MiB for 192 MiB of history sent")
    assert growth < 128 * 1024


# ---------------------------------------------------------------------------
# All attackers at once, while two normal clients chat
# ---------------------------------------------------------------------------

# The never-readers post 64 KiB texts faster than --rate-limit-bytes allows: the
# buffer cap that cuts them off is what they test, so the byte rate is off here.
ABUSE_FLAGS = ("--handshake-timeout", "2", "--rate-limit", "20", "--rate-burst", "20",
               "--max-buffer", "65536", "--close-timeout", "1", "--rate-limit-bytes", "0")
RATE_BURST = 20
CHAT_INTERVAL = 0.05          # 20 messages a second between the two normal clients
QUIET_MESSAGES = 100
ATTACK_MESSAGES = 200         # about 10 s


def chat_pair(port: int, room: str, count: int, interval: float) -> list:
    """Two clients take turns sending count messages into room; return every delivery latency.

    Asserts that both receive every message intact, once, in seq order 1..count.
    Runs in its own process so that attackers in the test process cannot skew it.
    """
    alice, bob = RawClient(port, f"/ws/{room}?name=alice"), RawClient(port, f"/ws/{room}?name=bob")
    latencies, seqs = [], {"alice": [], "bob": []}
    start = time.perf_counter()
    for i in range(count):
        sender = (alice, bob)[i % 2]
        text = f"message {i} " + "x" * (i % 64)
        t0 = time.perf_counter()
        sender.send_json({"message_id": i, "text": text, "sent_at": iso_time(now_us())})
        for client in (alice, bob):
            message = client.recv_message()
            latencies.append(time.perf_counter() - t0)
            assert (message["message_id"], message["text"], message["sender"]) == (i, text, sender.name)
            seqs[client.name].append(message["seq"])
        time.sleep(max(0.0, start + (i + 1) * interval - time.perf_counter()))
    assert seqs["alice"] == seqs["bob"] == list(range(1, count + 1))
    alice.close()
    bob.close()
    return latencies


def attack_until(deadline: float, attempt, limit: int = 200, pause: float = 0.0) -> list:
    """Repeat attempt() until deadline (at most limit times, pause apart); return its results."""
    results = []
    while time.monotonic() < deadline and len(results) < limit:
        results.append(attempt())
        time.sleep(pause)
    return results


def slowloris_wave(port: int, sockets: int = 10) -> list:
    """Open sockets that dribble a request head a byte at a time; seconds until each was dropped.

    None marks a socket that got an answer instead of being dropped.
    """
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(sockets)]
    t0 = time.monotonic()
    open_socks, result = {s: 0 for s in socks}, []
    head = b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 4000
    while open_socks and time.monotonic() - t0 < 10:
        for s in list(open_socks):
            try:
                s.send(head[open_socks[s]:open_socks[s] + 1])
                open_socks[s] += 1
            except OSError:
                pass
        for s in select.select(list(open_socks), [], [], 0.25)[0]:
            try:
                answer = s.recv(4096)
            except OSError:
                answer = b""
            result.append(time.monotonic() - t0 if answer == b"" else None)
            del open_socks[s]
            s.close()
    for s in open_socks:
        result.append(None)
        s.close()
    return result


def never_reader(port: int) -> tuple[bool, int]:
    """A client in its own room that never reads what it gets: (cut off, messages sent)."""
    return post_without_reading(RawClient(port, "/ws/sink", rcvbuf=4096, timeout=10), 15)


def bad_payload_sender(port: int) -> list:
    """Send nesting bombs and non-object payloads on one connection; [(code expected, got)]."""
    client = RawClient(port, "/ws/bombs")
    results = []
    for payload, code in BAD_PAYLOADS:
        client.send_frame(sc.OP_TEXT, payload)
        results.append((code, client.recv_json().get("code")))
        time.sleep(1.5 / RATE_BURST)              # under the rate limit: only the payload is wrong
    client.send_json({"text": "still here"})
    results.append(("message", client.recv_json()["type"]))
    client.close()
    return results


@pytest.mark.slow
def test_attackers_at_once_leave_normal_clients_untouched(serve):
    server = serve(*ABUSE_FLAGS)
    rss_start = peak_rss_kib(server.proc.pid)
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as chat:
        quiet = chat.submit(chat_pair, server.port, "quiet", QUIET_MESSAGES, CHAT_INTERVAL).result()
        deadline = time.monotonic() + ATTACK_MESSAGES * CHAT_INTERVAL
        port = server.port
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            attacks = {
                "flood": pool.submit(attack_until, deadline, lambda: flood_once(port, "flood", 300), 100, 0.1),
                "slowloris": pool.submit(attack_until, deadline, lambda: slowloris_wave(port)),
                "never_reader": pool.submit(attack_until, deadline, lambda: never_reader(port), 5),
                "garbage": pool.submit(attack_until, deadline, lambda: garbage_sender(port)),
                "origin": pool.submit(attack_until, deadline, lambda: handshake_status(
                    port, origin="https://evil.example"), 500, 0.01),
                "big_header": pool.submit(attack_until, deadline, lambda: http(
                    port, b"GET /ws HTTP/1.1\r\nX-Pad: " + b"a" * 20000)[0], 500, 0.01),
                "bad_payload": pool.submit(attack_until, deadline, lambda: bad_payload_sender(port)),
            }
            under_attack = chat.submit(chat_pair, port, "safe", ATTACK_MESSAGES, CHAT_INTERVAL).result()
            results = {name: future.result() for name, future in attacks.items()}
    metrics = scrape(server.metrics_url)
    rss_peak = peak_rss_kib(server.proc.pid)
    quiet_p50, attack_p50 = percentile(quiet, 0.5), percentile(under_attack, 0.5)
    quiet_p99, attack_p99 = percentile(quiet, 0.99), percentile(under_attack, 0.99)
    print(f"\nlatency p50/p99 quiet {quiet_p50 * 1e3:.2f}/{quiet_p99 * 1e3:.2f} ms, "
          f"under attack {attack_p50 * 1e3:.2f}/{attack_p99 * 1e3:.2f} ms; "
          f"server peak RSS {rss_start / 1024:.1f} MiB at start, {rss_peak / 1024:.1f} MiB peak; "
          f"attempts {({name: len(r) for name, r in results.items()})}")

    # Every attacker got the documented answer, every time.
    assert results["flood"] and all(errors == RATE_BURST and code == sc.CLOSE_POLICY
                                    for _, errors, code in results["flood"]), results["flood"]
    waves = [t for wave in results["slowloris"] for t in wave]
    assert waves and all(t is not None and t < 2 + 1.5 for t in waves), waves
    assert results["never_reader"] and all(cut for cut, _ in results["never_reader"])
    assert all(expected == got for run in results["garbage"] for expected, got in run), results["garbage"]
    assert results["origin"] and set(results["origin"]) == {403}
    assert results["big_header"] and set(results["big_header"]) == {431}
    assert all(expected == got for run in results["bad_payload"] for expected, got in run)

    # The normal clients lost nothing (chat_pair asserts it) and stayed fast: within a few
    # times the quiet latency, plus, for the tail, an allowance for the scheduler noise of a
    # 2-core machine that also runs every attacker.
    assert attack_p50 <= 5 * quiet_p50 + 0.001, (quiet_p50, attack_p50)
    assert attack_p99 <= 5 * quiet_p99 + 0.05, (quiet_p99, attack_p99)
    # The attacks did not make the server hoard memory.
    assert rss_peak < rss_start + 96 * 1024

    # An operator sees each attack by reason.
    floods = len(results["flood"])
    assert refused(metrics, "rate_limit") == floods * (RATE_BURST + 1)
    assert protocol_errors(metrics, sc.CLOSE_POLICY) == floods
    assert refused(metrics, "handshake_timeout") == len(waves)
    assert refused(metrics, "origin") == len(results["origin"])
    assert refused(metrics, "header_too_large") == len(results["big_header"])
    assert refused(metrics, "bad_message") == len(results["bad_payload"]) * len(BAD_PAYLOADS)
    assert dropped(metrics, "slow_consumer") == len(results["never_reader"])
    for code in PARSER_CLOSE_CODES:            # exact counts: see the test just above
        sent = sum(expected == code for run in results["garbage"] for expected, _ in run)
        assert protocol_errors(metrics, code) >= sent, code
    known = (QUIET_MESSAGES + ATTACK_MESSAGES + sum(accepted for accepted, _, _ in results["flood"])
             + len(results["bad_payload"]))
    sunk = sum(sent for _, sent in results["never_reader"])     # some arrive after the cut
    assert known <= gauge(metrics, "scalechat_messages_received_total") <= known + sunk


# ---------------------------------------------------------------------------
# One client against everyone else: each finding of the security review, at a
# small size (bench/bench_abuse.py measures them at full size)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_lone_surrogate_in_any_field_is_refused_and_no_process_dies(serve, workers):
    server = serve("--workers", workers)
    pids = children(server.proc.pid)
    client = RawClient(server.port, "/ws/surrogates")
    for payload in (b'{"message_id":1,"text":"hi","sent_at":"\\ud800"}',
                    b'{"message_id":2,"text":"\\udfff"}', b'{"message_id":3,"text":"hi","sent_at":"\\ud83d"}'):
        client.send_frame(sc.OP_TEXT, payload)
        answer = client.recv_json()
        assert answer["type"] == "error" and answer["code"] == "bad_message", answer
    assert echo_time(client, 4) < 5
    assert server.proc.poll() is None and children(server.proc.pid) == pids     # no worker restarted
    client.close()


def test_room_names_with_a_newline_are_refused(shared_server):
    for target in (b"/ws/lobby\n", b"/ws/lobby\r", b"/ws/lob\nby", b"/ws/lobby%0A"):
        status, _, _ = http(shared_server.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n"
                                     b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        assert status == 400, target


def test_a_duplicate_host_header_is_refused(shared_server):
    status, _, _ = http(shared_server.port, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert status == 400


def test_allowed_hosts_refuse_other_hosts_but_not_health_checks(serve):
    server = serve("--allowed-hosts", f"chat.example,127.0.0.1:{0}".replace(":0", ""))
    assert http(server.port, b"GET / HTTP/1.1\r\nHost: chat.example\r\n\r\n")[0] == 200
    assert http(server.port, b"GET / HTTP/1.1\r\nHost: rebound.attacker\r\n\r\n")[0] == 400
    assert http(server.port, b"GET /healthz HTTP/1.1\r\nHost: rebound.attacker\r\n\r\n")[0] == 200
    assert handshake_status(server.port) == 400                 # Host: 127.0.0.1:<port> is not listed
    assert refused(scrape(server.metrics_url), "host") == 2


def test_resends_are_checked_by_client_id_so_nobody_else_can_suppress_them(serve):
    """Mallory takes alice's name and her next message_id: alice's message still goes out,
    her acks are hers alone, and her own resend is dropped as the duplicate it is."""
    server = serve()
    alice = RawClient(server.port, f"/ws/forgery?name=alice&client={CLIENT_A}")
    mallory = RawClient(server.port, f"/ws/forgery?name=alice&client={CLIENT_B}")
    epoch = alice.welcome["epoch"]
    mallory.send_json({"message_id": 7, "text": "forged", "resend": True})
    assert mallory.recv_json(skip=("members",)) == {"type": "message", "room": "forgery", "epoch": epoch,
                                                    "seq": 1, "sender": "alice", "message_id": 7,
                                                    "text": "forged", "sent_at": None}
    assert mallory.recv_json(skip=("members",)) == {"type": "ack", "message_id": 7, "epoch": epoch, "seq": 1}
    assert alice.recv_json(skip=("members",))["text"] == "forged"      # no ack for alice
    alice.send_json({"message_id": 7, "text": "mine", "resend": True})
    assert alice.recv_json(skip=("members",))["text"] == "mine"
    assert alice.recv_json(skip=("members",)) == {"type": "ack", "message_id": 7, "epoch": epoch, "seq": 2}
    alice.send_json({"message_id": 7, "text": "mine", "resend": True})   # her own again: a duplicate
    assert alice.recv_json(skip=("members",)) == {"type": "ack", "message_id": 7, "epoch": epoch, "seq": 2,
                                                  "duplicate": True}
    assert echo_time(mallory, 8) < 5 and alice.recv_message()["seq"] == 3   # nothing came in between
    for bad in ("short", "x" * 65, "a%0Ab" * 4, "spaces%20are%20not%20allowed"):
        assert handshake_status(server.port, resource=f"/ws/forgery?client={bad}") == 400, bad
    alice.close()
    mallory.close()


def test_a_resend_is_checked_only_against_history_and_sequenced_again_once_trimmed(serve):
    server = serve("--history", "3")
    client = RawClient(server.port, f"/ws/trimmed?client={CLIENT_A}")
    epoch = client.welcome["epoch"]
    for i in range(1, 6):
        client.send_json({"message_id": i, "text": f"m{i}"})
        assert client.recv_json(skip=("members", "message")) == {"type": "ack", "message_id": i, "epoch": epoch,
                                                                 "seq": i}
    client.send_json({"message_id": 5, "text": "m5", "resend": True})
    assert client.recv_json(skip=("members",)) == {"type": "ack", "message_id": 5, "epoch": epoch, "seq": 5,
                                                   "duplicate": True}
    client.send_json({"message_id": 1, "text": "m1", "resend": True})     # no longer held: sequenced
    assert client.recv_message()["seq"] == 6
    client.close()


def test_a_replay_is_produced_as_the_socket_drains(serve):
    """20 since=0 replays of a 16 MiB room on sockets that never read: the server holds about
    a chunk for each, not a copy of the room; a reader that does read gets everything in order."""
    server = serve("--room-history-bytes", str(16 << 20), "--rate-burst", "100", "--rate-limit-bytes", "0")
    fill_room(server.port, "hoard", 40)
    victim = RawClient(server.port, "/ws/elsewhere")
    peak_before = peak_rss_kib(server.proc.pid)
    hoarders = [RawClient(server.port, "/ws/hoard?since=0", rcvbuf=4096) for _ in range(20)]
    time.sleep(1.0)
    worst = max(echo_time(victim, i) for i in range(10))
    growth = peak_rss_kib(server.proc.pid) - peak_before
    print(f"\n20 stalled replays of a 15.7 MB room: server peak RSS +{growth / 1024:.1f} MiB, victim echo max "
          f"{worst * 1e3:.1f} ms")
    assert growth < 32 * 1024                  # before: a joined copy each, 1.2 GiB for 20
    assert worst < 0.5
    reader = RawClient(server.port, "/ws/hoard?since=10", timeout=30)
    seqs = [reader.recv_message()["seq"] for _ in range(30)]
    assert seqs == list(range(11, 41))
    for c in hoarders + [victim, reader]:
        c.sock.close()


def test_a_replay_that_falls_out_of_history_is_cut_off_with_1013(serve):
    server = serve("--history", "20", "--rate-limit", "0", "--rate-limit-bytes", "0")
    writer = RawClient(server.port, "/ws/fast")
    for i in range(20):
        writer.send_json({"message_id": i, "text": "x" * 60000})
    writer.recv_message()
    slow = RawClient(server.port, "/ws/fast?since=0", rcvbuf=4096)
    for i in range(20, 200):                  # ten times the history while slow does not read
        writer.send_json({"message_id": i, "text": "x" * 60000})
    objects, code = slow.read_until_close()
    seqs = [o["seq"] for o in objects if o["type"] == "message"]
    assert code == sc.CLOSE_TRY_AGAIN_LATER             # maybe before any message: history moved first
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True
    writer.close()


def test_fragments_cost_what_they_carry(serve):
    """Two-byte continuation frames are held in one buffer: the server's memory grows by what
    they carry, not by a Python object each (the flood of frames that complete nothing is
    test_connection.py's)."""
    server = serve("--rate-limit", "0")
    client = RawClient(server.port, "/ws/fragments", timeout=30)
    peak_before = peak_rss_kib(server.proc.pid)
    frame = sc.encode_frame(sc.OP_CONTINUATION, b"ab", fin=False, mask_key=b"abcd")
    client.sock.sendall(sc.encode_frame(sc.OP_TEXT, b'{"text": "', fin=False, mask_key=b"abcd"))
    client.sock.sendall(frame * 150_000)       # 1.2 MB on the wire, 300 KB of payload
    client.sock.sendall(sc.encode_frame(sc.OP_CONTINUATION, b'"}', mask_key=b"abcd"))
    assert client.recv_json()["code"] == "too_big"      # every fragment was read by now
    growth = peak_rss_kib(server.proc.pid) - peak_before
    print(f"\n150,000 two-byte fragments: server peak RSS +{growth} KiB")
    assert growth < 3 * 1024                   # before: a bytes object a fragment, ~10 MiB
    client.close()



def test_metrics_listen_on_loopback_unless_told_otherwise():
    assert sc.parse_args([]).metrics_host == "127.0.0.1"
    assert sc.parse_args(["--host", "0.0.0.0"]).metrics_host == "127.0.0.1"
    assert sc.parse_args(["--metrics-host", "0.0.0.0"]).metrics_host == "0.0.0.0"


def test_a_redis_password_is_never_on_a_command_line_or_in_an_error(serve, tmp_path):
    url = "redis://:hunter2-secret@127.0.0.1:1/0"       # nothing listens there: the bus stays down
    server = serve("--workers", "2", env={"SCALECHAT_REDIS": url})
    deadline = time.monotonic() + 10
    while len(children(server.proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in [server.proc.pid, *children(server.proc.pid)]:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"hunter2" not in f.read()
    bad = subprocess.run([sys.executable, "scalechat.py", "--redis", "redis://:hunter2-secret@host:port/x"],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                         check=False)
    assert bad.returncode == 2 and "hunter2" not in bad.stderr and "--redis must be" in bad.stderr
