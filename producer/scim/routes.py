"""``/scim/v2``: Users, Groups and the discovery endpoints, behind ``TOKENWARDEN_SCIM_TOKENS``.

A write is committed with the events it causes (producer/scim/store.py) before it is
answered; their ids are then published like ``POST /v1/events``'s (a broker that is down
leaves them to the re-drive). Every refusal is a SCIM error (producer/scim/errors.py).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from scim2_models import Context, Group
from sqlalchemy import Select, false, func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from tokenwarden.config.settings import Settings
from tokenwarden.producer.app_state import log, state_of
from tokenwarden.producer.scim import resources
from tokenwarden.producer.scim.errors import MEDIA_TYPE, ScimError, not_found
from tokenwarden.producer.scim.store import Outcome, ScimStore
from tokenwarden.worker.domain import clock
from tokenwarden.worker.domain.db import reader, transaction
from tokenwarden.worker.domain.models import ScimGroup, ScimUser

PREFIX: Final = "/scim/v2"
MAX_BODY: Final = 1024 * 1024  # Okta and Entra send a few KiB; a group of 10,000 fits
T = TypeVar("T")
Handler = Callable[[Request], Awaitable[Response]]
_DISCOVERY: Final = (
    "/ServiceProviderConfig",
    "/Schemas",
    "/Schemas/{id}",
    "/ResourceTypes",
    "/ResourceTypes/{id}",
)


def scim_json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def _created(body: dict[str, Any]) -> Response:
    return scim_json(body, 201, {"Location": body["meta"]["location"]})


def _authenticate(request: Request, tokens: tuple[str, ...]) -> None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given.strip().encode(), token.encode())
    if not tokens:
        raise ScimError(401, "no SCIM token is configured: set TOKENWARDEN_SCIM_TOKENS")
    if scheme.lower() != "bearer" or not matched:
        challenge = {"WWW-Authenticate": 'Bearer realm="tokenwarden SCIM"'}
        raise ScimError(401, "send a SCIM token as 'Authorization: Bearer TOKEN'", None, challenge)


async def _body(request: Request) -> Any:
    declared = request.headers.get("content-length")
    too_large = ScimError(413, f"the body is over {MAX_BODY} bytes", "tooLarge")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise too_large
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise too_large
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        raise ScimError(400, "the body is not valid JSON", "invalidSyntax") from None
    _storable(body)
    return body


def _storable(value: Any) -> None:
    """Refuse text the token store cannot keep: a NUL character, a lone surrogate."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str) and ("\x00" in item or not item.isprintable()):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ScimError(400, "strings must be valid Unicode", "invalidValue") from None
            if "\x00" in item:
                raise ScimError(400, "strings cannot contain NUL characters", "invalidValue")


def _guarded(settings: Settings, handler: Handler) -> Handler:
    """``handler`` behind the SCIM token, its refusals and store failures as SCIM errors."""

    async def answer(request: Request) -> Response:
        try:
            _authenticate(request, settings.scim_tokens)
            return await handler(request)
        except ScimError as error:
            return error.response()
        except IntegrityError:
            # Two requests creating the same name at once: the loser is told, nothing stored.
            taken = "a resource with that name already exists"
            return ScimError(409, taken, "uniqueness").response()
        except SQLAlchemyError as error:
            log.warning("scim.unavailable", kind=type(error).__name__)
            retry = {"Retry-After": "5"}
            return ScimError(503, "the token store is unavailable", None, retry).response()

    return answer


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + PREFIX


async def _write(request: Request, work: Callable[[ScimStore], T]) -> T:
    """``work`` on a store in one transaction with the events it causes; then publish them."""
    shared = state_of(request)
    group_map = shared.settings.scim_groups

    def run() -> tuple[T, Outcome]:
        with transaction(shared.engine()) as session:
            store = ScimStore(session, group_map, clock.now())
            result = work(store)
            store.commit_events()
            return result, store.outcome

    result, outcome = await run_in_threadpool(run)
    if outcome.events:
        await shared.publish(outcome.events, outcome.stored)
    return result


async def _read(request: Request, work: Callable[[ScimStore], T]) -> T:
    shared = state_of(request)

    def run() -> T:
        with transaction(reader(shared.engine())) as session:
            return work(ScimStore(session, shared.settings.scim_groups, clock.now()))

    return await run_in_threadpool(run)


# --- users ------------------------------------------------------------------------------


