#!/usr/bin/env python3
"""How fast is loadclient.py? Deliveries/s one process receives and records, CPU per delivery,
connections one process holds, and who saturates first beside a real scalechat.py.

    python bench/bench_loadclient.py            # all parts, about 4 minutes
    python bench/bench_loadclient.py --quick    # shorter runs

Parts:
1. firehose: a minimal sender (this script with --serve-firehose) completes real
   handshakes with scalechat's protocol core and streams pre-encoded, correctly
   sequenced room messages as fast as the client reads them, so the load client
   is the only possible bottleneck. Sender on CPU 0, load client on CPU 1.
2. real server: scalechat.py on CPU 0, the load client on CPU 1, rising rates;
   both processes' CPU use in the same window says who saturated.
3. connections: the most connections one load client process holds (to one
   scalechat.py, also bound by its open-file limit), and the client's RSS per
   connection; then 30,000 connections from 2 processes over 2 loopback source
   addresses to 2 firehose processes sharing a port (SO_REUSEPORT).

Writes bench/results/loadclient.json and bench/results/loadclient.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import selectors
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import scalechat
from testkit import (
    children,
    cpu_seconds,
    free_port,
    loadavg,
    machine,
    machine_line,
    rss_kib,
    start_server,
)

LOADCLIENT = os.path.join(ROOT, "loadclient.py")
PROGRESS_RE = re.compile(r" send .*recv/s (\d+)")


# ---------------------------------------------------------------------------
# /proc readings
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# The firehose sender
# ---------------------------------------------------------------------------

EPOCH = "19aee4c3f0b00000"   # the room's order: one for the whole stream


def message_stream(room_size: int, messages: int) -> bytes:
    """Frames of seq 1..messages encoded as scalechat.py encodes them, send stamps jittered by up to
    50 ms so the client's latency sort sees realistic disorder. Every connection gets the same
    stream: the client checks the seq order of each connection, not the room's name."""
    rng = random.Random(1)
    base = time.time_ns() // 1000
    frames = []
    for seq in range(1, messages + 1):
        stamp = base + rng.randrange(50_000)
        payload = json.dumps({"type": "message", "room": "r", "epoch": EPOCH, "seq": seq,
                              "sender": f"c{seq % room_size}",
                              "message_id": seq, "text": f"{stamp:016d} {stamp:016d} {'x' * 66}",
                              "sent_at": "2026-01-01T00:00:00.000000Z"},
                             separators=(",", ":"), ensure_ascii=False).encode()
        frames.append(scalechat.encode_frame(scalechat.OP_TEXT, payload))
    return b"".join(frames)


WRITE_SIZE = 8192  # bytes per send: about 35 frames, like a busy server's coalesced writes


def serve_firehose(port: int, room_size: int, messages: int, rate: int) -> None:
    """Accept WebSocket clients and stream them messages, rate deliveries/s in all, round-robin.

    The pace keeps what is queued in the kernel below its TCP memory-pressure
    threshold; past it TCP throttles every connection. rate 0: only hold connections.
    """
    stream = memoryview(message_stream(room_size, messages))
    bytes_per_s = rate * len(stream) / messages
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    conns: dict = {}  # socket -> [request head so far, stream offset or None, frame parser]
    order: list = []  # upgraded sockets, pumped round-robin (dropped ones are skipped)
    budget, last, cursor = 0.0, time.monotonic(), 0

    def drop(sock: socket.socket) -> None:
        sel.unregister(sock)
        sock.close()
        del conns[sock]

    while True:
        for key, mask in sel.select(0.001 if rate and order else 1.0):
            sock = key.fileobj
            if key.data is None:
                for _ in range(256):
                    try:
                        client, _ = listener.accept()
                    except BlockingIOError:
                        break
                    client.setblocking(False)
                    conns[client] = [b"", None, scalechat.FrameParser()]
                    sel.register(client, selectors.EVENT_READ, True)
                continue
            state = conns[sock]
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                drop(sock)
            elif state[1] is None:
                state[0] += data
                if b"\r\n\r\n" in state[0]:
                    request = scalechat.parse_request_head(state[0].partition(b"\r\n\r\n")[0])
                    welcome = json.dumps({"type": "welcome", "room": request.path.rpartition("/")[2],
                                          "name": request.query.get("name", ["x"])[-1], "epoch": EPOCH, "seq": 0,
                                          "members": room_size, "oldest": 1}).encode()
                    sock.sendall(scalechat.upgrade_response(scalechat.check_upgrade(request))
                                 + scalechat.encode_frame(scalechat.OP_TEXT, welcome))
                    state[1] = 0
                    order.append(sock)
            elif any(op == scalechat.OP_CLOSE for op, _ in state[2].feed(data)):
                drop(sock)  # the client is done; mid-stream, a Close echo could not be framed
        now = time.monotonic()
        budget = min(budget + bytes_per_s * (now - last), bytes_per_s * 0.05)
        last = now
        if len(order) > 2 * len(conns) + 64:
            order = [sock for sock in order if sock in conns]
        visited = 0
        while budget >= WRITE_SIZE and visited < len(order):
            sock = order[cursor % len(order)]
            cursor += 1
            visited += 1
            state = conns.get(sock)
            if state is None or state[1] >= len(stream):
                continue
            try:
                sent = sock.send(stream[state[1]:state[1] + WRITE_SIZE])
            except BlockingIOError:
                continue
            except OSError:
                drop(sock)
                continue
            state[1] += sent
            budget -= sent


