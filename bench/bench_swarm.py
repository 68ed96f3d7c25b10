#!/usr/bin/env python3
"""The original's experiment on the stack as deployed: chat replicas limited to
0.25 CPU and 512 MB each, clients sending one message a second, more clients
at each step until p99 passes 1 s or a message is lost.

    python bench/bench_swarm.py                           # about 11 minutes
    python bench/bench_swarm.py --replicas 1 --clients 100,200 --duration 10
    python bench/bench_swarm.py --door traefik --replicas 1,2 --name swarm-traefik

For each replica count of --replicas, the stack (docker-compose.yml with
test_swarm.compose.yml on top, as test_swarm.py deploys it) is deployed afresh
on this machine's Docker engine in Swarm mode, with SCALECHAT_REPLICAS,
SCALECHAT_CPUS and SCALECHAT_MEMORY set. Then, for each client count of
--clients, one loadclient.py run in a container on the stack's network, as a
user would start it:

    loadclient.py --load-test --server-url ws://chat:8080/ws --rooms C/10 --room-size 10
        --rate 1 --duration 15 --grace 5 --max-p99 1000 --min-delivery 1.0 --out run

With --door traefik the load goes through the stack's Traefik instead, as the
original's did: --server-url ws://traefik/ws, Traefik's port 80 on the stack's
network (so no docker-proxy stands between the load client and Traefik). The
load client is one address there, so the stack is deployed with Traefik's
per-address limits raised out of the way (SCALECHAT_DOOR_*).

Its exit status 1 (a threshold missed) ends that replica count's sweep. Around
each run the bench reads each chat replica's cgroup (cpu.stat: nr_periods,
nr_throttled, throttled_time; cpuacct.usage), Redis's, Traefik's, and the
machine's busy time from /proc/stat; CPU per message is CPU seconds over the
step divided by the messages sent (each goes to the 10 members of its room). After the sweep, csvprocess.py and plot.py run on the
load client's results folder as a user would run them; the latency-mean figure
is copied to bench/results/swarm-<N>r-latency-mean.png (NAME-..., with --name).

Starts dockerd and a swarm when none runs (testkit_docker.Engine), and stops what it
started. Everything stays on this machine: the stack's containers and loopback.
Writes bench/results/swarm.json and bench/results/swarm.md (--name NAME: NAME.json, NAME.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from testkit import cores_busy, machine, machine_line, wait_for
from testkit_docker import Engine, Stack, build_images, docker

RESULTS = Path(HERE) / "results"
STACK = "chatbench"
ORIGINAL = ("The original (Go, Swarm, replicas limited to 0.25 CPU): p99 around 20 s at 600-800 clients "
            "sending one message a second, and messages lost.")


# ---------------------------------------------------------------- cgroups

def cgroup_dir(pid: int, controller: str) -> str:
    """The cgroup folder of pid for a cgroup v1 controller, or its cgroup v2 folder."""
    with open(f"/proc/{pid}/cgroup") as f:
        entries = [line.rstrip("\n").split(":", 2) for line in f]
    for _, controllers, path in entries:
        if controller in controllers.split(","):
            for root in (f"/sys/fs/cgroup/{controllers}", f"/sys/fs/cgroup/{controller}"):
                if os.path.isdir(root + path):
                    return root + path
    for _, controllers, path in entries:
        if controllers == "" and os.path.isdir("/sys/fs/cgroup" + path):
            return "/sys/fs/cgroup" + path
    raise FileNotFoundError(f"no {controller} cgroup for pid {pid}")


def read_keyed(path: str) -> dict[str, int]:
    with open(path) as f:
        return {key: int(value) for key, value in (line.split() for line in f if line.strip())}


def cpu_stat(pid: int) -> dict[str, float]:
    """CPU used and CFS throttling of pid's cgroup, so far: seconds and counts."""
    cpu = cgroup_dir(pid, "cpu")
    stat = read_keyed(os.path.join(cpu, "cpu.stat"))
    if "throttled_usec" in stat:  # cgroup v2
        with open(os.path.join(cpu, "cpu.max")) as f:
            quota, period = f.read().split()
        limit = int(quota) / int(period) if quota != "max" else None
        return {"cpu_s": stat["usage_usec"] / 1e6, "nr_periods": stat["nr_periods"],
                "nr_throttled": stat["nr_throttled"], "throttled_s": stat["throttled_usec"] / 1e6,
                "limit_cpus": limit}
    with open(os.path.join(cgroup_dir(pid, "cpuacct"), "cpuacct.usage")) as f:
        usage_ns = int(f.read())
    with open(os.path.join(cpu, "cpu.cfs_quota_us")) as f:
        quota = int(f.read())
    with open(os.path.join(cpu, "cpu.cfs_period_us")) as f:
        period = int(f.read())
    return {"cpu_s": usage_ns / 1e9, "nr_periods": stat["nr_periods"], "nr_throttled": stat["nr_throttled"],
            "throttled_s": stat["throttled_time"] / 1e9, "limit_cpus": quota / period if quota > 0 else None}


