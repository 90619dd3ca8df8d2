"""Malformed messages straight onto the broker queue, with good events in between.

A thousand poison messages (on Postgres + RabbitMQ; 200 on the embedded default, whose
file-backed transport re-reads its folder per message) of a dozen kinds: bodies that are not
JSON, arguments of the wrong type or size, unknown tasks, unknown or invalid event types
stored in the inbox, huge bodies, ids that name no event or hold a NUL character, a pickle the
worker must refuse to load, binary garbage, messages without a task, raw token text in a body.
Every one must leave a dead letter (or a dead inbox event) with its reason, no raw token may be
kept, the worker must stay up, never restart, and apply every good event sent between them.
"""

from __future__ import annotations

import json
import pickle
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kombu.connection import Connection
from sqlalchemy import insert, select

from tests.conftest import service_url
from tests.reliability.conftest import SeededRandom, store_url
from tests.reliability.evidence import Evidence
from tests.reliability.figures import Figures
from tests.reliability.harness import ChaosStack, WebhookReceiver, chaos_stack
from tests.reliability.workload import cloud_event
from tokenwarden.worker.domain.models import (
    DeadLetter,
    EventStatus,
    InboxEvent,
    Notice,
    NoticeStatus,
    TokenKind,
)
from tokenwarden.worker.domain.notices import LEAKED
from tokenwarden.worker.domain.notices import queue as queue_notice
from tokenwarden.worker.domain.tokens import TOKEN_PATTERN, generate

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

VARIANTS = [
    pytest.param(
        "rabbitmq",
        1_000,
        id="postgres-rabbitmq",
        marks=[pytest.mark.postgres, pytest.mark.rabbitmq],
    ),
    pytest.param("embedded", 200, id="embedded"),
]
GOOD_EVERY = 20  # a good event after every this many poison messages
HUGE_BYTES = 512 * 1024
DELIVER = "tokenwarden.deliver_notices"


@dataclass
class Poison:
    kind: str
    marker: str
    # Where the trace must be: a dead letter naming the marker, or a dead inbox event.
    in_inbox: bool = False


def _args(*args: Any, **kwargs: Any) -> str:
    return json.dumps([list(args), kwargs, {"callbacks": None, "errbacks": None}])


def _kinds(
    stack: ChaosStack, token: str, connection: Connection
) -> list[tuple[str, Callable[[str], Poison]]]:
    """Each kind of poison: a name, and a function that publishes one with a marker."""

    def send(body: str | bytes, kind: str, marker: str, **options: Any) -> Poison:
        stack.publish_raw(body, connection=connection, **options)
        return Poison(kind, marker)

    def inbox_event(kind: str, marker: str, type_: str, data: dict[str, Any]) -> Poison:
        now = datetime.now(UTC)
        with stack.session() as session:
            session.execute(
                insert(InboxEvent).values(
                    id=marker,
                    type=type_,
                    source="chaos://poison",
                    time=now,
                    data=data,
                    digest="0" * 64,
                    status=EventStatus.PENDING.value,
                    attempts=0,
                    received_at=now,
                    published_at=now,
                )
            )
        stack.publish_ids([marker], connection=connection)
        return Poison(kind, marker, in_inbox=True)

    return [
        ("bad_json", lambda m: send(f'{{"{m}": not json', "bad_json", m)),
        ("truncated_json", lambda m: send(_args([m])[:-7], "truncated_json", m)),
        ("args_not_a_list", lambda m: send(_args({"ids": m}), "args_not_a_list", m)),
        ("ids_of_wrong_type", lambda m: send(_args([m, 42, None]), "ids_of_wrong_type", m)),
        ("id_too_long", lambda m: send(_args([m + "x" * 300]), "id_too_long", m)),
        ("too_many_ids", lambda m: send(_args([m] * 1001), "too_many_ids", m)),
        ("unexpected_kwargs", lambda m: send(_args([m], evil=True), "unexpected_kwargs", m)),
        (
            "unknown_task",
            lambda m: send(_args([m]), "unknown_task", m, task="tokenwarden.drop_tables"),
        ),
        ("no_such_event", lambda m: send(_args([m]), "no_such_event", m)),
        ("nul_in_id", lambda m: send(_args([m + "\x00"]), "nul_in_id", m)),
        (
            "notice_ids_of_wrong_type",
            lambda m: send(_args({"id": m}), "notice_ids_of_wrong_type", m, task=DELIVER),
        ),
        (
            "huge_body",
            lambda m: send(f'["{m}"' + " " * HUGE_BYTES + "oops", "huge_body", m),
        ),
        (
            "pickle",
            lambda m: send(
                pickle.dumps(([m], {}, {})),
                "pickle",
                m,
                content_type="application/x-python-serialize",
                content_encoding="binary",
            ),
        ),
        (
            "binary_garbage",
            lambda m: send(
                m.encode() + bytes(range(256)),
                "binary_garbage",
                m,
                content_type="application/octet-stream",
                content_encoding="binary",
            ),
        ),
        ("not_a_task", lambda m: send(_args([m]), "not_a_task", m, task=None)),
        ("raw_token", lambda m: send(f"{m} leaked {token} here", "raw_token", m)),
        (
            "unknown_event_type",
            lambda m: inbox_event("unknown_event_type", m, "membership.exploded", {"x": 1}),
        ),
        (
            "invalid_event_data",
            lambda m: inbox_event("invalid_event_data", m, "membership.removed", {"org_id": 7}),
        ),
    ]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("kind", "count"), VARIANTS)
