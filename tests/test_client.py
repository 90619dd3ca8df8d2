"""The Python producer client against a real API server on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy import select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.conftest import Store
from tokenwarden.config.settings import ConfigError, Settings
from tokenwarden.producer.api import create_app
from tokenwarden.producer.client import (
    MAX_DELAY_S,
    ProducerClient,
    ProducerError,
    ProducerUnreachable,
    make_event,
)
from tokenwarden.worker.domain.db import transaction
from tokenwarden.worker.domain.models import InboxEvent, TokenKind
from tokenwarden.worker.domain.tokens import generate, hash_token
from tokenwarden.worker.runtime.celery_app import make_celery

KEY = "twp_client_test_key_01"


@contextmanager
def running_server(app: ASGIApp) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yield its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, ws="none", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test API server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class RecordingApp:
    """Wraps an ASGI app and keeps the raw body of every request, as the server got it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = bytearray()
        self.bodies.append(b"")
        index = len(self.bodies) - 1

        async def recorded() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                body.extend(message.get("body", b""))
                self.bodies[index] = bytes(body)
            return message

        await self.app(scope, recorded, send)


@pytest.fixture
def api(store: Store, tmp_path: Path) -> Iterator[tuple[str, RecordingApp]]:
    """The producer API on the test store, served on loopback, recording what it receives."""
    settings = Settings(home=tmp_path / "home", database_url=store.url, producer_keys=(KEY,))
    celery_app = make_celery(settings)
    app = RecordingApp(create_app(settings, celery_app=celery_app))
    try:
        with running_server(app) as url:
            yield url, app
    finally:
        celery_app.close()
        store.truncate()


