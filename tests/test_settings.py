"""Settings from ``TOKENWARDEN_*`` variables: defaults, parsing, and one-line errors."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TOKENWARDEN
from tokenwarden.config.settings import GITHUB_KEYS_URL, ConfigError, Settings, load_settings


@pytest.fixture(autouse=True)
def _no_tokenwarden_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Start every test from no configuration at all, in an empty working folder."""
    for name in list(os.environ):
        if name.startswith("TOKENWARDEN_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def config_error(**environment: str) -> str:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        with pytest.raises(ConfigError) as raised:
            load_settings()
    return str(raised.value)


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    monkeypatch.setenv("XDG_DATA_HOME", str(data))
    settings = load_settings()

    # A per-user folder, the same from any current folder.
    assert settings.home == data / "tokenwarden"
    assert settings.reminder_days == (60, 30, 7)
    assert settings.producer_keys == ()
    assert (settings.api_host, settings.api_port) == ("127.0.0.1", 8000)
    assert settings.api_url == "http://127.0.0.1:8000"
    assert (settings.sweep_interval_s, settings.sweep_batch) == (300, 1000)
    assert settings.github_keys_url == GITHUB_KEYS_URL
    assert settings.notice_webhook_url is None
    assert settings.gitlab_revocation_token is None
    assert settings.embedded
    expected_db = data.resolve() / "tokenwarden" / "tokenwarden.db"
    assert settings.resolved_database_url == f"sqlite:///{expected_db}"
    assert settings.broker_folder == data.resolve() / "tokenwarden" / "broker"
    assert not data.exists()  # reading settings creates nothing
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert load_settings().home == tmp_path / "user" / ".local" / "share" / "tokenwarden"


def test_home_moves_the_embedded_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKENWARDEN_HOME", str(tmp_path / "elsewhere"))

    settings = load_settings()

    assert (
        settings.resolved_database_url == f"sqlite:///{tmp_path / 'elsewhere' / 'tokenwarden.db'}"
    )
    assert settings.broker_folder == tmp_path / "elsewhere" / "broker"


K1, K2, K3 = "twp_first_key_0001", "twp_second_key_002", "twp_third_key_0003"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (K1, (K1,)),
        (f"{K1},{K2}", (K1, K2)),
        (f" {K1} , {K2} ,, {K3} ,", (K1, K2, K3)),
        ("", ()),
        (" , ", ()),
    ],
)
def test_producer_keys_are_comma_separated(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple[str, ...]
) -> None:
    monkeypatch.setenv("TOKENWARDEN_PRODUCER_KEYS", value)

    settings = load_settings()

    assert settings.producer_keys == expected
    assert settings.accepted_producer_keys() == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("60,30,7", (60, 30, 7)), ("14", (14,)), (" 90 , 1 ", (90, 1))],
)
def test_reminder_days_are_comma_separated(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple[int, ...]
) -> None:
    monkeypatch.setenv("TOKENWARDEN_REMINDER_DAYS", value)

    assert load_settings().reminder_days == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("postgres://tw:pw@db:5432/tw", "postgresql+psycopg://tw:pw@db:5432/tw"),
        ("postgresql://tw@db/tw", "postgresql+psycopg://tw@db/tw"),
        ("postgresql+psycopg://tw@db/tw", "postgresql+psycopg://tw@db/tw"),
        ("sqlite:////var/lib/tw.db", "sqlite:////var/lib/tw.db"),
    ],
)
def test_database_url_is_normalised(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    monkeypatch.setenv("TOKENWARDEN_DATABASE_URL", value)

    settings = load_settings()

    assert settings.database_url == expected
    assert settings.resolved_database_url == expected
    assert not settings.embedded


def test_blank_database_url_means_the_embedded_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENWARDEN_DATABASE_URL", "  ")

    settings = load_settings()

    assert settings.database_url is None
    assert settings.resolved_database_url.startswith("sqlite:///")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TOKENWARDEN_API_PORT", "notaport"),
        ("TOKENWARDEN_API_PORT", "70000"),
        ("TOKENWARDEN_API_PORT", "0"),
        ("TOKENWARDEN_API_PORT", "80\n80"),
        ("TOKENWARDEN_DATABASE_URL", "mysql://x"),
        ("TOKENWARDEN_BROKER_URL", "localhost"),
        ("TOKENWARDEN_NOTICE_WEBHOOK_URL", "ftp://hooks.example/x"),
        ("TOKENWARDEN_API_URL", "127.0.0.1:8000"),
        ("TOKENWARDEN_GITHUB_KEYS_URL", "file:///etc/passwd"),
        ("TOKENWARDEN_REMINDER_DAYS", "60,abc"),
        ("TOKENWARDEN_REMINDER_DAYS", "30,0"),
        ("TOKENWARDEN_REMINDER_DAYS", "-7"),
        ("TOKENWARDEN_SWEEP_INTERVAL_S", "0"),
        ("TOKENWARDEN_SWEEP_BATCH", "-1"),
        ("TOKENWARDEN_SWEEP_BATCH", "many"),
        ("TOKENWARDEN_API_DOCS", "maybe"),
    ],
)
def test_bad_value_is_a_one_line_error_naming_the_variable(variable: str, value: str) -> None:
    message = config_error(**{variable: value})

    assert message.startswith(f"{variable}: ")
    assert "\n" not in message
    assert len(message) < 200