def test_poison_messages_are_dead_lettered_and_the_worker_carries_on(
    kind: str, count: int, tmp_path: Path, evidence: Evidence, rng: SeededRandom
) -> None:
    figures = Figures(f"poison[{kind}]", {"seed": rng.seed_value})
    broker = service_url("rabbitmq") if kind == "rabbitmq" else None
    home = tmp_path / "home"
    token = generate(TokenKind.PERSONAL)
    evidence.add_tokens([token])
    prefix = f"poison{uuid.uuid4().hex[:6]}"
    with (
        store_url(kind, home) as database_url,
        chaos_stack(
            home,
            evidence=evidence,
            label=f"poison-{kind}",
            database_url=database_url,
            broker_url=broker,
            roles=("api", "worker"),
        ) as stack,
    ):
        stack.wait_ready("worker")
        worker_pid = stack.processes["worker"].pid
        sent: list[Poison] = []
        good: list[str] = []
        started = time.monotonic()
        with stack.connection() as connection:
            kinds = _kinds(stack, token, connection)
            for number in range(count):
                name, make = kinds[number % len(kinds)]
                sent.append(make(f"{prefix}-{name}-{number}"))
                if number % GOOD_EVERY == GOOD_EVERY - 1:
                    event = cloud_event(
                        f"{prefix}-good-{number}",
                        "membership.added",
                        {"org_id": f"{prefix}-org", "user_id": f"u{number}", "role": "user"},
                        datetime.now(UTC),
                    )
                    good += stack.send(event)
        publish_s = time.monotonic() - started

        deadline = time.monotonic() + 120
        while (untraced := _untraced(stack, sent)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not untraced, "no dead letter for: " + ", ".join(
            sorted({f"{p.kind} ({p.marker})" for p in untraced})[:20]
        )
        stack.wait_settled(len(good) + sum(p.in_inbox for p in sent), timeout=60)
        settle_s = time.monotonic() - started - publish_s
        time.sleep(2)  # nothing comes back: a dead letter is never redelivered
        with stack.session() as session:
            letters = session.execute(
                select(DeadLetter.reason, DeadLetter.body, DeadLetter.event_id)
            ).all()
            applied = set(
                session.scalars(
                    select(InboxEvent.id).where(
                        InboxEvent.id.in_(good), InboxEvent.status == EventStatus.DONE
                    )
                )
            )
            dead_events = session.execute(
                select(InboxEvent.id, InboxEvent.reason).where(
                    InboxEvent.status == EventStatus.DEAD
                )
            ).all()
        leftover = stack.peek_queue()
        by_kind: dict[str, int] = {}
        for poison in sent:
            by_kind[poison.kind] = by_kind.get(poison.kind, 0) + 1
        without_reason = [row for row in letters if not (row.reason or "").strip()]
        raw_tokens = [row for row in letters if TOKEN_PATTERN.search(row.body or "")]
        too_long = [row for row in letters if len(row.body or "") > 2000]
        duplicated = len(letters) - len({_marker_of(row, prefix) for row in letters})
        figures.set(
            poison_sent=len(sent),
            kinds=len(by_kind),
            dead_letters=len(letters),
            dead_inbox_events=len(dead_events),
            untraced=len(_untraced(stack, sent)),
            dead_letters_without_reason=len(without_reason),
            dead_letters_twice=duplicated,
            raw_tokens_kept=len(raw_tokens),
            bodies_over_2000_chars=len(too_long),
            good_sent=len(good),
            good_applied=len(applied),
            worker_restarts=0 if stack.processes["worker"].pid == worker_pid else 1,
            worker_alive=stack.alive("worker"),
            queue_left=len(leftover),
            publish_s=round(publish_s, 1),
            settle_s=round(settle_s, 1),
        )
        figures.publish(evidence.root)
        assert stack.alive("worker"), stack.log("worker")[-3000:]
        assert set(good) == applied, "a good event between the poison was not applied"
        assert not without_reason
        assert not raw_tokens, raw_tokens[:3]
        assert not too_long
        assert duplicated == 0, "a poison message was dead-lettered more than once"
        assert not leftover, f"{len(leftover)} messages still on the queue"
        assert all(reason for _, reason in dead_events)


def _untraced(stack: ChaosStack, sent: list[Poison]) -> list[Poison]:
    """The poison messages that left no dead letter (nor, for inbox ones, a dead event)."""
    with stack.session() as session:
        texts = [
            f"{row.event_id or ''} {row.body or ''} {row.reason or ''}"
            for row in session.execute(
                select(DeadLetter.event_id, DeadLetter.body, DeadLetter.reason)
            )
        ]
        dead = set(
            session.scalars(select(InboxEvent.id).where(InboxEvent.status == EventStatus.DEAD))
        )
    haystack = "\n".join(texts)
    missing = []
    for poison in sent:
        if poison.in_inbox:
            if poison.marker not in dead:
                missing.append(poison)
        elif poison.marker not in haystack:
            missing.append(poison)
    return missing


def _marker_of(row: Any, prefix: str) -> str:
    text = f"{row.event_id or ''} {row.body or ''} {row.reason or ''}"
    start = text.find(prefix)
    if start < 0:
        return f"?{id(row)}"
    end = start
    while end < len(text) and (text[end].isalnum() or text[end] in "-_"):
        end += 1
    return text[start:end]


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("target", ["webhook", "none"])
def test_notice_messages_naming_no_notice_are_dead_lettered(
    tmp_path: Path, evidence: Evidence, target: str
) -> None:
    home = tmp_path / "home"
    prefix = f"n{uuid.uuid4().hex[:6]}"
    url = service_url("postgres")
    kind = "postgres" if url else "embedded"
    with (
        WebhookReceiver() as receiver,
        store_url(kind, home) as database_url,
        chaos_stack(
            home,
            evidence=evidence,
            label=f"poison-notices-{target}",
            database_url=database_url,
            broker_url=service_url("rabbitmq") if url else None,
            webhook_url=receiver.url if target == "webhook" else None,
            roles=("worker",),
        ) as stack,
    ):
        stack.wait_ready("worker")
        worker_pid = stack.processes["worker"].pid
        with stack.session() as session:
            real = queue_notice(
                session,
                kind=LEAKED,
                org_id=f"{prefix}-org",
                recipients=[{"user_id": "bob", "email": None}],
                data={"reason": "leaked", "tokens": []},
                now=datetime.now(UTC),
            )
        assert real is not None
        unknown = [f"{prefix}-{number}" for number in range(10)]
        shapes = {
            f"{prefix}-kwargs": _args([f"{prefix}-kwargs"], evil=True),
            f"{prefix}-two": _args([f"{prefix}-two"], [f"{prefix}-two"]),
            f"{prefix}-text": _args(f"{prefix}-text"),
            f"{prefix}-int": _args([f"{prefix}-int", 7]),
        }
        with stack.connection() as connection:
            # The real notice's message twice (a duplicate is a normal skip), poison around it.
            stack.publish_raw(_args([real]), task=DELIVER, connection=connection)
            for number, marker in enumerate(unknown):
                tail = "\x00" if number % 2 else ""
                stack.publish_raw(_args([marker + tail]), task=DELIVER, connection=connection)
            for body in shapes.values():
                stack.publish_raw(body, task=DELIVER, connection=connection)
            stack.publish_raw(_args([real]), task=DELIVER, connection=connection)
        sent = [Poison("notice_id", marker) for marker in [*unknown, *shapes]]
        deadline = time.monotonic() + 30
        while (untraced := _untraced(stack, sent)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not untraced, [p.marker for p in untraced]
        deadline = time.monotonic() + 30
        while stack.peek_queue() and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1)  # nothing more comes
        with stack.session() as session:
            letters = session.execute(
                select(DeadLetter.reason, DeadLetter.body, DeadLetter.event_id)
            ).all()
            status = session.scalar(select(Notice.status).where(Notice.id == real))
        markers = sorted(_marker_of(row, prefix) for row in letters)
        assert markers == sorted([*unknown, *shapes]), "one dead letter per unusable message"
        assert not [row for row in letters if real in (row.body or "") + row.reason]
        assert all(row.reason.startswith(("no such notice", "bad arguments")) for row in letters)
        assert stack.alive("worker")
        assert stack.processes["worker"].pid == worker_pid
        assert not stack.peek_queue()
        if target == "webhook":
            assert status == NoticeStatus.SENT
            assert receiver.delivered() == {real: 1}
            assert receiver.bad_signatures == 0
        else:
            assert status == NoticeStatus.PENDING
            assert receiver.delivered() == {}
