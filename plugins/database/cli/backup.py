"""``dbkeeper backup ...``: take, list, verify and restore backups.

Progress goes to stderr: a bar per phase on a terminal (bytes copied by the backup API,
compressed, read back), one plain line per finished phase otherwise (logs, pipes, cron).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dbkeeper.cli.context import EXIT_ERROR, CliContext, fails_plainly
from dbkeeper.texts import counted, size

from ..errors import BackupError
from ..offsite.checks import summary as offsite_summary
from ..offsite.uploads import foreign_note
from .db import operations
from .offsite import echo_upload, list_offsite

if TYPE_CHECKING:
    from ..backup.restore import RestoreReport

LABELS = {
    "snapshot": "copying the database",
    "check": "checking integrity",
    "compress": "compressing",
    "read-back": "reading back",
    "checksum": "checksumming",
    "decompress": "decompressing",
    "restore": "swapping the database",
    "download": "downloading the off-site copy",
    "replica": "restoring from the replica",
}
BYTE_PHASES = {"snapshot", "compress", "read-back", "checksum", "decompress", "download"}


def when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


class ProgressReport:
    """The manager's progress callback, drawn for people."""

    def __init__(self, terminal: bool | None = None) -> None:
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self._bar: Any = None
        self._bar_phase: str | None = None
        self._finished: set[str] = set()
        self._last: dict[str, int] = {}
        self._waiting_lines: list[str] = []

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        if phase in self._finished:
            if done >= self._last.get(phase, 0):
                return
            self._finished.discard(phase)  # the same phase again (a restore's safety backup)
        self._last[phase] = done
        complete = total is not None and done >= total
        if self.terminal and phase in BYTE_PHASES and total:
            self._draw(phase, done, total)
        if complete:
            self._finished.add(phase)
            if self._bar_phase == phase:
                self._close_bar()
            elif not self.terminal or phase not in BYTE_PHASES:
                line = f"{LABELS.get(phase, phase)}: done" + (
                    f" ({size(total)})" if phase in BYTE_PHASES and total else ""
                )
                self._say(line)

    def _draw(self, phase: str, done: int, total: int) -> None:
        if self._bar_phase != phase:
            self._close_bar()
            self._bar = click.progressbar(
                length=total, label=LABELS.get(phase, phase).ljust(22), file=sys.stderr, width=30
            )
            self._bar.__enter__()
            self._bar_phase = phase
        self._bar.update(max(0, done - self._bar.pos))

    def _say(self, line: str) -> None:
        if self._bar is not None:
            self._waiting_lines.append(line)  # never in the middle of a bar
        else:
            click.echo(line, err=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar, self._bar_phase = None, None
        for line in self._waiting_lines:
            click.echo(line, err=True)
        self._waiting_lines.clear()

    def close(self) -> None:
        self._close_bar()


def describe(info: Any) -> str:
    rows = counted(info.rows, "row") if info.tables else "rows not counted"
    return (
        f"{info.name}: {size(info.size_bytes)} ({info.compression}), {info.reason}, taken "
        f"{when(info.created_at)}, schema v{info.schema_version}, "
        f"{counted(len(info.bot_tables), 'table')}, {rows}"
    )


@click.group()
def backup() -> None:
    """Take, list, verify and restore backups of the database."""


@backup.command()
@click.option(
    "--full-check/--no-full-check",
    default=True,
    help="After the backup is listed, run SQLite's full integrity_check on it and wait for it "
    "(default); --no-full-check leaves it pending for the running bot.",
)
@click.pass_obj
@fails_plainly
def create(obj: CliContext, full_check: bool) -> None:
    """Take a verified backup now (reason: manual), then copy it off-site ([offsite] url)."""
    ops = operations(obj, existing=True)
    checks = ops.backups.full_checks
    if full_check:
        checks.start()  # takes the raw copy over from the backup: nothing is decompressed
    progress = ProgressReport()
    try:
        try:
            taken = ops.backup("manual", progress=progress)
        finally:
            progress.close()
        info = taken.backup
        click.echo(f"created {describe(info)}")
        click.echo(f"verified in {info.duration_seconds:.2f}s; stored in {info.path.parent}")
        echo_upload(taken.upload)
        if info.full_check == "pending" and checks.accepting:
            click.echo("full integrity check: running…", err=True)
            result = checks.wait_for(info.name)
            info = result or info
        echo_full_check(info)
    finally:
        checks.stop()
    if info.full_check == "failed":
        raise SystemExit(EXIT_ERROR)


def echo_full_check(info: Any) -> None:
    if info.full_check == "passed":
        seconds = info.phases.get("full check")
        took = f" in {seconds:.2f}s" if seconds is not None else ""
        click.echo(f"full integrity check {info.full_check_text}{took}")
    elif info.full_check == "failed":
        click.echo(
            f"full integrity check FAILED: {info.full_check_problem}; the backup is marked "
            "damaged and kept",
            err=True,
        )
    else:
        click.echo(
            "full integrity check pending: the running bot runs it (or `dbkeeper backup "
            f"verify {info.name}`)"
        )


@backup.command("list")
@click.option("--offsite", is_flag=True, help="List the copies off the machine ([offsite] url).")
@click.pass_obj
@fails_plainly
def list_backups(obj: CliContext, offsite: bool) -> None:
    """Complete, verified backups, newest first, and their totals."""
    ops = operations(obj)
    if offsite:
        if ops.offsite is None:
            click.echo("off-site copies are off: set [offsite] url", err=True)
            raise SystemExit(EXIT_ERROR)
        list_offsite(ops.offsite)
        return
    manager = ops.backups
    listing = manager.scan()
    backups = listing.backups
    stats = manager.stats()
    if backups:
        click.echo(
            f"{'name':<36} {'taken (UTC)':<19}  {'reason':<13} {'size':>9}  {'schema':>6}  "
            f"{'full check':<27} rows"
        )
        for info in backups:
            pending = f" (to {info.pending_compression})" if info.pending_compression else ""
            click.echo(
                f"{info.name:<36} {info.created_at:%Y-%m-%d %H:%M:%S}  {info.reason:<13} "
                f"{size(info.size_bytes):>9}  {'v' + str(info.schema_version):>6}  "
                f"{info.full_check_text:<27} {info.rows:,}{pending}"
            )
        assert stats.newest is not None and stats.oldest is not None
        click.echo(
            f"{stats.count} backup{'s' if stats.count != 1 else ''}, "
            f"{size(stats.total_bytes)} in total, in {manager.store.directory}; "
            f"newest {when(stats.newest.created_at)}, oldest {when(stats.oldest.created_at)}"
        )
    else:
        click.echo(f"no backups in {manager.store.directory}")
    if listing.damaged:
        count = len(listing.damaged)
        click.echo(
            f"{count} file{'s' if count != 1 else ''} with a backup's name "
            f"{'are' if count != 1 else 'is'} not counted (`dbkeeper backup verify NAME` "
            "checks one in full):"
        )
        for entry in listing.damaged:
            click.echo(f"{entry.label:<10} {entry.name}: {entry.problem}")
    if stats.last_failure is not None:
        failure = stats.last_failure
        click.echo(f"last failure: {when(failure.at)} ({failure.reason}): {failure.error}")
    if ops.offsite is not None:
        status = ops.offsite.status()
        click.echo(
            f"off-site: {offsite_summary(status, foreign=False)} in {ops.offsite.where} "
            "(`dbkeeper backup list --offsite` lists them)"
        )
        if status.foreign_copies:
            click.echo(f"off-site: {foreign_note(status.foreign_copies)}")


@backup.command()
@click.argument("name", required=False)
@click.pass_obj
@fails_plainly
def verify(obj: CliContext, name: str | None) -> None:
    """Check NAME (default: every backup): checksum, full read, integrity, manifest."""
    manager = operations(obj).backups
    progress = ProgressReport()
    try:
        results = manager.verify(name, progress=progress)
    finally:
        progress.close()
    if not results:
        click.echo(f"no backups to verify in {manager.store.directory}")
        return
    for result in results:
        if result.ok:
            click.echo(f"ok      {result.name} ({result.seconds:.2f}s)")
        else:
            click.echo(f"FAILED  {result.name}: {result.problem}")
    failed = sum(not r.ok for r in results)
    if failed:
        click.echo(f"dbkeeper: error: {failed} of {len(results)} backups failed", err=True)
        raise SystemExit(EXIT_ERROR)


@backup.command()
@click.argument("name", required=False)
@click.option("--latest", is_flag=True, help="The replica's newest state ([replication]).")
@click.option("--at", "at", metavar="TIME", help="The replica's state at TIME (UTC, ISO 8601).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--identity",
    type=click.Path(dir_okay=False, path_type=Path),
    help="age key file (age-keygen) to decrypt an encrypted off-site copy.",
)
@click.pass_obj
@fails_plainly
def restore(
    obj: CliContext,
    name: str | None,
    latest: bool,
    at: str | None,
    yes: bool,
    identity: Path | None,
) -> None:
    """Replace the database with backup NAME, or with the replica's state (--latest, --at
    2026-12-01T10:00:00Z); a safety backup of the current database is taken first.

    When NAME's file is gone from the backup directory, its off-site copy is used.
    """
    if sum((name is not None, latest, at is not None)) != 1:
        raise click.UsageError("give a backup NAME, or --latest, or --at TIME (one of them)")
    if name is None:
        if identity is not None:
            raise click.UsageError("--identity decrypts an off-site copy of a backup NAME")
        restore_replica(obj, parse_moment(at) if at is not None else None, yes)
        return
    ops = operations(obj)
    busy = ops.backups.engine.in_use_elsewhere()  # the reason that holds longest comes first
    if busy is not None:
        ops.close()
        raise BackupError(busy)
    where = ""
    info: Any
    if ops.offsite is not None and ops.gone_locally(name):
        copy = ops.offsite.find(name)  # an unknown name fails before the question
        info = copy.backup
        encrypted = ", encrypted" if copy.encrypted else ""
        where = f" (its off-site copy in {ops.offsite.where}{encrypted})"
    else:
        info = ops.backups.get(name)  # a bad or unknown name fails before the question
    if not yes:
        what = (describe(info) if info else f"{name} (no manifest)") + where
        click.confirm(
            f"Replace the database {ops.database.display_url} with {what}? A safety backup "
            "of the current database is taken first",
            abort=True,
        )
    progress = ProgressReport()
    try:
        report = ops.restore(name, progress=progress, identity=identity)
    finally:
        progress.close()
        ops.close()
    click.echo(f"restored {report.name} (schema v{report.schema_version})")
    if report.adopted and ops.offsite is not None:
        count = report.adopted
        click.echo(
            f"adopted the {count} cop{'y' if count == 1 else 'ies'} in {ops.offsite.where} "
            "not uploaded from here: rotated with this machine's from now on ([backup] keep)"
        )
    echo_aftermath(report)


def echo_aftermath(report: RestoreReport) -> None:
    """What a restore did after the swap: the migration forward, where the old database is."""
    migration = report.reopened
    if migration is not None and migration.steps:
        click.echo(f"migrated it v{migration.from_version} -> v{migration.to_version}")
    if report.safety is not None:
        click.echo(
            f"the previous database is saved as {report.safety.name}; "
            f"`dbkeeper backup restore {report.safety.name}` puts it back"
        )


def parse_moment(text: str) -> datetime:
    """``2026-12-01T10:00:00Z`` (or another UTC offset) as an aware datetime."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not an ISO 8601 time; give it in UTC, e.g. 2026-12-01T10:00:00Z",
            param_hint="--at",
        ) from None
    if moment.tzinfo is None:
        raise click.BadParameter(
            f"{text!r} names no time zone; give it in UTC, e.g. {text.strip()}Z",
            param_hint="--at",
        )
    return moment.astimezone(UTC)


def restore_replica(obj: CliContext, at: datetime | None, yes: bool) -> None:
    """``backup restore --latest`` / ``--at TIME``: through ``Operations.restore_replica``."""
    ops = operations(obj)
    if not yes:
        what = f"its state at {when(at)}" if at is not None else "its newest state"
        click.confirm(
            f"Replace the database {ops.database.display_url} with the replica's {what}? A "
            "safety backup of the current database (if there is one) is taken first",
            abort=True,
        )
    progress = ProgressReport()
    try:
        report, position = ops.restore_replica(at, progress=progress)
    finally:
        progress.close()
        ops.close()
    click.echo(f"restored {position.describe()} (schema v{report.schema_version})")
    echo_aftermath(report)
