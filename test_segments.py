"""Load from several machines: loadclient.py --segment and --start-at, csvprocess.py and plot.py
merging the segments' results into one run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import csvprocess
import loadclient
import plot
from testkit import HERE, RedisServer, start_server
from testkit_csv import START_US

LOADCLIENT = os.path.join(HERE, "loadclient.py")


def settings(*args: str):
    """parse_settings of a load test against an address nobody is asked (it is not probed)."""
    return loadclient.parse_settings(["--load-test", "--server-url", "ws://127.0.0.1:9/ws", *args])


# ---------------------------------------------------------------------------
# The split of the rooms' members
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("rooms, room_size, segments", [(1, 1, 1), (3, 4, 2), (5, 7, 3), (2, 3, 3), (4, 10, 4)])
def test_every_member_is_in_exactly_one_segment_and_every_room_on_every_segment(rooms, room_size, segments):
    plans = [loadclient.ScenarioPlan("s", rooms, room_size, 1, None, "p", 1000, 100, 0.1, 1, 1000.0, 1.0,
                                     5.0, "part{index}", 0, i, segments) for i in range(1, segments + 1)]
    parts = [[plan.member(k) for k in range(plan.clients)] for plan in plans]
    everyone = [index for part in parts for index in part]
    assert sorted(everyone) == list(range(rooms * room_size))          # unique client ids, none left out
    for i, (plan, part) in enumerate(zip(plans, parts), 1):
        members = loadclient.segment_room_members(room_size, i, segments)
        assert plan.room_members == members and len(part) == rooms * members
        # each room has the same number of members here, at least one; member j of a room is segment j % n + 1's
        assert all(sum(index % rooms == room for index in part) == members >= 1 for room in range(rooms))
        assert all(index // rooms % segments == i - 1 for index in part)
        assert [plan.own_sender(b"c%d" % index) for index in everyone] == [index in part for index in everyone]
        assert not plan.own_sender(b"probe") and not plan.own_sender(b"c") and not plan.own_sender(b"x1")
    sizes = [loadclient.segment_room_members(room_size, i, segments) for i in range(1, segments + 1)]
    assert sum(sizes) == room_size and max(sizes) - min(sizes) <= 1


def test_one_segment_is_the_whole_scenario_in_its_old_order():
    plan = loadclient.ScenarioPlan("s", 3, 4, 1, None, "p", 1000, 100, 0.1, 1, 1000.0, 1.0, 5.0, "part{index}", 0)
    assert [plan.member(k) for k in range(plan.clients)] == list(range(12)) and plan.room_members == 4
    s = settings("--rooms", "3", "--room-size", "4")
    assert s.segment == (1, 1) and s.start_at is None


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0/2", "3/2", "1/0", "2", "1/2/3", "a/b", " 1/2", "1/2\n", "-1/2", "1 /2",
                                   "01/2", "1/1000000"])
def test_bad_segments_are_refused(value):
    with pytest.raises(loadclient.SettingsError, match=r"argument --segment: .*expected I/N with 1 <= I <= N"):
        settings(f"--segment={value}", "--seed", "1", "--start-at", str(time.time() + 60))


def test_a_segment_needs_a_common_seed_and_start_and_rooms_to_split():
    later = str(time.time() + 60)
    with pytest.raises(loadclient.SettingsError, match="needs --seed and --start-at"):
        settings("--segment", "1/2", "--seed", "1")
    with pytest.raises(loadclient.SettingsError, match="needs --seed and --start-at"):
        settings("--segment", "1/2", "--start-at", later)
    with pytest.raises(loadclient.SettingsError, match=r"rooms of 2 members cannot be split over 3 segments"):
        settings("--segment", "3/3", "--seed", "1", "--start-at", later, "--room-size", "2")
    s = settings("--segment", "2/3", "--seed", "42", "--start-at", later, "--room-size", "3")
    assert s.segment == (2, 3) and s.room_prefix == "lt42-"     # rooms named after the common seed
    s = settings("--segment", "2/3", "--seed", "42", "--start-at", later, "--room-prefix", "mine-")
    assert s.room_prefix == "mine-"


@pytest.mark.parametrize("offset, message", [(-30, r"--start-at \d+: 30 s in the past"),
                                             (2 * 86_400, "more than a day ahead")])
def test_start_at_in_the_past_or_far_ahead_is_refused(offset, message):
    with pytest.raises(loadclient.SettingsError, match=message):
        settings("--start-at", str(time.time() + offset))


def test_start_at_is_refused_with_a_sweep_and_when_not_a_number():
    with pytest.raises(loadclient.SettingsError, match="not with --sweep"):
        settings("--start-at", str(time.time() + 60), "--sweep", "2x2,3x3")
    with pytest.raises(loadclient.SettingsError, match="not a Unix time"):
        settings("--start-at", "nan")


def test_sending_starts_at_start_at_or_as_soon_as_ready_after_it_with_a_warning(tmp_path, monkeypatch, capsys):
    """The parent tells the workers t0 = --start-at exactly when the ramp is done ahead of it; a
    segment ready after it starts at once, says how late on stderr and in its metadata. Its drain
    waits 1 s for the other segments' last messages even when its own have all arrived."""
    start_at = time.time() + 100
    s = settings("--rooms", "2", "--room-size", "2", "--seed", "3", "--segment", "1/2", "--start-at", str(start_at),
                 "--duration", "1")
    plan = loadclient.ScenarioPlan("2x2", 2, 2, 1, s.target, "p-", 1000, 100, 0.1, 3, 1000.0, 1.0, 1.0,
                                   str(tmp_path / "part{index}.csv"), 0, 1, 2)
    clock = {"mono": 1000.0, "wall_us": 0}
    monkeypatch.setattr(loadclient.time, "monotonic", lambda: clock["mono"])
    monkeypatch.setattr(loadclient, "now_us", lambda: clock["wall_us"])

    def at(run, wall_s: float, phase: str, sent: int = 0, received: int = 0) -> str:
        clock["mono"], clock["wall_us"] = 1000.0 + wall_s - start_at, int(wall_s * 1e6)
        run.latest = [{"phase": phase, "ramped": 2, "connected": 2, "sent": sent, "received": received,
                       "late": 0, "duplicates": 0, "reconnects": 0, "foreign": 0, "resent": 0,
                       "orders_restarted": 0, "other_segments": 0, "queued": 0, "errors": {}}]
        run._advance()
        return run.phase

    run = loadclient.ScenarioRun(s, plan, str(tmp_path), loadclient.Interrupts())
    run.conns, run.ramp_deadline = {}, 0.0
    assert at(run, start_at - 10, loadclient.READY) == loadclient.HOLD
    assert at(run, start_at - 0.31, loadclient.READY) == loadclient.HOLD
    assert at(run, start_at - 0.29, loadclient.READY) == loadclient.SEND
    assert run.t0 == int(start_at * 1e6)
    assert capsys.readouterr().err == ""
    assert at(run, start_at + 1.05, loadclient.DRAIN) == loadclient.DRAIN
    assert at(run, start_at + 1.5, loadclient.DRAIN, sent=10, received=10) == loadclient.DRAIN   # settling
    assert at(run, start_at + 2.05, loadclient.DRAIN, sent=10, received=9) == loadclient.DRAIN   # one missing
    assert at(run, start_at + 2.1, loadclient.DRAIN, sent=10, received=10) == loadclient.CLOSE

    late = loadclient.ScenarioRun(s, plan, str(tmp_path), loadclient.Interrupts())
    late.conns, late.ramp_deadline = {}, 0.0
    assert at(late, start_at + 2, loadclient.READY) == loadclient.HOLD
    assert at(late, start_at + 2, loadclient.READY) == loadclient.SEND
    assert late.t0 == int((start_at + 2) * 1e6) + 100_000
    assert "2x2: sending starts 2.1 s after --start-at" in capsys.readouterr().err


