"""Turning a ``POST /v1/events`` request into valid events, or the reason it cannot be.

Nothing here echoes an input value that could be a token: every reason passes through
:func:`mask` first, and a leak's ``data.token`` is hashed before anything else looks at it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Final, Literal, NotRequired, Union
from urllib.parse import unquote

import orjson
from pydantic import ConfigDict, Field, StringConstraints, TypeAdapter
from typing_extensions import TypedDict

from tokenwarden.producer.schemas import EVENT_MEDIA_TYPES, MAX_BATCH, MAX_BODY_BYTES
from tokenwarden.worker.domain.clock import as_utc
from tokenwarden.worker.domain.events import (
    DATA_MODELS,
    CloudEvent,
    Id,
    InvalidEvent,
    Timestamp,
    canonical,
    digest,
    hide_leaked_text,
    parse_event,
    too_far_ahead,
)
from tokenwarden.worker.domain.tokens import TOKEN_PATTERN, mask_encoded_tokens

# Events are small and flat; a cap on nesting keeps every later step (validation, hashing,
# storing) clear of Python's recursion limit.
MAX_DEPTH: Final = 32
# A reason may quote what it refuses (an unknown type); a long input must not make it long.
MAX_REASON: Final = 300


def mask(text: str) -> str:
    """``text`` with anything shaped like a token masked, percent-encoded or not."""
    return mask_encoded_tokens(text)


def _quoted(text: str) -> str:
    """``text`` masked, then cut short, fit to send back and to log."""
    masked = mask(text)
    return masked if len(masked) <= MAX_REASON else masked[: MAX_REASON - 1] + "…"


class Refused(Exception):
    """The request cannot be used; ``status`` and the body fields are what the caller is told."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        cause: str | None = None,
        level: str | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}
        # What went wrong on our side, for the log line only.
        self.cause = cause
        # The log line's level: by default error for a 5xx (our fault), else info. A 503 that
        # sheds load or waits on an outside service is a warning: nothing here is broken.
        self.level = level or ("error" if status >= 500 else "info")
        self.fields = fields

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"detail": self.detail, **self.fields}
        if self.errors is not None:
            body["errors"] = self.errors
        return body


def check_declared_length(content_length: str | None) -> None:
    """Refuse a body announced as too large before reading a byte of it."""
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError:
        return  # the read below enforces the cap anyway
    if declared > MAX_BODY_BYTES:
        raise Refused(413, f"the body is larger than {MAX_BODY_BYTES} bytes")


def check_media_type(content_type: str | None) -> None:
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type not in EVENT_MEDIA_TYPES:
        shown = f" {_quoted(media_type)!r}" if media_type else ""
        raise Refused(
            415,
            f"unsupported content type{shown}: send one of {', '.join(EVENT_MEDIA_TYPES)}",
        )


# CloudEvents HTTP binding, binary content mode: the attributes travel in ``ce-*`` headers,
# ``data`` is the body and ``Content-Type`` its media type (ours is JSON).
CE_PREFIX: Final = "ce-"


def is_binary(content_type: str | None, header_names: Iterable[str]) -> bool:
    """Whether a request is in binary content mode: the binding says a ``Content-Type`` of
    ``application/cloudevents…`` is structured (or batch), anything else with a
    ``ce-specversion`` header is binary. Plain JSON without ``ce-*`` headers stays structured."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type.startswith("application/cloudevents"):
        return False
    return any(name.lower() == "ce-specversion" for name in header_names)


def check_data_media_type(content_type: str | None) -> None:
    """A binary event's data must be JSON: no ``Content-Type`` (JSON is assumed), or a JSON one."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise Refused(
            415,
            f"unsupported data content type {_quoted(media_type)!r}: a binary-mode event's "
            "data must be JSON (application/json)",
        )


def binary_event(headers: Iterable[tuple[str, str]], body: bytes) -> dict[str, Any]:
    """The structured form of a binary-mode event: its ``ce-*`` attributes and its body."""
    event: dict[str, Any] = {}
    for name, value in headers:
        lowered = name.lower()
        if not lowered.startswith(CE_PREFIX):
            continue
        attribute = lowered[len(CE_PREFIX) :]
        if attribute in event:
            raise _unusable(f"the header {_quoted(name)!r} is sent more than once")
        if attribute in {"data", "data_base64", "datacontenttype"}:
            raise _unusable(f"the header {_quoted(name)!r} is not an attribute of binary mode")
        try:
            event[attribute] = unquote(value, errors="strict")
        except UnicodeDecodeError:
            raise _unusable(f"the header {_quoted(name)!r} is not percent-encoded UTF-8") from None
    if body.strip():
        data = decode(body)
        if len(data) != 1 or not body.lstrip().startswith(b"{"):
            raise _unusable("a binary-mode event's body (its data) must be one JSON object")
        event["data"] = data[0]
    return event


def prepare_binary(headers: Iterable[tuple[str, str]], body: bytes) -> list[Prepared]:
    """The one event of a binary-mode request, ready to store; else :class:`Refused`."""
    return prepare_one(binary_event(headers, body))


