"""A transmitter's signing keys: its JWKS, found directly or through its SSF configuration.

Only asymmetric signing keys with a ``kid`` are kept: a symmetric (``oct``) key published by
mistake would otherwise let whoever read the JWKS sign SETs, and a key without an id cannot be
picked out by a SET's header.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import structlog
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, OKPKey, RSAKey

from tokenwarden.config.settings import SsfTransmitter
from tokenwarden.producer.key_cache import FETCH_DEADLINE_S, FetchFailed, PacedKeys

log = structlog.get_logger(__name__)

PublicKey = RSAKey | ECKey | OKPKey


class TransmitterKeys(PacedKeys[PublicKey]):
    """The signing keys of one transmitter, by ``kid``."""

    def __init__(
        self,
        transmitter: SsfTransmitter,
        *,
        deadline_s: float = FETCH_DEADLINE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            owner=f"{transmitter.issuer}'s", event="ssf", deadline_s=deadline_s, clock=clock
        )
        self.transmitter = transmitter

    async def load(self) -> dict[str, PublicKey]:
        jwks_uri = self.transmitter.jwks_uri or await self._jwks_uri()
        document = _json(await self.download(jwks_uri), "the JWKS")
        try:
            key_set = KeySet.import_key_set(document)  # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError, KeyError) as error:
            raise FetchFailed(f"not a usable JWKS: {type(error).__name__}") from None
        keys: dict[str, PublicKey] = {}
        for key in key_set.keys:
            kid = key.kid
            if not isinstance(key, RSAKey | ECKey | OKPKey) or not kid:
                log.warning("ssf.key_skipped", issuer=self.transmitter.issuer, kid=kid)
                continue
            if key.get("use", "sig") != "sig":
                continue
            keys[kid] = key
        if not keys:
            raise FetchFailed("the JWKS holds no asymmetric signing key with a kid")
        return keys

    async def _jwks_uri(self) -> str:
        assert self.transmitter.configuration_url is not None
        document = _json(
            await self.download(self.transmitter.configuration_url), "the SSF configuration"
        )
        # The configuration must be the issuer's own (SSF 1.0, section 7.2).
        if document.get("issuer") != self.transmitter.issuer:
            raise FetchFailed("the SSF configuration names another issuer")
        uri = document.get("jwks_uri")
        if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
            raise FetchFailed("the SSF configuration has no http(s) jwks_uri")
        return uri


def _json(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except ValueError:
        raise FetchFailed(f"{what} is not JSON") from None
    if not isinstance(document, dict):
        raise FetchFailed(f"{what} is not a JSON object")
    return document
