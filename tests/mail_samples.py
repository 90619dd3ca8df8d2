"""The notices whose emails the README shows (section Notices, Email): one of each kind.

``tests/test_readme.py`` renders each through the mail templates and checks that the README
shows exactly that text, so the samples cannot drift from what is sent.
"""

from __future__ import annotations

from typing import Any, Final

from tokenwarden.worker.domain import notices

NOTICE_ID: Final = "ntc_4f1c9e2b7a6d03e58c21b9aa"
AT: Final = "2026-12-04T19:00:02+00:00"


def _token(name: str, last4: str, token_id: str, *, kind: str = "personal") -> dict[str, Any]:
    return {
        "id": token_id,
        "name": name,
        "kind": kind,
        "org_id": "acme",
        "last4": last4,
        "expires_at": "2027-03-01T00:00:00+00:00",
    }


DEPLOY: Final = _token("deploy bot", "Qx7T", "tok_5e1a")
LAPTOP: Final = _token("laptop", "k9Zb", "tok_31c2")
CI: Final = _token("ci", "Lm3P", "tok_77d0")
EXPORT: Final = _token("nightly export", "Vw2c", "tok_90ab", kind="application")
EXPIRED_EXPORT: Final = {**EXPORT, "expires_at": "2026-12-04T19:00:00+00:00"}

SAMPLES: Final[list[tuple[str, dict[str, Any]]]] = [
    (
        notices.LEAKED,
        {
            "reason": "leaked",
            "source": "github",
            "source_url": "https://github.com/acme/site/blob/main/.env",
            "revoked_at": AT,
            "event_id": "evt-7f3c",
            "tokens": [DEPLOY],
        },
    ),
    (
        notices.OFFBOARDED,
        {
            "reason": "member_removed",
            "user_id": "u-42",
            "source": "hr://workday",
            "revoked_at": AT,
            "event_id": "evt-9a01",
            "tokens": [LAPTOP, CI],
        },
    ),
    (notices.EXPIRING, {"days": 7, "tokens": [DEPLOY]}),
    (
        notices.EXPIRED,
        {
            "reason": "expired",
            "expired_at": "2026-12-04T19:00:00+00:00",
            "tokens": [EXPIRED_EXPORT],
        },
    ),
    (
        notices.IDLE_WARNING,
        {"idle_days": 90, "revoked_from": "2026-12-11T19:00:00+00:00", "tokens": [CI]},
    ),
    (notices.IDLE_REVOKED, {"reason": "idle", "idle_days": 90, "revoked_at": AT, "tokens": [CI]}),
    (
        notices.ORPHANED,
        {
            "reason": "creator_left",
            "user_id": "u-42",
            "source": "hr://workday",
            "event_id": "evt-9a01",
            "tokens": [EXPORT],
        },
    ),
    (
        notices.BULK_REVOKED,
        {
            "reason": "bulk",
            "stated_reason": "laptop stolen",
            "actor": "ana@acme",
            "source": "cli",
            "revoked_at": AT,
            "tokens": [LAPTOP, CI],
        },
    ),
    (notices.REUSED, {"reason": "reuse_detected", "revoked_at": AT, "tokens": [DEPLOY]}),
]


def body(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """A notice body as the outbox stores it (what the mail is built from)."""
    return {"type": kind, "data": {**data, "next_steps": notices.NEXT_STEPS[kind]}}
