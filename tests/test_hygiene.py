"""Token hygiene: maximum lifetimes, application tokens that stay somebody's, break-glass
revocation, and idle tokens warned of, then revoked by the sweep."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests import test_sweep
from tests.conftest import Cli, Store, within_lifetime
from tests.test_handlers import aat, apply, join, pat, stored
from tokenwarden.config.settings import get_settings
from tokenwarden.worker.domain import db, notices
from tokenwarden.worker.domain.errors import Refused
from tokenwarden.worker.domain.expiry import idle
from tokenwarden.worker.domain.expiry.sweep import run_sweep
from tokenwarden.worker.domain.handlers import apply_pending
from tokenwarden.worker.domain.issuing import IssuedToken, create_token
from tokenwarden.worker.domain.models import AuditEntry, InboxEvent, Notice, Token, TokenKind
from tokenwarden.worker.domain.orphans import reassign
from tokenwarden.worker.domain.usage import record_uses
from tokenwarden.worker.domain.verification import verify_token


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Set ``TOKENWARDEN_*`` variables for the domain's settings; restored afterwards."""
    get_settings.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    get_settings.cache_clear()


def kinds_of(session: Session, kind: str) -> list[Notice]:
    return list(session.scalars(select(Notice).where(Notice.kind == kind).order_by(Notice.id)))


def body(notice: Notice) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(notice.body)["data"]
    return data


# --- maximum lifetime ---------------------------------------------------------------------


def test_a_lifetime_over_the_cap_is_refused_naming_the_limit(
    session: Session, now: datetime
) -> None:
    join(session, "acme", "bob", at=now - timedelta(days=1))
    with pytest.raises(Refused) as refused:
        create_token(
            session,
            kind=TokenKind.PERSONAL,
            org_id="acme",
            user_id="bob",
            name="forever",
            expires_at=now + timedelta(days=367),
            now=now,
        )
    assert refused.value.reason == "lifetime_too_long"
    assert "366 days" in refused.value.message
    assert "TOKENWARDEN_MAX_LIFETIME_DAYS" in refused.value.message
    assert session.scalars(select(Token).where(Token.org_id == "acme")).all() == []
    # Exactly the cap is allowed.
    create_token(
        session,
        kind=TokenKind.PERSONAL,
        org_id="acme",
        user_id="bob",
        name="a year",
        expires_at=now + timedelta(days=366),
        now=now,
    )


def test_the_cap_is_per_kind_and_leaves_existing_tokens_alone(
    session: Session, now: datetime, settings_env: pytest.MonkeyPatch
) -> None:
    join(session, "acme", "bob", at=now - timedelta(days=1))
    before = pat(session, "acme", "bob", created=now)  # 365 days, under the default
    settings_env.setenv("TOKENWARDEN_MAX_LIFETIME_DAYS", "personal=90,application=366")
    get_settings.cache_clear()

    with pytest.raises(Refused, match="90 days"):
        pat(session, "acme", "bob", created=now)
    app_token = aat(session, "acme", created_by="bob", created=now)  # 365 days: allowed

    assert session.get(Token, before.id).expires_at == before.expires_at  # type: ignore[union-attr]
    assert verify_token(session, before.token, now=now + timedelta(days=200)).usable
    assert verify_token(session, app_token.token, now=now).usable


def test_the_cli_refuses_a_long_lifetime_in_one_line_and_a_bad_setting_names_itself(
    cli: Cli,
) -> None:
    cli("member", "add", "--org", "acme", "--user", "bob", "--role", "user", check=True)
    too_far = within_lifetime(400)
    create = ("token", "create", "--kind", "personal", "--org", "acme", "--user", "bob")
    refused = cli(*create, "--name", "n", "--expires-at", too_far)
    assert refused.code == 2
    assert refused.stderr.count("\n") == 1
    assert "maximum lifetime of a personal token is 366 days" in refused.stderr
    assert cli("token", "list", "--json", check=True).json() == []

    cli.env["TOKENWARDEN_MAX_LIFETIME_DAYS"] = "personal=forever"
    bad = cli(*create, "--name", "n", "--expires-at", within_lifetime(10))
    assert bad.code != 0
    assert "TOKENWARDEN_MAX_LIFETIME_DAYS" in bad.stderr


