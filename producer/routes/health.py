"""The operations routes: ``/healthz`` (alive), ``/readyz`` (store and broker reachable) and
``/metrics`` (Prometheus). Must not import ``producer.api``, the other routers or ``tasks``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Security
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from tokenwarden.producer.app_state import Shared
from tokenwarden.producer.auth import authorize_scrape, metrics_bearer
from tokenwarden.producer.schemas import Health, Problem, Readiness


async def healthz() -> Health:
    return Health(status="ok")


async def readyz(shared: Shared) -> JSONResponse:
    readiness = await shared.readiness()
    status = 200 if readiness.status == "ready" else 503
    return JSONResponse(readiness.model_dump(), status_code=status)


def prometheus(request: Request, shared: Shared) -> Response:
    if metrics_key := shared.settings.metrics_key:
        authorize_scrape(request.headers.get("authorization"), metrics_key)
    return Response(shared.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def router(*, metrics_key: str | None) -> APIRouter:
    """The routes; /metrics documents a key (401 and the scheme) only when one is set."""
    routes = APIRouter(tags=["operations"])
    routes.add_api_route(
        "/healthz", healthz, methods=["GET"], response_model=Health, summary="Alive"
    )
    routes.add_api_route(
        "/readyz",
        readyz,
        methods=["GET"],
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "The store or the broker is down."}},
        summary="Database and broker reachable",
    )
    metrics_responses: dict[int | str, dict[str, Any]] = {
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}}
    }
    if metrics_key:
        metrics_responses[401] = {"model": Problem, "description": "No valid metrics key."}
    routes.add_api_route(
        "/metrics",
        prometheus,
        methods=["GET"],
        response_class=Response,
        responses=metrics_responses,
        # Documents the key when one is set; the handler checks it.
        dependencies=[Security(metrics_bearer)] if metrics_key else None,
        summary="Prometheus metrics",
    )
    return routes
