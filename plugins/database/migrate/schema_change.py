"""One schema change: the migration lock and the one connection every step runs on.

On PostgreSQL the advisory lock is taken on that very connection: if the connection is lost,
so is the lock, and no statement can run without it; the retry reconnects, takes the lock again
(waiting if another instance got it) and looks at what is left to do before doing anything
(never a revision applied twice). Each revision runs in a transaction of its own with its
history row, so a killed process leaves the previous version.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, inspect
from sqlalchemy import exc as sa_exc

from ..engines import SQLITE_BEGIN, adopting
from ..errors import MigrationError, MigrationInterrupted, UnmanagedDatabase
from ..locks import MIGRATION_LOCK_ID, AdvisoryLock, FileLock, acquire, migration_lock
from ..retry import describe_error, is_transient
from .alembic_import import load_alembic
from .bookkeeping import BOOKKEEPING_TABLES
from .history import INTERRUPTED, Attempt, utcnow
from .outcomes import AppliedStep, MigrationReport, MigrationStatus
from .revisions import Revision

if TYPE_CHECKING:
    from .migrator import Migrator

log = logging.getLogger("dbkeeper.migrations")


class SchemaChange:
    """The lock, and the one connection every step of a schema change runs on."""

    def __init__(self, migrator: Migrator, stopped: Callable[[], str | None]) -> None:
        self.migrator = migrator
        self.history = migrator.history
        self._stopped = stopped
        self._file_lock: FileLock | None = None
        self._advisory: AdvisoryLock | None = None
        self._unreachable: str | None = None  # why the last try to take the lock could not ask
        self.connection: Connection | None = None

    # -- the lock ---------------------------------------------------------------------------------

    def lock(self) -> None:
        migrator = self.migrator
        if migrator.dialect == "postgresql":
            self._advisory = AdvisoryLock(migrator.engine, MIGRATION_LOCK_ID)
            self._wait_for(self._take_advisory, self._advisory.holder)
            return
        file = Path(migrator.url.database or "")
        file.parent.mkdir(parents=True, exist_ok=True)
        self._file_lock = migration_lock(file)
        self._wait_for(self._file_lock.try_acquire, self._file_lock.holder)
        self.connection = migrator.engine.connect()

    def _wait_for(self, attempt: Callable[[], bool], holder: Callable[[], str]) -> None:
        acquire(
            attempt,
            holder=holder,
            timeout=self.migrator.settings.lock_timeout_seconds,
            on_wait=lambda who: log.info(
                "another process is migrating this database (%s); waiting for it", who
            ),
            gave_up=lambda why: self._gave_up(
                f"gave up waiting for the migration lock: {why}",
                "If that process is stuck, stop it and start again.",
            ),
            stopped=self._stopped,
        )

    def _gave_up(self, what: str, advice: str) -> MigrationError:
        """The error of a lock wait that ended without the lock (stopped, or out of time)."""
        if self._stopped() is not None:
            return MigrationInterrupted(
                f"{what}; nothing was applied while waiting. Start again to migrate."
            )
        if self._unreachable is not None:
            what += f" (the database could not be reached: {self._unreachable})"
        return MigrationError(f"{what}. {advice}")

    def _take_advisory(self, *, outage_is_wait: bool = False) -> bool:
        """One try at the advisory lock, on a new connection that becomes the migrating one.

        ``outage_is_wait``: a server that cannot be reached counts as "not yet" (taking a lost
        lock again, in the middle of a migration: the wait is bounded by the lock timeout).
        """
        assert self._advisory is not None
        try:
            connection = self.migrator.engine.connect()
        except sa_exc.DBAPIError as error:
            if not (outage_is_wait and is_transient(error)):
                raise
            if self._unreachable is None:
                log.warning(
                    "cannot reach the database to take the migration lock (%s); trying again",
                    describe_error(error),
                )
            self._unreachable = describe_error(error)
            return False
        self._unreachable = None
        try:
            if self._advisory.try_acquire(connection):
                self.connection = connection
                return True
        except BaseException:
            connection.close()
            raise
        connection.close()
        return False

    def _relock_if_lost(self) -> None:
        """PostgreSQL: the lock lives on our connection; after losing it, wait for it again."""
        if self._advisory is None or self._advisory.alive():
            return
        log.warning(
            "lost the migration lock (its session ended: the connection dropped or was "
            "terminated); taking it again before going on"
        )
        self._advisory.forget()
        self.connection = None
        acquire(
            lambda: self._take_advisory(outage_is_wait=True),
            holder=self._advisory.holder,
            timeout=self.migrator.settings.lock_timeout_seconds,
            on_wait=lambda holder: (
                None  # unreachable: said once by _take_advisory
                if self._unreachable
                else log.info("waiting for the migration lock (%s)", holder)
            ),
            gave_up=lambda why: self._gave_up(
                f"lost the migration lock and could not take it again: {why}",
                "The database stays at the last revision that committed; start again.",
            ),
            stopped=self._stopped,
        )
        log.info("took the migration lock again")

    def unlock(self) -> None:
        try:
            if self._advisory is not None:
                with contextlib.suppress(Exception):  # a dead session released it already
                    self._advisory.release()
                self.connection = None
            if self.connection is not None:
                self.connection.close()
                self.connection = None
        finally:
            if self._file_lock is not None:
                self._file_lock.release()

    @property
    def conn(self) -> Connection:
        assert self.connection is not None
        return self.connection

    @contextlib.contextmanager
    def _transaction(self, *, immediate: bool = False) -> Iterator[Connection]:
        conn = self.conn
        if conn.in_transaction():
            conn.rollback()
        if conn.dialect.name == "sqlite":
            conn.execution_options(**{SQLITE_BEGIN: "IMMEDIATE" if immediate else "DEFERRED"})
        with conn.begin():
            yield conn

    # -- planning ---------------------------------------------------------------------------------

    def status(self) -> MigrationStatus:
        status = self.migrator.status(self.conn)
        if self.conn.in_transaction():
            self.conn.commit()
        return status

    def close_interrupted(self) -> list[Attempt]:
        """Mark attempts left "running" by a process that died (only while holding the lock)."""
        if not self.history.exists(self.conn):
            return []
        with self._transaction() as conn:
            stale = self.history.close_interrupted(conn)
        for attempt in stale:
            log.warning(
                "an earlier attempt to %s %s (pid %d on %s, started %s) was interrupted; "
                "its changes were rolled back",
                "apply" if attempt.direction == "upgrade" else "revert",
                attempt.version,
                attempt.pid,
                attempt.host,
                f"{attempt.started_at:%Y-%m-%d %H:%M:%S} UTC",
            )
        return stale

    def plan(self, target: str = "head") -> tuple[MigrationStatus, list[Revision]]:
        """The status, and the revisions an upgrade to ``target`` applies (oldest first)."""
        status = self.status()
        pending = list(status.pending)
        if target != "head":
            goal = self.migrator.revisions.find(target)
            ids = [r.id for r in pending]
            # up to the goal; nothing when the database is there already, or past it
            stop = ids.index(goal.id) + 1 if goal is not None and goal.id in ids else 0
            pending = pending[:stop]
        return status, pending

    def refuse_unmanaged(self) -> None:
        """A database with tables but no version was made outside dbkeeper: adopt, not migrate."""
        tables = sorted(set(inspect(self.conn).get_table_names()) - BOOKKEEPING_TABLES)
        if self.conn.in_transaction():
            self.conn.commit()
        if not tables:
            return
        metadata = self.migrator.metadata
        declared = set(metadata.tables) if metadata is not None else set()
        suggestion = (
            "`dbkeeper db baseline head` (its tables match the current schema)"
            if declared and declared <= set(tables)
            else "`dbkeeper db baseline REV` with the revision its schema matches"
        )
        shown = ", ".join(tables[:8]) + (", ..." if len(tables) > 8 else "")
        raise UnmanagedDatabase(
            f"the database already has {len(tables)} table{'s' if len(tables) > 1 else ''} "
            f"({shown}) but no migration history: it was created before dbkeeper managed it. "
            f"Nothing was changed. Adopt it with {suggestion}, then start again; "
            "`dbkeeper db status` lists the revisions."
        )

    # -- applying ---------------------------------------------------------------------------------

    def migrate(
        self, target: str = "head", before: Callable[[Sequence[Revision]], None] | None = None
    ) -> MigrationReport:
        """Close interrupted attempts, then apply what is pending up to ``target``. ``before``
        runs first when a versioned database is about to change (the pre-migration backup)."""
        interrupted = self.close_interrupted()
        status, pending = self.plan(target)
        if not pending:
            log.info(
                "schema is at %s%s; nothing to apply",
                status.current_name,
                " (head)" if status.at_head else "",
            )
            report = MigrationReport(status.current_version, status.current_version)
        else:
            if status.current is None:
                self.refuse_unmanaged()
            elif self.migrator.interrupted:  # a stop came while waiting: not even a backup
                raise MigrationInterrupted(
                    f"stopped before migrating ({self.migrator.interrupted}); nothing was changed"
                )
            elif before is not None:
                before(pending)
            report = self.upgrade(pending, status)
        report.interrupted = interrupted
        return report

    def upgrade(self, pending: Sequence[Revision], status: MigrationStatus) -> MigrationReport:
        report = MigrationReport(status.current_version, status.current_version)
        if not pending:
            return report
        log.info(
            "applying %d revision%s: %s -> %s (%s)",
            len(pending),
            "s" if len(pending) > 1 else "",
            status.current_name,
            pending[-1].name,
            ", ".join(r.id for r in pending),
        )
        for revision in pending:
            step = self.apply(revision, "upgrade")
            if step is not None:
                report.steps.append(step)
            else:
                report.done_elsewhere.append(revision)
            report.to_version = revision.version
        log.info(
            "schema is at v%d after %d revision%s in %d ms",
            report.to_version,
            len(report.steps),
            "s" if len(report.steps) > 1 else "",
            report.total_ms,
        )
        return report

    def downgrade(self, target: str) -> MigrationReport:
        """Revert revisions down to ``target`` (a revision, a number, "-N" or "base")."""
        status = self.status()
        revisions = self.migrator.revisions.all()
        applied = revisions[: len(revisions) - len(status.pending)]
        if target.startswith("-") and target[1:].isdigit():
            keep = max(0, len(applied) - int(target[1:]))
        else:
            goal = self.migrator.revisions.find(target)
            keep = 0 if goal is None else [r.id for r in revisions].index(goal.id) + 1
            if keep > len(applied):
                raise MigrationError(
                    f"the database is at {status.current_name}; {target} is newer. "
                    "Use `dbkeeper db migrate` to go forward."
                )
        report = MigrationReport(status.current_version, status.current_version)
        by_id = {r.id: r for r in revisions}
        for revision in reversed(applied[keep:]):
            step = self.apply(revision, "downgrade")
            if step is not None:
                report.steps.append(step)
            else:
                report.done_elsewhere.append(revision)
            below = by_id.get(revision.down_revision or "")
            report.to_version = below.version if below else 0
        if not report.steps:
            log.info("schema is already at %s; nothing to revert", status.current_name)
        return report

    def baseline(self, revision: Revision) -> None:
        current = self.migrator.current(self.conn)
        if self.conn.in_transaction():
            self.conn.commit()
        if current is not None:
            raise MigrationError(
                f"the database is already managed (at {current}); baseline is only for "
                "databases without a migration history. Use db migrate or db downgrade."
            )
        started = time.monotonic()
        with self._transaction() as conn:
            self.history.ensure_table(conn)
            attempt_id = self.history.start(
                conn, direction="baseline", attempt=1, **_row_fields(revision)
            )
            load_alembic()
            from alembic import command

            command.stamp(self.migrator.config(conn), revision.id)
            self.history.finish(conn, attempt_id, success=True, execution_ms=_ms_since(started))
        log.info("adopted the database at %s (%s)", revision.name, revision.label)

    def apply(self, revision: Revision, direction: str) -> AppliedStep | None:
        """Run one revision up or down, retrying transient errors (the one retry policy);
        raise on anything else.

        Returns None when, after taking a lost lock again, another instance had done it.
        Each attempt first commits a "running" row, then runs the revision in a transaction
        that also completes the row (when env.py shares the connection). When even the first
        write is blocked (another writer holds SQLite's lock), the failed attempt is written
        at the next chance instead.
        """
        migrator = self.migrator
        verb = "applying" if direction == "upgrade" else "reverting"
        unrecorded: list[dict[str, Any]] = []
        attempts = migrator.retry.attempts

        def attempt_once(attempt: int) -> AppliedStep | None:
            self._relock_if_lost()
            if self._already_done(revision, direction):
                log.info(
                    "%s was %s by another instance meanwhile; nothing to do here",
                    revision.label,
                    "applied" if direction == "upgrade" else "reverted",
                )
                return None
            stop = migrator.interrupted
            if stop:
                raise MigrationInterrupted(
                    f"stopped before {verb} revision {revision.label} ({stop}); nothing of it "
                    "ran. Start again to go on."
                )
            started_at, started = utcnow(), time.monotonic()
            attempt_id: int | None = None
            try:
                with self._transaction() as conn:
                    self.history.ensure_table(conn)
                    for failure in unrecorded:
                        self.history.insert_failed(conn, **failure)
                    attempt_id = self.history.start(
                        conn,
                        direction=direction,
                        attempt=attempt,
                        started_at=started_at,
                        **_row_fields(revision),
                    )
                unrecorded.clear()
                self._run(revision, direction, attempt_id, started)
            except Exception as error:
                interrupted = migrator.interrupted
                reason = describe_error(error)
                if interrupted:
                    reason = f"{INTERRUPTED}{interrupted}; the revision was rolled back"
                failure = {
                    "direction": direction,
                    "attempt": attempt,
                    "started_at": started_at,
                    "execution_ms": _ms_since(started),
                    "error": reason,
                    **_row_fields(revision),
                }
                if not self._record_failure(attempt_id, failure):
                    unrecorded.append(failure)
                raise _FailedAttempt(reason, interrupted, is_transient(error)) from error
            elapsed_ms = _ms_since(started)
            log.info(
                "%s %s in %d ms%s",
                "applied" if direction == "upgrade" else "reverted",
                revision.label,
                elapsed_ms,
                f" (attempt {attempt})" if attempt > 1 else "",
            )
            return AppliedStep(revision, direction, elapsed_ms, attempt)

        def report_retry(attempt: int, error: BaseException, delay: float) -> None:
            log.warning(
                "%s revision %s failed (attempt %d of %d, transient): %s; retrying in %.1fs",
                verb,
                revision.id,
                attempt,
                attempts,
                getattr(error, "reason", error),
                delay,
            )

        try:
            return migrator.retry.run(
                attempt_once,
                on_retry=report_retry,
                retryable=lambda error: isinstance(error, _FailedAttempt) and error.retryable,
            )
        except _FailedAttempt as failed:
            cause = failed.__cause__
            if failed.interrupted:
                again = (
                    "Start again to apply it; a long revision is best applied on its own "
                    "before the new version starts (`dbkeeper db migrate`)."
                    if direction == "upgrade"
                    else "Run the downgrade again to revert it."
                )
                raise MigrationInterrupted(
                    f"{verb} revision {revision.label} was interrupted ({failed.interrupted}) "
                    f"and rolled back; the database stays at the version before it. {again}"
                ) from None
            if not failed.transient:
                raise MigrationError(
                    f"{verb} revision {revision.label} failed: {failed.reason}. The change was "
                    "rolled back and the database stays at the version before it; fix the "
                    "revision and start again (`dbkeeper db history` shows every attempt)."
                ) from cause
            raise MigrationError(
                f"{verb} revision {revision.label} still failed after {attempts} "
                f"attempts: {failed.reason}. The database stays at the version before it; "
                "start again once the database is free."
            ) from cause

    def _run(self, revision: Revision, direction: str, attempt_id: int, started: float) -> None:
        """The revision itself: with a sharing env.py, in one transaction with its row."""
        migrator = self.migrator
        if migrator.shares_connection(self.conn):
            with self._transaction(immediate=True) as conn:
                with migrator._cancellable(conn):
                    self._alembic(conn, revision, direction)
                    _check_foreign_keys(conn)
                self.history.finish(conn, attempt_id, success=True, execution_ms=_ms_since(started))
            return
        stop = migrator.interrupted
        if stop:  # env.py's own connection cannot be cancelled from here
            raise MigrationInterrupted(stop)
        self._alembic(None, revision, direction)  # env.py commits on its own connection
        with self._transaction() as conn:
            self.history.finish(conn, attempt_id, success=True, execution_ms=_ms_since(started))

    def _alembic(self, conn: Connection | None, revision: Revision, direction: str) -> None:
        load_alembic()
        from alembic import command

        config = self.migrator.config(conn)
        with adopting():  # an env.py's own engine is dbkeeper's while it migrates
            if direction == "upgrade":
                command.upgrade(config, revision.id)
            else:
                command.downgrade(config, revision.down_revision or "base")

    def _already_done(self, revision: Revision, direction: str) -> bool:
        """After waiting for a lost lock: did another instance apply (revert) it meanwhile?"""
        if self._advisory is None:
            return False
        status = self.status()
        pending = {r.id for r in status.pending}
        return (revision.id not in pending) if direction == "upgrade" else (revision.id in pending)

    def _record_failure(self, attempt_id: int | None, failure: dict[str, Any]) -> bool:
        """Write a failed attempt on a fresh transaction, after the rollback; False if blocked."""
        try:
            self._relock_if_lost()
            with self._transaction() as conn:
                if attempt_id is None:
                    self.history.insert_failed(conn, **failure)
                else:
                    self.history.finish(
                        conn,
                        attempt_id,
                        success=False,
                        execution_ms=failure["execution_ms"],
                        error=failure["error"],
                    )
            return True
        except Exception as error:
            log.warning(
                "could not record the failed attempt yet (%s); it is written at the next chance",
                describe_error(error),
            )
            return False


class _FailedAttempt(Exception):
    """One attempt at a revision failed (and was recorded); whether another may help."""

    def __init__(self, reason: str, interrupted: str | None, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.interrupted = interrupted
        self.transient = transient

    @property
    def retryable(self) -> bool:
        return self.transient and not self.interrupted


def _check_foreign_keys(conn: Connection) -> None:
    """SQLite migrations run with foreign keys off; refuse to commit rows that break them."""
    if conn.dialect.name != "sqlite":
        return
    problems = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
    if problems:
        sample = ", ".join(f"{t} row {rowid} -> {parent}" for t, rowid, parent, _ in problems[:5])
        raise MigrationError(f"the revision left {len(problems)} broken foreign keys: {sample}")


def _row_fields(revision: Revision) -> dict[str, Any]:
    return {
        "version": revision.id,
        "description": revision.description,
        "checksum": revision.checksum,
    }


def _ms_since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
