"""The command line: ``dbkeeper ...`` and ``python -m dbkeeper ...`` are the same program.

The verbs are thin: they parse, then call the same plugin methods the bot and the chat commands
use, so the logic lives once, where the tests reach it.
"""

from __future__ import annotations

import sys

import click
from dbkeeper.cli.backup import backup
from dbkeeper.cli.context import CliContext
from dbkeeper.cli.db import db
from dbkeeper.cli.health import health
from dbkeeper.cli.run import run


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    default=None,
    help="Configuration file (default: config.toml; built-in defaults when it does not exist).",
)
@click.version_option(package_name="dbkeeper")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """Keep a Telegram bot's database alive: migrations, health, backups, alerts."""
    ctx.obj = CliContext(config_path)
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


cli.add_command(run)
cli.add_command(db)
cli.add_command(backup)
cli.add_command(health)


def main() -> None:
    sys.exit(cli.main(prog_name="dbkeeper", standalone_mode=True))
