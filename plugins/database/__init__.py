"""The database plugin: migrations on startup, health, backups, admin commands, for any bot's
schema (``[migrations] script_location`` and ``metadata``).

In a bot's own handlers: ``context.bot_data[BOT_DATA_KEY]`` is the :class:`Database`.
"""

from .errors import (
    BackupError,
    BackupInProgress,
    DatabaseError,
    DatabaseUnavailable,
    InvalidBackup,
    MigrationError,
)
from .handle import BOT_DATA_KEY, Database
from .plugin import DatabasePlugin

__all__ = [
    "BOT_DATA_KEY",
    "BackupError",
    "BackupInProgress",
    "Database",
    "DatabaseError",
    "DatabasePlugin",
    "DatabaseUnavailable",
    "InvalidBackup",
    "MigrationError",
]
