"""Token verifications/s through
worker.domain.verification.verify_token, beside a bare SELECT by hash.

Each verification is what a caller of the domain does: a session in one transaction from the
token store's engine (``worker.domain.db.transaction``), ``verify_token`` on a usable token (PATs of
active members and AATs, mixed), commit. The limit is a bare
``SELECT … FROM tokens WHERE token_hash = :h`` on a connection checked out of the same
engine (same pool, same pre-ping) per look-up, with the hash already computed. Single
client thread; the table holds 3 tokens per ``--users``. The ratio is the median of the
per-run ratios (each run measures both, one right after the other). Refusals (a revoked
token: an audit row and a commit) are measured as well, for context.

    .venv/bin/python bench/verify.py [--runs 3] [--verifications 20000] [--users 20000]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import random
import time
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import Engine, text, update

from bench import common
from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.models import Token
from tokenwarden.worker.domain.tokens import hash_token
from tokenwarden.worker.domain.verification import verify_token

NAME: Final = "verify"
TARGET: Final = 0.5
UNIT: Final = "verifications/s"
BARE: Final = text(
    "SELECT id, kind, org_id, user_id, app_id, created_by, name, expires_at, revoked_at, "
    "revoke_reason FROM tokens WHERE token_hash = :h"
)


def bare_selects(engine: Engine, hashes: list[str]) -> float:
    started = time.perf_counter()
    for token_hash in hashes:
        with engine.connect() as connection:
            row = connection.execute(BARE, {"h": token_hash}).first()
        if row is None:
            raise common.BenchError("a bare SELECT found no token")
    return len(hashes) / (time.perf_counter() - started)


def verifications(engine: Engine, texts: list[str], *, usable: bool) -> float:
    now = datetime.now(UTC)
    started = time.perf_counter()
    for secret in texts:
        with db.transaction(engine) as session:
            verdict = verify_token(session, secret, now=now, source="bench")
        if verdict.usable is not usable:
            raise common.BenchError(f"verify_token said {verdict.as_dict()}, expected {usable=}")
    return len(texts) / (time.perf_counter() - started)


def options(argv: list[str] | None) -> argparse.Namespace:
    parsed = common.parser(__doc__.splitlines()[0] if __doc__ else NAME)
    parsed.add_argument("--verifications", type=int, default=None, help="per run (20000)")
    parsed.add_argument("--users", type=int, default=None, help="members, 3 tokens each (20000)")
    args = common.parse(parsed, argv)
    args.verifications = args.verifications or common.pick(args, 20_000, 300)
    args.users = args.users or common.pick(args, 20_000, 200)
    return args


def main(argv: list[str] | None = None) -> int:
    args = options(argv)
    try:
        with common.bench(NAME, args) as run:
            engine = run.engine()
            members = common.populate(engine, users=args.users, pats=2, aats=1, texts=True)
            usable = [t for m in members for t in (m.pat_texts[0], *m.aat_texts)]
            # A revoked PAT per member, for the refusals.
            refused = [m.pat_texts[1] for m in members]
            with engine.begin() as connection:
                connection.execute(
                    update(Token)
                    .where(Token.id.in_([m.pats[1] for m in members]))
                    .values(revoked_at=datetime.now(UTC), revoke_reason="deleted")
                )
            draw = random.Random(7)
            sample = [draw.choice(usable) for _ in range(args.verifications)]
            hashes = [hash_token(secret) for secret in sample]
            refusals = [draw.choice(refused) for _ in range(max(1, args.verifications // 10))]
            # Warm the pool, the statement caches and the table's pages.
            bare_selects(engine, hashes[:200])
            verifications(engine, sample[:200], usable=True)
            bases: list[float] = []
            values: list[float] = []
            ratios: list[float] = []
            refusing: list[float] = []
            for number in range(args.runs):
                base = bare_selects(engine, hashes)
                value = verifications(engine, sample, usable=True)
                refusing.append(verifications(engine, refusals, usable=False))
                bases.append(base)
                values.append(value)
                ratios.append(common.ratio(value, base))
                print(
                    f"  run {number + 1}: bare SELECT {base:,.0f}/s, verify {value:,.0f}/s, "
                    f"ratio {value / base:.3f}, refusals {refusing[-1]:,.0f}/s",
                    file=sys.stderr,
                    flush=True,
                )
    except (common.BenchError, OSError) as error:
        return common.failed(NAME, error, unit=UNIT, target=TARGET)
    value, base, ratio = common.median(values), common.median(bases), common.median(ratios)
    print(
        f"{args.verifications:,} verifications of usable tokens per run, {args.runs} run(s), "
        f"{3 * args.users:,} tokens in the table, one client thread"
    )
    rows: list[list[Any]] = [
        ["verify_token (usable)", value, "1 session + transaction each"],
        ["bare SELECT by hash", base, "1 pooled connection each"],
        ["verify_token (refused)", common.median(refusing), "writes an audit row"],
    ]
    print(common.table(["what", "per second", "how"], rows))
    print(f"ratio {ratio:.3f} (median of per-run ratios; min {min(ratios):.3f})")
    outcome = common.result(
        NAME,
        value=value,
        baseline=base,
        ratio=ratio,
        target=TARGET,
        ok=ratio >= TARGET,
        unit=UNIT,
        refused_per_s=common.rounded(common.median(refusing), 1),
        verifications=args.verifications,
        tokens=3 * args.users,
        runs=args.runs,
        short=args.short,
    )
    return common.finish(outcome, short=args.short)


if __name__ == "__main__":
    sys.exit(main())
