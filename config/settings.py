"""One typed settings object, read from ``TOKENWARDEN_*`` environment variables.

With nothing set, every file lives in ``TOKENWARDEN_HOME``: an SQLite token store and a
file-backed Celery broker, so the embedded default needs no server at all.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import secrets
import stat
from email.utils import parseaddr
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "TOKENWARDEN_"
GITHUB_KEYS_URL = "https://api.github.com/meta/public_keys/secret_scanning"
PRODUCER_KEY_FILE = "producer.key"
SIGNING_SECRET_FILE = "notice-signing.secret"  # noqa: S105 - a file name
# Kombu transports that keep messages inside one process: the API, the worker and the
# scheduler are separate processes, so a message put there would never reach a worker.
IN_PROCESS_TRANSPORTS = frozenset({"memory"})
# A day: a clock further off than that is a mistake to fix, not a skew to allow.
MAX_CLOCK_SKEW_LIMIT_S = 86400
# A shared secret shorter than this can be guessed or was typed by hand; the generated ones
# are 32 random bytes (43 characters).
MIN_KEY_LENGTH = 16
# Like GitHub's policy for fine-grained personal access tokens.
DEFAULT_MAX_LIFETIME_DAYS = 366
# A century: the cap itself must leave expiries within the calendar.
MAX_LIFETIME_LIMIT_DAYS = 36500
# Owners hear of an idle token this many days before the sweep revokes it.
IDLE_WARNING_DAYS = 7
TOKEN_KINDS = ("personal", "application")
MAKE_KEY = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
# Owner only: the home holds keys, the store emails, the audit trail and token hashes.
PRIVATE_UMASK = 0o077
# What tokenwarden keeps in its home (the store with its -wal, -shm and lock files, the
# scheduler's state, the generated key and secret, the file broker's folders).
HOME_ENTRIES = (
    "tokenwarden.db*",
    "celerybeat-schedule*",
    PRODUCER_KEY_FILE,
    SIGNING_SECRET_FILE,
    "broker",
    "broker/*/",
)


def keep_files_private() -> None:
    """Make every file and folder this process creates readable by its owner alone.

    Set once at each entry point (the CLI, the Celery app, the API factory), so it covers
    what libraries create too: SQLite's ``-wal`` and ``-shm`` files, the file broker's
    messages, the generated key files.
    """
    os.umask(PRIVATE_UMASK)


class ConfigError(Exception):
    """A setting has a value tokenwarden cannot use; the message names the variable."""


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _blank_is_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def _strong_key(value: str | None) -> str | None:
    if value is not None and len(value) < MIN_KEY_LENGTH:
        raise ValueError(
            f"a key must be at least {MIN_KEY_LENGTH} characters long; make one with {MAKE_KEY}"
        )
    return value


def _strong_keys(values: tuple[str, ...]) -> tuple[str, ...]:
    for value in values:
        _strong_key(value)
    return values


# A shared secret that callers present (Bearer keys, shared tokens): unset, or 16+ characters.
Key = Annotated[str | None, BeforeValidator(_blank_is_none), AfterValidator(_strong_key)]
# Several of them, comma-separated; none shorter than 16 characters.
Keys = Annotated[
    tuple[str, ...], NoDecode, BeforeValidator(_split_csv), AfterValidator(_strong_keys)
]


def _named_keys(value: Any) -> Any:
    """``NAME:KEY,NAME:KEY`` -> ((name, key), ...): each key strong, each name given once."""
    parts = _split_csv(value)
    if not isinstance(parts, tuple | list):
        return parts
    named: list[tuple[str, str]] = []
    for part in parts:
        entry = ":".join(part) if isinstance(part, tuple | list) else str(part)
        name, colon, key = entry.partition(":")
        if not colon or not name.strip() or not key.strip():
            raise ValueError("expected NAME:KEY entries separated by commas (the name is audited)")
        named.append((name.strip(), _strong_key(key.strip()) or ""))
    if len({name for name, _ in named}) != len(named):
        raise ValueError("each admin key needs a name of its own")
    return tuple(named)


# Named keys (``NAME:KEY``, comma-separated): the name is what the audit trail records.
NamedKeys = Annotated[tuple[tuple[str, str], ...], NoDecode, BeforeValidator(_named_keys)]


def _networks(value: Any) -> Any:
    parts = _split_csv(value)
    if not isinstance(parts, tuple | list):
        return parts
    try:
        return tuple(ipaddress.ip_network(part) for part in parts)
    except (TypeError, ValueError) as error:
        raise ValueError(f"expected addresses or networks such as 10.0.0.0/8: {error}") from None


def _scim_groups(value: Any) -> Any:
    """``Group=org:role`` pairs, comma-separated, or ``@PATH``: a file of them, one a line."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("@"):
        try:
            text = Path(text[1:]).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read {text[1:]}: {error}") from None
        parts = [line.strip() for line in text.splitlines()]
    else:
        parts = [part.strip() for part in text.split(",")]
    grants: dict[str, tuple[str, str]] = {}
    for part in parts:
        if not part or part.startswith("#"):
            continue
        group, _, grant = part.rpartition("=")
        org, _, role = grant.strip().rpartition(":")
        if len(org.strip()) > 200:
            raise ValueError(f"an organization id is at most 200 characters: {part[:80]!r}…")
        if not group.strip() or not org.strip() or role.strip() not in ("admin", "user"):
            raise ValueError(f"expected 'Group name=org:admin' or '=org:user', not {part!r}")
        key = group.strip().casefold()
        if key in grants:
            raise ValueError(f"the group {group.strip()!r} is mapped twice")
        grants[key] = (org.strip(), role.strip())
    return grants


