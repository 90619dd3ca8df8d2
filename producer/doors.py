"""The token check that the doors for services share (introspection, forward-auth): one per
API process, so one cache, one revocation feed and one usage recorder whichever door asks.

Must not import the tasks.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from tokenwarden.config.settings import Settings
from tokenwarden.producer.revocation_feed import feed_for
from tokenwarden.producer.token_check import AnswerCache, TokenCheck
from tokenwarden.producer.usage_recorder import UsageRecorder


def token_check_for(
    settings: Settings, *, engine: Callable[[], Engine], registry: CollectorRegistry
) -> tuple[TokenCheck, Callable[[FastAPI], Any]]:
    """The shared token check of an app, and the lifespan that runs its feed and recorder."""
    cache = AnswerCache()
    recorder = UsageRecorder(engine)
    feed = feed_for(settings.resolved_database_url, cache)
    checks = Counter(
        "tokenwarden_token_checks",
        "Token checks by result (active or the refusal's reason) and cache outcome.",
        ["result", "cache"],
        registry=registry,
    )
    children: dict[tuple[str, str], Any] = {}

    def counted(result: str, cache_outcome: str) -> None:
        child = children.get((result, cache_outcome))
        if child is None:
            child = children[(result, cache_outcome)] = checks.labels(result, cache_outcome)
        child.inc()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        recorder.start()
        feed.start()
        # What start-up built lives as long as the process: kept out of the collector's
        # sight, a full collection scans only what requests left behind (a few ms, not the
        # 50 to 200 ms that stalled every answer in flight).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            feed.stop()
            await run_in_threadpool(recorder.stop)

    return TokenCheck(engine, cache, recorder, counted=counted), lifespan
