"""SCIM errors (RFC 7644 §3.12): ``application/scim+json`` with ``status`` and ``scimType``."""

from __future__ import annotations

from typing import Any, Final

from fastapi.responses import JSONResponse
from pydantic import ValidationError

MEDIA_TYPE: Final = "application/scim+json"
ERROR_SCHEMA: Final = "urn:ietf:params:scim:api:messages:2.0:Error"


class ScimError(Exception):
    """A refusal: the status, the RFC's ``scimType`` when one fits, and a one-line detail."""

    def __init__(
        self,
        status: int,
        detail: str,
        scim_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.scim_type = scim_type
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {
            "schemas": [ERROR_SCHEMA],
            "status": str(self.status),
            "detail": self.detail,
        }
        if self.scim_type:
            body["scimType"] = self.scim_type
        return JSONResponse(
            body, status_code=self.status, media_type=MEDIA_TYPE, headers=self.headers
        )


def invalid(error: ValidationError | Exception, *, what: str = "request") -> ScimError:
    """A 400 for a body that scim2-models refused, naming the first problem."""
    if isinstance(error, ValidationError):
        first = error.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "__root__")
        kind = str(first.get("type", ""))
        scim_type = kind.removeprefix("scim_") if kind.startswith("scim_") else None
        if kind in ("extra_forbidden", "schema_error", "required_error"):
            scim_type = "invalidValue" if kind != "schema_error" else "invalidSyntax"
        detail = f"{where}: {first['msg']}" if where else str(first["msg"])
        return ScimError(400, f"invalid {what}: {detail}", scim_type or "invalidValue")
    return ScimError(400, f"invalid {what}: {error}", "invalidValue")


def not_found(kind: str, resource_id: str) -> ScimError:
    return ScimError(404, f"no {kind} with id {resource_id[:80]!r}")
