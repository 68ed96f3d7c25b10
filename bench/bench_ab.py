#!/usr/bin/env python3
"""Server CPU per delivery of two commits of scalechat.py, side by side.

    python bench/bench_ab.py c87bf67              # that commit against the working tree
    python bench/bench_ab.py c87bf67 HEAD --rounds 5
    python bench/bench_ab.py . --b-args "--workers 2"     # one process against two workers


Each round runs A then B: a fresh server pinned to core 0, the same load client
(the working tree's loadclient.py, pinned to core 1) at an open-model load of
100 rooms of 10 members at 2 messages/s each (20,000 deliveries/s), and reads the
server's CPU time from /proc over the steady part of the run. Alternating A B A B
keeps a noisy shared machine's drift out of the comparison; the medians and
every pair are written to bench/results/ab.md (appended) and ab.json.

``--a-args`` / ``--b-args`` add server flags to one side (the same commit twice
compares two ways to run it). The server's CPU is summed over its processes (a
supervisor and its workers, each read at the window's two ends); the
supervisor's own share is reported beside the total. ``--server-cores`` widens
the server's pinning (``0,1``: the workers may use both cores, sharing core 1
with the load client). ``--load`` replaces the load client's scenario, e.g.
``--load "--rooms 100 --room-size 2 --rate 1 --msg-size 60000"`` (bursts of big
messages); the load client's p99 latency is reported beside the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)


from testkit import children, cpu_seconds, free_port, machine, machine_line, wait_http

DEFAULT_LOAD = "--rooms 100 --room-size 10 --rate 2"


def checkout(rev: str, into: str) -> str:
    """scalechat.py and static/ of rev (or of the working tree for '.') in a folder of their own."""
    os.makedirs(os.path.join(into, "static"))
    if rev == ".":
        subprocess.run(["cp", "-r", os.path.join(ROOT, "scalechat.py"), os.path.join(ROOT, "static"), into],
                       check=True)
        return "working tree"
    with open(os.path.join(into, "scalechat.py"), "wb") as f:
        f.write(subprocess.run(["git", "show", f"{rev}:scalechat.py"], cwd=ROOT, check=True,
                               capture_output=True).stdout)
    return subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def one_run(folder: str, args: argparse.Namespace, out: str, server_args: list) -> dict:
    """One server and one load-client run; the server's CPU share over the steady window."""
    port = free_port()
    server = subprocess.Popen(["taskset", "-c", args.server_cores, sys.executable,
                               os.path.join(folder, "scalechat.py"), "--host", "127.0.0.1", "--port", str(port),
                               "--metrics-port", "0", "--log-level", "WARNING", *server_args], cwd=folder)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        load = subprocess.Popen(
            ["taskset", "-c", "1", sys.executable, os.path.join(ROOT, "loadclient.py"), "--load-test",
             "--server-url", f"ws://127.0.0.1:{port}/ws", *args.load.split(),
             "--duration", str(args.duration), "--record-receivers", "0.1", "--seed", "1", "--out", out],
            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(args.warmup)
        pids = [server.pid, *children(server.pid)]
        c0, own0, t0 = cpu_seconds(pids), cpu_seconds(server.pid), time.monotonic()
        time.sleep(args.duration - args.warmup - 1)
        c1, own1, t1 = cpu_seconds(pids), cpu_seconds(server.pid), time.monotonic()
        output = load.communicate(timeout=args.duration + 60)[0]
    finally:
        server.terminate()
        server.wait(15)
    ratio = next((line.split("delivery ratio")[1].split()[0] for line in output.splitlines()
                  if "delivery ratio" in line), "?")
    p99 = next((float(line.split(" p99 ")[1].split()[0]) for line in output.splitlines()
                if "latency/actual" in line and " p99 " in line), None)
    return {"cpu_share": (c1 - c0) / (t1 - t0), "delivery_ratio": ratio, "p99_ms": p99, "exit": load.returncode,
            "processes": len(pids), "supervisor_share": (own1 - own0) / (t1 - t0) if len(pids) > 1 else None}


def supervisor_part(result: dict, words: str = " of a core") -> str:
    """' (supervisor 3.1%)' when the server had workers, else ''."""
    share = result.get("supervisor_share")
    return "" if share is None else f" (supervisor {100 * share:.1f}%{words})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="git revision of the baseline")
    parser.add_argument("b", nargs="?", default=".", help="git revision to compare (default: the working tree)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=12, help="seconds of each load-client run")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds before the CPU window opens")
    parser.add_argument("--a-args", default="", help="server flags of side A, e.g. \"--workers 2\"")
    parser.add_argument("--b-args", default="", help="server flags of side B")
    parser.add_argument("--server-cores", default="0", help="the cores the server is pinned to (taskset -c)")
    parser.add_argument("--load", default=DEFAULT_LOAD,
                        help=f"the load client's scenario flags (default: {DEFAULT_LOAD!r})")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    flags = {"a": args.a_args.split(), "b": args.b_args.split()}
    with tempfile.TemporaryDirectory() as tmp:
        names = {side: checkout(rev, os.path.join(tmp, side)) + (f" {' '.join(flags[side])}" if flags[side] else "")
                 for side, rev in (("a", args.a), ("b", args.b))}
        runs: dict = {"a": [], "b": []}
        for r in range(args.rounds):
            for side in ("a", "b"):
                result = one_run(os.path.join(tmp, side), args, os.path.join(tmp, f"out-{side}-{r}"), flags[side])
                runs[side].append(result)
                print(f"round {r + 1} {side} ({names[side]}): server {100 * result['cpu_share']:.1f}% of a core"
                      f"{supervisor_part(result)}, delivery ratio {result['delivery_ratio']}, "
                      f"p99 {result['p99_ms']} ms", flush=True)
    medians = {side: statistics.median(x["cpu_share"] for x in runs[side]) for side in runs}
    change = medians["b"] / medians["a"] - 1
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "python bench/bench_ab.py " + shlex.join(sys.argv[1:])
    info = machine()
    lines = [f"## {stamp}: {names['a']} (A) against {names['b']} (B)", "",
             f"- command: `{command}`",
             (f"- machine: {machine_line(info)}; "
              f"load average {info['loadavg']} at the end"),
             (f"- load: `{args.load}`" + (" (100 rooms x 10 members x 2 messages/s = 20,000 deliveries/s)"
                                           if args.load == DEFAULT_LOAD else "") +
              f"; server on core {args.server_cores}, load client on core 1; CPU summed over the server's "
              "processes (in brackets: the supervisor's own); p99: the load client's message latency"), "",
             "| round | A: server % of a core | B: server % of a core | B / A | A: p99 ms | B: p99 ms |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r, (a, b) in enumerate(zip(runs["a"], runs["b"]), 1):
        lines.append(f"| {r} | {100 * a['cpu_share']:.1f}{supervisor_part(a, '')} | "
                     f"{100 * b['cpu_share']:.1f}{supervisor_part(b, '')} | "
                     f"{b['cpu_share'] / a['cpu_share']:.3f} | {a['p99_ms']} | {b['p99_ms']} |")
    p99 = {side: statistics.median(x["p99_ms"] for x in runs[side] if x["p99_ms"] is not None) for side in runs}
    lines += [(f"| median | {100 * medians['a']:.1f} | {100 * medians['b']:.1f} | {1 + change:.3f} | "
              f"{p99['a']} | {p99['b']} |"), ""]
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, "ab.md")
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write("# Server CPU, one commit against another\n\nWritten by `bench/bench_ab.py`, newest last.\n\n")
        f.write("\n".join(lines) + "\n")
    history = []
    json_path = os.path.join(args.results, "ab.json")
    if os.path.exists(json_path):
        with open(json_path) as f:
            history = json.load(f)
    history.append({"when": stamp, "command": command, "machine": info, "a": names["a"], "b": names["b"],
                    "runs": runs, "medians": medians})
    with open(json_path, "w") as f:
        json.dump(history, f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
