"""``tokenwarden api --workers N``: several processes on one port, each a guarded API.

Real processes on loopback: the supervisor binds a socket for each process and starts them;
which process holds a client's connection is read from ``/proc`` (the socket's inode in
``/proc/net/tcp``, and the process whose descriptors name it), so each test can tell that
both processes served, not merely that the port answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import clean_env, fresh_postgres_database
from tests.stack import KEY, LiveStack, event, stack_env
from tokenwarden.producer.serving import HEADER_TIMEOUT_S
from tokenwarden.worker.domain import db
from tokenwarden.worker.ops.supervisor import STOP_GRACE_S, command, free_port, port_in_use

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc"),
]

WORKERS = 2
# What uvicorn logs, at level info, once a process's app is started.
STARTED = "Application startup complete."
# Connections opened one after another until each process holds one: which process accepts
# a new connection is a race between them, so a few suffice but none is guaranteed.
MAX_TRIES = 200


@dataclass
class Api:
    stack: LiveStack

    @property
    def port(self) -> int:
        return self.stack.port

    @property
    def pid(self) -> int:
        return self.stack.processes["api"].pid


def start_api(stack: LiveStack, *args: str) -> None:
    """``tokenwarden api`` with ``args``, its output in the stack's api log; returns once
    :data:`WORKERS` processes have started their app."""
    logs = stack.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / "api.log").open("ab") as out:
        stack.processes["api"] = subprocess.Popen(
            command("api", "--port", str(stack.port), *args),
            env=stack.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=stack.home,
            start_new_session=True,
        )
    stack.wait_for(
        lambda: stack.log("api").count(STARTED) >= WORKERS,
        timeout=90,
        message=f"{WORKERS} API processes to start",
    )


def serving_processes(supervisor: int) -> list[int]:
    """The processes the supervisor started to serve (not multiprocessing's tracker)."""
    found = []
    for task in Path(f"/proc/{supervisor}/task").glob("*"):
        for child in (task / "children").read_text().split():
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue  # gone meanwhile
            if b"spawn_main" in argv:
                found.append(int(child))
    return sorted(found)


def owner(api_port: int, client: socket.socket, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the server side of ``client``'s connection to ``api_port``."""
    client_port = client.getsockname()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == api_port and int(remote.split(":")[1], 16) == (
            client_port
        ):
            inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def events_request(events: list[dict[str, object]]) -> bytes:
    """A keep-alive POST of ``events``."""
    body = json.dumps(events).encode()
    return (
        b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def read_answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """One whole answer on ``sock``: its head and its body."""
    sock.settimeout(30)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"the API hung up: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"the API hung up: {received!r}"
        body += chunk
    return head, body


def connections_on_every_process(
    api: Api, pids: list[int], first: Callable[[], bytes], exits: ExitStack
) -> dict[int, list[socket.socket]]:
    """Connections that sent ``first()``, opened one by one until each of ``pids`` holds one."""
    held: dict[int, list[socket.socket]] = {pid: [] for pid in pids}
    for _ in range(MAX_TRIES):
        sock = exits.enter_context(socket.create_connection(("127.0.0.1", api.port)))
        sock.sendall(first())
        for _wait in range(50):  # accepted by a process within a moment
            pid = owner(api.port, sock, pids)
            if pid is not None:
                held[pid].append(sock)
                break
            time.sleep(0.01)
        if all(held.values()):
            return held
    raise AssertionError(f"after {MAX_TRIES} connections, processes holding none: {held}")


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    home = tmp_path_factory.mktemp("workers")
    with ExitStack() as exits:
        if request.param == "postgres":
            url = exits.enter_context(fresh_postgres_database())
            env = stack_env(home, {"TOKENWARDEN_DATABASE_URL": url})
        else:
            url = f"sqlite:///{home / 'tokenwarden.db'}"
            env = stack_env(home, {})
            db.upgrade(url)
        stack = LiveStack(home=home, env=env, database_url=url, port=free_port())
        start_api(stack, "--workers", str(WORKERS))
        try:
            yield Api(stack)
        finally:
            stack.stop()


def test_two_processes_answer_events_on_one_port_and_commit_them(api: Api) -> None:
    pids = serving_processes(api.pid)
    assert len(pids) == WORKERS, pids
    assert api.pid not in pids

    sent: list[str] = []

    def batch() -> bytes:
        events = [event("membership.removed", {"org_id": "acme", "user_id": "bob"})]
        events.append(event("membership.removed", {"org_id": "acme", "user_id": "carol"}))
        sent.extend(str(each["id"]) for each in events)
        return events_request(events)

    with ExitStack() as exits:
        held = connections_on_every_process(api, pids, batch, exits)
        for pid, socks in held.items():
            for sock in socks:
                head, body = read_answer(sock)
                assert head.startswith(b"HTTP/1.1 202 "), (pid, head, body)
            # The connection is kept: the same process takes the next request on it.
            sock.sendall(batch())
            head, body = read_answer(sock)
            assert head.startswith(b"HTTP/1.1 202 "), (pid, head, body)
            assert owner(api.port, sock, pids) == pid

    stored = api.stack.events(*sent)
    assert sorted(row["id"] for row in stored) == sorted(sent)
    assert {row["status"] for row in stored} == {"pending"}  # no worker runs here


def test_a_client_dripping_headers_is_cut_off_by_every_process(api: Api) -> None:
    pids = serving_processes(api.pid)
    partial = b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    with ExitStack() as exits:
        held = connections_on_every_process(api, pids, lambda: partial, exits)
        began = time.monotonic()

        async def drip(sock: socket.socket) -> tuple[float, bytes]:
            reader, writer = await asyncio.open_connection(sock=sock)
            try:
                while time.monotonic() - began < HEADER_TIMEOUT_S + 10:
                    try:
                        data = await asyncio.wait_for(reader.read(65536), 0.5)
                    except TimeoutError:
                        writer.write(b"X-Slow: 1\r\n")
                        await writer.drain()
                        continue
                    if not data:
                        return time.monotonic() - began, b""
                    return time.monotonic() - began, data
            except ConnectionError:
                return time.monotonic() - began, b""
            finally:
                writer.close()
            return float("inf"), b""

        async def all_of_them() -> dict[int, list[tuple[float, bytes]]]:
            cut = {
                pid: await asyncio.gather(*(drip(sock) for sock in socks))
                for pid, socks in held.items()
            }
            return {pid: list(each) for pid, each in cut.items()}

        ends = asyncio.run(all_of_them())
    for pid, cut in ends.items():
        for took, answer in cut:
            # Opened a moment before ``began``: the deadline counts from the first bytes.
            assert took < HEADER_TIMEOUT_S + 2, f"process {pid} kept a slow client {took:.1f} s"
            assert answer.startswith(b"HTTP/1.1 408 "), (pid, answer)


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (("--workers", "0"), {}, "error: Invalid value for '--workers': 0 is not in the range"),
        (("--workers", "two"), {}, "error: Invalid value for '--workers': 'two' is not a valid"),
        (
            (),
            {"TOKENWARDEN_API_WORKERS": "0"},
            "error: TOKENWARDEN_API_WORKERS: must be a whole number of processes, at least 1",
        ),
        (
            (),
            {"TOKENWARDEN_API_WORKERS": "many"},
            "error: TOKENWARDEN_API_WORKERS: Input should be a valid integer",
        ),
    ],
    ids=["option-0", "option-word", "setting-0", "setting-word"],
)
def test_a_bad_process_count_is_refused_with_one_line(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], says: str
) -> None:
    port = free_port()
    done = subprocess.run(
        command("api", "--port", str(port), *args),
        env=clean_env(TOKENWARDEN_HOME=str(tmp_path), **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(says), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert not port_in_use("127.0.0.1", port)


def _stopped(pids: list[int]) -> bool:
    return not any(Path(f"/proc/{pid}").exists() for pid in pids)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopping_the_supervisor_stops_every_process_and_frees_the_port(
    tmp_path: Path, signum: int
) -> None:
    """``TOKENWARDEN_API_WORKERS`` alone makes the processes; SIGTERM stops them as a user
    expects, and a supervisor killed outright takes them along (nothing keeps the port)."""
    url = f"sqlite:///{tmp_path / 'tokenwarden.db'}"
    db.upgrade(url)
    env = stack_env(tmp_path, {"TOKENWARDEN_API_WORKERS": str(WORKERS)})
    stack = LiveStack(home=tmp_path, env=env, database_url=url, port=free_port())
    start_api(stack)
    supervisor = stack.processes["api"].pid
    try:
        pids = serving_processes(supervisor)
        assert len(pids) == WORKERS
        assert httpx.get(f"{stack.api_url}/healthz", timeout=10).status_code == 200
        os.kill(supervisor, signum)  # the supervisor alone, not its process group
        stack.processes["api"].wait(timeout=STOP_GRACE_S + 15)
        stack.wait_for(lambda: _stopped(pids), timeout=15, message="the API processes to end")
        assert not port_in_use("127.0.0.1", stack.port)
    finally:
        stack.stop()
        with suppress(ProcessLookupError):  # whatever a failed check left of the group
            os.killpg(supervisor, signal.SIGKILL)
