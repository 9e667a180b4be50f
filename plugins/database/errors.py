"""Errors the database plugin raises, and which database errors are worth retrying."""

from __future__ import annotations

import sqlite3

from dbkeeper.logs import redact
from sqlalchemy import exc as sa_exc

# SQLSTATEs that say "try again": serialization failure, deadlock, lock not available,
# the server shutting down or restarting, too many connections.
TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300"}
_SQLITE_TRANSIENT_CODES = {
    getattr(sqlite3, name)
    for name in ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_BUSY_SNAPSHOT", "SQLITE_BUSY_RECOVERY")
    if hasattr(sqlite3, name)
}
_SQLITE_TRANSIENT_TEXT = ("database is locked", "database table is locked", "database is busy")


class DatabaseError(Exception):
    """Base of the plugin's own errors; the message is meant for operators."""


class DatabaseUnavailable(DatabaseError):
    """The database could not be reached after every configured attempt."""


class MigrationError(DatabaseError):
    """Migrating failed; the database stays at the last version that applied cleanly."""


class SchemaTooNew(MigrationError):
    """The database is at a revision this code does not know (newer code migrated it)."""


class UnmanagedDatabase(MigrationError):
    """Tables exist but no migration history: created before dbkeeper managed it."""


class BackupError(DatabaseError):
    """A backup, verification or restore failed; the message says what was kept safe."""


class BackupInProgress(BackupError):
    """Another backup or restore holds the backup directory; this request was not started."""


class InvalidBackup(BackupError):
    """A backup file is damaged, foreign or too new to restore; nothing was changed."""


def is_transient(error: BaseException) -> bool:
    """True when retrying the same work could succeed: locks, lost connections, deadlocks."""
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, sa_exc.TimeoutError):  # no free connection in the pool, yet
        return True
    original = getattr(error, "orig", None) or error
    sqlstate = getattr(original, "sqlstate", None)
    if sqlstate:
        return sqlstate in TRANSIENT_SQLSTATES or sqlstate.startswith("08")
    if isinstance(original, sqlite3.OperationalError):
        if getattr(original, "sqlite_errorcode", None) in _SQLITE_TRANSIENT_CODES:
            return True
        return any(text in str(original).lower() for text in _SQLITE_TRANSIENT_TEXT)
    module = type(original).__module__
    # psycopg raises OperationalError without a SQLSTATE when the connection itself is lost.
    return module.startswith("psycopg") and type(original).__name__ == "OperationalError"


def describe_error(error: BaseException, limit: int = 2000) -> str:
    """One readable line for logs, history rows and chat: class, SQLSTATE, message; no secrets."""
    original = getattr(error, "orig", None) or error
    sqlstate = getattr(original, "sqlstate", None)
    message = " ".join(str(original).split()) or type(original).__name__
    prefix = type(original).__name__
    if sqlstate:
        prefix += f" [{sqlstate}]"
    text = redact(f"{prefix}: {message}")
    return text if len(text) <= limit else text[: limit - 1] + "…"
