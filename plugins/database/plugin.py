"""The database plugin: PTB-facing wiring around the plain classes that do the work.

In dbkeeper's own host it is the first plugin (ready before anything that needs the database,
closed after all of them). In someone else's bot, ``install`` chains it onto the application's
``post_init`` / ``post_stop`` hooks, which ``run_polling`` and ``run_webhook`` call::

    plugin = DatabasePlugin(load_settings("config.toml"))
    plugin.install(application)
    ...
    user = await plugin.database.read(lambda s: s.get(User, user_id))
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from dbkeeper.config import Settings
from dbkeeper.plugin import Deadline, Plugin, StartupError
from sqlalchemy import MetaData

from .backup import ROUTINE_REASONS, BackupInfo, BackupManager, RestoreReport
from .backup_engine import Progress
from .backup_postgres import PostgresBackupEngine
from .backup_sqlite import SqliteBackupEngine
from .errors import BackupError, BackupInProgress, DatabaseError, MigrationError
from .leader import Leadership
from .migrator import MigrationReport, Migrator, ValidationReport
from .service import DatabaseService

if TYPE_CHECKING:
    from dbkeeper.host import Host
    from telegram.ext import Application, CallbackContext

    from .migrator import Revision

log = logging.getLogger("dbkeeper.database")
BACKUP_JOB = "database-backup"
BACKUP_RETRY_JOB = "database-backup-retry"
BACKUP_RETRY_SECONDS = 60.0
# Of the shutdown budget, what the backup leaves for closing the database and sending alerts.
SHUTDOWN_RESERVE_SECONDS = 1.5
FIRST_BACKUP_SECONDS = 10.0  # after the start of a bot that has no backup yet


class DatabasePlugin(Plugin):
    name = "database"

    def __init__(self, settings: Settings, *, metadata: MetaData | None = None) -> None:
        self.settings = settings
        self.database = DatabaseService(settings.database)
        self.migrator = Migrator(self.database, settings.migrations, metadata=metadata)
        self.host: Host | None = None
        self.last_migration: MigrationReport | None = None
        self.last_validation: ValidationReport | None = None
        self.backups = BackupManager(settings.backup, self._backup_engine(), self.migrator)
        self.last_safety_backup: BackupInfo | None = None  # before the last migration/downgrade
        self.leadership: Leadership | None = None
        self._backup_stop = threading.Event()
        self._deferred: asyncio.Task[None] | None = None

    # -- PTB wiring ---------------------------------------------------------------------------

    def install(self, application: Application) -> Host:
        """Use the plugin in your own PTB bot (``run_polling``/``run_webhook`` call the hooks)."""
        from dbkeeper.host import Host

        host = Host(self.settings, application, [self])
        previous_init, previous_stop = application.post_init, application.post_stop

        async def post_init(app: Application) -> None:
            await host.start()
            await host.telegram_ready()  # run_polling has connected to the Bot API already
            if previous_init is not None:
                await previous_init(app)

        async def post_stop(app: Application) -> None:
            if previous_stop is not None:
                await previous_stop(app)
            await host.stop(Deadline.after(self.settings.shutdown.timeout_seconds))

        application.post_init = post_init
        application.post_stop = post_stop
        return host

    def setup(self, host: Host) -> None:
        from .commands import AdminCommands
        from .health import DatabaseHealth

        self.host = host
        self.health = DatabaseHealth(self)
        self.health.register(host)
        if host.telegram_enabled:
            commands = AdminCommands(self, host, host.admin, host.describe_instance)
            commands.install(host.application)
            host.on_telegram_ready(lambda: commands.register_menu(host.application))
            host.admin.warn_if_no_admins()

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self.open)
        except DatabaseError as error:
            await asyncio.to_thread(self.close)
            if self.host is not None:  # delivered before the process exits (Host.stop)
                await self.host.alert(f"startup failed: {error}", key="startup")
            raise StartupError(str(error)) from error
        if self.host is not None:
            self.leadership = Leadership(
                self.database,
                instance=self.host.instance,
                poll_seconds=self.settings.instance.leader_poll_seconds,
            )
            await self.leadership.start()
            self.host.set_leadership(self.leadership)
        self._start_backups()

    async def stop(self, deadline: Deadline) -> None:
        """Shutdown, in order: scheduled backups stop, the WAL is flushed, the final backup
        (the leader's), the database closes, and the leader lock goes to a standby."""
        try:
            await self._stop_backups()
            await asyncio.to_thread(self.flush)
            log.info("shutdown: database flushed")
            if self.settings.backup.on_shutdown and self._takes_routine_backups():
                await self._shutdown_backup(deadline)
            elif self.settings.backup.on_shutdown:
                log.info("shutdown: no final backup here (%s leads and takes it)", self._leader())
        finally:
            self.backups.engine.release()
            await asyncio.to_thread(self.close)
            log.info("shutdown: database closed")
            if self.leadership is not None:
                await self.leadership.stop(timeout=deadline.remaining())

    # -- the work, plain and blocking (the CLI calls these directly) --------------------------

    def open(self) -> None:
        """Connect, bring the schema to head (if ``auto_upgrade``), and validate it."""
        self._clean_backup_leftovers()
        self.database.connect()
        if self.settings.migrations.auto_upgrade:
            self.last_migration = self.migrate()
        else:
            status = self.migrator.status()  # refuses a schema newer than the code
            if status.pending:
                log.warning(
                    "%d revision%s pending (auto_upgrade is off); the bot runs on v%d until "
                    "`dbkeeper db migrate` brings it to v%d",
                    len(status.pending),
                    "s" if len(status.pending) > 1 else "",
                    status.current_version,
                    status.head_version,
                )
        self.last_validation = self.validate()

    def migrate(self, target: str = "head") -> MigrationReport:
        """Apply pending revisions (one transaction each, every attempt recorded).

        A database that already has a version is backed up first (reason pre-migration).
        """
        return self.migrator.upgrade(target, before_apply=self._backup_before_migrating)

    def downgrade(self, target: str) -> MigrationReport:
        """Revert down to ``target``, after a backup of the database (reason pre-downgrade)."""
        if self.backups.available and self.migrator.current() is not None:
            try:
                self.last_safety_backup = self.backups.create("pre-downgrade", wait=True)
            except BackupError as error:
                raise MigrationError(
                    f"not reverting anything without a backup: {error}. The schema was not changed."
                ) from error
        return self.migrator.downgrade(target)

    def validate(self) -> ValidationReport:
        """Check the schema after migrating; missing critical tables are fatal."""
        report = self.migrator.validate()
        for line in report.drift:
            log.warning("schema drift: %s", line)
        for line in report.changed_revisions:
            log.warning("%s", line)
        if not report.ok:
            raise DatabaseError(
                "critical tables are missing after migrating: "
                + ", ".join(report.missing_tables)
                + ". The schema does not match the revisions; check `dbkeeper db history`."
            )
        if not report.drift and not report.changed_revisions:
            log.info("schema validated: every critical table present, no drift")
        return report

    def flush(self) -> None:
        """Move the SQLite write-ahead log into the database file (nothing to do elsewhere)."""
        if self.database.connected and self.database.dialect == "sqlite":
            # On the driver connection: inside SQLAlchemy's BEGIN the checkpoint could not finish.
            connection = self.database.engine.raw_connection()
            try:
                busy, _, moved = connection.driver_connection.execute(
                    "PRAGMA wal_checkpoint(TRUNCATE)"
                ).fetchone()
            finally:
                connection.close()
            if busy:
                log.warning("WAL checkpoint incomplete: another connection is still reading")
            elif moved > 0:
                log.info("flushed the write-ahead log into the database (%d pages)", moved)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.migrator.close()
            self.database.close()

    # -- backups ------------------------------------------------------------------------------

    async def backup_now(
        self, reason: str = "manual", *, wait: bool = False, progress: Progress | None = None
    ) -> BackupInfo:
        """Take a verified backup off the event loop.

        While another backup or restore runs, ``wait=False`` raises ``BackupInProgress`` (the
        chat command says "a backup is already running"); ``wait=True`` waits for it.
        """
        return await asyncio.to_thread(self.backups.create, reason, wait=wait, progress=progress)

    async def restore(self, name: str, *, progress: Progress | None = None) -> RestoreReport:
        """Restore backup ``name`` while the bot runs: database work waits during the swap."""
        loop = asyncio.get_running_loop()
        gate = self.database.gate

        @contextlib.contextmanager
        def paused() -> Iterator[None]:
            closing = gate.closed()
            asyncio.run_coroutine_threadsafe(closing.__aenter__(), loop).result()
            try:
                yield
            finally:
                asyncio.run_coroutine_threadsafe(closing.__aexit__(None, None, None), loop).result()

        return await asyncio.to_thread(self.restore_backup, name, pause=paused, progress=progress)

    def restore_backup(
        self,
        name: str,
        *,
        pause: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
        progress: Progress | None = None,
    ) -> RestoreReport:
        """Blocking restore (the CLI's): verify, safety backup, swap, reopen and migrate."""
        return self.backups.restore(
            name,
            release=self.close,
            reopen=self._reopen_after_restore,
            pause=pause,
            progress=progress,
        )

    def _backup_engine(self) -> SqliteBackupEngine | PostgresBackupEngine:
        if self.database.dialect == "postgresql":
            return PostgresBackupEngine(
                self.database.url,
                bin_dir=self.settings.backup.pg_bin_dir,
                connect_timeout=self.settings.database.connect_timeout_seconds,
            )
        return SqliteBackupEngine(
            self.database.file, busy_timeout_ms=self.settings.database.busy_timeout_ms
        )

    def _clean_backup_leftovers(self) -> None:
        try:
            self.backups.cleanup()
        except OSError as error:
            log.warning("could not clean up after an interrupted backup: %s", error)

    def _backup_before_migrating(self, pending: Sequence[Revision]) -> None:
        if not self.backups.available:
            log.info("not backing up before migrating: %s", self.backups.engine.unavailable())
            return
        try:
            self.last_safety_backup = self.backups.create("pre-migration", wait=True)
        except BackupError as error:
            raise MigrationError(
                f"not applying {len(pending)} pending revision{'s' if len(pending) > 1 else ''}"
                f" without a backup: {error}. The schema was not changed."
            ) from error

    def _reopen_after_restore(self) -> MigrationReport | None:
        """After a swap: connect and bring the restored schema forward to head."""
        self.database.connect()
        report = None
        if self.settings.migrations.auto_upgrade:
            report = self.migrator.upgrade()  # no pre-migration copy: the backup is that copy
        else:
            status = self.migrator.status()
            if status.pending:
                log.warning(
                    "the restored database is at v%d (head v%d); `dbkeeper db migrate` "
                    "brings it forward (auto_upgrade is off)",
                    status.current_version,
                    status.head_version,
                )
        self.last_validation = self.validate()
        return report

    def _takes_routine_backups(self) -> bool:
        """Whether this instance takes the scheduled and shutdown backups: the leader does."""
        leading = self.leadership is None or self.leadership.is_leader
        return self.backups.available and leading

    def _leader(self) -> str:
        return (self.leadership.leader if self.leadership else None) or "another instance"

    def _start_backups(self) -> None:
        """After a successful start: hold the database, schedule backups, finish old work."""
        self._backup_stop.clear()
        self.backups.engine.hold()
        if self.host is not None and self.backups.available:
            queue = self.host.job_queue
            if not queue.get_jobs_by_name(BACKUP_JOB):
                interval = self.settings.backup.interval_seconds
                first = self._first_backup_in(interval)
                queue.run_repeating(
                    self._scheduled_backup,
                    interval=interval,
                    first=first,
                    name=BACKUP_JOB,
                    job_kwargs={
                        "max_instances": 1,
                        "coalesce": True,
                        "misfire_grace_time": max(1, round(interval)),
                    },
                )
                log.info("backups every %gs; the next in %.0fs", interval, first)
        if self.backups.available:
            self._deferred = asyncio.create_task(
                self._compress_deferred(), name="dbkeeper-deferred-compression"
            )

    def _first_backup_in(self, interval: float) -> float:
        """Seconds until the first scheduled backup: one interval after the newest routine one."""
        routine = [b for b in self.backups.list() if b.reason in ROUTINE_REASONS]
        if not routine:  # a new database gets its first backup soon, not a day later
            return min(interval, FIRST_BACKUP_SECONDS)
        age = (datetime.now(UTC) - routine[0].created_at).total_seconds()
        return min(interval, max(1.0, interval - age))

    async def _scheduled_backup(self, _context: CallbackContext) -> None:
        if not self._takes_routine_backups():
            log.debug("scheduled backup left to the leader (%s)", self._leader())
            return
        try:
            await self.backup_now("scheduled")
        except BackupInProgress as busy:
            # Not queued behind it (a job waiting on a lock would hold up shutdown): tried again
            # shortly, so that a long restore or compression does not cost a whole interval.
            retry = min(BACKUP_RETRY_SECONDS, self.settings.backup.interval_seconds)
            log.info("scheduled backup postponed by %.0fs: %s", retry, busy)
            queue = self.host.job_queue if self.host is not None else None
            if queue is not None and not queue.get_jobs_by_name(BACKUP_RETRY_JOB):
                queue.run_once(self._scheduled_backup, when=retry, name=BACKUP_RETRY_JOB)
        except BackupError as error:
            await self._alert_backup_failure(str(error))

    async def _compress_deferred(self) -> None:
        """Compress backups kept uncompressed at the last shutdown, in the background."""
        try:
            await asyncio.to_thread(self.backups.compress_pending, stop=self._backup_stop)
        except BackupInProgress as busy:
            log.info("deferred compression postponed: %s", busy)
        except Exception:
            log.exception("deferred compression failed")

    async def _stop_backups(self) -> None:
        """No more scheduled backups; background compression stops at its next chunk."""
        if self.host is not None:
            for name in (BACKUP_JOB, BACKUP_RETRY_JOB):
                for job in self.host.job_queue.get_jobs_by_name(name):
                    job.schedule_removal()
        self._backup_stop.set()
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
            await asyncio.to_thread(self.backups.create, "shutdown", wait=True, deadline=budget)
        except BackupError as error:
            await self._alert_backup_failure(str(error))

    async def _alert_backup_failure(self, text: str) -> None:
        if self.host is not None:
            await self.host.alert(text, key="database.backup")
        else:
            log.error("%s", text)
