"""Running the API, the worker and the scheduler side by side as child processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import IO

import httpx

STOP_GRACE_S = 15.0


def command(*args: str) -> list[str]:
    """The ``tokenwarden`` command line of this very interpreter."""
    return [sys.executable, "-m", "worker.cli", *args]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Stack:
    """Child processes that live and die together."""

    roles: Mapping[str, Sequence[str]]
    env: Mapping[str, str] | None = None
    output: IO[bytes] | None = None
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self) -> None:
        for name, argv in self.roles.items():
            # Each child gets its own process group, so a Ctrl-C reaches us once and we
            # stop the children in order instead of all of them racing at once.
            self.children[name] = subprocess.Popen(  # noqa: S603 - our own command
                list(argv),
                env=dict(self.env) if self.env is not None else None,
                stdout=self.output,
                stderr=self.output,
                start_new_session=True,
            )

    def exited(self) -> str | None:
        """The name of a child that has stopped, if any."""
        for name, child in self.children.items():
            if child.poll() is not None:
                return name
        return None

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def wait_until_stopped(self) -> int:
        """Block until Ctrl-C, SIGTERM or a child's exit; then stop the rest."""
        stopping = False

        def _stop(signum: int, frame: FrameType | None) -> None:
            nonlocal stopping
            stopping = True

        previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stopping and self.exited() is None:
                time.sleep(0.2)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        died = None if stopping else self.exited()
        self.stop()
        if died is not None:
            print(f"tokenwarden: the {died} stopped; stopped the rest", file=sys.stderr)
            return 1
        return 0


def wait_for_http(url: str, timeout_s: float = 30.0) -> bool:
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
