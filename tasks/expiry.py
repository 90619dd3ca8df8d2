"""Scheduled expiry tasks: the sweep every ``TOKENWARDEN_SWEEP_INTERVAL_S``, reminders daily.

These run many short transactions of their own (one per batch), so they are
:class:`~worker.runtime.tasking.CountedTask` runs (counted like every task) that hand the
engine to the domain, not :class:`~worker.runtime.tasking.DatabaseTask` runs in one
transaction. Neither retries, not even after a brief database outage (hence
``autoretry_for=()``): the next scheduled run picks up whatever a failed one left, and a lock
in the database keeps two runs (from two schedulers) from working at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import structlog

from tokenwarden.config.celery import SEND_REMINDERS, SWEEP_EXPIRED
from tokenwarden.config.settings import get_settings
from tokenwarden.worker.domain import clock
from tokenwarden.worker.domain.expiry.reminders import send_reminders
from tokenwarden.worker.domain.expiry.sweep import run_sweep
from tokenwarden.worker.runtime.celery_app import app
from tokenwarden.worker.runtime.publishing import publish_new_notices
from tokenwarden.worker.runtime.tasking import CountedTask, store_engine

log = structlog.get_logger(__name__)

# A run stops starting batches after this long and leaves the rest to the next run; well
# inside the task's soft time limit (60 s), and under the interval so runs do not pile up.
BUDGET_S: Final = 40.0
# Reminders run once a day, so a run may take longer; its own time limits replace the
# default ones (config.celery) for this task only.
REMINDERS_BUDGET_S: Final = 600.0
REMINDERS_SOFT_LIMIT_S: Final = REMINDERS_BUDGET_S + 60
# Beat sends one reminder run per day; a run that waited this long in the queue is dropped,
# since the next one does the same work.
REMINDERS_EXPIRE_S: Final = 6 * 3600


def _publish(notice_ids: Sequence[str]) -> None:
    publish_new_notices(app, notice_ids)


def sweep_budget_s() -> float:
    return min(BUDGET_S, get_settings().sweep_interval_s * 0.8)


@app.task(  # type: ignore[untyped-decorator]  # celery ships no type information
    base=CountedTask,
    bind=True,
    name=SWEEP_EXPIRED,
    ignore_result=True,
    autoretry_for=(),
    # A sweep still queued when the next one is due is dropped: that one does the same work.
    expires=get_settings().sweep_interval_s,
)
def sweep_expired(self: CountedTask) -> dict[str, Any]:
    """Mark expired tokens, write their notices, apply both retentions; one run at a time."""
    settings = get_settings()
    result = run_sweep(
        store_engine(),
        now=clock.now(),
        batch=settings.sweep_batch,
        budget_s=sweep_budget_s(),
        retention_days=settings.retention_days,
        inbox_retention_days=settings.inbox_retention_days,
        idle_days=settings.idle_revoke_days,
        publish=_publish,
    )
    if not result.ran:
        log.info("sweep.skipped", reason="another sweep is running")
    return result.as_dict()


@app.task(  # type: ignore[untyped-decorator]  # celery ships no type information
    base=CountedTask,
    bind=True,
    name=SEND_REMINDERS,
    ignore_result=True,
    autoretry_for=(),
    expires=REMINDERS_EXPIRE_S,
    soft_time_limit=REMINDERS_SOFT_LIMIT_S,
    time_limit=REMINDERS_SOFT_LIMIT_S + 30,
)
def send_expiry_reminders(self: CountedTask) -> dict[str, Any]:
    """Warn owners of tokens entering a reminder bucket; one run at a time."""
    settings = get_settings()
    result = send_reminders(
        store_engine(),
        now=clock.now(),
        days=settings.reminder_days,
        batch=settings.sweep_batch,
        budget_s=REMINDERS_BUDGET_S,
        publish=_publish,
    )
    if not result.ran:
        log.info("reminders.skipped", reason="another reminder run is going on")
    return result.as_dict()
