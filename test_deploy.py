"""Deployment tests, without a Docker engine: the compose file against the Compose
specification, the Prometheus configuration through promtool, the dashboards
against what the server really exports, a real Prometheus scraping a real
server, and the Dockerfile's install step and entrypoint run for real.

monitoring/compose-spec.json is the Compose specification's JSON schema
(github.com/compose-spec/compose-spec, schema/compose-spec.json, Apache-2.0),
taken unchanged from the npm package dclint 3.1.0 (MIT), which vendors it.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
import venv
from collections.abc import Callable

import jsonschema
import pytest
import yaml
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from testkit import (
    HERE,
    ServerProc,
    free_port,
    scrape,
    start_prometheus,
    start_server,
    wait_http,
)

COMPOSE_FILE = os.path.join(HERE, "docker-compose.yml")
COMPOSE_SCHEMA = os.path.join(HERE, "monitoring", "compose-spec.json")
PROMETHEUS_CONFIG = os.path.join(HERE, "monitoring", "prometheus.yml")
DASHBOARDS = os.path.join(HERE, "monitoring", "grafana", "dashboards")
DOCKERFILE = os.path.join(HERE, "Dockerfile")
DOCKERIGNORE = os.path.join(HERE, ".dockerignore")


def wait_for(probe: Callable[[], object], done: Callable[[object], bool], timeout: float = 20.0):
    """Call probe until done(result) or timeout; return the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if done(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.25)


# ---------------------------------------------------------------- compose file

INTERPOLATION = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")


def interpolate(text: str, env: dict) -> str:
    """Compose's ${NAME} and ${NAME:-default} substitution ($$ is a literal $)."""
    def substitute(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1)) or m.group(2) or ""
    result = INTERPOLATION.sub(substitute, text)
    assert "${" not in result, "an interpolation form this test does not know"
    return result


def load_compose(env: dict | None = None) -> dict:
    """The compose file as Docker reads it with env (None: as written, uninterpolated)."""
    with open(COMPOSE_FILE) as f:
        text = f.read()
    return yaml.safe_load(text if env is None else interpolate(text, env))


def compose_errors(document: dict) -> list[str]:
    """Every violation of the Compose specification's schema in document."""
    with open(COMPOSE_SCHEMA) as f:
        schema = json.load(f)
    # The file names draft-07 by a URL jsonschema does not recognise.
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


SCALED_ENV = {"SCALECHAT_REPLICAS": "8", "SCALECHAT_CPUS": "1.5", "SCALECHAT_MEMORY": "2G"}


@pytest.mark.parametrize("env", [None, {}, SCALED_ENV],
                         ids=["as-written", "defaults", "overridden"])
def test_compose_file_follows_compose_spec(env):
    assert compose_errors(load_compose(env)) == []


def test_compose_schema_rejects_a_broken_file():
    broken = load_compose({})
    broken["services"]["chat"]["deploy"]["replica"] = 3
    broken["services"]["redis"]["ports"] = "6379"
    assert len(compose_errors(broken)) == 2


def test_stack_shape_and_defaults():
    stack = load_compose({})
    services = stack["services"]
    assert set(services) == {"traefik", "chat", "redis", "prometheus", "grafana", "cadvisor"}
    chat = services["chat"]
    assert chat["deploy"]["replicas"] == 3
    assert chat["deploy"]["resources"]["limits"] == {"cpus": "0.25", "memory": "512M"}
    assert chat["environment"]["SCALECHAT_REDIS"] == "redis://redis:6379/0"
    assert "ports" not in chat, "replicas publishing a host port would collide"
    # Traefik's docker provider reads container labels, its swarm provider service labels.
    assert chat["labels"] == chat["deploy"]["labels"]
    assert chat["labels"]["traefik.http.services.chat.loadbalancer.healthcheck.path"] == "/healthz"
    assert "80:80" in services["traefik"]["ports"]
    assert "3000:3000" in services["grafana"]["ports"]
    for config in stack["configs"].values():
        assert os.path.isfile(os.path.join(HERE, config["file"])), config["file"]
    scaled = load_compose(SCALED_ENV)
    assert scaled["services"]["chat"]["deploy"]["replicas"] == 8
    assert scaled["services"]["chat"]["deploy"]["resources"]["limits"] == {"cpus": "1.5", "memory": "2G"}


