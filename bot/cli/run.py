"""``dbkeeper run``: the bot (Telegram mode with a token, local mode without)."""

from __future__ import annotations

import asyncio

import click

from dbkeeper.cli.context import CliContext


@click.command()
@click.pass_obj
def run(obj: CliContext) -> None:
    """Run the bot until SIGINT or SIGTERM (the default command)."""
    from dbkeeper.app import build_application
    from dbkeeper.host import Host
    from dbkeeper.lifecycle import run as run_host

    settings = obj.settings
    host = Host(settings, build_application(settings))
    raise SystemExit(asyncio.run(run_host(host)))
