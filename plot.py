#!/usr/bin/env python3
"""plot.py: matplotlib figures of a load-test run, headless.

    python plot.py                         # the newest run folder in results/
    python plot.py results/20261128-100000 [--out DIR] [--format png|svg] [--log]
    python plot.py results/m1 results/m2   # the segments of one run (loadclient.py --segment), merged

Reads the run's processed/ outputs (running csvprocess.py first when they are
missing or older than the event files) and draws:

- latency-percentiles: latency by percentile, one panel per scenario, shared axis
- latency-mean: mean latency with its spread (stddev, p50, p99) per scenario
- delivery: expected vs received deliveries and the delivery ratio per scenario
- latency-over-time_<scenario>: p50/p90/p99 per second, message rate on a second axis

Figures go to <run>/plots/ unless --out says otherwise (for segments, to
<first folder>-merged/plots/ beside csvprocess.py's merged processed/); their
paths are printed.

    python plot.py bench/results/connections-1000000.csv

draws a many-connections run of bench/bench_connections.py (its samples, one
row a second): connections, memory, and handshake and message p99 over the
ramp, the quiet hold and the chat, as <name>-ramp.png beside the CSV.

    python plot.py --prometheus http://localhost:9090 [RUN]

draws the run as the server saw it, as server-view.png: the clients' latency
over time on top, then the Grafana dashboard's (monitoring/grafana/dashboards/
scalechat.json) broadcast latency, open connections, CPU and resident memory
panels, their queries read from the dashboard and evaluated by that Prometheus
over the run's minutes (from its meta.json, 10 s more on each side), on one
wall-clock axis. $__rate_interval is what Grafana makes it: max(step + scrape
interval, 4 x scrape interval), the scrape interval of the job "chat" as
Prometheus reports it (5 s, the stack's, when it does not).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display, same output everywhere
import matplotlib.pyplot as plt  # after choosing the backend
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

import csvprocess

DPI = 100
WIDE = (11.0, 6.0)                 # inches: single-panel figures
PANEL = (3.6, 3.2)                 # inches per panel in the percentile grid
MAX_COLUMNS = 4                    # panels per row in the percentile grid
NINES = (0, 90, 99, 99.9, 99.99, 99.999)
COLORS = {"p50": "tab:blue", "p90": "tab:orange", "p99": "tab:red", "intended": "tab:purple",
          "rate": "0.55", "expected": "tab:gray", "received": "tab:green"}

plt.rcParams.update({"figure.dpi": DPI, "savefig.dpi": DPI, "font.size": 10,
                     "axes.grid": True, "grid.alpha": 0.3, "axes.titlesize": 11})


class PlotError(Exception):
    """A run that cannot be plotted: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------
# Finding a run and its processed data
# ---------------------------------------------------------------------------

def processed_folder(runs: list[Path]) -> Path:
    """The folder with summary_*.json for a run (or for the segments of one run, merged), made
    (or remade) by csvprocess when needed."""
    run = runs[0]
    if len(runs) == 1 and list(run.glob("summary_*.json")):  # run is itself a processed folder
        return run
    files = [f for r in runs for f in csvprocess.event_files(r)]
    if not files:
        if len(runs) == 1 and list((run / "processed").glob("summary_*.json")):  # e.g. a merged run
            return run / "processed"
        raise PlotError(f"{run}: no event CSVs and no processed summaries here")
    processed = csvprocess.output_folder([str(r) for r in runs])
    done = [processed / f"summary_{csvprocess.scenario_name(f)}.json" for f in files]
    if any(not s.exists() or s.stat().st_mtime < f.stat().st_mtime for f, s in zip(files, done)):
        print(f"processing {' '.join(map(str, runs))} with csvprocess.py ...")
        summaries = csvprocess.process([str(r) for r in runs], str(processed))
        print(csvprocess.format_table(summaries))
    return processed


def load_run(processed: Path) -> list[dict]:
    """Every scenario summary of a processed folder, each with its time series under 'series'."""
    summaries = []
    for path in processed.glob("summary_*.json"):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
            series_path = processed / f"timeseries_{summary['scenario']}.csv"
            with open(series_path, newline="", encoding="utf-8") as f:
                summary["series"] = [{k: int(v) for k, v in row.items()} for row in csv.DictReader(f)]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PlotError(f"{path}: not a csvprocess.py summary with its time series ({e})") from None
        summaries.append(summary)
    if not summaries:
        raise PlotError(f"{processed}: no summary_*.json")
    return sorted(summaries, key=lambda s: csvprocess.scenario_key(s["scenario"]))


