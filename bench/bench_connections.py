#!/usr/bin/env python3
"""Many connections on one machine: a step of N clients (or several steps, in order), each a row.

For each step it starts ``scalechat.py --workers N`` (enough workers that none
holds more than 18,000 connections: the machine allows 20,000 open files per
process), runs ``loadclient.py --load-test`` with every client a member of a
room of --room-size, and follows the run second by second: the ramp, a quiet
--hold in which every connection only answers the server's pings, then
--duration seconds of chat at --msg-rate messages per second over the whole
population. Each second it samples the server's summed metrics, the memory and
CPU of the server and of the load client, the kernel's memory (/proc/meminfo,
/proc/net/sockstat) and connection tracking, and the load client's progress
line (handshake and message p99 of the last 5 s).

It appends a table with one row per step to bench/results/connections.md (and
the samples to connections.json), and writes each step's samples to
bench/results/connections-<N>.csv for ``plot.py ramp``.

    python bench/bench_connections.py --clients 250000,500000,1000000 --msg-rate 1000 --ping-interval 120
    python bench/bench_connections.py --workers 6 --clients 100000 --procs 6
    python bench/bench_connections.py --instances 2 --redis --workers 3 --clients 60000 --procs 2

With --instances K the clients are split over K server instances (each with
--workers N), sharing a private redis-server when --redis is given; each
instance gets its own load client.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import socket
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
    cores_busy,
    cpu_seconds,
    machine,
    machine_line,
    process_tree,
    rss_kib,
    scrape,
    start_server,
)

# Connections per process the automatic --workers and --procs aim at: under the
# 20,000 open files a process may have here, with room for SO_REUSEPORT's uneven
# spread (about +-1% at 18,000) and the process's own descriptors.
PER_PROCESS = 18_000

FULL_GCS = 'scalechat_gc_pause_seconds_count{generation="2"}'
GC_SAMPLE = re.compile(r'scalechat_gc_pause_seconds_(count|sum|bucket)\{generation="(\d+)"(?:,le="([^"]+)")?\}')
# The load client's progress line (one a second when stderr is not a terminal).
PROGRESS = re.compile(r"^\S+ (\w+)\s+-?\d+s  conn (\d+)/\d+ .* p99 ([\d.]+)ms  connect p99 (\d+)ms")
SAMPLE_COLUMNS = ("t", "phase", "connections", "server_rss_mib", "loadclient_rss_mib", "kernel_slab_mib",
                  "tcp_mem_mib", "mem_used_mib", "server_cpu_s", "loadclient_cpu_s", "machine_cpu_s",
                  "pings", "deliveries", "p99_ms", "connect_p99_ms", "conntrack", "full_gcs")


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


def netstat(name: str) -> int:
    """A TcpExt counter of /proc/net/netstat, e.g. ListenOverflows (all sockets)."""
    with open("/proc/net/netstat") as f:
        head, values = [line.split() for line in f if line.startswith("TcpExt:")][:2]
    return int(values[head.index(name)])


def meminfo() -> dict:
    """/proc/meminfo in KiB."""
    with open("/proc/meminfo") as f:
        return {line.split(":")[0]: int(line.split()[1]) for line in f}


def sockstat_tcp() -> dict:
    """/proc/net/sockstat's TCP line: inuse, orphan, tw, alloc, mem (pages)."""
    with open("/proc/net/sockstat") as f:
        words = next(line for line in f if line.startswith("TCP:")).split()[1:]
    return {words[i]: int(words[i + 1]) for i in range(0, len(words), 2)}


def conntrack() -> tuple[int, int] | None:
    """(tracked connections, nf_conntrack_max), or None when connection tracking is not loaded."""
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_count") as f, \
                open("/proc/sys/net/netfilter/nf_conntrack_max") as g:
            return int(f.read()), int(g.read())
    except OSError:
        return None


def loopback_tracked() -> bool:
    """Whether the kernel tracks loopback connections here (a NAT rule, e.g. Docker's, turns it on):
    64 connections opened to a local listener, and the conntrack count watched."""
    if conntrack() is None:
        return False
    listener = socket.create_server(("127.0.0.1", 0))
    before = conntrack()[0]
    socks = [socket.create_connection(listener.getsockname()) for _ in range(64)]
    grew = conntrack()[0] - before
    for sock in socks:
        sock.close()
    listener.close()
    return grew >= 32


