"""The sweep's inbox phase (``TOKENWARDEN_INBOX_RETENTION_DAYS``): old inbox rows deleted.

Done and dead events that finished longer ago than that, then dead letters kept that long,
are deleted, oldest first, ``batch`` rows a transaction; pending events never are, whatever
their age.

Imports no Celery, kombu, httpx or web framework.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import structlog
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import inbox
from tokenwarden.worker.domain.expiry.budget import BudgetedRun, Next
from tokenwarden.worker.domain.expiry.results import SweepResult

log = structlog.get_logger(__name__)


def prune_inbox_all(
    run: BudgetedRun[SweepResult], *, now: datetime, batch: int, retention_days: int
) -> bool:
    """Delete finished events, then dead letters, older than the retention; ``batch`` a time.

    A transaction deletes at most ``batch`` rows of both kinds together, so a backlog (the
    first run after an upgrade, say) is worked off in short transactions like the sweep's.
    """
    run.stats.phase = "prune"
    before = now - timedelta(days=retention_days)

    def prune(session: Session) -> tuple[int, int]:
        events = inbox.purge_finished(session, before=before, limit=batch)
        letters = (
            inbox.purge_dead_letters(session, before=before, limit=batch - events)
            if events < batch
            else 0
        )
        return events, letters

    def pruned(outcome: tuple[int, int]) -> Next:
        events, letters = outcome
        run.stats.inbox_deleted += events
        run.stats.dead_letters_deleted += letters
        return Next.more_if(events + letters >= batch)

    complete = False
    try:
        complete = run.batches(prune, pruned)
        return complete
    finally:
        log.info(
            "inbox.retention",
            events=run.stats.inbox_deleted,
            dead_letters=run.stats.dead_letters_deleted,
            retention_days=retention_days,
            finished=complete,
        )
