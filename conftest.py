"""Shared pytest fixtures: real server processes on free loopback ports (helpers in testkit.py),
and the seed of the run's random choices."""
from __future__ import annotations

import os
import random
import shlex

import pytest

from testkit import start_server

SEED_VARIABLE = "SCALECHAT_TEST_SEED"
SEED = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    """One seed for every random choice of the run: $SCALECHAT_TEST_SEED, or one drawn now."""
    chosen = os.environ.get(SEED_VARIABLE)
    config.stash[SEED] = int(chosen) if chosen else random.SystemRandom().randrange(1 << 32)


def pytest_report_header(config: pytest.Config) -> str:
    seed = config.stash[SEED]
    return f"seed: {seed} ({SEED_VARIABLE}={seed} repeats this run's random choices)"


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """The seed again at the end, where -q shows it too (it has no header)."""
    seed = config.stash[SEED]
    terminalreporter.write_line(f"seed {seed}: {SEED_VARIABLE}={seed} repeats this run's random choices")


def replay_command(config: pytest.Config, nodeid: str) -> str:
    """The command that runs one test again with this run's seed."""
    return f"{SEED_VARIABLE}={config.stash[SEED]} python -m pytest -q {shlex.quote(nodeid)}"


@pytest.fixture(scope="session")
def seed(pytestconfig: pytest.Config) -> int:
    """The run's seed: a test that draws anything at random draws it from this."""
    return pytestconfig.stash[SEED]


@pytest.fixture
def replay(request: pytest.FixtureRequest, seed: int) -> str:
    """The command that runs this test again with this run's seed, for a failure's message."""
    return replay_command(request.config, request.node.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed test that drew from the seed names, under its failure, the command that replays it."""
    report = yield
    if report.failed and "seed" in getattr(item, "fixturenames", ()):
        command = replay_command(item.config, item.nodeid)
        if command not in str(report.longrepr):
            report.sections.append(("replay", command))
    return report


def server_factory(scope: str):
    """A fixture of that scope: start(*args, port=, metrics_port=, env=) starts a server with
    quiet logs and those flags (testkit.start_server); every server started is stopped after."""
    @pytest.fixture(scope=scope)
    def factory():
        started = []

        def start(*args: str, **options):
            started.append(start_server("--log-level", "WARNING", *args, **options))
            return started[-1]
        yield start
        for s in started:
            s.stop()
    return factory


serve = server_factory("function")
serve_shared = server_factory("module")       # for tests that only read: one server for many


@pytest.fixture
def server(serve):
    """A fresh single-process server with default settings for one test."""
    return serve()
