"""Issuing tokens: the plain text is returned once and only its hash is stored.

It must not import Celery, kombu, httpx, FastAPI, Starlette or standardwebhooks, nor ``tasks``,
``producer`` or ``worker.runtime``.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import audit
from tokenwarden.worker.domain.errors import Refused
from tokenwarden.worker.domain.models import Membership, Token, TokenKind
from tokenwarden.worker.domain.tokens import generate, hash_token, hint

NAME_MAX = 200


@dataclass(frozen=True)
class IssuedToken:
    id: str
    token: str
    kind: TokenKind
    org_id: str
    expires_at: datetime


def new_token_id() -> str:
    return "tok_" + secrets.token_hex(8)


def parse_kind(kind: str) -> TokenKind:
    try:
        return TokenKind(kind)
    except ValueError:
        raise Refused(
            "bad_kind", f"kind must be 'personal' or 'application', not {kind!r}"
        ) from None


def create_token(
    session: Session,
    *,
    kind: TokenKind,
    org_id: str,
    name: str,
    expires_at: datetime,
    now: datetime,
    user_id: str | None = None,
    app_id: str | None = None,
    created_by: str | None = None,
    source: str = "cli",
    actor: str | None = None,
) -> IssuedToken:
    """Issue a token; refuse a PAT for a non-member, a past expiry or a missing owner.

    ``actor`` is who asked (audited); by default the creator or the owner."""
    refusal = _refused_name_or_expiry(name, expires_at=expires_at, now=now) or _refused_owner(
        session, kind=kind, org_id=org_id, user_id=user_id, app_id=app_id, created_by=created_by
    )
    if refusal is not None:
        raise refusal
    text = generate(kind)
    token = Token(
        id=new_token_id(),
        kind=kind.value,
        org_id=org_id,
        user_id=user_id if kind is TokenKind.PERSONAL else None,
        app_id=app_id if kind is TokenKind.APPLICATION else None,
        created_by=created_by or user_id or "",
        name=name,
        token_hash=hash_token(text),
        last4=hint(text),
        created_at=now,
        expires_at=expires_at,
    )
    session.add(token)
    session.flush()
    audit.record(
        session,
        action="create",
        reason="issued",
        source=source,
        at=now,
        token_id=token.id,
        org_id=org_id,
        user_id=token.user_id or token.created_by,
        actor=actor or created_by or user_id,
        detail={"kind": kind.value, "name": name, "expires_at": expires_at.isoformat()},
    )
    return IssuedToken(id=token.id, token=text, kind=kind, org_id=org_id, expires_at=expires_at)


def _refused_name_or_expiry(name: str, *, expires_at: datetime, now: datetime) -> Refused | None:
    if not name.strip() or len(name) > NAME_MAX:
        return Refused("bad_name", f"a token needs a name of 1 to {NAME_MAX} characters")
    if expires_at <= now:
        return Refused("expiry_in_past", f"expiry {expires_at.isoformat()} is not in the future")
    return None


def _refused_owner(
    session: Session,
    *,
    kind: TokenKind,
    org_id: str,
    user_id: str | None,
    app_id: str | None,
    created_by: str | None,
) -> Refused | None:
    if kind is TokenKind.PERSONAL:
        if not user_id:
            return Refused("no_owner", "a personal access token needs --user")
        # FOR SHARE: a removal being applied holds this row FOR UPDATE, so the new PAT is
        # either committed before the removal's bulk UPDATE reads the tokens (and revoked
        # by it) or refused because the membership is no longer active.
        member = session.get(Membership, (org_id, user_id), with_for_update={"read": True})
        if member is None or not member.active:
            return Refused("not_member", f"user {user_id!r} is not an active member of {org_id!r}")
        return None
    if not app_id:
        return Refused("no_owner", "an application access token needs --app")
    if not created_by:
        return Refused("no_creator", "an application access token needs --created-by")
    return None


def list_tokens(
    session: Session, *, org_id: str | None = None, user_id: str | None = None
) -> Sequence[Token]:
    query = select(Token).order_by(Token.created_at, Token.id)
    if org_id:
        query = query.where(Token.org_id == org_id)
    if user_id:
        query = query.where((Token.user_id == user_id) | (Token.created_by == user_id))
    return session.scalars(query).all()
