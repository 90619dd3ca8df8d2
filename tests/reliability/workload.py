"""Workloads of membership, leak and revocation events, and the oracle that judges them.

A workload is a universe (organizations, users, seeded memberships and tokens issued before
any event) and a list of CloudEvents with strictly increasing times. The oracle computes,
from the same workload and the SPEC's rules alone, what the store must hold once every
event is applied, whatever order the worker applied them in:

- a membership ends up as its newest event (by ``time``) left it, since an older event
  arriving later is stale; the role is compared for active memberships only (an inactive
  one's role depends on the order, and nobody reads it);
- every seeded token predates every event, so a personal token is revoked exactly when any
  removal of its membership, deactivation of its user, leak report or revocation request
  names it, and an application token when a leak report or a request names it; with several
  causes the first one applied wins, so the reason must be one of them;
- each revoked token has exactly one ``revoke`` audit row, from an event that is one of
  its causes; no audit row of an event is there twice.

Deactivated users get no events about memberships that were not seeded: a deactivation
applied before an older ``membership.added`` of an organization it could not see is the
known ordering gap tested on its own (see test_redelivery).
"""

from __future__ import annotations

import importlib.util
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tokenwarden.worker.domain.issuing import create_token
from tokenwarden.worker.domain.members import add_member
from tokenwarden.worker.domain.models import (
    AuditEntry,
    EventStatus,
    InboxEvent,
    Membership,
    Notice,
    Token,
    TokenKind,
)
from tokenwarden.worker.domain.tokens import generate, hash_token

ADDED = "membership.added"
ROLE_CHANGED = "membership.role_changed"
REMOVED = "membership.removed"
DEACTIVATED = "user.deactivated"
LEAK = "token.leak_suspected"
REVOKE = "token.revoke_requested"

REASON_OF = {
    REMOVED: "member_removed",
    DEACTIVATED: "user_deactivated",
    LEAK: "leaked",
    REVOKE: "deleted",
}
OFFBOARDED_NOTICE = "member.offboarded"
LEAKED_NOTICE = "token.leaked"

# Cheap events mostly (membership changes touch one row), and enough revoking ones that
# about half of the tokens end up revoked, so that "revoked" and "live" both get tested.
DEFAULT_MIX: dict[str, float] = {
    ADDED: 0.30,
    ROLE_CHANGED: 0.29,
    REMOVED: 0.15,
    DEACTIVATED: 0.01,
    LEAK: 0.14,
    REVOKE: 0.11,
}
# For the 10,000-event runs: nine in ten events are membership changes (one row each), and
# the revoking ones are few enough that notices, each an HTTP request, stay in proportion.
CHEAP_MIX: dict[str, float] = {
    ADDED: 0.45,
    ROLE_CHANGED: 0.45,
    REMOVED: 0.05,
    DEACTIVATED: 0.002,
    LEAK: 0.025,
    REVOKE: 0.023,
}


@dataclass(frozen=True)
class SeedToken:
    id: str
    text: str
    kind: TokenKind
    org_id: str
    user_id: str | None


