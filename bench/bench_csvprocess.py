#!/usr/bin/env python3
"""Benchmark csvprocess.py: events per second and peak memory at 1M and 10M events.

    python bench/bench_csvprocess.py [--events 10000000] [--repeat 3]

Generates one scenario file of the requested size in the load-test CSV format
(with its meta.json) in a temporary folder, runs `csvprocess.py` on its first
1M events and on all of it as separate processes, and records wall time,
CPU time and peak RSS (the child's ru_maxrss, i.e. its VmHWM). Results go to
bench/results/csvprocess.json and bench/results/csvprocess.md; the generated
files are deleted afterwards. The scenario comes from the test kit's
write_scenario (testkit_csv.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import testkit
from testkit_csv import write_scenario

CSVPROCESS = HERE.parent / "csvprocess.py"

# ---------------------------------------------------------------------------
# Measuring one csvprocess.py run
# ---------------------------------------------------------------------------

def head(source: Path, target: Path, events: int) -> None:
    """Copy the header and the first `events` rows of source to target (and its meta.json)."""
    with open(source, encoding="utf-8") as f, open(target, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i > events:
                break
            out.write(line)
    shutil.copy(source.with_name(source.name[:-4] + ".meta.json"),
                target.with_name(target.name[:-4] + ".meta.json"))


def run_once(csv_path: Path, out_dir: Path) -> dict:
    """Run csvprocess.py on csv_path as a child; its wall, CPU seconds and peak RSS."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(CSVPROCESS), str(csv_path), "--out", str(out_dir)],
                             stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"csvprocess.py failed with exit status {child.returncode}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def measure(csv_path: Path, events: int, out_dir: Path, repeat: int) -> dict:
    """Median wall time over repeat runs, events/s, and the largest peak RSS."""
    runs = [run_once(csv_path, out_dir) for _ in range(repeat)]
    wall = statistics.median(r["wall_s"] for r in runs)
    cpu = statistics.median(r["cpu_s"] for r in runs)
    return {"events": events, "file_mib": round(csv_path.stat().st_size / 2**20, 1),
            "runs": repeat, "wall_s_median": round(wall, 3),
            "wall_s_all": [round(r["wall_s"], 3) for r in runs],
            "cpu_s_median": round(cpu, 3), "events_per_s": round(events / wall),
            "events_per_cpu_s": round(events / cpu),
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1),
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


# ---------------------------------------------------------------------------
# Main: generate, measure, record, clean up
# ---------------------------------------------------------------------------

def machine() -> dict:
    """The machine the numbers come from, and the numpy they were generated with."""
    return {**testkit.machine(), "numpy": np.__version__}


def markdown(result: dict) -> str:
    """The results as a Markdown table with the command, date and machine."""
    m = result["machine"]
    rows = "\n".join(
        f"| {r['events']:,} | {r['file_mib']} | {r['wall_s_median']} | {r['cpu_s_median']} "
        f"| {r['events_per_s']:,} | {r['events_per_cpu_s']:,} | {r['peak_rss_mib']} "
        f"| {' '.join(map(str, r['load_average_after']))} |" for r in result["results"])
    small, large = result["results"]
    return f"""# csvprocess.py throughput and memory

Command: `{result['command']}`
Date: {result['date']}
Machine: {testkit.machine_line(m)}, numpy {m['numpy']}
Input: scenario {result['scenario']} ({result['profile']}), generated; timing is the median of
{small['runs']} runs per size, each a separate `python csvprocess.py FILE --out DIR` process
(outputs written: latency, sent-vs-received, time series, summary).

| events | file MiB | wall s (median) | CPU s (median) | events/s (wall) | events per CPU-second | peak RSS MiB | load average after |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |
{rows}

{large['events'] / small['events']:.1f}x the events took {large['cpu_s_median'] / small['cpu_s_median']:.1f}x the CPU time
({large['wall_s_median'] / small['wall_s_median']:.1f}x the wall time) and {large['peak_rss_mib'] / small['peak_rss_mib']:.1f}x the peak memory.
The machine is shared: wall time includes waiting for a core (see the load average),
CPU time (user + system of the csvprocess.py process) does not.
Peak memory is mostly the latency arrays kept for exact percentiles (about 24 bytes per delivery)
plus the messages in flight; the join table itself stays small because a message
leaves it as soon as all its deliveries are in.
"""


def main() -> None:
    """Generate the input, measure 1M and the full size, write the results, delete the input."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="size of the large file (>= 1M)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (median reported)")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    rooms, room_size, loss, duplicates = 500, 4, 0.001, 0.0001
    per_second = rooms * room_size * (1 + room_size)  # one message per client per second
    with tempfile.TemporaryDirectory(prefix="bench-csvprocess-") as tmp:
        tmp = Path(tmp)
        print(f"generating >= {args.events:,} events in {tmp} ...", flush=True)
        big, events = write_scenario(tmp, rooms, room_size, -(-args.events // per_second) + 1,
                                     loss=loss, duplicates=duplicates, stall_every_s=60)
        small = tmp / "small" / big.name
        small.parent.mkdir()
        head(big, small, 1_000_000)
        results = []
        for path, count in ((small, 1_000_000), (big, events)):
            print(f"csvprocess.py on {count:,} events ...", flush=True)
            results.append(measure(path, count, tmp / "out", args.repeat))
            print(json.dumps(results[-1]), flush=True)
    result = {"command": "python bench/bench_csvprocess.py " + " ".join(sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "machine": machine(),
              "scenario": f"{rooms}x{room_size}",
              "profile": f"{rooms * room_size} clients, 1 message/s each, {loss:.1%} deliveries lost, "
                         f"{duplicates:.2%} duplicated, a 300 ms stall every 60 s",
              "results": results}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "csvprocess.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.results / "csvprocess.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))


if __name__ == "__main__":
    main()
