"""Locks that let one process at a time change the schema; the others wait, then go on.

Both kinds are released by the operating system or the server when their holder dies, so a
killed process never leaves a stale lock behind (the trap of Liquibase's lock row):

* SQLite: ``flock`` on a file beside the database (``bot.db.migrate.lock``);
* PostgreSQL: a session advisory lock on a connection of its own (the lock of Flyway and
  golang-migrate). Behind a transaction-mode PgBouncer session locks do not work: point
  dbkeeper at the server or at a session-mode pool.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, Row, text

from .errors import MigrationError

# Advisory lock keys (two int4): "dbkm" and one number per purpose.
ADVISORY_NAMESPACE = 0x64626B6D
MIGRATION_LOCK_ID = 1
POLL_SECONDS = 0.2
WAIT_REPORT_SECONDS = 30.0


class SchemaLock(Protocol):
    def try_acquire(self) -> bool: ...
    def release(self) -> None: ...
    def holder(self) -> str: ...


def _owner_text() -> str:
    since = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"pid {os.getpid()} on {socket.gethostname()} since {since}"


class FileLock:
    """An exclusive ``flock`` on a file; the file records who holds it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, _owner_text().encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"


class NoLock:
    """For in-memory SQLite databases, which no other process can see."""

    def try_acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass

    def holder(self) -> str:
        return "nobody"


class AdvisoryLock:
    """A PostgreSQL session advisory lock held on a connection of its own."""

    def __init__(self, engine: Engine, lock_id: int = MIGRATION_LOCK_ID) -> None:
        self.engine = engine
        self.lock_id = lock_id
        self._connection: Connection | None = None

    def try_acquire(self) -> bool:
        connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        acquired = connection.execute(
            text("SELECT pg_try_advisory_lock(:ns, :id)"),
            {"ns": ADVISORY_NAMESPACE, "id": self.lock_id},
        ).scalar_one()
        if not acquired:
            connection.close()
            return False
        self._connection = connection
        return True

    def release(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            try:
                connection.execute(
                    text("SELECT pg_advisory_unlock(:ns, :id)"),
                    {"ns": ADVISORY_NAMESPACE, "id": self.lock_id},
                )
            finally:
                connection.close()  # closing the session releases the lock in any case

    def holding_session(self) -> Row[Any] | None:
        """The session holding the lock (pid, application_name, backend_start), if any."""
        query = text(
            "SELECT a.pid, a.application_name, a.backend_start "
            "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.classid = :ns AND l.objid = :id AND l.objsubid = 2"
        )
        with self.engine.connect() as connection:
            return connection.execute(query, {"ns": ADVISORY_NAMESPACE, "id": self.lock_id}).first()

    def holder(self) -> str:
        try:
            row = self.holding_session()
        except Exception:  # only used for a log line
            row = None
        if row is None:
            return "another instance"
        since = row.backend_start.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
        return f"{row.application_name or 'a session'} (server pid {row.pid}, connected {since})"


def acquire(
    lock: SchemaLock,
    *,
    timeout: float,
    on_wait: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Wait for ``lock`` up to ``timeout`` seconds, reporting the holder now and then."""
    deadline = clock() + timeout
    next_report = clock()
    while not lock.try_acquire():
        now = clock()
        if now >= deadline:
            raise MigrationError(
                f"gave up waiting for the migration lock after {timeout:.0f}s; it is held by "
                f"{lock.holder()}. If that process is stuck, stop it and start again."
            )
        if now >= next_report:
            on_wait(lock.holder())
            next_report = now + WAIT_REPORT_SECONDS
        time.sleep(min(POLL_SECONDS, max(0.0, deadline - now)))
