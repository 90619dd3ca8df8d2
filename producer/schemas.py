"""What the producer API takes and answers, described for its OpenAPI schema."""

from __future__ import annotations

import copy
from typing import Any, Final, Literal

from pydantic import BaseModel, Field

from worker.events import DATA_MODELS

MAX_BATCH: Final = 1000
MAX_BODY_BYTES: Final = 1024 * 1024
EVENT_MEDIA_TYPES: Final = (
    "application/json",
    "application/cloudevents+json",
    "application/cloudevents-batch+json",
)
# Postgres text columns cannot hold NUL, so the API refuses it in every string; the event
# models strip whitespace from each id-like string before checking it is not empty.
_NO_NUL: Final = "^[^\\u0000]*$"
_NOT_BLANK: Final = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$"


class Accepted(BaseModel):
    accepted: list[str] = Field(
        description="Ids of the stored events, each once, in the order first sent."
    )


class Problem(BaseModel):
    detail: str = Field(description="Why the request was refused, in one line.")


class EventProblem(BaseModel):
    index: int = Field(description="Position of the event in the batch (0 for a single event).")
    id: str | None = Field(description="The event's id, when it had a usable one.")
    reason: str


class InvalidEvents(BaseModel):
    detail: str
    errors: list[EventProblem] = Field(
        description="Every invalid event; empty when the body as a whole is unusable."
    )


class Conflicting(BaseModel):
    detail: str
    ids: list[str] = Field(description="Event ids already used for other content.")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    database: str = Field(description='"ok", or why the token store did not answer.')
    broker: str = Field(description='"ok", or why the broker refused a connection.')


def _constrain_strings(schema: dict[str, Any]) -> dict[str, Any]:
    """Give every string in ``schema`` without a pattern the one the API enforces (in place)."""
    if schema.get("type") == "string" and "pattern" not in schema and "format" not in schema:
        schema["pattern"] = _NOT_BLANK if schema.get("minLength") == 1 else _NO_NUL
    for value in schema.values():
        if isinstance(value, dict):
            _constrain_strings(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    _constrain_strings(item)
    return schema


def _present(name: str) -> dict[str, Any]:
    """``name`` is given as a string (a null counts as absent, as it does for the model)."""
    return {"required": [name], "properties": {name: {"type": "string"}}}


def _data_schema(kind: str) -> dict[str, Any]:
    schema = _constrain_strings(copy.deepcopy(DATA_MODELS[kind].model_json_schema()))
    schema.pop("title", None)
    if kind == "token.leak_suspected":
        # Producers may send the leaked text; the API replaces it with its hash before it
        # stores or publishes anything, so the model itself only knows token_hash.
        schema["properties"]["token"] = {
            "type": "string",
            "minLength": 1,
            "pattern": _NO_NUL,
            "description": "The leaked token's text; hashed on arrival, never stored.",
        }
        # Exactly one reference: the text (or its hash), or the token's id.
        schema["oneOf"] = [
            {"anyOf": [_present("token"), _present("token_hash")]},
            _present("token_id"),
        ]
    return schema


def event_schema(kind: str) -> dict[str, Any]:
    """JSON Schema of one structured CloudEvent of type ``kind``."""
    return {
        "title": kind,
        "type": "object",
        "required": ["specversion", "id", "source", "type", "data"],
        "properties": {
            "specversion": {"type": "string", "enum": ["1.0"]},
            "id": {
                "type": "string",
                "minLength": 1,
                "maxLength": 200,
                "pattern": _NOT_BLANK,
                "description": "Idempotency key: resending the same event changes nothing.",
            },
            "source": {"type": "string", "minLength": 1, "maxLength": 500, "pattern": _NO_NUL},
            "type": {"type": "string", "enum": [kind]},
            "time": {
                "type": "string",
                "format": "date-time",
                "description": (
                    "When it happened, with a time zone (RFC 3339); when absent, the time the "
                    "API received the event. Decides the order in which events apply."
                ),
            },
            "data": _data_schema(kind),
        },
        # CloudEvents extension attributes are allowed and kept out of the effect.
        "additionalProperties": True,
    }


def request_body() -> dict[str, Any]:
    """The ``requestBody`` of ``POST /v1/events``: one event or a batch of them."""
    one: dict[str, Any] = {"oneOf": [event_schema(kind) for kind in DATA_MODELS]}
    batch = {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_BATCH}
    example = {
        "specversion": "1.0",
        "id": "evt-7f3c",
        "source": "hr://workday",
        "type": "membership.removed",
        "time": "2026-11-27T19:00:00Z",
        "data": {"org_id": "acme", "user_id": "u-42"},
    }
    return {
        "required": True,
        "description": (
            f"One CloudEvent (structured JSON) or a JSON array of 1 to {MAX_BATCH}; "
            f"at most {MAX_BODY_BYTES} bytes."
        ),
        "content": {
            "application/json": {"schema": {"oneOf": [one, batch]}, "example": example},
            "application/cloudevents+json": {"schema": one, "example": example},
            "application/cloudevents-batch+json": {"schema": batch, "example": [example]},
        },
    }
