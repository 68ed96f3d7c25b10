"""The reference peer servers in bench/ speak the protocol the benchmark drives them with.

bench/run_bench.py compares scalechat.py with these peers; the comparison is
fair only while each peer welcomes, sequences, replays and broadcasts like the
server, and its frames take the load client's fast path as scalechat's do.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from loadclient import split_message
from testkit import HERE, free_port

pytestmark = pytest.mark.slow

PEERS = ["peer_websockets.py", "peer_aiohttp.py", "peer_picows.py"]
STAMPED = "0000000000000001 0000000000000002 hello"   # the send stamps the load client writes


@pytest.fixture(scope="module", params=PEERS)
def peer(request) -> str:
    """A peer server on a free port, its ws:// base URL (one per module: each test has rooms of its own)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "bench", request.param),
                             "--port", str(port)])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, f"{request.param} exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"{request.param} did not listen within 10 s"
            time.sleep(0.05)
    yield f"ws://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(5)


def receive(ws) -> dict:
    """The next frame, decoded."""
    return json.loads(ws.recv(timeout=5))


def say(ws, message_id: int, text: str) -> None:
    """Send a chat message as the load client does."""
    ws.send(json.dumps({"message_id": message_id, "text": text, "sent_at": "2026-11-28T10:00:00.000001Z"}))


def test_welcome_then_every_member_sees_every_message_in_seq_order(peer):
    with connect(f"{peer}/ws/r1?name=alice") as alice, connect(f"{peer}/ws/r1?name=bob") as bob:
        welcome = receive(alice)
        epoch = welcome["epoch"]
        assert re.fullmatch(r"[0-9a-f]{16}", epoch)
        assert welcome == {"type": "welcome", "room": "r1", "name": "alice", "epoch": epoch, "seq": 0, "members": 1}
        assert receive(bob) == {"type": "welcome", "room": "r1", "name": "bob", "epoch": epoch, "seq": 0,
                                "members": 2}
        say(alice, 1, "hi")
        say(bob, 7, "yo")
        seen = {name: [receive(ws), receive(ws)] for name, ws in (("alice", alice), ("bob", bob))}
    assert seen["alice"] == seen["bob"]
    assert [m["seq"] for m in seen["alice"]] == [1, 2]
    by_sender = {m["sender"]: m for m in seen["alice"]}
    assert by_sender["alice"] == {"type": "message", "room": "r1", "epoch": epoch, "seq": by_sender["alice"]["seq"],
                                  "sender": "alice", "message_id": 1, "text": "hi",
                                  "sent_at": "2026-11-28T10:00:00.000001Z"}
    assert (by_sender["bob"]["message_id"], by_sender["bob"]["text"]) == (7, "yo")


def test_since_replays_what_was_missed_then_goes_live(peer):
    with connect(f"{peer}/ws/r2?name=alice") as alice:
        epoch = receive(alice)["epoch"]
        for i in (1, 2, 3):
            say(alice, i, f"m{i}")
            assert receive(alice)["seq"] == i
        with connect(f"{peer}/ws/r2?name=carol&since=1&epoch={epoch}") as carol:
            welcome = receive(carol)
            assert (welcome["epoch"], welcome["seq"]) == (epoch, 3)
            assert [receive(carol)["text"] for _ in range(2)] == ["m2", "m3"]
            say(alice, 4, "live")
            assert (receive(carol)["seq"], receive(alice)["seq"]) == (4, 4)
        # since counted in another order: this room's order is replayed from its start
        with connect(f"{peer}/ws/r2?name=dave&since=3&epoch=0123456789abcdef") as dave:
            assert receive(dave)["seq"] == 4
            assert [receive(dave)["text"] for _ in range(4)] == ["m1", "m2", "m3", "live"]
        with connect(f"{peer}/ws/other") as guest:   # another room counts from 0; a guest gets a name
            welcome = receive(guest)
            assert (welcome["room"], welcome["seq"]) == ("other", 0) and welcome["epoch"] != epoch
            assert welcome["name"].startswith("guest-")


def test_broadcast_takes_the_load_clients_fast_path(peer):
    with connect(f"{peer}/ws/r3?name=c1") as ws:
        receive(ws)
        say(ws, 5, STAMPED)
        frame = ws.recv(timeout=5)
    epoch, seq, sender, message_id, sent, intended = split_message(frame.encode())
    assert (seq, sender, message_id) == (b"1", b"c1", b"5") and re.fullmatch(rb"[0-9a-f]{16}", epoch)
    assert (int(sent), int(intended)) == (1, 2)


def test_unknown_path_is_refused_before_the_upgrade(peer):
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{peer}/chat/r1", open_timeout=5)
    assert refused.value.response.status_code == 404
