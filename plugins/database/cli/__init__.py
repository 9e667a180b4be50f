"""The database plugin's ``dbkeeper`` sub-commands: ``db`` and ``backup``."""

from .backup import backup
from .db import db

__all__ = ["backup", "db"]
