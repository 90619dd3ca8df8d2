"""The reliability suite's shared pieces: evidence for the secrets check, figures, stores.

The secrets test runs last of the whole session, whatever the order of collection, so that
it searches what every other test left behind. Each test's figures are printed as it ends
and once more, all together, in the terminal summary.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import BACKENDS, Store, fresh_postgres_database, service_url
from tests.reliability.evidence import Evidence
from tests.reliability.figures import RECORDED
from tokenwarden.worker.domain import db

# Runs after every other test of the session (see pytest_collection_modifyitems).
LAST_MODULE = "test_secrets.py"
SEED_ENV = "TOKENWARDEN_CHAOS_SEED"


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture parameters
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    last = [item for item in items if item.path.name == LAST_MODULE]
    if last:
        items[:] = [item for item in items if item.path.name != LAST_MODULE] + last


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RECORDED:
        return
    terminalreporter.section("reliability figures")
    for figures in RECORDED:
        terminalreporter.write_line(figures.line())


_EVIDENCE: list[Evidence] = []


@pytest.fixture(scope="session")
def evidence(tmp_path_factory: pytest.TempPathFactory) -> Evidence:
    """What the suite leaves behind: token texts, logs, database dumps, queued messages."""
    if not _EVIDENCE:
        _EVIDENCE.append(Evidence(tmp_path_factory.mktemp("evidence")))
    return _EVIDENCE[0]


class SeededRandom(random.Random):
    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.seed_value = seed


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> SeededRandom:
    """A random source whose seed is printed, so that a failing run can be replayed."""
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(10**9))
    print(f"{request.node.name}: {SEED_ENV}={seed}")
    return SeededRandom(seed)


@pytest.fixture(params=BACKENDS)
def own_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A migrated store of this test's own (the shared session store is left alone)."""
    if request.param == "postgres":
        with fresh_postgres_database() as url:
            engine = db.make_engine(url)
            yield Store("postgres", url, engine)
            engine.dispose()
        return
    url = f"sqlite:///{tmp_path / 'own.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    yield Store("sqlite", url, engine)
    engine.dispose()


@contextmanager
def store_url(kind: str, home: Path) -> Iterator[str | None]:
    """A fresh database for one stack: Postgres when named, else the embedded SQLite."""
    if kind == "embedded":
        yield None
        return
    assert service_url("postgres") is not None
    with fresh_postgres_database() as url:
        yield url
