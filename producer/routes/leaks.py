"""The leak reporters' doors: GitHub's secret scanning partner alerts and GitLab's Token
Revocation API. Each turns the reported tokens into leak events in the inbox.

The rules of each reporter live in producer/github.py and producer/gitlab.py; this module holds
the routes and their order of checks. Must not import ``producer.api``, the other routers or
``tasks``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Final, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import APIRouter, Header, Request, Security
from fastapi.responses import JSONResponse, Response

from tokenwarden.producer import github, gitlab, intake
from tokenwarden.producer.app_state import AppState, Shared, log
from tokenwarden.producer.auth import gitlab_token
from tokenwarden.producer.github import IDENTIFIER_HEADER, SIGNATURE_HEADER
from tokenwarden.producer.intake import Refused
from tokenwarden.producer.key_cache import KeysUnavailable, UnknownKey, keys_unavailable
from tokenwarden.producer.routes.responses import BEARER_CHALLENGE, RETRY_AFTER, TOO_LARGE
from tokenwarden.producer.schemas import (
    MAX_BODY_BYTES,
    GitHubFeedback,
    GitHubReport,
    GitLabReport,
    Problem,
    RevocableTokenTypes,
    github_request_body,
    gitlab_request_body,
)

_TOO_MANY: Final[dict[str, Any]] = {
    "model": Problem,
    "description": "Past the rate limit of this address (TOKENWARDEN_LEAK_RATE_PER_MINUTE); "
    "on GitHub's endpoint only requests failing the signature checks count.",
    "headers": RETRY_AFTER,
}
_GITHUB_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    200: {"description": "One label per reported token, in the order sent."},
    400: {"model": Problem, "description": "A signature header is missing."},
    401: {"model": Problem, "description": "Unknown key identifier, or a bad signature."},
    413: TOO_LARGE,
    422: {"model": Problem, "description": "Not a JSON array of reports; nothing was stored."},
    429: _TOO_MANY,
    503: {
        "model": Problem,
        "description": "GitHub's keys or the token store are unavailable; nothing was stored.",
        "headers": RETRY_AFTER,
    },
}
_GITLAB_UNAUTHORIZED: Final[dict[str, Any]] = {
    "model": Problem,
    "description": "No valid revocation token, or none is configured.",
    "headers": BEARER_CHALLENGE,
}
_GITLAB_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    204: {"description": "Every token accepted for eventual revocation (whatever it was)."},
    401: _GITLAB_UNAUTHORIZED,
    413: {
        "model": Problem,
        "description": f"The body is larger than {MAX_BODY_BYTES} bytes, or holds more than "
        f"{gitlab.MAX_REPORTS} tokens; nothing was stored.",
    },
    400: {
        "model": Problem,
        "description": "Not a JSON array of the documented objects, or a token type that "
        "GET /v1/revocable_token_types does not list; nothing was stored. Not to be retried.",
    },
    429: _TOO_MANY,
    503: {
        "model": Problem,
        "description": "The token store is unavailable; nothing was stored.",
        "headers": RETRY_AFTER,
    },
}

router = APIRouter(tags=["leaks"])

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def _reading_its_body(
    path: str, body: dict[str, Any], **route: Any
) -> Callable[[Endpoint], Endpoint]:
    """A POST route whose endpoint reads the raw body itself (a signature covers its bytes, or
    its size is capped as it streams), so FastAPI sees no body to document: ``body`` does."""
    return router.post(path, openapi_extra={"requestBody": body}, **route)


async def _github_key(shared: AppState, identifier: str) -> ec.EllipticCurvePublicKey:
    """GitHub's public key named ``identifier``; a 503 or 401 when there is none to use."""
    try:
        return await shared.github_keys.key(identifier)
    except KeysUnavailable as error:
        raise keys_unavailable(error, "GitHub's public") from None
    except UnknownKey:
        raise Refused(401, f"unknown {IDENTIFIER_HEADER}") from None


def _caller(request: Request) -> str:
    return request.client.host if request.client is not None else "-"


async def _signed_body(
    shared: AppState, request: Request, identifier: str | None, signature: str | None
) -> bytes:
    """The body of ``request``, once GitHub's signature over it is checked."""
    if not identifier or not signature:
        raise Refused(400, f"send the {IDENTIFIER_HEADER} and {SIGNATURE_HEADER} headers of GitHub")
    intake.check_declared_length(request.headers.get("content-length"))
    # The key before the body: a request naming no key of GitHub's is refused unread.
    key = await _github_key(shared, identifier)
    with shared.unverified.account() as take:
        body = await intake.read_capped(request.stream(), take=take)
        if not github.signature_valid(key, body, signature):
            raise Refused(401, "the signature does not match the body")
    return body


