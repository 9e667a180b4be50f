"""Helpers for backup tests: a clock that skips waits, databases with rows, file fingerprints."""

from __future__ import annotations

import gzip
import hashlib
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import zstandard
from sqlalchemy import create_engine, text

from dbkeeper.config import Settings
from dbkeeper.plugins.database.backup.pipeline import Backups
from dbkeeper.plugins.database.operations import Operations, offsite_copies


class SkippingClock:
    """Real UTC time, except that ``sleep`` moves it forward instead of waiting.

    Backups serialize on names with second resolution; with this clock a test taking several
    backups in a row runs the same-second logic without spending real seconds on it.
    """

    def __init__(self) -> None:
        self.offset = timedelta()
        self.slept: list[float] = []

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.offset += timedelta(seconds=seconds)


def open_plugin(settings: Settings, clock: SkippingClock | None = None) -> Operations:
    """The database plugin's operations on ``settings``, connected and migrated (as ``start``
    does, without a host)."""
    plugin = Operations(settings)
    if clock is not None:
        plugin.backups = Backups(
            settings.backup,
            plugin.backups.engine,
            plugin.revisions,
            clock=clock.now,
            sleep=clock.sleep,
        )
        plugin.offsite = offsite_copies(settings, plugin.backups)
    plugin.open()
    return plugin


def add_users(plugin: Operations, count: int, start: int = 1, text_size: int = 0) -> None:
    """Insert ``count`` users with ids from ``start`` (``text_size`` bytes of name each)."""
    filler = "x" * text_size
    with plugin.database.connection() as connection:
        connection.execute(
            text("INSERT INTO users (id, first_name, last_name) VALUES (:id, :name, :last)"),
            [{"id": i, "name": f"user {i}", "last": filler} for i in range(start, start + count)],
        )


def user_ids(url: str) -> list[int]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [row[0] for row in connection.execute(text("SELECT id FROM users ORDER BY id"))]
    finally:
        engine.dispose()


def sqlite_user_ids(path: Path) -> list[int]:
    """Ids in a plain SQLite file (a decompressed backup), read without changing it."""
    connection = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return [row[0] for row in connection.execute("SELECT id FROM users ORDER BY id")]
    finally:
        connection.close()


def decompressed(path: Path, target: Path) -> Path:
    """The content of a backup file, decompressed with the reference libraries."""
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdDecompressor().decompress(data)
    target.write_bytes(data)
    return target


def fingerprint(path: Path) -> tuple[str, list[str]]:
    """sha256 of a database file and the names of the files beside it (-wal, -shm, ...)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    siblings = sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name + "-"))
    return digest, siblings


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
