"""How fast the database grows, and when its disk will be full.

Samples of the database's size (SQLite: its pages, those still in the write-ahead log
included; PostgreSQL: ``pg_database_size``) and of the free space on its volume go to the
bookkeeping table ``dbkeeper_size_samples``: one at each health check (those an HTTP request
or ``/health`` starts too, but none closer together than the check interval, or an hour when
the interval is longer) and one from the daily job. The
daily job coarsens them: past ``DETAILED_SECONDS`` one per UTC day is kept, past ``KEEP_DAYS``
none.

The growth rate is the least-squares slope of the samples of the last ``WINDOW_DAYS`` days,
once they span enough time to mean something (a tenth of a day, or ten check intervals when
checks are more frequent). The disk is full when the free space is used up at that rate. The
``database_growth`` check is degraded when that is less than ``ALERT_DAYS`` days away; the host
alerts on the change, once, and says when it is resolved.

PostgreSQL's disk is the server's: its free space is known only when the server runs on this
machine and its data directory can be read here; otherwise the growth rate is given alone.

A database whose schema dbkeeper leaves alone (``[migrations] script_location = "none"``)
gets no table of dbkeeper's: its samples are kept in memory, for as long as the bot runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, insert, select

from dbkeeper.health import Outcome, degraded, healthy
from dbkeeper.texts import duration, megabytes

from ..migrate.bookkeeping import size_samples
from ..migrate.history import as_utc
from ..service import DatabaseService

ALERT_DAYS = 14
WINDOW_DAYS = 7
DETAILED_SECONDS = 2 * 86400
KEEP_DAYS = 400
MAX_SPACING_SECONDS = 3600.0
MIN_SPAN_SECONDS = 8640.0  # a tenth of a day ...
MIN_SPAN_INTERVALS = 10  # ... or ten check intervals, whichever is shorter
MIN_SAMPLES = 3
MEMORY_SAMPLES = 5000  # without a table of its own: the newest samples, in memory
LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "::1"}


@dataclass(frozen=True)
class Sample:
    taken_at: datetime
    size_bytes: int
    disk_free_bytes: int | None


@dataclass(frozen=True)
class Forecast:
    """The growth of the database and when its disk fills (None: not known)."""

    samples: int
    span_seconds: float
    size_bytes: int
    disk_free_bytes: int | None
    bytes_per_day: float | None  # None: not enough history yet
    full_at: datetime | None  # None: not growing, or the free space is not known
    needed_span_seconds: float
    made_at: datetime  # the moment the forecast stands for (its newest point)

    @property
    def days_left(self) -> float | None:
        """Days from the forecast's own moment (not the clock's now: the same forecast always
        says the same thing, and a forecast is made for each check)."""
        if self.full_at is None:
            return None
        return max(0.0, (self.full_at - self.made_at).total_seconds() / 86400)

    @property
    def alarming(self) -> bool:
        days = self.days_left
        return days is not None and days < ALERT_DAYS

    def describe(self) -> str:
        if self.bytes_per_day is None:
            return (
                f"{megabytes(self.size_bytes)}; not enough history for a forecast yet "
                f"({self.samples} samples over {_span(self.span_seconds)}, needs "
                f"{_span(self.needed_span_seconds)})"
            )
        rate = f"{'+' if self.bytes_per_day >= 0 else '-'}{megabytes(abs(self.bytes_per_day))}/day"
        if self.disk_free_bytes is None:
            return (
                f"{megabytes(self.size_bytes)}, {rate}; the free space of the server's disk "
                "is not visible from here"
            )
        free = f"{megabytes(self.disk_free_bytes)} free"
        if self.full_at is None:
            return f"{megabytes(self.size_bytes)}, {rate}, {free}: not growing toward a full disk"
        return (
            f"{megabytes(self.size_bytes)}, {rate}, {free}: the disk is full in about "
            f"{_days(self.days_left)} ({self.full_at:%Y-%m-%d})"
        )

    def outcome(self) -> Outcome:
        values: dict[str, float] = {"size_bytes": float(self.size_bytes)}
        if self.bytes_per_day is not None:
            values["growth_bytes_per_second"] = self.bytes_per_day / 86400
        if self.full_at is not None:
            values["disk_full_timestamp_seconds"] = self.full_at.timestamp()
        if self.alarming:
            return degraded(
                f"the disk fills within {ALERT_DAYS} days: {self.describe()}. Delete or archive "
                "old data ([retention]), reclaim free space (`dbkeeper db vacuum`), or give the "
                "database more room",
                values=values,
            )
        return healthy(self.describe(), values=values)

    def to_json(self) -> dict[str, Any]:
        return {
            "size_bytes": self.size_bytes,
            "samples": self.samples,
            "span_seconds": round(self.span_seconds, 1),
            "bytes_per_day": None if self.bytes_per_day is None else round(self.bytes_per_day),
            "disk_free_bytes": self.disk_free_bytes,
            "disk_full_at": self.full_at.isoformat(timespec="seconds") if self.full_at else None,
            "days_left": None if self.days_left is None else round(self.days_left, 2),
            "alert_below_days": ALERT_DAYS,
            "alarming": self.alarming,
        }


def forecast(
    samples: list[Sample],
    size_bytes: int,
    disk_free_bytes: int | None,
    interval_seconds: float,
    now: datetime | None = None,
) -> Forecast:
    """Least-squares growth over the window's samples, and when the free space runs out."""
    now = now or datetime.now(UTC)
    since = now - timedelta(days=WINDOW_DAYS)
    points = [(s.taken_at, s.size_bytes) for s in samples if s.taken_at >= since]
    points.append((now, size_bytes))
    span = (points[-1][0] - points[0][0]).total_seconds() if len(points) > 1 else 0.0
    needed = min(MIN_SPAN_SECONDS, MIN_SPAN_INTERVALS * interval_seconds)
    rate = None
    full_at = None
    if len(points) >= MIN_SAMPLES and span >= needed:
        xs = [(t - points[0][0]).total_seconds() for t, _ in points]
        ys = [float(v) for _, v in points]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        spread = sum((x - mean_x) ** 2 for x in xs)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
        rate = slope * 86400
        if slope > 0 and disk_free_bytes is not None:
            seconds_left = disk_free_bytes / slope
            if seconds_left < 100 * 365 * 86400:
                full_at = now + timedelta(seconds=seconds_left)
    return Forecast(len(points), span, size_bytes, disk_free_bytes, rate, full_at, needed, now)


