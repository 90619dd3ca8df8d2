"""The expiry sweep: tokens past their expiry are marked expired, audited, and their owners told.

A run has three phases, each in short transactions of at most ``batch`` rows:

1. **Expire.** Live tokens with ``expires_at <= now`` are marked ``revoked_at=now,
   revoke_reason='expired'`` in batches, with one ``expire`` audit row per token in the same
   transaction. A routine run walks the partial index ``ix_tokens_live_expiry`` in keyset
   batches on ``(expires_at, id)``. On Postgres, a backlog of at least
   :data:`TABLE_WALK_MIN_DUE_PER_PAGE` due tokens per page of the table is swept along the
   table instead, in windows of pages holding about ``batch`` due tokens each, so that each
   page is changed once per run rather than once per due token on it. On Postgres one
   statement marks and audits a batch, so its rows never reach Python; on SQLite only their
   ids and owners do.
2. **Notify.** "Expired" notices are written from the sweep's audit rows (``action =
   'expire'``) past a cursor kept in ``job_cursors``; the notices and the cursor's new
   position commit together, so each token is in exactly one notice. Writing notices apart
   from phase 1 keeps a batch's transaction short whatever the number of owners involved.
3. **Retain** (only with ``TOKENWARDEN_RETENTION_DAYS``): tokens that stopped working more
   than that many days ago are deleted, audited, in windows of ``batch`` primary keys; a pass
   over the table resumes where the previous run stopped, and starts at most once a day.
4. **Prune the inbox** (``TOKENWARDEN_INBOX_RETENTION_DAYS``): done and dead events that
   finished longer ago than that, then dead letters kept that long, are deleted, oldest first,
   ``batch`` rows a transaction; pending events never are, whatever their age.

Every phase gets at least one transaction per run (the table walk: one that marks tokens),
then goes on while the run's time budget lasts; whatever is left waits for the next run, which
finds it again (expired live tokens stay in the partial index, the cursors are in the
database).

Exactly one run at a time (:func:`single_run`), even with two schedulers: on Postgres a
session-level advisory lock held on a dedicated connection; on SQLite an exclusive ``flock``
on a file beside the database, which the kernel releases if the process dies.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeAlias

import structlog
from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Select,
    any_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from worker.domain import db, inbox, notices
from worker.domain.models import (
    AuditEntry,
    JobCursor,
    Membership,
    Role,
    Token,
    TokenKind,
    TokenReminder,
    UTCDateTime,
)
from worker.domain.notices import take_new_notices

log = structlog.get_logger(__name__)

EXPIRED: Final = "expired"
SOURCE: Final = "sweep"
SWEEP_LOCK: Final = "sweep"
NOTICE_CURSOR: Final = "expired_notices"
RETENTION_CURSOR: Final = "retention"
# Tokens listed in one notice.
TOKENS_PER_NOTICE: Final = 100
# Recipients served by one notice transaction. notices.queue() costs a few round trips per
# notice (about 0.5 ms on an idle machine, 2 ms on a busy one), so this, not the batch size,
# bounds the length of a transaction that writes notices.
GROUPS_PER_TRANSACTION: Final = 25
# Swept tokens read per notice transaction: enough to gather a recipient's tokens from
# around the same expiry into one notice.
NOTICE_ROWS: Final = 200
# A retention pass over the whole table starts at most this often.
RETENTION_PASS_EVERY: Final = timedelta(days=1)

Publish = Callable[[Sequence[str]], None]
# A result row of any shape: the sweep works with plain rows, never with loaded tokens.
AnyRow: TypeAlias = "Row[*tuple[Any, ...]]"
Progress = Callable[["SweepResult"], None]


# -- one run at a time --------------------------------------------------------------------


class RunLock:
    """Held while a run lasts; :meth:`held` says whether it still is."""

    def __init__(self, connection: Connection | None = None) -> None:
        self._connection = connection

    def held(self) -> bool:
        if self._connection is None:
            return True
        # A session-level advisory lock lives exactly as long as its connection's session;
        # if that connection is gone, another run may already hold the lock.
        try:
            self._connection.exec_driver_sql("SELECT 1")
        except Exception:
            return False
        return True


_LOCAL_LOCKS: dict[tuple[str, str], threading.Lock] = {}
_LOCAL_LOCKS_GUARD = threading.Lock()


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for ``name``."""
    digest = hashlib.sha256(f"tokenwarden.{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def single_run(engine: Engine, name: str) -> Iterator[RunLock | None]:
    """Yield a :class:`RunLock` if no other run named ``name`` holds it, else ``None`` at once.

    Never waits: a second scheduler's run returns immediately and leaves the work to the one
    that holds the lock.
    """
    if engine.dialect.name == "postgresql":
        with _advisory_lock(engine, lock_key(name)) as lock:
            yield lock
        return
    database = make_url(str(engine.url)).database
    if database and database != ":memory:":
        with _file_lock(Path(f"{database}.{name}.lock")) as lock:
            yield lock
        return
    # An in-memory database lives in one process: a process-wide lock is enough.
    with _LOCAL_LOCKS_GUARD:
        local = _LOCAL_LOCKS.setdefault((str(engine.url), name), threading.Lock())
    if not local.acquire(blocking=False):
        yield None
        return
    try:
        yield RunLock()
    finally:
        local.release()


@contextmanager
def _advisory_lock(engine: Engine, key: int) -> Iterator[RunLock | None]:
    # Session-level, on a connection of its own in autocommit: the batches commit on other
    # connections, and a transaction-level lock would end with the first of them. If this
    # process dies, Postgres ends the session and the lock with it.
    connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        acquired = connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": key})
        if not acquired:
            yield None
            return
        try:
            yield RunLock(connection)
        finally:
            try:
                connection.scalar(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            except Exception:
                # Never hand a connection that may still hold the lock back to the pool.
                connection.invalidate()
    finally:
        connection.close()


@contextmanager
def _file_lock(path: Path) -> Iterator[RunLock | None]:
    import fcntl

    # SQLite is a local file, so every process that writes to it runs on this machine and
    # can see this lock file. flock() locks are per open file, so two runs in one process
    # exclude each other too, and the kernel drops the lock when its holder dies.
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        try:
            yield RunLock()
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


# -- timing ----------------------------------------------------------------------------------


@dataclass
class RunStats:
    """What a run did; ``ran`` is False when another run held the lock."""

    ran: bool
    notices: int = 0
    transactions: int = 0
    # False when the budget ended the run with work left for the next one.
    finished: bool = True
    duration_s: float = 0.0
    longest_transaction_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ran": self.ran,
            "notices": self.notices,
            "transactions": self.transactions,
            "finished": self.finished,
            "duration_s": round(self.duration_s, 3),
            "longest_transaction_ms": round(self.longest_transaction_ms, 1),
        }


@dataclass
class SweepResult(RunStats):
    swept: int = 0
    deleted: int = 0
    # Finished inbox events and dead letters deleted past the inbox retention.
    inbox_deleted: int = 0
    dead_letters_deleted: int = 0
    phase: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "swept": self.swept,
            "deleted": self.deleted,
            "inbox_deleted": self.inbox_deleted,
            "dead_letters_deleted": self.dead_letters_deleted,
            **super().as_dict(),
        }


