"""Browser tests of the demo client (static/): Debian's Chromium driven by
Playwright against real scalechat.py processes on loopback.

Run: python -m pytest -q test_browser.py
Needs: pip install playwright (no browser download: /usr/bin/chromium is used).

The client's state is read from the DOM hooks it keeps for this purpose:
#status[data-state], #members[data-count], #messages li.msg[data-seq] (and
data-epoch, the order the seq counts in).
Every test also fails on an uncaught page error or a Content-Security-Policy
violation (the server sends a strict CSP with the page).
"""
from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import websocket
from playwright.sync_api import expect, sync_playwright

from testkit import HERE, RedisServer, ServerProc, sample, scrape
from testkit_browser import Chat, Network, join, launch_chromium

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module; each person gets a fresh context (profile)."""
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def people(browser):
    """join(base_url, name, room) -> Chat; at the end, no page may have failed or broken the CSP."""
    chats: list[Chat] = []

    def open_chat(base_url: str, name: str, room: str, network: Network | None = None) -> Chat:
        chat = join(browser, base_url, name, room, network)
        chats.append(chat)
        return chat

    yield open_chat
    errors = [f"{c.name}: {e}" for c in chats for e in c.errors]
    for chat in chats:
        chat.page.context.close()
    assert errors == []


# ---------------------------------------------------------------------------
# Talking
# ---------------------------------------------------------------------------

def test_two_pages_exchange_messages_both_ways(server, people):
    alice = people(server.http, "alice", "pair")
    bob = people(server.http, "bob", "pair")
    hello, reply = "hello bob", "hi alice, line one\nand line two"
    alice.send(hello)
    bob.message(hello).wait_for()
    bob.send(reply)
    alice.message(reply).wait_for()

    for chat, mine, theirs, other_name in ((alice, hello, reply, "bob"), (bob, reply, hello, "alice")):
        chat.expect_message_count(2)
        assert chat.texts() == [hello, reply]
        assert chat.seqs() == [1, 2]
        own, other = chat.message(mine), chat.message(theirs)
        expect(own).to_have_class(re.compile(r"\bown\b"))
        expect(other).not_to_have_class(re.compile(r"\bown\b"))
        expect(other.locator(".sender")).to_have_text(other_name)
        expect(own.locator("time")).to_have_attribute("datetime", re.compile(r"^\d{4}-\d\d-\d\dT"))
        # One's own message is on the right, the other's on the left.
        own_box = own.locator(".bubble").bounding_box()
        other_box = other.locator(".bubble").bounding_box()
        list_box = chat.page.locator("#messages").bounding_box()
        assert own_box["x"] + own_box["width"] == pytest.approx(list_box["x"] + list_box["width"], abs=2)
        assert other_box["x"] > list_box["x"] and own_box["x"] > other_box["x"] + 50


def test_message_html_is_shown_as_text(server, people):
    alice = people(server.http, "alice", "html")
    bob = people(server.http, "bob", "html")
    dialogs: list[str] = []
    bob.page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    payload = ('<img src="x" onerror="alert(1)"><b>bold</b>'
               '<script>document.title="owned"</script>&amp; <a href="javascript:alert(2)">x</a>')
    alice.send(payload)
    shown = bob.message(payload)
    shown.wait_for()
    assert shown.locator(".text").text_content() == payload
    assert shown.locator(".text").evaluate("p => p.childElementCount") == 0
    assert bob.page.locator("#messages img, #messages b, #messages script, #messages a").count() == 0
    bob.page.wait_for_timeout(300)     # give a stray onerror handler the chance to run
    assert dialogs == []
    assert bob.page.title() != "owned"


def test_member_count_follows_joins_and_leaves(server, people):
    alice = people(server.http, "alice", "count")
    alice.expect_members(1)
    bob = people(server.http, "bob", "count")
    bob.expect_members(2)
    alice.expect_members(2)
    expect(alice.page.locator("#members")).to_have_text("2 online")
    bob.page.close()
    alice.expect_members(1)


def test_name_is_remembered_and_the_hash_picks_the_room(server, people):
    alice = people(server.http, "alice", "first")
    bob = people(server.http, "bob", "second")
    carol = people(server.http, "carol", "first")

    alice.page.reload()                          # the name comes back from localStorage
    expect(alice.page.locator("#join")).not_to_be_visible()
    alice.expect_state("online")
    expect(alice.page.locator("#me-name")).to_have_text("alice")

    alice.page.goto(f"{server.http}/#second")    # switching room is just the URL
    expect(alice.page.locator("#room")).to_have_text("second")
    alice.expect_state("online")
    assert alice.sockets[-1].startswith(f"ws://127.0.0.1:{server.port}/ws/second?")
    alice.send("moved over")
    bob.message("moved over").wait_for()
    carol.send("still in first")
    carol.message("still in first").wait_for()
    alice.expect_message_count(1)
    assert alice.texts() == ["moved over"]


def test_same_name_cannot_settle_or_suppress_the_page_message(server, people):
    # Mallory connects under alice's name (without the page's client id) and posts
    # the message_id alice's page gives its next message, while that message is lost
    # on its way. Her copy must neither settle alice's outbox nor make the server drop
    # alice's resend; a resend the server already holds must be shown once.
    network = Network()
    alice = people(server.http, "alice", "forge", network=network)
    mallory = websocket.create_connection(f"{server.url}/forge?name=alice", timeout=10)

    def mallory_sees(text: str) -> dict:
        """The room's message with this text, as mallory reads it. The page's sockets go
        through Playwright routes, which run only while Playwright is called: wait in it."""
        deadline = time.monotonic() + 15
        while True:
            while not select.select([mallory.sock], [], [], 0)[0]:
                assert time.monotonic() < deadline, f"mallory never saw {text!r}"
                alice.page.wait_for_timeout(20)
            frame = json.loads(mallory.recv())
            if frame["type"] == "message" and frame["text"] == text:
                return frame

    alice.send("hello")
    next_id = mallory_sees("hello")["message_id"] + 1

    network.lose_sent = True
    alice.send("mine")                              # sent, lost on the way
    mallory.send(json.dumps({"message_id": next_id, "text": "forged"}))
    alice.message("forged").wait_for()
    pending = alice.page.locator("#messages li[data-pending] .text")
    expect(pending).to_have_text(["mine"])          # the forged copy settles nothing
    network.cut()
    alice.expect_state("reconnecting")
    network.restore()
    alice.message("mine").wait_for()
    assert mallory_sees("mine")["message_id"] == next_id   # the resend was not taken for mallory's
    expect(pending).to_have_count(0)

    network.lose_received = True
    alice.send("once")                              # the server has it; its copy and ack are lost
    mallory_sees("once")
    expect(pending).to_have_text(["once"])
    network.cut()
    alice.expect_state("reconnecting")
    network.restore()
    alice.message("once").wait_for()                # replayed; the resend is acked as a duplicate
    expect(pending).to_have_count(0)
    alice.expect_state("online")
    assert alice.texts() == ["hello", "forged", "mine", "once"]
    assert alice.seqs() == [1, 2, 3, 4]
    mallory.close()
    check = websocket.create_connection(f"{server.url}/forge", timeout=10)
    assert json.loads(check.recv())["seq"] == 4     # nothing was posted twice
    check.close()
    ids = {re.search(r"[?&]client=([^&]*)", url).group(1) for url in alice.sockets}
    assert len(alice.sockets) >= 3 and len(ids) == 1 and re.fullmatch(r"[A-Za-z0-9_-]{22}", ids.pop())


# ---------------------------------------------------------------------------
# Falling behind, flooding, restarts
# ---------------------------------------------------------------------------

HISTORY_GONE = "earlier history is gone"     # the line a page shows when the room's order began again

def flood(server: ServerProc, room: str, count: int, size: int) -> None:
    """Another member posts count messages of size bytes at once, discarding its echoes unread."""
    ws = websocket.create_connection(f"{server.url}/{room}?name=bot", timeout=10)
    assert json.loads(ws.recv())["type"] == "welcome"

    def discard_echoes() -> None:
        while ws.sock.recv(1 << 20):     # raw bytes: the bot must never be the slow consumer
            pass

    drain = threading.Thread(target=discard_echoes, daemon=True)
    drain.start()
    for i in range(count):
        ws.send(json.dumps({"message_id": i + 1, "text": f"log {i + 1:04d} " + "." * size}))
        time.sleep(0)                    # let the drain thread have the GIL between sends
    ws.sock.shutdown(socket.SHUT_WR)     # the server reads every frame, then sees EOF
    drain.join(20)
    ws.shutdown()


def test_slow_reader_cut_off_with_1013_catches_up_without_gap_or_duplicate(serve, people):
    # A small per-connection buffer and no rate limit: a page that stops reading
    # while another member posts ~9 MB falls behind and the server cuts it off.
    # The room keeps all of it (16 MiB), so the page can catch up without a gap.
    server = serve("--max-buffer", "262144", "--rate-limit", "0", "--rate-limit-bytes", "0",
                   "--room-history-bytes", str(16 << 20))
    reader = people(server.http, "reader", "busy")
    writer = people(server.http, "writer", "busy")
    count = 300
    # Keep the reader's main thread busy for 3 s: the browser stops draining its socket.
    reader.page.evaluate("() => { setTimeout(() => { const end = Date.now() + 3000;"
                         " while (Date.now() < end) {} }, 0); }")
    with reader.page.expect_websocket(timeout=30_000):    # the reconnect after the cut
        flood(server, "busy", count, 30_000)
        writer.send("written while you were cut off")

    for chat in (reader, writer):       # the writer may have been cut off too: same rule
        chat.message("written while you were cut off").wait_for(timeout=30_000)
        chat.expect_message_count(count + 1)
        assert chat.seqs() == list(range(1, count + 2))
    resumed = [int(re.search(r"since=(\d+)", url).group(1)) for url in reader.sockets[1:]]
    assert resumed and all(0 < since <= count for since in resumed)
    # Every reconnect of either page followed a cut-off, and every cut-off was a reconnect.
    cuts = len(reader.sockets) - 1 + len(writer.sockets) - 1
    assert sample(scrape(server.metrics_url), "scalechat_dropped_clients_total", reason="slow_consumer") == cuts
    reader.expect_state("online")


def write_offline(chat: Chat, network: Network, texts: list[str]) -> None:
    """Cut the page's network, type texts into the composer, then bring the network back (the
    browser's "online" event: the page reconnects without waiting out its backoff)."""
    network.cut()
    chat.page.context.set_offline(True)
    chat.expect_state("reconnecting")
    for text in texts:
        chat.send(text)
    expect(chat.page.locator("#messages li[data-pending]")).to_have_count(len(texts))
    network.restore()
    chat.page.context.set_offline(False)


