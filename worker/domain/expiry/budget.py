"""The one loop every expiry job runs: short transactions until done or out of time.

A run (a sweep, a reminder run) holds its lock (:mod:`.lock`) and a time budget. Each of its
phases runs batches of at most ``batch`` rows, one short transaction each, until nothing is
left or the budget is spent; it always gets its first transaction, so every run makes
progress, and the work left waits for the next run, which finds it again (expired live tokens
stay in the partial index; cursors and reminder rows are in the database). After each commit
the batch is counted, its notices are published, and the run's progress is reported.

Imports no Celery, kombu, httpx or web framework.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

import structlog
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.expiry.lock import RunLock, single_run
from tokenwarden.worker.domain.expiry.results import RunStats

log = structlog.get_logger(__name__)

# Receives the ids of the notices a transaction queued, once it has committed.
Publish = Callable[[Sequence[str]], None]

S = TypeVar("S", bound=RunStats)
T = TypeVar("T")


class Budget:
    """A run's time budget: each phase gets one transaction, then more while time is left."""

    def __init__(self, seconds: float | None) -> None:
        self.started = time.monotonic()
        self.deadline = None if seconds is None else self.started + seconds

    def left(self) -> bool:
        return self.deadline is None or time.monotonic() < self.deadline

    def elapsed(self) -> float:
        return time.monotonic() - self.started


@contextmanager
def timed_transaction(engine: Engine, stats: RunStats) -> Iterator[Session]:
    """One transaction, its duration (commit included) counted into ``stats``."""
    started = time.perf_counter()
    with db.transaction(engine) as session:
        yield session
    elapsed_ms = (time.perf_counter() - started) * 1000
    stats.transactions += 1
    stats.longest_transaction_ms = max(stats.longest_transaction_ms, elapsed_ms)


class Next(Enum):
    """What is left after a batch."""

    DONE = "done"
    MORE = "more"
    # More is left, but the batch found nothing to do (a window of the table walk with no
    # due token costs a few milliseconds): only a lost lock stops the phase there.
    MORE_UNCHARGED = "more_uncharged"

    @classmethod
    def more_if(cls, more: bool) -> Next:
        return cls.MORE if more else cls.DONE


@dataclass
class BudgetedRun(Generic[S]):
    """A run holding its lock: its budget, what it did so far, where it reports."""

    engine: Engine
    lock: RunLock
    budget: Budget
    stats: S
    publish: Publish | None = None
    on_progress: Callable[[S], None] | None = None

    def batches(self, batch: Callable[[Session], T], then: Callable[[T], Next]) -> bool:
        """Run ``batch`` one transaction at a time; True once nothing is left.

        ``then`` gets each batch's outcome after its commit, counts it into :attr:`stats` and
        says what is left. False when the budget or the loss of the lock ends the phase with
        work left for the next run.
        """
        while True:
            with timed_transaction(self.engine, self.stats) as session:
                outcome = batch(session)
            left = then(outcome)
            if self.on_progress is not None:
                self.on_progress(self.stats)
            if left is Next.DONE:
                return True
            if left is Next.MORE and not self.budget.left():
                return False
            if not self.lock.held():
                return False

    def queued(self, notice_ids: Sequence[str]) -> None:
        """Count and publish the notices of a committed transaction."""
        self.stats.notices += len(notice_ids)
        if notice_ids and self.publish is not None:
            self.publish(notice_ids)


def run_exclusive(
    engine: Engine,
    work: Callable[[BudgetedRun[S]], bool],
    *,
    lock: str,
    log_as: str,
    stats: type[S],
    batch: int,
    budget_s: float | None,
    publish: Publish | None = None,
    on_progress: Callable[[S], None] | None = None,
) -> S:
    """Run ``work`` (True: finished) under the lock named ``lock`` and a ``budget_s`` budget.

    Returns at once, with ``ran=False``, if another run holds the lock. Logs
    ``<log_as>.busy`` then, else ``<log_as>.done`` with the result.
    """
    if batch <= 0:
        raise ValueError("batch must be a positive number of rows")
    with single_run(engine, lock) as held:
        if held is None:
            log.info(f"{log_as}.busy")
            return stats(ran=False, finished=False)
        budget = Budget(budget_s)
        run = BudgetedRun(
            engine, held, budget, stats(ran=True, finished=False), publish, on_progress
        )
        try:
            run.stats.finished = work(run)
        finally:
            run.stats.duration_s = budget.elapsed()
        log.info(f"{log_as}.done", **run.stats.as_dict())
        return run.stats
