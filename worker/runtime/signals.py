"""Celery signals: our logging, the task log context, and dead letters for unusable messages.

The worker imports this module through the app's ``include``. A message the worker cannot use
(a body that is not JSON, an unknown task, a malformed task message) is kept as a dead-letter
row with the reason and a redacted excerpt of its body, then acknowledged or rejected as
Celery does anyway: it is never redelivered forever, and the worker keeps consuming.

The same consumer keeps the worker recoverable. A broker that goes away is a connection
error, after which Celery reconnects (on Redis with the channels of
:mod:`worker.runtime.redis_transport`, so that the old connection's messages cannot turn it into
Celery's "Unrecoverable error"). After an unrecoverable error all the same, the process exits
rather than hang in its warm stop, so that whatever supervises it starts it again. While the
consumer is connected it touches ``TOKENWARDEN_WORKER_HEARTBEAT_FILE`` (when set) every few
seconds: a file older than a minute or two means a worker that consumes nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import structlog
from celery import signals
from celery.platforms import EX_FAILURE
from celery.worker.consumer import Consumer

from tokenwarden.config.celery import PROCESS_EVENTS
from tokenwarden.config.logging import bind_task_context, clear_task_context, configure_logging
from tokenwarden.config.settings import get_settings
from tokenwarden.worker.domain import clock, db, handlers
from tokenwarden.worker.runtime import tasking
from tokenwarden.worker.runtime.redis_transport import use_fixed_channels

log = structlog.get_logger(__name__)

HEARTBEAT_EVERY_S = 5.0
# A warm stop after an unrecoverable error gets this long before the process exits anyway:
# past it, a worker stuck in its own shutdown would consume nothing and never be restarted.
UNRECOVERABLE_EXIT_AFTER_S = 30.0


class DeadLetteringConsumer(Consumer):  # type: ignore[misc]  # celery ships no type information
    """Celery's consumer, plus dead letters, broker-loss recovery and a heartbeat.

    Celery acknowledges a message whose body cannot be decoded in ``on_decode_error`` and
    sends no signal, so this is the one place to keep it. Configure with ``worker_consumer``.
    """

    _heartbeat: Any = None  # the event loop's timer entry, while connected

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        keep_dead_letter(
            reason=f"undecodable message ({message.content_type}): {exc}",
            task=_task_name(message),
            body=message.body,
        )
        super().on_decode_error(message, exc)

    def loop_args(self) -> Any:
        # Called each time the consumer starts its loop on a fresh connection.
        self._start_heartbeat()
        return super().loop_args()

    def connection_for_read(self, heartbeat: Any = None) -> Any:
        # Celery's own, plus channels that survive the broker going away (see the module).
        connection = self.app.connection_for_read(heartbeat=heartbeat)
        use_fixed_channels(connection)
        return self.ensure_connected(connection)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        self._stop_heartbeat()
        super().on_connection_error_after_connected(exc)

    def close(self) -> None:
        """Called by the worker as it begins to stop, whatever the reason."""
        self._stop_heartbeat()
        exitcode = getattr(self.controller, "exitcode", None)
        if exitcode not in (None, 0):
            # A stop with a failure status: after "Unrecoverable error", or once the broker
            # connection retries ran out. Its warm stop can hang (on a broker that is gone,
            # say) and leave a process that consumes nothing and that nobody restarts.
            _exit_later(UNRECOVERABLE_EXIT_AFTER_S, exitcode)

    def _start_heartbeat(self) -> None:
        self._stop_heartbeat()
        path = get_settings().worker_heartbeat_file
        if path is None or self.timer is None:
            return
        touch_heartbeat(path)
        self._heartbeat = self.timer.call_repeatedly(HEARTBEAT_EVERY_S, touch_heartbeat, (path,))

    def _stop_heartbeat(self) -> None:
        entry, self._heartbeat = self._heartbeat, None
        if entry is not None:
            entry.cancel()


def touch_heartbeat(path: Path) -> None:
    """Mark the worker alive now; a failure to write is logged, never raised into the loop."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as error:
        log.warning("worker.heartbeat_failed", path=str(path), error=str(error))


def _exit_later(after_s: float, exitcode: int) -> None:
    def _exit() -> None:
        log.critical("worker.exit_forced", after_s=after_s, exitcode=exitcode)
        logging.shutdown()
        os._exit(exitcode or EX_FAILURE)

    timer = threading.Timer(after_s, _exit)
    timer.daemon = True  # a worker that does stop in time exits without waiting for it
    timer.start()


def keep_dead_letter(*, reason: str, task: str | None, body: object) -> None:
    """Write one dead-letter row in its own transaction; never raise into the consumer."""
    try:
        with db.transaction(tasking.store_engine()) as session:
            handlers.dead_letter_message(
                session, reason=reason, now=clock.now(), task=task, body=body
            )
    except Exception:
        # The message is dropped either way; losing its copy must not stop the consumer.
        log.exception("dead_letter.failed", reason=handlers.redact(reason), task=task)


def setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """Our one logging setup; connecting to this signal stops Celery installing its own."""
    level = logging.getLevelName(loglevel) if isinstance(loglevel, int) else loglevel
    configure_logging(level=level or "INFO")


def bind_context(
    task_id: str | None = None,
    task: Any = None,
    args: Any = None,
    **_: Any,
) -> None:
    context: dict[str, Any] = {"task_id": task_id, "task_name": getattr(task, "name", None)}
    if getattr(task, "name", None) == PROCESS_EVENTS and args and _is_id_list(args[0]):
        context["event_ids"] = args[0]
    bind_task_context(**context)


def clear_context(**_: Any) -> None:
    clear_task_context()


def dead_letter_unknown_task(message: Any = None, name: str | None = None, **kwargs: Any) -> None:
    keep_dead_letter(
        reason=f"unknown task {name!r} (message {kwargs.get('id')})",
        task=name,
        body=_body(message),
    )


def dead_letter_rejected(message: Any = None, exc: BaseException | None = None, **_: Any) -> None:
    reason = f"invalid task message: {exc}" if exc is not None else "not a task message"
    keep_dead_letter(reason=reason, task=_task_name(message), body=_body(message))


def dispose_inherited_pool(**_: Any) -> None:
    """A forked pool child must not reuse the connections its parent opened."""
    db.engine_for(get_settings().resolved_database_url).dispose(close=False)


def _is_id_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _task_name(message: Any) -> str | None:
    headers = getattr(message, "headers", None)
    name = headers.get("task") if isinstance(headers, dict) else None
    return name if isinstance(name, str) else None


def _body(message: Any) -> object:
    return getattr(message, "body", None)


# Explicit connect calls rather than decorators: the signal objects are untyped.
# weak=False: the receivers live as long as the process, whatever holds this module.
signals.setup_logging.connect(setup_logging, weak=False)
signals.task_prerun.connect(bind_context, weak=False)
signals.task_postrun.connect(clear_context, weak=False)
signals.task_unknown.connect(dead_letter_unknown_task, weak=False)
signals.task_rejected.connect(dead_letter_rejected, weak=False)
signals.worker_process_init.connect(dispose_inherited_pool, weak=False)
