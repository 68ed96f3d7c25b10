#!/usr/bin/env python3
"""How long a full garbage collection takes in a worker holding N connections.

Builds N scalechat.Connection objects (with their frame parsers) in rooms of
10, as a worker holds them, and times gc.collect(): the pause every member of
that worker would see when Python's cyclic collector runs a full collection;
then the same once they are frozen, as --gc-freeze does after a full collection.

    python bench/bench_gc.py [--connections 17000]
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import scalechat


class FakeSocket:
    """Just enough of a socket for Connection()."""

    def fileno(self) -> int:
        return -1


def main() -> int:
    """Print the time of three full collections."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=17000)
    args = ap.parse_args()
    rooms: dict = {}
    conns = []
    for i in range(args.connections):
        conn = scalechat.Connection(FakeSocket(), "127.0.0.1", 0.0)
        conn.parser = scalechat.FrameParser()
        room = rooms.setdefault(i // 10, scalechat.Room(str(i // 10), 1000, True))
        room.members[conn] = None
        conn.room = room
        conns.append(conn)
    gc.collect()
    tracked = len(gc.get_objects())
    for label in ("as is", "after gc.freeze() (--gc-freeze)"):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            gc.collect()
            times.append((time.perf_counter() - start) * 1000)
        print(f"{args.connections} connections, {tracked} tracked objects, {label}: full collection "
              f"{min(times):.2f} / {sorted(times)[1]:.2f} / {max(times):.2f} ms (min/median/max)")
        gc.freeze()
    return 0


if __name__ == "__main__":
    sys.exit(main())
