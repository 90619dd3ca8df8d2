"""Group commit: the events of every request waiting at once go into the inbox together.

A request hands its prepared events to the :class:`InboxWriter` and waits. The writer takes
whatever is waiting, stores it in one transaction, commits once, publishes the new ids in
messages of up to a hundred, and only then answers each request: a ``202`` still means the
request's events are committed. Requests that arrive meanwhile form the next group, so under
load one commit and one publish serve many requests. On Postgres the next group may start
while one is still under way (two at once, :data:`IN_FLIGHT`), as another API process's would.

On Postgres the usual group (every id new) is one ``COPY`` that commits on its own.
Otherwise, and on SQLite, one transaction inserts with ``ON CONFLICT DO NOTHING RETURNING id``
and looks up the ids that were there already.

Within a group each request keeps the outcome it would have had alone, in arrival order: an id
already stored, or taken earlier in the group, with other content refuses that request (409)
and stores none of its events; the same content again is accepted and stored once.

Used by producer/routes/events.py; must not import the routes, ``producer.api`` or ``tasks``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from operator import attrgetter
from typing import Any, Final, cast

import orjson
import psycopg
from sqlalchemy import Connection, Engine, Table, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError

from tokenwarden.producer.intake import Prepared
from tokenwarden.worker.domain import clock
from tokenwarden.worker.domain.db import make_engine
from tokenwarden.worker.domain.inbox import Conflict
from tokenwarden.worker.domain.models import EventStatus, InboxEvent
from tokenwarden.worker.runtime.publishing import PublishError

# Events in one transaction: a group takes waiting requests until it holds this many (a
# request is never split), so one transaction stays short.
GROUP_EVENTS: Final = 2000
# Requests answered together were sent by as many producers at once, and they usually come
# back within a round trip: while fewer than the last group are waiting, the next group waits
# for them this long at most, so a steady load makes one commit per round of requests rather
# than two half-rounds. A lone producer waits at most once, right after a busier moment.
LINGER_S: Final = 0.002
# A group is redone when a request of it turns out refused after its rows went in, or when
# another writer raced it; each redo settles at least one request, so this is never reached
# in practice.
MAX_ATTEMPTS: Final = 20

# Groups committing at once on Postgres: while one waits on the server or the broker, the next
# is inserted, so neither the API nor Postgres sits idle between groups (about 1.5 times the
# events a second, bench/ingest.py). SQLite has one writer at a time: one group there.
IN_FLIGHT: Final = 2
# The writers' threads: a group's database and broker calls block, the event loop must not.
_THREAD: Final = ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="inbox-writer")
_TABLE: Final = cast(Table, InboxEvent.__table__)
# Rows are lists of strings and the events' data: nothing can refer to itself.
_ROWS_ENCODER: Final = json.JSONEncoder(check_circular=False)
_PENDING: Final = EventStatus.PENDING.value

# Postgres: every row in one JSON parameter, unpacked by the server. Adapting a hundred rows
# of parameters costs the client more than the insert itself.
_POSTGRES_INSERT: Final = (
    "INSERT INTO events (id, type, source, time, data, digest, status, attempts, "
    "received_at, published_at) "
    "SELECT r->>0, r->>1, r->>2, (r->>3)::timestamptz, r->4, r->>5, %(status)s, 0, "
    "%(now)s, %(now)s FROM json_array_elements(%(rows)s::json) AS r "
    "ON CONFLICT (id) DO NOTHING RETURNING id"
)


# The same, all or nothing, when no id is stored yet: one COPY (no ON CONFLICT), so an id
# already stored, or one another writer commits meanwhile, fails the whole statement (Postgres
# logs that unique violation) and the group takes the full path. Each row's unique-index
# check is all it looks up: a NOT EXISTS over the inbox would be planned from the table's
# statistics, and on a young inbox they say "empty", so it became a scan per group. COPY
# costs the server under half of what unpacking JSON rows does (bench/ingest.py).
_POSTGRES_COPY: Final = (
    "COPY events (id, type, source, time, data, digest, status, attempts, received_at, "
    "published_at) FROM STDIN"
)


class StoreUnavailable(Exception):
    """The group's transaction failed; nothing of it was stored."""

    def __init__(self, error: BaseException) -> None:
        lines = str(error).strip().splitlines()
        super().__init__(lines[0] if lines else type(error).__name__)
        self.kind = type(error).__name__


