"""What every benchmark shares: options, a throw-away database and queue, child processes,
populated token tables, medians, the table and the closing JSON line.

Every run works on a database and queues of its own (``tw_bench_<random>``,
``tokenwarden-bench-<random>``) and removes them at the end, so several engineers and test
suites can share the servers. The last line a benchmark prints is one JSON object::

    {"bench": NAME, "value": ..., "baseline": ..., "ratio": ..., "target": ..., "ok": ...,
     "unit": ...}
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final

from sqlalchemy import Engine, insert, make_url, text

from tokenwarden.config.celery import transport_options
from tokenwarden.config.settings import Settings
from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.models import Base, Membership, Token, TokenKind
from tokenwarden.worker.domain.tokens import generate, hash_token, hint

REPO: Final = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL: Final = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_BROKER_URL: Final = "amqp://guest:guest@127.0.0.1:5672//"
PRODUCER_KEY: Final = "twp_bench_producer_key"
# The flags `tokenwarden worker` passes to Celery (worker/cli/runtime.py, which adds a node name
# of its own too); a bench-only worker uses the same ones so that it differs from ours only in
# what its tasks do.
WORKER_FLAGS: Final = ("--without-gossip", "--without-mingle", "--without-heartbeat")
ROWS_PER_INSERT: Final = 5000
STOP_GRACE_S: Final = 20.0


# --- options -------------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes; a script adds its own sizes."""
    parsed = argparse.ArgumentParser(description=description)
    parsed.add_argument(
        "--database-url",
        default=os.environ.get("TOKENWARDEN_BENCH_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="Postgres server (a fresh database is created beside the one named, and dropped "
        "at the end) or an sqlite:/// URL (a temporary file is used). "
        f"Default: {DEFAULT_DATABASE_URL}",
    )
    parsed.add_argument(
        "--broker-url",
        default=os.environ.get("TOKENWARDEN_BENCH_BROKER_URL", DEFAULT_BROKER_URL),
        help="Celery broker; the run uses queues of its own and deletes them at the end. "
        f"Default: {DEFAULT_BROKER_URL.replace('guest:guest', 'guest:***')}",
    )
    parsed.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported")
    parsed.add_argument(
        "--short",
        action="store_true",
        help="tiny sizes and one run, for CI: finishes in seconds and exits 0 whatever `ok` is",
    )
    parsed.add_argument(
        "--keep", action="store_true", help="keep the temporary folder with the children's logs"
    )
    return parsed


def stack_options(parsed: argparse.ArgumentParser) -> None:
    """The options of a bench that runs the API and a worker as ``tokenwarden`` does."""
    parsed.add_argument("--concurrency", type=int, default=os.cpu_count() or 2)
    parsed.add_argument("--pool", default="prefork", help="the worker's pool (prefork)")
    parsed.add_argument("--log-level", default="info", help="API and worker log level")


def parse(parsed: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = parsed.parse_args(argv)
    if args.short:
        args.runs = 1
    if args.runs < 1:
        parsed.error("--runs must be at least 1")
    return args


def pick(args: argparse.Namespace, full: int, short: int) -> int:
    return short if args.short else full


# --- the run's own database, queues and home ----------------------------------------------


def random_suffix() -> str:
    return secrets.token_hex(4)


@dataclass
class Bench:
    """One benchmark run's resources: a database, queue names, a temporary home."""

    name: str
    home: Path
    database_url: str
    broker_url: str
    queue: str
    queues: list[str] = field(default_factory=list)

    def settings(self, *, queue: str | None = None) -> Settings:
        return Settings(
            home=self.home,
            database_url=self.database_url,
            broker_url=self.broker_url,
            queue=queue or self.queue,
            producer_keys=(PRODUCER_KEY,),
        )

    def engine(self) -> Engine:
        return db.engine_for(self.database_url)

    def queue_depth(self, queue: str | None = None) -> int:
        """Messages ready in one of this run's queues, on any broker ours runs on."""
        options = transport_options(self.settings())
        return queue_depth(self.broker_url, queue or self.queue, options=options)

    def extra_queue(self, role: str) -> str:
        """Another queue of this run (deleted at the end like the main one)."""
        name = f"{self.queue}-{role}"
        if name not in self.queues:
            self.queues.append(name)
        return name

    def child_env(self, *, queue: str | None = None, **extra: str) -> dict[str, str]:
        """The environment of a child process: ours, without any TOKENWARDEN_ setting but ours."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARDEN_")}
        env.update(
            {
                "TOKENWARDEN_HOME": str(self.home),
                "TOKENWARDEN_DATABASE_URL": self.database_url,
                "TOKENWARDEN_BROKER_URL": self.broker_url,
                "TOKENWARDEN_QUEUE": queue or self.queue,
                "TOKENWARDEN_PRODUCER_KEYS": PRODUCER_KEY,
                # No re-drive runs here (no beat); a large value keeps it quiet if one did.
                "TOKENWARDEN_REDRIVE_AFTER_S": "3600",
                "PYTHONPATH": os.pathsep.join(
                    [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
                ),
                **extra,
            }
        )
        return env

    def truncate(self) -> None:
        """Empty every table of the token store."""
        engine = self.engine()
        tables = [table.name for table in reversed(Base.metadata.sorted_tables)]
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                connection.execute(text(f"TRUNCATE {', '.join(tables)}"))
            else:
                for name in tables:
                    connection.execute(text(f"DELETE FROM {name}"))


@contextmanager
def bench(name: str, args: argparse.Namespace) -> Iterator[Bench]:
    """A database, a queue and a home of this run's own; all removed at the end."""
    configure_quiet_logging()
    stop_on_sigterm()
    home = Path(tempfile.mkdtemp(prefix=f"tw-bench-{name}-"))
    queue = f"tokenwarden-bench-{random_suffix()}"
    check_broker(args.broker_url)
    run: Bench | None = None
    try:
        with fresh_database(args.database_url, home) as url:
            run = Bench(name, home, url, args.broker_url, queue, [queue])
            yield run
    finally:
        if run is not None:
            delete_queues(args.broker_url, run.queues)
        if args.keep:
            print(f"kept {home}", file=sys.stderr)
        else:
            _remove_tree(home)


@contextmanager
def fresh_database(server_url: str, home: Path) -> Iterator[str]:
    """A new, migrated database; on Postgres created beside ``server_url`` and dropped after."""
    url = make_url(_normalise(server_url))
    if url.get_backend_name() == "sqlite":
        path = home / "tokenwarden.db"
        sqlite_url = f"sqlite:///{path}"
        db.upgrade(sqlite_url)
        try:
            yield sqlite_url
        finally:
            db.engine_for(sqlite_url).dispose()
        return
    admin = db.make_engine(url.render_as_string(hide_password=False), isolation_level="AUTOCOMMIT")
    name = f"tw_bench_{random_suffix()}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:
        admin.dispose()
        sys.exit(f"bench: cannot create a database on {db.describe_url(server_url)}: {error}")
    fresh = url.set(database=name).render_as_string(hide_password=False)
    try:
        db.upgrade(fresh)
        yield fresh
    finally:
        db.engine_for(fresh).dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _normalise(url: str) -> str:
    if url.startswith(("postgres://", "postgresql://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _connection(broker_url: str, options: dict[str, Any] | None = None) -> Any:
    from kombu.connection import Connection

    return Connection(  # type: ignore[no-untyped-call]
        broker_url, connect_timeout=5, transport_options=options or {}
    )


def check_broker(broker_url: str) -> None:
    try:
        with _connection(broker_url) as connection:
            connection.ensure_connection(max_retries=2)
    except Exception as error:
        sys.exit(f"bench: the broker at {_hide(broker_url)} is unreachable: {error}")


def delete_queues(broker_url: str, queues: Sequence[str]) -> None:
    """Delete this run's queues (and the exchanges Celery declared under the same names)."""
    with _connection(broker_url) as connection:
        channel = connection.channel()
        try:
            for queue in queues:
                with suppress(Exception):
                    channel.queue_delete(queue)
                if broker_url.startswith("amqp"):
                    with suppress(Exception):
                        channel.exchange_delete(queue)
        finally:
            with suppress(Exception):
                channel.close()


def purge_queue(broker_url: str, queue: str) -> int:
    """Drop the ready messages of ``queue`` (one of this run's own); return how many."""
    with _connection(broker_url) as connection:
        channel = connection.channel()
        try:
            return int(channel.queue_purge(queue) or 0)
        finally:
            with suppress(Exception):
                channel.close()


def queue_depth(broker_url: str, queue: str, *, options: dict[str, Any] | None = None) -> int:
    """Messages ready in ``queue`` (not counting those a worker holds unacknowledged).

    ``options`` are the broker's transport options: the embedded broker's folder is one.
    """
    with _connection(broker_url, options) as connection:
        channel = connection.channel()
        try:
            _, count, _ = channel.queue_declare(queue, passive=True)
        except Exception:
            return 0
        finally:
            with suppress(Exception):
                channel.close()
    return int(count)


def _hide(url: str) -> str:
    from tokenwarden.config.settings import without_password

    return without_password(url)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def configure_quiet_logging() -> None:
    """Our own process logs warnings only, to stderr: stdout carries the table and the JSON."""
    from tokenwarden.config.logging import configure_logging

    configure_logging(level="WARNING", stream=sys.stderr)


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the database, the queues and the children go away."""

    def _stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _stop)


# --- child processes -----------------------------------------------------------------------


@dataclass
class Child:
    """A process of ours, in a process group of its own, its output in a log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # our own interpreter and modules
            self.argv,
            env=self.env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(f"the {self.name} stopped:\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM to its process group (a prefork worker's children too), SIGKILL if stuck."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        else:
            # The leader is gone; make sure nothing of its group lingers.
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, characters: int = 3000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-characters:]

    def __enter__(self) -> Child:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def api_child(args: argparse.Namespace, port: int, env: dict[str, str], logs: Path) -> Child:
    """``tokenwarden api`` on ``port``, as a user starts it."""
    argv = tokenwarden("api", "--port", str(port), "--log-level", args.log_level)
    return Child("API", argv, env, logs / "api.log")


def worker_child(args: argparse.Namespace, env: dict[str, str], logs: Path) -> Child:
    """``tokenwarden worker`` with the pool, concurrency and log level of :func:`stack_options`."""
    argv = tokenwarden(
        "worker",
        "--pool",
        args.pool,
        "--concurrency",
        str(args.concurrency),
        "--log-level",
        args.log_level,
    )
    return Child("worker", argv, env, logs / "worker.log")


class BenchError(RuntimeError):
    """The benchmark could not measure what it set out to (a child died, a wait timed out)."""


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def tokenwarden(*args: str) -> list[str]:
    """The ``tokenwarden`` command of this interpreter (as worker.ops.supervisor.command)."""
    from tokenwarden.worker.ops.supervisor import command

    return command(*args)


def celery_worker(module: str, *, pool: str, concurrency: int, log_level: str) -> list[str]:
    """A worker for the app in ``module``, started as ``tokenwarden worker`` starts ours."""
    return python(
        "-m",
        "bench._worker",
        module,
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--log-level",
        log_level,
        "--hostname",
        f"bench-{random_suffix()}@%h",
    )


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.02,
    watch: Sequence[Child] = (),
) -> float:
    """Poll until ``condition`` holds; return the ``perf_counter`` at which it was seen."""
    deadline = time.perf_counter() + timeout_s
    while True:
        if condition():
            return time.perf_counter()
        for child in watch:
            child.check_alive()
        if time.perf_counter() > deadline:
            raise BenchError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


# --- HTTP load ------------------------------------------------------------------------------


def http_request(port: int, path: str, body: bytes, *, key: str | None = PRODUCER_KEY) -> bytes:
    """One keep-alive ``POST`` as raw bytes, built ahead so the client spends nothing on it."""
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Load:
    """What a load run saw: the time it took, each answer's status and latency."""

    seconds: float
    statuses: dict[int, int]
    latencies: list[float]
    bodies: list[bytes]

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())


@dataclass(frozen=True)
class Timed:
    """One request of a paced load: when to send it, its bytes, and what to do around it."""

    due: float  # time.perf_counter() at which to send
    request: bytes
    before: Callable[[], None] = lambda: None
    after: Callable[[], None] = lambda: None


def stamp(times: dict[str, float], key: str) -> None:
    """Note the time of ``key`` now (a ``Timed`` callback)."""
    times[key] = time.perf_counter()


async def paced(port: int, schedule: Sequence[Timed], connections: int) -> None:
    """Send each request at its time (late ones at once) over keep-alive connections; each
    must be answered ``202``."""
    queue = iter(schedule)

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for item in queue:
                delay = item.due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                item.before()
                writer.write(item.request)
                status, body = await read_response(reader)
                if status != 202:
                    raise BenchError(f"an answer {status}: {body[:300]!r}")
                item.after()
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(connections)))


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length is None:
        raise BenchError(f"an answer without Content-Length: {head[:200]!r}")
    return status, await reader.readexactly(length)


async def _client(
    port: int,
    requests: Iterator[bytes],
    load: Load,
    *,
    keep_bodies: bool,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for request in requests:  # shared by every connection: each takes the next one
            sent = time.perf_counter()
            writer.write(request)
            status, body = await read_response(reader)
            load.latencies.append(time.perf_counter() - sent)
            load.statuses[status] = load.statuses.get(status, 0) + 1
            if keep_bodies or status >= 300:
                load.bodies.append(body)
    finally:
        writer.close()
        with suppress(Exception):
            await writer.wait_closed()


def http_load(
    port: int, requests: Sequence[bytes], *, connections: int, keep_bodies: bool = False
) -> Load:
    """Send ``requests`` over ``connections`` keep-alive connections, as fast as answered."""

    async def run() -> Load:
        load = Load(0.0, {}, [], [])
        shared = iter(requests)
        started = time.perf_counter()
        await asyncio.gather(
            *(_client(port, shared, load, keep_bodies=keep_bodies) for _ in range(connections))
        )
        load.seconds = time.perf_counter() - started
        return load

    return asyncio.run(run())


def wait_for_http(url: str, child: Child, timeout_s: float = 60.0) -> None:
    import httpx

    def up() -> bool:
        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout_s=timeout_s, what=f"{url} to answer", interval_s=0.1, watch=[child])


# --- populating the token store ------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    org_id: str
    user_id: str
    pats: list[str]
    aats: list[str]
    # Plain texts, only when asked for (generating them costs time).
    pat_texts: list[str]
    aat_texts: list[str]


def populate(
    engine: Engine,
    *,
    users: int,
    pats: int,
    aats: int,
    orgs: int = 100,
    admins: int = 0,
    prefix: str = "u",
    texts: bool = False,
    now: datetime | None = None,
    emails: bool = False,
) -> list[Member]:
    """Active memberships with ``pats`` PATs and ``aats`` AATs each, inserted in bulk.

    Users are spread over ``orgs`` organizations, each with ``admins`` more members who are
    admins (they hear about offboardings). Memberships and tokens date from before ``now`` (a
    day and an hour), so any event at ``now`` applies to them. With ``texts`` the tokens are
    real (checksummed) and their texts are returned; otherwise only random hashes are stored.
    With ``emails`` each user has the address ``USER@ORG.example``.
    """
    now = now or datetime.now(UTC)
    joined, issued, expires = (
        now - timedelta(days=1),
        now - timedelta(hours=1),
        now + timedelta(days=30),
    )
    members: list[Member] = []
    member_rows: list[dict[str, Any]] = [
        {
            "org_id": f"org-{org}",
            "user_id": f"{prefix}-admin-{number}",
            "role": "admin",
            "email": f"{prefix}-admin-{number}@org-{org}.example",
            "active": True,
            "active_since": joined,
            "last_event_at": joined,
            "updated_at": joined,
        }
        for org in range(min(orgs, users))
        for number in range(admins)
    ]
    token_rows: list[dict[str, Any]] = []
    for index in range(users):
        org_id, user_id = f"org-{index % orgs}", f"{prefix}-{index:07d}"
        member_rows.append(
            {
                "org_id": org_id,
                "user_id": user_id,
                "role": "user",
                "email": f"{user_id}@{org_id}.example" if emails else None,
                "active": True,
                "active_since": joined,
                "last_event_at": joined,
                "updated_at": joined,
            }
        )
        made: dict[TokenKind, tuple[list[str], list[str]]] = {}
        for kind, count in ((TokenKind.PERSONAL, pats), (TokenKind.APPLICATION, aats)):
            ids, plain = [], []
            for _ in range(count):
                token_id = "tok_" + secrets.token_hex(8)
                if texts:
                    secret = generate(kind)
                    token_hash, last4 = hash_token(secret), hint(secret)
                    plain.append(secret)
                else:
                    token_hash, last4 = hashlib.sha256(os.urandom(16)).hexdigest(), "xxxx"
                personal = kind is TokenKind.PERSONAL
                token_rows.append(
                    {
                        "id": token_id,
                        "kind": kind.value,
                        "org_id": org_id,
                        "user_id": user_id if personal else None,
                        "app_id": None if personal else f"app-{user_id}",
                        "created_by": user_id,
                        "name": "bench",
                        "token_hash": token_hash,
                        "last4": last4,
                        "created_at": issued,
                        "expires_at": expires,
                        "revoked_at": None,
                        "revoke_reason": None,
                    }
                )
                ids.append(token_id)
            made[kind] = (ids, plain)
        members.append(
            Member(
                org_id,
                user_id,
                made[TokenKind.PERSONAL][0],
                made[TokenKind.APPLICATION][0],
                made[TokenKind.PERSONAL][1],
                made[TokenKind.APPLICATION][1],
            )
        )
    with engine.begin() as connection:
        for table, rows in ((Membership, member_rows), (Token, token_rows)):
            for start in range(0, len(rows), ROWS_PER_INSERT):
                connection.execute(insert(table), rows[start : start + ROWS_PER_INSERT])
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("ANALYZE memberships, tokens"))
    return members


