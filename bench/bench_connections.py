#!/usr/bin/env python3
"""Many connections: --workers N holding more than one process's open-file limit allows.

Starts ``scalechat.py --workers N``, runs ``loadclient.py --load-test`` with
--clients clients in rooms of --room-size (every room broadcasting), samples
the supervisor's summed metrics and the server processes' memory every second,
and appends a section to bench/results/connections.md (and .json).

    python bench/bench_connections.py --workers 3 --clients 45000
    python bench/bench_connections.py --workers 6 --clients 100000 --procs 6
    python bench/bench_connections.py --instances 2 --redis --workers 3 --clients 60000 --procs 2

With --instances K the clients are split over K server instances (each with
--workers N), sharing a private redis-server when --redis is given; each
instance gets its own load client.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from testkit import (
    RedisServer,
    cpu_seconds,
    machine,
    machine_line,
    process_tree,
    rss_kib,
    scrape,
    start_server,
)

FULL_GCS = 'scalechat_gc_pause_seconds_count{generation="2"}'
# Young collections (generations 0 and 1) in all, and those done within 100 ms.
YOUNG = tuple(f'scalechat_gc_pause_seconds_{kind}{{generation="{g}"{le}}}'
              for g in "01" for kind, le in (("count", ""), ("bucket", ',le="0.1"')))


GC_SAMPLE = re.compile(r'scalechat_gc_pause_seconds_(count|sum|bucket)\{generation="(\d+)"(?:,le="([^"]+)")?\}')


def refusals(samples: dict) -> dict:
    """Non-zero labelled drop and refusal counters, e.g. {'dropped_clients_total{reason="ping_timeout"}': 3}."""
    families = ("scalechat_dropped_clients_total{", "scalechat_refused_total{", "scalechat_protocol_errors_total{")
    return {key[len("scalechat_"):]: int(value) for key, value in samples.items()
            if key.startswith(families) and value}


def gc_pauses(samples: dict) -> dict:
    """Per generation: collections, seconds paused in all, and the bucket bound of the longest."""
    out: dict = {}
    for key, value in samples.items():
        if not (match := GC_SAMPLE.fullmatch(key)):
            continue
        kind, generation, le = match.groups()
        gen = out.setdefault(generation, {"count": 0, "seconds": 0.0, "buckets": []})
        if kind == "count":
            gen["count"] = int(value)
        elif kind == "sum":
            gen["seconds"] = round(value, 4)
        else:
            gen["buckets"].append((float(le), value))
    for gen in out.values():
        longest = [le for le, n in sorted(gen.pop("buckets")) if n >= gen["count"]]
        gen["longest_le_s"] = longest[0] if gen["count"] else 0.0
    return out


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (all sockets)."""
    with open("/proc/net/netstat") as f:
        head, values = [line.split() for line in f if line.startswith("TcpExt:")][:2]
    return int(values[head.index("ListenOverflows")])


def combine(results: list) -> dict:
    """One summary from the load clients' summaries (latency: the worst of them)."""
    out = {key: sum(r[key] for r in results) for key in ("sent", "expected", "received", "lost",
                                                       "duplicates", "reconnects")}
    out["connected"] = sum(r["connect_ms"]["count"] for r in results)
    out["delivery_ratio"] = out["received"] / out["expected"] if out["expected"] else 0.0
    out["latency_ms"] = {q: max(r["latency_ms"][q] for r in results) for q in ("p50", "p99", "max")}
    out["errors"] = {}
    for r in results:
        for kind, n in r["errors"].items():
            out["errors"][kind] = out["errors"].get(kind, 0) + n
    return out


