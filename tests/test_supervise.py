"""A worker that survives its broker: ``tokenwarden run`` restarts it when it exits or stops
consuming, it exits rather than hang after an unrecoverable error, and on Redis the messages
of a lost connection cannot cause one.

The supervisor tests use stand-in children (small Python programs) so they run in a second
or two; two more supervise a real worker on the embedded default.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu.connection import Connection

from tests.conftest import service_url
from tokenwarden.worker.domain import db
from tokenwarden.worker.ops import supervisor
from tokenwarden.worker.ops.supervisor import HEARTBEAT_ENV, Stack, command
from tokenwarden.worker.runtime.redis_transport import use_fixed_channels


@pytest.fixture(autouse=True)
def _quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "RESTART_DELAY_S", 0.05)
    monkeypatch.setattr(supervisor, "STOP_GRACE_S", 2.0)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _wait(condition: Callable[[], object], stack: Stack, timeout: float = 30.0) -> None:
    """Run the supervisor's checks until ``condition`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        assert stack.check() is None, "the supervisor gave up"
        time.sleep(0.05)


@pytest.fixture
def stacks() -> Iterator[list[Stack]]:
    made: list[Stack] = []
    yield made
    for stack in made:
        stack.stop()


def _count(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


def test_a_worker_that_exits_is_started_again(tmp_path: Path, stacks: list[Stack]) -> None:
    starts = tmp_path / "starts"
    # Runs a while (not a failure at start), then exits as Celery does after an error.
    code = f"import time; open({str(starts)!r}, 'a').write('x '); time.sleep(0.3); exit(1)"
    stack = Stack({"worker": _python(code)}, heartbeat=())
    stacks.append(stack)
    stack.start()
    _wait(lambda: _count(starts) >= 3, stack)
    assert stack.restarts["worker"] >= 2


def test_a_child_that_keeps_failing_at_start_stops_everything(
    tmp_path: Path, stacks: list[Stack]
) -> None:
    stack = Stack(
        {"worker": _python("exit(2)"), "api": _python("import time; time.sleep(60)")},
        heartbeat=(),
    )
    stacks.append(stack)
    stack.start()
    started = time.monotonic()
    assert stack.wait_until_stopped() == 1
    assert time.monotonic() - started < 30
    assert stack.restarts["worker"] == supervisor.QUICK_EXITS_TO_GIVE_UP - 1
    assert stack.children["api"].poll() is not None, "the rest was not stopped"


def test_an_api_that_exits_stops_the_rest(stacks: list[Stack]) -> None:
    stack = Stack(
        {"api": _python("exit(1)"), "worker": _python("import time; time.sleep(60)")},
        heartbeat=(),
    )
    stacks.append(stack)
    stack.start()
    assert stack.wait_until_stopped() == 1
    assert "api" not in stack.restarts
    assert stack.children["worker"].poll() is not None


BEATING = (
    "import os, pathlib, time\n"
    f"path = pathlib.Path(os.environ[{HEARTBEAT_ENV!r}])\n"
    "while True:\n"
    "    path.touch()\n"
    "    time.sleep(0.1)\n"
)


def test_a_worker_whose_heartbeat_goes_stale_is_restarted(stacks: list[Stack]) -> None:
    # Beats for a moment, then goes on living without beating: alive, consuming nothing.
    silent = BEATING.replace("while True:", "for _ in range(5):") + "time.sleep(600)\n"
    stack = Stack({"worker": _python(silent)}, heartbeat_stale_s=1.0)
    stacks.append(stack)
    stack.start()
    first = stack.children["worker"]
    _wait(lambda: stack.restarts.get("worker", 0) >= 1, stack)
    assert first.poll() is not None, "the silent worker was left running"
    assert stack.children["worker"].pid != first.pid


def test_a_worker_that_keeps_beating_is_left_alone(stacks: list[Stack]) -> None:
    stack = Stack({"worker": _python(BEATING)}, heartbeat_stale_s=1.0)
    stacks.append(stack)
    stack.start()
    until = time.monotonic() + 3.0
    while time.monotonic() < until:
        assert stack.check() is None
        time.sleep(0.05)
    assert not stack.restarts
    assert stack.children["worker"].poll() is None


def _embedded(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARDEN_")}
    env["TOKENWARDEN_HOME"] = str(home)
    db.upgrade(f"sqlite:///{(home / 'tokenwarden.db').resolve()}")
    return env


def _fresh(path: Path | None, within_s: float) -> bool:
    return path is not None and path.exists() and time.time() - path.stat().st_mtime < within_s


@pytest.mark.slow
def test_a_real_worker_beats_while_it_consumes_and_is_restarted_when_it_stops(
    tmp_path: Path, stacks: list[Stack]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    stack = Stack(
        {"worker": command("worker", "--concurrency", "1")},
        env=_embedded(home),
        heartbeat_stale_s=15.0,
    )
    stacks.append(stack)
    stack.start()
    beat = stack.heartbeat_file("worker")
    _wait(lambda: _fresh(beat, 10), stack, timeout=90)
    # A worker that is alive but does nothing, as one stuck in its own shutdown.
    first = stack.children["worker"]
    os.kill(first.pid, signal.SIGSTOP)
    try:
        _wait(lambda: stack.restarts.get("worker", 0) >= 1, stack, timeout=90)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
    assert first.poll() is not None
    stopped_at = time.time()
    _wait(lambda: _fresh(beat, time.time() - stopped_at), stack, timeout=90)


@pytest.mark.slow
def test_a_worker_that_cannot_stop_after_an_unrecoverable_error_exits(tmp_path: Path) -> None:
    """Celery's warm stop after "Unrecoverable error" may hang; the process exits anyway."""
    script = tmp_path / "stuck.py"
    script.write_text(
        "import sys, time, types\n"
        "from tokenwarden.worker.runtime import signals\n"
        "signals.UNRECOVERABLE_EXIT_AFTER_S = 0.5\n"
        "consumer = signals.DeadLetteringConsumer.__new__(signals.DeadLetteringConsumer)\n"
        "consumer.controller = types.SimpleNamespace(exitcode=1)\n"
        "consumer.close()  # what Celery calls as it begins to stop\n"
        "time.sleep(60)  # a stop that never ends\n"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 20
    assert "worker.exit_forced" in done.stdout + done.stderr


def _lose_the_connection_with_an_unacked_message(fixed: bool) -> tuple[Any, Any]:
    """The state a Redis outage left the worker in when it logged "Unrecoverable error".

    A task holds an unacknowledged message; Celery's collection of the broken connection has
    detached the transport from it, and the message's channel has dropped its client pools
    (the first thing its ``close()`` does) without getting any further.
    """
    url = service_url("redis")
    assert url is not None
    connection: Any = Connection(url)  # type: ignore[no-untyped-call]
    if fixed:
        use_fixed_channels(connection)
    queue: Any = connection.SimpleQueue(f"tw-test-{uuid.uuid4().hex[:8]}")
    try:
        queue.put({"n": 1})
        message = queue.get(block=True, timeout=10)
    finally:
        queue.queue(connection.default_channel).delete()
    connection.transport.client = None
    message.channel._disconnect_pools()
    return connection, message


@pytest.mark.redis
def test_a_message_of_a_lost_redis_connection_fails_as_a_connection_error() -> None:
    connection, message = _lose_the_connection_with_an_unacked_message(fixed=True)
    # The task finishes after the worker reconnected and acknowledges on the old channel:
    # a connection error, which Celery logs ("Couldn't ack") and survives.
    with pytest.raises(connection.connection_errors, match="connection of this channel"):
        message.ack()
    message.channel.do_restore = False  # nothing to give back at exit: the test is over


@pytest.mark.redis
def test_kombu_alone_fails_there_with_an_attribute_error() -> None:
    """The failure the fix is for; once kombu no longer fails so, the fix can go."""
    _, message = _lose_the_connection_with_an_unacked_message(fixed=False)
    with pytest.raises(AttributeError, match="hostname"):
        message.ack()
    message.channel.do_restore = False
