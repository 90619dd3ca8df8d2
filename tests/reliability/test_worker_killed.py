"""A worker SIGKILLed again and again while a load of events goes through the API.

On Postgres + RabbitMQ: 10,000 events and at least 20 kills. On the embedded default
(SQLite and the file-backed broker, whose transport drops a message taken by a worker that
dies, so only the inbox re-drive brings those events back): 1,000 events and 5 kills, to
keep the suite's time in bounds. Each kill comes at a random moment of a worker's working
life (after it is ready, before it has drained the load), mostly while it holds a batch in an
open transaction. On the server broker two single-process workers take turns being killed, so
that the load keeps moving while one restarts; the embedded default runs one worker.

The oracle (tests/reliability/workload.py) says what every token and membership must look like
afterwards; the test fails on any event lost or applied twice, any token or membership in the
wrong state, any revocation without its one audit row, any notice missing or with a second id.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import service_url
from tests.reliability.conftest import SeededRandom, store_url
from tests.reliability.evidence import Evidence
from tests.reliability.figures import Figures
from tests.reliability.harness import Feeder, WebhookReceiver, chaos_stack
from tests.reliability.workload import (
    CHEAP_MIX,
    DEFAULT_MIX,
    Oracle,
    Universe,
    judge,
    judge_deliveries,
    make_events,
    notices_wired,
)

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

VARIANTS = [
    pytest.param(
        "rabbitmq",
        10_000,
        20,
        id="postgres-rabbitmq",
        marks=[pytest.mark.postgres, pytest.mark.rabbitmq],
    ),
    pytest.param("embedded", 1_000, 5, id="embedded"),
]
# How long a kill cycle lasts on average: a worker's start, plus the random wait after it.
CYCLE_S = 2.5


@pytest.mark.timeout(420)
@pytest.mark.parametrize(("kind", "count", "kills"), VARIANTS)
def test_worker_killed_mid_load_loses_nothing(
    kind: str,
    count: int,
    kills: int,
    tmp_path: Path,
    evidence: Evidence,
    rng: SeededRandom,
) -> None:
    figures = Figures(f"worker_killed[{kind}]", {"seed": rng.seed_value})
    broker = service_url("rabbitmq") if kind == "rabbitmq" else None
    wired = notices_wired()
    home = tmp_path / "home"
    with (
        store_url(kind, home) as database_url,
        WebhookReceiver() as receiver,
        chaos_stack(
            home,
            evidence=evidence,
            label=f"worker-killed-{kind}",
            database_url=database_url,
            broker_url=broker,
            webhook_url=receiver.url,
            roles=("api", "beat"),
        ) as stack,
    ):
        big = count >= 5000
        universe = Universe.build(
            rng,
            orgs=max(5, count // 200),
            users=count // 10 if big else count // 3,
            deactivatable=max(5, count // 500),
        )
        with stack.session() as session:
            universe.seed(session, rng, pat_ratio=0.5, aats=3)
        events = make_events(universe, rng, count=count, mix=CHEAP_MIX if big else DEFAULT_MIX)
        evidence.add_tokens(t.text for t in universe.tokens)
        evidence.add_tokens(e["data"]["token"] for e in events if "token" in e["data"])
        oracle = Oracle.compute(universe, events)

        # On a server broker, two workers of one process each: while one restarts the other
        # goes on, so twenty restarts do not stall the load. The embedded default runs one.
        workers = ["worker-a", "worker-b"] if kind != "embedded" else ["worker"]
        concurrency = 1 if len(workers) > 1 else 2
        several = len(workers) > 1
        for name in workers:
            stack.start_worker(name, concurrency=concurrency, own_node=several)
        for name in workers:
            stack.wait_ready(name)
        figures.started = time.monotonic()
        # Spread the load over the kills, so that every one lands while events are in flight.
        pace = max(0.0, (kills * CYCLE_S / len(workers)) / (count / 100) - 0.05)
        feeder = Feeder(stack.api_url, events, batch=100, pause_s=pace)
        feeder.start()
        killed = mid_load = 0
        while killed < kills:
            victim = workers[killed % len(workers)]
            stack.wait_ready(victim)
            time.sleep(rng.uniform(0.1, 1.5))  # a random moment of its working life
            busy = feeder.is_alive() or stack.pending() > 0
            stack.kill(victim)
            killed += 1
            mid_load += int(busy)
            if killed % 5 == 1 and len(workers) == 1:  # what waits while no worker runs
                stack.keep_queue(evidence, f"worker-killed-{kind}-kill{killed}")
            stack.start_worker(victim, concurrency=concurrency, own_node=several)
        feeder.join(timeout=300)
        assert not feeder.is_alive(), "the feeder did not finish"
        load_s = time.monotonic() - figures.started
        counts = stack.wait_settled(len(events), timeout=240)
        settle_s = time.monotonic() - figures.started - load_s
        if wired:
            stack.wait_for(stack.notices_settled, timeout=240, message="notices delivered")
        notices_s = time.monotonic() - figures.started - load_s - settle_s
        messages = stack.received()
        with stack.session() as session:
            verdict = judge(
                session, universe, oracle, accepted=feeder.accepted, check_notices=wired
            )
            if wired:
                delivery_figures, delivery_problems = judge_deliveries(
                    session, receiver.delivered()
                )
                verdict.figures.update(delivery_figures)
                verdict.problems += delivery_problems
        figures.set(**verdict.figures)
        figures.set(
            sigkills=killed,
            sigkills_while_loaded=mid_load,
            client_retries=feeder.retries,
            client_gave_up=len(feeder.failures),
            inbox=counts,
            notices="checked" if wired else "not produced yet (tasks.notices missing)",
            bad_signatures=receiver.bad_signatures,
            load_s=round(load_s, 1),
            settle_s=round(settle_s, 1),
            notices_settle_s=round(notices_s, 1),
            messages_taken=messages,
            messages_peeked=stack.peeked,
        )
        figures.publish(evidence.root)
        assert not feeder.failures, feeder.failures[:5]
        assert killed >= kills
        assert receiver.bad_signatures == 0
        verdict.assert_clean()
