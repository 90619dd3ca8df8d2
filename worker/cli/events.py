"""``tokenwarden emit`` (send an event to the producer API) and ``tokenwarden events``.

Only ``emit`` imports ``producer`` (its client, when run); nothing here imports ``tasks``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from tokenwarden.config.settings import ConfigError
from tokenwarden.worker.cli.common import (
    cut,
    echo_json,
    echo_table,
    fail,
    json_option,
    limit_option,
    parse_instant,
    reading,
    record,
    settings,
    short_time,
    status_option,
)
from tokenwarden.worker.domain.events import DATA_MODELS
from tokenwarden.worker.domain.kinds import EventStatus

if TYPE_CHECKING:
    from tokenwarden.worker.domain.models import InboxEvent

# Table cells are cut here; --json has the full text.
CELL = 60


@click.command(epilog=f"TYPE is one of: {', '.join(DATA_MODELS)}.")
@click.argument("event_type", metavar="TYPE", type=click.Choice(list(DATA_MODELS)))
@click.option(
    "--data",
    "data_text",
    required=True,
    help="The event's data as a JSON object; '-' reads it from standard input.",
)
@click.option("--id", "event_id", default=None, help="Event id (default: a new UUID).")
@click.option("--source", default=None, help="Event source (default: tokenwarden://client).")
@click.option(
    "--time",
    "at",
    default=None,
    help="When it happened, ISO 8601; without a zone it is UTC (default: now).",
)
@json_option
def emit(
    event_type: str,
    data_text: str,
    event_id: str | None,
    source: str | None,
    at: str | None,
    as_json: bool,
) -> None:
    """Send one event to the producer API and print its id once stored.

    For a leak, pass the token as data.token (better through --data - than on the command
    line): only its SHA-256 leaves this process.
    """
    from tokenwarden.producer.client import (
        DEFAULT_SOURCE,
        RETRY_STATUSES,
        ProducerClient,
        ProducerError,
    )

    data = _data(sys.stdin.read() if data_text == "-" else data_text)
    when = parse_instant(at, option="--time").isoformat() if at else None
    current = settings()
    try:
        client = ProducerClient.from_settings(current)
    except ConfigError as error:
        fail(str(error))
    try:
        with client:
            accepted = client.emit(
                event_type, data, id=event_id, source=source or DEFAULT_SOURCE, time=when
            )
    except ValueError as error:
        fail(str(error))
    except ProducerError as error:
        if error.status is None:
            fail(str(error))
        what = "is unavailable" if error.status in RETRY_STATUSES else "refused the event"
        fail(f"the producer API {what} (HTTP {error.status}): {' '.join(error.detail.split())}")
    if as_json:
        echo_json({"accepted": [accepted]})
    else:
        click.echo(accepted)


def _data(text: str) -> dict[str, Any]:
    # The input is never echoed back: a leak report's data holds a token.
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        fail(f"--data: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})")
    except ValueError:
        fail("--data: not valid JSON")
    if not isinstance(data, dict):
        fail('--data: must be a JSON object, e.g. \'{"org_id": "acme", "user_id": "u-42"}\'')
    return data


@click.command()
@status_option(EventStatus, "events")
@limit_option("Rows per list.", default=100)
@json_option
def events(status: str | None, limit: int, as_json: bool) -> None:
    """The event inbox, newest first, then the dead letters with their reasons."""
    from tokenwarden.worker.domain.inbox import list_dead_letters, list_events

    with reading() as session:
        inbox = list_events(session, status=status, limit=limit)
        dead = list_dead_letters(session, limit=limit)
    if as_json:
        echo_json(
            {
                "events": [_event_json(e) for e in inbox],
                "dead_letters": [
                    {"at": d.at, "reason": d.reason, "event_id": d.event_id, "task": d.task}
                    for d in dead
                ],
            }
        )
        return
    _echo_inbox(inbox, status)
    click.echo()
    if dead:
        click.echo("dead letters:")
        echo_table(
            [(short_time(d.at), cut(d.reason, CELL), d.event_id, d.task) for d in dead],
            ["at", "reason", "event", "task"],
        )
    else:
        click.echo("no dead letters")


def _event_json(e: InboxEvent) -> dict[str, Any]:
    return record(
        e, "id type source time status reason result attempts received_at finished_at data"
    )


def _echo_inbox(inbox: Sequence[InboxEvent], status: str | None) -> None:
    if not inbox:
        click.echo("no events" + (f" with status {status}" if status else ""))
        return
    echo_table(
        [
            (
                e.id,
                e.type,
                short_time(e.time),
                e.status,
                cut(e.reason or _compact(e.result), CELL),
                e.attempts,
                short_time(e.received_at),
                short_time(e.finished_at),
            )
            for e in inbox
        ],
        ["id", "type", "time", "status", "reason/result", "attempts", "received", "finished"],
    )


def _compact(value: Any) -> str:
    return "" if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)


def register(group: click.Group) -> None:
    group.add_command(emit)
    group.add_command(events)
