"""plot.py --prometheus: the server's view of a run, from the Grafana dashboard's own queries.

The queries and their variables against the dashboard JSON; the URL check; every
way Prometheus can fail, from a stand-in that answers what each test needs; and
the whole path for real: a scalechat.py server, a real Prometheus scraping it
every second, a load-client run, then the figure.
"""
from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import plot
from testkit import HERE, free_port, start_prometheus, start_server
from testkit_csv import START_US, write_scenario

BOARD = json.loads(plot.DASHBOARD.read_text(encoding="utf-8"))


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything but a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def figure_size(panels: int) -> tuple[int, int]:
    """The server-view figure's pixels with the client's panel and `panels` server panels."""
    return round(plot.WIDE[0] * plot.DPI), round((2.2 * (panels + 1) + 0.8) * plot.DPI)


# ---------------------------------------------------------------------------
# The dashboard's queries
# ---------------------------------------------------------------------------

def test_every_server_panel_has_queries_with_every_variable_filled():
    variables = plot.grafana_variables(step=2, scrape=1)
    for title, _ in plot.SERVER_PANELS:
        queries = plot.panel_queries(BOARD, title, variables)
        raw = [t["expr"] for p in BOARD["panels"] if p["title"] == title for t in p["targets"]]
        assert len(queries) == len(raw) >= 1, title
        for (expr, _), original in zip(queries, raw):
            assert "$" not in expr and 'job="chat"' in expr, expr
            # every replica, rates over max(2 s + 1 s, 4 x 1 s), and nothing else changed
            assert expr == original.replace("$instance", ".*").replace("$__rate_interval", "4s"), expr
    cpu = plot.panel_queries(BOARD, "CPU", variables)
    assert all("[4s]" in expr for expr, _ in cpu)
    assert [legend for _, legend in cpu] == ["{{instance}}", "total"]


@pytest.mark.parametrize(("step", "scrape", "rate"), [(1, 1, "4s"), (1, 5, "20s"), (30, 5, "35s"), (1, 0.25, "1250ms"),
                                                       (2, 0.5, "2500ms")])
def test_rate_interval_is_grafanas(step, scrape, rate):
    variables = plot.grafana_variables(step, scrape)
    assert variables["__rate_interval"] == rate
    assert variables["__interval"] == plot.prometheus_duration(step)


def test_a_variable_plot_does_not_know_is_an_error():
    board = {"panels": [{"title": "CPU", "targets": [{"expr": "rate(x[$__range])"}]}]}
    with pytest.raises(plot.PlotError, match=r"uses \$__range"):
        plot.panel_queries(board, "CPU", plot.grafana_variables(1, 1))
    with pytest.raises(plot.PlotError, match="no panel 'Memory'"):
        plot.panel_queries(board, "Memory", {})


def test_legend_formats_take_the_series_labels():
    assert plot.legend_name("p99 {{instance}}", {"instance": "10.0.0.5:8081"}) == "p99 10.0.0.5:8081"
    assert plot.legend_name("{{ instance }} gen {{generation}}", {"instance": "a"}) == "a gen "


# ---------------------------------------------------------------------------
# The URL
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["http://localhost:9090", "https://prom.example.org", "http://10.1.2.3:9090/",
                                 "http://[::1]:9090", "https://example.org/prometheus"])
def test_prometheus_urls_accepted(url):
    assert plot.prometheus_url(url) == url.rstrip("/")


@pytest.mark.parametrize("url", ["localhost:9090", "ftp://host:9090", "http://", "http://host:0", "http://host:65536",
                                 "http://host:port", "http://ho st", "http://host:9090?x=1", "http://-host",
                                 "http://host:9090\nhttp://other", "http://user@host"])
