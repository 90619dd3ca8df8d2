"""Rotation over /v1/tokens/{id}/rotate, and reuse of a rotated-away token: seen by
introspection, verification and another rotation; never inside the overlap, never for two
rotations racing."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import select

from tests.conftest import Cli, Store
from tests.test_cli import FAR, create, refused
from tests.test_token_api import (
    AUTH,
    INTROSPECTION,
    START,
    Clock,
    _own_environment,  # noqa: F401 - the autouse fixture applies here too
    api,  # noqa: F401 - fixture
    moment,  # noqa: F401 - fixture
    pat,
)
from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.models import AuditEntry, Notice, Token
from tokenwarden.worker.domain.rotation import REUSE_NOTICE
from tokenwarden.worker.domain.verification import verify_token

LOOK = {"Authorization": f"Bearer {INTROSPECTION}"}


def issue(client: Any, **overrides: Any) -> dict[str, Any]:
    made = client.post("/v1/tokens", json=pat(**overrides), headers=AUTH)
    assert made.status_code == 201, made.text
    return dict(made.json())


def rotate(client: Any, token_id: str, **body: Any) -> httpx.Response:
    answer: httpx.Response = client.post(
        f"/v1/tokens/{token_id}/rotate", json={"actor": "ops@console", **body}, headers=AUTH
    )
    return answer


def active(client: Any, text: str) -> bool:
    answer = client.post("/v1/introspect", data={"token": text}, headers=LOOK)
    assert answer.status_code == 200
    return bool(answer.json()["active"])


def states(store: Store) -> dict[str, tuple[str | None, str | None]]:
    with db.transaction(store.engine) as session:
        rows = session.scalars(select(Token)).all()
        return {row.id: (row.revoke_reason, row.replaced_by) for row in rows}


def reuse_notices(store: Store) -> list[Notice]:
    with db.transaction(store.engine) as session:
        return list(session.scalars(select(Notice).where(Notice.kind == REUSE_NOTICE)).all())


def test_rotation_keeps_kind_owner_name_and_lifetime(api: Any, moment: Clock) -> None:  # noqa: F811
    old = issue(api)
    moment.now += timedelta(days=10)
    answer = rotate(api, old["id"], overlap_s=3600)
    assert answer.status_code == 201, answer.text
    new = answer.json()
    assert new["token"] != old["token"]
    assert new["replaces"] == old["id"]
    assert (new["kind"], new["org_id"], new["name"]) == ("personal", "acme", "ci deploys")
    assert new["family_id"] == old["id"]
    # The same lifetime as the old token (30 days), from now.
    shown = api.get(f"/v1/tokens/{new['id']}", headers=AUTH).json()
    assert shown["expires_at"].startswith((moment.now + timedelta(days=30)).date().isoformat())
    assert shown["user_id"] == "alice"
    given = (moment.now + timedelta(days=7)).isoformat()
    again = rotate(api, new["id"], expires_at=given)
    assert again.status_code == 201
    assert again.json()["family_id"] == old["id"]


def test_old_token_works_inside_overlap_then_reuse_revokes_the_family_once(
    api: Any,  # noqa: F811
    store: Store,
    moment: Clock,  # noqa: F811
) -> None:
    old = issue(api)
    new = rotate(api, old["id"], overlap_s=600).json()
    assert active(api, old["token"])
    assert active(api, new["token"])
    # A service caching by exp learns when the old token stops: the end of its overlap.
    answer = api.post("/v1/introspect", data={"token": old["token"]}, headers=LOOK).json()
    assert answer["exp"] == int(datetime.fromisoformat(new["overlap_ends_at"]).timestamp())
    moment.now += timedelta(seconds=599)
    assert active(api, old["token"])
    assert reuse_notices(store) == []
    moment.now += timedelta(seconds=2)
    assert not active(api, old["token"])
    assert not active(api, new["token"])
    assert states(store)[new["id"]][0] == "reuse_detected"
    assert states(store)[old["id"]][0] == "rotated"
    notices = reuse_notices(store)
    assert len(notices) == 1
    assert [r["user_id"] for r in notices[0].recipients] == ["alice"]
    assert old["token"] not in notices[0].body
    assert new["token"] not in notices[0].body
    assert not active(api, old["token"])
    assert len(reuse_notices(store)) == 1
    shown = api.get(f"/v1/tokens/{new['id']}", headers=AUTH).json()
    assert (shown["state"], shown["reason"]) == ("revoked", "reuse_detected")
    with db.transaction(store.engine) as session:
        audited = session.scalars(
            select(AuditEntry.token_id).where(AuditEntry.reason == "reuse_detected")
        ).all()
    assert list(audited) == [new["id"]]


def test_without_overlap_the_old_token_stops_at_once_and_verification_detects_reuse(
    api: Any,  # noqa: F811
    store: Store,
    moment: Clock,  # noqa: F811
) -> None:
    old = issue(api, kind="application", user_id=None, app_id="ci", created_by="root")
    new = rotate(api, old["id"]).json()
    assert api.get(f"/v1/tokens/{old['id']}", headers=AUTH).json()["reason"] == "rotated"
    assert reuse_notices(store) == []
    with db.transaction(store.engine) as session:
        verdict = verify_token(session, old["token"], now=moment.now)
    assert not verdict.usable
    assert states(store)[new["id"]][0] == "reuse_detected"
    notice = reuse_notices(store)[0]
    assert [r["user_id"] for r in notice.recipients] == ["root"]  # the org's admins (an AAT)


def test_rotating_twice_is_a_conflict_then_reuse(
    api: Any,  # noqa: F811
    store: Store,
    moment: Clock,  # noqa: F811
) -> None:
    old = issue(api)
    new = rotate(api, old["id"], overlap_s=60).json()
    second = rotate(api, old["id"])
    assert second.status_code == 409
    assert second.json()["reason"] == "already_rotated"
    assert states(store)[new["id"]][0] is None
    moment.now += timedelta(minutes=2)
    late = rotate(api, old["id"])
    assert late.status_code == 409
    assert late.json()["reason"] == "reuse_detected"
    assert states(store)[new["id"]][0] == "reuse_detected"
    assert len(reuse_notices(store)) == 1


def test_rotation_refusals_change_nothing(api: Any, store: Store) -> None:  # noqa: F811
    old = issue(api)
    before = states(store)
    for body in ({"overlap_s": -1}, {"overlap_s": 86401}, {"expires_at": "soon"}, {"actor": ""}):
        assert rotate(api, old["id"], **body).status_code == 422
    past = (START - timedelta(days=1)).isoformat()
    refused = rotate(api, old["id"], expires_at=past)
    assert refused.status_code == 422
    assert refused.json()["reason"] == "expiry_in_past"
    assert rotate(api, "tok_missing").status_code == 404
    assert api.post(f"/v1/tokens/{old['id']}/rotate", json={"actor": "x"}).status_code == 401
    assert states(store) == before


def test_concurrent_rotations_one_wins_nothing_revoked(
    api: Any,  # noqa: F811
    store: Store,
) -> None:
    for _ in range(5):
        old = issue(api)
        barrier = threading.Barrier(2)
        codes: list[int] = []

        def race(
            token_id: str = old["id"], gate: threading.Barrier = barrier, seen: list[int] = codes
        ) -> None:
            gate.wait()
            seen.append(rotate(api, token_id).status_code)

        threads = [threading.Thread(target=race) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(codes) == [201, 409]
    assert all(reason != "reuse_detected" for reason, _ in states(store).values())
    assert reuse_notices(store) == []


def test_cli_rotates_with_overlap_and_refuses_in_one_line(cli: Cli) -> None:
    cli("member", "add", "--org", "acme", "--user", "bob", "--role", "user", check=True)
    old = create(cli, kind="personal", org="acme", user="bob", name="deploys")
    result = cli("token", "rotate", old["id"], "--overlap", "30m", "--json", check=True)
    new = result.json()
    assert new["replaces"] == old["id"]
    assert new["token"] != old["token"]
    ends = datetime.fromisoformat(new["overlap_ends_at"])
    assert timedelta(minutes=29) < ends - datetime.now(UTC) <= timedelta(minutes=30)
    assert cli("token", "verify", "--token", old["token"]).code == 0
    again = cli("token", "rotate", old["id"])
    assert "already rotated" in refused(again)
    for bad in (("--overlap", "25h"), ("--overlap", "soon"), ("--expires-at", "2000-01-01")):
        assert refused(cli("token", "rotate", new["id"], *bad))
    human = cli("token", "rotate", new["id"], "--expires-at", FAR, check=True)
    assert "will not be shown again" in human.stdout


def test_forward_auth_detects_reuse_through_the_shared_check(
    api: Any,  # noqa: F811
    store: Store,
) -> None:
    old = issue(api)
    gateway = {"X-Tokenwarden-Key": INTROSPECTION, "X-Original-URI": "/deploy"}
    assert api.get("/v1/auth", headers=gateway | {"x-auth-token": old["token"]}).status_code == 200
    new = rotate(api, old["id"]).json()
    assert api.get("/v1/auth", headers=gateway | {"x-auth-token": old["token"]}).status_code == 401
    assert states(store)[new["id"]][0] == "reuse_detected"
    assert api.get("/v1/auth", headers=gateway | {"x-auth-token": new["token"]}).status_code == 401
    assert len(reuse_notices(store)) == 1
