"""Putting event ids on the queue, after the inbox rows that name them are committed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog

log = structlog.get_logger(__name__)

PROCESS_EVENTS = "tokenwarden.process_events"
# Ids per message: enough to amortise a transaction, few enough to finish well inside the
# task time limit.
CHUNK = 100


class PublishError(Exception):
    """The broker did not take the message."""


def publish_event_ids(app: Any, event_ids: Sequence[str]) -> None:
    """Send ``event_ids`` to the worker in chunks; raise :class:`PublishError` on failure."""
    for start in range(0, len(event_ids), CHUNK):
        chunk = list(event_ids[start : start + CHUNK])
        try:
            app.send_task(PROCESS_EVENTS, args=[chunk], retry=False)
        except Exception as error:
            raise PublishError(f"broker refused the message: {error}") from error
        log.debug("events.published", count=len(chunk))
