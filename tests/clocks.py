"""A stand-in for a module's ``time``, so that tests move time instead of sleeping.

Test helpers only: imports nothing from the product.
"""

from __future__ import annotations

import time


class SteppedTime:
    """``monotonic`` stands still until the test moves it; ``perf_counter`` is the real one.

    Patched over a module's ``time`` (``monkeypatch.setattr(module, "time", SteppedTime())``),
    it makes that module's caches and pauses expire when the test says, not after a sleep.
    """

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    @staticmethod
    def perf_counter() -> float:
        return time.perf_counter()
