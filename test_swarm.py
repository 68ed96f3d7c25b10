"""The stack on a real Docker engine in Swarm mode: built, deployed, loaded, updated, killed.

The test machine has Debian's Docker engine but no image registry and no IPVS
(see test_swarm.compose.yml for what that forces on the stack). So the module:

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
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

import csvprocess
from loadclient import EVENT_COLUMNS, ServerAddresses

HERE = Path(__file__).resolve().parent
OVERRIDE = HERE / "test_swarm.compose.yml"
STACK = "chattest"
NETWORK = f"{STACK}_default"
CHAT_SERVICE = f"{STACK}_chat"
CHAT_IMAGE = "scalechat:swarm-test"
REPLICAS = 3
PROMETHEUS = "http://127.0.0.1:9090"
DOCKERD_LOG = Path("/tmp/scalechat-test-dockerd.log")
SUITE = "bookworm"  # its python3 is 3.11, as in python:3.11-slim
# A killed replica's address stays in Swarm's DNS for a moment, and a connect to it
# gets no answer at all: a client that tries it waits out its connect timeout while
# its messages queue up. After the default 10 s, the 100-odd it then sends at once
# exceed the server's --rate-burst (100): those over it are refused (rate_limit)
# and lost. 3 s keeps a client that meets the dead address twice under the burst.
CONNECT_TIMEOUT = 3

# The official Redis image's entrypoint turns protected mode off when Redis runs
# without a configuration file (as the stack runs it): the stand-in does the same,
# or Redis would refuse the chat replicas, which reach it from other containers.
REDIS_ENTRYPOINT = """#!/bin/sh
if [ "$1" = redis-server ]; then
  case "$2" in ""|-*) shift; set -- redis-server --protected-mode no "$@" ;; esac
fi
exec "$@"
"""

# Stand-in images: (Debian packages, mmdebstrap customize hooks, docker import --change lines).
# Each image is labelled with a hash of its recipe and rebuilt only when that changes.
STANDINS = {
    "scalechat-standin/python:3.11": (
        ["python3", "python3-pip", "python-is-python3"],
        # The project's Dockerfile runs pip as root, as python:3.11-slim allows; Debian
        # marks its Python as externally managed. pip reaches PyPI through this
        # machine's network, so it trusts this machine's CA bundle.
        ['rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
         'cp /etc/ssl/certs/ca-certificates.crt "$1"/etc/ssl/certs/ca-certificates.crt'],
        ["ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt", 'CMD ["python3"]'],
    ),
    "scalechat-standin/redis:7": (
        ["redis-server"],
        ['mkdir -p "$1"/data',
         f"printf '%s' '{REDIS_ENTRYPOINT}' > \"$1\"/usr/local/bin/docker-entrypoint.sh",
         'chmod 755 "$1"/usr/local/bin/docker-entrypoint.sh'],
        ["WORKDIR /data", 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]', 'CMD ["redis-server"]'],
    ),
    "scalechat-standin/prometheus:2": (
        ["prometheus"],
        ['mkdir -p "$1"/prometheus'],
        ["WORKDIR /prometheus", 'ENTRYPOINT ["/usr/bin/prometheus"]',
         'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'],
    ),
}
PYTHON_STANDIN = "scalechat-standin/python:3.11"


# ---------------------------------------------------------------- running commands

def run(*cmd: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run cmd, bounded in time; on failure raise with its output."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{' '.join(cmd)}: no answer in {timeout} s") from None
    if check and done.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr or done.stdout}")
    return done


def docker(*args: str, timeout: float = 120, check: bool = True, **kwargs) -> str:
    """The output of one docker CLI command."""
    return run("docker", *args, timeout=timeout, check=check, **kwargs).stdout.strip()


def until(predicate, timeout: float, what: str, period: float = 1.0):
    """Poll predicate until it returns something true, or fail saying what did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(period)


# ---------------------------------------------------------------- the engine