def start_firehose(port: int, room_size: int, messages: int, cpu: str, rate: int = 0) -> subprocess.Popen:
    """The firehose in its own process, pinned, once it listens."""
    proc = subprocess.Popen(["taskset", "-c", cpu, sys.executable, __file__, "--serve-firehose", str(port),
                             "--room-size", str(room_size), "--messages", str(messages),
                             "--rate", str(rate)])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)


# ---------------------------------------------------------------------------
# Running the load client and watching it
# ---------------------------------------------------------------------------

def run_client(url: str, args: list, cpu: str, watch: list, out_dir: str) -> dict:
    """Run loadclient.py pinned to cpu; CPU of it, its workers and the watched pids over the sending window."""
    summary_path = os.path.join(out_dir, "summary.json")
    cmd = ["taskset", "-c", cpu, sys.executable, LOADCLIENT, "--load-test", "--server-url", url,
           "--out", out_dir, "--summary-json", summary_path, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rates, samples = [], []
    for line in proc.stderr:
        m = PROGRESS_RE.search(line)
        if not m:
            continue
        pids = [proc.pid, *children(proc.pid), *watch]
        samples.append((time.monotonic(), {p: cpu_seconds(p) for p in pids if os.path.exists(f"/proc/{p}")},
                        {p: rss_kib(p) for p in children(proc.pid)}))
        rates.append(int(m.group(1)))
    proc.wait()
    with open(summary_path) as f:
        summary = json.load(f)["scenarios"][0]
    # The steady window: from the second progress line while sending to the last.
    (t0, cpu0, _), (t1, cpu1, rss1) = samples[1], samples[-1]
    wall = t1 - t0
    window_rates = rates[2:]
    deliveries = sum(window_rates)
    workers = [p for p in cpu1 if p not in watch and p != proc.pid]
    client_cpu = sum(cpu1[p] - cpu0.get(p, 0) for p in workers)
    result = {
        "command": " ".join(["python", "loadclient.py", "--load-test", "--server-url", url, *args]),
        "deliveries_per_s": round(deliveries / max(len(window_rates), 1)),
        "client_cpu_pct": round(100 * client_cpu / wall, 1),
        "client_us_per_delivery": round(1e6 * client_cpu / deliveries, 2) if deliveries else None,
        "client_rss_kb": sum(rss1.values()),
        "p50_ms": summary["latency_ms"]["p50"], "p99_ms": summary["latency_ms"]["p99"],
        "received": summary["received"], "errors": summary["errors"],
        "connected": summary["connect_ms"]["count"],
    }
    for pid in watch:
        result[f"pid{pid}_cpu_pct"] = round(100 * (cpu1.get(pid, 0) - cpu0.get(pid, 0)) / wall, 1)
    return result


def bench_firehose(quick: bool, tmp: str) -> list:
    """Part 1: the load client's own ceiling."""
    rows = []
    duration = "6" if quick else "10"
    # (rooms, room size, recording fraction, sender pace in deliveries/s). The first two
    # offer about twice what the client takes, so the client saturates; the pace keeps
    # the backlog queued in the kernel below its TCP memory-pressure threshold (~1.5 GB
    # here), past which TCP throttles every connection and the numbers mean nothing.
    for rooms, size, record, rate in ((50, 20, "1.0", 400_000), (50, 20, "0.1", 700_000),
                                      (500, 20, "1.0", 100_000)):
        port = free_port()
        messages = rate * (int(duration) + 5) // (rooms * size) + 100
        hose = start_firehose(port, size, messages, "0", rate)
        try:
            r = run_client(f"ws://127.0.0.1:{port}/ws",
                           ["--rooms", str(rooms), "--room-size", str(size), "--msg-frequency", "60000",
                            "--duration", duration, "--grace", "0", "--record-receivers", record,
                            "--ramp", "5000"], "1", [hose.pid], os.path.join(tmp, f"fh{rooms}-{record}"))
        finally:
            hose.kill()
            hose.wait()
        r["sender_cpu_pct"] = r.pop(f"pid{hose.pid}_cpu_pct")
        r.update(part="firehose", connections=rooms * size, record_receivers=float(record),
                 paced_deliveries_per_s=rate)
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def bench_real_server(quick: bool, tmp: str) -> list:
    """Part 2: scalechat.py and the load client side by side; who saturates first."""
    rows = []
    rates = (1, 2, 4) if quick else (1, 2, 4, 6, 8)
    for rate in rates:
        server = start_server("--rate-limit", "0", "--log-level", "WARNING")
        subprocess.run(["taskset", "-pc", "0", str(server.proc.pid)], capture_output=True, check=True)
        try:
            r = run_client(server.url, ["--rooms", "50", "--room-size", "20", "--rate", str(rate),
                                        "--duration", "6" if quick else "10", "--grace", "3"],
                           "1", [server.proc.pid], os.path.join(tmp, f"real{rate}"))
        finally:
            server.stop()
        r["server_cpu_pct"] = r.pop(f"pid{server.proc.pid}_cpu_pct")
        r["server_us_per_delivery"] = round(1e4 * r["server_cpu_pct"] / r["deliveries_per_s"], 2)
        r.update(part="real server", connections=1000, offered_deliveries_per_s=rate * 1000 * 20)
        # Each has a core of its own: the one that spends more CPU per delivery runs out first,
        # whether or not it got there in this run (on a shared machine neither may get a whole core).
        first = "load client" if r["client_us_per_delivery"] > r["server_us_per_delivery"] else "server"
        busy = [n for n, k in (("server", "server_cpu_pct"), ("load client", "client_cpu_pct")) if r[k] >= 90]
        r["saturated"] = busy[0] if busy else f"neither (first: {first})"
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def bench_connections(quick: bool, tmp: str) -> list:
    """Part 3: connections per process, memory per connection, and >28k over two source addresses."""
    rows = []
    server = start_server("--log-level", "WARNING")
    try:
        rooms = 995 if not quick else 250
        r = run_client(server.url, ["--rooms", str(rooms), "--room-size", "20", "--msg-frequency", "20000",
                                    "--duration", "10", "--grace", "2", "--ramp", "1000",
                                    "--connect-timeout", "30"],
                       "1", [server.proc.pid], os.path.join(tmp, "conns"))
        r.update(part="connections, one process", connections=rooms * 20,
                 client_kb_per_connection=round(r["client_rss_kb"] / (rooms * 20), 2))
        r.pop(f"pid{server.proc.pid}_cpu_pct")
        rows.append(r)
        print(json.dumps(r), flush=True)
    finally:
        server.stop()
    if quick:
        return rows
    port = free_port()
    hoses = [start_firehose(port, 20, 1, "0") for _ in range(2)]  # share the port: SO_REUSEPORT
    try:
        r = run_client(f"ws://127.0.0.1:{port}/ws",
                       ["--rooms", "1500", "--room-size", "20", "--msg-frequency", "60000", "--procs", "2",
                        "--duration", "20", "--grace", "0", "--ramp", "2000", "--connect-timeout", "20"],
                       "1", [h.pid for h in hoses], os.path.join(tmp, "conns30k"))
    finally:
        for h in hoses:
            h.kill()
            h.wait()
    for key in [k for k in r if k.startswith("pid")]:
        r.pop(key)
    r.update(part="connections, two processes, two source addresses", connections=30000)
    rows.append(r)
    print(json.dumps(r), flush=True)
    return rows


def summary_lines(report: dict) -> list:
    """The headline numbers, computed from the rows below them."""
    lines = ["## Summary", ""]
    hose = {(r["connections"], r["record_receivers"]): r for r in report["firehose"]}
    for (conns, record), r in sorted(hose.items()):
        lines.append(f"- {conns:,} connections, {record:.0%} of receivers recording: {r['client_us_per_delivery']}"
                     f" us of client CPU per delivery, so one process on one core receives and records about"
                     f" {1e6 / r['client_us_per_delivery']:,.0f} deliveries/s.")
    if report["real_server"]:
        r = report["real_server"][-1]
        lines.append(f"- Beside scalechat.py at {r['deliveries_per_s']:,} deliveries/s the server spent"
                     f" {r['server_us_per_delivery']} us per delivery and the load client"
                     f" {r['client_us_per_delivery']} us: with a core each, the"
                     f" {'load client' if 'load client' in r['saturated'] else 'server'} saturates first.")
    for r in report["connections"]:
        lines.append(f"- {r['part']}: {r['connected']:,} of {r['connections']:,} connected,"
                     f" client RSS {r['client_rss_kb'] / r['connections']:.1f} KB per connection.")
    return lines


def write_markdown(path: str, report: dict) -> None:
    """The results as a readable table."""
    m = report["machine"]
    lines = [
        "# loadclient.py benchmark", "",
        (f"Measured {report['date']} with `{report['command']}` on {machine_line(m)}."
         " The sender (firehose or scalechat.py) was pinned"
         " to CPU 0 and the load client to CPU 1. CPU figures are from /proc over the steady sending"
         " window; deliveries/s is the mean of the client's per-second progress lines in that window."
         f" Load average (1/5/15 min) at the start {report['loadavg_start']}, at the end"
         f" {report['loadavg_end']}: the machine is shared, and CPU per delivery is the figure that"
         " noise disturbs least."),
        "",
        *summary_lines(report), "",
        "## 1. The load client's own ceiling (firehose sender)", "",
        ("| connections | recording receivers | sender pace | deliveries/s | client CPU | client us/delivery"
         " | one-core ceiling (10^6 / us) | sender CPU |"),
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["firehose"]:
        pace = f"{r['paced_deliveries_per_s']:,}/s"
        lines.append(f"| {r['connections']:,} | {r['record_receivers']:.0%} | {pace} | {r['deliveries_per_s']:,} |"
                     f" {r['client_cpu_pct']}% | {r['client_us_per_delivery']} |"
                     f" {1e6 / r['client_us_per_delivery']:,.0f}/s | {r['sender_cpu_pct']}% |")
    lines += ["", "## 2. Beside scalechat.py: who saturates first", "",
              "50 rooms of 20 (1000 clients), every receiver recording.", "",
              ("| offered deliveries/s | received deliveries/s | server CPU | client CPU | server us/delivery |"
               " client us/delivery | p50 ms | p99 ms | saturated |"),
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in report["real_server"]:
        lines.append(f"| {r['offered_deliveries_per_s']:,} | {r['deliveries_per_s']:,} | {r['server_cpu_pct']}% |"
                     f" {r['client_cpu_pct']}% | {r['server_us_per_delivery']} | {r['client_us_per_delivery']} |"
                     f" {r['p50_ms']} | {r['p99_ms']} |"
                     f" {r['saturated']} |")
    lines += ["", "## 3. Connections", "",
              "| setup | connections | connected | client RSS | errors |", "| --- | ---: | ---: | ---: | --- |"]
    for r in report["connections"]:
        lines.append(f"| {r['part']} | {r['connections']:,} | {r['connected']:,} | {r['client_rss_kb'] / 1024:.0f} MiB |"
                     f" {r['errors'] or 'none'} |")
    lines += ["", "Commands of every row are in loadclient.json.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main() -> int:
    """Run the parts and write the results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter runs, fewer points")
    p.add_argument("--parts", default="firehose,real,connections", help="comma-separated parts to run")
    p.add_argument("--serve-firehose", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--room-size", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--messages", type=int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--rate", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_firehose:
        serve_firehose(args.serve_firehose, args.room_size, args.messages, args.rate)
        return 0
    tmp = os.path.join("/tmp", f"bench-loadclient-{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    parts = args.parts.split(",")
    report = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "loadavg_start": loadavg(),
              "command": " ".join(["python", "bench/bench_loadclient.py", *sys.argv[1:]]),
              "machine": machine(),
              "firehose": bench_firehose(args.quick, tmp) if "firehose" in parts else [],
              "real_server": bench_real_server(args.quick, tmp) if "real" in parts else [],
              "connections": bench_connections(args.quick, tmp) if "connections" in parts else []}
    report["loadavg_end"] = loadavg()
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "loadclient.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    write_markdown(os.path.join(HERE, "results", "loadclient.md"), report)
    with open(os.path.join(HERE, "results", "loadclient.md")) as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
