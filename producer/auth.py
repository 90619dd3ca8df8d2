"""Who may call the producer API: the security schemes its OpenAPI document names, and the
constant-time checks of a producer key and of the metrics key.

Every failed check is a :class:`Refused` 401 with ``WWW-Authenticate: Bearer`` (:func:`require`,
which GitLab's check in producer/gitlab.py shares). Must not import ``producer.api``, the
routes or ``tasks``.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from tokenwarden.producer.intake import Refused

producer_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="producerKey",
    description="A producer key from TOKENWARDEN_PRODUCER_KEYS.",
)
metrics_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="metricsKey",
    description="TOKENWARDEN_METRICS_KEY, when it is set.",
)
gitlab_token = APIKeyHeader(
    name="Authorization",
    auto_error=False,
    scheme_name="gitlabRevocationToken",
    description=(
        "TOKENWARDEN_GITLAB_REVOCATION_TOKEN, sent as is (as GitLab does) or as 'Bearer TOKEN'."
    ),
)


def require(accepted: bool, ask: str, *, unconfigured: str | None = None) -> None:
    """Nothing when ``accepted``; else a 401 that says ``ask`` (how to send the credential),
    or ``unconfigured`` when given: there is no credential configured to compare with."""
    if not accepted:
        raise Refused(401, unconfigured or ask, headers={"WWW-Authenticate": "Bearer"})


def authenticate_producer(
    credentials: HTTPAuthorizationCredentials | None, keys: Sequence[str]
) -> None:
    """Accept a known key; compare with every key each time, so timing tells nothing."""
    given = (credentials.credentials if credentials else "").encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    require(
        credentials is not None and matched,
        "send a producer key as 'Authorization: Bearer KEY'",
        unconfigured=None
        if keys
        else "no producer key is configured: set TOKENWARDEN_PRODUCER_KEYS",
    )


def authorize_scrape(authorization: str | None, key: str) -> None:
    """Accept ``Bearer <key>`` only, compared in constant time."""
    scheme, _, given = (authorization or "").partition(" ")
    matched = hmac.compare_digest(given.strip().encode(), key.encode())
    require(
        scheme.lower() == "bearer" and matched,
        "send the metrics key as 'Authorization: Bearer KEY'",
    )
