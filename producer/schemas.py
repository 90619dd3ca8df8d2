"""What the producer API takes and answers, described for its OpenAPI schema."""

from __future__ import annotations

import copy
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from tokenwarden.worker.domain.events import DATA_MODELS

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


class GitHubReport(BaseModel):
    """One match of GitHub's secret scanning partner programme, as GitHub sends it."""

    # GitHub may add fields to its payload; they are not ours to refuse.
    model_config = ConfigDict(extra="ignore")

    token: str = Field(description="The matched text; hashed on arrival, never stored or logged.")
    type: str = Field(description="The secret type GitHub matched, echoed in the feedback.")
    url: str = Field(description="Where GitHub found the match.")
    source: str | None = Field(
        default=None,
        description='Where on GitHub it was found ("content", "commit", "gist", "npm", …).',
    )


class GitHubFeedback(BaseModel):
    token_hash: str = Field(
        pattern="^[0-9a-f]{64}$", description="SHA-256 of the reported text, in hex."
    )
    token_type: str = Field(description="The type GitHub sent for this match.")
    label: Literal["true_positive", "false_positive"] = Field(
        description=(
            "true_positive: a token we issued, whatever its state (revoked, expired or live); "
            "false_positive otherwise. Every well-formed token goes to the worker either way."
        )
    )


class GitLabReport(BaseModel):
    """One token of GitLab's Token Revocation API request."""

    # GitLab sends more than the documented fields (a vulnerability, say); they are ignored.
    model_config = ConfigDict(extra="ignore")

    type: str = Field(description="One of the types GET /v1/revocable_token_types lists.")
    token: str = Field(description="The leaked text; hashed on arrival, never stored or logged.")
    location: str | None = Field(default=None, description="Where GitLab found it.")


class RevocableTokenTypes(BaseModel):
    types: list[str] = Field(description="The type values POST /v1/revoke_tokens acts on.")


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
                    "When it happened: an RFC 3339 string with a time zone (a number is "
                    "refused); when absent, the time the API received the event. Decides the "
                    "order in which events apply, but counts as no later than the event's "
                    "arrival; more than TOKENWARDEN_MAX_CLOCK_SKEW_S (300 s) ahead of the "
                    "API's clock, the event is refused."
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
            f"at most {MAX_BODY_BYTES} bytes. In binary content mode (a ce-specversion "
            "header and a Content-Type not application/cloudevents…), the attributes are "
            "ce-* headers and the body is the event's data, one JSON object."
        ),
        "content": {
            "application/json": {"schema": {"oneOf": [one, batch]}, "example": example},
            "application/cloudevents+json": {"schema": one, "example": example},
            "application/cloudevents-batch+json": {"schema": batch, "example": [example]},
        },
    }


def _array_body(model: type[BaseModel], description: str, example: list[Any]) -> dict[str, Any]:
    """A ``requestBody`` of a JSON array of ``model``, read raw by the route."""
    items = model.model_json_schema()
    items.pop("title", None)
    return {
        "required": True,
        "description": f"{description} At most {MAX_BODY_BYTES} bytes.",
        "content": {
            "application/json": {
                "schema": {"type": "array", "items": items},
                "example": example,
            }
        },
    }


def github_request_body() -> dict[str, Any]:
    """The ``requestBody`` of ``POST /v1/secret-scanning/github``."""
    return _array_body(
        GitHubReport,
        "GitHub's matches, signed over these exact bytes.",
        [
            {
                "token": "sm_pat_...",
                "type": "tokenwarden_personal_access_token",
                "url": "https://github.com/octo/repo/blob/0a1b2c/.env",
                "source": "content",
            }
        ],
    )


def gitlab_request_body() -> dict[str, Any]:
    """The ``requestBody`` of ``POST /v1/revoke_tokens``."""
    return _array_body(
        GitLabReport,
        "Leaked tokens found by GitLab secret detection.",
        [
            {
                "type": "gitleaks_rule_id_tokenwarden_personal_access_token",
                "token": "sm_pat_...",
                "location": "https://gitlab.example/group/repo/-/blob/0a1b2c/.env",
            }
        ],
    )
