"""The Python producer client: events to the producer API, with safe retries.

A retry resends the very same bytes, so the same event ids: the inbox stores an id once, so
a request that reached the API before the connection dropped is not applied twice.

A leak report's plain ``data.token`` is replaced by its SHA-256 (``data.token_hash``) before
the event leaves this process.
"""

from __future__ import annotations

import json
import random
import time as clock
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import urlencode

import httpx
import structlog
from pydantic import TypeAdapter, ValidationError

from tokenwarden.config.settings import ConfigError, Settings, get_settings
from tokenwarden.producer.schemas import MAX_BODY_BYTES
from tokenwarden.worker.domain.events import TIME_EXAMPLE, Timestamp
from tokenwarden.worker.domain.tokens import hash_token

log = structlog.get_logger(__name__)

DEFAULT_SOURCE: Final = "tokenwarden://client"
LEAK: Final = "token.leak_suspected"
# Answers that say "not now" rather than "no": the same request may succeed later.
RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})
MAX_DELAY_S: Final = 30.0

Event = Mapping[str, Any]
_TIMESTAMP: Final = TypeAdapter(Timestamp)


class ProducerError(Exception):
    """The API refused the events (``status``), or could not be reached (``status`` None)."""

    def __init__(
        self, status: int | None, detail: str, *, errors: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        super().__init__(detail if status is None else f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.errors = list(errors)


class ProducerUnreachable(ProducerError):
    """No answer from the API after every attempt (connection refused, timeouts)."""

    def __init__(self, api_url: str, reason: str) -> None:
        super().__init__(None, f"cannot reach the producer API at {api_url}: {reason}")
        self.api_url = api_url
        self.reason = reason


def hide_token(event: Event) -> dict[str, Any]:
    """A copy of ``event`` in which a leak's ``data.token`` is replaced by ``token_hash``."""
    copied = dict(event)
    data = copied.get("data")
    if copied.get("type") != LEAK or not isinstance(data, Mapping) or "token" not in data:
        return copied
    data = dict(data)
    text = data.pop("token")
    if not isinstance(text, str) or not text:
        raise ValueError("data.token must be the leaked token's text")
    data["token_hash"] = hash_token(text)
    copied["data"] = data
    return copied


def _timestamp(value: datetime | str) -> str:
    if isinstance(value, str):
        # The API would refuse it anyway; saying so here spares a round trip per retry.
        try:
            _TIMESTAMP.validate_python(value)
        except ValidationError:
            raise ValueError(
                f"time must be an RFC 3339 date-time with a time zone, such as {TIME_EXAMPLE}"
            ) from None
        return value
    if not isinstance(value, datetime):
        raise ValueError(
            f"time must be an RFC 3339 string or an aware datetime, such as {TIME_EXAMPLE}"
        )
    if value.tzinfo is None:
        raise ValueError("time needs a time zone (a naive datetime is ambiguous)")
    return value.isoformat()


def make_event(
    type: str,
    data: Mapping[str, Any],
    *,
    id: str | None = None,
    source: str = DEFAULT_SOURCE,
    time: datetime | str | None = None,
) -> dict[str, Any]:
    """A structured CloudEvent; ``id`` defaults to a new UUID. Without ``time`` the API stamps
    the time it received the event, so the same call sent again (a retry with the same ``id``)
    is the same event, not a conflicting one."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": id or str(uuid.uuid4()),
        "source": source,
        "type": type,
    }
    if time is not None:
        event["time"] = _timestamp(time)
    event["data"] = dict(data)
    return hide_token(event)


@dataclass(frozen=True)
class TokenInfo:
    """What ``POST /v1/introspect`` said about a token (RFC 7662).

    ``active`` false means unusable, for whatever reason: the API never says which.
    """

    active: bool
    token_type: str | None = None  # personal_access_token or application_access_token
    sub: str | None = None  # the user of a PAT, the application of an AAT
    org_id: str | None = None
    role: str | None = None  # a PAT owner's current role
    app_id: str | None = None
    created_by: str | None = None
    exp: datetime | None = None
    iat: datetime | None = None
    jti: str | None = None  # the token's id

    @classmethod
    def from_answer(cls, answer: Any) -> TokenInfo:
        if not isinstance(answer, dict) or answer.get("active") is not True:
            return cls(False)

        def text(name: str) -> str | None:
            value = answer.get(name)
            return None if value is None else str(value)

        def instant(name: str) -> datetime | None:
            value = answer.get(name)
            return datetime.fromtimestamp(value, UTC) if isinstance(value, int) else None

        return cls(
            True,
            token_type=text("token_type"),
            sub=text("sub"),
            org_id=text("org_id"),
            role=text("role"),
            app_id=text("app_id"),
            created_by=text("created_by"),
            exp=instant("exp"),
            iat=instant("iat"),
            jti=text("jti"),
        )


class ProducerClient:
    """Sends events to the producer API; ``with ProducerClient(...) as client:`` closes it.

    With an ``introspection_key`` it also asks whether a token is usable (:meth:`introspect`).
    """

    def __init__(
        self,
        api_url: str,
        key: str,
        *,
        introspection_key: str | None = None,
        timeout: float = 10.0,
        attempts: int = 5,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = clock.sleep,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.api_url = api_url.rstrip("/")
        self.attempts = attempts
        self.backoff = backoff
        self._sleep = sleep
        self._introspection_key = introspection_key
        self._http = httpx.Client(
            base_url=self.api_url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {key}", "Accept": "application/json"},
        )

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **options: Any) -> ProducerClient:
        """A client on ``TOKENWARDEN_API_URL`` with ``TOKENWARDEN_PRODUCER_KEY``."""
        settings = settings or get_settings()
        key = settings.client_producer_key()
        if not key:
            raise ConfigError(
                "no producer key: set TOKENWARDEN_PRODUCER_KEY, or run `tokenwarden run` once "
                f"to generate one in {settings.home}"
            )
        return cls(settings.api_url, key, **options)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def emit(
        self,
        type: str,
        data: Mapping[str, Any],
        *,
        id: str | None = None,
        source: str = DEFAULT_SOURCE,
        time: datetime | str | None = None,
    ) -> str:
        """Build one event and send it; return its id."""
        return self.send(make_event(type, data, id=id, source=source, time=time))[0]

    def send(self, event_or_events: Event | Sequence[Event]) -> list[str]:
        """Send one event or a batch; return the accepted ids or raise :class:`ProducerError`."""
        single = isinstance(event_or_events, Mapping)
        events = [event_or_events] if isinstance(event_or_events, Mapping) else event_or_events
        if not events:
            raise ValueError("nothing to send: the batch is empty")
        # Fix every id now, so each retry carries the same ones.
        prepared = [hide_token(event) for event in events]
        for event in prepared:
            event.setdefault("id", str(uuid.uuid4()))
        body = json.dumps(prepared[0] if single else prepared, separators=(",", ":")).encode()
        if len(body) > MAX_BODY_BYTES:
            raise ProducerError(
                413, f"the body is {len(body)} bytes; the API takes at most {MAX_BODY_BYTES}"
            )
        media_type = (
            "application/cloudevents+json" if single else "application/cloudevents-batch+json"
        )
        answer = self._post(body, media_type)
        accepted = answer.get("accepted") if isinstance(answer, dict) else None
        if not isinstance(accepted, list):
            raise ProducerError(202, "the API answered 202 without the accepted ids")
        return [str(event_id) for event_id in accepted]

    def introspect(self, token: str) -> TokenInfo:
        """Whether ``token`` is usable now, and as whom (``POST /v1/introspect``)."""
        if not self._introspection_key:
            raise ValueError("introspect needs the client's introspection_key")
        answer = self._post(
            urlencode({"token": token}).encode(),
            "application/x-www-form-urlencoded",
            path="/v1/introspect",
            expected=200,
            headers={"Authorization": f"Bearer {self._introspection_key}"},
        )
        return TokenInfo.from_answer(answer)

    def _post(
        self,
        body: bytes,
        media_type: str,
        *,
        path: str = "/v1/events",
        expected: int = 202,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        for attempt in range(1, self.attempts + 1):
            last = attempt == self.attempts
            try:
                response = self._http.post(
                    path, content=body, headers={"Content-Type": media_type, **(headers or {})}
                )
            except httpx.TransportError as error:
                reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
                if last:
                    raise ProducerUnreachable(self.api_url, reason) from error
                self._wait(attempt, reason, None)
                continue
            if response.status_code == expected:
                return _json(response)
            if response.status_code in RETRY_STATUSES and not last:
                self._wait(attempt, f"HTTP {response.status_code}", _retry_after(response))
                continue
            raise _refusal(response)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _wait(self, attempt: int, reason: str, retry_after: float | None) -> None:
        # Exponential backoff with jitter, so producers that failed together do not all
        # return together; a server's Retry-After wins, within reason.
        ceiling = min(MAX_DELAY_S, self.backoff * 2 ** (attempt - 1))
        delay = (
            min(MAX_DELAY_S, retry_after)
            if retry_after is not None
            else ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - not a secret
        )
        log.warning(
            "producer.retrying",
            api_url=self.api_url,
            attempt=attempt,
            reason=reason,
            delay_s=round(delay, 3),
        )
        self._sleep(delay)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _refusal(response: httpx.Response) -> ProducerError:
    answer = _json(response)
    detail = answer.get("detail") if isinstance(answer, dict) else None
    if not isinstance(detail, str):
        detail = response.reason_phrase or "no reason given"
    errors = answer.get("errors") if isinstance(answer, dict) else None
    if isinstance(errors, list) and len(errors) > 1:
        reasons = "; ".join(
            f"#{e.get('index')} ({e.get('id')}): {e.get('reason')}"
            for e in errors
            if isinstance(e, dict)
        )
        detail = f"{detail}: {reasons}"
    return ProducerError(
        response.status_code,
        detail,
        errors=[e for e in errors or [] if isinstance(e, dict)],
    )