def container_pids(stack: Stack, service: str) -> dict[str, int]:
    """{container id: main pid} of a service's running tasks."""
    ids = docker("ps", "-q", "--no-trunc", "--filter", f"label=com.docker.swarm.service.name={stack.name}_{service}")
    return {cid: int(docker("inspect", "--format", "{{.State.Pid}}", cid)) for cid in ids.split()}


def snapshot(stack: Stack) -> dict:
    return {"chat": {cid: cpu_stat(pid) for cid, pid in container_pids(stack, "chat").items()},
            "redis": [cpu_stat(pid) for pid in container_pids(stack, "redis").values()],
            "traefik": [cpu_stat(pid) for pid in container_pids(stack, "traefik").values()],
            "busy": sum(cores_busy()), "t": time.monotonic()}


def difference(before: dict, after: dict) -> dict:
    """Per replica (in before's order) and for Redis: CPU and throttling over a step."""
    wall = after["t"] - before["t"]
    replicas = []
    for cid, b in before["chat"].items():
        a = after["chat"].get(cid)
        if a is None:
            replicas.append({"container": cid[:12], "gone": True})
            continue
        periods, throttled = a["nr_periods"] - b["nr_periods"], a["nr_throttled"] - b["nr_throttled"]
        replicas.append({
            "container": cid[:12], "limit_cpus": a["limit_cpus"],
            "cpu_cores": round((a["cpu_s"] - b["cpu_s"]) / wall, 3),
            "nr_periods": periods, "nr_throttled": throttled,
            "throttled_share": round(throttled / periods, 3) if periods else None,
            "throttled_s": round(a["throttled_s"] - b["throttled_s"], 2),
            "cpu_s": round(a["cpu_s"] - b["cpu_s"], 3)})

    def cpu_s(service: str) -> float:
        return sum(a["cpu_s"] for a in after[service]) - sum(b["cpu_s"] for b in before[service])
    return {"wall_s": round(wall, 1), "replicas": replicas, "redis_cpu_cores": round(cpu_s("redis") / wall, 3),
            "traefik_cpu_cores": round(cpu_s("traefik") / wall, 3), "traefik_cpu_s": round(cpu_s("traefik"), 3),
            "machine_busy_cores": round((after["busy"] - before["busy"]) / wall, 2)}


# ---------------------------------------------------------------- one replica count

# Where the load client connects, by --door: every replica's address in turn, or Traefik.
SERVER_URLS = {"direct": "ws://chat:8080/ws", "traefik": "ws://traefik/ws"}
# Traefik's per-address limits, out of the way of a load client that is one address.
DOOR_UNLIMITED = {"SCALECHAT_DOOR_SOCKETS": "1000000", "SCALECHAT_DOOR_RATE": "1000000",
                  "SCALECHAT_DOOR_BURST": "1000000"}


def loadclient_args(rooms, args: argparse.Namespace) -> list[str]:
    """The load client's command line for one step: rooms of --room-size at 1 msg/s."""
    return ["--load-test", "--server-url", SERVER_URLS[args.door], "--rooms", str(rooms),
            "--room-size", str(args.room_size), "--rate", "1", "--duration", str(args.duration),
            "--grace", str(args.grace), "--procs", str(args.procs), "--seed", "7",
            "--max-p99", f"{args.max_p99:g}", "--min-delivery", f"{args.min_delivery:g}",
            "--out", "run", "--summary-json", f"summary-{rooms}x{args.room_size}.json"]


