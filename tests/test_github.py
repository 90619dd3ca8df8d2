"""GitHub's secret scanning partner endpoint, as GitHub would call it.

The public keys come from a real HTTP server on loopback, signed requests from a P-256 key pair
made here; the clock that paces key fetches is the test's own.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import secrets
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, event, select
from starlette.exceptions import StarletteDeprecationWarning

from tests.conftest import Store
from tokenwarden.config.logging import configure_logging
from tokenwarden.config.settings import Settings
from tokenwarden.producer.api import create_app
from tokenwarden.producer.github import GitHubKeys
from tokenwarden.worker.domain import clock
from tokenwarden.worker.domain.db import transaction
from tokenwarden.worker.domain.handlers import apply_pending
from tokenwarden.worker.domain.models import AuditEntry, Base, InboxEvent, Token, TokenKind
from tokenwarden.worker.domain.tokens import generate, hash_token
from tokenwarden.worker.runtime.celery_app import make_celery

with warnings.catch_warnings():
    # Starlette 1.x would rather its test client ran on httpx2, and says so on import.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

PATH = "/v1/secret-scanning/github"
REPO_URL = "https://github.com/octo/app/blob/5f1c0e2/.env"
# A fetch deadline long enough that answers given meanwhile are told apart on a loaded machine.
HANGING_FETCH_S = 6.0
UNREACHABLE_BROKER = "amqp://guest:guest@127.0.0.1:1//"
UNREACHABLE_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:1/none"


@pytest.fixture(autouse=True)
def _own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the settings each test builds count, not the developer's environment."""
    for name in [n for n in os.environ if n.startswith("TOKENWARDEN_")]:
        if not name.startswith("TOKENWARDEN_TEST_"):
            monkeypatch.delenv(name)


@dataclass
class Signer:
    """One of GitHub's signing keys."""

    key_id: str = field(default_factory=lambda: secrets.token_hex(32))
    private: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    def entry(self, *, current: bool = True) -> dict[str, Any]:
        pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return {"key_identifier": self.key_id, "key": pem.decode(), "is_current": current}

    def headers(self, body: bytes) -> dict[str, str]:
        signature = self.private.sign(body, ec.ECDSA(hashes.SHA256()))
        return {
            "Github-Public-Key-Identifier": self.key_id,
            "Github-Public-Key-Signature": base64.b64encode(signature).decode(),
            "Content-Type": "application/json",
        }


class _KeysHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _KeysHandler)
        self.body = b'{"public_keys": []}'
        self.status = 200
        self.fetches = 0
        # Hostile modes: the body a byte at a time (for at most ``drip_for`` seconds, then
        # the rest at once), or padded with white space to any size, with or without a
        # Content-Length (without one, the body ends when the connection does).
        self.drip_every: float | None = None
        self.drip_for = 0.0
        self.padding = 0
        self.declare_length = True
        self.written = 0  # bytes of body the last fetch took before it hung up
        self.closing = threading.Event()


