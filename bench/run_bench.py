#!/usr/bin/env python3
"""scalechat.py side by side with chat servers built on websockets, aiohttp and picows.

    python bench/run_bench.py              # the full run, about 12 minutes
    python bench/run_bench.py --quick      # a smoke run, about 2 minutes

Starts each server in turn (scalechat.py, scalechat.py --workers 2 and the
reference peers in bench/), drives the same scenarios with loadclient.py, and
reads the server's and the load client's CPU time (utime + stime of the whole
process tree) and memory from /proc while they run. Scenarios:

  a  server CPU for 400k deliveries: 1000 clients in rooms of 10, 2 msg/s each,
     100 B, 20 s; that is also 20k deliveries/s, so its latency is scenario d
  b  sustained deliveries/s: 1000 clients in rooms of 20, the rate stepped up
     until fewer than 99.9% are delivered or p99 exceeds 250 ms
  c  RSS per idle connection at 10k connections (and 19k for scalechat.py)

The server runs on core 0 and the load client (and this script) on core 1,
unless --no-pin. Runs alternate between servers (A B C A B C), a fresh server
each run. Results: bench/results/bench-<YYYYmmdd-HHMMSS>.md and .json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Self

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from testkit import (
    cores_busy,
    cpu_times,
    free_port,
    machine,
    machine_line,
    memory_kib,
    process_tree,
)

SERVER_CORES, CLIENT_CORE = "0", "1"
BUSY = 0.9            # a process tree using this share of its cores or more was the limit
NOISY = 0.25          # cores that other processes used while sending, worth a mention
QUIET = 0.3           # a run starts once other processes use fewer cores than this (or patience ends)
SEED = 8              # the same send schedule for every server
BASELINE = "websockets"

# ---------------------------------------------------------------------------
# Plans: what the full and the quick run measure
# ---------------------------------------------------------------------------


@dataclass
class Plan:
    """Sizes and durations of one benchmark run."""
    repeats: int = 2                         # runs of scenario a per server (medians)
    cpu_clients: int = 1000
    cpu_duration: float = 20.0
    saturation_rates: tuple = (1, 2, 3, 4, 5, 6, 8, 10)   # msg/s per client: x20k deliveries/s
    saturation_duration: float = 6.0
    idle_connections: tuple = (10_000,)
    scalechat_idle_connections: tuple = (19_000,)          # measured for scalechat only
    idle_hold: float = 3.0
    ramp: float = 2000.0
    quiet_wait: float = 20.0                 # seconds a run may wait for other processes to calm down
    quiet_budget: float = 180.0              # ... and all runs together


QUICK = Plan(repeats=1, cpu_duration=5.0, saturation_rates=(2, 5), saturation_duration=3.0,
             idle_connections=(2000,), scalechat_idle_connections=(), idle_hold=1.5,
             quiet_wait=5.0, quiet_budget=20.0)

# ---------------------------------------------------------------------------
# Servers: how to start each one
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A chat server under test: its command line (given a port) and the cores it runs on."""
    name: str
    script: str
    args: tuple = ()
    cores: str = SERVER_CORES

    def command(self, port: int) -> list:
        """The argv that starts this server on port."""
        return [sys.executable, str(REPO / self.script), "--host", "127.0.0.1", "--port", str(port),
                *self.args]


SCALECHAT_ARGS = ("--metrics-port", "0", "--log-level", "WARNING", "--drain-timeout", "2")
SERVERS = {
    "scalechat": Server("scalechat", "scalechat.py", SCALECHAT_ARGS),
    # Two workers need two cores: they share core 1 with the load client.
    "scalechat-w2": Server("scalechat-w2", "scalechat.py", (*SCALECHAT_ARGS, "--workers", "2"),
                           cores="0,1"),
    "websockets": Server("websockets", "bench/peer_websockets.py"),
    "aiohttp": Server("aiohttp", "bench/peer_aiohttp.py"),
    "picows": Server("picows", "bench/peer_picows.py"),
}

