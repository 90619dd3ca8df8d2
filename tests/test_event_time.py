"""Event times against the receiver's clock: a leaver is not kept in by a clock set ahead.

A producer's clock set ahead, or a year mistyped, must not keep a leaver in: a ``time`` that
is not an RFC 3339 string is refused, one more than ``TOKENWARDEN_MAX_CLOCK_SKEW_S`` ahead of
the receiver's clock is refused by the API and marked dead by the worker, and an event counts
as happening no later than it arrived. Shuffled timelines check this together with the rule
that a role change never makes a member (tests/test_role_change.py).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.exceptions import StarletteDeprecationWarning

import tokenwarden.tasks.events
from tests.conftest import Store
from tests.test_role_change import (
    ADDED,
    DEACTIVATED,
    REMOVED,
    ROLE_CHANGED,
    cloud,
    join,
    member_of,
    no_pat_for,
    pat,
    received,
    unique_user,
)
from tokenwarden.config.settings import ConfigError, Settings, get_settings, load_settings
from tokenwarden.producer import intake
from tokenwarden.producer.api import create_app
from tokenwarden.producer.client import make_event
from tokenwarden.worker.domain import clock, db, inbox
from tokenwarden.worker.domain.events import parse_event
from tokenwarden.worker.domain.handlers import apply_pending
from tokenwarden.worker.domain.models import AuditEntry, EventStatus, InboxEvent, Membership
from tokenwarden.worker.domain.verification import verify_token
from tokenwarden.worker.runtime import tasking
from tokenwarden.worker.runtime.celery_app import make_celery

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

KEY = "twp_event_time_test_key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SKEW = timedelta(seconds=300)  # the default of TOKENWARDEN_MAX_CLOCK_SKEW_S
AHEAD_REASON = "ahead of the receiver's clock"


# --- the API ---------------------------------------------------------------------------------


@pytest.fixture
def fixed_clock(now: datetime) -> Iterator[Callable[[datetime], None]]:
    """The receiver's clock stands at ``now`` until moved; the wall clock again afterwards."""
    current = [now]
    clock.set_clock(lambda: current[0])
    try:
        yield lambda at: current.__setitem__(0, at)
    finally:
        clock.set_clock(None)


@pytest.fixture
def serve(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., TestClient]]:
    """The API on the test store, on settings made from keyword arguments only."""
    for name in [n for n in os.environ if n.startswith("TOKENWARDEN_")]:
        if not name.startswith("TOKENWARDEN_TEST_"):
            monkeypatch.delenv(name)
    opened: list[tuple[TestClient, Any]] = []

    def start(**options: Any) -> TestClient:
        settings = Settings(
            home=tmp_path / "home", producer_keys=(KEY,), database_url=store.url, **options
        )
        celery_app = make_celery(settings)
        client = TestClient(create_app(settings, celery_app=celery_app))
        client.__enter__()
        opened.append((client, celery_app))
        return client

    yield start
    for client, celery_app in opened:
        client.__exit__(None, None, None)
        celery_app.close()
    store.truncate()


def inbox_rows(store: Store) -> dict[str, InboxEvent]:
    with db.transaction(store.engine) as session:
        return {row.id: row for row in session.scalars(select(InboxEvent))}


@pytest.mark.parametrize(
    "time",
    [4102444800000, 1_700_000_000, 1.7e9, True, "4102444800000", "2026-11-27", "2026-11-27T19:00Z"],
    ids=["milliseconds", "seconds", "float", "boolean", "digits", "date", "no-seconds"],
)
def test_a_time_that_is_not_an_rfc3339_string_is_refused_and_nothing_stored(
    serve: Callable[..., TestClient], store: Store, fixed_clock: Any, time: Any
) -> None:
    api = serve()
    sent = cloud(REMOVED, {"org_id": "acme", "user_id": "u-1"}, time=time)

    response = api.post("/v1/events", json=sent, headers=AUTH)

    assert response.status_code == 422, response.text
    assert "time: must be an RFC 3339" in response.json()["detail"]
    assert inbox_rows(store) == {}


