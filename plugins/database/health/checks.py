"""The database plugin's health checks.

==========================  ===============================================================
``database``                a round trip: "Schema v3 | 4 tables | 1,234 records" (records
                            are estimates; see ``probes``). Unhealthy when unreachable.
``database_migrations``     "v3 (0 pending)"; unhealthy with pending or failed revisions.
``database_integrity``      SQLite: the file header on every check, plus ``quick_check`` on
                            every check up to ``[health] quick_check_max_mb`` and in the
                            background every ``integrity_interval_seconds`` above it (the
                            last result is reported). The full ``integrity_check`` runs on
                            each new backup file instead. PostgreSQL: data checksum failures
                            and connection health.
``database_size``           degraded above ``[health] size_warning_mb``.
``database_backups``        "7 backups | 45.23 MB"; degraded when there is none, the newest
                            is older than twice ``[backup] interval_seconds``, the last
                            attempt failed, a backup failed its full integrity check (it
                            is damaged), or one's full check is pending for longer than
                            ``FULL_CHECK_OVERDUE_SECONDS`` and not running.
``disk_space``              degraded when the backup volume has less free space than the
                            next backup needs.
==========================  ===============================================================

Blocking work runs off the event loop on a daemon thread per check, inside the database
service's work gate (a restore waits for checks in progress). Not on the service's pool: a
check stuck on a dead server must neither take a thread from the bot's queries nor delay the
process exit. A check that has not answered by the next run is not started twice: the run
reports it unhealthy ("still waiting") instead. On timeout a SQLite statement is interrupted;
PostgreSQL waits are bounded by the probe's timeouts.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection

from dbkeeper.config import HealthSettings
from dbkeeper.health import Outcome, Status, degraded, healthy, unhealthy
from dbkeeper.plugin import PluginContext
from dbkeeper.texts import MB, counted, duration, megabytes

from ..backup.pipeline import Backups, BackupStats
from ..errors import DatabaseMissing
from ..migrate.history import Attempt, MigrationStats
from ..migrate.migrator import MigrationStatus, Migrator
from ..retry import describe_error
from ..service import DatabaseService
from ..settings import BackupSettings
from ..timeouts import Interrupter, offload
from .probes import Overview, probe_for

log = logging.getLogger("dbkeeper.database.health")
FIRST_BACKUP_GRACE_SECONDS = 300.0
# A SQLite backup's full integrity_check runs right after it is listed (seconds per GiB) or,
# for the shutdown backup, at the next start: pending longer than this, it is not happening.
FULL_CHECK_OVERDUE_SECONDS = 3600.0
T = TypeVar("T")


@dataclass(frozen=True)
class DatabaseStatistics:
    """What ``/dbstats`` shows about the database itself (record counts are estimates)."""

    status: MigrationStatus
    migrations: MigrationStats
    overview: Overview
    size_bytes: float


@dataclass(frozen=True)
class Scan:
    """The last background ``quick_check`` (large SQLite databases)."""

    outcome: Outcome
    finished: float  # monotonic
    seconds: float


class DatabaseHealth:
    """The checks; each asks the leaf parts (service, migrator, backups), never the plugin."""

    def __init__(
        self,
        database: DatabaseService,
        migrator: Migrator,
        backups: Backups,
        settings: HealthSettings,
        backup_settings: BackupSettings,
        *,
        background_scans: bool = True,
    ) -> None:
        self.database = database
        self.migrator = migrator
        self.backups = backups
        self.settings = settings
        self.backup_settings = backup_settings
        self.probe = probe_for(database, settings.check_timeout_seconds)
        self.migration_seconds: dict[str, float] = {}  # revision -> its last upgrade's duration
        self._scan: Scan | None = None
        self._scan_task: asyncio.Task[None] | None = None
        self._scan_interrupter: Interrupter | None = None
        self.background_scans = background_scans  # False: say the scan is left out (the CLI)
        # When the first scheduled backup is due (monotonic), set by the running plugin: until
        # then (and a grace for a large first backup) a database without backups is no problem.
        self.first_backup_due: float | None = None
        # When this instance took over as leader: its first backup is due (monotonic)
        self.takeover_backup_due: float | None = None

    def register(self, context: PluginContext) -> None:
        from .metrics import DatabaseMetrics

        reach = "cannot reach the database"
        context.add_check("database", self.check_database, readiness=True, failing_as=reach)
        context.add_check(
            "database_migrations",
            self.check_migrations,
            readiness=True,
            failing_as="cannot read the schema version",
        )
        context.add_check(
            "database_integrity", self.check_integrity, failing_as="cannot check integrity"
        )
        context.add_check(
            "database_size", self.check_size, failing_as="cannot measure the database"
        )
        context.add_check(
            "database_backups", self.check_backups, failing_as="cannot list the backups"
        )
        context.add_check(
            "disk_space",
            self.check_disk_space,
            failing_as="cannot measure the free space for backups",
        )
        context.on_health_close(self.close)
        context.add_metrics(DatabaseMetrics(self, lambda: context.last_health_report))

    # -- the checks ------------------------------------------------------------------------

    async def check_database(self) -> Outcome:
        try:
            return await self._offload("database", self._database)
        except Exception as error:
            return unhealthy(f"cannot reach the database: {_reason(error)}")

    async def check_migrations(self) -> Outcome:
        try:
            return await self._offload("database_migrations", self._migrations)
        except Exception as error:
            return unhealthy(f"cannot read the schema version: {_reason(error)}")

    async def statistics(self) -> DatabaseStatistics:
        """Schema, migrations, size and records per table, read as cheaply as the checks."""

        def collect(connection: Connection) -> DatabaseStatistics:
            return DatabaseStatistics(
                status=self.migrator.status(connection),
                migrations=self.migrator.history.stats(connection),
                overview=self.probe.overview(connection),
                size_bytes=self.probe.size_bytes(connection)["size_bytes"],
            )

        return await asyncio.wait_for(
            self._offload("statistics", collect), self.settings.check_timeout_seconds
        )

    async def check_integrity(self) -> Outcome:
        try:
            outcome, size = await self._offload("database_integrity", self._integrity)
        except Exception as error:
            return unhealthy(f"cannot check integrity: {_reason(error)}")
        if size is None:  # checked in this run (or nothing to scan)
            return outcome
        return self._background_scan_outcome(outcome, size)

    async def check_size(self) -> Outcome:
        try:
            values = await self._offload("database_size", self.probe.size_bytes)
        except Exception as error:
            return unhealthy(f"cannot measure the database: {_reason(error)}")
        size = values["size_bytes"]
        limit = self.settings.size_warning_mb * MB
        warning = f"{self.settings.size_warning_mb:g} MB"
        if size > limit:
            return degraded(
                f"{megabytes(size)}, above the {warning} warning: archive or delete "
                "old data, VACUUM, or raise [health] size_warning_mb",
                values=values,
            )
        return healthy(f"{megabytes(size)} (warning above {warning})", values=values)

    async def check_backups(self) -> Outcome:
        backups = self.backups
        try:
            stats = await self._in_thread("database_backups", backups.stats)
        except Exception as error:
            return unhealthy(f"cannot list the backups: {_reason(error)}")
        values: dict[str, float] = {
            "count": stats.count,
            "size_bytes": stats.total_bytes,
            "interval_seconds": self.backup_settings.interval_seconds,
        }
        if stats.last_success_at is not None:
            values["last_success_timestamp_seconds"] = stats.last_success_at.timestamp()
        if stats.last_duration_seconds is not None:
            values["last_duration_seconds"] = stats.last_duration_seconds
        message = f"{_plural(stats.count, 'backup')} | {megabytes(stats.total_bytes)}"
        problems = []
        interval = self.backup_settings.interval_seconds
        now = datetime.now(UTC)
        if stats.newest is None:
            due = self.first_backup_due
            if (
                due is None
                or stats.last_failure is not None
                or time.monotonic() > due + FIRST_BACKUP_GRACE_SECONDS
            ):
                problems.append("no backup yet")
            else:  # a fresh install is not a problem until its first backup is overdue
                left = due - time.monotonic()
                message += (
                    f" | no backup yet; the first is due in {duration(left)}"
                    if left > 0
                    else " | no backup yet; the first is being taken"
                )
        else:
            age = (now - stats.newest.created_at).total_seconds()
            due = self.takeover_backup_due
            taking_over = (
                due is not None
                and stats.last_failure is None
                and time.monotonic() < due + FIRST_BACKUP_GRACE_SECONDS
            )
            if age > 2 * interval and taking_over:  # the old leader's: this one backs up next
                assert due is not None
                left = due - time.monotonic()
                message += (
                    f" | the newest is {duration(age)} old; this instance took over, its first "
                    + (f"backup is due in {duration(left)}" if left > 0 else "is being taken")
                )
            elif age > 2 * interval:
                problems.append(
                    f"the newest is {duration(age)} old (one is due every {duration(interval)})"
                )
        values["full_check_pending"] = len(stats.full_check_pending)
        values["full_check_failed"] = len(stats.full_check_failed)
        if stats.newest_fully_checked is not None:
            values["newest_fully_checked_timestamp_seconds"] = (
                stats.newest_fully_checked.created_at.timestamp()
            )
        problems += _full_check_problems(stats, now)
        other_damaged = stats.damaged - len(stats.full_check_failed)
        if other_damaged > 0:
            problems.append(
                f"{_plural(other_damaged, 'damaged file')} not counted (`dbkeeper backup list` "
                "names them)"
            )
        if stats.last_failure is not None:
            ago = duration((now - stats.last_failure.at).total_seconds())
            problems.append(f"the last attempt failed {ago} ago: {stats.last_failure.error}")
        unavailable = backups.engine.unavailable()
        if unavailable is not None:
            problems.append(unavailable)
        if problems:
            return degraded(" | ".join([message, *problems]), values=values)
        return healthy(message, values=values)

    async def check_disk_space(self) -> Outcome:
        backups = self.backups
        directory = Path(self.backup_settings.dir)
        try:
            needed, free = await self._in_thread(
                "disk_space", lambda: (backups.estimate_next_bytes(), _free_bytes(directory))
            )
        except Exception as error:
            return unhealthy(f"cannot measure the free space for backups: {_reason(error)}")
        values = {"free_bytes": free, "needed_bytes": needed}
        message = (
            f"{megabytes(free)} free for backups in {directory} "
            f"(the next one needs about {megabytes(needed)})"
        )
        if free < needed:
            return degraded(f"not enough space: {message}", values=values)
        return healthy(message, values=values)

    # -- what they ask, on a worker thread ----------------------------------------------------

    def _database(self, connection: Connection) -> Outcome:
        started = time.perf_counter()
        connection.exec_driver_sql("SELECT 1").scalar()
        round_trip = time.perf_counter() - started
        current = self.migrator.current(connection)
        if current is None:
            version = 0
        elif current.isdigit():
            version = int(current)
        else:
            version = self.migrator.status(connection).current_version
        overview = self.probe.overview(connection)
        return healthy(
            f"Schema v{version} | {counted(overview.tables, 'table')} | "
            f"{counted(overview.records, 'record')}",
            latency_ms=round_trip * 1000,
            values={
                "round_trip_seconds": round_trip,
                "schema_version": version,
                "tables": overview.tables,
                "records": overview.records,
            },
        )

    def _migrations(self, connection: Connection) -> Outcome:
        status = self.migrator.status(connection)
        attempts = self.migrator.history.attempts(connection, limit=200)  # newest first
        latest: dict[str, Attempt] = {}
        seconds: dict[str, float] = {}
        for attempt in attempts:
            latest.setdefault(attempt.version, attempt)
            if attempt.direction == "upgrade" and attempt.success and attempt.execution_ms:
                seconds.setdefault(attempt.version, attempt.execution_ms / 1000)
        self.migration_seconds = seconds
        pending = [revision.id for revision in status.pending]
        failed = [
            found
            for version in pending
            if (found := latest.get(version)) is not None and found.success is False
        ]
        values = {
            "schema_version": status.current_version,
            "head_version": status.head_version,
            "pending": len(pending),
            "failed": len(failed),
        }
        message = f"v{status.current_version} ({len(pending)} pending)"
        if not pending:
            return healthy(message, values=values)
        message += f": {', '.join(pending)} (head v{status.head_version})"
        for attempt in failed:
            message += f"; {attempt.version} failed: {attempt.error}"
        return unhealthy(message, values=values)

    def _integrity(self, connection: Connection) -> tuple[Outcome, float | None]:
        """The outcome now, and the size when the page scan is left to the background."""
        if not self.probe.scans_pages:
            return self.probe.integrity(connection, scan=False), None
        size = self.probe.size_bytes(connection)["size_bytes"]
        inline = size <= self.settings.quick_check_max_mb * MB
        outcome = self.probe.integrity(connection, scan=inline)
        return outcome, None if inline or outcome.status is Status.UNHEALTHY else size

    # -- the background quick_check of a large SQLite database ----------------------------------

    def _background_scan_outcome(self, header: Outcome, size: float) -> Outcome:
        scan = self._scan
        interval = self.settings.integrity_interval_seconds
        due = scan is None or time.monotonic() - scan.finished >= interval
        if due and (self._scan_task is None or self._scan_task.done()):
            self._scan_task = asyncio.create_task(self._run_scan(), name="dbkeeper-quick-check")
        if not self.background_scans:
            return healthy(
                f"{header.message}; quick_check not run: {megabytes(size)} is above "
                f"[health] quick_check_max_mb (the running bot checks it in the background)"
            )
        cadence = f"{megabytes(size)}: checked in the background every {duration(interval)}"
        if scan is None:
            return healthy(f"{header.message}; quick_check running ({cadence})")
        ago = duration(time.monotonic() - scan.finished)
        return Outcome(scan.outcome.status, f"{scan.outcome.message} {ago} ago ({cadence})")

    async def _run_scan(self) -> None:
        interrupter = self._scan_interrupter = Interrupter()
        started = time.monotonic()

        def scan() -> Outcome:
            with self.probe.connect(interrupter) as connection:
                return self.probe.integrity(connection, scan=True)

        try:
            async with self.database.gate.enter():  # a restore waits for the scan to end
                outcome = await offload(scan, interrupter, name="dbkeeper-quick-check")
        except Exception as error:
            if interrupter.fired:
                return
            outcome = unhealthy(f"quick_check failed: {_reason(error)}")
        seconds = time.monotonic() - started
        self._scan = Scan(outcome, time.monotonic(), seconds)
        log.info("background quick_check: %s in %.1fs", outcome.message, seconds)

    # -- plumbing ---------------------------------------------------------------------------

    async def read(self, name: str, work: Callable[[Connection], T]) -> T:
        """``work(connection)`` on a probe connection, as the checks read (status page)."""
        return await asyncio.wait_for(
            self._offload(name, work), self.settings.check_timeout_seconds
        )

    async def _offload(self, name: str, work: Callable[[Connection], T]) -> T:
        """Run ``work(connection)`` on a fresh probe connection, off the event loop, through
        the work gate (a restore waits for checks in progress); interrupted when the health
        registry gives up on it (``timeouts``)."""
        interrupter = Interrupter()

        def run() -> T:
            if not self.database.exists():  # the probe never creates one; say why it fails
                raise DatabaseMissing(
                    f"there is no database at {self.database.file} yet; `dbkeeper run` or "
                    "`dbkeeper db migrate` creates it"
                )
            with self.probe.connect(interrupter) as connection:
                return work(connection)

        async with self.database.gate.enter():
            return await offload(run, interrupter, name=f"dbkeeper-check-{name}")

    async def _in_thread(self, name: str, work: Callable[[], T]) -> T:
        """Run ``work()`` (files, the backup store) off the event loop."""
        return await offload(work, name=f"dbkeeper-check-{name}")

    async def close(self) -> None:
        """Stop the background scan (interrupting it) and release the probe's engine."""
        if self._scan_task is not None and not self._scan_task.done():
            if self._scan_interrupter is not None:
                self._scan_interrupter.fire()
            await asyncio.wait({self._scan_task}, timeout=self.settings.check_timeout_seconds)
        await asyncio.to_thread(self.probe.dispose)


