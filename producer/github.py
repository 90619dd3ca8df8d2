"""GitHub's secret scanning partner programme: signed leak reports in, feedback out.

GitHub POSTs a JSON array of matches and signs the raw body (ECDSA P-256 over SHA-256); the
``Github-Public-Key-Identifier`` header names the key among those GitHub publishes at
``TOKENWARDEN_GITHUB_KEYS_URL``. The keys are fetched once and kept for the life of the process.
An identifier we do not know may mean that GitHub rotated its keys, so it triggers one fetch,
but at most one per :data:`REFETCH_FLOOR_S` whatever became of the last (success, failure,
an identifier still unknown): whoever sends made-up identifiers cannot make us hammer GitHub,
whose API allows an unauthenticated client 60 requests an hour, nor make requests queue up
behind a slow fetch. The identifier is checked before the body is read, so a request naming
no key of GitHub's costs no more than its headers.

Every well-formed match (prefix, length and checksum: no database is needed to tell) becomes a
``token.leak_suspected`` event whether the token is ours or not, so the work done, and with it
the time taken, does not depend on what the store holds; the worker finds out. The labels of
the answer reveal more, but only to a caller holding GitHub's signing key.

The leak event and JSON-array helpers here serve the GitLab endpoint too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, Final, TypeVar

import httpx
import structlog
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenwarden.producer.intake import Refused
from tokenwarden.producer.schemas import GitHubReport
from tokenwarden.worker.domain.events import CloudEvent, parse_event
from tokenwarden.worker.domain.models import Token
from tokenwarden.worker.domain.tokens import hash_token, kind_of, mask_encoded_tokens, mask_tokens

log = structlog.get_logger(__name__)

IDENTIFIER_HEADER: Final = "Github-Public-Key-Identifier"
SIGNATURE_HEADER: Final = "Github-Public-Key-Signature"
EVENT_SOURCE: Final = "github"
# A fetch of the keys, from connecting to the last byte; GitHub answers in well under a second.
FETCH_DEADLINE_S: Final = 10.0
# GitHub's document is a few kilobytes; anything this large is not it.
MAX_KEYS_BYTES: Final = 1024 * 1024
# Bytes of GitHub request bodies read and not yet verified, all requests together (eight
# bodies of the API's largest size).
UNVERIFIED_LIMIT_BYTES: Final = 8 * 1024 * 1024
BUSY_RETRY_AFTER_S: Final = 5
# Least time between the starts of two fetches, whatever became of the last one: GitHub allows
# an unauthenticated client 60 requests an hour.
REFETCH_FLOOR_S: Final = 60.0
LEAK_TYPE: Final = "token.leak_suspected"
# The widths of TokenLeakSuspected's source_url and reporter.
URL_MAX: Final = 2000
REPORTER_MAX: Final = 200

TRUE_POSITIVE: Final = "true_positive"
FALSE_POSITIVE: Final = "false_positive"

Model = TypeVar("Model", bound=BaseModel)


class KeysUnavailable(Exception):
    """GitHub's public keys cannot be had now; ``retry_after`` is in whole seconds."""

    def __init__(self, cause: str, retry_after: int) -> None:
        super().__init__(cause)
        self.cause = cause
        self.retry_after = retry_after


class UnknownKey(Exception):
    """No key of GitHub's has this identifier, even after a fetch (or one was too recent)."""


class _FetchFailed(Exception):
    """Why a fetch of the keys gave nothing usable."""


class _PublicKey(BaseModel):
    model_config = ConfigDict(extra="ignore")

    key_identifier: str
    key: str
    is_current: bool = False


class _KeysDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")

    public_keys: list[_PublicKey]