def test_a_backlog_written_offline_goes_out_at_the_servers_pace(serve, people):
    """3x the server's burst written offline: after the reconnect the page sends it within the
    limits the welcome announced, so every message is delivered, in order, none marked "not
    sent", and the server refuses next to nothing."""
    burst = 10
    server = serve("--rate-limit", "20", "--rate-burst", str(burst))
    network = Network()
    alice = people(server.http, "alice", "backlog", network=network)
    texts = [f"offline {i}" for i in range(3 * burst)]
    write_offline(alice, network, texts)
    alice.expect_state("online")
    alice.expect_message_count(len(texts), timeout=30_000)
    assert alice.texts() == texts and alice.seqs() == list(range(1, len(texts) + 1))
    expect(alice.page.locator("#messages li.failed")).to_have_count(0)
    expect(alice.page.locator("#messages li.pending")).to_have_count(0)
    assert sample(scrape(server.metrics_url), "scalechat_refused_total", reason="rate_limit") <= burst // 2


def without_limits(message: str) -> str:
    """A server frame as a server from before welcome.limits would send it."""
    frame = json.loads(message)
    frame.pop("limits", None)
    return json.dumps(frame)


def test_a_page_refused_over_the_rate_sends_again_and_comes_back_after_1008(serve, people):
    """A server that announces no limits (an older one): the page's backlog goes out at once, past
    the burst. What is refused with rate_limit waits out retry_after and goes again, and a 1008
    close is followed by a reconnect: every message is delivered, none marked "not sent"."""
    server = serve("--rate-limit", "5", "--rate-burst", "2")
    network = Network(rewrite=without_limits)
    alice = people(server.http, "alice", "flood", network=network)
    texts = [f"typed {i}" for i in range(8)]
    write_offline(alice, network, texts)
    alice.expect_message_count(len(texts), timeout=30_000)
    assert sorted(alice.texts()) == texts
    expect(alice.page.locator("#messages li.failed")).to_have_count(0)
    expect(alice.page.locator("#messages li.pending")).to_have_count(0)
    metrics = scrape(server.metrics_url)
    assert sample(metrics, "scalechat_refused_total", reason="rate_limit") >= 3       # refused, and...
    assert sample(metrics, "scalechat_protocol_errors_total", code="1008") >= 1          # ...closed
    assert len(alice.sockets) >= 3      # the first, the one after the cut, one after each 1008
    alice.expect_state("online")


