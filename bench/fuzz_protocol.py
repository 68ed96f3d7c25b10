#!/usr/bin/env python3
"""Long fuzzing of scalechat's protocol core: atheris (coverage-guided), or hypothesis.

    python bench/fuzz_protocol.py [--seconds 120] [--targets frames,close,request,chat]
    python bench/fuzz_protocol.py --engine hypothesis --examples 200000

Each target turns raw bytes into one call of the protocol core and checks the
same invariants as the property tests in test_hostile.py (both use
testkit_oracles.py): a byte stream parses alike however it is cut, only the
protocol's own errors come out (ProtocolError with a close code, HandshakeError,
ChatError), and every frame the parser returns encodes and parses back to
itself. libFuzzer stops a target at its first failure or after 10 s on one
input (a hang).

atheris runs each target in its own process for --seconds (it instruments
scalechat.py for coverage); hypothesis runs --examples random inputs per target
where atheris is not installed. Each run appends its summary to
bench/results/fuzz.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
MAX_LEN = {"frames": 1024, "close": 128, "request": 4096, "chat": 4096}   # bytes per input
sc = oracles = None          # scalechat and testkit_oracles, once load_core() has run


def load_core(instrument: bool) -> None:
    """Import scalechat (instrumented for atheris when asked) and the test oracles."""
    global sc, oracles
    if instrument:
        import atheris
        with atheris.instrument_imports(include=["scalechat"]):
            import scalechat
    else:
        import scalechat
    import testkit_oracles
    sc, oracles = scalechat, testkit_oracles


# ---------------------------------------------------------------------------
# Targets: raw bytes in, one checked call of the protocol core
# ---------------------------------------------------------------------------

def fuzz_frames(data: bytes) -> None:
    """Parser options and cut points from the first bytes, then the stream: split-invariance and round-trip."""
    if len(data) < 3:
        return
    flags, size, ncuts = data[0], data[1], data[2] % 8
    cuts = [int.from_bytes(data[3 + 2 * i:5 + 2 * i], "big") for i in range(ncuts)]
    stream = data[3 + 2 * ncuts:]
    options = {"expect_masked": bool(flags & 1), "accept_binary": bool(flags & 2),
               "max_message_size": size if flags & 4 else 1 << 20}
    frames, _ = oracles.check_any_split(stream, cuts, **options)
    key = b"\x01\x02\x03\x04" if options["expect_masked"] else None
    again = b"".join(sc.encode_frame(opcode, payload, mask_key=key) for opcode, payload in frames)
    assert oracles.feed_chunks([again], **options) == (frames, None)


def fuzz_close(data: bytes) -> None:
    """A Close frame body: a valid (code, reason) or ProtocolError 1002/1007."""
    oracles.check_close_payload(data[:125])


def fuzz_request(data: bytes) -> None:
    """An HTTP request head: parsed and upgraded, or HandshakeError with a 4xx status."""
    oracles.check_request_head(data)


def fuzz_chat(data: bytes) -> None:
    """A chat frame payload under a maximum size taken from the first byte."""
    if data:
        oracles.check_chat_payload(data[1:], data[0] + 1)


TARGETS = {"frames": fuzz_frames, "close": fuzz_close, "request": fuzz_request, "chat": fuzz_chat}


def seeds(name: str) -> list:
    """Valid inputs for a target, so that fuzzing starts deep inside the parser."""
    import base64
    if name == "frames":
        key = b"abcd"
        return [b"\x01\x00\x00" + sc.encode_frame(sc.OP_TEXT, b'{"text":"hi"}', mask_key=key)
                + sc.encode_frame(sc.OP_PING, b"p", mask_key=key) + sc.encode_close(1000, "bye", key),
                b"\x07\x40\x02\x00\x03\x00\x09" + sc.encode_frame(sc.OP_TEXT, "é€".encode(), fin=False,
                                                                   mask_key=key)
                + sc.encode_frame(sc.OP_CONTINUATION, "😀".encode(), mask_key=key),
                b"\x00\xff\x00" + sc.encode_frame(sc.OP_BINARY, bytes(300))]
    if name == "close":
        return [b"\x03\xe8bye", b"\x0b\xb8", b""]
    if name == "request":
        key = base64.b64encode(bytes(16)).decode()
        return [sc.client_handshake_request("127.0.0.1:8080", "/ws/room?name=a&since=3", key,
                                            "http://127.0.0.1:8080")[:-4],
                b"GET /static/app.js HTTP/1.1\r\nHost: x", b"GET //x/ws HTTP/1.1\r\nHost: x"]
    return [b'\x40{"message_id":1,"text":"hello","sent_at":"2026-11-28T10:00:00.123456Z"}',
            b'\x10[[{"text":1}]]']


# Tokens libFuzzer splices into inputs: the pieces of the grammar a byte-level
# search rarely builds by chance.
DICTIONARY = {
    "request": [b"GET ", b" HTTP/1.1", b"\r\n", b"//", b"[", b"]", b"%", b"?", b"&", b"=", b"#",
                b"/ws", b"/static/", b"since=", b"name=", b"Host: ", b"Origin: ", b"Upgrade: websocket",
                b"Connection: Upgrade", b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Key: "],
    "chat": [b'"text"', b'"message_id"', b'"sent_at"', b"\\ud800", b"[", b"{", b"1e999", b"-0"],
    "frames": [b"\x81", b"\x88", b"\x89", b"\x8a", b"\x80", b"\x01", b"\x7e", b"\x7f", b"\xed\xa0",
               b"\xf4\x90", b"\xc0\xaf"],
}


def write_dictionary(name: str, path: str) -> bool:
    """Write the target's tokens in libFuzzer's format; False when it has none."""
    tokens = DICTIONARY.get(name)
    if not tokens:
        return False
    with open(path, "w") as f:
        f.writelines('"' + "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}"
                                  for b in token) + '"\n' for token in tokens)
    return True


# ---------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------

def run_atheris_child(name: str, seconds: int, workdir: str) -> None:
    """Fuzz one target in this process until libFuzzer exits (never returns)."""
    import atheris
    load_core(True)
    corpus = os.path.join(workdir, name)
    os.makedirs(corpus, exist_ok=True)
    for i, seed in enumerate(seeds(name)):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(seed)
    options = [f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=2048",
               f"-max_len={MAX_LEN[name]}", "-print_final_stats=1", f"-artifact_prefix={workdir}/{name}-"]
    dictionary = os.path.join(workdir, f"{name}.dict")
    if write_dictionary(name, dictionary):
        options.append(f"-dict={dictionary}")
    atheris.Setup([sys.argv[0], *options, corpus], TARGETS[name])
    atheris.Fuzz()


def run_atheris(name: str, seconds: int, workdir: str) -> dict:
    """Fuzz one target in a child process; its runs, time and result."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name,
                           "--seconds", str(seconds), "--workdir", workdir],
                          capture_output=True, text=True, errors="replace", check=False)
    log = proc.stdout + proc.stderr
    runs = [int(n) for n in re.findall(r"^#(\d+)\s|number_of_executed_units:\s*(\d+)", log, re.MULTILINE)
            for n in n if n]
    found = re.search(r"=== (Uncaught Python exception: ===\n.*?)\n\n|ERROR: libFuzzer: (\w+)", log, re.DOTALL)
    reproducer = re.search(r"Test unit written to (\S+)", log)
    result = "no failure" if proc.returncode == 0 else \
        (found.group(1) or found.group(2)).strip().splitlines()[-1] if found else f"exit {proc.returncode}"
    if reproducer:
        with open(reproducer.group(1), "rb") as f:
            result += f" (input {f.read()[:80]!r})"
    return {"target": name, "runs": max(runs, default=0),
            "seconds": round(time.monotonic() - t0), "result": result}


