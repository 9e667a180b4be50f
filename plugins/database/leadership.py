"""Which of several bot instances on one database leads.

The leader does what must happen once per database, not once per instance: scheduled backups,
the shutdown backup, alerts, and (in polling mode) taking Telegram updates, since Telegram
serves one ``getUpdates`` poller per token. Every instance keeps answering health requests and,
in webhook mode, updates.

The lock is the migration lock's sibling: a PostgreSQL session advisory lock on a connection of
its own, or ``flock`` on a file beside a SQLite database. Both vanish with their holder, so a
standby takes over at its next poll after the leader dies.

Leadership is sticky through outages: a leader that cannot reach the database (a PostgreSQL
restart) keeps leading until it learns that another instance holds the lock, so an outage is
reported by one instance and resolved by one, not by none or by all.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from sqlalchemy import Engine, text

from dbkeeper.leadership import ChangeCallback

from .engines import APPLICATION_NAMES, create_database_engine, database_url, sqlite_file
from .locks import LEADER_LOCK_ID, AdvisoryLock, FileLock, leader_lock
from .settings import DatabaseSettings
from .timeouts import in_daemon_thread

log = logging.getLogger("dbkeeper.leader")
LEADER_APPLICATION_NAME = APPLICATION_NAMES["leader"] + " "


class _PostgresLeaderLock(AdvisoryLock):
    """The advisory lock, on a connection named after the instance so others can see who leads."""

    def __init__(self, engine: Engine, instance: str) -> None:
        super().__init__(engine, LEADER_LOCK_ID)
        self.instance = instance

    def alive(self) -> bool:
        """Is our lock connection still there (and with it the lock)?"""
        if self.connection is None:
            return False
        try:
            self.connection.execute(text("SELECT 1"))
            return True
        except Exception:
            self.forget()
            return False

    def holder(self) -> str:
        """The leading instance's name; raises when the database is unreachable."""
        session = self.holding_session()
        name = session.application_name if session is not None else None
        prefix = LEADER_APPLICATION_NAME
        return name[len(prefix) :] if name and name.startswith(prefix) else (name or "")


class _FileLeaderLock:
    """``flock`` on ``bot.db.leader.lock``, which names the leading instance."""

    def __init__(self, path: Path, instance: str) -> None:
        self.lock: FileLock = leader_lock(path, instance)

    def try_acquire(self) -> bool:
        return self.lock.try_acquire()

    def release(self) -> None:
        self.lock.release()

    def alive(self) -> bool:
        return self.lock.held

    def holder(self) -> str:
        text_ = self.lock.holder()
        return "" if text_ == "another process" else text_