def test_ports_agree_across_image_stack_and_prometheus():
    image_env = dockerfile_env(parse_dockerfile())
    labels = load_compose({})["services"]["chat"]["labels"]
    assert labels["traefik.http.services.chat.loadbalancer.server.port"] == image_env["SCALECHAT_PORT"]
    with open(PROMETHEUS_CONFIG) as f:
        jobs = {job["job_name"]: job for job in yaml.safe_load(f)["scrape_configs"]}
    discovery = jobs["chat"]["dns_sd_configs"][0]
    assert "tasks.chat" in discovery["names"]
    assert str(discovery["port"]) == image_env["SCALECHAT_METRICS_PORT"]


# ---------------------------------------------------------------- Prometheus configuration

def test_promtool_accepts_prometheus_config():
    result = subprocess.run(["promtool", "check", "config", PROMETHEUS_CONFIG],
                            check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- dashboards

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right",
                   "bool", "and", "or", "unless", "offset"}
# Series Prometheus adds to every scrape itself.
SCRAPE_SERIES = {"up"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        is_call = expr[m.end():].lstrip().startswith("(")
        if not is_call and m.group() not in PROMQL_KEYWORDS:
            names.add(m.group())
    return names


def load_dashboard(name: str) -> dict:
    """One provisioned dashboard, parsed."""
    with open(os.path.join(DASHBOARDS, name)) as f:
        return json.load(f)


def dashboard_queries(board: dict) -> list[str]:
    """Every PromQL expression of a dashboard's panels."""
    return [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]


def panel_queries(board: dict, title: str) -> list[str]:
    """The PromQL expressions of the panel called title."""
    [panel] = [panel for panel in board["panels"] if panel["title"] == title]
    return [target["expr"] for target in panel["targets"]]


def dashboard_metric_names(board: dict) -> set[str]:
    """Metric names read by a dashboard's panels and template variables."""
    names = set().union(*map(metric_names, dashboard_queries(board)))
    for variable in board["templating"]["list"]:
        names.update(re.findall(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)", variable["definition"]))
    return names


def exported_names(exposition: str) -> set[str]:
    """Sample names a Prometheus text exposition declares or carries."""
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            names.add(name)
            names.update(name + suffix for suffix in suffixes.get(kind, ()))
        elif line and not line.startswith("#"):
            names.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group())
    return names


DASHBOARD_FILES = ("scalechat.json", "containers.json", "door.json")


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_dashboard_is_valid_with_unique_panel_ids(name):
    board = load_dashboard(name)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard_queries(board)
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "prometheus", panel["title"]


def test_containers_dashboard_reads_cadvisor_only():
    names = dashboard_metric_names(load_dashboard("containers.json"))
    assert names and all(name.startswith("container_") for name in names), names


def test_door_dashboard_reads_traefik_only():
    names = dashboard_metric_names(load_dashboard("door.json"))
    assert names and all(name.startswith("traefik_") for name in names), names


# ---------------------------------------------------------------- a real Prometheus scraping a real server

SERVER_MODES = {"single": (), "workers": ("--workers", "2")}


@pytest.fixture(scope="module", params=list(SERVER_MODES))
def chat_server(request):
    """A scalechat.py of each mode, shared by the tests that read its metrics."""
    server = start_server(*SERVER_MODES[request.param])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prometheus(chat_server, tmp_path_factory):
    """Prometheus with a temporary config and data folder, target = the chat server."""
    prom = start_prometheus([chat_server.metrics_port], str(tmp_path_factory.mktemp("prometheus")))
    yield prom
    prom.stop()


def test_dashboard_metrics_exist_in_server_export(chat_server):
    with urllib.request.urlopen(chat_server.metrics_url, timeout=5) as response:
        exported = exported_names(response.read().decode())
    board = load_dashboard("scalechat.json")
    for expr in dashboard_queries(board):       # each panel reads something the server exports
        assert metric_names(expr) and metric_names(expr) <= exported | SCRAPE_SERIES, expr
    needed = dashboard_metric_names(board)
    assert "scalechat_broadcast_seconds_bucket" in needed
    assert needed - exported - SCRAPE_SERIES == set()


@pytest.mark.slow
def test_prometheus_counts_the_open_connections(prometheus, chat_server):
    total = 'sum(scalechat_connections{job="chat"})'
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(connect(f"{chat_server.url}?name=p{i}")) for i in range(24)]
        assert wait_for(lambda: prometheus.value(total), lambda v: v == 24) == 24
        for ws in clients[:10]:
            ws.close()
        assert wait_for(lambda: prometheus.value(total), lambda v: v == 14) == 14
    assert wait_for(lambda: prometheus.value(total), lambda v: v == 0) == 0