class GitHubKeys:
    """GitHub's signing keys by identifier, fetched on demand and cached for the process.

    The fetch runs on the event loop, never on the thread pool: a request for an unknown
    identifier that arrives while a fetch is under way, or less than ``refetch_floor_s``
    after the last one began, is answered at once from what the cache holds (its key, else
    :class:`UnknownKey`, or :class:`KeysUnavailable` when no fetch has succeeded or the last
    one failed). So however many such requests arrive, GitHub sees at most one fetch a
    minute and no request waits behind another's fetch. A fetch is bounded as a whole, not
    per read: ``deadline_s`` from start to the last byte, ``max_bytes`` of document.
    ``clock`` is monotonic seconds and paces the fetches.
    """

    def __init__(
        self,
        url: str,
        *,
        deadline_s: float = FETCH_DEADLINE_S,
        max_bytes: int = MAX_KEYS_BYTES,
        refetch_floor_s: float = REFETCH_FLOOR_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.deadline_s = deadline_s
        self.max_bytes = max_bytes
        self.refetch_floor_s = refetch_floor_s
        self.clock = clock
        # Replaced whole on each successful fetch, never changed in place; a key GitHub
        # withdrew disappears with the next fetch. One event loop reads and writes these.
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._attempted_at: float | None = None
        self._failure: str | None = None  # why the last fetch failed; None once one succeeded
        self._fetching = False

    async def key(self, identifier: str) -> ec.EllipticCurvePublicKey:
        """The key named ``identifier``; :class:`UnknownKey` or :class:`KeysUnavailable`."""
        found = self._keys.get(identifier)
        if found is not None:
            return found
        now = self.clock()
        if self._fetching or (
            self._attempted_at is not None and now - self._attempted_at < self.refetch_floor_s
        ):
            raise self._not_now(now)
        self._attempted_at, self._fetching = now, True
        try:
            keys = await self._fetch()
        except _FetchFailed as failure:
            self._failure = str(failure)
            log.warning("github.keys_unavailable", url=self.url, error=self._failure)
            raise KeysUnavailable(self._failure, self._retry_after(self.clock())) from None
        finally:
            self._fetching = False
        self._keys, self._failure = keys, None
        log.info("github.keys_fetched", url=self.url, keys=len(keys))
        found = keys.get(identifier)
        if found is None:
            raise UnknownKey(identifier)
        return found

    def _not_now(self, now: float) -> Exception:
        """What a request for an unknown identifier is told when no fetch may start now."""
        if self._fetching and not self._keys:
            return KeysUnavailable("GitHub's keys are being fetched", math.ceil(self.deadline_s))
        if self._failure is not None:
            return KeysUnavailable(
                f"the last fetch failed: {self._failure}", self._retry_after(now)
            )
        if not self._keys:  # the request that fetched them was cancelled on the way
            return KeysUnavailable(
                "no fetch of GitHub's keys has succeeded", self._retry_after(now)
            )
        return UnknownKey()

    def _retry_after(self, now: float) -> int:
        since = 0.0 if self._attempted_at is None else now - self._attempted_at
        return max(math.ceil(self.refetch_floor_s - since), 1)

    async def _fetch(self) -> dict[str, ec.EllipticCurvePublicKey]:
        try:
            # httpx's timeouts bound each read, not the whole: a server dripping a byte a
            # second would never trip them. The deadline covers connect, headers and body.
            async with asyncio.timeout(self.deadline_s):
                text = await self._download()
            document = _KeysDocument.model_validate_json(text)
        except TimeoutError:
            raise _FetchFailed(f"no complete answer within {self.deadline_s:g} s") from None
        except httpx.HTTPStatusError as error:
            raise _FetchFailed(f"HTTP {error.response.status_code}") from None
        except httpx.HTTPError as error:
            raise _FetchFailed(f"{type(error).__name__}: {error}") from None
        except ValidationError:
            raise _FetchFailed("not a document of GitHub's public keys") from None
        keys: dict[str, ec.EllipticCurvePublicKey] = {}
        for entry in document.public_keys:
            key = _p256_key(entry.key)
            if key is None:
                log.warning("github.key_skipped", key_identifier=entry.key_identifier)
            else:
                keys[entry.key_identifier] = key
        if not keys:
            raise _FetchFailed("the document holds no usable P-256 key")
        return keys

    async def _download(self) -> bytes:
        """The document, read in pieces and given up as soon as it passes ``max_bytes``."""
        too_large = _FetchFailed(f"the document is larger than {self.max_bytes} bytes")
        # Uncompressed only, and counted as it arrives: a compressed document could expand
        # to any size in memory before a cap on what came over the wire saw it.
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        async with (
            httpx.AsyncClient(timeout=self.deadline_s) as client,
            client.stream("GET", self.url, headers=headers) as response,
        ):
            response.raise_for_status()
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding != "identity":
                raise _FetchFailed(f"a {encoding}-encoded answer")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise too_large
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > self.max_bytes:
                    raise too_large
        return bytes(body)


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