def main() -> int:
    """Run one setting and record it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--redis", action="store_true", help="instances share a private redis-server")
    ap.add_argument("--clients", type=int, default=45000)
    ap.add_argument("--room-size", type=int, default=10)
    ap.add_argument("--msg-frequency", type=int, default=30000, help="ms between a client's messages")
    ap.add_argument("--duration", type=float, default=40)
    ap.add_argument("--ramp", type=float, default=3000, help="connections per second, per instance")
    ap.add_argument("--procs", type=int, default=3, help="load-client processes per instance")
    ap.add_argument("--record-receivers", type=float, default=0.05)
    ap.add_argument("--server-args", default="", help="more scalechat.py flags, e.g. '--gc-freeze false'")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="connections-")
    redis = RedisServer(work).start() if args.redis else None
    servers = [start_server("--workers", str(args.workers), "--log-level", "WARNING", *args.server_args.split(),
                            *(("--redis", redis.url) if redis else ())) for _ in range(args.instances)]
    samples: list = []
    per_instance = args.clients // args.instances
    try:
        time.sleep(1.0)

        def server_pids():
            return [pid for server in servers for pid in process_tree(server.proc.pid)]
        rss0, cpu0 = rss_kib(server_pids()), cpu_seconds(server_pids())
        overflows0 = listen_overflows()
        summaries = [os.path.join(work, f"summary{k}.json") for k in range(args.instances)]
        loads = [subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "loadclient.py"), "--load-test",
             "--server-url", server.url, "--rooms", str(per_instance // args.room_size),
             "--room-size", str(args.room_size), "--msg-frequency", str(args.msg_frequency),
             "--duration", str(args.duration), "--ramp", str(args.ramp), "--procs", str(args.procs),
             "--record-receivers", str(args.record_receivers), "--grace", "10", "--seed", str(k + 1),
             "--room-prefix", f"i{k}-", "--connect-timeout", "60", "--out", os.path.join(work, f"run{k}"),
             "--summary-json", summaries[k]],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for k, server in enumerate(servers)]
        stop = threading.Event()

        def sample():
            start = time.monotonic()
            while not stop.wait(1.0):
                try:
                    scrapes = [scrape(server.metrics_url) for server in servers]
                except OSError:
                    continue
                samples.append({"t": round(time.monotonic() - start),
                                "connections": sum(m.get("scalechat_connections", 0) for m in scrapes),
                                "rss_mib": round(rss_kib(server_pids()) / 1024, 1),
                                "deliveries": sum(m.get("scalechat_deliveries_total", 0) for m in scrapes),
                                "full_gcs": int(sum(m.get(FULL_GCS, 0) for m in scrapes)),
                                "slow_young_gcs": int(sum(m.get(YOUNG[0], 0) - m.get(YOUNG[1], 0)
                                                          + m.get(YOUNG[2], 0) - m.get(YOUNG[3], 0)
                                                          for m in scrapes))})
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = max(load.wait(args.duration + 600) for load in loads)
        stop.set()
        sampler.join()
        cpu = cpu_seconds(server_pids()) - cpu0
        overflows = listen_overflows() - overflows0
        time.sleep(1.5)                     # workers report their counters every second
        server_refusals: dict = {}
        gc: dict = {}
        for server in servers:
            scraped = scrape(server.metrics_url)
            for key, n in refusals(scraped).items():
                server_refusals[key] = server_refusals.get(key, 0) + n
            for generation, g in gc_pauses(scraped).items():
                total = gc.setdefault(generation, {"count": 0, "seconds": 0.0, "longest_le_s": 0.0})
                total["count"] += g["count"]
                total["seconds"] = round(total["seconds"] + g["seconds"], 4)
                total["longest_le_s"] = max(total["longest_le_s"], g["longest_le_s"])
        scenarios = []
        for path in summaries:
            with open(path) as f:
                scenarios.append(json.load(f)["scenarios"][0])
        result = combine(scenarios)
    finally:
        for server in servers:
            server.stop(timeout=60)
        if redis is not None:
            redis.proc.terminate()
            redis.proc.wait(30)
    peak = max(samples, key=lambda s: s["connections"])
    row = {"command": "python bench/bench_connections.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": machine(),
           "settings": vars(args), "loadclient_exit": code,
           "peak_connections": int(peak["connections"]), "server_rss_mib_at_peak": peak["rss_mib"],
           "server_rss_kib_per_connection": round((peak["rss_mib"] * 1024 - rss0) / max(1, peak["connections"]), 2),
           "server_cpu_s": round(cpu, 1), **result, "server_refusals": server_refusals,
           "listen_overflows": overflows, "gc_pauses": gc, "samples": samples}
    path = os.path.join(HERE, "results", "connections.json")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = json.load(f)
    rows.append(row)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    lat = row["latency_ms"]
    full = gc.get("2", {"count": 0, "longest_le_s": 0.0})
    setup = f"--workers {args.workers}" + (f" x {args.instances} instances" if args.instances > 1 else "") + \
        (" + Redis" if args.redis else "")
    section = [f"## {args.clients:,} clients, {setup}", "",
               f"- command: `{row['command']}`", f"- date: {row['date']}; machine: {machine_line(row['machine'])}",
               f"- load: rooms of {args.room_size}, one message per client every {args.msg_frequency / 1000:g} s "
               f"(every room broadcasting), {args.duration:g} s of sending, loadclient.py --procs {args.procs}"
               f"{' per instance' if args.instances > 1 else ''}, "
               f"{args.record_receivers:.0%} of receivers recording latency"
               + ("; latency: the worst of the instances' load clients" if args.instances > 1 else ""), "",
               ("| connected | peak server connections | delivery ratio | lost | duplicates | reconnects "
               "| p50 / p99 / max ms | server RSS at peak | per connection | server CPU s "
               "| full GCs: count, longest | listen-queue overflows |"),
               "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
               (f"| {row['connected']:,} | {row['peak_connections']:,} | {row['delivery_ratio']:.6f} | {row['lost']} "
               f"| {row['duplicates']} | {row['reconnects']} | {lat['p50']:.1f} / {lat['p99']:.1f} / {lat['max']:.1f} "
               f"| {row['server_rss_mib_at_peak']:.0f} MiB | {row['server_rss_kib_per_connection']:.2f} KiB "
               f"| {row['server_cpu_s']} | {full['count']}, <= {full['longest_le_s'] * 1000:g} ms "
               f"| {overflows:,} |"), ""]
    if row["errors"] or server_refusals:
        section += [f"Load client errors: {row['errors']}; server drops and refusals: {server_refusals}", ""]
    md = os.path.join(HERE, "results", "connections.md")
    if not os.path.exists(md):
        with open(md, "w") as f:
            f.write("# Many connections on one machine\n\nWritten by `bench/bench_connections.py`, newest last.\n\n")
    with open(md, "a") as f:
        f.write("\n".join(section) + "\n")
    print("\n".join(section))
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
