"""SCIM resources in and out: bodies checked, filters read and PATCH applied by scim2-models.

What real identity providers send is taken as they send it: Entra's ``"Replace"``/``"Add"``
operations and ``"False"``/``"True"`` strings (scim2-models reads both), Entra's removal of
group members with ``path: "members"`` and the members as ``value`` (turned into one filtered
removal per member, which is what the RFC spells), Okta's operations without a ``path`` whose
value is an object.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

from pydantic import ValidationError
from scim2_models import (
    AuthenticationScheme,
    Bulk,
    ChangePassword,
    Context,
    EnterpriseUser,
    ETag,
    Filter,
    Group,
    Patch,
    PatchOp,
    ResourceType,
    SCIMException,
    ScimFilter,
    ServiceProviderConfig,
    Sort,
    User,
)
from scim2_models.path import AttrPath, CompareOperator, Comparison, LogicalExpr, LogicalOperator

from tokenwarden.producer.scim.errors import ScimError, invalid
from tokenwarden.worker.domain.models import ScimGroup, ScimUser

UserModel: Final = User[EnterpriseUser]
ENTERPRISE: Final = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
MAX_RESULTS: Final = 1000
MAX_EXTERNAL_ID: Final = 300  # the column's width
# Kept out of the store and of every answer: a password is never returned (RFC 7643 §4.1.1)
# and tokenwarden has no use for one; groups are computed from the memberships.
_NOT_STORED: Final = ("password", "groups", "id", "meta")
_DUMP: Final[dict[str, Any]] = {"mode": "json", "by_alias": True, "exclude_none": True}
# Filterable attributes (case-insensitive) and the column each compares with.
USER_FILTERS: Final = {"username": "user_name_key", "externalid": "external_id", "id": "id"}
GROUP_FILTERS: Final = {"displayname": "display_name_key", "externalid": "external_id", "id": "id"}


def _validated(model: Any, body: Any, context: Context, what: str) -> Any:
    if not isinstance(body, dict):
        raise ScimError(400, f"invalid {what}: the body must be a JSON object", "invalidSyntax")
    try:
        return model.model_validate(body, scim_ctx=context)
    except (ValidationError, SCIMException, ValueError, TypeError) as error:
        raise invalid(error, what=what) from None


def _with_manager_ref(body: Any) -> Any:
    """A manager as Entra sends it, ``{"value": id}``, with the ``$ref`` scim2-models requires."""
    extension = body.get(ENTERPRISE) if isinstance(body, dict) else None
    if not isinstance(extension, dict):
        return body
    manager = extension.get("manager")
    if (
        isinstance(manager, dict)
        and isinstance(manager.get("value"), str)
        and not manager.get("$ref")
    ):
        manager = {**manager, "$ref": f"../Users/{manager['value']}"}
        return {**body, ENTERPRISE: {**extension, "manager": manager}}
    return body


def user_resource(body: Any, context: Context) -> dict[str, Any]:
    """The user as stored: what the client sent that SCIM defines, checked."""
    user = _validated(UserModel, _with_manager_ref(body), context, "user")
    resource: dict[str, Any] = user.model_dump(**_DUMP)
    for name in _NOT_STORED:
        resource.pop(name, None)
    _external_id(resource.get("externalId"))
    return resource


def _external_id(value: str | None) -> str | None:
    if value is not None and len(value) > MAX_EXTERNAL_ID:
        detail = f"externalId: at most {MAX_EXTERNAL_ID} characters"
        raise ScimError(400, detail, "invalidValue")
    return value


def group_parts(body: Any, context: Context) -> tuple[str, str | None, list[str]]:
    """(displayName, externalId, member ids) of a group body."""
    group = _validated(Group, body, context, "group")
    return _group_fields(group)


def _group_fields(group: Group) -> tuple[str, str | None, list[str]]:
    name = group.display_name
    if not isinstance(name, str) or not name.strip() or len(name) > 300:
        raise ScimError(400, "displayName: required, at most 300 characters", "invalidValue")
    members: list[str] = []
    for member in group.members or []:
        if not member.value:
            raise ScimError(400, "members: each member needs a value", "invalidValue")
        if member.type is not None and str(member.type).lower() != "user":
            raise ScimError(400, "members: only users can be members", "invalidValue")
        members.append(member.value)
    return name, _external_id(group.external_id), list(dict.fromkeys(members))


def _meta(kind: str, location: str, created: datetime, modified: datetime) -> dict[str, Any]:
    return {
        "resourceType": kind,
        "created": created.isoformat(),
        "lastModified": modified.isoformat(),
        "location": location,
    }


def user_body(user: ScimUser, base: str, groups: list[tuple[str, str]]) -> dict[str, Any]:
    body = {**user.resource, "id": user.id, "userName": user.user_name}
    if "active" in user.resource or not user.active:  # absent means active (store.py)
        body["active"] = user.active
    if groups:
        body["groups"] = [
            {"value": gid, "display": name, "$ref": f"{base}/Groups/{gid}"} for gid, name in groups
        ]
    body["meta"] = _meta("User", f"{base}/Users/{user.id}", user.created_at, user.updated_at)
    return body


def group_body(group: ScimGroup, base: str, members: list[tuple[str, str]]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
        "id": group.id,
        "displayName": group.display_name,
        "members": [
            {"value": uid, "display": name, "$ref": f"{base}/Users/{uid}", "type": "User"}
            for uid, name in members
        ],
    }
    if group.external_id is not None:
        body["externalId"] = group.external_id
    location = f"{base}/Groups/{group.id}"
    body["meta"] = _meta("Group", location, group.created_at, group.updated_at)
    return body


# --- PATCH ------------------------------------------------------------------------------


def _operations(body: Any) -> Any:
    """Entra's removal of members by value, as the RFC spells it: one filtered path each."""
    if not isinstance(body, dict) or not isinstance(body.get("Operations"), list):
        return body
    operations: list[Any] = []
    for operation in body["Operations"]:
        if (
            isinstance(operation, dict)
            and str(operation.get("op", "")).lower() == "remove"
            and str(operation.get("path", "")).lower() == "members"
            and isinstance(operation.get("value"), list)
        ):
            for member in operation["value"]:
                value = member.get("value") if isinstance(member, dict) else None
                if not isinstance(value, str):
                    raise ScimError(400, "members: each member needs a value", "invalidValue")
                path = f"members[value eq {ScimFilter.quote(value)}]"
                operations.append({"op": "remove", "path": path})
        else:
            operations.append(operation)
    return {**body, "Operations": operations}


