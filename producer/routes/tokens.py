"""``/v1/tokens``: issue, list, read, delete and rotate tokens, for a console or automation.

Callers authenticate with a key of ``TOKENWARDEN_ADMIN_KEYS`` (``Bearer``): no key or an
unknown one is ``401``; a producer or introspection key is ``403`` (known, but not for this
door). Each change is committed before its answer and audited with the key's name (as the
source, ``api:NAME``) and the ``actor`` the caller states. Issuing and rotating go through the
domain's rules (worker/domain/issuing.py, worker/domain/rotation.py): a refusal is ``422``
with its reason, ``404`` for an unknown token, ``409`` for a token already rotated. Must not
import ``producer.api``, the other routers or ``tasks``.
"""

import hmac
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Annotated, Any, Final, Literal, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenwarden.config.settings import Settings
from tokenwarden.producer.app_state import AppState, Shared, log, unavailable
from tokenwarden.producer.intake import Refused
from tokenwarden.worker.domain import clock, db, token_pages
from tokenwarden.worker.domain.errors import Refused as DomainRefused
from tokenwarden.worker.domain.families import REUSE_DETECTED
from tokenwarden.worker.domain.issuing import IssuedToken, create_token, parse_kind
from tokenwarden.worker.domain.revocation import request_revocation
from tokenwarden.worker.domain.rotation import (
    ALREADY_ROTATED,
    MAX_OVERLAP,
    NOT_ROTATABLE,
    UNKNOWN_TOKEN,
    rotate_in,
)

T = TypeVar("T")

SCHEME: Final = "adminKey"
PREFIX: Final = "/v1/tokens"
# A request to this door is a few hundred bytes; a larger body is refused unread.
MAX_BODY_BYTES: Final = 16 * 1024
CONFIRMATION: Final = "DELETE"
ID_MAX: Final = 40
admin_bearer = HTTPBearer(
    auto_error=False,
    scheme_name=SCHEME,
    description="An admin key from TOKENWARDEN_ADMIN_KEYS (NAME:KEY; the name is audited).",
)
_STATUS_OF: Final = {
    UNKNOWN_TOKEN: 404,
    ALREADY_ROTATED: 409,
    REUSE_DETECTED: 409,
    NOT_ROTATABLE: 409,
}


class AdminRefusal(BaseModel):
    """A refusal: what went wrong, and for the token store's rules a machine-readable reason."""

    model_config = ConfigDict(extra="allow")
    detail: str | list[Any]
    reason: str | None = None


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "model": AdminRefusal}


_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    400: _problem("A body that is not JSON; for a delete, no confirm=DELETE or no actor."),
    401: {
        **_problem("No admin key, or an unknown one."),
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    403: _problem("A key of another door (producer or introspection)."),
    413: _problem(f"A body over {MAX_BODY_BYTES} bytes."),
    422: _problem("A field the rules refuse; the reason says which."),
    503: {
        **_problem("The token store is unavailable; nothing was changed."),
        "headers": {"Retry-After": {"schema": {"type": "string"}}},
    },
}
_UNKNOWN: Final[dict[int | str, dict[str, Any]]] = {404: _problem("No such token.")}
_CONFLICT: Final[dict[int | str, dict[str, Any]]] = {
    409: _problem("Already rotated, or rotated away and presented again.")
}
# Text a database can store: no NUL (Postgres refuses it), 1 to 200 characters.
Text = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00]+$")]
Actor = Annotated[Text, Field(description="Who asked (audited).")]
TokenId = Annotated[str, Path(min_length=1, max_length=ID_MAX, pattern=r"^[^\x00]+$")]
QueryText = Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]+$")]


class IssueRequest(BaseModel):
    kind: Literal["personal", "application"]
    org_id: Text
    user_id: Text | None = None
    app_id: Text | None = None
    created_by: Text | None = None
    name: Text
    expires_at: AwareDatetime
    actor: Actor


class RotateRequest(BaseModel):
    actor: Actor
    overlap_s: int = Field(0, ge=0, le=int(MAX_OVERLAP.total_seconds()))
    expires_at: AwareDatetime | None = None


class TokenView(BaseModel):
    id: str
    kind: str
    name: str
    org_id: str
    user_id: str | None
    app_id: str | None
    created_by: str
    state: str
    reason: str | None
    created_at: datetime
    expires_at: datetime
    last4: str
    last_used_at: datetime | None
    family_id: str
    replaced_by: str | None
    overlap_ends_at: datetime | None


_DELETE_BODY: Final = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "confirm": {"type": "string", "enum": [CONFIRMATION]},
                    "actor": {"type": "string", "minLength": 1, "maxLength": 200},
                },
            }
        }
    },
}