def _user_answer(store: ScimStore, user: ScimUser, base: str) -> dict[str, Any]:
    return resources.user_body(user, base, store.groups_of([user.id])[user.id])


def _found_user(store: ScimStore, scim_id: str, *, lock: bool = False) -> ScimUser:
    user = store.user(scim_id, lock=lock) if resources.stored_id(scim_id) else None
    if user is None:
        raise not_found("user", scim_id)
    return user


async def create_user(request: Request) -> Response:
    resource = resources.user_resource(await _body(request), Context.RESOURCE_CREATION_REQUEST)
    base = _base(request)

    def work(store: ScimStore) -> dict[str, Any]:
        return _user_answer(store, store.add_user(resource), base)

    return _created(await _write(request, work))


async def get_user(request: Request) -> Response:
    scim_id, base = request.path_params["id"], _base(request)
    body = await _read(request, lambda s: _user_answer(s, _found_user(s, scim_id), base))
    return scim_json(_projected(request, body))


async def replace_user(request: Request) -> Response:
    resource = resources.user_resource(await _body(request), Context.RESOURCE_REPLACEMENT_REQUEST)
    scim_id, base = request.path_params["id"], _base(request)

    def work(store: ScimStore) -> dict[str, Any]:
        user = _found_user(store, scim_id, lock=True)
        store.replace_user(user, resource)
        return _user_answer(store, user, base)

    return scim_json(await _write(request, work))


async def patch_user(request: Request) -> Response:
    patch = await _body(request)
    scim_id, base = request.path_params["id"], _base(request)

    def work(store: ScimStore) -> dict[str, Any]:
        user = _found_user(store, scim_id, lock=True)
        store.replace_user(user, resources.patch_user(user, patch))
        return _user_answer(store, user, base)

    return scim_json(_projected(request, await _write(request, work)))


async def delete_user(request: Request) -> Response:
    scim_id = request.path_params["id"]
    await _write(request, lambda s: s.delete_user(_found_user(s, scim_id, lock=True)))
    return Response(status_code=204)


async def list_users(request: Request) -> Response:
    terms = resources.filter_terms(
        request.query_params.get("filter"), resources.UserModel, resources.USER_FILTERS
    )
    start, count = _paging(request)
    base = _base(request)

    def work(store: ScimStore) -> dict[str, Any]:
        query = _where(select(ScimUser), ScimUser, terms)
        total, page = _page(store, query, start, count)
        groups = store.groups_of([user.id for user in page])
        found = [resources.user_body(user, base, groups[user.id]) for user in page]
        return resources.list_body([_projected(request, b) for b in found], total, start)

    return scim_json(await _read(request, work))


# --- groups -----------------------------------------------------------------------------


def _group_answer(store: ScimStore, group: ScimGroup, base: str) -> dict[str, Any]:
    return resources.group_body(group, base, store.members(group.id))


def _found_group(store: ScimStore, group_id: str, *, lock: bool = False) -> ScimGroup:
    group = store.group(group_id, lock=lock) if resources.stored_id(group_id) else None
    if group is None:
        raise not_found("group", group_id)
    return group


async def create_group(request: Request) -> Response:
    parts = resources.group_parts(await _body(request), Context.RESOURCE_CREATION_REQUEST)
    base = _base(request)

    def work(store: ScimStore) -> dict[str, Any]:
        return _group_answer(store, store.add_group(*parts), base)

    return _created(await _write(request, work))


async def get_group(request: Request) -> Response:
    group_id, base = request.path_params["id"], _base(request)
    body = await _read(request, lambda s: _group_answer(s, _found_group(s, group_id), base))
    return scim_json(_projected(request, body))


async def replace_group(request: Request) -> Response:
    parts = resources.group_parts(await _body(request), Context.RESOURCE_REPLACEMENT_REQUEST)
    group_id, base = request.path_params["id"], _base(request)

    def work(store: ScimStore) -> dict[str, Any]:
        group = _found_group(store, group_id, lock=True)
        store.replace_group(group, *parts)
        return _group_answer(store, group, base)

    return scim_json(_projected(request, await _write(request, work)))


async def patch_group(request: Request) -> Response:
    patch = await _body(request)
    group_id, base = request.path_params["id"], _base(request)

    def work(store: ScimStore) -> dict[str, Any]:
        group = _found_group(store, group_id, lock=True)
        parts = resources.patch_group(group, store.members(group.id), patch)
        store.replace_group(group, *parts)
        return _group_answer(store, group, base)

    return scim_json(_projected(request, await _write(request, work)))


