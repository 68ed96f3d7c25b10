#!/usr/bin/env python3
"""csvprocess.py: turn load-test event CSVs into latencies, delivery counts and summaries.

    python csvprocess.py                                    # the newest run folder in results/
    python csvprocess.py results/20261128-100000/          # a run folder
    python csvprocess.py 25x2.csv 50x8.csv.gz --out out/    # files, plain or gzip
    python csvprocess.py results/m1/ results/m2/           # the segments of one run, merged

Several files of one scenario must be every segment of one run (loadclient.py
--segment I/N, the same seed, rooms and start): they are read as one run, each
message expecting a delivery to every member of its room on whichever machine,
into <first folder>-merged/processed/. One segment read alone counts its own
senders' messages to its own members, as its load client's summary does.

Every input file is one scenario (its name without .csv / .csv.gz). The events
are read once, streaming, and each Received event is joined to its Sent event
by (sender_id, message_id) in a hash table. A message leaves the table as soon
as it has all its expected deliveries, so memory grows with the messages in
flight (and those never completed), not with the file. Two cases hold more:
receipts that come before their Sent row in the file wait for it, and when the
room sizes are unknown (no meta.json, or only a sample of clients recorded
receipts) every message waits until the end. Latencies themselves are kept
as flat 8-byte integers (24 bytes a delivery) for exact percentiles. Order
rows (a client's room began an order: its first, or a new one after the server
lost the room's state) are counted, never joined: a delivery is known by its
(sender_id, message_id), whatever the order its seq counts in.

Per scenario it writes into the output folder (default `<input folder>/processed/`):
latency_<s>.csv, sent-vs-received_<s>.csv, timeseries_<s>.csv, summary_<s>.json,
and prints a summary table. Exit status: 0 done, 2 bad input (one error line).
"""
from __future__ import annotations

import argparse
import codecs
import csv
import gzip
import json
import math
import re
import signal
import sys
import zlib
from array import array
from pathlib import Path

import numpy as np

from loadclient import EVENT_COLUMNS

__version__ = "1.0"

# ---------------------------------------------------------------------------
# The event format
# ---------------------------------------------------------------------------

# Column order written by loadclient.py; the first five are the original Go tool's. Files
# written before rooms had epochs lack the last column (epoch) and Order rows: both are read.
COLUMNS = EVENT_COLUMNS
REQUIRED = COLUMNS[:5]
SENT, RECEIVED, ORDER = "Sent", "Received", "Order"

# Percentiles in parts per million, so that nearest-rank indexes are exact integers.
SUMMARY_PERCENTILES = {"p10": 100_000, "p25": 250_000, "p50": 500_000, "p75": 750_000,
                       "p90": 900_000, "p95": 950_000, "p99": 990_000, "p99.9": 999_000,
                       "p99.99": 999_900}
SERIES_PERCENTILES = {"p50": 500_000, "p90": 900_000, "p99": 990_000}
# The latency-by-percentile curve for plots: 0, 25, 43.8, ... evenly spaced in "nines".
CURVE_PPM = sorted({round(1e6 * (1 - 10 ** (-i / 8))) for i in range(41)} | {1_000_000})

SCENARIO_NAME = re.compile(r"([0-9]+)x([0-9]+)")  # <rooms>x<room_size>
CHUNK_BYTES = 1 << 20
MAX_REPORTED_ROWS = 10       # malformed rows printed per file; all are counted
MAX_DENSE_SECONDS = 7 * 86400  # beyond this span the time series lists only busy seconds
csv.field_size_limit(2 * CHUNK_BYTES)  # a line is at most that long (see line_chunks)


class InputError(Exception):
    """Input that cannot be processed: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------
# Finding the inputs
# ---------------------------------------------------------------------------

def scenario_name(path: Path) -> str:
    """The scenario a file holds: its name without .csv or .csv.gz."""
    name = path.name
    for suffix in (".csv.gz", ".csv"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def scenario_key(name: str) -> tuple:
    """Sort key: fewer clients first (25x2, 25x4, 50x8, ...), other names after, by name."""
    match = SCENARIO_NAME.fullmatch(name)
    return (int(match.group(1)) * int(match.group(2)), int(match.group(1)), name) if match \
        else (math.inf, 0, name)


def event_files(folder: Path) -> list[Path]:
    """The *.csv and *.csv.gz files directly in folder."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".csv", ".csv.gz")))


