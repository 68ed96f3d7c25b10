"""Tests of csvprocess.py and plot.py: hand-computed numbers, dirty input, real figures."""
from __future__ import annotations

import csv
import gzip
import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest

import csvprocess
import plot
from testkit_csv import write_scenario

HERE = Path(__file__).resolve().parent

T0 = 1_764_324_000_000_000
HEADER = ",".join(csvprocess.COLUMNS)

# ---------------------------------------------------------------------------
# The hand-made run: scenario 2x2, rooms r1 = {a, b} and r2 = {c, d}
# ---------------------------------------------------------------------------
# (message_id, sender, client, type, us after T0, room, seq, intended us after T0)
EVENTS = [
    (1, "a", "a", "Sent", 0, "r1", "", 0),
    (1, "a", "a", "Received", 100, "r1", 1, None),        # latency 100
    (1, "a", "b", "Received", 300, "r1", 1, None),        # 300
    (1, "b", "b", "Sent", 1000, "r1", "", 900),           # sent 100 us after its schedule
    (1, "b", "a", "Received", 1200, "r1", 2, None),       # 200 (300 from intended)
    (1, "b", "b", "Received", 1400, "r1", 2, None),       # 400 (500)
    (1, "c", "c", "Sent", 2000, "r2", "", 2000),
    (1, "c", "c", "Received", 2500, "r2", 1, None),       # 500
    (1, "c", "d", "Received", 3000, "r2", 1, None),       # 1000
    (1, "d", "d", "Sent", 1_500_000, "r2", "", 1_000_000),  # half a second late
    (1, "d", "c", "Received", 1_502_000, "r2", 2, None),  # 2000 (502000); d never gets it
    (2, "a", "a", "Sent", 1_600_000, "r1", "", 1_600_000),  # nobody gets it
]
LATENCIES = [100, 300, 200, 400, 500, 1000, 2000]
FROM_INTENDED = [100, 300, 300, 500, 500, 1000, 502_000]


def line(event: tuple) -> str:
    """One CSV row of a hand-made event (no epoch: only Order rows carry one)."""
    mid, sender, client, kind, dt, room, seq, intended = event
    return f"{mid},{sender},{client},{kind},{T0 + dt},{room},{seq},{'' if intended is None else T0 + intended},"


def order_line(client: str, dt: int, room: str, epoch: str) -> str:
    """An Order row: client's room began the order epoch, dt us after T0."""
    return f",{client},{client},Order,{T0 + dt},{room},0,,{epoch}"


def write_run(folder: Path, lines: list[str], name: str = "2x2", meta: bool = True,
              header: str | None = HEADER, end: str = "\n") -> Path:
    """Write a scenario CSV (and meta.json with room_size 2) into folder; returns the CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.csv"
    path.write_text("\n".join(([header] if header else []) + lines) + end, encoding="utf-8")
    if meta:
        (folder / f"{name}.meta.json").write_text(json.dumps(
            {"scenario": name, "rooms": 2, "room_size": 2, "clients": 4, "start_us": T0}), encoding="utf-8")
    return path


def run_cli(script: str, *args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run csvprocess.py or plot.py as a user would."""
    return subprocess.run([sys.executable, str(HERE / script), *map(str, args)], cwd=cwd,
                          check=False, capture_output=True, text=True, timeout=120)


def nearest_rank(values: list[int], p: float) -> int:
    """The textbook nearest-rank percentile: the ceil(p/100 * n)-th smallest value."""
    ordered = sorted(values)
    return ordered[max(math.ceil(round(p / 100 * len(ordered), 9)) - 1, 0)]


def assert_clean_numbers(summary: dict) -> None:
    """The numbers of the hand-made run, whatever dirt surrounds its events."""
    assert summary["messages"] == 5
    assert summary["deliveries_received"] == 7
    lat = summary["latency_us"]
    assert lat["count"] == 7
    assert (lat["min"], lat["p10"], lat["p25"], lat["p50"]) == (100, 100, 200, 400)
    assert (lat["p75"], lat["p90"], lat["p99"], lat["max"]) == (1000, 2000, 2000, 2000)
    assert lat["mean"] == pytest.approx(4500 / 7)


# ---------------------------------------------------------------------------
# Numbers computed by hand
# ---------------------------------------------------------------------------

