"""Token families: what a rotation leaves on the token it replaced, and when presenting that
token again is reuse (the rules that act on it are in worker.domain.rotation).

Apart from rotation so that a check of a token (worker.domain.verification,
worker.domain.introspection) knows reuse when it sees it without loading what issues and
notifies. It must not import Celery, kombu, httpx, FastAPI, Starlette or standardwebhooks, nor
``tasks``, ``producer`` or ``worker.runtime``.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from tokenwarden.worker.domain.models import Token

ROTATED: Final = "rotated"
REUSE_DETECTED: Final = "reuse_detected"


def is_reuse(token: Token, now: datetime) -> bool:
    """True when ``token`` was rotated away, its overlap is over, and nothing else stopped it."""
    return (
        token.replaced_by is not None
        and token.overlap_ends_at is not None
        and token.overlap_ends_at <= now
        and token.revoke_reason in (None, ROTATED)
    )