def conntrack_warning(clients: int) -> str | None:
    """What connection tracking will do to a run of clients connections, and the fix; None if nothing."""
    tracked = conntrack()
    if not tracked or not loopback_tracked():
        return None
    count, limit = tracked
    if clients < limit - count:
        return None
    return (f"loopback connections are tracked (nf_conntrack_count {count:,}, nf_conntrack_max {limit:,}): "
            f"past {limit - count:,} connections the kernel drops new SYNs ('nf_conntrack: table full' in dmesg). "
            "Fix: iptables -t raw -I PREROUTING -i lo -j NOTRACK; iptables -t raw -I OUTPUT -o lo -j NOTRACK "
            f"(or sysctl -w net.netfilter.nf_conntrack_max={2 * clients + 65536})")


def combine(results: list) -> dict:
    """One summary from the load clients' summaries (latency: the worst of them)."""
    out = {key: sum(r[key] for r in results) for key in ("sent", "expected", "received", "lost",
                                                       "duplicates", "reconnects")}
    out["connected"] = sum(r["connect_ms"]["count"] for r in results)
    out["delivery_ratio"] = out["received"] / out["expected"] if out["expected"] else 0.0
    out["latency_ms"] = {q: max(r["latency_ms"][q] for r in results) for q in ("p50", "p99", "max")}
    out["connect_ms"] = {q: max(r["connect_ms"][q] for r in results) for q in ("p50", "p99", "max")}
    out["errors"] = {}
    for r in results:
        for kind, n in r["errors"].items():
            out["errors"][kind] = out["errors"].get(kind, 0) + n
    return out


class Watch:
    """The run, second by second: samples of the server, the load clients and the kernel."""

    def __init__(self, servers: list, loads: list):
        self.servers, self.loads = servers, loads
        self.samples: list = []
        self.progress = [("ramp", 0, 0.0, 0.0)] * len(loads)    # each load client's last line
        self.stop = threading.Event()
        self.start = time.monotonic()
        self.base = self.take(base=True)
        for k, load in enumerate(loads):
            threading.Thread(target=self._read_progress, args=(k, load), daemon=True).start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _read_progress(self, k: int, load: subprocess.Popen) -> None:
        for line in load.stderr:
            if match := PROGRESS.match(line):
                phase, conn, p99, connect = match.groups()
                self.progress[k] = (phase, int(conn), float(p99), float(connect))

    def server_pids(self) -> list:
        return [pid for server in self.servers for pid in process_tree(server.proc.pid)]

    def load_pids(self) -> list:
        return [pid for load in self.loads for pid in process_tree(load.pid)]

    def take(self, base: bool = False) -> dict:
        mem, tcp, tracked = meminfo(), sockstat_tcp(), conntrack()
        metrics: dict = {}
        answered = 0
        for server in self.servers:
            try:
                for key, value in scrape(server.metrics_url).items():
                    metrics[key] = metrics.get(key, 0) + value
                answered += 1
            except OSError:
                pass
        phases = {p[0] for p in self.progress}
        server_pids, load_pids = self.server_pids(), self.load_pids()      # one walk of /proc each
        return {"t": round(time.monotonic() - self.start, 1),
                "phase": "base" if base else (phases.pop() if len(phases) == 1 else "/".join(sorted(phases))),
                "connections": int(metrics.get("scalechat_connections", 0)) if answered else -1,   # -1: no scrape
                "server_rss_mib": round(rss_kib(server_pids) / 1024, 1),
                "loadclient_rss_mib": round(rss_kib(load_pids) / 1024, 1),
                "kernel_slab_mib": round(mem["Slab"] / 1024, 1),
                "tcp_mem_mib": round(tcp["mem"] * 4 / 1024, 1),
                "mem_used_mib": round((mem["MemTotal"] - mem["MemAvailable"]) / 1024, 1),
                "server_cpu_s": round(cpu_seconds(server_pids), 2),
                "loadclient_cpu_s": round(cpu_seconds(load_pids), 2),
                "machine_cpu_s": round(sum(cores_busy()), 2),
                "pings": int(metrics.get("scalechat_pings_sent_total", 0)),
                "deliveries": int(metrics.get("scalechat_deliveries_total", 0)),
                "p99_ms": max(p[2] for p in self.progress),
                "connect_p99_ms": max(p[3] for p in self.progress),
                "conntrack": tracked[0] if tracked else -1,
                "full_gcs": int(metrics.get(FULL_GCS, 0))}

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            self.samples.append(self.take())

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()

    def window(self, phase: str, skip: float = 5.0) -> dict | None:
        """Rates over the samples of one phase (its first skip seconds left out): CPU cores busy, pings/s."""
        inside = [s for s in self.samples if s["phase"] == phase]
        if inside and inside[-1]["t"] - inside[0]["t"] > 2 * skip:
            inside = [s for s in inside if s["t"] >= inside[0]["t"] + skip]
        if len(inside) < 2:
            return None
        a, b = inside[0], inside[-1]
        span = b["t"] - a["t"]
        return {"seconds": round(span, 1),
                **{k: round((b[f"{k}_cpu_s"] - a[f"{k}_cpu_s"]) / span, 3) for k in ("server", "loadclient", "machine")},
                "pings_per_s": round((b["pings"] - a["pings"]) / span),
                "deliveries_per_s": round((b["deliveries"] - a["deliveries"]) / span)}