@dataclass
class Universe:
    prefix: str
    orgs: list[str]
    users: list[str]
    # Users whose events stay within their seeded memberships; only they are deactivated.
    deactivatable: list[str]
    members: dict[tuple[str, str], str]
    seeded_at: datetime
    tokens: list[SeedToken] = field(default_factory=list)

    @property
    def creator(self) -> str:
        """The member who created the application tokens; no generated event names them."""
        return f"{self.prefix}-seed"

    @classmethod
    def build(
        cls,
        rng: random.Random,
        *,
        orgs: int,
        users: int,
        deactivatable: int = 0,
        seeded_at: datetime | None = None,
    ) -> Universe:
        prefix = f"r{uuid.uuid4().hex[:6]}"
        org_ids = [f"{prefix}-org{i}" for i in range(orgs)]
        user_ids = [f"{prefix}-user{i}" for i in range(users)]
        members: dict[tuple[str, str], str] = {}
        for user in user_ids:
            for org in rng.sample(org_ids, k=min(len(org_ids), rng.choice((1, 1, 2, 3)))):
                members[(org, user)] = "admin" if rng.random() < 0.2 else "user"
        return cls(
            prefix=prefix,
            orgs=org_ids,
            users=user_ids,
            deactivatable=user_ids[:deactivatable],
            members=members,
            seeded_at=seeded_at or datetime.now(UTC) - timedelta(days=2),
        )

    def seed(self, session: Session, rng: random.Random, *, pat_ratio: float, aats: int) -> None:
        """Memberships and tokens, as of ``seeded_at``, in the caller's transaction."""
        at = self.seeded_at
        for (org, user), role in sorted(self.members.items()):
            add_member(
                session,
                org_id=org,
                user_id=user,
                role=role,
                email=f"{user}@example.test",
                at=at,
                now=at,
                source="seed",
            )
        # Application tokens need an active member of their organization as creator: one
        # that no generated event touches.
        for org in self.orgs:
            add_member(
                session,
                org_id=org,
                user_id=self.creator,
                role="user",
                email=None,
                at=at,
                now=at,
                source="seed",
            )
        expires = datetime.now(UTC) + timedelta(days=300)  # inside the maximum lifetime
        for org, user in sorted(self.members):
            if rng.random() < pat_ratio:
                issued = create_token(
                    session,
                    kind=TokenKind.PERSONAL,
                    org_id=org,
                    name="laptop",
                    expires_at=expires,
                    now=at,
                    user_id=user,
                    source="seed",
                )
                self.tokens.append(
                    SeedToken(issued.id, issued.token, TokenKind.PERSONAL, org, user)
                )
        for org in self.orgs:
            for number in range(aats):
                issued = create_token(
                    session,
                    kind=TokenKind.APPLICATION,
                    org_id=org,
                    name=f"ci-{number}",
                    expires_at=expires,
                    now=at,
                    app_id=f"app{number}",
                    created_by=self.creator,
                    source="seed",
                )
                self.tokens.append(
                    SeedToken(issued.id, issued.token, TokenKind.APPLICATION, org, None)
                )


def cloud_event(
    event_id: str, type_: str, data: dict[str, Any], at: datetime, source: str = "chaos://load"
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": source,
        "type": type_,
        "time": at.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "data": data,
    }


def make_events(
    universe: Universe,
    rng: random.Random,
    *,
    count: int,
    mix: dict[str, float] | None = None,
    start: datetime | None = None,
    step: timedelta = timedelta(milliseconds=1),
) -> list[dict[str, Any]]:
    """``count`` events with strictly increasing times after every seeded row."""
    weights = mix or DEFAULT_MIX
    kinds, chances = list(weights), list(weights.values())
    at = start or universe.seeded_at + timedelta(hours=1)
    free_users = [u for u in universe.users if u not in set(universe.deactivatable)]
    seeded_pairs = sorted(universe.members)
    events: list[dict[str, Any]] = []
    for number in range(count):
        at += step
        kind = rng.choices(kinds, chances)[0]
        event_id = f"{universe.prefix}-e{number}"
        if kind in (ADDED, ROLE_CHANGED, REMOVED):
            org, user = _pair(universe, rng, free_users, seeded_pairs)
            data: dict[str, Any] = {"org_id": org, "user_id": user}
            if kind != REMOVED:
                data["role"] = rng.choice(("admin", "user", "user"))
            if kind == ADDED and rng.random() < 0.3:
                data["email"] = f"{user}@example.test"
        elif kind == DEACTIVATED:
            if not universe.deactivatable:
                continue
            data = {"user_id": rng.choice(universe.deactivatable)}
        elif kind == LEAK:
            data = _leak(universe, rng)
        else:
            data = _revocation(universe, rng)
        events.append(cloud_event(event_id, kind, data, at))
    return events


def _pair(
    universe: Universe,
    rng: random.Random,
    free_users: Sequence[str],
    seeded_pairs: Sequence[tuple[str, str]],
) -> tuple[str, str]:
    # Mostly seeded memberships (they hold the tokens), sometimes new ones.
    if rng.random() < 0.75 or not free_users:
        return rng.choice(seeded_pairs)
    return rng.choice(universe.orgs), rng.choice(free_users)


def _leak(universe: Universe, rng: random.Random) -> dict[str, Any]:
    roll = rng.random()
    if roll < 0.1 or not universe.tokens:
        # Well-formed, checksum and all, but not ours.
        return {"token": generate(rng.choice(list(TokenKind))), "reporter": "scanner"}
    token = rng.choice(universe.tokens)
    if roll < 0.8:
        return {
            "token": token.text,
            "source_url": f"https://git.example/leaks/{rng.randrange(10**6)}",
            "reporter": "scanner",
        }
    return {"token_id": token.id, "reporter": "operator"}


def _revocation(universe: Universe, rng: random.Random) -> dict[str, Any]:
    if rng.random() < 0.1 or not universe.tokens:
        return {"token_id": f"tok_{rng.randrange(16**16):016x}", "actor": "someone"}
    return {"token_id": rng.choice(universe.tokens).id, "actor": "owner"}


