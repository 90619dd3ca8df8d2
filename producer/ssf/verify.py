"""A Security Event Token (RFC 8417) checked as RFC 8935 asks, or the error code why not.

In order: the JWS is parsed without trusting it, only to read ``alg``, ``kid`` and ``iss``;
the algorithm must be an asymmetric one we accept (never ``none``, never an HMAC: a public key
used as an HMAC secret is the classic confusion); the issuer must be a configured transmitter;
its key ``kid`` is fetched if unknown (paced); the key's type must be the algorithm's; the
signature is checked by joserfc with that one algorithm; then ``aud``, ``iat``, ``exp``,
``jti`` and ``events``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey, RSAKey

from tokenwarden.producer.key_cache import KeysUnavailable, UnknownKey
from tokenwarden.producer.ssf.keys import PublicKey, TransmitterKeys

# Each accepted algorithm and the key type (and, for EC, the curve) it must be used with.
ALGORITHMS: Final[Mapping[str, tuple[type[PublicKey], str | None]]] = {
    "RS256": (RSAKey, None),
    "RS384": (RSAKey, None),
    "RS512": (RSAKey, None),
    "PS256": (RSAKey, None),
    "PS384": (RSAKey, None),
    "PS512": (RSAKey, None),
    "ES256": (ECKey, "P-256"),
    "ES384": (ECKey, "P-384"),
    "ES512": (ECKey, "P-521"),
    "EdDSA": (OKPKey, None),
}
MAX_JTI: Final = 200  # the inbox's id column


class SetRefused(Exception):
    """RFC 8935 section 2.3: ``err`` is one of its codes, ``description`` for people."""

    def __init__(self, err: str, description: str) -> None:
        super().__init__(description)
        self.err = err
        self.description = description


@dataclass(frozen=True)
class VerifiedSet:
    issuer: str
    jti: str
    issued_at: datetime
    event_type: str
    payload: dict[str, Any]  # the event's own claims
    subject: dict[str, Any] | None  # RFC 9493 subject identifier, top-level sub_id or in payload


async def verify_set(
    token: bytes,
    transmitters: Mapping[str, TransmitterKeys],
    *,
    now: datetime,
    max_skew: timedelta,
) -> VerifiedSet:
    """The SET in ``token``, verified; :class:`SetRefused`, or :class:`KeysUnavailable` when
    the transmitter's keys cannot be had now."""
    try:
        unverified = jws.extract_compact(token.strip())
        header = unverified.protected
        claimed = json.loads(unverified.payload)
    except (JoseError, ValueError, TypeError):
        raise SetRefused("invalid_request", "the body is not a compact JWS") from None
    if not isinstance(claimed, dict):
        raise SetRefused("invalid_request", "the SET's payload is not a JSON object")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise SetRefused("authentication_failed", "the SET is not signed with an accepted alg")
    issuer = claimed.get("iss")
    keys = transmitters.get(issuer) if isinstance(issuer, str) else None
    if keys is None:
        raise SetRefused("invalid_issuer", "the issuer is not a configured transmitter")
    key = await _key(keys, header.get("kid"), alg)
    try:
        verified = jws.deserialize_compact(token.strip(), key, algorithms=[alg])
    except (JoseError, ValueError, TypeError):
        raise SetRefused("authentication_failed", "the signature does not verify") from None
    claims = json.loads(verified.payload)
    _check_audience(claims, keys.transmitter.audience)
    issued_at = _check_times(claims, now=now, max_skew=max_skew)
    return _event(claims, issuer=keys.transmitter.issuer, issued_at=issued_at)


async def _key(keys: TransmitterKeys, kid: Any, alg: str) -> PublicKey:
    if not isinstance(kid, str) or not kid:
        raise SetRefused("invalid_key", "the SET's header names no kid")
    try:
        key = await keys.key(kid)
    except UnknownKey:
        raise SetRefused("invalid_key", "the transmitter has no key with this kid") from None
    except KeysUnavailable:
        raise
    key_type, curve = ALGORITHMS[alg]
    if not isinstance(key, key_type) or (curve is not None and key.get("crv") != curve):
        raise SetRefused("invalid_key", f"the key named by kid is not one for {alg}")
    if key.get("alg") not in (None, alg):
        raise SetRefused("invalid_key", f"the key named by kid is not for {alg}")
    return key


def _check_audience(claims: dict[str, Any], audience: str) -> None:
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if audience not in audiences:
        raise SetRefused("invalid_audience", "the SET is not addressed to this receiver")


def _timestamp(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    try:
        return datetime.fromtimestamp(value, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _check_times(claims: dict[str, Any], *, now: datetime, max_skew: timedelta) -> datetime:
    issued_at = _timestamp(claims.get("iat"))
    if issued_at is None:
        raise SetRefused("invalid_request", "the SET has no valid iat")
    if issued_at > now + max_skew:
        raise SetRefused("invalid_request", "the SET's iat is in the future")
    if "exp" in claims:
        expires = _timestamp(claims["exp"])
        if expires is None or expires < now - max_skew:
            raise SetRefused("invalid_request", "the SET has expired")
    return issued_at


def _event(claims: dict[str, Any], *, issuer: str, issued_at: datetime) -> VerifiedSet:
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti.strip() or len(jti) > MAX_JTI or "\x00" in jti:
        raise SetRefused("invalid_request", f"the SET needs a jti of 1 to {MAX_JTI} characters")
    events = claims.get("events")
    if not isinstance(events, dict) or len(events) != 1:
        raise SetRefused("invalid_request", "the SET must carry exactly one event")
    ((event_type, payload),) = events.items()
    if not isinstance(payload, dict):
        raise SetRefused("invalid_request", "the event's claims must be a JSON object")
    subject = payload.get("subject", claims.get("sub_id"))
    return VerifiedSet(
        issuer=issuer,
        jti=jti,
        issued_at=issued_at,
        event_type=event_type,
        payload=payload,
        subject=subject if isinstance(subject, dict) else None,
    )
