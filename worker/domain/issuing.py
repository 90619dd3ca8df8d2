"""Issuing tokens: the plain text is returned once and only its hash is stored.

It must not import Celery, kombu, httpx, FastAPI, Starlette or standardwebhooks, nor ``tasks``,
``producer`` or ``worker.runtime``.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenwarden.config.settings import get_settings
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
    """Issue a token; refuse a past expiry, one past the maximum lifetime of its kind
    (``TOKENWARDEN_MAX_LIFETIME_DAYS``), a missing owner, a PAT for a non-member, and an AAT
    whose creator is not an active member.

    ``actor`` is who asked (audited); by default the creator or the owner."""
    owner = {"user_id": user_id, "app_id": app_id, "created_by": created_by}
    refusal = _refused_name_or_expiry(name, expires_at=expires_at, now=now) or refused_lifetime(
        kind, expires_at=expires_at, now=now, limits=get_settings().max_lifetime_days
    )
    refusal = refusal or _refused_owner(session, kind=kind, org_id=org_id, **owner)
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


def refused_lifetime(
    kind: TokenKind, *, expires_at: datetime, now: datetime, limits: Mapping[str, int]
) -> Refused | None:
    """A refusal naming the limit when ``expires_at`` lies past the longest lifetime allowed
    for ``kind``; tokens issued earlier keep their expiry whatever the limit is now."""
    days = limits.get(kind.value)
    if days is None or expires_at <= now + timedelta(days=days):
        return None
    return Refused(
        "lifetime_too_long",
        f"expiry {expires_at.isoformat()} is more than {days} days away: the maximum lifetime "
        f"of {'a personal' if kind is TokenKind.PERSONAL else 'an application'} token is "
        f"{days} days (TOKENWARDEN_MAX_LIFETIME_DAYS)",
    )


def active_member(session: Session, *, org_id: str, user_id: str) -> bool:
    """Whether ``user_id`` is an active member of ``org_id``, its row held FOR SHARE.

    FOR SHARE: a removal being applied holds this row FOR UPDATE, so what is issued or handed
    over now is either committed before the removal reads the tokens (and seen by it) or
    refused because the membership is no longer active.
    """
    member = session.get(Membership, (org_id, user_id), with_for_update={"read": True})
    return member is not None and member.active


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
        if not active_member(session, org_id=org_id, user_id=user_id):
            return Refused("not_member", f"user {user_id!r} is not an active member of {org_id!r}")
        return None
    if not app_id:
        return Refused("no_owner", "an application access token needs --app")
    if not created_by:
        return Refused("no_creator", "an application access token needs --created-by")
    if not _has_members(session, org_id):
        return Refused("no_org", f"organization {org_id!r} has no active member")
    if not active_member(session, org_id=org_id, user_id=created_by):
        return Refused(
            "not_member", f"creator {created_by!r} is not an active member of {org_id!r}"
        )
    return None


def _has_members(session: Session, org_id: str) -> bool:
    found = session.scalar(
        select(Membership.user_id)
        .where(Membership.org_id == org_id, Membership.active.is_(True))
        .limit(1)
    )
    return found is not None


def list_tokens(
    session: Session, *, org_id: str | None = None, user_id: str | None = None
) -> Sequence[Token]:
    query = select(Token).order_by(Token.created_at, Token.id)
    if org_id:
        query = query.where(Token.org_id == org_id)
    if user_id:
        query = query.where((Token.user_id == user_id) | (Token.created_by == user_id))
    return session.scalars(query).all()