# --- application tokens stay somebody's ----------------------------------------------------


def test_an_application_token_needs_an_organization_and_an_active_member_creating_it(
    session: Session, now: datetime
) -> None:
    with pytest.raises(Refused) as no_org:
        aat(session, "ghost-org", created_by="bob", created=now)
    assert no_org.value.reason == "no_org"
    join(session, "acme", "alice", at=now - timedelta(days=1))
    with pytest.raises(Refused) as outsider:
        aat(session, "acme", created_by="mallory", created=now)
    assert outsider.value.reason == "not_member"
    assert "mallory" in outsider.value.message
    assert aat(session, "acme", created_by="alice", created=now).kind is TokenKind.APPLICATION


def bobs_application_token(session: Session, *, now: datetime) -> IssuedToken:
    """acme, with alice its admin and bob a member who created an application token."""
    t0 = now - timedelta(days=10)
    join(session, "acme", "alice", at=t0, role="admin")
    join(session, "acme", "bob", at=t0)
    return aat(session, "acme", created_by="bob", created=t0)


def test_a_creator_leaving_tells_the_admins_once_and_the_token_keeps_working(
    session: Session, now: datetime
) -> None:
    deploys = bobs_application_token(session, now=now)
    aat(session, "acme", created_by="alice", created=now - timedelta(days=1))  # not listed

    leave = {"org_id": "acme", "user_id": "bob"}
    apply(session, "membership.removed", leave, time=now - timedelta(hours=2), now=now)
    # Another producer reports the same departure again, under another event id.
    apply(session, "membership.removed", leave, time=now - timedelta(hours=1), now=now)

    (notice,) = kinds_of(session, notices.ORPHANED)
    assert notice.recipients == [{"user_id": "alice", "email": None}]
    data = body(notice)
    assert (data["user_id"], data["reason"]) == ("bob", "creator_left")
    assert [t["id"] for t in data["tokens"]] == [deploys.id]
    assert "reassign" in data["next_steps"]
    assert deploys.token not in notice.body
    assert verify_token(session, deploys.token, now=now).usable


def test_a_deactivated_creator_is_reported_once_per_organization(
    session: Session, now: datetime
) -> None:
    t0 = now - timedelta(days=10)
    for org in ("acme", "globex"):
        join(session, org, "alice", at=t0, role="admin")
        join(session, org, "bob", at=t0)
    acme = aat(session, "acme", created_by="bob", created=t0)
    globex = aat(session, "globex", created_by="bob", created=t0)

    apply(session, "user.deactivated", {"user_id": "bob"}, time=now - timedelta(hours=2), now=now)
    apply(session, "user.deactivated", {"user_id": "bob"}, time=now - timedelta(hours=1), now=now)

    orphaned = kinds_of(session, notices.ORPHANED)
    told = {n.org_id: [t["id"] for t in body(n)["tokens"]] for n in orphaned}
    assert told == {"acme": [acme.id], "globex": [globex.id]}
    assert len(orphaned) == 2


def test_a_redelivered_removal_event_tells_nobody_again(session: Session, now: datetime) -> None:
    from tests.test_handlers import stored

    t0 = now - timedelta(days=10)
    join(session, "acme", "alice", at=t0, role="admin")
    join(session, "acme", "bob", at=t0)
    join(session, "acme", "carol", at=t0)
    aat(session, "acme", created_by="bob", created=t0)
    aat(session, "acme", created_by="carol", created=t0)
    ids = [
        stored(session, "membership.removed", {"org_id": "acme", "user_id": u}, time=now).id
        for u in ("bob", "carol")
    ]
    apply_pending(session, ids, now=now, retryable=lambda _: False)  # the set-based path
    again = apply_pending(session, ids, now=now, retryable=lambda _: False)

    assert again.skipped == ids
    orphaned = kinds_of(session, notices.ORPHANED)
    assert sorted(body(n)["user_id"] for n in orphaned) == ["bob", "carol"]