def test_an_event_more_than_the_skew_ahead_is_refused_with_its_batch(
    serve: Callable[..., TestClient], store: Store, now: datetime, fixed_clock: Any
) -> None:
    api = serve()
    batch = [
        cloud(REMOVED, {"org_id": "acme", "user_id": "u-1"}, time=now),
        cloud(ADDED, {"org_id": "acme", "user_id": "u-1", "role": "user"}, time=now + SKEW * 12),
        cloud(
            ADDED, {"org_id": "acme", "user_id": "u-2", "role": "user"}, time="9999-12-31T23:59:59Z"
        ),
        cloud(ADDED, {"org_id": "acme", "user_id": "u-3", "role": "user"}, time=now + SKEW),
    ]

    response = api.post("/v1/events", json=batch, headers=AUTH)
    alone = api.post("/v1/events", json=batch[1], headers=AUTH)

    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert [(e["index"], e["id"]) for e in errors] == [(1, batch[1]["id"]), (2, batch[2]["id"])]
    assert errors[0]["reason"] == (
        f"time: {(now + SKEW * 12).isoformat()} is more than 300 s {AHEAD_REASON} "
        f"({now.isoformat()}); check the producer's clock"
    )
    assert alone.status_code == 422
    assert alone.json()["detail"].startswith("invalid event: time: ")
    assert inbox_rows(store) == {}


def test_an_event_within_the_skew_is_accepted_and_stored_as_sent(
    serve: Callable[..., TestClient], store: Store, now: datetime, fixed_clock: Any
) -> None:
    api = serve()
    ahead = now + SKEW - timedelta(seconds=1)
    sent = cloud(ADDED, {"org_id": "acme", "user_id": "u-1", "role": "user"}, time=ahead)

    response = api.post("/v1/events", json=sent, headers=AUTH)

    assert response.status_code == 202, response.text
    row = inbox_rows(store)[sent["id"]]
    assert (row.time, row.received_at) == (ahead, now)


def test_the_allowed_skew_is_a_setting(
    serve: Callable[..., TestClient], store: Store, now: datetime, fixed_clock: Any
) -> None:
    api = serve(max_clock_skew_s=0)
    data = {"user_id": "u-1"}

    late = api.post("/v1/events", json=cloud(DEACTIVATED, data, time=now), headers=AUTH)
    early = api.post(
        "/v1/events",
        json=cloud(DEACTIVATED, data, time=now + timedelta(seconds=1)),
        headers=AUTH,
    )

    assert (late.status_code, early.status_code) == (202, 422)
    assert "more than 0 s ahead" in early.json()["detail"]


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "86401", "soon"])
def test_a_bad_skew_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TOKENWARDEN_MAX_CLOCK_SKEW_S", value)

    with pytest.raises(ConfigError, match=r"^TOKENWARDEN_MAX_CLOCK_SKEW_S: "):
        load_settings()


def test_the_python_client_refuses_a_time_that_is_not_rfc3339() -> None:
    data = {"user_id": "u-1"}
    assert make_event(DEACTIVATED, data, time="2026-11-27T19:00:00+01:00")["time"] == (
        "2026-11-27T19:00:00+01:00"
    )
    for time in ("1700000000", "2026-11-27", 4102444800000):
        with pytest.raises(ValueError, match="RFC 3339"):
            make_event(DEACTIVATED, data, time=time)  # type: ignore[arg-type]


# --- the worker --------------------------------------------------------------------------------


def test_an_event_too_far_ahead_of_its_receipt_is_dead_with_the_reason(
    session: Session, now: datetime
) -> None:
    user = unique_user()
    join(session, "acme", user, at=now - timedelta(days=1))
    far = received(
        session,
        cloud(
            ADDED,
            {"org_id": "globex", "user_id": user, "role": "admin"},
            time="9999-12-31T00:00:00Z",
        ),
        at=now,
    )
    fine = received(session, cloud(REMOVED, {"org_id": "acme", "user_id": user}, time=now), at=now)

    outcome = apply_pending(session, [far.id, fine.id], now=now, retryable=lambda _: False)

    assert (outcome.done, outcome.dead) == ([fine.id], [far.id])
    assert far.status == EventStatus.DEAD
    assert far.reason is not None
    assert far.reason.startswith("time: 9999-12-31T00:00:00+00:00 is more than 300 s ahead")
    assert session.get(Membership, ("globex", user)) is None