class IssuedView(BaseModel):
    id: str
    token: str = Field(description="The token itself, shown this once.")
    kind: str
    org_id: str
    name: str
    expires_at: datetime
    family_id: str | None = None
    replaces: str | None = None
    overlap_ends_at: datetime | None = None

    @classmethod
    def of(cls, issued: IssuedToken, name: str, **rotation: Any) -> "IssuedView":
        return cls(
            id=issued.id,
            token=issued.token,
            kind=issued.kind.value,
            org_id=issued.org_id,
            name=name,
            expires_at=issued.expires_at,
            **rotation,
        )


class TokenPage(BaseModel):
    items: list[TokenView]
    next_cursor: str | None = Field(description="Give as ?cursor= for the next page.")


class Deleted(BaseModel):
    id: str
    changed: bool = Field(description="False when the token had already stopped working.")
    state: str


class BodyCap:
    """ASGI: a body over :data:`MAX_BODY_BYTES` to ``/v1/tokens`` is ``413``, announced or not,
    before FastAPI reads it whole (it parses JSON bodies before any dependency checks a key)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        # The key before the body: FastAPI reads and parses a JSON body before any dependency
        # runs, so a caller without a key would otherwise learn what it thinks of the body.
        try:
            identify(scope["app"].state.shared.settings, _bearer(headers))
        except Refused as refusal:
            client = scope.get("client")
            log.info(
                "events.refused",
                status=refusal.status,
                reason=refusal.detail,
                client=client[0] if client else None,
            )
            await JSONResponse(refusal.body(), status_code=refusal.status, headers=refusal.headers)(
                scope, receive, send
            )
            return
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
            await _too_large()(scope, receive, send)
            return
        # Read whole (it is small) before the app sees it: a stream that grows past the cap
        # is refused here, as if it had been announced.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            if len(body) > MAX_BODY_BYTES:
                await _too_large()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def _bearer(headers: dict[bytes, bytes]) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` header, as HTTPBearer reads it."""
    scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def _too_large() -> JSONResponse:
    detail = f"the body is larger than {MAX_BODY_BYTES} bytes"
    return JSONResponse({"detail": detail}, status_code=413)


def _caller(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(admin_bearer)],
    shared: Shared,
) -> str:
    """The name of the admin key presented; anything else is refused."""
    return identify(shared.settings, credentials.credentials if credentials else None)


def identify(settings: Settings, given_key: str | None) -> str:
    """The name of the admin key ``given_key``; :class:`Refused` ``401`` without a known key,
    ``403`` with a key of another door. Every key is compared, in constant time."""
    given = (given_key or "").encode()
    found = None
    for name, key in settings.admin_keys:
        if hmac.compare_digest(given, key.encode()):
            found = name
    if given_key is not None and found is not None:
        return found
    other = False
    for key in settings.accepted_producer_keys() + settings.introspection_keys:
        other |= hmac.compare_digest(given, key.encode())
    if given_key is not None and other:
        raise Refused(403, "this key is not an admin key: use one of TOKENWARDEN_ADMIN_KEYS")
    raise Refused(
        401,
        "send an admin key as 'Authorization: Bearer KEY'"
        if settings.admin_keys
        else "no admin key is configured: set TOKENWARDEN_ADMIN_KEYS",
        headers={"WWW-Authenticate": "Bearer"},
    )


Caller = Annotated[str, Depends(_caller)]
# The token store's door for administrators.
router = APIRouter(prefix=PREFIX, tags=["tokens"], responses=_RESPONSES)


async def _in_store(shared: AppState, work: Callable[[Session], T]) -> T:
    """``work`` in one committed transaction; refusals as HTTP, store failures as 503."""

    def run() -> T:
        with db.transaction(shared.engine()) as session:
            return work(session)

    return await _guarded(run)


async def _guarded(run: Callable[[], T]) -> T:
    try:
        return await run_in_threadpool(run)
    except DomainRefused as refusal:
        raise Refused(
            _STATUS_OF.get(refusal.reason, 422), refusal.message, reason=refusal.reason
        ) from None
    except Refused:
        raise
    except Exception as error:
        raise unavailable(type(error).__name__, str(error)) from None


@router.post("", status_code=201, response_model=IssuedView, summary="Issue a token")
async def issue(body: IssueRequest, shared: Shared, key: Caller) -> IssuedView:
    """Issue a PAT or an AAT under the CLI's rules; the token is in this answer only."""
    if body.kind == "personal" and body.app_id:
        raise Refused(422, "app_id is for application tokens", reason="bad_owner")
    if body.kind == "application" and body.user_id:
        raise Refused(422, "user_id is for personal tokens", reason="bad_owner")

    def work(session: Session) -> IssuedView:
        issued = create_token(
            session,
            kind=parse_kind(body.kind),
            org_id=body.org_id,
            name=body.name,
            expires_at=body.expires_at,
            now=clock.now(),
            user_id=body.user_id,
            app_id=body.app_id,
            created_by=body.created_by,
            source=f"api:{key}",
            actor=body.actor,
        )
        return IssuedView.of(issued, body.name)

    issued = await _in_store(shared, work)
    log.info("tokens.issued", token_id=issued.id, key=key, actor=body.actor)
    return issued


