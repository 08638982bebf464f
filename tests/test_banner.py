"""The start-up banner of ``python -m connic run``: every link in it works (docs/cli.md).

The playground's link carries the generated secret in its fragment (never sent to the
server, so never in a log); a wildcard ``--host`` is shown as addresses a browser can use;
a port in use says how to pick another.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, require_chromium

LINK = re.compile(r"^  playground: (http://\S+)$")


class Run:
    """``python -m connic run --port 0 ARGS`` with standard error (the logs) in a file of its own."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("CONNIC_SECRET", None)
        self.log = Path(tempfile.mkstemp(prefix="connic-banner-", suffix=".log")[1])
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "connic", "run", "--port", "0", *args],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
                cwd=ROOT,
            )
        assert self.proc.stdout is not None
        self.banner: list[str] = []
        for line in self.proc.stdout:
            self.banner.append(line.rstrip("\n"))
            if line.startswith("Press Ctrl+C"):
                break
        else:
            raise AssertionError(f"connic did not start: {self.banner} {self.log.read_text()}")

    def links(self) -> list[str]:
        return [m.group(1) for line in self.banner if (m := LINK.match(line))]

    def secret(self) -> str:
        (line,) = [line for line in self.banner if line.startswith("  secret (generated")]
        return line.rsplit(": ", 1)[1]

    def stop(self) -> str:
        """Stop with SIGTERM; standard error, all of it."""
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.communicate(timeout=30)
        text = self.log.read_text()
        self.log.unlink()
        return text


@pytest.fixture
def run() -> Iterator[Any]:
    started: list[Run] = []

    def start(*args: str) -> Run:
        started.append(Run(*args))
        return started[-1]

    yield start
    for item in started:
        if item.proc.poll() is None:
            item.proc.kill()
            item.proc.communicate()
        item.log.unlink(missing_ok=True)


def urls(banner: list[str]) -> list[str]:
    return re.findall(r"\w+://\S+", "\n".join(banner))


def test_playground_link_has_the_secret_in_its_fragment_and_connects(run: Any) -> None:
    require_chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    from conftest import CHROMIUM, CHROMIUM_ARGS

    server = run("--log-level", "DEBUG")
    secret = server.secret()
    port = int(re.search(r"listening on http://127\.0\.0\.1:(\d+)$", server.banner[0]).group(1))  # type: ignore[union-attr]
    assert port != 0  # --port 0: the banner shows the port picked
    assert server.links() == [f"http://127.0.0.1:{port}/#secret={secret}"]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.goto(server.links()[0])
            page.wait_for_selector("#message:enabled")  # connected, with no typing
            assert page.url == f"http://127.0.0.1:{port}/"
            page.fill("#message", "hello **banner**")
            page.press("#message", "Enter")
            page.wait_for_selector('.turn.agent[data-state="done"] strong')
        finally:
            browser.close()
    logs = server.stop()
    assert "session ended session=" in logs, logs  # the logs did speak of the session
    assert [line for line in logs.splitlines() if secret in line] == []


def test_a_chosen_secret_is_never_printed_and_no_auth_links_to_connect(run: Any) -> None:
    chosen = run("--secret", "my-own-secret")
    assert "my-own-secret" not in "\n".join(chosen.banner)
    assert [link.split("/", 3)[3] for link in chosen.links()] == [""]  # the plain page
    open_server = run("--no-auth")
    assert [link.split("/", 3)[3] for link in open_server.links()] == ["#connect"]


@pytest.mark.parametrize(("host", "loopback"), [("0.0.0.0", "127.0.0.1"), ("::", "[::1]")])
def test_a_wildcard_host_shows_addresses_that_work(run: Any, host: str, loopback: str) -> None:
    if host == "::":
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 on this machine")
    server = run("--host", host)
    found = urls(server.banner)
    assert found, server.banner
    assert not [url for url in found if "0.0.0.0" in url or "[::]" in url], server.banner
    assert re.fullmatch(
        rf"connic \S+ listening on http://{re.escape(loopback)}:\d+ \(all IPv[46] interfaces\)", server.banner[0]
    )
    links = server.links()
    assert links[0].startswith(f"http://{loopback}:") and links[0].endswith(f"/#secret={server.secret()}")
    # Every other address printed is this machine's, not loopback, each with its playground link.
    others = [line.split("http://", 1)[1] for line in server.banner if line.startswith("  also reachable at ")]
    assert len(links) == 1 + len(others)
    assert server.stop().count("Traceback") == 0


def test_a_port_in_use_says_how_to_pick_another() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "connic", "run", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if k != "CONNIC_SECRET"},
        )
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("connic: error: ") and "address already in use" in lines[0], lines[0]
    assert lines[0].endswith("; pick another with --port N, or --port 0 for any free port (the banner shows it)")