def run_hypothesis(name: str, examples: int) -> dict:
    """Run one target on random inputs from hypothesis; its runs, time and result."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    runs = [0]

    @settings(max_examples=examples, deadline=10_000, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=MAX_LEN[name]), st.sampled_from(seeds(name))))
    def fuzz(data):
        runs[0] += 1
        TARGETS[name](data)

    t0 = time.monotonic()
    try:
        fuzz()
        result = "no failure"
    except Exception as e:  # noqa: BLE001 - the finding itself: report it, go on
        result = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return {"target": name, "runs": runs[0], "seconds": round(time.monotonic() - t0), "result": result}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def machine() -> str:
    """One line about the machine the run was on."""
    import testkit  # here, not at the top: scalechat must be imported (instrumented) first
    return testkit.machine_line(testkit.machine())


def write_report(path: str, engine: str, command: str, rows: list) -> None:
    """Append one run's summary table to the Markdown report (created with a title)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = [] if os.path.exists(path) else [
        "# Fuzzing the protocol core", "",
        "Written by `bench/fuzz_protocol.py`, one section per run, newest last.", ""]
    lines += [f"## Run of {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}", "",
             f"- command: `{command}`",
             f"- machine: {machine()}",
             f"- engine: {engine}", "",
             "| target | runs | seconds | result |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {r['target']} | {r['runs']:,} | {r['seconds']} | {r['result']} |" for r in rows]
    lines += ["", f"Total: {sum(r['runs'] for r in rows):,} inputs.", ""]
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


def main() -> int:
    """Fuzz the chosen targets and write the report; exit 1 if any target failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("atheris", "hypothesis"), default=None,
                        help="default: atheris when installed")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: " + ", ".join(TARGETS))
    parser.add_argument("--seconds", type=int, default=120, help="atheris: seconds per target")
    parser.add_argument("--examples", type=int, default=100_000, help="hypothesis: inputs per target")
    parser.add_argument("--report", default=os.path.join(HERE, "results", "fuzz.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_atheris_child(args.child, args.seconds, args.workdir)
        return 0
    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    load_core(False)
    workdir = tempfile.mkdtemp(prefix="scalechat-fuzz-")
    rows = []
    try:
        for name in args.targets.split(","):
            row = run_atheris(name, args.seconds, workdir) if engine == "atheris" \
                else run_hypothesis(name, args.examples)
            print(f"{row['target']}: {row['runs']:,} runs in {row['seconds']} s: {row['result']}", flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_report(args.report, engine, "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
                 rows)
    return 0 if all(r["result"] == "no failure" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