# --- numbers and output ---------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile by the nearest-rank method (p99 of 100 values is the 99th)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline else math.nan


def rounded(value: float | None, digits: int = 3) -> float | None:
    if value is None or math.isnan(value):
        return None
    return round(value, digits)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table, numbers right-aligned."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [
        max(len(header), *(len(row[i]) for row in cells)) if cells else len(header)
        for i, header in enumerate(headers)
    ]
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows) and bool(rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            value.rjust(widths[i]) if numeric[i] else value.ljust(widths[i])
            for i, value in enumerate(values)
        ).rstrip()

    return "\n".join(
        [line(list(headers)), line(["-" * width for width in widths]), *map(line, cells)]
    )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def _digits(value: float | None) -> int:
    """Two decimals, or enough for three significant digits below one (0.015 s stays 0.015)."""
    if not value or abs(value) >= 1:
        return 2
    return max(2, 2 - math.floor(math.log10(abs(value))))


def result(
    bench: str,
    *,
    value: float | None,
    baseline: float | None,
    ratio: float | None,
    target: float | Mapping[str, Any],
    ok: bool,
    unit: str,
    **extra: Any,
) -> dict[str, Any]:
    """The closing JSON object, in the shape every benchmark of bench/ prints."""
    return {
        "bench": bench,
        "value": rounded(value, _digits(value)),
        "baseline": rounded(baseline, _digits(baseline)),
        "ratio": rounded(ratio, 3),
        "target": target,
        "ok": ok,
        "unit": unit,
        **extra,
    }


def finish(outcome: dict[str, Any], *, short: bool) -> int:
    """Print the JSON line last; the exit status says whether the target held (not in --short)."""
    sys.stdout.flush()
    print(json.dumps(outcome, sort_keys=False), flush=True)
    return 0 if short or outcome["ok"] else 1


def failed(bench: str, error: BaseException, *, unit: str, target: float | dict[str, float]) -> int:
    """A benchmark that could not measure still ends with its JSON line, ``ok`` false.

    Exits 1 even in ``--short``: a missed target is news, a benchmark that cannot run is a bug.
    """
    print(f"bench {bench}: {error}", file=sys.stderr)
    lines = str(error).strip().splitlines()
    outcome = result(
        bench,
        value=None,
        baseline=None,
        ratio=None,
        target=target,
        ok=False,
        unit=unit,
        error=lines[0] if lines else type(error).__name__,
    )
    print(json.dumps(outcome), flush=True)
    return 1