def test_server_restart_pages_come_back_and_talk_again(serve, people):
    first = serve()
    alice = people(first.http, "alice", "restart")
    bob = people(first.http, "bob", "restart")
    alice.send("before the restart")
    bob.message("before the restart").wait_for()

    first.stop(signal.SIGTERM)
    for chat in (alice, bob):
        chat.expect_state("reconnecting")
        expect(chat.page.locator("#status-text")).to_contain_text("Reconnecting")
    bob.send("written while the server was down")   # waits in bob's outbox
    expect(bob.page.locator("#messages li[data-pending] .text")).to_have_text(
        ["written while the server was down"])
    second = serve(port=first.port)           # same address, empty in-memory history

    for chat in (alice, bob):
        chat.expect_state("online")
        chat.expect_members(2)
        expect(chat.page.locator("#messages li.system")).to_contain_text(HISTORY_GONE)
    alice.message("written while the server was down").wait_for()
    alice.send("and back")
    bob.message("and back").wait_for()
    for chat in (alice, bob):
        assert chat.texts() == ["before the restart", "written while the server was down", "and back"]
        assert chat.seqs() == [1, 1, 2]         # the new server counts from 1 again
    expect(bob.page.locator("#messages li.pending")).to_have_count(0)
    assert sample(scrape(second.metrics_url), "scalechat_messages_received_total") == 2