def grafana_to_prometheus(expr: str) -> str:
    """A dashboard expression as Grafana sends it: its variables filled in."""
    return expr.replace("$__rate_interval", "5s").replace("$instance", ".*")


def provoke_refusal_and_protocol_error(url: str) -> None:
    """One refused upgrade (bad room name) and one close for a binary frame (1003)."""
    with pytest.raises(InvalidStatus):
        connect(url.replace("/ws", "/ws/no%20spaces"))
    with connect(url) as ws:
        ws.send(b"\x00")
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=5)


@pytest.mark.slow
def test_every_dashboard_query_runs_and_scalechat_panels_show_data(prometheus, chat_server):
    for name in DASHBOARD_FILES:
        for expr in dashboard_queries(load_dashboard(name)):
            prometheus.query(grafana_to_prometheus(expr))
    provoke_refusal_and_protocol_error(chat_server.url)
    queries = [grafana_to_prometheus(expr) for expr in dashboard_queries(load_dashboard("scalechat.json"))]
    # Nobody reads what the room sends back: an unbounded receive queue keeps the
    # client reading, so the closing handshake is not stuck behind unread frames.
    with connect(f"{chat_server.url}/dash?name=a", max_queue=None) as alice, \
            connect(f"{chat_server.url}/dash?name=b", max_queue=None) as bob:
        message_ids = itertools.count(1)
        empty = queries

        def still_empty() -> list[str]:
            # A series, once there, stays: ask again only about those still missing.
            nonlocal empty
            for ws in (alice, bob):
                ws.send(json.dumps({"message_id": next(message_ids), "text": "hello",
                                    "sent_at": "2026-01-01T00:00:00.000000Z"}))
            empty = [expr for expr in empty if not prometheus.query(expr)]
            return empty
        assert wait_for(still_empty, lambda remaining: not remaining, timeout=30) == []
        [p99] = panel_queries(load_dashboard("scalechat.json"), "Broadcast p99")

        def p99_now():
            # Series of fixed label sets exist before the first message, so the loop above
            # can end at once: the quantile needs two scrapes with broadcasts between them.
            still_empty()
            return prometheus.value(grafana_to_prometheus(p99))
        p99 = wait_for(p99_now, lambda v: v is not None and math.isfinite(v), timeout=30)
    # A quantile of the server's broadcast histogram, in seconds: above 0, and no more than the
    # smallest bucket bound that holds every broadcast the server has timed.
    samples = scrape(chat_server.metrics_url)
    every = samples["scalechat_broadcast_seconds_count"]
    bound = min(float(re.search(r'le="([^"]+)"', key).group(1)) for key, count in samples.items()
                if key.startswith("scalechat_broadcast_seconds_bucket{") and count == every)
    assert 0 < p99 <= bound, (p99, bound)


# ---------------------------------------------------------------- Dockerfile, without an engine

def parse_dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile, continuation lines joined."""
    instructions, pending = [], ""
    with open(DOCKERFILE) as f:
        for line in f:
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            keyword, _, arguments = (pending + stripped).partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    return instructions


def arguments_of(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    """Arguments of every instruction called keyword, in order."""
    return [arguments for name, arguments in instructions if name == keyword]


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict:
    """Variables the image's ENV instructions set (KEY=value form)."""
    return dict(pair.split("=", 1) for arguments in arguments_of(instructions, "ENV")
                for pair in shlex.split(arguments))


def healthcheck_command(instructions: list[tuple[str, str]]) -> list[str]:
    """The exec-form command of the HEALTHCHECK instruction."""
    [healthcheck] = arguments_of(instructions, "HEALTHCHECK")
    return json.loads(healthcheck.split(" CMD ", 1)[1])