def prepare_one(raw: dict[str, Any]) -> list[Prepared]:
    """One structured event, checked as :func:`prepare` checks each, ready to store."""
    return [_from_event(event) for event in validate([raw])]


async def read_capped(
    chunks: AsyncIterator[bytes], *, take: Callable[[int], None] | None = None
) -> bytes:
    """The body, refused as soon as it passes the cap whatever Content-Length said.

    ``take`` is told the size of each piece before it is kept, and may refuse it.
    """
    body = bytearray()
    async for chunk in chunks:
        if len(body) + len(chunk) > MAX_BODY_BYTES:
            raise Refused(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        if take is not None:
            take(len(chunk))
        body += chunk
    return bytes(body)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(body: bytes) -> list[Any]:
    """The body's events as a list (one event is a batch of one)."""
    try:
        document = json.loads(body, parse_constant=_no_constants)
    except RecursionError:
        raise _unusable("the body is nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, bad UTF-8, an integer too long
        message = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
        raise _unusable(f"the body is not JSON: {mask(message)}") from None
    if _too_deep(document):
        raise _unusable(f"the body is nested more than {MAX_DEPTH} levels deep")
    if isinstance(document, dict):
        return [document]
    if not isinstance(document, list):
        raise _unusable("the body must be one CloudEvent object or a JSON array of them")
    if not document:
        raise _unusable("the batch is empty: send 1 to 1000 events")
    if len(document) > MAX_BATCH:
        raise _unusable(f"the batch has {len(document)} events; at most {MAX_BATCH} at once")
    return document


def _too_deep(document: Any) -> bool:
    pending: list[tuple[Any, int]] = [(document, 0)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(value, dict):
            pending.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            pending.extend((item, depth + 1) for item in value)
    return False


def _unusable(detail: str) -> Refused:
    return Refused(422, detail, errors=[])


def validate(raws: list[Any]) -> list[CloudEvent]:
    """Every event, or a refusal naming each invalid one (so nothing of the batch is kept)."""
    events: list[CloudEvent] = []
    problems: list[dict[str, Any]] = []
    for index, raw in enumerate(raws):
        try:
            events.append(_one(raw))
        except InvalidEvent as invalid:
            problems.append(
                {"index": index, "id": _shown(invalid.event_id), "reason": _quoted(invalid.reason)}
            )
    if not problems:
        return events
    if len(raws) == 1:
        detail = f"invalid event: {problems[0]['reason']}"
    else:
        detail = f"{len(problems)} of {len(raws)} events are invalid; none was accepted"
    raise Refused(422, detail, errors=problems)


def _shown(event_id: Any) -> str | None:
    """An invalid event's id as it can be echoed back: text, valid Unicode, masked."""
    # hide_leaked_text names the raw id whatever its type; only a string is an id.
    if not isinstance(event_id, str) or _unstorable(event_id):
        return None
    return mask(event_id)


def _one(raw: Any) -> CloudEvent:
    if not isinstance(raw, dict):
        raise InvalidEvent("an event must be a JSON object")
    event_id = raw.get("id") if isinstance(raw.get("id"), str) else None
    if event_id is not None and mask(event_id) != event_id:
        # Masking an id would make different ids equal; the producer must choose another.
        raise InvalidEvent("id: must not contain anything shaped like a token", event_id)
    # Only these reach database columns (or, for data.token, the hash); extension attributes
    # count towards the digest alone.
    problem = _unstorable([raw.get(name) for name in ("id", "source", "type", "data")])
    if problem:
        raise InvalidEvent(problem, event_id)
    # Hash a leak's text first, so that masking the rest can never alter the text we hash.
    cleaned = _masked(hide_leaked_text(raw))
    try:
        return parse_event(cleaned)
    except OverflowError:
        # A time at the very edge of the calendar cannot be moved to UTC.
        raise InvalidEvent("time: out of range", event_id) from None


def _masked(value: Any) -> Any:
    """Token-shaped text outside ``data.token`` (say, in ``source_url``) masked, not stored."""
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {mask(k) if isinstance(k, str) else k: _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return value


def _unstorable(value: Any) -> str | None:
    """Why a string in ``value`` cannot go into the token store, if one cannot."""
    if isinstance(value, dict):
        for key, item in value.items():
            problem = _unstorable(key) or _unstorable(item)
            if problem:
                return problem
        return None
    if isinstance(value, list):
        for item in value:
            problem = _unstorable(item)
            if problem:
                return problem
        return None
    if isinstance(value, str):
        if "\x00" in value:
            return "strings cannot contain NUL characters"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "strings must be valid Unicode (a lone surrogate is not)"
    return None


# --- from a body to rows ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prepared:
    """A valid event in the form the inbox stores: what :func:`worker.domain.inbox.store_events`
    would write for it, fingerprint included."""

    id: str
    type: str
    source: str
    time: datetime | None  # UTC; None: the time the API received it
    data: dict[str, Any]
    digest: str


def prepare(body: bytes) -> list[Prepared]:
    """The body's events, ready to store; else :class:`Refused` with every reason.

    Most bodies are plain events: no escapes, nothing shaped like a token, no extension
    attributes, known types with valid data. Those are checked in one pass of the same
    validators, to the same rows; anything else takes the full path, which finds each reason.
    """
    prepared = _prepare_plain(body)
    if prepared is not None:
        return prepared
    return [_from_event(event) for event in validate(decode(body))]


def refuse_future(events: list[Prepared], *, now: datetime, max_skew: timedelta) -> None:
    """Refuse the request (422, every such event named) when an event's time is more than
    ``max_skew`` ahead of ``now``: one clock set wrong, or a year mistyped, would otherwise
    order that event after everything that really happens until then."""
    problems = [
        {"index": index, "id": _shown(event.id), "reason": reason}
        for index, event in enumerate(events)
        if event.time is not None
        for reason in [too_far_ahead(event.time, received=now, max_skew=max_skew)]
        if reason is not None
    ]
    if not problems:
        return
    if len(events) == 1:
        detail = f"invalid event: {problems[0]['reason']}"
    else:
        detail = f"{len(problems)} of {len(events)} events are invalid; none was accepted"
    raise Refused(422, detail, errors=problems)


def _from_event(event: CloudEvent) -> Prepared:
    return Prepared(
        id=event.id,
        type=event.type,
        source=event.source,
        time=event.time,
        data=canonical(event)["data"],
        digest=digest(event),
    )


# A body without a backslash has no escapes: its strings are its bytes, so no NUL or lone
# surrogate can hide in one, and a token's text in any string shows in the raw bytes.
_TOKEN_BYTES: Final = re.compile(TOKEN_PATTERN.pattern.encode())
_Source = Annotated[str, StringConstraints(min_length=1, max_length=500)]


def _plain_envelope(kind: str) -> Any:
    """One event of type ``kind`` as CloudEvent and its data model take it, extensions refused."""
    envelope = TypedDict(  # type: ignore[misc]  # noqa: UP013 - a name per type
        f"Plain_{kind.replace('.', '_')}",
        {
            "specversion": Literal["1.0"],
            "id": Id,
            "source": _Source,
            "type": Literal[kind],
            # Checked once per distinct value by _PLAIN_TIME: a batch usually shares one.
            "time": NotRequired[Any],
            "data": DATA_MODELS[kind],
        },
    )
    envelope.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]
    return envelope


def _plain_batch() -> TypeAdapter[list[dict[str, Any]]]:
    """A list of plain events, each told apart by its type in one pass of pydantic-core."""
    one: Any = Union.__getitem__(tuple(_plain_envelope(kind) for kind in DATA_MODELS))
    item: Any = Annotated[one, Field(discriminator="type")]
    return TypeAdapter(list[item])


_PLAIN_BATCH: Final = _plain_batch()
_PLAIN_TIME: Final[TypeAdapter[datetime | None]] = TypeAdapter(Timestamp | None)


def _prepare_plain(body: bytes) -> list[Prepared] | None:
    """The plain events of ``body``, or None when any part of it is not plain."""
    if b"\\" in body or _TOKEN_BYTES.search(body):
        return None
    # A '%' may start a percent-encoded token, which the full path masks in its string.
    if b"%" in body and mask(text := body.decode("utf-8", "replace")) != text:
        return None
    try:
        document = orjson.loads(body)
        raws = [document] if isinstance(document, dict) else document
        if not isinstance(raws, list) or not 0 < len(raws) <= MAX_BATCH:
            return None
        checked = _PLAIN_BATCH.validate_python(raws)
        # A batch usually shares one time: each distinct one is checked and written once.
        times: dict[Any, tuple[datetime | None, str | None]] = {}
        prepared = []
        for event, raw in zip(checked, raws, strict=True):
            sent = raw.get("time")
            if sent not in times:
                at = _PLAIN_TIME.validate_python(sent)
                time = as_utc(at) if at is not None else None
                times[sent] = (time, time.isoformat() if time is not None else None)
            time, time_text = times[sent]
            data = raw["data"]
            prepared.append(
                Prepared(
                    id=event["id"],
                    type=event["type"],
                    source=event["source"],
                    time=time,
                    data=data,
                    digest=_digest(event, time_text, data),
                )
            )
    except Exception:  # whatever it is, the full path says what
        return None
    return prepared


def _digest(event: dict[str, Any], time_text: str | None, data: dict[str, Any]) -> str:
    """worker.domain.events.digest of a plain event: the SHA-256 of ``json.dumps(canonical(event),
    sort_keys=True, separators=(",", ":"))``. orjson writes the same text when the data holds
    strings or nulls and the text is ASCII (a plain body has no escapes); otherwise json.dumps,
    which escapes the rest and writes numbers its own way, writes it."""
    canonical = {
        "data": data,
        "id": event["id"],
        "source": event["source"],
        "specversion": "1.0",
        "time": time_text,
        "type": event["type"],
    }
    text = orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)
    if not text.isascii() or not all(v is None or type(v) is str for v in data.values()):
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(text).hexdigest()
