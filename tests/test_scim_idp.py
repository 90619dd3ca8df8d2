"""Okta's and Entra ID's SCIM request sequences, replayed against a real API process, with a
real worker applying the events they cause to the tokens.

Runs on the embedded default (SQLite and the file-backed broker) everywhere, and on Postgres
with RabbitMQ when those services are named (see conftest).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from tests.conftest import fresh_postgres_database, service_url
from tests.stack import LiveStack, check_broker, stack_env
from tokenwarden.config.settings import Settings
from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.issuing import IssuedToken
from tokenwarden.worker.domain.models import InboxEvent, Membership, TokenKind
from tokenwarden.worker.ops.supervisor import free_port

pytestmark = pytest.mark.slow

SCIM_TOKEN = "scim_idp_test_token_0001"
AUTH = {"Authorization": f"Bearer {SCIM_TOKEN}", "Content-Type": "application/scim+json"}
USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
GROUPS = (
    "Acme Admins=acme:admin,Acme Engineers=acme:user,Globex Engineers=globex:user,"
    "Initech Staff=initech:user"
)
STACKS = [
    "embedded",
    pytest.param("rabbitmq", marks=[pytest.mark.postgres, pytest.mark.rabbitmq]),
]


@pytest.fixture(scope="module", params=STACKS)
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveStack]:
    home = tmp_path_factory.mktemp(f"scim-{request.param}")
    if request.param == "embedded":
        yield from _run(home, {})
        return
    broker = service_url(request.param)
    assert broker is not None
    with fresh_postgres_database() as url:
        check_broker(Settings(home=home, database_url=url, broker_url=broker))
        yield from _run(home, {"TOKENWARDEN_DATABASE_URL": url, "TOKENWARDEN_BROKER_URL": broker})


def _run(home: Path, extra: dict[str, str]) -> Iterator[LiveStack]:
    scim = {"TOKENWARDEN_SCIM_TOKENS": SCIM_TOKEN, "TOKENWARDEN_SCIM_GROUPS": GROUPS}
    env = stack_env(home, {**extra, **scim})
    settings = Settings(home=home, database_url=extra.get("TOKENWARDEN_DATABASE_URL"))
    stack = LiveStack(home, env, settings.resolved_database_url, free_port())
    db.upgrade(stack.database_url)
    stack.start("api", "worker")
    try:
        yield stack
    finally:
        stack.stop()


class Idp:
    """An identity provider's side of the conversation, over HTTP."""

    def __init__(self, live: LiveStack) -> None:
        self.live = live
        self.client = httpx.Client(base_url=f"{live.api_url}/scim/v2", headers=AUTH, timeout=30)

    def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        answer = self.client.request(method, path, json=body)
        assert answer.status_code == expect, answer.text
        return answer.json() if answer.content else None

    def find(self, kind: str, attribute: str, value: str) -> list[dict[str, Any]]:
        query = {"filter": f'{attribute} eq "{value}"', "startIndex": "1", "count": "100"}
        answer = self.client.get(f"/{kind}", params=query)
        assert answer.status_code == 200, answer.text
        found: list[dict[str, Any]] = answer.json()["Resources"]
        return found

    def group(self, name: str) -> str:
        """The group's id: found by name, else created (as both providers do)."""
        found = self.find("Groups", "displayName", name)
        if found:
            return str(found[0]["id"])
        body = {"schemas": [GROUP_SCHEMA], "displayName": name, "members": []}
        return str(self.call("POST", "/Groups", body, expect=201)["id"])

    def patch(self, kind: str, resource_id: str, *operations: dict[str, Any]) -> Any:
        body = {"schemas": [PATCH_OP], "Operations": list(operations)}
        return self.call("PATCH", f"/{kind}/{resource_id}", body)


@pytest.fixture
def idp(live: LiveStack) -> Iterator[Idp]:
    provider = Idp(live)
    yield provider
    provider.client.close()


def roles(live: LiveStack, user_id: str) -> dict[str, str]:
    """The user's active memberships: org -> role."""
    with live.session() as session:
        rows = session.scalars(select(Membership).where(Membership.user_id == user_id))
        return {m.org_id: m.role for m in rows if m.active}


def settled(live: LiveStack, user_id: str, expected: dict[str, str]) -> None:
    live.wait_for(
        lambda: roles(live, user_id) == expected,
        timeout=30,
        message=f"memberships {expected}",
    )


def revoked(live: LiveStack, token: IssuedToken) -> bool:
    return live.verify(token.token).reason == "revoked"


def inbox_size(live: LiveStack) -> int:
    with live.session() as session:
        return int(session.scalar(select(func.count()).select_from(InboxEvent)) or 0)


