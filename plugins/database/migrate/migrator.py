"""Applying and reverting revisions with Alembic as the engine, every attempt recorded.

The shape follows our migration research: take a lock that one process holds at a time, then
call ``alembic.command.upgrade`` once per pending revision inside a transaction of our own.
Each revision gets its duration, its own history row, retries of transient errors, and
all-or-nothing application (a killed process leaves the previous version).

Reading the state (``status``, ``attempts``, ``validate``) needs no lock. Changing it happens
inside ``with migrator.locked() as schema:``; :class:`SchemaChange` holds the lock and the one
connection every step runs on (``schema_change``).

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
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, event
from sqlalchemy import exc as sa_exc

from ..engines import adopting, create_database_engine, database_url
from ..errors import MigrationError, MigrationInterrupted, SchemaTooNew
from ..retry import RetryPolicy, describe_error
from ..settings import DatabaseSettings, MigrationSettings
from .alembic_import import load_alembic
from .history import Attempt, MigrationHistory, MigrationStats
from .outcomes import AppliedStep, MigrationReport, MigrationStatus
from .revisions import Revision, Revisions
from .schema_change import SchemaChange
from .validation import ValidationReport, validate

log = logging.getLogger("dbkeeper.migrations")
_SCHEMA_CHANGES = threading.Lock()
# An interrupted revision's statement is cancelled again after these pauses (doubling) until
# the revision has stopped.
CANCEL_REPEAT_SECONDS = (0.05, 1.0)


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
            load_alembic()
            from alembic.runtime.migration import MigrationContext

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
                    load_alembic()
                    from alembic import command

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


__all__ = [
    "AppliedStep",
    "MigrationReport",
    "MigrationStatus",
    "Migrator",
    "SchemaChange",
]
