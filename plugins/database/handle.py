"""What a bot's own code uses: ``context.bot_data["dbkeeper.database"]``.

::

    from dbkeeper.plugins.database import BOT_DATA_KEY

    async def start(update, context):
        database = context.bot_data[BOT_DATA_KEY]
        await database.run(lambda session: session.merge(User(id=update.effective_user.id)))

All of the bot's database access can go through it: ``run``/``read`` (a function of a session,
on a worker thread, never on the event loop), or ``engine``/``sessions`` for code that wants
SQLAlchemy directly. A restore pauses all of it and hands it the restored database; an engine
the bot creates itself cannot be paused, and is reported when it connects.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from .backup.manifest import Backup
    from .backup.restore import RestoreReport
    from .plugin import DatabasePlugin

T = TypeVar("T")
BOT_DATA_KEY = "dbkeeper.database"
_LIVE: weakref.WeakValueDictionary[str, Database] = weakref.WeakValueDictionary()


class Database:
    """The running bot's database (published in ``bot_data`` under :data:`BOT_DATA_KEY`)."""

    def __init__(self, plugin: DatabasePlugin) -> None:
        self._plugin = plugin
        _LIVE[BOT_DATA_KEY] = self

    @property
    def engine(self) -> Engine:
        """The bot's engine: the same object before and after a restore."""
        return self._plugin.operations.database.engine

    @property
    def sessions(self) -> sessionmaker[Session]:
        """``with database.sessions() as session, session.begin(): ...`` (blocking: off the
        event loop, or keep it short)."""
        return self._plugin.operations.database.sessions

    @property
    def dialect(self) -> str:
        return str(self._plugin.operations.database.dialect)

    async def run(self, work: Callable[[Session], T]) -> T:
        """``work(session)`` in one write transaction on a worker thread; its result."""
        return await self._plugin.operations.database.run(work)

    async def read(self, work: Callable[[Session], T]) -> T:
        """Like ``run`` for work that only reads."""
        return await self._plugin.operations.database.read(work)

    async def backups(self) -> list[Backup]:
        """The complete, verified backups, newest first."""
        return await asyncio.to_thread(self._plugin.operations.backups.list)

    async def backup(self, reason: str = "manual") -> Backup:
        """A verified backup now (``BackupInProgress`` while another runs)."""
        return await self._plugin.backup_now(reason)

    async def restore(self, name: str) -> RestoreReport:
        """Replace the database with backup ``name`` (a safety copy is kept); the bot's
        database work waits meanwhile and then goes on on the restored database."""
        return await self._plugin.restore(name)

    def __reduce__(self) -> tuple[Callable[[], Database | None], tuple[()]]:
        """PTB persistence pickles ``bot_data``: the handle comes back as the live one."""
        return (_live, ())


def _live() -> Database | None:
    return _LIVE.get(BOT_DATA_KEY)


__all__ = ["BOT_DATA_KEY", "Database"]