@dataclass(frozen=True)
class MemberState:
    active: bool
    # None: not compared (an inactive membership's role depends on the order applied).
    role: str | None
    # Of the newest join, removal or deactivation; None when only role changes are known.
    last_event_at: datetime | None


@dataclass
class Oracle:
    members: dict[tuple[str, str], MemberState]
    causes: dict[str, dict[str, set[str]]]  # token id -> reason -> event ids
    unknown_revocations: set[str]  # events that ask to revoke a token id nobody issued
    event_ids: list[str]

    @classmethod
    def compute(cls, universe: Universe, events: Sequence[dict[str, Any]]) -> Oracle:
        by_hash = {hash_token(token.text): token for token in universe.tokens}
        by_id = {token.id: token for token in universe.tokens}
        newest: dict[tuple[str, str], tuple[datetime | None, bool, str | None]] = {
            pair: (universe.seeded_at, True, role) for pair, role in universe.members.items()
        }
        # The application tokens' creator, a member no event touches.
        newest |= {
            (org, universe.creator): (universe.seeded_at, True, "user") for org in universe.orgs
        }
        causes: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        unknown: set[str] = set()
        pats_of: dict[tuple[str, str], list[str]] = defaultdict(list)
        pats_by_user: dict[str, list[str]] = defaultdict(list)
        for token in universe.tokens:
            if token.kind is TokenKind.PERSONAL and token.user_id:
                pats_of[(token.org_id, token.user_id)].append(token.id)
                pats_by_user[token.user_id].append(token.id)
        for event in sorted(events, key=event_time):
            at = event_time(event)
            data, kind, event_id = event["data"], event["type"], event["id"]
            touched: list[tuple[tuple[str, str], bool, str | None]] = []
            if kind == ADDED:
                touched.append(((data["org_id"], data["user_id"]), True, data["role"]))
            elif kind == ROLE_CHANGED:
                # Sets the role, never the membership: a role change does not make a member.
                pair = (data["org_id"], data["user_id"])
                seen = newest.get(pair)
                newest[pair] = (seen[0], seen[1], data["role"]) if seen else (None, False, None)
            elif kind == REMOVED:
                pair = (data["org_id"], data["user_id"])
                touched.append((pair, False, None))
                for token_id in pats_of[pair]:
                    causes[token_id][REASON_OF[REMOVED]].add(event_id)
            elif kind == DEACTIVATED:
                user = data["user_id"]
                touched += [(pair, False, None) for pair in universe.members if pair[1] == user]
                for token_id in pats_by_user[user]:
                    causes[token_id][REASON_OF[DEACTIVATED]].add(event_id)
            elif kind == LEAK:
                named = (
                    by_hash.get(hash_token(data["token"]))
                    if "token" in data
                    else by_id.get(data["token_id"])
                )
                if named is not None:
                    causes[named.id][REASON_OF[LEAK]].add(event_id)
            elif kind == REVOKE:
                if data["token_id"] in by_id:
                    causes[data["token_id"]][REASON_OF[REVOKE]].add(event_id)
                else:
                    unknown.add(event_id)
            for pair, active, role in touched:
                previous = newest.get(pair)
                if previous is None or previous[0] is None or previous[0] < at:
                    newest[pair] = (at, active, role)
        members = {
            pair: MemberState(active, role if active else None, at)
            for pair, (at, active, role) in newest.items()
        }
        return cls(
            members=members,
            causes={token: dict(reasons) for token, reasons in causes.items()},
            unknown_revocations=unknown,
            event_ids=[event["id"] for event in events],
        )


def event_time(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["time"])


@dataclass
class Verdict:
    """How the store compares with the oracle: figures, and every problem found."""

    figures: dict[str, int]
    problems: list[str]

    def assert_clean(self) -> None:
        assert not self.problems, f"{len(self.problems)} problems:\n" + "\n".join(
            self.problems[:40]
        )