# ---------------------------------------------------------------------------
# Sampling CPU time and memory of the server and client trees (/proc readers: testkit.py)
# ---------------------------------------------------------------------------


SERVER_CPU, CLIENT_CPU, SERVER_RSS, SERVER_SYS, CORE0 = 1, 2, 3, 4, 5    # columns of a sample after its time


@dataclass
class Watch:
    """Samples: (time, server CPU, load-client CPU, server RSS KiB, server system CPU,
    busy seconds of core 0, 1, ...).

    CPU is cumulative over every process ever seen in a tree, so a worker
    that exits does not take its CPU time out of the sum.
    """
    server_pid: int
    client_pid: int
    samples: list = field(default_factory=list)
    server_seen: dict = field(default_factory=dict)     # pid -> last CPU seconds
    client_seen: dict = field(default_factory=dict)
    server_sys_seen: dict = field(default_factory=dict)

    def sample(self) -> None:
        """Take one sample now."""
        server = process_tree(self.server_pid)
        for pid, (total, system) in cpu_times(server).items():
            self.server_seen[pid], self.server_sys_seen[pid] = total, system
        self.client_seen.update((pid, total) for pid, (total, _) in
                                cpu_times(process_tree(self.client_pid)).items())
        self.samples.append((time.time(), sum(self.server_seen.values()),
                             sum(self.client_seen.values()), memory_kib(server),
                             sum(self.server_sys_seen.values()), *cores_busy()))

    def at(self, t: float, column: int) -> float:
        """A column's value at time t, interpolated between the samples around it."""
        samples = self.samples
        if t <= samples[0][0]:
            return samples[0][column]
        for before, after in itertools.pairwise(samples):
            if after[0] >= t:
                share = (t - before[0]) / (after[0] - before[0])
                return before[column] + share * (after[column] - before[column])
        return samples[-1][column]

    def rss_during(self, t0: float, t1: float) -> int:
        """The median server RSS (KiB) sampled between t0 and t1."""
        inside = [s[SERVER_RSS] for s in self.samples if t0 <= s[0] <= t1]
        return int(statistics.median(inside)) if inside else self.samples[-1][SERVER_RSS]

    def busy(self, t0: float, t1: float, column: int) -> float:
        """A CPU column's seconds between t0 and t1."""
        return self.at(t1, column) - self.at(t0, column)

# ---------------------------------------------------------------------------
# Running a server and one load-client run against it
# ---------------------------------------------------------------------------


def pinned(cores: str, argv: list, pin: bool) -> list:
    """argv under taskset -c cores (taskset execs it: the pid stays the program's)."""
    return ["taskset", "-c", cores, *argv] if pin else argv


class Running:
    """A server process started for one run; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, server: Server, pin: bool, log_dir: Path) -> None:
        self.server, self.port = server, free_port()
        self.log = open(log_dir / f"{server.name}-{self.port}.log", "wb")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(pinned(server.cores, server.command(self.port), pin), cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Self:
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.server.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.server.name} did not listen within 20 s") from None
                time.sleep(0.05)
        time.sleep(0.5)     # let worker processes come up and imports settle
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    @property
    def url(self) -> str:
        """The server's WebSocket URL for the load client."""
        return f"ws://127.0.0.1:{self.port}/ws"


