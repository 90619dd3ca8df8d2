"""One run of a job at a time (:func:`single_run`), even with two schedulers.

On Postgres a session-level advisory lock held on a dedicated connection; on SQLite an
exclusive ``flock`` on a file beside the database, which the kernel releases if the process
dies; for an in-memory database a lock in the process.

Imports no Celery, kombu, httpx or web framework.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url


class RunLock:
    """Held while a run lasts; :meth:`held` says whether it still is."""

    def __init__(self, connection: Connection | None = None) -> None:
        self._connection = connection

    def held(self) -> bool:
        if self._connection is None:
            return True
        # A session-level advisory lock lives exactly as long as its connection's session;
        # if that connection is gone, another run may already hold the lock.
        try:
            self._connection.exec_driver_sql("SELECT 1")
        except Exception:
            return False
        return True


_LOCAL_LOCKS: dict[tuple[str, str], threading.Lock] = {}
_LOCAL_LOCKS_GUARD = threading.Lock()


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for ``name``."""
    digest = hashlib.sha256(f"tokenwarden.{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def single_run(engine: Engine, name: str) -> Iterator[RunLock | None]:
    """Yield a :class:`RunLock` if no other run named ``name`` holds it, else ``None`` at once.

    Never waits: a second scheduler's run returns immediately and leaves the work to the one
    that holds the lock.
    """
    if engine.dialect.name == "postgresql":
        with _advisory_lock(engine, lock_key(name)) as lock:
            yield lock
        return
    database = make_url(str(engine.url)).database
    if database and database != ":memory:":
        with _file_lock(Path(f"{database}.{name}.lock")) as lock:
            yield lock
        return
    # An in-memory database lives in one process: a process-wide lock is enough.
    with _LOCAL_LOCKS_GUARD:
        local = _LOCAL_LOCKS.setdefault((str(engine.url), name), threading.Lock())
    if not local.acquire(blocking=False):
        yield None
        return
    try:
        yield RunLock()
    finally:
        local.release()


@contextmanager
def _advisory_lock(engine: Engine, key: int) -> Iterator[RunLock | None]:
    # Session-level, on a connection of its own in autocommit: the batches commit on other
    # connections, and a transaction-level lock would end with the first of them. If this
    # process dies, Postgres ends the session and the lock with it.
    connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        acquired = connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": key})
        if not acquired:
            yield None
            return
        try:
            yield RunLock(connection)
        finally:
            try:
                connection.scalar(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            except Exception:
                # Never hand a connection that may still hold the lock back to the pool.
                connection.invalidate()
    finally:
        connection.close()


@contextmanager
def _file_lock(path: Path) -> Iterator[RunLock | None]:
    import fcntl

    # SQLite is a local file, so every process that writes to it runs on this machine and
    # can see this lock file. flock() locks are per open file, so two runs in one process
    # exclude each other too, and the kernel drops the lock when its holder dies.
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        try:
            yield RunLock()
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)
