"""The broker or the database stopped and started again in the middle of a load.

Each test runs a private server (never the shared one) on a port of its own: RabbitMQ, whose
durable queue survives the restart; Redis without persistence, which comes back empty, as a
broker that lost its queue; Postgres, the token store itself. A load goes through the
Python producer client (which retries on 503 and on connection errors) while a prober posts
one event every tenth of a second with plain HTTP and records each answer. Afterwards every
event the API accepted (202) must be applied; the API must never answer 500; while the
database is down it must answer 503 with Retry-After.

The stack is ``tokenwarden run``, as a user runs it: the test never restarts a process. A
worker that the outage leaves unable to consume must recover by itself, or be restarted by
the product's supervisor (which the figures count).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import select

from tests.conftest import fresh_postgres_database, service_url
from tests.reliability.conftest import SeededRandom
from tests.reliability.evidence import Evidence
from tests.reliability.figures import Figures
from tests.reliability.harness import (
    RUN,
    UNRECOVERABLE,
    Feeder,
    Prober,
    WebhookReceiver,
    chaos_stack,
)
from tests.reliability.services import (
    PrivatePostgres,
    ServiceUnavailable,
    private_postgres,
    private_rabbitmq,
    private_redis,
)
from tests.reliability.workload import (
    DEFAULT_MIX,
    Oracle,
    Universe,
    judge,
    judge_deliveries,
    make_events,
    notices_wired,
)
from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.models import EventStatus, InboxEvent
from tokenwarden.worker.runtime.redis_transport import CLOSED

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

EVENTS = 1_500
LOAD_S = 12.0
OUTAGE_AFTER = 0.25  # the outage begins once this share of the load was accepted
OUTAGE_S = 4.0
# What the product's supervisor says when it restarts a worker (worker.ops.supervisor).
RESTARTED = re.compile(r"tokenwarden: the worker (exited|has not consumed)")

OUTAGES = [
    pytest.param(
        "rabbitmq", id="rabbitmq-restart", marks=[pytest.mark.postgres, pytest.mark.rabbitmq]
    ),
    pytest.param("redis", id="redis-restart", marks=[pytest.mark.postgres, pytest.mark.redis]),
    pytest.param(
        "postgres", id="postgres-restart", marks=[pytest.mark.postgres, pytest.mark.rabbitmq]
    ),
]


@contextmanager
def _private(kind: str) -> Iterator[tuple[str, str | None, Callable[[], None], Callable[[], None]]]:
    """(database URL, broker URL, stop, start) for an outage of ``kind``."""
    with ExitStack() as stack:
        try:
            if kind == "postgres":
                server = stack.enter_context(private_postgres())
                url = _create_database(server)
                yield url, service_url("rabbitmq"), server.stop, server.start
                return
            url = stack.enter_context(fresh_postgres_database())
            if kind == "rabbitmq":
                rabbit = stack.enter_context(private_rabbitmq())
                yield url, rabbit.url, rabbit.stop, rabbit.start
                return
            redis = stack.enter_context(private_redis())
            yield url, redis.url, redis.stop, redis.start
        except ServiceUnavailable as error:
            pytest.fail(f"cannot run a private {kind}: {error}", pytrace=False)


def _create_database(server: PrivatePostgres) -> str:
    with psycopg.connect(
        f"postgresql://postgres@127.0.0.1:{server.port}/postgres", autocommit=True
    ) as connection:
        connection.execute("CREATE DATABASE tokenwarden")
    url = f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/tokenwarden"
    db.upgrade(url)
    return url


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", OUTAGES)
def test_restart_mid_load_loses_no_accepted_event(
    kind: str, tmp_path: Path, evidence: Evidence, rng: SeededRandom
) -> None:
    figures = Figures(f"restart[{kind}]", {"seed": rng.seed_value})
    wired = notices_wired()
    with (
        _private(kind) as (database_url, broker_url, stop, start),
        WebhookReceiver() as receiver,
        chaos_stack(
            tmp_path / "home",
            evidence=evidence,
            label=f"restart-{kind}",
            database_url=database_url,
            broker_url=broker_url,
            webhook_url=receiver.url,
            roles=(),
        ) as stack,
    ):
        universe = Universe.build(rng, orgs=8, users=EVENTS // 4, deactivatable=5)
        with stack.session() as session:
            universe.seed(session, rng, pat_ratio=0.5, aats=2)
        events = make_events(universe, rng, count=EVENTS, mix=DEFAULT_MIX)
        evidence.add_tokens(t.text for t in universe.tokens)
        evidence.add_tokens(e["data"]["token"] for e in events if "token" in e["data"])
        oracle = Oracle.compute(universe, events)
        stack.start_run()
        stack.wait_ready(RUN, timeout=120)

        batch = 50
        feeder = Feeder(
            stack.api_url, events, batch=batch, pause_s=LOAD_S / (EVENTS / batch), attempts=40
        )
        prober = Prober(stack.api_url, f"probe{uuid.uuid4().hex[:6]}")
        figures.started = time.monotonic()
        feeder.start()
        prober.start()
        # Mid-load whatever the machine's speed: once a share of the events was accepted.
        stack.wait_for(
            lambda: len(feeder.accepted) >= EVENTS * OUTAGE_AFTER or not feeder.is_alive(),
            timeout=120,
            message="the load to be under way",
        )
        down_at = time.monotonic() - figures.started
        stop()
        time.sleep(OUTAGE_S)  # the length of the outage, part of the scenario
        start()
        up_at = time.monotonic() - figures.started
        feeder.join(timeout=180)
        assert not feeder.is_alive(), "the feeder did not finish"
        # Probes keep going until the API has accepted some again since the restart.
        stack.wait_for(
            lambda: any(a[0] > up_at and a[1] == 202 for a in prober.answers),
            timeout=120,
            message="a probe accepted after the restart",
        )
        prober.stop()
        counts = stack.wait_settled(len(events) + len(prober.accepted), timeout=240)
        if wired:
            stack.wait_for(stack.notices_settled, timeout=120, message="notices delivered")
        with stack.session() as session:
            verdict = judge(
                session, universe, oracle, accepted=feeder.accepted, check_notices=wired
            )
            if wired:
                delivery, problems = judge_deliveries(session, receiver.delivered())
                verdict.figures.update(delivery)
                verdict.problems += problems
            probes_done = set(
                session.scalars(
                    select(InboxEvent.id).where(
                        InboxEvent.id.in_(prober.accepted),
                        InboxEvent.status == EventStatus.DONE,
                    )
                )
            )
        during = [a for a in prober.answers if down_at <= a[0] <= up_at + 2]
        unavailable = [a for a in prober.answers if a[1] == 503]
        figures.set(**verdict.figures)
        figures.set(
            faults=f"{kind} stopped at {down_at:.1f}s, started again at {up_at:.1f}s",
            probes=len(prober.answers),
            probe_statuses=prober.statuses(),
            probe_statuses_during_outage=_tally(during),
            probes_accepted=len(prober.accepted),
            probes_applied=len(probes_done),
            retry_after_missing=sum(1 for a in unavailable if not a[2]),
            client_retries=feeder.retries,
            client_gave_up=len(feeder.failures),
            worker_unrecoverable_errors=stack.log(RUN).count(UNRECOVERABLE),
            worker_old_channel_errors=stack.log(RUN).count(CLOSED),
            worker_restarted_by_supervisor=len(RESTARTED.findall(stack.log(RUN))),
            inbox=counts,
        )
        figures.publish(evidence.root)

        assert not feeder.failures, feeder.failures[:5]
        assert 500 not in prober.statuses(), "the API answered 500"
        assert all(a[2] for a in unavailable), "a 503 without Retry-After"
        assert set(prober.accepted) == probes_done, "a probe accepted with 202 was not applied"
        if kind == "postgres":
            assert any(a[1] == 503 for a in during), "no 503 while the database was down"
        verdict.assert_clean()


def _tally(answers: list[tuple[float, int, str | None]]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for _, status, _ in answers:
        counts[status] = counts.get(status, 0) + 1
    return counts