def dockerignore_patterns() -> list[str]:
    """The .dockerignore patterns, in order."""
    with open(DOCKERIGNORE) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: * and ? stay within one path element."""
    parts = re.split(r"(\*\*|\*|\?)", pattern.strip("/"))
    wildcards = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wildcards.get(part) or re.escape(part) for part in parts))


def in_build_context(path: str, patterns: list[str]) -> bool:
    """Whether Docker sends path to the builder (the last matching pattern decides)."""
    elements = path.split("/")
    prefixes = ["/".join(elements[:i]) for i in range(1, len(elements) + 1)]
    included = True
    for pattern in patterns:
        regex = pattern_regex(pattern.lstrip("!"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            included = pattern.startswith("!")
    return included


def copy_into_image(sources: list[str], destination: str, workdir: str, patterns: list[str]) -> None:
    """Carry out a COPY from the repository (the build context) into workdir."""
    target = os.path.join(workdir, destination)
    for source in sources:
        origin = os.path.join(HERE, source)
        if os.path.isdir(origin):
            for folder, _, files in os.walk(origin):
                for name in files:
                    path = os.path.relpath(os.path.join(folder, name), HERE)
                    if in_build_context(path, patterns):
                        relative = os.path.relpath(path, source)
                        os.makedirs(os.path.dirname(os.path.join(target, relative)), exist_ok=True)
                        shutil.copy(os.path.join(HERE, path), os.path.join(target, relative))
        else:
            assert in_build_context(source, patterns), f"{source} is outside the build context"
            shutil.copy(origin, target)


def test_dockerfile_shape():
    instructions = parse_dockerfile()
    # The base is a build argument (test_swarm.py builds on a stand-in); by default python:3.11-slim.
    assert instructions[:2] == [("ARG", "BASE=python:3.11-slim"), ("FROM", "${BASE}")]
    [user] = arguments_of(instructions, "USER")
    assert user.split(":")[0] not in ("root", "0")
    assert set(" ".join(arguments_of(instructions, "EXPOSE")).split()) == {"8080", "8081"}
    assert arguments_of(instructions, "STOPSIGNAL") == ["SIGTERM"]
    # Exec form (a JSON list): no shell in between, the server itself is PID 1.
    [cmd] = arguments_of(instructions, "CMD")
    assert json.loads(cmd) == ["python", "scalechat.py"]
    assert "/healthz" in " ".join(healthcheck_command(instructions))


def test_dockerignore_keeps_the_context_small_and_complete():
    patterns = dockerignore_patterns()
    for needed in ("scalechat.py", "requirements.txt", "static/index.html"):
        assert in_build_context(needed, patterns), needed
    for unwanted in ("test_deploy.py", "results/20260101-000000/25x2.csv", ".git/HEAD", "monitoring/prometheus.yml"):
        assert not in_build_context(unwanted, patterns), unwanted


@pytest.fixture
def image(tmp_path):
    """The image's /app built without an engine: COPY into a folder, the pip steps
    of RUN in a fresh virtualenv (no site-packages of this machine), ENV kept."""
    instructions = parse_dockerfile()
    venv.create(tmp_path / "venv", with_pip=True)
    workdir = tmp_path / "app"
    workdir.mkdir()
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{tmp_path / 'venv' / 'bin'}{os.pathsep}{env['PATH']}"
    patterns, installed = dockerignore_patterns(), False
    for keyword, arguments in instructions:
        if keyword == "ENV":
            env.update(dockerfile_env([(keyword, arguments)]))
        elif keyword == "COPY":
            *sources, destination = [a for a in shlex.split(arguments) if not a.startswith("--")]
            copy_into_image(sources, destination, str(workdir), patterns)
        elif keyword == "RUN" and "pip install" in arguments:
            subprocess.run(["/bin/sh", "-c", arguments], cwd=workdir, env=env, check=True, timeout=180)
            installed = True
    assert installed, "no pip install step in the Dockerfile"
    return instructions, workdir, env


@pytest.mark.slow
def test_image_installs_and_its_entrypoint_serves_and_drains(image):
    instructions, workdir, env = image
    port, metrics_port = free_port(), free_port()
    env.update(SCALECHAT_HOST="127.0.0.1", SCALECHAT_METRICS_HOST="127.0.0.1",
               SCALECHAT_PORT=str(port), SCALECHAT_METRICS_PORT=str(metrics_port))
    [cmd] = arguments_of(instructions, "CMD")
    proc = subprocess.Popen(json.loads(cmd), cwd=workdir, env=env)
    server = ServerProc(proc, port, metrics_port)
    try:
        wait_http(f"{server.http}/healthz")
        health = subprocess.run(healthcheck_command(instructions), env=env, check=False, timeout=10)
        assert health.returncode == 0
        with urllib.request.urlopen(f"{server.http}/", timeout=5) as page:
            assert page.status == 200
        with urllib.request.urlopen(server.metrics_url, timeout=5) as metrics:
            assert b"scalechat_connections" in metrics.read()
        with connect(server.url) as ws:
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(timeout=15)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert proc.wait(15) == 0
    finally:
        server.stop(signal.SIGKILL)
