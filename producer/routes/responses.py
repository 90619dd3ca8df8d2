"""OpenAPI response entries more than one router documents. Holds data only; must not import
``producer.api``, the routers or ``tasks``."""

from __future__ import annotations

from typing import Any, Final

from tokenwarden.producer.schemas import MAX_BODY_BYTES, Problem

BEARER_CHALLENGE: Final[dict[str, Any]] = {
    "WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}
}
RETRY_AFTER: Final[dict[str, Any]] = {
    "Retry-After": {
        "description": "Seconds to wait before sending the same request again.",
        "schema": {"type": "integer"},
    }
}
TOO_LARGE: Final[dict[str, Any]] = {
    "model": Problem,
    "description": f"The body is larger than {MAX_BODY_BYTES} bytes.",
}
