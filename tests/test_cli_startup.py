"""Short commands start fast: they load neither Celery nor Alembic nor what else they do not use.

``bench/cli.py`` measures the time; this checks the cause, which does not vary with the load of
the machine: what a command has imported by the time it exits.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import Cli, within_lifetime
from tokenwarden.worker.domain import db

# Printed at exit: which of these the command had imported.
PROBE = """
import atexit, json, sys
HEAVY = ("celery", "kombu", "alembic", "mako", "httpx", "fastapi", "uvicorn", "psycopg",
         "sqlalchemy.orm")
atexit.register(lambda: print(json.dumps([m for m in HEAVY if m in sys.modules]), file=sys.stderr))
sys.argv = ["tokenwarden", *sys.argv[1:]]
from tokenwarden.worker.cli import main
main()
"""


def imported(cli: Cli, *args: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        env=cli.env,
        cwd=cli.home,
        timeout=120,
        check=False,
    )
    assert done.returncode in (0, 1, 2), done.stderr
    modules: list[str] = json.loads(done.stderr.strip().splitlines()[-1])
    return set(modules)


@pytest.fixture
def token(cli: Cli) -> str:
    cli("member", "add", "--org", "acme", "--user", "bob", "--role", "user", check=True)
    created = cli(
        "token",
        "create",
        *("--kind", "personal", "--org", "acme", "--user", "bob", "--name", "laptop"),
        *("--expires-at", within_lifetime(), "--json"),
        check=True,
    )
    text: str = created.json()["token"]
    return text


def test_verify_and_list_load_neither_celery_nor_alembic(cli: Cli, token: str) -> None:
    # psycopg is the driver of a Postgres store; on the embedded default it stays unloaded too.
    # Both read the store, through the ORM.
    expected = {"sqlalchemy.orm"} | (
        {"psycopg"} if "TOKENWARDEN_DATABASE_URL" in cli.env else set()
    )
    assert imported(cli, "token", "verify", "--token", token) == expected
    assert imported(cli, "token", "verify", "--token", "sm_pat_notatoken") == expected
    assert imported(cli, "token", "list", "--org", "acme") == expected


def test_the_schema_check_without_alembic_agrees_with_alembic() -> None:
    assert db.declared_head() == db.head_revision()


def test_emit_loads_only_its_http_client(cli: Cli) -> None:
    # Refused before it sends (exit 2), after everything it imports to send has been imported:
    # it talks to the API, so the store's ORM stays unloaded.
    assert imported(cli, "emit", "membership.added", "--data", "not json") == {"httpx"}


def test_a_short_command_ends_with_its_output_and_its_store_closed(cli: Cli, token: str) -> None:
    # A short command ends without the interpreter's teardown: what it printed is all there,
    # its exit status is kept, and its store connection was closed (on SQLite the last close
    # folds the write-ahead log back into the database and removes it).
    usable = cli("token", "verify", "--token", token, "--json")
    assert usable.code == 0
    assert usable.json()["usable"] is True
    refused = cli("token", "verify", "--token", token[:-1] + ("A" if token[-1] != "A" else "B"))
    assert refused.code == 1
    assert refused.stdout.strip()
    listed = cli("token", "list", "--org", "acme", "--json")
    assert listed.code == 0
    assert [t["name"] for t in listed.json()] == ["laptop"]
    if "TOKENWARDEN_DATABASE_URL" not in cli.env:
        assert not list(cli.home.glob("*.db-wal"))
