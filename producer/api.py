"""The producer API: events in, stored in the inbox, their ids onto the queue.

``uvicorn --factory producer.api:create_app`` serves it with the environment's settings.

A ``202`` means the events are committed to the inbox. Publishing their ids comes after the
commit and may fail (the broker is down): the events are then still stored, and the worker's
periodic re-drive publishes them, so the producer is told ``202`` all the same and must not
send them again. Requests that wait at the same moment share one commit and one publish
(producer/inbox_writer.py); each still gets the answer it would have had alone.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from functools import partial
from typing import Annotated, Any, Final, TypeVar, cast

import structlog
from fastapi import FastAPI, Header, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import Engine, text
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from config.redaction import first_line
from config.settings import Settings, get_settings, keep_files_private
from producer import github, gitlab, intake, introspection
from producer.github import IDENTIFIER_HEADER, SIGNATURE_HEADER, GitHubKeys
from producer.inbox_writer import InboxWriter, StoreUnavailable
from producer.intake import Refused, mask
from producer.metrics import ApiMetrics, RequestMetrics
from producer.schemas import (
    MAX_BODY_BYTES,
    Accepted,
    Conflicting,
    GitHubFeedback,
    GitHubReport,
    GitLabReport,
    Health,
    InvalidEvents,
    Problem,
    Readiness,
    RevocableTokenTypes,
    github_request_body,
    gitlab_request_body,
    request_body,
)
from producer.serving import BODY_TIMED_OUT
from worker.domain import clock
from worker.domain.db import engine_for, reader, transaction
from worker.domain.events import CloudEvent
from worker.domain.inbox import Conflict, Stored, store_events
from worker.runtime.publishing import PublishError, publish_event_ids

log = structlog.get_logger(__name__)

T = TypeVar("T")

RETRY_AFTER_S: Final = 5
# The status a request is counted under when its client left before it was read (nginx's).
CLIENT_CLOSED_REQUEST: Final = 499
READY_TIMEOUT_S: Final = 3.0
# /readyz answers with a probe at most this old: each probe opens a broker connection.
READY_MAX_AGE_S: Final = 1.0
# Ids named in one log line; a batch of a thousand would make the line unreadable.
LOGGED_IDS: Final = 20

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="producerKey",
    description="A producer key from TOKENWARDEN_PRODUCER_KEYS.",
)
_metrics_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="metricsKey",
    description="TOKENWARDEN_METRICS_KEY, when it is set.",
)
_gitlab_token = APIKeyHeader(
    name="Authorization",
    auto_error=False,
    scheme_name="gitlabRevocationToken",
    description=(
        "TOKENWARDEN_GITLAB_REVOCATION_TOKEN, sent as is (as GitLab does) or as 'Bearer TOKEN'."
    ),
)


_EVENT_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    202: {"model": Accepted, "description": "Stored in the inbox; published or soon re-driven."},
    401: {
        "model": Problem,
        "description": "No valid producer key.",
        "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    },
    409: {"model": Conflicting, "description": "An event id was already used for other content."},
    413: {"model": Problem, "description": f"The body is larger than {MAX_BODY_BYTES} bytes."},
    415: {"model": Problem, "description": "Not a JSON or CloudEvents JSON content type."},
    422: {"model": InvalidEvents, "description": "Invalid events; none of the batch was stored."},
    503: {
        "model": Problem,
        "description": "The token store is unavailable; nothing was stored.",
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before sending the same events again.",
                "schema": {"type": "integer"},
            }
        },
    },
}


_RETRY_AFTER_HEADER: Final = {
    "Retry-After": {
        "description": "Seconds to wait before sending the same request again.",
        "schema": {"type": "integer"},
    }
}
_GITHUB_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    200: {"description": "One label per reported token, in the order sent."},
    400: {"model": Problem, "description": "A signature header is missing."},
    401: {"model": Problem, "description": "Unknown key identifier, or a bad signature."},
    413: {"model": Problem, "description": f"The body is larger than {MAX_BODY_BYTES} bytes."},
    422: {"model": Problem, "description": "Not a JSON array of reports; nothing was stored."},
    503: {
        "model": Problem,
        "description": "GitHub's keys or the token store are unavailable; nothing was stored.",
        "headers": _RETRY_AFTER_HEADER,
    },
}
_GITLAB_UNAUTHORIZED: Final[dict[str, Any]] = {
    "model": Problem,
    "description": "No valid revocation token, or none is configured.",
    "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
}
_GITLAB_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    204: {"description": "Every token accepted for eventual revocation (whatever it was)."},
    401: _GITLAB_UNAUTHORIZED,
    413: {
        "model": Problem,
        "description": f"The body is larger than {MAX_BODY_BYTES} bytes, or holds more than "
        f"{gitlab.MAX_REPORTS} tokens; nothing was stored.",
    },
    422: {"model": Problem, "description": "Not a JSON array of tokens; nothing was stored."},
    503: {
        "model": Problem,
        "description": "The token store is unavailable; nothing was stored.",
        "headers": _RETRY_AFTER_HEADER,
    },
}


class _RequestRoute(APIRoute):
    """A route whose endpoint takes the :class:`Request` and returns the response itself.

    FastAPI still documents it from the route's arguments, but a request goes straight to the
    endpoint: with no parameters to solve and no model to serialise, FastAPI's handler only
    added work (about a third of what the framework spends on a request).
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return cast(Callable[[Request], Coroutine[Any, Any, Response]], self.endpoint)


