"""What an expiry run reports: the counters common to every run, the sweep's, the reminders'.

The tasks return :meth:`RunStats.as_dict` and the command line prints it, so its keys are
part of what scripts read.

Imports no Celery, kombu, httpx or web framework.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunStats:
    """What a run did; ``ran`` is False when another run held the lock."""

    ran: bool
    notices: int = 0
    transactions: int = 0
    # False when the budget ended the run with work left for the next one.
    finished: bool = True
    duration_s: float = 0.0
    longest_transaction_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ran": self.ran,
            "notices": self.notices,
            "transactions": self.transactions,
            "finished": self.finished,
            "duration_s": round(self.duration_s, 3),
            "longest_transaction_ms": round(self.longest_transaction_ms, 1),
        }


@dataclass
class SweepResult(RunStats):
    swept: int = 0
    deleted: int = 0
    # Finished inbox events and dead letters deleted past the inbox retention.
    inbox_deleted: int = 0
    dead_letters_deleted: int = 0
    # Tokens revoked as idle, and warned of before that (TOKENWARDEN_IDLE_REVOKE_DAYS).
    idle_revoked: int = 0
    idle_warned: int = 0
    # The phase running ("expire", "notify", "retain", "prune"), "done" once the run ended.
    phase: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "swept": self.swept,
            "deleted": self.deleted,
            "inbox_deleted": self.inbox_deleted,
            "dead_letters_deleted": self.dead_letters_deleted,
            "idle_revoked": self.idle_revoked,
            "idle_warned": self.idle_warned,
            **super().as_dict(),
        }


# Called with the sweep's result after each committed transaction.
Progress = Callable[[SweepResult], None]


@dataclass
class ReminderResult(RunStats):
    reminded: int = 0
    by_days: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "reminded": self.reminded,
            "by_days": {str(days): count for days, count in sorted(self.by_days.items())},
            **super().as_dict(),
        }
