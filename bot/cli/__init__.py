"""The command line: ``dbkeeper ...`` and ``python -m dbkeeper ...`` are the same program.

The host's verbs are ``run`` and ``health``; every plugin adds its own (the database plugin:
``db`` and ``backup``). The verbs are thin: they parse, then call the same plugin methods the
bot and the chat commands use, so the logic lives once, where the tests reach it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from dbkeeper.cli.context import CliContext
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
    if not isinstance(ctx.obj, CliContext) or ctx.obj.config_path != config_path:
        ctx.obj = CliContext(config_path)
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


cli.add_command(run)
cli.add_command(health)


def build(context: CliContext) -> click.Group:
    """The command line of one configuration: the host's verbs and its plugins'."""
    group = click.Group(
        name=cli.name,
        callback=cli.callback,
        params=cli.params,
        help=cli.help,
        invoke_without_command=True,
        context_settings=cli.context_settings,
        commands=dict(cli.commands),
    )
    for plugin in context.plugin_classes():
        for command in plugin.commands():
            if command.name in group.commands:
                continue  # the host's own verbs and the first plugin's win
            group.add_command(command)
    return group


def config_from(args: Sequence[str]) -> str | None:
    """``--config PATH`` (or ``--config=PATH``) before the sub-command, read ahead of click."""
    for index, arg in enumerate(args):
        if arg == "--config" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if not arg.startswith("-"):
            return None  # the sub-command: later options are its own
    return None


def main(args: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    context = CliContext(config_from(argv))
    command = build(context)
    sys.exit(command.main(argv, prog_name="dbkeeper", obj=context, standalone_mode=True))
