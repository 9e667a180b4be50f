"""The database service: the bot's engine, connect retries, and async-friendly access.

Bot handlers run on the event loop; SQLAlchemy's engine is blocking. ``run`` and ``read`` hand a
function to a small thread pool of the service's own, so a slow query never stalls the loop and
the bot's queries never queue behind a backup (which runs on the default executor).

The engine object lives as long as the service: a bot may keep ``service.engine`` (or the
``sessions`` factory) and use it directly. A restore pauses every use of it and hands it the
restored database:

1. the work gate closes: ``run``/``read`` wait, work already inside finishes;
2. new checkouts from the engine's pool wait; connections already out are waited for;
3. the pool is emptied and the file swapped (``release``), then the generation advances: a
   connection opened before the swap is never handed out again, so nothing writes to the
   replaced file;
4. checkouts go on (on fresh connections to the restored database); the gate opens.

An engine of the bot's own that points at the same database cannot be paused that way: it is
reported once, when it first connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from .backup.engines.sqlite import interrupted_restore
from .engines import (
    SQLITE_BEGIN,
    create_database_engine,
    database_url,
    is_own,
    safe_url,
    sqlite_file,
)
from .errors import BackupError, DatabaseMissing, DatabaseUnavailable, describe_error
from .locks import check_database_directory
from .retry import RetryPolicy
from .settings import DatabaseSettings

log = logging.getLogger("dbkeeper.database")
T = TypeVar("T")
PAUSE_WAIT_SECONDS = 10.0  # a restore waits this long for the bot's connections to come back


class WorkGate:
    """Lets database work through until closed; closing waits for work already inside."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._inside = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.asynccontextmanager
    async def enter(self) -> AsyncIterator[None]:
        await self._open.wait()
        self._inside += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inside -= 1
            if self._inside == 0:
                self._idle.set()

    async def close(self, timeout: float) -> None:
        """Hold new work back and wait (at most ``timeout``) for work in progress to finish."""
        self._open.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            self._open.set()
            raise BackupError(
                f"the bot's database work did not finish within {timeout:.0f}s ({self._inside} "
                "units still running); nothing was changed. Try again when the bot is quieter."
            ) from None

    def open(self) -> None:
        self._open.set()

    @contextlib.asynccontextmanager
    async def closed(self, timeout: float = 10.0) -> AsyncIterator[None]:
        """Closed for the block (``close``, then ``open``)."""
        await self.close(timeout)
        try:
            yield
        finally:
            self.open()