def test_reassign_hands_over_to_a_member_only_and_is_audited(
    session: Session, now: datetime
) -> None:
    deploys = bobs_application_token(session, now=now)
    apply(session, "membership.removed", {"org_id": "acme", "user_id": "bob"}, time=now, now=now)

    for outsider in ("bob", "mallory"):
        with pytest.raises(Refused) as refused:
            reassign(session, token_id=deploys.id, created_by=outsider, now=now, actor="ops")
        assert refused.value.reason == "not_member"
    assert session.get(Token, deploys.id).created_by == "bob"  # type: ignore[union-attr]

    reassign(session, token_id=deploys.id, created_by="alice", now=now, actor="ops")

    assert session.get(Token, deploys.id).created_by == "alice"  # type: ignore[union-attr]
    (row,) = session.scalars(select(AuditEntry).where(AuditEntry.action == "reassign")).all()
    assert (row.token_id, row.actor, row.detail) == (
        deploys.id,
        "ops",
        {"from": "bob", "to": "alice"},
    )


def test_token_reassign_on_the_command_line(cli: Cli) -> None:
    for user, role in (("alice", "admin"), ("bob", "user")):
        cli("member", "add", "--org", "acme", "--user", user, "--role", role, check=True)
    created = cli(
        "token", "create", "--kind", "application", "--org", "acme", "--app", "ci",
        "--created-by", "bob", "--name", "deploys", "--expires-at", within_lifetime(), "--json",
        check=True,
    ).json()  # fmt: skip

    refused = cli("token", "reassign", created["id"], "--created-by", "mallory")
    assert refused.code == 2
    assert "mallory" in refused.stderr
    moved = cli("token", "reassign", created["id"], "--created-by", "alice", "--json", check=True)
    assert moved.json() == {"id": created["id"], "created_by": "alice", "previous": "bob"}
    (listed,) = cli("token", "list", "--json", check=True).json()
    assert listed["created_by"] == "alice"


# --- break-glass revocation ----------------------------------------------------------------


def test_a_dry_run_lists_exactly_what_the_real_run_revokes(cli: Cli) -> None:
    for user, role in (("alice", "admin"), ("bob", "user"), ("carol", "user")):
        cli("member", "add", "--org", "acme", "--user", user, "--role", role, check=True)
    cli("member", "add", "--org", "globex", "--user", "bob", "--role", "user", check=True)
    expiry = within_lifetime()

    def create(*owner: str) -> str:
        kind = "personal" if owner[0] == "--user" else "application"
        org = owner[-1]
        made = cli(
            "token", "create", "--kind", kind, "--org", org, *owner[:-1], "--name", "n",
            "--expires-at", expiry, "--json", check=True,
        ).json()  # fmt: skip
        return str(made["id"])

    bobs = [create("--user", "bob", "acme") for _ in range(3)]
    carols = create("--user", "carol", "acme")
    app_by_bob = create("--app", "ci", "--created-by", "bob", "acme")
    elsewhere = create("--user", "bob", "globex")
    selection = ("revoke", "--org", "acme", "--user", "bob")

    dry = cli(*selection, "--dry-run", "--json", check=True).json()
    assert sorted(t["id"] for t in dry["tokens"]) == sorted([*bobs, app_by_bob])
    states = {t["id"]: t["state"] for t in cli("token", "list", "--json", check=True).json()}
    assert set(states.values()) == {"active"}  # the dry run changed nothing

    unconfirmed = cli(*selection, "--reason", "laptop stolen")
    assert unconfirmed.code == 2
    assert "--confirm REVOKE" in unconfirmed.stderr

    done = cli(
        *selection, "--reason", "laptop stolen", "--confirm", "REVOKE", "--batch", "2", "--json",
        check=True,
    ).json()  # fmt: skip
    assert done["revoked"] == sorted(t["id"] for t in dry["tokens"])
    assert done["transactions"] >= 2
    listed = {t["id"]: t for t in cli("token", "list", "--json", check=True).json()}
    assert {i for i, t in listed.items() if t["reason"] == "bulk"} == set(done["revoked"])
    assert listed[carols]["state"] == listed[elsewhere]["state"] == "active"
    trail = cli("audit", "--org", "acme", "--json", check=True).json()
    bulk_rows = [row for row in trail if row["reason"] == "bulk"]
    assert len(bulk_rows) == 4
    assert all(row["detail"]["reason"] == "laptop stolen" for row in bulk_rows)
    # One notice per recipient: bob for his PATs, the admins for the application token.
    listed_notices = cli("notices", "--json", check=True).json()
    told = [n for n in listed_notices if n["kind"] == "tokens.bulk_revoked"]
    assert done["notices"] == len(told) == 2


