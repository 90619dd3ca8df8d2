"""The one source of "now", so tests move time instead of sleeping."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


_current: Clock = utcnow


def now() -> datetime:
    return _current()


def set_clock(clock: Clock | None) -> None:
    """Replace the clock (``None`` restores the wall clock)."""
    global _current  # noqa: PLW0603 - one process-wide clock is the point
    _current = clock or utcnow


def as_utc(value: datetime) -> datetime:
    """An aware UTC datetime; a naive one is taken to be UTC already."""
    if value.tzinfo is UTC:
        return value  # as the database hands them back, and far the most common
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