def test_bad_prometheus_urls_are_refused_before_anything_runs(url, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        plot.main(["--prometheus", url, str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --prometheus" in err and "is not a Prometheus URL" in err, err


# ---------------------------------------------------------------------------
# Prometheus failing, from a stand-in
# ---------------------------------------------------------------------------

class StandIn(ThreadingHTTPServer):
    """An HTTP server answering /api/v1/<endpoint> with answer(endpoint, params) -> (status, body)."""

    def __init__(self, answer):
        self.answer, self.asked = answer, []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(handler):  # the server is self here
                url = urllib.parse.urlsplit(handler.path)
                params = dict(urllib.parse.parse_qsl(url.query))
                self.asked.append((url.path, params))
                status, body = self.answer(url.path.removeprefix("/api/v1/"), params)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                handler.send_response(status)
                handler.send_header("Content-Length", str(len(data)))
                handler.end_headers()
                handler.wfile.write(data)

            def log_message(handler, *args):
                pass
        super().__init__(("127.0.0.1", 0), Handler)

    def __enter__(self):
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def success(data) -> tuple[int, dict]:
    return 200, {"status": "success", "data": data}


TARGETS = success({"activeTargets": [{"labels": {"job": "chat"}, "scrapeInterval": "2s"}]})


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> Path:
    """A processed synthetic run of 20 s (one scenario, 2 rooms of 3)."""
    run = tmp_path_factory.mktemp("run") / "20261128-100000"
    run.mkdir()
    write_scenario(run, 2, 3, 20, interval_ms=500)
    plot.processed_folder([run])
    return run


def plot_exit(run: Path, url: str, capsys) -> tuple[int, str, str]:
    """plot.py --prometheus url run, in this process: (exit status, stdout, stderr)."""
    code = plot.main(["--prometheus", url, str(run)])
    out, err = capsys.readouterr()
    return code, out, err


def test_unreachable_prometheus_is_one_clear_line_and_exit_2(synthetic_run, capsys):
    url = f"http://127.0.0.1:{free_port()}"                    # nobody listens there
    code, _, err = plot_exit(synthetic_run, url, capsys)
    assert code == 2
    assert err.startswith(f"plot: error: Prometheus at {url} is unreachable: ") and err.count("\n") == 1, err
    assert "Connection refused" in err
    assert not (synthetic_run / "plots" / "server-view.png").exists()


@pytest.mark.parametrize(("answer", "message"), [
    ((503, {"status": "error", "errorType": "unavailable", "error": "TSDB not ready"}),
     "Prometheus at {url} answered /api/v1/targets with HTTP 503: TSDB not ready"),
    ((404, b"404 page not found"), "Prometheus at {url} answered /api/v1/targets with HTTP 404: Not Found"),
    ((200, b"<html>Grafana</html>"),
     "{url} answered /api/v1/targets with something other than JSON: is it Prometheus?"),
    ((200, {"status": "error", "error": "bad_data"}), "Prometheus at {url} refused /api/v1/targets: bad_data"),
])
def test_prometheus_errors_are_one_clear_line_and_exit_2(synthetic_run, capsys, answer, message):
    with StandIn(lambda endpoint, params: answer) as prometheus:
        code, _, err = plot_exit(synthetic_run, prometheus.url, capsys)
    assert code == 2
    assert err == "plot: error: " + message.format(url=prometheus.url) + "\n", err


def test_a_query_error_names_the_query_answered(synthetic_run, capsys):
    def answer(endpoint, params):
        if endpoint == "targets":
            return TARGETS
        return 400, {"status": "error", "errorType": "bad_data", "error": "parse error at char 5"}
    with StandIn(answer) as prometheus:
        code, _, err = plot_exit(synthetic_run, prometheus.url, capsys)
    assert code == 2 and "answered /api/v1/query_range with HTTP 400: parse error at char 5" in err, err


def test_no_samples_at_all_is_an_error_naming_the_window(synthetic_run, capsys):
    def answer(endpoint, params):
        return TARGETS if endpoint == "targets" else success({"resultType": "matrix", "result": []})
    with StandIn(answer) as prometheus:
        code, _, err = plot_exit(synthetic_run, prometheus.url, capsys)
    assert code == 2
    start = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(START_US / 1e6 - 10))
    assert f"has no samples for any panel from {start} to " in err and 'job "chat"' in err, err


def test_the_window_step_and_rate_interval_asked_and_an_empty_panel_drawn(synthetic_run, capsys):
    """Times from the run's meta.json padded by 10 s, one step a second, the rate interval from the
    scrape interval Prometheus reports (2 s: 4 x 2 s = 8 s); connections answered, the rest empty."""
    start, end = START_US / 1e6, json.loads((synthetic_run / "2x3.meta.json").read_text())["end_us"] / 1e6

    def answer(endpoint, params):
        if endpoint == "targets":
            return TARGETS
        result = []
        if "(scalechat_connections{" in params["query"]:          # both queries of the panel
            times = range(int(start), int(end) + 1)
            result = [{"metric": {}, "values": [[t, "6"] for t in times] + [[end + 1, "NaN"]]}]
        return success({"resultType": "matrix", "result": result})
    with StandIn(answer) as prometheus:
        code, out, err = plot_exit(synthetic_run, prometheus.url, capsys)
    assert code == 0, err
    ranges = [params for path, params in prometheus.asked if path == "/api/v1/query_range"]
    titles = {title for title, _ in plot.SERVER_PANELS}
    assert len(ranges) == sum(len(panel["targets"]) for panel in BOARD["panels"] if panel["title"] in titles)
    for params in ranges:
        assert float(params["start"]) == pytest.approx(start - 10, abs=0.01)
        assert float(params["end"]) == pytest.approx(end + 10, abs=0.01)
        assert params["step"] == "1"
        assert "$" not in params["query"]
    assert all("[8s]" in p["query"] for p in ranges if "rate(" in p["query"])
    lines = out.splitlines()
    assert f"  Open connections: {2 * (int(end) - int(start) + 1)} points in 2 series" in lines, out
    assert "  CPU: 0 points in 0 series" in lines, out
    path = synthetic_run / "plots" / "server-view.png"
    assert f"  {path}" in lines
    assert png_size(path) == figure_size(len(plot.SERVER_PANELS))


# ---------------------------------------------------------------------------
# The whole path, for real
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_server_view_of_a_real_run_from_a_real_prometheus(tmp_path):
    """scalechat.py scraped every second; 6 clients chat for 4 s; then plot.py draws the run
    with the dashboard's queries: every panel has samples, and they say what happened."""
    server = start_server()
    try:
        prometheus = start_prometheus([server.metrics_port], str(tmp_path))
        try:
            run = tmp_path / "results" / "run"
            load = subprocess.run([sys.executable, str(Path(HERE) / "loadclient.py"), "--load-test",
                                   "--server-url", server.url, "--out", str(run), "--rooms", "2",
                                   "--room-size", "3", "--rate", "5", "--duration", "4", "--seed", "3"],
                                  capture_output=True, text=True, timeout=60, check=False)
            assert load.returncode == 0, load.stderr
            # One scrape after the clients left, so the run's end is in Prometheus too.
            deadline = time.monotonic() + 20
            while prometheus.value('sum(scalechat_connections{job="chat"})') != 0:
                assert time.monotonic() < deadline, "Prometheus never saw the clients leave"
                time.sleep(0.25)
            result = subprocess.run([sys.executable, str(Path(HERE) / "plot.py"), "--prometheus", prometheus.url,
                                     str(run)], capture_output=True, text=True, timeout=120, check=False)
            assert result.returncode == 0, result.stderr
            counts = dict(re.findall(r"^  ([\w -]+): (\d+) points in \d+ series$", result.stdout, re.MULTILINE))
            assert set(counts) == {title for title, _ in plot.SERVER_PANELS}, result.stdout
            assert all(int(n) >= 3 for n in counts.values()), counts
            path = run / "plots" / "server-view.png"
            assert f"  {path}" in result.stdout.splitlines()
            assert png_size(path) == figure_size(len(plot.SERVER_PANELS))
            assert path.stat().st_size > 30_000                   # lines and labels, not a blank canvas
            # The same data, in this process: what the panels say.
            summaries = plot.load_run(run / "processed")
            _, panels = plot.server_view_data(prometheus.url, summaries, BOARD)
            by_title = {panel["title"]: dict(panel["series"]) for panel in panels}
            assert max(v for _, v in by_title["Open connections"]["total"]) == 6
            assert 5 < max(v for _, v in by_title["Resident memory"]["total"]) < 1024    # MiB
            assert max(v for _, v in by_title["CPU"]["total"]) > 0
            p99 = [v for _, v in by_title["Broadcast latency"]["p99"]]
            assert p99 and all(0 < v < 1000 for v in p99), p99                      # ms
        finally:
            prometheus.stop()
    finally:
        server.stop()
