"""GitHub's secret scanning partner programme: signed leak reports in, feedback out.

GitHub POSTs a JSON array of matches and signs the raw body (ECDSA P-256 over SHA-256); the
``Github-Public-Key-Identifier`` header names the key among those GitHub publishes at
``TOKENWARDEN_GITHUB_KEYS_URL``. The keys are cached as producer/key_cache.py describes: one
fetch on an unknown identifier, at most one a minute (GitHub's API allows an unauthenticated
client 60 requests an hour). The identifier is checked before the body is read, so a request naming
no key of GitHub's costs no more than its headers.

Every well-formed match (prefix, length and checksum: no database is needed to tell) becomes a
``token.leak_suspected`` event whether the token is ours or not, so the work done, and with it
the time taken, does not depend on what the store holds; the worker finds out. The labels of
the answer reveal more, but only to a caller holding GitHub's signing key.

The leak event and JSON-array helpers here serve the GitLab endpoint too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, Final, TypeVar

import structlog
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenwarden.producer.intake import Refused
from tokenwarden.producer.key_cache import (
    FETCH_DEADLINE_S,
    MAX_KEYS_BYTES,
    REFETCH_FLOOR_S,
    FetchFailed,
    PacedKeys,
)
from tokenwarden.producer.schemas import GitHubReport
from tokenwarden.worker.domain.events import CloudEvent, parse_event
from tokenwarden.worker.domain.models import Token
from tokenwarden.worker.domain.tokens import hash_token, kind_of, mask_encoded_tokens, mask_tokens

log = structlog.get_logger(__name__)

IDENTIFIER_HEADER: Final = "Github-Public-Key-Identifier"
SIGNATURE_HEADER: Final = "Github-Public-Key-Signature"
EVENT_SOURCE: Final = "github"
# Bytes of GitHub request bodies read and not yet verified, all requests together (eight
# bodies of the API's largest size).
UNVERIFIED_LIMIT_BYTES: Final = 8 * 1024 * 1024
BUSY_RETRY_AFTER_S: Final = 5
LEAK_TYPE: Final = "token.leak_suspected"
# The widths of TokenLeakSuspected's source_url and reporter.
URL_MAX: Final = 2000
REPORTER_MAX: Final = 200

TRUE_POSITIVE: Final = "true_positive"
FALSE_POSITIVE: Final = "false_positive"

Model = TypeVar("Model", bound=BaseModel)


class _PublicKey(BaseModel):
    model_config = ConfigDict(extra="ignore")

    key_identifier: str
    key: str
    is_current: bool = False


class _KeysDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")

    public_keys: list[_PublicKey]


class GitHubKeys(PacedKeys[ec.EllipticCurvePublicKey]):
    """GitHub's signing keys by identifier, fetched on demand and cached for the process
    (producer/key_cache.py says how the fetches are paced and bounded)."""

    def __init__(
        self,
        url: str,
        *,
        deadline_s: float = FETCH_DEADLINE_S,
        max_bytes: int = MAX_KEYS_BYTES,
        refetch_floor_s: float = REFETCH_FLOOR_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            owner="GitHub's",
            event="github",
            deadline_s=deadline_s,
            max_bytes=max_bytes,
            refetch_floor_s=refetch_floor_s,
            clock=clock,
        )
        self.url = url

    async def load(self) -> dict[str, ec.EllipticCurvePublicKey]:
        try:
            document = _KeysDocument.model_validate_json(await self.download(self.url))
        except ValidationError:
            raise FetchFailed("not a document of GitHub's public keys") from None
        keys: dict[str, ec.EllipticCurvePublicKey] = {}
        for entry in document.public_keys:
            key = _p256_key(entry.key)
            if key is None:
                log.warning("github.key_skipped", key_identifier=entry.key_identifier)
            else:
                keys[entry.key_identifier] = key
        if not keys:
            raise FetchFailed("the document holds no usable P-256 key")
        return keys


class UnverifiedBytes:
    """Bytes of bodies held before their signature is checked, all requests together.

    GitHub's key identifiers are public, so anyone can name one and have us read what they
    send until the signature fails to match. Each request may send up to the API's 1 MiB,
    but all of them together hold at most ``limit`` bytes at once; a request that would pass
    it is refused with ``503`` and ``Retry-After``. GitHub's own reports are a few kilobytes
    and never come near it. One event loop updates the count, so it needs no lock.
    """

    def __init__(self, limit: int = UNVERIFIED_LIMIT_BYTES) -> None:
        self.limit = limit
        self.held = 0

    @contextmanager
    def account(self) -> Iterator[Callable[[int], None]]:
        """A ``take`` for :func:`producer.intake.read_capped`, given back on exit."""
        taken = 0

        def take(size: int) -> None:
            nonlocal taken
            if self.held + size > self.limit:
                raise Refused(
                    503,
                    "too many unverified reports are being read at once; send again later",
                    headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
                    level="warning",
                )
            self.held += size
            taken += size

        try:
            yield take
        finally:
            self.held -= taken


def _p256_key(pem: str) -> ec.EllipticCurvePublicKey | None:
    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    return None


def signature_valid(key: ec.EllipticCurvePublicKey, body: bytes, signature: str) -> bool:
    """Whether ``signature`` (base64 of an ASN.1 DER ECDSA signature) signs ``body``."""
    try:
        der = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):  # ValueError: text that is not even ASCII
        return False
    try:
        key.verify(der, body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@cache
def _array_of(model: type[Model]) -> TypeAdapter[list[Model]]:
    # Built once per model: building an adapter costs more than validating a small batch.
    return TypeAdapter(list[model])  # type: ignore[valid-type]


def decode_reports(body: bytes, model: type[Model], *, status: int = 422) -> list[Model]:
    """The body as a JSON array of ``model``, else ``status`` with a reason that never quotes
    the input."""
    try:
        document = json.loads(body, parse_constant=_no_constants)
    except RecursionError:
        raise Refused(status, "the body is nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, bad UTF-8
        message = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8 text"
        raise Refused(status, f"the body is not JSON: {message}") from None
    if not isinstance(document, list):
        raise Refused(status, "the body must be a JSON array of reports")
    try:
        return _array_of(model).validate_python(document)
    except ValidationError as error:
        first = error.errors(include_input=False, include_url=False)[0]
        index, *field = first["loc"]
        where = f"report {index}" + (f": {'.'.join(str(part) for part in field)}" if field else "")
        raise Refused(status, mask_tokens(f"{where}: {first['msg']}")) from None


def storable(text: str, limit: int) -> str:
    """``text`` fit for the inbox: tokens masked, even encoded, no NUL, valid UTF-8, cut short."""
    masked = mask_encoded_tokens(text).replace("\x00", "\ufffd")
    # A lone surrogate survives JSON decoding but neither Postgres nor a JSON response takes it.
    return masked.encode("utf-8", "replace").decode("utf-8")[:limit]


def leak_event(
    *, source: str, token_hash: str, source_url: str | None, reporter: str
) -> CloudEvent:
    """A ``token.leak_suspected`` event whose id follows from its content.

    The same report sent again (a retry, a redelivery) gets the same id and the same content,
    so the inbox takes it once. The id covers everything that varies in ``data``: two reports
    that differ only in, say, the reporter are two events, never one id with two contents.
    """
    url = storable(source_url, URL_MAX) if source_url is not None else None
    who = storable(reporter, REPORTER_MAX)
    fingerprint = json.dumps([token_hash, url, who]).encode()
    event_id = f"leak-{source}-{hashlib.sha256(fingerprint).hexdigest()[:32]}"
    data: dict[str, Any] = {"token_hash": token_hash, "reporter": who}
    if url is not None:
        data["source_url"] = url
    return parse_event(
        {"specversion": "1.0", "id": event_id, "source": source, "type": LEAK_TYPE, "data": data}
    )


def issued_hashes(session: Session, token_hashes: Collection[str]) -> set[str]:
    """Which of ``token_hashes`` name a token we issued, whatever its state, in one query.

    A leak of one of our tokens is a true positive whether or not it still works: GitHub
    resends a report it got no answer to, and by then the first report has had the token
    revoked; calling that resend a false positive would tell the token's owner that a real
    leak was a false alarm. The query is the same whatever the tokens' states, so its time
    says nothing more than its answer, which only GitHub's signed requests receive.
    """
    if not token_hashes:
        return set()
    return set(
        session.scalars(
            select(Token.token_hash).where(Token.token_hash.in_(sorted(set(token_hashes))))
        )
    )


@dataclass(frozen=True)
class Checked:
    """One report, hashed; ``event`` is None when the text cannot be one of our tokens."""

    token_hash: str
    token_type: str
    event: CloudEvent | None


def check_reports(reports: Sequence[GitHubReport]) -> list[Checked]:
    """Hash every report, and make an event of each well-formed one (no database needed)."""
    checked = []
    for report in reports:
        token_hash = hash_token(report.token)
        event = None
        if kind_of(report.token) is not None:
            event = leak_event(
                source=EVENT_SOURCE,
                token_hash=token_hash,
                source_url=report.url,
                reporter=f"github:{report.source}" if report.source else "github",
            )
        checked.append(Checked(token_hash, storable(report.type, REPORTER_MAX), event))
    return checked


def feedback(checked: Sequence[Checked], ours: Collection[str]) -> list[dict[str, str]]:
    """GitHub's feedback format: one label per report, in the order GitHub sent them."""
    return [
        {
            "token_hash": item.token_hash,
            "token_type": item.token_type,
            "label": TRUE_POSITIVE
            if item.event is not None and item.token_hash in ours
            else FALSE_POSITIVE,
        }
        for item in checked
    ]
