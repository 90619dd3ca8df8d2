"""Last uses and audited refusals of checked tokens, written off the request's path.

A request only notes what happened in a dict; a background thread writes it every
:data:`FLUSH_EVERY_S` seconds in short transactions (refusals as one batch of audit rows, last
uses as upserts of :data:`CHUNK` rows each), and once more when the API stops. A token's use
is noted at most once in :data:`USE_EVERY_S`, so a token checked a thousand times a second
costs one row a minute. Nothing here touches the ``tokens`` rows a revocation updates
(worker/domain/usage.py).

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
from tokenwarden.worker.domain.introspection import (
    Introspection,
    not_audited_lately,
    refusal_rows,
)

log = structlog.get_logger(__name__)

FLUSH_EVERY_S: Final = 10.0
USE_EVERY_S: Final = 60.0
# Ids per statement. Building a many-row upsert costs tens of µs a row, all of it holding the
# GIL the event loop answers requests with: a thousand uses were 60 ms of answers held up at
# once. Fifty rows are a burst of a few ms ...
CHUNK: Final = 50
# ... and while the API serves, each is followed by a pause this many times as long as it
# took, so the writes never take more than a fifth of the loop's time.
PAUSE_FACTOR: Final = 4.0
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
            self.flush(paced=True)

    def flush(self, *, paced: bool = False) -> None:
        """Write what was noted; on a failure, log it and drop it (it is only a record).

        ``paced``: pause after each chunk of uses (:data:`PAUSE_FACTOR`), as the API does
        while it serves; a stop (pause cut short) writes the rest at once.
        """
        with self._lock:
            uses, self._uses = self._uses, {}
            refusals, self._refusals = self._refusals, []
        if not uses and not refusals:
            return
        ids = list(uses)
        try:
            if refusals:
                with transaction(self._engine()) as session:
                    rows = not_audited_lately(session, refusal_rows(refusals), now=clock.now())
                    audit.record_many(session, rows)
            for start in range(0, len(ids), CHUNK):
                began = time.monotonic()
                with transaction(self._engine()) as session:
                    usage.record_uses(session, {i: uses[i] for i in ids[start : start + CHUNK]})
                if paced:
                    self._stop.wait(PAUSE_FACTOR * (time.monotonic() - began))
        except Exception as error:
            log.warning(
                "usage.not_recorded",
                uses=len(uses),
                refusals=len(refusals),
                error=mask_tokens(first_line(error, typed=True)),
            )
