"""The token format: a recognisable prefix, a random body and a checksum.

``sm_pat_`` (personal) or ``sm_aat_`` (application), then 32 random base62 characters, then
the CRC32 of everything before it in 6 base62 characters. Secret scanners recognise the
prefix, and a typo fails the checksum without a database look-up. Only the SHA-256 of a
token is ever stored.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
import zlib
from typing import Final
from urllib.parse import parse_qs, unquote, urlsplit

from tokenwarden.config import redaction
from tokenwarden.worker.domain.kinds import TokenKind

ALPHABET: Final = string.digits + string.ascii_uppercase + string.ascii_lowercase
BODY_LENGTH: Final = 32
CHECKSUM_LENGTH: Final = 6
PREFIXES: Final = {TokenKind.PERSONAL: "sm_pat_", TokenKind.APPLICATION: "sm_aat_"}
KIND_BY_PREFIX: Final = {prefix: kind for kind, prefix in PREFIXES.items()}
TOKEN_LENGTH: Final = 7 + BODY_LENGTH + CHECKSUM_LENGTH
# Anything shaped like one of our tokens, for log redaction and leak scanning (defined in
# config.redaction, which the log processors use too).
TOKEN_PATTERN: Final = redaction.TOKEN_PATTERN
_EXACT: Final = re.compile(rf"sm_(pat|aat)_[0-9A-Za-z]{{{BODY_LENGTH + CHECKSUM_LENGTH}}}")


def _base62(number: int, width: int) -> str:
    digits = []
    while number:
        number, remainder = divmod(number, 62)
        digits.append(ALPHABET[remainder])
    return "".join(reversed(digits)).rjust(width, ALPHABET[0])


def checksum(text: str) -> str:
    return _base62(zlib.crc32(text.encode("ascii")), CHECKSUM_LENGTH)


def generate(kind: TokenKind) -> str:
    """A new token of ``kind``; the caller shows it once and stores only its hash."""
    head = PREFIXES[kind] + "".join(secrets.choice(ALPHABET) for _ in range(BODY_LENGTH))
    return head + checksum(head)


def kind_of(text: str) -> TokenKind | None:
    """The kind of a well-formed token with a valid checksum, else ``None``."""
    if len(text) != TOKEN_LENGTH or not _EXACT.fullmatch(text):
        return None
    head, check = text[:-CHECKSUM_LENGTH], text[-CHECKSUM_LENGTH:]
    if not secrets.compare_digest(checksum(head), check):
        return None
    return KIND_BY_PREFIX[text[:7]]


def hash_token(text: str) -> str:
    # surrogatepass: a reported string that is not even valid UTF-8 still gets a hash.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# ``text`` with anything shaped like a token cut to its prefix: ``sm_pat_***``.
mask_tokens: Final = redaction.mask_tokens

# Percent-decoding passes that may uncover a token: a double-encoded one (``%255F``) takes two.
DECODE_PASSES: Final = 4
# What replaces a text still percent-encoded after DECODE_PASSES: what it hides cannot be told.
WITHHELD: Final = f"(withheld: percent-encoded more than {DECODE_PASSES} times)"


def mask_encoded_tokens(text: str) -> str:
    """``text`` with every token masked, percent-encoded ones too (``sm%5Fpat%5F…``, ``%255F``).

    For text that others wrote and we keep or show, a URL above all: a token in a query string
    is often percent-encoded, whole or in part, once or twice. The text is decoded until it
    stops changing; if that uncovers a token, the decoded text is returned with its tokens
    masked (a mask cannot be put back inside the encoding), else ``text`` is returned as it
    came. Text still encoded after :data:`DECODE_PASSES` passes becomes :data:`WITHHELD`.
    """
    if "%" not in text:
        return mask_tokens(text)
    decoded = text
    for _ in range(DECODE_PASSES):
        step = unquote(decoded)
        if step == decoded:
            break
        decoded = step
    else:
        if unquote(decoded) != decoded:
            return WITHHELD
    # Decoding leaves a plain token as it was (it holds no '%'), so nothing found in the
    # decoded text means nothing in ``text`` either.
    return mask_tokens(decoded) if TOKEN_PATTERN.search(decoded) else text


def hint(text: str) -> str:
    """The last four characters: enough for a person to tell tokens apart, useless to a thief."""
    return text[-4:]


class ExtractError(ValueError):
    """The input does not carry a token in any of the accepted forms."""


HEADER_NAME: Final = "x-auth-token"


def from_header(header: str) -> str:
    """The token of an ``x-auth-token: TOKEN`` header line."""
    name, sep, value = header.partition(":")
    if not sep or name.strip().lower() != HEADER_NAME:
        raise ExtractError(f"expected a header of the form '{HEADER_NAME}: TOKEN'")
    value = value.strip()
    if not value:
        raise ExtractError(f"the {HEADER_NAME} header is empty")
    return value


def from_url(url: str) -> str:
    """The token a service would read from ``url``.

    In order: the ``token`` query parameter; the segment before ``/api/v0/`` (IPFS-style
    APIs); the segment after ``/ext/bc/C/rpc/`` (Avalanche-style RPC); else the last path
    segment.
    """
    try:
        parts = urlsplit(url.strip())
    except ValueError:  # e.g. an unclosed IPv6 host: "http://[abc/x"
        raise ExtractError("not a URL: its host cannot be read") from None
    if not parts.scheme or not parts.netloc:
        raise ExtractError("expected an absolute URL such as https://svc.example/TOKEN")
    query = parse_qs(parts.query).get("token")
    if query:
        return query[0]
    segments = [unquote(s) for s in parts.path.split("/") if s]
    for index in range(1, len(segments) - 1):
        if segments[index] == "api" and segments[index + 1] == "v0":
            return segments[index - 1]
    for index in range(len(segments) - 4):
        if segments[index : index + 4] == ["ext", "bc", "C", "rpc"]:
            return segments[index + 4]
    if not segments:
        raise ExtractError("the URL carries no token: no ?token= and no path segment")
    return segments[-1]
