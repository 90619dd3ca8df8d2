"""The ``tokenwarden`` command line."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from importlib import import_module
from typing import Final, NoReturn

import click

# The modules that register commands (each has ``register(group)``), loaded when needed: a
# short command such as ``token verify`` then imports none of the others' dependencies.
MODULES: Final = ("admin", "members", "tokens", "events", "notices", "expiry", "runtime", "bulk")
# Where the everyday commands live; any other name loads every module, so a command added
# to a module works without an entry here (it only starts a little slower).
HOME_OF: Final = {"token": "tokens", "emit": "events", "events": "events", "member": "members"}
# Commands that do one thing and end: they skip the interpreter's teardown (see leave). The
# ones that serve or supervise (run, api, worker, beat, demo) end the usual way.
SHORT: Final = frozenset({*HOME_OF, "audit", "notices", "revoke", "db"})


class _LazyGroup(click.Group):
    """A group whose commands' modules are imported on first use."""

    def _load(self, modules: tuple[str, ...]) -> None:
        loaded: set[str] = self.__dict__.setdefault("_loaded", set())
        for name in modules:
            if name not in loaded:
                loaded.add(name)
                import_module(f"tokenwarden.worker.cli.{name}").register(self)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        home = HOME_OF.get(cmd_name)
        self._load((home,) if home else MODULES)
        found = super().get_command(ctx, cmd_name)
        if found is None and home:
            self._load(MODULES)
            found = super().get_command(ctx, cmd_name)
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load(MODULES)
        return super().list_commands(ctx)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tokenwarden", prog_name="tokenwarden")
def cli() -> None:
    """tokenwarden: keeps the token store and revokes what must stop working."""
    from tokenwarden.config.logging import configure_logging

    configure_logging(level="WARNING")


def main() -> None:
    """Run the command; a usage error is shown with anything token-shaped masked.

    Click repeats a bad argument in its error (``Invalid value for '--kind': 'sm_pat_…'``), and
    the token may be what was mistyped into that place.
    """
    from tokenwarden.config.redaction import mask_tokens
    from tokenwarden.config.settings import keep_files_private

    keep_files_private()
    try:
        code = cli.main(standalone_mode=False)
    except click.ClickException as error:
        # One line, like every other refusal: "error: Missing option '--org'. (… --help)".
        text = mask_tokens(error.format_message())
        if isinstance(error, click.UsageError) and error.ctx is not None:
            text = f"{text} (see: {error.ctx.command_path} --help)"
        click.echo(f"error: {text}", err=True)
        code = error.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        code = 1
    except SystemExit as leaving:
        code = leaving.code
        if isinstance(code, str):  # sys.exit("why"): the reason on stderr, status 1
            click.echo(code, err=True)
            code = 1
    code = code if isinstance(code, int) else 0
    if len(sys.argv) > 1 and sys.argv[1] in SHORT:
        leave(code)
    sys.exit(code)


def leave(code: int) -> NoReturn:
    """Exit with ``code``, skipping the interpreter's teardown when nothing else is running.

    Tearing down frees every object of every module one by one, which costs a short command
    about a fifth of its wall time (SQLAlchemy's ORM and pydantic's schemas are large). What a
    normal exit does that matters is done here first: the ``atexit`` handlers run (they flush
    the log handlers), the store's connections are closed and the output is flushed. A process
    with another thread still running (a server, a worker) exits the usual way, which waits
    for it.
    """
    if threading.active_count() > 1:
        sys.exit(code)
    atexit._run_exitfuncs()
    db = sys.modules.get("tokenwarden.worker.domain.db")
    if db is not None:
        db.close_engines()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