def step(stack: Stack, out: Path, clients: int, args: argparse.Namespace) -> dict:
    """One loadclient.py run of clients at 1 msg/s, with the cgroups read around it."""
    rooms = clients // args.room_size
    scenario = f"{rooms}x{args.room_size}"
    command = loadclient_args(rooms, args)
    before = snapshot(stack)
    load = stack.loadclient(out, *command, log=f"loadclient-{scenario}.log",
                            options=("--ulimit", "nofile=20000:20000"))
    try:
        status = load.wait(args.duration + args.grace + 90)
    except subprocess.TimeoutExpired:
        docker("rm", "-f", f"{stack.name}-load", check=False)
        load.wait()
        status = None
    after = snapshot(stack)
    row = {"clients": clients, "scenario": scenario, "exit_status": status,
           "loadclient": "python loadclient.py " + " ".join(command), **difference(before, after)}
    summary_path = out / f"summary-{scenario}.json"
    if summary_path.exists():
        (result,) = json.loads(summary_path.read_text())["scenarios"]
        row.update({key: result[key] for key in (
            "sent", "expected", "received", "lost", "late", "duplicates", "delivery_ratio",
            "deliveries_per_s", "reconnects", "errors", "connect_ms")})
        row["latency_ms"] = {k: result["latency_ms"].get(k) for k in ("count", "p50", "p99", "max")}
        if result["sent"]:
            replicas_s = sum(r.get("cpu_s", 0) for r in row["replicas"])
            row["cpu_us_per_message"] = {"replicas": round(1e6 * replicas_s / result["sent"], 1),
                                         "traefik": round(1e6 * row["traefik_cpu_s"] / result["sent"], 1)}
    else:
        row["failure"] = (out / f"loadclient-{scenario}.log").read_text(errors="replace")[-2000:]
    return row


def sweep(replicas: int, workdir: Path, args: argparse.Namespace, deadline: float) -> dict:
    env = {"SCALECHAT_REPLICAS": str(replicas), "SCALECHAT_CPUS": args.cpus, "SCALECHAT_MEMORY": args.memory,
           **(DOOR_UNLIMITED if args.door == "traefik" else {})}
    stack = Stack(STACK, env)
    out = workdir / f"{replicas}r"
    rows, stopped = [], "no threshold missed, up to the last client count"
    try:
        stack.deploy()
        wait_for(lambda: len(stack.healthy_chat_addresses()) == replicas, 180,
                 f"{replicas} chat replicas healthy", interval=1.0)
        if args.door == "traefik":
            stack.wait_for_traefik_routes(replicas)
        time.sleep(3)  # Redis and every replica settled
        for clients in args.clients:
            if time.monotonic() + args.duration + args.grace + 20 > deadline:
                stopped = f"the time budget (--budget {args.budget} s) ran out before {clients} clients"
                break
            row = step(stack, out, clients, args)
            rows.append(row)
            print(f"{replicas} replica(s), {clients} clients: delivered {row.get('delivery_ratio')}, "
                  f"p99 {row.get('latency_ms', {}).get('p99')} ms, throttled "
                  f"{[r.get('throttled_share') for r in row['replicas']]}", flush=True)
            if row["exit_status"] != 0:
                stopped = (f"a threshold missed at {clients} clients" if row["exit_status"] == 1
                           else f"{clients} clients: loadclient.py exit status {row['exit_status']}")
                break
            time.sleep(args.pause)
    finally:
        stack.remove()
    figures = process_and_plot(out / "run", replicas, args.name) if rows and args.figures else []
    return {"replicas": replicas, "results_folder": str(out / "run"), "steps": rows, "stopped": stopped,
            "figures": figures}


def process_and_plot(run: Path, replicas: int, name: str) -> list[str]:
    """csvprocess.py and plot.py on the load client's results folder, as a user runs them."""
    for tool in ("csvprocess.py", "plot.py"):
        subprocess.run([sys.executable, os.path.join(ROOT, tool), str(run)], check=True, timeout=600,
                       stdout=subprocess.DEVNULL)
    figure = run / "plots" / "latency-mean.png"
    target = RESULTS / f"{name}-{replicas}r-latency-mean.png"
    shutil.copyfile(figure, target)
    return [target.name]


# ---------------------------------------------------------------- the report