def test_removals_in_bulk_mark_one_too_far_ahead_dead_and_apply_the_others(
    session: Session, now: datetime
) -> None:
    users = [unique_user() for _ in range(3)]
    tokens = {}
    for user in users:
        join(session, "acme", user, at=now - timedelta(days=1))
        tokens[user] = pat(session, "acme", user, created=now - timedelta(hours=1))
    times = [now, now + timedelta(seconds=120), now + timedelta(days=365)]
    rows = [
        received(session, cloud(REMOVED, {"org_id": "acme", "user_id": user}, time=at), at=now)
        for user, at in zip(users, times, strict=True)
    ]

    outcome = apply_pending(session, [r.id for r in rows], now=now, retryable=lambda _: False)

    assert (sorted(outcome.done), outcome.dead) == (sorted([rows[0].id, rows[1].id]), [rows[2].id])
    assert AHEAD_REASON in (rows[2].reason or "")
    # The one dated two minutes ahead is ordered as of its arrival, and says so.
    assert rows[1].result == {"revoked": [tokens[users[1]].id], "ordered_at": now.isoformat()}
    assert member_of(session, "acme", users[1]).last_event_at == now
    assert member_of(session, "acme", users[2]).active
    assert verify_token(session, tokens[users[2]].token, now=now).usable


@pytest.fixture
def committed(store: Store, monkeypatch: pytest.MonkeyPatch, now: datetime) -> Iterator[Store]:
    """Tasks run in this process on the test store at ``now``; their rows are removed after."""
    monkeypatch.setattr(tasking, "store_engine", lambda: store.engine)
    clock.set_clock(lambda: now)
    store.truncate()
    try:
        yield store
    finally:
        clock.set_clock(None)
        store.truncate()


