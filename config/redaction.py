"""What a token looks like to a reader of text, and how to mask one: shared by the log
processors here and by the token format in ``worker.domain.tokens``.

Like the rest of ``config``, it imports nothing of ours.
"""

from __future__ import annotations

import re
from typing import Final

# Anything shaped like a token, checksum or not: enough to mask it wherever it shows up.
TOKEN_PATTERN: Final = re.compile(r"sm_(?:pat|aat)_[0-9A-Za-z]{12,}")
MASK: Final = "***"


def mask_tokens(text: str) -> str:
    """``text`` with anything shaped like a token cut to its prefix: ``sm_pat_***``."""
    return TOKEN_PATTERN.sub(lambda match: match.group()[:7] + MASK, text)


def first_line(error: BaseException, *, typed: bool = False) -> str:
    """The first line of ``error``'s message, or its type's name when it has none; ``typed``
    puts the type's name in front (``OperationalError: connection refused``). Callers mask."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    return f"{type(error).__name__}: {lines[0]}" if typed else lines[0]