class _KeysHandler(BaseHTTPRequestHandler):
    server: _KeysHTTPServer

    def do_GET(self) -> None:
        server = self.server
        server.fetches += 1
        server.written = 0
        body = server.body
        self.send_response(server.status)
        self.send_header("Content-Type", "application/json")
        if server.declare_length:
            self.send_header("Content-Length", str(len(body) + server.padding))
        self.end_headers()
        try:
            if server.drip_every is not None:
                self._drip(body[:-1], server.drip_every, time.monotonic() + server.drip_for)
                self._write(b" " * server.padding + body[-1:])
            else:
                padding, piece = server.padding, b" " * 65536
                self._write(body[:-1])
                while padding > 0:
                    self._write(piece[:padding])
                    padding -= len(piece)
                self._write(body[-1:])
        except OSError:
            pass  # the client hung up: what it took is in ``written``
        self.close_connection = True

    def _drip(self, data: bytes, every: float, until: float) -> None:
        for index in range(len(data)):
            if time.monotonic() >= until or self.server.closing.is_set():
                self._write(data[index:])
                return
            self._write(data[index : index + 1])
            time.sleep(every)

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()
        self.server.written += len(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class KeysServer:
    """GitHub's ``meta/public_keys/secret_scanning``, on loopback, counting its fetches."""

    def __init__(self) -> None:
        self._server = _KeysHTTPServer()
        # A short poll interval, so that shutting the server down takes no noticeable time.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/meta/public_keys"

    @property
    def fetches(self) -> int:
        return self._server.fetches

    def publish(self, *entries: dict[str, Any]) -> None:
        self.serve(json.dumps({"public_keys": list(entries)}).encode())

    def serve(self, body: bytes, status: int = 200) -> None:
        self._server.body, self._server.status = body, status

    def drip(self, every: float, *, for_s: float) -> None:
        """Send the body a byte every ``every`` seconds, for ``for_s`` at most."""
        self._server.drip_every, self._server.drip_for = every, for_s

    def pad(self, size: int, *, declare_length: bool = True) -> None:
        """Make the (still valid) document ``size`` bytes larger."""
        self._server.padding, self._server.declare_length = size, declare_length

    @property
    def written(self) -> int:
        return self._server.written

    def close(self) -> None:
        self._server.closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class Ticks:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class GitHub:
    api: TestClient
    keys: KeysServer
    ticks: Ticks
    signer: Signer
    home: Path

    def report(
        self, reports: list[dict[str, Any]] | bytes, *, signer: Signer | None = None
    ) -> httpx.Response:
        body = reports if isinstance(reports, bytes) else json.dumps(reports).encode()
        headers = (signer or self.signer).headers(body)
        response: httpx.Response = self.api.post(PATH, content=body, headers=headers)
        return response


Start = Callable[..., GitHub]


@pytest.fixture
def keys_server() -> Iterator[KeysServer]:
    server = KeysServer()
    yield server
    server.close()


@pytest.fixture
def start(store: Store, keys_server: KeysServer, tmp_path: Path) -> Iterator[Start]:
    """Start the API on the test store, its GitHub keys served by ``keys_server``."""
    opened: list[tuple[TestClient, Any]] = []

    def run(
        *, broker_retries: int | None = None, deadline_s: float = 2.0, **options: Any
    ) -> GitHub:
        home = tmp_path / "home"
        defaults: dict[str, Any] = {
            "home": home,
            "database_url": store.url,
            "producer_keys": ("twp_test_producer_key",),
            "github_keys_url": keys_server.url,
        }
        settings = Settings(**(defaults | options))
        celery_app = make_celery(settings)
        if broker_retries is not None:
            celery_app.conf.broker_transport_options = {"max_retries": broker_retries}
        ticks = Ticks()
        keys = GitHubKeys(settings.github_keys_url, deadline_s=deadline_s, clock=ticks)
        client = TestClient(create_app(settings, celery_app=celery_app, github_keys=keys))
        client.__enter__()
        opened.append((client, celery_app))
        signer = Signer()
        keys_server.publish(signer.entry())
        return GitHub(client, keys_server, ticks, signer, home)

    yield run
    for client, celery_app in opened:
        client.__exit__(None, None, None)
        celery_app.close()
    store.truncate()


@pytest.fixture
def github(start: Start) -> GitHub:
    return start()


def add_token(
    store: Store,
    kind: TokenKind = TokenKind.PERSONAL,
    *,
    revoked: bool = False,
    expired: bool = False,
) -> str:
    text = generate(kind)
    now = clock.now()
    with transaction(store.engine) as session:
        session.add(
            Token(
                id="tok_" + secrets.token_hex(8),
                kind=kind.value,
                org_id="acme",
                user_id="u-1" if kind is TokenKind.PERSONAL else None,
                app_id="app-1" if kind is TokenKind.APPLICATION else None,
                created_by="u-1",
                name="ci",
                token_hash=hash_token(text),
                last4=text[-4:],
                created_at=now - timedelta(days=40),
                expires_at=now + timedelta(days=-1 if expired else 30),
                revoked_at=now if revoked else None,
                revoke_reason="deleted" if revoked else None,
            )
        )
    return text


def report(token: str, *, url: str = REPO_URL, source: str | None = "content") -> dict[str, Any]:
    sent = {"token": token, "type": "tokenwarden_personal_access_token", "url": url}
    return sent | ({"source": source} if source is not None else {})


def stored(store: Store) -> dict[str, InboxEvent]:
    with transaction(store.engine) as session:
        return {row.id: row for row in session.scalars(select(InboxEvent))}


def queue_files(home: Path) -> list[str]:
    return [path.read_text() for path in sorted((home / "broker" / "queue").glob("*.msg"))]


def queued_ids(home: Path) -> list[str]:
    ids = []
    for raw in queue_files(home):
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        ids += body[0][0]
    return ids


def all_rows(store: Store) -> str:
    with store.engine.connect() as connection:
        return "\n".join(
            repr(row)
            for table in Base.metadata.sorted_tables
            for row in connection.execute(table.select())
        )


def label(token: str, kind: str = "tokenwarden_personal_access_token", **rest: str) -> Any:
    return {"token_hash": hash_token(token), "token_type": kind} | rest


def malformed_tokens() -> list[str]:
    good = generate(TokenKind.PERSONAL)
    typo = good[:-1] + ("A" if good[-1] != "A" else "B")  # the checksum no longer matches
    return [typo, "sm_sat_" + good[7:], good[:-2], "hunter2", ""]


def test_labels_each_report_and_stores_each_well_formed_one(github: GitHub, store: Store) -> None:
    ours = add_token(store)
    app_token = add_token(store, TokenKind.APPLICATION)
    revoked = add_token(store, revoked=True)
    expired = add_token(store, expired=True)
    stranger = generate(TokenKind.PERSONAL)
    malformed = malformed_tokens()
    well_formed = [ours, app_token, revoked, expired, stranger]
    response = github.report([report(t) for t in [*well_formed, *malformed]])
    assert response.status_code == 200
    assert response.json() == [
        *(label(t, label="true_positive") for t in [ours, app_token, revoked, expired]),
        *(label(t, label="false_positive") for t in [stranger, *malformed]),
    ]
    rows = stored(store)
    assert sorted(row.data["token_hash"] for row in rows.values()) == sorted(
        hash_token(t) for t in well_formed
    )
    for row in rows.values():
        assert row.id.startswith("leak-github-")
        assert (row.type, row.source, row.status) == ("token.leak_suspected", "github", "pending")
        assert row.data == {
            "token_hash": row.data["token_hash"],
            "source_url": REPO_URL,
            "reporter": "github:content",
        }
    assert sorted(queued_ids(github.home)) == sorted(rows)


def test_the_worker_revokes_what_github_reported(github: GitHub, store: Store) -> None:
    ours, stranger = add_token(store), generate(TokenKind.PERSONAL)
    assert github.report([report(ours), report(stranger)]).status_code == 200
    with transaction(store.engine) as session:
        outcome = apply_pending(
            session, list(stored(store)), now=clock.now(), retryable=lambda _: False
        )
    assert len(outcome.done) == 2
    with transaction(store.engine) as session:
        token = session.scalars(select(Token).where(Token.token_hash == hash_token(ours))).one()
        entry = session.scalars(select(AuditEntry).where(AuditEntry.token_id == token.id)).one()
    assert (token.state, token.revoke_reason) == ("revoked", "leaked")
    assert (entry.source, entry.actor, entry.reason) == ("github", "github:content", "leaked")
    assert entry.detail == {"source_url": REPO_URL, "reporter": "github:content"}


def test_a_report_resent_after_the_worker_revoked_the_token_is_still_a_true_positive(
    github: GitHub, store: Store
) -> None:
    ours, stranger = add_token(store), generate(TokenKind.PERSONAL)
    batch = [report(ours), report(stranger)]
    first = github.report(batch)
    with transaction(store.engine) as session:
        apply_pending(session, list(stored(store)), now=clock.now(), retryable=lambda _: False)
    with transaction(store.engine) as session:
        token = session.scalars(select(Token).where(Token.token_hash == hash_token(ours))).one()
        assert token.state == "revoked"

    second = github.report(batch)  # GitHub retries a delivery it got no answer to

    assert second.status_code == 200
    assert (
        second.json()
        == first.json()
        == [
            label(ours, label="true_positive"),
            label(stranger, label="false_positive"),
        ]
    )


def test_malformed_reports_never_reach_the_database(github: GitHub, store: Store) -> None:
    statements: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", note)
    try:
        response = github.report([report(t) for t in malformed_tokens()])
        untouched = list(statements)
        # The listener does see the API's statements: one well-formed token takes some.
        assert github.report([report(generate(TokenKind.PERSONAL))]).status_code == 200
    finally:
        event.remove(Engine, "before_cursor_execute", note)
    assert response.status_code == 200
    assert {item["label"] for item in response.json()} == {"false_positive"}
    assert untouched == []
    assert statements
    assert len(stored(store)) == 1


def test_a_resent_report_is_stored_once_under_the_same_ids(github: GitHub, store: Store) -> None:
    ours, stranger = add_token(store), generate(TokenKind.APPLICATION)
    batch = [report(ours), report(stranger), report(ours, url=REPO_URL + "#L2")]
    first = github.report(batch)
    ids = set(stored(store))
    second = github.report(batch)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert set(stored(store)) == ids
    assert len(ids) == 3  # the same token found at two places is two reports
    # The same match from another part of GitHub is another report, never a clash.
    third = github.report([report(ours, source="commit")])
    assert third.status_code == 200
    assert len(stored(store)) == 4


def test_a_bad_signature_is_refused_and_nothing_is_stored(github: GitHub, store: Store) -> None:
    body = json.dumps([report(add_token(store))]).encode()
    signed = github.signer.headers(body)
    impostor = Signer(key_id=github.signer.key_id)
    attempts: dict[str, dict[str, Any]] = {
        "other key": impostor.headers(body),
        "tampered body": signed,
        "not base64": signed | {"Github-Public-Key-Signature": "not*base64"},
        "not a signature": signed | {"Github-Public-Key-Signature": "AAAA"},
        "not ascii": signed | {"Github-Public-Key-Signature": "é".encode("latin-1")},
    }
    for name, headers in attempts.items():
        sent = body.replace(b"content", b"commit") if name == "tampered body" else body
        response = github.api.post(PATH, content=sent, headers=headers)
        assert response.status_code == 401, name
        assert "signature" in response.json()["detail"]
    assert stored(store) == {}
    assert queue_files(github.home) == []


@pytest.mark.parametrize("missing", ["Github-Public-Key-Identifier", "Github-Public-Key-Signature"])
def test_a_missing_signature_header_is_refused(github: GitHub, store: Store, missing: str) -> None:
    body = json.dumps([report(generate(TokenKind.PERSONAL))]).encode()
    headers = github.signer.headers(body)
    del headers[missing]
    response = github.api.post(PATH, content=body, headers=headers)
    assert response.status_code == 400
    assert missing in response.json()["detail"]
    assert github.keys.fetches == 0
    assert stored(store) == {}


def test_keys_are_fetched_once_and_cached(github: GitHub) -> None:
    for _ in range(3):
        assert github.report([report(generate(TokenKind.PERSONAL))]).status_code == 200
        github.ticks.now += 3600
    assert github.keys.fetches == 1


def test_an_unknown_key_is_fetched_again_once_after_a_rotation(github: GitHub) -> None:
    old, new = github.signer, Signer()
    token = generate(TokenKind.PERSONAL)
    assert github.report([report(token)], signer=old).status_code == 200
    github.ticks.now += 3600
    github.keys.publish(old.entry(current=False), new.entry())
    assert github.report([report(token)], signer=new).status_code == 200
    assert github.keys.fetches == 2
    # Both keys are known now: neither needs another fetch.
    assert github.report([report(token)], signer=old).status_code == 200
    assert github.report([report(token)], signer=new).status_code == 200
    assert github.keys.fetches == 2
    # A key GitHub withdrew is forgotten at the next fetch.
    github.ticks.now += 3600
    github.keys.publish(new.entry())
    assert github.report([report(token)], signer=Signer()).status_code == 401
    assert github.keys.fetches == 3
    assert github.report([report(token)], signer=old).status_code == 401
    assert github.keys.fetches == 3


def test_made_up_key_ids_cannot_make_us_hammer_github(github: GitHub, store: Store) -> None:
    assert github.report([report(generate(TokenKind.PERSONAL))]).status_code == 200
    for _ in range(20):
        github.ticks.now += 2
        response = github.report([report(generate(TokenKind.PERSONAL))], signer=Signer())
        assert response.status_code == 401
        assert "unknown Github-Public-Key-Identifier" in response.json()["detail"]
    # 40 seconds of probing: no fetch beyond the first one.
    assert github.keys.fetches == 1
    github.ticks.now += 30
    assert github.report([report("x")], signer=Signer()).status_code == 401
    assert github.keys.fetches == 2
    assert len(stored(store)) == 1


def test_an_unknown_key_on_a_cold_cache_is_refused_after_one_fetch(github: GitHub) -> None:
    assert github.report([report("x")], signer=Signer()).status_code == 401
    assert github.keys.fetches == 1


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"<html>rate limited</html>", 403),
        (b"<html>down</html>", 500),
        (b"not json", 200),
        (b'{"public_keys": "none"}', 200),
        (b'{"public_keys": []}', 200),
        (b'{"public_keys": [{"key_identifier": "k", "key": "not a pem"}]}', 200),
    ],
    ids=["forbidden", "server-error", "not-json", "wrong-shape", "no-keys", "bad-pem"],
)
def test_keys_that_cannot_be_had_answer_503_until_they_can(
    github: GitHub, store: Store, body: bytes, status: int
) -> None:
    github.keys.serve(body, status)
    sent = [report(add_token(store))]
    first = github.report(sent)
    assert first.status_code == 503
    assert first.headers["Retry-After"] == "60"
    assert "GitHub's public keys" in first.json()["detail"]
    # Moments later, and for the rest of the minute: told to wait, without another fetch.
    github.keys.publish(github.signer.entry())
    for elapsed, retry_after in [(2, "58"), (59, "1")]:
        github.ticks.now = 1000.0 + elapsed
        later = github.report(sent)
        assert (later.status_code, later.headers["Retry-After"]) == (503, retry_after)
    assert github.keys.fetches == 1
    assert stored(store) == {}
    github.ticks.now = 1060.0
    recovered = github.report(sent)
    assert recovered.status_code == 200
    assert recovered.json()[0]["label"] == "true_positive"
    assert github.keys.fetches == 2


