"""The database plugin's ``dbkeeper`` sub-commands: ``db``, ``backup`` and ``replication``."""

from .backup import backup
from .db import db
from .replication import replication

__all__ = ["backup", "db", "replication"]