# ---------------------------------------------------------------------------
# Figure helpers
# ---------------------------------------------------------------------------

def label(summary: dict) -> str:
    """A scenario's name with its client count."""
    meta = summary.get("meta") or {}
    clients = meta.get("clients")
    return f"{summary['scenario']} ({clients:,} clients)" if clients else summary["scenario"]


def latency_axis(ax, log: bool) -> None:
    """Milliseconds on a linear or log y axis, with plain tick labels."""
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def count_axis(axis) -> None:
    """Whole numbers with thousands separators (no repeated labels on small ranges)."""
    axis.set_major_locator(MaxNLocator(integer=True))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))


def nines(p: float) -> float:
    """Percentile -> position on an axis that gives each extra nine the same width."""
    return -math.log10(1 - min(p, 99.999) / 100)


def save(fig, out: Path, name: str, fmt: str) -> Path:
    """Write fig as out/name.fmt and close it."""
    path = out / f"{name}.{fmt}"
    fig.savefig(path, format=fmt)
    plt.close(fig)
    return path


def no_data(ax, what: str) -> None:
    """Mark a panel with nothing to draw, so it is not mistaken for a broken plot."""
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes, color="0.4")


# ---------------------------------------------------------------------------
# The figures
# ---------------------------------------------------------------------------

def percentile_grid(summaries: list[dict], log: bool):
    """Latency by percentile, one panel per scenario, all on the same latency axis."""
    n = len(summaries)
    cols = min(n, MAX_COLUMNS)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, sharey=True, squeeze=False, layout="constrained",
                             figsize=(PANEL[0] * cols + 0.6, PANEL[1] * rows + 0.8))
    for ax, summary in zip(axes.flat, summaries):
        ax.set_title(label(summary))
        for key, name, style in (("latency_us", "from actual send", "-"),
                                 ("latency_intended_us", "from intended send", "--")):
            stats = summary.get(key)
            if stats:
                curve = [(nines(p), v / 1000) for p, v in stats["curve"] if p < 100]
                ax.plot(*zip(*curve), style, label=name, lw=1.6,
                        color=COLORS["p50"] if style == "-" else COLORS["intended"])
        if not summary.get("latency_us"):
            no_data(ax, "deliveries")
        ax.xaxis.set_major_locator(FixedLocator([nines(p) for p in NINES]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * (1 - 10 ** -v):.6g}"))
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.set_xlim(0, nines(99.999))
        latency_axis(ax, log)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("latency (ms)")
    for ax in axes[-1, :]:
        ax.set_xlabel("percentile (%)")
    handles, names = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncols=2)
    fig.suptitle("Latency by percentile")
    return fig


def mean_spread(summaries: list[dict], log: bool):
    """Mean latency with +-1 stddev per scenario, p50 and p99 beside it."""
    fig, ax = plt.subplots(figsize=WIDE, layout="constrained")
    x = range(len(summaries))
    stats = [s.get("latency_us") for s in summaries]
    shown = [(i, st) for i, st in zip(x, stats) if st]
    if shown:
        xs = [i for i, _ in shown]
        mean = [st["mean"] / 1000 for _, st in shown]
        low = [min(st["stddev"], st["mean"] - st["min"]) / 1000 for _, st in shown]  # not below min
        high = [st["stddev"] / 1000 for _, st in shown]
        ax.errorbar(xs, mean, yerr=[low, high], fmt="o", capsize=6, color=COLORS["p50"],
                    ms=7, label="mean \u00b1 1 stddev")
        ax.plot(xs, [st["p50"] / 1000 for _, st in shown], "_", ms=18, mew=2, color=COLORS["p90"],
                label="p50")
        ax.plot(xs, [st["p99"] / 1000 for _, st in shown], "v", ms=7, color=COLORS["p99"], label="p99")
        ax.legend(loc="upper left")
    else:
        no_data(ax, "deliveries")
    ax.set_xticks(list(x), [label(s) for s in summaries], rotation=20 if len(summaries) > 4 else 0,
                  ha="right" if len(summaries) > 4 else "center")
    ax.set_xlim(-0.6, len(summaries) - 0.4)
    ax.set_xlabel("scenario (rooms x room size)")
    ax.set_ylabel("latency (ms)")
    latency_axis(ax, log)
    ax.set_title("Mean latency and spread per scenario")
    return fig