def ms(value) -> str:
    return "-" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def report(result: dict) -> str:
    lines = [
        "# The original's experiment on the stack as deployed", "",
        (f"{result['date']}, `{result['command']}`, {result['took_s'] / 60:.1f} minutes. "
         f"Machine: {machine_line(result['machine'])}."), "",
        (f"Each chat replica limited to {result['cpus']} CPU and {result['memory']} (docker-compose.yml's "
        "defaults), the stack deployed with test_swarm.compose.yml on top. The load client connects "
        + ("through Traefik (ws://traefik/ws, its per-address limits raised)"
           if result.get("door") == "traefik" else "to the replicas directly (ws://chat:8080/ws)")
        + ". Clients in rooms of "
        f"{result['room_size']}, each sending 1 message/s (100 bytes) for {result['duration']} s, "
        f"{result['grace']} s of grace; a step fails at p99 > {result['max_p99']} ms or delivery < "
        f"{result['min_delivery']}. Latency is from each message's intended send time to its receipt, "
        "over every receiver. CPU and throttling: each replica's cgroup over the step "
        "(throttled = CFS periods in which the replica hit its quota, of the periods it ran in); "
        "CPU per message: the replicas' CPU seconds together, and Traefik's, over the step, per message sent."), "",
        f"{ORIGINAL}", "",
        ("| replicas | clients | delivered | lost | p50 ms | p99 ms | max ms | deliveries/s "
         "| CPU per replica (cores) | throttled periods | throttled s per replica | Redis CPU "
         "| Traefik CPU | CPU µs per message: replicas / Traefik | machine busy (cores) |"),
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for sweep_ in result["sweeps"]:
        for row in sweep_["steps"]:
            latency = row.get("latency_ms", {})
            live = [r for r in row["replicas"] if not r.get("gone")]
            cpu = " / ".join(f"{r['cpu_cores']:.2f}" for r in live)
            share = " / ".join(f"{100 * (r['throttled_share'] or 0):.0f}%" for r in live)
            throttled = " / ".join(f"{r['throttled_s']:.1f}" for r in live)
            cost = row.get("cpu_us_per_message")
            per_message = f"{cost['replicas']:,.0f} / {cost['traefik']:,.0f}" if cost else "-"
            lines.append(
                f"| {sweep_['replicas']} | {row['clients']} | {row.get('delivery_ratio', '-')} | "
                f"{row.get('lost', '-')} | {ms(latency.get('p50'))} | {ms(latency.get('p99'))} | "
                f"{ms(latency.get('max'))} | {row.get('deliveries_per_s', 0):,.0f} | "
                f"{cpu} | {share} | {throttled} | {row['redis_cpu_cores']:.2f} | "
                f"{row.get('traefik_cpu_cores', 0):.2f} | {per_message} | {row['machine_busy_cores']:.2f} |")
    lines.append("")
    for sweep_ in result["sweeps"]:
        lines.append(f"- {sweep_['replicas']} replica(s): {sweep_['stopped']}; "
                     f"figures: {', '.join(sweep_['figures']) or 'none'}.")
        for row in sweep_["steps"]:
            if row.get("errors") or row.get("reconnects") or row.get("failure"):
                lines.append(f"  - {row['clients']} clients: reconnects {row.get('reconnects')}, "
                             f"errors {row.get('errors')}{' ' + row['failure'][-300:] if row.get('failure') else ''}")
    lines += ["", "Each step's load client, in a container on the stack's network:", "",
              "```sh", result["loadclient"], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,2,3", help="replica counts, one sweep each (default 1,2,3)")
    parser.add_argument("--clients", default="100,200,400,600,800,1000,1400,2000,2800",
                        help="client counts of a sweep, in order")
    parser.add_argument("--room-size", type=int, default=10)
    parser.add_argument("--duration", type=int, default=15, help="seconds of sending per step")
    parser.add_argument("--grace", type=int, default=5)
    parser.add_argument("--pause", type=float, default=3.0, help="seconds between steps")
    parser.add_argument("--procs", type=int, default=2, help="load client processes")
    parser.add_argument("--door", choices=sorted(SERVER_URLS), default="direct",
                        help="the load client connects to the replicas directly, or through Traefik")
    parser.add_argument("--cpus", default="0.25", help="SCALECHAT_CPUS")
    parser.add_argument("--memory", default="512M", help="SCALECHAT_MEMORY")
    parser.add_argument("--max-p99", type=float, default=1000.0, help="ms")
    parser.add_argument("--min-delivery", type=float, default=1.0)
    parser.add_argument("--budget", type=int, default=900, help="seconds for the whole run")
    parser.add_argument("--name", default="swarm", help="bench/results/NAME.md, .json and NAME-<N>r-*.png")
    parser.add_argument("--no-figures", dest="figures", action="store_false",
                        help="skip csvprocess.py and plot.py")
    args = parser.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    replica_counts = [int(r) for r in args.replicas.split(",")]
    started = time.monotonic()
    deadline = started + args.budget
    RESULTS.mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-swarm-"))
    engine = Engine()
    sweeps = []
    try:
        engine.start()
        build_images()
        for replicas in replica_counts:
            sweeps.append(sweep(replicas, workdir, args, deadline))
    finally:
        engine.stop()
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/bench_swarm.py" + ("" if argv is None and len(sys.argv) == 1
                                                    else " " + " ".join(argv or sys.argv[1:])),
        "machine": machine(), "took_s": round(time.monotonic() - started),
        "door": args.door, "cpus": args.cpus, "memory": args.memory, "room_size": args.room_size, "duration": args.duration,
        "grace": args.grace, "max_p99": args.max_p99, "min_delivery": args.min_delivery,
        "original": ORIGINAL, "load_results": str(workdir), "sweeps": sweeps,
        "loadclient": "python loadclient.py " + " ".join(loadclient_args("<C/10>", args)),
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(report(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
