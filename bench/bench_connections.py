#!/usr/bin/env python3
"""Many connections: --workers N holding more than one process's open-file limit allows.

Starts ``scalechat.py --workers N``, runs ``loadclient.py --load-test`` with
--clients clients in rooms of --room-size (every room broadcasting), samples
the supervisor's summed metrics and the server processes' memory every second,
and appends a section to bench/results/connections.md (and .json).

    python bench/bench_connections.py --workers 3 --clients 45000
    python bench/bench_connections.py --workers 6 --clients 100000 --procs 6
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from conftest import free_port, wait_http  # noqa: E402


def tree(pid: int) -> list[int]:
    """pid and its children (one level: the supervisor's workers)."""
    pids = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return pids


def rss_kib(pids: list[int]) -> int:
    """Summed VmRSS of pids in KiB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def cpu_seconds(pids: list[int]) -> float:
    """Summed utime + stime of pids."""
    ticks, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except OSError:
            pass
    return total


def scrape(port: int) -> dict:
    """The supervisor's metrics as {name: value} (labels dropped, values summed)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{")[0].split()[0]
            out[name] = out.get(name, 0.0) + float(line.split()[-1])
    return out


def refusals(port: int) -> dict:
    """Non-zero labelled drop and refusal counters, e.g. {'dropped_clients{reason="ping_timeout"}': 3}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        for family in ("scalechat_dropped_clients_total{", "scalechat_refused_total{",
                       "scalechat_protocol_errors_total{"):
            if line.startswith(family) and float(line.split()[-1]):
                out[line.split()[0][len("scalechat_"):]] = int(float(line.split()[-1]))
    return out


def main() -> int:
    """Run one setting and record it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--clients", type=int, default=45000)
    ap.add_argument("--room-size", type=int, default=10)
    ap.add_argument("--msg-frequency", type=int, default=30000, help="ms between a client's messages")
    ap.add_argument("--duration", type=float, default=40)
    ap.add_argument("--ramp", type=float, default=3000)
    ap.add_argument("--procs", type=int, default=3)
    ap.add_argument("--record-receivers", type=float, default=0.05)
    args = ap.parse_args()
    port, mport = free_port(), free_port()
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "scalechat.py"), "--host", "127.0.0.1",
                               "--port", str(port), "--metrics-port", str(mport),
                               "--workers", str(args.workers), "--log-level", "WARNING"])
    samples: list = []
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        time.sleep(1.0)
        pids = tree(server.pid)
        rss0, cpu0 = rss_kib(pids), cpu_seconds(pids)
        out = tempfile.mkdtemp(prefix="connections-")
        summary = os.path.join(out, "summary.json")
        load = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "loadclient.py"), "--load-test",
             "--server-url", f"ws://127.0.0.1:{port}/ws", "--rooms", str(args.clients // args.room_size),
             "--room-size", str(args.room_size), "--msg-frequency", str(args.msg_frequency),
             "--duration", str(args.duration), "--ramp", str(args.ramp), "--procs", str(args.procs),
             "--record-receivers", str(args.record_receivers), "--grace", "10", "--seed", "1",
             "--connect-timeout", "60", "--out", out, "--summary-json", summary],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stop = threading.Event()

        def sample():
            start = time.monotonic()
            while not stop.wait(1.0):
                try:
                    m = scrape(mport)
                except OSError:
                    continue
                samples.append({"t": round(time.monotonic() - start), "connections": m.get("scalechat_connections", 0),
                                "rss_mib": round(rss_kib(tree(server.pid)) / 1024, 1),
                                "deliveries": m.get("scalechat_deliveries_total", 0)})
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = load.wait(args.duration + 600)
        stop.set()
        sampler.join()
        cpu = cpu_seconds(tree(server.pid)) - cpu0
        time.sleep(1.5)                     # workers report their counters every second
        server_refusals = refusals(mport)
        (result,) = json.load(open(summary))["scenarios"]
    finally:
        server.terminate()
        server.wait(60)
    peak = max(samples, key=lambda s: s["connections"])
    row = {"command": "python bench/bench_connections.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}",
           "settings": vars(args), "loadclient_exit": code,
           "peak_connections": int(peak["connections"]), "server_rss_mib_at_peak": peak["rss_mib"],
           "server_rss_kib_per_connection": round((peak["rss_mib"] * 1024 - rss0) / max(1, peak["connections"]), 2),
           "server_cpu_s": round(cpu, 1), "connected": result["connect_ms"]["count"],
           "sent": result["sent"], "expected": result["expected"], "received": result["received"],
           "delivery_ratio": result["delivery_ratio"], "lost": result["lost"],
           "duplicates": result["duplicates"], "reconnects": result["reconnects"],
           "errors": result["errors"], "server_refusals": server_refusals,
           "latency_ms": result["latency_ms"],
           "connect_ms": result["connect_ms"], "samples": samples}
    path = os.path.join(HERE, "results", "connections.json")
    rows = json.load(open(path)) if os.path.exists(path) else []
    rows.append(row)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    lat = row["latency_ms"]
    section = [f"## {args.clients:,} clients, --workers {args.workers}", "",
               f"- command: `{row['command']}`", f"- date: {row['date']}; machine: {row['machine']}",
               f"- load: rooms of {args.room_size}, one message per client every {args.msg_frequency / 1000:g} s "
               f"(every room broadcasting), {args.duration:g} s of sending, loadclient.py --procs {args.procs}, "
               f"{args.record_receivers:.0%} of receivers recording latency", "",
               "| connected | peak server connections | delivery ratio | lost | duplicates | reconnects "
               "| p50 / p99 / max ms | server RSS at peak | per connection | server CPU s |",
               "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
               f"| {row['connected']:,} | {row['peak_connections']:,} | {row['delivery_ratio']:.6f} | {row['lost']} "
               f"| {row['duplicates']} | {row['reconnects']} | {lat['p50']:.1f} / {lat['p99']:.1f} / {lat['max']:.1f} "
               f"| {row['server_rss_mib_at_peak']:.0f} MiB | {row['server_rss_kib_per_connection']:.2f} KiB "
               f"| {row['server_cpu_s']} |", ""]
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