@dataclass
class Load:
    """One loadclient.py run: clients, rooms, rate and how long."""
    clients: int
    room_size: int
    rate: float | None                       # msg/s per client; None: idle (no messages)
    duration: float
    record: float = 1.0                      # share of clients that record latencies
    ramp: float = 2000.0

    def argv(self, url: str, out: Path) -> list:
        """The loadclient.py command line for this load."""
        rate = ["--rate", str(self.rate)] if self.rate else ["--msg-frequency", str(1e9)]
        return [sys.executable, str(REPO / "loadclient.py"), "--load-test", "--server-url", url,
                "--rooms", str(self.clients // self.room_size), "--room-size", str(self.room_size),
                *rate, "--msg-size", "100", "--duration", str(self.duration), "--ramp", str(self.ramp),
                "--procs", "1", "--grace", "3", "--seed", str(SEED),
                "--record-receivers", str(self.record), "--out", str(out),
                "--summary-json", str(out / "summary.json")]


def follow(client: subprocess.Popen, watch: Watch, load: Load, log_path: Path) -> None:
    """Sample /proc until the load client exits; stop an idle run's sending after its hold time.

    loadclient.py ends its send phase when a scheduled send falls past
    --duration; with no message scheduled at all it is told as Ctrl-C would.
    """
    deadline = time.monotonic() + load.clients / load.ramp + load.duration + 60
    sending_since, interrupted = None, False
    while client.poll() is None:
        watch.sample()
        now = time.monotonic()
        if load.rate is None and sending_since is None and b" send " in log_path.read_bytes()[-300:]:
            sending_since = now
        if sending_since and now > sending_since + load.duration + 1 and not interrupted:
            client.send_signal(signal.SIGINT)
            interrupted = True
        if now > deadline:      # its worker processes too: they outlive a killed parent
            for pid in reversed(process_tree(client.pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.1)


def drive(running: Running, load: Load, pin: bool, work: Path) -> dict:
    """Run load against a running server, sampling /proc; the figures of its sending window."""
    out = Path(tempfile.mkdtemp(dir=work, prefix=f"{running.server.name}-"))
    rss_before = memory_kib(process_tree(running.proc.pid))
    with open(out / "loadclient.log", "wb") as log:
        client = subprocess.Popen(pinned(CLIENT_CORE, load.argv(running.url, out), pin), cwd=REPO,
                                  stdout=log, stderr=subprocess.STDOUT)
        watch = Watch(running.proc.pid, client.pid)
        follow(client, watch, load, out / "loadclient.log")
    try:
        summary = json.loads((out / "summary.json").read_text())["scenarios"][0]
    except (OSError, ValueError, IndexError):
        tail = (out / "loadclient.log").read_text(errors="replace")[-600:]
        return {"error": f"loadclient.py exit {client.returncode}: {tail}"}
    meta = json.loads(Path(summary["meta"]).read_text())
    # The window: from the first scheduled send until the last message sent
    # can have arrived (its slowest latency later); ramp-up and close are left
    # out. Busy shares are of the sending alone, the steady part of it.
    t0 = meta["start_us"] / 1e6
    sending = max(summary["duration_s"], 0.1)
    t1 = t0 + sending + summary["latency_actual_ms"]["max"] / 1000 + 0.05
    server_cpu, client_cpu = watch.busy(t0, t1, SERVER_CPU), watch.busy(t0, t1, CLIENT_CPU)
    t_end = t0 + sending
    cores = [round(watch.busy(t0, t_end, CORE0 + i) / sending, 3) for i in range(len(watch.samples[0]) - CORE0)]
    server_busy = watch.busy(t0, t_end, SERVER_CPU) / sending
    client_busy = watch.busy(t0, t_end, CLIENT_CPU) / sending
    shutil.rmtree(out)      # the CSV: this script keeps only the figures
    server_cores = len(running.server.cores.split(",")) if pin else os.cpu_count()
    return {
        "connected": summary["connect_ms"]["count"], "sent": summary["sent"],
        "received": summary["received"], "delivery_ratio": summary["delivery_ratio"],
        "deliveries_per_s": summary["deliveries_per_s"], "window_s": round(t1 - t0, 2),
        "p50_ms": summary["latency_ms"]["p50"], "p99_ms": summary["latency_ms"]["p99"],
        "p99_actual_ms": summary["latency_actual_ms"]["p99"],
        "errors": summary["errors"], "reconnects": summary["reconnects"],
        "server_cpu_s": round(server_cpu, 3), "client_cpu_s": round(client_cpu, 3),
        "server_system_s": round(watch.busy(t0, t1, SERVER_SYS), 3),
        "server_busy": round(server_busy / server_cores, 3), "client_busy": round(client_busy, 3),
        # Busy share of each core, ours and everyone else's: what neither tree
        # used went to other processes on the machine.
        "cores_busy": cores, "others_busy": round(sum(cores) - server_busy - client_busy, 3),
        "rss_before_kib": rss_before, "rss_kib": watch.rss_during(t0, t1),
        "rss_max_kib": max(s[SERVER_RSS] for s in watch.samples),
        "peak_rss_kib": memory_kib(process_tree(running.proc.pid), "VmHWM"),
    }


def limiter(run: dict) -> str:
    """What was busy while sending: the server, the load client, and other processes when they took much."""
    busy = [who for who, key in (("server", "server_busy"), ("loadclient", "client_busy"))
            if run.get(key, 0) >= BUSY]
    if run.get("others_busy", 0) >= NOISY:
        busy.append(f"others {run['others_busy']:.1f} cores")
    return " + ".join(busy) or "-"

# ---------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------


class Bench:
    """One benchmark run: servers, plan, every measured run in order."""

    def __init__(self, servers: list, plan: Plan, pin: bool, work: Path) -> None:
        self.servers, self.plan, self.pin, self.work = servers, plan, pin, work
        self.runs: list = []
        self.patience = plan.quiet_budget      # seconds left to wait for a quiet machine

    def wait_quiet(self) -> float:
        """Wait, within the plan's patience, until other processes use < QUIET cores; the cores they used last."""
        start = time.monotonic()
        limit = min(self.plan.quiet_wait, self.patience)
        while True:
            before, t = sum(cores_busy()), time.monotonic()
            time.sleep(0.5)
            others = (sum(cores_busy()) - before) / (time.monotonic() - t)
            waited = time.monotonic() - start
            if others < QUIET or waited >= limit:
                self.patience -= waited
                return round(others, 2)

    def measure(self, scenario: str, server: Server, load: Load, **labels) -> dict:
        """Start a fresh server once the machine is quiet, drive load, record and print the run."""
        run = {"scenario": scenario, "server": server.name, **labels, "load": asdict(load)}
        started = time.monotonic()
        run["others_before"] = self.wait_quiet()
        try:
            with Running(server, self.pin, self.work) as running:
                run.update(drive(running, load, self.pin, self.work))
        except RuntimeError as exc:
            run["error"] = str(exc)
        run["limited_by"] = limiter(run)
        self.runs.append(run)
        shown = {k: run.get(k) for k in ("received", "delivery_ratio", "deliveries_per_s", "p99_ms",
                                         "server_cpu_s", "server_busy", "client_busy", "rss_kib",
                                         "limited_by", "error") if run.get(k) is not None}
        print(f"[{scenario}] {server.name} {labels or ''} ({time.monotonic() - started:.0f} s): {shown}",
              flush=True)
        return run

    def cpu(self) -> None:
        """a (and d): 1000 clients, rooms of 10, 2 msg/s, 100 B: 20k deliveries/s."""
        p = self.plan
        for repeat in range(p.repeats):
            for server in self.servers:
                self.measure("a", server, Load(p.cpu_clients, 10, 2, p.cpu_duration, ramp=p.ramp),
                             repeat=repeat)

    def saturation(self) -> None:
        """b: rooms of 20, the rate stepped up for every server still passing, servers alternating.

        A server leaves the ladder when a step fails twice: once more after the
        other servers' turn, so that one noisy moment does not end its climb.
        """
        p = self.plan
        climbing = list(self.servers)
        for rate in p.saturation_rates:
            load = Load(p.cpu_clients, 20, rate, p.saturation_duration, record=0.2, ramp=p.ramp)
            failed = [s for s in climbing if not self.step(s, load, rate)]
            for server in failed:
                if not self.step(server, load, rate, retry=True):
                    climbing.remove(server)

    def step(self, server: Server, load: Load, rate: float, retry: bool = False) -> bool:
        """One step of b's ladder; whether it passed."""
        run = self.measure("b", server, load, rate=rate, **({"retry": True} if retry else {}))
        run["passed"] = passes(run)
        return run["passed"]

    def idle(self) -> None:
        """c: RSS per idle connection."""
        p = self.plan
        for server in self.servers:
            extra = p.scalechat_idle_connections if server.script == "scalechat.py" else ()
            for count in (*p.idle_connections, *extra):
                run = self.measure("c", server, Load(count, 10, None, p.idle_hold, ramp=p.ramp),
                                   connections=count)
                if run.get("connected"):
                    run["kib_per_connection"] = round(
                        (run["rss_kib"] - run["rss_before_kib"]) / run["connected"], 2)


def passes(run: dict) -> bool:
    """b's criterion: at least 99.9% delivered and p99 at most 250 ms."""
    return "error" not in run and (run["delivery_ratio"] or 0) >= 0.999 and run["p99_ms"] <= 250

# ---------------------------------------------------------------------------
# Report: medians, ratios to websockets, one Markdown table and the JSON
# ---------------------------------------------------------------------------


def median_of(runs: list, key: str) -> float | None:
    """The median of a key over the runs that have it."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize_cpu(a: list) -> dict:
    """Scenario a's medians over the repeats."""
    for r in a:
        r["cpu_per_400k_s"] = round(r["server_cpu_s"] * 400_000 / r["received"], 3) if r["received"] else None
        if r["received"] and r.get("server_system_s") is not None:
            r["system_per_400k_s"] = round(r["server_system_s"] * 400_000 / r["received"], 3)
    return {"a_runs": len(a), "a_cpu_per_400k_s": median_of(a, "cpu_per_400k_s"),
            "a_system_per_400k_s": median_of(a, "system_per_400k_s"),
            "a_received": median_of(a, "received"), "a_delivery_ratio": median_of(a, "delivery_ratio"),
            "a_p50_ms": median_of(a, "p50_ms"), "a_p99_ms": median_of(a, "p99_ms"),
            "a_busy": sorted({r["limited_by"] for r in a})}


def summarize_saturation(b: list, common_rate: float | None) -> dict:
    """Scenario b: the best passing step, the step (failed twice) that ended the climb, and the
    deliveries per server CPU-second at common_rate, the highest step every server passed."""
    for r in b:
        r["deliveries_per_cpu_s"] = round(r["received"] / r["server_cpu_s"]) if r.get("server_cpu_s") else None
    best = max((r for r in b if r["passed"]), key=lambda r: r["deliveries_per_s"], default=None)
    passed_rates = {r["rate"] for r in b if r["passed"]}
    stopped = next((r for r in reversed(b) if r["rate"] not in passed_rates), None)
    if stopped is None:
        stopped_by = f"passed every step; busy at the top: {b[-1]['limited_by']}" if b else None
    else:
        stopped_by = (f"{stopped['rate']} msg/s: delivered {stopped.get('delivery_ratio')}, p99 "
                      f"{stopped.get('p99_ms')} ms, busy: {stopped['limited_by']} {stopped.get('error', '')}")
    return {"b_deliveries_per_s": best and best["deliveries_per_s"], "b_rate": best and best["rate"],
            "b_busy_at_best": best and best["limited_by"], "b_stopped_by": stopped_by,
            "b_deliveries_per_cpu_s": median_of([r for r in b if r["passed"] and r["rate"] == common_rate],
                                                "deliveries_per_cpu_s"),
            "b_p99_at_20k_ms": next((r["p99_ms"] for r in b if r["rate"] == 1 and r["passed"]), None)}


def summarize(runs: list, servers: list) -> dict:
    """Per server: a's medians, b's best step and what stopped it, c's KiB per connection; ratios to websockets."""
    b = [r for r in runs if r["scenario"] == "b"]
    common_rate = max((rate for rate in {r["rate"] for r in b}
                       if all(any(r["passed"] and r["rate"] == rate for r in b if r["server"] == s.name)
                              for s in servers)), default=None)
    summary = {}
    for server in servers:
        mine = [r for r in runs if r["server"] == server.name]
        ok = [r for r in mine if "error" not in r]
        summary[server.name] = {
            **summarize_cpu([r for r in ok if r["scenario"] == "a"]),
            **summarize_saturation([r for r in mine if r["scenario"] == "b"], common_rate),
            "b_common_rate": common_rate,
            "c_kib_per_connection": {r["connections"]: r.get("kib_per_connection")
                                     for r in ok if r["scenario"] == "c"},
        }
    base = summary.get(BASELINE, {})
    for s in summary.values():
        for key in ("a_cpu_per_400k_s", "b_deliveries_per_s", "b_deliveries_per_cpu_s"):
            s[key + "_vs_ws"] = round(s[key] / base[key], 3) if s.get(key) and base.get(key) else None
    return summary


def fmt(value, spec: str = "") -> str:
    """A table cell: the value formatted, or a dash when it is missing."""
    return "-" if value is None else format(value, spec)


def label(run: dict) -> str:
    """What sets a run apart from the others of its scenario."""
    if "rate" in run:
        return f"{run['rate']} msg/s" + (" (again)" if run.get("retry") else "")
    if "connections" in run:
        return f"{run['connections']:,} conns"
    return f"run {run.get('repeat', 0) + 1}"


def markdown(result: dict) -> str:
    """The run as Markdown: command, date, machine, the summary table, every run."""
    m, plan = result["machine"], result["plan"]
    common = next(iter(result["summary"].values()), {}).get("b_common_rate")
    rows = []
    for name, s in result["summary"].items():
        idle = ", ".join(f"{fmt(v, '.1f')} @{k // 1000}k" for k, v in s["c_kib_per_connection"].items())
        rows.append(
            f"| {name} | {fmt(s['a_cpu_per_400k_s'], '.2f')} | {fmt(s.get('a_system_per_400k_s'), '.2f')} "
            f"| {fmt(s['a_cpu_per_400k_s_vs_ws'], '.2f')} "
            f"| {fmt(s['a_delivery_ratio'], '.4f')} | {fmt(s['a_p50_ms'], '.1f')} / {fmt(s['a_p99_ms'], '.1f')} "
            f"| {fmt(s['b_deliveries_per_s'], ',.0f')} | {fmt(s['b_deliveries_per_s_vs_ws'], '.2f')} "
            f"| {fmt(s['b_deliveries_per_cpu_s'], ',.0f')} | {fmt(s['b_deliveries_per_cpu_s_vs_ws'], '.2f')} "
            f"| {fmt(s['b_stopped_by'])} | {idle or '-'} |")
    detail = [f"| {r['scenario']} | {r['server']} | {label(r)} "
              f"| {fmt(r.get('received'), ',')} | {fmt(r.get('delivery_ratio'))} "
              f"| {fmt(r.get('deliveries_per_s'), ',.0f')} | {fmt(r.get('p50_ms'))} / {fmt(r.get('p99_ms'))} "
              f"| {fmt(r.get('server_cpu_s'))} | {fmt(r.get('server_system_s'))} "
              f"| {fmt(r.get('server_busy'))} | {fmt(r.get('client_busy'))} "
              f"| {fmt(r.get('others_busy'))} | {fmt(r.get('rss_kib'), ',')} | {fmt(r.get('peak_rss_kib'), ',')} "
              f"| {r['limited_by']} "
              f"| {r.get('error', '')[:80]} |"
              for r in result["runs"]]
    return f"""# scale-chat side by side: scalechat.py and the Python WebSocket libraries

Command: `{result['command']}`
Date: {result['date']} ({result['minutes']} min)
Machine: {machine_line(m)};
load average {m['loadavg']} at the start, {result['loadavg_end']} at the end
Pinning: {result['pinning']}

| server | a: server CPU s per 400k deliveries | a: of which system (kernel) | vs websockets | a: delivered | a/d: p50 / p99 ms at 20k deliveries/s | b: deliveries/s sustained | vs websockets | b: deliveries per server CPU-s at the same load | vs websockets | b: stopped at | c: KiB RSS per idle connection |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |
{chr(10).join(rows)}

- a: 1000 clients in rooms of 10, 2 msg/s each, 100 B, {plan['cpu_duration']:g} s: 20k deliveries/s,
  so its latency is also d. Median of {plan['repeats']} run(s) per server, servers alternating.
  Server CPU: utime + stime of the server's process tree from the first scheduled send until
  the last message sent could have arrived, scaled to 400k deliveries; "of which system" is
  the stime alone: the kernel's work in the server's system calls (on loopback, a send also
  runs the receiving side's TCP), which every server pays alike for the same sends.
- b: 1000 clients in rooms of 20, {', '.join(map(str, plan['saturation_rates']))} msg/s per
  client (20k deliveries/s per msg/s), {plan['saturation_duration']:g} s per step; a step passes
  with >= 99.9% delivered and p99 <= 250 ms, and a server stops climbing after failing a step
  twice. Deliveries per server CPU-s are taken at {fmt(common)} msg/s, the highest step every
  server passed: the same load for all, and far less sensitive to the machine's other load
  than deliveries/s.
- c: (VmRSS with N idle connections - VmRSS before) / N, in KiB.
- Latencies run from the intended send time (open model). "busy" names what used >= {BUSY:.0%}
  while sending: the server (of its cores) or the load client (of its core); "others" the CPU
  that processes outside the benchmark took on the two cores when it exceeded {NOISY} core.
  When it is the load client, the server's limit was not reached. Each run starts once other
  processes use less than {QUIET} core (waiting at most {plan['quiet_wait']:g} s, {plan['quiet_budget']:g} s in all).

## Every run

| scenario | server | step | received | delivered | deliveries/s | p50 / p99 ms | server CPU s | of which system | server busy | load client busy | others (cores) | server RSS KiB | peak RSS (VmHWM) KiB | busy | error |
| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |
{chr(10).join(detail)}
"""


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of about 2 minutes")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"comma-separated, from {','.join(SERVERS)}")
    parser.add_argument("--scenarios", default="a,b,c", help="comma-separated, from a,b,c")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin the server to core 0 and the load client to core 1")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="folder for the .md and .json")
    args = parser.parse_args()
    unknown = set(args.servers.split(",")) - set(SERVERS)
    if unknown or not set(args.scenarios.split(",")) <= {"a", "b", "c"}:
        parser.error(f"unknown server or scenario: {sorted(unknown) or args.scenarios}")
    return args


def main() -> int:
    """Run the scenarios, write the Markdown table and the JSON, print the table."""
    args = parse_args()
    plan = QUICK if args.quick else Plan()
    servers = [SERVERS[name] for name in args.servers.split(",")]
    if args.pin:
        os.sched_setaffinity(0, {int(CLIENT_CORE)})     # this script samples on the client's core
    started = datetime.now()
    info = machine()
    with tempfile.TemporaryDirectory(prefix="scalechat-bench-") as work:
        bench = Bench(servers, plan, args.pin, Path(work))
        for scenario in args.scenarios.split(","):
            {"a": bench.cpu, "b": bench.saturation, "c": bench.idle}[scenario]()
    result = {
        "command": " ".join(["python bench/run_bench.py", *sys.argv[1:]]),
        "date": started.isoformat(timespec="seconds"),
        "minutes": round((datetime.now() - started).total_seconds() / 60, 1),
        "machine": info, "loadavg_end": machine()["loadavg"],
        "pinning": (f"server on core {SERVER_CORES} (scalechat-w2 on cores 0,1), load client and "
                    f"this script on core {CLIENT_CORE}") if args.pin else "none",
        "plan": asdict(plan), "summary": summarize(bench.runs, servers), "runs": bench.runs,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"bench-{started:%Y%m%d-%H%M%S}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"written: {stem}.md, {stem}.json ({result['minutes']} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
