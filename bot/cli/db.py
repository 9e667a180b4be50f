"""``dbkeeper db ...``: schema version, migrating, history, downgrading, adopting."""

from __future__ import annotations

from datetime import datetime

import click
from dbkeeper.cli.context import CliContext, fails_plainly


@click.group()
def db() -> None:
    """Inspect and change the database schema."""


@db.command()
@click.pass_obj
@fails_plainly
def status(obj: CliContext) -> None:
    """Schema version, pending revisions and migration statistics."""
    plugin = obj.database_plugin()
    plugin.database.connect()
    try:
        state = plugin.migrator.status()
        stats = plugin.migrator.stats()
    finally:
        plugin.close()
    click.echo(f"database:  {plugin.database.display_url}")
    current = f"v{state.current_version} ({state.current})" if state.current else "v0 (empty)"
    click.echo(f"schema:    {current}; head v{state.head_version} ({state.head})")
    click.echo(f"pending:   {len(state.pending)}")
    for revision in state.pending:
        click.echo(f"  - {revision.label}")
    last = _when(stats.last_applied_at) if stats.last_applied_at else "never"
    click.echo(
        f"history:   {stats.applied} applied, {stats.failed} failed, last applied {last}, "
        f"{stats.total_ms} ms in total"
    )


@db.command()
@click.option("--to", "target", default="head", show_default=True, help="Revision to stop at.")
@click.pass_obj
@fails_plainly
def migrate(obj: CliContext, target: str) -> None:
    """Apply pending revisions, one transaction each."""
    plugin = obj.database_plugin()
    plugin.database.connect()
    try:
        report = plugin.migrate(target)
        plugin.validate()
    finally:
        plugin.close()
    if report.steps:
        click.echo(
            f"migrated v{report.from_version} -> v{report.to_version}: "
            f"{len(report.steps)} revision(s) in {report.total_ms} ms"
        )
    else:
        click.echo(f"nothing to apply; schema is at v{report.to_version}")


@db.command()
@click.option("--limit", default=50, show_default=True, help="Newest attempts to show (0: all).")
@click.pass_obj
@fails_plainly
def history(obj: CliContext, limit: int) -> None:
    """Every attempt to apply, revert or adopt a revision, oldest first."""
    plugin = obj.database_plugin()
    plugin.database.connect()
    try:
        attempts = list(reversed(plugin.migrator.attempts(limit or None)))
    finally:
        plugin.close()
    if not attempts:
        click.echo("no migration history yet")
        return
    click.echo(
        f"{'#':>4}  {'version':<8} {'direction':<9} {'try':>3}  {'started (UTC)':<19}  "
        f"{'ms':>7}  {'result':<7} {'by':<20} description / error"
    )
    for a in attempts:
        detail = a.error if a.error else a.description
        click.echo(
            f"{a.id:>4}  {a.version:<8} {a.direction:<9} {a.attempt:>3}  "
            f"{a.started_at:%Y-%m-%d %H:%M:%S}  {_ms(a.execution_ms):>7}  {a.status:<7} "
            f"{(a.host + ':' + str(a.pid))[:20]:<20} {detail}"
        )


@db.command()
@click.argument("revision")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
@fails_plainly
def downgrade(obj: CliContext, revision: str, yes: bool) -> None:
    """Revert revisions down to REVISION (e.g. 0002, 2, -1, base)."""
    plugin = obj.database_plugin()
    plugin.database.connect()
    try:
        state = plugin.migrator.status()
        if not yes:
            click.confirm(
                f"Revert {plugin.database.display_url} from v{state.current_version} down to "
                f"{revision}? Reverting can drop tables and columns with their data",
                abort=True,
            )
        report = plugin.downgrade(revision)
    finally:
        plugin.close()
    if report.steps:
        click.echo(
            f"reverted v{report.from_version} -> v{report.to_version}: "
            f"{len(report.steps)} revision(s) in {report.total_ms} ms"
        )
    else:
        click.echo(f"nothing to revert; schema is at v{report.to_version}")
    if plugin.last_safety_backup is not None:
        name = plugin.last_safety_backup.name
        click.echo(f"backup taken before: {name} (`dbkeeper backup restore {name}` undoes this)")


@db.command()
@click.argument("revision")
@click.pass_obj
@fails_plainly
def baseline(obj: CliContext, revision: str) -> None:
    """Adopt a database created before dbkeeper: record it as being at REVISION."""
    plugin = obj.database_plugin()
    plugin.database.connect()
    try:
        adopted = plugin.migrator.baseline(revision)
        report = plugin.migrator.validate()
    finally:
        plugin.close()
    click.echo(f"adopted at v{adopted.version} ({adopted.label})")
    for line in report.problems():
        click.echo(f"warning: {line}", err=True)


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def _ms(value: int | None) -> str:
    return "-" if value is None else str(value)