def run_step(args, clients: int, work: str) -> dict:
    """One step: start the server(s), run the load, return the row."""
    workers = args.workers or math.ceil(clients / args.instances / PER_PROCESS)
    procs = args.procs or math.ceil(clients / args.instances / PER_PROCESS)
    msg_frequency = clients / args.msg_rate * 1000 if args.msg_rate else args.msg_frequency or 30000
    server_args = ["--workers", str(workers), "--log-level", "WARNING", *args.server_args.split()]
    if args.ping_interval:
        server_args += ["--ping-interval", str(args.ping_interval), "--pong-timeout", str(args.ping_interval / 2)]
    redis = RedisServer(work).start() if args.redis else None
    servers = [start_server(*server_args, *(("--redis", redis.url) if redis else ()))
               for _ in range(args.instances)]
    per_instance = clients // args.instances
    try:
        while len(server_listeners(servers)) < workers * args.instances:
            time.sleep(0.5)                 # every worker is listening
        overflows0, timeouts0 = netstat("ListenOverflows"), netstat("TCPTimeouts")
        summaries = [os.path.join(work, f"summary-{clients}-{k}.json") for k in range(args.instances)]
        loads = [subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "loadclient.py"), "--load-test",
             "--server-url", server.url, "--rooms", str(per_instance // args.room_size),
             "--room-size", str(args.room_size), "--msg-frequency", f"{msg_frequency:.0f}",
             "--duration", str(args.duration), "--hold", str(args.hold), "--ramp", str(args.ramp),
             "--procs", str(procs), "--record-receivers", str(args.record_receivers), "--grace", "10",
             "--seed", str(k + 1), "--room-prefix", f"i{k}-", "--connect-timeout", "60",
             "--out", os.path.join(work, f"run-{clients}-{k}"), "--summary-json", summaries[k]],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for k, server in enumerate(servers)]
        watch = Watch(servers, loads)
        code = max(load.wait(args.duration + args.hold + 3600) for load in loads)
        watch.finish()
        overflows = netstat("ListenOverflows") - overflows0
        retransmit_timeouts = netstat("TCPTimeouts") - timeouts0
        time.sleep(1.5)                     # workers report their counters every second
        server_refusals: dict = {}
        gc: dict = {}
        for server in servers:
            try:
                scraped = scrape(server.metrics_url)
            except OSError as e:            # e.g. a full conntrack table drops the scrape's SYN too
                print(f"bench_connections: no final scrape of {server.metrics_url}: {e}", file=sys.stderr)
                continue
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
            server.stop(timeout=300)
        if redis is not None:
            redis.proc.terminate()
            redis.proc.wait(30)
    samples, base = watch.samples, watch.base
    peak = max(samples, key=lambda s: s["connections"])
    ramped = next((s for s in samples if s["phase"] not in ("ramp", "base")), samples[-1])
    # Memory with everyone connected and quiet: the last sample of the hold (or of the ramp).
    held = [s for s in samples if s["phase"] == "hold"] or [ramped]
    at = held[-1]
    n = max(1, at["connections"])

    def per_conn(key: str) -> float:
        return round((at[key] - base[key]) * 1024 / n, 2)
    row = {"command": "python bench/bench_connections.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
           "clients": clients, "workers": workers, "procs": procs, "settings": vars(args),
           "msg_frequency_ms": round(msg_frequency), "loadclient_exit": code,
           "peak_connections": peak["connections"], "ramp_s": ramped["t"],
           "memory_at": {k: at[k] for k in SAMPLE_COLUMNS if k.endswith("_mib")},
           "kib_per_connection": {"server": per_conn("server_rss_mib"),
                                  "loadclient": round(at["loadclient_rss_mib"] * 1024 / n, 2),
                                  "kernel_slab": per_conn("kernel_slab_mib"), "tcp_mem": per_conn("tcp_mem_mib"),
                                  "machine": per_conn("mem_used_mib")},
           "idle": watch.window("hold"), "chatting": watch.window("send"),
           "conntrack": {"before": base["conntrack"], "peak": max(s["conntrack"] for s in samples),
                         "max": (conntrack() or (0, 0))[1]},
           **result, "server_refusals": server_refusals, "listen_overflows": overflows,
           "tcp_retransmit_timeouts": retransmit_timeouts, "gc_pauses": gc, "base": base,
           "samples": {"columns": SAMPLE_COLUMNS, "rows": [[s[k] for k in SAMPLE_COLUMNS] for s in samples]}}
    with open(os.path.join(HERE, "results", f"connections-{clients}.csv"), "w", newline="") as f:
        out = csv.DictWriter(f, SAMPLE_COLUMNS)
        out.writeheader()
        out.writerows(samples)
    return row


