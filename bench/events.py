"""membership.removed events drained by a real worker, beside no-op Celery tasks on the same broker.

Each event removes one member, revoking their 5 personal tokens and sparing the application
token they created. The events are stored in the inbox in bulk before the clock starts (as the
API would have stored them), then their ids are published in messages of
``worker.runtime.publishing.CHUNK``; the
drain is timed from the first publish until no event is pending.

The limit is what the broker and Celery can deliver at all: a bench-only worker
(``bench/_noop_app.py``) with the same configuration, pool, concurrency, prefetch and log level
drains pre-filled no-op tasks, timed from its first message to its last. The ratio is
events/s over no-op tasks/s, the median of the per-run ratios (each run measures both, one
right after the other). ``--pools prefork,threads`` measures both pools (twice the time);
the headline is prefork, the default of ``tokenwarden worker``.

    .venv/bin/python bench/events.py [--runs 3] [--events 10000] [--pools prefork,threads]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from celery import Celery
from sqlalchemy import func, select

from bench import common
from tokenwarden.config.celery import celery_config
from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.events import CloudEvent, parse_event
from tokenwarden.worker.domain.inbox import store_events
from tokenwarden.worker.domain.models import EventStatus, InboxEvent, Token, TokenKind
from tokenwarden.worker.runtime.publishing import publish_event_ids

NAME: Final = "events"
TARGET: Final = 0.7
UNIT: Final = "events/s"
PATS: Final = 5
AATS: Final = 1
NOOP_IDS: Final = [f"evt-noop-{i:06d}" for i in range(100)]


@dataclass
class PoolResult:
    pool: str
    noop: list[float] = field(default_factory=list)
    events: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    @property
    def value(self) -> float:
        return common.median(self.events)

    @property
    def baseline(self) -> float:
        return common.median(self.noop)

    @property
    def ratio(self) -> float:
        return common.median(self.ratios)


def celery_app(run: common.Bench, queue: str | None = None) -> Celery:
    """A producer-side Celery app on the run's broker and queue (no tasks of its own)."""
    app = Celery("tokenwarden-bench")
    app.conf.update(celery_config(run.settings(queue=queue)))
    return app


def removals(members: list[common.Member], *, tag: str, at: datetime) -> list[CloudEvent]:
    return [
        parse_event(
            {
                "specversion": "1.0",
                "id": f"evt-{tag}-{index:07d}",
                "source": "bench://events",
                "type": "membership.removed",
                "time": at.isoformat(),
                "data": {"org_id": member.org_id, "user_id": member.user_id},
            }
        )
        for index, member in enumerate(members)
    ]


def pending(run: common.Bench) -> int:
    with run.engine().connect() as connection:
        return int(
            connection.scalar(
                select(func.count())
                .select_from(InboxEvent)
                .where(InboxEvent.status == EventStatus.PENDING.value)
            )
            or 0
        )


def store(run: common.Bench, events: list[CloudEvent]) -> list[str]:
    with db.transaction(run.engine()) as session:
        stored = store_events(session, events, now=datetime.now(UTC))
    return stored.to_publish


def warm_up(run: common.Bench, app: Celery, worker: common.Child, concurrency: int) -> None:
    """A few small messages, so every pool process has connected before the clock runs."""
    members = common.populate(
        run.engine(), users=8 * concurrency, pats=PATS, aats=AATS, admins=1, prefix="w"
    )
    ids = store(run, removals(members, tag="warm", at=datetime.now(UTC)))
    for start in range(0, len(ids), 4):
        publish_event_ids(app, ids[start : start + 4])
    common.wait_until(
        lambda: pending(run) == 0, timeout_s=120, what="the warm-up events", watch=[worker]
    )


def drain_events(
    run: common.Bench, app: Celery, worker: common.Child, count: int, tag: str
) -> float:
    """Events/s for ``count`` removals, from the first publish until none is pending."""
    run.truncate()
    members = common.populate(run.engine(), users=count, pats=PATS, aats=AATS, admins=1)
    ids = store(run, removals(members, tag=tag, at=datetime.now(UTC)))
    started = time.perf_counter()
    publish_event_ids(app, ids)
    ended = common.wait_until(
        lambda: pending(run) == 0,
        timeout_s=max(120.0, count / 40),
        what=f"{count} events to be applied",
        watch=[worker],
    )
    check_outcome(run, count)
    settle(run)
    return count / (ended - started)


def settle(run: common.Bench) -> None:
    """Drop what the events caused and the worker has not done yet (notice deliveries).

    Otherwise the worker would still be busy with them, on the same cores, while the next
    no-op drain is timed; and a 10,000-event run leaves 10,000 of them. The next run starts
    from an emptied database anyway.
    """
    common.purge_queue(run.broker_url, run.queue)
    time.sleep(1.0)  # the few messages the worker had already reserved


def check_outcome(run: common.Bench, count: int) -> None:
    """Every event done, every PAT revoked, every AAT alive: else the figure means nothing."""
    with run.engine().connect() as connection:
        statuses = dict(
            connection.execute(
                select(InboxEvent.status, func.count()).group_by(InboxEvent.status)
            ).all()
        )
        revoked = dict(
            connection.execute(
                select(Token.kind, func.count())
                .where(Token.revoked_at.is_not(None))
                .group_by(Token.kind)
            ).all()
        )
    done = statuses.get(EventStatus.DONE.value, 0)
    pats = revoked.get(TokenKind.PERSONAL.value, 0)
    aats = revoked.get(TokenKind.APPLICATION.value, 0)
    if done != count or pats != PATS * count or aats:
        raise common.BenchError(
            f"wrong outcome: {statuses} events, {pats} PATs revoked (expected {PATS * count}), "
            f"{aats} AATs revoked (expected 0)"
        )


