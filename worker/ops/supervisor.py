"""Running the API, the worker and the scheduler side by side as child processes.

``tokenwarden run`` keeps them running: a worker or scheduler that exits is started again
(after a pause that grows while it keeps failing at once), and so is a worker whose heartbeat
file has gone stale, the sign of a process that is alive but consumes nothing. Any other
child that stops, or one that fails at start too often in a row, stops the rest.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

STOP_GRACE_S = 15.0
HEARTBEAT_ENV = "TOKENWARDEN_WORKER_HEARTBEAT_FILE"
# The worker touches its heartbeat file every 5 s while it consumes. Past this age it is
# restarted; a worker waiting for a broker that is down beats no more than a stuck one,
# and starting it again costs nothing.
HEARTBEAT_STALE_S = 120.0
RESTART_DELAY_S = 1.0
RESTART_DELAY_MAX_S = 30.0
# A child that exits sooner than this after its start "failed at start"; after this many
# such failures in a row the configuration is wrong, and restarting it again is pointless.
QUICK_EXIT_S = 10.0
QUICK_EXITS_TO_GIVE_UP = 5
TICK_S = 0.2
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def command(*args: str) -> list[str]:
    """The ``tokenwarden`` command line of this very interpreter."""
    return [sys.executable, "-m", "tokenwarden.worker.cli", *args]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _say(message: str) -> None:
    print(f"tokenwarden: {message}", file=sys.stderr, flush=True)


@dataclass
class Stack:
    """Child processes that live and die together; some are restarted when they stop."""

    roles: Mapping[str, Sequence[str]]
    env: Mapping[str, str] | None = None
    output: IO[bytes] | None = None
    restart: Collection[str] = ("worker", "scheduler")
    heartbeat: Collection[str] = ("worker",)
    heartbeat_stale_s: float = HEARTBEAT_STALE_S
    # The signal a child gets from the kernel when the supervisor dies without stopping it
    # (SIGKILL, say); SIGTERM unless named here.
    orphan_signal: Mapping[str, int] = field(default_factory=dict)
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    # When each child started (wall clock, as file times are), restarts waiting for their
    # time, failures at start in a row, and the folder of the heartbeat files.
    _started: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _due: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _quick_exits: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _folder: Path | None = field(default=None, init=False, repr=False)

    def start(self) -> None:
        if self.heartbeat and self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="tokenwarden-run-"))
        for name in self.roles:
            self._spawn(name)

    def heartbeat_file(self, name: str) -> Path | None:
        if name not in self.heartbeat or self._folder is None:
            return None
        return self._folder / f"{name}.alive"

    def _spawn(self, name: str) -> None:
        env = dict(self.env) if self.env is not None else dict(os.environ)
        beat = self.heartbeat_file(name)
        if beat is not None:
            beat.unlink(missing_ok=True)
            env[HEARTBEAT_ENV] = str(beat)
        # Each child gets its own process group, so a Ctrl-C reaches us once and we
        # stop the children in order instead of all of them racing at once.
        self.children[name] = subprocess.Popen(  # noqa: S603 - our own command
            list(self.roles[name]),
            env=env,
            stdout=self.output,
            stderr=self.output,
            start_new_session=True,
            preexec_fn=_die_with(  # noqa: PLW1509 - one prctl call, no locks
                os.getpid(), self.orphan_signal.get(name, signal.SIGTERM)
            ),
        )
        self._started[name] = time.time()

    def exited(self) -> str | None:
        """The name of a child that has stopped, if any."""
        for name, child in self.children.items():
            if child.poll() is not None:
                return name
        return None

    def silent_for(self, name: str) -> float | None:
        """Seconds since the child last touched its heartbeat (or started); None if it has none."""
        beat = self.heartbeat_file(name)
        if beat is None or name not in self._started:
            return None
        last = self._started[name]
        with suppress(FileNotFoundError):
            last = max(last, beat.stat().st_mtime)
        return time.time() - last

    def check(self) -> str | None:
        """Restart children that stopped or went silent; the name of one that may not be."""
        now = time.monotonic()
        for name, due in list(self._due.items()):
            if now >= due:
                del self._due[name]
                self._spawn(name)
                self.restarts[name] = self.restarts.get(name, 0) + 1
        for name, child in self.children.items():
            if name in self._due:
                continue
            code = child.poll()
            silent = self.silent_for(name)
            if code is None and (silent is None or silent <= self.heartbeat_stale_s):
                continue
            if name not in self.restart:
                return name
            ran_s = time.time() - self._started[name]
            if code is None:
                _say(f"the {name} has not consumed for {silent:.0f} s; restarting it")
                _end(child)
            quick = self._quick_exits.get(name, 0) + 1 if ran_s < QUICK_EXIT_S else 0
            self._quick_exits[name] = quick
            if quick >= QUICK_EXITS_TO_GIVE_UP:
                _say(f"the {name} failed at start {quick} times in a row; giving up")
                return name
            delay = min(RESTART_DELAY_S * 2 ** max(quick - 1, 0), RESTART_DELAY_MAX_S)
            if code is not None:
                _say(f"the {name} exited with status {code}; starting it again in {delay:.0f} s")
            self._due[name] = now + delay
        return None

    def stop(self, grace_s: float | None = None) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + (STOP_GRACE_S if grace_s is None else grace_s)
        for child in self.children.values():
            _end(child, max(0.1, deadline - time.monotonic()), signalled=True)
        self._due.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def wait_until_stopped(self) -> int:
        """Block until Ctrl-C or SIGTERM, keeping the children running; then stop them all.

        Returns 1 when a child that is not restarted stopped (or one kept failing at start).
        """
        stopping = False

        def _stop(signum: int, frame: FrameType | None) -> None:
            nonlocal stopping
            stopping = True

        # SIGHUP too: closing the terminal that runs the stack stops it like Ctrl-C.
        stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {s: signal.signal(s, _stop) for s in stops}
        died = None
        try:
            while not stopping and died is None:
                died = self.check()
                time.sleep(TICK_S)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self.stop()
        if died is not None:
            _say(f"the {died} stopped; stopped the rest")
            return 1
        return 0


def _die_with(parent: int, signum: int) -> Callable[[], None] | None:
    """What a child runs before it starts: on Linux, ask the kernel for ``signum`` when its
    parent dies (PR_SET_PDEATHSIG), so that a supervisor killed with SIGKILL leaves no
    API, worker or scheduler behind holding the port; and exit at once if the parent is
    already gone."""
    if not sys.platform.startswith("linux"):
        return None
    libc = _libc()  # loaded here: the child between fork and exec takes no lock

    def prepare() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return prepare


def signal_when_parent_dies(signum: int) -> bool:
    """Ask the kernel to send this process ``signum`` when its parent dies
    (PR_SET_PDEATHSIG), as :func:`_die_with` asks for a child; whether it could (Linux
    only)."""
    if not sys.platform.startswith("linux"):
        return False
    _libc().prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    return True


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host``:``port`` (another stack, say)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _end(
    child: subprocess.Popen[bytes], grace_s: float | None = None, *, signalled: bool = False
) -> None:
    """Stop ``child`` with SIGTERM, then its whole process group (a prefork pool too) with
    SIGKILL if it is still there after ``grace_s`` (default ``STOP_GRACE_S``)."""
    if child.poll() is None and not signalled:
        child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=STOP_GRACE_S if grace_s is None else grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            child.kill()
        child.wait()


def wait_for_http(url: str, timeout_s: float = 30.0) -> bool:
    import httpx  # here: every command imports this module, few of them wait for the API

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env
