"""Which of our events a verified SET becomes.

- RISC ``account-disabled``, ``account-purged``: ``user.deactivated`` of the user the subject
  names;
- RISC ``credential-compromise`` naming one of our tokens: ``token.leak_suspected``;
- CAEP ``credential-change`` with ``change_type: revoke`` of one of our tokens:
  ``token.revoke_requested``.

Anything else is acknowledged and counted as ignored; a subject the store does not know is
acknowledged and audited. The inbox event's id is the SET's ``jti``, its source
``ssf:<issuer>``, its time the SET's ``iat``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy.orm import Session

from tokenwarden.producer.ssf.verify import VerifiedSet
from tokenwarden.worker.domain.subjects import token_named, user_named

RISC: Final = "https://schemas.openid.net/secevent/risc/event-type/"
CAEP: Final = "https://schemas.openid.net/secevent/caep/event-type/"
ACCOUNT_ENDED: Final = frozenset({RISC + "account-disabled", RISC + "account-purged"})
CREDENTIAL_COMPROMISE: Final = RISC + "credential-compromise"
CREDENTIAL_CHANGE: Final = CAEP + "credential-change"
SOURCE_MAX: Final = 500
ACTOR: Final = "ssf"


@dataclass(frozen=True)
class Outcome:
    """``event`` to store in the inbox; else why nothing is (``ignored`` or ``unknown_subject``)."""

    event: dict[str, Any] | None
    outcome: str  # accepted, ignored or unknown_subject


def source_of(issuer: str) -> str:
    return f"ssf:{issuer}"[:SOURCE_MAX]


def wanted(verified: VerifiedSet) -> str | None:
    """Our event type for this SET, before any look-up; None when we do not act on it."""
    if verified.event_type in ACCOUNT_ENDED:
        return "user.deactivated"
    if verified.event_type == CREDENTIAL_COMPROMISE:
        return "token.leak_suspected"
    if verified.event_type == CREDENTIAL_CHANGE and verified.payload.get("change_type") == "revoke":
        return "token.revoke_requested"
    return None


def resolve(session: Session, verified: VerifiedSet) -> Outcome:
    """The event ``verified`` becomes, its subject looked up in the store."""
    kind = wanted(verified)
    if kind is None:
        return Outcome(None, "ignored")
    subject = verified.subject or {}
    data: dict[str, Any]
    if kind == "user.deactivated":
        user_id = user_named(session, subject)
        if user_id is None:
            return Outcome(None, "unknown_subject")
        data = {"user_id": user_id}
    else:
        token_id = token_named(session, subject)
        if token_id is None:
            return Outcome(None, "unknown_subject")
        data = {"token_id": token_id}
        data |= {"reporter": ACTOR} if kind == "token.leak_suspected" else {"actor": ACTOR}
    event = {
        "specversion": "1.0",
        "id": verified.jti,
        "source": source_of(verified.issuer),
        "type": kind,
        "time": verified.issued_at.isoformat(),
        "data": data,
    }
    return Outcome(event, "accepted")
