#!/usr/bin/env python3
"""Fuzzing of scalechat's chat layer against live servers: JSON fields, query strings, frame sequences.

    python bench/fuzz_chat.py [--mode single|workers|redis|all] [--seconds 60] [--seed N]
    python bench/fuzz_chat.py --mode workers --categories json,frames

Each mode starts its own servers on free loopback ports: one scalechat.py
process (single), a --workers 2 supervisor (workers), or two instances that
share a private redis-server (redis; senders on one, the watcher on the other),
and runs seeded cases of four kinds (json, query, frames, resend) against them,
each checked against a reference model of docs/protocol.md. The cases, the
model and the checks are the test kit's (testkit_fuzz_chat.py, which
test_chat_fuzz.py runs for a few hundred cases of each kind). After a failure
the fuzzer looks, on fresh servers, for a smaller input that fails the same
way, prints it and exits 1. Each run appends its counts to bench/results/fuzz.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from testkit import machine, machine_line
from testkit_fuzz_chat import CATEGORIES, MAX_MESSAGE_SIZE, MODES, Fuzzer, Target

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def server_version() -> str:
    """Which scalechat.py was fuzzed: its commit, and whether the work tree changed it."""
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "scalechat.py"],
                                 check=False).returncode
    except (OSError, subprocess.CalledProcessError):
        return "scalechat.py (not in a git checkout)"
    return f"scalechat.py of commit {commit}" + (", with changes not yet committed" if changed else "")


def write_report(path: str, command: str, seed: int, rows: list) -> None:
    """Append one run's table to the Markdown report (the protocol fuzzer's file)."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Run of {now}: the chat layer against live servers", "",
             f"- command: `{command}`",
             f"- machine: {machine_line(machine())}",
             f"- server: {server_version()}",
             (f"- engine: `bench/fuzz_chat.py`, seeded generator (seed {seed}), a reference model as oracle; "
              f"--max-message-size {MAX_MESSAGE_SIZE}"), "",
             "| mode | json | frames | query | resend | cases | seconds | victim's slowest echo | result |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['mode']} | " + " | ".join(f"{r['counts'][c]:,}" for c in CATEGORIES) +
                     f" | {sum(r['counts'].values()):,} | {r['seconds']} | {r['worst_ms']:.0f} ms | "
                     f"{r['result'].replace('|', '/')} |")
    lines += ["", f"Total: {sum(sum(r['counts'].values()) for r in rows):,} cases.", ""]
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


def run_mode(mode: str, seconds: float, seed: int, reduce_seconds: float, categories: tuple = CATEGORIES) -> dict:
    """Fuzz one mode for seconds on servers of its own; its row of the report."""
    workdir = tempfile.mkdtemp(prefix="scalechat-fuzz-chat-")
    target = Target(mode, workdir)
    t0 = time.monotonic()
    try:
        target.start()
        fuzzer = Fuzzer(target, random.Random(f"{seed}-{mode}"), categories)
        found = fuzzer.fuzz(until=t0 + seconds, reduce_seconds=reduce_seconds)
    finally:
        target.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    result = "no failure"
    if found:
        case, finding = found
        result = f"{finding.kind}: {finding.message[:400]}" + (f" (input: {str(case)[:400]})" if case else "")
        print(f"\n{mode}: {finding}\nminimal input: {case}", file=sys.stderr, flush=True)
    return {"mode": mode, "counts": fuzzer.counts, "seconds": round(time.monotonic() - t0),
            "worst_ms": target.worst * 1000, "result": result}


def main() -> int:
    """Fuzz the chosen modes and append the report; exit 1 at the first failure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=(*MODES, "all"), default="all")
    parser.add_argument("--seconds", type=float, default=60, help="seconds of fuzzing per mode")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--categories", default=",".join(CATEGORIES), help="comma-separated: " + ", ".join(CATEGORIES))
    parser.add_argument("--reduce-seconds", type=float, default=60, help="seconds to look for a smaller failing input")
    parser.add_argument("--report", default=os.path.join(HERE, "results", "fuzz.md"))
    args = parser.parse_args()
    if set(args.categories.split(",")) - set(CATEGORIES):
        parser.error(f"--categories takes some of {', '.join(CATEGORIES)}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    print(f"seed {seed}", flush=True)
    rows = []
    for mode in MODES if args.mode == "all" else (args.mode,):
        if mode == "redis" and shutil.which("redis-server") is None:
            print("redis mode needs redis-server (apt-get install redis-server)", file=sys.stderr)
            return 2
        row = run_mode(mode, args.seconds, seed, args.reduce_seconds, tuple(args.categories.split(",")))
        print(f"{mode}: " + ", ".join(f"{row['counts'][c]:,} {c}" for c in CATEGORIES) +
              f" in {row['seconds']} s, victim's slowest echo {row['worst_ms']:.0f} ms: {row['result']}", flush=True)
        rows.append(row)
        if row["result"] != "no failure":
            break
    command = "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    if args.seed is None:
        command += f" --seed {seed}"
    write_report(args.report, command, seed, rows)
    return 0 if all(r["result"] == "no failure" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
