"""The ``tokenwarden`` command line."""

from __future__ import annotations

import sys

import click

from tokenwarden.worker.cli import (
    admin,
    bulk,
    events,
    expiry,
    members,
    notices,
    runtime,
    tokens,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """tokenwarden: keeps the token store and revokes what must stop working."""
    from tokenwarden.config.logging import configure_logging

    configure_logging(level="WARNING")


for module in (admin, members, tokens, bulk, events, notices, expiry, runtime):
    module.register(cli)


def main() -> None:
    """Run the command; a usage error is shown with anything token-shaped masked.

    Click repeats a bad argument in its error (``Invalid value for '--kind': 'sm_pat_…'``), and
    the token may be what was mistyped into that place.
    """
    from tokenwarden.config.settings import keep_files_private
    from tokenwarden.worker.domain.tokens import mask_tokens

    keep_files_private()
    try:
        code = cli.main(standalone_mode=False)
    except click.ClickException as error:
        text = mask_tokens(error.format_message())
        shown = (
            click.UsageError(text, error.ctx)
            if isinstance(error, click.UsageError)
            else click.ClickException(text)
        )
        shown.show()
        sys.exit(error.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
