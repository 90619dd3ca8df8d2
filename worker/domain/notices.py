"""Notices: what a person must hear about a token, queued in an outbox row.

A notice row is written in the same transaction as the revocation that causes it, so the
two commit or roll back together; a task delivers it afterwards (its id is published once
that transaction commits, and the re-drive catches any publication that was lost). The body
is fixed at creation (the exact bytes every attempt posts), and never holds a token, only
its id, name and last four characters. With an SMTP server set, the notice's email rows (one
per recipient address, ``worker.domain.mail_outbox``) are written alongside it.

Who hears what: a leaked personal token's owner; the active admins of the organization for
a leaked application token; the active admins, in one notice per organization and event,
for the personal tokens of a member who left or was deactivated.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections import Counter as Tally
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, NamedTuple, Protocol, cast

import orjson
import structlog
from sqlalchemy import Table, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import db, mail_outbox
from tokenwarden.worker.domain.clock import as_utc
from tokenwarden.worker.domain.models import (
    Membership,
    Notice,
    NoticeStatus,
    Role,
    Token,
    TokenKind,
)

log = structlog.get_logger(__name__)

# Session.info key: notices queued in this transaction, published once it commits.
NEW_NOTICES: Final = "tokenwarden.new_notices"


def remember_notice(session: Session, notice_id: str) -> None:
    """Note a notice queued in this transaction, to be published once it commits."""
    session.info.setdefault(NEW_NOTICES, []).append(notice_id)


def take_new_notices(session: Session) -> list[str]:
    """The notices queued in this transaction (read before it closes)."""
    notices: list[str] = session.info.pop(NEW_NOTICES, [])
    return notices


LEAKED = "token.leaked"
OFFBOARDED = "member.offboarded"
EXPIRING = "token.expiring"
EXPIRED = "token.expired"
ORPHANED = "application_tokens.orphaned"
IDLE_WARNING = "token.idle_warning"
IDLE_REVOKED = "token.idle_revoked"
BULK_REVOKED = "tokens.bulk_revoked"
REUSED = "token.reuse_detected"

NEXT_STEPS = {
    LEAKED: (
        "This token was revoked because it was reported as leaked, and it no longer works. "
        "Create a new token, put it wherever the old one was used, and remove the leaked "
        "copy from the place it was found."
    ),
    OFFBOARDED: (
        "These personal access tokens stopped working because their owner left the "
        "organization or was deactivated. An integration that used one needs a new token; "
        "an application access token keeps working when people leave."
    ),
    EXPIRING: (
        "These tokens will stop working at their expiry, which cannot be extended. Create "
        "replacements before then and move the integrations that use them."
    ),
    EXPIRED: (
        "These tokens have expired and no longer work. Create replacements for any that "
        "are still needed."
    ),
    ORPHANED: (
        "These application access tokens keep working, but the user who created them left the "
        "organization or was deactivated, so nobody answers for them. Hand each one to an "
        "active member (tokenwarden token reassign ID --created-by USER), or revoke the ones "
        "no longer needed."
    ),
    IDLE_WARNING: (
        "These tokens have not been used for a long time and will be revoked as idle on the "
        "date given unless they are used before then. Use a token to keep it, or revoke the "
        "ones no longer needed."
    ),
    IDLE_REVOKED: (
        "These tokens were revoked because they had not been used for the number of days "
        "given, and they no longer work. Create a new token if one is still needed."
    ),
    BULK_REVOKED: (
        "These tokens were revoked together by an emergency revocation of the organization's "
        "tokens, for the reason given, and no longer work. Create new tokens once the "
        "organization's administrators say it is safe."
    ),
    REUSED: (
        "A token rotated away earlier was used again after its overlap ended, so someone "
        "may hold a copy. Every token of its rotation chain was revoked. Find where the old "
        "token is still in use, then issue a new token."
    ),
}


def new_notice_id() -> str:
    return "ntc_" + secrets.token_hex(12)


class TokenFacts(Protocol):
    """What a notice says about a token: a loaded ``Token``, or a row a bulk UPDATE returned."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def org_id(self) -> str: ...
    @property
    def user_id(self) -> str | None: ...
    @property
    def app_id(self) -> str | None: ...
    @property
    def created_by(self) -> str: ...
    @property
    def last4(self) -> str: ...
    @property
    def expires_at(self) -> datetime: ...


