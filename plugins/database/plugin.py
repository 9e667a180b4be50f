"""The database plugin: registers with its context; ``Operations`` does the work.

Startup: find Litestream when replication is on (``offsite/replication.py``), connect, migrate
and validate (``Operations.open``) off the event loop, then lead (and replicate) or stand by,
then schedule backups, database care (``care``) and, with ``[offsite] url``, uploads of what is
missing off-site. Shutdown, in order: database care, scheduled backups and background uploads
stop, the WAL is flushed, the final backup (the leader's) and its upload within the budget, the
database closes, Litestream's final sync, the leader lease goes to a standby.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

from dbkeeper.config import Settings
from dbkeeper.plugin import Deadline, Plugin, PluginContext, StartupError, StartupInterrupted

from .backup.engines.base import Progress
from .backup.manifest import Backup
from .backup.restore import RestoreReport
from .backup.retention import ROUTINE_REASONS
from .errors import BackupError, BackupInProgress, DatabaseError, MigrationInterrupted
from .handle import BOT_DATA_KEY, Database
from .leadership import Leadership
from .offsite.replication import Replication
from .operations import Operations
from .service import report_foreign_engines
from .settings import EXAMPLE_SCRIPT_LOCATION, SECTIONS
from .status import StatusSections

if TYPE_CHECKING:
    import click

    from .care import Care
    from .health.checks import DatabaseHealth
    from .offsite.background import BackgroundUploads
    from .offsite.checks import OffsiteHealth

log = logging.getLogger("dbkeeper.database")
BACKUP_JOB = "database-backup"
BACKUP_RETRY_JOB = "database-backup-retry"
BACKUP_RETRY_SECONDS = 60.0
# Of the shutdown budget, what the backup leaves for closing the database and sending alerts.
SHUTDOWN_RESERVE_SECONDS = 1.5
FIRST_BACKUP_SECONDS = 10.0  # after the start of a bot that has no backup yet
EXAMPLE_FEATURE = "dbkeeper.plugins.members"
UPLOAD_STOP_SECONDS = 2.0  # at shutdown, for a running upload to stop at its next chunk


class DatabasePlugin(Plugin):
    name = "database"
    order = 0  # first to start, last to stop
    sections: ClassVar[Mapping[str, type]] = SECTIONS

    def __init__(self, settings: Settings | None = None) -> None:
        """``settings``: use the plugin without a host (the command line, tests)."""
        self.context: PluginContext | None = None
        self.ops: Operations | None = Operations(settings) if settings is not None else None
        self.health: DatabaseHealth | None = None
        self.care: Care | None = None
        self.leadership: Leadership | None = None
        self.replication: Replication | None = None
        self._backup_stop = threading.Event()
        self._stepped_down = threading.Event()  # stops the scheduled backup of a leader no more
        self._deferred: asyncio.Task[None] | None = None
        self._backups_scheduled = False  # a leadership change after this is a takeover
        self._alerts: set[asyncio.Task[None]] = set()  # alerts sent from other threads
        self.uploads: BackgroundUploads | None = None  # off-site copies, when configured
        self.offsite_health: OffsiteHealth | None = None

    @classmethod
    def companions(cls, raw: Mapping[str, Any]) -> Sequence[str]:
        """With dbkeeper's example schema comes the feature that uses it."""
        location = raw.get("migrations", {}).get("script_location", "")
        return [EXAMPLE_FEATURE] if location in ("", EXAMPLE_SCRIPT_LOCATION) else []

    @classmethod
    def commands(cls) -> Sequence[click.Command]:
        from .cli import backup, db, replication

        return [db, backup, replication]

    # -- the parts, for whoever holds the plugin ------------------------------------------------

    @property
    def operations(self) -> Operations:
        if self.ops is None:
            raise RuntimeError("the database plugin is not set up yet")
        return self.ops

    @property
    def database(self) -> Any:
        return self.operations.database

    @property
    def migrator(self) -> Any:
        return self.operations.migrator

    @property
    def backups(self) -> Any:
        return self.operations.backups

    @property
    def settings(self) -> Settings:
        return self.operations.settings

    # -- the host's steps -------------------------------------------------------------------------

    def setup(self, context: PluginContext) -> None:
        from .care import Care
        from .commands import AdminCommands
        from .health.checks import DatabaseHealth

        self.context = context
        if self.ops is None:
            self.ops = Operations(context.settings)
        ops = self.ops
        context.add_secret(ops.database.url.password and str(ops.database.url.password))
        self.health = DatabaseHealth(
            ops.database,
            ops.migrator,
            ops.backups,
            context.settings.health,
            ops.backup_settings,
            background_scans=not context.one_shot,
        )
        self.health.register(context)
        if not context.one_shot:  # the status page: schema and backups first
            sections = StatusSections(self.health, ops.backups, ops.offsite)
            context.add_status_section("Schema and migrations", sections.schema)
            context.add_status_section("Backups", sections.backups_section)
        self.care = Care(ops.database, ops.backups, context.settings, one_shot=context.one_shot)
        self.care.register(context)
        if ops.offsite is not None:
            from .offsite.background import BackgroundUploads
            from .offsite.checks import OffsiteHealth

            self.offsite_health = OffsiteHealth(ops.offsite, ops.backup_settings.interval_seconds)
            self.offsite_health.register(context)
            self.uploads = BackgroundUploads(ops.offsite, self._alert)
        self.replication = Replication(
            context.settings,
            database=ops.database.file,
            dialect=ops.database.dialect,
            engine=ops.backups.engine,
            busy_timeout=ops.database.settings.busy_timeout_ms / 1000,
        )
        self.replication.register(context)
        if context.one_shot:
            return
        self.leadership = Leadership(
            ops.database.settings,
            instance=context.instance,
            poll_seconds=context.settings.instance.leader_poll_seconds,
        )
        context.publish(BOT_DATA_KEY, Database(self))
        if context.telegram_enabled:
            AdminCommands(self, context).install()

    async def start(self) -> None:
        ops = self.operations
        try:
            if ops.offsite is not None:  # credentials, keys: before anything is changed
                await asyncio.to_thread(ops.offsite.check)
            if self.replication is not None:  # a missing Litestream stops startup first
                await asyncio.to_thread(self.replication.prepare)
            await asyncio.to_thread(ops.open)
            if self.care is not None:  # [retention] names tables and columns that exist
                await asyncio.to_thread(self.care.check_schema)
        except DatabaseError as error:
            await asyncio.to_thread(ops.close)
            interrupted = isinstance(error, MigrationInterrupted)
            if self.context is not None:  # delivered before the process exits (Host.stop)
                what = "startup interrupted" if interrupted else "startup failed"
                await self.context.alert(f"{what}: {error}", key="startup")
            raise (StartupInterrupted if interrupted else StartupError)(str(error)) from error
        await asyncio.to_thread(report_foreign_engines)
        if self.leadership is not None and self.context is not None:
            self.leadership.on_change(self._follow_leadership)
            if self.replication is not None:  # the leader replicates, from its election on
                self.leadership.on_change(self.replication.follow)
            await self.leadership.start()
            # From now on only the leader alerts, polls and backs up (before: this instance,
            # so a failed startup is always alerted).
            self.context.provide_leadership(self.leadership)
        elif self.replication is not None:
            await self.replication.follow(True)
        self._start_backups()
        if self.care is not None:
            await self.care.start()
        if self.replication is not None and self.context is not None:
            self.replication.schedule(self.context)

    async def interrupt(self, why: str) -> None:
        """A stop was requested while starting: a lock wait gives up, a running revision is
        cancelled and rolled back (``Migrator.interrupt``; returns at once)."""
        if self.ops is not None:
            self.ops.migrator.interrupt(why)

    async def stop(self, deadline: Deadline) -> None:
        """Shutdown, in order: scheduled backups stop, the WAL is flushed, the final backup
        (the leader's), the database closes, Litestream's final sync, and the leader lease
        goes to a standby."""
        ops = self.operations
        try:
            if self.care is not None:
                await self.care.stop()  # its PRAGMA optimize runs as the connections close
            await self._stop_backups()
            if self.uploads is not None:
                stop_by = min(deadline.at, time.monotonic() + UPLOAD_STOP_SECONDS)
                await self.uploads.stop(Deadline(stop_by))
            await asyncio.to_thread(ops.flush)
            log.info("shutdown: database flushed")
            if ops.backup_settings.on_shutdown and self._takes_routine_backups():
                await self._shutdown_backup(deadline)
            elif ops.backup_settings.on_shutdown:
                log.info("shutdown: no final backup here (%s leads and takes it)", self._leader())
        finally:
            ops.backups.engine.release()
            try:
                await asyncio.to_thread(ops.close)
                log.info("shutdown: database closed")
            finally:
                if self.replication is not None:  # last: its final sync sees every commit
                    await self.replication.stop(deadline)
            if self.leadership is not None:
                await self.leadership.stop(timeout=deadline.remaining())

    # -- what the chat commands and the handle ask --------------------------------------------

    async def backup_now(
        self, reason: str = "manual", *, wait: bool = False, progress: Progress | None = None
    ) -> Backup:
        """Take a verified backup off the event loop.

        While another backup or restore runs, ``wait=False`` raises ``BackupInProgress`` (the
        chat command says "a backup is already running"); ``wait=True`` waits for it.
        """
        backup = await asyncio.to_thread(
            self.operations.backups.create, reason, wait=wait, progress=progress
        )
        if self.care is not None:
            self.care.after_backup()  # reclaims free space soon, at a quiet moment
        if self.uploads is not None:  # in the background: the backup is done and listed
            self.uploads.request()
        return backup

    async def restore(self, name: str, *, progress: Progress | None = None) -> RestoreReport:
        """Restore backup ``name`` while the bot runs: its database work waits for the swap,
        then goes on on the restored database (the same engine object)."""
        loop = asyncio.get_running_loop()
        ops = self.operations
        replicating = self.replication.paused() if self.replication else contextlib.nullcontext()
        async with replicating:  # Litestream must not follow the file being swapped
            report = await asyncio.to_thread(
                ops.restore, name, pause=lambda: ops.database.paused(loop), progress=progress
            )
        if report.safety is not None and report.safety.pending_compression:
            if self._deferred is None or self._deferred.done():  # it uploads when done
                self._deferred = asyncio.create_task(
                    self._compress_deferred(), name="dbkeeper-deferred-compression"
                )
        elif self.uploads is not None and report.safety is not None:
            self.uploads.request()  # the copy of what was replaced
        return report

    # -- scheduled backups ----------------------------------------------------------------------

    def _takes_routine_backups(self) -> bool:
        """Whether this instance takes the scheduled and shutdown backups: the leader does."""
        leading = self.leadership is None or self.leadership.is_leader
        return self.operations.backups.available and leading

    def _leader(self) -> str:
        return (self.leadership.leader if self.leadership else None) or "another instance"

    async def _follow_leadership(self, is_leader: bool) -> None:
        """A leader that steps down stops its scheduled backup: the shared backup lock is the
        next leader's (and a backup through a cut connection fails anyway)."""
        if is_leader:
            self._stepped_down.clear()
            self.operations.backups.full_checks.request()  # what a standby left pending
            if self._backups_scheduled and self.context is not None:
                # A takeover: the backups go on at the old leader's cadence (one interval after
                # the newest), not at this instance's; until then an overdue one is expected.
                # The job is rescheduled, not doubled: two timers would race for one lock.
                interval = self.operations.backup_settings.interval_seconds
                first = await asyncio.to_thread(self._first_backup_in, interval)
                if self.health is not None:
                    self.health.takeover_backup_due = time.monotonic() + first
                self._unschedule_backups()
                self.context.add_job(
                    self._scheduled_backup, name=BACKUP_JOB, interval=interval, first=first
                )
        else:
            self._stepped_down.set()

    def _start_backups(self) -> None:
        """After a successful start: hold the database, schedule backups, finish old work."""
        backups = self.operations.backups
        self._backup_stop.clear()
        backups.engine.hold()
        if self.context is not None and backups.available:
            interval = self.operations.backup_settings.interval_seconds
            first = self._first_backup_in(interval)
            fresh = not backups.list()
            if self.health is not None and fresh:
                self.health.first_backup_due = time.monotonic() + first
            if self.offsite_health is not None:  # existing backups are caught up at once
                from .health.checks import FIRST_BACKUP_GRACE_SECONDS

                self.offsite_health.first_upload_due = (
                    time.monotonic() + (first if fresh else 0) + FIRST_BACKUP_GRACE_SECONDS
                )
            self.context.add_job(
                self._scheduled_backup, name=BACKUP_JOB, interval=interval, first=first
            )
            self._backups_scheduled = True
            log.info("backups every %gs; the next in %.0fs", interval, first)
        if backups.available:
            # First the full checks left pending (the last shutdown backup's, on its raw file),
            # then each new backup's, in the background.
            loop = asyncio.get_running_loop()

            def on_failure(backup: Backup) -> None:
                loop.call_soon_threadsafe(self._full_check_failed, backup)

            backups.full_checks.on_failure = on_failure
            backups.full_checks.may_run = self._takes_routine_backups
            backups.full_checks.start()
            self._deferred = asyncio.create_task(
                self._compress_deferred(), name="dbkeeper-deferred-compression"
            )

    def _first_backup_in(self, interval: float) -> float:
        """Seconds until the first scheduled backup: one interval after the newest routine one."""
        routine = [b for b in self.operations.backups.list() if b.reason in ROUTINE_REASONS]
        if not routine:  # a new database gets its first backup soon, not a day later
            return min(interval, FIRST_BACKUP_SECONDS)
        age = (datetime.now(UTC) - routine[0].created_at).total_seconds()
        return min(interval, max(1.0, interval - age))

    async def _scheduled_backup(self) -> None:
        if not self._takes_routine_backups():
            log.debug("scheduled backup left to the leader (%s)", self._leader())
            return
        try:
            await asyncio.to_thread(
                self.operations.backups.create, "scheduled", stop=self._stepped_down
            )
            if self.uploads is not None:
                self.uploads.request()
        except BackupInProgress as busy:
            # Not queued behind it (a job waiting on a lock would hold up shutdown): tried again
            # shortly, so that a long restore or compression does not cost a whole interval.
            retry = min(BACKUP_RETRY_SECONDS, self.operations.backup_settings.interval_seconds)
            log.info("scheduled backup postponed by %.0fs: %s", retry, busy)
            if self.context is not None:
                self.context.add_job(self._scheduled_backup, name=BACKUP_RETRY_JOB, first=retry)
        except (BackupError, OSError) as error:
            if self._stepped_down.is_set():
                log.info("scheduled backup stopped: this instance stepped down as leader")
                return
            await self._alert_backup_failure(str(error))

    async def _compress_deferred(self) -> None:
        """Compress backups kept uncompressed at the last shutdown, in the background."""
        try:
            await asyncio.to_thread(
                self.operations.backups.compress_pending, stop=self._backup_stop
            )
        except BackupInProgress as busy:
            log.info("deferred compression postponed: %s", busy)
        except Exception:
            log.exception("deferred compression failed")
        if self.uploads is not None and self._takes_routine_backups():
            self.uploads.request()  # what the last run left (its shutdown backup), compressed

    def _unschedule_backups(self) -> None:
        """No scheduled backup and no retry of one is left on the job queue."""
        if self.context is not None:
            for name in (BACKUP_JOB, BACKUP_RETRY_JOB):
                self.context.remove_jobs(name)

    async def _stop_backups(self) -> None:
        """No more scheduled backups; background compression stops at its next chunk."""
        self._unschedule_backups()
        self._backup_stop.set()
        # A running full check is interrupted (its backup stays pending: the next start runs
        # it), and the shutdown backup's is left pending: it is not in the shutdown budget.
        await asyncio.to_thread(self.operations.backups.full_checks.stop)
        if self._deferred is not None:
            await self._deferred
            self._deferred = None
        log.info("shutdown: scheduled backups stopped")

    async def _shutdown_backup(self, deadline: Deadline) -> None:
        budget = Deadline(deadline.at - SHUTDOWN_RESERVE_SECONDS)
        if budget.expired:
            await self._alert_backup_failure(
                "no shutdown backup: the shutdown budget was used up before it could start; "
                "raise [shutdown] timeout_seconds (and docker stop --time)"
            )
            return
        log.info("shutdown: taking the final backup (%.1fs left for it)", budget.remaining())
        try:
            await asyncio.to_thread(
                self.operations.backups.create, "shutdown", wait=True, deadline=budget
            )
        except (BackupError, OSError) as error:
            await self._alert_backup_failure(str(error))
        if self.uploads is not None:
            await self.uploads.final(budget)

    def _full_check_failed(self, backup: Backup) -> None:
        """On the event loop: a listed backup failed its full integrity check."""
        text = (
            f"backup {backup.name} failed its full integrity check: "
            f"{backup.full_check_problem}. It is marked damaged and kept (never restored or "
            "rotated). The live database may be damaged too: check it (`dbkeeper health`) "
            "and the disk; `dbkeeper backup list` shows which backups passed in full."
        )
        task = asyncio.create_task(self._alert(text, "database.backup.full-check"))
        self._alerts.add(task)
        task.add_done_callback(self._alerts.discard)

    async def _alert_backup_failure(self, text: str) -> None:
        await self._alert(text, "database.backup")

    async def _alert(self, text: str, key: str) -> None:
        if self.context is not None:
            await self.context.alert(text, key=key)
        else:
            log.error("%s", text)
