"""Synthetic load-test runs: event CSVs with their meta.json, as loadclient.py writes them.

write_scenario is test_csvprocess.py's source of realistic runs, and the input
bench/bench_csvprocess.py measures csvprocess.py on.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np

import loadclient

HEADER = loadclient.CSV_HEADER.decode()
START_US = 1_764_324_000_000_000  # 2025-11-28 10:00:00 UTC


def write_scenario(folder: Path, rooms: int, room_size: int, seconds: float, *,
                   interval_ms: float = 1000.0, loss: float = 0.0, duplicates: float = 0.0,
                   stall_every_s: float = 0.0, median_latency_ms: float = 2.0,
                   seed: int = 1, start_us: int = START_US) -> tuple[Path, int]:
    """Write <rooms>x<room_size>.csv and .meta.json as loadclient.py would; returns (csv, events).

    Every client of a room sends on an open-model schedule (fixed interval,
    random phase, jitter); every member, the sender included, receives each
    message after a log-normal latency; `loss` drops deliveries, `duplicates`
    writes receipts twice, and every `stall_every_s` seconds a 300 ms server
    stall delays sends and deliveries (what coordinated omission hides)."""
    rng = np.random.default_rng(seed)
    name = f"{rooms}x{room_size}"
    clients = rooms * room_size
    interval_us = int(interval_ms * 1000)
    phase = rng.integers(0, interval_us, clients)
    sender = [f"c{i}" for i in range(clients)]
    room_of = [f"room{i // room_size}" for i in range(clients)]
    # receiver j of client i's message: the members of i's room
    member = (np.arange(clients) // room_size * room_size)[:, None] + np.arange(room_size)[None, :]
    member = member.ravel().tolist()
    seqs = [0] * rooms
    steps = int(seconds * 1000 / interval_ms)
    events = 0
    path = folder / f"{name}.csv"
    with open(path, "w", encoding="utf-8", buffering=1 << 20) as out:
        out.write(HEADER)
        # Each client's welcome: its room's order, one epoch per room.
        out.writelines(f",{sender[i]},{sender[i]},Order,{start_us - 1_000_000},{room_of[i]},0,,"
                       f"{start_us // 1000 + i // room_size:016x}\n" for i in range(clients))
        events += clients
        for step in range(steps):
            intended = start_us + step * interval_us + phase
            actual = intended + rng.exponential(40, clients).astype(np.int64)
            latency = rng.lognormal(np.log(median_latency_ms * 1000), 0.5, (clients, room_size))
            if stall_every_s:  # sends due in a stall go out when it ends, and queue behind it
                period = int(stall_every_s * 1e6)
                into = (intended - start_us) % period
                stalled = (into < 300_000) & (intended - start_us >= period)
                actual = np.where(stalled, intended - into + 300_000, actual)
                latency += np.where(stalled, rng.uniform(0, 20_000, clients), 0)[:, None]
            received = (actual[:, None] + latency.astype(np.int64)).ravel()
            kept = rng.random(received.size) >= loss
            twice = rng.random(received.size) < duplicates
            stamps = np.concatenate((actual, received))
            order = np.argsort(stamps, kind="stable").tolist()
            stamps, actual_l, intended_l = stamps.tolist(), actual.tolist(), intended.tolist()
            kept, twice = kept.tolist(), twice.tolist()
            seq_of = [0] * clients  # a room numbers its messages in the order they reach it
            for i in np.argsort(actual, kind="stable").tolist():
                seqs[i // room_size] += 1
                seq_of[i] = seqs[i // room_size]
            lines = []
            mid = step + 1
            for k in order:
                if k < clients:
                    lines.append(f"{mid},{sender[k]},{sender[k]},Sent,{actual_l[k]},{room_of[k]},,{intended_l[k]},\n")
                    continue
                d = k - clients
                if not kept[d]:
                    continue
                i = d // room_size
                line = f"{mid},{sender[i]},{sender[member[d]]},Received,{stamps[k]},{room_of[i]},{seq_of[i]},,\n"
                lines.append(line)
                if twice[d]:
                    lines.append(line)
            events += len(lines)
            out.writelines(lines)
    end_us = start_us + steps * interval_us
    meta = {"scenario": name, "rooms": rooms, "room_size": room_size, "clients": clients,
            "msg_interval_ms": interval_ms, "msg_size": 64, "duration_s": seconds, "ramp": 0,
            "start_time": iso(start_us), "end_time": iso(end_us), "start_us": start_us,
            "end_us": end_us, "server_url": "ws://127.0.0.1:8080/ws", "tool": "synthetic",
            "version": "0", "seed": seed, "settings": {"synthetic": True},
            "sent": clients * steps, "received": None, "errors": {}}
    (folder / f"{name}.meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path, events


def iso(us: int) -> str:
    """Epoch microseconds as ISO 8601 UTC."""
    return datetime.datetime.fromtimestamp(us / 1e6, datetime.UTC).isoformat()
