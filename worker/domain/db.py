"""Engines, sessions and schema migrations for the token store."""

from __future__ import annotations

import re
from ast import literal_eval
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Engine,
    String,
    any_,
    bindparam,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    tuple_,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import QueryableAttribute, Session, sessionmaker

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql, sqlite

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option for connections that only read: on SQLite they skip the write lock.
READ_ONLY = "tokenwarden_read_only"


def _tune_sqlite(engine: Engine) -> None:
    """WAL, a busy timeout, and ``BEGIN IMMEDIATE`` for every transaction.

    A deferred SQLite transaction that reads and then writes fails at once with
    "database is locked" when another writer got in between (the busy timeout does not
    apply to that upgrade). Taking the write lock at ``BEGIN`` makes concurrent workers,
    the API and the CLI wait their turn instead.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        if connection.get_execution_options().get(READ_ONLY):
            connection.exec_driver_sql("BEGIN")  # readers never wait for a writer in WAL
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, **kwargs: Any) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        engine = create_engine(url, **kwargs)
        _tune_sqlite(engine)
        return engine
    if parsed.get_backend_name() == "postgresql":
        from tokenwarden.worker.domain.models import describe_postgres_indexes

        describe_postgres_indexes()
    # A database host that drops packets must fail a request quickly, not hang it.
    kwargs.setdefault("connect_args", {"connect_timeout": 5})
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 5)
    kwargs.setdefault("max_overflow", 10)
    return create_engine(url, **kwargs)


_ENGINES: dict[str, Engine] = {}


def engine_for(url: str) -> Engine:
    """One engine (and pool) per URL and process."""
    engine = _ENGINES.get(url)
    if engine is None:
        engine = _ENGINES.setdefault(url, make_engine(url))
    return engine


def close_engines() -> None:
    """Close the pooled connections of every engine :func:`engine_for` made: a process that
    ends without the interpreter's teardown still closes its database connections."""
    for engine in list(_ENGINES.values()):
        engine.dispose()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """A session in one transaction: commit on success, rollback on error, always closed."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        yield session


def reader(engine: Engine) -> Engine:
    """``engine`` for work that only reads: on SQLite its transactions never take the write lock.

    A reader then neither waits for a writer nor makes one wait, however long it reads (in
    WAL mode it reads the snapshot of its first statement). Only for work that never writes:
    a deferred transaction that writes after a concurrent commit fails at once with
    "database is locked" (see :func:`_tune_sqlite`). Same pool as ``engine``.
    """
    return engine.execution_options(**{READ_ONLY: True})


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Session]:
    """:func:`transaction` on :func:`reader`: a session for work that only reads."""
    with transaction(reader(engine)) as session:
        yield session


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Create or migrate the schema to ``revision``."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect().execution_options(**{READ_ONLY: True}) as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


# ``revision = "0008"`` / ``down_revision: str | None = "0007"`` in a migration file.
_REVISION_LINE = re.compile(r"^(revision|down_revision)\b[^=\n]*=\s*(.+?)\s*$", re.MULTILINE)


@cache
def declared_head() -> str | None:
    """The head revision as the migration files declare it, read without loading Alembic.

    Every command checks the schema before it works, and Alembic takes longer to import than
    the rest of a short command; this reading is trusted only to confirm what the store holds
    (:func:`schema_is_current`). ``None`` when the files are not one plain chain.
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        found = dict(_REVISION_LINE.findall(path.read_text(encoding="utf-8")))
        if "revision" not in found:
            continue
        revision, down = literal_eval(found["revision"]), literal_eval(found["down_revision"])
        if not isinstance(revision, str) or not isinstance(down, str | None):
            return None
        revisions.add(revision)
        if down is not None:
            parents.add(down)
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def stored_revision(engine: Engine) -> str | None:
    """The revision recorded in the store's ``alembic_version`` table, read with plain SQL."""
    with engine.connect().execution_options(**{READ_ONLY: True}) as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        rows = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    return rows[0][0] if len(rows) == 1 else None


def schema_is_current(engine: Engine) -> bool:
    head = declared_head()
    if head is not None and stored_revision(engine) == head:
        return True
    # Anything else (an older store, a new one, branches) is for Alembic to judge.
    return current_revision(engine) == head_revision()


def ensure_schema(engine: Engine, url: str) -> None:
    """Migrate to head unless already there (the embedded default needs no separate step)."""
    if not schema_is_current(engine):
        upgrade(url)


def describe_url(url: str) -> str:
    """The URL without its password, fit for an error message or a log line."""
    return make_url(url).render_as_string(hide_password=True)


def insert_for(session: Session, entity: Any) -> postgresql.Insert | sqlite.Insert:
    """An ``INSERT`` into ``entity`` in the session's dialect, which has ``ON CONFLICT``
    clauses (Postgres in production, SQLite in development and tests)."""
    # Imported here: a command on the embedded default never loads the Postgres dialect.
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(entity)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(entity)


def among(
    session: Session, column: ColumnElement[Any] | QueryableAttribute[Any], values: Collection[str]
) -> ColumnElement[bool]:
    """``column`` (text) equals one of ``values``.

    On Postgres the values travel as one array, so the statement's text is the same whatever
    their number: psycopg prepares it once and the server plans it once, where an ``IN`` list
    of a hundred values is parsed by the driver and planned by the server on every run.
    Elsewhere it is an ``IN`` list.
    """
    if session.get_bind().dialect.name != "postgresql":
        return column.in_(list(values))
    return column == any_(_text_array(list(values)))


def one_of(
    session: Session,
    columns: Sequence[ColumnElement[Any] | QueryableAttribute[Any]],
    keys: Collection[Sequence[str]],
) -> ColumnElement[bool]:
    """``columns`` (text) equal one of ``keys``, each a value per column: on Postgres one
    array a column, unnested (see :func:`among`), where an ``IN`` list of a hundred keys is a
    hundred index probes ``OR``-ed together, planned anew on every run."""
    rows = [tuple(key) for key in keys]
    if session.get_bind().dialect.name != "postgresql":
        return tuple_(*columns).in_(rows)
    names = [f"k{index}" for index in range(len(columns))]
    arrays = [_text_array([row[index] for row in rows]) for index in range(len(columns))]
    wanted = func.unnest(*arrays).table_valued(*names).render_derived()
    return tuple_(*columns).in_(select(*[wanted.c[name] for name in names]))


def _text_array(values: list[str]) -> BindParameter[Any]:
    # Imported here: a command on the embedded default never loads the Postgres dialect.
    from sqlalchemy.dialects.postgresql import ARRAY

    return bindparam(None, values, type_=ARRAY(String()))
