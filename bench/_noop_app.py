"""The limit bench/events.py compares with: a Celery worker whose task does nothing.

It is built like tokenwarden's own worker: the same configuration (``config.celery``, so the
same serializer, prefetch, acks, consumer class and signals), the same task options as
``process_events`` and the same command-line flags, started the same way (``bench/_worker.py``)::

    python -m bench._worker bench._noop_app --pool prefork --concurrency 2 --hostname b-1@%h

Only the task differs: ``bench.noop`` returns at once. ``bench.mark`` writes the wall-clock time
to a file, so the benchmark can time a drain from its first to its last message.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Final

from celery import Celery

from tokenwarden.config.celery import celery_config
from tokenwarden.config.settings import Settings, get_settings

NOOP: Final = "bench.noop"
MARK: Final = "bench.mark"


def make_app(settings: Settings) -> Celery:
    app = Celery("tokenwarden-bench-noop", include=["tokenwarden.worker.runtime.signals"])
    app.conf.update(celery_config(settings))
    return app


app = make_app(get_settings())


# The options of tasks.events.process_events, minus the database.
@app.task(name=NOOP, acks_late=True, reject_on_worker_lost=True, ignore_result=True)  # type: ignore[untyped-decorator]
def noop(*args: Any, **kwargs: Any) -> None:
    return None


@app.task(name=MARK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)  # type: ignore[untyped-decorator]
def mark(path: str) -> None:
    Path(path).write_text(repr(time.time()))
