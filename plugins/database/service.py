"""The database service: one engine, connect retries, and async-friendly access for bot code.

Bot handlers run on the event loop; SQLAlchemy's engine is blocking. ``run`` and ``read`` hand a
function to a small thread pool of the service's own, so a slow query never stalls the loop and
the bot's queries never queue behind a backup (which runs on the default executor).

Every unit of work passes a gate. A restore closes the gate, waits for the work inside to finish,
swaps the database file and opens it again: callers simply wait for the swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from dbkeeper.config import DatabaseSettings
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from .engine import (
    SQLITE_BEGIN,
    create_database_engine,
    database_url,
    safe_url,
    sqlite_file,
)
from .errors import DatabaseUnavailable, describe_error, is_transient

log = logging.getLogger("dbkeeper.database")
T = TypeVar("T")


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

    @contextlib.asynccontextmanager
    async def closed(self) -> AsyncIterator[None]:
        """Hold new work back and wait until work in progress has finished."""
        self._open.clear()
        try:
            await self._idle.wait()
            yield
        finally:
            self._open.set()


class DatabaseService:
    """Owns the engine. Blocking methods are plain; ``run``/``read`` are their async faces."""

    def __init__(self, settings: DatabaseSettings, *, workers: int = 4) -> None:
        self.settings = settings
        self.url = database_url(settings)
        self.dialect = self.url.get_backend_name()
        self.file: Path | None = sqlite_file(self.url)
        self._engine: Engine | None = None
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._gate: WorkGate | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the database is not connected; call connect() first")
        return self._engine

    @property
    def connected(self) -> bool:
        return self._engine is not None

    @property
    def display_url(self) -> str:
        return safe_url(self.url)

    def connect(self, *, sleep: Callable[[float], None] = time.sleep) -> None:
        """Open the engine and prove it with a round trip; retry as configured, then fail."""
        if self._engine is not None:
            return
        self._prepare_sqlite_directory()
        engine = create_database_engine(self.settings)
        attempts = self.settings.connect_retries
        for attempt in range(1, attempts + 1):
            try:
                with engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
                break
            except Exception as error:
                reason = describe_error(error)
                if attempt == attempts:
                    engine.dispose()
                    raise DatabaseUnavailable(
                        f"cannot connect to {self.display_url} after {attempts} "
                        f"attempt{'s' if attempts > 1 else ''}: {reason}. " + self._connect_hint()
                    ) from error
                delay = self._backoff(attempt)
                log.warning(
                    "connecting to %s failed (attempt %d of %d): %s; retrying in %.1fs",
                    self.display_url,
                    attempt,
                    attempts,
                    reason,
                    delay,
                )
                sleep(delay)
        self._engine = engine
        log.info("connected to %s", self.display_url)

    def close(self) -> None:
        """Return every connection and stop the worker threads; safe to call twice."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
            log.info("closed the connection to %s", self.display_url)

    def _backoff(self, attempt: int) -> float:
        delays = self.settings.retry_backoff_seconds
        return float(delays[min(attempt - 1, len(delays) - 1)])

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

    def _connect_hint(self) -> str:
        if self.file is not None:
            return "Check that the file's directory is writable and the file is a SQLite database."
        return "Check that the server is running and the URL, user and database are right."

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

    def is_transient(self, error: BaseException) -> bool:
        return is_transient(error)