def judge(
    session: Session,
    universe: Universe,
    oracle: Oracle,
    *,
    accepted: Iterable[str],
    check_roles: bool = True,
    check_notices: bool = True,
) -> Verdict:
    """Compare the store with the oracle; count what was lost, doubled or is in a wrong state."""
    problems: list[str] = []
    accepted_ids = set(accepted)
    wanted = set(oracle.event_ids)
    events = {
        row.id: row
        for row in session.execute(
            select(InboxEvent.id, InboxEvent.status, InboxEvent.attempts, InboxEvent.reason).where(
                InboxEvent.id.like(f"{universe.prefix}-%")
            )
        )
    }
    applied = {i for i in wanted if i in events and events[i].status == EventStatus.DONE}
    dead = sorted(i for i in wanted if i in events and events[i].status == EventStatus.DEAD)
    lost = sorted(i for i in accepted_ids & wanted if i not in applied)
    doubled_events = sorted(i for i in applied if events[i].attempts != 1)
    problems += [f"event {i} accepted but not applied: {_state(events.get(i))}" for i in lost[:20]]
    problems += [f"event {i} applied {events[i].attempts} times" for i in doubled_events[:20]]
    not_accepted = sorted(wanted - accepted_ids)
    problems += [f"event {i} never accepted by the API" for i in not_accepted[:20]]

    # Tokens.
    tokens = {
        row.id: row
        for row in session.execute(
            select(Token.id, Token.revoked_at, Token.revoke_reason).where(
                Token.id.in_([t.id for t in universe.tokens])
            )
        )
    }
    revoke_rows: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
    for token_id, reason, event_id in session.execute(
        select(AuditEntry.token_id, AuditEntry.reason, AuditEntry.event_id).where(
            AuditEntry.action == "revoke",
            AuditEntry.token_id.in_([t.id for t in universe.tokens]),
        )
    ):
        if token_id is not None:
            revoke_rows[token_id].append((reason, event_id))
    wrong_tokens = 0
    missing_audit = 0
    doubled_audit = 0
    for token in universe.tokens:
        row = tokens.get(token.id)
        reasons = oracle.causes.get(token.id, {})
        if row is None:
            problems.append(f"token {token.id} missing")
            wrong_tokens += 1
            continue
        if bool(reasons) != (row.revoked_at is not None):
            wrong_tokens += 1
            problems.append(
                f"token {token.id} ({token.kind}) is "
                f"{'revoked (' + str(row.revoke_reason) + ')' if row.revoked_at else 'live'}; "
                f"expected {'revoked by ' + str(sorted(reasons)) if reasons else 'live'}"
            )
            continue
        if reasons and row.revoke_reason not in reasons:
            wrong_tokens += 1
            problems.append(
                f"token {token.id} revoked as {row.revoke_reason}; causes {sorted(reasons)}"
            )
        rows = revoke_rows.get(token.id, [])
        if reasons and not rows:
            missing_audit += 1
            problems.append(f"token {token.id}: no revoke audit row")
        if len(rows) > 1:
            doubled_audit += 1
            problems.append(f"token {token.id}: {len(rows)} revoke audit rows {rows}")
        for reason, event_id in rows:
            if event_id not in reasons.get(reason, set()):
                problems.append(f"token {token.id}: revoke row ({reason}, {event_id}) has no cause")

    # Memberships.
    stored = {
        (m.org_id, m.user_id): m
        for m in session.scalars(
            select(Membership).where(Membership.org_id.like(f"{universe.prefix}-%"))
        )
    }
    wrong_members = 0
    for pair, expected in oracle.members.items():
        member = stored.get(pair)
        if member is None:
            wrong_members += 1
            problems.append(f"membership {pair} missing; expected {expected}")
            continue
        mismatch = (
            member.active != expected.active or member.last_event_at != expected.last_event_at
        )
        if check_roles and expected.role is not None and member.role != expected.role:
            mismatch = True
        if mismatch:
            wrong_members += 1
            problems.append(
                f"membership {pair}: active={member.active} role={member.role} "
                f"last_event_at={member.last_event_at}; expected {expected}"
            )
    extra_members = sorted(set(stored) - set(oracle.members))
    wrong_members += len(extra_members)
    problems += [f"membership {pair} should not exist" for pair in extra_members[:20]]

    # Every audit row of an event once: a second copy means an event was applied twice.
    duplicates = session.execute(
        select(
            AuditEntry.event_id,
            AuditEntry.action,
            AuditEntry.reason,
            AuditEntry.token_id,
            AuditEntry.org_id,
            AuditEntry.user_id,
            func.count(),
        )
        .where(AuditEntry.event_id.like(f"{universe.prefix}-%"))
        .group_by(
            AuditEntry.event_id,
            AuditEntry.action,
            AuditEntry.reason,
            AuditEntry.token_id,
            AuditEntry.org_id,
            AuditEntry.user_id,
        )
        .having(func.count() > 1)
    ).all()
    doubled_audit += len(duplicates)
    problems += [f"audit row twice: {tuple(row)}" for row in duplicates[:20]]
    refusals = Counter(
        session.scalars(
            select(AuditEntry.event_id).where(
                AuditEntry.action == "refuse", AuditEntry.reason == "unknown_token"
            )
        )
    )
    for event_id in oracle.unknown_revocations & applied:
        if refusals.get(event_id, 0) != 1:
            missing_audit += 1
            problems.append(f"event {event_id}: {refusals.get(event_id, 0)} refusal rows, not 1")

    revoked = sum(1 for t in universe.tokens if oracle.causes.get(t.id))
    figures = {
        "events_sent": len(wanted),
        "accepted": len(accepted_ids & wanted),
        "applied": len(applied),
        "dead": len(dead),
        "lost": len(lost),
        "doubled": len(doubled_events) + doubled_audit,
        "tokens": len(universe.tokens),
        "tokens_revoked": revoked,
        "tokens_wrong": wrong_tokens,
        "members": len(oracle.members),
        "members_wrong": wrong_members,
        "audit_missing": missing_audit,
    }
    problems += [f"event {i} dead: {events[i].reason}" for i in dead[:20]]
    if check_notices:
        notice_figures, notice_problems = judge_notices(session, universe)
        figures.update(notice_figures)
        problems += notice_problems
    return Verdict(figures, problems)


