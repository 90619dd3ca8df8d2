"""A token's text is shown once, at creation, and is found nowhere else afterwards."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from tests.conftest import Cli, Result, Store, within_lifetime
from tokenwarden.config.logging import configure_logging
from tokenwarden.worker.domain.issuing import create_token
from tokenwarden.worker.domain.members import add_member
from tokenwarden.worker.domain.models import Membership, TokenKind
from tokenwarden.worker.domain.revocation import revoke_token
from tokenwarden.worker.domain.tokens import TOKEN_PATTERN, from_header, from_url, hash_token
from tokenwarden.worker.domain.verification import verify_token

FAR = within_lifetime() + "T00:00:00Z"


def secrets_of(token: str) -> list[str]:
    """The token, and its random body on its own (what a partial leak would show)."""
    return [token, token[7:39]]


def assert_absent(haystack: str | bytes, tokens: list[str], where: str) -> None:
    for token in tokens:
        for secret in secrets_of(token):
            if isinstance(haystack, bytes):
                found = secret.encode() in haystack
            else:
                found = secret in haystack
            assert not found, f"{secret[:10]}… found in {where}"


def dump_tables(connection: Connection) -> str:
    """Every row of every table, as text."""
    lines = []
    for name in inspect(connection).get_table_names():
        for row in connection.execute(text(f'SELECT * FROM "{name}"')):
            lines.append(f"{name}: {tuple(row)!r}")
    return "\n".join(lines)


def home_bytes(home: Path) -> bytes:
    """Every file under TOKENWARDEN_HOME: the database, its WAL, the broker's folder, keys."""
    return b"".join(path.read_bytes() for path in sorted(home.rglob("*")) if path.is_file())


def test_cli_cycle_leaves_no_token_text_behind(cli: Cli, store: Store) -> None:
    shown: list[Result] = []  # everything printed, but for the one creation output of each

    def run(*args: str, check: bool | None = None) -> Result:
        result = cli(*args, check=check)
        shown.append(result)
        return result

    run("member", "add", "--org", "acme", "--user", "alice", "--role", "admin", check=True)
    run("member", "add", "--org", "acme", "--user", "bob", "--role", "user", check=True)
    create = ("token", "create", "--org", "acme", "--expires-at", FAR)
    personal_out = cli(*create, "--kind", "personal", "--user", "bob", "--name", "laptop")
    application_out = cli(
        *create, "--kind", "application", "--app", "ci", "--created-by", "alice", "--name", "ci"
    )
    assert personal_out.code == application_out.code == 0
    shown.append(Result(0, "", personal_out.stderr + application_out.stderr))
    (personal,) = TOKEN_PATTERN.findall(personal_out.stdout)
    (application,) = TOKEN_PATTERN.findall(application_out.stdout)
    pat_id = next(row["id"] for row in run("token", "list", "--json").json() if row["user_id"])
    typo = personal[:-1] + ("0" if personal[-1] != "0" else "1")

    assert run("token", "verify", "--token", personal).code == 0
    assert run("token", "verify", "--header", f"x-auth-token: {personal}").code == 0
    assert run("token", "verify", "--url", f"https://svc.example/?token={application}").code == 0
    assert run("token", "verify", "--token", typo, "--json").code == 1
    run("token", "revoke", pat_id, "--confirm", "DELETE", check=True)
    assert run("token", "verify", "--url", f"https://svc.example/{personal}").code == 1
    run("token", "list", check=True)
    run("audit", "--json", check=True)

    issued = [personal, application]
    for result in shown:
        assert_absent(result.stdout, issued, "CLI output")
        assert_absent(result.stderr, issued, "CLI errors")
    if store.backend == "sqlite":
        stored = home_bytes(cli.home)
        assert pat_id.encode() in stored  # the scan reads the real store
        assert_absent(stored, issued, f"the files in {cli.home}")
    else:
        with store.engine.connect() as connection:
            rows = dump_tables(connection)
        assert hash_token(personal) in rows
        assert_absent(rows, issued, "the Postgres tables")


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Every log line at DEBUG and up, as JSON; the previous configuration is restored."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    uvicorn = {
        name: logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
    }
    before = {name: (list(log.handlers), log.propagate) for name, log in uvicorn.items()}
    config = structlog.get_config()
    stream = io.StringIO()
    configure_logging(json=True, level="DEBUG", stream=stream)
    try:
        yield stream
    finally:
        for handler in [h for h in root.handlers if h.get_name() == "tokenwarden"]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        for name, (old_handlers, propagate) in before.items():
            uvicorn[name].handlers[:] = old_handlers
            uvicorn[name].propagate = propagate
        structlog.configure(**config)


def test_domain_cycle_keeps_token_text_out_of_logs_queries_and_rows(
    session: Session, now: datetime, later: datetime, captured_logs: io.StringIO
) -> None:
    connection = session.connection()
    sent: list[str] = []

    def record(_conn: Connection, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append(f"{statement} {parameters!r}")

    event.listen(connection, "before_cursor_execute", record)
    try:
        for user, role in [("alice", "admin"), ("bob", "user")]:
            add_member(
                session,
                org_id="acme",
                user_id=user,
                role=role,
                email=None,
                at=now,
                now=now,
                source="test",
            )
        personal = create_token(
            session,
            kind=TokenKind.PERSONAL,
            org_id="acme",
            user_id="bob",
            name="laptop",
            expires_at=later,
            now=now,
        )
        application = create_token(
            session,
            kind=TokenKind.APPLICATION,
            org_id="acme",
            app_id="ci",
            created_by="alice",
            name="deploy",
            expires_at=later,
            now=now,
        )
        typo = personal.token[:-1] + ("0" if personal.token[-1] != "0" else "1")
        carried = from_url(f"https://svc.example/{personal.token}")
        assert verify_token(session, carried, now=now).usable
        header = from_header(f"x-auth-token: {application.token}")
        assert verify_token(session, header, now=now).usable
        assert verify_token(session, typo, now=now).reason == "malformed"
        revoke_token(session, token_id=personal.id, reason="leaked", source="test", now=now)
        revoke_token(session, token_id=personal.id, reason="leaked", source="test", now=now)
        assert verify_token(session, personal.token, now=now).reason == "revoked"
        membership = session.get(Membership, ("acme", "alice"))
        assert membership is not None
        membership.active = False
        session.flush()
        soon = now + timedelta(minutes=1)
        assert verify_token(session, application.token, now=soon).usable
        rows = dump_tables(connection)
    finally:
        event.remove(connection, "before_cursor_execute", record)

    issued = [personal.token, application.token]
    logs = captured_logs.getvalue()
    assert '"audit.create"' in logs  # the capture did see the domain's log lines
    assert '"audit.revoke"' in logs
    assert_absent(logs, issued, "the logs")
    assert hash_token(personal.token) in rows
    assert_absent(rows, issued, "the database rows")
    assert any(hash_token(application.token) in line for line in sent)
    assert_absent("\n".join(sent), issued, "statements sent to the database")
