#!/usr/bin/env python3
"""Benchmark csvprocess.py: events per second and peak memory at 1M and 10M events.

    python bench/bench_csvprocess.py [--events 10000000] [--repeat 3]

Generates one scenario file of the requested size in the load-test CSV format
(with its meta.json) in a temporary folder, runs `csvprocess.py` on its first
1M events and on all of it as separate processes, and records wall time,
CPU time and peak RSS (the child's ru_maxrss, i.e. its VmHWM). Results go to
bench/results/csvprocess.json and bench/results/csvprocess.md; the generated
files are deleted afterwards.

`write_scenario` is also the tests' source of realistic synthetic runs.
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
import loadclient  # beside this folder
import testkit

CSVPROCESS = HERE.parent / "csvprocess.py"
HEADER = loadclient.CSV_HEADER.decode()
START_US = 1_764_324_000_000_000  # 2025-11-28 10:00:00 UTC

# ---------------------------------------------------------------------------
# Synthetic runs in the load-test format
# ---------------------------------------------------------------------------


def write_scenario(folder: Path, rooms: int, room_size: int, seconds: float, *,
                   interval_ms: float = 1000.0, loss: float = 0.0, duplicates: float = 0.0,
                   stall_every_s: float = 0.0, median_latency_ms: float = 2.0,
                   seed: int = 1, start_us: int = START_US) -> tuple[Path, int]:
    """Write <rooms>x<room_size>.csv and .meta.json as loadclient.py would; returns (csv, events).

    Every client of a room sends on an open-model schedule (fixed interval,
    random phase, jitter); every member, the sender included, receives each
    message after a log-normal latency; `loss` drops deliveries, `duplicates`
    writes receipts twice, and every `stall_every_s` seconds a 300 ms server
    stall delays sends and deliveries (what coordinated omission hides)."""
    rng = np.random.default_rng(seed)
    name = f"{rooms}x{room_size}"
    clients = rooms * room_size
    interval_us = int(interval_ms * 1000)
    phase = rng.integers(0, interval_us, clients)
    sender = [f"c{i}" for i in range(clients)]
    room_of = [f"room{i // room_size}" for i in range(clients)]
    # receiver j of client i's message: the members of i's room
    member = (np.arange(clients) // room_size * room_size)[:, None] + np.arange(room_size)[None, :]
    member = member.ravel().tolist()
    seqs = [0] * rooms
    steps = int(seconds * 1000 / interval_ms)
    events = 0
    path = folder / f"{name}.csv"
    with open(path, "w", encoding="utf-8", buffering=1 << 20) as out:
        out.write(HEADER)
        # Each client's welcome: its room's order, one epoch per room.
        out.writelines(f",{sender[i]},{sender[i]},Order,{start_us - 1_000_000},{room_of[i]},0,,"
                       f"{start_us // 1000 + i // room_size:016x}\n" for i in range(clients))
        events += clients
        for step in range(steps):
            intended = start_us + step * interval_us + phase
            actual = intended + rng.exponential(40, clients).astype(np.int64)
            latency = rng.lognormal(np.log(median_latency_ms * 1000), 0.5, (clients, room_size))
            if stall_every_s:  # sends due in a stall go out when it ends, and queue behind it
                period = int(stall_every_s * 1e6)
                into = (intended - start_us) % period
                stalled = (into < 300_000) & (intended - start_us >= period)
                actual = np.where(stalled, intended - into + 300_000, actual)
                latency += np.where(stalled, rng.uniform(0, 20_000, clients), 0)[:, None]
            received = (actual[:, None] + latency.astype(np.int64)).ravel()
            kept = rng.random(received.size) >= loss
            twice = rng.random(received.size) < duplicates
            stamps = np.concatenate((actual, received))
            order = np.argsort(stamps, kind="stable").tolist()
            stamps, actual_l, intended_l = stamps.tolist(), actual.tolist(), intended.tolist()
            kept, twice = kept.tolist(), twice.tolist()
            seq_of = [0] * clients  # a room numbers its messages in the order they reach it
            for i in np.argsort(actual, kind="stable").tolist():
                seqs[i // room_size] += 1
                seq_of[i] = seqs[i // room_size]
            lines = []
            mid = step + 1
            for k in order:
                if k < clients:
                    lines.append(f"{mid},{sender[k]},{sender[k]},Sent,{actual_l[k]},{room_of[k]},,{intended_l[k]},\n")
                    continue
                d = k - clients
                if not kept[d]:
                    continue
                i = d // room_size
                line = f"{mid},{sender[i]},{sender[member[d]]},Received,{stamps[k]},{room_of[i]},{seq_of[i]},,\n"
                lines.append(line)
                if twice[d]:
                    lines.append(line)
            events += len(lines)
            out.writelines(lines)
    end_us = start_us + steps * interval_us
    meta = {"scenario": name, "rooms": rooms, "room_size": room_size, "clients": clients,
            "msg_interval_ms": interval_ms, "msg_size": 64, "duration_s": seconds, "ramp": 0,
            "start_time": iso(start_us), "end_time": iso(end_us), "start_us": start_us,
            "end_us": end_us, "server_url": "ws://127.0.0.1:8080/ws", "tool": "synthetic",
            "version": "0", "seed": seed, "settings": {"synthetic": True},
            "sent": clients * steps, "received": None, "errors": {}}
    (folder / f"{name}.meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path, events


def iso(us: int) -> str:
    """Epoch microseconds as ISO 8601 UTC."""
    return datetime.datetime.fromtimestamp(us / 1e6, datetime.UTC).isoformat()


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