class _Service:
    """What the routes share: settings, the store, the broker and the metrics."""

    def __init__(
        self, settings: Settings, celery_app: Any, github_keys: GitHubKeys | None = None
    ) -> None:
        self.settings = settings
        self.celery_app = celery_app
        self.database_url = settings.resolved_database_url
        self.metrics = ApiMetrics(self.engine)
        self.github_keys = github_keys or GitHubKeys(settings.github_keys_url)
        self.unverified = github.UnverifiedBytes()
        self.writer = InboxWriter(self.database_url, partial(publish_event_ids, celery_app))
        self._readiness: tuple[float, Readiness] | None = None  # (fresh until, answer)
        self._probing: asyncio.Future[Readiness] | None = None

    def engine(self) -> Engine:
        # Created on first use, so an app on a store that is down still starts and says so.
        return engine_for(self.database_url)

    def store(self, events: Sequence[CloudEvent]) -> Stored:
        with transaction(self.engine()) as session:
            return store_events(session, events, now=clock.now())

    def store_github(
        self, events: Sequence[CloudEvent], token_hashes: Sequence[str]
    ) -> tuple[Stored, set[str]]:
        """Store the events and tell which hashes name usable tokens, in one transaction."""
        now = clock.now()
        with transaction(self.engine()) as session:
            usable = github.usable_hashes(session, token_hashes, now=now)
            return store_events(session, events, now=now), usable

    def check_database(self) -> None:
        with reader(self.engine()).connect() as connection:
            connection.execute(text("SELECT 1"))

    def check_broker(self) -> None:
        with self.celery_app.connection_for_write(connect_timeout=READY_TIMEOUT_S) as connection:
            connection.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=READY_TIMEOUT_S
            )

    async def accept(self, request: Request) -> list[str]:
        """The ids of the events in ``request``, once they are stored; else :class:`Refused`."""
        # The key first: nobody without one learns anything about what we would accept.
        _authenticate(await _bearer(request), self.settings.accepted_producer_keys())
        intake.check_declared_length(request.headers.get("content-length"))
        intake.check_media_type(request.headers.get("content-type"))
        body = await intake.read_capped(request.stream())
        events = intake.prepare(body)
        max_skew = timedelta(seconds=self.settings.max_clock_skew_s)
        intake.refuse_future(events, now=clock.now(), max_skew=max_skew)
        try:
            outcome = await self.writer.store(events)
        except Conflict as conflict:
            raise Refused(409, mask(str(conflict)), ids=[mask(i) for i in conflict.ids]) from None
        except StoreUnavailable as error:
            raise _unavailable(error.kind, str(error)) from None
        self.metrics.accepted({event.id: event.type for event in events}.values())
        (log.warning if outcome.publish_error else log.info)(
            "events.accepted",
            count=len(outcome.accepted),
            ids=outcome.accepted[:LOGGED_IDS],
            published=outcome.published,
            publish_error=mask(outcome.publish_error) if outcome.publish_error else None,
        )
        return outcome.accepted

    async def _guarded(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` on the thread pool, its database failures turned into refusals."""
        try:
            return await run_in_threadpool(work, *args)
        except Conflict as conflict:
            raise Refused(409, mask(str(conflict)), ids=[mask(i) for i in conflict.ids]) from None
        except Exception as error:
            # Whatever the database layer raised (down, locked, not migrated), nothing was
            # stored and a resend is safe: tell the producer to retry, never a 500.
            raise _unavailable(type(error).__name__, str(error)) from None

    async def _publish(self, events: Sequence[CloudEvent], stored: Stored) -> list[str]:
        """Put the stored ids on the queue; a broker that is down leaves them to the re-drive."""
        published, problem = True, None
        if stored.to_publish:
            try:
                await run_in_threadpool(publish_event_ids, self.celery_app, stored.to_publish)
            except PublishError as error:
                published, problem = False, mask(first_line(error))
        self.metrics.accepted({event.id: event.type for event in events}.values())
        (log.info if published else log.warning)(
            "events.accepted",
            count=len(stored.accepted),
            ids=stored.accepted[:LOGGED_IDS],
            published=len(stored.to_publish) if published else 0,
            publish_error=problem,
        )
        return stored.accepted

    async def github_reports(
        self, request: Request, identifier: str | None, signature: str | None
    ) -> list[dict[str, str]]:
        """GitHub's feedback on the signed reports in ``request``, once they are stored."""
        if not identifier or not signature:
            raise Refused(
                400, f"send the {IDENTIFIER_HEADER} and {SIGNATURE_HEADER} headers of GitHub"
            )
        intake.check_declared_length(request.headers.get("content-length"))
        # The key before the body: a request naming no key of GitHub's is refused unread.
        try:
            key = await self.github_keys.key(identifier)
        except github.KeysUnavailable as error:
            raise Refused(
                503,
                "GitHub's public keys cannot be fetched now; nothing was stored",
                headers={"Retry-After": str(error.retry_after)},
                cause=mask(error.cause),
                level="warning",
            ) from None
        except github.UnknownKey:
            raise Refused(401, f"unknown {IDENTIFIER_HEADER}") from None
        with self.unverified.account() as take:
            body = await intake.read_capped(request.stream(), take=take)
            if not github.signature_valid(key, body, signature):
                raise Refused(401, "the signature does not match the body")
        checked = github.check_reports(github.decode_reports(body, GitHubReport))
        events = [item.event for item in checked if item.event is not None]
        usable: set[str] = set()
        if events:
            hashes = [event.data["token_hash"] for event in events]
            stored, usable = await self._guarded(self.store_github, events, hashes)
            await self._publish(events, stored)
        answer = github.feedback(checked, usable)
        log.info(
            "leaks.reported",
            reporter=github.EVENT_SOURCE,
            reports=len(checked),
            malformed=len(checked) - len(events),
            true_positives=sum(item["label"] == github.TRUE_POSITIVE for item in answer),
        )
        return answer

    async def gitlab_reports(self, request: Request, authorization: str | None) -> None:
        """Store a leak event for each revocable token in ``request``."""
        gitlab.authenticate(authorization, self.settings.gitlab_revocation_token)
        intake.check_declared_length(request.headers.get("content-length"))
        body = await intake.read_capped(request.stream())
        reports = github.decode_reports(body, GitLabReport)
        events = gitlab.leak_events(reports)
        if events:
            stored = await self._guarded(self.store, events)
            await self._publish(events, stored)
        log.info(
            "leaks.reported",
            reporter=gitlab.EVENT_SOURCE,
            reports=len(reports),
            dropped=len(reports) - len(events),
        )

    async def readiness(self) -> Readiness:
        """The last probe's answer if under :data:`READY_MAX_AGE_S` old, else a new probe's.

        Anyone may call /readyz, as often as they like, and each probe opens a broker
        connection: requests that arrive while a probe is under way wait for its answer, and
        the answer serves every request for a second, so a flood opens about one a second.
        """
        if self._readiness is not None and time.monotonic() < self._readiness[0]:
            return self._readiness[1]
        if self._probing is None:
            self._probing = asyncio.ensure_future(self._check_both())
        # Shielded: a caller that goes away must not cancel the probe the others wait for.
        return await asyncio.shield(self._probing)

    async def _check_both(self) -> Readiness:
        try:
            database, broker = await asyncio.gather(
                _probe("database", self.check_database), _probe("broker", self.check_broker)
            )
            ready = database == broker == "ok"
            readiness = Readiness(
                status="ready" if ready else "unavailable", database=database, broker=broker
            )
            self._readiness = (time.monotonic() + READY_MAX_AGE_S, readiness)
            return readiness
        finally:
            self._probing = None


def create_app(
    settings: Settings | None = None,
    *,
    celery_app: Any | None = None,
    github_keys: GitHubKeys | None = None,
) -> FastAPI:
    """The producer API on ``settings`` (the environment's by default).

    ``github_keys`` replaces the cache of GitHub's signing keys (tests give it their clock).
    """
    keep_files_private()
    settings = settings or get_settings()
    owns_celery = celery_app is None
    if celery_app is None:
        from worker.runtime.celery_app import make_celery

        celery_app = make_celery(settings)
    service = _Service(settings, celery_app, github_keys)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owns_celery:
            service.celery_app.close()

    app = FastAPI(
        title="tokenwarden producer API",
        summary="Membership, leak and revocation events for the token lifecycle worker.",
        version="1.0",
        lifespan=lifespan,
    )
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    app.add_exception_handler(Refused, _refused)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnect, _disconnected)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(
        introspection.router(settings, engine=service.engine, registry=service.metrics.registry)
    )

    async def post_events(request: Request) -> JSONResponse:
        """Store the events in the inbox, then put their ids on the queue."""
        accepted = await service.accept(request)
        return JSONResponse({"accepted": accepted}, status_code=202)

    app.router.add_api_route(
        "/v1/events",
        post_events,
        methods=["POST"],
        status_code=202,
        response_model=Accepted,
        responses=_EVENT_RESPONSES,
        # The producer key is checked by the handler itself (see _Service.accept), not as a
        # dependency: solving one costs every request more than the check does.
        openapi_extra={"requestBody": request_body(), "security": [{_bearer.scheme_name: []}]},
        summary="Send one event or a batch",
        tags=["events"],
        route_class_override=_RequestRoute,
    )

    @app.post(
        "/v1/secret-scanning/github",
        response_model=list[GitHubFeedback],
        responses=_GITHUB_RESPONSES,
        openapi_extra={"requestBody": github_request_body()},
        summary="GitHub secret scanning partner alerts",
        tags=["leaks"],
    )
    async def github_secret_scanning(
        request: Request,
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
        return JSONResponse(await service.github_reports(request, identifier, signature))

    @app.get(
        "/v1/revocable_token_types",
        response_model=RevocableTokenTypes,
        responses={401: _GITLAB_UNAUTHORIZED},
        summary="GitLab Token Revocation API: token types",
        tags=["leaks"],
    )
    async def revocable_token_types(
        authorization: Annotated[str | None, Security(_gitlab_token)],
    ) -> RevocableTokenTypes:
        """The finding types GitLab should send to POST /v1/revoke_tokens."""
        gitlab.authenticate(authorization, settings.gitlab_revocation_token)
        return RevocableTokenTypes(types=list(gitlab.REVOCABLE_TYPES))

    @app.post(
        "/v1/revoke_tokens",
        status_code=204,
        response_class=Response,
        responses=_GITLAB_RESPONSES,
        openapi_extra={"requestBody": gitlab_request_body()},
        summary="GitLab Token Revocation API: revoke leaked tokens",
        tags=["leaks"],
    )
    async def revoke_tokens(
        request: Request,
        authorization: Annotated[str | None, Security(_gitlab_token)],
    ) -> Response:
        """Store a leak event for each well-formed token of a listed type; 204 whatever they are."""
        await service.gitlab_reports(request, authorization)
        return Response(status_code=204)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, with the producer key's scheme that no dependency declares."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes[_bearer.scheme_name] = _bearer.model.model_dump(
                mode="json", by_alias=True, exclude_none=True
            )
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/healthz", response_model=Health, tags=["operations"], summary="Alive")
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "The store or the broker is down."}},
        tags=["operations"],
        summary="Database and broker reachable",
    )
    async def readyz() -> JSONResponse:
        readiness = await service.readiness()
        status = 200 if readiness.status == "ready" else 503
        return JSONResponse(readiness.model_dump(), status_code=status)

    metrics_responses: dict[int | str, dict[str, Any]] = {
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}}
    }
    if settings.metrics_key:
        metrics_responses[401] = {"model": Problem, "description": "No valid metrics key."}

    @app.get(
        "/metrics",
        response_class=Response,
        responses=metrics_responses,
        # Documents the key when one is set; the handler checks it.
        dependencies=[Security(_metrics_bearer)] if settings.metrics_key else None,
        tags=["operations"],
        summary="Prometheus metrics",
    )
    def prometheus(request: Request) -> Response:
        if settings.metrics_key:
            _authorize_scrape(request.headers.get("authorization"), settings.metrics_key)
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _refused(request: Request, refusal: Refused) -> JSONResponse:
    details: dict[str, Any] = {"cause": refusal.cause} if refusal.cause else {}
    if refusal.errors:
        details["invalid"] = len(refusal.errors)
    getattr(log, refusal.level)(
        "events.refused",
        status=refusal.status,
        reason=refusal.detail,
        client=request.client.host if request.client else None,
        **details,
    )
    return JSONResponse(refusal.body(), status_code=refusal.status, headers=refusal.headers)


async def _disconnected(request: Request, _: ClientDisconnect) -> Response:
    """The client left before its body was read: nobody to answer, nothing gone wrong.

    The metrics count it under nginx's 499 ("client closed request"), or 408 when the server
    itself gave up on a body too slow in coming (producer/serving.py), never as a 500.
    """
    timed_out = request.scope.get("state", {}).get(BODY_TIMED_OUT, False)
    log.debug("request.disconnected", path=request.url.path, timed_out=timed_out)
    return Response(status_code=408 if timed_out else CLIENT_CLOSED_REQUEST)


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.error("api.failed", path=request.url.path, exc_info=error)
    return JSONResponse({"detail": "internal error"}, status_code=500)


def _authenticate(credentials: HTTPAuthorizationCredentials | None, keys: Sequence[str]) -> None:
    """Accept a known key; compare with every key each time, so timing tells nothing."""
    given = (credentials.credentials if credentials else "").encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    if credentials is not None and matched:
        return
    detail = (
        "send a producer key as 'Authorization: Bearer KEY'"
        if keys
        else "no producer key is configured: set TOKENWARDEN_PRODUCER_KEYS"
    )
    raise Refused(401, detail, headers={"WWW-Authenticate": "Bearer"})


def _authorize_scrape(authorization: str | None, key: str) -> None:
    """Accept ``Bearer <key>`` only, compared in constant time."""
    scheme, _, given = (authorization or "").partition(" ")
    matched = hmac.compare_digest(given.strip().encode(), key.encode())
    if scheme.lower() == "bearer" and matched:
        return
    raise Refused(
        401,
        "send the metrics key as 'Authorization: Bearer KEY'",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def _probe(name: str, check: Callable[[], None]) -> str:
    try:
        await asyncio.wait_for(run_in_threadpool(check), timeout=READY_TIMEOUT_S + 1)
    except TimeoutError:
        log.warning("readiness.failed", dependency=name, error="timed out")
        return "timed out"
    except Exception as error:
        log.warning("readiness.failed", dependency=name, error=mask(first_line(error)))
        return f"unreachable ({type(error).__name__})"
    return "ok"


def _unavailable(kind: str, message: str) -> Refused:
    lines = message.strip().splitlines()
    return Refused(
        503,
        f"the token store is unavailable ({kind}); nothing was stored",
        headers={"Retry-After": str(RETRY_AFTER_S)},
        cause=f"{kind}: {mask(lines[0]) if lines else kind}",
    )
