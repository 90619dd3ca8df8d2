"""Notice tasks: deliver the notices a message names, and re-drive the ones left behind.

Each task parses its arguments, calls one runtime function (``worker.runtime.delivery``,
``worker.runtime.redrive``) and logs. Delivery gets no transaction per run (see
``worker.runtime.delivery``), so these are :class:`~worker.runtime.tasking.CountedTask` runs.
Imports ``config``, ``worker.domain`` and ``worker.runtime``; never the API (``producer``).
"""

from __future__ import annotations

from typing import Any, Final

import structlog
from celery import signals

from tokenwarden.config.celery import DELIVER_NOTICES, REDRIVE_NOTICES
from tokenwarden.config.settings import get_settings
from tokenwarden.tasks.arguments import BadArguments, id_list
from tokenwarden.worker.domain import clock
from tokenwarden.worker.runtime import delivery, mail, redrive, smtp_connections, webhook
from tokenwarden.worker.runtime.celery_app import app
from tokenwarden.worker.runtime.tasking import IDEMPOTENT, REDRIVE, CountedTask

log = structlog.get_logger(__name__)

# More ids than any publisher sends in one message (worker.runtime.publishing sends
# one per message).
MAX_IDS: Final = 1000
ID_MAX_LENGTH: Final = 40  # notices.id


@app.task(  # type: ignore[untyped-decorator]  # celery ships no type information
    base=CountedTask,
    name=DELIVER_NOTICES,
    **IDEMPOTENT,
)
def deliver_notices(self: CountedTask, *args: Any, **kwargs: Any) -> None:
    """Post each pending, due notice named by the message's one argument, a list of ids.

    Any other arguments make the message unusable, and so does an id that names no notice:
    each gets a dead letter with the reason, and the message is acknowledged.
    """
    try:
        notice_ids = id_list(
            args,
            kwargs,
            name="notice_ids",
            max_count=MAX_IDS,
            max_length=ID_MAX_LENGTH,
            allow_nul=True,  # dead-lettered one by one: the message's other notices go out
        )
    except BadArguments as error:
        self.dead_letter(error.reason, body=error.body)
        return
    settings = get_settings()
    outcomes = delivery.deliver_notices(
        self,
        notice_ids,
        target=webhook.target_from(settings),
        mail_target=mail.target_from(settings),
    )
    if outcomes is not None:
        log.info("notices.attempted", **outcomes)


@app.task(  # type: ignore[untyped-decorator]  # celery ships no type information
    base=CountedTask,
    name=REDRIVE_NOTICES,
    **REDRIVE,
)
def redrive_notices(self: CountedTask) -> None:
    """Publish the notices that have been due for a while without a worker taking them."""
    # Logs what it published (notices.redriven), or why it could not.
    redrive.redrive_notices(self.engine(), app=self.app, settings=get_settings(), now=clock.now())


def _close_client(**_: Any) -> None:
    """A worker process that stops closes its connections to the receiver and mail server."""
    webhook.close_shared_client()
    smtp_connections.close_kept()


# A prefork child sends worker_process_shutdown; a solo or threads worker, worker_shutdown.
# weak=False: the receivers live as long as the process.
signals.worker_process_shutdown.connect(_close_client, weak=False)
signals.worker_shutdown.connect(_close_client, weak=False)
