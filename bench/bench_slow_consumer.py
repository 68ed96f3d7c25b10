#!/usr/bin/env python3
"""A client that stops reading: what it costs the server, with and without a buffer cap.

One room of --room-size load clients (loadclient.py) sends --msg-size texts at
--rate each; one more member joins the room and never reads. The server's
queue for that member grows until --max-buffer cuts it off with 1013. The
script runs the same load twice, with the default cap and with the cap
effectively off, samples the server's RSS every second, and writes
bench/results/slow_consumer.md and .json.

    python bench/bench_slow_consumer.py [--duration 20]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from testkit import (
    RawClient,
    machine,
    machine_line,
    peak_rss_kib,
    rss_kib,
    sample,
    scrape,
    start_server,
)


def run(max_buffer: int, args) -> dict:
    """One run: the server with this cap, the load, the silent member; samples and summary."""
    server = start_server("--rate-limit", "0", "--max-buffer", str(max_buffer), "--write-timeout", "3600",
                          "--history", str(args.history), "--log-level", "WARNING")
    try:
        rss0 = rss_kib(server.proc.pid)
        silent = RawClient(server.port, f"/ws/slow1x{args.room_size}-0?name=silent", rcvbuf=4096)   # never reads again
        out = tempfile.mkdtemp(prefix="slow-consumer-")
        summary = os.path.join(out, "summary.json")
        load = subprocess.Popen([sys.executable, os.path.join(ROOT, "loadclient.py"), "--load-test",
                                 "--server-url", server.url, "--rooms", "1", "--room-prefix", "slow",
                                 "--room-size", str(args.room_size), "--rate", str(args.rate),
                                 "--msg-size", str(args.msg_size), "--duration", str(args.duration),
                                 "--grace", "3", "--seed", "1", "--out", out, "--summary-json", summary],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples, peak = [], rss0
        stop = threading.Event()

        def sample_rss():
            start = time.monotonic()
            while not stop.wait(1.0):
                kib = rss_kib(server.proc.pid)
                samples.append((round(time.monotonic() - start), kib - rss0))
        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        load.wait(args.duration + 120)
        stop.set()
        sampler.join()
        peak = peak_rss_kib(server.proc.pid)
        with open(summary) as f:
            (result,) = json.load(f)["scenarios"]
        cut = sample(scrape(server.metrics_url), "scalechat_dropped_clients_total",
                     reason="slow_consumer")
        silent.close()
        return {"max_buffer": max_buffer, "rss_growth_kib": samples, "peak_rss_growth_kib": peak - rss0,
                "cut_off": cut, "delivery_ratio": result["delivery_ratio"],
                "p50_ms": result["latency_ms"]["p50"], "p99_ms": result["latency_ms"]["p99"],
                "deliveries_per_s": result["deliveries_per_s"]}
    finally:
        server.stop(timeout=30)


def main() -> int:
    """Run both settings and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--room-size", type=int, default=10)
    ap.add_argument("--rate", type=float, default=5)
    ap.add_argument("--msg-size", type=int, default=16384)
    ap.add_argument("--history", type=int, default=100,
                    help="the server's --history: queued frames are shared with history, so a "
                         "queue only costs memory beyond what history holds")
    args = ap.parse_args()
    runs = [run(1 << 20, args), run(1 << 40, args)]
    results = {"command": "python bench/bench_slow_consumer.py " + " ".join(sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "machine": machine(),
               "settings": vars(args), "runs": runs}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "slow_consumer.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["# A member that never reads; server --history {args.history}", "",
             f"- command: `{results['command']}`", f"- date: {results['date']}",
             f"- machine: {machine_line(results['machine'])}",
             (f"- load: one room of {args.room_size} load clients, {args.rate} msg/s each, "
             f"{args.msg_size} B texts, {args.duration:g} s, plus one member that never reads; server --history {args.history}"), "",
             "| --max-buffer | silent member cut off (1013) | server RSS growth, peak | others' delivery ratio | others' p50 / p99 ms |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in runs:
        cap = "1 MiB (default)" if r["max_buffer"] == 1 << 20 else "1 TiB (no cap)"
        lines.append(f"| {cap} | {int(r['cut_off'])} | {r['peak_rss_growth_kib'] / 1024:.1f} MiB | "
                     f"{r['delivery_ratio']:.4f} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} |")
    lines += ["", "RSS growth over time (MiB, one sample a second):", ""]
    for r in runs:
        cap = "capped" if r["max_buffer"] == 1 << 20 else "no cap"
        lines.append(f"- {cap}: " + " ".join(f"{kib / 1024:.0f}" for _, kib in r["rss_growth_kib"]))
    with open(os.path.join(HERE, "results", "slow_consumer.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
