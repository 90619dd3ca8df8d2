"""CloudEvents 1.0 (structured JSON) that producers send, and the data each type carries."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from tokenwarden.worker.domain.clock import as_utc
from tokenwarden.worker.domain.tokens import TOKEN_PATTERN, hash_token, mask_encoded_tokens

Id = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)]
HashHex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
# A URL that reaches the worker with a token in it, percent-encoded or not, is used masked.
Url = Annotated[str, StringConstraints(max_length=2000), AfterValidator(mask_encoded_tokens)]

# RFC 3339 date-time (CloudEvents' Timestamp): date, "T", time with seconds, then the offset.
# The offset is optional here only so that its absence gets a reason of its own.
_RFC3339: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?P<offset>[Zz]|[+-]\d{2}:\d{2})?",
    re.ASCII,
)
TIME_EXAMPLE: Final = "2026-11-27T19:00:00Z"
_JSON_KINDS: Final = {
    bool: "true or false",
    int: "a number",
    float: "a number",
    list: "an array",
    dict: "an object",
}


def _rfc3339(value: Any) -> Any:
    """Let only an RFC 3339 string through (or a datetime, as the inbox stores it).

    Pydantic alone also takes a number (read as seconds or milliseconds since 1970), a bare
    date or a number in a string, and a time without seconds: none of them is what CloudEvents
    allows, and a number in the wrong unit is a date decades away.
    """
    if isinstance(value, datetime) or value is None:
        return value
    if not isinstance(value, str):
        kind = _JSON_KINDS.get(type(value), type(value).__name__)
        raise ValueError(f"must be an RFC 3339 string such as {TIME_EXAMPLE}, not {kind}")
    matched = _RFC3339.fullmatch(value)
    if matched is None:
        raise ValueError(f"must be an RFC 3339 date-time such as {TIME_EXAMPLE}")
    if matched["offset"] is None:
        raise ValueError(f"needs a time zone, e.g. {TIME_EXAMPLE}")
    return value


Timestamp = Annotated[datetime, BeforeValidator(_rfc3339)]


class InvalidEvent(ValueError):
    """An event tokenwarden cannot use; ``reason`` says why in one line."""

    def __init__(self, reason: str, event_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.event_id = event_id


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MembershipAdded(_Data):
    org_id: Id
    user_id: Id
    role: Literal["admin", "user"]
    email: Annotated[str, StringConstraints(max_length=320)] | None = None


class MembershipRoleChanged(_Data):
    org_id: Id
    user_id: Id
    role: Literal["admin", "user"]


class MembershipRemoved(_Data):
    org_id: Id
    user_id: Id


class UserDeactivated(_Data):
    user_id: Id


class TokenLeakSuspected(_Data):
    """A leaked token, named by id or by the SHA-256 of its text (never the text itself)."""

    token_hash: HashHex | None = None
    token_id: Id | None = None
    source_url: Url | None = None
    reporter: Id | None = None

    @model_validator(mode="after")
    def _one_reference(self) -> TokenLeakSuspected:
        if (self.token_hash is None) == (self.token_id is None):
            raise ValueError("give exactly one of token (or token_hash) and token_id")
        return self


class TokenRevokeRequested(_Data):
    token_id: Id
    actor: Id | None = None


class TokensBulkRevokeRequested(_Data):
    """Break-glass: revoke every live token of ``org_id`` matching the other fields."""

    org_id: Id
    user_id: Id | None = None
    kind: Literal["personal", "application"] | None = None
    created_before: Timestamp | None = None
    reason: Annotated[str, StringConstraints(max_length=500, strip_whitespace=True)] | None = None
    actor: Id | None = None

    @field_validator("created_before")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        return None if value is None else as_utc(value)


DATA_MODELS: dict[str, type[_Data]] = {
    "membership.added": MembershipAdded,
    "membership.role_changed": MembershipRoleChanged,
    "membership.removed": MembershipRemoved,
    "user.deactivated": UserDeactivated,
    "token.leak_suspected": TokenLeakSuspected,
    "token.revoke_requested": TokenRevokeRequested,
    "tokens.bulk_revoke_requested": TokensBulkRevokeRequested,
}


class CloudEvent(BaseModel):
    """The envelope; ``data`` is checked against the model of ``type``."""

    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: Literal["1.0"]
    id: Id
    source: Annotated[str, StringConstraints(min_length=1, max_length=500)]
    type: str
    # Optional in CloudEvents; an event without one happened when the API received it.
    time: Timestamp | None = None
    data: dict[str, Any]

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in DATA_MODELS:
            raise ValueError(f"unknown event type {value!r}; known: {', '.join(DATA_MODELS)}")
        return value

    @field_validator("time")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"needs a time zone, e.g. {TIME_EXAMPLE}")
        return as_utc(value)

    def payload(self) -> _Data:
        return DATA_MODELS[self.type].model_validate(self.data)


_ENVELOPE = TypeAdapter(CloudEvent)


def _reason(error: ValidationError, prefix: str = "") -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return f"{prefix}{where}: {message}" if where else f"{prefix}{message}"


def hide_leaked_text(raw: dict[str, Any]) -> dict[str, Any]:
    """Replace a leak report's plain ``token`` with its hash before anything stores it."""
    data = raw.get("data")
    if raw.get("type") != "token.leak_suspected" or not isinstance(data, dict):
        return raw
    if "token" not in data:
        return raw
    data = dict(data)
    text = data.pop("token")
    if not isinstance(text, str) or not text:
        event_id = raw.get("id")
        raise InvalidEvent(
            "data.token: must be the leaked token's text",
            event_id if isinstance(event_id, str) else None,
        )
    data["token_hash"] = hash_token(text)
    return {**raw, "data": data}