@router.get("", response_model=TokenPage, summary="List tokens, a page at a time")
async def list_page(
    *,
    shared: Shared,
    _: Caller,
    org_id: QueryText = None,
    user_id: QueryText = None,
    kind: Literal["personal", "application"] | None = None,
    state: Literal["active", "revoked", "expired"] | None = None,
    cursor: Annotated[str | None, Query(max_length=ID_MAX, pattern=r"^[^\x00]+$")] = None,
    limit: Annotated[int, Query(ge=1, le=token_pages.MAX_PAGE)] = 50,
) -> TokenPage:
    """Tokens by id, never a secret; follow ``next_cursor`` for the next page."""
    filters = {"org_id": org_id, "user_id": user_id, "kind": kind, "state": state}
    found = await _in_store(
        shared,
        lambda session: token_pages.page(
            session, now=clock.now(), limit=limit, after=cursor, filters=filters
        ),
    )
    return TokenPage.model_validate({"items": found.items, "next_cursor": found.next_cursor})


@router.get("/{token_id}", response_model=TokenView, summary="Read one token", responses=_UNKNOWN)
async def read(token_id: TokenId, shared: Shared, _: Caller) -> TokenView:
    """One token, never its secret; ``404`` when there is none."""
    found = await _in_store(
        shared, lambda session: token_pages.one(session, token_id, now=clock.now())
    )
    if found is None:
        raise Refused(404, f"no token {token_id!r}", reason=UNKNOWN_TOKEN)
    return TokenView.model_validate(found)


@router.delete(
    "/{token_id}",
    response_model=Deleted,
    summary="Delete (revoke) a token",
    responses=_UNKNOWN,
    openapi_extra={"requestBody": _DELETE_BODY},
)
async def delete(
    *,
    token_id: TokenId,
    request: Request,
    shared: Shared,
    key: Caller,
    confirm: Annotated[str | None, Query(description="Must be DELETE.")] = None,
    actor: QueryText = None,
) -> Deleted:
    """Revoke a token for good; needs ``confirm=DELETE`` (query or JSON). A second delete
    answers ``changed: false``."""
    confirm, actor = await _confirmation(request, confirm, actor)
    if confirm != CONFIRMATION:
        raise Refused(
            400,
            "send confirm=DELETE (query or JSON) to delete a token",
            reason="confirm_required",
        )
    if actor is None:
        raise Refused(
            400,
            "send actor=NAME (query or JSON): who asked, for the audit trail",
            reason="actor_required",
        )
    now = clock.now()

    def work(session: Session) -> Deleted:
        outcome = request_revocation(
            session,
            token_id=token_id,
            at=now,
            now=now,
            source=f"api:{key}",
            event_id=None,
            actor=actor,
        )
        if outcome.token_id is None:
            raise DomainRefused(UNKNOWN_TOKEN, f"no token {token_id!r}")
        found = token_pages.one(session, token_id, now=now)
        return Deleted(
            id=token_id, changed=outcome.revoked, state=found["state"] if found else "revoked"
        )

    return await _in_store(shared, work)


@router.post(
    "/{token_id}/rotate",
    status_code=201,
    response_model=IssuedView,
    summary="Rotate a token",
    responses={**_UNKNOWN, **_CONFLICT},
)
async def rotate(token_id: TokenId, body: RotateRequest, shared: Shared, key: Caller) -> IssuedView:
    """Issue a successor (same kind, owner, organization, name); the old token works for
    ``overlap_s`` more seconds. A token already rotated is ``409``; one rotated before and
    past its overlap is reuse: its family is revoked."""

    @contextmanager
    def transaction() -> Iterator[Session]:
        with db.transaction(shared.engine()) as session:
            yield session

    rotation = await _guarded(
        lambda: rotate_in(
            transaction,
            token_id,
            now=clock.now(),
            overlap=timedelta(seconds=body.overlap_s),
            expires_at=body.expires_at,
            source=f"api:{key}",
            actor=body.actor,
        )
    )
    issued = rotation.successor
    log.info("tokens.rotated", token_id=token_id, successor=issued.id, key=key)
    return IssuedView.of(
        issued,
        rotation.name,
        family_id=rotation.family_id,
        replaces=rotation.predecessor_id,
        overlap_ends_at=rotation.overlap_ends_at,
    )


async def _confirmation(
    request: Request, confirm: str | None, actor: str | None
) -> tuple[str | None, str | None]:
    """``confirm`` and ``actor`` from the query, else from a small JSON body."""
    if confirm is not None:
        return confirm, actor
    body = await request.body()
    if not body or len(body) > 4096:
        return None, actor
    try:
        data = json.loads(body)
    except ValueError:
        return None, actor
    if not isinstance(data, dict):
        return None, actor
    given = data.get("confirm")
    stated = data.get("actor")
    return (
        given if isinstance(given, str) else None,
        stated if isinstance(stated, str) and 0 < len(stated) <= 200 else actor,
    )