class Budget:
    """A run's time budget: each phase gets one transaction, then more while time is left."""

    def __init__(self, seconds: float | None) -> None:
        self.started = time.monotonic()
        self.deadline = None if seconds is None else self.started + seconds

    def left(self) -> bool:
        return self.deadline is None or time.monotonic() < self.deadline

    def elapsed(self) -> float:
        return time.monotonic() - self.started


@contextmanager
def timed_transaction(engine: Engine, result: RunStats) -> Iterator[Session]:
    """One transaction, its duration (commit included) counted into ``result``."""
    started = time.perf_counter()
    with db.transaction(engine) as session:
        yield session
    elapsed_ms = (time.perf_counter() - started) * 1000
    result.transactions += 1
    result.longest_transaction_ms = max(result.longest_transaction_ms, elapsed_ms)


# -- owners and notices ------------------------------------------------------------------------

# Who a notice about a token goes to: a PAT's owner in its org, or an org's admins for its
# application tokens.
GroupKey = tuple[str, str, str | None]

TOKEN_COLUMNS: Final = (
    Token.id,
    Token.kind,
    Token.org_id,
    Token.user_id,
    Token.app_id,
    Token.created_by,
    Token.name,
    Token.last4,
    Token.expires_at,
)


def group_of(row: AnyRow) -> GroupKey:
    if row.kind == TokenKind.PERSONAL.value and row.user_id:
        return (row.org_id, TokenKind.PERSONAL.value, row.user_id)
    return (row.org_id, TokenKind.APPLICATION.value, None)


