"""Review of the morning's merges (life, ids, ops3, agleft): regressions found, pinned black-box.

Real ``python -m connic run`` processes and real clients on loopback; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import write
from test_workers import Output, config

from conftest import ROOT, CliServer, Connect

# --- --workers: a worker that dies before it listens, while a child of it holds its link ------

HOLDING_AGENT = '''
import os
import signal
import subprocess
import sys

import connic


class Holding(connic.Agent):
    """Its start() starts a helper process (standard input inherited, as Popen does by default), then dies."""

    async def start(self) -> None:
        helper = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with open(os.environ["HELPERS"], "a") as pids:
            pids.write(f"{helper.pid}\\n")
        os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer, a segfault: nothing said to the parent

    async def respond(self, turn):
        yield turn.message
'''


def test_a_worker_killed_before_it_listens_while_its_child_holds_the_link_fails_the_start(tmp_path: Path) -> None:
    # A worker's link to its parent is its standard input, which every process it starts inherits
    # by default (an agent's helper, an MCP server started with Popen). Killed before it listened,
    # it said nothing, and the parent waited for the link's end-of-file, which the helper kept
    # from coming: it never saw the worker exit, and hung at start-up, serving nothing, silent.
    site = tmp_path / "site"
    site.mkdir()
    (site / "holding_agent.py").write_text(HOLDING_AGENT)
    path = write(
        tmp_path / "connic.toml", '[agents.holding]\nuse = "holding_agent:Holding"\n[[connectors]]\nresume_window = 0\n'
    )
    helpers = tmp_path / "helpers"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HELPERS": str(helpers),
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    log = tmp_path / "out.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "connic",
                "run",
                "--port",
                "0",
                "--workers",
                "2",
                "--secret",
                "s",
                "--config",
                str(path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for line in helpers.read_text().split() if helpers.exists() else []:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line), signal.SIGKILL)
    text = log.read_text()
    assert code == 1, f"the parent did not give up on a worker that died before listening:\n{text}"
    assert "before it was listening" in text, text
    assert "signal 9 (SIGKILL)" in text, text


# --- SIGHUP ignored (nohup): it stays ignored -------------------------------------------------


def _start_ignoring_sighup(*args: str) -> CliServer:
    """``python -m connic run --port 0 ARGS`` started as ``nohup`` starts it (SIGHUP ignored), past its banner."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "connic", "run", "--port", "0", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # as nohup starts it
    )
    assert proc.stdout is not None
    banner: list[str] = []
    port = None
    for line in proc.stdout:
        banner.append(line.rstrip("\n"))
        if m := re.search(r"listening on http://[^:]+:(\d+)", line):
            port = int(m.group(1))
        if line.startswith("Press Ctrl+C"):
            break
    if port is None:
        proc.kill()
        raise AssertionError("connic did not start:\n" + "\n".join(banner))
    return CliServer(proc, port, "s", banner)


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one-process", "workers-parent"])
async def test_a_server_started_with_sighup_ignored_keeps_serving_through_a_sighup(
    tmp_path: Path, connect: Connect, workers: list[str]
) -> None:
    # `nohup connic run &` ignores SIGHUP so that the server outlives the terminal it was started
    # from. connic took SIGHUP over regardless (to drain on it): closing that terminal shut the
    # server down. An ignored SIGHUP stays ignored, as Python keeps an ignored SIGINT ignored.
    server = await asyncio.to_thread(
        _start_ignoring_sighup, "--config", str(config(tmp_path)), "--secret", "s", *workers
    )
    output = Output(server)
    try:
        server.proc.send_signal(signal.SIGHUP)
        client = await connect(server.url, secret="s")
        await client.send({"id": "after-hup", "message": "still here"})
        frames = await client.until("stream_end")
        assert frames[-1]["full_response"] == "still here", frames
        # Had the SIGHUP begun a drain, this SIGTERM would be its second signal: stop at once, 143.
        server.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.proc.wait, 30)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    text = output.text()
    assert code == 0, text
    assert text.count("connic: shutting down") == 1 and "again" not in text, text