def test_a_keys_server_that_is_down_answers_503(start: Start, store: Store) -> None:
    with socket.socket() as closed:
        # Bound but never listening: a connection is refused at once.
        closed.bind(("127.0.0.1", 0))
        github = start(github_keys_url=f"http://127.0.0.1:{closed.getsockname()[1]}/keys")
        response = github.report([report(add_token(store))])
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "60"
    assert stored(store) == {}


def test_a_keys_server_dripping_its_answer_is_given_up_at_the_deadline(
    start: Start, store: Store
) -> None:
    github = start(deadline_s=1.0)
    # A byte every 50 ms passes any per-read timeout; only a deadline on the whole stops it.
    github.keys.drip(0.05, for_s=8)
    sent = [report(add_token(store))]
    began = time.monotonic()
    response = github.report(sent)
    took = time.monotonic() - began
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "60"
    # Given up at the 1 s deadline rather than after the 8 s drip.
    assert took < 5.0, f"the fetch held the request {took:.1f} s"
    # Whatever became of it, the next fetch is a minute after this one began.
    github.keys.drip(0.0, for_s=0)
    github.ticks.now += 59
    assert github.report(sent).status_code == 503
    assert github.keys.fetches == 1
    github.ticks.now += 1
    assert github.report(sent).status_code == 200
    assert github.keys.fetches == 2


