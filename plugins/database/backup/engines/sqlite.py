"""SQLite backups: the online backup API under a pinned read snapshot, checks on immutable copies.

Why not copy the file: a WAL database's committed pages may still sit in ``-wal`` (copying the
``.db`` alone lost every row in our measurement). Why not a plain stepwise backup: a write from
another connection restarts it from page 1, so under a busy bot it never finishes.

The copy here opens a read transaction on the source first and keeps it open while
``Connection.backup`` copies a few MiB per step. In WAL mode that transaction pins one
snapshot: the source pager is never reset between steps, so the copy does not restart (SQLite
restarts a backup only when its source pager sees the database change), writers keep
committing to the WAL without waiting, and the copy holds exactly the rows committed when the
transaction began. Steps let the progress callback report bytes and abandon the copy at a
deadline. A database not in WAL mode would block writers for the whole copy that way, so it
is copied in one step instead.

The target is a scratch file: no journal, no syncs while copying, one fsync at the end (the
manager renames it into place only after verifying it).

Faster still, when it can be arranged (usually): a snapshot that needs no WAL frame at all.
For a few milliseconds the copy holds the write lock, checkpoints the whole WAL into the
database file (PASSIVE: it never waits for readers) and opens its read transaction; a reader
that starts with the WAL fully checkpointed reads the database file alone and holds SQLite's
read lock 0, which no checkpoint can pass. Writers then go on committing into the WAL, the
database file does not change until the copy ends, and the kernel copies it like ``cp``
(``copy_file_range``) - the way Litestream takes its snapshots. When a reader of an older
snapshot keeps the checkpoint from completing, the backup API copies instead.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import secrets
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from ...errors import BackupError, InvalidBackup
from ...locks import FileLock, check_database_directory, in_use_lock, open_private
from ..compression import create_private, fsync_file
from ..store import TEMP_PREFIX, fsync_directory, remove
from .base import ContentFacts, Interrupted, Limits, Progress

log = logging.getLogger("dbkeeper.backup")
STEP_BYTES = 16 << 20
SIDE_FILES = ("-wal", "-shm", "-journal")
SQLITE_MAGIC = b"SQLite format 3\x00"
PROGRESS_OPCODES = 50_000  # how often a running check looks at the deadline


def _uri(path: Path, **options: str) -> str:
    query = "&".join(f"{key}={value}" for key, value in options.items())
    return f"file:{quote(str(path.resolve()))}?{query}"


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class SqliteBackupEngine:
    kind = "sqlite"
    raw_suffix = ".db"
    compressible = True
    raw_compression = "none"
    can_set_aside = True
    reads_in_place = False  # the staging copy is renamed over the live file

    def __init__(self, file: Path | None, *, busy_timeout_ms: int = 5000) -> None:
        self.file = file
        self.busy_timeout = busy_timeout_ms / 1000
        self._held: FileLock | None = None

    # -- the live database --------------------------------------------------------------------

    def unavailable(self) -> str | None:
        if self.file is None:
            return "an in-memory SQLite database lives only inside its process: nothing to back up"
        return None

    def source(self) -> str:
        return str(self.file)

    def live_exists(self) -> bool:
        return self.file is not None and self.file.is_file()

    def live_bytes(self) -> int:
        if self.file is None:
            return 0
        total = 0
        for path in (self.file, self._side("-wal")):
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return total

    def tool(self) -> str:
        return f"SQLite {sqlite3.sqlite_version} backup API"

    def _side(self, suffix: str) -> Path:
        assert self.file is not None
        return self.file.with_name(self.file.name + suffix)

    # -- taking a copy ------------------------------------------------------------------------

    def snapshot(self, target: Path, progress: Progress, limits: Limits) -> ContentFacts | None:
        assert self.file is not None
        if not self.file.is_file():
            raise BackupError(f"there is no database at {self.file}: nothing to back up")
        check_database_directory(self.file)  # SQLite may write -wal/-shm there
        # Read-write (never creating): it can recover a log a crashed writer left, and as the
        # last connection it checkpoints and removes -wal/-shm when it closes, as the bot does.
        source = sqlite3.connect(
            _uri(self.file, mode="rw"),
            uri=True,
            timeout=self.busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            wal = source.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
            page_size = source.execute("PRAGMA page_size").fetchone()[0]
            if wal and self._pin_file_only_snapshot(source):
                pages = source.execute("PRAGMA page_count").fetchone()[0]
                log.debug("the WAL is checkpointed: copying the database file in the kernel")
                self._copy_file(target, pages * page_size, progress, limits)
                source.execute("COMMIT")
            else:
                if wal:
                    source.execute("BEGIN")
                    source.execute("SELECT count(*) FROM sqlite_master").fetchone()  # pins it
                self._copy(source, target, page_size, wal, progress, limits)
                if wal:
                    source.execute("COMMIT")
        except sqlite3.Error as error:
            raise _sqlite_failure(error, "copying the database") from error
        finally:
            source.close()
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return None

    def _pin_file_only_snapshot(self, source: sqlite3.Connection) -> bool:
        """Open a read transaction on ``source`` that reads the database file alone.

        True when it is open (the caller commits it after copying); False, with nothing held,
        when the WAL could not be fully checkpointed.
        """
        assert self.file is not None
        writer = sqlite3.connect(
            _uri(self.file, mode="rw"), uri=True, timeout=self.busy_timeout, isolation_level=None
        )
        try:
            writer.execute("BEGIN IMMEDIATE")  # no commit can slip in until we read
            try:
                # On a connection of its own: a checkpoint cannot run inside a transaction.
                checkpointer = sqlite3.connect(_uri(self.file, mode="rw"), uri=True)
                try:
                    busy, frames, done = checkpointer.execute(
                        "PRAGMA wal_checkpoint(PASSIVE)"
                    ).fetchone()
                finally:
                    checkpointer.close()
                if busy or frames != done:
                    log.debug("a reader holds an older snapshot: copying with the backup API")
                    return False
                source.execute("BEGIN")
                source.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                writer.execute("ROLLBACK")
        finally:
            writer.close()
        return True

    def _copy_file(self, target: Path, size: int, progress: Progress, limits: Limits) -> None:
        """Copy the first ``size`` bytes of the database file in the kernel, in steps."""
        assert self.file is not None
        progress("snapshot", 0, size)
        # The target was created empty by the manager: opened again without a link followed,
        # never truncated through its path.
        with (
            open(self.file, "rb") as source,
            os.fdopen(open_private(target, create=False), "wb") as copy,
        ):
            src, dst = source.fileno(), copy.fileno()
            done = 0
            in_kernel = hasattr(os, "copy_file_range")
            while done < size:
                step = min(STEP_BYTES * 4, size - done)
                copied = 0
                if in_kernel:
                    try:
                        copied = os.copy_file_range(src, dst, step, done, done)
                    except OSError:  # another file system, an old kernel: through user space
                        in_kernel = False
                if not in_kernel:
                    copied = os.pwrite(dst, os.pread(src, step, done), done)
                if copied == 0:
                    raise BackupError("the database file ended before its last page")
                done += copied
                progress("snapshot", done, size)
                limits.check()

    def _copy(
        self,
        source: sqlite3.Connection,
        target: Path,
        page_size: int,
        stepwise: bool,
        progress: Progress,
        limits: Limits,
    ) -> None:
        last_remaining: list[int] = []

        def step(_status: int, remaining: int, total: int) -> None:
            if last_remaining and remaining > last_remaining[-1]:
                # Cannot happen under a pinned snapshot; if it ever does, say so loudly.
                raise BackupError("the copy restarted: the source changed under its snapshot")
            last_remaining.append(remaining)
            progress("snapshot", (total - remaining) * page_size, total * page_size)
            limits.check()

        target_db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
        try:
            target_db.execute("PRAGMA journal_mode = OFF")  # a scratch file: no journal ...
            target_db.execute("PRAGMA synchronous = OFF")  # ... and one fsync at the end
            pages = max(1, STEP_BYTES // page_size) if stepwise else -1
            source.backup(target_db, pages=pages, progress=step, sleep=0.05)
        finally:
            target_db.close()

    # -- proving a copy sound -----------------------------------------------------------------

    def check(self, raw: Path, progress: Progress, limits: Limits) -> ContentFacts:
        """SQLite's header, ``PRAGMA integrity_check``, then the revision and rows per table."""
        return self._checked(raw, progress, limits, full=True, count=True)

    def quick_check(self, raw: Path, progress: Progress, limits: Limits) -> ContentFacts:
        """``PRAGMA quick_check`` (every page and B-tree, not index content: a tenth of the
        full check's cost), then the revision and rows per table. A backup is listed on it."""
        return self._checked(raw, progress, limits, full=False, count=True)

    def full_check(self, raw: Path, progress: Progress, limits: Limits) -> None:
        """``PRAGMA integrity_check`` alone: what ``quick_check`` leaves out (indexes against
        their tables, constraints), run after the backup is listed."""
        self._checked(raw, progress, limits, full=True, count=False)

    def _checked(
        self, raw: Path, progress: Progress, limits: Limits, *, full: bool, count: bool
    ) -> ContentFacts:
        """One check of ``raw`` through a read-only connection that maps the file.

        ``mmap_size`` set to the file's size: the check walks indexes in their order, and
        through SQLite's small page cache that is one ``pread`` per page (two thirds of the
        check's time in the kernel, measured); mapped, the pages come from the page cache.
        SQLite caps the mapping at its compile-time limit (2 GiB here): above that the rest
        is read as before.
        """
        with open(raw, "rb") as handle:
            header = handle.read(len(SQLITE_MAGIC))
        if not header:
            raise InvalidBackup("is empty (0 bytes)")
        if header != SQLITE_MAGIC:
            raise InvalidBackup("is not a SQLite database (its header is not SQLite's)")
        size = raw.stat().st_size
        progress("check", 0, size)
        # immutable: read as a plain file, no locks, no -wal/-shm created beside it.
        connection = sqlite3.connect(
            _uri(raw, mode="ro", immutable="1"), uri=True, check_same_thread=False
        )
        connection.set_progress_handler(lambda: 1 if limits.stopped() else 0, PROGRESS_OPCODES)
        try:
            connection.execute(f"PRAGMA mmap_size = {int(size)}").fetchall()
            _integrity(connection, limits, full=full)
            facts = _facts(connection) if count else ContentFacts(None, {})
        except sqlite3.OperationalError as error:
            if limits.stopped():
                raise Interrupted(limits.stopped() or "was stopped") from error
            raise InvalidBackup(f"cannot be read as a database ({error})") from error
        except sqlite3.DatabaseError as error:
            raise InvalidBackup(f"is damaged: SQLite says {error}") from error
        finally:
            connection.close()
        progress("check", size, size)
        return facts

    # -- restoring ----------------------------------------------------------------------------

    def staging(self) -> Path:
        """Beside the live database: the swap is then a rename within one file system."""
        assert self.file is not None
        name = f"{TEMP_PREFIX}restore-{self.file.name}.{os.getpid()}-{secrets.token_hex(4)}"
        return self.file.with_name(name)

    def replace_live(self, raw: Path) -> None:
        """One rename puts ``raw`` in place: the old database or the new one is there at every
        instant (a kill at any point never leaves no database for the next start to create).

        Its side files go first: a ``-wal`` left beside the new file would be replayed into
        it. Every connection is closed by now (the log checkpointed); a damaged database's
        ``-wal`` and journal were kept by ``set_aside``.
        """
        assert self.file is not None
        try:
            mode = self.file.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o600
        fd = open_private(raw, create=False)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        for suffix in SIDE_FILES:
            remove(self._side(suffix))
        os.replace(raw, self.file)
        try:
            fsync_directory(self.file.parent)
        except OSError as error:  # the rename is done: the restore is not to be undone now
            log.warning("could not fsync %s after the restore: %s", self.file.parent, error)

    def settle(self) -> None:
        """Make the database file alone the whole database (every connection of the bot is
        closed): a TRUNCATE checkpoint moves the write-ahead log into the file and empties it
        (a rollback journal left by a crashed writer is rolled back by opening it), so the
        file can be kept as it is, by a second name. ``BackupError``: the log cannot be
        emptied (another process reads it): keep a copy instead.
        """
        assert self.file is not None
        connection = sqlite3.connect(
            _uri(self.file, mode="rw"), uri=True, timeout=self.busy_timeout, isolation_level=None
        )
        try:
            if connection.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                busy, _, _ = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                if busy:
                    raise BackupError("another process reads its write-ahead log")
        except sqlite3.DatabaseError as error:
            raise BackupError(f"it cannot be checkpointed ({error})") from error
        finally:
            connection.close()
        for suffix in ("-wal", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                if self._side(suffix).stat().st_size > 0:
                    raise BackupError(f"its {suffix[1:]} file still holds changes")

    def link_to(self, target: Path) -> None:
        """``target`` (absent) becomes a second name of the live file: no byte is copied.
        ``OSError`` (``EXDEV``) when it is on another file system."""
        assert self.file is not None
        os.link(self.file, target, follow_symlinks=False)

    def set_aside(self, label: str) -> list[Path]:
        """``bot.db`` -> also ``bot.db.<label>`` (its ``-wal`` and journal too: they may hold
        committed rows): a second name for the very same bytes, while the live file stays
        where it is until ``replace_live`` renames the new one over it."""
        assert self.file is not None
        kept = []
        try:
            for suffix in ("", "-wal", "-journal"):
                source = self._side(suffix) if suffix else self.file
                if source.exists():
                    target = self.file.with_name(f"{self.file.name}.{label}{suffix}")
                    _second_name(source, target)
                    kept.append(target)
            fsync_directory(self.file.parent)
        except BaseException:
            for path in kept:
                remove(path)
            raise
        return kept

    def put_back(self, paths: list[Path]) -> None:
        """The live database was not replaced: its side files come back where they were
        missing, the second names go."""
        assert self.file is not None
        for path in paths:
            suffix = next((s for s in SIDE_FILES if path.name.endswith(s)), "")
            live = self._side(suffix) if suffix else self.file
            if suffix and not live.exists():
                os.replace(path, live)
            else:
                remove(path)

    def leftovers(self) -> list[Path]:
        """What an interrupted restore left: its staging copy, and the second name it gave the
        live database when it was killed before the swap (the same file: it stays the live
        database, as before that restore). None while the live database is missing: then they
        are what the operator may need (``interrupted_restore``)."""
        if self.file is None or not self.file.parent.is_dir() or not self.file.exists():
            return []
        found = _staging_files(self.file)
        for kept in self.file.parent.glob(f"{glob.escape(self.file.name)}.damaged-*"):
            suffix = next((s for s in SIDE_FILES if kept.name.endswith(s)), "")
            live = self._side(suffix) if suffix else self.file
            with contextlib.suppress(OSError):
                if os.path.samefile(kept, live):
                    found.append(kept)
        return found

    def side_file(self, suffix: str) -> Path | None:
        return None if self.file is None else self._side(suffix)

    # -- who uses the live database -----------------------------------------------------------

    def hold(self) -> None:
        """A shared lock for as long as the bot runs: restores from other processes refuse."""
        if self.file is None or self._held is not None:
            return
        lock = in_use_lock(self.file)
        if not lock.try_acquire(shared=True):
            log.warning("another process is restoring %s right now", self.file)
            return
        self._held = lock

    def release(self) -> None:
        if self._held is not None:
            lock, self._held = self._held, None
            lock.release()

    def in_use_elsewhere(self) -> str | None:
        """Why the live file cannot be replaced now (another process runs a bot on it), asked
        before a restore does anything; None when it can. Creates nothing."""
        if self.file is None:
            return None
        if self._held is not None:
            if not self._held.upgrade():
                return self._in_use_text()
            self._held.downgrade()
            return None
        lock = in_use_lock(self.file)
        if not os.path.lexists(lock.path):
            return None
        if not lock.try_acquire():
            return self._in_use_text()
        lock.release()
        return None

    def _in_use_text(self) -> str:
        return (
            f"the database {self.file} is in use by a running bot (another process): "
            "replacing its file under it would lose what it writes next. Stop the bot "
            "and restore again, or restore from the running bot. Nothing was changed."
        )

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """No other process may have the database open while its file is replaced."""
        if self.file is None:
            yield
            return
        own = self._held
        lock = own if own is not None else in_use_lock(self.file)
        acquired = lock.upgrade() if own is not None else lock.try_acquire()
        if not acquired:
            if own is None:
                lock.release()
            raise BackupError(self._in_use_text())
        try:
            yield
        finally:
            if own is not None:
                lock.downgrade()
            else:
                lock.release()


def _integrity(connection: sqlite3.Connection, limits: Limits, *, full: bool) -> None:
    """``InvalidBackup`` naming the first problems ``integrity_check`` (or ``quick_check``)
    finds."""
    pragma = "integrity_check" if full else "quick_check"
    try:
        problems = [row[0] for row in connection.execute(f"PRAGMA {pragma}(10)")]
    except sqlite3.DatabaseError as error:
        if limits.stopped() or isinstance(error, sqlite3.OperationalError):
            raise
        problems = [str(error)]
    if problems == ["ok"]:
        return
    lines = [" ".join(line.split()) for p in problems for line in p.splitlines()]
    lines = [line for line in lines if line and not line.startswith("***")]
    raise InvalidBackup(
        f"fails SQLite's integrity check ({pragma}): "
        + "; ".join(line[:160] for line in lines[:3])
        + (f" (and {len(lines) - 3} more problems)" if len(lines) > 3 else "")
    )


def _facts(connection: sqlite3.Connection) -> ContentFacts:
    """The revision and the rows per table of a checked copy."""
    names = [
        row[0]
        for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    ]
    tables: dict[str, int | None] = {
        name: connection.execute(f"SELECT count(*) FROM {_quoted(name)}").fetchone()[0]
        for name in names
    }
    revision = None
    if "alembic_version" in tables:
        row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
        revision = row[0] if row else None
    return ContentFacts(revision, tables)


def _staging_files(file: Path) -> list[Path]:
    return sorted(file.parent.glob(f"{TEMP_PREFIX}restore-{file.name}.*"))


def _second_name(source: Path, target: Path) -> None:
    """``target`` names the same bytes as ``source`` (a hard link; a copy where the file
    system has none)."""
    try:
        os.link(source, target)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        with open(source, "rb") as data, create_private(target) as copy:
            shutil.copyfileobj(data, copy, 1 << 20)
            fsync_file(copy)


def interrupted_restore(file: Path) -> str | None:
    """Why no database may be created at ``file`` (it is missing): a restore was interrupted
    there, and what it kept is beside it. None when nothing of the kind is there."""
    if file.exists() or not file.parent.is_dir():
        return None
    damaged = sorted(file.parent.glob(f"{glob.escape(file.name)}.damaged-*"))
    damaged = [path for path in damaged if not path.name.endswith(SIDE_FILES)]
    staging = _staging_files(file)
    if not damaged and not staging:
        return None
    if damaged:
        found = f"the database set aside by a restore, {damaged[-1]}"
        undo = f"`mv {damaged[-1]} {file}` puts it back"
    else:
        found = f"the verified copy of an unfinished restore, {staging[-1]}"
        undo = f"`mv {staging[-1]} {file}` finishes that restore"
    return (
        f"there is no database at {file}, but {found} is there: dbkeeper does not create an "
        f"empty database in its place. {undo}; `dbkeeper backup restore NAME` restores a "
        "backup instead; to start with an empty database, move that file out of the directory."
    )


def _sqlite_failure(error: sqlite3.Error, doing: str) -> BackupError:
    text = str(error)
    if "disk is full" in text or getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return BackupError(f"{doing} failed: no space left on the device ({text})")
    return BackupError(f"{doing} failed: {type(error).__name__}: {text}")