def find_inputs(paths: list[str]) -> list[list[Path]]:
    """Event files named by paths (files as given, folders for their *.csv and *.csv.gz), one
    list per scenario: one file, or the files of every segment of one run (loadclient.py --segment)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = event_files(path)
            if not found:
                raise InputError(f"{path}: no .csv or .csv.gz event files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    scenarios: dict[str, list[Path]] = {}
    for path in files:
        same = scenarios.setdefault(scenario_name(path), [])
        if path in same:
            raise InputError(f"{path} is given twice")
        same.append(path)
    groups = [segments_of_one_run(name, same) if len(same) > 1 else same for name, same in scenarios.items()]
    return sorted(groups, key=lambda g: scenario_key(scenario_name(g[0])))


def output_folder(paths: list[str], out: str | None = None) -> Path:
    """Where outputs go: out, or processed/ beside (or inside) the first input; when the inputs
    are segments of one run, <first folder>-merged/processed/ beside the first folder."""
    if out:
        return Path(out)
    first = Path(paths[0])
    folder = first if first.is_dir() else first.parent
    if any(len(group) > 1 for group in find_inputs(paths)):
        return folder.parent / f"{folder.name}-merged" / "processed"
    return folder / "processed"


# ---------------------------------------------------------------------------
# Segments: one run's parts from several load machines (loadclient.py --segment)
# ---------------------------------------------------------------------------

# What every segment of one run has in common (the scenario name aside).
SAME_IN_EVERY_SEGMENT = ("seed", "rooms", "room_size", "room_prefix", "msg_interval_ms", "start_at",
                         "record_receivers")


def segment_of(meta: dict | None) -> tuple[int, int] | None:
    """(index, count) of a segmented run's part from its meta.json, None for a whole run."""
    segment = (meta or {}).get("segment")
    if not isinstance(segment, dict):
        return None
    index, count = segment.get("index"), segment.get("count")
    if not (isinstance(index, int) and isinstance(count, int) and 1 <= index <= count):
        return None
    return (index, count) if count > 1 else None


def segments_of_one_run(name: str, paths: list[Path]) -> list[Path]:
    """Several files of one scenario: every segment of one run, by index; else InputError."""
    metas = [load_meta(path) for path in paths]
    segments = [segment_of(meta) for meta in metas]
    for path, segment in zip(paths, segments):
        if segment is None:
            raise InputError(f"{paths[0]} and {path} are both scenario {name!r} but not segments of one run "
                             "(loadclient.py --segment): process them separately (with --out)")
    for key in ("count", *SAME_IN_EVERY_SEGMENT):
        values = [segment[1] if key == "count" else meta.get(key) for meta, segment in zip(metas, segments)]
        for path, value in zip(paths, values):
            if value != values[0]:
                what = "segment count" if key == "count" else key
                raise InputError(f"{paths[0]} and {path} are not segments of one run: {what} "
                                 f"{values[0]!r} and {value!r}")
    count = segments[0][1]
    by_index: dict[int, Path] = {}
    for path, (index, _) in zip(paths, segments):
        other = by_index.setdefault(index, path)
        if other != path:
            raise InputError(f"{other} and {path} are both segment {index}/{count} of scenario {name!r}")
    missing = [f"{i}/{count}" for i in range(1, count + 1) if i not in by_index]
    if missing:
        raise InputError(f"scenario {name!r}: segment {', '.join(missing)} missing: give every segment's "
                         "results, or process one segment alone")
    return [by_index[i] for i in sorted(by_index)]


def merged_meta(metas: list[dict]) -> dict:
    """One meta.json for the segments of one run: the whole scenario's clients, sends and span."""
    meta = {k: v for k, v in metas[0].items()
            if k not in ("summary", "settings", "segment", "server_url", "received", "errors", "start_late_s")}
    meta.update(
        clients=sum(m.get("clients") or 0 for m in metas), sent=sum(m.get("sent") or 0 for m in metas),
        start_us=min(m["start_us"] for m in metas) if all(isinstance(m.get("start_us"), int) for m in metas)
        else None,
        end_us=max((m.get("end_us") or 0 for m in metas), default=None),
        segments=[{"segment": f"{segment_of(m)[0]}/{segment_of(m)[1]}",
                   **{k: m.get(k) for k in ("server_url", "clients", "sent", "errors", "start_late_s")}}
                  for m in metas])
    return meta


def load_meta(path: Path) -> dict | None:
    """The scenario's <name>.meta.json beside its CSV, or None when absent or unreadable."""
    meta_path = path.with_name(scenario_name(path) + ".meta.json")
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        warn(f"{meta_path}: ignored, not readable JSON ({e})")
        return None
    if not isinstance(meta, dict):
        warn(f"{meta_path}: ignored, not a JSON object")
        return None
    return meta