@pytest.mark.parametrize("declare_length", [True, False], ids=["declared", "until-close"])
def test_an_oversized_keys_document_is_refused_unread(
    github: GitHub, store: Store, declare_length: bool
) -> None:
    # A valid document, padded to 64 MiB: read whole, it would have been accepted.
    github.keys.pad(64 * 1024 * 1024, declare_length=declare_length)
    sent = [report(add_token(store))]
    response = github.report(sent)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "60"
    # What the server got out before the client hung up: the 1 MiB cap and socket buffers.
    assert github.keys.written < 16 * 1024 * 1024
    github.keys.pad(0)
    github.ticks.now += 30
    assert github.report(sent).status_code == 503
    github.ticks.now += 30
    assert github.report(sent).status_code == 200
    assert github.keys.fetches == 2


def _timed(call: Callable[[], httpx.Response]) -> tuple[int, float]:
    began = time.monotonic()
    status = call().status_code
    return status, time.monotonic() - began


def test_unknown_key_ids_are_refused_at_once_while_a_fetch_hangs(start: Start) -> None:
    github = start(deadline_s=HANGING_FETCH_S)
    token = generate(TokenKind.PERSONAL)
    assert github.report([report(token)]).status_code == 200
    github.ticks.now += 3600  # long enough that an unknown identifier may fetch again
    github.keys.drip(0.05, for_s=3 * HANGING_FETCH_S)
    fetching: list[tuple[int, float]] = []
    thread = threading.Thread(
        target=lambda: fetching.append(
            _timed(lambda: github.report([report(token)], signer=Signer()))
        )
    )
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while github.keys.fetches < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert github.keys.fetches == 2
        # The fetch hangs: others are answered from the cache at once, never queued behind it.
        unknown = [
            _timed(lambda: github.report([report(token)], signer=Signer())) for _ in range(20)
        ]
        known = _timed(lambda: github.report([report(token)]))
        assert not fetching, "the others were answered after the fetch, behind it"
    finally:
        thread.join(timeout=4 * HANGING_FETCH_S)
    assert {status for status, _ in unknown} == {401}
    # One queued behind the fetch would wait out its deadline.
    assert max(took for _, took in [*unknown, known]) < HANGING_FETCH_S / 2
    assert known[0] == 200
    [(status, took)] = fetching
    assert status == 503
    assert HANGING_FETCH_S - 0.5 < took < 3 * HANGING_FETCH_S  # the deadline, not the drip
    assert github.keys.fetches == 2


