"""Applying and reverting revisions with Alembic as the engine, every attempt recorded.

The shape follows our migration research: take a lock that one process holds at a time, then
call ``alembic.command.upgrade`` once per pending revision inside a transaction of our own.
Each revision gets its duration, its own history row, retries of transient errors, and
all-or-nothing application (a killed process leaves the previous version).

Reading the state (``status``, ``attempts``, ``validate``) needs no lock. Changing it happens
inside ``with migrator.locked() as schema:``; :class:`SchemaChange` holds the lock and the one
connection every step runs on. On PostgreSQL the advisory lock is taken on that very
connection: if the connection is lost, so is the lock, and no statement can run without it;
the retry reconnects, takes the lock again (waiting if another instance got it) and looks at
what is left to do before doing anything (never a revision applied twice).

Interrupting (``Migrator.interrupt``, from a signal handler or the event loop): a lock wait
gives up, a revision not started yet does not start, and the statement of the running one is
cancelled (SQLite's ``interrupt``, a PostgreSQL cancel request; repeated until the revision has
stopped, so a statement that had not reached the database yet is cancelled too, and refused
outright once the request is in). Its transaction rolls back and the attempt is recorded as
interrupted.

Alembic's ``command`` module keeps its state in module globals, so within a process only one
thread may change a schema at a time (``_SCHEMA_CHANGES``, held around the cross-process lock).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, MetaData, event, inspect
from sqlalchemy import exc as sa_exc

from ..engines import SQLITE_BEGIN, adopting, create_database_engine, database_url
from ..errors import MigrationError, MigrationInterrupted, SchemaTooNew, UnmanagedDatabase
from ..locks import (
    MIGRATION_LOCK_ID,
    AdvisoryLock,
    FileLock,
    acquire,
    migration_lock,
)
from ..retry import RetryPolicy, describe_error, is_transient
from ..settings import DatabaseSettings, MigrationSettings
from .bookkeeping import BOOKKEEPING_TABLES
from .history import INTERRUPTED, Attempt, MigrationHistory, MigrationStats, utcnow
from .revisions import Revision, Revisions
from .validation import ValidationReport, validate

log = logging.getLogger("dbkeeper.migrations")
_SCHEMA_CHANGES = threading.Lock()
# An interrupted revision's statement is cancelled again after these pauses (doubling) until
# the revision has stopped.
CANCEL_REPEAT_SECONDS = (0.05, 1.0)


@dataclass(frozen=True)
class MigrationStatus:
    current: str | None
    current_version: int
    head: str | None
    head_version: int
    pending: tuple[Revision, ...]

    @property
    def at_head(self) -> bool:
        return not self.pending and self.current == self.head

    @property
    def current_name(self) -> str:
        if self.current is None:
            return "v0"
        numbered = self.current.isdigit()
        return f"v{self.current_version}" + ("" if numbered else f" ({self.current})")


@dataclass(frozen=True)
class AppliedStep:
    revision: Revision
    direction: str
    duration_ms: int
    attempts: int


@dataclass
class MigrationReport:
    from_version: int
    to_version: int
    steps: list[AppliedStep] = field(default_factory=list)
    interrupted: list[Attempt] = field(default_factory=list)
    # applied by another instance while this one waited for a lost lock
    done_elsewhere: list[Revision] = field(default_factory=list)

    @property
    def total_ms(self) -> int:
        return sum(step.duration_ms for step in self.steps)


class Migrator:
    """Applies, reverts and inspects the schema of one database."""

    def __init__(
        self,
        database: DatabaseSettings,
        settings: MigrationSettings,
        revisions: Revisions,
        *,
        metadata: MetaData | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.database = database
        self.settings = settings
        self.revisions = revisions
        self.metadata = metadata
        self.history = MigrationHistory()
        self.url = database_url(database)
        self.dialect = self.url.get_backend_name()
        self.retry = RetryPolicy(settings.retries, database.retry_backoff_seconds, sleep)
        self._engine: Engine | None = None
        self._shares: bool | None = None  # does env.py run on dbkeeper's connection?
        self._guard = threading.Lock()  # the two below, between the migrating thread and others
        self._running: Any = None  # the driver connection of the revision running now
        self._interrupt_requested: str | None = None
        self.stop_requested = threading.Event()  # set by interrupt: for the work around it

    # -- reading (no lock) -------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """Short-lived connections (no pool), foreign keys off on SQLite (batch mode)."""
        if self._engine is None:
            self._engine = create_database_engine(self.database, "migrations")
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    @contextlib.contextmanager
    def _reading(self, connection: Connection | None) -> Iterator[Connection]:
        if connection is not None:
            yield connection
            return
        with self.engine.connect() as conn:
            yield conn

    def current(self, connection: Connection | None = None) -> str | None:
        """The revision the database is at; None when it has no version yet."""
        with self._reading(connection) as conn:
            heads = MigrationContext.configure(conn).get_current_heads()
        if len(heads) > 1:
            raise MigrationError(f"the database has several current revisions: {heads}")
        return heads[0] if heads else None

    def status(self, connection: Connection | None = None) -> MigrationStatus:
        revisions = self.revisions.all()
        current = self.current(connection)
        known = {r.id: r for r in revisions}
        self._check_known(current, known, revisions)
        ids = [r.id for r in revisions]
        done = ids.index(current) + 1 if current else 0
        head = revisions[-1] if revisions else None
        return MigrationStatus(
            current=current,
            current_version=known[current].version if current else 0,
            head=head.id if head else None,
            head_version=head.version if head else 0,
            pending=tuple(revisions[done:]),
        )

    def stats(self, connection: Connection | None = None) -> MigrationStats:
        with self._reading(connection) as conn:
            return self.history.stats(conn)

    def attempts(
        self, limit: int | None = None, connection: Connection | None = None
    ) -> list[Attempt]:
        with self._reading(connection) as conn:
            return self.history.attempts(conn, limit)

    def validate(self, connection: Connection | None = None) -> ValidationReport:
        """Critical tables present, live schema as declared, applied revision files unchanged."""
        with self._reading(connection) as conn:
            return validate(
                conn,
                self.metadata,
                self.settings.critical_tables,
                self.revisions.all(),
                self.history.applied_checksums(conn),
            )

    def _check_known(
        self, current: str | None, known: dict[str, Revision], revisions: list[Revision]
    ) -> None:
        if current is None or current in known:
            return
        head = revisions[-1] if revisions else None
        head_text = f"v{head.version} ({head.id})" if head else "no revisions"
        newer = current.isdigit() and (head is None or int(current) > head.version)
        if newer:
            raise SchemaTooNew(
                f"the database is at schema v{int(current)} ({current}), newer than this code "
                f"knows (its head is {head_text}): newer code has migrated it. Refusing to run "
                "on a schema this version does not understand; deploy the newer code, or "
                "restore a backup taken before that upgrade."
            )
        raise SchemaTooNew(
            f"the database is at revision {current!r}, which is not among the revisions in "
            f"{self.revisions.location} (head {head_text}). Refusing to run on an unknown schema."
        )

    # -- changing (under the lock) -----------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[SchemaChange]:
        """Hold the schema lock (this process's, then every process's) for the block.

        A database error the steps do not handle themselves (the server went away while
        planning, say) becomes a :class:`MigrationError` that says what was kept.
        """
        with _SCHEMA_CHANGES:
            change = SchemaChange(self, lambda: self._interrupt_requested)
            try:
                change.lock()
                try:
                    yield change
                finally:
                    change.unlock()
            except sa_exc.SQLAlchemyError as error:
                raise MigrationError(
                    f"changing the schema failed: {describe_error(error)}. Every revision "
                    "either committed or rolled back as a whole; `dbkeeper db status` shows "
                    "where the database stands. Start again once the database is reachable."
                ) from error

    # -- interrupting (from any thread) ------------------------------------------------------------

    @property
    def interrupted(self) -> str | None:
        """Why the schema change was asked to stop (``interrupt``), or None."""
        return self._interrupt_requested

    def interrupt(self, why: str) -> None:
        """Stop the schema change in progress soon (see the module docstring); returns at once.

        Safe from any thread, e.g. a signal handler: the cancelling happens on a thread of its
        own (a PostgreSQL cancel request opens a connection).
        """
        with self._guard:
            if self._interrupt_requested is None:
                self._interrupt_requested = why
            running = self._running
        self.stop_requested.set()
        if running is None:
            return
        log.warning("interrupting the running revision (%s)", why)
        threading.Thread(
            target=self._cancel_until_stopped,
            args=(running,),
            name="dbkeeper-migration-cancel",
            daemon=True,
        ).start()

    def _cancel_until_stopped(self, driver: Any) -> None:
        """Cancel the revision's statement, and again until the revision has stopped: a
        statement that had not reached the database when a cancel went out gets the next."""
        pause, longest = CANCEL_REPEAT_SECONDS
        while True:
            with self._guard:  # never cancels anything after the revision's own statements
                if self._running is not driver:
                    return
                try:
                    if self.dialect == "sqlite":
                        driver.interrupt()
                    else:
                        driver.cancel_safe(timeout=5)
                except Exception as error:  # the statement ends anyway; only less promptly
                    log.warning("could not cancel the running statement: %s", error)
            time.sleep(pause)
            pause = min(pause * 2, longest)

    @contextlib.contextmanager
    def _cancellable(self, connection: Connection) -> Iterator[None]:
        """The revision's own statements: cancelled by ``interrupt`` while they run, refused
        once it was asked."""

        def refuse(*_: Any) -> None:
            if self._interrupt_requested is not None:
                raise MigrationInterrupted(self._interrupt_requested)

        driver = connection.connection.driver_connection
        with self._guard:
            refuse()
            self._running = driver
        event.listen(connection, "before_cursor_execute", refuse)
        try:
            yield
        finally:
            with self._guard:
                self._running = None
            event.remove(connection, "before_cursor_execute", refuse)

    def shares_connection(self, connection: Connection) -> bool:
        """Whether the directory's ``env.py`` runs on the connection dbkeeper hands it (then a
        revision commits with its history row, and can be interrupted). Asked once."""
        if self._shares is None:
            statements = []

            def seen(*_: Any) -> None:
                statements.append(1)

            event.listen(connection, "before_cursor_execute", seen)
            try:
                with adopting():
                    command.current(self.config(connection))
            finally:
                event.remove(connection, "before_cursor_execute", seen)
            if connection.in_transaction():
                connection.rollback()
            self._shares = bool(statements)
            if not self._shares:
                log.warning(
                    "the env.py of %s opens its own connection: each revision commits apart "
                    "from its history row, and a signal cannot interrupt a running revision. "
                    "The README shows the lines that let it share dbkeeper's connection.",
                    self.revisions.location,
                )
        return self._shares

    def config(self, connection: Connection | None = None) -> Any:
        return self.revisions.config(connection=connection, url=self.url, metadata=self.metadata)


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


__all__ = [
    "AppliedStep",
    "MigrationReport",
    "MigrationStatus",
    "Migrator",
    "SchemaChange",
    "datetime",
]
