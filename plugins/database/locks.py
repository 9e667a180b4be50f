"""Every lock dbkeeper takes, in one place.

==================  ==========================================  =================================
lock                SQLite (``flock`` on a file)                PostgreSQL (advisory lock)
==================  ==========================================  =================================
``migration``       ``bot.db.migrate.lock`` beside the database  key 1, on the migrating connection
``leader``          ``bot.db.leader.lock``                       key 2, on a named connection
``backup``          ``<backup dir>/.dbkeeper-backup.lock``       (the file lock, on every engine)
``in use``          ``bot.db.inuse.lock``, shared while a bot    (none: PostgreSQL serves many)
                    runs, exclusive while a restore swaps files
==================  ==========================================  =================================

Both kinds vanish with their holder (the kernel drops a dead process's ``flock``; the server
ends a dead session's advisory locks), so a killed process never leaves a stale lock behind (the
trap of Liquibase's lock row). Lock files are opened without following links and never
truncated through a path: a lock file planted as a symlink to the database is refused, not
written through. A directory dbkeeper writes to must be its own (or root's) and not writable by
everyone (:func:`check_directory`). A failure at any step releases what the step took.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, Row, text

from .errors import DatabaseError

log = logging.getLogger("dbkeeper.locks")
# Advisory lock keys (two int4): "dbkm" and one number per purpose.
ADVISORY_NAMESPACE = 0x64626B6D
MIGRATION_LOCK_ID = 1
LEADER_LOCK_ID = 2
POLL_SECONDS = 0.1
WAIT_REPORT_SECONDS = 30.0


class UnsafePath(DatabaseError):
    """A lock or state file, or a directory, that dbkeeper refuses to write through."""


class Lock(Protocol):
    def try_acquire(self) -> bool: ...
    def release(self) -> None: ...
    def holder(self) -> str: ...


def owner_text() -> str:
    since = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"pid {os.getpid()} on {socket.gethostname()} since {since}"


# -- files and directories ---------------------------------------------------------------------


def check_directory(directory: Path, purpose: str) -> None:
    """Refuse a directory that others could plant files in (links to the database, say).

    It must be a directory, owned by this user or root, and not writable by everyone.
    Group-writable is fine: a backup volume shared by instances of one service.
    """
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        return  # created by dbkeeper, with its own mode
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePath(f"{purpose} {directory} is not a directory")
    if info.st_uid not in (os.geteuid(), 0):
        raise UnsafePath(
            f"{purpose} {directory} belongs to another user (uid {info.st_uid}); dbkeeper "
            "writes only into directories of its own user (or root's). Change its owner or "
            "point the setting at a directory of this user."
        )
    if info.st_mode & stat.S_IWOTH:
        raise UnsafePath(
            f"{purpose} {directory} is writable by every user (mode "
            f"{stat.S_IMODE(info.st_mode):o}): anyone could plant a link there that dbkeeper "
            f"would write through. Run `chmod o-w {directory}`."
        )


def open_private(path: Path, *, create: bool = True, new: bool = False) -> int:
    """Open ``path`` read-write without following a link: the one way dbkeeper opens or
    creates a file of its own (locks, manifests, temporary files, the failure record).

    ``create``: create it (0600) if missing; ``new``: it must not exist yet (a temporary
    file). Creating checks the directory first (:func:`check_directory`). Refuses anything but
    a regular file of this user (or root) with a single name: never writes through a link,
    symbolic or hard (a hard link to the database would be truncated with it).
    """
    if create or new:
        check_directory(path.parent, "the directory")
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    if create or new:
        flags |= os.O_CREAT
    if new:
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafePath(
                f"{path} is a symbolic link; dbkeeper never writes through links. Remove it "
                "(nothing else of dbkeeper's is kept there)."
            ) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePath(f"{path} is not a regular file; remove it")
        if info.st_uid not in (os.geteuid(), 0):
            raise UnsafePath(f"{path} belongs to another user (uid {info.st_uid}); remove it")
        if info.st_nlink > 1:
            raise UnsafePath(
                f"{path} has {info.st_nlink} names (a hard link to another file, perhaps the "
                "database); dbkeeper never writes through links. Remove it."
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_database_directory(database_file: Path) -> None:
    """The SQLite database's directory, and the lock files dbkeeper keeps there, are safe to
    write to: checked before anything opens the database (creates nothing)."""
    check_directory(database_file.parent, "the SQLite database's directory")
    for path in lock_paths(database_file):
        with contextlib.suppress(FileNotFoundError):
            os.close(open_private(path, create=False))


class FileLock:
    """A ``flock`` on a file that records who holds it (best effort: a full disk still locks)."""

    def __init__(self, path: Path, *, label: str | None = None) -> None:
        self.path = path
        self.label = label or owner_text
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self, *, shared: bool = False) -> bool:
        fd = open_private(self.path)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        if not shared:
            with contextlib.suppress(OSError):  # who holds it is only for the log
                os.ftruncate(fd, 0)
                text_ = self.label() if callable(self.label) else self.label
                os.pwrite(fd, text_.encode(), 0)
        self._fd = fd
        return True

    def downgrade(self) -> None:
        """Exclusive to shared, without letting go in between."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_SH)

    def upgrade(self) -> bool:
        """Shared to exclusive if nobody else shares it; False (still shared) otherwise."""
        if self._fd is None:
            return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def holder(self) -> str:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return "another process"
        try:
            return os.read(fd, 512).decode(errors="replace").strip() or "another process"
        finally:
            os.close(fd)


