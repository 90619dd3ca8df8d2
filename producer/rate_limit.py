"""A request budget per caller address, for the doors that reporters call.

GitLab's Token Revocation API document requires its endpoints to be rate-limited; GitHub's
partner endpoint limits only callers whose requests fail the signature checks (GitHub's own
reports are never held back by a forger's). Each caller address has a bucket of
``burst`` requests that refills at ``per_minute``; an empty bucket answers ``429`` with the
whole seconds until the next request fits in ``Retry-After``.

Behind a reverse proxy every request comes from the proxy's address: run the API with
``--forwarded-allow-ips`` (uvicorn) so that the client's own address is the one counted.
One event loop uses a limiter, so it needs no lock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final

from tokenwarden.producer.intake import Refused

# Callers remembered at once; past it, those whose bucket has refilled are forgotten (a full
# bucket is what a new caller gets anyway), and if none has, the oldest half.
MAX_CALLERS: Final = 10_000


class CallerLimit:
    """``burst`` requests per caller, refilled at ``per_minute`` (see the module)."""

    def __init__(
        self,
        per_minute: float,
        burst: int,
        *,
        what: str,
        clock: Callable[[], float] = time.monotonic,
        max_callers: int = MAX_CALLERS,
    ) -> None:
        self.per_second = per_minute / 60.0
        self.burst = float(burst)
        self.what = what
        self.clock = clock
        self.max_callers = max_callers
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (requests left, at)

    def _left(self, caller: str, now: float) -> float:
        left, at = self._buckets.get(caller, (self.burst, now))
        return min(self.burst, left + (now - at) * self.per_second)

    def check(self, caller: str) -> None:
        """Refuse (429) when ``caller`` has no request left; take nothing from its budget."""
        now = self.clock()
        left = self._left(caller, now)
        if left < 1.0:
            wait = math.ceil((1.0 - left) / self.per_second) if self.per_second > 0 else 60
            raise Refused(
                429,
                f"too many {self.what} from this address; send again later",
                headers={"Retry-After": str(max(wait, 1))},
                level="warning",
            )

    def take(self, caller: str) -> None:
        """Refuse (429) when ``caller`` has no request left, else count one."""
        self.check(caller)
        self.charge(caller)

    def charge(self, caller: str) -> None:
        """Count one request of ``caller``, whatever its budget (a failure found afterwards)."""
        now = self.clock()
        left = self._left(caller, now)
        if caller not in self._buckets and len(self._buckets) >= self.max_callers:
            self._forget(now)
        self._buckets[caller] = (max(left - 1.0, 0.0), now)

    def _forget(self, now: float) -> None:
        kept = {c: b for c, b in self._buckets.items() if self._left(c, now) < self.burst}
        if len(kept) >= self.max_callers:
            kept = dict(list(kept.items())[len(kept) // 2 :])
        self._buckets = kept
