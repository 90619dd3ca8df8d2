"""Which inbox events one message's run applies: its own, and others when it is short.

A message carries at most ``publishing.CHUNK`` ids; a shorter one takes other pending events
along (``inbox.pending_besides``), so a backlog of one-event messages drains in batches. Its
own events are locked first (``inbox.hold``), so that taking others along cannot deadlock.

Imports ``config``, ``worker.domain`` and the rest of the runtime only: never the tasks, the
API, the command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import handlers, inbox
from tokenwarden.worker.domain.kinds import EventStatus
from tokenwarden.worker.runtime.publishing import CHUNK
from tokenwarden.worker.runtime.tasking import is_transient

_PENDING: Final = EventStatus.PENDING.value


@dataclass(frozen=True)
class Applied:
    """What a message's run did: the outcome over all the ids, and how many it took along."""

    outcome: handlers.BatchOutcome
    besides: int


def retryable(error: Exception) -> bool:
    """Errors that roll back the whole run for the message to be tried again."""
    # A time limit is not the event's fault either: roll back the run, the re-drive brings
    # the events back.
    return is_transient(error) or isinstance(error, SoftTimeLimitExceeded)


def apply_message(
    session: Session, event_ids: Sequence[str], *, now: datetime, task: str | None
) -> Applied:
    """Apply the pending events among ``event_ids``, with others taken along when it is short."""
    besides: list[str] = []
    if len(event_ids) < CHUNK:
        held = inbox.hold(session, event_ids)
        besides = inbox.pending_besides(session, event_ids, limit=CHUNK - len(event_ids))
        if not besides and _PENDING not in held.values():
            # The usual message of a backlog drained by others: its events were taken along.
            wanted = list(dict.fromkeys(event_ids))
            return Applied(handlers.settle_unclaimed(session, wanted, held, now=now, task=task), 0)
    outcome = handlers.apply_pending(
        session, [*event_ids, *besides], now=now, retryable=retryable, task=task
    )
    return Applied(outcome, len(besides))
