"""membership.removed events drained by a real worker, beside no-op Celery tasks on the same broker.

Each event removes one member, revoking their 5 personal tokens and sparing the application
token they created. The events are stored in the inbox in bulk before the clock starts (as the
API would have stored them), then their ids are published one message per event, as the API
publishes single events that arrive apart; the drain is timed from the first publish until no
event is pending. For context, each run also drains as many events published
``worker.runtime.publishing.CHUNK`` to a message (a backlog re-driven, or a batch POST), and
writes the same end state by raw SQL in one transaction (memberships ended, tokens revoked,
audit rows, one notice per member, events done: Postgres only), the database's own ceiling.
The worker's peak RSS per process (``VmHWM`` of the worker and its pool) is reported too.

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
from sqlalchemy import exists, func, select, text

from bench import common
from tokenwarden.config.celery import celery_config
from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.events import CloudEvent, parse_event
from tokenwarden.worker.domain.inbox import store_events
from tokenwarden.worker.domain.models import EventStatus, InboxEvent, Token, TokenKind
from tokenwarden.worker.runtime.publishing import CHUNK, publish_event_ids

NAME: Final = "events"
TARGET: Final = 1.0
MAX_RSS_MB: Final = 150.0
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
    chunked: list[float] = field(default_factory=list)
    raw_sql: list[float] = field(default_factory=list)
    rss_mb: float = 0.0

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


def none_pending(run: common.Bench) -> bool:
    """No event is pending. Polled every 20 ms during a drain, so it must cost the database
    little: it stops at the first pending row, where counting them all read the whole backlog
    each time (a twentieth of a core, taken from the worker it measures)."""
    with run.engine().connect() as connection:
        return not connection.scalar(
            select(exists().where(InboxEvent.status == EventStatus.PENDING.value))
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
        lambda: none_pending(run), timeout_s=120, what="the warm-up events", watch=[worker]
    )


def drain_events(
    run: common.Bench,
    app: Celery,
    worker: common.Child,
    count: int,
    tag: str,
    *,
    per_message: int = 1,
) -> float:
    """Events/s for ``count`` removals, from the first publish until none is pending."""
    run.truncate()
    members = common.populate(run.engine(), users=count, pats=PATS, aats=AATS, admins=1)
    ids = store(run, removals(members, tag=tag, at=datetime.now(UTC)))
    started = time.perf_counter()
    publish_event_ids(app, ids, per_message=per_message)
    ended = common.wait_until(
        lambda: none_pending(run),
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


# The end state of a drain, by set-based statements over the pending events: each event's
# membership ended, its member's personal tokens revoked, an audit row per token and per
# member, one notice per member listing its tokens, the event done.
_RAW_SQL = text(
    "WITH ev AS ("
    " SELECT id, data->>'org_id' AS org_id, data->>'user_id' AS user_id FROM events"
    " WHERE status = 'pending'"
    "), ended AS ("
    " UPDATE memberships m SET active = false, last_event_at = :now, updated_at = :now"
    " FROM ev WHERE m.org_id = ev.org_id AND m.user_id = ev.user_id"
    " RETURNING m.org_id, m.user_id, ev.id AS event_id"
    "), revoked AS ("
    " UPDATE tokens t SET revoked_at = :now, revoke_reason = 'member_removed'"
    " FROM ended e WHERE t.org_id = e.org_id AND t.user_id = e.user_id"
    " AND t.kind = 'personal' AND t.revoked_at IS NULL"
    " RETURNING t.id, t.org_id, t.user_id, t.name, e.event_id"
    "), audited AS ("
    " INSERT INTO audit (at, action, reason, source, token_id, org_id, user_id, event_id)"
    " SELECT :now, 'revoke', 'member_removed', 'bench', id, org_id, user_id, event_id"
    " FROM revoked UNION ALL"
    " SELECT :now, 'member', 'removed', 'bench', NULL, org_id, user_id, event_id FROM ended"
    "), noticed AS ("
    " INSERT INTO notices (id, kind, org_id, recipients, body, status, attempts, created_at,"
    " next_attempt_at, event_id)"
    " SELECT 'ntc_' || md5(event_id), 'member.offboarded', org_id, '[]',"
    " json_build_object('user_id', user_id, 'tokens',"
    " json_agg(json_build_object('id', id, 'name', name)))::text,"
    " 'pending', 0, :now, :now, event_id"
    " FROM revoked GROUP BY event_id, org_id, user_id"
    "), finished AS ("
    " UPDATE events SET status = 'done', finished_at = :now WHERE id IN (SELECT id FROM ev)"
    ")"
    " SELECT count(*) FROM ev"
)


def drain_raw_sql(run: common.Bench, count: int, tag: str) -> float | None:
    """Events/s of the same end state written by :data:`_RAW_SQL` (Postgres only)."""
    if run.engine().dialect.name != "postgresql":
        return None
    run.truncate()
    members = common.populate(run.engine(), users=count, pats=PATS, aats=AATS, admins=1)
    store(run, removals(members, tag=f"{tag}-sql", at=datetime.now(UTC)))
    started = time.perf_counter()
    with run.engine().begin() as connection:
        done = connection.execute(_RAW_SQL, {"now": datetime.now(UTC)}).scalar_one()
    seconds = time.perf_counter() - started
    check_outcome(run, count)
    if done != count:
        raise common.BenchError(f"the raw SQL applied {done} events, not {count}")
    return count / seconds


def peak_rss_mb(leader: int) -> float:
    """The largest peak RSS (``VmHWM``) among ``leader`` and its descendants, in MB."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    family = {leader}
    grew = True
    while grew:
        grown = family | {pid for pid, parent in parents.items() if parent in family}
        grew, family = grown != family, grown
    peaks = [0.0]
    for pid in family:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks)


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
                chunked = drain_events(run, app, worker, args.events, f"{tag}-c", per_message=CHUNK)
                raw_sql = drain_raw_sql(run, args.events, tag)
                measured.noop.append(noop)
                measured.events.append(events)
                measured.ratios.append(common.ratio(events, noop))
                measured.chunked.append(chunked)
                if raw_sql is not None:
                    measured.raw_sql.append(raw_sql)
                print(
                    f"  {pool} run {number + 1}: no-op {noop:,.0f} tasks/s, "
                    f"events {events:,.0f} events/s (one a message), ratio {events / noop:.3f}; "
                    f"{CHUNK} a message {chunked:,.0f}/s; raw SQL "
                    + (f"{raw_sql:,.0f}/s" if raw_sql is not None else "-"),
                    file=sys.stderr,
                    flush=True,
                )
            measured.rss_mb = peak_rss_mb(worker.pid)
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
        [
            r.pool,
            r.value,
            r.baseline,
            r.ratio,
            min(r.ratios),
            max(r.ratios),
            common.median(r.chunked),
            common.median(r.raw_sql) if r.raw_sql else None,
            r.rss_mb,
        ]
        for r in results
    ]
    print(
        f"{args.events:,} membership.removed events ({PATS} PATs revoked, {AATS} AAT spared "
        f"each), {args.runs} run(s), concurrency {args.concurrency}, log level {args.log_level}"
    )
    print(
        common.table(
            [
                "pool",
                "events/s",
                "no-op tasks/s",
                "ratio",
                "min ratio",
                "max ratio",
                f"{CHUNK} a message /s",
                "raw SQL /s",
                "peak RSS MB",
            ],
            rows,
        )
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
        ok=headline.ratio >= TARGET and headline.rss_mb <= MAX_RSS_MB,
        unit=UNIT,
        pool=headline.pool,
        per_message=1,
        chunked=common.rounded(common.median(headline.chunked), 1),
        raw_sql=common.rounded(common.median(headline.raw_sql), 1) if headline.raw_sql else None,
        peak_rss_mb=common.rounded(headline.rss_mb, 1),
        max_rss_mb=MAX_RSS_MB,
        fastest_pool=best.pool,
        pools={
            r.pool: {
                "value": common.rounded(r.value, 1),
                "baseline": common.rounded(r.baseline, 1),
                "ratio": common.rounded(r.ratio),
                "chunked": common.rounded(common.median(r.chunked), 1),
                "raw_sql": common.rounded(common.median(r.raw_sql), 1) if r.raw_sql else None,
                "peak_rss_mb": common.rounded(r.rss_mb, 1),
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
