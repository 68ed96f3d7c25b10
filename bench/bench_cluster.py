#!/usr/bin/env python3
"""The Redis tier behind --redis: one Redis against a Redis Cluster of one and of three
shards, and what a master's SIGKILL costs a room mid-run.

    python bench/bench_cluster.py                      # about 10 minutes
    python bench/bench_cluster.py --setups redis,3+3 --rates 5 --duration 8 --no-failover

Throughput: every setup gets the same load from loadclient.py --load-test
(ROOMS rooms of SIZE, each client sending RATE messages/s) through one
scale-chat instance with --workers 2, at each rate of --rates. CPU is utime +
stime from /proc, read before the load client starts and after it exits: the
Redis processes (masters and replicas apart), the scale-chat processes, and
both cores of the machine. "limited by" names what ran out: the machine's two
cores, or nothing.

Each setup runs --repeat times at each rate, in alternating order (A B C D,
D C B A, ...); the table keeps the run with the median Redis CPU per message.

Failover: a cluster of 3 masters and 3 replicas, the same instance, 20 rooms
of 4 at 10 messages/s per client for 20 s; 6 s in, the master of the first
room's slot is SIGKILLed. From the load client's CSV: the longest time each
room delivered nothing while messages were being sent (the rooms of the
killed shard, and the others), the latency of the messages sent during the
failover, and lost and duplicated messages.

Writes bench/results/cluster.json and bench/results/cluster.md.
"""
from __future__ import annotations

import argparse
import csv
import itertools
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

from scalechat import key_slot
from testkit import (
    TCP_LISTEN,
    RedisServer,
    cores_busy,
    cpu_seconds,
    machine,
    machine_line,
    percentile,
    process_tree,
    start_server,
    tcp_sockets,
    wait_for,
)
from testkit_cluster import RedisCluster

LOADCLIENT = os.path.join(ROOT, "loadclient.py")
SETUPS = {                    # name -> (masters, replicas per master); None: one Redis, not a cluster
    "redis": None,
    "1+1": (1, 1),
    "3+0": (3, 0),
    "3+3": (3, 1),
}
LABELS = {"redis": "one Redis", "1+1": "cluster: 1 master + 1 replica", "3+0": "cluster: 3 masters, no replica",
          "3+3": "cluster: 3 masters + 3 replicas"}
QUIET = ("--log-level", "WARNING")


class Tier:
    """The Redis processes of a setup: one Redis, or a cluster."""

    def __init__(self, shape, workdir: str):
        self.cluster = self.redis = None
        if shape is None:
            self.redis = RedisServer(workdir).start()
            self.url = self.redis.url
        else:
            self.cluster = RedisCluster(*shape)
            self.cluster.start()
            self.url = self.cluster.url(0)

    def pids(self) -> tuple[list, list]:
        """(master pids, replica pids)."""
        if self.redis is not None:
            return [self.redis.proc.pid], []
        masters = {n.port for n in self.cluster.masters()}
        live = self.cluster.live()
        return ([n.proc.pid for n in live if n.port in masters],
                [n.proc.pid for n in live if n.port not in masters])

    def close(self) -> None:
        if self.redis is not None:
            self.redis.kill()
        else:
            self.cluster.close()


def start_instance(url: str):
    server = start_server("--redis", url, "--workers", "2", *QUIET)
    wait_for(lambda: len(tcp_sockets(server.port, TCP_LISTEN)) == 2, 20, "2 workers listening")
    time.sleep(0.5)                         # both workers have found every master
    return server


