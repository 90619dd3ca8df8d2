"""A live tokenwarden stack for end-to-end tests: real API, worker and scheduler processes
on a real broker and database, driven over HTTP and checked in the database."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tokenwarden.config.settings import Settings
from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.issuing import IssuedToken, create_token
from tokenwarden.worker.domain.members import add_member
from tokenwarden.worker.domain.models import Membership, TokenKind
from tokenwarden.worker.domain.verification import Verdict, verify_token
from tokenwarden.worker.ops.supervisor import STOP_GRACE_S, command, wait_for_http

T = TypeVar("T")
KEY = "twp_stack_test_key_0001"


def event(
    type_: str, data: dict[str, Any], *, at: datetime | None = None, id_: str | None = None
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": id_ or f"evt-{uuid.uuid4().hex[:12]}",
        "source": "test://e2e",
        "type": type_,
        "time": (at or datetime.now(UTC)).isoformat(),
        "data": data,
    }


@dataclass
class LiveStack:
    home: Path
    env: dict[str, str]
    database_url: str
    port: int
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def queue(self) -> str:
        return self.env["TOKENWARDEN_QUEUE"]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine(self) -> Engine:
        return db.engine_for(self.database_url)

    def start(self, *roles: str) -> None:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for role in roles:
            argv = {
                "api": command("api", "--port", str(self.port)),
                "worker": command("worker", "--concurrency", "2"),
                "beat": command("beat"),
            }[role]
            with (logs / f"{role}.log").open("ab") as out:
                self.processes[role] = subprocess.Popen(
                    argv,
                    env=self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.home,
                    start_new_session=True,
                )
        if "api" in roles and not wait_for_http(f"{self.api_url}/healthz", 30):
            raise AssertionError(f"the API did not start:\n{self.log('api')}")

    def kill(self, role: str, signum: int = signal.SIGKILL) -> None:
        process = self.processes.pop(role)
        # The role's whole process group: a prefork worker's children die with it.
        os.killpg(process.pid, signum)
        process.wait(timeout=30)

    def stop(self) -> None:
        for role in list(self.processes):
            process = self.processes[role]
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for role, process in list(self.processes.items()):
            try:
                # Longer than ``tokenwarden run`` takes to stop its children (STOP_GRACE_S).
                process.wait(timeout=STOP_GRACE_S + 15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            del self.processes[role]

    def log(self, role: str) -> str:
        path = self.home / "logs" / f"{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "".join(self.log(role) for role in ("api", "worker", "beat"))

    def post(self, body: Any, *, key: str | None = KEY, **headers: str) -> httpx.Response:
        sent = {"Content-Type": "application/json", **headers}
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        return httpx.post(f"{self.api_url}/v1/events", json=body, headers=sent, timeout=30)

    def send(self, *events: dict[str, Any]) -> list[str]:
        response = self.post(list(events) if len(events) != 1 else events[0])
        assert response.status_code == 202, response.text
        accepted: list[str] = response.json()["accepted"]
        return accepted

    @contextmanager
    def session(self) -> Iterator[Session]:
        with db.transaction(self.engine) as session:
            yield session

    def member(
        self, org_id: str, user_id: str, role: str = "user", at: datetime | None = None
    ) -> None:
        now = datetime.now(UTC)
        with self.session() as session:
            add_member(
                session,
                org_id=org_id,
                user_id=user_id,
                role=role,
                email=None,
                at=at or now,
                now=now,
                source="test",
            )

    def token(
        self,
        kind: TokenKind,
        org_id: str,
        owner: str,
        *,
        created_by: str | None = None,
        at: datetime | None = None,
    ) -> IssuedToken:
        now = at or datetime.now(UTC)
        with self.session() as session:
            if kind is TokenKind.PERSONAL:
                return create_token(
                    session,
                    kind=kind,
                    org_id=org_id,
                    name="e2e",
                    expires_at=now + timedelta(days=30),
                    now=now,
                    user_id=owner,
                )
            return create_token(
                session,
                kind=kind,
                org_id=org_id,
                name="e2e",
                expires_at=now + timedelta(days=30),
                now=now,
                app_id=owner,
                # An application token needs an active member of the org as its creator.
                created_by=created_by
                or session.scalar(
                    select(Membership.user_id)
                    .where(Membership.org_id == org_id, Membership.active.is_(True))
                    .order_by(Membership.user_id)
                    .limit(1)
                ),
            )

    def events(self, *event_ids: str) -> list[dict[str, Any]]:
        """The inbox rows with these ids, as stored (type, source, data, status)."""
        from sqlalchemy import select

        from tokenwarden.worker.domain.models import InboxEvent

        with self.session() as session:
            rows = session.scalars(select(InboxEvent).where(InboxEvent.id.in_(event_ids)))
            return [
                {"id": r.id, "type": r.type, "source": r.source, "data": r.data, "status": r.status}
                for r in rows
            ]

    def verify(self, text: str) -> Verdict:
        with self.session() as session:
            return verify_token(session, text, now=datetime.now(UTC), source="test")

    def wait_for(
        self, what: Callable[[], T], *, timeout: float = 15.0, message: str = "condition"
    ) -> T:
        deadline = time.monotonic() + timeout
        while True:
            value = what()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {message}\n{self.logs()[-4000:]}")
            time.sleep(0.05)


def stack_env(home: Path, extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARDEN_")}
    env.update(
        {
            "TOKENWARDEN_HOME": str(home),
            "TOKENWARDEN_PRODUCER_KEYS": KEY,
            "TOKENWARDEN_REDRIVE_AFTER_S": "2",
            # A queue of its own, so runs sharing a broker never see each other's messages.
            "TOKENWARDEN_QUEUE": f"tokenwarden-test-{uuid.uuid4().hex[:8]}",
            **extra,
        }
    )
    return env


def check_broker(settings: Settings) -> None:
    """Fail unless the broker named by ``settings`` answers."""
    from tokenwarden.worker.runtime.celery_app import make_celery

    app = make_celery(settings)
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=3)


# The stacks a door's end-to-end tests run on: the embedded default everywhere, and Postgres
# with RabbitMQ when both are named (see conftest). For ``params`` of a module fixture that
# calls :func:`run_live` with ``request.param``.
LIVE_STACKS = [
    "embedded",
    pytest.param("rabbitmq", marks=[pytest.mark.postgres, pytest.mark.rabbitmq]),
]


def run_live(kind: str, home: Path, extra: Mapping[str, str] | None = None) -> Iterator[LiveStack]:
    """A started API, worker and scheduler on ``kind`` ("embedded", or a broker service of
    conftest on a fresh Postgres database), with the ``extra`` settings; stopped, and its
    queue deleted, afterwards. A named service that is down fails the run."""
    from tests.conftest import fresh_postgres_database, service_url

    settings_extra = dict(extra or {})
    if kind == "embedded":
        yield from _run_live(home, settings_extra)
        return
    broker = service_url(kind)
    assert broker is not None
    with fresh_postgres_database() as url:
        settings_extra |= {"TOKENWARDEN_DATABASE_URL": url, "TOKENWARDEN_BROKER_URL": broker}
        try:
            check_broker(Settings(home=home, database_url=url, broker_url=broker))
        except Exception as error:
            pytest.fail(f"{kind} at {broker} is unreachable: {error}", pytrace=False)
        yield from _run_live(home, settings_extra)


def _run_live(home: Path, extra: dict[str, str]) -> Iterator[LiveStack]:
    from tokenwarden.worker.ops.supervisor import free_port

    env = stack_env(home, extra)
    settings = Settings(home=home, database_url=extra.get("TOKENWARDEN_DATABASE_URL"))
    stack = LiveStack(
        home=home, env=env, database_url=settings.resolved_database_url, port=free_port()
    )
    db.upgrade(stack.database_url)
    stack.start("api", "worker", "beat")
    try:
        yield stack
    finally:
        stack.stop()
        broker = extra.get("TOKENWARDEN_BROKER_URL")
        if broker is not None:
            from kombu.connection import Connection

            from tokenwarden.config.celery import transport_options

            options = transport_options(Settings(home=home, broker_url=broker))
            with Connection(broker, transport_options=options) as connection:  # type: ignore[no-untyped-call]
                connection.default_channel.queue_delete(stack.queue)
