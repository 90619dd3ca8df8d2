"""Who or what a Shared Signals subject (RFC 9493 subject identifier) names in the store.

A transmitter names accounts by ``email``, ``iss_sub`` or ``opaque`` id, and tokens by an
``opaque`` id (ours, ``tok_…``) or the SHA-256 of their text. Only what the store already
knows counts: an email or id no membership or token carries names nobody.
"""

from __future__ import annotations

import re
from typing import Any, Final

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from tokenwarden.worker.domain.models import Membership, Token

_HASH: Final = re.compile(r"^[0-9a-f]{64}$")
# The longest id a store column holds; a longer one cannot name anything.
MAX_ID: Final = 200


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and 0 < len(value.strip()) <= 320 else None


def user_named(session: Session, subject: dict[str, Any]) -> str | None:
    """The user id ``subject`` names, when exactly one known user answers to it."""
    fmt = subject.get("format")
    if fmt == "email":
        email = _text(subject.get("email"))
        if email is None:
            return None
        users = set(
            session.scalars(
                select(Membership.user_id).where(func.lower(Membership.email) == email.lower())
            )
        )
        return users.pop() if len(users) == 1 else None
    candidate = _text(subject.get("sub") if fmt == "iss_sub" else subject.get("id"))
    if fmt not in ("iss_sub", "opaque") or candidate is None or len(candidate) > MAX_ID:
        return None
    known = session.scalar(
        select(Membership.user_id).where(Membership.user_id == candidate).limit(1)
    ) or session.scalar(select(Token.user_id).where(Token.user_id == candidate).limit(1))
    return candidate if known else None


def token_named(session: Session, subject: dict[str, Any]) -> str | None:
    """The id of our token that ``subject`` names: an ``opaque`` id that is one of our token
    ids or the SHA-256 (hex) of one of our tokens' text."""
    if subject.get("format") != "opaque":
        return None
    candidate = _text(subject.get("id"))
    if candidate is None or len(candidate) > MAX_ID:
        return None
    by_hash = Token.token_hash == candidate.lower() if _HASH.match(candidate.lower()) else None
    condition = Token.id == candidate if by_hash is None else or_(Token.id == candidate, by_hash)
    return session.scalar(select(Token.id).where(condition).limit(1))