def recipients_for(
    session: Session, groups: Iterable[GroupKey]
) -> dict[GroupKey, list[dict[str, Any]]]:
    """The recipients of each group, in two queries whatever the number of groups."""
    groups = set(groups)
    users = {user for _, _, user in groups if user is not None}
    orgs = {org for org, _, user in groups if user is None}
    emails: dict[tuple[str, str], str | None] = {}
    if users:
        for org_id, user_id, email in session.execute(
            select(Membership.org_id, Membership.user_id, Membership.email).where(
                Membership.user_id.in_(users)
            )
        ):
            emails[(org_id, user_id)] = email
    admins: dict[str, list[dict[str, Any]]] = {org: [] for org in orgs}
    if orgs:
        for org_id, user_id, email in session.execute(
            select(Membership.org_id, Membership.user_id, Membership.email)
            .where(
                Membership.org_id.in_(orgs),
                Membership.active.is_(True),
                Membership.role == Role.ADMIN.value,
            )
            .order_by(Membership.org_id, Membership.user_id)
        ):
            admins[org_id].append({"user_id": user_id, "email": email})
    found: dict[GroupKey, list[dict[str, Any]]] = {}
    for key in groups:
        org, _, user = key
        found[key] = (
            [{"user_id": user, "email": emails.get((org, user))}]
            if user is not None
            else admins[org]
        )
    return found


@dataclass(frozen=True)
class QueuedNotice:
    notice_id: str | None
    token_ids: list[str]


def queue_grouped(
    session: Session,
    rows: Sequence[AnyRow],
    *,
    kind: str,
    data: dict[str, Any],
    now: datetime,
    dedupe_prefix: str,
) -> list[QueuedNotice]:
    """One notice per recipient group and up to :data:`TOKENS_PER_NOTICE` of its tokens."""
    grouped: dict[GroupKey, list[AnyRow]] = {}
    for row in rows:
        grouped.setdefault(group_of(row), []).append(row)
    recipients = recipients_for(session, grouped)
    queued: list[QueuedNotice] = []
    for key in sorted(grouped, key=lambda k: (k[0], k[1], k[2] or "")):
        members = grouped[key]
        for start in range(0, len(members), TOKENS_PER_NOTICE):
            chunk = members[start : start + TOKENS_PER_NOTICE]
            notice_id = notices.queue(
                session,
                kind=kind,
                org_id=key[0],
                recipients=recipients[key],
                data={**data, "tokens": [notices.describe(row) for row in chunk]},
                now=now,
                # A token is listed in one notice of a kind (and bucket) only: the first
                # token of a notice names it.
                dedupe_key=f"{dedupe_prefix}:{chunk[0].id}",
            )
            queued.append(QueuedNotice(notice_id, [row.id for row in chunk]))
    return queued


def new_notice_ids(session: Session, queued: Iterable[QueuedNotice]) -> list[str]:
    """The notices queued in this transaction, to publish once it has committed."""
    ids = [q.notice_id for q in queued if q.notice_id is not None]
    # notices.queue() may also note them on the session for the caller's transaction; they
    # are published here instead, once each.
    return list(dict.fromkeys([*ids, *take_new_notices(session)]))