def test_requests_are_told_to_retry_at_once_while_the_first_fetch_hangs(start: Start) -> None:
    github = start(deadline_s=HANGING_FETCH_S)
    github.keys.drip(0.05, for_s=3 * HANGING_FETCH_S)
    token = generate(TokenKind.PERSONAL)
    first: list[tuple[int, float]] = []
    thread = threading.Thread(
        target=lambda: first.append(_timed(lambda: github.report([report(token)])))
    )
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while github.keys.fetches < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        began = time.monotonic()
        waiting = [
            github.report([report(token)], signer=signer) for signer in (github.signer, Signer())
        ]
        took = time.monotonic() - began
        assert not first, "the others were answered after the fetch, behind it"
    finally:
        thread.join(timeout=4 * HANGING_FETCH_S)
    retry_after = str(int(HANGING_FETCH_S))
    assert [(r.status_code, r.headers["Retry-After"]) for r in waiting] == [(503, retry_after)] * 2
    assert took < HANGING_FETCH_S / 2  # one queued behind the fetch would wait out its deadline
    assert first[0][0] == 503
    assert github.keys.fetches == 1


def test_a_key_that_is_not_p256_is_skipped(github: GitHub) -> None:
    other = Signer(private=ec.generate_private_key(ec.SECP384R1()))
    github.keys.publish(other.entry(), github.signer.entry())
    assert github.report([report("x")]).status_code == 200
    assert github.report([report("x")], signer=other).status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"token": "x", "type": "t", "url": "u"}',
        b"[1]",
        b'[{"token": "x", "type": "t"}]',
        b'[{"token": 1, "type": "t", "url": "u"}]',
        b'[{"token": "x", "type": "t", "url": "u", "source": 5}]',
        b"[NaN]",
        b"[" * 100_000 + b"]" * 100_000,
        b"\xff\xfe",
    ],
)
def test_a_signed_body_that_is_not_an_array_of_reports_is_422(
    github: GitHub, store: Store, body: bytes
) -> None:
    response = github.report(body)
    assert response.status_code == 422
    assert response.json()["detail"]
    assert stored(store) == {}