def okta_user(user_name: str) -> dict[str, Any]:
    return {
        "schemas": [USER_SCHEMA],
        "userName": user_name,
        "name": {"givenName": "Isaac", "familyName": "Brock"},
        "emails": [{"primary": True, "value": user_name, "type": "work"}],
        "displayName": "Isaac Brock",
        "locale": "en-US",
        "externalId": f"00u{uuid.uuid4().hex[:17]}",
        "groups": [],
        "password": "1mz050nq",
        "active": True,
    }


def entra_user(user_name: str) -> dict[str, Any]:
    return {
        "schemas": [USER_SCHEMA, ENTERPRISE],
        "externalId": str(uuid.uuid4()),
        "userName": user_name,
        "active": True,
        "emails": [{"primary": True, "type": "work", "value": user_name}],
        "meta": {"resourceType": "User"},
        "name": {"formatted": "Ada Lovelace", "familyName": "Lovelace", "givenName": "Ada"},
        "roles": [],
        ENTERPRISE: {"employeeNumber": "1701", "department": "Engineering"},
    }


def tokens(live: LiveStack, user: str) -> dict[str, IssuedToken]:
    return {
        "acme": live.token(TokenKind.PERSONAL, "acme", user),
        "globex": live.token(TokenKind.PERSONAL, "globex", user),
        "aat": live.token(TokenKind.APPLICATION, "acme", "deployer", created_by=user),
    }


def test_okta_provisions_removes_from_a_group_deactivates_and_reactivates(
    live: LiveStack, idp: Idp
) -> None:
    user = f"isaac.{uuid.uuid4().hex[:8]}@example.com"
    assert idp.find("Users", "userName", user) == []
    created = idp.call("POST", "/Users", okta_user(user), expect=201)
    scim_id = created["id"]
    assert "password" not in created
    acme, globex = idp.group("Acme Engineers"), idp.group("Globex Engineers")
    for group in (acme, globex):
        idp.patch("Groups", group, {"op": "add", "path": "members", "value": [{"value": scim_id}]})
    settled(live, user, {"acme": "user", "globex": "user"})
    held = tokens(live, user)

    # Removed from one group: that organization's PATs go, the other's and the AAT stay.
    idp.patch("Groups", acme, {"op": "remove", "path": f'members[value eq "{scim_id}"]'})
    settled(live, user, {"globex": "user"})
    live.wait_for(lambda: revoked(live, held["acme"]), message="the acme PAT revoked")
    assert not revoked(live, held["globex"])
    assert live.verify(held["aat"].token).usable

    # Deactivated (Okta: an operation with no path whose value is an object): every PAT goes.
    idp.patch("Users", scim_id, {"op": "replace", "value": {"active": False}})
    live.wait_for(lambda: revoked(live, held["globex"]), message="the globex PAT revoked")
    assert live.verify(held["aat"].token).usable
    # Okta reads a deactivated user back, and expects it.
    assert idp.call("GET", f"/Users/{scim_id}")["active"] is False

    # Reactivated: the groups it still has are joined again; no old PAT comes back.
    idp.call("PUT", f"/Users/{scim_id}", {**okta_user(user), "id": scim_id, "active": True})
    settled(live, user, {"globex": "user"})
    fresh = live.token(TokenKind.PERSONAL, "globex", user)
    time.sleep(0.5)
    assert live.verify(fresh.token).usable
    assert revoked(live, held["globex"])
    assert revoked(live, held["acme"])


