#!/usr/bin/env python3
"""Affinity hot spots of scalechat.py --workers 2: one big room, rooms aimed at one worker, the connection cap.

    python bench/bench_hotspots.py                         # the working tree, every scenario
    python bench/bench_hotspots.py --rev 9a2f866           # another revision, for before/after
    python bench/bench_hotspots.py --scenarios cap --quick

With --room-affinity each room has an owner worker, which a room's WebSockets
are handed to. Three ways that can pile work on one worker: one room of 2,000
members, 40 of them sending 50 then 25 messages/s and timing their own echoes,
with --room-affinity true and false (bigroom); an attacker flooding rooms whose
names have an even crc32, the owner hash of older revisions, while victims in
other rooms time their echoes (aimed); --max-connections 50 and 50 + 50 joins to
rooms of worker 0 (cap). REV's scalechat.py runs on loopback (bench_ab.checkout);
the clients are raw WebSockets on non-blocking sockets in helper processes; worker
CPU is utime + stime from /proc over each sending window. Every server run has a
hard time limit. Results go to bench/results/hotspots.md (appended) and .json.
"""
from __future__ import annotations

import argparse
import contextlib
import heapq
import importlib.util
import inspect
import json
import multiprocessing
import os
import queue
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from bench_ab import checkout

import scalechat as sc
import testkit as tk

WORKERS = 2
AFFINITY_KEY = "5ca1ec4a7f00d1e5ba5eba11c0ffee00"     # fixed, so that the bench knows each room's owner
COMMON_FLAGS = ["--workers", str(WORKERS), "--log-level", "WARNING", "--ping-interval", "3600",
                "--drain-timeout", "2"]
ATTACK_RATE = 45.0          # 90% of the default --rate-limit 50, as the project's clients pace themselves
MP = multiprocessing.get_context("fork")
SIZES = {   # scenario: (full sizes, --quick sizes)
    "bigroom": ({"members": 2000, "senders": 40, "rates": [50, 25], "seconds": 10, "grace": 10, "helpers": 2},
                {"members": 100, "senders": 4, "rates": [50, 25], "seconds": 3, "grace": 2, "helpers": 2}),
    "aimed": ({"rooms": 40, "per_room": 5, "victim_rooms": 20, "victim_rate": 10, "seconds": 10, "grace": 5,
               "helpers": 2},
              {"rooms": 6, "per_room": 3, "victim_rooms": 4, "victim_rate": 10, "seconds": 3, "grace": 2,
              "helpers": 2}),
    "cap": ({"cap": 50}, {"cap": 50}),
}


# ---------------------------------------------------------------------------
# Clients: raw WebSockets on non-blocking sockets, in helper processes
# ---------------------------------------------------------------------------

def connect_all(port: int, resources: list[str], deadline: float, window: int = 64) -> tuple[list, Counter]:
    """A WebSocket per resource, at most window handshakes at once: ([(socket, bytes after the head)
    or None], a Counter of the answers: 101, another HTTP status, 'closed' or 'timeout')."""
    sel, todo, answers = selectors.DefaultSelector(), list(enumerate(resources))[::-1], Counter()
    opened: list = [None] * len(resources)

    def finish(sock: socket.socket, state: list, answer, leftover: bytes = b"") -> None:
        sel.unregister(sock)
        answers[str(answer)] += 1
        if answer == 101:
            opened[state[0]] = (sock, leftover)
        else:
            sock.close()
    while (todo or sel.get_map()) and time.monotonic() < deadline:
        while todo and len(sel.get_map()) < window:
            i, resource = todo.pop()
            sock, key = socket.socket(), sc.new_key()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            request = sc.client_handshake_request(f"127.0.0.1:{port}", resource, key)
            sel.register(sock, selectors.EVENT_WRITE, [i, key, request, b""])
        for k, events in sel.select(0.2):
            sock, state = k.fileobj, k.data
            try:
                if events & selectors.EVENT_WRITE:
                    sock.sendall(state[2])       # a head of ~200 bytes into an empty buffer
                    sel.modify(sock, selectors.EVENT_READ, state)
                elif not (data := sock.recv(65536)):
                    finish(sock, state, "closed")
                elif (end := sc.parse_handshake_response(state[3] + data, state[1])) is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    finish(sock, state, 101, (state[3] + data)[end:])
                else:
                    state[3] += data
            except sc.HandshakeError as e:
                finish(sock, state, e.status or "closed")
            except OSError:
                finish(sock, state, "closed")
    for k in list(sel.get_map().values()):
        answers["timeout"] += 1     # still unanswered at the deadline
        k.fileobj.close()
    sel.close()
    return opened, answers


