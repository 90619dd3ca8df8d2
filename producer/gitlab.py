"""GitLab's Token Revocation API, so a GitLab instance's secret detection reports leaks here.

GitLab first asks ``GET /v1/revocable_token_types`` and sends only findings whose type is in
that list, a type being the analyzer's primary identifier, ``type`` and ``value`` joined by
``_``, lowercased, spaces made ``_``. A GitLab admin maps our tokens with two custom
secret-detection rules whose ids are ``tokenwarden_personal_access_token`` and
``tokenwarden_application_access_token``; the upstream gitleaks ``settlemint-*`` rules match a
16-character body only and never one of our tokens, so they are not listed.

``POST /v1/revoke_tokens`` follows GitLab's ``token_revocation_api`` document: ``204`` once every
token is accepted for eventual revocation, ``400`` (not to be retried) for a body that is not a
JSON array of the documented objects or for a token type not listed, ``429`` with
``Retry-After`` past the rate limit (producer/rate_limit.py). Whatever the tokens turn out to
be, the answer is the same: a malformed token is dropped without a database look-up, and every
well-formed one becomes a leak event, ours or not, so the answer and its timing reveal nothing
about the store. A request holds at most
:data:`MAX_REPORTS` tokens, as ``POST /v1/events`` takes at most that many events: a larger one
is refused whole with ``413`` and stores nothing (GitLab's contract names no status for it,
and 413 is HTTP's own for a request larger than the server takes).

The routes are in producer/routes/leaks.py; this module must not import them, ``producer.api``
or ``tasks``.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Final

from tokenwarden.producer.auth import require
from tokenwarden.producer.github import leak_event, storable
from tokenwarden.producer.intake import Refused
from tokenwarden.producer.schemas import MAX_BATCH, GitLabReport
from tokenwarden.worker.domain.events import CloudEvent
from tokenwarden.worker.domain.tokens import hash_token, kind_of

EVENT_SOURCE: Final = "gitlab"
# Tokens per request, like the events of a batch: one request is stored in one transaction.
MAX_REPORTS: Final = MAX_BATCH
REPORTER: Final = "gitlab"
# How much of an unsupported type a refusal quotes.
SHOWN_TYPE_MAX: Final = 100
# Either kind of token is revoked under either type: the token's own prefix says what it is.
REVOCABLE_TYPES: Final = (
    "gitleaks_rule_id_tokenwarden_personal_access_token",
    "gitleaks_rule_id_tokenwarden_application_access_token",
)


def authenticate(authorization: str | None, configured: str | None) -> None:
    """Accept the shared secret, sent raw (as GitLab does) or as ``Bearer <secret>``.

    Both forms are compared, each in constant time, whatever the header holds; with no secret
    configured (or a blank one) nothing is accepted, not even an empty header.
    """
    secret = (configured or "").strip()
    given = authorization or ""
    scheme, _, rest = given.partition(" ")
    bearer = rest.strip() if scheme.lower() == "bearer" else ""
    matched = hmac.compare_digest(given.encode(), secret.encode())
    matched |= hmac.compare_digest(bearer.encode(), secret.encode())
    require(
        bool(secret and authorization and matched),
        "send the revocation token in the Authorization header",
        unconfigured=None
        if secret
        else "no revocation token is configured: set TOKENWARDEN_GITLAB_REVOCATION_TOKEN",
    )


def leak_events(reports: Sequence[GitLabReport]) -> list[CloudEvent]:
    """An event for each well-formed token; a malformed one is dropped.

    More than :data:`MAX_REPORTS` tokens is :class:`Refused` (413), and a type we do not list
    (400, as GitLab's document says), before any event is made.
    """
    if len(reports) > MAX_REPORTS:
        raise Refused(
            413,
            f"the request has {len(reports)} tokens; at most {MAX_REPORTS} per request: "
            "send them in several requests",
        )
    for index, report in enumerate(reports):
        if report.type not in REVOCABLE_TYPES:
            shown = storable(report.type, SHOWN_TYPE_MAX)
            raise Refused(
                400,
                f"report {index}: the token type {shown!r} is not supported; "
                "GET /v1/revocable_token_types lists those that are",
            )
    return [
        leak_event(
            source=EVENT_SOURCE,
            token_hash=hash_token(report.token),
            source_url=report.location,
            reporter=REPORTER,
        )
        for report in reports
        if kind_of(report.token) is not None
    ]
