"""``POST /v1/events``: one CloudEvent or a batch into the inbox, their ids onto the queue.

Both content modes of the CloudEvents HTTP binding: structured (and batch) JSON, and binary
(attributes in ``ce-*`` headers, ``data`` as the body); see :func:`intake.is_binary`.

A ``202`` means the events are committed to the inbox. Publishing their ids comes after the
commit and may fail (the broker is down): the events are then still stored, and the worker's
periodic re-drive publishes them, so the producer is told ``202`` all the same and must not
send them again. Requests that wait at the same moment share one commit and one publish
(producer/inbox_writer.py); each still gets the answer it would have had alone.

Must not import ``producer.api``, the other routers or ``tasks``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any, Final, cast

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from tokenwarden.producer import intake
from tokenwarden.producer.app_state import AppState, state_of
from tokenwarden.producer.auth import authenticate_producer, producer_bearer
from tokenwarden.producer.routes.responses import BEARER_CHALLENGE, TOO_LARGE
from tokenwarden.producer.schemas import Accepted, Conflicting, InvalidEvents, Problem, request_body
from tokenwarden.worker.domain import clock

_EVENT_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    202: {"model": Accepted, "description": "Stored in the inbox; published or soon re-driven."},
    401: {"model": Problem, "description": "No valid producer key.", "headers": BEARER_CHALLENGE},
    409: {"model": Conflicting, "description": "An event id was already used for other content."},
    413: TOO_LARGE,
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


class _RequestRoute(APIRoute):
    """A route whose endpoint takes the :class:`Request` and returns the response itself.

    FastAPI still documents it from the route's arguments, but a request goes straight to the
    endpoint: with no parameters to solve and no model to serialise, FastAPI's handler only
    added work (about a third of what the framework spends on a request).
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return cast(Callable[[Request], Coroutine[Any, Any, Response]], self.endpoint)


async def accept(shared: AppState, request: Request) -> list[str]:
    """The ids of the events in ``request``, once they are stored; else :class:`Refused`."""
    # The key first: nobody without one learns anything about what we would accept.
    authenticate_producer(await producer_bearer(request), shared.settings.accepted_producer_keys())
    intake.check_declared_length(request.headers.get("content-length"))
    content_type = request.headers.get("content-type")
    binary = intake.is_binary(content_type, request.headers.keys())
    if binary:
        intake.check_data_media_type(content_type)
    else:
        intake.check_media_type(content_type)
    body = await intake.read_capped(request.stream())
    if binary:
        events = intake.prepare_binary(request.headers.items(), body)
    else:
        events = intake.prepare(body)
    max_skew = timedelta(seconds=shared.settings.max_clock_skew_s)
    intake.refuse_future(events, now=clock.now(), max_skew=max_skew)
    return await shared.store_prepared(events)


async def post_events(request: Request) -> JSONResponse:
    """Store the events in the inbox, then put their ids on the queue."""
    accepted = await accept(state_of(request), request)
    return JSONResponse({"accepted": accepted}, status_code=202)


router = APIRouter()
router.add_api_route(
    "/v1/events",
    post_events,
    methods=["POST"],
    status_code=202,
    response_model=Accepted,
    responses=_EVENT_RESPONSES,
    # The producer key is checked by the handler itself (see accept), not as a dependency:
    # solving one costs every request more than the check does.
    openapi_extra={"requestBody": request_body(), "security": [{producer_bearer.scheme_name: []}]},
    summary="Send one event or a batch",
    tags=["events"],
    route_class_override=_RequestRoute,
)
