"""``POST /v1/ssf/events``: Shared Signals push delivery (RFC 8935) of one signed SET.

``202`` once the SET is verified and its event stored in the inbox (or acknowledged: an event
type we do not act on, a subject we do not know); ``400`` with RFC 8935's ``err`` and
``description`` otherwise, nothing stored; ``503`` with ``Retry-After`` when the transmitter's
keys or the token store cannot be had now, so the transmitter sends it again.

Must not import ``producer.api``, the other routers or ``tasks``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Final

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tokenwarden.producer import intake
from tokenwarden.producer.app_state import Shared, log
from tokenwarden.producer.intake import Refused, mask
from tokenwarden.producer.key_cache import KeysUnavailable, keys_unavailable
from tokenwarden.producer.routes.responses import RETRY_AFTER
from tokenwarden.producer.schemas import Problem
from tokenwarden.producer.ssf.verify import SetRefused, verify_set
from tokenwarden.worker.domain import clock

MEDIA_TYPE: Final = "application/secevent+jwt"
# A SET is a few kilobytes; a body this large is not one.
MAX_SET_BYTES: Final = 64 * 1024

_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    202: {"description": "Verified; its event stored in the inbox, or acknowledged."},
    400: {
        "description": "RFC 8935 error: {err, description}; err is invalid_request, "
        "invalid_key, invalid_issuer, invalid_audience or authentication_failed.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"err": {"type": "string"}, "description": {"type": "string"}},
                }
            }
        },
    },
    409: {"model": Problem, "description": "The jti was already used for another event."},
    503: {
        "model": Problem,
        "description": "The transmitter's keys or the token store are unavailable.",
        "headers": RETRY_AFTER,
    },
}

router = APIRouter(tags=["shared signals"])


async def _read(request: Request) -> bytes:
    media_type = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    if media_type != MEDIA_TYPE:
        raise SetRefused("invalid_request", f"send one SET as {MEDIA_TYPE}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_SET_BYTES:
        raise SetRefused("invalid_request", f"a SET is at most {MAX_SET_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_SET_BYTES:
            raise SetRefused("invalid_request", f"a SET is at most {MAX_SET_BYTES} bytes")
    return bytes(body)


@router.post(
    "/v1/ssf/events",
    status_code=202,
    response_class=Response,
    responses=_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {MEDIA_TYPE: {"schema": {"type": "string"}}},
            "description": "One signed Security Event Token (RFC 8417), compact JWS.",
        }
    },
    summary="Shared Signals push delivery (RFC 8935)",
)
async def ssf_events(request: Request, shared: Shared) -> Response:
    """Verify the SET, map it onto our events, store that in the inbox."""
    receiver = shared.ssf
    try:
        token = await _read(request)
        verified = await verify_set(
            token,
            receiver.transmitters,
            now=clock.now(),
            max_skew=timedelta(seconds=shared.settings.max_clock_skew_s),
        )
    except SetRefused as refused:
        log.info("ssf.refused", err=refused.err, reason=refused.description)
        return JSONResponse({"err": refused.err, "description": refused.description}, 400)
    except KeysUnavailable as error:
        raise keys_unavailable(error, "the transmitter's") from None
    outcome = await shared.guarded(receiver.settle, shared.engine(), verified)
    if outcome.event is not None:
        try:
            prepared = intake.prepare_one(outcome.event)
        except Refused as refused:  # a jti the inbox cannot take (shaped like a token, say)
            log.info("ssf.refused", err="invalid_request", reason=refused.detail)
            return JSONResponse(
                {
                    "err": "invalid_request",
                    "description": f"the SET cannot be stored: {refused.detail}",
                },
                400,
            )
        await shared.store_prepared(prepared)
    receiver.outcomes.labels(outcome.outcome).inc()
    log.info(
        "ssf.received",
        issuer=verified.issuer,
        jti=mask(verified.jti),
        event_type=verified.event_type,
        outcome=outcome.outcome,
    )
    return Response(status_code=202)
