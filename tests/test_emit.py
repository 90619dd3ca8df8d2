"""``tokenwarden emit`` and ``tokenwarden events`` through the real console script."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TOKENWARDEN, Cli, Store, clean_env
from tests.test_client import running_server
from tokenwarden.config.settings import Settings
from tokenwarden.producer.api import create_app
from tokenwarden.worker.domain import clock
from tokenwarden.worker.domain.db import transaction
from tokenwarden.worker.domain.inbox import dead_letter
from tokenwarden.worker.domain.models import TokenKind
from tokenwarden.worker.domain.tokens import generate, hash_token
from tokenwarden.worker.runtime.celery_app import make_celery

KEY = "twp_emit_test_key_0001"


@pytest.fixture
def api_url(store: Store, tmp_path: Path) -> Iterator[str]:
    settings = Settings(home=tmp_path / "api", database_url=store.url, producer_keys=(KEY,))
    celery_app = make_celery(settings)
    try:
        with running_server(create_app(settings, celery_app=celery_app)) as url:
            yield url
    finally:
        celery_app.close()
        store.truncate()


def command_line(home: Path, **variables: str) -> Cli:
    home.mkdir(exist_ok=True)
    return Cli(home, clean_env(TOKENWARDEN_HOME=str(home), **variables))


@pytest.fixture
def run(store: Store, api_url: str, tmp_path: Path) -> Cli:
    """The CLI on the test store, sending to the API served on loopback."""
    return command_line(
        tmp_path / "home",
        TOKENWARDEN_DATABASE_URL=store.url,
        TOKENWARDEN_API_URL=api_url,
        TOKENWARDEN_PRODUCER_KEY=KEY,
    )


def test_emit_prints_the_id_and_events_shows_it_pending(run: Cli) -> None:
    sent = run(
        "emit",
        "membership.removed",
        "--data",
        '{"org_id": "acme", "user_id": "u-42"}',
        "--id",
        "evt-1",
        "--source",
        "hr://workday",
        "--time",
        "2026-11-27T19:00:00+01:00",
        check=True,
    )
    assert sent.stdout == "evt-1\n"
    listed = run("events", "--json", check=True).json()
    [event] = listed["events"]
    assert (event["id"], event["type"], event["status"], event["source"]) == (
        "evt-1",
        "membership.removed",
        "pending",
        "hr://workday",
    )
    assert event["time"].startswith("2026-11-27T18:00:00")
    assert event["data"] == {"org_id": "acme", "user_id": "u-42"}
    assert listed["dead_letters"] == []
    table = run("events", check=True).stdout
    assert re.search(r"evt-1\s+membership\.removed\s+2026-11-27 18:00:00Z\s+pending", table)
    assert "no dead letters" in table
    assert run("events", "--status", "done", "--json", check=True).json()["events"] == []


def test_emit_sent_again_with_its_id_is_the_same_event(run: Cli) -> None:
    """A retried ``emit --id`` (the first answer lost, say) is not refused as a conflict."""
    for _ in range(2):
        sent = run("emit", "user.deactivated", "--data", '{"user_id": "u-7"}', "--id", "evt-7")
        assert (sent.code, sent.stdout) == (0, "evt-7\n"), sent.stderr
    [event] = run("events", "--json", check=True).json()["events"]
    assert event["id"] == "evt-7"
    assert event["time"]  # stamped by the API when it first received the event


def test_emit_goes_where_the_api_listens_by_default(
    store: Store, api_url: str, tmp_path: Path
) -> None:
    """Without TOKENWARDEN_API_URL, emit posts to TOKENWARDEN_API_HOST:TOKENWARDEN_API_PORT."""
    port = api_url.rsplit(":", 1)[1]
    run = command_line(
        tmp_path / "home",
        TOKENWARDEN_DATABASE_URL=store.url,
        TOKENWARDEN_API_PORT=port,
        TOKENWARDEN_PRODUCER_KEY=KEY,
    )
    sent = run("emit", "user.deactivated", "--data", '{"user_id": "u-8"}', "--id", "evt-8")
    assert (sent.code, sent.stdout) == (0, "evt-8\n"), sent.stderr
    assert Settings(home=tmp_path, api_host="0.0.0.0", api_port=9).api_url == "http://127.0.0.1:9"
    assert Settings(home=tmp_path, api_url="http://api:1", api_port=9).api_url == "http://api:1"


def test_emit_json_prints_the_accepted_ids(run: Cli) -> None:
    result = run("emit", "user.deactivated", "--data", '{"user_id": "u-1"}', "--json", check=True)
    [event_id] = result.json()["accepted"]
    assert re.fullmatch(r"[0-9a-f-]{36}", event_id)
    assert run("events", "--json", check=True).json()["events"][0]["id"] == event_id


def test_emit_a_leak_sends_only_the_hash(run: Cli) -> None:
    leaked = generate(TokenKind.PERSONAL)
    data = json.dumps({"token": leaked, "reporter": "ops"})
    run("emit", "token.leak_suspected", "--data", data, "--id", "leak-1", check=True)
    listed = run("events", "--json", check=True)
    assert leaked not in listed.stdout
    assert listed.json()["events"][0]["data"] == {
        "token_hash": hash_token(leaked),
        "reporter": "ops",
    }


def test_emit_reads_data_from_standard_input(run: Cli) -> None:
    leaked = generate(TokenKind.APPLICATION)
    done = subprocess.run(
        [str(TOKENWARDEN), "emit", "token.leak_suspected", "--data", "-", "--id", "leak-2"],
        input=json.dumps({"token": leaked}),
        capture_output=True,
        text=True,
        env=run.env,
        cwd=run.home,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "leak-2\n"), done.stderr
    [event] = run("events", "--json", check=True).json()["events"]
    assert event["data"] == {"token_hash": hash_token(leaked)}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ('{"org_id": ', "--data: not valid JSON"),
        ('["org_id"]', "--data: must be a JSON object"),
    ],
)
def test_emit_bad_data_exits_2_in_one_line(run: Cli, data: str, message: str) -> None:
    result = run("emit", "membership.removed", "--data", data)
    assert result.code == 2
    assert result.stderr.startswith(f"error: {message}")
    assert result.stderr.count("\n") == 1
    assert run("events", "--json", check=True).json()["events"] == []


def test_emit_a_bad_token_in_data_is_not_echoed(run: Cli) -> None:
    leaked = generate(TokenKind.PERSONAL)
    result = run("emit", "token.leak_suspected", "--data", '{"token": "' + leaked)
    assert result.code == 2
    assert leaked not in result.stderr + result.stdout


def test_emit_refused_by_the_api_exits_2_with_its_reason(run: Cli) -> None:
    result = run(
        "emit", "membership.added", "--data", '{"org_id": "a", "user_id": "u", "role": "root"}'
    )
    assert result.code == 2
    assert result.stderr.startswith("error: the producer API refused the event (HTTP 422): ")
    assert "data.role" in result.stderr
    assert result.stderr.count("\n") == 1


def test_emit_with_a_wrong_key_exits_2(run: Cli, api_url: str, tmp_path: Path) -> None:
    wrong = command_line(
        tmp_path / "home",
        TOKENWARDEN_API_URL=api_url,
        TOKENWARDEN_PRODUCER_KEY="twp_wrong_producer_key",
    )
    result = wrong("emit", "user.deactivated", "--data", '{"user_id": "u"}')
    assert result.code == 2
    assert "(HTTP 401)" in result.stderr


def test_emit_an_unknown_type_is_a_usage_error(tmp_path: Path) -> None:
    result = command_line(tmp_path / "home")("emit", "user.exploded", "--data", "{}")
    assert result.code == 2
    assert "user.deactivated" in result.stderr


def test_emit_without_a_key_says_how_to_get_one(tmp_path: Path) -> None:
    result = command_line(tmp_path / "home")(
        "emit", "user.deactivated", "--data", '{"user_id": "u"}'
    )
    assert result.code == 2
    assert "TOKENWARDEN_PRODUCER_KEY" in result.stderr
    assert "tokenwarden run" in result.stderr


def test_emit_when_the_api_is_unreachable(tmp_path: Path) -> None:
    cli = command_line(
        tmp_path / "home",
        TOKENWARDEN_API_URL="http://127.0.0.1:1",
        TOKENWARDEN_PRODUCER_KEY="twp_some_producer_key",
    )
    result = cli("emit", "user.deactivated", "--data", '{"user_id": "u"}')
    assert result.code == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot reach the producer API at http://127.0.0.1:1: ")


def test_events_lists_dead_letters_with_their_reasons(run: Cli, store: Store) -> None:
    with transaction(store.engine) as session:
        dead_letter(
            session,
            reason="body is not JSON",
            now=clock.now(),
            event_id="evt-9",
            task="tokenwarden.process_events",
        )
    listed = run("events", "--json", check=True).json()
    assert listed["events"] == []
    [letter] = listed["dead_letters"]
    assert (letter["reason"], letter["event_id"], letter["task"]) == (
        "body is not JSON",
        "evt-9",
        "tokenwarden.process_events",
    )
    table = run("events", check=True).stdout
    assert "no events" in table
    assert "dead letters:" in table
    assert re.search(r"body is not JSON\s+evt-9\s+tokenwarden\.process_events", table)
