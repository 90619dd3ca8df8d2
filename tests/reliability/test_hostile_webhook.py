"""A webhook URL that carries its own secret: it must never reach a log line.

Many receivers (chat incoming webhooks, serverless functions) authenticate by a secret in the
URL itself, as a query parameter or as user information. The stack runs as deployed, API,
worker and scheduler on the embedded default at their default log level, with such a URL;
leaks are reported through the API, each becomes a signed notice delivered over HTTP, and
afterwards every line the three processes wrote is searched for the secret and the password.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.figures import Figures
from tests.stack import LiveStack, event, stack_env
from tests.test_delivery import SECRET, Receiver
from tokenwarden.config.settings import Settings
from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.models import TokenKind
from tokenwarden.worker.ops.supervisor import free_port

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

LEAKS = 20
QUERY_SECRET = "qu3ry-s3cret-" + uuid.uuid4().hex
PASSWORD = "pa55-" + uuid.uuid4().hex


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[LiveStack, Receiver]]:
    with Receiver() as receiver:
        port = receiver.server.server_address[1]
        url = f"http://hooks:{PASSWORD}@127.0.0.1:{port}/hooks/notices?secret={QUERY_SECRET}"
        env = stack_env(
            tmp_path,
            {"TOKENWARDEN_NOTICE_WEBHOOK_URL": url, "TOKENWARDEN_NOTICE_SIGNING_SECRET": SECRET},
        )
        live = LiveStack(
            home=tmp_path,
            env=env,
            database_url=Settings(home=tmp_path).resolved_database_url,
            port=free_port(),
        )
        db.upgrade(live.database_url)
        live.start("api", "worker", "beat")
        try:
            yield live, receiver
        finally:
            live.stop()


def test_a_secret_in_the_webhook_url_never_reaches_a_log(
    stack: tuple[LiveStack, Receiver],
) -> None:
    live, receiver = stack
    figures = Figures("hostile-webhook")
    org = f"org-{uuid.uuid4().hex[:8]}"
    live.member(org, "owner")
    leaked = [live.token(TokenKind.PERSONAL, org, "owner") for _ in range(LEAKS)]

    live.send(*(event("token.leak_suspected", {"token": issued.token}) for issued in leaked))
    live.wait_for(
        lambda: len(receiver.received) >= LEAKS, timeout=60, message="every notice delivered"
    )
    live.stop()  # every line written and flushed

    logs = live.logs()
    figures.set(
        notices_delivered=len(receiver.received),
        log_lines=logs.count("\n"),
        log_bytes=len(logs.encode()),
        secret_in_logs=logs.count(QUERY_SECRET),
        password_in_logs=logs.count(PASSWORD),
        delivery_lines=logs.count("notice.attempt"),
    )
    figures.publish()
    assert len(receiver.received) >= LEAKS
    assert QUERY_SECRET not in logs
    assert PASSWORD not in logs
