"""The database plugin: migrations on startup, health, backups, admin commands."""

from .errors import DatabaseError, DatabaseUnavailable, MigrationError
from .migrator import Migrator
from .plugin import DatabasePlugin
from .service import DatabaseService

__all__ = [
    "DatabaseError",
    "DatabasePlugin",
    "DatabaseService",
    "DatabaseUnavailable",
    "MigrationError",
    "Migrator",
]
