#!/usr/bin/env python3
"""What scaling out costs: deliveries/s, server CPU per delivery and latency for one
process, --workers 2, and one or two instances sharing a Redis, at the same load.

    python bench/bench_scaleout.py                  # 40x10 and 50x20 rooms, 2 msg/s each, 10 s
    python bench/bench_scaleout.py --loads 20x10 --rate 1 --duration 20

At each load (ROOMSxSIZE) every setup gets the same traffic from
loadclient.py --load-test (the same rooms, room size, rate and duration). With two instances, two loadclient.py processes
each drive half of the rooms through their own instance, so every message
still makes the Redis round trip (script, publish, subscription) but a room
does not span the two instances (loadclient.py has one --server-url).

CPU is utime + stime from /proc of every server process (the supervisor and its
workers; the chat instances; Redis on its own column), read before the load
client starts and after it exits. Latency is the load client's actual send to
receive time. Writes bench/results/scaleout.json and bench/results/scaleout.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


from testkit import (
    RedisServer,
    children,
    cpu_seconds,
    loadavg,
    machine,
    machine_line,
    scrape,
    start_server,
)

LOADCLIENT = os.path.join(ROOT, "loadclient.py")
SETUPS = ("1 process", "2 workers", "1 instance + Redis", "2 instances + Redis")


QUIET = ("--log-level", "WARNING")


def start_setup(name: str, workdir: str) -> tuple[list, RedisServer | None]:
    """The chat servers (and Redis) of one setup, ready for clients."""
    if name == "1 process":
        return [start_server(*QUIET)], None
    if name == "2 workers":
        server = start_server("--workers", "2", *QUIET)
        deadline = time.monotonic() + 20
        while len(children(server.proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)                 # both workers listening and reporting stats
        return [server], None
    redis = RedisServer(workdir).start()
    count = 2 if name.startswith("2") else 1
    return [start_server("--redis", redis.url, *QUIET) for _ in range(count)], redis


def server_pids(servers: list) -> list:
    """Every chat server process: instances, supervisors and their workers."""
    return [pid for s in servers for pid in (s.proc.pid, *children(s.proc.pid))]


def run_setup(name: str, rooms: int, room_size: int, args: argparse.Namespace) -> dict:
    """Start a setup, drive it with loadclient.py, measure, stop it."""
    with tempfile.TemporaryDirectory() as workdir:
        servers, redis = start_setup(name, workdir)
        try:
            pids = server_pids(servers)
            commands = [[sys.executable, LOADCLIENT, "--load-test", "--server-url", s.url,
                         "--rooms", str(rooms // len(servers)), "--room-size", str(room_size),
                         "--rate", str(args.rate), "--duration", str(args.duration), "--grace", "3",
                         "--seed", "1", "--record-receivers", "1", "--procs", str(args.procs),
                         "--out", os.path.join(workdir, f"run{i}"),
                         "--summary-json", os.path.join(workdir, f"summary{i}.json")]
                        for i, s in enumerate(servers)]
            metric_before = sum(scrape(s.metrics_url)["scalechat_deliveries_total"] for s in servers)
            cpu_before = sum(cpu_seconds(p) for p in pids)
            redis_before = cpu_seconds(redis.proc.pid) if redis else 0.0
            runs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, cwd=workdir) for c in commands]
            codes = [r.wait() for r in runs]
            cpu = sum(cpu_seconds(p) for p in pids) - cpu_before
            redis_cpu = cpu_seconds(redis.proc.pid) - redis_before if redis else None
            metric = sum(scrape(s.metrics_url)["scalechat_deliveries_total"] for s in servers) - metric_before
            results = []
            for i in range(len(servers)):
                with open(os.path.join(workdir, f"summary{i}.json")) as f:
                    results += json.load(f)["scenarios"]
        finally:
            for s in servers:
                s.stop()
            if redis is not None:
                redis.kill()
    received = sum(r["received"] for r in results)
    return {
        "setup": name, "load": f"{rooms}x{room_size}", "commands": [" ".join(c[1:]) for c in commands], "exit_codes": codes,
        "sent": sum(r["sent"] for r in results), "received": received,
        "delivery_ratio": round(received / sum(r["expected"] for r in results), 6),
        "duplicates": sum(r["duplicates"] for r in results),
        "deliveries_per_s": round(sum(r["deliveries_per_s"] for r in results)),
        "server_deliveries": int(metric), "server_cpu_s": round(cpu, 2),
        "server_us_per_delivery": round(cpu / metric * 1e6, 2) if metric else None,
        "redis_cpu_s": None if redis_cpu is None else round(redis_cpu, 2),
        "redis_us_per_message": round(redis_cpu / sum(r["sent"] for r in results) * 1e6, 2)
        if redis_cpu is not None else None,
        # Two load clients: the slower one's p99, the mean p50.
        "p50_ms": round(sum(r["latency_actual_ms"]["p50"] for r in results) / len(results), 2),
        "p99_ms": max(r["latency_actual_ms"]["p99"] for r in results),
        "load_average_after": loadavg(),
    }


def row(r: dict) -> str:
    """One setup's line of a results table."""
    redis = ("-", "-") if r["redis_cpu_s"] is None else (r["redis_cpu_s"], r["redis_us_per_message"])
    return (f"| {r['setup']} | {r['deliveries_per_s']:,} | {r['delivery_ratio']} | "
            f"{r['server_cpu_s']} | {r['server_us_per_delivery']} | {redis[0]} | {redis[1]} | "
            f"{r['p50_ms']} | {r['p99_ms']} | {' '.join(map(str, r['load_average_after']))} |")