@dataclass(frozen=True)
class Outcome:
    """What happened to one request's events: all stored (new, or the same content again)."""

    accepted: list[str]  # each id once, in the order first sent
    published: int  # ids of this request put on the queue (0 when publishing failed)
    publish_error: str | None = None


@dataclass
class _Job:
    events: Sequence[Prepared]
    future: asyncio.Future[Outcome]
    wanted: dict[str, Prepared] = field(default_factory=dict)  # first occurrence of each id
    clashes: list[str] = field(default_factory=list)  # repeated in the request, other content

    def __post_init__(self) -> None:
        for event in self.events:
            seen = self.wanted.setdefault(event.id, event)
            if seen.digest != event.digest:
                self.clashes.append(event.id)


@dataclass
class _Settled:
    """One request's fate in a group: a conflict, or the ids it has the queue carry."""

    conflict: Conflict | None = None
    to_publish: list[str] = field(default_factory=list)


class InboxWriter:
    """Stores requests' events by group commit, then publishes their ids (see the module)."""

    def __init__(self, database_url: str, publish: Callable[[Sequence[str]], None]) -> None:
        self._database_url = database_url
        self._in_flight = IN_FLIGHT if database_url.startswith("postgresql") else 1
        self._publish = publish
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: list[_Job] = []
        self._drainer: asyncio.Task[None] | None = None
        self._usual = 1  # requests in the last group
        self._enough: asyncio.Future[None] | None = None  # done once the usual number waits
        self._wake: asyncio.Future[None] | None = None

    async def store(self, events: Sequence[Prepared]) -> Outcome:
        """Commit ``events`` with whatever else is waiting; raise :class:`Conflict` or
        :class:`StoreUnavailable` when this request's events were not stored."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A new event loop (a test client's): what belonged to the old one is gone.
            self._loop, self._waiting, self._drainer, self._enough = loop, [], None, None
        job = _Job(events, loop.create_future())
        self._waiting.append(job)
        if self._enough is not None and len(self._waiting) >= self._usual:
            _settle_future(self._enough)
        if self._wake is not None:
            _settle_future(self._wake)
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        return await job.future

    async def _drain(self) -> None:
        running: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        try:
            while self._waiting or running:
                if not self._waiting or len(running) >= self._in_flight:
                    self._wake = wake = loop.create_future()
                    await asyncio.wait([*running, wake], return_when=asyncio.FIRST_COMPLETED)
                    self._wake = None
                    continue
                if len(self._waiting) < self._usual:
                    self._enough = enough = loop.create_future()
                    timer = enough.get_loop().call_later(LINGER_S, _settle_future, enough)
                    await enough
                    timer.cancel()
                    self._enough = None
                group = self._take()
                self._usual = len(group)
                task = loop.create_task(self._settle(group))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            # Normally nothing is left; after a cancellation (the loop is closing) the
            # requests still waiting are cancelled too rather than left hanging.
            for task in running:
                task.cancel()
            if self._drainer is asyncio.current_task():
                for job in self._waiting:
                    job.future.cancel()
                self._waiting, self._drainer = [], None

    async def _settle(self, group: list[_Job]) -> None:
        try:
            settled, published, problem = await asyncio.get_running_loop().run_in_executor(
                _THREAD, self._commit, group
            )
        except asyncio.CancelledError:
            for job in group:
                job.future.cancel()
            raise
        except Exception as error:
            for job in group:
                _fail(job, StoreUnavailable(error))
            return
        for job, fate in zip(group, settled, strict=True):
            if fate.conflict is not None:
                _fail(job, fate.conflict)
            elif not job.future.done():  # its request may have gone; its events stay stored
                job.future.set_result(
                    Outcome(
                        accepted=list(job.wanted),
                        published=len(fate.to_publish) if published else 0,
                        publish_error=problem,
                    )
                )

    def _take(self) -> list[_Job]:
        size, count = 0, 0
        for job in self._waiting:
            if count and size + len(job.events) > GROUP_EVENTS:
                break
            size += len(job.events)
            count += 1
        group, self._waiting = self._waiting[:count], self._waiting[count:]
        return group

    def _commit(self, group: list[_Job]) -> tuple[list[_Settled], bool, str | None]:
        """Store the group and publish what it added (in a worker thread)."""
        settled = self._store(group)
        ids = list(dict.fromkeys(i for fate in settled for i in fate.to_publish))
        if not ids:
            return settled, True, None
        try:
            self._publish(ids)
        except PublishError as error:
            lines = str(error).strip().splitlines()
            return settled, False, lines[0] if lines else type(error).__name__
        return settled, True, None

    def _store(self, group: list[_Job]) -> list[_Settled]:
        now = clock.now()
        engine = _engine(self._database_url)
        settled = [
            _Settled(conflict=Conflict(sorted(set(job.clashes)))) if job.clashes else None
            for job in group
        ]
        reconnected = False
        for attempt in range(MAX_ATTEMPTS):
            try:
                if attempt == 0 and engine.dialect.name == "postgresql":
                    quick = _store_all_new(engine, group, settled, now)
                    if quick is not None:
                        return quick
                with engine.begin() as connection:
                    if _try_group(connection, group, settled, now):
                        return [fate or _Settled() for fate in settled]
                    connection.rollback()
            except DBAPIError as error:
                # A connection the server dropped (a restart) is discarded with its pool;
                # one more try on a fresh one, as a ping at checkout would have done.
                if not error.connection_invalidated or reconnected:
                    raise
                reconnected = True
        raise RuntimeError(f"the group did not settle in {MAX_ATTEMPTS} attempts")


def _store_all_new(
    engine: Engine, group: list[_Job], settled: list[_Settled | None], now: datetime
) -> list[_Settled] | None:
    """The usual group in one statement, which commits on its own: every id new to the inbox,
    each sent with one content. None, having stored nothing, when that is not so."""
    rows: dict[str, Prepared] = {}
    for job, fate in zip(group, settled, strict=True):
        for event_id, event in job.wanted.items() if fate is None else ():
            if rows.setdefault(event_id, event).digest != event.digest:
                return None  # an id taken earlier in the group: the full path settles it
    if not rows:
        return None
    copied = _copy_rows(list(rows.values()), now)
    with engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        driver = cast(psycopg.Connection[Any], connection.connection.driver_connection)
        try:
            with driver.cursor() as cursor:
                with cursor.copy(_POSTGRES_COPY) as copy:
                    for row in copied:
                        copy.write_row(row)
                stored = cursor.rowcount
        except psycopg.errors.UniqueViolation:
            return None  # some id is stored already, or another writer took it: none went in
        except psycopg.Error as error:
            # As SQLAlchemy has it for a statement of its own: a dropped connection leaves the
            # pool, and _store tries once more on a fresh one.
            dropped = connection.dialect.is_disconnect(
                cast(Any, error), connection.connection, None
            )
            if dropped:
                connection.invalidate(error)
            raise DBAPIError(_POSTGRES_COPY, None, error, connection_invalidated=dropped) from error
    if stored != len(rows):
        raise RuntimeError(f"{stored} of {len(rows)} new events stored")
    return [
        fate or _Settled(to_publish=list(job.wanted))
        for job, fate in zip(group, settled, strict=True)
    ]


def _postgres_rows(events: list[Prepared], now: datetime) -> dict[str, Any]:
    """The parameters of the Postgres inserts: every row in one JSON document, in order of id.

    Two groups commit at once (:data:`IN_FLIGHT`), and other API processes may too: rows
    inserted in one order everywhere mean two inserts that share ids wait for each other's
    commit rather than deadlock.
    """
    rows = [
        [e.id, e.type, e.source, time, e.data, e.digest] for e, time in _in_id_order(events, now)
    ]
    try:
        encoded = orjson.dumps(rows).decode()
    except orjson.JSONEncodeError:  # what orjson does not write (an integer past 64 bits)
        encoded = _ROWS_ENCODER.encode(rows)
    return {"rows": encoded, "now": now, "status": _PENDING}


def _copy_rows(events: list[Prepared], now: datetime) -> list[tuple[str, ...]]:
    """The rows of :data:`_POSTGRES_COPY`, as text, in order of id (see :func:`_postgres_rows`)."""
    now_text = now.isoformat()
    tail = (_PENDING, "0", now_text, now_text)
    rows: list[tuple[str, ...]] = []
    for e, time in _in_id_order(events, now):
        try:
            data = orjson.dumps(e.data).decode()
        except orjson.JSONEncodeError:  # what orjson does not write (an integer past 64 bits)
            data = _ROWS_ENCODER.encode(e.data)
        rows.append((e.id, e.type, e.source, time, data, e.digest, *tail))
    return rows


def _in_id_order(events: list[Prepared], now: datetime) -> Iterator[tuple[Prepared, str]]:
    """``events`` in order of id, each with its time as text (``now`` when it has none)."""
    now_text = now.isoformat()
    # The events of a batch usually share one time: each distinct time is written once.
    texts: dict[datetime, str] = {}
    for e in sorted(events, key=attrgetter("id")):
        if e.time is None:
            yield e, now_text
        elif e.time in texts:
            yield e, texts[e.time]
        else:
            yield e, texts.setdefault(e.time, e.time.isoformat())


def _settle_future(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _fail(job: _Job, error: Exception) -> None:
    if not job.future.done():
        job.future.set_exception(error)


def _try_group(
    connection: Connection,
    group: list[_Job],
    settled: list[_Settled | None],
    now: datetime,
) -> bool:
    """One attempt at the group; False (and ``settled`` updated) when it must be redone.

    The requests not yet settled are stored as if one after the other: the first to send an
    id writes its row, later ones are checked against it.
    """
    active = [index for index, fate in enumerate(settled) if fate is None]
    first: dict[str, tuple[int, Prepared]] = {}
    for index in active:
        for event_id, event in group[index].wanted.items():
            first.setdefault(event_id, (index, event))
    inserted = _insert(connection, [event for _, event in first.values()], now)
    before = [event_id for event_id in first if event_id not in inserted]
    existing = _existing(connection, before)
    if len(existing) < len(before):
        return False  # a row gone since the insert saw it: look again
    claimed = {event_id: digest for event_id, (digest, _) in existing.items()}
    # Rows there before that the worker has taken up already: their ids are not sent again.
    taken_up = {event_id for event_id, (_, status) in existing.items() if status != _PENDING}
    outcome = {index: _judge(group[index], claimed, taken_up) for index in active}
    for index, fate in outcome.items():
        if fate.conflict is not None:
            settled[index] = fate
    if any(outcome[first[event_id][0]].conflict is not None for event_id in inserted):
        return False  # rows of a refused request went in: again without it
    for index, fate in outcome.items():
        settled[index] = fate
    return True


def _existing(connection: Connection, ids: list[str]) -> dict[str, tuple[str, str]]:
    """The digest and status of each of ``ids`` already in the inbox."""
    if not ids:
        return {}
    rows = connection.execute(
        select(_TABLE.c.id, _TABLE.c.digest, _TABLE.c.status).where(_TABLE.c.id.in_(ids))
    )
    return {row.id: (row.digest, row.status) for row in rows}


def _judge(job: _Job, claimed: dict[str, str], taken_up: set[str]) -> _Settled:
    """The fate of ``job``, judged by the digest each id is ``claimed`` with (by a row there
    before, or by a request before it in the group): a conflict when one of its ids holds
    other content; else it claims its ids and has the queue carry those not ``taken_up``."""
    clashes = sorted(
        event_id
        for event_id, event in job.wanted.items()
        if claimed.get(event_id, event.digest) != event.digest
    )
    if clashes:
        return _Settled(conflict=Conflict(clashes))
    for event_id, event in job.wanted.items():
        claimed.setdefault(event_id, event.digest)
    return _Settled(to_publish=[event_id for event_id in job.wanted if event_id not in taken_up])


def _insert(connection: Connection, events: list[Prepared], now: datetime) -> set[str]:
    """Insert the rows of ``events`` that are not there yet; the ids inserted."""
    if not events:
        return set()
    if connection.dialect.name == "postgresql":
        result = connection.exec_driver_sql(_POSTGRES_INSERT, _postgres_rows(events, now))
        return {row[0] for row in result}
    statement = (
        sqlite.insert(_TABLE)
        .on_conflict_do_nothing(index_elements=[_TABLE.c.id])
        .returning(_TABLE.c.id)
    )
    rows: list[dict[str, Any]] = [
        {
            "id": e.id,
            "type": e.type,
            "source": e.source,
            "time": e.time or now,
            "data": e.data,
            "digest": e.digest,
            "status": _PENDING,
            "attempts": 0,
            "received_at": now,
            # Counted as published now: the writer publishes right after the commit, and the
            # re-drive steps in only if that did not happen.
            "published_at": now,
        }
        for e in events
    ]
    return set(connection.execute(statement, rows).scalars())


@cache
def _engine(url: str) -> Engine:
    """The writer's engine: no ping at each checkout (a dropped connection is retried once)."""
    return make_engine(url, pool_pre_ping=False)