SECRETS = {
    "TOKENWARDEN_PRODUCER_KEYS": "twp_s3cretProducerKeyOne,twp_s3cretProducerKeyTwo",
    "TOKENWARDEN_PRODUCER_KEY": "twp_s3cretProducerKeyOne",
    "TOKENWARDEN_NOTICE_SIGNING_SECRET": "whsec_c2VjcmV0LXNpZ25pbmcta2V5LWZvci10ZXN0cw==",
    "TOKENWARDEN_GITLAB_REVOCATION_TOKEN": "glrt-s3cretSharedWithGitlab",
}


def test_secret_variables_are_read_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)

    settings = load_settings()

    assert settings.producer_keys == ("twp_s3cretProducerKeyOne", "twp_s3cretProducerKeyTwo")
    assert settings.client_producer_key() == SECRETS["TOKENWARDEN_PRODUCER_KEY"]
    assert settings.signing_secret() == SECRETS["TOKENWARDEN_NOTICE_SIGNING_SECRET"]
    assert settings.gitlab_revocation_token == SECRETS["TOKENWARDEN_GITLAB_REVOCATION_TOKEN"]


def test_an_error_elsewhere_does_not_echo_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)

    message = config_error(TOKENWARDEN_API_PORT="notaport")

    assert message.startswith("TOKENWARDEN_API_PORT: ")
    for value in SECRETS.values():
        for part in value.split(","):
            assert part not in message


# A value that fails validation in a secret field. No environment value can fail these
# fields today (any text is a valid string), so the typed override reaches the same
# message-building code an env value would once a field gains a check (e.g. ``whsec_``).
UNUSABLE_SECRET = 739184265017


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("producer_keys", [UNUSABLE_SECRET]),
        ("producer_key", UNUSABLE_SECRET),
        ("notice_signing_secret", UNUSABLE_SECRET),
        ("gitlab_revocation_token", UNUSABLE_SECRET),
    ],
)
def test_a_bad_secret_value_is_never_echoed(field: str, value: Any) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(**{field: value})

    message = str(raised.value)
    assert message.startswith(f"TOKENWARDEN_{field.upper()}: ")
    assert str(UNUSABLE_SECRET) not in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TOKENWARDEN_PRODUCER_KEYS", "ci"),
        ("TOKENWARDEN_PRODUCER_KEYS", "twp_long_enough_key_1,short-key-15ch"),
        ("TOKENWARDEN_PRODUCER_KEY", "xyzzy"),
        ("TOKENWARDEN_GITLAB_REVOCATION_TOKEN", "glrt-123456789"),
    ],
)
def test_a_key_under_16_characters_is_refused_naming_the_variable(
    variable: str, value: str
) -> None:
    message = config_error(**{variable: value})

    assert message.startswith(f"{variable}: a key must be at least 16 characters long")
    assert "\n" not in message
    for part in value.split(","):
        assert part not in message


def test_a_key_of_16_characters_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENWARDEN_PRODUCER_KEYS", "0123456789abcdef")

    assert load_settings().producer_keys == ("0123456789abcdef",)


def test_a_short_key_stops_the_cli_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARDEN_")}
    env.update(TOKENWARDEN_HOME=str(tmp_path), TOKENWARDEN_PRODUCER_KEYS="ci")

    done = subprocess.run(
        [str(TOKENWARDEN), "token", "list"], capture_output=True, text=True, env=env, check=False
    )

    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: TOKENWARDEN_PRODUCER_KEYS: a key must be at least 16 characters long; make one "
        'with python -c "import secrets; print(secrets.token_urlsafe(32))"'
    ]


def test_a_refused_database_url_does_not_echo_its_password() -> None:
    message = config_error(TOKENWARDEN_DATABASE_URL="mysql://tw:hunter2secret@db/tw")

    assert message.startswith("TOKENWARDEN_DATABASE_URL: ")
    assert "hunter2secret" not in message


def test_settings_are_frozen() -> None:
    settings: Any = Settings()

    with pytest.raises(ValueError):
        settings.api_port = 9000


