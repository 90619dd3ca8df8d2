"""``tokenwarden sweep`` and ``tokenwarden remind`` as a user and their scripts run them."""

from __future__ import annotations

import os
import pty
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from tests.conftest import TOKENWARDEN, Cli, Store
from tests.test_sweep import add_tokens
from tokenwarden.worker.domain import db, notices
from tokenwarden.worker.domain.expiry.lock import single_run
from tokenwarden.worker.domain.issuing import create_token
from tokenwarden.worker.domain.models import Notice, TokenKind


@pytest.fixture
def engine(cli: Cli, store: Store) -> Iterator[Engine]:
    """The store the CLI uses (the embedded SQLite file in its home, or Postgres)."""
    cli("member", "add", "--org", "acme", "--user", "bob", "--role", "user", check=True)
    if store.backend == "postgres":
        yield store.engine
        return
    engine = db.make_engine(f"sqlite:///{cli.home / 'tokenwarden.db'}")
    yield engine
    engine.dispose()


def count_notices(engine: Engine, kind: str) -> int:
    with Session(engine) as session:
        return int(
            session.scalar(select(func.count()).select_from(Notice).where(Notice.kind == kind)) or 0
        )


def test_a_token_past_its_expiry_is_refused_at_once_then_swept_and_audited(
    cli: Cli, engine: Engine
) -> None:
    # Issued ten minutes ago for five minutes: expired now, however slowly the CLI starts.
    issued_at = datetime.now(UTC) - timedelta(minutes=10)
    with Session(engine) as session, session.begin():
        token = create_token(
            session,
            kind=TokenKind.PERSONAL,
            org_id="acme",
            name="short-lived",
            expires_at=issued_at + timedelta(minutes=5),
            now=issued_at,
            user_id="bob",
        )
    issued = {"id": token.id, "token": token.token}

    # Refused as soon as it expires, before any sweep ran.
    verdict = cli("token", "verify", "--token", issued["token"], "--json")
    assert (verdict.code, verdict.json()["reason"]) == (1, "expired")

    report = cli("sweep", "--json", check=True).json()
    assert report["ran"] is True
    assert report["swept"] >= 1
    assert report["notices"] >= 1
    assert report["finished"] is True
    assert set(report) >= {"swept", "notices", "deleted", "duration_s", "longest_transaction_ms"}

    trail = cli("audit", "--token", issued["id"], "--json", check=True).json()
    swept = [entry for entry in trail if entry["action"] == "expire"]
    assert len(swept) == 1
    assert (swept[0]["reason"], swept[0]["source"]) == ("expired", "sweep")
    listed = cli("token", "list", "--json", check=True).json()
    assert [(t["state"], t["reason"]) for t in listed if t["id"] == issued["id"]] == [
        ("expired", "expired")
    ]
    assert count_notices(engine, notices.EXPIRED) == 1

    again = cli("sweep", "--json", check=True).json()
    assert (again["swept"], again["notices"]) == (0, 0)
    text = cli("sweep", check=True)
    assert text.stdout.startswith("swept 0 expired tokens")
    verdict = cli("token", "verify", "--token", issued["token"], "--json")
    assert (verdict.code, verdict.json()["reason"]) == (1, "expired")


def test_reminders_for_a_token_five_days_out_make_exactly_one_notice(
    cli: Cli, engine: Engine
) -> None:
    expires = (datetime.now(UTC) + timedelta(days=5)).isoformat()
    cli(
        "token",
        "create",
        "--kind=personal",
        "--org=acme",
        "--user=bob",
        "--name=deploy",
        f"--expires-at={expires}",
        check=True,
    )

    first = cli("remind", "--json", check=True).json()
    assert (first["ran"], first["reminded"], first["notices"]) == (True, 1, 1)
    assert first["by_days"] == {"7": 1, "30": 0, "60": 0}
    for _ in range(2):
        again = cli("remind", "--json", check=True).json()
        assert (again["reminded"], again["notices"]) == (0, 0)
    assert cli("remind", check=True).stdout.strip() == "reminded 0 tokens in 0 notices"
    assert count_notices(engine, notices.EXPIRING) == 1


def test_a_sweep_while_another_runs_returns_at_once(cli: Cli, engine: Engine) -> None:
    add_tokens(engine, 2, expires_at=datetime.now(UTC) - timedelta(days=1))
    with single_run(engine, "sweep") as lock:
        assert lock is not None
        started = time.monotonic()
        busy = cli("sweep", "--json", check=True).json()
        text = cli("sweep", check=True).stdout
        elapsed = time.monotonic() - started
    assert (busy["ran"], busy["swept"]) == (False, 0)
    assert "another sweep is running" in text
    assert elapsed < 30  # two process starts; a waiting sweep would never return here
    assert cli("sweep", "--json", check=True).json()["swept"] == 2


def test_on_a_terminal_the_sweep_shows_its_progress(cli: Cli, engine: Engine) -> None:
    add_tokens(engine, 25, expires_at=datetime.now(UTC) - timedelta(days=1))
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run(
            [str(TOKENWARDEN), "sweep", "--batch", "10"],
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
            env=cli.env,
            cwd=cli.home,
            timeout=120,
            check=False,
        )
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal's other end is closed: all is read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
    assert done.returncode == 0, done.stdout
    progress = shown.decode()
    assert "expiring: 10 of 25 (40%)" in progress
    assert "expiring: 25 of 25 (100%)" in progress
    # Notices are written per transaction of up to --batch swept tokens.
    assert done.stdout.startswith("swept 25 expired tokens, queued 3 notices in ")