class Peer:
    """One client in a helper: reads (and discards, unless it times its own echoes), sends at a rate."""

    def __init__(self, sock: socket.socket, leftover: bytes, rate: float, measure: bool, tag: str):
        self.sock, self.port, self.rate, self.measure, self.tag = sock, sock.getsockname()[1], rate, measure, tag
        self.marker = f'"text":"hs~{tag}~'.encode()
        self.parser = sc.FrameParser(expect_masked=False, max_message_size=1 << 26) if measure else None
        self.out, self.open, self.message_id = bytearray(), True, 0
        self.new_step()
        self.take(leftover, 0)

    def new_step(self) -> None:
        self.sent, self.echoes_ms, self.messages, self.in_window, self.refused = 0, [], 0, 0, 0

    def take(self, data: bytes, now_ns: int) -> None:
        """Frames read: count room messages and rate_limit refusals, time this peer's own echoes."""
        for opcode, payload in self.parser.feed(data) if self.measure else ():
            if opcode == sc.OP_TEXT and payload.startswith(b'{"type":"message"'):
                self.messages += 1
                if self.marker in payload:
                    sent_ns = int(json.loads(payload)["text"].split("~")[2])
                    self.echoes_ms.append(round((now_ns - sent_ns) / 1e6, 3))
            elif opcode == sc.OP_TEXT and b'"rate_limit"' in payload:
                self.refused += 1

    def send(self) -> None:
        """One chat message stamped with its send time; what the socket does not take waits in out."""
        self.message_id += 1
        self.out += tk.chat_frame(f"hs~{self.tag}~{time.monotonic_ns()}~", self.message_id)
        self.sent += 1
        with contextlib.suppress(OSError):      # a full buffer: later; a closed socket: reading sees it
            del self.out[:self.sock.send(self.out)]


def crowd(port: int, specs: list, tag: str, control, results, deadline: float) -> None:
    """A helper process: connect specs [(resource, rate, measure)], say so, then run each step that main
    sends ((start, seconds, rate factor, grace), None to end), until deadline at the latest."""
    opened, answers = connect_all(port, [s[0] for s in specs], min(deadline, time.monotonic() + 60))
    peers = [Peer(*o, rate, measure, f"{tag}.{i}") for i, (o, (_, rate, measure)) in enumerate(zip(opened, specs)) if o]
    sel = selectors.DefaultSelector()
    for peer in peers:
        sel.register(peer.sock, selectors.EVENT_READ, peer)
    results.put((os.getpid(), dict(answers), [p.port for p in peers]))
    try:
        while (step := control.get(timeout=max(0.1, deadline - time.monotonic()))) is not None:
            start, seconds, factor, grace = step
            closed = run_step(sel, peers, start, seconds, factor, min(deadline, start + seconds + grace))
            results.put((os.getpid(), closed, [
                {"port": p.port, "sent": p.sent, "echoes_ms": p.echoes_ms, "in_window": p.in_window,
                 "refused": p.refused} for p in peers if p.measure]))
    except queue.Empty:
        pass
    finally:
        for peer in peers:
            peer.sock.close()


def run_step(sel, peers: list, start: float, seconds: float, factor: float, until: float) -> int:
    """Send on an open-model schedule from start for seconds, reading all the while; stop at until, or
    sooner once every measured peer has all its echoes. The clients the server closed meanwhile."""
    end, due, closed, buf = start + seconds, [], 0, bytearray(1 << 18)
    for i, peer in enumerate(peers):
        peer.new_step()
        if peer.rate * factor > 0 and peer.open:
            due.append((start + i / len(peers) / (peer.rate * factor), i))
    heapq.heapify(due)
    measured = [p for p in peers if p.measure]
    while (now := time.monotonic()) < until:
        if now > end and all(len(p.echoes_ms) >= p.sent or not p.open for p in measured):
            break
        while due and due[0][0] <= now:
            at, i = heapq.heappop(due)
            if at < end and peers[i].open:
                peers[i].send()
                heapq.heappush(due, (at + 1 / (peers[i].rate * factor), i))
        for key, _ in sel.select(max(0.0, min(0.05, (due[0][0] if due else now + 0.05) - now))):
            peer = key.data
            try:
                n = peer.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                n = 0
            if not n:
                sel.unregister(peer.sock)
                peer.open, closed = False, closed + 1
            elif peer.measure:
                peer.take(bytes(buf[:n]), time.monotonic_ns())
                peer.in_window = peer.messages if time.monotonic() <= end else peer.in_window
    return closed


