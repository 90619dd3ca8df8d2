"""Races: a PAT issued while its owner leaves; two schedulers sweeping at once.

Issuing races leaving: in each of 100 rounds one thread issues a PAT (``create_token``, what
``tokenwarden token create`` runs) while another applies the owner's ``membership.removed``
(``handlers.apply_pending``, what the worker runs), both in transactions of their own on the
same store, released together after a random few milliseconds. Afterwards no PAT of the
leaver may be usable in that organization, and none may become usable again when the owner
re-joins later: a PAT issued before the removal took effect belongs to the old membership.

Two sweeps at once: two ``tokenwarden sweep --json`` processes started together over the
same expired tokens, round after round: one sweep does the work and the other returns at
once, or they share it; never are the same rows swept twice (one ``expire`` audit row per
token, the counts adding up, each token in one "expired" notice).
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from tests.conftest import TOKENWARDEN, Store, clean_env
from tests.reliability.conftest import SeededRandom
from tests.reliability.evidence import Evidence
from tests.reliability.figures import Figures
from tests.reliability.workload import cloud_event
from tokenwarden.producer.intake import validate
from tokenwarden.worker.domain import db, handlers, inbox
from tokenwarden.worker.domain.errors import Refused
from tokenwarden.worker.domain.issuing import create_token
from tokenwarden.worker.domain.members import add_member
from tokenwarden.worker.domain.models import AuditEntry, Notice, Token, TokenKind
from tokenwarden.worker.domain.tokens import hash_token
from tokenwarden.worker.domain.verification import verify_token

pytestmark = [pytest.mark.chaos]

ROUNDS = 100
SWEEP_ROUNDS = 3
EXPIRED_PER_ROUND = 1_500


@dataclass
class Round:
    issued: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    refused: int = 0
    errors: list[str] = field(default_factory=list)


def _issue(
    store: Store, org: str, user: str, outcome: Round, gate: threading.Barrier, delay: float
) -> None:
    gate.wait()
    time.sleep(delay)
    try:
        with db.transaction(store.engine) as session:
            issued = create_token(
                session,
                kind=TokenKind.PERSONAL,
                org_id=org,
                name="raced",
                expires_at=datetime.now(UTC) + timedelta(days=30),
                now=datetime.now(UTC),
                user_id=user,
            )
        outcome.issued.append(issued.id)
        outcome.texts.append(issued.token)
    except Refused:
        outcome.refused += 1
    except Exception as error:  # reported, and fails the test below
        outcome.errors.append(f"issue: {type(error).__name__}: {error}")


def _leave(
    store: Store, event_id: str, outcome: Round, gate: threading.Barrier, delay: float
) -> None:
    gate.wait()
    time.sleep(delay)
    try:
        with db.transaction(store.engine) as session:
            done = handlers.apply_pending(
                session, [event_id], now=datetime.now(UTC), retryable=lambda _: False
            )
        if done.done != [event_id]:
            outcome.errors.append(f"leave: {done}")
    except Exception as error:
        outcome.errors.append(f"leave: {type(error).__name__}: {error}")


@dataclass
class RaceFigures:
    issued: int = 0
    refused: int = 0
    usable_after_leave: int = 0
    unrevoked: int = 0
    usable_after_rejoin: int = 0
    errors: list[str] = field(default_factory=list)


def _race(store: Store, evidence: Evidence, rng: random.Random) -> RaceFigures:
    """ROUNDS rounds of issuing racing leaving, then a re-join; what came of them."""
    prefix = f"race{uuid.uuid4().hex[:6]}"
    seen = RaceFigures()
    for number in range(ROUNDS):
        org, user = f"{prefix}-org{number}", f"{prefix}-user{number}"
        joined = datetime.now(UTC) - timedelta(minutes=5)
        with db.transaction(store.engine) as session:
            add_member(
                session,
                org_id=org,
                user_id=user,
                role="user",
                email=None,
                at=joined,
                now=joined,
                source="race",
            )
        left = datetime.now(UTC)
        removal = cloud_event(
            f"{prefix}-leave{number}", "membership.removed", {"org_id": org, "user_id": user}, left
        )
        with db.transaction(store.engine) as session:
            inbox.store_events(session, validate([removal]), now=left)
        outcome = Round()
        gate = threading.Barrier(2)
        threads = [
            threading.Thread(
                target=_issue, args=(store, org, user, outcome, gate, rng.uniform(0, 0.004))
            ),
            threading.Thread(
                target=_leave, args=(store, removal["id"], outcome, gate, rng.uniform(0, 0.004))
            ),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        seen.errors += outcome.errors
        evidence.add_tokens(outcome.texts)
        seen.issued += len(outcome.issued)
        seen.refused += outcome.refused
        now = datetime.now(UTC)
        with db.transaction(store.engine) as session:
            for text in outcome.texts:
                if verify_token(session, text, now=now, source="race").usable:
                    seen.usable_after_leave += 1
            seen.unrevoked += (
                session.scalar(
                    select(func.count())
                    .select_from(Token)
                    .where(Token.org_id == org, Token.user_id == user, Token.revoked_at.is_(None))
                )
                or 0
            )
        # The owner comes back: what was issued before the removal took effect belongs to the
        # old membership and must not work again.
        rejoin = cloud_event(
            f"{prefix}-rejoin{number}",
            "membership.added",
            {"org_id": org, "user_id": user, "role": "user"},
            datetime.now(UTC) + timedelta(seconds=1),
        )
        with db.transaction(store.engine) as session:
            inbox.store_events(session, validate([rejoin]), now=now)
            handlers.apply_pending(session, [rejoin["id"]], now=now, retryable=lambda _: False)
        with db.transaction(store.engine) as session:
            later = datetime.now(UTC) + timedelta(seconds=2)
            for text in outcome.texts:
                if verify_token(session, text, now=later, source="race").usable:
                    seen.usable_after_rejoin += 1
    return seen


def _publish(figures: Figures, seen: RaceFigures, evidence: Evidence) -> None:
    figures.set(
        rounds=ROUNDS,
        pats_issued=seen.issued,
        issue_refused=seen.refused,
        usable_after_leave=seen.usable_after_leave,
        unrevoked_pats_of_leavers=seen.unrevoked,
        usable_again_after_rejoin=seen.usable_after_rejoin,
        errors=len(seen.errors),
    )
    figures.publish(evidence.root)


@pytest.mark.timeout(300)
def test_a_pat_issued_while_its_owner_leaves_is_not_usable_after_the_event(
    own_store: Store, evidence: Evidence, rng: SeededRandom
) -> None:
    figures = Figures(f"race_issue_vs_leave[{own_store.backend}]", {"seed": rng.seed_value})
    seen = _race(own_store, evidence, rng)
    _publish(figures, seen, evidence)
    assert not seen.errors, seen.errors[:5]
    assert seen.issued + seen.refused == ROUNDS
    assert seen.usable_after_leave == 0


@pytest.mark.timeout(300)
def test_a_pat_issued_while_its_owner_leaves_stays_dead_after_a_rejoin(
    own_store: Store, evidence: Evidence, rng: SeededRandom
) -> None:
    """The PAT must have been revoked, not merely refused while its owner is away.

    Before ``create_token`` read the membership ``FOR SHARE``, about half of these PATs
    escaped the removal on Postgres and worked again once their owner re-joined.
    """
    figures = Figures(f"race_rejoin[{own_store.backend}]", {"seed": rng.seed_value})
    seen = _race(own_store, evidence, rng)
    _publish(figures, seen, evidence)
    assert not seen.errors, seen.errors[:5]
    assert seen.unrevoked == 0, f"{seen.unrevoked} PATs of leavers were never revoked"
    assert seen.usable_after_rejoin == 0, (
        f"{seen.usable_after_rejoin} PATs issued while their owner left work again after a re-join"
    )


def _expired_tokens(store: Store, prefix: str, count: int, rng: random.Random) -> list[str]:
    """Rows of tokens already past expiry (no code path can issue one, so insert them)."""
    created = datetime.now(UTC) - timedelta(days=40)
    expired = datetime.now(UTC) - timedelta(minutes=5)
    rows: list[dict[str, Any]] = []
    for number in range(count):
        personal = rng.random() < 0.7
        rows.append(
            {
                "id": f"tok_{prefix}{number:06d}",
                "kind": TokenKind.PERSONAL.value if personal else TokenKind.APPLICATION.value,
                "org_id": f"{prefix}-org{number % 7}",
                "user_id": f"{prefix}-user{number % 50}" if personal else None,
                "app_id": None if personal else f"app{number % 5}",
                "created_by": f"{prefix}-user{number % 50}",
                "name": "old",
                "token_hash": hash_token(f"{prefix}-{number}"),
                "last4": f"{number % 10000:04d}",
                "created_at": created,
                "expires_at": expired - timedelta(seconds=number),
                "revoked_at": None,
                "revoke_reason": None,
            }
        )
    with db.transaction(store.engine) as session:
        session.execute(insert(Token), rows)
    return [row["id"] for row in rows]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_sweeps_at_once_never_sweep_the_same_rows(
    own_store: Store, tmp_path: Path, evidence: Evidence, rng: SeededRandom
) -> None:
    store = own_store
    pytest.importorskip(
        "tokenwarden.worker.domain.expiry.sweep", reason="the expiry sweep has not landed"
    )
    figures = Figures(f"race_two_sweeps[{store.backend}]", {"seed": rng.seed_value})
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(TOKENWARDEN_HOME=str(home), TOKENWARDEN_DATABASE_URL=store.url)
    ran = swept_total = expected = 0
    overlapping = 0
    problems: list[str] = []
    for number in range(SWEEP_ROUNDS):
        prefix = f"sw{uuid.uuid4().hex[:5]}r{number}"
        tokens = _expired_tokens(store, prefix, EXPIRED_PER_ROUND, rng)
        expected += len(tokens)
        argv = [str(TOKENWARDEN), "sweep", "--json", "--batch", str(rng.choice((50, 100, 200)))]
        processes = [
            subprocess.Popen(
                argv, env=env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            for _ in range(2)
        ]
        outputs = [process.communicate(timeout=240) for process in processes]
        results = []
        for process, (out, err) in zip(processes, outputs, strict=True):
            if process.returncode != 0:
                problems.append(f"sweep exited {process.returncode}: {err.decode()[-500:]}")
                continue
            results.append(json.loads(out))
        ran += sum(1 for r in results if r.get("ran"))
        overlapping += int(sum(1 for r in results if r.get("ran")) > 1)
        swept_total += sum(int(r.get("swept", 0)) for r in results)
        with db.transaction(store.engine) as session:
            per_token = Counter(
                session.scalars(
                    select(AuditEntry.token_id).where(
                        AuditEntry.action == "expire", AuditEntry.token_id.in_(tokens)
                    )
                )
            )
            live = session.scalar(
                select(func.count())
                .select_from(Token)
                .where(Token.id.in_(tokens), Token.revoked_at.is_(None))
            )
            in_notices: Counter[str] = Counter()
            for body in session.scalars(select(Notice.body).where(Notice.kind == "token.expired")):
                for token in json.loads(body).get("data", {}).get("tokens", []):
                    if token.get("id") in per_token or token.get("id") in set(tokens):
                        in_notices[token["id"]] += 1
        twice = [t for t, c in per_token.items() if c > 1]
        missing = [t for t in tokens if per_token.get(t, 0) == 0]
        noticed_twice = [t for t, c in in_notices.items() if c > 1]
        problems += [f"round {number}: {t} swept {per_token[t]} times" for t in twice[:5]]
        problems += [f"round {number}: {len(missing)} expired tokens not swept"] if missing else []
        problems += [f"round {number}: {live} expired tokens still live"] if live else []
        problems += [f"round {number}: {t} in {in_notices[t]} notices" for t in noticed_twice[:5]]
    figures.set(
        rounds=SWEEP_ROUNDS,
        sweeps_started=2 * SWEEP_ROUNDS,
        sweeps_that_ran=ran,
        rounds_with_both_running=overlapping,
        expired_tokens=expected,
        swept_reported=swept_total,
        problems=len(problems),
    )
    figures.publish(evidence.root)
    assert not problems, problems[:10]
    assert swept_total == expected
