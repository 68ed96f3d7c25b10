"""The stack on a real Docker engine in Swarm mode: built, deployed, loaded, updated, killed.

The test machine has Debian's Docker engine but no image registry and no IPVS
(see test_swarm.compose.yml for what that forces on the stack). So the module,
with testkit_docker's Engine, build_images and Stack (bench/bench_swarm.py uses them too):

1. installs docker.io and mmdebstrap when they are missing, and starts dockerd
   when none runs (without iptables rules or IP forwarding: see Engine);
2. builds stand-in images from Debian for what cannot be pulled (the Python
   base, Redis, Prometheus), then the project's image from its Dockerfile on the
   Python stand-in;
3. deploys docker-compose.yml with test_swarm.compose.yml on top, once for all
   its tests, and runs loadclient.py in a container on the stack's network;
4. removes all it started: the stack, its volumes and network, the swarm, the
   daemon. The stand-in images stay, so the next run need not build them again.

Everything the stack does stays on this machine: between the containers the test
creates, and loopback (the test reads Prometheus through its host-mode port; Swarm
publishes such a port on every address of the machine, for the minutes the stack
runs).
"""
from __future__ import annotations

import contextlib
import csv
import json
import socket
import subprocess
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

import csvprocess
import testkit_docker
from loadclient import EVENT_COLUMNS, ServerAddresses
from testkit import wait_for
from testkit_docker import (
    CHAT_IMAGE,
    PROMETHEUS,
    STANDINS,
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


# ---------------------------------------------------------------- the stack

class Stack(testkit_docker.Stack):
    """The stack this module deploys (testkit_docker.Stack), and its load run."""

    def __init__(self) -> None:
        super().__init__(STACK)

    def load(self, out: Path, seconds: int, grace: int, rooms: int = 5, room_size: int = 4) -> subprocess.Popen:
        """Start loadclient.py in a container on the stack's network, against ws://chat:8080/ws."""
        return self.loadclient(
            out, "--load-test", "--server-url", "ws://chat:8080/ws",
            "--rooms", str(rooms), "--room-size", str(room_size), "--rate", "10",
            "--duration", str(seconds), "--grace", str(grace), "--seed", "7",
            "--connect-timeout", str(CONNECT_TIMEOUT),
            "--out", "/out/run", "--summary-json", "/out/summary.json")


def finish_load(run_: subprocess.Popen, out: Path, timeout: float) -> dict:
    """Wait for a load run; its summary (from loadclient.py), checked to have lost nothing."""
    try:
        run_.wait(timeout)
    except subprocess.TimeoutExpired:
        docker("rm", "-f", f"{STACK}-load", check=False)
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
    assert {s["image"] for s in services.values() if "image" in s} <= set(STANDINS)
    assert "image" not in services["chat"], "the chat service runs the project's own image"
    left_out = {name for name, s in services.items() if s.get("deploy", {}).get("replicas") == 0}
    assert left_out == {"traefik", "grafana", "cadvisor"}


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


def test_load_spreads_over_every_replica_with_rooms_across_them(healthy, tmp_path):
    """5 rooms of 4 clients, in turn over 3 replicas: each room has members on every replica."""
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


@pytest.mark.timeout(300)
def test_rolling_update_during_a_load_run_loses_and_duplicates_nothing(healthy, tmp_path):
    """docker service update --force: each replica drains (1001), its clients return with since."""
    before = {c["Id"] for c in healthy.chat_containers()}
    # At most 180 s of sending; the run is ended (SIGTERM: stop sending, then the grace
    # period) once the update is over: one replica at a time, each healthy, then 10 s.
    load = healthy.load(tmp_path, seconds=180, grace=15)
    time.sleep(4)
    docker("service", "update", "--force", "--detach", CHAT_SERVICE)
    wait_for(lambda: healthy.update_state() == "completed", 170, "the rolling update completed",
             interval=2.0)
    assert load.poll() is None, "the load run ended before the update did"
    assert not before & {c["Id"] for c in healthy.chat_containers()}, "a replica was not replaced"
    time.sleep(4)  # the last drained replica's clients are back and sending
    docker("kill", "--signal", "TERM", f"{STACK}-load")
    result = finish_load(load, tmp_path, 60)
    # Each old replica drained: its clients were closed with 1001 and came back.
    assert result["errors"].get("close 1001", 0) >= len(before), result
    check_events(tmp_path)
    wait_for(lambda: len(healthy.healthy_chat_addresses()) == REPLICAS, 60, "the new replicas healthy", interval=1.0)


def test_replica_killed_during_a_load_run_loses_and_duplicates_nothing(healthy, tmp_path):
    """docker kill: its clients lose the connection, come back on the others with since, resend."""
    wait_for(lambda: len(healthy.healthy_chat_addresses()) == REPLICAS, 60, "every replica healthy", interval=1.0)
    load = healthy.load(tmp_path, seconds=20, grace=15)
    time.sleep(6)
    victim = healthy.chat_containers()[0]["Id"]
    docker("kill", victim)
    result = finish_load(load, tmp_path, 120)
    assert result["reconnects"] > 0, "no client was on the killed replica"
    check_events(tmp_path)
    # Swarm replaces it (restart_policy: any).
    wait_for(lambda: len(healthy.healthy_chat_addresses()) == REPLICAS and victim not in
             {c["Id"] for c in healthy.chat_containers()}, 90, "a new replica in place of the killed one",
             interval=1.0)


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