def drain_noops(
    run: common.Bench, args: argparse.Namespace, pool: str, count: int, tag: str
) -> float:
    """No-op tasks/s: a pre-filled queue drained by a fresh bench-only worker."""
    queue = run.extra_queue(f"noop-{pool}")
    first, last = run.home / f"first-{tag}", run.home / f"last-{tag}"
    app = celery_app(run, queue)
    try:
        with app.producer_or_acquire() as producer:
            app.send_task("bench.mark", args=[str(first)], producer=producer)
            for _ in range(count):
                app.send_task("bench.noop", args=[NOOP_IDS], producer=producer)
            app.send_task("bench.mark", args=[str(last)], producer=producer)
    finally:
        app.close()
    argv = common.celery_worker(
        "bench._noop_app", pool=pool, concurrency=args.concurrency, log_level=args.log_level
    )
    log = run.home / "logs" / f"noop-{pool}.log"
    with common.Child("no-op worker", argv, run.child_env(queue=queue), log) as worker:
        common.wait_until(
            last.exists,
            timeout_s=max(120.0, count / 100),
            what=f"{count} no-op tasks",
            interval_s=0.01,
            watch=[worker],
        )
    started, ended = float(first.read_text()), float(last.read_text())
    return count / (ended - started)


def measure_pool(run: common.Bench, args: argparse.Namespace, pool: str) -> PoolResult:
    measured = PoolResult(pool)
    argv = common.tokenwarden(
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(args.concurrency),
        "--log-level",
        args.log_level,
    )
    log = run.home / "logs" / f"worker-{pool}.log"
    app = celery_app(run)
    try:
        with common.Child(f"{pool} worker", argv, run.child_env(), log) as worker:
            warm_up(run, app, worker, args.concurrency)
            for number in range(args.runs):
                tag = f"{pool}-{number}"
                noop = drain_noops(run, args, pool, args.noop_tasks, tag)
                events = drain_events(run, app, worker, args.events, tag)
                measured.noop.append(noop)
                measured.events.append(events)
                measured.ratios.append(common.ratio(events, noop))
                print(
                    f"  {pool} run {number + 1}: no-op {noop:,.0f} tasks/s, "
                    f"events {events:,.0f} events/s, ratio {events / noop:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        app.close()
    return measured


def options(argv: list[str] | None) -> argparse.Namespace:
    parsed = common.parser(__doc__.splitlines()[0] if __doc__ else NAME)
    parsed.add_argument("--events", type=int, default=None, help="events per run (10000)")
    parsed.add_argument("--noop-tasks", type=int, default=None, help="no-op tasks per run (5000)")
    parsed.add_argument(
        "--pools",
        default="prefork",
        help="comma-separated Celery pools to measure, e.g. prefork,threads (default: prefork, "
        "the default of tokenwarden worker)",
    )
    parsed.add_argument(
        "--concurrency",
        type=int,
        default=os.cpu_count() or 2,
        help="worker pool size (default: one per core, as tokenwarden worker)",
    )
    parsed.add_argument("--log-level", default="info", help="both workers' log level")
    args = common.parse(parsed, argv)
    args.events = args.events or common.pick(args, 10_000, 300)
    args.noop_tasks = args.noop_tasks or common.pick(args, 5_000, 300)
    args.pools = [pool.strip() for pool in args.pools.split(",") if pool.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = options(argv)
    try:
        with common.bench(NAME, args) as run:
            results = [measure_pool(run, args, pool) for pool in args.pools]
    except (common.BenchError, OSError) as error:
        return common.failed(NAME, error, unit=UNIT, target=TARGET)
    rows: list[list[Any]] = [
        [r.pool, r.value, r.baseline, r.ratio, min(r.ratios), max(r.ratios)] for r in results
    ]
    print(
        f"{args.events:,} membership.removed events ({PATS} PATs revoked, {AATS} AAT spared "
        f"each), {args.runs} run(s), concurrency {args.concurrency}, log level {args.log_level}"
    )
    print(
        common.table(["pool", "events/s", "no-op tasks/s", "ratio", "min ratio", "max ratio"], rows)
    )
    headline = next((r for r in results if r.pool == "prefork"), results[0])
    best = max(results, key=lambda r: r.value)
    print(f"headline: {headline.pool} (prefork is the default of `tokenwarden worker`)")
    if len(results) > 1:
        print(f"fastest pool: {best.pool}")
    outcome = common.result(
        NAME,
        value=headline.value,
        baseline=headline.baseline,
        ratio=headline.ratio,
        target=TARGET,
        ok=headline.ratio >= TARGET,
        unit=UNIT,
        pool=headline.pool,
        fastest_pool=best.pool,
        pools={
            r.pool: {
                "value": common.rounded(r.value, 1),
                "baseline": common.rounded(r.baseline, 1),
                "ratio": common.rounded(r.ratio),
            }
            for r in results
        },
        events=args.events,
        runs=args.runs,
        concurrency=args.concurrency,
        short=args.short,
    )
    return common.finish(outcome, short=args.short)


if __name__ == "__main__":
    sys.exit(main())
