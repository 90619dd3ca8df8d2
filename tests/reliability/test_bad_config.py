"""Bad configuration: a one-line error naming the setting, or a retry that says what it awaits.

Never a silent drop: a wrong database URL stops every role at once with one line; a broker
that cannot be reached is retried, and the log names it (without its password); an event
accepted meanwhile stays in the inbox; a webhook that cannot be reached keeps its notice
pending, retried and logged; a malformed value names its variable.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from tests.conftest import TOKENWARDEN, clean_env, fresh_postgres_database, service_url
from tests.reliability.evidence import Evidence
from tests.reliability.figures import Figures
from tests.reliability.harness import chaos_stack, kill_group
from tests.reliability.workload import cloud_event, notices_wired
from tokenwarden.config.settings import SIGNING_SECRET_FILE
from tokenwarden.worker.domain.models import EventStatus, InboxEvent, Notice, TokenKind

pytestmark = [pytest.mark.chaos]

PASSWORD = "s3cretpw"
DEAD_PORT = 1  # nothing listens on port 1 here
RETRY_WAIT_S = 10.0


def _run(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [str(TOKENWARDEN), *args],
        env=clean_env(TOKENWARDEN_HOME=str(home), **env),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("role", ["worker", "beat", "api"])
def test_an_unreachable_database_stops_each_role_with_one_line(
    role: str, tmp_path: Path, evidence: Evidence
) -> None:
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{DEAD_PORT}/tokenwarden"
    figures = Figures(f"bad_database_url[{role}]")
    started = time.monotonic()
    done = _run(tmp_path / "home", role, TOKENWARDEN_DATABASE_URL=url)
    seconds = time.monotonic() - started
    lines = done.stderr.strip().splitlines()
    figures.set(
        exit=done.returncode,
        stderr_lines=len(lines),
        seconds=round(seconds, 1),
        names_variable="TOKENWARDEN_DATABASE_URL" in done.stderr,
        names_host=f"127.0.0.1:{DEAD_PORT}" in done.stderr,
    )
    figures.publish(evidence.root)
    evidence.keep_text("logs", f"bad-database-{role}", done.stdout + done.stderr)
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error:"), done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    assert lines[0].startswith("error: TOKENWARDEN_DATABASE_URL:"), lines[0]
    assert f"127.0.0.1:{DEAD_PORT}" in lines[0], lines[0]
    assert seconds < 30


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TOKENWARDEN_DATABASE_URL", "mysql://root@127.0.0.1/tokens"),
        ("TOKENWARDEN_BROKER_URL", "127.0.0.1:5672"),
        ("TOKENWARDEN_NOTICE_WEBHOOK_URL", "ftp://hooks.example/notices"),
        ("TOKENWARDEN_NOTICE_SIGNING_SECRET", "not-a-webhook-secret"),
        ("TOKENWARDEN_REDRIVE_AFTER_S", "-5"),
        ("TOKENWARDEN_QUEUE", "no spaces allowed"),
    ],
)
def test_a_malformed_setting_is_named_in_one_line(
    variable: str, value: str, tmp_path: Path
) -> None:
    done = _run(tmp_path / "home", "worker", **{variable: value})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: {variable}:"), lines[0]
    if "SECRET" in variable:
        assert value not in done.stderr


def test_an_unknown_broker_scheme_is_named_in_one_line(tmp_path: Path) -> None:
    done = _run(tmp_path / "home", "worker", TOKENWARDEN_BROKER_URL="amqps2://broker.example//")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1, done.stderr[-2000:]
    assert "TOKENWARDEN_BROKER_URL" in lines[0], done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_an_unreachable_broker_is_retried_and_named_and_nothing_is_dropped(
    tmp_path: Path, evidence: Evidence
) -> None:
    """Worker and API on a broker that is not there: retries that say so; events kept."""
    broker = f"amqp://guest:{PASSWORD}@127.0.0.1:{DEAD_PORT}//"
    figures = Figures("bad_broker_url[amqp]")
    with chaos_stack(
        tmp_path / "home",
        evidence=evidence,
        label="bad-broker",
        broker_url=broker,
        roles=("api", "worker"),
    ) as stack:
        event = cloud_event(
            f"badbroker-{uuid.uuid4().hex[:8]}",
            "membership.added",
            {"org_id": "o-bad-broker", "user_id": "u1", "role": "user"},
            _now(),
        )
        started = time.monotonic()
        answer = stack.post(event)
        post_s = time.monotonic() - started
        ready = httpx.get(f"{stack.api_url}/readyz", timeout=30)
        time.sleep(RETRY_WAIT_S)
        worker_log, api_log = stack.log("worker"), stack.log("api")
        with stack.session() as session:
            status = session.scalar(select(InboxEvent.status).where(InboxEvent.id == event["id"]))
        retries = worker_log.count("Trying again") + worker_log.count("retry")
        figures.set(
            post_status=answer.status_code,
            post_s=round(post_s, 1),
            readyz=ready.status_code,
            readyz_broker=ready.json().get("broker"),
            inbox_status=status,
            worker_alive=stack.alive("worker"),
            worker_retry_lines=retries,
            api_logged_publish_failure="publish_error" in api_log,
        )
        figures.publish(evidence.root)
        assert answer.status_code == 202, answer.text  # stored: the re-drive publishes it later
        # Seconds, not the minutes the publisher's own retries would take: it did not wait.
        assert post_s < 5, "a broker that is down must not hold up the producer"
        assert status == EventStatus.PENDING, "an accepted event must stay in the inbox"
        assert ready.status_code == 503
        assert ready.json()["broker"] != "ok"
        assert stack.alive("worker"), "the worker must keep retrying, not exit"
        assert f"127.0.0.1:{DEAD_PORT}" in worker_log, worker_log[-2000:]
        assert retries > 0, worker_log[-2000:]
        assert '"publish_error"' in api_log, api_log[-2000:]
        assert '"TOKENWARDEN_BROKER_URL"' in worker_log, worker_log[-2000:]
        assert '"TOKENWARDEN_BROKER_URL"' in api_log, api_log[-2000:]
        assert "events.accepted" in api_log, api_log[-2000:]
        assert PASSWORD not in worker_log + api_log


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_an_unreachable_webhook_keeps_the_notice_and_says_why(
    tmp_path: Path, evidence: Evidence
) -> None:
    if not notices_wired():
        pytest.skip("notice delivery (tasks/notices.py) has not landed")
    figures = Figures("unreachable_webhook")
    with chaos_stack(
        tmp_path / "home",
        evidence=evidence,
        label="bad-webhook",
        webhook_url=f"http://127.0.0.1:{DEAD_PORT}/notices",
        roles=("api", "worker"),
    ) as stack:
        stack.member("o-hook", "u-hook")
        issued = stack.token(TokenKind.PERSONAL, "o-hook", "u-hook")
        evidence.add_tokens([issued.token])
        stack.send(
            cloud_event(
                f"hook-{uuid.uuid4().hex[:8]}",
                "token.leak_suspected",
                {"token": issued.token, "reporter": "scanner"},
                _now(),
            )
        )

        def attempted() -> bool:
            with stack.session() as session:
                notice = session.scalar(select(Notice).where(Notice.kind == "token.leaked"))
            return notice is not None and notice.attempts >= 2

        stack.wait_for(attempted, timeout=60, message="two delivery attempts")
        with stack.session() as session:
            notice = session.scalars(select(Notice).where(Notice.kind == "token.leaked")).one()
        log = stack.log("worker")
        figures.set(
            notice_status=notice.status,
            attempts=notice.attempts,
            last_error=(notice.last_error or "")[:80],
            logged_attempts=log.count('"notice.attempt"'),
            names_url=f"127.0.0.1:{DEAD_PORT}" in log,
        )
        figures.publish(evidence.root)
        assert notice.status == "pending", "an unreachable receiver must not fail the notice"
        assert notice.last_error, "the reason of the failed attempt is kept"
        assert '"notice.attempt"' in log, log[-2000:]
        assert f'"receiver": "http://127.0.0.1:{DEAD_PORT}"' in log, log[-2000:]
        assert "retry" in log, log[-2000:]


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.rabbitmq
def test_a_missing_signing_secret_in_production_is_named_in_one_line(tmp_path: Path) -> None:
    with fresh_postgres_database() as url:
        process = _start(
            tmp_path / "home",
            "worker",
            TOKENWARDEN_DATABASE_URL=url,
            TOKENWARDEN_BROKER_URL=service_url("rabbitmq") or "",
            TOKENWARDEN_NOTICE_WEBHOOK_URL="https://hooks.example/notices",
        )
        try:
            process.wait(timeout=8)
        except subprocess.TimeoutExpired:
            kill_group(process)
        output = (tmp_path / "home" / "out.log").read_text()
        assert process.returncode == 2, output[-2000:]
        lines = output.strip().splitlines()
        assert len(lines) == 1, output[-2000:]
        assert lines[0].startswith("error: TOKENWARDEN_NOTICE_SIGNING_SECRET:"), lines[0]
        assert not (tmp_path / "home" / SIGNING_SECRET_FILE).exists(), "no secret of its own"


def _start(home: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    home.mkdir(parents=True, exist_ok=True)
    with (home / "out.log").open("ab") as out:
        return subprocess.Popen(
            [str(TOKENWARDEN), *args],
            env=clean_env(TOKENWARDEN_HOME=str(home), **env),
            cwd=home,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _now() -> datetime:
    return datetime.now(UTC)