def test_a_bulk_revocation_event_revokes_what_it_names_as_of_its_time(
    session: Session, now: datetime
) -> None:
    t0 = now - timedelta(days=10)
    join(session, "acme", "alice", at=t0, role="admin")
    join(session, "acme", "bob", at=t0)
    old = [pat(session, "acme", "bob", created=t0) for _ in range(2)]
    app_token = aat(session, "acme", created_by="alice", created=t0)
    newer = pat(session, "acme", "bob", created=now - timedelta(minutes=1))

    result = apply(
        session,
        "tokens.bulk_revoke_requested",
        {"org_id": "acme", "kind": "personal", "reason": "breach", "actor": "secops"},
        time=now - timedelta(hours=1),
        now=now,
    )

    assert sorted(result["revoked"]) == sorted(t.id for t in old)
    assert verify_token(session, app_token.token, now=now).usable
    assert verify_token(session, newer.token, now=now).usable  # issued after the request
    (notice,) = kinds_of(session, notices.BULK_REVOKED)
    assert body(notice)["stated_reason"] == "breach"
    assert notice.recipients == [{"user_id": "bob", "email": None}]


def bulk_tokens(session: Session, *, at: datetime) -> tuple[list[str], str]:
    """acme: alice an admin, bob a user with three PATs and an application token he made."""
    join(session, "acme", "alice", at=at, role="admin")
    join(session, "acme", "bob", at=at)
    bobs = [pat(session, "acme", "bob", created=at).id for _ in range(3)]
    return bobs, aat(session, "acme", created_by="bob", created=at).id


def told_about(session: Session) -> dict[str, list[str]]:
    """Each bulk notice's first recipient, with the token ids it lists."""
    return {
        n.recipients[0]["user_id"]: sorted(t["id"] for t in body(n)["tokens"])
        for n in kinds_of(session, notices.BULK_REVOKED)
    }


def test_a_bulk_revocation_event_goes_in_short_batches_and_tells_each_recipient_once(
    session: Session, now: datetime, settings_env: pytest.MonkeyPatch
) -> None:
    settings_env.setenv("TOKENWARDEN_SWEEP_BATCH", "2")
    bobs, app_token = bulk_tokens(session, at=now - timedelta(days=10))
    event = stored(
        session,
        "tokens.bulk_revoke_requested",
        {"org_id": "acme", "user_id": "bob", "reason": "laptop stolen"},
        time=now - timedelta(minutes=5),
    )

    first = apply_pending(session, [event.id], now=now, retryable=lambda _: False)
    # One batch of two: committed with its audit rows, nobody told yet, the event pending.
    assert (first.done, first.unfinished) == ([], [event.id])
    assert event.status == "pending"
    revoked = session.scalars(select(Token.id).where(Token.revoke_reason == "bulk")).all()
    assert len(revoked) == 2
    assert kinds_of(session, notices.BULK_REVOKED) == []

    runs = [first]
    while event.status == "pending" and len(runs) < 5:
        runs.append(apply_pending(session, [event.id], now=now, retryable=lambda _: False))
    assert [r.unfinished for r in runs] == [[event.id], [event.id], []]
    assert runs[-1].done == [event.id]
    assert sorted((event.result or {})["revoked"]) == sorted([*bobs, app_token])
    # One notice per recipient, listing everything revoked under the event, every batch.
    assert told_about(session) == {"bob": sorted(bobs), "alice": [app_token]}
    again = apply_pending(session, [event.id], now=now, retryable=lambda _: False)
    assert again.skipped == [event.id]
    assert len(kinds_of(session, notices.BULK_REVOKED)) == 2