async def github_reports(
    shared: AppState, request: Request, identifier: str | None, signature: str | None
) -> list[dict[str, str]]:
    """GitHub's feedback on the signed reports in ``request``, once they are stored."""
    caller = _caller(request)
    # A caller whose requests keep failing the checks is held back before any work is done.
    shared.github_failures.check(caller)
    try:
        body = await _signed_body(shared, request, identifier, signature)
    except Refused as refused:
        if refused.status in (400, 401):
            shared.github_failures.charge(caller)
        raise
    checked = github.check_reports(github.decode_reports(body, GitHubReport))
    events = [item.event for item in checked if item.event is not None]
    ours: set[str] = set()
    if events:
        hashes = [event.data["token_hash"] for event in events]
        stored, ours = await shared.guarded(shared.store_github, events, hashes)
        await shared.publish(events, stored)
    answer = github.feedback(checked, ours)
    log.info(
        "leaks.reported",
        reporter=github.EVENT_SOURCE,
        reports=len(checked),
        malformed=len(checked) - len(events),
        true_positives=sum(item["label"] == github.TRUE_POSITIVE for item in answer),
    )
    return answer


async def gitlab_reports(shared: AppState, request: Request, authorization: str | None) -> None:
    """Store a leak event for each revocable token in ``request``."""
    shared.gitlab_limit.take(_caller(request))
    gitlab.authenticate(authorization, shared.settings.gitlab_revocation_token)
    intake.check_declared_length(request.headers.get("content-length"))
    body = await intake.read_capped(request.stream())
    reports = github.decode_reports(body, GitLabReport, status=400)
    events = gitlab.leak_events(reports)
    if events:
        stored = await shared.guarded(shared.store, events)
        await shared.publish(events, stored)
    log.info(
        "leaks.reported",
        reporter=gitlab.EVENT_SOURCE,
        reports=len(reports),
        dropped=len(reports) - len(events),
    )


@_reading_its_body(
    "/v1/secret-scanning/github",
    github_request_body(),
    summary="GitHub secret scanning partner alerts",
    response_model=list[GitHubFeedback],
    responses=_GITHUB_RESPONSES,
)
async def github_secret_scanning(
    request: Request,
    shared: Shared,
    identifier: Annotated[
        str | None,
        Header(
            alias=IDENTIFIER_HEADER,
            description="Which of GitHub's public keys signed the body (required).",
        ),
    ] = None,
    signature: Annotated[
        str | None,
        Header(
            alias=SIGNATURE_HEADER,
            description="Base64 ECDSA P-256 SHA-256 signature of the raw body (required).",
        ),
    ] = None,
) -> JSONResponse:
    """Verify GitHub's signature, store a leak event per well-formed token, label each."""
    return JSONResponse(await github_reports(shared, request, identifier, signature))


@router.get(
    "/v1/revocable_token_types",
    response_model=RevocableTokenTypes,
    responses={401: _GITLAB_UNAUTHORIZED, 429: _TOO_MANY},
    summary="GitLab Token Revocation API: token types",
)
async def revocable_token_types(
    request: Request,
    shared: Shared,
    authorization: Annotated[str | None, Security(gitlab_token)],
) -> RevocableTokenTypes:
    """The finding types GitLab should send to POST /v1/revoke_tokens."""
    shared.gitlab_limit.take(_caller(request))
    gitlab.authenticate(authorization, shared.settings.gitlab_revocation_token)
    return RevocableTokenTypes(types=list(gitlab.REVOCABLE_TYPES))


@_reading_its_body(
    "/v1/revoke_tokens",
    gitlab_request_body(),
    summary="GitLab Token Revocation API: revoke leaked tokens",
    status_code=204,
    response_class=Response,
    responses=_GITLAB_RESPONSES,
)
async def revoke_tokens(
    request: Request,
    shared: Shared,
    authorization: Annotated[str | None, Security(gitlab_token)],
) -> Response:
    """Store a leak event for each well-formed token of a listed type; 204 whatever they are."""
    await gitlab_reports(shared, request, authorization)
    return Response(status_code=204)
