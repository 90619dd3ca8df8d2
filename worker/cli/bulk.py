"""``tokenwarden revoke``: break-glass revocation of an organization's tokens.

Must not import ``tasks`` or ``producer``.
"""

from __future__ import annotations

import getpass
import time
from collections.abc import Callable
from typing import Any, Final

import click
from sqlalchemy.orm import Session

from tokenwarden.worker.cli.common import (
    NO_TOKEN,
    echo_json,
    echo_listing,
    fail,
    json_option,
    parse_instant,
    settings,
    transaction,
)
from tokenwarden.worker.domain import audit, clock, inbox
from tokenwarden.worker.domain.bulk_revocation import (
    CONFIRM_WORD,
    REASON_MAX,
    Selection,
    new_event_id,
    select_tokens,
    step,
)
from tokenwarden.worker.domain.events import CloudEvent, parse_event
from tokenwarden.worker.domain.expiry.grouped_notices import AnyRow
from tokenwarden.worker.domain.models import EventStatus, InboxEvent, TokenKind

_COLUMNS: Final[dict[str, str | Callable[[dict[str, Any]], Any]]] = {
    "id": "id",
    "kind": "kind",
    "org": "org_id",
    "owner": lambda t: t["user_id"] or f"app:{t['app_id']} (by {t['created_by']})",
    "name": "name",
    "hint": lambda t: f"…{t['last4']}",
    "expires": "expires_at",
}


@click.command("revoke")
@click.option("--org", "org_id", required=True, type=NO_TOKEN, help="Organization.")
@click.option(
    "--user", "user_id", default=None, type=NO_TOKEN, help="Only tokens owned or created by USER."
)
@click.option("--kind", default=None, type=click.Choice(["personal", "application"]))
@click.option("--created-before", default=None, help="Only tokens created before this ISO 8601.")
@click.option("--reason", default=None, type=NO_TOKEN, help="Why; kept in the audit trail.")
@click.option("--dry-run", is_flag=True, help="List what would be revoked; change nothing.")
@click.option("--confirm", default=None, help=f"Type {CONFIRM_WORD} to revoke for real.")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Tokens per transaction.")
@click.option("--actor", default=None, type=NO_TOKEN, help="Who asks (default: the login name).")
@json_option
def revoke(
    org_id: str,
    user_id: str | None,
    kind: str | None,
    created_before: str | None,
    reason: str | None,
    dry_run: bool,
    confirm: str | None,
    batch: int | None,
    actor: str | None,
    as_json: bool,
) -> None:
    """Revoke every live token of ORG matching the filters (break-glass); try --dry-run first."""
    if reason is not None and len(reason) > REASON_MAX:
        fail(f"--reason: at most {REASON_MAX} characters")
    selection = Selection(
        org_id=org_id,
        user_id=user_id,
        kind=TokenKind(kind) if kind else None,
        created_before=parse_instant(created_before, option="--created-before")
        if created_before
        else None,
    )
    now = clock.now()
    if dry_run:
        with transaction() as session:
            rows = select_tokens(session, selection, as_of=now)
        _show_dry_run(rows, as_json=as_json)
        return
    if confirm != CONFIRM_WORD:
        fail(f"revoking tokens in bulk needs --confirm {CONFIRM_WORD} (try --dry-run first)")
    stamp = audit.Stamp(
        at=now, now=now, source="cli", event_id=new_event_id(), actor=actor or getpass.getuser()
    )
    result = _revoke_in_batches(
        selection, stamp=stamp, reason=reason, batch=batch or settings().sweep_batch
    )
    if as_json:
        echo_json(result)
    else:
        click.echo(
            f"revoked {len(result['revoked'])} token(s) of {org_id} in "
            f"{result['transactions']} transaction(s); {result['notices']} notice(s) queued"
        )


def _revoke_in_batches(
    selection: Selection, *, stamp: audit.Stamp, reason: str | None, batch: int
) -> dict[str, Any]:
    """Store the request as a ``tokens.bulk_revoke_requested`` event, then apply it here in
    short transactions of ``batch`` tokens each; the last one queues the notices.

    Were this command stopped half-way, the event would stay pending in the inbox and the
    worker's re-drive would finish it, notices included, as if a producer had sent it.
    """
    assert stamp.event_id is not None
    with transaction() as session:
        inbox.store_events(session, [_as_event(selection, stamp, reason)], now=stamp.now)
    transactions = 0
    longest = 0.0
    result: dict[str, Any] | None = None
    while result is None:
        started = time.perf_counter()
        with transaction() as session:
            result = _one_batch(session, selection, stamp=stamp, reason=reason, batch=batch)
        transactions += 1
        longest = max(longest, (time.perf_counter() - started) * 1000)
    return {
        "event_id": stamp.event_id,
        **result,
        "transactions": transactions,
        "longest_transaction_ms": round(longest, 1),
    }


def _one_batch(
    session: Session, selection: Selection, *, stamp: audit.Stamp, reason: str | None, batch: int
) -> dict[str, Any] | None:
    """One step of the stored event; what it revoked in all once it is finished, else None."""
    assert stamp.event_id is not None
    claimed = inbox.claim(session, [stamp.event_id])
    if not claimed:  # the worker's re-drive took it up and finished it meanwhile
        finished = session.get_one(InboxEvent, stamp.event_id)
        return {"revoked": sorted((finished.result or {}).get("revoked", [])), "notices": 0}
    (event,) = claimed
    done = step(session, selection, stamp=stamp, reason=reason, limit=batch)
    if not done.finished:
        event.published_at = clock.now()  # at work: the re-drive leaves it alone meanwhile
        return None
    revoked = sorted(str(row.id) for row in done.everything)
    inbox.finish(
        session, event, status=EventStatus.DONE, now=clock.now(), result={"revoked": revoked}
    )
    return {"revoked": revoked, "notices": len(done.notices)}


def _as_event(selection: Selection, stamp: audit.Stamp, reason: str | None) -> CloudEvent:
    """The request as the event a producer would send for it."""
    data: dict[str, Any] = {**selection.as_dict(), "reason": reason, "actor": stamp.actor}
    return parse_event(
        {
            "specversion": "1.0",
            "id": stamp.event_id,
            "source": stamp.source,
            "type": "tokens.bulk_revoke_requested",
            "time": stamp.at.isoformat(),
            "data": {k: v for k, v in data.items() if v is not None},
        }
    )


def _show_dry_run(rows: list[AnyRow], *, as_json: bool) -> None:
    records = [
        {
            "id": row.id,
            "kind": row.kind,
            "org_id": row.org_id,
            "user_id": row.user_id,
            "app_id": row.app_id,
            "created_by": row.created_by,
            "name": row.name,
            "last4": row.last4,
            "expires_at": row.expires_at,
        }
        for row in rows
    ]
    if as_json:
        echo_json({"dry_run": True, "count": len(records), "tokens": records})
        return
    echo_listing(records, _COLUMNS, as_json=False)
    click.echo(f"{len(records)} token(s) would be revoked (dry run: nothing changed)")


def register(group: click.Group) -> None:
    group.add_command(revoke)