class DatabaseService:
    """Owns the engine. Blocking methods are plain; ``run``/``read`` are their async faces."""

    def __init__(self, settings: DatabaseSettings, *, workers: int = 4) -> None:
        self.settings = settings
        self.url: URL = database_url(settings)
        self.dialect = self.url.get_backend_name()
        self.file: Path | None = sqlite_file(self.url)
        self._engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._gate: WorkGate | None = None
        self.retry = RetryPolicy(settings.connect_retries, settings.retry_backoff_seconds)
        # the pause of a restore (see the module docstring)
        self._generation = 0
        self._checkouts_open = threading.Event()
        self._checkouts_open.set()
        self._out = 0
        self._out_changed = threading.Condition()
        self._pauser: int | None = None
        self.foreign_engines: weakref.WeakSet[Engine] = weakref.WeakSet()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The bot's engine: the same object for the service's whole life, restores included."""
        if self._engine is None:
            raise RuntimeError("the database is not connected; call connect() first")
        return self._engine

    @property
    def sessions(self) -> sessionmaker[Session]:
        """A session factory on ``engine`` (``with database.sessions() as session: ...``)."""
        if self._sessions is None:
            self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        return self._sessions

    @property
    def connected(self) -> bool:
        return self._engine is not None

    @property
    def display_url(self) -> str:
        return safe_url(self.url)

    def exists(self) -> bool:
        """Whether there is a database to open without creating one (always on a server)."""
        return self.file is None or self.file.is_file()

    def connect(self, *, create: bool = True, sleep: Callable[[float], None] | None = None) -> None:
        """Open the engine and prove it with a round trip; retry as configured, then fail.

        ``create=False``: a missing SQLite file is an error (read-only commands create nothing).
        """
        if not create and not self.exists():
            raise DatabaseMissing(
                f"there is no database at {self.file} yet; `dbkeeper run` or "
                "`dbkeeper db migrate` creates it"
            )
        if self._engine is None:
            self._prepare_sqlite_directory()
            self._engine = self._create_engine()
        retry = self.retry if sleep is None else dataclasses.replace(self.retry, sleep=sleep)
        try:
            retry.run(
                lambda _attempt: self._round_trip(),
                on_retry=lambda attempt, error, delay: log.warning(
                    "connecting to %s failed (attempt %d of %d): %s; retrying in %.1fs",
                    self.display_url,
                    attempt,
                    self.retry.attempts,
                    describe_error(error),
                    delay,
                ),
                retryable=lambda _error: True,
            )
        except Exception as error:
            attempts = self.retry.attempts
            self._engine.dispose()
            raise DatabaseUnavailable(
                f"cannot connect to {self.display_url} after {attempts} "
                f"attempt{'s' if attempts > 1 else ''}: {describe_error(error)}. "
                + self._connect_hint()
            ) from error
        log.info("connected to %s", self.display_url)

    def _round_trip(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def _create_engine(self) -> Engine:
        engine = create_database_engine(self.settings, "app")
        event.listen(engine, "connect", self._on_connect)
        event.listen(engine, "checkout", self._on_checkout)
        event.listen(engine, "checkin", self._on_checkin)
        _watch_for_foreign_engines(self)
        return engine

    def close(self) -> None:
        """Return every connection and stop the worker threads; safe to call twice."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
            self._sessions = None
            log.info("closed the connection to %s", self.display_url)

    def _prepare_sqlite_directory(self) -> None:
        if self.file is None:
            return
        directory = self.file.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DatabaseUnavailable(
                f"cannot create the directory {directory} for the SQLite database {self.file}: "
                f"{error.strerror}. Point [database] url at a writable location."
            ) from error
        if not os.access(directory, os.W_OK | os.X_OK):
            raise DatabaseUnavailable(
                f"the directory {directory} of the SQLite database is not writable. "
                "Point [database] url at a writable location or fix its permissions."
            )
        check_database_directory(self.file)  # SQLite and dbkeeper's locks write there
        interrupted = interrupted_restore(self.file)  # never an empty database in its place
        if interrupted is not None:
            raise DatabaseMissing(interrupted)

    def _connect_hint(self) -> str:
        if self.file is not None:
            return "Check that the file's directory is writable and the file is a SQLite database."
        return "Check that the server is running and the URL, user and database are right."

    # -- the pause of a restore --------------------------------------------------------------------

    def _on_connect(self, _dbapi_connection: Any, record: Any) -> None:
        record.info["dbkeeper_generation"] = self._generation

    def _on_checkout(self, _dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        paused = not self._checkouts_open.is_set() and threading.get_ident() != self._pauser
        if paused and not self._checkouts_open.wait(PAUSE_WAIT_SECONDS * 6):
            raise DatabaseUnavailable("the database stayed paused for a restore too long")
        if record.info.get("dbkeeper_generation") != self._generation:
            raise DisconnectionError("opened before a restore: reconnecting")  # SQLAlchemy retries
        with self._out_changed:
            self._out += 1

    def _on_checkin(self, _dbapi_connection: Any, record: Any) -> None:
        with self._out_changed:
            self._out = max(0, self._out - 1)
            self._out_changed.notify_all()
        if record.info.get("dbkeeper_generation") != self._generation:
            record.invalidate()  # used across a restore: never handed out again

    @contextlib.contextmanager
    def paused(
        self, loop: asyncio.AbstractEventLoop | None = None, timeout: float = PAUSE_WAIT_SECONDS
    ) -> Iterator[None]:
        """Pause every use of the engine (from a worker thread; ``loop`` runs the gate)."""
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self.gate.close(timeout), loop).result()
        self._pauser = threading.get_ident()  # the restore itself reopens the database
        self._checkouts_open.clear()
        try:
            deadline = time.monotonic() + timeout
            with self._out_changed:
                while self._out > 0:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BackupError(
                            f"the bot kept {self._out} database connection(s) in use for "
                            f"{timeout:.0f}s; a restore under them would lose what they write. "
                            "Nothing was changed; try again when the bot is quieter."
                        )
                    self._out_changed.wait(left)
            yield
        finally:
            self._pauser = None
            self._checkouts_open.set()  # first: a checkout waiting on the loop's thread goes on
            if loop is not None:
                loop.call_soon_threadsafe(self.gate.open)

    def release(self) -> None:
        """Close every pooled connection (all are checked in: ``paused``) before a swap; the
        engine stays, and connects to whatever database is there next."""
        self._generation += 1
        if self._engine is not None:
            self._engine.dispose()

    # -- blocking access (threads, CLI, the plugin's own work) -------------------------------

    @contextlib.contextmanager
    def session(self, *, write: bool = True) -> Iterator[Session]:
        """A session in one transaction, committed on success and rolled back on error.

        On SQLite a writing session takes the write lock up front (BEGIN IMMEDIATE) so it waits
        for the busy timeout instead of failing when a read would have to upgrade to a write.
        """
        bind = self.engine
        if self.dialect == "sqlite":
            bind = bind.execution_options(**{SQLITE_BEGIN: "IMMEDIATE" if write else "DEFERRED"})
        with Session(bind, expire_on_commit=False) as session, session.begin():
            yield session

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection]:
        """A connection in one transaction (committed on success)."""
        with self.engine.begin() as connection:
            yield connection

    # -- async access (bot handlers) --------------------------------------------------------

    async def run(self, work: Callable[[Session], T]) -> T:
        """Run ``work(session)`` in one write transaction on a worker thread; return its result."""
        return await self.run_blocking(self._in_session, work, True)

    async def read(self, work: Callable[[Session], T]) -> T:
        """Like ``run`` for work that only reads (no write lock taken on SQLite)."""
        return await self.run_blocking(self._in_session, work, False)

    async def run_blocking(self, function: Callable[..., T], *args: object) -> T:
        """Run a blocking function on the service's threads, through the gate."""
        async with self.gate.enter():
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool(), lambda: function(*args))

    def _in_session(self, work: Callable[[Session], T], write: bool) -> T:
        with self.session(write=write) as session:
            return work(session)

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="dbkeeper-db")
        return self._executor

    @property
    def gate(self) -> WorkGate:
        if self._gate is None:
            self._gate = WorkGate()
        return self._gate

    def points_here(self, url: URL) -> bool:
        """Whether ``url`` is this service's database."""
        if url.get_backend_name() != self.dialect:
            return False
        if self.file is not None:
            other = sqlite_file(url)
            with contextlib.suppress(OSError):
                return other is not None and other.resolve() == self.file.resolve()
            return False
        return (url.host, url.port or 5432, url.database) == (
            self.url.host,
            self.url.port or 5432,
            self.url.database,
        )