def delivery(summaries: list[dict]):
    """Expected vs received deliveries (left) and the delivery ratio (right) per scenario."""
    fig, (counts, ratio) = plt.subplots(1, 2, figsize=WIDE, layout="constrained")
    x = list(range(len(summaries)))
    names = [s["scenario"] for s in summaries]
    expected = [s["deliveries_expected"] for s in summaries]
    received = [s["deliveries_received"] for s in summaries]
    counts.bar([i - 0.2 for i in x], expected, 0.4, label="expected", color=COLORS["expected"])
    counts.bar([i + 0.2 for i in x], received, 0.4, label="received", color=COLORS["received"])
    nonzero = [v for v in expected + received if v]
    if nonzero and max(nonzero) > 20 * min(nonzero):  # small scenarios would be invisible
        counts.set_yscale("log")
        counts.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    else:
        count_axis(counts.yaxis)
    counts.set_xticks(x, names, rotation=30 if len(x) > 4 else 0)
    counts.set_xlabel("scenario (rooms x room size)")
    counts.set_ylabel("deliveries (messages x members)")
    counts.set_title("Deliveries: expected vs received")
    counts.legend(loc="upper left")
    ratios = [(i, 100 * s["delivery_ratio"], s["lost"]) for i, s in zip(x, summaries)
              if s["delivery_ratio"] is not None]
    if ratios:
        ratio.plot([i for i, _, _ in ratios], [r for _, r, _ in ratios], "o", ms=8, color=COLORS["received"])
        for i, r, lost in ratios:
            ratio.annotate(f"{r:.2f}%\n{lost:,} lost", (i, r), textcoords="offset points", xytext=(0, 8),
                           ha="center", va="bottom", fontsize=8)
        lowest = min(r for _, r, _ in ratios)
        pad = max(0.5, 0.15 * (100 - lowest))  # zoom in on what is lost, room for the labels
        ratio.set_ylim(lowest - pad, 100 + pad)
    else:
        no_data(ratio, "expected deliveries")
    ratio.axhline(100, color="0.6", lw=0.8, ls=":")
    ratio.set_xticks(x, names, rotation=30 if len(x) > 4 else 0)
    ratio.set_xlim(-0.6, len(x) - 0.4)
    ratio.set_xlabel("scenario (rooms x room size)")
    ratio.set_ylabel("delivery ratio (% of expected)")
    ratio.set_title("Delivery ratio")
    fig.suptitle("Sent vs received")
    return fig


LATENCY_LINES = (("p50_us", "p50", COLORS["p50"], "-"), ("p90_us", "p90", COLORS["p90"], "-"),
                 ("p99_us", "p99", COLORS["p99"], "-"),
                 ("intended_p99_us", "p99 from intended send", COLORS["intended"], "--"))


def latency_lines(ax, series: list[dict], offset: float = 0.0, labels: bool = True) -> bool:
    """p50/p90/p99 latency (ms) of each second of a time series, at offset + second on ax;
    whether anything was drawn."""
    drawn = False
    for key, name, color, style in LATENCY_LINES:
        if series and key in series[0]:
            points = [(offset + row["second"], row[key] / 1000) for row in series if row[key] >= 0]
            if points:
                ax.plot(*zip(*points), style, color=color, lw=1.3, label=name if labels else None)
                drawn = True
    return drawn


def over_time(summary: dict, log: bool):
    """p50/p90/p99 latency per second (by receive time), and the message rates behind them."""
    fig, ax = plt.subplots(figsize=WIDE, layout="constrained")
    series = summary["series"]
    t = [row["second"] for row in series]
    rate = ax.twinx()
    rate.plot(t, [row["delivered"] for row in series], color=COLORS["rate"], lw=1, ls=":",
              label="deliveries/s (right axis)")
    rate.plot(t, [row["sent"] for row in series], color=COLORS["rate"], lw=1,
              label="messages sent/s (right axis)")
    rate.set_ylabel("messages per second")
    rate.set_ylim(0, max([row["delivered"] for row in series] + [1]) * 1.1)
    rate.grid(False)
    count_axis(rate.yaxis)
    if not latency_lines(ax, series):
        no_data(ax, "deliveries")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("latency (ms), by second of receipt")
    latency_axis(ax, log)
    if not log:
        ax.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()
    more = rate.get_legend_handles_labels()
    fig.legend(handles[0] + more[0], handles[1] + more[1], loc="outside lower center", ncols=6, fontsize=9)
    ax.set_title(f"Latency over time: {label(summary)}")
    return fig


