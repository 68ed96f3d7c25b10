"""A Docker engine and the stack, on this machine: test_swarm.py and bench/bench_swarm.py.

The machine has Debian's Docker engine but no image registry and no IPVS (see
test_swarm.compose.yml for what that forces on the stack): Engine starts dockerd
and a swarm when none runs, build_images builds stand-ins from Debian for what
cannot be pulled and the project's image on them, Stack deploys
docker-compose.yml with test_swarm.compose.yml on top.
"""
from __future__ import annotations

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from testkit import HERE, wait_for

OVERRIDE = "test_swarm.compose.yml"
CHAT_IMAGE = "scalechat:swarm-test"
PROMETHEUS = "http://127.0.0.1:9090"
DOCKERD_LOG = Path("/tmp/scalechat-test-dockerd.log")
SUITE = "bookworm"  # its python3 is 3.11, as in python:3.11-slim


class DockerUnavailable(RuntimeError):
    """No engine, swarm, tool or port for the stack on this machine."""


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


# ---- running commands

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


# ---- the engine

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
            raise DockerUnavailable("no docker CLI on PATH (Debian's docker.io has one)")
        if run("docker", "info", timeout=30, check=False).returncode != 0:
            self.start_daemon()
        client = docker("version", "--format", "{{.Client.Version}}")
        if int(client.split(".")[0]) < 23:
            raise DockerUnavailable(f"docker CLI {client}: its `docker stack deploy` reads only Compose files with a "
                        "`version:` line, and docker-compose.yml follows the Compose specification, which "
                        "has none; put a docker CLI 23 or later first on PATH")
        state = docker("info", "--format", "{{.Swarm.LocalNodeState}}")
        if state == "inactive":
            self.networks_before = set(docker("network", "ls", "--format", "{{.Name}}").split())
            docker("swarm", "init", "--advertise-addr", "127.0.0.1")
            self.swarm_started = True
        elif state != "active":
            raise DockerUnavailable(f"the engine's swarm is {state!r}, neither inactive nor active")

    def start_daemon(self) -> None:
        if os.geteuid() != 0:
            raise DockerUnavailable("no Docker daemon answers, and only root can start one")
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
                raise DockerUnavailable(f"dockerd did not start ({why}); the end of {DOCKERD_LOG}:\n" + "\n".join(tail))
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
        raise DockerUnavailable("dockerd or mmdebstrap is missing, and only root can apt-get install docker.io mmdebstrap")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", "update", "-qq", timeout=600, env=env)
    run("apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker.io", "mmdebstrap",
        timeout=900, env=env)


def network_links() -> set[str]:
    """Names of the host's network interfaces."""
    return set(os.listdir("/sys/class/net"))


# ---- images

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
        "-t", CHAT_IMAGE, HERE, timeout=600, env={**os.environ, "DOCKER_BUILDKIT": "0"})


# ---- the stack

class Stack:
    """A deployed stack: its tasks' containers, Prometheus's API, load runs on its network.

    docker-compose.yml with test_swarm.compose.yml on top, the chat service on
    CHAT_IMAGE; env adds settings read at deploy time (SCALECHAT_REPLICAS, ...).
    """

    def __init__(self, name: str, env: dict[str, str] | None = None) -> None:
        self.name, self.env = name, dict(env or {})
        self.network, self.chat_service = f"{name}_default", f"{name}_chat"
        self.deployed = False

    def deploy(self) -> None:
        self.remove()  # what a run killed before its cleanup left
        self.deployed = True
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as docker-proxy binds
            try:
                s.bind(("0.0.0.0", 9090))
            except OSError:
                raise DockerUnavailable("port 9090 is taken: the stack's Prometheus publishes it")
        docker("stack", "deploy", "--resolve-image", "never", "--detach=true",
               "-c", "docker-compose.yml", "-c", OVERRIDE, self.name,
               cwd=HERE, env={**os.environ, **self.env, "SCALECHAT_IMAGE": CHAT_IMAGE})

    def remove(self) -> None:
        """Remove the stack, wait for its containers and network to go, then its volumes."""
        self.deployed = False
        docker("rm", "-f", f"{self.name}-load", check=False)
        docker("stack", "rm", self.name, check=False)
        wait_for(lambda: not docker("ps", "-aq", "--filter", f"label=com.docker.stack.namespace={self.name}"),
                 90, "the stack's containers gone", interval=1.0)
        wait_for(lambda: not docker("network", "ls", "-q", "--filter", f"name={self.network}"),
                 60, "the stack's network gone", interval=1.0)
        volumes = docker("volume", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={self.name}")
        if volumes:
            docker("volume", "rm", *volumes.split())

    def loadclient(self, out: Path, *args: str, log: str = "loadclient.log",
                   options: tuple[str, ...] = ()) -> subprocess.Popen:
        """Start loadclient.py with args in a container on the stack's network.

        out is its working folder (/out in there); its output goes to out/log;
        options go to docker run."""
        out.mkdir(parents=True, exist_ok=True)
        with open(out / log, "w") as output:
            return subprocess.Popen(
                ["docker", "run", "--rm", "--name", f"{self.name}-load", "--network", self.network,
                 "--user", "0:0", *options, "-v", f"{HERE}:/src:ro", "-v", f"{out}:/out", "-w", "/out",
                 CHAT_IMAGE, "python", "/src/loadclient.py", *args],
                stdout=output, stderr=subprocess.STDOUT)

    def chat_containers(self) -> list[dict]:
        """docker inspect of every running chat task's container."""
        ids = docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={self.chat_service}")
        return json.loads(docker("inspect", *ids.split())) if ids else []

    def healthy_chat_addresses(self) -> list[str]:
        """Overlay addresses of the chat containers that the image's HEALTHCHECK calls healthy."""
        return [c["NetworkSettings"]["Networks"][self.network]["IPAddress"] for c in self.chat_containers()
                if (c["State"].get("Health") or {}).get("Status") == "healthy"]

    def query(self, promql: str) -> dict[str, float]:
        """An instant query to the stack's Prometheus: {instance: value}."""
        url = f"{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as answer:
            result = json.load(answer)["data"]["result"]
        return {r["metric"].get("instance", ""): float(r["value"][1]) for r in result}

    def resolve(self, name: str) -> set[str]:
        """The addresses name has on the stack's network, as its containers see them."""
        answer = docker("run", "--rm", "--network", self.network, CHAT_IMAGE, "python", "-c",
                        f"import socket; print(*{{i[4][0] for i in socket.getaddrinfo({name!r}, 8081)}})")
        return set(answer.split())

    def update_state(self) -> str:
        return docker("service", "inspect", "--format",
                      "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}", self.chat_service)
