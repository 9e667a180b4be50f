"""What the database plugin does, as linear procedures over its parts. Blocking.

The chat commands, the command line and the running plugin all call these; the parts they use
(the service, the migrator, the backups) never call back up. Each procedure reads in the order
it runs:

``open``       connect -> migrate (or refuse when revisions are pending and auto_upgrade is
               off) -> validate
``migrate``    lock -> safety backup (pre-migration) -> apply -> report (``validate`` apart)
``downgrade``  lock -> safety backup (pre-downgrade) -> revert
``backup``     create (verified, committed, rotated) -> upload (off-site copies, when
               ``[offsite] url`` is set; outside the backup lock; a failed upload is recorded,
               never fails the backup)
``restore``    in use elsewhere? -> (gone locally: fetch the off-site copy) -> verify -> pause
               -> keep the live database (SQLite: by a second name; else a safety copy)
               -> swap -> reopen -> migrate -> (outside the pause) list the kept file as
               pre-restore -> (fetched, and another setup's copy: adopt the copies off-site)
``restore_replica``  the replica's state (newest, or at a time) into a staging file -> ``restore``
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import MetaData

from dbkeeper.config import ConfigError, Settings
from dbkeeper.plugin import Deadline

from .backup.engines.base import BackupEngine, Limits, Progress, serialized
from .backup.engines.postgres import PostgresBackupEngine
from .backup.engines.sqlite import SqliteBackupEngine
from .backup.manifest import Backup
from .backup.pipeline import Backups
from .backup.restore import (
    Kept,
    RestoreCandidate,
    RestoreReport,
    finish_kept,
    forget_unswapped,
    keep_current,
    prepare,
    prepare_raw,
    swap,
)
from .backup.store import NAME_PATTERN
from .errors import BackupError, DatabaseError, MigrationError, MigrationInterrupted
from .locks import UnsafePath
from .migrate.migrator import MigrationReport, Migrator
from .migrate.revisions import Revision, Revisions, resolve_location
from .migrate.validation import ValidationReport, merged_metadata
from .offsite.litestream import forget_position
from .offsite.uploads import OffsiteCopies, UploadReport
from .service import DatabaseService
from .settings import (
    BackupSettings,
    DatabaseSettings,
    MigrationSettings,
    OffsiteSettings,
    ReplicationSettings,
)

if TYPE_CHECKING:
    from .offsite.replica import Position

log = logging.getLogger("dbkeeper.database")
Pause = Callable[[], contextlib.AbstractContextManager[None]]
# Where a restore's candidate comes from when it is not a backup in the store: the raw database
# proven sound (``restore.prepare_raw``), from the progress callback and the limits.
Source = Callable[[Progress, Limits], RestoreCandidate]


def load_metadata(reference: str) -> MetaData:
    """``package.module:attribute`` -> the SQLAlchemy ``MetaData`` it names."""
    module_name, _, attribute = reference.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as error:
        raise MigrationError(
            f"[migrations] metadata = {reference!r} cannot be loaded: "
            f"{type(error).__name__}: {error}. It is imported from the configuration's "
            "directory; name a module:attribute that holds a SQLAlchemy MetaData."
        ) from None
    if not isinstance(target, MetaData):
        raise MigrationError(
            f"[migrations] metadata = {reference!r} is a {type(target).__name__}, not a "
            "SQLAlchemy MetaData (for declarative models: 'module:Base.metadata')"
        )
    return target


def backup_engine(database: DatabaseSettings, backup: BackupSettings) -> BackupEngine:
    from .engines import database_url, sqlite_file

    file = sqlite_file(database_url(database))
    if file is None:
        return PostgresBackupEngine(
            database,
            bin_dir=backup.pg_bin_dir,
            compression=backup.compression,
            compress_min_bytes=backup.compress_min_bytes,
            staging_dir=Path(backup.dir),
        )
    return SqliteBackupEngine(file, busy_timeout_ms=database.busy_timeout_ms)


@dataclass(frozen=True)
class TakenBackup:
    """A backup, and what its upload off-site did (None: off-site copies are off)."""

    backup: Backup
    upload: UploadReport | None


def offsite_copies(settings: Settings, backups: Backups) -> OffsiteCopies | None:
    """The off-site copies of ``[offsite]``, when its url is set."""
    try:
        offsite = settings.section(OffsiteSettings)
    except ConfigError:  # settings built without the database plugin's sections
        return None
    return OffsiteCopies(offsite, backups) if offsite.enabled else None


class Operations:
    """The database, its schema and its backups, for one configuration."""

    def __init__(self, settings: Settings, *, metadata: MetaData | None = None) -> None:
        self.settings = settings
        database = settings.section(DatabaseSettings)
        self.migration_settings = settings.section(MigrationSettings)
        self.backup_settings = settings.section(BackupSettings)
        self.database = DatabaseService(database)
        self.revisions = Revisions(resolve_location(self.migration_settings.script_location))
        if metadata is None and self.migration_settings.metadata:
            metadata = load_metadata(self.migration_settings.metadata)
        if metadata is None:
            metadata = merged_metadata(
                [cls.metadata for cls in settings.plugins if cls.metadata is not None]
            )
        self.metadata = metadata
        self.migrator = Migrator(
            database, self.migration_settings, self.revisions, metadata=metadata
        )
        self.backups = Backups(
            self.backup_settings, backup_engine(database, self.backup_settings), self.revisions
        )
        self.offsite = offsite_copies(settings, self.backups)
        # With replication on, Litestream owns the WAL's checkpoints (offsite/replication.py):
        # ``flush`` leaves it alone, in the bot and in every command of this configuration.
        replication = settings.section(ReplicationSettings)
        self.wal_owner = "Litestream" if replication.enabled and self.database.file else None
        self.last_migration: MigrationReport | None = None
        self.last_validation: ValidationReport | None = None
        self.last_safety_backup: Backup | None = None

    # -- opening and closing ------------------------------------------------------------------

    def open(self) -> None:
        """Connect, bring the schema to head (if ``auto_upgrade``), and validate it."""
        self.clean_leftovers()
        self.database.connect()
        if not self.revisions.managed:
            log.info("[migrations] script_location is none: dbkeeper leaves the schema alone")
            return
        if self.migration_settings.auto_upgrade:
            self.last_migration = self.migrate()
        else:
            status = self.migrator.status()  # refuses a schema newer than the code
            if status.pending:
                count = len(status.pending)
                raise MigrationError(
                    f"{count} revision{'s' if count > 1 else ''} pending ({status.current_name} "
                    f"-> {status.pending[-1].name}) and [migrations] auto_upgrade is off: run "
                    "`dbkeeper db migrate` to apply them, then start again"
                )
        self.last_validation = self.validate()

    def flush(self) -> None:
        """Move the SQLite write-ahead log into the database file (nothing to do elsewhere)."""
        if not (self.database.connected and self.database.dialect == "sqlite"):
            return
        if self.wal_owner is not None:
            # A TRUNCATE checkpoint would wait for Litestream's read lock while stalling
            # every writer, then fail anyway.
            log.debug("the write-ahead log is left to %s", self.wal_owner)
            return
        # On the driver connection: inside SQLAlchemy's BEGIN the checkpoint could not finish.
        connection = self.database.engine.raw_connection()
        try:
            busy, _, moved = connection.driver_connection.execute(  # type: ignore[union-attr]
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

    def clean_leftovers(self) -> None:
        try:
            self.backups.cleanup()
            forget_unswapped(self.backups)
        except UnsafePath as error:  # the backup or restore that needs the directory says so
            log.debug("not cleaning up: %s", error)
        except (OSError, DatabaseError) as error:
            log.warning("could not clean up after an interrupted backup: %s", error)

    # -- the schema -----------------------------------------------------------------------------

    def migrate(self, target: str = "head") -> MigrationReport:
        """Apply pending revisions (one transaction each, every attempt recorded); a database
        that already has a version is backed up first (reason pre-migration)."""
        with self.migrator.locked() as schema:
            return schema.migrate(
                target, before=lambda pending: self._safety_backup("pre-migration", pending)
            )

    def downgrade(self, target: str) -> MigrationReport:
        """Revert down to ``target``, after a backup of the database (reason pre-downgrade)."""
        with self.migrator.locked() as schema:
            schema.close_interrupted()
            if schema.status().current is not None:
                self._safety_backup("pre-downgrade", None)
            return schema.downgrade(target)

    def baseline(self, target: str) -> Revision:
        """Adopt a database created outside dbkeeper: record it as being at ``target``."""
        revision = self.revisions.find(target)
        if revision is None:
            raise MigrationError("baseline needs a revision such as 0001 or head, not base")
        with self.migrator.locked() as schema:
            schema.baseline(revision)
        return revision

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
                + ". The schema does not match the revisions; check `dbkeeper db history`, "
                "[migrations] metadata and [migrations] critical_tables."
            )
        if not report.compared:
            log.info("schema validated (no [migrations] metadata known: drift not checked)")
        elif not report.drift and not report.changed_revisions:
            log.info("schema validated: every critical table present, no drift")
        return report

    def _safety_backup(self, reason: str, pending: Sequence[Revision] | None) -> None:
        if not self.backups.available:
            log.info("not backing up first: %s", self.backups.engine.unavailable())
            return
        try:  # a stop request (a signal) stops the backup too: nothing is migrated then
            self.last_safety_backup = self.backups.create(
                reason, wait=True, stop=self.migrator.stop_requested
            )
        except BackupError as error:
            if self.migrator.interrupted:
                raise MigrationInterrupted(
                    f"stopped while taking the {reason} backup ({self.migrator.interrupted}); "
                    "the schema was not changed"
                ) from error
            what = (
                f"applying {len(pending)} pending revision{'s' if len(pending) > 1 else ''}"
                if pending
                else "reverting anything"
            )
            raise MigrationError(
                f"not {what} without a backup: {error}. The schema was not changed."
            ) from error

    # -- backups and their off-site copies ------------------------------------------------------

    def backup(
        self,
        reason: str = "manual",
        *,
        wait: bool = False,
        deadline: Deadline | None = None,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> TakenBackup:
        """A verified backup, then its off-site copy (and those of earlier backups still
        missing there). ``BackupError`` only for the backup itself."""
        backup = self.backups.create(
            reason, wait=wait, deadline=deadline, progress=progress, stop=stop
        )
        return TakenBackup(backup, self.upload(Limits(deadline, (stop,) if stop else ())))

    def upload(self, limits: Limits | None = None) -> UploadReport | None:
        """Copy the local backups missing off-site there, verified, and rotate the copies
        (None: off-site copies are off). Never raises for the storage: the report says."""
        if self.offsite is None:
            return None
        return self.offsite.sync(limits)

    def gone_locally(self, name: str) -> bool:
        """Whether ``name`` is a backup name with no file in the backup directory."""
        directory = self.backups.store.directory
        return bool(NAME_PATTERN.match(name)) and not os.path.lexists(directory / name)

    # -- restoring --------------------------------------------------------------------------------

    def restore(
        self,
        name: str,
        *,
        pause: Pause = contextlib.nullcontext,
        progress: Progress | None = None,
        identity: Path | None = None,
        source: Source | None = None,
    ) -> RestoreReport:
        """Replace the live database with backup ``name`` after proving it sound.

        Nothing touches the live database until the backup passed every check; ``pause``
        holds the bot's database work (a running bot's) from the safety copy to the reopen.
        A backup whose file is gone comes from its off-site copy (decrypted with the age
        keys in ``identity``), checked against its manifest before it is used at all. Once
        the database is swapped, a copy that was not uploaded from here makes this setup adopt
        the copies off-site (``OffsiteCopies.adopt``): the operator chose that lineage.
        ``source``: the candidate comes from elsewhere (``name`` only labels it).
        """
        started = time.monotonic()
        report = serialized(progress)
        limits = Limits()
        backups = self.backups
        busy = backups.engine.in_use_elsewhere()  # the reason that holds longest comes first
        if busy is not None:
            raise BackupError(busy)
        fetched = source is None and self.offsite is not None and self.gone_locally(name)
        offsite = self.offsite if fetched else None
        if offsite is not None:
            offsite.fetch(name, identity, report)
        if self.database.file is not None:  # a new machine: the restore stages beside it
            self.database.file.parent.mkdir(parents=True, exist_ok=True)
        swapped = False
        adopted = None
        kept = Kept()
        try:
            with backups.exclusive("restore", wait=False, limits=limits):
                if source is not None:
                    candidate = source(report, limits)
                else:
                    candidate = prepare(backups, name, report, limits)
                try:
                    with backups.engine.exclusive(), pause():
                        self.database.release()  # the file alone is the database after this
                        self.migrator.close()
                        try:
                            kept = keep_current(backups, candidate, report, limits)
                            set_aside = swap(backups, candidate, kept)
                        except BaseException:
                            with contextlib.suppress(Exception):
                                self.database.connect()
                            raise
                        swapped = True
                        report("restore", 1, 1)
                        if self.database.file is not None:  # its position is of the old file
                            forget_position(self.database.file)
                        reopened = self._reopen_after_restore(name, kept.name)
                        elapsed = time.monotonic() - started
                finally:
                    candidate.discard()
                    if swapped and kept.linked is not None:  # the bot's work goes on meanwhile
                        kept, damaged = self._list_kept(kept.linked, report, limits)
                        set_aside += damaged
        finally:  # the database is the copy's now, even when reopening it failed
            if swapped and offsite is not None:
                adopted = offsite.adopt(name)
        version = self.revisions.version_of(candidate.facts.revision)
        safety = kept.safety
        log.info(  # the time until the restored database was open: listing the old one follows
            "restored %s (schema v%d) in %.1fs (replaced and reopened)%s",
            name,
            version,
            elapsed,
            f"; the previous database is saved as {safety.name}" if safety else "",
        )
        return RestoreReport(name, version, safety, reopened, round(elapsed, 3), set_aside, adopted)

    # -- restoring from the replica (offsite/replica.py) ---------------------------------------

    def restore_replica(
        self,
        at: datetime | None = None,
        *,
        pause: Pause = contextlib.nullcontext,
        progress: Progress | None = None,
    ) -> tuple[RestoreReport, Position]:
        """Replace the live database with the replica's newest state (``at`` None: a new
        machine after the old one died) or its state at ``at``, through ``restore``: the
        time is checked against the replica before anything runs, Litestream restores into a
        staging file beside the database, which is proven sound like a backup."""
        from .offsite.replica import replica_for, when

        replica = replica_for(self.settings, self.database.file, self.database.dialect)
        label = "the replica" + (f" at {when(at)}" if at is not None else "")
        restored: list[Position] = []

        def fetch(progress: Progress, limits: Limits) -> RestoreCandidate:
            staging = self.backups.engine.staging()
            assert staging is not None
            staging.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            progress("replica", 0, None)
            restored.append(replica.restore_into(staging, at, limits))
            progress("replica", 1, 1)
            return prepare_raw(self.backups, label, staging, progress, limits)

        report = self.restore(label, pause=pause, progress=progress, source=fetch)
        return report, restored[0]

    def _list_kept(self, link: Path, progress: Progress, limits: Limits) -> tuple[Kept, list[Path]]:
        """List the replaced database (``finish_kept``) once the restored one is open: the
        restore's time ends at the reopen, this follows it. A failure leaves it for the next
        command (``forget_unswapped`` lists it); never deleted."""
        try:
            safety, damaged = finish_kept(self.backups, link, progress, limits)
        except Exception as error:
            log.warning(
                "the replaced database is kept as %s but could not be listed yet (%s): the "
                "next command lists it",
                link,
                error,
            )
            return Kept(linked=link), []
        return Kept(safety), damaged

    def _reopen_after_restore(self, name: str, kept: str | None) -> MigrationReport | None:
        """Connect, and bring the restored schema forward to head (no pre-migration copy: the
        backup is that copy)."""
        try:
            self.database.connect()
            report = None
            if not self.revisions.managed:
                return None
            if self.migration_settings.auto_upgrade:
                with self.migrator.locked() as schema:
                    status, pending = schema.plan()
                    report = schema.upgrade(pending, status)
            else:
                status = self.migrator.status()
                if status.pending:
                    log.warning(
                        "the restored database is at %s (head %s); `dbkeeper db migrate` "
                        "brings it forward (auto_upgrade is off)",
                        status.current_name,
                        status.pending[-1].name,
                    )
            self.last_validation = self.validate()
            return report
        except Exception as error:
            where = f"is kept as {kept}" if kept else "did not exist"
            raise BackupError(
                f"restored {name}, but opening it afterwards failed: {error}. The previous "
                f"database {where}; `dbkeeper backup restore {kept or name}` puts it back."
            ) from error
