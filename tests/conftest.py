"""Shared fixtures: the token store on every configured database, and the real CLI.

Services are chosen by environment: SQLite always; Postgres when
``TOKENWARDEN_TEST_POSTGRES_URL`` is set, RabbitMQ with ``TOKENWARDEN_TEST_RABBITMQ_URL``,
Redis with ``TOKENWARDEN_TEST_REDIS_URL``. A test marked for a service that is not named is
skipped; a service that is named but unreachable fails the run, it is never skipped.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, make_url, text
from sqlalchemy.orm import Session

# In-process code (the Celery app, the CLI helpers) reads TOKENWARDEN_HOME at import: give the
# whole run a throw-away home so nothing lands in the working tree.
os.environ["TOKENWARDEN_HOME"] = tempfile.mkdtemp(prefix="tokenwarden-tests-")

from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.models import Base

SERVICES = {
    "postgres": "TOKENWARDEN_TEST_POSTGRES_URL",
    "rabbitmq": "TOKENWARDEN_TEST_RABBITMQ_URL",
    "redis": "TOKENWARDEN_TEST_REDIS_URL",
}
REPO = Path(__file__).resolve().parent.parent
TOKENWARDEN = Path(sys.executable).with_name("tokenwarden")


def service_url(name: str) -> str | None:
    return os.environ.get(SERVICES[name]) or None


CHAOS = "TOKENWARDEN_TEST_CHAOS"


def pytest_configure(config: pytest.Config) -> None:
    # A command a test runs without TOKENWARDEN_HOME keeps its store in a folder of this run,
    # never in the user's own default (~/.local/share/tokenwarden).
    os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="tokenwarden-tests-data-")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    chaos = os.environ.get(CHAOS) == "1"
    for item in items:
        if item.get_closest_marker("chaos") and not chaos:
            item.add_marker(pytest.mark.skip(reason=f"fault-injection suite: set {CHAOS}=1"))
        for name, variable in SERVICES.items():
            if item.get_closest_marker(name) and not service_url(name):
                item.add_marker(pytest.mark.skip(reason=f"{variable} is not set"))


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@dataclass
class Store:
    """A migrated database for the test session."""

    backend: str
    url: str
    engine: Engine

    def truncate(self) -> None:
        with self.engine.begin() as connection:
            for table in reversed(Base.metadata.sorted_tables):
                connection.execute(table.delete())


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, migrated Postgres database for this run; dropped afterwards."""
    base = service_url("postgres")
    assert base is not None
    admin_url = make_url(_normalise(base))
    admin = db.make_engine(
        admin_url.render_as_string(hide_password=False), isolation_level="AUTOCOMMIT"
    )
    name = f"tw_test_{secrets.token_hex(4)}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:  # a named service that is down fails the run
        pytest.fail(f"Postgres at {SERVICES['postgres']} is unreachable: {error}", pytrace=False)
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    try:
        db.upgrade(url)
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _normalise(url: str) -> str:
    if url.startswith(("postgres://", "postgresql://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


@pytest.fixture(scope="session", params=BACKENDS)
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Store]:
    """The token store, migrated once per session with Alembic (so migrations are tested)."""
    if request.param == "postgres":
        with fresh_postgres_database() as url:
            engine = db.make_engine(url)
            yield Store("postgres", url, engine)
            engine.dispose()
        return
    path = tmp_path_factory.mktemp("store") / "tokenwarden.db"
    url = f"sqlite:///{path}"
    db.upgrade(url)
    engine = db.make_engine(url)
    yield Store("sqlite", url, engine)
    engine.dispose()


@pytest.fixture
def session(store: Store) -> Iterator[Session]:
    """A session whose work is rolled back at the end: outer transaction plus savepoints."""
    connection = store.engine.connect()
    outer = connection.begin()
    session = Session(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        connection.close()


@pytest.fixture
def now() -> datetime:
    return datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest.fixture
def later(now: datetime) -> datetime:
    return now + timedelta(days=90)


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        import json

        return json.loads(self.stdout)


class Cli:
    """The real ``tokenwarden`` console script, run as a user would run it."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = env

    def __call__(self, *args: str, check: bool | None = None) -> Result:
        done = subprocess.run(
            [str(TOKENWARDEN), *args],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.home,
            timeout=120,
            check=False,
        )
        result = Result(done.returncode, done.stdout, done.stderr)
        if check and result.code != 0:
            raise AssertionError(
                f"tokenwarden {' '.join(args)} exited {result.code}: {result.stderr}{result.stdout}"
            )
        return result


def within_lifetime(days: int = 300) -> str:
    """An expiry date ``days`` from today, inside the default maximum lifetime (366 days)."""
    return (datetime.now(UTC) + timedelta(days=days)).date().isoformat()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARDEN_")}
    env.update(extra)
    return env


@pytest.fixture
def cli(store: Store, tmp_path: Path) -> Iterator[Cli]:
    """The CLI on this session's backend: the embedded default, or the Postgres store."""
    home = tmp_path / "home"
    extra = {"TOKENWARDEN_HOME": str(home)}
    if store.backend == "postgres":
        extra["TOKENWARDEN_DATABASE_URL"] = store.url
    tmp_path.joinpath("home").mkdir()
    yield Cli(home, clean_env(**extra))
    if store.backend == "postgres":
        store.truncate()