def lock_paths(database_file: Path) -> list[Path]:
    """The lock files beside a SQLite database: migration, leader, in use."""
    return [
        database_file.with_name(f"{database_file.name}.{purpose}.lock")
        for purpose in ("migrate", "leader", "inuse")
    ]


def migration_lock(database_file: Path) -> FileLock:
    return FileLock(lock_paths(database_file)[0])


def leader_lock(database_file: Path, instance: str) -> FileLock:
    return FileLock(lock_paths(database_file)[1], label=instance)


def in_use_lock(database_file: Path) -> FileLock:
    return FileLock(lock_paths(database_file)[2])


def backup_lock(directory: Path) -> FileLock:
    return FileLock(directory / ".dbkeeper-backup.lock")


# -- PostgreSQL advisory locks --------------------------------------------------------------------


# The granted lock ``(:ns, :id)`` in the current database (advisory keys are per database).
_HELD_HERE = (
    "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
    "(SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND l.classid = :ns AND l.objid = :id AND l.objsubid = 2"
)


class AdvisoryLock:
    """A PostgreSQL session advisory lock, taken on a connection the caller gives.

    The connection must stay open (in autocommit) while the lock is held; the lock ends with
    the session, so work done on that very connection can never outlive the lock.
    """

    def __init__(self, engine: Engine, lock_id: int) -> None:
        self.engine = engine
        self.lock_id = lock_id
        self.connection: Connection | None = None

    def try_acquire(self, connection: Connection | None = None) -> bool:
        """Take the lock on ``connection`` (default: a new autocommit connection of its own)."""
        own = connection is None
        conn = connection or self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            acquired = conn.execute(
                text("SELECT pg_try_advisory_lock(:ns, :id)"),
                {"ns": ADVISORY_NAMESPACE, "id": self.lock_id},
            ).scalar_one()
            if not own:
                conn.commit()  # never leave the caller's connection in a transaction
        except BaseException:
            if own:
                conn.close()
            raise
        if not acquired:
            if own:
                conn.close()
            return False
        self.connection = conn
        return True

    def alive(self) -> bool:
        """Whether the lock is still ours: its session is there and holds it."""
        if self.connection is None:
            return False
        try:
            held = self.connection.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND pid = pg_backend_pid() AND classid = :ns AND objid = :id "
                    "AND objsubid = 2"
                ),
                {"ns": ADVISORY_NAMESPACE, "id": self.lock_id},
            ).scalar_one()
            self.connection.commit()
            return bool(held)
        except Exception:
            self.forget()
            return False

    def forget(self) -> None:
        """The session is gone (or going): drop it without asking the server."""
        connection, self.connection = self.connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.invalidate()
                connection.close()

    def release(self) -> None:
        if self.connection is not None:
            connection, self.connection = self.connection, None
            try:
                connection.execute(
                    text("SELECT pg_advisory_unlock(:ns, :id)"),
                    {"ns": ADVISORY_NAMESPACE, "id": self.lock_id},
                )
                connection.commit()
            finally:
                connection.close()  # closing the session releases the lock in any case

    def holding_session(self) -> Row[Any] | None:
        """The session holding the lock in this database (pid, application_name, start)."""
        query = text(
            "SELECT a.pid, a.application_name, a.backend_start "
            "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid " + _HELD_HERE
        )
        with self.engine.connect() as connection:
            return connection.execute(query, {"ns": ADVISORY_NAMESPACE, "id": self.lock_id}).first()

    def end_holding_session(self, connection: Connection) -> bool:
        """End the session that holds the lock in this database (a holder that is stuck: the
        lock goes with its session). False when nobody held it; raises when not permitted
        (ending another role's session needs ``pg_signal_backend``)."""
        ended = connection.execute(
            text("SELECT pg_terminate_backend(l.pid) FROM pg_locks l " + _HELD_HERE),
            {"ns": ADVISORY_NAMESPACE, "id": self.lock_id},
        ).first()
        connection.commit()
        return bool(ended and ended[0])

    def holder(self) -> str:
        try:
            row = self.holding_session()
        except Exception:  # only used for a log line
            row = None
        if row is None:
            return "another instance"
        since = row.backend_start.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
        return f"{row.application_name or 'a session'} (server pid {row.pid}, connected {since})"


# -- waiting -----------------------------------------------------------------------------------


def acquire(
    attempt: Callable[[], bool],
    *,
    holder: Callable[[], str],
    timeout: float | None,
    on_wait: Callable[[str], None],
    gave_up: Callable[[str], Exception],
    stopped: Callable[[], str | None] = lambda: None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Call ``attempt()`` until it succeeds: the one loop that waits for a lock.

    ``on_wait(holder)`` is told who holds it now and then; ``gave_up(why)`` builds the error
    raised after ``timeout`` seconds or when ``stopped()`` gives a reason (a deadline, a stop).
    """
    deadline = None if timeout is None else clock() + timeout
    next_report = clock()
    while not attempt():
        why = stopped()
        now = clock()
        if why is None and deadline is not None and now >= deadline:
            why = f"gave up after {timeout:.0f}s"
        if why is not None:
            raise gave_up(f"{why}; it is held by {holder()}")
        if now >= next_report:
            on_wait(holder())
            next_report = now + WAIT_REPORT_SECONDS
        pause = POLL_SECONDS if deadline is None else min(POLL_SECONDS, max(0.0, deadline - now))
        time.sleep(pause)


@contextlib.contextmanager
def held(lock: FileLock, **wait: Any) -> Iterator[FileLock]:
    """Hold ``lock`` for the block (waiting as :func:`acquire` does); always released."""
    acquire(lock.try_acquire, holder=lock.holder, **wait)
    try:
        yield lock
    finally:
        lock.release()