# -- engines of the bot's own ------------------------------------------------------------------

_SERVICES: weakref.WeakSet[DatabaseService] = weakref.WeakSet()
_SEEN: weakref.WeakSet[Engine] = weakref.WeakSet()
_WATCHING = False


def _watch_for_foreign_engines(service: DatabaseService) -> None:
    """Report, once per engine, an engine that is not the service's but opens its database."""
    global _WATCHING
    _SERVICES.add(service)
    if not _WATCHING:
        _WATCHING = True
        event.listen(Engine, "engine_connect", _on_any_engine_connect)


def report_foreign_engines() -> None:
    """At startup: engines the bot made already (at import time, say) that open its database."""
    for candidate in gc.get_objects():
        if isinstance(candidate, Engine):
            _check_engine(candidate)


def _on_any_engine_connect(connection: Connection) -> None:
    _check_engine(connection.engine)


def _check_engine(engine: Engine) -> None:
    if engine in _SEEN or is_own(engine):
        return
    _SEEN.add(engine)
    for service in list(_SERVICES):
        if service._engine is None:
            continue
        try:
            here = service.points_here(engine.url)
        except Exception:
            here = False
        if here:
            service.foreign_engines.add(engine)
            log.warning(
                "an engine that is not dbkeeper's opened %s: a restore cannot pause it or hand "
                "it the restored database (its next writes would be lost). Use the database "
                "dbkeeper publishes (context.bot_data['dbkeeper.database'].engine or .run()).",
                service.display_url,
            )