# SCIM group display name (case-folded) -> (organization, role) it grants.
ScimGroups = Annotated[dict[str, tuple[str, str]], NoDecode, BeforeValidator(_scim_groups)]


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Comma-separated addresses or CIDR networks (host bits clear).
Networks = Annotated[tuple[Network, ...], NoDecode, BeforeValidator(_networks)]


class SsfTransmitter(BaseModel):
    """A Shared Signals transmitter whose Security Event Tokens POST /v1/ssf/events trusts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    issuer: str
    audience: str
    jwks_uri: str | None = None
    # The transmitter's /.well-known/ssf-configuration, which names its jwks_uri.
    configuration_url: str | None = None

    @model_validator(mode="after")
    def _one_key_source(self) -> Self:
        if not self.issuer.strip() or not self.audience.strip():
            raise ValueError("each transmitter needs a non-empty issuer and audience")
        urls = [u for u in (self.jwks_uri, self.configuration_url) if u is not None]
        if len(urls) != 1:
            raise ValueError(f"transmitter {self.issuer!r}: give jwks_uri or configuration_url")
        if not urls[0].startswith(("https://", "http://")):
            raise ValueError(f"transmitter {self.issuer!r}: its key URL must be http(s)")
        return self


def _transmitters(value: Any) -> Any:
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value) if value.strip() else []
        except ValueError:
            raise ValueError(
                'must be a JSON list like [{"issuer": "...", "jwks_uri": "...", "audience": "..."}]'
            ) from None
    if isinstance(value, list):
        # Entries that are not objects are left to the model's validation, which names them.
        issuers = [
            str(t.get("issuer")) if isinstance(t, dict) else str(getattr(t, "issuer", ""))
            for t in value
            if isinstance(t, dict) or hasattr(t, "issuer")
        ]
        if len(set(issuers)) != len(issuers):
            raise ValueError("names an issuer twice")
    return value


def _lifetimes(value: str | int) -> dict[str, int]:
    """``366`` (every kind) or ``personal=90,application=366`` (a kind left out keeps the
    default) as days by kind."""
    example = "366 or personal=90,application=366"
    parts = _split_csv(str(value))
    if len(parts) == 1 and "=" not in parts[0]:
        parts = tuple(f"{kind}={parts[0]}" for kind in TOKEN_KINDS)
    days = dict.fromkeys(TOKEN_KINDS, DEFAULT_MAX_LIFETIME_DAYS)
    for part in parts:
        kind, _, number = (piece.strip() for piece in part.partition("="))
        if kind not in TOKEN_KINDS:
            raise ValueError(f"unknown token kind {kind!r}; write {example}")
        if not number.isdigit() or not 0 < int(number) <= MAX_LIFETIME_LIMIT_DAYS:
            raise ValueError(
                f"must be a whole number of days from 1 to {MAX_LIFETIME_LIMIT_DAYS}; "
                f"write {example}"
            )
        days[kind] = int(number)
    return days


def default_home() -> Path:
    """Where the embedded default keeps its files unless TOKENWARDEN_HOME says otherwise."""
    data = os.environ.get("XDG_DATA_HOME", "").strip()
    base = Path(data) if data and Path(data).is_absolute() else Path.home() / ".local" / "share"
    return base / "tokenwarden"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Per user, whatever the current folder: $XDG_DATA_HOME/tokenwarden, else
    # ~/.local/share/tokenwarden.
    home: Path = Field(default_factory=default_home)
    database_url: str | None = None
    broker_url: str | None = None
    producer_keys: Keys = ()
    # Keys of the resource servers that may call POST /v1/introspect; never a producer key.
    introspection_keys: Keys = ()
    # Keys of the callers of /v1/tokens (a console, automation), as NAME:KEY; no other door's.
    admin_keys: NamedKeys = ()
    # Peers whose GET /v1/auth calls are trusted without a key (the gateways' addresses).
    forward_auth_peers: Networks = ()
    notice_webhook_url: str | None = None
    notice_signing_secret: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Processes serving the API on that address (uvicorn's own multi-process mode); each is
    # like a replica with its own group commit, caches, limits and revocation feed.
    api_workers: int = 1
    api_url: str = "http://127.0.0.1:8000"
    producer_key: Key = None
    github_keys_url: str = GITHUB_KEYS_URL
    gitlab_revocation_token: Key = None
    # Requests a minute (and at once) per caller address on GitLab's revocation API, and for
    # callers failing GitHub's signature checks; past it, 429 with Retry-After.
    leak_rate_per_minute: float = 120.0
    leak_rate_burst: int = 30
    # Shared Signals transmitters trusted by POST /v1/ssf/events (a JSON list).
    ssf_transmitters: Annotated[
        tuple[SsfTransmitter, ...], NoDecode, BeforeValidator(_transmitters)
    ] = ()
    # When set, GET /metrics answers only 'Authorization: Bearer <this key>'.
    metrics_key: Key = None
    # Off: no /docs and no /openapi.json (the API's description stays off a public address).
    api_docs: bool = True
    reminder_days: Annotated[tuple[int, ...], NoDecode] = (60, 30, 7)
    sweep_interval_s: int = 300
    sweep_batch: int = 1000
    # Revoked and expired tokens are deleted this many days after they stopped working;
    # None (the default) keeps them forever. Their audit rows are always kept.
    retention_days: int | None = None
    # Done and dead inbox events and dead letters are deleted this many days after they
    # finished; an event id is only remembered that long. None keeps them forever.
    inbox_retention_days: int | None = 30
    redrive_after_s: float = 30.0
    # How far ahead of the receiver's clock an event's time may be; further ahead is refused.
    max_clock_skew_s: float = 300.0
    queue: str = "tokenwarden"
    # Bearer tokens of the identity providers that call /scim/v2 (producer/scim/).
    scim_tokens: Keys = ()
    scim_groups: ScimGroups = {}
    # The longest a new token may live, in days, per kind (existing tokens are never changed).
    max_lifetime_days: Annotated[dict[str, int], NoDecode] = {
        "personal": DEFAULT_MAX_LIFETIME_DAYS,
        "application": DEFAULT_MAX_LIFETIME_DAYS,
    }
    # A live token unused for this many days is revoked by the sweep; None (the default) never.
    idle_revoke_days: int | None = None
    # A worker touches this file every few seconds while it consumes (a liveness check).
    worker_heartbeat_file: Path | None = None
    # Email notices: smtp://user:pass@host:port (STARTTLS when offered) or smtps:// (TLS).
    smtp_url: str | None = None
    mail_from: str | None = None
    # A webhook endpoint that has failed for this long is disabled until resumed (5 days).
    webhook_disable_after_s: float = 432000.0

    @field_validator("reminder_days", mode="before")
    @classmethod
    def _days(cls, value: Any) -> Any:
        days = _split_csv(value)
        if isinstance(days, tuple) and not all(str(d).isdigit() and int(d) > 0 for d in days):
            raise ValueError("must be positive whole numbers of days, e.g. 60,30,7")
        return days

    @field_validator("retention_days", "inbox_retention_days", mode="before")
    @classmethod
    def _retention(cls, value: Any, info: ValidationInfo) -> Any:
        example, kept = (365, "tokens") if info.field_name == "retention_days" else (30, "events")
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, str) and not value.strip().isdigit():
            raise ValueError(
                f"must be a whole number of days, e.g. {example}, or empty to keep {kept}"
            )
        if value is not None and int(value) <= 0:
            raise ValueError(f"must be a positive number of days, or empty to keep {kept}")
        return value

    @field_validator("max_lifetime_days", mode="before")
    @classmethod
    def _lifetimes(cls, value: Any) -> Any:
        return _lifetimes(value) if isinstance(value, str | int) else value

    @field_validator("idle_revoke_days", mode="before")
    @classmethod
    def _idle(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        limit = MAX_LIFETIME_LIMIT_DAYS
        if value is not None and not (
            str(value).strip().isdigit() and IDLE_WARNING_DAYS < int(value) <= limit
        ):
            raise ValueError(
                f"must be a whole number of days above {IDLE_WARNING_DAYS} (owners are warned "
                f"{IDLE_WARNING_DAYS} days before), e.g. 90, or empty to never revoke idle tokens"
            )
        return value

    @field_validator(
        "database_url",
        "broker_url",
        "notice_webhook_url",
        "notice_signing_secret",
        "smtp_url",
        "mail_from",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return _blank_is_none(value)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith(("postgres://", "postgresql://")):
            # Name the driver we ship, so a plain libpq-style URL just works.
            return "postgresql+psycopg://" + value.split("://", 1)[1]
        if not value.startswith(("sqlite", "postgresql+psycopg://")):
            raise ValueError("must be a postgresql:// or sqlite:/// URL")
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "://" not in value:
            raise ValueError("must be a URL such as amqp://guest:guest@127.0.0.1:5672//")
        problem = _transport_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("notice_webhook_url", "api_url", "github_keys_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("notice_signing_secret")
    @classmethod
    def _signing_secret(cls, value: str | None) -> str | None:
        # Several secrets, comma-separated and newest first, while receivers switch over.
        if value is None:
            return None
        parts = [part.strip() for part in value.split(",")]
        for part in parts:
            body = part.removeprefix("whsec_")
            try:
                key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
            except ValueError:
                key = b""
            if not part.startswith("whsec_") or len(key) < 16:
                raise ValueError(
                    "must be Standard Webhooks secrets, comma-separated: "
                    "whsec_ then base64 of 16+ bytes each"
                )
        return ",".join(parts)

    @field_validator("smtp_url")
    @classmethod
    def _smtp_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        try:
            parts.port  # noqa: B018 - reading it is the check
        except ValueError:
            raise ValueError("has a port that is not a number from 1 to 65535") from None
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError("must be smtp://[user:password@]host[:port] or smtps://…")
        return value

    @field_validator("mail_from")
    @classmethod
    def _mail_from(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _, address = parseaddr(value)
        local, at, domain = address.rpartition("@")
        if not (local and at and "." in domain) or any(c in value for c in "\r\n"):
            raise ValueError("must be an email address, e.g. tokenwarden@example.com")
        return value

    @field_validator("webhook_disable_after_s")
    @classmethod
    def _disable_after(cls, value: float) -> float:
        if not value > 0:  # also refuses nan
            raise ValueError("must be a positive number of seconds")
        return value

    @field_validator("queue")
    @classmethod
    def _queue(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError("must be a queue name of letters, digits, '-', '_' or '.'")
        return value

    @field_validator("api_port")
    @classmethod
    def _port(cls, value: int) -> int:
        if not 0 < value < 65536:
            raise ValueError("must be a TCP port between 1 and 65535")
        return value

    @field_validator("api_workers")
    @classmethod
    def _workers(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be a whole number of processes, at least 1")
        return value

    @field_validator("sweep_interval_s", "sweep_batch", "redrive_after_s")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be a positive number")
        return value

    @field_validator("leak_rate_per_minute", "leak_rate_burst")
    @classmethod
    def _rate(cls, value: float) -> float:
        if not 1 <= value <= 1_000_000:  # also refuses nan
            raise ValueError("must be a number from 1 to 1000000")
        return value

    @field_validator("max_clock_skew_s")
    @classmethod
    def _skew(cls, value: float) -> float:
        if not 0 <= value <= MAX_CLOCK_SKEW_LIMIT_S:  # also refuses nan
            raise ValueError(f"must be a number of seconds from 0 to {MAX_CLOCK_SKEW_LIMIT_S}")
        return value

    @model_validator(mode="after")
    def _one_signing_secret(self) -> Self:
        # Each process would otherwise generate its own secret into its TOKENWARDEN_HOME;
        # processes that share a server database (often on several hosts) would then sign
        # notices with different secrets, and the receiver would refuse some of them.
        if self.notice_webhook_url and self.notice_signing_secret is None and self.server_store:
            raise ValueError(
                f"{ENV_PREFIX}NOTICE_SIGNING_SECRET: must be set with "
                f"{ENV_PREFIX}NOTICE_WEBHOOK_URL on a server database: every process must sign "
                "with the same secret (whsec_ then base64 of 32 random bytes)"
            )
        return self

    @model_validator(mode="after")
    def _api_url_from_host_and_port(self) -> Self:
        # Unless it is given, the client (emit) goes where this machine's API listens.
        if "api_url" not in self.model_fields_set:
            host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(self.api_host, self.api_host)  # noqa: S104 - read, not bound
            if ":" in host and not host.startswith("["):
                host = f"[{host}]"
            object.__setattr__(self, "api_url", f"http://{host}:{self.api_port}")  # frozen
        return self

    @model_validator(mode="after")
    def _mail_sender(self) -> Self:
        if self.smtp_url and not self.mail_from:
            raise ValueError(
                f"{ENV_PREFIX}MAIL_FROM: must be set with {ENV_PREFIX}SMTP_URL: the address "
                "notices are sent from, e.g. tokenwarden@example.com"
            )
        return self

    def __repr_args__(self) -> Any:
        # The SMTP URL's password never shows in a repr (a traceback, a debug line).
        for name, value in super().__repr_args__():
            if name == "smtp_url" and isinstance(value, str):
                yield name, without_password(value)
            else:
                yield name, value

    @model_validator(mode="after")
    def _doors_apart(self) -> Self:
        # A service that can check tokens must not be able to revoke them with the same key.
        if set(self.introspection_keys) & set(self.producer_keys):
            raise ValueError(
                f"{ENV_PREFIX}INTROSPECTION_KEYS: must not repeat a key of "
                f"{ENV_PREFIX}PRODUCER_KEYS: give each door keys of its own"
            )
        admin = {key for _, key in self.admin_keys}
        if admin & (set(self.introspection_keys) | set(self.producer_keys)):
            raise ValueError(
                f"{ENV_PREFIX}ADMIN_KEYS: must not repeat a producer or introspection key: "
                "give each door keys of its own"
            )
        return self

    @model_validator(mode="after")
    def _scim_keys_apart(self) -> Self:
        others = set(self.producer_keys) | set(self.introspection_keys)
        others |= {key for _, key in self.admin_keys}
        if set(self.scim_tokens) & others:
            raise ValueError(
                f"{ENV_PREFIX}SCIM_TOKENS: must not repeat a producer, introspection or admin "
                "key: give each door keys of its own"
            )
        return self

    @property
    def server_store(self) -> bool:
        """True when the token store is a database server (shared by processes on any host)."""
        return self.database_url is not None and not self.database_url.startswith("sqlite")

    @property
    def embedded(self) -> bool:
        """True when both the store and the broker are the file-backed defaults."""
        return self.database_url is None and self.broker_url is None

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'tokenwarden.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        # kombu wants a host name even for the folder-backed transport; it is not used.
        return self.broker_url or "filesystem://localhost/"

    @property
    def broker_folder(self) -> Path:
        return (self.home / "broker").resolve()

    def ensure_home(self) -> Path:
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.home

    def keep_home_private(self) -> None:
        """Take group and other access off what tokenwarden keeps in its home.

        New files are private already (:func:`keep_files_private`); these may come from a
        version that left them readable by all. The home folder itself keeps its mode: it may
        be a folder the operator made, and with its entries private it shows no more than
        their names.
        """
        for pattern in HOME_ENTRIES:
            for path in self.home.glob(pattern):
                try:
                    mode = stat.S_IMODE(path.lstat().st_mode)
                    if mode & ~PRIVATE_UMASK != mode and not path.is_symlink():
                        path.chmod(mode & ~PRIVATE_UMASK)
                except OSError:
                    continue  # gone meanwhile, or another owner's: not ours to change

    def _home_secret(self, filename: str, make: str) -> str:
        path = self.home / filename
        if path.exists():
            return path.read_text().strip()
        self.ensure_home()
        path.touch(mode=0o600)
        path.write_text(make + "\n")
        return make

    @property
    def producer_key_path(self) -> Path:
        """Where ``run`` keeps the producer key it generated."""
        return self.home / PRODUCER_KEY_FILE

    def accepted_producer_keys(self) -> tuple[str, ...]:
        """Keys the producer API accepts: the variable, else the one ``run`` generated."""
        if self.producer_keys:
            return self.producer_keys
        path = self.home / PRODUCER_KEY_FILE
        return (path.read_text().strip(),) if path.exists() else ()

    def generated_producer_key(self) -> str:
        return self._home_secret(PRODUCER_KEY_FILE, "twp_" + secrets.token_urlsafe(32))

    def client_producer_key(self) -> str | None:
        if self.producer_key:
            return self.producer_key
        path = self.home / PRODUCER_KEY_FILE
        return path.read_text().strip() if path.exists() else None

    def signing_secret(self) -> str:
        if self.notice_signing_secret:
            return self.notice_signing_secret
        made = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        return self._home_secret(SIGNING_SECRET_FILE, made)


SECRET_FIELDS = frozenset(
    {
        "producer_keys",
        "producer_key",
        "introspection_keys",
        "admin_keys",
        "notice_signing_secret",
        "gitlab_revocation_token",
        "metrics_key",
    }
)
# Any other field named like a credential is never echoed either.
SECRET_SUFFIXES = ("_key", "_keys", "_token", "_tokens", "_secret", "_secrets", "_password")


def _transport_problem(url: str) -> str | None:
    """Why kombu cannot use a broker at ``url`` (unknown or not installed); None if it can.

    Only the transport is loaded, nothing is connected: a broker that is down is not a
    configuration error (the worker waits for it), a transport that cannot exist is.
    """
    from kombu.connection import Connection

    scheme = url.split("://", 1)[0]
    if scheme in IN_PROCESS_TRANSPORTS:
        return f"{scheme}:// keeps messages inside one process; use amqp:// or redis://"
    try:
        Connection(url).transport  # type: ignore[no-untyped-call]  # noqa: B018 - loading is the check
    except KeyError as error:
        # kombu says "No such transport: amqps2.  Did you mean amqps?"
        _, _, guess = str(error.args[0] if error.args else "").partition("Did you mean ")
        hint = f"; did you mean {guess.strip(' ?')}://?" if guess.strip(" ?") else ""
        return f"unknown broker transport {scheme}://{hint}"
    except ImportError as error:
        return f"the {scheme}:// transport needs a library that is not installed ({error})"
    except Exception as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        userinfo = url.split("://", 1)[1].split("/", 1)[0].rpartition("@")[0]
        password = userinfo.partition(":")[2]
        if password:
            reason = reason.replace(password, "***")
        return f"not a broker URL kombu can use: {reason[:120]}"
    return None


def without_password(url: str) -> str:
    """``url`` with its user information masked, fit for a log line or a banner."""
    if "://" not in url:
        return url
    scheme, _, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        user = authority.rsplit("@", 1)[0].split(":", 1)[0]
        return f"{scheme}://{user}:***@{authority.rsplit('@', 1)[1]}{slash}{path}"
    return url


def _shown(field: str, value: Any) -> str:
    """The offending value, fit for an error line: never a secret, nor a URL's credentials or
    query values (a webhook URL often carries the receiver's secret in either)."""
    from tokenwarden.config.logging import mask_url_secrets

    if (
        field in SECRET_FIELDS
        or field.endswith(SECRET_SUFFIXES)
        or not isinstance(value, str | int)
    ):
        return ""
    return f" (got {mask_url_secrets(str(value))!r})"


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:
        return message  # a rule across settings: its message names the variable to set
    field = str(first["loc"][0])
    # Where inside a structured value (a JSON list of objects) the problem is.
    inner = ".".join(str(part) for part in first["loc"][1:])
    where = f"{inner}: " if inner else ""
    return f"{ENV_PREFIX}{field.upper()}: {where}{message}{_shown(field, first.get('input'))}"


def load_settings(**overrides: Any) -> Settings:
    """Read the environment; raise :class:`ConfigError` with a one-line reason on a bad value."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