RAMP_COLUMNS = ("t", "phase", "connections", "server_rss_mib", "loadclient_rss_mib", "kernel_slab_mib",
                "mem_used_mib", "p99_ms", "connect_p99_ms")
PHASE_COLORS = {"ramp": "tab:blue", "hold": "tab:green", "send": "tab:orange"}


def load_samples(path: Path) -> list[dict]:
    """The per-second samples of bench/bench_connections.py (connections-<N>.csv)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(RAMP_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise PlotError(f"{path}: not a bench_connections.py sample file (no {', '.join(sorted(missing))})")
        rows = [{k: (v if k == "phase" else float(v)) for k, v in row.items()} for row in reader]
    if not rows:
        raise PlotError(f"{path}: no samples")
    return rows


def ramp(rows: list[dict], name: str):
    """Connections, memory and p99 (handshakes, messages) over a many-connections run."""
    fig, (conn, mem, lat) = plt.subplots(3, 1, figsize=(11.0, 9.0), sharex=True, layout="constrained")
    t = [r["t"] for r in rows]
    start = 0
    for i in range(1, len(rows) + 1):               # shade each phase
        if i == len(rows) or rows[i]["phase"] != rows[start]["phase"]:
            color = PHASE_COLORS.get(rows[start]["phase"])
            if color:
                for ax in (conn, mem, lat):
                    ax.axvspan(t[start], t[i - 1], color=color, alpha=0.07, lw=0)
                conn.annotate(rows[start]["phase"], ((t[start] + t[i - 1]) / 2, 0), xycoords=("data", "axes fraction"),
                              xytext=(0, 4), textcoords="offset points", ha="center", color=color, fontsize=9)
            start = i
    conn.plot(*zip(*[(r["t"], r["connections"]) for r in rows if r["connections"] >= 0]), color="tab:blue", lw=1.5)
    conn.set_ylabel("open connections")
    conn.set_ylim(bottom=0)
    count_axis(conn.yaxis)
    for key, text, color in (("mem_used_mib", "machine in use", "0.3"), ("kernel_slab_mib", "kernel slab", "tab:purple"),
                             ("loadclient_rss_mib", "load client RSS", "tab:green"),
                             ("server_rss_mib", "server RSS", "tab:red")):
        mem.plot(t, [r[key] / 1024 for r in rows], color=color, lw=1.3, label=text)
    mem.set_ylabel("memory (GiB)")
    mem.set_ylim(bottom=0)
    mem.legend(loc="upper left", fontsize=9)
    for key, text, color in (("connect_p99_ms", "handshake p99 (last 5 s)", "tab:blue"),
                             ("p99_ms", "message p99 (last 5 s)", COLORS["p99"])):
        points = [(r["t"], r[key]) for r in rows if r[key] > 0]
        if points:
            lat.plot(*zip(*points), color=color, lw=1.3, label=text)
    latency_axis(lat, log=True)
    lat.set_ylabel("p99 (ms)")
    lat.set_xlabel("time since the load client started (s)")
    lat.legend(loc="upper left", fontsize=9)
    conn.set_title(f"Connections, memory and p99 over the run: {name}")
    return fig


def plot_samples(path: Path, out: Path | None = None, fmt: str = "png") -> list[Path]:
    """Draw the ramp figure of a bench_connections.py sample file."""
    rows = load_samples(path)
    out = out or path.parent
    out.mkdir(parents=True, exist_ok=True)
    return [save(ramp(rows, path.stem), out, f"{path.stem}-ramp", fmt)]


# ---------------------------------------------------------------------------
# The server's view: the dashboard's own queries, asked of Prometheus for a run's minutes
# ---------------------------------------------------------------------------

DASHBOARD = Path(__file__).resolve().parent / "monitoring" / "grafana" / "dashboards" / "scalechat.json"
# The dashboard's panels drawn under the client's latency: (title in the dashboard, y label).
SERVER_PANELS = (("Broadcast latency", "broadcast latency (ms)"), ("Open connections", "open connections"),
                 ("CPU", "CPU (cores)"), ("Resident memory", "resident memory (MiB)"))
UNIT_FACTORS = {"s": 1e3, "bytes": 2 ** -20}   # a panel's Grafana unit -> the y label's unit
DEFAULT_SCRAPE_S = 5.0     # the datasource's timeInterval, when Prometheus does not tell its own
MAX_POINTS = 300           # per series: the step is the window / MAX_POINTS, at least 1 s
PROMETHEUS_TIMEOUT_S = 10.0
PROMETHEUS_URL = re.compile(r"\Ahttps?://(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
                            r"(?::(\d{1,5}))?(?:/[\w.~-]+)*/?\Z", re.ASCII)
GRAFANA_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def prometheus_url(text: str) -> str:
    """A Prometheus base URL, http(s)://HOST[:PORT][/PATH], without its trailing slash."""
    match = PROMETHEUS_URL.match(text)
    if not match or not 0 < int(match.group(1) or 80) < 65536:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a Prometheus URL: give http(s)://HOST[:PORT][/PATH], e.g. http://localhost:9090")
    return text.rstrip("/")


