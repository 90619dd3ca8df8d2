"""Which inbox events one message's run applies: its own, and others taken along.

A message carries at most ``publishing.CHUNK`` ids; a run takes other pending events along
(``inbox.pending_besides``) up to :data:`RUN_LIMIT` events in all, so a backlog of one-event
messages, or of full ones, drains in batches of that size. Its own events are locked first
(``inbox.hold``), and neither step waits for a row another run holds, so taking others along
can neither deadlock nor make the workers take turns.

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
# Events one run applies at most when it takes others along. A batch pays a commit, a dozen
# round trips and a task run whatever its size: applying removals in one process, 200 a batch
# cost the worker and the database about a tenth less a removal than 100, and 400 little less.
RUN_LIMIT: Final = 2 * CHUNK


@dataclass(frozen=True)
class Applied:
    """What a message's run did: the outcome over the ids it applied, how many it took along,
    and its own ids another run held (that run finishes them, see :func:`apply_message`)."""

    outcome: handlers.BatchOutcome
    besides: int
    elsewhere: tuple[str, ...] = ()


def retryable(error: Exception) -> bool:
    """Errors that roll back the whole run for the message to be tried again."""
    # A time limit is not the event's fault either: roll back the run, the re-drive brings
    # the events back.
    return is_transient(error) or isinstance(error, SoftTimeLimitExceeded)


def apply_message(
    session: Session, event_ids: Sequence[str], *, now: datetime, task: str | None
) -> Applied:
    """Apply the pending events among ``event_ids``, with others taken along when it is short.

    Its own events that another run holds are left to that run instead of waited for: in a
    backlog the next messages name the very events the run before took along, and waiting
    made the workers take turns. That run either commits them or rolls back and is tried
    again; a run that never comes back leaves them pending, and the next run that takes
    events along (oldest first) or the re-drive finds them.
    """
    besides: list[str] = []
    elsewhere: tuple[str, ...] = ()
    if len(event_ids) < RUN_LIMIT:
        held = inbox.hold(session, event_ids)
        if len(held) < len(set(event_ids)):
            elsewhere = tuple(inbox.present(session, [i for i in event_ids if i not in held]))
            event_ids = [i for i in event_ids if i not in elsewhere]
        besides = inbox.pending_besides(
            session, [*event_ids, *elsewhere], limit=RUN_LIMIT - len(event_ids)
        )
        if not besides and _PENDING not in held.values():
            # The usual message of a backlog drained by others: its events were taken along.
            wanted = list(dict.fromkeys(event_ids))
            settled = handlers.settle_unclaimed(session, wanted, held, now=now, task=task)
            return Applied(settled, 0, elsewhere)
    outcome = handlers.apply_pending(
        session, [*event_ids, *besides], now=now, retryable=retryable, task=task
    )
    return Applied(outcome, len(besides), elsewhere)
