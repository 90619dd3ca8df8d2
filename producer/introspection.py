"""``POST /v1/introspect``: OAuth 2.0 Token Introspection (RFC 7662) for resource servers.

A caller authenticates with a key of ``TOKENWARDEN_INTROSPECTION_KEYS`` (``Bearer``; never a
producer key) and sends ``token=…`` (optionally ``token_type_hint=…``) form-encoded, or the
same as a JSON object. An active token answers its claims; anything else answers exactly
``{"active": false}``, whatever the reason, which goes to the log and the audit trail only.
No key, or a wrong one: ``401`` with ``WWW-Authenticate: Bearer`` before the body is read. A
body over :data:`MAX_BODY_BYTES`: ``413``. The check itself is producer/token_check.py, shared
with any other door that must tell whether a token is usable.

Must not import the tasks.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import parse_qs

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tokenwarden.config.redaction import first_line, mask_tokens
from tokenwarden.config.settings import Settings
from tokenwarden.producer.token_check import TokenCheck
from tokenwarden.worker.domain.introspection import INACTIVE

log = structlog.get_logger(__name__)

PATH: Final = "/v1/introspect"
SCHEME: Final = "introspectionKey"
SECURITY_SCHEME: Final = {
    "type": "http",
    "scheme": "bearer",
    "description": "An introspection key from TOKENWARDEN_INTROSPECTION_KEYS.",
}
MAX_BODY_BYTES: Final = 16 * 1024
RETRY_AFTER_S: Final = 5
FORM: Final = "application/x-www-form-urlencoded"
# Form fields read at most: RFC 7662 defines two.
MAX_FIELDS: Final = 10
# RFC 7662 §2.2: answers about tokens are not to be kept by anyone in between.
_NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_UNAUTHORIZED: Final = {"WWW-Authenticate": "Bearer", **_NO_STORE}
_INACTIVE_BODY: Final = json.dumps(INACTIVE, separators=(",", ":")).encode()

_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "description": 'The token\'s claims when it is active, else exactly {"active": false}.',
        "content": {
            "application/json": {
                "examples": {
                    "personal": {
                        "value": {
                            "active": True,
                            "token_type": "personal_access_token",
                            "sub": "u-42",
                            "org_id": "acme",
                            "role": "user",
                            "exp": 1814400000,
                            "iat": 1795000000,
                            "jti": "tok_3f2a",
                        }
                    },
                    "inactive": {"value": INACTIVE},
                }
            }
        },
    },
    400: {"description": "No token in the body (RFC 6749 invalid_request)."},
    401: {"description": "No valid introspection key.", "headers": {"WWW-Authenticate": {}}},
    413: {"description": f"The body is larger than {MAX_BODY_BYTES} bytes."},
    415: {"description": "Neither form-encoded nor JSON."},
    503: {"description": "The token store cannot be read now; retry after Retry-After."},
}
_REQUEST_BODY: Final[dict[str, Any]] = {
    "required": True,
    "content": {
        media: {
            "schema": {
                "type": "object",
                "required": ["token"],
                "properties": {
                    "token": {"type": "string"},
                    "token_type_hint": {"type": "string"},
                },
            }
        }
        for media in (FORM, "application/json")
    },
}


class _Refusal(Exception):
    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        super().__init__(status)
        self.response = JSONResponse(body, status_code=status, headers=headers)


def router(settings: Settings, check: TokenCheck) -> APIRouter:
    """The introspection door over the app's one token check (producer/doors.py)."""
    keys = tuple(key.encode() for key in settings.introspection_keys)
    doors = APIRouter()

    async def introspect(request: Request) -> Response:
        """RFC 7662: the token's claims if it is active, else exactly {"active": false}."""
        try:
            _authenticate(request.headers.get("authorization"), keys)
            text = _token(request.headers.get("content-type"), await _read(request))
            answer = await check.check(text)
        except _Refusal as refusal:
            return refusal.response
        except Exception as error:
            # Never an answer about the token: "active" here could only be a guess.
            log.warning(
                "introspection.unavailable", error=mask_tokens(first_line(error, typed=True))
            )
            return JSONResponse(
                {"detail": "the token store cannot be read now"},
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER_S), **_NO_STORE},
            )
        if not answer.active:
            return Response(_INACTIVE_BODY, media_type="application/json", headers=_NO_STORE)
        return JSONResponse(answer.claims, headers=_NO_STORE)

    doors.add_api_route(
        PATH,
        introspect,
        methods=["POST"],
        responses=_RESPONSES,
        openapi_extra={"requestBody": _REQUEST_BODY, "security": [{SCHEME: []}]},
        summary="Token introspection (RFC 7662)",
        tags=["introspection"],
    )
    return doors


def _authenticate(authorization: str | None, keys: Sequence[bytes]) -> None:
    """Accept ``Bearer <key>`` of a known key, compared with every key in constant time."""
    scheme, _, given = (authorization or "").partition(" ")
    presented = given.strip().encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key)
    if scheme.lower() == "bearer" and matched:
        return
    detail = (
        "send an introspection key as 'Authorization: Bearer KEY'"
        if keys
        else "no introspection key is configured: set TOKENWARDEN_INTROSPECTION_KEYS"
    )
    raise _Refusal(401, {"detail": detail}, _UNAUTHORIZED)


async def _read(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
    return bytes(body)


def _too_large() -> _Refusal:
    return _Refusal(413, {"detail": f"the body is larger than {MAX_BODY_BYTES} bytes"}, _NO_STORE)


def _token(content_type: str | None, body: bytes) -> str:
    """The ``token`` parameter of a form-encoded or JSON body."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    value: Any = None
    try:
        if media_type == FORM:
            fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=MAX_FIELDS)
            value = fields.get("token", [None])[0]
        elif media_type == "application/json" or media_type.endswith("+json"):
            document = json.loads(body)
            value = document.get("token") if isinstance(document, dict) else None
        else:
            raise _Refusal(
                415, {"detail": f"send the token as {FORM} or application/json"}, _NO_STORE
            )
    except (ValueError, RecursionError):
        value = None  # not a form or not JSON: no token in it
    if not isinstance(value, str) or not value:
        raise _Refusal(
            400,
            {"error": "invalid_request", "error_description": "the body carries no token"},
            _NO_STORE,
        )
    return value
