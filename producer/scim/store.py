"""SCIM users and groups in the token store, and the events their changes cause.

Every write runs in one transaction with the events it causes (worker/domain/scim.py), which
go into the same inbox as ``POST /v1/events``: the SCIM answer is sent once both are
committed. The rows of the users a write touches are locked first (on Postgres), in id
order, so two writes about the same user take turns and each judges the user's standing as
the other left it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from tokenwarden.producer.scim.errors import ScimError
from tokenwarden.worker.domain import clock
from tokenwarden.worker.domain.events import CloudEvent
from tokenwarden.worker.domain.inbox import Stored, store_events
from tokenwarden.worker.domain.models import ScimGroup, ScimMember, ScimUser
from tokenwarden.worker.domain.scim import GroupMap, Standing, effects, grants

SOURCE: Final = "tokenwarden:scim"
MAX_NAME: Final = 200  # tokenwarden's user ids are at most this long
MAX_EMAIL: Final = 320


@dataclass
class Outcome:
    """What a write did: the events it caused (committed with it) and the inbox's answer."""

    events: list[CloudEvent] = field(default_factory=list)
    stored: Stored = field(default_factory=Stored)


@dataclass
class ScimStore:
    session: Session
    group_map: GroupMap
    now: datetime
    outcome: Outcome = field(default_factory=Outcome)

    # --- reading -----------------------------------------------------------------------

    def user(self, scim_id: str, *, lock: bool = False) -> ScimUser | None:
        query = select(ScimUser).where(ScimUser.id == scim_id)
        if lock:
            query = query.with_for_update()
        return self.session.scalars(query).first()

    def group(self, group_id: str, *, lock: bool = False) -> ScimGroup | None:
        query = select(ScimGroup).where(ScimGroup.id == group_id)
        if lock:
            query = query.with_for_update()
        return self.session.scalars(query).first()

    def members(self, group_id: str) -> list[tuple[str, str]]:
        """(SCIM id, userName) of the group's members, by userName."""
        rows = self.session.execute(
            select(ScimUser.id, ScimUser.user_name)
            .join(ScimMember, ScimMember.user_scim_id == ScimUser.id)
            .where(ScimMember.group_id == group_id)
            .order_by(ScimUser.user_name_key)
        )
        return [(row[0], row[1]) for row in rows]

    def groups_of(self, scim_ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
        """SCIM user id -> (group id, display name) of each group the user is in."""
        found: dict[str, list[tuple[str, str]]] = {scim_id: [] for scim_id in scim_ids}
        if not scim_ids:
            return found
        rows = self.session.execute(
            select(ScimMember.user_scim_id, ScimGroup.id, ScimGroup.display_name)
            .join(ScimGroup, ScimGroup.id == ScimMember.group_id)
            .where(ScimMember.user_scim_id.in_(list(scim_ids)))
            .order_by(ScimGroup.display_name_key)
        )
        for user, group_id, name in rows:
            found[user].append((group_id, name))
        return found

    def existing_users(self, scim_ids: Iterable[str]) -> set[str]:
        wanted = list(set(scim_ids))
        if not wanted:
            return set()
        rows = self.session.scalars(select(ScimUser.id).where(ScimUser.id.in_(wanted)))
        return set(rows)

    # --- writing with effects ----------------------------------------------------------

    def changing(self, scim_ids: Iterable[str], change: Callable[[], None]) -> None:
        """Run ``change`` and record the events it causes for the users ``scim_ids``."""
        ids = sorted(set(scim_ids))
        users = self._locked(ids)
        before = self._standings(users)
        user_ids = {user.id: user.user_id for user in users}
        change()
        self.session.flush()
        self.session.expire_all()
        now_users = self._locked(ids)
        after = self._standings(now_users)
        user_ids.update({user.id: user.user_id for user in now_users})
        for scim_id in ids:
            if scim_id not in user_ids:
                continue
            was, now = before.get(scim_id, Standing()), after.get(scim_id, Standing())
            for kind, data in effects(user_ids[scim_id], was, now):
                self.outcome.events.append(self._event(kind, data))

    def commit_events(self) -> None:
        """Put the events caused so far into the inbox, in this transaction."""
        if self.outcome.events:
            self.outcome.stored = store_events(self.session, self.outcome.events, now=self.now)

    def _locked(self, ids: list[str]) -> list[ScimUser]:
        if not ids:
            return []
        query = select(ScimUser).where(ScimUser.id.in_(ids)).order_by(ScimUser.id)
        return list(self.session.scalars(query.with_for_update()))

    def _standings(self, users: list[ScimUser]) -> dict[str, Standing]:
        groups = self.groups_of([user.id for user in users])
        return {
            user.id: Standing(
                active=user.active,
                grants=grants((name for _, name in groups[user.id]), self.group_map),
                email=email_of(user.resource),
            )
            for user in users
        }

    def _event(self, kind: str, data: dict[str, Any]) -> CloudEvent:
        body = {key: value for key, value in data.items() if value is not None}
        return CloudEvent.model_validate(
            {
                "specversion": "1.0",
                "id": f"scim-{uuid.uuid4()}",
                "source": SOURCE,
                "type": kind,
                # Taken now, with the users' rows locked: a write that waited for another
                # one's lock orders its events after the other's.
                "time": clock.now(),
                "data": body,
            }
        )

    # --- users -------------------------------------------------------------------------

    def add_user(self, resource: dict[str, Any]) -> ScimUser:
        user_name = _user_name(resource)
        self._unique_user_name(user_name, None)
        if self.session.scalars(select(ScimUser.id).where(ScimUser.user_id == user_name)).first():
            # Another user was created under this name and renamed since: it is still this
            # tokenwarden user, and two SCIM users must not share one.
            raise ScimError(409, f"userName {user_name!r} is still another user's id", "uniqueness")
        user = ScimUser(
            id=str(uuid.uuid4()),
            user_name=user_name,
            user_name_key=user_name.casefold(),
            external_id=resource.get("externalId"),
            user_id=user_name,
            active=bool(resource.get("active", True)),
            resource=resource,
            created_at=self.now,
            updated_at=self.now,
        )

        def insert() -> None:
            self.session.add(user)

        self.changing([user.id], insert)
        return user

    def replace_user(self, user: ScimUser, resource: dict[str, Any]) -> None:
        user_name = _user_name(resource)
        self._unique_user_name(user_name, user.id)

        def update() -> None:
            user.user_name, user.user_name_key = user_name, user_name.casefold()
            user.external_id = resource.get("externalId")
            user.active = bool(resource.get("active", True))
            if user.resource != resource:
                user.resource = resource
                user.updated_at = self.now

        self.changing([user.id], update)

    def delete_user(self, user: ScimUser) -> None:
        def remove() -> None:
            self.session.execute(delete(ScimMember).where(ScimMember.user_scim_id == user.id))
            self.session.delete(user)

        self.changing([user.id], remove)

    def _unique_user_name(self, user_name: str, own_id: str | None) -> None:
        query = select(ScimUser.id).where(ScimUser.user_name_key == user_name.casefold())
        other = self.session.scalars(query).first()
        if other is not None and other != own_id:
            raise ScimError(409, f"userName {user_name!r} is already taken", "uniqueness")

    # --- groups ------------------------------------------------------------------------

    def add_group(self, name: str, external_id: str | None, members: list[str]) -> ScimGroup:
        self._unique_display_name(name, None)
        self._known_members(members)
        group = ScimGroup(
            id=str(uuid.uuid4()),
            display_name=name,
            display_name_key=name.casefold(),
            external_id=external_id,
            created_at=self.now,
            updated_at=self.now,
        )

        def insert() -> None:
            self.session.add(group)
            self.session.flush()
            self.session.add_all(ScimMember(group_id=group.id, user_scim_id=m) for m in members)

        self.changing(members, insert)
        return group

    def replace_group(
        self, group: ScimGroup, name: str, external_id: str | None, members: list[str]
    ) -> None:
        self._unique_display_name(name, group.id)
        self._known_members(members)
        old = [member for member, _ in self.members(group.id)]

        def update() -> None:
            if (group.display_name, group.external_id, set(old)) != (
                name,
                external_id,
                set(members),
            ):
                group.updated_at = self.now
            group.display_name, group.display_name_key = name, name.casefold()
            group.external_id = external_id
            gone = set(old) - set(members)
            if gone:
                self.session.execute(
                    delete(ScimMember).where(
                        ScimMember.group_id == group.id, ScimMember.user_scim_id.in_(gone)
                    )
                )
            self.session.add_all(
                ScimMember(group_id=group.id, user_scim_id=m) for m in set(members) - set(old)
            )

        self.changing([*old, *members], update)

    def delete_group(self, group: ScimGroup) -> None:
        old = [member for member, _ in self.members(group.id)]

        def remove() -> None:
            self.session.execute(delete(ScimMember).where(ScimMember.group_id == group.id))
            self.session.delete(group)

        self.changing(old, remove)

    def _unique_display_name(self, name: str, own_id: str | None) -> None:
        query = select(ScimGroup.id).where(ScimGroup.display_name_key == name.casefold())
        other = self.session.scalars(query).first()
        if other is not None and other != own_id:
            raise ScimError(409, f"displayName {name!r} is already taken", "uniqueness")

    def _known_members(self, members: list[str]) -> None:
        unknown = sorted(set(members) - self.existing_users(members))
        if unknown:
            raise ScimError(400, f"members: no user with id {unknown[0][:80]!r}", "invalidValue")

    def count(self, model: type[ScimUser] | type[ScimGroup]) -> int:
        return int(self.session.scalar(select(func.count()).select_from(model)) or 0)


def _user_name(resource: dict[str, Any]) -> str:
    name = resource.get("userName")
    if not isinstance(name, str) or not name.strip():
        raise ScimError(400, "userName: required", "invalidValue")
    if len(name) > MAX_NAME or name != name.strip():
        raise ScimError(
            400, f"userName: at most {MAX_NAME} characters, no spaces around", "invalidValue"
        )
    return name


def email_of(resource: dict[str, Any]) -> str | None:
    """The primary email, else the first, else the userName when it is an address."""
    emails = [e for e in resource.get("emails") or [] if isinstance(e, dict) and e.get("value")]
    chosen = next((e for e in emails if e.get("primary")), emails[0] if emails else None)
    if chosen is not None:
        value = str(chosen["value"])
    else:
        name = str(resource.get("userName") or "")
        value = name if "@" in name else ""
    return value if value and len(value) <= MAX_EMAIL else None
