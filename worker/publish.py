"""Putting ids on the queue, after the rows that name them are committed.

Events and notices are rows first (the inbox and the outbox); a message carries only ids. A
message lost between commit and publish costs nothing but time: the scheduled re-drive
publishes whatever is still pending.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import structlog
from sqlalchemy.orm import Session

log = structlog.get_logger(__name__)

PROCESS_EVENTS: Final = "tokenwarden.process_events"
DELIVER_NOTICES: Final = "tokenwarden.deliver_notices"
# Ids per message: enough to amortise a transaction, few enough to finish well inside the
# task time limit.
CHUNK: Final = 100
# Session.info key: notices queued in this transaction, published once it commits.
NEW_NOTICES: Final = "tokenwarden.new_notices"


class PublishError(Exception):
    """The broker did not take the message."""


def _publish(app: Any, task: str, ids: Sequence[str], chunk: int) -> None:
    for start in range(0, len(ids), chunk):
        part = list(ids[start : start + chunk])
        try:
            app.send_task(task, args=[part], retry=False)
        except Exception as error:
            raise PublishError(f"broker refused the message: {error}") from error
        log.debug("ids.published", task=task, count=len(part))


def publish_event_ids(app: Any, event_ids: Sequence[str]) -> None:
    """Send ``event_ids`` to the worker in chunks; raise :class:`PublishError` on failure."""
    _publish(app, PROCESS_EVENTS, event_ids, CHUNK)


def publish_notice_ids(app: Any, notice_ids: Sequence[str]) -> None:
    """Send ``notice_ids`` for delivery, one per message so a slow receiver holds up no other."""
    _publish(app, DELIVER_NOTICES, notice_ids, 1)


def remember_notice(session: Session, notice_id: str) -> None:
    """Note a notice queued in this transaction, for :func:`publish_new_notices`."""
    session.info.setdefault(NEW_NOTICES, []).append(notice_id)


def take_new_notices(session: Session) -> list[str]:
    """The notices queued in this transaction (read before it closes)."""
    notices: list[str] = session.info.pop(NEW_NOTICES, [])
    return notices


def publish_new_notices(app: Any, notice_ids: Sequence[str]) -> None:
    """Publish after commit; on failure the re-drive delivers them later, so only warn."""
    if not notice_ids:
        return
    try:
        publish_notice_ids(app, notice_ids)
    except PublishError as error:
        log.warning("notices.publish_failed", count=len(notice_ids), error=str(error))