def test_a_break_glass_run_stopped_half_way_is_finished_by_the_worker_telling_everyone_once(
    store: Store, now: datetime, settings_env: pytest.MonkeyPatch
) -> None:
    from tokenwarden.worker.cli import bulk
    from tokenwarden.worker.domain import audit, bulk_revocation
    from tokenwarden.worker.domain.bulk_revocation import Selection

    store.truncate()
    settings_env.setenv("TOKENWARDEN_DATABASE_URL", store.url)
    with db.transaction(store.engine) as session:
        bobs, app_token = bulk_tokens(session, at=now - timedelta(days=10))
    steps: list[int] = []

    def power_cut_in_the_second_batch(*args: Any, **kwargs: Any) -> Any:
        steps.append(1)
        if len(steps) == 2:
            raise RuntimeError("power cut")
        return step(*args, **kwargs)

    step = bulk_revocation.step
    settings_env.setattr(bulk, "step", power_cut_in_the_second_batch)
    stamp = audit.Stamp(at=now, now=now, source="cli", event_id="cli-bulk-cut", actor="secops")
    try:
        with pytest.raises(RuntimeError, match="power cut"):
            bulk._revoke_in_batches(
                Selection(org_id="acme", user_id="bob"), stamp=stamp, reason="stolen", batch=2
            )
        with db.transaction(store.engine) as session:
            # The first batch is kept, and so is the request: a pending event in the inbox.
            assert (
                len(session.scalars(select(Token.id).where(Token.revoke_reason == "bulk")).all())
                == 2
            )
            assert session.get_one(InboxEvent, "cli-bulk-cut").status == "pending"
            assert kinds_of(session, notices.BULK_REVOKED) == []
            # The worker, re-driving it, finishes the run and tells everyone about all of it.
            outcome = apply_pending(session, ["cli-bulk-cut"], now=now, retryable=lambda _: False)
            assert outcome.done == ["cli-bulk-cut"]
            assert told_about(session) == {"bob": sorted(bobs), "alice": [app_token]}
            reasons = {
                (row.detail or {})["reason"] for row in session.scalars(
                    select(AuditEntry).where(AuditEntry.event_id == "cli-bulk-cut")
                )
            }  # fmt: skip
            assert reasons == {"stolen"}
    finally:
        store.truncate()