def test_page_that_missed_a_restart_takes_the_new_history_whole(serve, people):
    # Alice's network is down while the server restarts and bob already writes
    # seq 1-3 of the new history: her `since` looks valid but points into another history.
    first = serve()
    network = Network()
    alice = people(first.http, "alice", "epoch", network=network)
    bob = people(first.http, "bob", "epoch")
    alice.send("old one")
    bob.send("old two")
    alice.expect_message_count(2)

    network.cut()
    alice.page.context.set_offline(True)      # and the browser's "offline" event
    first.stop(signal.SIGTERM)
    serve(port=first.port)
    bob.expect_state("online")
    for text in ("new one", "new two", "new three"):
        bob.send(text)
    bob.message("new three").wait_for()
    alice.expect_state("reconnecting")

    network.up = True
    alice.page.context.set_offline(False)     # the browser's "online" event: no backoff wait
    alice.message("new three").wait_for()
    assert alice.texts() == ["old one", "old two", "new one", "new two", "new three"]
    assert alice.seqs() == [1, 2, 1, 2, 3]
    expect(alice.page.locator("#messages li.system")).to_contain_text(HISTORY_GONE)


def room_messages(ws, count: int) -> list[dict]:
    """The next count message frames a websocket-client connection reads (others skipped)."""
    messages = []
    while len(messages) < count:
        frame = json.loads(ws.recv())
        if frame["type"] == "message":
            messages.append(frame)
    return messages


