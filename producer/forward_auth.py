"""``GET /v1/auth``: forward authentication for gateways (nginx ``auth_request``, Traefik
``forwardAuth``, Envoy's HTTP ``ext_authz``, Caddy ``forward_auth``).

The gateway asks before it passes a request on. The credential is read from the *original*
request in the five forms services accept (the ``x-auth-token`` header first, else the
original URI: ``?token=``, ``/TOKEN/api/v0/…``, ``/ext/bc/C/rpc/TOKEN``, the last segment).
That URI comes from ``X-Original-URI`` (nginx, as the README configures it) or
``X-Forwarded-Uri`` (Traefik, Caddy), else from this request's own path after ``/v1/auth``
(Envoy appends the original path to its ``path_prefix``). Two of them that disagree are
refused: a client must not choose the URI that is checked by adding a header its gateway
does not set.

A usable token answers ``200`` with ``X-Token-*`` headers for the gateway to copy upstream;
those that do not apply are sent empty, so a copy also overwrites any the client sent.
Everything else answers ``401`` with no body and no hint why: the reason goes to the log
(rate-limited), and for a known token to the audit trail, through producer/token_check.py.

Callers are trusted by key or by address: ``X-Tokenwarden-Key: <introspection key>``, or a
peer within ``TOKENWARDEN_FORWARD_AUTH_PEERS``. Not ``Authorization``: gateways forward the
client's own ``Authorization`` header to this door, where it means something else.

Must not import the tasks.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter
from starlette.datastructures import Headers

from tokenwarden.config.redaction import first_line, mask_tokens
from tokenwarden.config.settings import Network, Settings
from tokenwarden.producer.token_check import RefusalLimiter, TokenCheck
from tokenwarden.worker.domain.introspection import Introspection
from tokenwarden.worker.domain.models import TokenKind
from tokenwarden.worker.domain.tokens import HEADER_NAME, ExtractError, from_header, from_url

log = structlog.get_logger(__name__)

PATH: Final = "/v1/auth"
KEY_HEADER: Final = "x-tokenwarden-key"
SCHEME: Final = "gatewayKey"
SECURITY_SCHEME: Final = {
    "type": "apiKey",
    "in": "header",
    "name": "X-Tokenwarden-Key",
    "description": "An introspection key from TOKENWARDEN_INTROSPECTION_KEYS, set by the gateway.",
}
# nginx's (as configured in the README), then Traefik's and Caddy's.
URI_HEADERS: Final = ("x-original-uri", "x-forwarded-uri")
# Longer original URIs carry no token a service would accept: refused unread.
MAX_URI_CHARS: Final = 8 * 1024
# Whatever the original method was: gateways either keep it (Envoy) or send GET.
METHODS: Final = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
RETRY_AFTER_S: Final = 5
# from_url wants an absolute URL; the host plays no part in finding the token.
_BASE: Final = "http://gateway.invalid"
_NO_STORE: Final = {"Cache-Control": "no-store"}
UNTRUSTED: Final = "untrusted_caller"
NO_TOKEN: Final = "no_token"  # noqa: S105 - a reason, not a secret
UNAVAILABLE: Final = "unavailable"
IDENTITY_HEADERS: Final = (
    "X-Token-Id",
    "X-Token-Kind",
    "X-Token-Org",
    "X-Token-User",
    "X-Token-App",
    "X-Token-Role",
)

_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "description": "The token is usable; copy the X-Token-* headers upstream.",
        "headers": {name: {"schema": {"type": "string"}} for name in IDENTITY_HEADERS},
    },
    401: {"description": "No usable token, or the caller is not trusted (no hint which)."},
    503: {"description": "The token store cannot be read now."},
}


class Trust:
    """Which callers may ask: a known key in :data:`KEY_HEADER`, or a peer in a network."""

    def __init__(self, keys: Iterable[str], peers: Sequence[Network]) -> None:
        self._keys = tuple(key.encode() for key in keys)
        self._peers = tuple(peers)

    def allows(self, key: str | None, peer: str | None) -> bool:
        return self._known_peer(peer) or self._known_key(key)

    def _known_key(self, key: str | None) -> bool:
        presented = (key or "").strip().encode()
        matched = False
        for known in self._keys:  # every key compared, in constant time
            matched |= hmac.compare_digest(presented, known)
        return matched and bool(presented)

    def _known_peer(self, peer: str | None) -> bool:
        if not self._peers or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self._peers)


def router(settings: Settings, check: TokenCheck, *, registry: CollectorRegistry) -> APIRouter:
    """The forward-auth door over the app's one token check (producer/doors.py)."""
    trust = Trust(settings.introspection_keys, settings.forward_auth_peers)
    answers = Counter(
        "tokenwarden_forward_auth",
        "GET /v1/auth answers by result: active, or why the request was refused.",
        ["result"],
        registry=registry,
    )
    door = APIRouter()
    authorize = _endpoint(check, trust, answers)
    # One operation in the schema; the other methods and Envoy's paths answer the same.
    door.add_api_route(
        PATH,
        authorize,
        methods=["GET"],
        responses=_RESPONSES,
        summary="Forward authentication for gateways",
        tags=["forward-auth"],
        operation_id="forward_auth",
        # Or a peer in TOKENWARDEN_FORWARD_AUTH_PEERS, which a schema cannot say.
        openapi_extra={"security": [{SCHEME: []}]},
    )
    door.add_api_route(PATH, authorize, methods=METHODS[1:], include_in_schema=False)
    door.add_api_route(
        PATH + "/{original:path}", authorize, methods=METHODS, include_in_schema=False
    )
    return door