def test_bad_segment_is_one_error_line_and_exit_2():
    proc = subprocess.run([sys.executable, LOADCLIENT, "--load-test", "--segment", "3/2"],
                          capture_output=True, text=True, timeout=30, cwd=HERE, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("loadclient: error: argument --segment: '3/2': expected I/N with 1 <= I <= N,"
                           " e.g. 1/2\n")


# ---------------------------------------------------------------------------
# csvprocess.py and plot.py on hand-made segments: one room {c0, c1}, c0 on segment 1, c1 on 2
# ---------------------------------------------------------------------------

def write_segment(folder: Path, index: int, rows: list[str], count: int = 2, **meta) -> Path:
    """One segment's results of scenario 1x2, as loadclient.py --segment index/count writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "1x2.csv").write_text(loadclient.CSV_HEADER.decode() + "".join(r + "\n" for r in rows))
    meta = {"scenario": "1x2", "rooms": 1, "room_size": 2, "clients": 1, "msg_interval_ms": 1000.0,
            "seed": 5, "room_prefix": "lt5-1x2-", "start_at": START_US / 1e6, "start_us": START_US,
            "end_us": START_US + 2_000_000, "record_receivers": 1.0, "sent": 1, "server_url": f"ws://m{index}/ws",
            "segment": {"index": index, "count": count, "room_members": 1}, **meta}
    (folder / "1x2.meta.json").write_text(json.dumps(meta))
    return folder


def event(kind: str, sender: str, client: str, dt: int) -> str:
    """A Sent or Received row of message 1 of sender in room r, dt us after the start."""
    return (f"1,{sender},{client},{kind},{START_US + dt},r,{'' if kind == 'Sent' else 1},"
            f"{START_US + dt if kind == 'Sent' else ''},")


# Each machine saw both messages: its own first, then the other's. Segment 1's receipt of c1's
# message comes before c1's Sent row, which is in segment 2's file.
SEGMENT_1 = [event("Sent", "c0", "c0", 0), event("Received", "c0", "c0", 100), event("Received", "c1", "c0", 600)]
SEGMENT_2 = [event("Sent", "c1", "c1", 500), event("Received", "c1", "c1", 550), event("Received", "c0", "c1", 300)]


def test_segments_merge_into_one_run_whatever_the_order_of_their_rows(tmp_path):
    one, two = write_segment(tmp_path / "one", 1, SEGMENT_1), write_segment(tmp_path / "two", 2, SEGMENT_2)
    for order in ((one, two), (two, one)):
        (summary,) = csvprocess.process([str(p) for p in order], str(tmp_path / "out"))
        assert (summary["messages"], summary["deliveries_expected"], summary["deliveries_received"]) == (2, 4, 4)
        assert summary["delivery_ratio"] == 1.0 and summary["receipts_without_send"] == 0
        assert summary["latency_us"]["max"] == 300 and summary["latency_us"]["min"] == 50
        assert summary["meta"]["clients"] == 2 and summary["input"]["lines"] == 8
    assert csvprocess.output_folder([str(one), str(two)]) == tmp_path / "one-merged" / "processed"
    assert csvprocess.output_folder([str(one)]) == one / "processed"
    paths = plot.plot_run([one, two])
    assert len(paths) == 4 and all(p.parent == tmp_path / "one-merged" / "plots" for p in paths)
    alone = csvprocess.process([str(two)], str(tmp_path / "alone"))[0]
    assert (alone["deliveries_expected"], alone["deliveries_received"], alone["receipts_from_other_segments"]) \
        == (1, 1, 1)


def test_a_message_short_of_a_member_on_the_other_machine_counts_lost_in_the_merged_run(tmp_path):
    one = write_segment(tmp_path / "one", 1, SEGMENT_1)
    two = write_segment(tmp_path / "two", 2, SEGMENT_2[:2])      # c1 never got c0's message
    (summary,) = csvprocess.process([str(one), str(two)], str(tmp_path / "out"))
    assert (summary["deliveries_expected"], summary["deliveries_received"], summary["lost"]) == (4, 3, 1)


@pytest.mark.parametrize("second, message", [
    ({"seed": 6}, r"not segments of one run: seed 5 and 6"),
    ({"room_size": 3}, r"not segments of one run: room_size 2 and 3"),
    ({"start_at": 1.0}, r"not segments of one run: start_at"),
    ({"count": 3}, r"not segments of one run: segment count 2 and 3"),
    ({"index": 1}, r"both segment 1/2 of scenario '1x2'"),
    ({"segment": None}, r"both scenario '1x2' but not segments of one run"),
])
def test_folders_that_are_not_the_segments_of_one_run_are_refused(tmp_path, second, message):
    one = write_segment(tmp_path / "one", 1, SEGMENT_1)
    index, count = second.pop("index", 2), second.pop("count", 2)
    two = write_segment(tmp_path / "two", index, SEGMENT_2, count, **second)
    with pytest.raises(csvprocess.InputError, match=message):
        csvprocess.process([str(one), str(two)], str(tmp_path / "out"))
    done = cli("csvprocess.py", one, two)
    assert done.returncode == 2 and done.stderr.startswith("csvprocess: error: ") and done.stderr.count("\n") == 1


def test_a_missing_segment_is_named(tmp_path):
    one = write_segment(tmp_path / "one", 1, SEGMENT_1, 3)
    three = write_segment(tmp_path / "three", 3, SEGMENT_2, 3)
    with pytest.raises(csvprocess.InputError, match=r"scenario '1x2': segment 2/3 missing"):
        csvprocess.process([str(one), str(three)], str(tmp_path / "out"))
    with pytest.raises(csvprocess.InputError, match="given twice"):
        csvprocess.process([str(one), str(one)], str(tmp_path / "out"))


# ---------------------------------------------------------------------------
# Two load clients, two servers sharing Redis, one run
# ---------------------------------------------------------------------------

ROOMS, ROOM_SIZE, RATE, DURATION = 3, 4, 5, 2


@pytest.fixture(scope="module")
def segmented_run(tmp_path_factory) -> dict:
    """Segments 1/2 and 2/2 of one scenario, each from its own process against its own server,
    the two servers sharing the rooms on one Redis: (the folders, the summaries, stdout)."""
    tmp = tmp_path_factory.mktemp("segments")
    redis = RedisServer(str(tmp)).start()
    nodes = [start_server("--redis", redis.url, "--log-level", "ERROR") for _ in range(2)]
    start_at = time.time() + 3
    procs = []
    try:
        for i, node in enumerate(nodes, 1):
            out = tmp / f"run{i}"
            procs.append((out, subprocess.Popen(
                [sys.executable, LOADCLIENT, "--load-test", "--server-url", node.url, "--rooms", str(ROOMS),
                 "--room-size", str(ROOM_SIZE), "--rate", str(RATE), "--duration", str(DURATION),
                 "--seed", "11", "--segment", f"{i}/2", "--start-at", f"{start_at:.3f}", "--out", str(out),
                 "--summary-json", str(tmp / f"summary{i}.json")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)))
        outputs = [proc.communicate(timeout=60) for _, proc in procs]
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
        for node in nodes:
            node.stop()
        redis.kill()
    for (_, proc), (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    summaries = [json.loads((tmp / f"summary{i}.json").read_text())["scenarios"][0] for i in (1, 2)]
    return {"tmp": tmp, "runs": [out for out, _ in procs], "summaries": summaries,
            "stdout": [out for out, _ in outputs], "start_at": start_at}


@pytest.mark.slow
def test_each_segment_counts_its_own_senders_and_names_the_rest(segmented_run):
    first, second = segmented_run["summaries"]
    for i, (mine, other) in enumerate(((first, second), (second, first)), 1):
        assert mine["segment"] == f"{i}/2" and mine["clients"] == ROOMS * ROOM_SIZE // 2 == 6
        assert mine["room_members"] == 2 and mine["sent"] >= 6 * RATE * DURATION * 0.8
        assert mine["expected"] == 2 * mine["sent"]                 # own messages to own members
        assert (mine["delivery_ratio"], mine["lost"], mine["duplicates"]) == (1.0, 0, 0), mine
        assert mine["errors"] == {} and mine["reconnects"] == 0
        # every message of the other segment's senders reached this segment's two members of its room
        assert mine["from_other_segments"] == 2 * other["sent"]
        assert mine["latency_ms"]["count"] == mine["received"]      # latencies of its own clock only
        assert f"segment        {i}/2" in segmented_run["stdout"][i - 1]
        assert f"received from other segments: {mine['from_other_segments']}" in segmented_run["stdout"][i - 1]
    names = []
    for run in segmented_run["runs"]:
        meta = json.loads((run / "3x4.meta.json").read_text())
        assert meta["seed"] == 11 and meta["room_prefix"] == "lt11-3x4-"
        assert meta["start_at"] == pytest.approx(segmented_run["start_at"], abs=1e-3)
        assert meta["start_us"] == int(meta["start_at"] * 1e6) and meta["start_late_s"] == 0
        names.append({row.split(",")[1] for row in (run / "3x4.csv").read_text().splitlines()[1:]
                      if ",Sent," in row})
    assert names[0] == {f"c{i}" for i in (0, 1, 2, 6, 7, 8)} and names[1] == {f"c{i}" for i in (3, 4, 5, 9, 10, 11)}


def cli(script: str, *args) -> subprocess.CompletedProcess:
    """Run csvprocess.py or plot.py to its end."""
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=HERE, check=False)


@pytest.mark.slow
def test_csvprocess_merges_the_segments_into_one_run_and_plot_draws_it(segmented_run):
    first, second = segmented_run["summaries"]
    run1, run2 = segmented_run["runs"]
    done = cli("csvprocess.py", run1, run2)
    assert done.returncode == 0, done.stderr
    merged = run1.parent / f"{run1.name}-merged" / "processed"
    assert f"outputs in {merged}" in done.stdout and "segments 1/2, 2/2 merged into one run" in done.stdout
    summary = json.loads((merged / "summary_3x4.json").read_text())
    sent = first["sent"] + second["sent"]
    assert summary["messages"] == sent and summary["expected_per_message"] == ROOM_SIZE
    # every message reached all four members of its room, two of them on the other machine
    assert summary["deliveries_expected"] == summary["deliveries_received"] == ROOM_SIZE * sent
    assert (summary["delivery_ratio"], summary["lost"], summary["duplicated"]) == (1.0, 0, 0)
    assert summary["receipts_without_send"] == 0 and summary["messages_incomplete"] == 0
    assert summary["receipts_from_other_segments"] is None
    assert summary["meta"]["clients"] == ROOMS * ROOM_SIZE and summary["meta"]["sent"] == sent
    assert [s["segment"] for s in summary["meta"]["segments"]] == ["1/2", "2/2"]
    rows = (merged / "sent-vs-received_3x4.csv").read_text().splitlines()[1:]
    assert len(rows) == sent and {row.rsplit(",", 2)[1:] == ["4", "4"] for row in rows} == {True}
    assert len({tuple(row.split(",")[:2]) for row in rows}) == sent        # each message once
    figures = cli("plot.py", run1, run2)
    assert figures.returncode == 0, figures.stderr
    drawn = sorted(p.name for p in (merged.parent / "plots").iterdir())
    assert drawn == ["delivery.png", "latency-mean.png", "latency-over-time_3x4.png", "latency-percentiles.png"]
    assert all((merged.parent / "plots" / name).stat().st_size > 10_000 for name in drawn)
    again = cli("plot.py", merged.parent, "--out", segmented_run["tmp"] / "again")   # the merged folder itself
    assert again.returncode == 0, again.stderr
    assert len(list((segmented_run["tmp"] / "again").iterdir())) == 4


@pytest.mark.slow
def test_one_segment_alone_counts_as_its_load_client_did(segmented_run, tmp_path):
    (mine, _), (run1, _) = segmented_run["summaries"], segmented_run["runs"]
    (summary,) = csvprocess.process([str(run1)], str(tmp_path))
    assert summary["expected_per_message"] == 2 and "segment 1/2 alone" in summary["expected_from"]
    assert summary["messages"] == mine["sent"] and summary["deliveries_received"] == mine["received"]
    assert summary["delivery_ratio"] == 1.0 and summary["receipts_without_send"] == 0
    assert summary["receipts_from_other_segments"] == mine["from_other_segments"] > 0