def insert_audit_rows(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Audit rows in one batched INSERT (rows carry the same keys as ``audit.record``).

    ``render_nulls``: without it the ORM leaves out the columns that are None in a row, so
    rows with and without a ``user_id`` (application tokens) interleave into hundreds of
    separate statements per batch instead of one.
    """
    if rows:
        session.execute(insert(AuditEntry).execution_options(render_nulls=True), rows)


# -- phase 1: expire -------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpiredBatch:
    count: int
    # The greatest (expires_at, id) marked: where the next batch's keyset starts.
    last: tuple[datetime, str] | None


def expire_batch(
    session: Session, *, now: datetime, after: tuple[datetime, str] | None, limit: int
) -> ExpiredBatch:
    """Mark the next ``limit`` live tokens past their expiry as expired; audit them.

    The keyset ``after`` starts the index scan past the previous batch instead of re-walking
    the entries that batch left behind (on Postgres the index keeps them until vacuum).
    """
    due = select(Token.id).where(Token.revoked_at.is_(None), Token.expires_at <= now)
    if after is not None:
        due = due.where(tuple_(Token.expires_at, Token.id) > after)
    due = due.order_by(Token.expires_at, Token.id).limit(limit)
    if session.get_bind().dialect.name == "postgresql":
        return _expire_batch_postgres(session, due, now=now)
    # SQLite: every write transaction holds the database's one write lock (BEGIN IMMEDIATE),
    # so nothing else changes these rows meanwhile.
    rows = session.execute(
        update(Token)
        .where(Token.id.in_(due), Token.revoked_at.is_(None))
        .values(revoked_at=now, revoke_reason=EXPIRED)
        .returning(Token.id, Token.org_id, Token.user_id, Token.expires_at)
        .execution_options(synchronize_session=False)
    ).all()
    insert_audit_rows(
        session,
        [
            {
                "at": now,
                "action": "expire",
                "reason": EXPIRED,
                "source": SOURCE,
                "token_id": row.id,
                "org_id": row.org_id,
                "user_id": row.user_id,
                "actor": None,
                "event_id": None,
                "detail": None,
            }
            for row in rows
        ],
    )
    last = max(((row.expires_at, row.id) for row in rows), default=None)
    return ExpiredBatch(len(rows), last)


def _expire_batch_postgres(session: Session, due: Select[str], *, now: datetime) -> ExpiredBatch:
    # SKIP LOCKED: a row that a concurrent revocation holds is left to it (or to the next
    # run) instead of making the sweep wait. The other way round, a revocation of a row in
    # this batch waits only for this one short transaction, never for the whole run.
    # ``id = ANY(ARRAY(subquery))`` keeps the planner on the index for large batches, where
    # ``IN`` or a join switches to a full scan.
    chosen = Token.id == any_(func.array(due.with_for_update(skip_locked=True).scalar_subquery()))
    swept = (
        update(Token)
        .where(chosen, Token.revoked_at.is_(None))
        .values(revoked_at=now, revoke_reason=EXPIRED)
        .returning(Token.id, Token.org_id, Token.user_id, Token.expires_at)
        .cte("swept")
    )
    # The audit rows are written by the same statement, from the UPDATE's RETURNING: the
    # batch's rows never travel to Python and back.
    logged = insert(AuditEntry).from_select(
        ["at", "action", "reason", "source", "token_id", "org_id", "user_id"],
        select(
            literal(now, UTCDateTime()),
            literal("expire"),
            literal(EXPIRED),
            literal(SOURCE),
            swept.c.id,
            swept.c.org_id,
            swept.c.user_id,
        ),
    )
    row = session.execute(
        select(swept.c.expires_at, swept.c.id, func.count().over().label("total"))
        .add_cte(logged.cte("logged"))
        .order_by(swept.c.expires_at.desc(), swept.c.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return ExpiredBatch(0, None)
    return ExpiredBatch(row.total, (row.expires_at, row.id))


def count_due(engine: Engine, *, now: datetime) -> int:
    """Live tokens past their expiry (for progress displays)."""
    with engine.connect().execution_options(**{db.READ_ONLY: True}) as connection:
        return int(
            connection.scalar(
                select(func.count())
                .select_from(Token)
                .where(Token.revoked_at.is_(None), Token.expires_at <= now)
            )
            or 0
        )


# -- phase 1 on Postgres, for a large backlog: along the table ------------------------------

# A backlog of at least this many due tokens per page of the table is swept in table order.
# Walked along the index, such a backlog reaches each page once per due token on it, in
# batches far apart, and a table larger than the buffer cache is written back and read again
# for each of those visits; in table order each page is read, changed and written once.
TABLE_WALK_MIN_DUE_PER_PAGE: Final = 2
# The most pages one table-walk batch reads: about 10 ms of scanning where few tokens
# are due, or none are left (a run after one the budget cut short starts at the first page).
MAX_WINDOW_PAGES: Final = 1024

# One statement per batch, so that no row travels to Python and back: lock the next due rows
# of a window of pages in table order (a TID range scan: the partial index is not read),
# mark them through their row addresses (a TID scan: no primary-key look-up) and audit them
# from the UPDATE's RETURNING. The UPDATE checks the conditions again: a row changed by a
# transaction that committed after this statement's snapshot is left to the next run.
_EXPIRE_WINDOW = text(
    "WITH chosen AS ("
    " SELECT ctid AS place FROM tokens"
    " WHERE ctid >= CAST(:start AS tid) AND ctid < CAST(:stop AS tid)"
    " AND revoked_at IS NULL AND expires_at <= :now"
    " ORDER BY ctid LIMIT :limit FOR UPDATE SKIP LOCKED"
    "), swept AS ("
    " UPDATE tokens SET revoked_at = :now, revoke_reason = :reason"
    " WHERE ctid = ANY(ARRAY(SELECT place FROM chosen))"
    " AND revoked_at IS NULL AND expires_at <= :now"
    " RETURNING id, org_id, user_id"
    "), logged AS ("
    " INSERT INTO audit (at, action, reason, source, token_id, org_id, user_id)"
    " SELECT :now, 'expire', :reason, :source, id, org_id, user_id FROM swept"
    ")"
    " SELECT (SELECT count(*) FROM swept) AS swept,"
    " (SELECT count(*) FROM chosen) AS taken,"
    " (SELECT CAST(max(place) AS text) FROM chosen) AS last"
).bindparams(bindparam("now", type_=UTCDateTime()))

# A row address: (page, item on the page). Items are numbered from 1, so (page, 0) is where
# a page starts.
Place = tuple[int, int]


@dataclass(frozen=True)
class WindowBatch:
    count: int
    # Rows locked for this batch (those a concurrent change got to first are not marked).
    taken: int
    # The greatest address locked: the next batch starts after it.
    last: Place | None


def _place(value: str) -> Place:
    page, item = value.strip("()").split(",")
    return int(page), int(item)


def expire_window(
    session: Session, *, now: datetime, start: Place, stop_page: int, limit: int
) -> WindowBatch:
    """Mark the first ``limit`` due tokens from ``start`` up to page ``stop_page`` (Postgres)."""
    row = session.execute(
        _EXPIRE_WINDOW,
        {
            "start": f"({start[0]},{start[1]})",
            "stop": f"({stop_page},0)",
            "now": now,
            "limit": limit,
            "reason": EXPIRED,
            "source": SOURCE,
        },
    ).one()
    return WindowBatch(row.swept, row.taken, _place(row.last) if row.last else None)


def table_pages(session: Session) -> int:
    """The token table's size in pages, as the walk starts."""
    return int(
        session.scalar(
            text("SELECT pg_relation_size('tokens') / current_setting('block_size')::int")
        )
        or 0
    )


def due_at_least(session: Session, *, now: datetime, cap: int) -> int:
    """Due tokens, counted along the partial index up to ``cap`` (a bounded read)."""
    due = (
        select(Token.id)
        .where(Token.revoked_at.is_(None), Token.expires_at <= now)
        .limit(cap)
        .subquery()
    )
    return int(session.scalar(select(func.count()).select_from(due)) or 0)


def next_width(width: int, batch: WindowBatch, *, start: Place, limit: int) -> int:
    """Pages for the next window, aiming at ``limit`` due rows a batch.

    A full batch tells how many pages ``limit`` rows took; a short one how dense the window
    was. Growth is bounded so that one sparse window does not make the next one huge.
    """
    if batch.taken >= limit and batch.last is not None:
        wanted = (batch.last[0] - start[0] + 1) * 5 // 4 + 1
    elif batch.taken:
        wanted = -(-width * limit // batch.taken)
    else:
        wanted = width * 4
    return max(1, min(wanted, width * 4, MAX_WINDOW_PAGES))


def table_walk_pages(engine: Engine, *, now: datetime, batch: int) -> tuple[int, int] | None:
    """(pages, due tokens counted) when the backlog is to be swept in table order, else None.

    That is when at least :data:`TABLE_WALK_MIN_DUE_PER_PAGE` tokens per page are due, and
    more than one batch. The count stops there, so it costs at most that many index entries:
    a routine run, with a few newly expired tokens, counts those and walks the index.
    """
    with (
        engine.connect().execution_options(**{db.READ_ONLY: True}) as connection,
        Session(bind=connection) as reader,
    ):
        pages = table_pages(reader)
        wanted = max(TABLE_WALK_MIN_DUE_PER_PAGE * pages, batch + 1)
        due = due_at_least(reader, now=now, cap=wanted)
    return (pages, due) if due >= wanted else None


# -- phase 2: "expired" notices -------------------------------------------------------------


def _cursor(session: Session, name: str, *, now: datetime) -> tuple[str | None, datetime | None]:
    row = session.execute(
        select(JobCursor.position, JobCursor.pass_started_at).where(JobCursor.name == name)
    ).first()
    if row is None:
        session.execute(insert(JobCursor).values(name=name, position=None, updated_at=now))
        return None, None
    return row.position, row.pass_started_at


def _move_cursor(
    session: Session,
    name: str,
    *,
    position: str | None,
    now: datetime,
    pass_started_at: datetime | None = None,
) -> None:
    values: dict[str, Any] = {"position": position, "updated_at": now}
    if pass_started_at is not None:
        values["pass_started_at"] = pass_started_at
    session.execute(update(JobCursor).where(JobCursor.name == name).values(**values))


def notify_expired_batch(session: Session, *, now: datetime, limit: int) -> tuple[bool, list[str]]:
    """Queue "expired" notices for the next swept tokens; return (more left, notice ids).

    Reads the sweep's audit rows past the cursor, at most ``limit`` of them, and stops early
    at :data:`GROUPS_PER_TRANSACTION` recipients so the transaction stays short. Audit ids
    only grow from one sweep batch to the next (one sweep at a time, each batch committed
    before the next starts), so nothing the sweep wrote is ever behind the cursor.
    """
    position, _ = _cursor(session, NOTICE_CURSOR, now=now)
    after = int(position) if position else 0
    # The first unread row comes from the partial index whatever the table's statistics say
    # (right after a large sweep they still describe an audit table without those rows),
    # and the read is then a range of ids no longer than ``limit``: a plan mistaken about
    # the row counts cannot turn it into a scan of every row the sweep wrote.
    start = _first_expire_after(session, after)
    if start is None:
        return False, []
    rows = session.execute(
        select(AuditEntry.id.label("audit_id"), *TOKEN_COLUMNS)
        .select_from(AuditEntry)
        # A token deleted by retention before its notice was written is passed over.
        .outerjoin(Token, Token.id == AuditEntry.token_id)
        .where(
            AuditEntry.action == "expire",
            AuditEntry.id >= start,
            AuditEntry.id < start + limit,
        )
        .order_by(AuditEntry.id)
    ).all()
    if not rows:
        return False, []
    taken: list[AnyRow] = []
    groups: set[GroupKey] = set()
    last = after
    cut = False
    for row in rows:
        if row.id is not None:
            key = group_of(row)
            if key not in groups and len(groups) == GROUPS_PER_TRANSACTION:
                cut = True
                break
            groups.add(key)
            taken.append(row)
        last = row.audit_id
    queued = queue_grouped(
        session,
        taken,
        kind=notices.EXPIRED,
        data={"reason": EXPIRED, "expired_at": now.isoformat()},
        now=now,
        dedupe_prefix="expired",
    )
    _move_cursor(session, NOTICE_CURSOR, position=str(last), now=now)
    more = cut or _first_expire_after(session, last) is not None
    return more, new_notice_ids(session, queued)


def _first_expire_after(session: Session, after: int) -> int | None:
    # min() over the partial index: one index entry read, whatever the statistics say.
    return session.scalar(
        select(func.min(AuditEntry.id)).where(AuditEntry.action == "expire", AuditEntry.id > after)
    )


# -- phase 3: retention ----------------------------------------------------------------------


def purge_batch(
    session: Session, *, now: datetime, retention_days: int, limit: int
) -> tuple[int, bool]:
    """Delete dead tokens older than the retention in the next window of ids.

    Returns (deleted, more): ``more`` is False once the current pass reached the end of the
    table, or when no pass is due. Windows of primary keys keep each transaction to ``limit``
    rows without an index on ``revoked_at`` that every revocation would have to maintain.
    """
    position, started = _cursor(session, RETENTION_CURSOR, now=now)
    if position is None:
        if started is not None and now - started < RETENTION_PASS_EVERY:
            return 0, False
        position, started = "", now
    window = select(Token.id).where(Token.id > position).order_by(Token.id)
    upper = session.scalar(window.offset(limit - 1).limit(1))
    in_window = [Token.id > position] + ([Token.id <= upper] if upper is not None else [])
    cutoff = now - timedelta(days=retention_days)
    rows = session.execute(
        delete(Token)
        .where(*in_window, Token.revoked_at.is_not(None), Token.revoked_at < cutoff)
        .returning(Token.id, Token.org_id, Token.user_id, Token.revoked_at, Token.revoke_reason)
        .execution_options(synchronize_session=False)
    ).all()
    if rows:
        session.execute(
            delete(TokenReminder).where(TokenReminder.token_id.in_([row.id for row in rows]))
        )
        insert_audit_rows(
            session,
            [
                {
                    "at": now,
                    "action": "delete",
                    "reason": "retention",
                    "source": SOURCE,
                    "token_id": row.id,
                    "org_id": row.org_id,
                    "user_id": row.user_id,
                    "actor": None,
                    "event_id": None,
                    "detail": {
                        "revoke_reason": row.revoke_reason,
                        "revoked_at": row.revoked_at.isoformat(),
                        "retention_days": retention_days,
                    },
                }
                for row in rows
            ],
        )
    _move_cursor(session, RETENTION_CURSOR, position=upper, now=now, pass_started_at=started)
    return len(rows), upper is not None


# -- a run -----------------------------------------------------------------------------------


def run_sweep(
    engine: Engine,
    *,
    now: datetime,
    batch: int,
    budget_s: float | None = None,
    retention_days: int | None = None,
    inbox_retention_days: int | None = None,
    publish: Publish | None = None,
    on_progress: Progress | None = None,
) -> SweepResult:
    """Run the sweep's phases as of ``now``, unless another run holds the lock.

    ``publish`` receives the ids of the notices each transaction queued, once it committed.
    """
    if batch <= 0:
        raise ValueError("batch must be a positive number of rows")
    with single_run(engine, SWEEP_LOCK) as lock:
        if lock is None:
            log.info("sweep.busy")
            return SweepResult(ran=False, finished=False)
        budget = Budget(budget_s)
        result = SweepResult(ran=True, finished=False)
        try:
            complete = _expire_all(
                engine, lock, result, budget, now=now, batch=batch, on=on_progress
            )
            complete &= _notify_all(
                engine, lock, result, budget, now=now, batch=batch, publish=publish, on=on_progress
            )
            if retention_days is not None:
                complete &= _purge_all(
                    engine,
                    lock,
                    result,
                    budget,
                    now=now,
                    batch=batch,
                    retention_days=retention_days,
                    on=on_progress,
                )
            if inbox_retention_days is not None:
                complete &= _prune_inbox_all(
                    engine,
                    lock,
                    result,
                    budget,
                    now=now,
                    batch=batch,
                    retention_days=inbox_retention_days,
                    on=on_progress,
                )
            result.finished = complete
        finally:
            result.duration_s = budget.elapsed()
            result.phase = "done"
        log.info("sweep.done", **result.as_dict())
        return result


def _expire_all(
    engine: Engine,
    lock: RunLock,
    result: SweepResult,
    budget: Budget,
    *,
    now: datetime,
    batch: int,
    on: Progress | None,
) -> bool:
    result.phase = "expire"
    if engine.dialect.name == "postgresql":
        backlog = table_walk_pages(engine, now=now, batch=batch)
        if backlog is not None:
            pages, due = backlog
            return _expire_along_table(
                engine, lock, result, budget, now=now, batch=batch, pages=pages, due=due, on=on
            )
    after: tuple[datetime, str] | None = None
    while True:
        with timed_transaction(engine, result) as session:
            marked = expire_batch(session, now=now, after=after, limit=batch)
        result.swept += marked.count
        if on is not None:
            on(result)
        if marked.count < batch:
            return True
        after = marked.last
        if not (budget.left() and lock.held()):
            return False


def _expire_along_table(
    engine: Engine,
    lock: RunLock,
    result: SweepResult,
    budget: Budget,
    *,
    now: datetime,
    batch: int,
    pages: int,
    due: int,
    on: Progress | None,
) -> bool:
    """Sweep pages ``0 .. pages`` in windows of about ``batch`` due tokens.

    Due tokens a concurrent change moved behind the walk, or that it skipped because a
    revocation held them, are left live and due: the next run finds them. Each run walks
    from the first page: pages an earlier run swept hold no due token any more, and a window
    that finds none costs a few milliseconds, so the walk goes on past those whatever the
    budget, and every run marks tokens while any are due.
    """
    start: Place = (0, 0)
    # Windows start at the table's mean density of due tokens and adapt as they go.
    width = max(1, min(-(-batch * pages // due), MAX_WINDOW_PAGES))
    while True:
        stop = min(start[0] + width, pages)
        with timed_transaction(engine, result) as session:
            marked = expire_window(session, now=now, start=start, stop_page=stop, limit=batch)
        result.swept += marked.count
        if on is not None:
            on(result)
        width = next_width(width, marked, start=start, limit=batch)
        if marked.taken >= batch and marked.last is not None:
            start = (marked.last[0], marked.last[1] + 1)
        else:
            start = (stop, 0)
        if start[0] >= pages:
            return True
        if (marked.taken and not budget.left()) or not lock.held():
            return False


def _notify_all(
    engine: Engine,
    lock: RunLock,
    result: SweepResult,
    budget: Budget,
    *,
    now: datetime,
    batch: int,
    publish: Publish | None,
    on: Progress | None,
) -> bool:
    result.phase = "notify"
    while True:
        with timed_transaction(engine, result) as session:
            more, notice_ids = notify_expired_batch(session, now=now, limit=min(batch, NOTICE_ROWS))
        result.notices += len(notice_ids)
        if notice_ids and publish is not None:
            publish(notice_ids)
        if on is not None:
            on(result)
        if not more:
            return True
        if not (budget.left() and lock.held()):
            return False


def _purge_all(
    engine: Engine,
    lock: RunLock,
    result: SweepResult,
    budget: Budget,
    *,
    now: datetime,
    batch: int,
    retention_days: int,
    on: Progress | None,
) -> bool:
    result.phase = "retain"
    while True:
        with timed_transaction(engine, result) as session:
            deleted, more = purge_batch(
                session, now=now, retention_days=retention_days, limit=batch
            )
        result.deleted += deleted
        if on is not None:
            on(result)
        if not more:
            return True
        if not (budget.left() and lock.held()):
            return False


def _prune_inbox_all(
    engine: Engine,
    lock: RunLock,
    result: SweepResult,
    budget: Budget,
    *,
    now: datetime,
    batch: int,
    retention_days: int,
    on: Progress | None,
) -> bool:
    """Delete finished events, then dead letters, older than the retention; ``batch`` a time.

    A transaction deletes at most ``batch`` rows of both kinds together, so a backlog (the
    first run after an upgrade, say) is worked off in short transactions like the sweep's.
    """
    result.phase = "prune"
    before = now - timedelta(days=retention_days)
    complete = False
    try:
        while True:
            with timed_transaction(engine, result) as session:
                events = inbox.purge_finished(session, before=before, limit=batch)
                letters = (
                    inbox.purge_dead_letters(session, before=before, limit=batch - events)
                    if events < batch
                    else 0
                )
            result.inbox_deleted += events
            result.dead_letters_deleted += letters
            if on is not None:
                on(result)
            if events + letters < batch:
                complete = True
                return True
            if not (budget.left() and lock.held()):
                return False
    finally:
        log.info(
            "inbox.retention",
            events=result.inbox_deleted,
            dead_letters=result.dead_letters_deleted,
            retention_days=retention_days,
            finished=complete,
        )