def test_the_producer_api_takes_a_bulk_revocation_and_refuses_a_malformed_one(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import warnings

    from starlette.exceptions import StarletteDeprecationWarning

    from tokenwarden.config.settings import Settings
    from tokenwarden.producer.api import create_app
    from tokenwarden.worker.runtime.celery_app import make_celery

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StarletteDeprecationWarning)
        from fastapi.testclient import TestClient

    store.truncate()
    key = "twp_hygiene_test_key_1"
    settings = Settings(home=tmp_path, producer_keys=(key,), database_url=store.url)
    celery_app = make_celery(settings)
    auth = {"Authorization": f"Bearer {key}"}

    def sent(event_id: str, data: dict[str, Any]) -> Any:
        return {
            "specversion": "1.0",
            "id": event_id,
            "source": "soar://playbook",
            "type": "tokens.bulk_revoke_requested",
            "time": "2026-11-27T19:00:00Z",
            "data": data,
        }

    try:
        with TestClient(create_app(settings, celery_app=celery_app)) as api:
            accepted = api.post(
                "/v1/events",
                json=sent("evt-bulk", {"org_id": "acme", "kind": "personal", "reason": "breach"}),
                headers=auth,
            )
            malformed: list[dict[str, Any]] = [
                {"kind": "personal"},  # no organization: never "every token"
                {"org_id": "acme", "kind": "root"},
                {"org_id": "acme", "created_before": "2026-11-27T19:00:00"},
                {"org_id": "acme", "reason": "x" * 501},
                {"org_id": "acme", "dry_run": True},
            ]
            refused = [
                api.post("/v1/events", json=sent(f"evt-bad-{i}", data), headers=auth)
                for i, data in enumerate(malformed)
            ]
        assert accepted.status_code == 202, accepted.text
        assert [r.status_code for r in refused] == [422] * 5
        with db.transaction(store.engine) as session:
            ids = session.scalars(select(InboxEvent.id)).all()
        assert ids == ["evt-bulk"]
    finally:
        celery_app.close()
        store.truncate()


# --- idle tokens ---------------------------------------------------------------------------


# The store, emptied before and after: the sweep commits a transaction per batch.
committed = test_sweep.committed


def issue(store: Store, *, at: datetime) -> IssuedToken:
    with db.transaction(store.engine) as session:
        join(session, "acme", "alice", at=at - timedelta(days=1), role="admin")
        join(session, "acme", "bob", at=at - timedelta(days=1))
        return pat(session, "acme", "bob", created=at)


def sweep(store: Store, at: datetime) -> dict[str, Any]:
    return run_sweep(store.engine, now=at, batch=50, idle_days=30).as_dict()


def idle_notices(store: Store) -> list[Notice]:
    with db.transaction(store.engine) as session:
        return kinds_of(session, notices.IDLE_WARNING)


def state(store: Store, token_id: str) -> tuple[str | None, list[str]]:
    with db.transaction(store.engine) as session:
        token = session.get(Token, token_id)
        assert token is not None
        reasons = session.scalars(
            select(AuditEntry.reason).where(
                AuditEntry.token_id == token_id, AuditEntry.action == "revoke"
            )
        ).all()
        return token.revoke_reason, list(reasons)


def test_an_idle_token_is_warned_of_once_then_revoked_once(committed: Store, now: datetime) -> None:
    t0 = now - timedelta(days=60)
    token = issue(committed, at=t0)

    assert sweep(committed, t0 + timedelta(days=22))["idle_warned"] == 0  # not yet
    assert sweep(committed, t0 + timedelta(days=23, hours=2))["idle_warned"] == 1
    assert sweep(committed, t0 + timedelta(days=25))["idle_warned"] == 0  # once only
    (warning,) = idle_notices(committed)
    assert warning.recipients == [{"user_id": "bob", "email": None}]
    assert body(warning)["idle_days"] == 30
    assert state(committed, token.id) == (None, [])

    first = sweep(committed, t0 + timedelta(days=30, hours=2))
    again = sweep(committed, t0 + timedelta(days=32))

    assert (first["idle_revoked"], again["idle_revoked"]) == (1, 0)
    assert state(committed, token.id) == ("idle", ["idle"])
    assert len(idle_notices(committed)) == 1


def test_an_idle_revocation_tells_the_owner_once_what_was_revoked(
    committed: Store, now: datetime
) -> None:
    t0 = now - timedelta(days=60)
    token = issue(committed, at=t0)

    sweep(committed, t0 + timedelta(days=30, hours=2))
    sweep(committed, t0 + timedelta(days=32))

    with db.transaction(committed.engine) as session:
        (told,) = kinds_of(session, notices.IDLE_REVOKED)
    assert told.recipients == [{"user_id": "bob", "email": None}]
    said = body(told)
    assert (said["reason"], said["idle_days"]) == ("idle", 30)
    (listed,) = said["tokens"]
    assert listed["id"] == token.id
    assert listed["last_active_at"] == t0.isoformat()
    assert "revoked because they had not been used" in said["next_steps"]


