"""A sweep run: tokens past their expiry are marked expired, audited, and their owners told.

A run has up to five phases, each in short transactions of at most ``batch`` rows
(:mod:`.budget`):

1. **Expire** (:mod:`.expire`, :mod:`.table_walk` for a large backlog on Postgres): live
   tokens with ``expires_at <= now`` are marked ``revoked_at=now, revoke_reason='expired'``,
   with one ``expire`` audit row per token in the same transaction.
2. **Notify** (:mod:`.notify`): "expired" notices written from those audit rows past a cursor.
3. **Idle** (:mod:`.idle`, only with ``TOKENWARDEN_IDLE_REVOKE_DAYS``): tokens unused that
   long are revoked (reason ``idle``), their owners warned 7 days before.
4. **Retain** (:mod:`.retention`, only with ``TOKENWARDEN_RETENTION_DAYS``): tokens dead for
   longer than that are deleted, audited.
5. **Prune the inbox** (:mod:`.inbox_pruning`, ``TOKENWARDEN_INBOX_RETENTION_DAYS``): done and
   dead events, then dead letters, older than that are deleted.

Every phase gets at least one transaction per run (the table walk: one that marks tokens),
then goes on while the run's time budget lasts; whatever is left waits for the next run, which
finds it again (expired live tokens stay in the partial index, the cursors are in the
database). Exactly one run at a time (:func:`~.lock.single_run`), even with two schedulers.

Imports no Celery, kombu, httpx or web framework.
"""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Final

from sqlalchemy import Engine

from tokenwarden.worker.domain.expiry.budget import BudgetedRun, Publish, run_exclusive
from tokenwarden.worker.domain.expiry.expire import expire_all
from tokenwarden.worker.domain.expiry.idle import idle_all
from tokenwarden.worker.domain.expiry.inbox_pruning import prune_inbox_all
from tokenwarden.worker.domain.expiry.notify import notify_all
from tokenwarden.worker.domain.expiry.results import Progress, SweepResult
from tokenwarden.worker.domain.expiry.retention import purge_all

SWEEP_LOCK: Final = "sweep"


def run_sweep(
    engine: Engine,
    *,
    now: datetime,
    batch: int,
    budget_s: float | None = None,
    retention_days: int | None = None,
    inbox_retention_days: int | None = None,
    idle_days: int | None = None,
    publish: Publish | None = None,
    on_progress: Progress | None = None,
) -> SweepResult:
    """Run the sweep's phases as of ``now``, unless another run holds the lock.

    ``publish`` receives the ids of the notices each transaction queued, once it committed;
    ``on_progress`` the result so far, after each transaction.
    """
    phases = partial(
        _phases,
        now=now,
        batch=batch,
        retention_days=retention_days,
        inbox_retention_days=inbox_retention_days,
        idle_days=idle_days,
    )
    return run_exclusive(
        engine,
        phases,
        lock=SWEEP_LOCK,
        log_as="sweep",
        stats=SweepResult,
        batch=batch,
        budget_s=budget_s,
        publish=publish,
        on_progress=on_progress,
    )


def _phases(
    run: BudgetedRun[SweepResult],
    *,
    now: datetime,
    batch: int,
    retention_days: int | None,
    inbox_retention_days: int | None,
    idle_days: int | None,
) -> bool:
    # Every phase runs, whatever an earlier one left: each gets its first transaction.
    try:
        complete = expire_all(run, now=now, batch=batch)
        complete &= notify_all(run, now=now, batch=batch)
        if idle_days is not None:
            complete &= idle_all(run, now=now, batch=batch, days=idle_days)
        if retention_days is not None:
            complete &= purge_all(run, now=now, batch=batch, retention_days=retention_days)
        if inbox_retention_days is not None:
            complete &= prune_inbox_all(
                run, now=now, batch=batch, retention_days=inbox_retention_days
            )
        return complete
    finally:
        run.stats.phase = "done"