def results_json(rows: list) -> str:
    """The rows, indented, with each second's sample on one line."""
    marks = {}
    for i, row in enumerate(rows):
        if isinstance(row.get("samples"), dict):
            marks[f"@samples{i}@"] = ",\n  ".join(json.dumps(r) for r in row["samples"]["rows"])
            row = rows[i] = {**row, "samples": {**row["samples"], "rows": f"@samples{i}@"}}
    text = json.dumps(rows, indent=1)
    for mark, lines in marks.items():
        text = text.replace(f'"{mark}"', f"[\n  {lines}]")
    return text + "\n"


def server_listeners(servers: list) -> list:
    """The listening sockets on the servers' ports (one per worker once all are up)."""
    ports = {f"{server.port:04X}" for server in servers}
    with open("/proc/net/tcp") as f:
        return [line for line in f if line.split()[3] == "0A" and line.split()[1].rsplit(":", 1)[1] in ports]


def table(rows: list) -> list:
    """The markdown table of the steps."""
    lines = [("| connections | workers / load procs | ramp | server KiB/conn | load client KiB/conn "
             "| kernel KiB/conn: slab, TCP buffers | machine KiB/conn | CPU cores idle: server, load, all "
             "| pings/s | CPU cores chatting: server, load, all | deliveries/s | delivery ratio | lost / dup "
             "| p50 / p99 / max ms | full GCs, longest |"),
             "| ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | --- | ---: | ---: | --- | --- | --- |"]
    for r in rows:
        k, idle, chat = r["kib_per_connection"], r["idle"] or {}, r["chatting"] or {}
        full = r["gc_pauses"].get("2", {"count": 0, "longest_le_s": 0.0})
        lat = r["latency_ms"]

        def cores(w: dict) -> str:
            return " / ".join(f"{w[x]:.2f}" for x in ("server", "loadclient", "machine")) if w else "-"
        lines.append(
            f"| {r['peak_connections']:,} of {r['clients']:,} | {r['workers']} / {r['procs']} | {r['ramp_s']:.0f} s "
            f"| {k['server']:.2f} | {k['loadclient']:.2f} | {k['kernel_slab']:.2f}, {k['tcp_mem']:.2f} "
            f"| {k['machine']:.2f} | {cores(idle)} | {idle.get('pings_per_s', '-')} | {cores(chat)} "
            f"| {chat.get('deliveries_per_s', '-')} | {r['delivery_ratio']:.6f} | {r['lost']} / {r['duplicates']} "
            f"| {lat['p50']:.1f} / {lat['p99']:.1f} / {lat['max']:.1f} "
            f"| {full['count']}, <= {full['longest_le_s'] * 1000:g} ms |")
    return lines