class Growth:
    """Size samples (read on a probe connection, written on a maintenance one)."""

    def __init__(
        self, database: DatabaseService, interval_seconds: float, *, persist: bool = True
    ) -> None:
        self.database = database
        self.interval = interval_seconds
        self.spacing = min(interval_seconds, MAX_SPACING_SECONDS)
        self.persist = persist  # False: samples in memory (dbkeeper owns no table there)
        self.memory: deque[Sample] = deque(maxlen=MEMORY_SAMPLES)
        self._volume: Path | None = None
        self._volume_known = False

    # -- measuring -----------------------------------------------------------------------------

    def measure(self, connection: Connection) -> tuple[int, int | None]:
        """The database's size and the free space of its volume (None: not visible here)."""
        if self.database.dialect == "sqlite":
            driver: Any = connection.connection.driver_connection
            page_size = int(driver.execute("PRAGMA page_size").fetchone()[0])
            pages = int(driver.execute("PRAGMA page_count").fetchone()[0])
            size = page_size * pages
        else:
            size = int(
                connection.exec_driver_sql(
                    "SELECT pg_database_size(current_database())"
                ).scalar_one()
            )
        volume = self._volume_of(connection)
        free = shutil.disk_usage(volume).free if volume is not None else None
        return size, free

    def _volume_of(self, connection: Connection) -> Path | None:
        if self.database.file is not None:
            return self.database.file.absolute().parent
        if not self._volume_known:  # a server on this machine whose files we can see
            self._volume_known = True
            if (self.database.url.host or "") in LOCAL_HOSTS:
                with contextlib.suppress(Exception):
                    found = connection.exec_driver_sql("SHOW data_directory").scalar()
                    if found and os.path.isdir(str(found)):
                        self._volume = Path(str(found))
        return self._volume

    # -- the history ---------------------------------------------------------------------------

    def history(self, connection: Connection) -> list[Sample]:
        """The samples of the window, oldest first (none while the table does not exist)."""
        since = datetime.now(UTC) - timedelta(days=WINDOW_DAYS)
        if not self.persist:
            return [sample for sample in self.memory if sample.taken_at >= since]
        if not connection.dialect.has_table(connection, size_samples.name):
            return []
        rows = connection.execute(
            select(
                size_samples.c.taken_at, size_samples.c.size_bytes, size_samples.c.disk_free_bytes
            )
            .where(size_samples.c.taken_at >= since)
            .order_by(size_samples.c.taken_at)
        ).all()
        return [Sample(as_utc(t) or t, int(s), f) for t, s, f in rows]

    def due(self, samples: list[Sample], now: datetime | None = None) -> bool:
        """Whether a health check should store a sample now."""
        if not samples:
            return True
        now = now or datetime.now(UTC)
        return (now - samples[-1].taken_at).total_seconds() >= 0.9 * self.spacing

    def record(self, connection: Connection | None, size: int, free: int | None) -> None:
        """Store a sample (a maintenance connection, in its own short transaction)."""
        if not self.persist or connection is None:
            self.memory.append(Sample(datetime.now(UTC), size, free))
            return
        with connection.begin():
            size_samples.create(connection, checkfirst=True)
            connection.execute(
                insert(size_samples).values(
                    taken_at=datetime.now(UTC), size_bytes=size, disk_free_bytes=free
                )
            )

    def compact(self, connection: Connection, now: datetime | None = None) -> int:
        """Past two days one sample per UTC day (its last), past ``KEEP_DAYS`` none."""
        now = now or datetime.now(UTC)
        if not self.persist:
            return 0  # in memory: the newest MEMORY_SAMPLES, bounded by the deque
        with connection.begin():
            if not connection.dialect.has_table(connection, size_samples.name):
                return 0
            old = connection.execute(
                select(size_samples.c.id, size_samples.c.taken_at)
                .where(size_samples.c.taken_at < now - timedelta(seconds=DETAILED_SECONDS))
                .order_by(size_samples.c.taken_at)
            ).all()
            keep: dict[str, int] = {}
            for key, taken in old:
                keep[f"{as_utc(taken) or taken:%Y-%m-%d}"] = key  # the last of each day wins
            expired = now - timedelta(days=KEEP_DAYS)
            doomed = [
                key
                for key, taken in old
                if key not in keep.values() or (as_utc(taken) or taken) < expired
            ]
            for start in range(0, len(doomed), 500):
                connection.execute(
                    delete(size_samples).where(size_samples.c.id.in_(doomed[start : start + 500]))
                )
        return len(doomed)


def _span(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _days(days: float | None) -> str:
    if days is None:
        return "?"
    return f"{days:.0f} days" if days >= 2 else duration(days * 86400)