def test_hand_made_run_numbers(tmp_path):
    write_run(tmp_path / "run", [line(e) for e in EVENTS])
    [summary] = csvprocess.process([str(tmp_path / "run")])
    out = tmp_path / "run" / "processed"

    assert_clean_numbers(summary)
    assert summary["expected_from"] == "meta.json room_size"
    assert summary["deliveries_expected"] == 10          # 5 messages x 2 members
    assert summary["delivery_ratio"] == pytest.approx(0.7)
    assert summary["lost"] == 3                          # d's copy of d#1, both copies of a#2
    assert summary["messages_incomplete"] == 2
    assert summary["messages_never_received"] == 1
    assert summary["duplicated"] == summary["receipts_without_send"] == 0
    assert summary["orders_restarted"] == 0
    lat = summary["latency_us"]
    mean = sum(LATENCIES) / 7
    assert lat["stddev"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in LATENCIES) / 7))
    for p in (10, 25, 50, 75, 90, 95, 99, 99.9):
        assert lat[f"p{p:g}"] == nearest_rank(LATENCIES, p)
    co = summary["latency_intended_us"]
    assert (co["p25"], co["p50"], co["p90"], co["max"]) == (300, 500, 502_000, 502_000)
    assert co["mean"] == pytest.approx(sum(FROM_INTENDED) / 7)
    assert summary["duration_s"] == pytest.approx(1.6)  # first Sent to last event
    assert summary["deliveries_per_s"] == pytest.approx(7 / 1.6)

    latency_rows = (out / "latency_2x2.csv").read_text().splitlines()
    assert latency_rows[0] == csvprocess.LATENCY_HEADER.strip()
    assert f"1,b,a,{T0 + 1000},{T0 + 1200},200,300" in latency_rows
    assert len(latency_rows) == 1 + 7

    messages = (out / "sent-vs-received_2x2.csv").read_text().splitlines()
    assert messages[0] == "message_id,sender_id,room,sent_us,received,expected"
    assert sorted(messages[1:]) == sorted([
        f"1,a,r1,{T0},2,2", f"1,b,r1,{T0 + 1000},2,2", f"1,c,r2,{T0 + 2000},2,2",
        f"1,d,r2,{T0 + 1_500_000},1,2", f"2,a,r1,{T0 + 1_600_000},0,2"])

    series = (out / "timeseries_2x2.csv").read_text().splitlines()
    assert series[0] == ("second,sent,delivered,p50_us,p90_us,p99_us,"
                         "intended_p50_us,intended_p90_us,intended_p99_us")
    # second 0: latencies 100 200 300 400 500 1000; second 1: the 2000 one
    assert series[1:] == ["0,3,6,300,1000,1000,300,1000,1000", "1,2,1,2000,2000,2000,502000,502000,502000"]

    saved = json.loads((out / "summary_2x2.json").read_text())
    assert saved["latency_us"]["p50"] == 400 and saved["lost"] == 3


def test_cli_prints_the_summary_table(tmp_path):
    write_run(tmp_path / "run", [line(e) for e in EVENTS])
    result = run_cli("csvprocess.py", tmp_path / "run", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    table = result.stdout
    assert "delivery ratio" in table and "0.7000" in table
    assert any(row.split()[:3] == ["latency", "p50", "ms"] and row.split()[-1] == "0.40"
               for row in table.splitlines())
    assert "from intended max ms" in table and "502.00" in table
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "latency_2x2.csv", "sent-vs-received_2x2.csv", "summary_2x2.json", "timeseries_2x2.csv"]


@pytest.mark.parametrize("name, meta, source", [
    ("2x2", False, "scenario name <rooms>x<room_size>"),
    ("handmade", False, "events (distinct receivers per room)"),
])
def test_expected_deliveries_without_meta(tmp_path, name, meta, source):
    write_run(tmp_path, [line(e) for e in EVENTS], name=name, meta=meta)
    [summary] = csvprocess.process([str(tmp_path / f"{name}.csv")])
    assert summary["expected_from"] == source
    assert summary["deliveries_expected"] == 10 and summary["lost"] == 3
    assert_clean_numbers(summary)