def test_entra_provisions_removes_deactivates_deletes_later_and_reactivates(
    live: LiveStack, idp: Idp
) -> None:
    user = f"ada.{uuid.uuid4().hex[:8]}@contoso.example"
    # Entra first asks for a user that cannot exist, then the one it provisions.
    assert idp.find("Users", "userName", str(uuid.uuid4())) == []
    assert idp.find("Users", "userName", user) == []
    scim_id = idp.call("POST", "/Users", entra_user(user), expect=201)["id"]
    acme, globex = idp.group("Acme Engineers"), idp.group("Globex Engineers")
    for group in (acme, globex):
        idp.patch("Groups", group, {"op": "Add", "path": "members", "value": [{"value": scim_id}]})
    settled(live, user, {"acme": "user", "globex": "user"})
    held = tokens(live, user)

    idp.patch("Groups", acme, {"op": "Remove", "path": "members", "value": [{"value": scim_id}]})
    live.wait_for(lambda: revoked(live, held["acme"]), message="the acme PAT revoked")
    assert not revoked(live, held["globex"])
    assert live.verify(held["aat"].token).usable

    # Entra deactivates with a capitalised operation and a string for the boolean.
    idp.patch("Users", scim_id, {"op": "Replace", "path": "active", "value": "False"})
    live.wait_for(lambda: revoked(live, held["globex"]), message="the globex PAT revoked")
    assert live.verify(held["aat"].token).usable
    settled(live, user, {})

    # Entra reactivates the same way: the user joins again what its groups still grant, and
    # no old PAT comes back. Then it deactivates the user again, for good.
    idp.patch("Users", scim_id, {"op": "Replace", "path": "active", "value": "True"})
    settled(live, user, {"globex": "user"})
    assert revoked(live, held["globex"])
    idp.patch("Users", scim_id, {"op": "Replace", "path": "active", "value": "False"})
    settled(live, user, {})

    # The same request again (Entra retries): nothing new is stored.
    before = inbox_size(live)
    idp.patch("Users", scim_id, {"op": "Replace", "path": "active", "value": "False"})
    # About 30 days later Entra deletes the user: nothing more happens, nothing errors.
    idp.call("DELETE", f"/Users/{scim_id}", expect=204)
    assert inbox_size(live) == before
    idp.call("GET", f"/Users/{scim_id}", expect=404)
    idp.call("DELETE", f"/Users/{scim_id}", expect=404)
    assert live.verify(held["aat"].token).usable

    # Provisioned again (a rehire): a new SCIM id, the same tokenwarden user, a re-join.
    again = idp.call("POST", "/Users", entra_user(user), expect=201)["id"]
    assert again != scim_id
    idp.patch("Groups", acme, {"op": "Add", "path": "members", "value": [{"value": again}]})
    settled(live, user, {"acme": "user"})
    assert revoked(live, held["acme"])


def test_two_groups_of_one_org_admin_wins_and_a_removal_only_changes_the_role(
    live: LiveStack, idp: Idp
) -> None:
    user = f"grace.{uuid.uuid4().hex[:8]}@example.com"
    scim_id = idp.call("POST", "/Users", okta_user(user), expect=201)["id"]
    admins, engineers = idp.group("Acme Admins"), idp.group("Acme Engineers")
    member = {"op": "add", "path": "members", "value": [{"value": scim_id}]}
    idp.patch("Groups", engineers, member)
    idp.patch("Groups", admins, member)
    settled(live, user, {"acme": "admin"})
    pat = live.token(TokenKind.PERSONAL, "acme", user)

    idp.patch("Groups", admins, {"op": "remove", "path": f'members[value eq "{scim_id}"]'})
    settled(live, user, {"acme": "user"})
    time.sleep(0.5)
    assert live.verify(pat.token).usable  # still a member through the other group

    # A group that is not in TOKENWARDEN_SCIM_GROUPS is kept and grants nothing.
    other = idp.group(f"Book club {uuid.uuid4().hex[:6]}")
    before = inbox_size(live)
    idp.patch("Groups", other, member)
    assert inbox_size(live) == before
    # Deleting a mapped group ends what it granted.
    idp.call("DELETE", f"/Groups/{engineers}", expect=204)
    live.wait_for(lambda: revoked(live, pat), message="the PAT revoked with the group gone")
    settled(live, user, {})


def test_an_initial_sync_of_1000_users_gets_every_membership_right(
    live: LiveStack, idp: Idp
) -> None:
    """Okta's import: for each user a search by userName, then a POST; then the group push."""
    batch = uuid.uuid4().hex[:6]
    names = [f"sync-{batch}-{n:04d}@example.com" for n in range(1000)]
    started = time.perf_counter()
    ids = []
    for name in names:
        assert idp.find("Users", "userName", name) == []
        ids.append(idp.call("POST", "/Users", okta_user(name), expect=201)["id"])
    staff = idp.group("Initech Staff")
    for chunk in range(0, len(ids), 250):  # Okta pushes members in slices
        members = [{"value": i} for i in ids[chunk : chunk + 250]]
        idp.patch("Groups", staff, {"op": "add", "path": "members", "value": members})
    answered = time.perf_counter() - started

    def joined() -> int:
        with live.session() as session:
            query = select(func.count()).where(
                Membership.org_id == "initech",
                Membership.active.is_(True),
                Membership.user_id.like(f"sync-{batch}-%"),
            )
            return int(session.scalar(query) or 0)

    live.wait_for(lambda: joined() == 1000, timeout=120, message="1000 memberships")
    applied = time.perf_counter() - started
    print(f"\n1000-user initial sync: answered in {answered:.1f} s, applied in {applied:.1f} s")
    assert roles(live, names[0]) == {"initech": "user"}
