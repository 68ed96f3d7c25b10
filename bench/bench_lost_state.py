#!/usr/bin/env python3
"""Acknowledged messages and a room's lost Redis state: what every member of the room receives.

    python bench/bench_lost_state.py                      # this scalechat.py, about 40 s
    python bench/bench_lost_state.py --server old.py      # another copy (e.g. git show REV:scalechat.py)
    python bench/bench_lost_state.py --workers 2          # each instance with --workers 2

A room's state in Redis (its seq, and with it everything the sequencer knows)
can go while members stay connected: it expires (--redis-room-ttl), it is
evicted (maxmemory with volatile-lru, as docker-compose.yml runs Redis), or an
operator flushes it. Each scenario runs two instances on one fresh
redis-server, with members of one room on both, and counts what the room's
senders were acknowledged and what every member received:

- ttl: --redis-room-ttl 3; the members post 3 messages each, the room stays
  quiet 5 s (its keys expire), then they post 5 each;
- evict: Redis at maxmemory 30mb, volatile-lru; the members post 3 each, then
  one other client fills other rooms with 64 KiB texts (393 KB once
  JSON-escaped) until the room's keys are evicted; then the members post 5 each;
- flushall: the members post 50 messages a second each; FLUSHALL one second in;
  two seconds in all.

"lost" counts acknowledged messages that some member never received, "dups"
messages a member received twice. Results go to bench/results/lost_state.md
and .json, with date, command and machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from testkit import (
    Crowd,
    RedisServer,
    ServerProc,
    fill_room,
    machine,
    machine_line,
    start_server,
    talk_through,
)

SERVER_ARGS = ("--drain-timeout", "2", "--log-level", "ERROR")
MEMBERS_PER_INSTANCE = 2
SETTLE = 3.0                  # seconds to wait for the last messages to arrive everywhere


def state_key(redis: RedisServer, room: str) -> str | None:
    """The key that holds the room's seq (its name changed with the epoch: either form)."""
    for suffix in ("state", "seq"):
        key = f"scalechat:{{{room}}}:{suffix}"
        if redis.cli("EXISTS", key).strip() == "1":
            return key
    return None


def count(members: list) -> dict:
    """Acked, delivered to every member, lost (acked, not everywhere) and duplicated messages."""
    acked = {(m.name, a["message_id"]) for m in members for a in m.acks}
    received = [[(e["sender"], e["message_id"]) for e in m.messages] for m in members]
    everywhere = set.intersection(*(set(r) for r in received))
    dups = sum(len(r) - len(set(r)) for r in received)
    return {"sent": sum(len(m.sent) for m in members), "acked": len(acked),
            "delivered": len(acked & everywhere), "lost": len(acked - everywhere), "dups": dups}


async def scenario(name: str, server_file: Path, workers: int, work: Path) -> dict:
    redis = RedisServer(str(work)).start()
    ttl = ("--redis-room-ttl", "3") if name == "ttl" else ()
    extra = ("--workers", str(workers)) if workers > 1 else ()
    if name == "evict":
        redis.cli("CONFIG", "SET", "maxmemory", "30mb")
        redis.cli("CONFIG", "SET", "maxmemory-policy", "volatile-lru")
    nodes: list[ServerProc] = []
    try:
        # The filler posts its 393 KB frames from one connection: no byte rate (SCALECHAT_RATE_LIMIT_BYTES
        # rather than the flag, which older copies of the server do not know).
        nodes = [start_server("--redis", redis.url, *ttl, *extra, *SERVER_ARGS, script=server_file,
                              env={"SCALECHAT_RATE_LIMIT_BYTES": "0"}) for _ in range(2)]
        room = f"victim-{os.urandom(3).hex()}"
        async with Crowd() as crowd:
            members = []
            for i, node in enumerate(nodes):
                members += await crowd.join([node.url], room, MEMBERS_PER_INSTANCE, "ab"[i])
            t0 = time.monotonic()
            if name == "flushall":
                await talk_through(members, lambda: redis.cli("FLUSHALL"), period=0.02, settle=1.0)
            else:
                for _ in range(3):
                    await asyncio.gather(*(m.say() for m in members))
                await asyncio.sleep(0.5)
                if name == "ttl":
                    await asyncio.sleep(5)
                else:
                    def evict() -> None:
                        for i in range(400):
                            fill_room(nodes[i % 2].port, f"fill{i}", 2)
                            if state_key(redis, room) is None:
                                return
                    await asyncio.to_thread(evict)
                gone = state_key(redis, room) is None
                for _ in range(5):
                    await asyncio.gather(*(m.say() for m in members))
                    await asyncio.sleep(0.05)
                assert gone, f"{name}: the room's state is still in Redis"
            await asyncio.sleep(SETTLE)
            result = count(members)
            result.update(scenario=name, seconds=round(time.monotonic() - t0, 1),
                          errors=sum(len(m.errors) for m in members),
                          closes=sum(len(m.closes) for m in members))
            return result
    finally:
        for node in nodes:
            node.stop()
        redis.kill()


def table(rows: list) -> str:
    lines = ["| scenario | sent | acked | acked and delivered to every member | lost | dups |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['sent']} | {r['acked']} | {r['delivered']} | "
                     f"**{r['lost']}** | {r['dups']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", type=Path, default=ROOT / "scalechat.py", help="the scalechat.py to run")
    parser.add_argument("--workers", type=int, default=1, help="--workers of each instance")
    parser.add_argument("--scenarios", default="ttl,evict,flushall")
    parser.add_argument("--name", default="", help="a label for this run in the results")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.scenarios.split(","):
            rows.append(asyncio.run(scenario(name, args.server.resolve(), args.workers, Path(work))))
            print(json.dumps(rows[-1]))
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "python bench/bench_lost_state.py " + " ".join(sys.argv[1:])
    text = (f"\n## {started}: {args.name or args.server.name}, --workers {args.workers}\n\n"
            f"`{command}`; {machine_line(machine())}\n\n{table(rows)}\n")
    print(text)
    args.results.mkdir(exist_ok=True)
    with open(args.results / "lost_state.md", "a") as f:
        f.write(text)
    raw = args.results / "lost_state.json"
    runs = json.loads(raw.read_text()) if raw.exists() else []
    runs.append({"started": started, "command": command, "server": str(args.server), "name": args.name,
                 "workers": args.workers, "machine": machine(), "rows": rows})
    raw.write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
