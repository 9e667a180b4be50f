"""Errors the database plugin raises. Every message is meant for operators: what happened,
what was kept safe, and what to do next."""

from __future__ import annotations

from dbkeeper.plugin import OperatorError

from .retry import describe_error, is_transient

__all__ = [
    "BackupError",
    "BackupInProgress",
    "DatabaseError",
    "DatabaseMissing",
    "DatabaseUnavailable",
    "InvalidBackup",
    "MigrationError",
    "MigrationInterrupted",
    "SchemaTooNew",
    "UnmanagedDatabase",
    "describe_error",
    "is_transient",
]


class DatabaseError(OperatorError):
    """Base of the plugin's own errors."""


class DatabaseUnavailable(DatabaseError):
    """The database could not be reached after every configured attempt."""


class DatabaseMissing(DatabaseError):
    """A read-only command found no database (it creates none)."""


class MigrationError(DatabaseError):
    """Migrating failed; the database stays at the last version that applied cleanly."""


class MigrationInterrupted(MigrationError):
    """A signal stopped a running revision; it was rolled back."""


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
