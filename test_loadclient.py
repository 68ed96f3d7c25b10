"""Tests of loadclient.py against real scalechat.py servers: load tests, reconnects, the terminal client."""
from __future__ import annotations

import contextlib
import csv
import gc
import gzip
import itertools
import json
import multiprocessing
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import websocket
from hypothesis import given, settings
from hypothesis import strategies as st

import csvprocess
import loadclient
from scalechat import (
    CLOSE_TRY_AGAIN_LATER,
    SENT_AT,
    FrameParser,
    encode_close,
    encode_frame,
    message_parts,
    order_field,
)
from testkit import (
    HERE,
    LoopbackProxy,
    RedisServer,
    alive,
    children,
    free_port,
    sample,
    scrape,
    start_server,
)

LOADCLIENT = os.path.join(HERE, "loadclient.py")
HEADER = list(loadclient.EVENT_COLUMNS)
META_KEYS = {"scenario", "rooms", "room_size", "clients", "msg_interval_ms", "msg_size", "duration_s",
             "ramp", "start_time", "end_time", "start_us", "end_us", "server_url", "tool", "version",
             "seed", "settings", "sent", "received", "errors"}


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def load_json(path) -> dict:
    """A JSON file's content."""
    with open(path) as f:
        return json.load(f)


def run_load(url: str, out, *args: str, timeout: float = 60) -> tuple:
    """Run a load test to its end; (exit code, summary JSON or None, stderr)."""
    summary = os.path.join(out, "summary.json")
    proc = subprocess.run([sys.executable, LOADCLIENT, "--load-test", "--server-url", url,
                           "--out", str(out), "--summary-json", summary, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=HERE, check=False)
    data = load_json(summary) if os.path.exists(summary) else None
    return proc.returncode, data, proc.stderr


def load_run_sending(url: str, out, *args: str) -> tuple[subprocess.Popen, str]:
    """Start a load test; (its process, its summary JSON's path) once it is a second into sending."""
    summary = os.path.join(out, "summary.json")
    proc = subprocess.Popen([sys.executable, LOADCLIENT, "--load-test", "--server-url", url,
                             "--out", str(out), "--summary-json", summary, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    while " send " not in (line := proc.stderr.readline()):
        assert line, "the load test ended early"
    return proc, summary


def read_rows(path: str) -> list:
    """CSV rows as dicts, after checking the header row."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == HEADER
        return [dict(zip(HEADER, row, strict=True)) for row in reader]


def check_complete(result: dict) -> list:
    """Assert that the scenario's CSV and metadata are complete and consistent; return the rows."""
    rows = read_rows(result["csv"])
    meta = load_json(result["meta"])
    assert META_KEYS <= set(meta)
    assert meta["tool"] == "loadclient.py" and meta["scenario"] == result["scenario"]
    sent = [r for r in rows if r["type"] == "Sent"]
    received = [r for r in rows if r["type"] == "Received"]
    orders = [r for r in rows if r["type"] == "Order"]
    assert len(sent) + len(received) + len(orders) == len(rows)
    assert all(r["epoch"] == "" for r in sent + received)
    for r in orders:
        assert r["message_id"] == r["intended_us"] == "" and r["sender_id"] == r["client_id"]
        assert re.fullmatch(r"[0-9a-f]{16}", r["epoch"]) and int(r["seq"]) >= 0
    assert len(sent) == meta["sent"] == result["sent"] > 0
    assert len(received) == meta["received"] == result["received"]
    room_of = {}
    for r in sent:
        assert r["sender_id"] == r["client_id"] and r["seq"] == ""
        assert int(r["intended_us"]) <= int(r["timestamp_us"])
        assert meta["start_us"] <= int(r["intended_us"]) and int(r["timestamp_us"]) <= meta["end_us"]
        room_of[(r["sender_id"], r["message_id"])] = r["room"]
    assert len(room_of) == len(sent)
    members = {}
    for r in received:
        assert r["intended_us"] == "" and int(r["seq"]) > 0
        assert room_of[(r["sender_id"], r["message_id"])] == r["room"]
        members.setdefault(r["room"], set()).add(r["client_id"])
    # Every member of a room saw every message of that room exactly once, in seq order within
    # each order its room had (the client's Order row before them names it).
    seen: dict = {}
    epoch_of: dict = {}
    for r in rows:
        if r["type"] == "Order":
            epoch_of[r["client_id"]] = r["epoch"]
        elif r["type"] == "Received":
            seen.setdefault(r["client_id"], []).append(
                (epoch_of[r["client_id"]], int(r["seq"]), r["sender_id"], r["message_id"]))
    for client, events in seen.items():
        room = next(r["room"] for r in received if r["client_id"] == client)
        expected = {k for k, v in room_of.items() if v == room}
        assert {(s, m) for _, _, s, m in events} == expected
        for _, order in itertools.groupby(events, key=lambda e: e[0]):
            seqs = [seq for _, seq, _, _ in order]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    return rows


# ---------------------------------------------------------------------------
# Load tests against a real server
# ---------------------------------------------------------------------------

def test_light_load_delivers_everything_with_complete_csv_and_metadata(server, tmp_path):
    code, summary, err = run_load(server.url, tmp_path, "--rooms", "3", "--room-size", "3",
                                  "--rate", "10", "--duration", "2", "--procs", "2", "--seed", "7")
    assert code == 0, err
    (result,) = summary["scenarios"]
    assert result["clients"] == 9 and result["connect_ms"]["count"] == 9
    assert result["expected"] == 3 * result["sent"] and result["sent"] >= 150
    assert result["delivery_ratio"] == 1.0 and result["lost"] == 0 and result["duplicates"] == 0
    assert result["errors"] == {} and result["reconnects"] == 0
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"] <= result["latency_ms"]["max"]
    assert result["latency_ms"]["count"] == result["received"]
    rows = check_complete(result)
    meta = load_json(result["meta"])
    assert meta["seed"] == 7 and meta["settings"]["procs"] == 2 and meta["clients"] == 9
    assert meta["msg_interval_ms"] == 100 and meta["server_url"] == server.url
    assert {r["client_id"] for r in rows if r["type"] == "Received"} == {f"c{i}" for i in range(9)}
    assert "conn 9/9" in err  # the progress line
    assert not [f for f in os.listdir(tmp_path) if ".part" in f]


@pytest.mark.slow
def test_thresholds_change_the_exit_code(server, tmp_path, seed):
    args = ("--rooms", "2", "--room-size", "2", "--rate", "10", "--duration", "1", "--seed", str(seed))
    code, summary, err = run_load(server.url, tmp_path / "a", *args, "--max-p99", "0.001")
    assert code == 1 and summary["passed"] is False
    assert "threshold missed" in err and "--max-p99" in err
    code, summary, err = run_load(server.url, tmp_path / "b", *args, "--max-p99", "5000",
                                  "--min-delivery", "0.999")
    assert code == 0 and summary["passed"] is True, err


def test_ctrl_c_stops_sending_and_leaves_a_complete_csv(server, tmp_path, seed):
    summary = tmp_path / "summary.json"
    proc = subprocess.Popen([sys.executable, LOADCLIENT, "--load-test", "--server-url", server.url,
                             "--rooms", "4", "--room-size", "3", "--rate", "20", "--procs", "2", "--seed", str(seed),
                             "--out", str(tmp_path), "--summary-json", str(summary)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=HERE)
    lines = []
    while sum(" send " in line for line in lines) < 2:  # two progress lines while sending
        line = proc.stderr.readline()
        assert line, "".join(lines)
        lines.append(line)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "(interrupted)" in out
    (result,) = load_json(summary)["scenarios"]
    assert result["interrupted"] and result["lost"] == 0 and result["delivery_ratio"] == 1.0
    check_complete(result)


@pytest.mark.slow
def test_sweep_gzip_and_sampled_receivers(server, tmp_path):
    code, summary, err = run_load(server.url, tmp_path, "--sweep", "2x2,1x6", "--pause", "0.2",
                                  "--rate", "10", "--duration", "1", "--gzip",
                                  "--record-receivers", "0.5", "--seed", "3")
    assert code == 0, err
    assert [r["scenario"] for r in summary["scenarios"]] == ["2x2", "1x6"]
    for result in summary["scenarios"]:
        assert result["csv"].endswith(".csv.gz") and os.path.exists(result["meta"])
        # All deliveries are counted, latencies and rows come from the sample only.
        assert result["delivery_ratio"] == 1.0
        rows = read_rows(result["csv"])
        room_of = {r["client_id"]: r["room"] for r in rows if r["type"] == "Received"}
        assert 0 < len(room_of) == result["recorded_clients"] < result["clients"]
        sent_in = {}
        for r in rows:
            if r["type"] == "Sent":
                sent_in[r["room"]] = sent_in.get(r["room"], 0) + 1
        assert result["sent"] == sum(sent_in.values())
        recorded = sum(sent_in[room] for room in room_of.values())
        assert sum(r["type"] == "Received" for r in rows) == recorded == result["latency_ms"]["count"]
        assert {r["client_id"] for r in rows if r["type"] == "Order"} == set(room_of)   # recording clients only


class CuttingProxy(LoopbackProxy):
    """A TCP proxy in front of the server that can cut a client off the way a network or server does.

    Server-to-client bytes are forwarded frame by frame, so a cut lands between
    frames; client-to-server bytes are always forwarded to the end, so a cut
    loses nothing the client wrote, only what the server had sent it. With several
    upstream ports (instances of one server), accepted connections take them in turn.
    """

    def __init__(self, *upstream_ports: int, refuse: tuple = ()) -> None:
        self.upstreams = [("127.0.0.1", port) for port in upstream_ports]
        self.links: list = []
        self.refuse = refuse                      # accepts (0: the first) closed before any byte
        super().__init__()

    def link(self, client: socket.socket, index: int) -> None:
        if index in self.refuse:
            client.close()
            return
        upstream = self.upstreams[index % len(self.upstreams)]
        link = {"client": client, "server": socket.create_connection(upstream),
                "cut": None, "at": b"", "done": threading.Event(), "up": bytearray()}
        self.links.append(link)
        threading.Thread(target=self._up, args=(link,), daemon=True).start()
        threading.Thread(target=self._down, args=(link,), daemon=True).start()

    def _up(self, link: dict) -> None:
        try:
            while data := link["client"].recv(65536):
                link["up"] += data
                link["server"].sendall(data)
        except OSError:
            pass
        link["server"].close()

    def _down(self, link: dict) -> None:
        client, buf, parser = link["client"], b"", None
        try:
            while data := link["server"].recv(65536):
                if parser is None:  # the HTTP head goes through as it is
                    buf += data
                    if b"\r\n\r\n" not in buf:
                        continue
                    head, _, data = buf.partition(b"\r\n\r\n")
                    client.sendall(head + b"\r\n\r\n")
                    parser = FrameParser(expect_masked=False)
                for opcode, payload in parser.feed(data):
                    if link["cut"] is not None and link["at"] in payload:
                        if link["cut"] != "drop":
                            client.sendall(encode_close(link["cut"], "cut by the test"))
                        client.shutdown(socket.SHUT_WR)
                        link["done"].set()
                        return
                    client.sendall(encode_frame(opcode, payload))
        except OSError:
            pass

    def arm(self, index: int, how, at: bytes = b"") -> None:
        """Cut link index at the next frame holding at: 'drop' (EOF) or a close code sent first."""
        self.links[index]["at"] = at
        self.links[index]["cut"] = how

    def cut(self, index: int, how) -> None:
        """Cut link index at the next frame, and wait until it is cut."""
        self.arm(index, how)
        assert self.links[index]["done"].wait(5), "no frame arrived to cut at"

    def request_line(self, index: int) -> str:
        """The first line the client sent on link index (its GET)."""
        return self.links[index]["up"].split(b"\r\n", 1)[0].decode()


@pytest.mark.slow
def test_reconnect_with_since_loses_nothing(server, tmp_path):
    proxy = CuttingProxy(server.port)
    proc, summary = load_run_sending(proxy.url, tmp_path, "--rooms", "1", "--room-size", "4", "--rate", "20",
                                     "--duration", "3", "--seed", "1")
    # links[0] was the probe connection; the frame a cut lands on is never forwarded, so
    # each cut client must get at least that one message again through since.
    proxy.cut(1, "drop")                    # connection loss
    proxy.cut(2, CLOSE_TRY_AGAIN_LATER)     # the server's slow-consumer cut
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    (result,) = load_json(summary)["scenarios"]
    assert result["reconnects"] == 2
    assert result["errors"] == {"close 1013": 1, "lost: connection closed": 1}
    assert result["late"] >= 2, "each cut client should have got replayed messages"
    assert result["lost"] == 0 and result["duplicates"] == 0 and result["delivery_ratio"] == 1.0
    assert "late" in out and "lost           0" in out
    check_complete(result)


@pytest.mark.slow
def test_a_backlog_past_the_burst_is_paced_and_delivered_whole(serve, tmp_path):
    """A client away for a while comes back with more than 3x the server's burst to send (its
    reconnects refused, then let through): it sends it within the limits its welcome announced,
    so the server refuses next to nothing and closes no one, and every message reaches the room."""
    burst = 5
    server = serve("--rate-limit", "100", "--rate-burst", str(burst))
    proxy = CuttingProxy(server.port, refuse=(3, 4, 5))      # link 1's first three reconnects
    proc, summary = load_run_sending(proxy.url, tmp_path, "--rooms", "1", "--room-size", "2", "--rate", "40",
                                     "--duration", "5", "--seed", "3")
    proxy.cut(1, "drop")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    (result,) = load_json(summary)["scenarios"]
    assert result["lost"] == 0 and result["duplicates"] == 0 and result["delivery_ratio"] == 1.0, result
    assert result["reconnects"] == 1
    errors = dict(result["errors"])
    refusals = errors.pop("error rate_limit", 0)
    assert all(kind.startswith("lost: ") for kind in errors), errors          # no 1008, nothing left queued
    rows = check_complete(result)
    # The away client's backlog: messages sent at least 0.3 s after their time (at 40/s, away
    # 0.75 s or more). Sent at once, all but the burst would have been refused.
    late = [r for r in rows if r["type"] == "Sent" and int(r["timestamp_us"]) - int(r["intended_us"]) > 300_000]
    assert len({r["sender_id"] for r in late}) == 1 and len(late) >= 3 * burst, len(late)
    assert refusals <= burst and sample(scrape(server.metrics_url), "scalechat_refused_total",
                                        reason="rate_limit") == refusals


@pytest.mark.slow
def test_load_run_through_a_lost_room_state_counts_new_orders_and_loses_nothing(tmp_path):
    """Two instances share one Redis, each room has members on both; mid-run FLUSHALL takes every
    room's state, and each room begins a new order (a new epoch, seq 1 again). Every client counts
    that once, as a new order, not as duplicates or a gap: exit 0, delivery ratio 1.0, nothing
    lost or duplicated, and the CSV names both orders of every room."""
    redis = RedisServer(str(tmp_path)).start()
    nodes = [start_server("--redis", redis.url, "--log-level", "ERROR") for _ in range(2)]
    proxy = CuttingProxy(*(node.port for node in nodes))         # connections take turns
    summary = tmp_path / "summary.json"
    try:
        proc = subprocess.Popen([sys.executable, LOADCLIENT, "--load-test", "--server-url", proxy.url,
                                 "--rooms", "3", "--room-size", "4", "--rate", "10", "--duration", "4",
                                 "--seed", "5", "--out", str(tmp_path / "run"), "--summary-json", str(summary)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
        while " send " not in (line := proc.stderr.readline()):  # sending
            assert line, "the load test ended early"
        deadline = time.monotonic() + 10                         # every room has an order to lose
        while len(redis.cli("KEYS", "scalechat:*:state").split()) < 3:
            assert time.monotonic() < deadline, "the rooms' orders never began"
            time.sleep(0.05)
        redis.cli("FLUSHALL")
        out, err = proc.communicate(timeout=60)
    finally:
        for node in nodes:
            node.stop()
        redis.kill()
    assert proc.returncode == 0, err
    (result,) = load_json(summary)["scenarios"]
    assert (result["delivery_ratio"], result["duplicates"], result["lost"]) == (1.0, 0, 0), result
    assert result["errors"] == {} and result["reconnects"] == 0
    assert result["orders_restarted"] == 12, "each client should have seen its room's order begin again once"
    assert "new orders     12" in out
    rows = check_complete(result)
    epochs: dict = {}
    for r in rows:
        if r["type"] == "Order":
            epochs.setdefault(r["room"], []).append(r["epoch"])
    assert len(epochs) == 3 and all(len(e) == 8 and len(set(e)) == 2 for e in epochs.values())
    (processed,) = csvprocess.process([str(tmp_path / "run")], out=str(tmp_path / "processed"))
    assert (processed["delivery_ratio"], processed["lost"], processed["duplicated"]) == (1.0, 0, 0)
    assert processed["orders_restarted"] == 12


def test_a_client_follows_its_rooms_order_frame_by_frame(tmp_path):
    """One load client fed the server's frames: a welcome of its order that lags behind what it
    has (an instance not caught up yet) owes it messages it has, dropped when they come, not
    counted as duplicates; a message of another epoch begins a new order, counted once, whose
    seq 1, 2 are neither duplicates nor a gap; each order gets an Order row in the CSV."""
    old, new = b"19aee4c3f0b00000", b"19aee4c3f0b1a2b3"

    def welcome(epoch: bytes, seq: int) -> bytes:
        return b'{"type":"welcome","room":"o0","name":"c0","epoch":"%s","seq":%d,"members":2,"oldest":1}' % (
            epoch, seq)

    def message(epoch: bytes, seq: int) -> bytes:
        stamp = loadclient.now_us()
        return server_frame_payload(seq, "c9", seq, f"{stamp:016d} {stamp:016d}", epoch)

    with in_process_worker("ws://127.0.0.1:9/ws", tmp_path, "o", 1, 1) as (worker, _):
        (client,) = worker.clients
        frames = [welcome(old, 0), *(message(old, seq) for seq in (1, 2, 3)),
                  welcome(old, 1), message(old, 2), message(old, 3), message(old, 4),  # lagging: owes 2, 3
                  message(old, 4),                                                     # a real duplicate
                  message(new, 1), message(new, 2)]
        client.on_frames([(loadclient.OP_TEXT, payload) for payload in frames])
        assert (worker.received, worker.duplicates, worker.orders_restarted, worker.errors) == (6, 1, 1, {})
        assert (client.epoch, client.last_seq) == (new, 2)
        rows = [row.split(",") for row in worker.sink.buf.decode().splitlines()]
    assert [(r[3], r[6], r[8]) for r in rows if r[3] == "Order"] == [("Order", "0", old.decode()),
                                                                     ("Order", "0", new.decode())]
    assert [r[6] for r in rows if r[3] == "Received"] == ["1", "2", "3", "4", "1", "2"]


def test_a_refused_message_is_sent_again_after_retry_after_and_1008_brings_the_client_back(tmp_path):
    """A rate_limit error for one of the client's unacked messages puts it back in line and holds
    the pacer until retry_after; a 1008 close is one of the codes the client reconnects after."""
    with in_process_worker("ws://127.0.0.1:9/ws", tmp_path, "r", 1, 1) as (worker, _):
        (client,) = worker.clients
        welcome = {"type": "welcome", "room": "r0", "name": "c0", "epoch": EPOCH.decode(), "seq": 0,
                   "members": 1, "oldest": 1, "limits": {"rate": 5, "burst": 5}}
        client.on_frames([(loadclient.OP_TEXT, json.dumps(welcome).encode())])
        assert client.pacer.burst == 4 and client.pacer.rate == pytest.approx(4.5)
        client.unconfirmed[b"7"] = b'{"message_id": 7, "text": "x"}'
        refusal = {"type": "error", "code": "rate_limit", "reason": "more than 5 messages per second",
                   "message_id": 7, "retry_after": 0.25}
        before = time.monotonic()
        client.on_frames([(loadclient.OP_TEXT, json.dumps(refusal).encode())])
        assert client.again == [b"7"] and worker.errors == {"error rate_limit": 1}
        assert before + 0.25 <= client.pacer.time <= time.monotonic() + 0.25
    assert loadclient.CLOSE_POLICY in loadclient.RECONNECT_CODES


@contextlib.contextmanager
def in_process_worker(url: str, tmp_path, scenario: str, rooms: int, room_size: int):
    """A LoadWorker of one process run by the test itself: (worker, the parent's pipe end)."""
    plan = loadclient.ScenarioPlan(
        scenario=scenario, rooms=rooms, room_size=room_size, procs=1, target=loadclient.parse_server_url(url),
        room_prefix=scenario, interval_us=1_000_000, msg_size=100, jitter=0.0, seed=1, ramp=1000.0,
        record_fraction=1.0, connect_timeout=5.0, part_template=str(tmp_path / "part{index}.csv"),
        per_address=0)
    parent_end, worker_end = multiprocessing.Pipe()
    worker = loadclient.LoadWorker(plan, 0, worker_end)
    try:
        yield worker, parent_end
    finally:
        for client in worker.clients:
            if client.sock is not None:
                client.sock.close()
        worker.loop.selector.close()
        worker.sink.close()
        parent_end.close()
        worker_end.close()


def test_client_id_is_kept_across_reconnects_and_only_an_ack_settles(server, tmp_path):
    # One simulated client in this process, through the proxy. Its first message is
    # acked; the ack of its second is cut off (its echo came through): that one, and
    # only that one, goes again after the reconnect, and the server, knowing the client
    # id, acks it as a duplicate instead of posting it twice.
    proxy = CuttingProxy(server.port)
    with in_process_worker(proxy.url, tmp_path, "ack", 1, 1) as (worker, _):
        (client,) = worker.clients

        def run_until(done, what: str) -> None:
            deadline = time.monotonic() + 10
            while not done():
                assert time.monotonic() < deadline, f"{what}; errors {worker.errors}"
                worker.loop.run_once(0.05)

        client.start()
        run_until(lambda: client.welcomed, "no welcome")
        client.send_message(loadclient.now_us())
        run_until(lambda: not client.unconfirmed and worker.received == 1, "first message not acked")
        proxy.arm(0, "drop", at=b'"type":"ack"')
        client.send_message(loadclient.now_us())
        run_until(lambda: worker.reconnects == 1 and not client.unconfirmed, "no reconnect and ack")
        assert worker.resent == 1 and worker.received == 2 and worker.duplicates == 0
        assert worker.errors == {"lost: connection closed": 1}
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", client.client_id)
    assert proxy.request_line(0) == f"GET /ws/ack0?name=c0&client={client.client_id} HTTP/1.1"
    epoch = client.epoch.decode()
    assert re.fullmatch(r"[0-9a-f]{16}", epoch)
    assert proxy.request_line(1) == f"GET /ws/ack0?name=c0&since=2&epoch={epoch}&client={client.client_id} HTTP/1.1"
    room = websocket.create_connection(f"{server.url}/ack0", timeout=5)
    assert json.loads(room.recv())["seq"] == 2        # two messages, none posted twice
    room.close()


def test_a_worker_freezes_its_clients_for_the_collector_once_the_ramp_is_over(server, tmp_path):
    """Once every client of a worker has joined, its objects (clients, sockets, parsers) leave
    the collector's sight: a full collection during the chat walks only what the chat allocates."""
    gc.unfreeze()
    with in_process_worker(server.url, tmp_path, "gc", 2, 3) as (worker, parent_end):
        try:
            deadline = time.monotonic() + 10
            while worker.phase == loadclient.RAMP:
                assert time.monotonic() < deadline, f"ramp did not end: {worker.errors}"
                worker.loop.run_once(0.05)
                worker._ramp()
            assert worker.connected == 6 and parent_end.recv()[1]["phase"] == loadclient.READY
            tracked = {id(o) for o in gc.get_objects()}
            assert gc.get_freeze_count() > 0
            assert not {id(c) for c in worker.clients} & tracked
            assert not {id(c.parser) for c in worker.clients} & tracked
        finally:
            gc.unfreeze()


@pytest.mark.slow
def test_sending_waits_for_first_connects_that_retry(server, tmp_path):
    # Accepts 1-3 (0 is the probe) are closed at once: three clients retry after a backoff.
    # Sending must wait until they are in the room, or their room's first messages are lost.
    proxy = CuttingProxy(server.port, refuse=(1, 2, 3))
    code, result, err = run_load(proxy.url, tmp_path, "--rooms", "1", "--room-size", "4", "--rate", "20",
                                 "--duration", "1", "--seed", "1")
    assert code == 0, err
    (result,) = result["scenarios"]
    assert sum(result["errors"].values()) == 3 and all(e.startswith("lost: ") for e in result["errors"])
    assert result["connect_ms"]["count"] == 4 and result["reconnects"] == 0
    assert result["sent"] >= 60 and result["lost"] == 0 and result["delivery_ratio"] == 1.0


def test_idle_run_ends_when_its_duration_is_up(server, tmp_path):
    # No send falls due inside the 2 s window: the run must still end on time, not at the first send.
    summary = tmp_path / "summary.json"
    proc = subprocess.Popen([sys.executable, LOADCLIENT, "--load-test", "--server-url", server.url,
                             "--rooms", "2", "--room-size", "2", "--msg-frequency", "60000",
                             "--duration", "2", "--procs", "2", "--seed", "1", "--out", str(tmp_path),
                             "--summary-json", str(summary)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the workers too: they share the session
            proc.communicate()
    assert proc.returncode == 0, err
    (result,) = load_json(summary)["scenarios"]
    assert not result["interrupted"] and result["duration_s"] < 4
    rows = read_rows(result["csv"])
    meta = load_json(result["meta"])
    assert META_KEYS <= set(meta) and meta["clients"] == 4
    assert sum(r["type"] == "Sent" for r in rows) == meta["sent"] == result["sent"]
    assert sum(r["type"] == "Received" for r in rows) == meta["received"] == result["received"]
    assert result["lost"] == 0
    assert not [f for f in os.listdir(tmp_path) if ".part" in f]


@pytest.mark.slow
def test_hold_keeps_every_client_connected_and_answering_pings_before_sending(tmp_path):
    """--hold 2: between the ramp and the first send, 2 s in which no client sends and every
    client answers the server's pings (0.5 s interval): none is dropped, and sending follows."""
    server = start_server("--ping-interval", "0.5", "--pong-timeout", "1")
    try:
        launched = loadclient.now_us()
        code, summary, err = run_load(server.url, tmp_path, "--rooms", "3", "--room-size", "4", "--rate", "5",
                                      "--duration", "1", "--procs", "2", "--hold", "2", "--seed", "3")
        metrics = scrape(server.metrics_url)
    finally:
        server.stop()
    assert code == 0, err
    (result,) = summary["scenarios"]
    meta = load_json(result["meta"])
    assert meta["start_us"] - launched >= 2_000_000 and meta["settings"]["hold"] == 2
    assert re.search(r" hold .*conn 12/12", err), err
    first_sent = min(int(r["timestamp_us"]) for r in check_complete(result) if r["type"] == "Sent")
    assert first_sent >= meta["start_us"]
    assert metrics["scalechat_pings_sent_total"] >= 12
    assert metrics['scalechat_dropped_clients_total{reason="ping_timeout"}'] == 0
    assert result["delivery_ratio"] == 1.0 and result["reconnects"] == 0


@pytest.mark.slow
def test_clients_spread_over_source_addresses_in_blocks(tmp_path, seed):
    """--clients-per-address 5: with a loopback server, clients 0-4 connect from 127.0.0.1,
    5-9 from 127.0.0.2, 10-11 from 127.0.0.3 (seen in the kernel's table during --hold)."""
    server = start_server()
    summary = tmp_path / "summary.json"
    proc = subprocess.Popen([sys.executable, LOADCLIENT, "--load-test", "--server-url", server.url,
                             "--rooms", "3", "--room-size", "4", "--procs", "2", "--clients-per-address", "5",
                             "--hold", "3", "--duration", "1", "--rate", "2", "--seed", str(seed),
                             "--out", str(tmp_path), "--summary-json", str(summary)],
                            stderr=subprocess.PIPE, text=True, cwd=HERE)
    try:
        for line in proc.stderr:
            if " hold " in line:
                break
        sources: dict = {}
        with open("/proc/net/tcp") as f:
            for fields in (row.split() for row in f):
                if fields[3] == "01" and fields[1].endswith(f":{server.port:04X}"):
                    address = socket.inet_ntoa(int(fields[2].split(":")[0], 16).to_bytes(4, "little"))
                    sources[address] = sources.get(address, 0) + 1
        proc.stderr.read()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert sources == {"127.0.0.1": 5, "127.0.0.2": 5, "127.0.0.3": 2}
    assert load_json(summary)["scenarios"][0]["delivery_ratio"] == 1.0


def test_ramp_and_close_wait_while_they_move_at_the_machines_pace_and_end_when_they_stall(tmp_path, monkeypatch):
    """A ramp slower than --ramp (the machine's pace) is not cut short by the deadline --ramp
    implies: sending starts once every client joined, or once nothing moved for
    --connect-timeout + 2 s (a client the server never lets in does not hold the run forever).
    Closing waits likewise while connections keep closing."""
    settings = loadclient.parse_settings(["--load-test", "--rooms", "2", "--room-size", "2", "--procs", "2",
                                          "--connect-timeout", "1", "--hold", "0", "--duration", "1"])
    plan = loadclient.ScenarioPlan("2x2", 2, 2, 2, settings.target, "p-", 1000, 100, 0.1, 1, 1000.0,
                                   0.0, 1.0, str(tmp_path / "part{index}.csv"), 0)
    run = loadclient.ScenarioRun(settings, plan, str(tmp_path), loadclient.Interrupts())
    run.conns = {}
    clock = [1000.0]

    def at(t: float, ramped: int, connected: int, phase: str = loadclient.RAMP) -> str:
        clock[0] = 1000.0 + t
        report = {"phase": phase, "ramped": ramped, "connected": connected}
        run.latest = [report, dict(report)]
        run._advance()
        return run.phase

    monkeypatch.setattr(loadclient.time, "monotonic", lambda: clock[0])
    run.ramp_deadline = 1000.0 + 3.0                # what 4 clients at --ramp 1000 imply
    for t in range(0, 20, 2):                       # one more joins every 2 s: past 3 s, still ramping
        assert at(t, 2, t // 2) == loadclient.RAMP
    assert at(21.0, 2, 9) == loadclient.RAMP          # the last move was at 18 s
    assert at(21.1, 2, 9) == loadclient.HOLD          # stalled for 1 + 2 s: go on without the rest
    run.phase, run.ramp_progress, run.ramp_deadline = loadclient.RAMP, 0, 1003.0
    assert at(1.0, 2, 1) == loadclient.RAMP
    assert at(1.5, 2, 2, loadclient.READY) == loadclient.HOLD     # everyone joined
    # Closing: the deadline (--connect-timeout + 5 s) moves on while connections keep closing.
    run._close()
    first = run.close_deadline
    for k, t in enumerate(range(30, 60, 5)):
        at(float(t), 2, 100 - k, loadclient.CLOSE)
    assert run.close_deadline == 1000.0 + 55 + 6 > first
    at(70.0, 2, 95, loadclient.CLOSE)                              # stuck: the deadline stays
    assert run.close_deadline == 1061.0


def test_workers_end_when_the_parent_is_killed(server, tmp_path, seed):
    proc = subprocess.Popen([sys.executable, LOADCLIENT, "--load-test", "--server-url", server.url,
                             "--rooms", "2", "--room-size", "2", "--rate", "10", "--procs", "2",
                             "--seed", str(seed), "--out", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE)
    workers: list = []
    try:
        deadline = time.monotonic() + 15
        while len(workers) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "no two worker processes"
            workers = children(proc.pid)
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 8
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if alive(pid)], "workers outlived the parent"
    finally:
        proc.kill()
        proc.wait()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("args, message", [
    (["--rooms", "0"], "--rooms"),
    (["--rate", "-5"], "--rate"),
    (["--room-size", "x"], "--room-size"),
    (["--sweep", "25x2,oops"], "--sweep"),
    (["--record-receivers", "2"], "--record-receivers"),
    (["--clients-per-address", "0"], "--clients-per-address"),
    (["--rooms", "300", "--room-size", "10", "--clients-per-address", "10", "--procs", "2"], "127.0.0.1-254"),
    (["--server-url", "http://127.0.0.1:8080/ws"], "ws://"),
    (["--server-url", "ws://127.0.0.1:{dead}/ws"], "cannot connect"),
    (["--server-url", "ws://{http}/nothing-here"], "no WebSocket"),
])
def test_bad_settings_get_one_error_line_and_exit_2(server, args, message):
    args = [a.format(dead=free_port(), http=f"127.0.0.1:{server.port}") for a in args]
    if not any(a.startswith("--server-url") for a in args):
        args += ["--server-url", server.url]
    proc = subprocess.run([sys.executable, LOADCLIENT, "--load-test", *args],
                          capture_output=True, text=True, timeout=30, cwd=HERE, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("loadclient: error: ")
    assert message in proc.stderr and proc.stdout == ""


def test_load_test_flags_without_load_test_are_refused():
    with pytest.raises(loadclient.SettingsError, match="--rooms needs --load-test"):
        loadclient.parse_settings(["--rooms", "3"])


# ---------------------------------------------------------------------------
# The terminal client, in a real pseudo-terminal
# ---------------------------------------------------------------------------

class Terminal:
    """loadclient.py running in a pty (or, piped, reading a pipe and writing to one): type into
    it, wait for what it prints."""

    def __init__(self, *args: str, piped: bool = False) -> None:
        if piped:
            stdin, self.input = os.pipe()
            self.fd, stdout = os.pipe()
            self.pid = subprocess.Popen([sys.executable, LOADCLIENT, *args], stdin=stdin, stdout=stdout,
                                        stderr=stdout, cwd=HERE).pid
            os.close(stdin)
            os.close(stdout)
        else:
            self.pid, self.fd = pty.fork()
            if self.pid == 0:  # the child: a session leader whose controlling terminal is the pty
                os.chdir(HERE)
                os.execv(sys.executable, [sys.executable, LOADCLIENT, *args])
            self.input = self.fd
        self.screen = ""

    def type(self, text: str) -> None:
        os.write(self.input, text.encode())

    def end_input(self) -> None:
        """Close the pipe it reads (piped): the end of its input."""
        os.close(self.input)

    def wait_for(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{text!r} did not appear in:\n{self.screen}"
            if select.select([self.fd], [], [], remaining)[0]:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # the child has gone and the pty closed
                    data = b""
                assert data or text in self.screen, f"{text!r} did not appear in:\n{self.screen}"
                self.screen += data.decode(errors="replace")

    def exit_code(self, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"still running:\n{self.screen}")


def test_terminal_chat_asks_prints_sends_and_quits(server):
    term = Terminal()
    term.wait_for("server [ws://127.0.0.1:8080/ws]: ")
    term.type(server.url + "\r")
    term.wait_for("name (empty: the server picks one): ")
    term.type("alice\r")
    term.wait_for("room [lobby]: ")
    term.type("tea\r")
    term.wait_for("joined tea as alice")
    bob = websocket.create_connection(server.url + "/tea?name=bob", timeout=5)
    bob.recv()  # welcome
    bob.send(json.dumps({"message_id": 1, "text": "hi alice"}))
    term.wait_for("bob: hi alice")
    term.type("hello bob\r")
    while (event := json.loads(bob.recv()))["type"] != "message" or event["sender"] != "alice":
        pass
    assert event["text"] == "hello bob" and event["message_id"] == 1
    term.type("/quit\r")
    term.wait_for("closed (1000)")
    assert term.exit_code() == 0
    bob.close()


def test_terminal_reconnects_after_a_server_restart_and_ctrl_c_closes():
    first = start_server()
    try:
        term = Terminal("--server-url", first.url + "/den", "--name", "carol")
        term.wait_for("joined den as carol")
        first.stop()  # SIGTERM: the server drains with 1001
        term.wait_for("closed by the server: 1001")
        term.wait_for("reconnecting in")
    finally:
        first.stop()
    second = start_server(port=first.port)
    try:
        term.wait_for("reconnected to den as carol")
        term.type("back again\r")
        term.wait_for("carol: back again")
        term.type("\x03")  # Ctrl-C, through the terminal's line discipline
        term.wait_for("closed (1000)")
        assert term.exit_code() == 0
    finally:
        second.stop()


def test_terminal_with_piped_input_follows_a_new_order(tmp_path):
    """--redis: the room's state is flushed while the terminal client (reading a pipe) is in it.
    It says that the room's order began again, shows the new order's messages, and a line it
    sends then is acked in the new order and shown once before it leaves at the end of input."""
    redis = RedisServer(str(tmp_path)).start()
    server = start_server("--redis", redis.url, "--log-level", "WARNING")
    bob = None
    try:
        term = Terminal("--server-url", server.url + "/piped", "--name", "carol", piped=True)
        term.wait_for("joined piped as carol")
        bob = websocket.create_connection(server.url + "/piped?name=bob", timeout=5)
        bob.recv()  # welcome
        bob.send(json.dumps({"message_id": 1, "text": "before"}))
        term.wait_for("bob: before")
        redis.cli("FLUSHALL")
        bob.send(json.dumps({"message_id": 2, "text": "after"}))
        term.wait_for("bob: after")
        term.type("mine\n")
        term.end_input()
        term.wait_for("closed (1000)")
        assert term.exit_code() == 0
        seen = []
        while len(seen) < 3:    # bob's view: the room's three messages (acks and counts between)
            if (event := json.loads(bob.recv()))["type"] == "message":
                seen.append((event["epoch"], event["seq"], event["text"]))
    finally:
        if bob is not None:
            bob.close()
        server.stop()
        redis.kill()
    assert [(seq, text) for _, seq, text in seen] == [(1, "before"), (1, "after"), (2, "mine")]
    assert seen[0][0] != seen[1][0] == seen[2][0]
    lines = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in term.screen.splitlines()]
    shown = [line for line in lines if line.startswith(("bob:", "carol:", "* the room's"))]
    assert shown == ["bob: before", ("* the room's history was lost on the server: its messages count from 1"
                                     " again, and any you had not received are gone"),
                     "bob: after", "carol: mine"], term.screen


def room_texts(ws, count: int) -> list[str]:
    """The texts of the next count message frames a websocket-client connection reads."""
    texts = []
    while len(texts) < count:
        if (event := json.loads(ws.recv()))["type"] == "message":
            texts.append(event["text"])
    return texts


def test_terminal_sends_a_piped_backlog_of_three_bursts_at_the_servers_pace(serve):
    """3x the server's burst piped in at once: every line reaches the room, in order, at the
    pace the welcome announced (no rate_limit refusal to speak of), and the exit code is 0."""
    burst = 10
    server = serve("--rate-limit", "40", "--rate-burst", str(burst))
    watcher = websocket.create_connection(server.url + "/backlog?name=watcher", timeout=10)
    watcher.recv()  # welcome
    lines = [f"line {i}" for i in range(3 * burst)]
    term = Terminal("--server-url", server.url + "/backlog", "--name", "carol", piped=True)
    term.type("".join(f"{line}\n" for line in lines))
    term.end_input()
    term.wait_for("closed (1000)")
    assert term.exit_code() == 0, term.screen
    assert room_texts(watcher, len(lines)) == lines
    watcher.close()
    assert term.screen.count("carol: line ") == len(lines) and "not delivered" not in term.screen
    assert sample(scrape(server.metrics_url), "scalechat_refused_total", reason="rate_limit") <= burst // 2


def test_terminal_says_what_the_server_refused_and_exits_1(serve):
    """A piped line the server refuses for good (too long) is not delivered: the others are, and
    the client says how many were not, on stderr, and exits 1."""
    server = serve("--max-message-size", "64")
    term = Terminal("--server-url", server.url + "/refused", "--name", "carol", piped=True)
    term.type("fine\n" + "x" * 100 + "\nalso fine\n")
    term.end_input()
    term.wait_for("loadclient: 1 of 3 messages typed were not delivered (1 refused by the server)")
    assert term.exit_code() == 1, term.screen
    assert "carol: fine" in term.screen and "carol: also fine" in term.screen
    assert "! too_big:" in term.screen and "closed (1000)" in term.screen


@pytest.mark.slow
def test_terminal_that_cannot_deliver_gives_up_in_time_and_exits_1():
    """The server goes away for good while lines are still piped in: the client tries to
    reconnect until its deadline (QUIT_WAIT, as nothing was left to pace), then says how many
    lines were not delivered and exits 1 instead of pretending it sent them."""
    server = start_server()
    try:
        term = Terminal("--server-url", server.url + "/gone", "--name", "carol", piped=True)
        term.wait_for("joined gone as carol")
    finally:
        server.stop()
    term.wait_for("reconnecting in")
    term.type("one\ntwo\nthree\n")
    term.end_input()
    started = time.monotonic()
    term.wait_for("loadclient: 3 of 3 messages typed were not delivered (3 not acknowledged in time)",
                  timeout=loadclient.QUIT_WAIT + 5)
    assert loadclient.QUIT_WAIT - 0.5 < time.monotonic() - started
    assert term.exit_code() == 1, term.screen


def test_terminal_cannot_connect_exits_2():
    term = Terminal("--server-url", f"ws://127.0.0.1:{free_port()}/ws", "--name", "x", "--room", "y")
    term.wait_for("loadclient: error: cannot connect")
    assert term.exit_code() == 2


# ---------------------------------------------------------------------------
# Units: the receive path's field extraction, the histogram, URLs
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("rooms, room_size, procs, whole", [
    (100, 10, 2, True), (100_000, 10, 56, True), (20, 3, 7, True), (10, 200, 4, False), (1, 2000, 4, False),
    (3, 5, 4, False), (9, 2, 9, True)])
def test_each_process_runs_whole_rooms_when_they_split_evenly(rooms, room_size, procs, whole):
    """Every client runs in exactly one process, the busiest as settings check it; when rooms
    split evenly over the processes each room's members share one (a message wakes one
    process), else a big room's members spread over all of them."""
    plan = loadclient.ScenarioPlan("s", rooms, room_size, procs, None, "p", 1000, 100, 0.1, 1, 1000.0, 1.0,
                                   5.0, "part{index}", 0)
    parts = [plan.positions(worker) for worker in range(procs)]
    assert sorted(k for part in parts for k in part) == list(range(rooms * room_size))
    assert max(map(len, parts)) == loadclient.busiest_process(rooms, room_size, procs)
    assert all(part == sorted(part) for part in parts)
    rooms_of = [{plan.member(k) % rooms for k in part} for part in parts]
    assert loadclient.whole_rooms(rooms, procs) == whole
    if whole:
        assert sum(map(len, rooms_of)) == rooms, "a room's members in more than one process"
        assert max(map(len, parts)) <= 1.1 * rooms * room_size / procs
    else:
        assert all(parts), "a process with no client"
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


EPOCH = b"19aee4c3f0b00000"


def server_frame_payload(seq: int, sender: str, message_id: int, text: str, epoch: bytes = EPOCH) -> bytes:
    """A message payload encoded by the server's own code (its field order is what the fast path reads)."""
    prefix, suffix = message_parts("r-1", sender, message_id, text, "2026-01-01T00:00:00.000000Z")
    return prefix + order_field(epoch) + b"%d" % seq + suffix


@settings(max_examples=300, deadline=None)
@given(seq=st.integers(1, 2**53), sender=st.text(min_size=1, max_size=32),
       message_id=st.integers(0, 2**53), sent=st.integers(10**15, 10**16 - 1),
       intended=st.integers(10**15, 10**16 - 1), tail=st.sampled_from(["", " xxxx", ' "quoted"']),
       epoch=st.from_regex(r"[0-9a-f]{16}", fullmatch=True))
def test_fast_field_extraction_agrees_with_json(seq, sender, message_id, sent, intended, tail, epoch):
    payload = server_frame_payload(seq, sender, message_id, f"{sent:016d} {intended:016d}{tail}", epoch.encode())
    slow = loadclient.message_fields(json.loads(payload))
    fast = loadclient.split_message(payload)
    assert slow == (epoch.encode(), b"%d" % seq, sender.encode(), b"%d" % message_id, b"%016d" % sent,
                    b"%016d" % intended)
    assert fast is None or fast == slow  # None (an escape in the name): the json path takes over
    if "\\" not in json.dumps(sender, ensure_ascii=False):
        assert fast == slow


@pytest.mark.parametrize("payload", [
    b'{"type":"welcome","room":"r","name":"c1","seq":3,"members":2,"oldest":1}',
    server_frame_payload(1, "c1", 1, "hello there, not a load-test message"),
    server_frame_payload(1, "c1", 1, "1234567890123456 123"),
    b'{"room":"r","type":"message","seq":1,"sender":"c1","message_id":1,"text":"x","sent_at":null}',
])
def test_fast_field_extraction_declines_what_it_does_not_know(payload):
    assert loadclient.split_message(payload) is None


def test_latency_histogram_percentiles_are_within_two_percent():
    import random
    rng = random.Random(5)
    values = sorted(int(rng.lognormvariate(7, 1.5)) for _ in range(50_000))
    halves = loadclient.LatencyHistogram(), loadclient.LatencyHistogram()
    halves[0].add_sorted(sorted(values[::2]))
    halves[1].add_sorted(sorted(values[1::2]))
    merged = loadclient.LatencyHistogram(halves[0].state())
    merged.merge(halves[1])
    assert merged.count == len(values) and merged.max == values[-1]
    for q in (50, 90, 99, 99.9):
        exact = values[max(0, int(len(values) * q / 100 + 0.5) - 1)]
        assert abs(merged.percentile(q) - exact) <= max(1, 0.02 * exact), q


def test_the_pacer_keeps_within_the_announced_limits_and_waits_out_a_refusal():
    """From welcome.limits: a burst of 90% of the server's at once, then 90% of its rate, bytes
    too; a refusal's retry_after holds everything back until then; no limits, no pacing."""
    limits = {"rate": 10, "burst": 10, "rate_bytes": 1000, "burst_bytes": 2000, "max_message_size": 100}
    pacer, t = loadclient.Pacer(limits, 100.0), 100.0
    assert sum(pacer.take(10, t) for _ in range(20)) == 9          # the burst, less the margin
    assert pacer.wait(10, t) == pytest.approx(1 / 9)               # then 9 a second
    assert not pacer.take(10, t + 0.1) and pacer.take(10, t + 0.12)
    heavy = loadclient.Pacer(limits, t)
    assert heavy.take(1500, t) and not heavy.take(1500, t)         # 1800 bytes at once
    assert heavy.wait(1500, t) == pytest.approx((1500 - 300) / 900)
    held = loadclient.Pacer(limits, t)
    held.hold(0.5, t)
    assert held.wait(10, t + 0.2) == pytest.approx(0.3) and held.take(10, t + 0.5)
    assert not held.take(10, t + 0.5)                              # one token then, as the server has
    loadclient.Pacer(None, t).hold(None, t)                        # a refusal that says nothing: a default wait
    free = loadclient.Pacer({}, t)                                 # an older server: no limits told
    assert all(free.take(1 << 20, t) for _ in range(1000))


def test_server_url_parsing():
    t = loadclient.parse_server_url("ws://localhost:9000/ws/kitchen")
    assert t.room == "kitchen" and t.base_path == "/ws" and t.host_header == "localhost:9000"
    assert t.loopback and t.resource("r1", "c1", 5) == "/ws/r1?name=c1&since=5"
    assert t.resource("r1", "c1", 5, "k" * 22, "19aee4c3f0b00000") == \
        "/ws/r1?name=c1&since=5&epoch=19aee4c3f0b00000&client=" + "k" * 22
    assert t.resource("r1", "c1", None, None, "19aee4c3f0b00000") == "/ws/r1?name=c1"   # no since: no epoch
    assert t.resource("r1", "c1", None, "k-_" * 8) == "/ws/r1?name=c1&client=" + "k-_" * 8
    assert loadclient.parse_server_url("ws://127.0.0.1").resource(None) == "/ws"
    for bad in ("wss://127.0.0.1/ws", "http://127.0.0.1/ws", "ws:///ws"):
        with pytest.raises(loadclient.SettingsError):
            loadclient.parse_server_url(bad)


def test_loop_short_wait_still_wakes_for_sockets_and_stamps_arrival():
    """A wait shorter than epoll's millisecond goes through select() on the epoll descriptor:
    a socket that turns readable during it is still dispatched in the same turn, and
    ready_us is the moment select() returned, taken before any callback runs."""
    loop = loadclient.Loop()
    assert loop.fine_wait_fd is not None
    a, b = socket.socketpair()
    seen, fired = [], []
    loop.selector.register(a, loadclient.selectors.EVENT_READ,
                           lambda mask: seen.append((a.recv(10), loop.ready_us, time.time_ns() // 1000)))
    loop.call_later(0.004, lambda: fired.append(True))
    threading.Timer(0.001, b.send, (b"x",)).start()
    before = time.time_ns() // 1000
    loop.run_once(1.0)
    assert seen and seen[0][0] == b"x"
    _, ready, handled = seen[0]
    assert before <= ready <= handled
    while not fired:
        loop.run_once(1.0)
    a.close(), b.close()
    loop.selector.close()


def test_the_cached_sent_at_is_the_one_rfc3339_format_across_seconds():
    """LoadWorker.rfc3339 formats the date once a second; every stamp still equals iso_time's
    and is a sent_at the server accepts."""
    worker = loadclient.LoadWorker.__new__(loadclient.LoadWorker)
    worker._second, worker._stamp_prefix = -1, b""
    for us in (0, 1_764_700_000_999_999, 1_764_700_001_000_000, 1_764_700_001_000_007, 1_764_700_000_123_456):
        stamp = worker.rfc3339(us).decode()
        assert stamp == loadclient.iso_time(us) and SENT_AT.fullmatch(stamp)
