"""``dbkeeper db ...``: schema version, migrating, history, downgrading, adopting; and database
care on demand: planner statistics, free space, retention.

Thin: each verb parses, calls ``Operations``, and prints. Read-only verbs (``status``,
``history``) never create a database; they say there is none yet.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

import click

from dbkeeper.cli.context import CliContext, fails_plainly

from ..operations import Operations
from .offsite import echo_upload

if TYPE_CHECKING:
    from ..care import Care

T = TypeVar("T")


def operations(obj: CliContext, *, existing: bool = False) -> Operations:
    """The plugin's operations for this configuration; ``existing``: a read-only command,
    which needs a database that is already there.

    Every command first removes what interrupted backups and restores left behind (never
    while another process's backup or restore holds the backup directory).
    """
    ops = Operations(obj.settings)
    if existing and not ops.database.exists():
        ops.database.connect(create=False)  # raises DatabaseMissing, with what to do
    ops.clean_leftovers()
    return ops


def interruptibly(ops: Operations, work: Callable[[], T]) -> T:
    """Run ``work`` (a schema change) while SIGINT/SIGTERM interrupt it: a running revision is
    cancelled, rolled back and recorded as interrupted, and ``work`` raises
    ``MigrationInterrupted`` (one line, exit status 1).

    ``work`` runs on a worker thread: Python runs signal handlers on the main thread only, and
    only between bytecodes, so a main thread inside a long SQLite statement would see the
    signal once the statement had finished. The main thread just waits (a wait that signals
    do break into).
    """

    def handler(signum: int, _frame: object) -> None:
        ops.migrator.interrupt(f"received {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="dbkeeper-migrate") as pool:
            return pool.submit(work).result()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@click.group()
def db() -> None:
    """Inspect and change the database schema."""


@db.command()
@click.pass_obj
@fails_plainly
def status(obj: CliContext) -> None:
    """Schema version, pending revisions and migration statistics (creates nothing)."""
    ops = operations(obj)
    exists = ops.database.exists()
    try:
        state = ops.migrator.status() if exists else None
        stats = ops.migrator.stats() if exists else None
    finally:
        ops.close()
    missing = "" if exists else " (no database yet: `dbkeeper db migrate` creates it)"
    click.echo(f"database:  {ops.database.display_url}{missing}")
    click.echo(f"revisions: {ops.revisions.location}")
    pending = list(state.pending) if state else ops.revisions.all()
    current = _named(state.current_version, state.current) if state and state.current else None
    head = ops.revisions.head()
    head_text = _named(head.version, head.id) if head else "none"
    click.echo(f"schema:    {current or 'v0 (empty)'}; head {head_text}")
    click.echo(f"pending:   {len(pending)}")
    width = max((len(revision.id) for revision in pending), default=0)
    for revision in pending:
        described = f" ({revision.description})" if revision.description else ""
        click.echo(f"  - {revision.id:<{width}}{described}")
    if stats is None:
        click.echo("history:   none")
        return
    last = _when(stats.last_applied_at) if stats.last_applied_at else "never"
    click.echo(
        f"history:   {stats.applied} applied, {stats.failed} failed, last applied {last}, "
        f"{stats.total_ms} ms in total"
    )


def _named(version: int, revision: str | None) -> str:
    """``v3 (0003)``; ``v2 (ae1027a6acf)``: the version, and the id it stands for."""
    return f"v{version} ({revision})"


@db.command()
@click.option("--to", "target", default="head", show_default=True, help="Revision to stop at.")
@click.pass_obj
@fails_plainly
def migrate(obj: CliContext, target: str) -> None:
    """Apply pending revisions, one transaction each (SIGINT/SIGTERM roll the running one back)."""
    ops = operations(obj)
    ops.database.connect()
    try:
        report = interruptibly(ops, lambda: ops.migrate(target))
        ops.validate()
    finally:
        ops.close()
    if report.steps:
        click.echo(
            f"migrated v{report.from_version} -> v{report.to_version}: "
            f"{len(report.steps)} revision(s) in {report.total_ms} ms"
        )
    else:
        click.echo(f"nothing to apply; schema is at v{report.to_version}")
    if report.done_elsewhere:
        ids = ", ".join(revision.id for revision in report.done_elsewhere)
        click.echo(f"applied by another instance while this one waited: {ids}")
    if ops.last_safety_backup is not None:
        echo_upload(ops.upload())  # the pre-migration backup, off-site too


@db.command()
@click.option("--limit", default=50, show_default=True, help="Newest attempts to show (0: all).")
@click.pass_obj
@fails_plainly
def history(obj: CliContext, limit: int) -> None:
    """Every attempt to apply, revert or adopt a revision, oldest first."""
    ops = operations(obj, existing=True)
    try:
        attempts = list(reversed(ops.migrator.attempts(limit or None)))
    finally:
        ops.close()
    if not attempts:
        click.echo("no migration history yet")
        return
    width = max(8, *(len(a.version) for a in attempts))
    click.echo(
        f"{'#':>4}  {'version':<{width}} {'direction':<9} {'try':>3}  {'started (UTC)':<19}  "
        f"{'ms':>7}  {'result':<11} {'by':<20} description / error"
    )
    for a in attempts:
        detail = a.error if a.error else a.description
        click.echo(
            f"{a.id:>4}  {a.version:<{width}} {a.direction:<9} {a.attempt:>3}  "
            f"{a.started_at:%Y-%m-%d %H:%M:%S}  {_ms(a.execution_ms):>7}  {a.status:<11} "
            f"{(a.host + ':' + str(a.pid))[:20]:<20} {detail}"
        )


@db.command(context_settings={"ignore_unknown_options": True})
@click.argument("revision")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
@fails_plainly
def downgrade(obj: CliContext, revision: str, yes: bool) -> None:
    """Revert revisions down to REVISION (e.g. 0002, 2, -1, base)."""
    ops = operations(obj, existing=True)
    ops.database.connect(create=False)
    try:
        state = ops.migrator.status()
        if not yes:
            click.confirm(
                f"Revert {ops.database.display_url} from {state.current_name} down to "
                f"{revision}? Reverting can drop tables and columns with their data",
                abort=True,
            )
        report = interruptibly(ops, lambda: ops.downgrade(revision))
    finally:
        ops.close()
    if report.steps:
        click.echo(
            f"reverted v{report.from_version} -> v{report.to_version}: "
            f"{len(report.steps)} revision(s) in {report.total_ms} ms"
        )
    else:
        click.echo(f"nothing to revert; schema is at v{report.to_version}")
    if ops.last_safety_backup is not None:
        name = ops.last_safety_backup.name
        click.echo(f"backup taken before: {name} (`dbkeeper backup restore {name}` undoes this)")
        echo_upload(ops.upload())


@db.command()
@click.argument("revision")
@click.pass_obj
@fails_plainly
def baseline(obj: CliContext, revision: str) -> None:
    """Adopt a database created before dbkeeper: record it as being at REVISION."""
    ops = operations(obj, existing=True)
    try:
        adopted = ops.baseline(revision)
        report = ops.migrator.validate()
    finally:
        ops.close()
    click.echo(f"adopted at {adopted.name} ({adopted.label})")
    for line in report.problems():
        click.echo(f"warning: {line}", err=True)


# -- database care ----------------------------------------------------------------------------


@contextlib.contextmanager
def care(obj: CliContext) -> Iterator[Care]:
    """Database care for an existing database; everything closed afterwards."""
    from ..care import Care

    ops = operations(obj, existing=True)
    ops.database.connect(create=False)
    parts = Care(ops.database, ops.backups, obj.settings)
    try:
        yield parts
    finally:
        parts.dispose()
        ops.close()


@db.command()
@click.pass_obj
@fails_plainly
def optimize(obj: CliContext) -> None:
    """Refresh the query planner's statistics now (ANALYZE)."""
    with care(obj) as parts:
        result = parts.optimize_now()
    click.echo(result.describe())


@db.command()
@click.pass_obj
@fails_plainly
def vacuum(obj: CliContext) -> None:
    """Reclaim free space now (SQLite: free pages back to the file system; PostgreSQL:
    VACUUM (ANALYZE)). Refused while a backup or restore runs."""
    with care(obj) as parts:
        result = parts.vacuum_now()
    click.echo(result.describe())


@db.command()
@click.option("--dry-run", is_flag=True, help="Say what would go; delete nothing.")
@click.pass_obj
@fails_plainly
def cleanup(obj: CliContext, dry_run: bool) -> None:
    """Delete the rows [retention] lets go, in small batches (--dry-run: count them)."""
    with care(obj) as parts:
        if not parts.retention.configured:
            click.echo("no [retention] rules: nothing to clean up (config.example.toml shows one)")
            return
        results = parts.cleanup_now(dry_run=dry_run)
    for result in results:
        click.echo(result.describe())
    if dry_run:
        click.echo("dry run: nothing was deleted")


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def _ms(value: int | None) -> str:
    return "-" if value is None else str(value)