def load(server, out: str, rooms: int, size: int, rate: float, seconds: float, prefix: str,
         record: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, LOADCLIENT, "--load-test", "--server-url", server.url, "--rooms", str(rooms),
         "--room-size", str(size), "--rate", str(rate), "--duration", str(seconds), "--grace", "10",
         "--seed", "7", "--room-prefix", prefix, "--out", out, "--summary-json", os.path.join(out, "summary.json"),
         *(() if record else ("--record-receivers", "0.25"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=out)


def summary_of(out: str) -> dict:
    with open(os.path.join(out, "summary.json")) as f:
        (scenario,) = json.load(f)["scenarios"]
    return scenario


def run_throughput(name: str, rate: float, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as workdir:
        tier = Tier(SETUPS[name], workdir)
        server = start_instance(tier.url)
        try:
            masters, replicas = tier.pids()
            chat = process_tree(server.proc.pid)
            before = (cpu_seconds(masters), cpu_seconds(replicas), cpu_seconds(chat), sum(cores_busy()))
            started = time.monotonic()
            run = load(server, workdir, args.rooms, args.size, rate, args.duration, f"b{os.urandom(2).hex()}-")
            assert run.wait(args.duration + 60) == 0, "loadclient.py failed"
            wall = time.monotonic() - started
            after = (cpu_seconds(masters), cpu_seconds(replicas), cpu_seconds(chat), sum(cores_busy()))
            result = summary_of(workdir)
        finally:
            server.stop()
            tier.close()
    master_s, replica_s, chat_s, machine_s = (b - a for a, b in zip(before, after))
    sent = result["sent"]
    busy = machine_s / wall / (os.cpu_count() or 1)
    return {"setup": name, "rate": rate, "clients": args.rooms * args.size, "sent": sent,
            "messages_per_s": round(sent / args.duration), "delivery_ratio": result["delivery_ratio"],
            "duplicates": result["duplicates"], "lost": result["lost"],
            "p50_ms": result["latency_ms"]["p50"], "p99_ms": result["latency_ms"]["p99"],
            "redis_masters_cpu_s": round(master_s, 2), "redis_replicas_cpu_s": round(replica_s, 2),
            "redis_us_per_message": round(1e6 * (master_s + replica_s) / sent, 1),
            "redis_master_us_per_message": round(1e6 * master_s / sent, 1),
            "server_cpu_s": round(chat_s, 2), "server_us_per_message": round(1e6 * chat_s / sent, 1),
            "machine_busy": round(busy, 2), "limited_by": "the two cores" if busy > 0.9 else "-"}


def gaps(received: dict, sent_end: int) -> dict:
    """Room -> the longest time (s) nobody in it received anything while messages were sent."""
    return {room: max((b - a for a, b in itertools.pairwise(sorted(t for t in times if t <= sent_end))),
                      default=0) / 1e6 for room, times in received.items()}


def run_failover(args: argparse.Namespace) -> dict:
    rooms, size, rate, seconds, kill_at = 20, 4, 10, 20, 6
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as workdir:
        tier = Tier((3, 1), workdir)
        server = start_instance(tier.url)
        try:
            prefix = f"f{os.urandom(2).hex()}-"
            run = load(server, workdir, rooms, size, rate, seconds, prefix, record=True)
            time.sleep(kill_at + rooms * size / 1000 + 1)   # the ramp, then kill_at s of sending
            victim = f"{prefix}{rooms}x{size}-0"
            slot = key_slot(victim.encode())
            killed_us = time.time_ns() // 1000
            took = tier.cluster.kill_master(slot)
            assert run.wait(seconds + 60) == 0, "loadclient.py failed"
            result = summary_of(workdir)
            shard = {r for r in (f"{prefix}{rooms}x{size}-{i}" for i in range(rooms))
                     if tier.cluster.master_of(key_slot(r.encode())) == tier.cluster.master_of(slot)}
            sent, received, latencies = {}, {}, []
            (csv_path,) = [os.path.join(workdir, f) for f in os.listdir(workdir) if f.endswith(".csv")]
            with open(csv_path, newline="") as f:
                for row in csv.DictReader(f):
                    ts = int(row["timestamp_us"])
                    if row["type"] == "Sent":
                        sent[(row["sender_id"], row["message_id"])] = ts
                    elif row["type"] == "Received":
                        received.setdefault(row["room"], []).append(ts)
                        t0 = sent.get((row["sender_id"], row["message_id"]))
                        if t0 is not None and killed_us <= t0 <= killed_us + took * 1e6 + 1e6:
                            latencies.append((ts - t0) / 1000)
            pauses = gaps(received, max(sent.values()))
        finally:
            server.stop()
            tier.close()
    return {"failover_s": round(took, 2), "rooms_on_killed_shard": len(shard), "rooms": rooms,
            "longest_pause_killed_shard_s": round(max(pauses[r] for r in shard), 2),
            "longest_pause_other_rooms_s": round(max((p for r, p in pauses.items() if r not in shard), default=0), 2),
            "deliveries_sent_during_failover": len(latencies),
            "p50_during_failover_ms": round(percentile(latencies, 0.5), 1) if latencies else None,
            "p99_during_failover_ms": round(percentile(latencies, 0.99), 1) if latencies else None,
            "p99_whole_run_ms": result["latency_ms"]["p99"], "sent": result["sent"],
            "delivery_ratio": result["delivery_ratio"], "lost": result["lost"],
            "duplicates": result["duplicates"], "reconnects": result["reconnects"]}


def write_markdown(path: str, report: dict) -> None:
    lines = [f"# Redis tier: one Redis against a Redis Cluster ({report['date']})", "",
             f"`{report['command']}`", "", f"Machine: {machine_line(report['machine'])}", "",
             f"Load: {report['load']}", "",
             ("| setup | rate/client | messages/s | delivery | p50 / p99 ms | Redis µs/message (masters) "
              "| Redis µs/message (all) | server µs/message | machine busy | limited by |"),
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in report["throughput"]:
        lines.append(f"| {LABELS[r['setup']]} | {r['rate']:g} | {r['messages_per_s']:,} | {r['delivery_ratio']} "
                     f"| {r['p50_ms']} / {r['p99_ms']} | {r['redis_master_us_per_message']} "
                     f"| {r['redis_us_per_message']} | {r['server_us_per_message']} | {r['machine_busy']:.0%} "
                     f"| {r['limited_by']} |")
    f = report.get("failover")
    if f:
        lines += ["", ("Failover: a master SIGKILLed mid-run (3 masters, 3 replicas; 20 rooms of 4, "
                       "10 messages/s per client, 20 s; killed 6 s in):"), "",
                  ("| failover | longest pause, killed shard's rooms | longest pause, other rooms "
                   "| p50 / p99 ms of messages sent during it | p99 ms, whole run | delivery | lost / duplicates "
                   "| reconnects |"),
                  "| ---: | ---: | ---: | --- | ---: | ---: | --- | ---: |",
                  (f"| {f['failover_s']} s | {f['longest_pause_killed_shard_s']} s "
                   f"({f['rooms_on_killed_shard']} rooms) | {f['longest_pause_other_rooms_s']} s "
                   f"| {f['p50_during_failover_ms']} / {f['p99_during_failover_ms']} | {f['p99_whole_run_ms']} "
                   f"| {f['delivery_ratio']} | {f['lost']} / {f['duplicates']} | {f['reconnects']} |")]
    with open(path, "w") as out:
        out.write("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated, from: " + ", ".join(f"{k} ({v})" for k, v in LABELS.items()))
    parser.add_argument("--rates", default="5,20", help="messages/s per client, comma-separated")
    parser.add_argument("--rooms", type=int, default=40)
    parser.add_argument("--size", type=int, default=5, help="clients per room")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sending per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each setup at each rate (the median is kept)")
    parser.add_argument("--no-failover", dest="failover", action="store_false")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    report = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "command": " ".join(["python bench/bench_cluster.py", *sys.argv[1:]]),
              "load": f"{args.rooms} rooms of {args.size}, loadclient.py --load-test through one instance "
                      f"with --workers 2, {args.duration:g} s per run",
              "throughput": []}
    setups = [s.strip() for s in args.setups.split(",")]
    for rate in (float(r) for r in args.rates.split(",")):
        runs: dict = {name: [] for name in setups}
        for turn in range(args.repeat):     # A B C D, then D C B A, ...: drift hits every setup alike
            for name in setups if turn % 2 == 0 else reversed(setups):
                row = run_throughput(name, rate, args)
                print(json.dumps(row), flush=True)
                runs[name].append(row)
        for name in setups:                 # the run with the median Redis CPU per message
            ordered = sorted(runs[name], key=lambda r: r["redis_us_per_message"])
            report["throughput"].append(dict(ordered[len(ordered) // 2], runs=len(ordered),
                                             redis_us_per_message_all_runs=[r["redis_us_per_message"]
                                                                            for r in runs[name]]))
    if args.failover:
        report["failover"] = run_failover(args)
        print(json.dumps(report["failover"]), flush=True)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "cluster.json"), "w") as f:
        json.dump(report, f, indent=1)
    write_markdown(os.path.join(args.results, "cluster.md"), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
