"""The producer API's edge against hostile clients, on a real ``tokenwarden api`` process.

Raw sockets on loopback play the clients (tests/hostile.py): clients hanging up half way
through a body. GitHub's keys come from a stand-in on loopback.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.hostile import (
    abort,
    answered,
    error_lines,
    events_head,
    github_head,
    head,
)
from tests.reliability.apikeys import GITHUB_PATH, GITLAB_SECRET, GitHubSigner
from tests.stack import LiveStack, stack_env
from worker import db
from worker.supervise import free_port

pytestmark = pytest.mark.slow


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
