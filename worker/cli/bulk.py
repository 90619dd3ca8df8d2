"""``tokenwarden revoke``: break-glass revocation of an organization's tokens.

Must not import ``tasks`` or ``producer``.
"""

from __future__ import annotations

import getpass
import time
from collections.abc import Callable
from typing import Any, Final

import click

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
from tokenwarden.worker.domain import audit, clock
from tokenwarden.worker.domain.bulk_revocation import (
    CONFIRM_WORD,
    REASON_MAX,
    Selection,
    notify_revoked,
    revoke_selected,
    select_tokens,
)
from tokenwarden.worker.domain.expiry.grouped_notices import AnyRow
from tokenwarden.worker.domain.models import TokenKind

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
        at=now, now=now, source="cli", event_id=None, actor=actor or getpass.getuser()
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
    """Short transactions of ``batch`` tokens each, then one notice per recipient."""
    revoked: list[AnyRow] = []
    transactions = 0
    longest = 0.0
    while True:
        started = time.perf_counter()
        with transaction() as session:
            rows = revoke_selected(session, selection, stamp=stamp, reason=reason, limit=batch)
        transactions += 1
        longest = max(longest, (time.perf_counter() - started) * 1000)
        revoked += rows
        if not rows:
            break
    with transaction() as session:
        queued = notify_revoked(session, revoked, stamp=stamp, reason=reason)
    return {
        "revoked": sorted(row.id for row in revoked),
        "notices": len(queued),
        "transactions": transactions,
        "longest_transaction_ms": round(longest, 1),
    }


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