def main() -> int:
    """Run each step and record it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="45000", help="clients of each step, in order: 250000,500000,1000000")
    ap.add_argument("--workers", type=int, default=0,
                    help=f"workers per instance (default: one per {PER_PROCESS:,} clients)")
    ap.add_argument("--procs", type=int, default=0,
                    help=f"load-client processes per instance (default: one per {PER_PROCESS:,} clients)")
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--redis", action="store_true", help="instances share a private redis-server")
    ap.add_argument("--room-size", type=int, default=10)
    rate = ap.add_mutually_exclusive_group()
    rate.add_argument("--msg-frequency", type=float, help="ms between a client's messages (default 30000)")
    rate.add_argument("--msg-rate", type=float,
                      help="messages per second over all clients (each sends every clients/rate s)")
    ap.add_argument("--duration", type=float, default=40, help="seconds of chat after the hold")
    ap.add_argument("--hold", type=float, default=0, help="quiet seconds after the ramp (pings only)")
    ap.add_argument("--ping-interval", type=float, default=0,
                    help="the server's --ping-interval (and --pong-timeout half of it); default the server's")
    ap.add_argument("--ramp", type=float, default=3000, help="connections per second at most, per instance")
    ap.add_argument("--record-receivers", type=float, default=0.05)
    ap.add_argument("--server-args", default="", help="more scalechat.py flags, e.g. '--gc-freeze false'")
    args = ap.parse_args()
    steps = [int(n) for n in args.clients.split(",")]
    work = tempfile.mkdtemp(prefix="connections-")
    rows = []
    for clients in steps:
        if warning := conntrack_warning(clients):
            print(f"bench_connections: {warning}", file=sys.stderr, flush=True)
        rows.append(run_step(args, clients, work))
        rows[-1]["conntrack"]["warning"] = warning
        print("\n".join(table(rows[-1:])), flush=True)
    path = os.path.join(HERE, "results", "connections.json")
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    with open(path, "w") as f:
        f.write(results_json(old + rows))
    first = rows[0]
    setup = (f" x {args.instances} instances" if args.instances > 1 else "") + (" + Redis" if args.redis else "")
    section = [f"## {', '.join(f'{n:,}' for n in steps)} clients{setup}", "",
               f"- command: `{first['command']}`",
               f"- date: {rows[-1]['date']}; machine: {machine_line(first['machine'])}",
               f"- load: rooms of {args.room_size}, "
               + (f"{args.msg_rate:g} messages/s over all clients" if args.msg_rate
                  else f"one message per client every {first['msg_frequency_ms'] / 1000:g} s")
               + f" for {args.duration:g} s after a {args.hold:g} s quiet hold; server --ping-interval "
               f"{args.ping_interval or 'default'}; {args.record_receivers:.0%} of receivers recording latency; "
               "per connection: (at the end of the hold - before the ramp) / connections, the load client's "
               "whole RSS / connections; CPU in cores (CPU s per s), all = every core of the machine", "",
               *table(rows), ""]
    for r in rows:
        extra = {k: v for k, v in (("load client errors", r["errors"]), ("server drops and refusals",
                                                                         r["server_refusals"]),
                                   ("listen-queue overflows", r["listen_overflows"]),
                                   ("TCP retransmission timeouts", r["tcp_retransmit_timeouts"])) if v}
        tracked = r["conntrack"]
        if tracked["peak"] > tracked["before"] + r["peak_connections"] // 2:
            extra["conntrack"] = f"{tracked['peak']:,} tracked of nf_conntrack_max {tracked['max']:,}"
        if tracked["warning"]:
            extra["warning"] = tracked["warning"]
        if extra:
            section.append(f"{r['clients']:,}: " + "; ".join(f"{k}: {v}" for k, v in extra.items()) + "  ")
    md = os.path.join(HERE, "results", "connections.md")
    if not os.path.exists(md):
        with open(md, "w") as f:
            f.write("# Many connections on one machine\n\nWritten by `bench/bench_connections.py`, newest last.\n\n")
    with open(md, "a") as f:
        f.write("\n".join(section) + "\n\n")
    print("\n".join(section))
    return 0 if all(r["loadclient_exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