def test_an_empty_batch_is_answered_with_no_labels(github: GitHub) -> None:
    response = github.report([])
    assert (response.status_code, response.json()) == (200, [])


def test_a_broker_that_is_down_still_answers(start: Start, store: Store) -> None:
    github = start(broker_url=UNREACHABLE_BROKER, broker_retries=0)
    ours = add_token(store)
    with structlog.testing.capture_logs() as logs:
        response = github.report([report(ours)])
    assert response.status_code == 200
    assert response.json()[0]["label"] == "true_positive"
    [row] = stored(store).values()
    assert row.status == "pending"  # the re-drive publishes it
    [line] = [line for line in logs if line["event"] == "events.accepted"]
    assert (line["log_level"], line["published"]) == ("warning", 0)
    assert "Connection refused" in line["publish_error"]


def test_a_store_that_is_down_answers_503(start: Start) -> None:
    github = start(database_url=UNREACHABLE_POSTGRES)
    response = github.report([report(generate(TokenKind.PERSONAL))])
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert "token store is unavailable" in response.json()["detail"]


def test_odd_text_is_stored_safely(github: GitHub, store: Store) -> None:
    token = generate(TokenKind.PERSONAL)
    other = generate(TokenKind.APPLICATION)
    odd = [
        report(token, url=f"https://gist.example/{other}\x00\ud800" + "x" * 3000),
        report(token, source="\ud800" + "s" * 500) | {"type": "t\x00\udfff"},
    ]
    response = github.report(json.dumps(odd).encode())
    assert response.status_code == 200
    assert [item["token_type"] for item in response.json()] == [
        "tokenwarden_personal_access_token",
        "t\ufffd?",
    ]
    rows = sorted(stored(store).values(), key=lambda row: len(row.data["source_url"]))
    assert rows[0].data["reporter"].startswith("github:?sss")
    assert len(rows[0].data["reporter"]) == 200
    url = rows[1].data["source_url"]
    assert url.startswith("https://gist.example/sm_aat_***\ufffd?xxx")
    assert len(url) == 2000
    assert other not in all_rows(store)


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """The JSON log lines, as an operator sees them; logging is put back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = structlog.get_config()
    stream = io.StringIO()
    configure_logging(json=True, stream=stream, level="DEBUG")
    yield stream
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    structlog.configure(**config)


def test_no_token_text_is_stored_logged_queued_or_echoed(
    github: GitHub, store: Store, json_logs: io.StringIO
) -> None:
    ours, stranger = add_token(store), generate(TokenKind.PERSONAL)
    typo = ours[:-1] + ("A" if ours[-1] != "A" else "B")
    sent = [report(t, url=f"{REPO_URL}?leak={t}") for t in (ours, stranger, typo)]
    responses = [github.report(sent), github.report(sent, signer=Signer())]
    assert [r.status_code for r in responses] == [200, 401]
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    [reported] = [line for line in lines if line["event"] == "leaks.reported"]
    assert (reported["reports"], reported["malformed"], reported["true_positives"]) == (3, 1, 1)
    places = {
        "rows": all_rows(store),
        "logs": json_logs.getvalue(),
        "queue": "\n".join(queue_files(github.home)),
        "answers": "\n".join(r.text for r in responses),
    }
    for where, text in places.items():
        for token in (ours, stranger, typo):
            assert token not in text, where
            assert token[7:39] not in text, where


def test_openapi_describes_the_github_endpoint(github: GitHub) -> None:
    schema = github.api.get("/openapi.json").json()
    post = schema["paths"][PATH]["post"]
    assert set(post["responses"]) == {"200", "400", "401", "413", "422", "429", "503"}
    assert "Retry-After" in post["responses"]["503"]["headers"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert body["type"] == "array"
    assert set(body["items"]["required"]) == {"token", "type", "url"}
    headers = {p["name"] for p in post["parameters"] if p["in"] == "header"}
    assert headers == {"Github-Public-Key-Identifier", "Github-Public-Key-Signature"}
    answer = post["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer["type"] == "array"
    feedback = schema["components"]["schemas"]["GitHubFeedback"]
    assert feedback["properties"]["label"]["enum"] == ["true_positive", "false_positive"]


def test_callers_failing_the_signature_checks_are_rate_limited_and_github_is_not(
    start: Start, store: Store
) -> None:
    github = start(leak_rate_per_minute=1, leak_rate_burst=4)
    body = json.dumps([report(generate(TokenKind.PERSONAL))]).encode()
    forged = Signer(key_id=github.signer.key_id)  # GitHub's key id, another private key
    missing = {"Content-Type": "application/json"}
    attempts = [
        github.api.post(PATH, content=body, headers=forged.headers(body)) for _ in range(3)
    ] + [github.api.post(PATH, content=body, headers=missing) for _ in range(20)]
    assert [r.status_code for r in attempts[:4]] == [401, 401, 401, 400]
    assert {r.status_code for r in attempts[4:]} == {429}
    assert 1 <= int(attempts[-1].headers["Retry-After"]) <= 60
    assert stored(store) == {}


def test_many_signed_reports_are_never_rate_limited(start: Start, store: Store) -> None:
    github = start(leak_rate_per_minute=1, leak_rate_burst=1)
    tokens = [add_token(store) for _ in range(10)]
    answers = [github.report([report(token)]) for token in tokens]
    assert [r.status_code for r in answers] == [200] * 10
    assert len(stored(store)) == 10