@pytest.mark.parametrize("secret", ["abc", "whsec_", "whsec_not base64!", "whsec_YWJj"])
def test_a_signing_secret_must_be_a_standard_webhooks_secret(secret: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(notice_signing_secret=secret)
    assert str(raised.value).startswith("TOKENWARDEN_NOTICE_SIGNING_SECRET: ")
    assert "(got" not in str(raised.value)  # a secret's value is never echoed


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:guest@127.0.0.1:5672//",
        "amqps://rabbit.example//",
        "pyamqp://rabbit.example//",
        "redis://127.0.0.1:6379/0",
        "rediss://redis.example:6380/0",
        "sqla+sqlite:////var/lib/tw-broker.db",
    ],
)
def test_a_broker_url_kombu_can_use_is_taken_as_given(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("TOKENWARDEN_BROKER_URL", url)

    assert load_settings().broker_url == url


def test_an_unknown_broker_transport_is_named_with_a_guess() -> None:
    message = config_error(TOKENWARDEN_BROKER_URL="amqps2://tw:hunter2secret@broker.example//")

    assert message.startswith("TOKENWARDEN_BROKER_URL: unknown broker transport amqps2://")
    assert "did you mean amqps://?" in message
    assert "hunter2secret" not in message
    assert "\n" not in message


def test_a_broker_transport_whose_library_is_missing_is_named() -> None:
    # kombu knows SQS, but its library (boto3) is not a dependency of tokenwarden.
    message = config_error(TOKENWARDEN_BROKER_URL="sqs://")

    assert message.startswith("TOKENWARDEN_BROKER_URL: the sqs:// transport needs a library")
    assert "\n" not in message


def test_an_in_process_broker_is_refused() -> None:
    # The API, the worker and the scheduler are separate processes: messages would vanish.
    message = config_error(TOKENWARDEN_BROKER_URL="memory://")

    assert message.startswith("TOKENWARDEN_BROKER_URL: memory:// keeps messages inside one process")


SHARED_SECRET = SECRETS["TOKENWARDEN_NOTICE_SIGNING_SECRET"]
WEBHOOK = "https://hooks.example/notices"
SERVER_DATABASE = "postgresql://tw:hunter2secret@db.example/tw"


def test_a_webhook_on_a_server_database_needs_a_shared_signing_secret(tmp_path: Path) -> None:
    message = config_error(
        TOKENWARDEN_HOME=str(tmp_path / "home"),
        TOKENWARDEN_NOTICE_WEBHOOK_URL=WEBHOOK,
        TOKENWARDEN_DATABASE_URL=SERVER_DATABASE,
    )

    assert message.startswith("TOKENWARDEN_NOTICE_SIGNING_SECRET: must be set")
    assert "TOKENWARDEN_NOTICE_WEBHOOK_URL" in message
    assert "hunter2secret" not in message
    assert "\n" not in message
    assert not (tmp_path / "home").exists()  # no secret of its own was generated


def test_a_webhook_on_a_server_database_signs_with_the_given_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TOKENWARDEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TOKENWARDEN_NOTICE_WEBHOOK_URL", WEBHOOK)
    monkeypatch.setenv("TOKENWARDEN_DATABASE_URL", SERVER_DATABASE)
    monkeypatch.setenv("TOKENWARDEN_NOTICE_SIGNING_SECRET", SHARED_SECRET)

    assert load_settings().signing_secret() == SHARED_SECRET
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("database", [None, "sqlite:////var/lib/tokenwarden/tw.db"])
def test_a_webhook_on_sqlite_generates_its_secret_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database: str | None
) -> None:
    monkeypatch.setenv("TOKENWARDEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TOKENWARDEN_NOTICE_WEBHOOK_URL", WEBHOOK)
    if database:
        monkeypatch.setenv("TOKENWARDEN_DATABASE_URL", database)

    first = load_settings().signing_secret()

    assert first.startswith("whsec_")
    assert load_settings().signing_secret() == first  # every process on the home shares it


def test_a_server_database_without_a_webhook_needs_no_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOKENWARDEN_DATABASE_URL", SERVER_DATABASE)

    assert load_settings().notice_signing_secret is None


def test_a_refused_webhook_url_does_not_echo_its_user_or_query() -> None:
    message = config_error(
        TOKENWARDEN_NOTICE_WEBHOOK_URL="ftp://k3yuser@hooks.example/n?b4res3cret&token=qu3rys3cret"
    )

    assert message.startswith("TOKENWARDEN_NOTICE_WEBHOOK_URL: must be an http:// or https:// URL")
    assert "hooks.example/n?" in message
    for secret in ("k3yuser", "b4res3cret", "qu3rys3cret"):
        assert secret not in message
