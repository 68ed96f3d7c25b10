"""The chat layer fuzzed against live servers: a short run of the chat fuzzer.

The chat fuzzer (testkit_fuzz_chat.py; bench/fuzz_chat.py runs it for minutes
per mode) makes structure-aware cases (chat JSON for every field, upgrade query
strings, frame sequences, resends) and checks each one on live servers against
a reference model of docs/protocol.md: the answers each frame gets, what a
watcher in the room receives, that no process died or restarted, and that a
victim in another room keeps its echo within 2 s. Here it runs a few
hundred cases on one process, on --workers 2 and on two instances sharing a
private redis-server, with the run's seed (conftest.py: SCALECHAT_TEST_SEED, or
one drawn for the run and printed); a failure names the smallest input found
and the command that replays it. The model's and the checks' own tests
come first: they show that each can fail.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import time

import pytest

import scalechat as sc
import testkit_fuzz_chat as fc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CASES = {"json": 200, "frames": 100, "query": 70, "resend": 30}     # per mode
Accept, Refuse, BAD_JSON = fc.Accept, fc.Refuse, fc.BAD_JSON


@pytest.fixture
def live(tmp_path):
    """Start the servers of a mode (with its victim); stop them after the test."""
    targets = []

    def start(mode: str) -> fc.Target:
        if mode == "redis" and shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed (.ci/run installs it): the --redis mode cannot be fuzzed")
        targets.append(fc.Target(mode, str(tmp_path)).start())
        return targets[-1]
    yield start
    for target in targets:
        target.stop()


# ---------------------------------------------------------------------------
# The reference model
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("payload, answers", [
    (b'{"message_id":1,"text":"hi","sent_at":"\\ud800"}', {Refuse("bad_message", 1)}),
    (b'{"message_id":1,"text":"hi","sent_at":"2026-11-28T10:00:00.123456Z"}',
     {Accept(1, "hi", "2026-11-28T10:00:00.123456Z", False)}),
    (b'{"text":"x","sent_at":"2026-11-28T10:00:00Z\\n"}', {Refuse("bad_message")}),
    (b'{"message_id":9223372036854775807,"text":"x"}', {Accept(2**63 - 1, "x", None, False)}),
    (b'{"message_id":-9223372036854775808,"text":"x"}', {Refuse("bad_message")}),
    (b'{"message_id":1.0,"text":"x"}', {Refuse("bad_message")}),
    (b'{"message_id":NaN,"text":"x"}', {Refuse("bad_message"), BAD_JSON}),
    (b'{"message_id":' + b"9" * 5000 + b',"text":"x"}', {Refuse("bad_message"), BAD_JSON}),
    (b'{"text":"\\ud83d\\ude00\\u0000\\u200f"}', {Accept(None, "\U0001f600\x00\u200f", None, False)}),
    (b'{"message_id":3,"text":"a\\udfffb"}', {Refuse("bad_message", 3)}),
    (b'{"message_id":3,"text":""}', {Refuse("missing_text", 3)}),
    (b'{"message_id":3,"text":7}', {Refuse("missing_text", 3), Refuse("bad_message", 3)}),
    (b'{"text":"' + b"a" * fc.MAX_MESSAGE_SIZE + b'"}', {Accept(None, "a" * fc.MAX_MESSAGE_SIZE, None, False)}),
    (b'{"text":"' + b"a" * (fc.MAX_MESSAGE_SIZE - 1) + "é".encode() + b'"}', {Refuse("too_big")}),
    (b'{"\\u0074ext":"x","resend":true,"message_id":2}', {Accept(2, "x", None, True)}),
    (b'{"message_id":4,"text":"x","\\ud800":1}', {Accept(4, "x", None, False), Refuse("bad_message", 4)}),
    (b'{"text":"x","resend":"true"}', {Accept(None, "x", None, False)}),
    (b'{"text":"x","text":""}', {Accept(None, "x", None, False), Refuse("missing_text"), BAD_JSON,
                                 Refuse("bad_message")}),
    (b'\xef\xbb\xbf{"text":"x"}', {Accept(None, "x", None, False), BAD_JSON}),
    (b'{"text":"x","a":' + b"[" * 3000 + b"]" * 3000 + b"}", {BAD_JSON}),
    (b'\t{ "text" :\r\n"x" }\n', {Accept(None, "x", None, False)}),
    (b'{\xc2\xa0"text":"x"}', {BAD_JSON}),
    (b'[{"text":"x"}]', {Refuse("bad_message")}),
    (b'{"text":"x"} {}', {BAD_JSON}),
])
def test_model_allows_exactly_the_documented_answers(payload, answers):
    assert fc.classify(payload) == answers


@pytest.mark.parametrize("resource, statuses, upgrades", [
    ("/ws", set(), [fc.Upgrade("lobby", None, None)]),
    ("/ws/lobby\n", {400}, []),
    ("/ws/" + "a" * 65, {400}, []),
    ("/ws/..?since=3&name=%E2%80%8F", {400}, []),
    ("/ws/a?name=%ED%A0%80", set(), [fc.Upgrade("a", "\ufffd" * 3, None)]),
    ("/ws/a?since=-1", {400}, []),
    ("/ws/a?since=1&since=2", {400}, [fc.Upgrade("a", None, 1), fc.Upgrade("a", None, 2)]),
    ("/ws/a?client=" + "a" * 15, {400}, []),
    ("/ws/a?client=" + "a" * 16 + "%0A", {400}, []),
    ("/ws/a?client=" + "a" * 64 + "&name=" + "x" * 32, set(), [fc.Upgrade("a", "x" * 32, None)]),
    ("/ws/a?since=3&epoch=0123456789abcdef", set(), [fc.Upgrade("a", None, 3, "0123456789abcdef")]),
    ("/ws/a?since=3&epoch=0123456789ABCDEF", {400}, []),
])
def test_model_of_the_upgrade_query(resource, statuses, upgrades):
    assert fc.query_outcomes(resource) == (frozenset(statuses), upgrades)


def test_model_of_frame_sequences():
    text, cont = sc.OP_TEXT, sc.OP_CONTINUATION
    events, close, read, left = fc.frame_events([
        fc.Frame(text, b'{"te', fin=False), fc.Frame(sc.OP_PING, b"p"), fc.Frame(cont, b"", fin=False),
        fc.Frame(sc.OP_PONG, b"q"), fc.Frame(cont, b'xt":"\xc3', fin=False), fc.Frame(cont, b'\xa9"}'),
        fc.Frame(text, b"\xff"), fc.Frame(sc.OP_PING, b"late")])
    assert events == [("pong", b"p"), ("chat", '{"text":"é"}'.encode())]
    assert (close, read, left) == ({sc.CLOSE_INVALID_DATA}, 7, ())
    events, close, read, left = fc.frame_events([fc.Frame(text, b"{", fin=False)])
    assert (events, close, left) == ([], None, (fc.Frame(text, b"{", fin=False),))
    assert fc.frame_events([fc.Frame(cont, b"}")], left)[:2] == ([("chat", b"{}")], None)
    assert fc.frame_events([fc.Frame(text, b"{}")], left)[1] == {sc.CLOSE_PROTOCOL_ERROR}
    assert fc.frame_events([fc.Frame(sc.OP_BINARY, b"x")], left)[1] == {sc.CLOSE_PROTOCOL_ERROR,
                                                                          sc.CLOSE_UNSUPPORTED_DATA}
    for body, codes in [(b"", {1005, 1000}), (b"\x03", {1002}), (b"\x0f\xa0", {4000, 1000}),
                        (b"\x03\xed", {1002}), (b"\x03\xe8\xff", {1007}), (b"\x13\x88", {1002})]:
        assert fc.frame_events([fc.Frame(sc.OP_CLOSE, body), fc.Frame(text, b"{}")])[1:3] == (codes, 1), body
    assert fc.frame_events([fc.Frame(text, declared=fc.HARD + 1)])[1] == {sc.CLOSE_TOO_BIG}
    assert fc.frame_events([fc.Frame(text, b"{}", masked=False)])[1] == {sc.CLOSE_PROTOCOL_ERROR}


@pytest.mark.parametrize("payload", [
    b'{"type":"message","text":"a\nb"}', b'{"type":"x","n":NaN}', b'{"type":"x","type":"y"}',
    b'{"type":"x","text":"\\ud800"}', b'{"type":"x"} x'])
def test_a_member_takes_only_strict_json(payload):
    with pytest.raises(fc.Finding) as e:
        fc.strict_json(payload)
    assert e.value.kind == "json"


@pytest.mark.parametrize("obj", [
    {"type": "message", "room": "r", "seq": 1, "sender": "a", "text": "x", "client": "secret"},
    {"type": "ack", "message_id": 1, "seq": 0},
    {"type": "error", "code": "oops", "reason": ""},
    {"type": "message", "room": "other", "seq": 1, "sender": "a", "text": "x"},
    {"type": "hello"}])
def test_server_frames_carry_only_documented_fields(obj):
    with pytest.raises(fc.Finding):
        fc.check_server_object(obj, "r")


# ---------------------------------------------------------------------------
# The checks on live servers can fail
# ---------------------------------------------------------------------------

def test_a_wrong_answer_is_found_and_reduced(live, monkeypatch):
    """With a model that wrongly accepts a frame without text, the server's missing_text is a
    finding, and the case is reduced to the smallest frame that still shows it."""
    model = fc.classify

    def accepts_missing_text(payload, max_size=fc.MAX_MESSAGE_SIZE):
        return frozenset(Accept(a.message_id, "", None, False) if a == Refuse("missing_text", a.message_id) else a
                         for a in model(payload, max_size))
    monkeypatch.setattr(fc, "classify", accepts_missing_text)
    fuzzer = fc.Fuzzer(live("single"), random.Random(0))
    case = fc.JsonCase([("x", '"x"', "[1]"), ("text", '"text"', '""'),
                        ("sent_at", '"sent_at"', '"2026-11-28T10:00:00Z"')], spacing=7)
    with pytest.raises(fc.Finding) as e:
        fuzzer.run(case)
    assert e.value.kind == "answer" and "missing_text" in e.value.message
    smallest, finding = fuzzer.reduce(case, e.value, 30)
    assert smallest.payload() == b"{}" and finding.kind == "answer"


def test_a_worker_restart_and_a_stalled_server_are_findings(live):
    workers = live("workers")
    workers.check()
    os.kill(workers.pids[0], signal.SIGKILL)
    time.sleep(0.1)
    with pytest.raises(fc.Finding) as e:
        workers.check()
    assert e.value.kind == "crash"
    single = live("single")
    single.victim.check()
    single.servers[0].proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(fc.Finding) as e:
            single.victim.check()
        assert e.value.kind == "stall"
    finally:
        single.servers[0].proc.send_signal(signal.SIGCONT)


def test_a_message_nobody_sent_is_a_finding(live):
    fuzzer = fc.Fuzzer(live("single"), random.Random(0))
    fuzzer.run(fc.gen_json(random.Random(1)))
    intruder = fuzzer.batch.open_peer(None)
    intruder.send_json({"text": "unannounced"})
    with pytest.raises(fc.Finding) as e:
        fuzzer.batch.watch()
    assert "no client sent" in e.value.message
    intruder.close()


# ---------------------------------------------------------------------------
# The fuzzing itself
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", fc.MODES)
def test_live_servers_answer_every_case_as_the_protocol_says(live, mode, seed, replay):
    fuzzer = fc.Fuzzer(live(mode), random.Random(f"{seed}-{mode}"))
    found = fuzzer.fuzz(counts=CASES, reduce_seconds=20)
    assert found is None, f"seed {seed}: {found[1]}\nsmallest input: {found[0]}\nreplay: {replay}"
    assert fuzzer.counts == CASES
