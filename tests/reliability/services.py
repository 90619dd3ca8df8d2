"""Private Postgres, Redis and RabbitMQ servers that a test may stop and start at will.

The shared services on the standard ports belong to everybody running tests on this
machine; a test that injects an outage never touches them. It starts its own server on a
free port, in a temporary folder, and removes both when it is done.

Postgres refuses to run as root and RabbitMQ's scripts switch to their own user, so when
the tests run as root each server runs as its package's system user (``postgres``,
``rabbitmq``), in a folder that user owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from tokenwarden.worker.ops.supervisor import free_port

START_TIMEOUT_S = 60.0


class ServiceUnavailable(Exception):
    """The server's programs are missing or it did not come up; the message says which."""


def _as_user(user: str) -> list[str]:
    """The prefix that runs a command as ``user`` when we are root (nothing otherwise)."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise ServiceUnavailable("running as root, but runuser is not installed")
    return [runuser, "-u", user, "--"]


def _owned_tempdir(prefix: str, user: str | None) -> Path:
    # Under /tmp rather than pytest's tmp_path: that one is private to root.
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    if user is not None and os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    return folder


def _wait_for_port(port: int, timeout: float, *, process: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceUnavailable(f"the server exited with {process.returncode}")
        with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise ServiceUnavailable(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def _run(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise ServiceUnavailable(f"{' '.join(argv[-3:])} failed: {done.stderr or done.stdout}")
    return done.stdout


class PrivatePostgres:
    """A throw-away Postgres cluster: ``initdb`` into a temporary folder, ``pg_ctl`` to drive."""

    user = "postgres"

    def __init__(self) -> None:
        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        initdb = candidates[-1] if candidates else shutil.which("initdb")
        if initdb is None:
            raise ServiceUnavailable("initdb not found (install postgresql)")
        self.bin = Path(initdb).parent
        self.folder = _owned_tempdir("tw-chaos-pg-", self.user if os.geteuid() == 0 else None)
        self.data = self.folder / "data"
        self.port = free_port()
        self.started = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        _run(
            [
                *_as_user(self.user),
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.folder / "server.log"),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                *args,
            ]
        )

    def start(self) -> None:
        if not self.data.exists():
            _run(
                [
                    *_as_user(self.user),
                    str(self.bin / "initdb"),
                    "-D",
                    str(self.data),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                ]
            )
        self._ctl("start")
        self.started = True

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-m", mode, "stop")
        self.started = False

    def remove(self) -> None:
        if self.started:
            with suppress(ServiceUnavailable):
                self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


class PrivateRedis:
    """A Redis without persistence: a restart is a broker that lost every queue."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceUnavailable("redis-server not found (install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.folder = _owned_tempdir("tw-chaos-redis-", None)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with (self.folder / "server.log").open("ab") as out:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--dir",
                    str(self.folder),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_for_port(self.port, START_TIMEOUT_S, process=self.process)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)
            self.process.wait(timeout=30)
        self.process = None

    def remove(self) -> None:
        with suppress(Exception):
            self.stop(signal.SIGKILL)
        shutil.rmtree(self.folder, ignore_errors=True)


class PrivateRabbitMQ:
    """A second RabbitMQ node on this machine, with its own name, ports and folders.

    The machine's ``/etc/rabbitmq`` files pin the shared node's name and port, so this node
    gets a configuration file and an environment file of its own.
    """

    user = "rabbitmq"

    def __init__(self) -> None:
        server = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
        if not server.exists():
            found = shutil.which("rabbitmq-server")
            if found is None:
                raise ServiceUnavailable("rabbitmq-server not found (install rabbitmq-server)")
            server = Path(found)
        self.server = server
        self.ctl = server.with_name("rabbitmqctl")
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"twchaos{uuid.uuid4().hex[:6]}@localhost"
        as_root = os.geteuid() == 0
        self.folder = _owned_tempdir("tw-chaos-rabbit-", self.user if as_root else None)
        self.home = pwd.getpwnam(self.user).pw_dir if as_root else str(Path.home())
        (self.folder / "enabled_plugins").write_text("[].\n")
        (self.folder / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (self.folder / "rabbitmq-env.conf").write_text(
            "ERL_EPMD_ADDRESS=127.0.0.1\n"
            'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n'
        )
        if as_root:
            entry = pwd.getpwnam(self.user)
            for path in self.folder.iterdir():
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            {
                "HOME": self.home,
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.folder / "log"),
                "RABBITMQ_PID_FILE": str(self.folder / "pid"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
                "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq.conf"),
                "RABBITMQ_CONF_ENV_FILE": str(self.folder / "rabbitmq-env.conf"),
            }
        )
        return env

    def start(self) -> None:
        with (self.folder / "server.out").open("ab") as out:
            self.process = subprocess.Popen(
                [*_as_user(self.user), str(self.server)],
                env=self._env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
                start_new_session=True,
            )
        try:
            _wait_for_port(self.port, START_TIMEOUT_S * 2, process=self.process)
        except ServiceUnavailable as error:
            tail = (self.folder / "server.out").read_text(errors="replace")[-2000:]
            raise ServiceUnavailable(f"private RabbitMQ did not start: {error}\n{tail}") from None

    def stop(self) -> None:
        if self.process is None:
            return
        with suppress(ServiceUnavailable, subprocess.TimeoutExpired):
            _run([str(self.ctl), "-n", self.node, "stop"], env=self._env(), timeout=60)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None

    def remove(self) -> None:
        with suppress(Exception):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.remove()


@contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    try:
        server.start()
        yield server
    finally:
        server.remove()


@contextmanager
def private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    server = PrivateRabbitMQ()
    try:
        server.start()
        yield server
    finally:
        server.remove()