class TokenRow(NamedTuple):
    """A token's facts as a statement over :data:`TOKEN_COLUMNS` returns them.

    Read by attribute as cheaply as a tuple, where a result row looks each name up (about a
    microsecond a read, and a batch of removals reads a dozen of each token it revokes).
    """

    id: str
    name: str
    kind: str
    org_id: str
    user_id: str | None
    app_id: str | None
    created_by: str
    last4: str
    expires_at: datetime


# Everything a notice names (:func:`describe`), in the order of TokenRow's fields.
TOKEN_COLUMNS: Final = tuple(getattr(Token, name) for name in TokenRow._fields)


def token_rows(rows: Iterable[Sequence[Any]]) -> list[TokenRow]:
    """The rows of a statement over :data:`TOKEN_COLUMNS`, as :class:`TokenRow`."""
    return [TokenRow._make(row) for row in rows]


def describe(token: TokenFacts) -> dict[str, Any]:
    """A token as a notice names it: never the token itself."""
    owner = (
        {"user_id": token.user_id}
        if token.kind == TokenKind.PERSONAL
        else {"app_id": token.app_id, "created_by": token.created_by}
    )
    return {
        "id": token.id,
        "name": token.name,
        "kind": token.kind,
        "org_id": token.org_id,
        "last4": token.last4,
        "expires_at": token.expires_at.isoformat(),
        **owner,
    }


def admins(session: Session, org_id: str) -> list[dict[str, Any]]:
    """The active admins of an organization, by user id."""
    return admins_of(session, [org_id])[org_id]


def owner(session: Session, token: TokenFacts) -> list[dict[str, Any]]:
    """Who owns a token: a PAT's user, or an AAT's organization's active admins."""
    if token.kind == TokenKind.PERSONAL and token.user_id:
        member = session.get(Membership, (token.org_id, token.user_id))
        return [{"user_id": token.user_id, "email": member.email if member else None}]
    return admins(session, token.org_id)


