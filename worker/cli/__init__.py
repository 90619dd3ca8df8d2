"""The ``tokenwarden`` command line."""

from __future__ import annotations

import click

from worker.cli import admin, events, expiry, members, notices, runtime, tokens


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """tokenwarden: keeps the token store and revokes what must stop working."""
    from config.logging import configure_logging

    configure_logging(level="WARNING")


for module in (admin, members, tokens, events, notices, expiry, runtime):
    module.register(cli)


def main() -> None:
    cli()