def test_sampled_receivers_take_room_sizes_from_the_events(tmp_path):
    # only a and c record their receipts (loadclient.py --record-receivers 0.5)
    write_run(tmp_path, [line(e) for e in EVENTS if e[3] == "Sent" or e[2] in ("a", "c")])
    meta_path = tmp_path / "2x2.meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "record_receivers": 0.5}))
    [summary] = csvprocess.process([str(tmp_path)])
    assert summary["expected_from"].startswith("events (distinct receivers per room; a 0.5 sample")
    assert summary["deliveries_expected"] == 5      # one recording member per room
    assert summary["deliveries_received"] == 4 and summary["lost"] == 1
    lat = summary["latency_us"]
    assert (lat["min"], lat["p50"], lat["max"]) == (100, 200, 2000)


def test_order_rows_count_new_orders_and_change_no_delivery(tmp_path):
    # Every client's room begins an order; later r1's state is lost on the server and a and b
    # take a new order (r2 keeps its own). Deliveries join as before, whatever the order.
    orders = [order_line(c, -10, room, "19aee4c3f0b00000") for c, room in (("a", "r1"), ("b", "r1"),
                                                                          ("c", "r2"), ("d", "r2"))]
    rows = orders + [line(e) for e in EVENTS[:6]] + [order_line("a", 1500, "r1", "19aee4c3f0b1a2b3"),
                                                     order_line("b", 1600, "r1", "19aee4c3f0b1a2b3")] \
        + [line(e) for e in EVENTS[6:]] + [f",a,a,Order,{T0},r1,0,,"]            # malformed: no epoch
    write_run(tmp_path, rows)
    result = run_cli("csvprocess.py", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "malformed row skipped: an Order row without an epoch" in result.stderr
    assert any(row.split()[:3] == ["orders", "restarted", "2"] for row in result.stdout.splitlines())
    summary = json.loads((tmp_path / "processed" / "summary_2x2.json").read_text())
    assert summary["orders_restarted"] == 2 and summary["input"]["malformed_rows"] == 1
    assert_clean_numbers(summary)
    assert (summary["lost"], summary["duplicated"], summary["receipts_without_send"]) == (3, 0, 0)


def test_the_format_before_epochs_still_reads(tmp_path):
    """A CSV of the eight columns before the epoch column (and without Order rows)."""
    write_run(tmp_path, [line(e)[:-1] for e in EVENTS], header=",".join(csvprocess.COLUMNS[:8]))
    [summary] = csvprocess.process([str(tmp_path)])
    assert summary["input"]["header"] == "ok" and summary["input"]["malformed_rows"] == 0
    assert_clean_numbers(summary)
    assert summary["lost"] == 3 and summary["orders_restarted"] is None


def test_original_five_column_format_without_header(tmp_path):
    rows = [",".join(line(e).split(",")[:5]) for e in EVENTS]
    write_run(tmp_path, rows, name="legacy", meta=False, header=None)
    [summary] = csvprocess.process([str(tmp_path / "legacy.csv")])
    assert summary["input"]["header"] == "missing"
    assert_clean_numbers(summary)
    assert summary["deliveries_expected"] == 20  # no room column: one room of a, b, c, d
    assert summary["latency_intended_us"] is None


# ---------------------------------------------------------------------------
# Dirty input: counted, reported, never fatal
# ---------------------------------------------------------------------------

def test_dirty_input_is_counted_and_reported(tmp_path):
    rows = [line(e) for e in EVENTS]
    dirty = (rows[:3]
             + [rows[0]]                                        # duplicate Sent
             + ["", "   "]                                      # blank lines
             + rows[3:9]
             + [rows[1]]                                        # duplicate receipt, a#1 already complete
             + [f"7,zz,a,Received,{T0 + 5000},r1,9,,"]          # receipt without a send
             + [f"1,q,q,Snet,{T0},r1,,,"]                       # malformed: type
             + [f"x1,q,q,Sent,{T0},r1,,,"]                      # malformed: message_id
             + rows[9:11]
             + [rows[10]]                                       # duplicate receipt while d#1 waits
             + ["1,q,q,Sent,5"]                                 # malformed: width
             + rows[11:]
             + [f"3,a,a,Sent,{T0 + 1_700_000},r"])              # truncated last line, no newline
    write_run(tmp_path / "run", dirty, end="")
    result = run_cli("csvprocess.py", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for lineno, why in ((16, "type must be Sent, Received or Order"), (17, "message_id is not an integer"),
                        (21, "expected 9 fields, got 5")):
        assert f"2x2.csv:{lineno}: malformed row skipped: {why}" in result.stderr

    summary = json.loads((tmp_path / "run" / "processed" / "summary_2x2.json").read_text())
    assert_clean_numbers(summary)
    assert summary["lost"] == 3
    assert summary["duplicate_sends"] == 1
    assert summary["duplicate_receipts"] == 2
    assert summary["duplicated"] == 3
    assert summary["receipts_without_send"] == 1
    assert summary["messages_never_received"] == 1
    found = summary["input"]
    assert found["blank_lines"] == 2
    assert found["malformed_rows"] == 3
    assert [m["line"] for m in found["malformed_examples"]] == [16, 17, 21]
    assert found["truncated_last_line"] is True
    assert "truncated last line dropped" in result.stdout
    assert "1 receipts without send" in result.stdout


def test_reordered_header_maps_columns_by_name(tmp_path):
    order = [7, 3, 0, 4, 2, 1, 6, 5]
    names = HEADER.split(",")
    rows = [",".join(line(e).split(",")[i] for i in order) for e in EVENTS]
    write_run(tmp_path, rows, header=",".join(names[i] for i in order))
    [summary] = csvprocess.process([str(tmp_path)])
    assert summary["input"]["header"] == "reordered"
    assert_clean_numbers(summary)
    assert summary["latency_intended_us"]["max"] == 502_000


def test_missing_header_reads_documented_order(tmp_path):
    write_run(tmp_path, [line(e) for e in EVENTS], header=None)
    result = run_cli("csvprocess.py", tmp_path)
    assert result.returncode == 0
    assert "no header row" in result.stderr
    summary = json.loads((tmp_path / "processed" / "summary_2x2.json").read_text())
    assert summary["input"]["header"] == "missing"
    assert_clean_numbers(summary)


def test_receipt_before_its_send_still_joins(tmp_path):
    rows = [line(e) for e in EVENTS]
    rows[3], rows[4] = rows[4], rows[3]  # b#1's first receipt written before b#1's Sent
    write_run(tmp_path, rows)
    [summary] = csvprocess.process([str(tmp_path)])
    assert_clean_numbers(summary)
    assert summary["receipts_without_send"] == 0


def test_gzip_input_and_a_gzip_cut_short(tmp_path):
    csv_path = write_run(tmp_path / "whole", [line(e) for e in EVENTS])
    (tmp_path / "whole" / "2x2.csv.gz").write_bytes(gzip.compress(csv_path.read_bytes()))
    csv_path.unlink()
    [summary] = csvprocess.process([str(tmp_path / "whole")])
    assert_clean_numbers(summary)

    big = write_run(tmp_path / "cut", [line(e) for e in EVENTS] * 2000)
    packed = gzip.compress(big.read_bytes())
    big.unlink()
    (tmp_path / "cut" / "2x2.csv.gz").write_bytes(packed[: len(packed) // 2])
    result = run_cli("csvprocess.py", tmp_path / "cut")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "cut" / "processed" / "summary_2x2.json").read_text())
    assert summary["input"]["read_error"].startswith("compressed stream ends early")
    assert summary["messages"] == 5  # the same five keys, repeated: the rest are duplicates
    assert summary["duplicate_sends"] > 0


def test_quoted_names_and_an_unbalanced_quote(tmp_path):
    rows = [f'1,"x,y","x,y",Sent,{T0},r1,,,', f'1,"x,y",b,Received,{T0 + 700},r1,1,,',
            f'1,"x,y,b,Received,{T0 + 800},r1,1,,',                 # unbalanced quote
            f'1,"x,y","x,y",Received,{T0 + 900},r1,1,,']
    write_run(tmp_path, rows)
    [summary] = csvprocess.process([str(tmp_path)])
    assert summary["input"]["malformed_rows"] == 1
    assert summary["latency_us"]["count"] == 2
    assert summary["latency_us"]["max"] == 900


def test_empty_file_and_header_only_give_an_empty_summary(tmp_path):
    (tmp_path / "1x2.csv").write_text("")
    (tmp_path / "2x2.csv").write_text(HEADER + "\n")
    result = run_cli("csvprocess.py", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1x2.csv: empty, no events" in result.stderr
    for name in ("1x2", "2x2"):
        summary = json.loads((tmp_path / "processed" / f"summary_{name}.json").read_text())
        assert summary["messages"] == 0 and summary["latency_us"] is None


def test_sent_ids_track_gaps_and_repeats():
    ids = csvprocess.SentIds()
    assert ids.add(1) and ids.add(4)               # 2 and 3 not seen yet
    assert 1 in ids and 4 in ids and 2 not in ids and 5 not in ids
    assert ids.add(3) and 3 in ids and 2 not in ids
    assert not ids.add(3) and not ids.add(1)       # repeats
    assert ids.add(2) and ids.gaps == []


@pytest.mark.parametrize("content, message", [
    (b'{"scenario": "2x2"}\n', "not an event CSV: line 1 is neither the header"),
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "not an event CSV (binary data)"),
    (b"name,age\nalice,30\n", "not an event CSV: line 1 is neither the header"),
    (b"message_id,sender_id,type\n1,a,Sent\n", "header lacks client_id, timestamp_us"),
    (b"x" * (3 << 20), "not an event CSV (a line of more than"),
], ids=["json", "png", "other-csv", "header-lacks-columns", "no-line-breaks"])
def test_not_an_event_csv_is_one_error_line_and_exit_2(tmp_path, content, message):
    (tmp_path / "bad.csv").write_bytes(content)
    result = run_cli("csvprocess.py", tmp_path / "bad.csv")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("csvprocess: error: ") and message in result.stderr


def test_bad_paths_are_one_error_line_and_exit_2(tmp_path):
    (tmp_path / "plain.csv.gz").write_text(HEADER + "\n")
    (tmp_path / "empty").mkdir()
    write_run(tmp_path / "a", [line(EVENTS[0])])
    write_run(tmp_path / "b", [line(EVENTS[0])])
    for args, message in (([tmp_path / "nope.csv"], "no such file or folder"),
                          ([tmp_path / "plain.csv.gz"], "not a gzip file"),
                          ([tmp_path / "empty"], "no .csv or .csv.gz event files"),
                          ([tmp_path / "a", tmp_path / "b"], "are both scenario '2x2'")):
        result = run_cli("csvprocess.py", *args)
        assert result.returncode == 2, args
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


# ---------------------------------------------------------------------------
# plot.py on generated runs
# ---------------------------------------------------------------------------

SCENARIOS = ((5, 2, 0.0), (5, 4, 0.01), (10, 8, 0.05))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A results/ folder with one generated run of three scenarios (synthetic, for tests)."""
    root = tmp_path_factory.mktemp("plots")
    run = root / "results" / "20261128-100000"
    run.mkdir(parents=True)
    for rooms, size, loss in SCENARIOS:
        write_scenario(run, rooms, size, 30, interval_ms=250, loss=loss, stall_every_s=10, seed=size)
    return root


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def drawn_fraction(path: Path) -> float:
    """The share of pixels that are not white."""
    pixels = matplotlib.image.imread(path)[:, :, :3]
    return float((pixels.min(axis=2) < 0.95).mean())


def test_plot_newest_run_writes_every_figure(results):
    result = run_cli("plot.py", cwd=results)
    assert result.returncode == 0, result.stderr
    plots = results / "results" / "20261128-100000" / "plots"
    names = ["latency-percentiles", "latency-mean", "delivery"] + [
        f"latency-over-time_{rooms}x{size}" for rooms, size, _ in SCENARIOS]
    for name in names:  # paths as the user named the folder: relative here
        assert f"  {Path('results', '20261128-100000', 'plots', name + '.png')}\n" in result.stdout
    wide = (int(plot.WIDE[0] * plot.DPI), int(plot.WIDE[1] * plot.DPI))
    grid = (round((plot.PANEL[0] * 3 + 0.6) * plot.DPI), round((plot.PANEL[1] + 0.8) * plot.DPI))
    for name in names:
        path = plots / f"{name}.png"
        assert png_size(path) == (grid if name == "latency-percentiles" else wide), name
        assert drawn_fraction(path) > 0.02, name  # axes, lines and labels, not a blank canvas
    assert (results / "results" / "20261128-100000" / "processed" / "summary_10x8.json").exists()


def test_plot_svg_and_log_to_another_folder(results, tmp_path):
    result = run_cli("plot.py", results / "results" / "20261128-100000", "--format", "svg", "--log",
                     "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    svgs = sorted(tmp_path.glob("*.svg"))
    assert len(svgs) == 3 + len(SCENARIOS)
    for path in svgs:
        text = path.read_text()
        assert "<svg" in text and len(text) > 10_000


def test_plot_picks_the_newest_run(results, tmp_path):
    first, second = tmp_path / "results" / "run-a", tmp_path / "results" / "run-b"
    write_run(first, [line(e) for e in EVENTS])
    write_run(second, [line(e) for e in EVENTS])
    past = time.time() - 3600
    os.utime(first / "2x2.csv", (past, past))
    os.utime(second / "2x2.csv", (past - 60, past - 60))  # written before run-a, named after it
    result = run_cli("plot.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"figures of {Path('results', 'run-a')}" in result.stdout
    assert (first / "plots" / "latency-over-time_2x2.png").exists()
    assert not (second / "plots").exists()


def test_csvprocess_without_a_path_takes_the_newest_run(tmp_path):
    """The README's tour runs `python csvprocess.py` with no argument, like plot.py."""
    first, second = tmp_path / "results" / "run-a", tmp_path / "results" / "run-b"
    write_run(first, [line(e) for e in EVENTS])
    write_run(second, [line(e) for e in EVENTS])
    past = time.time() - 3600
    os.utime(first / "2x2.csv", (past - 60, past - 60))     # run-b's events were written last
    os.utime(second / "2x2.csv", (past, past))
    result = run_cli("csvprocess.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (second / "processed" / "summary_2x2.json").exists() and not (first / "processed").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("csvprocess.py", cwd=empty)
    assert result.returncode == 2 and "no run folder with event CSVs in results/" in result.stderr


def test_plot_scenario_without_deliveries(tmp_path):
    write_run(tmp_path, [line(EVENTS[0]), line(EVENTS[11])])  # two sends, nothing received
    paths = plot.plot_run([tmp_path], tmp_path / "plots")
    assert len(paths) == 4
    for path in paths:
        assert drawn_fraction(path) > 0.02


def test_plot_draws_a_many_connections_run_from_its_samples(tmp_path):
    """plot.py <connections-N.csv>: connections, memory and p99 over the ramp, hold and chat,
    beside the CSV (a sample without a scrape is left out); a CSV without the sample columns
    is one error line."""
    path = tmp_path / "connections-3000.csv"
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, [*plot.RAMP_COLUMNS, "pings"])
        out.writeheader()
        for t in range(60):
            phase = "ramp" if t < 20 else "hold" if t < 40 else "send"
            n = min(t, 20) * 150 if t != 50 else -1          # -1: the server did not answer that scrape
            out.writerow({"t": t, "phase": phase, "connections": n, "server_rss_mib": 100 + n / 500,
                          "loadclient_rss_mib": 80 + n / 300, "kernel_slab_mib": 200 + n / 100,
                          "mem_used_mib": 900 + n / 50, "p99_ms": 12.5 if phase == "send" else 0,
                          "connect_p99_ms": 40 if phase == "ramp" else 0, "pings": t * 10})
    result = run_cli("plot.py", path)
    assert result.returncode == 0, result.stderr
    figure = tmp_path / "connections-3000-ramp.png"
    assert f"  {figure}\n" in result.stdout
    assert png_size(figure) == (1100, 900) and drawn_fraction(figure) > 0.02
    bad = tmp_path / "other.csv"
    bad.write_text("t,phase,connections\n1,ramp,5\n")
    result = run_cli("plot.py", bad)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "not a bench_connections.py sample file" in result.stderr


def test_plot_errors_are_one_line_and_exit_2(tmp_path):
    result = run_cli("plot.py", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no run folder with event CSVs" in result.stderr
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.csv").write_text("hello\n")
    result = run_cli("plot.py", tmp_path / "junk")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not an event CSV" in result.stderr