def _endpoint(check: TokenCheck, trust: Trust, answers: Counter) -> Callable[[Request], Any]:
    limiter = RefusalLimiter()

    def refuse(reason: str, peer: str | None) -> Response:
        answers.labels(reason).inc()
        if limiter.allow((peer or "-", reason)):
            log.info("forward_auth.refused", reason=reason, peer=peer)
        return Response(status_code=401, headers=_NO_STORE)

    async def authorize(request: Request) -> Response:
        """200 with X-Token-* headers if the original request's token is usable, else 401."""
        peer = request.client.host if request.client else None
        if not trust.allows(request.headers.get(KEY_HEADER), peer):
            return refuse(UNTRUSTED, peer)
        text = credential(request.headers, own_uri(request.scope))
        if text is None:
            return refuse(NO_TOKEN, peer)
        try:
            answer = await check.check(text)
        except Exception as error:
            answers.labels(UNAVAILABLE).inc()
            log.warning(
                "forward_auth.unavailable", error=mask_tokens(first_line(error, typed=True))
            )
            headers = {"Retry-After": str(RETRY_AFTER_S), **_NO_STORE}
            return Response(status_code=503, headers=headers)
        if not answer.active:
            # Logged and audited by the check, at most once a minute per token and reason.
            answers.labels(answer.reason or "refused").inc()
            return Response(status_code=401, headers=_NO_STORE)
        answers.labels("active").inc()
        return Response(status_code=200, headers=identity(answer) | _NO_STORE)

    return authorize


def identity(answer: Introspection) -> dict[str, str]:
    """The X-Token-* headers of a usable token; those that do not apply are empty."""
    claims = answer.claims
    personal = claims.get("token_type") == "personal_access_token"
    return {
        "X-Token-Id": str(claims["jti"]),
        "X-Token-Kind": TokenKind.PERSONAL if personal else TokenKind.APPLICATION,
        "X-Token-Org": str(claims["org_id"]),
        "X-Token-User": str(claims.get("sub") or "") if personal else "",
        "X-Token-App": "" if personal else str(claims.get("app_id") or ""),
        "X-Token-Role": str(claims.get("role") or "") if personal else "",
    }


def credential(headers: Headers, own: str) -> str | None:
    """The token of the original request in any of the five forms, or None."""
    header = headers.get(HEADER_NAME, "")
    if header.strip():
        return from_header(f"{HEADER_NAME}: {header}")
    uri = original_uri(headers, own)
    if uri is None:
        return None
    try:
        return from_url(uri)
    except ExtractError:
        return None


def original_uri(headers: Headers, own: str) -> str | None:
    """The original request's URI, absolute; None if absent, too long or contradicted."""
    given = {value for name in URI_HEADERS for value in headers.getlist(name)}
    if len(given) > 1:
        return None
    uri = given.pop() if given else own
    if len(uri) > MAX_URI_CHARS:
        return None
    if uri.startswith("/"):
        return _BASE + uri
    try:
        parts = urlsplit(uri)
    except ValueError:  # a host that cannot be read, e.g. "http://[abc/x"
        return None
    return uri if parts.scheme in ("http", "https") and parts.netloc else None


def own_uri(scope: Mapping[str, Any]) -> str:
    """This request's path after ``/v1/auth``, with its query: Envoy's original URI."""
    raw = scope.get("raw_path") or scope["path"].encode()
    path = raw.decode("latin-1")
    if not path.startswith(PATH):
        path = scope["path"]
    path = path[len(PATH) :] or "/"
    query = scope.get("query_string", b"").decode("latin-1")
    return f"{path}?{query}" if query else path
