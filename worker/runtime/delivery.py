"""Delivering the notices one message names: each posted, retried later or dead-lettered.

Delivery talks to a receiver that may be slow, so it runs in no transaction of the task's:
each notice is leased, posted and recorded in short transactions of its own
(:func:`worker.runtime.webhook.deliver`), and no database lock is held while the receiver
answers. A notice that must wait gets a delayed message of its own; an id that names no
notice gets a dead letter, and the message's other notices are still delivered.

Imports ``config``, ``worker.domain`` and the rest of the runtime only: never the tasks, the
API, the command line.
"""

from __future__ import annotations

from collections import Counter
from typing import Final

import structlog

from tokenwarden.worker.domain import db, outbox_delivery
from tokenwarden.worker.domain.outbox_delivery import Target
from tokenwarden.worker.runtime import mail, webhook
from tokenwarden.worker.runtime.tasking import CountedTask

log = structlog.get_logger(__name__)

NO_SUCH_NOTICE: Final = "no such notice in the outbox"


def deliver_notices(
    task: CountedTask,
    notice_ids: list[str],
    *,
    target: Target | None,
    mail_target: mail.MailTarget | None = None,
) -> Counter[str] | None:
    """Post each pending, due notice among ``notice_ids`` and email its due recipients;
    schedule another try for those that must wait. The count of each attempt's status; None
    when there is neither a webhook ``target`` nor a ``mail_target``.

    A notice that is already sent, or taken by another worker, is skipped (a duplicate
    message is normal). Without a target nothing is posted or mailed: the notices stay
    pending in the outbox, where ``tokenwarden notices`` shows them.
    """
    wanted = list(dict.fromkeys(notice_ids))
    # Postgres cannot even compare a text with a NUL in it; no stored id holds one.
    for notice_id in (i for i in wanted if "\x00" in i):
        _no_such_notice(task, notice_id, notice_ids, why="an id cannot hold a NUL character")
    wanted = [i for i in wanted if "\x00" not in i]
    if target is None and mail_target is None:
        _keep(task, wanted, notice_ids)
        return None
    if target is None:
        # The webhook's lease is what finds an unknown id otherwise.
        wanted = _known(task, wanted, notice_ids)
    engine = task.engine()
    outcomes: Counter[str] = Counter()
    for notice_id in wanted:
        with structlog.contextvars.bound_contextvars(notice_id=notice_id):
            retries: list[float] = []
            if target is not None:
                attempt = webhook.deliver(
                    engine, notice_id, target=target, client=webhook.shared_client()
                )
                outcomes[attempt.status] += 1
                if attempt.status == outbox_delivery.MISSING:
                    _no_such_notice(task, notice_id, notice_ids)
                    continue
                if attempt.retry_in_s is not None:
                    retries.append(attempt.retry_in_s)
            if mail_target is not None:
                mailed = mail.deliver(engine, notice_id, target=mail_target)
                outcomes.update(f"email_{status}" for status in mailed.outcomes.values())
                if mailed.retry_in_s is not None:
                    retries.append(mailed.retry_in_s)
            # One delayed message per channel that must wait (the sooner cannot stand in for
            # the later: it would find the other channel not due yet).
            for delay in sorted(set(retries)):
                _schedule(task, notice_id, delay)
    return outcomes


def _known(task: CountedTask, wanted: list[str], notice_ids: list[str]) -> list[str]:
    """Those of ``wanted`` in the outbox; each of the others gets a dead letter."""
    reader = task.engine().execution_options(**{db.READ_ONLY: True})
    with db.transaction(reader) as session:
        known = outbox_delivery.existing(session, wanted)
    for notice_id in wanted:
        if notice_id not in known:
            _no_such_notice(task, notice_id, notice_ids)
    return [notice_id for notice_id in wanted if notice_id in known]


def _keep(task: CountedTask, wanted: list[str], notice_ids: list[str]) -> None:
    """No target: leave the notices in the outbox, but still refuse ids that name none."""
    known = _known(task, wanted, notice_ids)
    log.info("notices.kept", count=len(known), reason="no usable webhook or mail target")


def _schedule(task: CountedTask, notice_id: str, delay_s: float) -> None:
    """The next attempt, as a delayed message; if the broker refuses, the re-drive sends it."""
    try:
        task.apply_async(args=[[notice_id]], countdown=delay_s)
    except Exception as error:
        log.warning("notice.retry_not_scheduled", notice_id=notice_id, error=str(error))
        return
    log.info("notice.retry_scheduled", notice_id=notice_id, retry_in_s=round(delay_s, 3))


def _no_such_notice(
    task: CountedTask, notice_id: str, notice_ids: list[str], *, why: str | None = None
) -> None:
    reason = f"{NO_SUCH_NOTICE}: {notice_id!r}" + (f" ({why})" if why else "")
    task.dead_letter(reason, body={"args": [notice_ids], "kwargs": {}})