class Leadership:
    """Campaigns for the leader lock, polls it, and reports changes."""

    def __init__(
        self,
        database: DatabaseSettings,
        *,
        instance: str,
        poll_seconds: float = 5.0,
    ) -> None:
        self.database = database
        self.instance = instance
        self.poll_seconds = poll_seconds
        self.is_leader = False
        self.leader: str | None = None  # the leading instance's name, as last seen
        self._lock: _PostgresLeaderLock | _FileLeaderLock | None = None
        self._engine: Engine | None = None
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[ChangeCallback] = []
        self._confirmed = True  # False while a leader cannot reach the database
        self._pending: asyncio.Future[tuple[bool, str | None, bool]] | None = None
        self._free_polls = 0  # consecutive polls that found the lock free
        self._stopped = False
        self._timeout = max(1.0, database.connect_timeout_seconds)

    def on_change(self, callback: ChangeCallback) -> None:
        """Call ``callback(is_leader)`` whenever this instance gains or loses leadership."""
        self._listeners.append(callback)

    async def start(self) -> None:
        """Campaign once now (so a lone instance leads from the start), then keep polling."""
        self._lock = self._make_lock()  # no I/O: engines connect lazily
        self._stopped = False
        await self.poll(eager=True)
        self._task = asyncio.create_task(self._run(), name="dbkeeper-leadership")

    async def stop(self, timeout: float | None = None) -> None:
        """Stop campaigning and hand the lock back so a standby takes over at once.

        Handing back waits at most ``timeout`` seconds (a hung server): the lock goes with the
        session anyway when the process exits.
        """
        self._stopped = True  # also ends a loop whose cancellation a callback swallowed
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._lock is not None:
            try:  # a hung server must not hold the exit: closing the session frees it anyway
                limit = self._timeout if timeout is None else min(self._timeout, timeout)
                await asyncio.wait_for(in_daemon_thread(self._release), max(0.1, limit))
            except TimeoutError:
                log.warning("releasing the leader lock timed out; the server frees it")
        if self.is_leader:
            log.info("%s stepped down as leader", self.instance)
        self.is_leader = False
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    async def _run(self) -> None:
        while not self._stopped:
            # A leader that lost its connection probes fast; a standby takes a free lock only
            # on its second poll in a row that finds it free, so a leader coming back from an
            # outage gets its own lock back first.
            await asyncio.sleep(self.poll_seconds if self._confirmed else self.poll_seconds / 4)
            try:
                await self.poll()
            except Exception:
                log.exception("leader election poll failed")

    async def poll(self, *, eager: bool = False) -> None:
        """One round: confirm our lock, or try to take it; note who leads; report changes.

        ``eager``: take a free lock at once (the first round at start), not on the second
        sighting as a standby does.

        The round runs on a daemon thread and is given up after a while: a server that stopped
        answering leaves this instance in its current role, unconfirmed, and never hangs it.
        """
        if self._pending is not None and not self._pending.done():
            self._confirmed = False  # the last round is still stuck on the server
            return
        was_leader = self.is_leader
        self._pending = in_daemon_thread(
            lambda: self._campaign(eager or self.is_leader), name="dbkeeper-leadership"
        )
        try:
            is_leader, leader, confirmed = await asyncio.wait_for(
                asyncio.shield(self._pending), self._timeout
            )
        except TimeoutError:
            self._confirmed = False
            log.warning("leader election: the database did not answer; roles unchanged")
            return
        if self._stopped:
            self._release_if(is_leader)
            return
        self.is_leader, self.leader, self._confirmed = is_leader, leader, confirmed
        if is_leader != was_leader:
            if is_leader:
                log.info("%s is now the leader", self.instance)
            else:
                log.info("%s is no longer the leader; %s leads", self.instance, leader or "nobody")
            for callback in self._listeners:
                await callback(is_leader)

    def _campaign(self, eager: bool) -> tuple[bool, str | None, bool]:
        lock = self._lock
        assert lock is not None
        if self.is_leader and lock.alive():
            return True, self.instance, True
        try:
            if lock.try_acquire():
                self._free_polls += 1
                if eager or self._free_polls >= 2:
                    return True, self.instance, True
                lock.release()  # seen free once: the leader may be on its way back
                return False, None, True
            self._free_polls = 0
            leader = lock.holder() or None
        except Exception as error:  # the database is unreachable: keep whatever role we had
            if self.is_leader:
                log.warning("cannot confirm leadership (%s); still leading", type(error).__name__)
            return self.is_leader, self.leader, False
        return False, leader, True

    def _release_if(self, acquired: bool) -> None:
        """A round that finished after ``stop`` must not keep the lock it took."""
        if acquired and self._lock is not None:
            self._release()

    def _release(self) -> None:
        assert self._lock is not None
        try:
            self._lock.release()
        except Exception:  # closing the session (or the process exiting) releases it anyway
            log.debug("releasing the leader lock failed", exc_info=True)

    def _make_lock(self) -> _PostgresLeaderLock | _FileLeaderLock:
        file = sqlite_file(database_url(self.database))
        if file is None:
            # Its own connection, named so that every instance can see who leads.
            self._engine = create_database_engine(self.database, "leader", name=self.instance)
            return _PostgresLeaderLock(self._engine, self.instance)
        return _FileLeaderLock(file, self.instance)


def describe(leadership: Leadership | None) -> str:
    """ "this instance (host:pid) leads" / "host:pid leads" for chat and health answers."""
    if leadership is None:
        return "single instance"
    if leadership.is_leader:
        return f"{leadership.instance} (this instance) leads"
    return f"{leadership.leader or 'no instance'} leads; this is {leadership.instance}"
