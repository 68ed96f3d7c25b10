"""The README's tour, run as a reader would: its commands exactly as written.

The tour's block is read from README.md itself, so a command changed there is
a command tested here. The scripts are copied into a fresh folder (results/
lands there) and each command runs in it in order. Two of them want a person:
`xdg-open` is replaced by fetching the page it opens, and the terminal client
gets its typed lines on standard input. The server listens on the README's
port, 8080, as written.
"""
from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPTS = ("scalechat.py", "loadclient.py", "csvprocess.py", "plot.py")


def tour_commands() -> list[str]:
    """The commands of the README's "A tour" block, comments stripped."""
    text = (HERE / "README.md").read_text()
    block = re.search(r"^## A tour\n\n```bash\n(.*?)^```", text, re.MULTILINE | re.DOTALL).group(1)
    commands = (re.sub(r"\s+#\s.*$", "", line).strip() for line in block.splitlines())
    return [c for c in commands if c]


def wait_http(url: str, timeout: float = 15.0) -> bytes:
    """The body at url, once it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return urllib.request.urlopen(url, timeout=2).read()
        except OSError:
            assert time.monotonic() < deadline, f"{url} never answered"
            time.sleep(0.1)


@pytest.mark.slow
def test_the_readme_tour_runs_as_written(tmp_path):
    commands = tour_commands()
    assert [c.split()[:2] for c in commands] == [
        ["python", "scalechat.py"], ["xdg-open", "http://localhost:8080/#lobby"],
        ["python", "loadclient.py"], ["python", "loadclient.py"], ["python", "csvprocess.py"],
        ["python", "plot.py"]], commands
    for name in SCRIPTS:
        shutil.copy(HERE / name, tmp_path / name)
    shutil.copytree(HERE / "static", tmp_path / "static")
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", 8080)) != 0, "port 8080 is taken: the tour needs it"

    def run(command: str, **kwargs) -> subprocess.CompletedProcess:
        argv = shlex.split(command)
        argv[0] = sys.executable if argv[0] == "python" else argv[0]
        return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, check=False, **kwargs)

    argv = shlex.split(commands[0])
    server = subprocess.Popen([sys.executable, *argv[1:]], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        page = wait_http(commands[1].split()[1].split("#")[0])          # what xdg-open shows
        assert b"<html" in page.lower() and b"app.js" in page
        chat = run(commands[2], input="hello from the tour\n", timeout=60)
        assert chat.returncode == 0, chat.stderr
        assert re.search(r"^\d\d:\d\d:\d\d guest-\d+: hello from the tour$", chat.stdout, re.MULTILINE), \
            chat.stdout                                 # piped input is sent, and acked, before leaving
        load = run(commands[3], timeout=120)
        assert load.returncode == 0, load.stdout + load.stderr
        assert "delivery ratio 1.000000" in load.stdout, load.stdout
        processed = run(commands[4], timeout=120)
        assert processed.returncode == 0, processed.stderr
        (run_dir,) = (tmp_path / "results").iterdir()
        scenarios = [p.stem.removeprefix("summary_") for p in (run_dir / "processed").glob("summary_*.json")]
        assert len(scenarios) == 1, scenarios          # the tour's one load-test run
        plotted = run(commands[5], timeout=120)
        assert plotted.returncode == 0, plotted.stderr
        # The three run-wide figures and one latency-over-time figure per scenario.
        assert sorted(p.name for p in (run_dir / "plots").iterdir()) == sorted(
            ["latency-percentiles.png", "latency-mean.png", "delivery.png",
             *(f"latency-over-time_{name}.png" for name in scenarios)])
    finally:
        server.terminate()
        server.wait(15)