def judge_notices(session: Session, universe: Universe) -> tuple[dict[str, int], list[str]]:
    """One notice per cause: per leaked token, per (event, organization) of an offboarding.

    The causes come from the revoke audit rows (themselves checked against the oracle): which
    event revoked a token depends on the order applied, so the expected notices do too.
    """
    token_ids = [t.id for t in universe.tokens]
    rows = session.execute(
        select(
            AuditEntry.token_id, AuditEntry.reason, AuditEntry.event_id, AuditEntry.org_id
        ).where(AuditEntry.action == "revoke", AuditEntry.token_id.in_(token_ids))
    ).all()
    expected: set[tuple[str, str]] = set()
    for token_id, reason, event_id, org_id in rows:
        if reason == "leaked":
            expected.add((LEAKED_NOTICE, f"leaked:{token_id}"))
        elif reason in ("member_removed", "user_deactivated"):
            expected.add((OFFBOARDED_NOTICE, f"{event_id}/{org_id}"))
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for notice in session.scalars(
        select(Notice).where(Notice.kind.in_([LEAKED_NOTICE, OFFBOARDED_NOTICE]))
    ):
        if notice.kind == LEAKED_NOTICE:
            key = notice.dedupe_key or f"leaked:?{notice.id}"
            if key.removeprefix("leaked:") not in token_ids:
                continue
        else:
            if not (notice.event_id or "").startswith(f"{universe.prefix}-"):
                continue
            key = f"{notice.event_id}/{notice.org_id}"
        found[(notice.kind, key)].append(notice.id)
    problems = []
    missing = sorted(expected - set(found))
    unexpected = sorted(set(found) - expected)
    second = sorted(key for key, ids in found.items() if len(ids) > 1)
    problems += [f"notice missing for {key}" for key in missing[:20]]
    problems += [f"notice without a cause: {key} {found[key]}" for key in unexpected[:20]]
    problems += [f"notice {key} has {len(found[key])} ids: {found[key]}" for key in second[:20]]
    figures = {
        "notices_expected": len(expected),
        "notices_queued": sum(len(ids) for ids in found.values()),
        "notices_missing": len(missing),
        "notices_second_id": len(second),
    }
    return figures, problems


def _state(row: Any) -> str:
    return "never stored" if row is None else f"{row.status} ({row.reason})"


def notices_wired() -> bool:
    """True once the worker delivers notices (tasks.notices exists)."""
    return importlib.util.find_spec("tokenwarden.tasks.notices") is not None


def judge_deliveries(
    session: Session, delivered: dict[str, int]
) -> tuple[dict[str, int], list[str]]:
    """Every notice in the outbox sent and received; ids received that no notice has."""
    rows = session.execute(select(Notice.id, Notice.status, Notice.last_error)).all()
    known = {row.id for row in rows}
    undelivered = [row for row in rows if row.id not in delivered]
    unsent = [row for row in rows if row.status != "sent"]
    strangers = sorted(set(delivered) - known)
    problems = [
        f"notice {row.id} not delivered ({row.status}: {row.last_error})"
        for row in undelivered[:20]
    ]
    problems += [f"notice {row.id} is {row.status}: {row.last_error}" for row in unsent[:20]]
    problems += [f"delivered id {i} matches no notice" for i in strangers[:20]]
    figures = {
        "notices_delivered": len(known & set(delivered)),
        "notices_undelivered": len(undelivered),
        "deliveries_duplicated": sum(count - 1 for count in delivered.values()),
    }
    return figures, problems