def test_page_open_through_a_restart_shows_the_new_orders_messages(serve, people):
    # The page resumes with since=2 of the old order; the restarted server's order is
    # another one, so its seq 1 and 2 (another client's, after the restart) are new.
    first = serve()
    alice = people(first.http, "alice", "reborn")
    alice.send("old one")
    alice.send("old two")
    alice.expect_message_count(2)
    (old,) = set(alice.epochs())
    first.stop(signal.SIGTERM)
    alice.expect_state("reconnecting")
    second = serve(port=first.port)
    alice.expect_state("online")
    expect(alice.page.locator("#messages li.system")).to_have_text([re.compile(HISTORY_GONE)])
    assert f"since=2&epoch={old}&" in alice.sockets[-1]
    bob = websocket.create_connection(f"{second.url}/reborn?name=bob", timeout=10)
    for i, text in enumerate(("new one", "new two"), 1):
        bob.send(json.dumps({"message_id": i, "text": text}))
    alice.message("new two").wait_for()
    bob.close()
    assert alice.texts() == ["old one", "old two", "new one", "new two"]
    assert alice.seqs() == [1, 2, 1, 2]
    epochs = alice.epochs()
    assert epochs[:2] == [old, old] and epochs[2] == epochs[3] != old


def test_a_restart_is_not_hidden_by_recreating_the_pages_last_message(serve, people):
    # The gap SECURITY.md listed while the page told a restart by the message at its last
    # seq: while alice's network is down, the server restarts and mallory, under alice's
    # name, recreates alice's last message (same sender and message_id) at its seq in the
    # new order. The epoch is the server's: the page still takes the new order whole.
    first = serve()
    network = Network()
    alice = people(first.http, "alice", "disguise", network=network)
    watcher = websocket.create_connection(f"{first.url}/disguise?name=watcher", timeout=10)
    alice.send("one")
    alice.send("two")
    alice.message("two").wait_for()
    last = room_messages(watcher, 2)[-1]
    watcher.close()

    network.cut()
    alice.page.context.set_offline(True)
    first.stop(signal.SIGTERM)
    second = serve(port=first.port)
    mallory = websocket.create_connection(f"{second.url}/disguise?name=alice", timeout=10)
    for message_id, text in ((1, "new one"), (last["message_id"], "two"), (2, "new three")):
        mallory.send(json.dumps({"message_id": message_id, "text": text}))
    forged = room_messages(mallory, 3)[1]
    mallory.close()
    assert (forged["seq"], forged["sender"], forged["message_id"]) == (last["seq"], "alice", last["message_id"])

    network.up = True
    alice.page.context.set_offline(False)
    alice.message("new three").wait_for()
    assert alice.texts() == ["one", "two", "new one", "two", "new three"]
    assert alice.seqs() == [1, 2, 1, 2, 3]
    expect(alice.page.locator("#messages li.system")).to_contain_text(HISTORY_GONE)


@pytest.fixture
def redis(tmp_path):
    """A private Redis for one test."""
    server = RedisServer(str(tmp_path)).start()
    yield server
    server.kill()


def test_a_message_typed_after_redis_lost_the_room_is_shown_once(serve, people, redis):
    # FLUSHALL takes the room's state while the page is open: the server begins a new order
    # at seq 1, below the page's last seq. The page's next message is acked in the new order
    # (its ack may come before its copy): shown once, at its place, with nothing left pending.
    server = serve("--redis", redis.url)
    alice = people(server.http, "alice", "flushed")
    bob = websocket.create_connection(f"{server.url}/flushed?name=bob", timeout=10)
    alice.send("before")
    bob.send(json.dumps({"message_id": 1, "text": "bob before"}))
    alice.message("bob before").wait_for()
    redis.cli("FLUSHALL")
    alice.send("mine, after the loss")
    alice.message("mine, after the loss").wait_for()
    bob.send(json.dumps({"message_id": 2, "text": "bob after"}))
    alice.message("bob after").wait_for()
    bob.close()
    expect(alice.page.locator("#messages li.pending")).to_have_count(0)
    alice.expect_message_count(4)
    assert alice.texts() == ["before", "bob before", "mine, after the loss", "bob after"]
    assert alice.seqs() == [1, 2, 1, 2]
    expect(alice.page.locator("#messages li.system")).to_have_text([re.compile(HISTORY_GONE)])


# ---------------------------------------------------------------------------
# The picture in the README
# ---------------------------------------------------------------------------

def test_screenshot_script_draws_the_conversation(tmp_path):
    out = tmp_path / "browser-client.png"
    subprocess.run([sys.executable, os.path.join(HERE, "docs", "make_screenshot.py"), "--out", str(out)],
                   check=True, timeout=90)
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1920, 1320)     # 960x660 at device scale 2
