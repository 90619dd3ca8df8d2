"""What every command shares: settings, the store, the --json, --status and --limit options,
output in text or JSON (listings as either), one-line errors.

Imports neither ``tasks`` nor ``producer``: a command that talks to the API imports its client.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeVar

import click

from tokenwarden.config.redaction import first_line
from tokenwarden.config.settings import ENV_PREFIX, ConfigError, Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

F = TypeVar("F", bound=Callable[..., Any])

EXIT_REFUSED = 1  # verify: the token is not usable
EXIT_USAGE = 2  # a request refused: nothing changed


def fail(message: str) -> NoReturn:
    """Print a one-line reason and exit 2; nothing was changed. Never echoes a token."""
    from tokenwarden.config.redaction import mask_tokens

    click.echo(f"error: {mask_tokens(message)}", err=True)
    sys.exit(EXIT_USAGE)


class _NoTokenText(click.types.StringParamType):
    """Text that names something (an id, a name, an email): never a token's text.

    A token typed into such a place would be stored, audited and printed back in plain text.
    """

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from tokenwarden.config.redaction import TOKEN_PATTERN

        text = super().convert(value, param, ctx)
        if TOKEN_PATTERN.search(text):
            self.fail("holds a token; a token is never stored as an id, a name or an email")
        return text


NO_TOKEN: Final = _NoTokenText()


def settings() -> Settings:
    try:
        current = get_settings()
    except ConfigError as error:
        fail(str(error))
    current.keep_home_private()
    return current


def store(current: Settings | None = None) -> Engine:
    """The token store's engine; the embedded SQLite file is created and migrated on first use."""
    from tokenwarden.worker.domain import db  # the ORM: only commands that use the store

    current = current or settings()
    url = current.resolved_database_url
    try:
        engine = db.engine_for(url)
        if current.database_url is None:
            fresh = not (current.home / "tokenwarden.db").exists()
            db.ensure_schema(engine, url)
            if fresh:
                said_new_store(current)
        elif not db.schema_is_current(engine):
            fail("the token store's schema is not up to date: run `tokenwarden db upgrade`")
    except ConfigError as error:
        fail(str(error))
    except Exception as error:
        store_failed(current, "use", error)
    return engine


def said_new_store(current: Settings) -> None:
    """One line on stderr when a command has just made a new embedded token store: a store
    that is not the one meant (another TOKENWARDEN_HOME) shows at once, not as unknown tokens."""
    click.echo(
        f"tokenwarden: created a new token store in {current.home.resolve()} ({ENV_PREFIX}HOME)",
        err=True,
    )


def store_failed(current: Settings, doing: str, error: BaseException) -> NoReturn:
    """Fail with one line naming the setting that points at the token store, and why."""
    from tokenwarden.worker.domain import db

    where = f"{ENV_PREFIX}DATABASE_URL" if current.database_url else f"{ENV_PREFIX}HOME"
    url = db.describe_url(current.resolved_database_url)
    fail(f"{where}: cannot {doing} the token store at {url}: {first_line(error)}")


@contextmanager
def transaction(current: Settings | None = None) -> Iterator[Session]:
    """A session in one transaction; a domain refusal becomes a one-line error, exit 2."""
    # Imported here: what publishes (structlog's processors, the outbox) costs a command that
    # only reads the store start-up time for nothing.
    from tokenwarden.worker.domain import db
    from tokenwarden.worker.domain.errors import Refused
    from tokenwarden.worker.runtime.publishing import published_after_commit

    engine = store(current)
    try:
        # The notices it queued are published once it has committed.
        with published_after_commit(db.transaction(engine)) as session:
            yield session
    except Refused as refused:
        fail(refused.message)


@contextmanager
def reading(current: Settings | None = None) -> Iterator[Session]:
    """A session for a command that only reads: on SQLite it never takes the write lock, so a
    listing neither waits for the worker nor makes it wait; nothing is published."""
    from tokenwarden.worker.domain import db

    engine = store(current)
    with db.read_transaction(engine) as session:
        yield session


def json_option(function: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(function)


def status_option(states: Iterable[StrEnum], rows: str) -> Callable[[F], F]:
    """``--status``: only the ``rows`` (events, notices) in one of ``states``."""
    return click.option(
        "--status",
        type=click.Choice([state.value for state in states]),
        default=None,
        help=f"Only {rows} in this state.",
    )


def limit_option(help: str, default: int | None = None) -> Callable[[F], F]:
    """``--limit``: at most this many rows (a positive number), ``default`` when not given."""
    return click.option(
        "--limit",
        type=click.IntRange(min=1),
        default=default,
        show_default=default is not None,
        help=help,
    )


def _default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, default=_default, sort_keys=False))


def echo_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            click.echo("  ".join("-" * width for width in widths))


def parse_instant(value: str, *, option: str) -> datetime:
    """An ISO 8601 date or date-time; naive values are UTC, a bare date is its midnight UTC."""
    text = value.strip()
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
        parsed = datetime.fromisoformat(text)
    except ValueError:
        fail(f"{option}: not an ISO 8601 date or time: {value!r}")
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def short_time(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%SZ")


def cut(text: str | None, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters for a table cell (--json has it all)."""
    if not text:
        return ""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def record(row: Any, keys: str, **attributes: str) -> dict[str, Any]:
    """``row`` as a JSON record: each of the space-separated ``keys`` with the value of the
    attribute of that name, or of the one ``attributes`` names for it."""
    return {key: getattr(row, attributes.get(key, key)) for key in keys.split()}


def echo_listing(
    records: Sequence[dict[str, Any]],
    columns: dict[str, str | Callable[[dict[str, Any]], Any]],
    *,
    as_json: bool,
) -> None:
    """The ``records`` as JSON, or as a table of ``columns``: each header with the record's key
    it shows or a function of the record; times are shown short."""
    if as_json:
        echo_json(records)
        return
    cells = [
        [
            _shown(record[column] if isinstance(column, str) else column(record))
            for column in columns.values()
        ]
        for record in records
    ]
    echo_table(cells, list(columns))


def _shown(value: Any) -> Any:
    return short_time(value) if isinstance(value, datetime) else value