def test_each_token_warned_of_is_given_its_own_idle_revocation_date(
    committed: Store, now: datetime
) -> None:
    t0 = now - timedelta(days=60)
    older = issue(committed, at=t0)
    with db.transaction(committed.engine) as session:
        newer = pat(session, "acme", "bob", created=t0 + timedelta(days=2))

    assert sweep(committed, t0 + timedelta(days=25))["idle_warned"] == 2

    (warning,) = idle_notices(committed)
    dates = {t["id"]: t["idle_revocation_at"] for t in body(warning)["tokens"]}
    assert dates == {
        older.id: (t0 + timedelta(days=30)).isoformat(),
        newer.id: (t0 + timedelta(days=32)).isoformat(),
    }
    assert body(warning)["revoked_from"] == (t0 + timedelta(days=30)).isoformat()


def test_a_token_used_the_day_before_the_deadline_survives(committed: Store, now: datetime) -> None:
    t0 = now - timedelta(days=60)
    token = issue(committed, at=t0)
    with db.transaction(committed.engine) as session:
        record_uses(session, {token.id: t0 + timedelta(days=29)})

    result = sweep(committed, t0 + timedelta(days=30, hours=2))

    assert result["idle_revoked"] == 0
    assert state(committed, token.id) == (None, [])
    # Idle again from that use: warned again, and revoked 30 days after it.
    assert sweep(committed, t0 + timedelta(days=29 + 23, hours=2))["idle_warned"] == 1
    assert sweep(committed, t0 + timedelta(days=29 + 30, hours=2))["idle_revoked"] == 1


def test_idle_revocation_is_off_by_default(committed: Store, now: datetime) -> None:
    t0 = now - timedelta(days=900)
    with db.transaction(committed.engine) as session:
        join(session, "acme", "bob", at=t0 - timedelta(days=1))
        issued = pat(session, "acme", "bob", created=now - timedelta(days=300))
    result = run_sweep(committed.engine, now=now, batch=50).as_dict()
    assert (result["idle_revoked"], result["idle_warned"]) == (0, 0)
    assert state(committed, issued.id) == (None, [])


def test_dense_idle_tokens_are_revoked_once_each_in_transactions_under_the_cap(
    committed: Store, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where idle tokens are dense the cap cuts each window, the next window is read from the
    # cut and shrinks to what a transaction can take: every idle token is still revoked once,
    # and the tokens in use are left alone.
    monkeypatch.setattr(idle, "REVOKED_PER_TRANSACTION", 7)
    t0 = now - timedelta(days=60)
    with db.transaction(committed.engine) as session:
        join(session, "acme", "bob", at=t0 - timedelta(days=1))
        tokens = [pat(session, "acme", "bob", created=t0) for _ in range(60)]
        record_uses(session, {t.id: now - timedelta(days=1) for t in tokens[::3]})
    per_transaction: list[int] = []
    result = run_sweep(
        committed.engine,
        now=now,
        batch=50,
        idle_days=30,
        on_progress=lambda r: per_transaction.append(r.idle_revoked),
    ).as_dict()

    assert result["idle_revoked"] == 40
    revoked = [b - a for a, b in zip([0, *per_transaction], per_transaction, strict=False)]
    assert max(revoked) <= 7
    for used in tokens[::3]:
        assert state(committed, used.id) == (None, [])
    for unused in [t for i, t in enumerate(tokens) if i % 3]:
        assert state(committed, unused.id) == ("idle", ["idle"])


def test_the_next_window_follows_where_the_cap_cut_the_last_one() -> None:
    assert idle.next_window(1000, 180, most=1000) == 225
    assert idle.next_window(225, 10, most=1000) == idle.MIN_WINDOW
    assert idle.next_window(225, None, most=1000) == 450
    assert idle.next_window(800, None, most=1000) == 1000
    assert idle.next_window(1000, 990, most=1000) == 1000
