"""Benchmark: the sweep's idle pass (``TOKENWARDEN_IDLE_REVOKE_DAYS``) on a large token table.

    python bench/idle.py [--database-url URL] [--rows N] [--idle-days D] [--batch B] [--short]

Loads the token table of bench/sweep.py (30% expired) into a throw-away database, records a
last use for 40% of the tokens (spread over the last 150 days), then runs one whole idle pass
(:func:`worker.domain.expiry.idle.idle_all`, as the sweep runs it) with ``--idle-days`` (90):
tokens idle that long are revoked and audited, those within 7 days of it warned of (one
notice per recipient and window). Reported: tokens revoked and warned, transactions, the
longest transaction (the target: at most 200 ms), and the pass's duration. The last line is
one JSON object, as the other benchmarks of bench/ report it.

``--short`` (CI): about 20,000 rows. A ``sqlite:///`` URL measures SQLite instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import statistics
import time
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Final

from sqlalchemy import Engine, insert, make_url, select, text

from bench.sweep import _normalise, databases, load, peak_rss_mb
from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.expiry.budget import run_exclusive
from tokenwarden.worker.domain.expiry.idle import idle_all
from tokenwarden.worker.domain.expiry.results import SweepResult
from tokenwarden.worker.domain.models import Token, TokenUsage

# Every transaction of the idle pass, notices included, at most this long.
MAX_TRANSACTION_MS: Final = 200.0

DEFAULT_DATABASE_URL: Final = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
USED_PERCENT: Final = 40
USED_WITHIN_DAYS: Final = 150


def record_uses(url: str, *, now: datetime) -> int:
    """A last use for ``USED_PERCENT`` of the tokens, up to ``USED_WITHIN_DAYS`` days ago."""
    engine = db.make_engine(url)
    try:
        if engine.dialect.name == "postgresql":
            return _uses_postgres(engine, now=now)
        return _uses_python(engine, now=now)
    finally:
        engine.dispose()


def _uses_postgres(engine: Engine, *, now: datetime) -> int:
    with engine.begin() as connection:
        count = connection.execute(
            text(
                "INSERT INTO token_usage (token_id, last_used_at)"
                " SELECT id, CAST(:now AS timestamptz)"
                "  - make_interval(mins => abs(hashtext(id || 'u')) % (:days * 1440))"
                " FROM tokens WHERE abs(hashtext(id)) % 100 < :percent"
            ),
            {"now": now, "days": USED_WITHIN_DAYS, "percent": USED_PERCENT},
        ).rowcount
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE"))
    return count


def _spread(value: str, modulo: int) -> int:
    return zlib.crc32(value.encode()) % modulo


def _uses_python(engine: Engine, *, now: datetime) -> int:
    with db.transaction(engine) as session:
        ids = session.scalars(select(Token.id)).all()
        rows = [
            {
                "token_id": token_id,
                "last_used_at": now
                - timedelta(
                    minutes=zlib.crc32(f"{token_id}u".encode()) % (USED_WITHIN_DAYS * 1440)
                ),
            }
            for token_id in ids
            if _spread(token_id + "p", 100) < USED_PERCENT
        ]
        for start in range(0, len(rows), 10_000):
            session.execute(insert(TokenUsage), rows[start : start + 10_000])
    return len(rows)


# (ms, revoked, warned) of each transaction of the last pass: the slowest are printed.
shapes: list[tuple[float, int, int]] = []


def idle_pass(url: str, *, now: datetime, batch: int, days: int) -> tuple[SweepResult, list[float]]:
    """One whole idle pass; its result and each transaction's duration in ms (the time
    between two progress reports: the transaction, its commit and the bookkeeping after)."""
    engine = db.make_engine(url)
    durations: list[float] = []
    last = time.perf_counter()
    done = (0, 0)

    def note(result: SweepResult) -> None:
        nonlocal last, done
        current = time.perf_counter()
        durations.append((current - last) * 1000)
        now_done = (result.idle_revoked, result.idle_warned)
        shapes.append((durations[-1], now_done[0] - done[0], now_done[1] - done[1]))
        last, done = current, now_done

    try:
        result = run_exclusive(
            engine,
            partial(idle_all, now=now, batch=batch, days=days),
            lock="sweep",
            log_as="idle",
            stats=SweepResult,
            batch=batch,
            budget_s=None,
            on_progress=note,
        )
    finally:
        engine.dispose()
    return result, durations


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--rows", type=int, default=None, help="tokens (default 1,000,000)")
    parser.add_argument("--idle-days", type=int, default=90)
    parser.add_argument("--batch", type=int, default=1000, help="rows per transaction")
    parser.add_argument("--short", action="store_true", help="~20,000 rows (CI)")
    args, ignored = parser.parse_known_args(argv)
    if ignored:
        print(f"bench/idle.py: ignoring {' '.join(ignored)}", file=sys.stderr)
    args.rows = args.rows or (20_000 if args.short else 1_000_000)
    if args.rows <= 0 or args.batch <= 0 or args.idle_days <= 7:
        parser.error("--rows and --batch must be positive, --idle-days more than 7")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from tokenwarden.config.logging import configure_logging

    args = parse(argv)
    configure_logging(level="WARNING")
    now = datetime.now(UTC).replace(microsecond=0)
    with databases(args.database_url) as found:
        seed = found.create("idle")
        db.upgrade(seed)
        print(f"loading {args.rows:,} tokens …", file=sys.stderr, flush=True)
        started = time.perf_counter()
        load(seed, rows=args.rows, expired_fraction=0.3, now=now)
        used = record_uses(seed, now=now)
        print(
            f"loaded in {time.perf_counter() - started:.1f} s ({used:,} with a recorded use)",
            file=sys.stderr,
            flush=True,
        )
        result, durations = idle_pass(seed, now=now, batch=args.batch, days=args.idle_days)
    over = sum(1 for ms in durations if ms > MAX_TRANSACTION_MS)
    backend = make_url(_normalise(args.database_url)).get_backend_name()
    print(
        f"{backend}, {args.rows:,} tokens, idle after {args.idle_days} days, batch {args.batch}:"
        f" revoked {result.idle_revoked:,}, warned of {result.idle_warned:,}"
        f" ({result.notices:,} notices) in {result.transactions:,} transactions,"
        f" {result.duration_s:.1f} s; transactions: median {statistics.median(durations):.1f} ms,"
        f" p99 {_p99(durations):.1f} ms, {over} over {MAX_TRANSACTION_MS:.0f} ms,"
        f" longest {result.longest_transaction_ms:.1f} ms"
        f"; peak RSS {peak_rss_mb():.0f} MB"
    )
    slowest = sorted(shapes, reverse=True)[:5]
    print(
        "slowest transactions (ms: revoked, warned): "
        + "; ".join(f"{ms:.0f}: {revoked}, {warned}" for ms, revoked, warned in slowest)
    )
    ok = result.finished and result.longest_transaction_ms <= MAX_TRANSACTION_MS
    print(
        json.dumps(
            {
                "bench": "idle",
                "value": round(result.longest_transaction_ms, 1),
                "target": MAX_TRANSACTION_MS,
                "ok": ok,
                "unit": "ms (longest transaction)",
                "rows": args.rows,
                "revoked": result.idle_revoked,
                "warned": result.idle_warned,
                "notices": result.notices,
                "transactions": result.transactions,
                "median_tx_ms": round(statistics.median(durations), 1),
                "p99_tx_ms": round(_p99(durations), 1),
                "over_target": over,
                "duration_s": round(result.duration_s, 1),
                "short": args.short,
            }
        )
    )
    return 0 if ok or args.short else 1


if __name__ == "__main__":
    sys.exit(main())
