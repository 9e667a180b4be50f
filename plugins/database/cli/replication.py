"""``dbkeeper replication ...``: how the replica of the SQLite database stands.

Thin: it asks the running Litestream (its control socket beside the database, if the bot runs
here) and the replica itself (``litestream ltx``), then prints. Creates no database.
"""

from __future__ import annotations

import click

from dbkeeper.cli.context import EXIT_ERROR, CliContext, fails_plainly
from dbkeeper.texts import size

from ..engines import database_url, sqlite_file
from ..offsite.drill import last_drill
from ..offsite.litestream import ReplicationError, txid_text
from ..offsite.replica import replica_for, when
from ..offsite.replication import read_socket
from ..settings import DatabaseSettings, ReplicationSettings

STATUS_TIMEOUT_SECONDS = 30.0  # a status that waits longer is no status


@click.group()
def replication() -> None:
    """Continuous replication of the SQLite database ([replication], [offsite])."""


@replication.command()
@click.pass_obj
@fails_plainly
def status(obj: CliContext) -> None:
    """Whether Litestream runs, its lag, and what the replica can restore."""
    settings = obj.settings
    url = database_url(settings.section(DatabaseSettings))
    file = sqlite_file(url)
    replica = replica_for(settings, file, url.get_backend_name())
    assert file is not None
    enabled = settings.section(ReplicationSettings).enabled
    click.echo(f"database:   {file}")
    click.echo(f"replica:    {replica.target} (Litestream {replica.litestream.version})")
    state = read_socket(file)
    if state.running:
        lag = f"lag {state.lag_seconds:.1f} s" if state.lag_seconds is not None else "no sync yet"
        last = f", last sync {when(state.last_sync)}" if state.last_sync else ""
        click.echo(f"litestream: running (pid {state.pid}): {lag}{last}")
    elif enabled:
        click.echo("litestream: not running here (the leading bot runs it while it runs)")
    else:
        click.echo("litestream: off ([replication] enabled = false)")
    try:
        window = replica.window(timeout=STATUS_TIMEOUT_SECONDS)
    except ReplicationError as error:
        click.echo(f"dbkeeper: error: {error}", err=True)
        raise SystemExit(EXIT_ERROR) from None
    if window.oldest is None or window.newest is None:
        click.echo("restorable: nothing yet (no file in the replica)")
    else:
        click.echo(f"restorable: from {when(window.oldest)} to {when(window.newest)}")
        click.echo(
            f"files:      {len(window.files)} ({len(window.snapshots)} snapshots), "
            f"{size(window.size_bytes)}, newest txid {txid_text(window.txid)}"
        )
    drill = last_drill(file)
    click.echo(f"drill:      {drill.describe() if drill else 'none yet'}")