class Engine:
    """A Docker engine in Swarm mode: the one running, or one this test starts and stops.

    A daemon the test starts runs with --iptables=false and --ip-forward=false.
    With its defaults, dockerd adds NAT and filter rules to the host (MASQUERADE
    for its bridges, FORWARD's policy set to DROP), turns IP forwarding on, and
    leaves all of that behind when it stops; a NAT rule also makes the kernel
    track every connection in the host's conntrack table, loopback ones included,
    and other tests here open tens of thousands of them. Without them, nothing
    changes on the host's netfilter, containers have no route out of this
    machine, and everything the stack needs still works: containers reach each
    other over the overlay network, and a host-mode port is forwarded by
    docker-proxy, which loopback reaches.
    """

    def __init__(self) -> None:
        self.dockerd: subprocess.Popen | None = None
        self.links_before: set[str] = set()
        self.swarm_started = False
        self.networks_before: set[str] = set()

    def start(self) -> None:
        install_missing()
        if shutil.which("docker") is None:
            pytest.fail("no docker CLI on PATH (Debian's docker.io has one)")
        if run("docker", "info", timeout=30, check=False).returncode != 0:
            self.start_daemon()
        client = docker("version", "--format", "{{.Client.Version}}")
        if int(client.split(".")[0]) < 23:
            pytest.fail(f"docker CLI {client}: its `docker stack deploy` reads only Compose files with a "
                        "`version:` line, and docker-compose.yml follows the Compose specification, which "
                        "has none; put a docker CLI 23 or later first on PATH")
        state = docker("info", "--format", "{{.Swarm.LocalNodeState}}")
        if state == "inactive":
            self.networks_before = set(docker("network", "ls", "--format", "{{.Name}}").split())
            docker("swarm", "init", "--advertise-addr", "127.0.0.1")
            self.swarm_started = True
        elif state != "active":
            pytest.fail(f"the engine's swarm is {state!r}, neither inactive nor active")

    def start_daemon(self) -> None:
        if os.geteuid() != 0:
            pytest.fail("no Docker daemon answers, and only root can start one")
        self.links_before = network_links()
        log = open(DOCKERD_LOG, "w")  # noqa: SIM115 (kept open for the daemon's lifetime)
        self.dockerd = subprocess.Popen(
            ["dockerd", "--iptables=false", "--ip-forward=false"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while run("docker", "info", timeout=30, check=False).returncode != 0:
            if self.dockerd.poll() is not None or time.monotonic() > deadline:
                status = self.dockerd.poll()
                self.stop()
                tail = DOCKERD_LOG.read_text(errors="replace").splitlines()[-15:]
                why = "no answer in 60 s" if status is None else f"exit status {status}"
                pytest.fail(f"dockerd did not start ({why}); the end of {DOCKERD_LOG}:\n" + "\n".join(tail))
            time.sleep(0.5)

    def stop(self) -> None:
        """Leave the swarm and stop the daemon, if this test began them (twice is harmless)."""
        if self.swarm_started:
            docker("swarm", "leave", "--force", timeout=60, check=False)
            # Leaving removes the ingress network, not the bridge that swarm init made.
            if "docker_gwbridge" not in self.networks_before:
                docker("network", "rm", "docker_gwbridge", check=False)
            self.swarm_started = False
        if self.dockerd is not None:
            if self.dockerd.poll() is None:
                self.dockerd.send_signal(signal.SIGTERM)
                try:
                    self.dockerd.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(self.dockerd.pid, signal.SIGKILL)
                    self.dockerd.wait()
            # The daemon leaves its bridges (docker0, docker_gwbridge) up when it stops.
            for link in network_links() - self.links_before:
                run("ip", "link", "delete", link, check=False)
            self.dockerd = None


def install_missing() -> None:
    """apt-get install docker.io and mmdebstrap when a command of theirs is missing."""
    if shutil.which("dockerd") and shutil.which("mmdebstrap"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail("dockerd or mmdebstrap is missing, and only root can apt-get install docker.io mmdebstrap")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", "update", "-qq", timeout=600, env=env)
    run("apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker.io", "mmdebstrap",
        timeout=900, env=env)


def network_links() -> set[str]:
    """Names of the host's network interfaces."""
    return set(os.listdir("/sys/class/net"))


# ---------------------------------------------------------------- images

def recipe_hash(tag: str) -> str:
    return hashlib.sha256(json.dumps([SUITE, *STANDINS[tag]]).encode()).hexdigest()[:16]


def debian_sources() -> str:
    """The apt sources this machine installs from: mmdebstrap builds from the same mirror."""
    for path in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        if os.path.exists(path) and os.path.getsize(path):
            return path
    return "http://deb.debian.org/debian"


def build_standin(tag: str) -> None:
    """A Debian root filesystem with the recipe's packages, imported as image tag (unless already there)."""
    wanted = recipe_hash(tag)
    label = docker("image", "inspect", "--format", '{{index .Config.Labels "scalechat.recipe"}}', tag,
                   check=False)
    if label == wanted:
        return
    packages, hooks, changes = STANDINS[tag]
    with tempfile.TemporaryFile() as errors:
        rootfs = subprocess.Popen(
            ["mmdebstrap", "--quiet", "--variant=minbase", "--include=" + ",".join(packages),
             *(f"--customize-hook={hook}" for hook in hooks), SUITE, "-", debian_sources()],
            stdout=subprocess.PIPE, stderr=errors)
        try:
            imported = subprocess.run(
                ["docker", "import", *(arg for change in [*changes, f"LABEL scalechat.recipe={wanted}"]
                                       for arg in ("--change", change)), "-", tag],
                stdin=rootfs.stdout, capture_output=True, text=True, timeout=600, check=False)
        finally:
            rootfs.stdout.close()
            try:
                rootfs.wait(60)
            except subprocess.TimeoutExpired:
                rootfs.kill()
                rootfs.wait()
        errors.seek(0)
        assert rootfs.returncode == 0, f"mmdebstrap for {tag} failed: {errors.read()[-2000:].decode()}"
    assert imported.returncode == 0, f"docker import {tag} failed: {imported.stderr}"


def build_images() -> None:
    """The stand-ins (in parallel), then the project's image from its Dockerfile on the Python one."""
    with ThreadPoolExecutor(len(STANDINS)) as pool:
        for future in [pool.submit(build_standin, tag) for tag in STANDINS]:
            future.result()
    # The classic builder: what an engine 20.10 has without buildx. --network host: pip
    # inside the build reaches PyPI the way this machine does.
    run("docker", "build", "--network", "host", "--build-arg", f"BASE={PYTHON_STANDIN}",
        "-t", CHAT_IMAGE, str(HERE), timeout=600, env={**os.environ, "DOCKER_BUILDKIT": "0"})


# ---------------------------------------------------------------- the stack

class Stack:
    """The deployed stack: its tasks' containers, Prometheus's API, load runs on its network."""

    def __init__(self) -> None:
        self.deployed = False

    def deploy(self) -> None:
        self.remove()  # what a run killed before its cleanup left
        self.deployed = True
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as docker-proxy binds
            try:
                s.bind(("0.0.0.0", 9090))
            except OSError:
                pytest.fail("port 9090 is taken: the stack's Prometheus publishes it")
        docker("stack", "deploy", "--resolve-image", "never", "--detach=true",
               "-c", "docker-compose.yml", "-c", OVERRIDE.name, STACK,
               cwd=HERE, env={**os.environ, "SCALECHAT_IMAGE": CHAT_IMAGE})

    def remove(self) -> None:
        """Remove the stack, wait for its containers and network to go, then its volumes."""
        self.deployed = False
        docker("rm", "-f", f"{STACK}-load", check=False)
        docker("stack", "rm", STACK, check=False)
        until(lambda: not docker("ps", "-aq", "--filter", f"label=com.docker.stack.namespace={STACK}"),
              90, "the stack's containers gone")
        until(lambda: not docker("network", "ls", "-q", "--filter", f"name={NETWORK}"),
              60, "the stack's network gone")
        volumes = docker("volume", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={STACK}")
        if volumes:
            docker("volume", "rm", *volumes.split())

    def chat_containers(self) -> list[dict]:
        """docker inspect of every running chat task's container."""
        ids = docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={CHAT_SERVICE}")
        return json.loads(docker("inspect", *ids.split())) if ids else []

    def healthy_chat_addresses(self) -> list[str]:
        """Overlay addresses of the chat containers that the image's HEALTHCHECK calls healthy."""
        return [c["NetworkSettings"]["Networks"][NETWORK]["IPAddress"] for c in self.chat_containers()
                if (c["State"].get("Health") or {}).get("Status") == "healthy"]

    def query(self, promql: str) -> dict[str, float]:
        """An instant query to the stack's Prometheus: {instance: value}."""
        url = f"{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as answer:
            result = json.load(answer)["data"]["result"]
        return {r["metric"].get("instance", ""): float(r["value"][1]) for r in result}

    def resolve(self, name: str) -> set[str]:
        """The addresses name has on the stack's network, as its containers see them."""
        answer = docker("run", "--rm", "--network", NETWORK, CHAT_IMAGE, "python", "-c",
                        f"import socket; print(*{{i[4][0] for i in socket.getaddrinfo({name!r}, 8081)}})")
        return set(answer.split())

    def update_state(self) -> str:
        return docker("service", "inspect", "--format",
                      "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}", CHAT_SERVICE)

    def load(self, out: Path, seconds: int, grace: int, rooms: int = 5, room_size: int = 4) -> subprocess.Popen:
        """Start loadclient.py in a container on the stack's network, against ws://chat:8080/ws."""
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "loadclient.log", "w") as log:
            return subprocess.Popen(
                ["docker", "run", "--rm", "--name", f"{STACK}-load", "--network", NETWORK, "--user", "0:0",
                 "-v", f"{HERE}:/src:ro", "-v", f"{out}:/out", "-w", "/out", CHAT_IMAGE,
                 "python", "/src/loadclient.py", "--load-test", "--server-url", "ws://chat:8080/ws",
                 "--rooms", str(rooms), "--room-size", str(room_size), "--rate", "10",
                 "--duration", str(seconds), "--grace", str(grace), "--seed", "7",
                 "--connect-timeout", str(CONNECT_TIMEOUT),
                 "--out", "/out/run", "--summary-json", "/out/summary.json"],
                stdout=log, stderr=subprocess.STDOUT)


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
    seq_of: dict[tuple, set] = defaultdict(set)      # (room, sender, message_id) -> seqs seen
    message_at: dict[tuple, set] = defaultdict(set)  # (room, seq) -> messages seen there
    with open(events, newline="") as f:
        for row in csv.DictReader(f, fieldnames=EVENT_COLUMNS):
            if row["type"] == "Received":
                message = (row["room"], row["sender_id"], row["message_id"])
                seq_of[message].add(row["seq"])
                message_at[row["room"], row["seq"]].add(message)
    assert seq_of, "no message was received"
    # Every receiver of a room saw each message at the same seq, and each seq held one message.
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
    until(lambda: len(stack.healthy_chat_addresses()) == REPLICAS, 120,
          f"{REPLICAS} chat replicas healthy")
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
    until(every_replica_up, 60, "up == 1 for every chat replica in Prometheus")
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
    until(lambda: healthy.update_state() == "completed", 170, "the rolling update completed",
          period=2)
    assert load.poll() is None, "the load run ended before the update did"
    assert not before & {c["Id"] for c in healthy.chat_containers()}, "a replica was not replaced"
    time.sleep(4)  # the last drained replica's clients are back and sending
    docker("kill", "--signal", "TERM", f"{STACK}-load")
    result = finish_load(load, tmp_path, 60)
    # Each old replica drained: its clients were closed with 1001 and came back.
    assert result["errors"].get("close 1001", 0) >= len(before), result
    check_events(tmp_path)
    until(lambda: len(healthy.healthy_chat_addresses()) == REPLICAS, 60, "the new replicas healthy")


def test_replica_killed_during_a_load_run_loses_and_duplicates_nothing(healthy, tmp_path):
    """docker kill: its clients lose the connection, come back on the others with since, resend."""
    until(lambda: len(healthy.healthy_chat_addresses()) == REPLICAS, 60, "every replica healthy")
    load = healthy.load(tmp_path, seconds=20, grace=15)
    time.sleep(6)
    victim = healthy.chat_containers()[0]["Id"]
    docker("kill", victim)
    result = finish_load(load, tmp_path, 120)
    assert result["reconnects"] > 0, "no client was on the killed replica"
    check_events(tmp_path)
    # Swarm replaces it (restart_policy: any).
    until(lambda: len(healthy.healthy_chat_addresses()) == REPLICAS and victim not in
          {c["Id"] for c in healthy.chat_containers()}, 90, "a new replica in place of the killed one")


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