def _full_check_problems(stats: BackupStats, now: datetime) -> list[str]:
    """Backups that failed their full integrity check, and checks pending for too long."""
    problems = []
    failed = stats.full_check_failed
    if failed:
        problems.append(
            f"{_plural(len(failed), 'backup')} failed the full integrity check and "
            f"{'is' if len(failed) == 1 else 'are'} marked damaged: {failed[0].name}: "
            f"{failed[0].full_check_problem}"
        )
    overdue = [
        backup
        for backup in stats.full_check_pending
        if backup.name != stats.checking
        and (now - backup.created_at).total_seconds() > FULL_CHECK_OVERDUE_SECONDS
    ]
    if overdue:
        oldest = overdue[-1]
        age = duration((now - oldest.created_at).total_seconds())
        problems.append(
            f"the full integrity check of {_plural(len(overdue), 'backup')} is pending "
            f"({oldest.name} for {age}): is the bot running? `dbkeeper backup verify` runs it"
        )
    return problems


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _free_bytes(directory: Path) -> int:
    """Free space where ``directory`` is, or will be once created."""
    for candidate in (directory, *directory.resolve().parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage("/").free  # pragma: no cover - "/" always exists


def _reason(error: BaseException) -> str:
    if isinstance(error, DatabaseMissing):
        return str(error)
    return describe_error(error, limit=400)
