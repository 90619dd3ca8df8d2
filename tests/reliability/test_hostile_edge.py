"""Hostile clients and a hostile key server against a real API, while a producer keeps sending.

Each test starts ``tokenwarden api`` on the embedded default, attacks it on loopback with a
bounded load for a few seconds (tests/hostile.py), and meanwhile a producer posts one event
every 20 ms and times each answer. Printed and asserted: the API's peak resident memory,
the error lines it wrote, the producer's p99 under attack, and for slow clients how many
connections were still open after the documented deadline.

- Strangers sending GitHub's headers and a megabyte each, 300 connections a second.
- Slow clients: silent connections, headers a line at a time, bodies a byte at a time.
- Clients hanging up half way through a body.
- GitHub's key server dripping its answer a byte a second, or serving 300 MB.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from tests.hostile import (
    MIB,
    Producer,
    abort,
    answered,
    error_lines,
    events_head,
    github_head,
    restart_peak_rss,
    rss_kib,
    send_report,
    slow_client,
)
from tests.reliability.apikeys import GITHUB_PATH, GitHubSigner
from tests.reliability.evidence import Evidence
from tests.reliability.figures import Figures
from tests.reliability.harness import ChaosStack, chaos_stack
from tokenwarden.producer.key_cache import FETCH_DEADLINE_S
from tokenwarden.producer.serving import BODY_TIMEOUT_S, HEADER_TIMEOUT_S

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

RSS_BOUND_MB = 150  # README, Limits
PRODUCER_P99_BOUND_MS = 1000.0
# Well short of the fetch deadline: an answer this quick did not wait for the fetch.
ANSWER_AT_ONCE_S = 3.0
WAVE = 300  # connections at once, each sending GitHub's headers and a megabyte


@contextmanager
def producing(stack: ChaosStack, label: str) -> Iterator[Producer]:
    producer = Producer(stack.api_url, label)
    producer.start()
    try:
        yield producer
    finally:
        producer.stop()


@contextmanager
def api_stack(
    tmp_path: Path, evidence: Evidence, label: str, keys_url: str
) -> Iterator[ChaosStack]:
    with chaos_stack(
        tmp_path / "home",
        evidence=evidence,
        label=label,
        roles=("api",),
        env={"TOKENWARDEN_GITHUB_KEYS_URL": keys_url},
    ) as stack:
        yield stack


def api_pid(stack: ChaosStack) -> int:
    return stack.processes["api"].pid


def warm_up(stack: ChaosStack, signer: GitHubSigner) -> None:
    body = b"[]"
    headers = {**signer.headers(body), "Content-Type": "application/json"}
    response = httpx.post(f"{stack.api_url}{GITHUB_PATH}", content=body, headers=headers)
    assert response.status_code == 200, response.text


def finish(
    figures: Figures, stack: ChaosStack, producer: Producer, log_before: int, peak_kib: int
) -> list[str]:
    """Record the figures every test prints; the error lines written during the attack."""
    errors = error_lines(stack.log("api")[log_before:])
    figures.set(
        api_peak_rss_mb=round(peak_kib / 1024),
        error_lines=len(errors),
        producer_sent=len(producer.answers),
        producer_answers=producer.statuses(),
        producer_p99_ms=round(producer.p99_ms(), 1),
    )
    return errors


@pytest.mark.timeout(120)
def test_strangers_sending_github_bodies_leave_memory_bounded(
    tmp_path: Path, evidence: Evidence
) -> None:
    figures = Figures("hostile-edge[github-bodies]")
    with (
        GitHubSigner() as signer,
        api_stack(tmp_path, evidence, "github-bodies", signer.keys_url) as stack,
    ):
        warm_up(stack, signer)
        pid = api_pid(stack)
        before = rss_kib(pid)
        log_before = len(stack.log("api"))
        unknown: Counter[str] = Counter()
        forged: Counter[str] = Counter()

        async def wave(first: int) -> None:
            await asyncio.gather(
                *(
                    send_report(stack.port, signer.identifier, forged)
                    if n % 2
                    else send_report(stack.port, f"made-up-{first + n}", unknown)
                    for n in range(WAVE)
                )
            )

        restart_peak_rss(pid)
        with producing(stack, "github-bodies") as producer:
            # A wave of connections a second, each sending a megabyte, for 8 s.
            began = time.monotonic()
            for waves in range(1, 9):
                asyncio.run(wave(waves * WAVE))
                time.sleep(max(0.0, began + waves - time.monotonic()))
        peak = rss_kib(pid, "VmHWM")
        errors = finish(figures, stack, producer, log_before, peak)
        figures.set(
            connections=waves * WAVE,
            megabytes_offered=waves * WAVE,
            unknown_key=dict(unknown),
            forged_signature=dict(forged),
            api_rss_before_mb=round(before / 1024),
            api_rss_growth_mb=round((peak - before) / 1024),
        )
        figures.publish(evidence.root / "figures")
    assert (peak - before) / 1024 < RSS_BOUND_MB
    # 429: past the rate limit for callers that fail the signature checks (Retry-After).
    assert set(unknown) | set(forged) <= {"401", "429", "503", "reset"}
    assert forged["401"] > 0
    assert errors == []
    assert set(producer.statuses()) == {202}
    assert producer.p99_ms() < PRODUCER_P99_BOUND_MS


@pytest.mark.timeout(120)
def test_slow_clients_are_cut_off_at_the_deadlines(tmp_path: Path, evidence: Evidence) -> None:
    figures = Figures("hostile-edge[slow-clients]")
    partial = b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    with (
        GitHubSigner() as signer,
        api_stack(tmp_path, evidence, "slow-clients", signer.keys_url) as stack,
    ):
        warm_up(stack, signer)
        pid = api_pid(stack)
        log_before = len(stack.log("api"))
        restart_peak_rss(pid)
        give_up = BODY_TIMEOUT_S + 5

        async def clients() -> tuple[list[float], list[float]]:
            header_kinds = [(b"", b"")] * 100 + [(partial, b"X-Slow: 1\r\n")] * 100
            body_kinds = [(events_head(1000), b"[")] * 100
            body_kinds += [(github_head(signer.identifier, 1000), b"[")] * 50
            ended = await asyncio.gather(
                *(
                    slow_client(stack.port, first, drip, give_up=give_up)
                    for first, drip in header_kinds + body_kinds
                )
            )
            times = [took for took, _ in ended]
            return times[: len(header_kinds)], times[len(header_kinds) :]

        with producing(stack, "slow-clients") as producer:
            headers, bodies = asyncio.run(clients())
        peak = rss_kib(pid, "VmHWM")
        errors = finish(figures, stack, producer, log_before, peak)
        open_after_header_deadline = sum(took > HEADER_TIMEOUT_S + 1 for took in headers)
        open_after_body_deadline = sum(took > BODY_TIMEOUT_S + 1 for took in bodies)
        figures.set(
            slow_connections=len(headers) + len(bodies),
            header_deadline_s=HEADER_TIMEOUT_S,
            body_deadline_s=BODY_TIMEOUT_S,
            still_open_after_header_deadline=open_after_header_deadline,
            still_open_after_body_deadline=open_after_body_deadline,
            latest_header_cut_s=round(max(headers), 1),
            latest_body_cut_s=round(max(bodies), 1),
        )
        figures.publish(evidence.root / "figures")
    assert open_after_header_deadline == open_after_body_deadline == 0
    assert min(headers) > HEADER_TIMEOUT_S - 0.5
    assert min(bodies) > BODY_TIMEOUT_S - 0.5
    assert errors == []
    assert set(producer.statuses()) == {202}
    assert producer.p99_ms() < PRODUCER_P99_BOUND_MS


@pytest.mark.timeout(120)
def test_clients_hanging_up_mid_body_write_no_error(tmp_path: Path, evidence: Evidence) -> None:
    figures = Figures("hostile-edge[hang-ups]")
    with (
        GitHubSigner() as signer,
        api_stack(tmp_path, evidence, "hang-ups", signer.keys_url) as stack,
    ):
        warm_up(stack, signer)
        pid = api_pid(stack)
        log_before = len(stack.log("api"))
        restart_peak_rss(pid)
        with producing(stack, "hang-ups") as producer:
            for _ in range(5):
                sockets = []
                for n in range(100):
                    sock = socket.create_connection(("127.0.0.1", stack.port))
                    request = github_head(signer.identifier, 5000) if n % 2 else events_head(5000)
                    sock.sendall(request + b'[{"specversion": "1.0", ')
                    sockets.append(sock)
                time.sleep(0.3)
                for sock in sockets:
                    abort(sock)
            time.sleep(0.5)
        metrics = httpx.get(f"{stack.api_url}/metrics").text
        written = stack.log("api")[log_before:]
        # The producer's own lines aside, nothing: a hang-up is not worth a line at info.
        about_hang_ups = [line for line in written.splitlines() if "events.accepted" not in line]
        errors = finish(figures, stack, producer, log_before, rss_kib(pid, "VmHWM"))
        closed = sum(answered(metrics, path, "499") for path in (GITHUB_PATH, "/v1/events"))
        figures.set(
            hang_ups=500,
            counted_499=int(closed),
            counted_500=metrics.count('status="500"'),
            log_bytes_written=len(written),
            log_lines_about_hang_ups=len(about_hang_ups),
        )
        figures.publish(evidence.root / "figures")
    assert 'status="500"' not in metrics
    assert closed == 500
    assert errors == []
    assert about_hang_ups == []
    assert set(producer.statuses()) == {202}
    assert producer.p99_ms() < PRODUCER_P99_BOUND_MS


class HostileKeys:
    """GitHub's key endpoint gone wrong: a byte a second, or 300 MB of (valid) document.

    ``hung_up_after`` is how many seconds into the last fetch the API hung up on it.
    """

    def __init__(self, mode: str, signer: GitHubSigner) -> None:
        self.mode = mode
        self.fetches = 0
        self.written = 0
        self.hung_up_after: float | None = None  # seconds into the fetch the API gave up
        self.closing = threading.Event()
        pem = signer.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        entry = {"key_identifier": signer.identifier, "key": pem.decode(), "is_current": True}
        document = json.dumps({"public_keys": [entry]}).encode()
        keys = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                keys.fetches += 1
                began = time.monotonic()
                padding = 300 * MIB if keys.mode == "huge" else 0
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if keys.mode == "drip":
                    self.send_header("Content-Length", str(len(document)))
                # 300 MB comes undeclared, ending when the connection does: only a count of
                # what arrives can stop it.
                self.end_headers()
                try:
                    if keys.mode == "drip":
                        for index in range(len(document)):
                            if keys.closing.wait(1.0):
                                return
                            self._write(document[index : index + 1])
                    else:
                        piece = b" " * (1 << 20)
                        self._write(document[:-1])
                        for _ in range(padding // len(piece)):
                            self._write(piece)
                        self._write(document[-1:])
                except OSError:
                    keys.hung_up_after = time.monotonic() - began

            def _write(self, data: bytes) -> None:
                self.wfile.write(data)
                self.wfile.flush()
                keys.written += len(data)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/meta/public_keys"

    def __enter__(self) -> HostileKeys:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


def _timed_post(
    client: httpx.Client, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, float]:
    began = time.monotonic()
    try:
        status = client.post(url, content=body, headers=headers).status_code
    except httpx.HTTPError:
        status = 0
    return status, time.monotonic() - began


def _client() -> httpx.Client:
    return httpx.Client(timeout=30, limits=httpx.Limits(max_connections=200))


@pytest.mark.timeout(120)
def test_a_key_server_dripping_its_answer_holds_nothing_up(
    tmp_path: Path, evidence: Evidence
) -> None:
    figures = Figures("hostile-edge[keys-drip]")
    with (
        GitHubSigner() as signer,
        HostileKeys("drip", signer) as keys,
        api_stack(tmp_path, evidence, "keys-drip", keys.url) as stack,
    ):
        pid = api_pid(stack)
        log_before = len(stack.log("api"))
        restart_peak_rss(pid)
        url = f"{stack.api_url}{GITHUB_PATH}"
        body = b"[]"
        answers: list[tuple[int, float]] = []
        ready: list[int] = []
        with producing(stack, "keys-drip") as producer, _client() as client:
            # Requests naming keys we do not hold, GitHub's own among them (the cache is
            # empty): 100 at once while the fetch hangs, then 5 a second past its deadline.
            threads = []
            for n in range(100 + 5 * int(FETCH_DEADLINE_S + 3)):
                signed = {**signer.headers(body), "Content-Type": "application/json"}
                if n % 2:
                    signed["Github-Public-Key-Identifier"] = f"made-up-{n}"
                thread = threading.Thread(
                    target=lambda h=signed: answers.append(_timed_post(client, url, body, h))
                )
                thread.start()
                threads.append(thread)
                if n >= 100:
                    time.sleep(0.2)
                    if n % 5 == 0:
                        ready.append(client.get(f"{stack.api_url}/readyz").status_code)
            for thread in threads:
                thread.join(timeout=30)
        errors = finish(figures, stack, producer, log_before, rss_kib(pid, "VmHWM"))
        figures.set(
            github_requests=len(answers),
            github_answers=dict(Counter(status for status, _ in answers)),
            fetching_request_s=round(max(took for _, took in answers), 2),
            slowest_other_answer_s=round(sorted(took for _, took in answers)[-2], 2),
            readyz=dict(Counter(ready)),
            key_fetches=keys.fetches,
            fetch_given_up_after_s=round(keys.hung_up_after or -1, 1),
        )
        figures.publish(evidence.root / "figures")
    # The request that started the fetch waits for its deadline; every other one is answered
    # at once, and none of them takes a thread from the pool the readiness check needs.
    waits = sorted(took for _, took in answers)
    assert waits[-2] < ANSWER_AT_ONCE_S
    assert waits[-1] < FETCH_DEADLINE_S + 2
    assert {status for status, _ in answers} == {503}
    assert set(ready) == {200}
    assert keys.fetches == 1
    assert keys.hung_up_after is not None
    assert FETCH_DEADLINE_S - 1 < keys.hung_up_after < FETCH_DEADLINE_S + 2
    assert errors == []
    assert set(producer.statuses()) == {202}
    assert producer.p99_ms() < PRODUCER_P99_BOUND_MS


@pytest.mark.timeout(120)
def test_a_key_server_serving_300_mb_is_cut_off_at_the_cap(
    tmp_path: Path, evidence: Evidence
) -> None:
    figures = Figures("hostile-edge[keys-300mb]")
    with (
        GitHubSigner() as signer,
        HostileKeys("huge", signer) as keys,
        api_stack(tmp_path, evidence, "keys-300mb", keys.url) as stack,
    ):
        pid = api_pid(stack)
        before = rss_kib(pid)
        log_before = len(stack.log("api"))
        restart_peak_rss(pid)
        url = f"{stack.api_url}{GITHUB_PATH}"
        body = b"[]"
        signed = {**signer.headers(body), "Content-Type": "application/json"}
        with producing(stack, "keys-300mb") as producer, _client() as client:
            answers = [_timed_post(client, url, body, signed) for _ in range(20)]
            time.sleep(1)
        peak = rss_kib(pid, "VmHWM")
        errors = finish(figures, stack, producer, log_before, peak)
        figures.set(
            github_answers=dict(Counter(status for status, _ in answers)),
            key_fetches=keys.fetches,
            document_bytes_sent=keys.written,
            api_rss_growth_mb=round((peak - before) / 1024),
        )
        figures.publish(evidence.root / "figures")
    assert {status for status, _ in answers} == {503}
    assert max(took for _, took in answers) < ANSWER_AT_ONCE_S
    assert keys.fetches == 1
    assert keys.written < 16 * MIB
    assert (peak - before) / 1024 < 50
    assert errors == []
    assert set(producer.statuses()) == {202}
