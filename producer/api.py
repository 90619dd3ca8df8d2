"""The producer API: events in, stored in the inbox, their ids onto the queue.

``uvicorn --factory tokenwarden.producer.api:create_app`` serves it with the environment's settings.
:func:`create_app` builds the app from the routers of producer/routes/ (events, leaks, health)
and the doors for services (introspection, forward-auth) over the state they share
(producer/app_state.py), and answers refusals, clients that left and failures the same way on
every route. Must not import ``tasks``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from tokenwarden.config.settings import Settings, get_settings, keep_files_private
from tokenwarden.producer import forward_auth, introspection
from tokenwarden.producer.app_state import AppState, log
from tokenwarden.producer.auth import producer_bearer
from tokenwarden.producer.docs import make_app
from tokenwarden.producer.doors import token_check_for
from tokenwarden.producer.github import GitHubKeys
from tokenwarden.producer.intake import Refused
from tokenwarden.producer.metrics import RequestMetrics
from tokenwarden.producer.routes import events, health, leaks, ssf, tokens
from tokenwarden.producer.scim import routes as scim
from tokenwarden.producer.serving import BODY_TIMED_OUT

# The status a request is counted under when its client left before it was read (nginx's).
CLIENT_CLOSED_REQUEST: Final = 499


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
        from tokenwarden.worker.runtime.celery_app import make_celery

        celery_app = make_celery(settings)
    shared = AppState(settings, celery_app, github_keys)

    check, run_check = token_check_for(
        settings, engine=shared.engine, registry=shared.metrics.registry
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with run_check(app):
            yield
        if owns_celery:
            shared.celery_app.close()

    app = make_app(  # /docs served from local files, or switched off (producer/docs.py)
        settings,
        title="tokenwarden producer API",
        summary="Membership, leak and revocation events for the token lifecycle worker.",
        version="1.0",
        lifespan=lifespan,
    )
    app.state.shared = shared
    app.add_middleware(RequestMetrics, metrics=shared.metrics)
    app.add_middleware(tokens.BodyCap)
    app.add_exception_handler(Refused, _refused)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnect, _disconnected)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(events.router)
    app.include_router(leaks.router)
    app.include_router(ssf.router)
    app.include_router(tokens.router)
    app.include_router(health.router(metrics_key=settings.metrics_key))
    app.include_router(introspection.router(settings, check))
    app.include_router(forward_auth.router(settings, check, registry=shared.metrics.registry))
    app.include_router(scim.router(settings))
    app.openapi = partial(_openapi, app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with the schemes of the keys that no dependency declares."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes[producer_bearer.scheme_name] = producer_bearer.model.model_dump(
            mode="json", by_alias=True, exclude_none=True
        )
        schemes[introspection.SCHEME] = introspection.SECURITY_SCHEME
        schemes[forward_auth.SCHEME] = forward_auth.SECURITY_SCHEME
    return app.openapi_schema or {}


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