def queue(
    session: Session,
    *,
    kind: str,
    org_id: str | None,
    recipients: Sequence[dict[str, Any]],
    data: dict[str, Any],
    now: datetime,
    event_id: str | None = None,
    dedupe_key: str | None = None,
) -> str | None:
    """Add a notice to the outbox; return its id, or None if ``dedupe_key`` was used before."""
    notice_id = new_notice_id()
    body = _body(notice_id, kind=kind, recipients=recipients, data=data, now=now)
    row = Notice(
        id=notice_id,
        kind=kind,
        org_id=org_id,
        recipients=list(recipients),
        body=body,
        status=NoticeStatus.PENDING.value,
        attempts=0,
        created_at=now,
        next_attempt_at=now,
        event_id=event_id,
        dedupe_key=dedupe_key,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        log.info("notice.duplicate", kind=kind, dedupe_key=dedupe_key)
        return None
    mail_outbox.add_emails(session, [(notice_id, recipients)], now=now)
    remember_notice(session, notice_id)
    log.info(
        "notice.queued",
        notice_id=notice_id,
        kind=kind,
        org_id=org_id,
        recipients=len(recipients),
        event_id=event_id,
    )
    return notice_id


@dataclass(frozen=True)
class Queued:
    """One notice for :func:`queue_many`, with the arguments :func:`queue` takes."""

    kind: str
    org_id: str | None
    recipients: Sequence[dict[str, Any]]
    data: dict[str, Any]
    event_id: str | None = None
    dedupe_key: str | None = None


def queue_many(session: Session, wanted: Sequence[Queued], *, now: datetime) -> list[str]:
    """Add many notices to the outbox in one statement; return their ids, in order.

    A notice whose ``dedupe_key`` was used before is skipped, as :func:`queue` skips it, but
    by the INSERT itself (``ON CONFLICT DO NOTHING``) instead of a savepoint a notice, which
    would cost three round trips each.
    """
    rows: list[dict[str, Any]] = []
    for notice in wanted:
        notice_id = new_notice_id()
        rows.append(
            {
                "id": notice_id,
                "kind": notice.kind,
                "org_id": notice.org_id,
                "recipients": list(notice.recipients),
                "body": _body(
                    notice_id,
                    kind=notice.kind,
                    recipients=notice.recipients,
                    data=notice.data,
                    now=now,
                ),
                **mail_outbox.first_attempt(now),
                "event_id": notice.event_id,
                "dedupe_key": notice.dedupe_key,
            }
        )
    if not rows:
        return []
    # On Postgres every batch takes the one statement the driver prepares once (see
    # _POSTGRES_NEW_NOTICES); a notice without a dedupe_key never conflicts there.
    postgres = session.get_bind().dialect.name == "postgresql"
    if postgres or any(row["dedupe_key"] is not None for row in rows):
        rows = _insert_new(session, rows)
    else:
        session.execute(insert(cast(Table, Notice.__table__)), rows)
    mail_outbox.add_emails(session, [(row["id"], row["recipients"]) for row in rows], now=now)
    for row in rows:
        remember_notice(session, row["id"])
    if len(rows) == 1:
        row = rows[0]
        log.info(
            "notice.queued",
            notice_id=row["id"],
            kind=row["kind"],
            org_id=row["org_id"],
            recipients=len(row["recipients"]),
            event_id=row["event_id"],
        )
    elif rows:
        # One line for the statement's notices: a line each cost more than writing them.
        log.info(
            "notices.queued",
            count=len(rows),
            kinds=dict(Tally(row["kind"] for row in rows)),
            notice_ids=[row["id"] for row in rows],
            for_events=sorted({row["event_id"] for row in rows if row["event_id"]}),
        )
    return [row["id"] for row in rows]


def _insert_new(session: Session, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Insert ``rows`` but those whose ``dedupe_key`` is taken; return the inserted ones."""
    if session.get_bind().dialect.name == "postgresql":
        inserted = set(
            session.connection().scalars(_POSTGRES_NEW_NOTICES, {"rows": _notice_rows(rows)})
        )
    else:
        # Imported here: a command that queues nothing does not load SQLite's INSERT … ON
        # CONFLICT.
        from sqlalchemy.dialects import sqlite

        statement = (
            sqlite.insert(cast(Table, Notice.__table__))
            .on_conflict_do_nothing(index_elements=["dedupe_key"])
            .returning(Notice.id)
        )
        inserted = set(session.connection().scalars(statement, rows))
    for row in rows:
        if row["id"] not in inserted:
            log.info("notice.duplicate", kind=row["kind"], dedupe_key=row["dedupe_key"])
    return [row for row in rows if row["id"] in inserted]


# Postgres: every new notice in one JSON parameter, unpacked by the server. A multi-row
# VALUES list would be a statement of its own for each number of rows, with some fourteen
# parameters a row: the driver parsed that text anew each time (about 5% of a worker applying
# removals). As jsonb, parsed once: each ->> on json text parses its row again, which cost the
# server three times as much.
_POSTGRES_NEW_NOTICES: Final = text(
    "INSERT INTO notices (id, kind, org_id, recipients, body, status, attempts, last_error, "
    "created_at, next_attempt_at, sent_at, event_id, dedupe_key) "
    "SELECT r->>0, r->>1, r->>2, CAST(r->3 AS json), r->>4, r->>5, CAST(r->>6 AS integer), r->>7, "
    "CAST(r->>8 AS timestamptz), CAST(r->>9 AS timestamptz), CAST(r->>10 AS timestamptz), "
    "r->>11, r->>12 "
    "FROM jsonb_array_elements(CAST(:rows AS jsonb)) AS r "
    "ON CONFLICT (dedupe_key) DO NOTHING RETURNING id"
)


def _notice_rows(rows: list[dict[str, Any]]) -> str:
    def moment(value: datetime | None) -> str | None:
        return None if value is None else as_utc(value).isoformat()

    # Only the server reads this text, as jsonb: orjson's is parsed the same.
    return orjson.dumps(
        [
            [
                row["id"],
                row["kind"],
                row["org_id"],
                row["recipients"],
                row["body"],
                row["status"],
                row["attempts"],
                row["last_error"],
                moment(row["created_at"]),
                moment(row["next_attempt_at"]),
                moment(row["sent_at"]),
                row["event_id"],
                row["dedupe_key"],
            ]
            for row in rows
        ]
    ).decode()


def _body(
    notice_id: str,
    *,
    kind: str,
    recipients: Sequence[dict[str, Any]],
    data: dict[str, Any],
    now: datetime,
) -> str:
    """The exact bytes every delivery attempt posts."""
    body = {
        "type": kind,
        "timestamp": now.isoformat(),
        "data": {
            "notice_id": notice_id,
            "recipients": list(recipients),
            **data,
            "next_steps": NEXT_STEPS[kind],
        },
    }
    # For what a notice holds (text, integers, lists, objects) orjson writes the text
    # json.dumps(separators=(",", ":")) writes, several times faster, while it is ASCII:
    # json.dumps escapes the rest as \uXXXX, and that is kept.
    with contextlib.suppress(orjson.JSONEncodeError):  # a key that is not text, say
        text = orjson.dumps(body)
        if text.isascii():
            return text.decode()
    return json.dumps(body, separators=(",", ":"))


def leak_notice(
    session: Session,
    token: TokenFacts,
    *,
    now: datetime,
    source: str,
    source_url: str | None,
    reporter: str | None,
    event_id: str | None,
    at: datetime | None = None,
) -> str | None:
    """Tell a leaked token's owner that it was revoked; at most one notice per token."""
    return queue(
        session,
        kind=LEAKED,
        org_id=token.org_id,
        recipients=owner(session, token),
        data={
            "reason": "leaked",
            "source": source,
            "source_url": source_url,
            "reporter": reporter,
            "event_id": event_id,
            "event_time": at.isoformat() if at is not None else None,
            "revoked_at": now.isoformat(),
            "tokens": [describe(token)],
        },
        now=now,
        event_id=event_id,
        dedupe_key=f"leaked:{token.id}",
    )


def offboarding_notice(
    session: Session,
    *,
    org_id: str,
    user_id: str,
    tokens: Iterable[TokenFacts],
    now: datetime,
    source: str,
    event_id: str | None,
    reason: str = "member_removed",
    at: datetime | None = None,
) -> str | None:
    """Tell ``org_id``'s admins which of ``user_id``'s tokens were revoked; None if none were.

    The admins are read in this transaction, after the leaver's membership was ended, so a
    leaving admin is not among them.
    """
    described = [describe(token) for token in sorted(tokens, key=lambda token: token.id)]
    if not described:
        return None
    return queue(
        session,
        kind=OFFBOARDED,
        org_id=org_id,
        recipients=admins(session, org_id),
        data=offboarding_data(
            user_id=user_id,
            described=described,
            now=now,
            source=source,
            event_id=event_id,
            reason=reason,
            at=at,
        ),
        now=now,
        event_id=event_id,
    )


def offboarding_data(
    *,
    user_id: str,
    described: list[dict[str, Any]],
    now: datetime,
    source: str,
    event_id: str | None,
    reason: str,
    at: datetime | None,
) -> dict[str, Any]:
    """What an offboarding notice says, for ``described`` tokens (see :func:`describe`)."""
    return {
        "reason": reason,
        "source": source,
        "user_id": user_id,
        "event_id": event_id,
        "event_time": at.isoformat() if at is not None else None,
        "revoked_at": now.isoformat(),
        "tokens": described,
    }


def admins_of(session: Session, org_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """:func:`admins` of several organizations in one query (an org with none maps to [])."""
    wanted = sorted(set(org_ids))
    found: dict[str, list[dict[str, Any]]] = {org_id: [] for org_id in wanted}
    if not wanted:
        return found
    rows = session.execute(
        select(Membership.org_id, Membership.user_id, Membership.email)
        .where(
            db.among(session, Membership.org_id, wanted),
            Membership.active.is_(True),
            Membership.role == Role.ADMIN.value,
        )
        .order_by(Membership.org_id, Membership.user_id)
    )
    for org_id, user_id, email in rows:
        found[org_id].append({"user_id": user_id, "email": email})
    return found


def list_notices(session: Session, *, status: str | None = None, limit: int = 100) -> list[Notice]:
    """The outbox, newest first."""
    query = select(Notice).order_by(Notice.created_at.desc(), Notice.id).limit(limit)
    if status:
        query = query.where(Notice.status == status)
    return list(session.scalars(query))