class Sleeps(list[float]):
    """Stands in for time.sleep: notes each delay instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def rows(store: Store) -> dict[str, InboxEvent]:
    with transaction(store.engine) as session:
        return {row.id: row for row in session.scalars(select(InboxEvent))}


def test_emit_sends_one_event_and_returns_its_id(
    api: tuple[str, RecordingApp], store: Store
) -> None:
    url, recorder = api
    with ProducerClient(url, KEY) as client:
        event_id = client.emit("membership.removed", {"org_id": "acme", "user_id": "u-1"})
    row = rows(store)[event_id]
    assert (row.type, row.source, row.data) == (
        "membership.removed",
        "tokenwarden://client",
        {"org_id": "acme", "user_id": "u-1"},
    )
    sent = json.loads(recorder.bodies[0])
    assert sent["specversion"] == "1.0"
    # No time sent: the API stamps the receipt time, so a retry is the same event.
    assert "time" not in sent
    assert row.time is not None


def test_send_a_batch(api: tuple[str, RecordingApp], store: Store) -> None:
    url, recorder = api
    batch = [
        make_event("membership.added", {"org_id": "a", "user_id": f"u-{i}", "role": "user"})
        for i in range(3)
    ]
    with ProducerClient(url, KEY) as client:
        accepted = client.send(batch)
    assert accepted == [e["id"] for e in batch]
    assert set(rows(store)) == set(accepted)
    assert len(recorder.bodies) == 1


def test_a_leaked_token_is_hashed_before_it_leaves_the_process(
    api: tuple[str, RecordingApp], store: Store
) -> None:
    url, recorder = api
    leaked = generate(TokenKind.APPLICATION)
    built = make_event("token.leak_suspected", {"token": leaked, "reporter": "scanner"})
    assert built["data"] == {"token_hash": hash_token(leaked), "reporter": "scanner"}
    raw = {**built, "id": "leak-2", "data": {"token": leaked}}
    with ProducerClient(url, KEY) as client:
        first = client.emit("token.leak_suspected", {"token": leaked}, id="leak-1")
        second = client.send([raw])
    assert (first, second) == ("leak-1", ["leak-2"])
    assert raw["data"] == {"token": leaked}  # the caller's event is left as it was
    assert len(recorder.bodies) == 2
    for body in recorder.bodies:
        assert leaked.encode() not in body
        sent = json.loads(body)
        event = sent if isinstance(sent, dict) else sent[0]
        assert event["data"] == {"token_hash": hash_token(leaked)}
    assert rows(store)["leak-1"].data == {"token_hash": hash_token(leaked)}


def test_a_refusal_is_not_retried(api: tuple[str, RecordingApp], store: Store) -> None:
    url, recorder = api
    sleeps = Sleeps()
    with ProducerClient(url, KEY, sleep=sleeps) as client:
        with pytest.raises(ProducerError) as refused:
            client.emit("membership.added", {"org_id": "a", "user_id": "u", "role": "root"})
        assert refused.value.status == 422
        assert "data.role" in refused.value.detail
        assert refused.value.errors[0]["index"] == 0
        client.emit("user.deactivated", {"user_id": "u-1"}, id="same")
        with pytest.raises(ProducerError) as conflict:
            client.emit("user.deactivated", {"user_id": "u-2"}, id="same")
        assert conflict.value.status == 409
    with ProducerClient(url, "wrong", sleep=sleeps) as client:
        with pytest.raises(ProducerError) as unauthorized:
            client.emit("user.deactivated", {"user_id": "u-1"})
        assert unauthorized.value.status == 401
    assert len(recorder.bodies) == 4
    assert sleeps == []
    assert list(rows(store)) == ["same"]


class FlakyHandler(BaseHTTPRequestHandler):
    """Answers with the statuses its server was given in turn, then 202."""

    server: FlakyServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.bodies.append(body)
        status, headers, pause = self.server.script.pop(0) if self.server.script else (202, {}, 0.0)
        time.sleep(pause)
        sent = json.loads(body)
        events = [sent] if isinstance(sent, dict) else sent
        answer = (
            {"accepted": [event["id"] for event in events]}
            if status == 202
            else {"detail": "the token store is unavailable (OperationalError)"}
        )
        payload = json.dumps(answer).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client gave up waiting (a timeout test)
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        del format, args


class FlakyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script: list[tuple[int, dict[str, str], float]]) -> None:
        super().__init__(("127.0.0.1", 0), FlakyHandler)
        self.script = script
        self.bodies: list[bytes] = []


@contextmanager
def flaky(*script: tuple[int, dict[str, str], float]) -> Iterator[FlakyServer]:
    server = FlakyServer(list(script))
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def url_of(server: FlakyServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}"


def test_a_503_is_retried_after_retry_after_with_the_same_ids() -> None:
    busy = (503, {"Retry-After": "2"}, 0.0)
    with flaky(busy, busy) as server:
        sleeps = Sleeps()
        with ProducerClient(url_of(server), KEY, sleep=sleeps) as client:
            batch = [{"type": "user.deactivated", "data": {"user_id": "u"}} for _ in range(2)]
            accepted = client.send(batch)
    assert len(server.bodies) == 3
    assert server.bodies[0] == server.bodies[1] == server.bodies[2]
    ids = [e["id"] for e in json.loads(server.bodies[0])]
    assert accepted == ids
    assert len(set(ids)) == 2  # the client gave each event an id, once
    assert sleeps == [2.0, 2.0]


def test_retry_after_is_capped_and_dates_are_understood() -> None:
    with flaky(
        (503, {"Retry-After": "86400"}, 0.0),
        (503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),
        (502, {}, 0.0),
    ) as server:
        sleeps = Sleeps()
        with ProducerClient(url_of(server), KEY, backoff=0.5, sleep=sleeps) as client:
            client.emit("user.deactivated", {"user_id": "u"})
    assert sleeps[:2] == [MAX_DELAY_S, 0.0]  # a date in the past: no wait
    assert 1.0 <= sleeps[2] <= 2.0  # the third attempt's backoff, with jitter


def test_a_timeout_is_retried_with_the_same_ids() -> None:
    # The first answer comes after 5 s; the retry's must fit in 1 s even on a loaded machine.
    with flaky((202, {}, 5.0)) as server:
        sleeps = Sleeps()
        with ProducerClient(url_of(server), KEY, timeout=1.0, sleep=sleeps) as client:
            event_id = client.emit("user.deactivated", {"user_id": "u"})
    assert len(server.bodies) == 2
    assert server.bodies[0] == server.bodies[1]
    assert json.loads(server.bodies[0])["id"] == event_id
    assert len(sleeps) == 1


def test_gives_up_on_503_after_every_attempt() -> None:
    busy = (503, {"Retry-After": "1"}, 0.0)
    with (
        flaky(busy, busy, busy) as server,
        ProducerClient(url_of(server), KEY, attempts=3, sleep=Sleeps()) as client,
        pytest.raises(ProducerError) as error,
    ):
        client.emit("user.deactivated", {"user_id": "u"})
    assert error.value.status == 503
    assert "token store is unavailable" in error.value.detail
    assert len(server.bodies) == 3


def test_unreachable_after_every_attempt_with_growing_backoff() -> None:
    sleeps = Sleeps()
    with (
        ProducerClient("http://127.0.0.1:1", KEY, attempts=4, sleep=sleeps) as client,
        pytest.raises(ProducerUnreachable) as error,
    ):
        client.emit("user.deactivated", {"user_id": "u"})
    assert str(error.value).startswith("cannot reach the producer API at http://127.0.0.1:1: ")
    assert error.value.status is None
    assert len(sleeps) == 3
    for attempt, delay in enumerate(sleeps):
        ceiling = 0.5 * 2**attempt
        assert ceiling / 2 <= delay <= ceiling


def test_refuses_locally_what_the_api_would_refuse_unread() -> None:
    with ProducerClient("http://127.0.0.1:1", KEY, attempts=1) as client:
        with pytest.raises(ProducerError) as too_big:
            client.emit("user.deactivated", {"user_id": "x" * (1024 * 1024)})
        assert too_big.value.status == 413
        with pytest.raises(ValueError, match="empty"):
            client.send([])
        with pytest.raises(ValueError, match="leaked token's text"):
            client.emit("token.leak_suspected", {"token": ["not", "text"]})


def test_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("TOKENWARDEN_")]:
        monkeypatch.delenv(name)
    home = tmp_path / "home"
    with pytest.raises(ConfigError, match="TOKENWARDEN_PRODUCER_KEY"):
        ProducerClient.from_settings(Settings(home=home))
    generated = Settings(home=home).generated_producer_key()
    with ProducerClient.from_settings(Settings(home=home, api_url="http://api.test:9/")) as client:
        assert client.api_url == "http://api.test:9"
        assert client._http.headers["Authorization"] == f"Bearer {generated}"
    explicit = Settings(home=home, producer_key="twp_explicit_producer_key")
    with ProducerClient.from_settings(explicit) as client:
        assert client._http.headers["Authorization"] == "Bearer twp_explicit_producer_key"


def test_make_event_defaults() -> None:
    built = make_event("user.deactivated", {"user_id": "u"})
    assert built["specversion"] == "1.0"
    assert built["source"] == "tokenwarden://client"
    assert len(built["id"]) == 36
    assert "time" not in built
    assert make_event("user.deactivated", {"user_id": "u"}, time="2026-01-01T00:00:00Z")[
        "time"
    ] == ("2026-01-01T00:00:00Z")
    with pytest.raises(ValueError, match="time zone"):
        make_event("user.deactivated", {"user_id": "u"}, time=datetime(2026, 1, 1))
