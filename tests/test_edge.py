"""The producer API's edge against hostile clients, on a real ``tokenwarden api`` process.

Raw sockets on loopback play the clients (tests/hostile.py): many connections sending
GitHub's headers and large bodies, clients sending headers or a body a byte at a time,
clients hanging up half way through a body. GitHub's keys come from a stand-in on loopback.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.hostile import (
    MIB,
    abort,
    answered,
    error_lines,
    events_head,
    github_head,
    head,
    restart_peak_rss,
    rss_kib,
    send_report,
    slow_client,
)
from tests.reliability.apikeys import GITHUB_PATH, GITLAB_SECRET, GitHubSigner
from tests.stack import LiveStack, stack_env
from tokenwarden.producer.serving import BODY_TIMEOUT_S, HEADER_TIMEOUT_S
from tokenwarden.worker.domain import db
from tokenwarden.worker.ops.supervisor import free_port

pytestmark = pytest.mark.slow

# The documented bound (README, Limits): a thousand connections sending 1 MiB bodies to
# GitHub's endpoint at once raise the API's resident memory by less than this.
RSS_BOUND_MB = 150


@dataclass
class Api:
    stack: LiveStack
    signer: GitHubSigner

    @property
    def port(self) -> int:
        return self.stack.port

    @property
    def pid(self) -> int:
        return self.stack.processes["api"].pid

    def log(self) -> str:
        return self.stack.log("api")

    def metrics(self) -> str:
        return httpx.get(f"{self.stack.api_url}/metrics", timeout=10).text

    def warm_up(self) -> None:
        """One properly signed report, so the API holds GitHub's keys."""
        body = b"[]"
        response = httpx.post(
            f"{self.stack.api_url}{GITHUB_PATH}",
            content=body,
            headers={**self.signer.headers(body), "Content-Type": "application/json"},
            timeout=10,
        )
        assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    home = tmp_path_factory.mktemp("edge")
    with GitHubSigner() as signer:
        env = stack_env(
            home,
            {
                "TOKENWARDEN_GITHUB_KEYS_URL": signer.keys_url,
                "TOKENWARDEN_GITLAB_REVOCATION_TOKEN": GITLAB_SECRET,
                # Far more requests than a reporter sends: the rate limit is tried elsewhere.
                "TOKENWARDEN_LEAK_RATE_PER_MINUTE": "1000000",
                "TOKENWARDEN_LEAK_RATE_BURST": "1000000",
            },
        )
        stack = LiveStack(
            home=home,
            env=env,
            database_url=f"sqlite:///{home / 'tokenwarden.db'}",
            port=free_port(),
        )
        db.upgrade(stack.database_url)
        stack.start("api")
        try:
            yield Api(stack, signer)
        finally:
            stack.stop()


