"""Is a token usable right now, and on whose behalf?"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import audit
from tokenwarden.worker.domain.families import ROTATED, is_reuse
from tokenwarden.worker.domain.models import Membership, Token, TokenKind
from tokenwarden.worker.domain.tokens import hash_token, kind_of


@dataclass(frozen=True)
class Verdict:
    usable: bool
    reason: str | None = None
    token_id: str | None = None
    principal: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        if self.usable:
            return {"usable": True, "principal": self.principal}
        return {"usable": False, "reason": self.reason, "token_id": self.token_id}


def verify_token(session: Session, text: str, *, now: datetime, source: str = "verify") -> Verdict:
    """Decide whether ``text`` is usable at ``now``.

    A malformed token or a bad checksum is refused before any database look-up. A PAT is
    usable only while its owner is an active member of its org, whatever revoked it or not.
    Refusals of a known token are audited; unknown ones are only logged by the caller, so a
    flood of guesses cannot fill the audit trail.
    """
    kind = kind_of(text)
    if kind is None:
        return Verdict(False, "malformed")
    row = find_token(session, text)
    if row is None:
        return Verdict(False, "unknown")
    token, member = row
    reason = refusal(token, member, now)
    if reason is not None:
        audit.record_token(session, token, action="refuse", reason=reason, source=source, at=now)
        if is_reuse(token, now):
            from tokenwarden.worker.domain.rotation import detect_reuse  # issues and notifies

            detect_reuse(session, token.id, now=now, source=source)
        return Verdict(False, reason, token_id=token.id)
    return Verdict(True, token_id=token.id, principal=principal(token, member))


def find_token(session: Session, text: str) -> tuple[Token, Membership | None] | None:
    """The token whose hash is that of ``text``, with its owner's membership (for a PAT)."""
    row = session.execute(
        select(Token, Membership)
        .outerjoin(
            Membership,
            and_(Membership.org_id == Token.org_id, Membership.user_id == Token.user_id),
        )
        .where(Token.token_hash == hash_token(text))
    ).first()
    return None if row is None else (row[0], row[1])


def refusal(token: Token, member: Membership | None, now: datetime) -> str | None:
    """Why ``token`` is not usable at ``now``, or ``None`` when it is."""
    if token.revoked_at is not None:
        return "expired" if token.revoke_reason == "expired" else "revoked"
    if token.overlap_ends_at is not None and token.overlap_ends_at <= now:
        return ROTATED
    if token.expires_at <= now:
        return "expired"
    if token.kind == TokenKind.PERSONAL and (member is None or not member.active):
        return "not_member"
    return None


def principal(token: Token, member: Membership | None) -> dict[str, Any]:
    found: dict[str, Any] = {
        "token_id": token.id,
        "kind": token.kind,
        "org_id": token.org_id,
        "name": token.name,
        "expires_at": token.expires_at.isoformat(),
    }
    if token.kind == TokenKind.PERSONAL and member is not None:
        found |= {"user_id": token.user_id, "role": member.role}
    else:
        found |= {"app_id": token.app_id, "created_by": token.created_by}
    return found