def prometheus_duration(seconds: float) -> str:
    """Seconds as a PromQL duration (whole milliseconds)."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def grafana_variables(step: float, scrape: float) -> dict[str, str]:
    """What Grafana puts for the dashboard's variables: $__interval is the step, and
    $__rate_interval is max($__interval + scrape interval, 4 x scrape interval) (Grafana's own
    rule: at least four scrapes in every rate); every replica is selected."""
    return {"__interval": prometheus_duration(step), "__rate_interval": prometheus_duration(max(step + scrape, 4 * scrape)),
            "instance": ".*", "job": "chat"}


def dashboard_panel(board: dict, title: str) -> dict:
    """The dashboard's panel called title that has queries (a time series rather than a row)."""
    for panel in board.get("panels", []):
        if panel.get("title") == title and any(t.get("expr") for t in panel.get("targets", [])):
            return panel
    raise PlotError(f"{DASHBOARD}: no panel {title!r} with a query")


def panel_queries(board: dict, title: str, variables: dict[str, str]) -> list[tuple[str, str]]:
    """(PromQL, legend format) of each target of the dashboard's panel called title, variables filled in."""
    def fill(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise PlotError(f"{DASHBOARD}: panel {title!r} uses ${name}, which plot.py does not fill in")
        return variables[name]
    return [(GRAFANA_VARIABLE.sub(fill, t["expr"]), t.get("legendFormat") or "")
            for t in dashboard_panel(board, title)["targets"] if t.get("expr")]


def panel_unit(board: dict, title: str) -> str:
    """The Grafana unit of the panel called title ('' when none)."""
    return dashboard_panel(board, title).get("fieldConfig", {}).get("defaults", {}).get("unit", "")


def legend_name(legend: str, labels: dict[str, str]) -> str:
    """A Grafana legend format ("p99 {{instance}}") with a series' labels filled in."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), legend)


def prometheus_api(base: str, endpoint: str, params: dict):
    """The data of one answer of Prometheus's HTTP API (/api/v1/<endpoint>)."""
    url = f"{base}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=PROMETHEUS_TIMEOUT_S) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as e:
        try:                                # Prometheus explains a 400, 422 or 503 in a JSON body
            reason = json.load(e).get("error") or e.reason
        except (ValueError, AttributeError, OSError):
            reason = e.reason
        raise PlotError(f"Prometheus at {base} answered /api/v1/{endpoint} with HTTP {e.code}: {reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise PlotError(f"Prometheus at {base} is unreachable: {getattr(e, 'reason', None) or e}") from None
    except ValueError:
        raise PlotError(f"{base} answered /api/v1/{endpoint} with something other than JSON: "
                        "is it Prometheus?") from None
    if not isinstance(answer, dict) or answer.get("status") != "success":
        error = answer.get("error") if isinstance(answer, dict) else answer
        raise PlotError(f"Prometheus at {base} refused /api/v1/{endpoint}: {error}")
    return answer.get("data")


def scrape_interval(base: str) -> float:
    """Seconds between Prometheus's scrapes of the chat job, as it reports them."""
    data = prometheus_api(base, "targets", {"state": "active"}) or {}
    for target in data.get("activeTargets", []):
        text = target.get("scrapeInterval", "") if target.get("labels", {}).get("job") == "chat" else ""
        if re.fullmatch(f"(?:{DURATION.pattern})+", text):     # e.g. 5s, 1m30s, 500ms
            return sum(int(n) * SECONDS[unit] for n, unit in DURATION.findall(text))
    return DEFAULT_SCRAPE_S


def run_window(summaries: list[dict]) -> tuple[float, float]:
    """(start, end) of a run in Unix seconds: from loadclient's metadata, else its first and last event."""
    starts, ends = [], []
    for summary in summaries:
        meta = summary.get("meta") or {}
        start = meta.get("start_us") or summary.get("first_event_us")
        end = meta.get("end_us") or summary.get("last_event_us")
        if isinstance(start, int) and isinstance(end, int):
            starts.append(start)
            ends.append(end)
    if not starts:
        raise PlotError("the run has no start and end times (no meta.json and no events)")
    return min(starts) / 1e6, max(ends) / 1e6


def server_view_data(base: str, summaries: list[dict], board: dict) -> tuple[tuple[float, float], list[dict]]:
    """The padded window asked for, and per panel of SERVER_PANELS its title, y label and series
    [(legend, [(unix time, value), ...])], values in the y label's unit, non-finite ones left out."""
    start, end = run_window(summaries)
    pad = max(10.0, 0.05 * (end - start))
    start, end = start - pad, end + pad
    step = max(1, math.ceil((end - start) / MAX_POINTS))
    variables = grafana_variables(step, scrape_interval(base))
    panels = []
    for title, ylabel in SERVER_PANELS:
        factor = UNIT_FACTORS.get(panel_unit(board, title), 1)
        series = []
        for expr, legend in panel_queries(board, title, variables):
            data = prometheus_api(base, "query_range", {"query": expr, "start": f"{start:.3f}",
                                                        "end": f"{end:.3f}", "step": step})
            for result in data.get("result", []):
                labels = result.get("metric", {})
                name = legend_name(legend, labels).strip() or ", ".join(f"{k}={v}" for k, v in labels.items())
                points = [(float(t), float(v) * factor) for t, v in result.get("values", [])
                          if math.isfinite(float(v))]
                series.append((name or "value", points))
        panels.append({"title": title, "ylabel": ylabel, "series": series})
    return (start, end), panels


def server_view(summaries: list[dict], window: tuple[float, float], panels: list[dict], log: bool):
    """The client's latency over time on top, then each server panel, on one wall-clock axis."""
    run_start, run_end = run_window(summaries)
    fig, axes = plt.subplots(len(panels) + 1, 1, sharex=True, layout="constrained",
                             figsize=(WIDE[0], 2.2 * (len(panels) + 1) + 0.8))
    client = axes[0]
    drawn = False
    for i, summary in enumerate(summaries):
        offset = (summary.get("start_us") or run_start * 1e6) / 1e6 - run_start
        drawn |= latency_lines(client, summary["series"], offset, labels=i == 0)
        if len(summaries) > 1:
            client.annotate(summary["scenario"], (offset, 1), xycoords=("data", "axes fraction"),
                            xytext=(2, -12), textcoords="offset points", fontsize=8, color="0.4")
    if not drawn:
        no_data(client, "deliveries")
    client.set_ylabel("client latency (ms)")
    client.legend(loc="upper right", fontsize=8, ncols=4)
    latency_axis(client, log)
    if not log:
        client.set_ylim(bottom=0)
    for ax, panel in zip(axes[1:], panels):
        for name, points in panel["series"]:
            if points:
                ax.plot([t - run_start for t, _ in points], [v for _, v in points], lw=1.3, label=name)
        if any(points for _, points in panel["series"]):
            ax.legend(loc="upper right", fontsize=8)
        else:
            no_data(ax, f"samples in Prometheus for \u201c{panel['title']}\u201d")
        ax.set_ylabel(panel["ylabel"])
        if panel["ylabel"].endswith("(ms)") and log:
            latency_axis(ax, log)
        else:
            ax.set_ylim(bottom=0)       # a small change is not drawn as a cliff
    for ax in axes:
        ax.axvspan(0, run_end - run_start, color="tab:blue", alpha=0.06, lw=0)
    axes[-1].set_xlim(window[0] - run_start, window[1] - run_start)
    axes[-1].xaxis.set_major_formatter(FuncFormatter(
        lambda x, _: time.strftime("%H:%M:%S", time.gmtime(run_start + x))))
    day = time.strftime("%Y-%m-%d", time.gmtime(run_start))
    axes[-1].set_xlabel(f"UTC, {day} (shaded: the load client's run)")
    fig.suptitle("The run as the clients and the server saw it")
    return fig


def plot_server_view(runs: list[Path], base: str, out: Path | None = None, fmt: str = "png",
                     log: bool = False) -> tuple[Path, list[dict]]:
    """Draw a run's server-view figure from Prometheus at base; the file and the panels' data."""
    processed = processed_folder(runs)
    summaries = load_run(processed)
    try:
        board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PlotError(f"{DASHBOARD}: cannot read the dashboard ({e})") from None
    window, panels = server_view_data(base, summaries, board)
    if not any(points for panel in panels for _, points in panel["series"]):
        start, end = (time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) for t in window)
        raise PlotError(f"Prometheus at {base} has no samples for any panel from {start} to {end} UTC: "
                        "did it scrape the server (job \"chat\") during the run?")
    out = out or processed.parent / "plots"
    out.mkdir(parents=True, exist_ok=True)
    return save(server_view(summaries, window, panels, log), out, "server-view", fmt), panels


# ---------------------------------------------------------------------------
# Drawing a run
# ---------------------------------------------------------------------------

def plot_run(runs: list[Path], out: Path | None = None, fmt: str = "png", log: bool = False) -> list[Path]:
    """Draw every figure of a run folder (or a processed folder, or the segments' folders of one
    run); returns the files written."""
    processed = processed_folder(runs)
    summaries = load_run(processed)
    if out is None:
        out = processed.parent / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = [save(percentile_grid(summaries, log), out, "latency-percentiles", fmt),
             save(mean_spread(summaries, log), out, "latency-mean", fmt),
             save(delivery(summaries), out, "delivery", fmt)]
    paths += [save(over_time(s, log), out, f"latency-over-time_{s['scenario']}", fmt) for s in summaries]
    return paths


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(prog="plot.py", description="Figures of a load-test run.")
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN",
                        help="run folder (default: the newest in --results) or its processed/ folder, "
                             "the folders of every segment of one run (merged), "
                             "or a bench_connections.py sample CSV")
    parser.add_argument("--results", type=Path, default=Path("results"),
                        help="where runs are looked for without RUN (default: results)")
    parser.add_argument("--out", type=Path, help="output folder (default: <run>/plots)")
    parser.add_argument("--format", choices=("png", "svg"), default="png", help="image format")
    parser.add_argument("--log", action="store_true", help="log scale for latency axes")
    parser.add_argument("--prometheus", type=prometheus_url, metavar="URL",
                        help="draw only server-view: the run's latency over time above the server's "
                             "broadcast latency, connections, CPU and memory, queried from the Prometheus "
                             "at URL (e.g. http://localhost:9090) with the Grafana dashboard's own queries")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = parse_args(argv)
    try:
        runs = args.runs or [csvprocess.newest_run(args.results)]
        run = runs[0]
        if len(runs) == 1 and run.is_file() and run.suffix == ".csv":
            if args.prometheus:
                raise PlotError(f"{run}: --prometheus draws a load-client run folder, not a sample CSV")
            paths = plot_samples(run, args.out, args.format)
        elif missing := [r for r in runs if not r.is_dir()]:
            raise PlotError(f"{missing[0]}: no such folder")
        elif args.prometheus:
            path, panels = plot_server_view(runs, args.prometheus, args.out, args.format, args.log)
            print(f"from Prometheus at {args.prometheus}:")
            for panel in panels:
                points = sum(len(points) for _, points in panel["series"])
                print(f"  {panel['title']}: {points} points in {len(panel['series'])} series")
            paths = [path]
        else:
            paths = plot_run(runs, args.out, args.format, args.log)
    except (PlotError, csvprocess.InputError) as e:
        print(f"plot: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"plot: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"figures of {' '.join(map(str, runs))}:")
    for path in paths:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # `| head` ends quietly, like other tools
    sys.exit(main())
