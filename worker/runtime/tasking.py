"""The base class of every tokenwarden task: a session in one transaction per run.

Like warehouse's ``WarehouseTask``: the task function receives a ``Session`` as its first
argument after ``self`` (callers never pass it); the run commits when the function returns,
rolls back when it raises, and always closes the session. Work that must only happen once the
transaction is committed (publishing to the broker) is registered with :meth:`after_commit`.

Database errors that a retry can fix (a dropped connection, a lock or serialization failure)
are retried with exponential backoff and jitter, for as long as they last: the event inbox
must not lose an event because the database was briefly away. Anything else fails the run.

Also the option sets the tasks share. Imports ``config``, ``worker.domain`` and the rest of
the runtime only: never the tasks, the API, the command line.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

import structlog
from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from prometheus_client import Counter, Histogram
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from tokenwarden.config.redaction import first_line
from tokenwarden.config.settings import get_settings
from tokenwarden.worker.domain import clock, db, handlers
from tokenwarden.worker.runtime import publishing

log = structlog.get_logger(__name__)

TASK_RUNS: Final = Counter(
    "tokenwarden_tasks", "Task runs by task and outcome.", ["task", "outcome"]
)
TASK_SECONDS: Final = Histogram(
    "tokenwarden_task_seconds", "Duration of a task run, commit included.", ["task"]
)
# Control flow of Celery itself, not a failure of the run.
_NOT_FAILURES: Final = (Retry, Ignore, Reject)

# Options of a task that is idempotent (a finished event, a sent or leased notice is
# skipped): its message is acknowledged only once the run is over, and given back when its
# worker dies.
IDEMPOTENT: Final[dict[str, Any]] = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "ignore_result": True,
}
# A re-drive: beat sends one every few seconds, and any one run re-drives everything that is
# due, so a backlog built while no worker ran is dropped rather than replayed.
REDRIVE: Final[dict[str, Any]] = {**IDEMPOTENT, "expires": 60}


class TransientDatabaseError(Exception):
    """A database failure that a retry can fix; the original error is its ``__cause__``."""


def is_transient(error: BaseException) -> bool:
    """True for errors about the connection or concurrency, not about the data or the SQL."""
    if isinstance(error, OperationalError | InterfaceError):
        return True
    return isinstance(error, DBAPIError) and error.connection_invalidated


def store_engine() -> Engine:
    """The token store of the current settings (one engine and pool per process)."""
    return db.engine_for(get_settings().resolved_database_url)


class CountedTask(Task):  # type: ignore[misc]  # celery ships no type information
    """Base class of every task: counts runs, binds the log context, retries brief outages.

    A task built on it opens its own short transactions (notice delivery does, so that no
    transaction is held while a receiver answers); :class:`DatabaseTask` adds one
    transaction per run.
    """

    autoretry_for = (TransientDatabaseError,)
    retry_backoff = True
    retry_backoff_max = 60
    retry_jitter = True
    # Transient by definition: keep trying, with the wait capped at retry_backoff_max.
    max_retries = None
    run: Callable[..., Any]

    def __init__(self) -> None:
        super().__init__()
        # Wrap ``run`` here, before Celery's autoretry wraps it (right after creating this
        # instance), so what the wrapper raises is what autoretry sees.
        original = self.run

        @functools.wraps(original)
        def run(*args: Any, **kwargs: Any) -> Any:
            return self._run_counted(original, *args, **kwargs)

        self.run = run

    def engine(self) -> Engine:
        return store_engine()

    def dead_letter(self, reason: str, *, body: object, session: Session | None = None) -> None:
        """Keep an unusable message of this task as a dead letter, with the reason.

        In ``session`` when given (the run's own transaction), else in a transaction of its own.
        """
        if session is None:
            with db.transaction(self.engine()) as own:
                self.dead_letter(reason, body=body, session=own)
            return
        handlers.dead_letter_message(
            session, reason=reason, now=clock.now(), task=self.name, body=body
        )

    def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    def _run_counted(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        name = self.name
        TASK_RUNS.labels(name, "started").inc()
        started = time.perf_counter()
        # bound_contextvars puts back what was bound before (the task_prerun signal binds the
        # same names), so Celery's own "succeeded" line still carries the task id.
        with structlog.contextvars.bound_contextvars(task_id=self.request.id, task_name=name):
            try:
                result = self._call(function, *args, **kwargs)
            except Exception as error:
                if is_transient(error):
                    raise TransientDatabaseError(first_line(error, typed=True)) from error
                if not isinstance(error, _NOT_FAILURES):
                    TASK_RUNS.labels(name, "failed").inc()
                raise
            finally:
                TASK_SECONDS.labels(name).observe(time.perf_counter() - started)
        TASK_RUNS.labels(name, "succeeded").inc()
        return result

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        if not self.request.called_directly:
            error = kwargs.get("exc")
            log.warning(
                "task.retry",
                task_name=self.name,
                attempt=self.request.retries + 1,
                retry_in_s=kwargs.get("countdown"),
                waiting_for=str(error) if error is not None else None,
            )
            TASK_RUNS.labels(self.name, "retried").inc()
        return super().retry(*args, **kwargs)


class DatabaseTask(CountedTask):
    """Base class for tasks declared with ``bind=True``: ``def task(self, session, ...)``."""

    def __init__(self) -> None:
        super().__init__()
        # Callers never pass the session: Celery's argument check (run when a task is sent)
        # must expect one parameter fewer than the function declares.
        header = getattr(self, "__header__", None)
        if header is not None:
            self.__header__ = functools.partial(header, object())

    def after_commit(self, session: Session, callback: Callable[[], object]) -> None:
        """Call ``callback`` once this run's transaction has committed; never if it fails."""
        publishing.after_commit(session, callback)

    def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # Inside the counted run, so a failing COMMIT is retried just like a failing query.
        with publishing.published_after_commit(self._transaction(), app=self.app) as session:
            return function(session, *args, **kwargs)

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        # Commit when the block ends, roll back when it raises, close either way.
        with Session(self.engine(), expire_on_commit=False) as session, session.begin():
            yield session
