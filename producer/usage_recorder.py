"""Last uses and audited refusals of checked tokens, written off the request's path.

A request only notes what happened in a dict; a background thread writes it every
:data:`FLUSH_EVERY_S` seconds in one short transaction (last uses as one upsert, refusals as
one batch of audit rows), and once more when the API stops. A token's use is noted at most
once in :data:`USE_EVERY_S`, so a token checked a thousand times a second costs one row a
minute. Nothing here touches the ``tokens`` rows a revocation updates (worker/domain/usage.py).

Must not import the tasks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Final

import structlog
from sqlalchemy import Engine

from tokenwarden.config.redaction import first_line, mask_tokens
from tokenwarden.worker.domain import audit, clock, usage
from tokenwarden.worker.domain.db import transaction
from tokenwarden.worker.domain.introspection import Introspection, refusal_rows

log = structlog.get_logger(__name__)

FLUSH_EVERY_S: Final = 10.0
USE_EVERY_S: Final = 60.0
# Ids per statement, well under SQLite's limit on bound parameters.
CHUNK: Final = 500
# Pending refusals kept at most (a store that stays down must not grow them without end).
MAX_PENDING: Final = 100_000


class UsageRecorder:
    """Notes uses and refusals; :meth:`start` writes them from a thread of its own."""

    def __init__(self, engine: Callable[[], Engine], *, every_s: float = FLUSH_EVERY_S) -> None:
        self._engine = engine
        self._every_s = every_s
        self._lock = threading.Lock()
        self._uses: dict[str, datetime] = {}
        self._noted: dict[str, float] = {}  # token id -> monotonic time of its last note
        self._refusals: list[tuple[Introspection, datetime]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def used(self, token_id: str) -> None:
        now = time.monotonic()
        noted = self._noted.get(token_id)
        if noted is not None and now - noted < USE_EVERY_S:
            return
        with self._lock:
            if len(self._noted) >= MAX_PENDING:
                self._noted = {t: n for t, n in self._noted.items() if now - n < USE_EVERY_S}
            self._noted[token_id] = now
            self._uses[token_id] = clock.now()

    def refused(self, answer: Introspection) -> None:
        with self._lock:
            if len(self._refusals) < MAX_PENDING:
                self._refusals.append((answer, clock.now()))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="usage-recorder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            self.flush()

    def flush(self) -> None:
        """Write what was noted; on a failure, log it and drop it (it is only a record)."""
        with self._lock:
            uses, self._uses = self._uses, {}
            refusals, self._refusals = self._refusals, []
        if not uses and not refusals:
            return
        try:
            with transaction(self._engine()) as session:
                ids = list(uses)
                for start in range(0, len(ids), CHUNK):
                    usage.record_uses(session, {i: uses[i] for i in ids[start : start + CHUNK]})
                audit.record_many(session, refusal_rows(refusals))
        except Exception as error:
            log.warning(
                "usage.not_recorded",
                uses=len(uses),
                refusals=len(refusals),
                error=mask_tokens(first_line(error, typed=True)),
            )