def _patched(model: Any, current: Any, body: Any) -> Any:
    patch = _validated(PatchOp[model], _operations(body), Context.RESOURCE_PATCH_REQUEST, "patch")
    try:
        patch.patch(current)
    except (ValidationError, SCIMException, ValueError, TypeError, KeyError) as error:
        raise invalid(error, what="patch") from None
    return current


# Entra's way to set one typed value of a multi-valued attribute, e.g.
# phoneNumbers[type eq "mobile"].value, also when the user has no value of that type yet.
_TYPED_VALUE: Final = re.compile(r'^(\w+)\[type eq "([^"\\]*)"\]\.(\w+)$', re.IGNORECASE)


def _entra_user_operations(resource: dict[str, Any], body: Any) -> Any:
    """Entra's user PATCHes as the RFC spells them: a typed value the user lacks is added
    (Entra expects it created), a manager sent as a bare id is ``{"value": id}``."""
    if not isinstance(body, dict) or not isinstance(body.get("Operations"), list):
        return body
    operations = [
        _entra_operation(resource, operation)
        if isinstance(operation, dict)
        and str(operation.get("op", "")).lower() in ("add", "replace")
        else operation
        for operation in body["Operations"]
    ]
    return {**body, "Operations": operations}


def _entra_operation(resource: dict[str, Any], operation: dict[str, Any]) -> dict[str, Any]:
    path, value = str(operation.get("path") or ""), operation.get("value")
    if path.lower().endswith(":manager") and isinstance(value, str):
        return {**operation, "value": {"value": value, "$ref": f"../Users/{value}"}}
    typed = _TYPED_VALUE.match(path)
    if typed is None:
        return operation
    attribute, kind, sub = typed.groups()
    present = next((v for k, v in resource.items() if k.lower() == attribute.lower()), None)
    if any(isinstance(i, dict) and i.get("type") == kind for i in present or []):
        return operation
    return {"op": "add", "path": attribute, "value": [{"type": kind, sub: value}]}


def patch_user(user: ScimUser, body: Any) -> dict[str, Any]:
    current = UserModel.model_validate({**user.resource, "id": user.id})
    patched = _patched(UserModel, current, _entra_user_operations(user.resource, body))
    # Checked again as a whole, as a replacement would be.
    return user_resource(patched.model_dump(**_DUMP), Context.RESOURCE_REPLACEMENT_REQUEST)


def patch_group(
    group: ScimGroup, members: list[tuple[str, str]], body: Any
) -> tuple[str, str | None, list[str]]:
    current = Group.model_validate(
        {
            "id": group.id,
            "displayName": group.display_name,
            "externalId": group.external_id,
            "members": [{"value": uid} for uid, _ in members] or None,
        }
    )
    return _group_fields(_patched(Group, current, body))


# --- queries ----------------------------------------------------------------------------