def write_markdown(path: str, report: dict) -> None:
    """The results as readable tables, one per load."""
    a, m = report["settings"], report["machine"]
    lines = [
        "# Scale-out: what the workers and the Redis hop cost", "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {machine_line(m)}", "",
    ]
    for load in a["loads"].split(","):
        rooms, size = map(int, load.split("x"))
        lines += [
            f"## {rooms} rooms of {size}", "",
            (f"{rooms * size} clients, {a['rate']:g} messages/s each, {a['duration']:g} s: the same "
             f"for every setup, driven by loadclient.py --load-test --procs {a['procs']} (per instance) "
             "on the same machine."), "",
            ("| setup | deliveries/s | delivery ratio | server CPU s | server us/delivery | Redis CPU s "
             "| Redis us/message | p50 ms | p99 ms | load average after |"),
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
            *(row(r) for r in report["results"] if r["load"] == load), "",
        ]
    lines += [
        "Server CPU is utime + stime of every chat server process (supervisor and workers, or the",
        "instances) over the whole load-client run, divided by the servers' own",
        "scalechat_deliveries_total. Latency is the load client's actual send-to-receive time",
        "(with two load clients: the mean p50 and the larger p99). The machine is shared and",
        "the load clients run on the same 2 cores: see the load average. Where the servers'",
        "CPU seconds are far below the run's length, they were not the bottleneck, and the",
        "latency is mostly the load client's and the shared machine's.",
        "",
        "Commands of every row are in scaleout.json.", "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main() -> int:
    """Run every setup at every load and write the results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loads", default="40x10,50x20",
                   help="comma-separated ROOMSxSIZE (an even number of rooms: two instances split them)")
    p.add_argument("--rate", type=float, default=2.0, help="messages per second per client")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of sending per setup")
    p.add_argument("--procs", type=int, default=2, help="processes of each loadclient.py run")
    p.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset of: " + ", ".join(SETUPS))
    args = p.parse_args()
    results = []
    for load in args.loads.split(","):
        rooms, size = map(int, load.split("x"))
        for name in args.setups.split(","):
            r = run_setup(name.strip(), rooms, size, args)
            results.append(r)
            print(f"{load} {r['setup']}: {r['deliveries_per_s']} deliveries/s, ratio {r['delivery_ratio']}, "
                  f"{r['server_us_per_delivery']} us/delivery, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms",
                  flush=True)
    report = {"command": " ".join(["python bench/bench_scaleout.py", *sys.argv[1:]]),
              "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "settings": vars(args), "results": results}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "scaleout.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    write_markdown(os.path.join(HERE, "results", "scaleout.md"), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