def parse_event(raw: Any) -> CloudEvent:
    """Validate one structured CloudEvent; raise :class:`InvalidEvent` naming the problem."""
    if not isinstance(raw, dict):
        raise InvalidEvent("an event must be a JSON object")
    event_id = raw.get("id") if isinstance(raw.get("id"), str) else None
    raw = hide_leaked_text(raw)
    try:
        event = _ENVELOPE.validate_python(raw)
    except ValidationError as error:
        raise InvalidEvent(_reason(error), event_id) from None
    except OverflowError:  # a time at the very edge of the calendar, shifted to UTC
        raise InvalidEvent("time: out of range", event_id) from None
    try:
        event.payload()
    except ValidationError as error:
        raise InvalidEvent(_reason(error, "data."), event_id) from None
    return event


def too_far_ahead(time: datetime, *, received: datetime, max_skew: timedelta) -> str | None:
    """Why an event of ``time`` received at ``received`` is refused, if it is: a time further
    ahead of the receiver's clock than ``max_skew`` is a clock or a typo gone wrong."""
    if time - received <= max_skew:
        return None
    return (
        f"time: {time.isoformat()} is more than {max_skew.total_seconds():g} s ahead of the "
        f"receiver's clock ({received.isoformat()}); check the producer's clock"
    )


def ordering_time(time: datetime, *, received: datetime) -> datetime:
    """When an event counts as having happened, for ordering: its ``time``, but never later
    than it was received, so that no event is ordered after its own arrival."""
    return min(time, received)


def canonical(event: CloudEvent) -> dict[str, Any]:
    """The stored form of an event: JSON-safe, UTC time, never a token's text."""
    stored = event.model_dump(mode="json")
    stored["time"] = event.time.isoformat() if event.time else None
    return stored


def digest(event: CloudEvent) -> str:
    """A fingerprint of the content, so a reused id with other content is told apart."""
    body = json.dumps(canonical(event), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def contains_token_text(value: Any) -> bool:
    return bool(TOKEN_PATTERN.search(json.dumps(value, default=str)))