async def delete_group(request: Request) -> Response:
    group_id = request.path_params["id"]
    await _write(request, lambda s: s.delete_group(_found_group(s, group_id, lock=True)))
    return Response(status_code=204)


async def list_groups(request: Request) -> Response:
    terms = resources.filter_terms(
        request.query_params.get("filter"), Group, resources.GROUP_FILTERS
    )
    start, count = _paging(request)
    base = _base(request)

    def work(store: ScimStore) -> dict[str, Any]:
        query = _where(select(ScimGroup), ScimGroup, terms)
        total, page = _page(store, query, start, count)
        found = [_group_answer(store, group, base) for group in page]
        return resources.list_body([_projected(request, b) for b in found], total, start)

    return scim_json(await _read(request, work))


# --- shared -----------------------------------------------------------------------------


def _projected(request: Request, body: dict[str, Any]) -> dict[str, Any]:
    params = request.query_params
    return resources.projected(body, params.get("attributes"), params.get("excludedAttributes"))


def _paging(request: Request) -> tuple[int, int]:
    params = request.query_params
    return resources.paging(params.get("startIndex"), params.get("count"))


def _where(query: Select[Any], model: Any, terms: dict[str, Any] | None) -> Select[Any]:
    if terms is None:
        return query.where(false())
    for column, value in terms.items():
        query = query.where(getattr(model, column) == value)
    return query


def _page(store: ScimStore, query: Select[Any], start: int, count: int) -> tuple[int, list[Any]]:
    total = store.session.scalar(select(func.count()).select_from(query.subquery())) or 0
    entity = query.column_descriptions[0]["entity"]
    ordered = query.order_by(entity.created_at, entity.id).offset(start - 1).limit(count)
    return int(total), list(store.session.scalars(ordered)) if count else []


# --- discovery --------------------------------------------------------------------------


async def service_provider_config(request: Request) -> Response:
    return scim_json(resources.service_provider_config(_base(request)))


def _listing(make: Callable[[str], list[dict[str, Any]]], kind: str) -> tuple[Handler, Handler]:
    async def every(request: Request) -> Response:
        found = make(_base(request))
        return scim_json(resources.list_body(found, len(found), 1))

    async def one(request: Request) -> Response:
        wanted = request.path_params["id"]
        for body in make(_base(request)):
            if body["id"] == wanted:
                return scim_json(body)
        raise not_found(kind, wanted)

    return every, one


async def unknown(request: Request) -> Response:
    raise ScimError(404, f"no such SCIM endpoint: {request.url.path[:120]}")


async def read_only(request: Request) -> Response:
    raise ScimError(405, f"{request.method} is not allowed here", None, {"Allow": "GET"})


def router(settings: Settings) -> APIRouter:
    """The SCIM endpoints under ``/scim/v2``."""
    schemas, schema = _listing(resources.schemas, "schema")
    types, one_type = _listing(resources.resource_types, "resource type")
    routes: list[tuple[str, Handler, list[str]]] = [
        ("/Users", list_users, ["GET"]),
        ("/Users", create_user, ["POST"]),
        ("/Users/{id}", get_user, ["GET"]),
        ("/Users/{id}", replace_user, ["PUT"]),
        ("/Users/{id}", patch_user, ["PATCH"]),
        ("/Users/{id}", delete_user, ["DELETE"]),
        ("/Groups", list_groups, ["GET"]),
        ("/Groups", create_group, ["POST"]),
        ("/Groups/{id}", get_group, ["GET"]),
        ("/Groups/{id}", replace_group, ["PUT"]),
        ("/Groups/{id}", patch_group, ["PATCH"]),
        ("/Groups/{id}", delete_group, ["DELETE"]),
        ("/ServiceProviderConfig", service_provider_config, ["GET"]),
        ("/Schemas", schemas, ["GET"]),
        ("/Schemas/{id}", schema, ["GET"]),
        ("/ResourceTypes", types, ["GET"]),
        ("/ResourceTypes/{id}", one_type, ["GET"]),
        *[(path, read_only, ["POST", "PUT", "PATCH", "DELETE"]) for path in _DISCOVERY],
        ("/{rest:path}", unknown, ["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]
    scim = APIRouter()
    for path, handler, methods in routes:
        scim.add_route(PREFIX + path, _guarded(settings, handler), methods=methods)
    return scim
