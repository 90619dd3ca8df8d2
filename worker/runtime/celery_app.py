"""The Celery app: ``celery -A tokenwarden.worker.runtime.celery_app worker``."""

from __future__ import annotations

from celery import Celery

from tokenwarden.config.celery import celery_config
from tokenwarden.config.settings import Settings, get_settings, keep_files_private
from tokenwarden.worker.runtime import file_transport

TASK_MODULES = [
    "tokenwarden.tasks.events",
    "tokenwarden.tasks.notices",
    "tokenwarden.tasks.expiry",
    "tokenwarden.worker.runtime.signals",
]


def make_celery(settings: Settings) -> Celery:
    # Before any connection: the embedded broker's messages are written whole (see there).
    file_transport.install()
    app = Celery("tokenwarden", include=TASK_MODULES)
    app.conf.update(celery_config(settings))
    return app


keep_files_private()
app = make_celery(get_settings())