def test_the_queue_path_marks_an_event_too_far_ahead_dead_with_the_reason(
    committed: Store, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENWARDEN_MAX_CLOCK_SKEW_S", "60")
    get_settings.cache_clear()
    raws = [
        cloud(
            ADDED,
            {"org_id": "acme", "user_id": "u-1", "role": "user"},
            time=now + timedelta(seconds=61),
        ),
        cloud(
            ADDED,
            {"org_id": "acme", "user_id": "u-2", "role": "user"},
            time=now + timedelta(seconds=60),
        ),
    ]
    try:
        with db.transaction(committed.engine) as session:
            inbox.store_events(session, [parse_event(raw) for raw in raws], now=now)

        tokenwarden.tasks.events.process_events.run([raw["id"] for raw in raws])
    finally:
        get_settings.cache_clear()

    rows = inbox_rows(committed)
    ahead, within = rows[raws[0]["id"]], rows[raws[1]["id"]]
    assert (ahead.status, within.status) == (EventStatus.DEAD, EventStatus.DONE)
    assert "is more than 60 s ahead" in (ahead.reason or "")
    assert within.result == {"applied": True, "revoked": [], "ordered_at": now.isoformat()}
    with db.transaction(committed.engine) as session:
        assert session.get(Membership, ("acme", "u-1")) is None
        assert member_of(session, "acme", "u-2").last_event_at == now


# --- the scenario of the issue, through the API ---------------------------------------------


@pytest.mark.parametrize("leave", [REMOVED, DEACTIVATED])
def test_a_join_dated_ahead_does_not_outlast_the_leave_that_follows(
    serve: Callable[..., TestClient],
    store: Store,
    now: datetime,
    fixed_clock: Callable[[datetime], None],
    leave: str,
) -> None:
    api = serve()
    joined = {"org_id": "acme", "user_id": "u-42", "role": "user"}
    # An hour ahead, or a date in milliseconds: refused outright.
    for time in (now + timedelta(hours=1), 4102444800000):
        refused = api.post("/v1/events", json=cloud(ADDED, joined, time=time), headers=AUTH)
        assert refused.status_code == 422, refused.text
    # Four minutes ahead: within the skew, so accepted; it counts as of its arrival.
    join_event = cloud(ADDED, joined, time=now + timedelta(minutes=4))
    assert api.post("/v1/events", json=join_event, headers=AUTH).status_code == 202
    with db.transaction(store.engine) as session:
        apply_pending(session, [join_event["id"]], now=now, retryable=lambda _: False)
        issued = pat(session, "acme", "u-42", created=now + timedelta(seconds=30))
    # A minute later, from a producer with a good clock: the user leaves.
    fixed_clock(now + timedelta(minutes=1))
    data = {"user_id": "u-42"} if leave == DEACTIVATED else {"org_id": "acme", "user_id": "u-42"}
    leave_event = cloud(leave, data, time=now + timedelta(minutes=1))
    assert api.post("/v1/events", json=leave_event, headers=AUTH).status_code == 202

    later = now + timedelta(minutes=2)
    with db.transaction(store.engine) as session:
        outcome = apply_pending(session, [leave_event["id"]], now=later, retryable=lambda _: False)
        assert outcome.done == [leave_event["id"]]
        assert not member_of(session, "acme", "u-42").active
        assert verify_token(session, issued.token, now=later).reason == "revoked"
        assert no_pat_for(session, "acme", "u-42", at=later)
        stale = session.scalars(select(AuditEntry).where(AuditEntry.action == "stale")).all()
        assert stale == []
    assert inbox_rows(store)[join_event["id"]].result == {
        "applied": True,
        "revoked": [],
        "ordered_at": now.isoformat(),
    }


# --- shuffled timelines ------------------------------------------------------------------------

# The user starts as a member of the first two organizations, with a PAT in each; the third
# is known only from what the events say.
ORGS = ("acme", "globex", "initech")
STARTING = ("acme", "globex")
GAP = timedelta(seconds=60)  # between two arrivals


@dataclass(frozen=True)
class Step:
    """One event of a timeline: what it says, when it arrived, and the time it carries."""

    kind: str
    org: str
    role: str
    arrival: datetime
    time: datetime | None  # None: sent without one

    @property
    def accepted(self) -> bool:
        return self.time is None or self.time - self.arrival <= SKEW

    @property
    def key(self) -> datetime:
        """When it counts as having happened: its time, but no later than its arrival."""
        return self.arrival if self.time is None else min(self.time, self.arrival)

    def concerns(self, org: str) -> bool:
        return self.kind == DEACTIVATED or self.org == org


@st.composite
def timelines(draw: st.DrawFn) -> tuple[list[Step], list[list[int]]]:
    """Events arriving a minute apart, each dated by a clock that is right (give or take a
    delivery delay), ahead within the skew, or ahead beyond it; then an order of delivery to
    the worker, cut into messages."""
    start = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    steps = []
    count = draw(st.integers(min_value=1, max_value=7))
    for index in range(count):
        arrival = start + GAP * (index + 1)
        clock_kind = draw(st.sampled_from(["none", "right", "late", "ahead", "ahead", "far"]))
        # A distinct microsecond per event, so that no two events share a time.
        tick = timedelta(microseconds=index + 1)
        time = {
            "none": None,
            "right": arrival - timedelta(seconds=draw(st.integers(1, 50))) + tick,
            "late": arrival - timedelta(seconds=draw(st.integers(51, 1500))) + tick,
            "ahead": arrival + timedelta(seconds=draw(st.integers(1, 300))),
            "far": arrival + draw(st.sampled_from([timedelta(seconds=301), timedelta(days=3650)])),
        }[clock_kind]
        steps.append(
            Step(
                kind=draw(st.sampled_from([ADDED, ROLE_CHANGED, REMOVED, DEACTIVATED])),
                org=draw(st.sampled_from(ORGS)),
                role=draw(st.sampled_from(["admin", "user"])),
                arrival=arrival,
                time=time,
            )
        )
    order = draw(st.permutations(range(count)))
    cuts = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    messages: list[list[int]] = [[]]
    for position, cut in zip(order, cuts, strict=True):
        if cut and messages[-1]:
            messages.append([])
        messages[-1].append(position)
    return steps, messages


def _data(step: Step, user: str) -> dict[str, Any]:
    if step.kind == DEACTIVATED:
        return {"user_id": user}
    data: dict[str, Any] = {"org_id": step.org, "user_id": user}
    if step.kind in (ADDED, ROLE_CHANGED):
        data["role"] = step.role
    return data


@hypothesis.settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)
@hypothesis.given(timeline=timelines())
def test_shuffled_timelines_end_as_their_events_say_and_no_leaver_stays(
    session: Session, timeline: tuple[list[Step], list[list[int]]]
) -> None:
    """Whatever the order of delivery: a membership is active exactly when its newest join,
    removal or deactivation (each counted no later than its arrival) is a join; a PAT is
    usable only then, and only if nothing revoked it; an event too far ahead is dead with
    the reason; and a removal or deactivation is stale only against the time of an event
    that had arrived by then, never a time in the future."""
    steps, messages = timeline
    user = unique_user()
    start = steps[0].arrival - GAP
    joined = start - timedelta(hours=1)
    tokens = {}
    for org in STARTING:
        join(session, org, user, at=joined)
        tokens[org] = pat(session, org, user, created=start - timedelta(minutes=30))
    ids = []
    for index, step in enumerate(steps):
        raw = cloud(step.kind, _data(step, user), time=step.time, id_=f"{user}-e{index}")
        # The API refuses exactly the events the worker would mark dead.
        prepared = intake.prepare(json.dumps(raw).encode())
        try:
            intake.refuse_future(prepared, now=step.arrival, max_skew=SKEW)
        except intake.Refused:
            assert not step.accepted
        else:
            assert step.accepted
        ids.append(received(session, raw, at=step.arrival).id)
    done = steps[-1].arrival + GAP
    for message in messages:
        apply_pending(session, [ids[i] for i in message], now=done, retryable=lambda _: False)

    accepted = [step for step in steps if step.accepted]
    for index, step in enumerate(steps):
        row = session.get(InboxEvent, ids[index])
        assert row is not None
        if step.accepted:
            assert row.status == EventStatus.DONE, row.reason
        else:
            assert row.status == EventStatus.DEAD
            assert AHEAD_REASON in (row.reason or "")
    for org in ORGS:
        activity = [(joined, True)] if org in STARTING else []
        activity += [
            (step.key, step.kind == ADDED)
            for step in accepted
            if step.kind in (ADDED, REMOVED, DEACTIVATED) and step.concerns(org)
        ]
        roles = [(joined, "user")] if org in STARTING else []
        roles += [
            (step.key, step.role)
            for step in accepted
            if step.kind in (ADDED, ROLE_CHANGED) and step.org == org
        ]
        active = bool(activity) and max(activity)[1]
        found = session.get(Membership, (org, user))
        assert (found is not None and found.active) == active, (org, steps, messages)
        if found is not None and active:
            assert found.role == max(roles)[1]
        # A PAT issued now works exactly when the membership is active.
        assert no_pat_for(session, org, user, at=done) != active
        if org in STARTING:
            left = any(
                step.kind in (REMOVED, DEACTIVATED) and step.concerns(org) for step in accepted
            )
            usable = verify_token(session, tokens[org].token, now=done).usable
            assert usable == (active and not left), (org, steps, messages)
        # No removal or deactivation was outdated by a time beyond an event's arrival.
        counted = {key.isoformat() for key, _ in activity}
        for stale in session.scalars(
            select(AuditEntry).where(
                AuditEntry.user_id == user,
                AuditEntry.org_id == org,
                AuditEntry.action == "stale",
                AuditEntry.reason.in_([REMOVED, DEACTIVATED]),
            )
        ):
            assert stale.detail is not None
            assert stale.detail["applied_time"] in counted, (stale.detail, steps, messages)