def read_answer(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """What the server sent within ``timeout``, and whether it closed the connection."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return received, False
    return received, True


def test_a_request_naming_no_key_of_githubs_is_refused_before_its_body_is_sent(
    api: Api,
) -> None:
    api.warm_up()
    for request in (github_head("made-up-key-id"), head("/v1/events", MIB)):
        with socket.create_connection(("127.0.0.1", api.port)) as sock:
            sock.sendall(request)  # the headers only: the megabyte never leaves
            answer, closed = read_answer(sock, 3)
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        assert b"connection: close" in answer.lower()
        assert closed, "the connection was kept open for a body nobody will read"


def test_memory_stays_bounded_under_a_thousand_connections_sending_github_bodies(
    api: Api,
) -> None:
    api.warm_up()
    before = rss_kib(api.pid)
    restart_peak_rss(api.pid)
    unknown: Counter[str] = Counter()
    forged: Counter[str] = Counter()

    async def attack() -> None:
        # Half name no key of GitHub's; half name its real key (it is public) and sign badly.
        await asyncio.gather(
            *(
                send_report(api.port, api.signer.identifier, forged)
                if n % 2
                else send_report(api.port, f"made-up-{n}", unknown)
                for n in range(1000)
            )
        )

    began = time.monotonic()
    asyncio.run(attack())
    took = time.monotonic() - began
    grown_mb = (rss_kib(api.pid, "VmHWM") - before) / 1024
    print(
        f"1000 connections x 1 MiB in {took:.1f} s: unknown key {dict(unknown)}, "
        f"forged signature {dict(forged)}; peak RSS +{grown_mb:.0f} MB"
    )
    assert unknown.total() == forged.total() == 500
    # 503: past the concurrency limit, or past the bytes read before a signature is checked.
    assert set(unknown) | set(forged) <= {"401", "503", "reset"}
    assert unknown["401"] > 0
    assert forged["401"] > 0  # some bodies were read whole, and their signature checked
    assert grown_mb < RSS_BOUND_MB
    assert httpx.get(f"{api.stack.api_url}/readyz", timeout=10).status_code == 200


def test_slow_clients_are_cut_off_at_the_documented_deadlines(api: Api) -> None:
    api.warm_up()
    partial = b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    give_up = BODY_TIMEOUT_S + 5

    # One request answered, then the next one's request line a byte at a time.
    kept_alive = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    async def clients() -> list[tuple[float, bytes]]:
        cut_off = await asyncio.gather(
            slow_client(api.port, b"", b"", give_up=give_up),  # connects, says nothing
            slow_client(api.port, partial, b"X-Slow: 1\r\n", give_up=give_up),  # header lines
            slow_client(api.port, kept_alive, b"G", give_up=give_up),
            slow_client(api.port, events_head(1000), b"[", give_up=give_up),  # body bytes
            slow_client(api.port, github_head(api.signer.identifier, 1000), b"[", give_up=give_up),
        )
        return list(cut_off)

    (silent, _), (headers, headers_answer), (second, second_answer), *bodies = asyncio.run(
        clients()
    )
    assert HEADER_TIMEOUT_S - 0.5 < silent < HEADER_TIMEOUT_S + 2
    assert HEADER_TIMEOUT_S - 0.5 < headers < HEADER_TIMEOUT_S + 2
    assert headers_answer.startswith(b"HTTP/1.1 408 "), headers_answer
    # Its first byte came half a second after the answer: the deadline counts from there.
    assert HEADER_TIMEOUT_S < second < HEADER_TIMEOUT_S + 2.5
    assert second_answer.startswith(b"HTTP/1.1 200 "), second_answer
    assert b"HTTP/1.1 408 " in second_answer
    for took, answer in bodies:
        assert BODY_TIMEOUT_S - 0.5 < took < BODY_TIMEOUT_S + 2
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"connection: close" in answer.lower()
        assert b"the body took over 20 s" in answer
    time.sleep(0.2)
    metrics = api.metrics()
    assert answered(metrics, "/v1/events", "408") == answered(metrics, GITHUB_PATH, "408") == 1
    assert 'status="500"' not in metrics


def test_clients_hanging_up_mid_body_are_not_errors(api: Api) -> None:
    api.warm_up()
    log_before = len(api.log())
    metrics_before = api.metrics()
    gitlab = head(
        "/v1/revoke_tokens",
        5000,
        **{"Content-Type": "application/json", "Authorization": GITLAB_SECRET},
    )
    heads = {
        "/v1/events": events_head(5000),
        GITHUB_PATH: github_head(api.signer.identifier, 5000),
        "/v1/revoke_tokens": gitlab,
    }
    sockets = []
    for request in heads.values():
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", api.port))
            sock.sendall(request + b'[{"specversion": "1.0", ')
            sockets.append(sock)
    time.sleep(0.5)  # every request is being read
    for sock in sockets:
        abort(sock)
    time.sleep(0.5)
    metrics = api.metrics()
    written = api.log()[log_before:]
    assert 'status="500"' not in metrics
    for path in heads:
        assert answered(metrics, path, "499") - answered(metrics_before, path, "499") == 100
    assert error_lines(written) == []
    assert len(written) < 2000, written[:2000]
