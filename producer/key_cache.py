"""Public keys by identifier, fetched from a reporter on demand and cached for the process.

GitHub's secret-scanning keys (producer/github.py) and the Shared Signals transmitters' JWKS
(producer/ssf/) are kept this way. The keys are fetched once and kept; an identifier we do not
know may mean the other side rotated its keys, so it triggers one fetch, but at most one per
``refetch_floor_s`` whatever became of the last (success, failure, an identifier still
unknown): whoever sends made-up identifiers cannot make us hammer the other side, nor make
requests queue up behind a slow fetch.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Final, Generic, TypeVar

import httpx
import structlog

from tokenwarden.producer.intake import Refused, mask

log = structlog.get_logger(__name__)

# A fetch of the keys, from connecting to the last byte; key documents come in well under a second.
FETCH_DEADLINE_S: Final = 10.0
# Key documents are a few kilobytes; anything this large is not one.
MAX_KEYS_BYTES: Final = 1024 * 1024
# Least time between the starts of two fetches, whatever became of the last one: GitHub allows
# an unauthenticated client 60 requests an hour.
REFETCH_FLOOR_S: Final = 60.0

K = TypeVar("K")


class KeysUnavailable(Exception):
    """The keys cannot be had now; ``retry_after`` is in whole seconds."""

    def __init__(self, cause: str, retry_after: int) -> None:
        super().__init__(cause)
        self.cause = cause
        self.retry_after = retry_after


class UnknownKey(Exception):
    """No key has this identifier, even after a fetch (or one was too recent)."""


class FetchFailed(Exception):
    """Why a fetch of the keys gave nothing usable."""


def keys_unavailable(error: KeysUnavailable, whose: str) -> Refused:
    """The 503 for a request whose signature cannot be checked now: send it again later."""
    return Refused(
        503,
        f"{whose} keys cannot be fetched now; nothing was stored",
        headers={"Retry-After": str(error.retry_after)},
        cause=mask(error.cause),
        level="warning",
    )


class PacedKeys(Generic[K]):
    """Keys by identifier, fetched by :meth:`load` on demand (see the module).

    The fetch runs on the event loop, never on the thread pool: a request for an unknown
    identifier that arrives while a fetch is under way, or less than ``refetch_floor_s``
    after the last one began, is answered at once from what the cache holds (its key, else
    :class:`UnknownKey`, or :class:`KeysUnavailable` when no fetch has succeeded or the last
    one failed). So however many such requests arrive, the other side sees at most one fetch
    a minute and no request waits behind another's fetch. A fetch is bounded as a whole, not
    per read: ``deadline_s`` from start to the last byte, ``max_bytes`` a document.
    ``clock`` is monotonic seconds and paces the fetches. ``owner`` names whose keys they are
    in messages ("GitHub's"), ``event`` prefixes the log lines.
    """

    def __init__(
        self,
        *,
        owner: str,
        event: str,
        deadline_s: float = FETCH_DEADLINE_S,
        max_bytes: int = MAX_KEYS_BYTES,
        refetch_floor_s: float = REFETCH_FLOOR_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.owner = owner
        self.event = event
        self.deadline_s = deadline_s
        self.max_bytes = max_bytes
        self.refetch_floor_s = refetch_floor_s
        self.clock = clock
        # Replaced whole on each successful fetch, never changed in place; a key withdrawn
        # disappears with the next fetch. One event loop reads and writes these.
        self._keys: dict[str, K] = {}
        self._attempted_at: float | None = None
        self._failure: str | None = None  # why the last fetch failed; None once one succeeded
        self._fetching = False

    async def load(self) -> dict[str, K]:
        """Fetch the keys (with :meth:`download`); :class:`FetchFailed` when none is usable."""
        raise NotImplementedError

    async def key(self, identifier: str) -> K:
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
        except FetchFailed as failure:
            self._failure = str(failure)
            log.warning(f"{self.event}.keys_unavailable", error=self._failure)
            raise KeysUnavailable(self._failure, self._retry_after(self.clock())) from None
        finally:
            self._fetching = False
        self._keys, self._failure = keys, None
        log.info(f"{self.event}.keys_fetched", keys=len(keys))
        found = keys.get(identifier)
        if found is None:
            raise UnknownKey(identifier)
        return found

    def _not_now(self, now: float) -> Exception:
        """What a request for an unknown identifier is told when no fetch may start now."""
        if self._fetching and not self._keys:
            return KeysUnavailable(
                f"{self.owner} keys are being fetched", math.ceil(self.deadline_s)
            )
        if self._failure is not None:
            return KeysUnavailable(
                f"the last fetch failed: {self._failure}", self._retry_after(now)
            )
        if not self._keys:  # the request that fetched them was cancelled on the way
            return KeysUnavailable(
                f"no fetch of {self.owner} keys has succeeded", self._retry_after(now)
            )
        return UnknownKey()

    def _retry_after(self, now: float) -> int:
        since = 0.0 if self._attempted_at is None else now - self._attempted_at
        return max(math.ceil(self.refetch_floor_s - since), 1)

    async def _fetch(self) -> dict[str, K]:
        try:
            # httpx's timeouts bound each read, not the whole: a server dripping a byte a
            # second would never trip them. The deadline covers every request of a fetch.
            async with asyncio.timeout(self.deadline_s):
                return await self.load()
        except TimeoutError:
            raise FetchFailed(f"no complete answer within {self.deadline_s:g} s") from None
        except httpx.HTTPStatusError as error:
            raise FetchFailed(f"HTTP {error.response.status_code}") from None
        except httpx.HTTPError as error:
            raise FetchFailed(f"{type(error).__name__}: {error}") from None

    async def download(self, url: str) -> bytes:
        """The document at ``url``, read in pieces and given up as soon as it passes
        ``max_bytes``."""
        too_large = FetchFailed(f"the document is larger than {self.max_bytes} bytes")
        # Uncompressed only, and counted as it arrives: a compressed document could expand
        # to any size in memory before a cap on what came over the wire saw it.
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        async with (
            httpx.AsyncClient(timeout=self.deadline_s) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            response.raise_for_status()
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding != "identity":
                raise FetchFailed(f"a {encoding}-encoded answer")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise too_large
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > self.max_bytes:
                    raise too_large
        return bytes(body)
