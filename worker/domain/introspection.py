"""A token's answer to OAuth 2.0 Token Introspection (RFC 7662): active with its claims, or not.

The rules are those of :func:`worker.domain.verification.verify_token`; only the shape of the
answer differs, and nothing is audited here: a caller that may be asked the same question a
thousand times a second audits refusals at its own pace (see :func:`refusal_rows`).

Imports nothing but the domain and SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenwarden.worker.domain.families import is_reuse
from tokenwarden.worker.domain.models import AuditEntry, Membership, Token, TokenKind
from tokenwarden.worker.domain.tokens import kind_of
from tokenwarden.worker.domain.verification import find_token, refusal

TOKEN_TYPES: Final = {
    TokenKind.PERSONAL: "personal_access_token",
    TokenKind.APPLICATION: "application_access_token",
}
# What every refusal answers, whatever the reason (RFC 7662 §2.2: nothing more).
INACTIVE: Final = {"active": False}
MALFORMED: Final = "malformed"
UNKNOWN: Final = "unknown"
AUDIT_SOURCE: Final = "introspect"
# One audit row per token and reason in this long, whatever the number of API processes.
AUDIT_EVERY: Final = timedelta(minutes=1)


@dataclass(frozen=True)
class Introspection:
    """The answer about one token, and what the caller needs to log, audit and cache it."""

    active: bool
    reason: str | None = None  # why not active
    token_id: str | None = None
    org_id: str | None = None
    user_id: str | None = None
    expires_at: datetime | None = None
    # A rotated-away token presented after its overlap: the caller runs the reuse detection.
    reused: bool = False
    claims: dict[str, Any] = field(default_factory=dict)

    def answer(self) -> dict[str, Any]:
        """The RFC 7662 response body: the claims, or exactly ``{"active": false}``."""
        return self.claims if self.active else dict(INACTIVE)


def malformed() -> Introspection:
    return Introspection(False, MALFORMED)


def introspect(session: Session, text: str, *, now: datetime) -> Introspection:
    """The answer about ``text`` at ``now``; a malformed one is refused with no look-up."""
    if kind_of(text) is None:
        return malformed()
    row = find_token(session, text)
    if row is None:
        return Introspection(False, UNKNOWN)
    token, member = row
    reason = refusal(token, member, now)
    if reason is not None:
        return Introspection(
            False,
            reason,
            token_id=token.id,
            org_id=token.org_id,
            user_id=token.user_id,
            reused=is_reuse(token, now),
        )
    return Introspection(
        True,
        token_id=token.id,
        org_id=token.org_id,
        user_id=token.user_id,
        expires_at=stops_at(token),
        claims=claims(token, member),
    )


def stops_at(token: Token) -> datetime:
    """When ``token`` stops working: its expiry, or the end of its rotation overlap if sooner.
    Answers are cached until then, and ``exp`` says it to the caller."""
    return min(token.expires_at, token.overlap_ends_at or token.expires_at)


def claims(token: Token, member: Membership | None) -> dict[str, Any]:
    """RFC 7662 members of a usable token: a PAT acts as its owner with their current role,
    an AAT as its application."""
    found: dict[str, Any] = {
        "active": True,
        "token_type": TOKEN_TYPES[TokenKind(token.kind)],
        "org_id": token.org_id,
        "exp": int(stops_at(token).timestamp()),
        "iat": int(token.created_at.timestamp()),
        "jti": token.id,
    }
    if token.kind == TokenKind.PERSONAL:
        found |= {"sub": token.user_id, "role": member.role if member else None}
    else:
        found |= {"sub": token.app_id, "app_id": token.app_id, "created_by": token.created_by}
    return found


def refusal_rows(refused: Iterable[tuple[Introspection, datetime]]) -> list[dict[str, Any]]:
    """Audit rows (for :func:`worker.domain.audit.record_many`) of refusals of known tokens."""
    return [
        {
            "at": at,
            "action": "refuse",
            "reason": answer.reason,
            "source": AUDIT_SOURCE,
            "token_id": answer.token_id,
            "org_id": answer.org_id,
            "user_id": answer.user_id,
            "actor": None,
            "event_id": None,
            "detail": None,
        }
        for answer, at in refused
        if answer.token_id is not None and not answer.active
    ]


def not_audited_lately(
    session: Session, rows: list[dict[str, Any]], *, now: datetime
) -> list[dict[str, Any]]:
    """``rows`` (of :func:`refusal_rows`) but those whose token and reason already have an
    audit row from these doors within :data:`AUDIT_EVERY`: each API process holds back its
    own repeats, and this holds back another process's (or a restarted one's)."""
    if not rows:
        return rows
    found = session.execute(
        select(AuditEntry.token_id, AuditEntry.reason).where(
            AuditEntry.token_id.in_(sorted({row["token_id"] for row in rows})),
            AuditEntry.source == AUDIT_SOURCE,
            AuditEntry.action == "refuse",
            AuditEntry.at > now - AUDIT_EVERY,
        )
    )
    recent = {(token_id, reason) for token_id, reason in found}
    kept: list[dict[str, Any]] = []
    for row in rows:
        key = (row["token_id"], row["reason"])
        if key not in recent:
            recent.add(key)
            kept.append(row)
    return kept