def expected_deliveries(name: str, meta: dict | None) -> tuple[int | None, str]:
    """Deliveries each message should get (room size, sender included) and where that came from.

    None means unknown until every event is read: then each room's size is the
    number of distinct clients that received anything in it. That is also the
    case when only a sample of the clients recorded their receipts (meta.json
    record_receivers < 1)."""
    meta = meta or {}
    sample = meta.get("record_receivers", 1)
    if isinstance(sample, (int, float)) and sample < 1:
        return None, f"events (distinct receivers per room; a {sample:g} sample of clients recorded receipts)"
    segment = segment_of(meta)
    members = meta["segment"].get("room_members") if segment else None
    if isinstance(members, int) and members > 0:
        return members, f"meta.json segment room_members (segment {segment[0]}/{segment[1]} alone)"
    size = meta.get("room_size")
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size, "meta.json room_size"
    if size is not None:
        warn(f"{name}: meta.json room_size {size!r} is not a positive integer, ignored")
    match = SCENARIO_NAME.fullmatch(name)
    if match and int(match.group(2)) > 0:
        return int(match.group(2)), "scenario name <rooms>x<room_size>"
    return None, "events (distinct receivers per room)"


def warn(message: str) -> None:
    """Print a warning line on stderr."""
    print(f"csvprocess: warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------
# Reading event files: chunks of lines, header, row validation
# ---------------------------------------------------------------------------

class FileReport:
    """What reading one file found besides events: the dirty-input tally."""

    def __init__(self, path: Path):
        self.path = path
        self.header = "ok"          # ok | reordered | missing
        self.lines = 0
        self.blank_lines = 0
        self.malformed_rows = 0
        self.malformed_examples: list[dict] = []
        self.truncated_last_line = False
        self.read_error: str | None = None

    def malformed(self, line: int, reason: str) -> None:
        """Count a malformed row; print the first few with their line number."""
        self.malformed_rows += 1
        if self.malformed_rows <= MAX_REPORTED_ROWS:
            self.malformed_examples.append({"line": line, "reason": reason})
            warn(f"{self.path}:{line}: malformed row skipped: {reason}")

    def as_dict(self) -> dict:
        """The tally as JSON-ready values."""
        return {"file": str(self.path), "header": self.header, "lines": self.lines,
                "blank_lines": self.blank_lines, "malformed_rows": self.malformed_rows,
                "malformed_examples": self.malformed_examples,
                "truncated_last_line": self.truncated_last_line, "read_error": self.read_error}


def line_chunks(path: Path, report: FileReport):
    """Yield (lines, careful, is_tail) per chunk of whole lines.

    careful says the chunk holds a quote or a stray carriage return, which the
    fast path (csv.reader over the whole chunk) cannot be trusted with.

    is_tail marks the last line when the file does not end with a newline (a
    killed writer). Windows line ends are accepted; a gzip stream that ends early keeps every whole line before
    the cut. Undecodable bytes become U+FFFD, never an exception."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    carry = ""
    try:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as raw:
            while True:
                try:
                    data = raw.read1(CHUNK_BYTES)  # read1: what came before a cut is not lost
                except (EOFError, zlib.error) as e:
                    report.read_error = f"compressed stream ends early ({e}); read up to there"
                    report.truncated_last_line = report.truncated_last_line or bool(carry)
                    return
                if not data:
                    break
                if b"\0" in data:
                    raise InputError(f"{path}: not an event CSV (binary data)")
                text = carry + decoder.decode(data)
                if "\r" in text:
                    text = text.replace("\r\n", "\n")
                lines = text.split("\n")
                carry = lines.pop()
                if lines:
                    yield lines, '"' in text or "\r" in text, False
                elif len(carry) > CHUNK_BYTES:
                    raise InputError(f"{path}: not an event CSV (a line of more than "
                                     f"{CHUNK_BYTES} characters)")
    except gzip.BadGzipFile as e:
        raise InputError(f"{path}: not a gzip file ({e})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if carry:
        yield [carry], True, True


def split_fields(lines: list[str], careful: bool):
    """The fields of each line. Quotes (names with commas) and stray carriage returns
    are rare; there each line is parsed alone, so that an unbalanced quote cannot
    swallow the lines after it, and a line the csv module refuses is one field."""
    if not careful:
        return csv.reader(lines)
    return [parse_line(line) for line in lines]


def parse_line(line: str) -> list[str]:
    """The fields of one line, or the line as one field when it is not valid CSV."""
    try:
        return next(csv.reader((line,)), [])
    except csv.Error:
        return [line]


def detect_layout(fields: list[str], report: FileReport) -> tuple[tuple[int, ...], bool]:
    """Column indexes (COLUMNS order, -1 when absent) from the first line, and whether
    that line is a header; raises InputError when the file is not an event CSV at all."""
    names = [f.strip().lstrip("\ufeff").lower() for f in fields]
    if any(n in COLUMNS for n in names):
        missing = [c for c in REQUIRED if c not in names]
        if missing:
            raise InputError(f"{report.path}: not an event CSV: header lacks "
                             f"{', '.join(missing)} (expected {','.join(COLUMNS)})")
        present = [n for n in names if n in COLUMNS]
        if present != [c for c in COLUMNS if c in names]:
            report.header = "reordered"
        return tuple(names.index(c) if c in names else -1 for c in COLUMNS), True
    if 5 <= len(fields) <= len(COLUMNS) and fields[3] in (SENT, RECEIVED, ORDER) \
            and (fields[0].strip().isdigit() or fields[3] == ORDER) and fields[4].strip().lstrip("-").isdigit():
        report.header = "missing"
        warn(f"{report.path}: no header row; reading columns in the documented order "
             f"{','.join(COLUMNS[:len(fields)])}")
        return tuple(i if i < len(fields) else -1 for i in range(len(COLUMNS))), False
    raise InputError(f"{report.path}: not an event CSV: line 1 is neither the header "
                     f"{','.join(COLUMNS)} nor an event row")


def row_problem(fields: list[str], layout: tuple[int, ...]) -> str:
    """Why a row of the right width was refused (only called for refused rows)."""
    i_mid, _sender, _client, i_type, i_ts, _room, _seq, i_intended, i_epoch = layout
    kind = fields[i_type]
    if kind not in (SENT, RECEIVED, ORDER):
        return f"type must be Sent, Received or Order, not {kind[:40]!r}"
    checked = (("timestamp_us", i_ts),) if kind == ORDER else \
        (("message_id", i_mid), ("timestamp_us", i_ts), ("intended_us", i_intended))
    for name, index in checked:
        value = fields[index] if index >= 0 else ""
        if index >= 0 and (value or name != "intended_us"):
            try:
                int(value)
            except ValueError:
                return f"{name} is not an integer: {value[:40]!r}"
    if kind == ORDER and not (i_epoch >= 0 and fields[i_epoch]):
        return "an Order row without an epoch"
    return "empty sender_id or client_id"


def read_events(path: Path, join: Join, report: FileReport) -> None:
    """Stream every event of one file into join; dirty input goes to report."""
    width = 0  # fields per row, known once the first line is read
    lineno = 0
    layout: tuple[int, ...] = ()
    i_mid = i_sender = i_client = i_type = i_ts = i_room = i_intended = i_epoch = 0
    sent, received, order = join.sent, join.received, join.order
    for lines, careful, is_tail in line_chunks(path, report):
        for fields in split_fields(lines, careful):
            lineno += 1
            if len(fields) != width:
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    report.blank_lines += 1
                    continue
                if width:
                    if is_tail:
                        report.truncated_last_line = True
                    else:
                        report.malformed(lineno, f"expected {width} fields, got {len(fields)}")
                    continue
                width = len(fields)
                layout, is_header = detect_layout(fields, report)
                i_mid, i_sender, i_client, i_type, i_ts, i_room, _seq, i_intended, i_epoch = layout
                if i_epoch >= 0:
                    join.orders_known()
                if is_header:
                    continue
            try:
                kind = fields[i_type]
                sender = fields[i_sender]
                client = fields[i_client]
                if not (sender and client):
                    raise ValueError
                room = fields[i_room] if i_room >= 0 else ""
                if kind == RECEIVED:
                    received(client, sender, int(fields[i_mid]), int(fields[i_ts]), room)
                elif kind == SENT:
                    intended = fields[i_intended] if i_intended >= 0 else ""
                    sent(sender, int(fields[i_mid]), int(fields[i_ts]), room,
                         int(intended) if intended else None)
                elif kind == ORDER and i_epoch >= 0 and fields[i_epoch]:
                    int(fields[i_ts])
                    order(client, fields[i_epoch])
                else:
                    raise ValueError
            except ValueError:
                if is_tail:
                    report.truncated_last_line = True
                else:
                    report.malformed(lineno, row_problem(fields, layout))
    report.lines = lineno
    if width == 0:
        warn(f"{path}: empty, no events")


# ---------------------------------------------------------------------------
# Joining Received to Sent
# ---------------------------------------------------------------------------

class SentIds:
    """Which message_ids one sender has sent: 1..high except a few gaps (usually none)."""

    __slots__ = ("gaps", "high")

    def __init__(self):
        self.high = 0
        self.gaps: list[range] = []

    def add(self, mid: int) -> bool:
        """Record mid as sent; False when it had been sent before."""
        if mid > self.high:
            if mid > self.high + 1:
                self.gaps.append(range(self.high + 1, mid))
            self.high = mid
            return True
        for i, gap in enumerate(self.gaps):
            if mid in gap:
                self.gaps[i:i + 1] = [r for r in (range(gap.start, mid), range(mid + 1, gap.stop)) if r]
                return True
        return False

    def __contains__(self, mid: int) -> bool:
        return 0 < mid <= self.high and not any(mid in gap for gap in self.gaps)


class Join:
    """The hash join of one scenario: Sent events wait in `pending` for their deliveries.

    Latencies (received - sent, and received - intended for coordinated
    omission) are kept as flat integer arrays for exact percentiles; the latency
    and sent-vs-received rows are written as they become known."""

    def __init__(self, expected: int | None, latency_out, messages_out, lone_segment: bool = False):
        self.expected = expected
        # One segment of a run read alone: receipts of senders with no Sent row here are
        # the other segments' messages, not receipts without a send.
        self.lone_segment = lone_segment
        self.receipts_from_other_segments: int | None = None
        self.latency_out = latency_out
        self.messages_out = messages_out
        # (sender, message_id) -> [sent_us, origin_us, room, receivers]; origin_us is
        # the intended send time when known, else the actual one.
        self.pending: dict[tuple[str, int], list] = {}
        self.orphans: dict[tuple[str, int], list[tuple[str, int, str]]] = {}
        self.senders: dict[str, SentIds] = {}
        self.members: dict[str, set[str]] = {}  # room -> receivers, only while expected is unknown
        self.sent_us = array("q")
        # per delivery: received_us, latency_us, latency from intended send time (us)
        self.deliveries = array("q")
        self.with_intended = 0
        self.duplicate_sends = 0
        self.duplicate_receipts = 0
        self.deliveries_expected = 0
        self.lost = 0
        self.incomplete = 0
        self.never_received = 0
        self.receipts_without_send = 0
        # Order rows: the epoch each recording client counts in, and how often one saw its
        # room's order begin again; None for files of the format before epochs.
        self.epochs: dict[str, str] = {}
        self.orders_restarted: int | None = None

    def orders_known(self) -> None:
        """The file has an epoch column: its clients' Order rows are counted."""
        if self.orders_restarted is None:
            self.orders_restarted = 0

    def order(self, client: str, epoch: str) -> None:
        """An Order event: client's room began the order epoch (its first, or a new one after the
        server lost the room's state). Deliveries are joined by (sender, message_id), whatever the order."""
        if self.epochs.get(client, epoch) != epoch:
            self.orders_restarted += 1
        self.epochs[client] = epoch

    def sent(self, sender: str, mid: int, ts: int, room: str, intended: int | None) -> None:
        """A Sent event."""
        ids = self.senders.get(sender)
        if ids is None:
            ids = self.senders[sender] = SentIds()
        if mid == ids.high + 1:  # the usual case, inline: SentIds.add is the general one
            ids.high = mid
        elif not ids.add(mid):
            self.duplicate_sends += 1
            return
        if intended is None:
            intended = ts
        else:
            self.with_intended += 1
        key = (sender, mid)
        self.pending[key] = [ts, intended, room, set()]
        self.sent_us.append(ts)
        if self.orphans and key in self.orphans:
            for client, rts, rroom in self.orphans.pop(key):
                self.received(client, sender, mid, rts, rroom)

    def received(self, client: str, sender: str, mid: int, ts: int, room: str) -> None:
        """A Received event."""
        key = (sender, mid)
        entry = self.pending.get(key)
        if entry is None:
            ids = self.senders.get(sender)
            if ids is not None and mid in ids:  # sent, and already has all its deliveries
                self.duplicate_receipts += 1
            else:  # its Sent may still come later in the file (worker parts written one after another)
                self.orphans.setdefault(key, []).append((sys.intern(client), ts, sys.intern(room)))
            return
        receivers = entry[3]
        if client in receivers:
            self.duplicate_receipts += 1
            return
        receivers.add(client)
        sent_us = entry[0]
        latency = ts - sent_us
        latency_intended = ts - entry[1]
        self.deliveries.extend((ts, latency, latency_intended))
        self.latency_out.write(f"{mid},{sender},{client},{sent_us},{ts},{latency},{latency_intended}\n")
        if self.expected is None:
            self.members.setdefault(room, set()).add(client)
        elif len(receivers) >= self.expected:
            del self.pending[key]
            self._retire(key, entry, self.expected)

    def _retire(self, key: tuple[str, int], entry: list, expected: int) -> None:
        got = len(entry[3])
        self.messages_out.write(f"{key[1]},{key[0]},{entry[2]},{entry[0]},{got},{expected}\n")
        self.deliveries_expected += expected
        if got < expected:
            self.lost += expected - got
            self.incomplete += 1
            self.never_received += got == 0

    def finish(self) -> None:
        """Settle the messages still waiting: they are short of deliveries (or all are, when
        the room sizes were unknown until now)."""
        for key, entry in self.pending.items():
            expected = self.expected or len(self.members.get(entry[2], ()))
            self._retire(key, entry, max(expected, len(entry[3])))
        self.pending.clear()
        self.receipts_without_send = sum(len(waiting) for waiting in self.orphans.values())
        if self.lone_segment:
            self.receipts_from_other_segments = sum(len(waiting) for (sender, _), waiting in self.orphans.items()
                                                    if sender not in self.senders)
            self.receipts_without_send -= self.receipts_from_other_segments
        self.orphans.clear()


# ---------------------------------------------------------------------------
# Statistics: exact nearest-rank percentiles and the per-second series
# ---------------------------------------------------------------------------

def rank_index(count, ppm):
    """0-based index of the nearest-rank percentile (ppm parts per million) among count values."""
    return np.maximum((np.asarray(count, dtype=np.int64) * ppm + 999_999) // 1_000_000 - 1, 0)


def latency_stats(values: np.ndarray) -> dict | None:
    """count, min, mean, stddev (population), percentiles, max and the percentile curve, in us."""
    if values.size == 0:
        return None
    ordered = np.sort(values)
    n = ordered.size
    stats = {"count": int(n), "min": int(ordered[0]), "mean": float(ordered.mean()),
             "stddev": float(ordered.std())}
    stats.update({name: int(ordered[rank_index(n, ppm)]) for name, ppm in SUMMARY_PERCENTILES.items()})
    stats["max"] = int(ordered[-1])
    stats["curve"] = [[ppm / 1e4, int(ordered[rank_index(n, ppm)])] for ppm in CURVE_PPM]
    return stats


def per_second(secs: np.ndarray, values: np.ndarray, seconds: np.ndarray) -> dict:
    """Nearest-rank p50/p90/p99 of values grouped by secs, for each of seconds (-1: none)."""
    order = np.lexsort((values, secs))
    secs, values = secs[order], values[order]
    del order  # the largest temporary: free it before the next one
    busy, start, count = np.unique(secs, return_index=True, return_counts=True)
    where = np.searchsorted(seconds, busy)
    out = {}
    for name, ppm in SERIES_PERCENTILES.items():
        column = np.full(seconds.size, -1, dtype=np.int64)
        column[where] = values[start + rank_index(count, ppm)]
        out[name] = column
    return out


def time_series(sent: np.ndarray, received: np.ndarray, latencies: dict[str, np.ndarray],
                t0: int) -> list[dict]:
    """Per second since t0: messages sent, deliveries, and latency percentiles of the
    deliveries received in that second (-1 when none), for each latency kind given."""
    if sent.size + received.size == 0:
        return []
    # seconds fit 32 bits (68 years); the per-delivery arrays are what costs memory here
    sent_s = ((sent - t0) // 1_000_000).astype(np.int32)
    received_s = ((received - t0) // 1_000_000).astype(np.int32)
    lo = int(min(a.min() for a in (sent_s, received_s) if a.size))
    hi = int(max(a.max() for a in (sent_s, received_s) if a.size))
    if hi - lo <= MAX_DENSE_SECONDS:
        seconds = np.arange(lo, hi + 1)
    else:
        warn(f"timestamps span {(hi - lo) / 86400:.0f} days: the time series lists only busy seconds")
        seconds = np.union1d(sent_s, received_s)
    columns = {"second": seconds,
               "sent": np.bincount(np.searchsorted(seconds, sent_s), minlength=seconds.size),
               "delivered": np.bincount(np.searchsorted(seconds, received_s), minlength=seconds.size)}
    for prefix, values in latencies.items():
        columns.update({f"{prefix}{k}_us": v for k, v in per_second(received_s, values, seconds).items()})
    names = list(columns)
    return [dict(zip(names, row)) for row in zip(*(c.tolist() for c in columns.values()))]


# ---------------------------------------------------------------------------
# One scenario, start to end
# ---------------------------------------------------------------------------

LATENCY_HEADER = "message_id,sender_id,receiver_id,sent_us,received_us,latency_us,latency_intended_us\n"
MESSAGES_HEADER = "message_id,sender_id,room,sent_us,received,expected\n"


def process_file(paths: list[Path], out_dir: Path) -> dict:
    """Read one scenario's file (or its segments' files, as one run), write its four outputs into
    out_dir, return its summary."""
    name = scenario_name(paths[0])
    metas = [load_meta(path) for path in paths]
    meta = merged_meta(metas) if len(paths) > 1 else metas[0]
    expected, expected_from = expected_deliveries(name, meta)
    reports = [FileReport(path) for path in paths]
    with open(out_dir / f"latency_{name}.csv", "w", encoding="utf-8", buffering=CHUNK_BYTES) as lat_out, \
            open(out_dir / f"sent-vs-received_{name}.csv", "w", encoding="utf-8",
                 buffering=CHUNK_BYTES) as msg_out:
        lat_out.write(LATENCY_HEADER)
        msg_out.write(MESSAGES_HEADER)
        join = Join(expected, lat_out, msg_out, lone_segment=segment_of(meta) is not None)
        # A segment's receipts of the later segments' messages wait for their Sent rows.
        for path, report in zip(paths, reports):
            read_events(path, join, report)
        join.finish()
    sent = np.frombuffer(join.sent_us, dtype=np.int64)
    received, latency, latency_intended = np.frombuffer(join.deliveries, dtype=np.int64).reshape(-1, 3).T
    busy = [a for a in (sent, received) if a.size]
    first = min(int(a.min()) for a in busy) if busy else None
    last = max(int(a.max()) for a in busy) if busy else None
    start = meta.get("start_us") if meta and isinstance(meta.get("start_us"), int) else first
    latencies = {"": latency, "intended_": latency_intended} if join.with_intended else {"": latency}
    duration = (last - first) / 1e6 if busy and last > first else None
    summary = {
        "scenario": name,
        "tool": f"csvprocess.py {__version__}",
        "meta": meta,
        "expected_per_message": expected,
        "expected_from": expected_from,
        "messages": sent.size,
        "deliveries_expected": join.deliveries_expected,
        "deliveries_received": received.size,
        "delivery_ratio": received.size / join.deliveries_expected if join.deliveries_expected else None,
        "lost": join.lost,
        "duplicated": join.duplicate_sends + join.duplicate_receipts,
        "duplicate_sends": join.duplicate_sends,
        "duplicate_receipts": join.duplicate_receipts,
        "receipts_without_send": join.receipts_without_send,
        "receipts_from_other_segments": join.receipts_from_other_segments,
        "messages_incomplete": join.incomplete,
        "messages_never_received": join.never_received,
        "messages_with_intended": join.with_intended,
        "orders_restarted": join.orders_restarted,
        "latency_us": latency_stats(latency),
        "latency_intended_us": latency_stats(latency_intended) if join.with_intended else None,
        "start_us": start,
        "first_event_us": first,
        "last_event_us": last,
        "duration_s": duration,
        "messages_per_s": sent.size / duration if duration else None,
        "deliveries_per_s": received.size / duration if duration else None,
        "input": input_tally(reports),
    }
    write_csv(out_dir / f"timeseries_{name}.csv", time_series(sent, received, latencies, start or 0))
    (out_dir / f"summary_{name}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def input_tally(reports: list[FileReport]) -> dict:
    """The dirty-input tally of a scenario's file, or of its segments' files added up."""
    found = [report.as_dict() for report in reports]
    if len(found) == 1:
        return found[0]
    tally = {"file": [f["file"] for f in found],
             "header": next((f["header"] for f in found if f["header"] != "ok"), "ok"),
             "malformed_examples": [dict(example, file=f["file"]) for f in found for example in f["malformed_examples"]],
             "truncated_last_line": any(f["truncated_last_line"] for f in found),
             "read_error": "; ".join(f"{f['file']}: {f['read_error']}" for f in found if f["read_error"]) or None}
    tally.update({key: sum(f[key] for f in found) for key in ("lines", "blank_lines", "malformed_rows")})
    return tally


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write dict rows as CSV with a header (an empty file when there are none)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def process(paths: list[str], out: str | None = None) -> list[dict]:
    """Process every scenario named by paths into out (default: processed/ beside the input)."""
    groups = find_inputs(paths)
    out_dir = output_folder(paths, out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out_dir}: cannot create output folder ({e.strerror or e})") from None
    return [process_file(group, out_dir) for group in groups]


# ---------------------------------------------------------------------------
# The printed summary table
# ---------------------------------------------------------------------------

def _ms(stats: dict | None, key: str) -> str:
    return "-" if stats is None else f"{stats[key] / 1000:.2f}"


def _count(value) -> str:
    return "-" if value is None else f"{value:,}"


def table_rows(summary: dict) -> list[tuple[str, str]]:
    """(label, value) rows of one scenario's column in the printed table."""
    lat, co = summary["latency_us"], summary["latency_intended_us"]
    ratio = summary["delivery_ratio"]
    rate = summary["deliveries_per_s"]
    rows = [
        ("messages sent", _count(summary["messages"])),
        ("deliveries expected", _count(summary["deliveries_expected"])),
        ("deliveries received", _count(summary["deliveries_received"])),
        ("delivery ratio", "-" if ratio is None else f"{ratio:.4f}"),
        ("lost deliveries", _count(summary["lost"])),
        ("duplicated events", _count(summary["duplicated"])),
        ("receipts without send", _count(summary["receipts_without_send"])),
        ("orders restarted", _count(summary["orders_restarted"])),
        *([("from other segments", _count(summary["receipts_from_other_segments"]))]
          if summary.get("receipts_from_other_segments") is not None else []),
        ("latency mean ms", _ms(lat, "mean")),
        ("latency stddev ms", _ms(lat, "stddev")),
    ]
    rows += [(f"latency {p} ms", _ms(lat, p)) for p in (*SUMMARY_PERCENTILES, "max")]
    if co is not None:
        rows += [(f"from intended {p} ms", _ms(co, p)) for p in ("p50", "p99", "p99.9", "max")]
    rows += [("messages/s", "-" if summary["messages_per_s"] is None else f"{summary['messages_per_s']:,.1f}"),
             ("deliveries/s", "-" if rate is None else f"{rate:,.1f}"),
             ("expected from", summary["expected_from"].split(" ")[0])]
    return rows


def format_table(summaries: list[dict]) -> str:
    """One column per scenario, one row per measure."""
    columns = [table_rows(s) for s in summaries]
    labels = [label for label, _ in max(columns, key=len)]
    cells = [dict(c) for c in columns]
    heads = [s["scenario"] for s in summaries]
    widths = [max(len(h), *(len(v) for _, v in c)) for h, c in zip(heads, columns)]
    lw = max(len("scenario"), *(len(label) for label in labels))
    lines = ["scenario".ljust(lw) + "".join(f"  {h:>{w}}" for h, w in zip(heads, widths))]
    for label in labels:
        lines.append(label.ljust(lw) + "".join(f"  {c.get(label, '-'):>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


def input_notes(summary: dict) -> list[str]:
    """Lines that name the dirty input found in one scenario (none for clean input)."""
    found = summary["input"]
    notes = []
    if found["header"] != "ok":
        notes.append(f"header {found['header']}")
    for key in ("blank_lines", "malformed_rows"):
        if found[key]:
            notes.append(f"{found[key]} {key.replace('_', ' ')}")
    if found["truncated_last_line"]:
        notes.append("truncated last line dropped")
    if found["read_error"]:
        notes.append(found["read_error"])
    for key in ("duplicate_sends", "duplicate_receipts", "receipts_without_send",
                "messages_never_received"):
        if summary[key]:
            notes.append(f"{summary[key]} {key.replace('_', ' ')}")
    return notes


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def newest_run(results: Path) -> Path:
    """The run folder in results whose event files were written last."""
    runs = [d for d in results.iterdir() if d.is_dir() and event_files(d)] if results.is_dir() else []
    if not runs:
        raise InputError(f"no run folder with event CSVs in {results}/: run "
                         "`python loadclient.py --load-test` first, or name a folder")
    return max(runs, key=lambda d: max(p.stat().st_mtime for p in event_files(d)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        prog="csvprocess.py",
        description="Turn load-test event CSVs into latencies, sent-vs-received counts and summaries.")
    parser.add_argument("inputs", nargs="*", metavar="PATH",
                        help="event CSV files (.csv or .csv.gz) or run folders holding them "
                             "(default: the newest run folder in --results)")
    parser.add_argument("--results", type=Path, default=Path("results"),
                        help="where runs are looked for without PATH (default: results)")
    parser.add_argument("--out", metavar="DIR",
                        help="output folder (default: processed/ in the run folder, or beside the file)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = parse_args(argv)
    try:
        args.inputs = args.inputs or [str(newest_run(args.results))]
        summaries = process(args.inputs, args.out)
    except InputError as e:
        print(f"csvprocess: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"csvprocess: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(format_table(summaries))
    for summary in summaries:
        notes = input_notes(summary)
        if notes:
            print(f"{summary['scenario']}: " + "; ".join(notes))
        print(f"{summary['scenario']}: expected deliveries from {summary['expected_from']}")
        segments = (summary["meta"] or {}).get("segments")
        if segments:
            print(f"{summary['scenario']}: segments {', '.join(s['segment'] for s in segments)} merged into one run")
    print(f"outputs in {output_folder(args.inputs, args.out)}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # `| head` ends quietly, like other tools
    sys.exit(main())
