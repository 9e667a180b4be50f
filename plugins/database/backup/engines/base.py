"""What a backup engine does for one dialect: the small interface the manager works through.

The manager (``backup.py``) owns names, compression, manifests, rotation and the order of the
steps; an engine only knows its database: how to take a consistent raw copy, how to prove a
raw copy sound, and how to put one in place of the live database. ``backup_sqlite.py`` and
``backup_postgres.py`` implement it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from dbkeeper.plugin import Deadline

# (phase, bytes done, bytes in total or None when unknown). Phases: snapshot, check, compress,
# read-back, checksum, decompress, restore.
Progress = Callable[[str, int, int | None], None]


def no_progress(phase: str, done: int, total: int | None) -> None:
    pass


def serialized(progress: Progress | None) -> Progress:
    """``progress`` made safe to call from the threads of one backup (a check runs beside the
    compression)."""
    if progress is None:
        return no_progress
    lock = threading.Lock()

    def report(phase: str, done: int, total: int | None) -> None:
        with lock:
            progress(phase, done, total)

    return report


class Interrupted(Exception):
    """The work ran out of time (shutdown budget) or was asked to stop."""


@dataclass(frozen=True)
class Limits:
    """When work must give up: a deadline (the shutdown budget) and stop requests."""

    deadline: Deadline | None = None
    events: tuple[threading.Event, ...] = ()

    def stopped(self) -> str | None:
        if self.deadline is not None and self.deadline.expired:
            return "ran out of time"
        if any(event.is_set() for event in self.events):
            return "was stopped"
        return None

    def check(self) -> None:
        why = self.stopped()
        if why:
            raise Interrupted(why)

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline.remaining()

    def also(self, event: threading.Event) -> Limits:
        return Limits(self.deadline, (*self.events, event))


@dataclass(frozen=True)
class ContentFacts:
    """What a copy holds: its schema revision and the rows per table (None: not counted)."""

    revision: str | None
    tables: dict[str, int | None]


class BackupEngine(Protocol):
    kind: str  # "sqlite" | "postgresql"
    raw_suffix: str  # ".db" | ".dump"
    compressible: bool  # False: the raw copy is compressed already (pg_dump's custom format)
    raw_compression: str  # what the manifest calls an uncompressed copy: "none" | "custom"
    can_set_aside: bool  # a damaged live database can be renamed away instead of backed up
    reads_in_place: bool  # an uncompressed backup is restored from its file (no staging copy)

    def unavailable(self) -> str | None:
        """Why this database cannot be backed up at all (None: it can)."""

    def source(self) -> str:
        """The live database as people may see it (no password)."""

    def live_exists(self) -> bool:
        """Whether there is a live database to back up (or to keep a safety copy of)."""

    def live_bytes(self) -> int:
        """About how large a raw copy of the live database is."""

    def tool(self) -> str:
        """What makes the copies, with its version (for the manifest)."""

    def snapshot(self, target: Path, progress: Progress, limits: Limits) -> ContentFacts | None:
        """Write a consistent raw copy of the live database to ``target`` (exists, empty), fsynced.

        Facts known at copy time (PostgreSQL counts rows in the dump's own snapshot) are
        returned; None when ``check`` finds them.
        """

    def check(self, raw: Path, progress: Progress, limits: Limits) -> ContentFacts:
        """Prove a raw copy sound, reading all of it; ``InvalidBackup`` says what is wrong."""

    def staging(self) -> Path | None:
        """Where a restore writes the raw copy it will swap in; None: it reads the backup file."""

    def replace_live(self, raw: Path) -> None:
        """Put ``raw`` in place of the live database; every connection is closed."""

    def set_aside(self, label: str) -> list[Path]:
        """Keep the live database's very bytes under a second name (connections closed) while
        it stays in place; returns the new paths."""

    def put_back(self, paths: list[Path]) -> None:
        """Undo ``set_aside`` (the live database was not replaced)."""

    def in_use_elsewhere(self) -> str | None:
        """Why the live database cannot be replaced now (checked before a restore starts)."""

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Held while the live database is replaced: refuses when another process uses it."""

    def hold(self) -> None:
        """Called by a running bot: tell other processes the live database is in use."""

    def release(self) -> None:
        """The bot stopped using the live database."""

    def leftovers(self) -> list[Path]:
        """Files of this engine left by an interrupted restore."""

    def side_file(self, suffix: str) -> Path | None:
        """A small file of dbkeeper's beside the live database (None: there is no file)."""


@runtime_checkable
class DeferredCheck(Protocol):
    """An engine whose full check is too slow for the critical path of every backup (SQLite's
    ``integrity_check``): a backup is listed on ``quick_check`` and fully checked after.
    Engines without it (PostgreSQL: ``pg_restore`` reads every byte) check in full inline."""

    def quick_check(self, raw: Path, progress: Progress, limits: Limits) -> ContentFacts:
        """Prove every page and structure sound and count what the copy holds."""

    def full_check(self, raw: Path, progress: Progress, limits: Limits) -> None:
        """The rest of ``check`` (``InvalidBackup`` says what is wrong)."""


@contextlib.contextmanager
def nothing_to_hold() -> Iterator[None]:
    yield