# ---------------------------------------------------------------------------
# The server under test, and helpers run against it
# ---------------------------------------------------------------------------

def owner_function(folder: str):
    """(room -> owner worker slot as the revision in folder computes it, the kind of hash):
    room_owner(room, workers, key) with SCALECHAT_AFFINITY_KEY, room_owner(room, workers), or crc32."""
    spec = importlib.util.spec_from_file_location("scalechat_under_test", os.path.join(folder, "scalechat.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    owner = getattr(module, "room_owner", None)
    if owner is not None and len(inspect.signature(owner).parameters) >= 3:
        return (lambda room: owner(room, WORKERS, bytes.fromhex(AFFINITY_KEY))), "keyed owner"
    if owner is not None:
        return (lambda room: owner(room, WORKERS)), "crc32 owner"
    return (lambda room: zlib.crc32(room.encode()) % WORKERS), "crc32 owner"


def listening_workers(server) -> dict[int, int]:
    """pid -> --worker-id of each worker of the supervisor that listens on the port already."""
    listeners, slots = set(tk.tcp_sockets(server.port, tk.TCP_LISTEN)), {}
    for pid in tk.children(server.proc.pid):
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode().split("\0")
            if tk.socket_inodes(pid) & listeners:
                slots[pid] = int(args[args.index("--worker-id") + 1])
    return slots


@contextlib.contextmanager
def served(folder: str, flags: list, budget: float):
    """(server, {worker pid: slot}) of REV's server with flags, once every worker listens. TimeoutError
    past budget seconds; stopped after, and any worker left behind killed."""
    def expired(*_):
        raise TimeoutError(f"a server's run took longer than {budget:.0f} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(int(budget))
    server, workers = None, {}
    try:
        server = tk.start_server(*COMMON_FLAGS, *flags, script=os.path.join(folder, "scalechat.py"),
                              env={"SCALECHAT_AFFINITY_KEY": AFFINITY_KEY})
        while len(workers := listening_workers(server)) < WORKERS:
            time.sleep(0.1)
        yield server, workers
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        if server is not None:
            server.stop(timeout=10)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def budget(steps: list, grace: float) -> float:
    """The seconds a server's run may take at most: connecting, then each step and its grace."""
    return 120 + sum(seconds + grace + 5 for seconds, _ in steps)


def slot_of(port: int, workers: dict, client_ports) -> dict:
    """client port -> the worker slot that holds that client ('?' when none is seen to)."""
    owners = tk.connection_owners(port, list(workers))
    return {p: workers.get(owners.get(p), "?") for p in client_ports}


def on_workers(slots: dict, keys) -> dict:
    """{'w0': n, 'w1': n}: how many of keys each slot has."""
    return {f"w{k}": v for k, v in sorted(Counter(slots.get(k, "?") for k in keys).items(), key=str)}


def run_helpers(server, workers: dict, groups: list, steps: list, grace: float) -> dict:
    """A helper process per group of specs, then each step (seconds, rate factor, or one per group) sent
    to all at once, with grace seconds after it for the last echoes: their answers and client ports, the workers holding those, and per step what each
    helper saw and the CPU (% of a core) of each worker, the supervisor and the helpers."""
    results, helpers, deadline = MP.Queue(), [], time.monotonic() + budget(steps, grace) - 30
    try:
        for n, specs in enumerate(groups):
            control = MP.Queue()
            helpers.append((MP.Process(target=crowd, args=(server.port, specs, str(n), control, results, deadline),
                                       daemon=True), control))
            helpers[-1][0].start()
        ready = {r[0]: r for r in (results.get(timeout=max(1, deadline - time.monotonic())) for _ in helpers)}
        ports = [ready[proc.pid][2] for proc, _ in helpers]
        out = {"answers": dict(sum((Counter(r[1]) for r in ready.values()), Counter())), "ports": ports,
               "slot_of": slot_of(server.port, workers, [p for group in ports for p in group]), "steps": []}
        names = {**{pid: f"w{slot}" for pid, slot in workers.items()}, server.proc.pid: "supervisor",
                 **{proc.pid: "clients" for proc, _ in helpers}}
        for seconds, factor in steps:
            start = time.monotonic() + 0.5
            for n, (_, control) in enumerate(helpers):
                control.put((start, seconds, factor[n] if isinstance(factor, list) else factor, grace))
            time.sleep(max(0.0, start - time.monotonic()))
            cpu0 = tk.cpu_times(list(names))
            time.sleep(seconds)
            cpu1, shares = tk.cpu_times(list(names)), Counter()
            for pid, name in names.items():
                shares[name] += 100 * (cpu1[pid][0] - cpu0[pid][0]) / seconds if pid in cpu0 and pid in cpu1 else 0
            seen = {r[0]: r for r in (results.get(timeout=grace + 15) for _ in helpers)}
            out["steps"].append({"cpu": {k: round(v, 1) for k, v in sorted(shares.items())},
                                 "closed": [seen[proc.pid][1] for proc, _ in helpers],
                                 "measured": [p for r in seen.values() for p in r[2]]})
        return out
    finally:
        for proc, control in helpers:
            with contextlib.suppress(ValueError, OSError):
                control.put(None)
        for proc, _ in helpers:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(2)


def echo_summary(peers: list) -> dict:
    """p50/p99 of these measured peers' echoes, what they sent that never came back, what was refused."""
    echoes = [ms for p in peers for ms in p["echoes_ms"]]
    return {"p50_ms": tk.percentile(echoes, 0.5) if echoes else None,
            "p99_ms": tk.percentile(echoes, 0.99) if echoes else None, "sent": sum(p["sent"] for p in peers),
            "unechoed": sum(max(0, p["sent"] - len(p["echoes_ms"])) for p in peers),
            "refused": sum(p["refused"] for p in peers)}


# ---------------------------------------------------------------------------
# The scenarios
# ---------------------------------------------------------------------------

def bigroom(folder: str, size: dict, _owner) -> list[dict]:
    """One room of size['members']; senders at each rate in turn; --room-affinity true, then false."""
    rows, members, senders = [], size["members"], size["senders"]
    specs = [(f"/ws/bigroom?name=s{i}", 1.0, True) if i < senders else (f"/ws/bigroom?name=m{i}", 0.0, False)
             for i in range(members)]
    steps = [(size["seconds"], rate) for rate in size["rates"]]
    for affinity in ("true", "false"):
        print(f"  bigroom, --room-affinity {affinity}: {members} members, {senders} senders", flush=True)
        flags = ["--room-affinity", affinity, "--rate-limit", "0", "--max-buffer", str(4 << 20)]
        with served(folder, flags, budget(steps, size["grace"])) as (server, workers):
            groups = [specs[n::size["helpers"]] for n in range(size["helpers"])]
            run = run_helpers(server, workers, groups, steps, size["grace"])
        for (seconds, rate), step in zip(steps, run["steps"]):
            row = {"affinity": affinity, "rate": rate, "offered_per_s": senders * rate * members,
                   "members_on": on_workers(run["slot_of"], run["slot_of"]), "answers": run["answers"],
                   "cpu": step["cpu"], "closed": sum(step["closed"]),
                   "per_member_per_s": round(tk.percentile([p["in_window"] for p in step["measured"]], 0.5) / seconds),
                   **echo_summary(step["measured"])}
            rows.append(row)
            print(f"    {rate} msg/s: {fmt_cpu(row['cpu'])}, echo p50/p99 {fmt_ms(row)} ms, "
                  f"{row['unechoed']} unechoed, {row['closed']} closed by the server", flush=True)
    return rows


def aimed(folder: str, size: dict, owner) -> list[dict]:
    """Victims in ordinary rooms (half owned by each worker) time their echoes, quiet, then while
    attackers flood rooms with an even crc32 at the rate limit."""
    aimed_rooms = [r for r in (f"aim{n}" for n in range(10 * size["rooms"])) if zlib.crc32(r.encode()) % 2 == 0]
    aimed_rooms, half = aimed_rooms[:size["rooms"]], size["victim_rooms"] // 2
    victim_rooms = [r for slot in range(WORKERS) for r in [r for r in (f"room{n}" for n in range(40 * half))
                                                           if owner(r) == slot][:half]]
    victims = [(f"/ws/{room}?name=v{i}", size["victim_rate"], True) for room in victim_rooms for i in range(2)]
    attackers = [(f"/ws/{room}?name=a{i}", ATTACK_RATE, False) for room in aimed_rooms for i in range(size["per_room"])]
    groups = [victims] + [attackers[n::size["helpers"]] for n in range(size["helpers"])]
    steps = [(size["seconds"], [1.0] + [0.0] * size["helpers"]), (size["seconds"], 1.0)]
    print(f"  aimed: {len(attackers)} attackers in {len(aimed_rooms)} rooms, {len(victims)} victims", flush=True)
    with served(folder, [], budget(steps, size["grace"])) as (server, workers):
        run = run_helpers(server, workers, groups, steps, size["grace"])
    rows, slots = [], run["slot_of"]
    for phase, step in zip(("quiet", "flood"), run["steps"]):
        row = {"phase": phase, "cpu": step["cpu"], "attackers_closed": sum(step["closed"][1:]),
               "aimed_rooms_owned": on_workers({r: owner(r) for r in aimed_rooms}, aimed_rooms),
               "attackers_on": on_workers(slots, [p for group in run["ports"][1:] for p in group]),
               "victims_on": on_workers(slots, run["ports"][0]),
               "victims": {f"w{slot}": echo_summary([p for p in step["measured"] if slots.get(p["port"]) == slot])
                           for slot in sorted({slots.get(p) for p in run["ports"][0]}, key=str)}}
        rows.append(row)
        print(f"    {phase}: {fmt_cpu(row['cpu'])}; victims " + "; ".join(
            f"on {w} p50/p99 {fmt_ms(v)} ms" for w, v in row["victims"].items()), flush=True)
    return rows


def cap(folder: str, size: dict, owner) -> list[dict]:
    """--max-connections N: N clients join rooms owned by worker 0, then N more: their answers, and
    the workers holding them."""
    n = size["cap"]
    rooms = [r for r in (f"cap{i}" for i in range(200)) if owner(r) == 0][:10]
    print(f"  cap: --max-connections {n}, {n} then {n} more joins to rooms owned by worker 0", flush=True)
    row, held = {}, []
    with served(folder, ["--max-connections", str(n)], 90) as (server, workers):
        for phase, name in (("first", "c"), ("next", "d")):
            time.sleep(1.5 if held else 0)      # a worker may hear of the others' loads on a timer
            opened, answers = connect_all(server.port, [f"/ws/{rooms[i % 10]}?name={name}{i}" for i in range(n)],
                                          time.monotonic() + 30)
            held += [sock for sock, _ in filter(None, opened)]
            ports = [sock.getsockname()[1] for sock in held]
            row[phase] = {"answers": dict(answers),
                          "held_on": on_workers(slot_of(server.port, workers, ports), ports)}
            print(f"    {phase} {n}: {fmt_counts(row[phase]['answers'])}; held: {fmt_counts(row[phase]['held_on'])}",
                  flush=True)
        for sock in held:
            sock.close()
    return [row]


SCENARIOS = {"bigroom": bigroom, "aimed": aimed, "cap": cap}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def fmt_ms(summary: dict) -> str:
    """'0.4 / 2.1', or '-' without echoes."""
    return "-" if summary["p50_ms"] is None else f"{summary['p50_ms']:.1f} / {summary['p99_ms']:.1f}"


def fmt_cpu(cpu: dict) -> str:
    """'w0 83% / w1 12% (supervisor 3%, clients 95%)'."""
    return (" / ".join(f"w{s} {cpu.get(f'w{s}', 0):.0f}%" for s in range(WORKERS))
            + f" (supervisor {cpu.get('supervisor', 0):.0f}%, clients {cpu.get('clients', 0):.0f}%)")


def fmt_counts(counts: dict) -> str:
    """'w0 1000 / w1 1000', '101 50 / 503 50'."""
    return " / ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


COLUMNS = {   # scenario: (title, [(column, its cell from a row)])
    "bigroom": ("one room, senders timing their own echoes", [
        ("affinity", lambda r: r["affinity"]), ("msg/s per sender", lambda r: r["rate"]),
        ("offered deliveries/s", lambda r: f"{r['offered_per_s']:,}"),
        ("members on", lambda r: fmt_counts(r["members_on"])),
        ("worker CPU % (supervisor, clients)", lambda r: fmt_cpu(r["cpu"])),
        ("messages/s a member got", lambda r: f"{r['per_member_per_s']:,}"),
        ("echo p50 / p99 ms", fmt_ms), ("unechoed / sent", lambda r: f"{r['unechoed']} / {r['sent']}"),
        ("closed by the server", lambda r: r["closed"])]),
    "aimed": ("rooms with an even crc32 flooded at the rate limit, victims elsewhere", [
        ("phase", lambda r: r["phase"]), ("aimed rooms owned by", lambda r: fmt_counts(r["aimed_rooms_owned"])),
        ("attackers on", lambda r: fmt_counts(r["attackers_on"])),
        ("worker CPU % (supervisor, clients)", lambda r: fmt_cpu(r["cpu"])),
        ("victims on", lambda r: fmt_counts(r["victims_on"])),
        ("victims' echo p50 / p99 ms by worker", lambda r: "; ".join(f"{w}: {fmt_ms(v)}" for w, v in r["victims"].items())),
        ("victims' unechoed", lambda r: sum(v["unechoed"] for v in r["victims"].values())),
        ("attackers closed", lambda r: r["attackers_closed"])]),
    "cap": ("--max-connections, every join into rooms owned by worker 0", [
        ("first joins: answers", lambda r: fmt_counts(r["first"]["answers"])),
        ("held on", lambda r: fmt_counts(r["first"]["held_on"])),
        ("next joins: answers", lambda r: fmt_counts(r["next"]["answers"])),
        ("held on", lambda r: fmt_counts(r["next"]["held_on"]))]),
}


def tables(label: str, results: dict) -> list[str]:
    """The markdown tables of one run, a row per measurement, each labelled with the revision."""
    lines = []
    for name, rows in results.items():
        title, columns = COLUMNS[name]
        lines += [f"### {name}: {title}", "", "| revision | " + " | ".join(c for c, _ in columns) + " |",
                  "| --- " * (len(columns) + 1) + "|",
                  *("| " + " | ".join([label, *(str(cell(r)) for _, cell in columns)]) + " |" for r in rows), ""]
    return lines


def save(args, label: str, results: dict, sizes: dict) -> list[str]:
    """Append this run's section to hotspots.md and its data to hotspots.json; the section's lines."""
    stamp, info = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), tk.machine()
    command = "python bench/bench_hotspots.py " + shlex.join(sys.argv[1:])
    lines = [f"## {stamp}: {label}" + (" (quick)" if args.quick else ""), "", f"- command: `{command}`",
             f"- machine: {tk.machine_line(info)}; load average {info['loadavg']} at the end",
             f"- server: `scalechat.py {' '.join(COMMON_FLAGS)}` and SCALECHAT_AFFINITY_KEY; sizes: "
             + "; ".join(f"{k} {json.dumps(v)}" for k, v in sizes.items()), "", *tables(label, results)]
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "hotspots.md"), "a") as f:
        if f.tell() == 0:
            f.write("# Affinity hot spots of --workers 2\n\nWritten by `bench/bench_hotspots.py`, newest last.\n\n")
        f.write("\n".join(lines) + "\n")
    json_path, history = os.path.join(args.results, "hotspots.json"), []
    if os.path.exists(json_path):
        with open(json_path) as f:
            history = json.load(f)
    history.append({"when": stamp, "command": command, "machine": info, "revision": label, "sizes": sizes,
                    "results": results})
    with open(json_path, "w") as f:
        json.dump(history, f, indent=1)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default=".", help="git revision whose scalechat.py runs (default: the working tree)")
    parser.add_argument("--scenarios", default="bigroom,aimed,cap", help="comma-separated: bigroom, aimed, cap")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds a step: a smoke run")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    names = args.scenarios.split(",")
    if unknown := set(names) - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "rev")
        short = checkout(args.rev, folder)
        if short == "working tree":
            head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                                  text=True)
            short = f"{head.stdout.strip()}+working tree"
        owner, kind = owner_function(folder)
        label = f"{short} ({kind})"
        print(f"hot spots of {label}", flush=True)
        sizes = {name: SIZES[name][args.quick] for name in names}
        results = {name: SCENARIOS[name](folder, sizes[name], owner) for name in names}
    print("\n".join(save(args, label, results, sizes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
