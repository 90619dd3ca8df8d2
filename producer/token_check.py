"""One check of a token for every door that asks: text in, :class:`Introspection` out.

``POST /v1/introspect`` uses it, and so can any door that must tell whether a token is usable
(a gateway's forward-auth): the answer is cached per process, the cache is dropped whenever
the store says something was revoked (producer/revocation_feed.py), refusals of known tokens
are audited at most once a minute per token and reason, and uses are recorded coalesced, off
the request's path (producer/usage_recorder.py).

Cached are only active answers, each until the token's own expiry or a random 75 to 100 % of
:data:`MAX_AGE_S`, whichever comes first; a refusal is always read again, so a member who
re-joins is usable at once. A cached answer is given on the event loop; only a look-up in the
store goes to a thread. A malformed text is refused before any look-up, cache or store.

Must not import the tasks.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from typing import Final

import structlog
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from tokenwarden.producer.usage_recorder import UsageRecorder
from tokenwarden.worker.domain import clock
from tokenwarden.worker.domain.db import read_transaction, transaction
from tokenwarden.worker.domain.introspection import (
    AUDIT_SOURCE,
    MALFORMED,
    Introspection,
    introspect,
    malformed,
)
from tokenwarden.worker.domain.rotation import detect_reuse
from tokenwarden.worker.domain.tokens import hash_token, kind_of

log = structlog.get_logger(__name__)

# An answer is read again after this long even when nothing was announced: the feed is the
# guarantee, this only bounds what a missed notice could cost.
MAX_AGE_S: Final = 60.0
# Answers stored together (a cache refilled after a revocation, or at start) would all be read
# again in the same instant MAX_AGE_S later: a thousand look-ups at once, and every answer
# queued behind them (a p99 of 60 ms at half the API's rate). Each answer lives a random 75
# to 100 % of the maximum age instead, so they are read again a few at a time.
AGE_SPREAD: Final = 0.25
# An answer asked for after this share of its age is read again in the background, and the
# cached one given meanwhile: a token in use never makes a request wait for the store.
READ_AHEAD_AT: Final = 0.8
MAX_ENTRIES: Final = 100_000
# One audit row (and one log line) per token and reason in this long, from each process.
AUDIT_EVERY_S: Final = 60.0


class AnswerCache:
    """Active answers by token hash, trusted only while a revocation feed vouches for it.

    Every change of trust (a revocation announced, the feed lost or back) empties the cache
    and starts a new generation. A look-up notes the generation before it reads the store
    and may store its answer only if none began meanwhile: an answer read just before a
    revocation's commit can never outlive the revocation's notice.
    """

    def __init__(self, *, max_age_s: float = MAX_AGE_S, max_entries: int = MAX_ENTRIES) -> None:
        self._lock = threading.Lock()
        # token hash -> (monotonic times it is read ahead from and read again at the latest,
        # answer); a read ahead under way has set the first to infinity.
        self._entries: dict[str, tuple[float, float, Introspection]] = {}
        self._generation = 0
        self._trusted = False
        # The feed vouches for the cache until then; it renews while it hears from its store.
        self._lease_until = float("inf")
        self._max_age_s = max_age_s
        self._max_entries = max_entries
        # Called before each use: a feed that must look (SQLite) invalidates from there.
        self.refresh: Callable[[], None] = lambda: None

    @property
    def trusted(self) -> bool:
        return self._trusted and time.monotonic() < self._lease_until

    def generation(self) -> int:
        return self._generation

    def get(self, key: str) -> Introspection | None:
        self.refresh()
        if not self.trusted:
            return None
        entry = self._entries.get(key)
        if entry is None:
            return None
        _, renew_at, answer = entry
        expires_at = answer.expires_at
        if time.monotonic() > renew_at or (expires_at and expires_at <= clock.now()):
            self._entries.pop(key, None)
            return None
        return answer

    def put(self, key: str, answer: Introspection, generation: int) -> None:
        """Keep an active ``answer`` read in ``generation``; forget an inactive one."""
        with self._lock:
            if not self.trusted or generation != self._generation:
                return
            if not answer.active:
                self._entries.pop(key, None)
                return
            if len(self._entries) >= self._max_entries:
                self._entries.pop(next(iter(self._entries)))  # the oldest
            age_s = self._max_age_s * (1 - AGE_SPREAD * random.random())  # noqa: S311 - no secret
            now = time.monotonic()
            self._entries[key] = (now + READ_AHEAD_AT * age_s, now + age_s, answer)

    def read_ahead(self, key: str) -> int | None:
        """The generation to read ``key`` again in, if its answer is due for that and no
        other read ahead of it is under way; ``None`` otherwise."""
        entry = self._entries.get(key)
        if entry is None or time.monotonic() < entry[0]:
            return None
        with self._lock:
            if self._entries.get(key) is not entry:
                return None
            self._entries[key] = (float("inf"), entry[1], entry[2])
            return self._generation

    def invalidate(self) -> None:
        """Something was revoked: forget every answer."""
        with self._lock:
            self._generation += 1
            self._entries.clear()

    def renew(self, until: float) -> None:
        """The feed heard from its store just now, every notice before that taken: trust the
        cache until ``until``.

        A lease that ran out meanwhile (the listener late, or its connection silent for a
        while) kept the cache bypassed, not wrong: the notices of that time reach the same
        connection, in order, before its answer, and were taken. A lost connection is
        :meth:`trust` ``False``, which empties the cache.
        """
        with self._lock:
            self._lease_until = until

    def trust(self, trusted: bool) -> None:
        """The feed is listening (``True``) or lost (``False``: bypass until it is back)."""
        with self._lock:
            self._generation += 1
            self._entries.clear()
            self._trusted = trusted

    def __len__(self) -> int:
        return len(self._entries)


class RefusalLimiter:
    """At most one pass per key in :data:`AUDIT_EVERY_S`; counts what it held back."""

    def __init__(self, every_s: float = AUDIT_EVERY_S, max_keys: int = MAX_ENTRIES) -> None:
        self._every_s = every_s
        self._max_keys = max_keys
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def allow(self, key: tuple[str, str]) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._every_s:
                return False
            if len(self._last) >= self._max_keys:
                self._last = {k: t for k, t in self._last.items() if now - t < self._every_s}
            self._last[key] = now
            return True


class TokenCheck:
    """token text -> :class:`Introspection`, cached, invalidated, audited, uses recorded."""

    def __init__(
        self,
        engine: Callable[[], Engine],
        cache: AnswerCache,
        recorder: UsageRecorder,
        *,
        counted: Callable[[str, str], None] = lambda result, cache: None,
    ) -> None:
        self._engine = engine
        self.cache = cache
        self._recorder = recorder
        self._limiter = RefusalLimiter()
        # Once the family is revoked a repeat finds nothing live: no need to write each time.
        self._reuse_limiter = RefusalLimiter()
        self._counted = counted
        self._reading: set[asyncio.Task[None]] = set()

    async def check(self, text: str) -> Introspection:
        """The answer about ``text`` now; raises what the store raises when it is down."""
        if kind_of(text) is None:
            return self._refused(malformed(), "none")
        key = hash_token(text)
        answer = self.cache.get(key)
        source = "hit"
        if answer is None:
            source = "miss" if self.cache.trusted else "bypass"
            generation = self.cache.generation()
            answer = await run_in_threadpool(self._look_up, text)
            if answer.active:
                self.cache.put(key, answer, generation)
            elif answer.reused and self._reuse_limiter.allow((answer.token_id or "-", "reuse")):
                await run_in_threadpool(self._revoke_family, answer)
        elif (ahead := self.cache.read_ahead(key)) is not None:
            task = asyncio.get_running_loop().create_task(self._read_ahead(text, key, ahead))
            self._reading.add(task)
            task.add_done_callback(self._reading.discard)
        if not answer.active:
            return self._refused(answer, source)
        assert answer.token_id is not None
        self._recorder.used(answer.token_id)
        self._counted("active", source)
        return answer

    async def _read_ahead(self, text: str, key: str, generation: int) -> None:
        """Read ``text`` again for the cache; the generation rule of :meth:`AnswerCache.put`
        keeps a revocation noticed meanwhile from being undone."""
        try:
            answer = await run_in_threadpool(self._look_up, text)
        except Exception:
            # Nobody waits for this answer: the cached one stays until it is due, and the
            # request that finds it due reads the store itself and hears of the failure.
            return
        self.cache.put(key, answer, generation)

    def _look_up(self, text: str) -> Introspection:
        with read_transaction(self._engine()) as session:
            return introspect(session, text, now=clock.now())

    def _revoke_family(self, answer: Introspection) -> None:
        """A rotated-away token came back after its overlap: revoke its family, before the
        answer is given (worker/domain/rotation.py)."""
        assert answer.token_id is not None
        with transaction(self._engine()) as session:
            detect_reuse(session, answer.token_id, now=clock.now(), source=AUDIT_SOURCE)

    def _refused(self, answer: Introspection, source: str) -> Introspection:
        reason = answer.reason or MALFORMED
        self._counted(reason, source)
        subject = answer.token_id or "-"
        if self._limiter.allow((subject, reason)):
            # The reason goes to the log and the audit trail only, never to the caller.
            log.info("introspection.refused", reason=reason, token_id=answer.token_id)
            if answer.token_id is not None:
                self._recorder.refused(answer)
        return answer
