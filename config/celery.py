"""Every Celery option in one place, each with the reason it is set."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Final

from tokenwarden.config.settings import Settings

# Every task's name, the one place it is spelled: the tasks register under these, the
# publishers send to them and the schedule below names them. They are on the wire, so they
# never change.
PROCESS_EVENTS: Final = "tokenwarden.process_events"
REDRIVE_EVENTS: Final = "tokenwarden.redrive_events"
DELIVER_NOTICES: Final = "tokenwarden.deliver_notices"
REDRIVE_NOTICES: Final = "tokenwarden.redrive_notices"
SWEEP_EXPIRED: Final = "tokenwarden.sweep_expired"
SEND_REMINDERS: Final = "tokenwarden.send_reminders"

REDRIVE_EVERY_S = 10.0
REMINDERS_AT_HOUR_UTC = 8


def transport_options(settings: Settings) -> dict[str, Any]:
    url = settings.resolved_broker_url
    if url.startswith("filesystem://"):
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        return {
            # Producers and consumers share one folder, so they share one queue.
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            # Exchange bindings; kombu's default is a folder in the current directory.
            "control_folder": str(folder / "control"),
            "store_processed": False,
            # The transport polls; a tenth of a second keeps a leaver's token alive no longer.
            "polling_interval": 0.1,
        }
    if url.startswith(("redis://", "rediss://")):
        # Redis re-delivers an unacknowledged message only after this; the inbox re-drive
        # republishes pending events much sooner, so this only bounds duplicates.
        return {"visibility_timeout": 600}
    return {}


def celery_config(settings: Settings) -> dict[str, Any]:
    # Imported here: the command line reads the task names above without loading Celery.
    from celery.schedules import crontab

    return {
        "broker_url": settings.resolved_broker_url,
        "broker_transport_options": transport_options(settings),
        # The API must answer 503 quickly when the broker is gone, not hang on retries.
        "broker_connection_timeout": 4,
        "broker_connection_retry_on_startup": True,
        # A worker keeps retrying a lost broker however long the outage lasts (Celery gives up
        # after 100 attempts by default and the worker would then stop consuming for good).
        "broker_connection_max_retries": None,
        # JSON only: a pickled message could run code in the worker.
        "task_serializer": "json",
        "accept_content": ["json"],
        # Nobody reads task results; the inbox row records what each event did.
        "task_ignore_result": True,
        "result_backend": None,
        # Acknowledge after the task ran, and give the message back if its worker dies, so a
        # crash mid-task re-runs it; tasks are idempotent so a second run changes nothing.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A stuck task is interrupted rather than holding its message and row locks forever.
        "task_soft_time_limit": 60,
        "task_time_limit": 90,
        # One queue for everything; its name is a setting so that several deployments (or
        # test runs) can share one broker.
        "task_default_queue": settings.queue,
        "task_default_exchange": settings.queue,
        "task_default_routing_key": settings.queue,
        # Late acks with a small prefetch: a dying worker holds few messages hostage.
        "worker_prefetch_multiplier": 4,
        # Our logging setup (config.logging) renders Celery's records; do not replace it.
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        # Keep a copy of a message whose body cannot be decoded; Celery alone logs and drops it.
        "worker_consumer": "tokenwarden.worker.runtime.signals:DeadLetteringConsumer",
        "enable_utc": True,
        "timezone": "UTC",
        # Beat keeps its last-run times beside the other embedded files.
        "beat_schedule_filename": str((settings.home / "celerybeat-schedule").resolve()),
        "beat_schedule": {
            "redrive-inbox": {
                "task": REDRIVE_EVENTS,
                "schedule": timedelta(seconds=min(REDRIVE_EVERY_S, settings.redrive_after_s)),
            },
            # Expiry (tasks.expiry): the sweep resumes whatever the previous run left, and
            # a lock in the database makes a second scheduler's run return at once. The same
            # run deletes finished inbox events past TOKENWARDEN_INBOX_RETENTION_DAYS.
            "sweep-expired": {
                "task": SWEEP_EXPIRED,
                "schedule": timedelta(seconds=settings.sweep_interval_s),
            },
            # Reminders go out once a day at a fixed time (UTC); a rerun sends nothing twice.
            "send-reminders": {
                "task": SEND_REMINDERS,
                "schedule": crontab(hour=REMINDERS_AT_HOUR_UTC, minute=0),
            },
            # Notices whose message was lost, or whose worker died holding the lease.
            "redrive-notices": {
                "task": REDRIVE_NOTICES,
                "schedule": timedelta(seconds=min(REDRIVE_EVERY_S, settings.redrive_after_s)),
            },
        },
    }
