"""``tokenwarden sweep`` and ``tokenwarden remind``: the scheduled expiry jobs, run now."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import click

from tokenwarden.config.redaction import first_line
from tokenwarden.worker.cli.common import echo_json, fail, json_option, settings, store
from tokenwarden.worker.domain import clock

if TYPE_CHECKING:
    from tokenwarden.config.settings import Settings
    from tokenwarden.worker.domain.expiry.results import RunStats, SweepResult

R = TypeVar("R", bound="RunStats")


def _publish(notice_ids: Sequence[str]) -> None:
    from tokenwarden.worker.runtime.publishing import publish_new_notices

    publish_new_notices(None, notice_ids)  # None: the worker's app, loaded when needed


def _run(
    job: Callable[[], R], *, name: str, as_json: bool, busy: str, progress: _Progress | None = None
) -> R | None:
    """Run ``job``; print its JSON, or ``busy`` if another run held the lock.

    Returns the result when the caller has its summary to print, else None.
    """
    try:
        result = job()
    except Exception as error:
        fail(f"the {name} stopped: {first_line(error)}")
    finally:
        if progress is not None:
            progress.clear()
    if as_json:
        echo_json(result.as_dict())
        return None
    if not result.ran:
        click.echo(busy)
        return None
    return result


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'s' if count != 1 else ''}"


@click.command()
@click.option(
    "--budget",
    type=click.FloatRange(min=0),
    default=None,
    help="Start no batch after this many seconds; the next run continues (default: no limit).",
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=None,
    help="Rows per transaction (default: TOKENWARDEN_SWEEP_BATCH).",
)
@json_option
def sweep(budget: float | None, batch: int | None, as_json: bool) -> None:
    """Mark tokens past their expiry as expired, audit them and queue "expired" notices.

    Also deletes tokens dead for longer than TOKENWARDEN_RETENTION_DAYS, when that is set,
    and finished inbox events and dead letters older than TOKENWARDEN_INBOX_RETENTION_DAYS.
    Returns at once if another sweep (the scheduler's, say) is running.
    """
    from tokenwarden.worker.domain.expiry.expire import count_due
    from tokenwarden.worker.domain.expiry.sweep import run_sweep

    current = settings()
    engine = store(current)
    now = clock.now()
    progress = None
    if not as_json and sys.stderr.isatty():
        progress = _Progress(count_due(engine, now=now))
    job = partial(
        run_sweep,
        engine,
        now=now,
        batch=batch or current.sweep_batch,
        budget_s=budget,
        retention_days=current.retention_days,
        inbox_retention_days=current.inbox_retention_days,
        idle_days=current.idle_revoke_days,
        publish=_publish,
        on_progress=progress,
    )
    busy = "another sweep is running; it does this work, nothing was done here"
    result = _run(job, name="sweep", as_json=as_json, busy=busy, progress=progress)
    if result is not None:
        _report_sweep(result, current)


def _report_sweep(result: SweepResult, current: Settings) -> None:
    retention = (
        f", deleted {result.deleted:,} past the {current.retention_days}-day retention"
        if current.retention_days is not None
        else ""
    )
    click.echo(
        f"swept {_plural(result.swept, 'expired token')}"
        f", queued {_plural(result.notices, 'notice')}{retention}"
        f" in {result.duration_s:.2f} s (longest transaction "
        f"{result.longest_transaction_ms:.0f} ms)"
    )
    if current.inbox_retention_days is not None:
        click.echo(
            f"deleted {_plural(result.inbox_deleted, 'finished event')}"
            f" and {_plural(result.dead_letters_deleted, 'dead letter')} past the"
            f" {current.inbox_retention_days}-day inbox retention"
        )
    if current.idle_revoke_days is not None:
        click.echo(
            f"revoked {_plural(result.idle_revoked, 'token')} unused for"
            f" {current.idle_revoke_days} days, warned of {_plural(result.idle_warned, 'token')}"
        )
    if not result.finished:
        click.echo("stopped at the --budget; run again (or let the schedule) to continue")


class _Progress:
    """One self-rewriting line on the terminal's standard error."""

    def __init__(self, due: int) -> None:
        self.due = due
        self.started = time.monotonic()
        self.width = 0

    def __call__(self, result: SweepResult) -> None:
        if result.phase == "expire":
            rate = result.swept / max(time.monotonic() - self.started, 1e-6)
            share = f" of {self.due:,} ({result.swept * 100 // self.due}%)" if self.due else ""
            line = f"expiring: {result.swept:,}{share}, {rate:,.0f} tokens/s"
        elif result.phase == "notify":
            line = f"expired {result.swept:,}; notices queued: {result.notices:,}"
        elif result.phase == "retain":
            line = f"expired {result.swept:,}; retention: {result.deleted:,} deleted"
        else:
            line = f"expired {result.swept:,}; inbox retention: {result.inbox_deleted:,} deleted"
        self.width = max(self.width, len(line))
        click.echo("\r" + line.ljust(self.width), err=True, nl=False)

    def clear(self) -> None:
        if self.width:
            click.echo("\r" + " " * self.width + "\r", err=True, nl=False)


@click.command()
@json_option
def remind(as_json: bool) -> None:
    """Warn owners of tokens that entered a TOKENWARDEN_REMINDER_DAYS bucket, once per bucket.

    Returns at once if another reminder run is going on.
    """
    from tokenwarden.worker.domain.expiry.reminders import send_reminders

    current = settings()
    engine = store(current)
    job = partial(
        send_reminders,
        engine,
        now=clock.now(),
        days=current.reminder_days,
        batch=current.sweep_batch,
        publish=_publish,
    )
    busy = "another reminder run is going on; nothing was done here"
    result = _run(job, name="reminders", as_json=as_json, busy=busy)
    if result is None:
        return
    buckets = ", ".join(
        f"{days} days: {count:,}" for days, count in sorted(result.by_days.items()) if count
    )
    click.echo(
        f"reminded {_plural(result.reminded, 'token')}"
        + (f" ({buckets})" if buckets else "")
        + f" in {_plural(result.notices, 'notice')}"
    )


def register(group: click.Group) -> None:
    group.add_command(sweep)
    group.add_command(remind)
