"""``tokenwarden run`` as a user meets it: its port, a second run, and how it ends.

Each test starts the real stack (API, worker, scheduler) on the embedded default in a
throw-away home, as ``make run`` does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TOKENWARDEN, clean_env
from tokenwarden.worker.ops.supervisor import free_port

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc"
)


def _parents() -> dict[int, int]:
    """Every live process's parent, read from /proc (zombies count as gone)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            found[int(entry.name)] = int(parent)
    return found


def _descendants(pid: int) -> set[int]:
    parents = _parents()
    found: set[int] = set()
    todo = [pid]
    while todo:
        current = todo.pop()
        children = {child for child, parent in parents.items() if parent == current}
        todo.extend(children - found)
        found |= children
    return found


def _alive(pids: set[int]) -> set[int]:
    return pids & set(_parents())


def _named(pids: set[int]) -> list[str]:
    named = []
    for pid in sorted(pids):
        try:
            line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        named.append(f"{pid} {line.strip()}")
    return named


def _until(condition: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def started(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, dict[str, str]]]:
    """``tokenwarden run --port P`` up and answering; stopped (and its tree) afterwards."""
    port = free_port()
    env = clean_env(TOKENWARDEN_HOME=str(tmp_path / "home"))
    output = (tmp_path / "run.log").open("wb")
    stack = subprocess.Popen(
        [str(TOKENWARDEN), "run", "--port", str(port)],
        env=env,
        stdout=output,
        stderr=output,
    )

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    tree: set[int] = set()
    try:
        assert _until(healthy, 90), "run --port did not serve the API on that port"
        log = tmp_path / "run.log"
        assert _until(lambda: b"tokenwarden is running" in log.read_bytes(), 30)
        tree = _descendants(stack.pid)
        yield stack, port, env
    finally:
        tree |= _descendants(stack.pid)
        if stack.poll() is None:
            stack.send_signal(signal.SIGINT)
            try:
                stack.wait(30)
            except subprocess.TimeoutExpired:
                stack.kill()
        for pid in _alive(tree):
            os.kill(pid, signal.SIGKILL)
        output.close()


def test_a_second_run_on_a_busy_port_says_so_at_once(
    started: tuple[subprocess.Popen[bytes], int, dict[str, str]],
) -> None:
    _, port, env = started
    began = time.monotonic()
    second = subprocess.run(
        [str(TOKENWARDEN), "run"],
        env={**env, "TOKENWARDEN_API_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == 2
    [line] = second.stderr.strip().splitlines()
    assert line.startswith(f"error: port {port} on 127.0.0.1 is in use")
    assert "TOKENWARDEN_API_PORT" in line
    assert "--port" in line
    assert "running" not in second.stdout
    assert time.monotonic() - began < 10  # not the 14 s of a stack that dies later


def test_killing_run_leaves_no_child_behind(
    started: tuple[subprocess.Popen[bytes], int, dict[str, str]],
) -> None:
    stack, port, _ = started
    tree = _descendants(stack.pid)
    assert len(tree) >= 3  # the API, the worker and the scheduler, at least
    stack.kill()  # SIGKILL: the supervisor gets no chance to stop them itself
    stack.wait(10)
    assert _until(lambda: not _alive(tree), 5), f"left running: {_named(_alive(tree))}"
    # And the port is free again for the next run.
    assert _until(lambda: not _listening(port), 5)


def test_closing_the_terminal_stops_the_stack(
    started: tuple[subprocess.Popen[bytes], int, dict[str, str]],
) -> None:
    stack, _, _ = started
    tree = _descendants(stack.pid)
    stack.send_signal(signal.SIGHUP)
    assert stack.wait(60) == 0
    assert _until(lambda: not _alive(tree), 5), f"left running: {_named(_alive(tree))}"


def _listening(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
    except httpx.HTTPError:
        return False
    return True


def test_an_idle_stack_is_quiet(
    started: tuple[subprocess.Popen[bytes], int, dict[str, str]], tmp_path: Path
) -> None:
    """The re-drives run every 10 s; with nothing to republish they leave no line at all."""
    log = tmp_path / "run.log"
    before = log.read_text()
    time.sleep(12)  # more than one re-drive period
    lines = log.read_text()[len(before) :].splitlines()
    assert [line for line in lines if "redrive" in line] == []