def filter_terms(text: str | None, model: Any, columns: dict[str, str]) -> dict[str, Any] | None:
    """column -> value of a filter of ``eq`` comparisons joined by ``and``, None when nothing
    can match; else a 400."""
    if not text:
        return {}
    try:
        node = ScimFilter[model](text).ast
    except (SCIMException, ValueError, ValidationError) as error:
        raise ScimError(400, f"filter: {error}", "invalidFilter") from None
    terms: dict[str, Any] = {}
    pending = [node]
    while pending:
        node = pending.pop()
        if isinstance(node, LogicalExpr) and node.op == LogicalOperator.and_:
            pending.extend(node.terms)
            continue
        if not (isinstance(node, Comparison) and node.op == CompareOperator.eq):
            raise ScimError(400, "filter: only 'eq' comparisons joined by 'and'", "invalidFilter")
        column = _column(node.attr_path, columns)
        value = node.value
        if not isinstance(value, str):
            raise ScimError(400, "filter: compare with a string", "invalidFilter")
        value = value.casefold() if column.endswith("_key") else value
        if terms.get(column, value) != value or not _storable_text(value):
            return None  # two different values, or one no row can hold: nothing matches
        terms[column] = value
    return terms


def _storable_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


def stored_id(value: str) -> bool:
    """Whether ``value`` can be an id this service gave (a UUID)."""
    return _UUID.fullmatch(value) is not None


_UUID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.ASCII)


def _column(path: AttrPath, columns: dict[str, str]) -> str:
    name = path.attr.rpartition(":")[2].lower()
    if path.sub_attr is not None or name not in columns:
        raise ScimError(400, f"filter: cannot filter on {str(path)[:80]!r}", "invalidFilter")
    return columns[name]


def paging(start_index: str | None, count: str | None) -> tuple[int, int]:
    """(1-based start, count) from the query, as RFC 7644 §3.4.2.4 reads them."""
    try:
        start = int(start_index) if start_index else 1
        size = int(count) if count else 100
    except ValueError:
        raise ScimError(400, "startIndex and count must be integers", "invalidValue") from None
    # Past 2**31 there is nothing to find; a bigger number would overflow the database's.
    return min(max(start, 1), 2**31), min(max(size, 0), MAX_RESULTS)


def projected(body: dict[str, Any], attributes: str | None, excluded: str | None) -> dict[str, Any]:
    """``body`` with only ``attributes``, or without ``excludedAttributes`` (top level)."""
    always = {"id", "schemas", "meta"}
    if attributes:
        keep = {_top(name) for name in attributes.split(",")} | always
        return {k: v for k, v in body.items() if k.lower() in keep}
    if excluded:
        drop = {_top(name) for name in excluded.split(",")} - always
        return {k: v for k, v in body.items() if k.lower() not in drop}
    return body


def _top(name: str) -> str:
    return name.strip().rpartition(":")[2].split(".")[0].lower()


def list_body(resources: list[dict[str, Any]], total: int, start: int) -> dict[str, Any]:
    return {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
        "totalResults": total,
        "itemsPerPage": len(resources),
        "startIndex": start,
        "Resources": resources,
    }


# --- discovery --------------------------------------------------------------------------

_QUERY: Final[dict[str, Any]] = {**_DUMP, "scim_ctx": Context.RESOURCE_QUERY_RESPONSE}


def _with_meta(body: dict[str, Any], kind: str, location: str) -> dict[str, Any]:
    return {**body, "meta": {"resourceType": kind, "location": location}}


def service_provider_config(base: str) -> dict[str, Any]:
    config = ServiceProviderConfig(
        documentation_uri=None,
        patch=Patch(supported=True),
        bulk=Bulk(supported=False, max_operations=0, max_payload_size=0),
        filter=Filter(supported=True, max_results=MAX_RESULTS),
        change_password=ChangePassword(supported=False),
        sort=Sort(supported=False),
        etag=ETag(supported=False),
        authentication_schemes=[
            AuthenticationScheme(
                type="oauthbearertoken",
                name="Bearer token",
                description="A token of TOKENWARDEN_SCIM_TOKENS as 'Authorization: Bearer TOKEN'",
                primary=True,
            )
        ],
    )
    body = config.model_dump(**_QUERY)
    return _with_meta(body, "ServiceProviderConfig", f"{base}/ServiceProviderConfig")


def schemas(base: str) -> list[dict[str, Any]]:
    made: list[Callable[[], Any]] = [User.to_schema, EnterpriseUser.to_schema, Group.to_schema]
    found = []
    for make in made:
        body = make().model_dump(**_QUERY)
        found.append(_with_meta(body, "Schema", f"{base}/Schemas/{body['id']}"))
    return found


def resource_types(base: str) -> list[dict[str, Any]]:
    found = []
    for model in (UserModel, Group):
        body = ResourceType.from_resource(model).model_dump(**_QUERY)
        found.append(_with_meta(body, "ResourceType", f"{base}/ResourceTypes/{body['id']}"))
    return found
