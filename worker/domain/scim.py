"""What an identity provider's SCIM changes mean for tokenwarden: the events they cause.

A SCIM group grants a membership in an organization with a role, by an explicit map
(``TOKENWARDEN_SCIM_GROUPS``, display names compared case-insensitively); a group that is not
in the map is stored and grants nothing. A user's *grants* are the organizations that the
mapped groups they belong to give them, each with the strongest role (admin wins).

A SCIM write is judged by the user's standing before and after it (:class:`Standing`):

- active, then inactive or deleted: ``user.deactivated`` (every PAT of the user revoked);
- inactive or new, then active: ``membership.added`` for every grant (a re-join: no old PAT
  comes back, future joins work again);
- active both times: ``membership.removed`` for an organization no group grants any more,
  ``membership.added`` for a new one, ``membership.role_changed`` when the strongest role
  changed;
- inactive both times: nothing (the grants are joined when the user is active again).

The same standing before and after causes nothing, so a replayed request changes nothing.
It must not import Celery, kombu, httpx, FastAPI, Starlette or standardwebhooks, nor ``tasks``,
``producer`` or ``worker.runtime``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenwarden.worker.domain.models import Role

# Group display name (case-folded) -> (organization, role).
GroupMap = Mapping[str, tuple[str, str]]


@dataclass(frozen=True)
class Standing:
    """A user as far as tokenwarden cares: active or not, and the grants of their groups."""

    active: bool = False
    grants: Mapping[str, str] = field(default_factory=dict)  # org -> role
    email: str | None = None


def grants(group_names: Iterable[str], group_map: GroupMap) -> dict[str, str]:
    """The organizations that ``group_names`` grant, each with the strongest role."""
    granted: dict[str, str] = {}
    for name in group_names:
        mapped = group_map.get(name.casefold())
        if mapped is None:
            continue
        org, role = mapped
        if granted.get(org) != Role.ADMIN.value:
            granted[org] = role
    return granted


def effects(user_id: str, before: Standing, after: Standing) -> list[tuple[str, dict[str, Any]]]:
    """The events (type, data) that take ``user_id`` from ``before`` to ``after``."""
    if before.active and not after.active:
        return [("user.deactivated", {"user_id": user_id})]
    if not after.active:
        return []
    was = before.grants if before.active else {}
    changes: list[tuple[str, dict[str, Any]]] = []
    for org in sorted(set(was) - set(after.grants)):
        changes.append(("membership.removed", {"org_id": org, "user_id": user_id}))
    for org, role in sorted(after.grants.items()):
        if org not in was:
            joined = {"org_id": org, "user_id": user_id, "role": role, "email": after.email}
            changes.append(("membership.added", joined))
        elif was[org] != role:
            changed = {"org_id": org, "user_id": user_id, "role": role}
            changes.append(("membership.role_changed", changed))
    return changes
