"""The connection, sans-IO: bytes and a fake clock in, actions out (scalechat.py section 4).

No socket and no server process: Connection.receive is fed the bytes a client
would write, at times the test chooses, and what it asks of the server (deliver
a message, send a pong, refuse a frame, fail with a close code, drop) is read
from the actions it returns. The closing table is walked pair by pair through
Connections.move, which keeps the tables the loop's timers visit and each
deadline; Connections.expired says who is past its deadline at a given time.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import scalechat as sc
from scalechat import (
    ABORT,
    CLOSED,
    CLOSED_BY_PEER,
    CLOSING,
    CLOSING_STATES,
    DROP,
    FAILED,
    HTTP,
    MAX_DISCARD,
    MESSAGE,
    OPEN,
    REFUSE,
    SEND,
    STATE_NAMES,
    Connection,
    Connections,
    Dropped,
    Limits,
    Refused,
)
from testkit import BROKEN_FRAMES

T0 = 1000.0                         # the fake clock's start
CONFIG = SimpleNamespace(handshake_timeout=10.0, close_timeout=3.0, write_timeout=30.0)
EVENTS = sorted({event for _, event in CLOSING})


class FakeSocket:
    """What a Connection keeps of its socket: a descriptor number."""

    count = 100

    def fileno(self) -> int:
        FakeSocket.count += 1
        return FakeSocket.count


def limits(rate: float = 50, burst: float = 100, byte_rate: float = 65536, byte_burst: float = 1 << 20,
           max_message_size: int = 65536) -> Limits:
    return Limits(rate, burst, byte_rate, byte_burst, sc.max_frame_size(max_message_size))


def websocket(lim: Limits, now: float = T0) -> Connection:
    """An upgraded connection (OPEN), as the server holds it after the 101."""
    conn = Connection(FakeSocket(), "127.0.0.1", now)
    conn.state = OPEN
    conn.upgraded(lim)
    return conn


def frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    return sc.encode_frame(opcode, payload, fin, mask_key=b"abcd")


def chat_frames(count: int, text: str = "x" * 1000, first: int = 0) -> bytes:
    """count chat messages (message_id first, first + 1, ...), as one write."""
    return b"".join(frame(sc.OP_TEXT, json.dumps({"message_id": i, "text": text}).encode())
                    for i in range(first, first + count))


def receive_as_read(conn: Connection, data: bytes, now: float, lim: Limits) -> list:
    """What conn asks for data, read as a server reads a socket: RECV_SIZE bytes at a time,
    until an action ends the connection."""
    actions: list = []
    for i in range(0, len(data), sc.RECV_SIZE):
        actions += conn.receive(data[i:i + sc.RECV_SIZE], now, lim)
        if actions and actions[-1][0] in (FAILED, CLOSED_BY_PEER, DROP):
            break
    return actions


def kinds(actions: list) -> list:
    return [a[0] for a in actions]


def refused_ids(actions: list) -> list:
    """The message_ids of the rate_limit error frames among REFUSE actions (None: no error frame)."""
    ids = []
    for a in actions:
        if a[0] is REFUSE:
            ids.append(None if a[1] is None else
                       json.loads(sc.FrameParser(expect_masked=False).feed(a[1])[0][1]).get("message_id"))
    return ids


def error_of(action: tuple) -> dict:
    """The error frame of a REFUSE action, as JSON."""
    return json.loads(sc.FrameParser(expect_masked=False).feed(action[1])[0][1])


def message_ids(actions: list) -> list:
    return [json.loads(a[1])["message_id"] for a in actions if a[0] is MESSAGE]


# ---------------------------------------------------------------------------
# The closing table
# ---------------------------------------------------------------------------

# The documented map (docs and Connection's docstring say the same): every move, and no other.
EXPECTED_MOVES = {
    (HTTP, "answered"): sc.FLUSHING, (HTTP, "refused"): sc.REFUSING, (HTTP, "upgraded"): OPEN,
    (OPEN, "close"): sc.CLOSE_SENT, (OPEN, "peer close"): sc.FLUSHING, (OPEN, "too slow"): sc.FLUSHING,
    (OPEN, "fail"): sc.REFUSING, (sc.CLOSE_SENT, "peer close"): CLOSED, (sc.FLUSHING, "peer close"): CLOSED,
    (sc.FLUSHING, "sent"): CLOSED, (sc.REFUSING, "sent"): sc.LINGERING,
    **{(state, "abort"): CLOSED for state in (HTTP, OPEN, sc.CLOSE_SENT, sc.FLUSHING, sc.REFUSING, sc.LINGERING)},
}


def test_the_closing_table_is_the_documented_map():
    assert CLOSING == EXPECTED_MOVES


def test_the_closing_table_lists_every_move_and_refuses_the_rest():
    """Every (state, event) pair: the listed ones move as CLOSING says and keep the tables and the
    deadline; every other one raises, and leaves the connection as it was."""
    listed = 0
    for state in range(len(STATE_NAMES)):
        for event in EVENTS:
            registry = Connections(CONFIG)
            conn = Connection(FakeSocket(), "127.0.0.1", T0)
            registry.add(conn, T0)
            conn.state = state
            if state != HTTP:
                registry.handshaking.pop(conn.fd)
            if state in CLOSING_STATES:
                registry.closing[conn.fd] = conn
                conn.deadline = T0 - 1
            if state == CLOSED:
                registry.all.pop(conn.fd)
            target = CLOSING.get((state, event))
            if target is None:
                with pytest.raises(ValueError, match="no move"):
                    registry.move(conn, event, T0 + 5)
                assert conn.state == state
                continue
            listed += 1
            assert registry.move(conn, event, T0 + 5) == state
            assert conn.state == target
            assert (conn.fd in registry.all) == (target != CLOSED)
            assert (conn.fd in registry.handshaking) == (target == HTTP)
            assert (conn.fd in registry.closing) == (target in CLOSING_STATES)
            if target in CLOSING_STATES:            # the close deadline, from entering the first one
                assert conn.deadline == (T0 - 1 if state in CLOSING_STATES else T0 + 5 + CONFIG.close_timeout)
    assert listed == len(CLOSING)


@pytest.mark.parametrize(("path", "states"), [
    (["answered", "sent"], [sc.FLUSHING, CLOSED]),                          # a page
    (["refused", "sent", "abort"], [sc.REFUSING, sc.LINGERING, CLOSED]),    # a 404, then the peer's EOF
    (["upgraded", "peer close", "sent"], [OPEN, sc.FLUSHING, CLOSED]),      # the peer's Close, echoed
    (["upgraded", "fail", "sent", "abort"], [OPEN, sc.REFUSING, sc.LINGERING, CLOSED]),   # 1003
    (["upgraded", "close", "peer close"], [OPEN, sc.CLOSE_SENT, CLOSED]),    # a drain: 1001
    (["upgraded", "too slow", "sent"], [OPEN, sc.FLUSHING, CLOSED]),        # 1013
    (["upgraded", "abort"], [OPEN, CLOSED]),                                # EOF
])
def test_each_way_a_connection_ends_is_a_path_of_the_table(path, states):
    registry = Connections(CONFIG)
    conn = Connection(FakeSocket(), "127.0.0.1", T0)
    registry.add(conn, T0)
    walked = []
    for event in path:
        registry.move(conn, event, T0)
        walked.append(conn.state)
    assert walked == states
    assert not registry.all and not registry.handshaking and not registry.closing and not registry.blocked


# ---------------------------------------------------------------------------
# Deadlines, pings, and what a refused connection still sends
# ---------------------------------------------------------------------------

def test_deadlines_handshake_close_and_write_and_the_buffer_cap():
    """A request head not complete within --handshake-timeout, a closing peer past
    --close-timeout, an open connection whose socket stayed full past --write-timeout, and one
    whose queue passed the cap: each is named by expired() at the right time, and not before."""
    registry = Connections(CONFIG)
    silent = Connection(FakeSocket(), "127.0.0.1", T0)
    registry.add(silent, T0)
    closing = Connection(FakeSocket(), "127.0.0.1", T0)
    registry.add(closing, T0)
    registry.move(closing, "upgraded", T0)
    registry.move(closing, "close", T0 + 1)
    stalled = Connection(FakeSocket(), "127.0.0.1", T0)
    registry.add(stalled, T0)
    registry.move(stalled, "upgraded", T0)
    registry.stalled(stalled, T0 + 2)
    full = Connection(FakeSocket(), "127.0.0.1", T0)
    registry.add(full, T0)
    registry.move(full, "upgraded", T0)
    registry.stalled(full, T0)
    full.out_bytes = 65537
    assert registry.expired(T0 + 3.9, 65536) == [(full, Dropped.SLOW_CONSUMER)]
    assert registry.expired(T0 + 4.1, 1 << 20) == [(closing, Dropped.CLOSE_TIMEOUT)]
    assert registry.expired(T0 + 10.1, 1 << 20) == [(silent, Refused.HANDSHAKE_TIMEOUT),
                                                    (closing, Dropped.CLOSE_TIMEOUT)]
    registry.unstalled(full)
    assert registry.expired(T0 + 32.1, 1 << 20)[-1:] == [(stalled, Dropped.WRITE_TIMEOUT)]


def test_a_quiet_connection_is_pinged_and_dropped_if_it_never_answers():
    """Silent past --ping-interval: pinged; no pong within --pong-timeout: dropped; a pong in time
    (it pays 1/32 token) ends the wait."""
    lim = limits()
    mute, polite = websocket(lim), websocket(lim)
    assert mute.keepalive(T0 + 0.2, 0.3, 0.3) == 0
    assert mute.keepalive(T0 + 0.4, 0.3, 0.3) == 1 == polite.keepalive(T0 + 0.4, 0.3, 0.3)
    assert polite.receive(frame(sc.OP_PONG), T0 + 0.5, lim) == []
    assert mute.keepalive(T0 + 0.6, 0.3, 0.3) == 0
    assert mute.keepalive(T0 + 0.8, 0.3, 0.3) == -1
    assert polite.keepalive(T0 + 0.8, 0.3, 0.3) == 0


def test_a_refused_peer_is_read_and_ignored_then_dropped_past_the_discard_cap():
    conn = websocket(limits())
    conn.parser = None                      # refused: the answer is on its way out
    chunk = b"x" * 65536
    for _ in range(MAX_DISCARD // len(chunk)):
        assert conn.receive(chunk, T0, limits()) == []
    assert conn.receive(b"x", T0, limits()) == [(DROP,)]


def test_a_request_head_is_taken_whole_and_refused_past_the_limit():
    conn = Connection(FakeSocket(), "127.0.0.1", T0)
    head = b"GET /ws HTTP/1.1\r\nHost: h"
    assert conn.take_request(head, 8192) is None
    assert conn.take_request(b"\r\n\r\nrest", 8192) == (head, b"rest", head + b"\r\n\r\nrest")
    with pytest.raises(sc.HandshakeError) as refused:
        Connection(FakeSocket(), "127.0.0.1", T0).take_request(b"GET / HTTP/1.1\r\nX: " + b"a" * 9000, 8192)
    assert refused.value.status == 431


# ---------------------------------------------------------------------------
# The rate limit: messages, bytes, pings, pongs, fragments
# ---------------------------------------------------------------------------

def test_a_burst_past_the_bucket_in_one_write_gets_an_error_per_message():
    """Messages past the bucket that arrive in one read are each refused with an error frame,
    not closed as "too many frames"; past --rate-burst refusals the connection gets 1008."""
    burst = 100
    lim = limits(rate=0.01, burst=burst)               # no token refills meanwhile
    conn = websocket(lim)
    actions = receive_as_read(conn, chat_frames(burst + 100), T0, lim)     # about 64 to a read
    assert message_ids(actions) == list(range(burst))
    assert refused_ids(actions) == list(range(burst, burst + 100))
    assert FAILED not in kinds(actions)
    conn = websocket(lim)
    actions = receive_as_read(conn, chat_frames(2 * burst + 50), T0, lim)
    assert message_ids(actions) == list(range(burst))
    assert refused_ids(actions) == [*range(burst, 2 * burst), None]     # the last one: refused, and...
    assert actions[-1] == (FAILED, sc.CLOSE_POLICY, "rate limit exceeded repeatedly")


def test_a_flooder_gets_error_frames_then_1008():
    lim = limits(rate=5, burst=5)
    actions = receive_as_read(websocket(lim), chat_frames(40, "hi"), T0, lim)
    assert message_ids(actions) == list(range(5))
    assert refused_ids(actions) == [5, 6, 7, 8, 9, None] and actions[-1][:2] == (FAILED, sc.CLOSE_POLICY)


def test_a_client_within_the_rate_is_never_refused():
    lim = limits(rate=20, burst=2)
    conn = websocket(lim)
    for i in range(20):
        assert kinds(conn.receive(chat_frames(1, "calm", first=i), T0 + 0.1 * i, lim)) == [MESSAGE]


def test_a_refusal_says_when_the_bucket_holds_a_token_again():
    """retry_after is the time until the bucket refills to one token, rounded up to the ms: a
    message sent that much later passes, one sent earlier is refused again."""
    lim = limits(rate=3, burst=3)
    conn = websocket(lim)
    assert kinds(conn.receive(chat_frames(3, "hi"), T0, lim)) == [MESSAGE] * 3
    actions = conn.receive(chat_frames(1, "hi", first=3), T0 + 0.1, lim)      # 0.3 tokens by now
    assert error_of(actions[0]) == {"type": "error", "code": "rate_limit", "message_id": 3,
                                    "reason": "more than 3 messages per second", "retry_after": 0.234}
    assert refused_ids(conn.receive(chat_frames(1, "hi", first=3), T0 + 0.3, lim)) == [3]
    assert kinds(conn.receive(chat_frames(1, "hi", first=3), T0 + 0.1 + 0.234, lim)) == [MESSAGE]


def test_a_client_that_waits_out_each_retry_after_is_never_closed():
    """Strikes are forgiven as tokens come back: a client that overshoots now and then but waits
    retry_after each time gets many more refusals than --rate-burst over its life, and stays; one
    that keeps sending while refused is still closed with 1008."""
    lim = limits(rate=5, burst=5)
    conn = websocket(lim)
    assert kinds(conn.receive(chat_frames(5, "hi", first=100), T0, lim)) == [MESSAGE] * 5     # the bucket spent
    now, refusals = T0, 0
    for i in range(0, 60, 2):           # each turn, one message too many: refused, then waited out
        actions = conn.receive(chat_frames(2, "hi", first=i), now, lim)
        assert FAILED not in kinds(actions)
        refusals += len(refused_ids(actions))
        now += max(error_of(a)["retry_after"] for a in actions if a[0] is REFUSE)
    assert refusals >= 3 * lim.burst
    actions = receive_as_read(conn, chat_frames(20, "hi", first=200), now, lim)
    assert actions[-1][:2] == (FAILED, sc.CLOSE_POLICY)


def test_a_byte_rate_refuses_heavy_messages_the_message_rate_lets_through():
    """A message pays its frame's payload in bytes; one over the bytes left gets rate_limit (the
    reason says bytes) and a strike, while a small one still passes."""
    largest = sc.max_frame_size(65536)
    lim = limits(byte_rate=1, byte_burst=largest, burst=3)
    conn = websocket(lim)
    heavy = json.dumps({"message_id": 1, "text": "\x01" * 65536}).encode()
    assert kinds(conn.receive(frame(sc.OP_TEXT, heavy), T0, lim)) == [MESSAGE]
    light = json.dumps({"message_id": 2, "text": "x" * 2000}).encode()
    actions = conn.receive(frame(sc.OP_TEXT, light), T0, lim)
    assert refused_ids(actions) == [2]
    # At 1 byte a second, the bucket holds the light message's bytes again in this many seconds.
    retry_after = float(len(light) - (largest - len(heavy)))
    assert error_of(actions[0]) == {"type": "error", "code": "rate_limit", "message_id": 2,
                                    "reason": "more than 1 bytes per second", "retry_after": retry_after}
    assert kinds(conn.receive(chat_frames(1, "hi", first=3), T0, lim)) == [MESSAGE]
    actions = conn.receive(chat_frames(3, "x" * 2000), T0, lim)        # strikes 2 and 3, then 1008
    assert refused_ids(actions) == [0, 1, None] and actions[-1][:2] == (FAILED, sc.CLOSE_POLICY)


def test_the_byte_burst_must_hold_the_largest_frame():
    """A bucket smaller than the largest frame would refuse that frame forever: a start error."""
    largest = sc.max_frame_size(65536)
    assert sc.parse_args(["--rate-burst-bytes", str(largest)]).rate_burst_bytes == largest
    with pytest.raises(SystemExit):
        sc.parse_args(["--rate-burst-bytes", str(largest - 1)])
    assert sc.parse_args(["--rate-burst-bytes", "1", "--rate-limit-bytes", "0"]).rate_burst_bytes == 1


def test_a_ping_flood_is_limited_like_messages():
    lim = limits(rate=20, burst=20)
    actions = websocket(lim).receive(frame(sc.OP_PING, b"p") * 5000, T0, lim)
    assert kinds(actions).count(SEND) == 20 and actions[-1][:2] == (FAILED, sc.CLOSE_POLICY)
    assert len(actions) == 20 + 21 + 1                  # pongs, 21 refusals, the failure: then nothing


def test_frames_that_complete_nothing_pay_the_rate_limit():
    """Empty continuations and unsolicited pongs cost 1/32 of a token each: a flood of them is
    closed with 1008, having cost no more than its tokens; pongs within the rate pass silently."""
    lim = limits(rate=50, burst=100)
    conn = websocket(lim)
    assert conn.receive(frame(sc.OP_TEXT, b"{", fin=False), T0, lim) == []
    actions = conn.receive(frame(sc.OP_CONTINUATION, b"", fin=False) * 20_000, T0, lim)
    assert actions == [(REFUSE, None), (FAILED, sc.CLOSE_POLICY, "too many frames")]
    assert conn.parser.frames <= 100 * 32 + 100 + 2     # parsed only what its tokens and strikes allow
    conn = websocket(lim)
    actions = conn.receive(frame(sc.OP_PONG) * 20_000, T0, lim)
    assert set(refused_ids(actions)) == {None} and actions[-1][:2] == (FAILED, sc.CLOSE_POLICY)
    assert websocket(lim).receive(frame(sc.OP_PONG) * 32, T0, lim) == []


@pytest.mark.parametrize(("data", "code"), BROKEN_FRAMES)
def test_each_broken_frame_fails_with_its_close_code_before_any_payload(data, code):
    """Reserved bits or opcodes, an unmasked or oversized frame, a bad close code, binary, bad
    UTF-8: the read ends in FAILED with the frame's close code, and nothing is delivered."""
    lim = limits()
    actions = websocket(lim).receive(data, T0, lim)
    assert MESSAGE not in kinds(actions) and actions[-1][:2] == (FAILED, code)


def test_without_a_rate_limit_nothing_is_refused_and_a_close_ends_the_read():
    lim = limits(rate=0, byte_rate=0)
    conn = websocket(lim)
    data = chat_frames(500, "hi") + frame(sc.OP_CLOSE, b"\x03\xe8") + chat_frames(1, "after")
    actions = conn.receive(data, T0, lim)
    assert kinds(actions) == [MESSAGE] * 500 + [CLOSED_BY_PEER] and actions[-1][1] == b"\x03\xe8"


def test_a_violation_after_valid_frames_delivers_them_first():
    lim = limits()
    actions = websocket(lim).receive(chat_frames(2, "ok") + frame(sc.OP_BINARY, b"\x00"), T0, lim)
    assert kinds(actions) == [MESSAGE, MESSAGE, FAILED] and actions[-1][1] == sc.CLOSE_UNSUPPORTED_DATA


def test_an_abort_closes_from_every_state_but_closed():
    assert {state for state, event in CLOSING if event == ABORT} == set(range(len(STATE_NAMES))) - {CLOSED}
