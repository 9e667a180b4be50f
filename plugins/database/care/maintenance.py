"""Keeping the database in shape: planner statistics and free space.

SQLite (sqlite.org/lang_analyze.html, "Recommended usage pattern"):

* ``PRAGMA optimize=0x10002`` when the database is opened, ``PRAGMA optimize`` every
  ``[maintenance] optimize_interval_seconds`` on the bot's own pooled connections (the ones
  whose queries tell SQLite which tables need statistics) and on each of them when it closes;
  each bounded by ``analysis_limit`` so that it never reads a whole large table.
* Free pages (rows deleted, by retention or the bot) stay in the file until reclaimed. Past
  ``[maintenance] vacuum_free_ratio`` of the file they are given back after a backup, at a
  quiet moment, never while a backup or restore runs (the backups' own lock,
  ``Backups.exclusive``). How: a plain ``VACUUM`` rewrites the whole file holding the write
  lock, so every writer waits for all of it (about 4 ms per MB here, seconds on a large
  database: ``bench/README.md``). dbkeeper creates databases with ``auto_vacuum =
  INCREMENTAL`` instead and gives pages back with ``PRAGMA incremental_vacuum`` in steps of
  ``STEP_PAGES``, each its own short transaction, pausing between them so writers get in: the
  longest a writer waits is one step (milliseconds). A database made before (``auto_vacuum =
  NONE``) needs one ``VACUUM`` to switch; dbkeeper does it by itself only while that is short
  (up to ``AUTOMATIC_VACUUM_BYTES``), otherwise it says to run ``dbkeeper db vacuum`` at a
  quiet time.

PostgreSQL: autovacuum does the work. The check says, per table, how many dead rows wait and
when (auto)vacuum last ran, and is degraded when autovacuum falls behind: a table with more
than twice the dead rows that should have triggered it (the server's, or the table's,
``autovacuum_vacuum_threshold + autovacuum_vacuum_scale_factor * rows``), or above its
threshold with autovacuum off. ``dbkeeper db vacuum`` runs ``VACUUM (ANALYZE)``;
``dbkeeper db optimize`` runs ``ANALYZE`` (on SQLite too).

Every write here uses the ``maintenance`` engine (never the bot's, so it is not timed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, event

from dbkeeper.health import Outcome, degraded, healthy
from dbkeeper.texts import duration, megabytes

from ..engines import create_database_engine
from ..service import DatabaseService
from ..settings import MaintenanceSettings

log = logging.getLogger("dbkeeper.maintenance")
T = TypeVar("T")
Step = Callable[[Callable[[], T]], T]  # runs one unit of work (through the work gate)
STEP_PAGES = 256  # pages given back per incremental_vacuum transaction
AUTOMATIC_VACUUM_BYTES = 64_000_000  # a one-time VACUUM up to this size: well under a second
ANALYSIS_LIMIT = 400  # rows per index PRAGMA optimize may read (SQLite's recommendation)
CLOSE_BUSY_MS = 100
CHECKPOINT_TRIES = 20  # at close, optimize only if the write lock is free within this
AUTO_VACUUM_MODES = {0: "none", 1: "full", 2: "incremental"}


def direct(work: Callable[[], T]) -> T:
    return work()


@dataclass(frozen=True)
class Space:
    """SQLite's pages: how many, how many free, and the auto_vacuum mode."""

    page_size: int
    pages: int
    free_pages: int
    auto_vacuum: str

    @property
    def size_bytes(self) -> int:
        return self.page_size * self.pages

    @property
    def free_bytes(self) -> int:
        return self.page_size * self.free_pages

    @property
    def free_ratio(self) -> float:
        return self.free_pages / self.pages if self.pages else 0.0


@dataclass
class Reclaimed:
    """What ``vacuum`` or a reclaim did (SQLite: pages; PostgreSQL: dead rows)."""

    method: str  # incremental | vacuum | nothing | "VACUUM (ANALYZE)"
    before_bytes: int
    after_bytes: int
    seconds: float
    steps: int = 0
    longest_step_seconds: float = 0.0  # the longest a writer could have waited
    dead_rows_before: int = 0
    dead_rows_after: int = 0
    note: str = ""

    def describe(self) -> str:
        if self.method == "nothing":
            return self.note
        gained = self.before_bytes - self.after_bytes
        if self.method == "incremental":
            return (
                f"gave back {megabytes(gained)} in {self.steps} steps of at most "
                f"{self.longest_step_seconds * 1000:.0f} ms ({megabytes(self.before_bytes)} -> "
                f"{megabytes(self.after_bytes)}) in {self.seconds:.1f}s"
            )
        if self.method == "vacuum":
            return (
                f"VACUUM rewrote the file: {megabytes(self.before_bytes)} -> "
                f"{megabytes(self.after_bytes)} in {self.seconds:.1f}s (writers waited "
                "meanwhile); from now on free pages are given back in small steps"
            )
        removed = max(0, self.dead_rows_before - self.dead_rows_after)
        return (
            f"{self.method}: {removed:,} dead row versions removed ({self.dead_rows_before:,} "
            f"-> {self.dead_rows_after:,}), their space reusable; database "
            f"{megabytes(self.before_bytes)} -> {megabytes(self.after_bytes)} in "
            f"{self.seconds:.1f}s"
        )


@dataclass(frozen=True)
class Analyzed:
    what: str  # the statement that ran
    tables: int
    seconds: float

    def describe(self) -> str:
        return f"{self.what}: planner statistics of {self.tables} tables refreshed in " + (
            f"{self.seconds * 1000:.0f} ms"
        )


@dataclass(frozen=True)
class TableVacuum:
    """PostgreSQL: one table's dead rows and vacuums (from pg_stat_user_tables)."""

    name: str
    live_rows: int
    dead_rows: int
    trigger_rows: int  # dead rows that start an autovacuum of it
    autovacuum: bool
    last_vacuum: datetime | None
    last_autovacuum: datetime | None

    @property
    def dead_ratio(self) -> float:
        total = self.live_rows + self.dead_rows
        return self.dead_rows / total if total else 0.0

    @property
    def last_vacuumed(self) -> datetime | None:
        return max((t for t in (self.last_vacuum, self.last_autovacuum) if t), default=None)

    @property
    def behind(self) -> bool:
        if not self.autovacuum:
            return self.dead_rows > self.trigger_rows
        return self.dead_rows > 2 * self.trigger_rows

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.name,
            "live_rows": self.live_rows,
            "dead_rows": self.dead_rows,
            "dead_ratio": round(self.dead_ratio, 4),
            "autovacuum_trigger_rows": self.trigger_rows,
            "autovacuum": self.autovacuum,
            "last_vacuum": _iso(self.last_vacuum),
            "last_autovacuum": _iso(self.last_autovacuum),
            "behind": self.behind,
        }


@dataclass
class MaintenanceStatus:
    """What the check, ``/dbstats`` and ``GET /api/stats`` say about maintenance."""

    outcome: Outcome
    data: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)  # for /dbstats


class Maintenance:
    """The dialect's maintenance; blocking methods, each unit of work passed to ``step``."""

    def __init__(self, database: DatabaseService, settings: MaintenanceSettings) -> None:
        self.database = database
        self.settings = settings
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self.last_optimize: float | None = None  # time.time()
        self.last_reclaim: Reclaimed | None = None
        self.last_reclaim_at: float | None = None

    def engine(self) -> Engine:
        with self._engine_lock:
            if self._engine is None:
                self._engine = create_database_engine(self.database.settings, "maintenance")
            return self._engine

    def dispose(self) -> None:
        with self._engine_lock:
            if self._engine is not None:
                self._engine.dispose()
            self._engine = None

    # -- the bot's connections ------------------------------------------------------------

    def install(self, engine: Engine) -> None:
        """Hooks on the bot's engine (SQLite: optimize as each connection closes)."""

    def uninstall(self, engine: Engine) -> None:
        pass

    def at_open(self, step: Step[Any] = direct) -> None:
        """After the database opened."""

    def optimize(self, step: Step[Any] = direct) -> int:
        """The periodic planner-statistics step; returns how many connections it touched."""
        return 0

    # -- on demand ----------------------------------------------------------------------------

    def analyze(self) -> Analyzed:
        raise NotImplementedError

    def vacuum(self, stop: threading.Event | None = None, step: Step[Any] = direct) -> Reclaimed:
        raise NotImplementedError

    # -- reclaiming free space (SQLite) ------------------------------------------------------

    def reclaim_needed(self) -> bool:
        return False

    def reclaim(self, stop: threading.Event | None = None, step: Step[Any] = direct) -> Reclaimed:
        return Reclaimed("nothing", 0, 0, 0.0, note="nothing to reclaim")

    def status(self, connection: Connection) -> MaintenanceStatus:
        raise NotImplementedError


class SqliteMaintenance(Maintenance):
    def install(self, engine: Engine) -> None:
        if not event.contains(engine, "close", _optimize_at_close):
            event.listen(engine, "close", _optimize_at_close)

    def uninstall(self, engine: Engine) -> None:
        if event.contains(engine, "close", _optimize_at_close):
            event.remove(engine, "close", _optimize_at_close)

    def at_open(self, step: Step[Any] = direct) -> None:
        """``PRAGMA optimize=0x10002``: statistics for every table that needs them."""

        def run() -> None:
            with self.engine().connect() as connection:
                driver: Any = connection.connection.driver_connection
                _bounded_optimize(driver, "PRAGMA optimize=0x10002")

        step(run)
        self.last_optimize = time.time()

    def optimize(self, step: Step[Any] = direct) -> int:
        """``PRAGMA optimize`` on each idle connection of the bot's pool (connections in use
        get theirs the next time, or when they close)."""

        def run() -> int:
            engine = self.database.engine
            idle = getattr(engine.pool, "checkedin", lambda: 0)()
            taken = []
            try:
                for _ in range(idle):
                    taken.append(engine.raw_connection())
                for connection in taken:
                    _bounded_optimize(connection.driver_connection, "PRAGMA optimize")
            finally:
                for connection in taken:
                    connection.close()
            return len(taken)

        touched: int = step(run)
        self.last_optimize = time.time()
        return touched

    def analyze(self) -> Analyzed:
        started = time.perf_counter()
        with self.engine().connect() as connection:
            driver: Any = connection.connection.driver_connection
            driver.execute("ANALYZE")
            tables = _sqlite_tables(driver)
        self.last_optimize = time.time()
        return Analyzed("ANALYZE", tables, time.perf_counter() - started)

    def space(self) -> Space:
        with self.engine().connect() as connection:
            return _space(connection.connection.driver_connection)

    def reclaim_needed(self) -> bool:
        space = self.space()
        return space.auto_vacuum != "full" and space.free_ratio > self.settings.vacuum_free_ratio

    def reclaim(self, stop: threading.Event | None = None, step: Step[Any] = direct) -> Reclaimed:
        """Give free pages back: in steps (incremental), or with one short VACUUM that makes
        the database incremental; a long VACUUM is left to ``dbkeeper db vacuum``."""
        space = self.space()
        if space.auto_vacuum == "none" and space.size_bytes > AUTOMATIC_VACUUM_BYTES:
            return Reclaimed(
                "nothing",
                space.size_bytes,
                space.size_bytes,
                0.0,
                note=(
                    f"{megabytes(space.free_bytes)} free of {megabytes(space.size_bytes)} "
                    "not reclaimed: this database was made without auto_vacuum, and the "
                    "one-time VACUUM that changes that would block writers for a while; run "
                    "`dbkeeper db vacuum` at a quiet time"
                ),
            )
        return self.vacuum(stop, step)

    def vacuum(self, stop: threading.Event | None = None, step: Step[Any] = direct) -> Reclaimed:
        """Reclaim every free page now (``dbkeeper db vacuum``)."""
        stop = stop or threading.Event()
        space = self.space()
        started = time.perf_counter()
        if space.auto_vacuum == "full" or (space.free_pages == 0 and space.auto_vacuum != "none"):
            return Reclaimed(
                "nothing",
                space.size_bytes,
                space.size_bytes,
                0.0,
                note=f"nothing to reclaim: no free pages in {megabytes(space.size_bytes)}",
            )
        if space.auto_vacuum == "none":
            took = step(self._full_vacuum)
            result = Reclaimed("vacuum", space.size_bytes, 0, 0.0, 1, took)
        else:
            result = Reclaimed("incremental", space.size_bytes, 0, 0.0)
            while not stop.is_set():
                took, left = step(self._incremental_step)
                result.steps += 1
                result.longest_step_seconds = max(result.longest_step_seconds, took)
                if left == 0:
                    break
                stop.wait(max(0.01, took))  # writers waiting on the lock get in between steps
        step(self._checkpoint)
        result.after_bytes = self.space().size_bytes
        result.seconds = time.perf_counter() - started
        self.last_reclaim, self.last_reclaim_at = result, time.time()
        return result

    def _incremental_step(self) -> tuple[float, int]:
        """One short write transaction: ``STEP_PAGES`` pages off the end of the file."""
        with self.engine().connect() as connection:
            driver: Any = connection.connection.driver_connection
            started = time.perf_counter()
            # executescript steps the pragma to the end (execute would free one page only)
            driver.executescript(
                f"BEGIN IMMEDIATE; PRAGMA incremental_vacuum({STEP_PAGES}); COMMIT;"
            )
            took = time.perf_counter() - started
            # The moved pages go from the log to the file here, where waiting costs nobody:
            # left in the log, the bot's next commit would copy them (SQLite's autocheckpoint).
            driver.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            left = int(driver.execute("PRAGMA freelist_count").fetchone()[0])
        return took, left

    def _full_vacuum(self) -> float:
        with self.engine().connect() as connection:
            driver: Any = connection.connection.driver_connection
            driver.execute("PRAGMA auto_vacuum = INCREMENTAL")  # what this VACUUM switches to
            started = time.perf_counter()
            driver.execute("VACUUM")
            return time.perf_counter() - started

    def _checkpoint(self) -> None:
        """Copy the log into the file, which shrinks to the pages in use once a checkpoint
        copies all of it (PASSIVE: never waiting for the bot; tried a few times while its
        commits keep coming)."""
        file = self.database.file
        with self.engine().connect() as connection:
            driver: Any = connection.connection.driver_connection
            for _ in range(CHECKPOINT_TRIES):
                driver.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                space = _space(driver)
                if file is None or file.stat().st_size <= space.size_bytes:
                    return
                time.sleep(0.05)

    def status(self, connection: Connection) -> MaintenanceStatus:
        space = _space(connection.connection.driver_connection)
        ratio = self.settings.vacuum_free_ratio
        message = (
            f"{space.free_ratio:.0%} free of {megabytes(space.size_bytes)} (reclaimed above "
            f"{ratio:.0%}; auto_vacuum {space.auto_vacuum})"
        )
        big = space.size_bytes > AUTOMATIC_VACUUM_BYTES
        if space.auto_vacuum == "none" and space.free_ratio > ratio and big:
            message += "; run `dbkeeper db vacuum` at a quiet time to reclaim it"
        if self.last_optimize is not None:
            message += f" | statistics refreshed {duration(time.time() - self.last_optimize)} ago"
        data: dict[str, Any] = {
            "page_size": space.page_size,
            "pages": space.pages,
            "free_pages": space.free_pages,
            "free_ratio": round(space.free_ratio, 4),
            "vacuum_free_ratio": ratio,
            "auto_vacuum": space.auto_vacuum,
            "last_optimize": _iso_ts(self.last_optimize),
            "last_reclaim": _iso_ts(self.last_reclaim_at),
            "last_reclaim_result": self.last_reclaim.describe() if self.last_reclaim else None,
        }
        lines = [
            f"Free pages {space.free_ratio:.0%} of {megabytes(space.size_bytes)} "
            f"(reclaimed above {ratio:.0%}, auto_vacuum {space.auto_vacuum})"
        ]
        if self.last_reclaim is not None and self.last_reclaim_at is not None:
            lines.append(
                f"Last reclaim {duration(time.time() - self.last_reclaim_at)} ago: "
                + self.last_reclaim.describe()
            )
        values = {"free_ratio": space.free_ratio, "free_bytes": float(space.free_bytes)}
        return MaintenanceStatus(healthy(message, values=values), data, lines)


def _space(driver: Any) -> Space:
    def one(pragma: str) -> int:
        return int(driver.execute(f"PRAGMA {pragma}").fetchone()[0])

    mode = AUTO_VACUUM_MODES.get(one("auto_vacuum"), "none")
    return Space(one("page_size"), one("page_count"), one("freelist_count"), mode)


def _sqlite_tables(driver: Any) -> int:
    return int(
        driver.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        ).fetchone()[0]
    )


def _bounded_optimize(driver: Any, pragma: str) -> None:
    """``pragma`` reading at most ``ANALYSIS_LIMIT`` rows per index (then the limit is off)."""
    driver.execute(f"PRAGMA analysis_limit = {ANALYSIS_LIMIT}")
    try:
        driver.execute(pragma).fetchall()
    finally:
        driver.execute("PRAGMA analysis_limit = 0")


def _optimize_at_close(dbapi_connection: Any, _record: Any) -> None:
    """SQLAlchemy's ``close`` event of the bot's pool: ``PRAGMA optimize`` before it closes,
    if the write lock is free at once (a close never waits on it)."""
    try:
        busy = int(dbapi_connection.execute("PRAGMA busy_timeout").fetchone()[0])
        dbapi_connection.execute(f"PRAGMA busy_timeout = {CLOSE_BUSY_MS}")
        try:
            _bounded_optimize(dbapi_connection, "PRAGMA optimize")
        finally:
            dbapi_connection.execute(f"PRAGMA busy_timeout = {busy}")
    except Exception as error:  # a connection closed because it broke, a busy database
        log.debug("PRAGMA optimize at close skipped: %s", error)


class PostgresMaintenance(Maintenance):
    def analyze(self) -> Analyzed:
        started = time.perf_counter()
        with self.engine().connect() as connection:
            auto = connection.execution_options(isolation_level="AUTOCOMMIT")
            auto.exec_driver_sql("ANALYZE")
            tables = int(
                auto.exec_driver_sql("SELECT count(*) FROM pg_stat_user_tables").scalar() or 0
            )
        self.last_optimize = time.time()
        return Analyzed("ANALYZE", tables, time.perf_counter() - started)

    def vacuum(self, stop: threading.Event | None = None, step: Step[Any] = direct) -> Reclaimed:
        """``VACUUM (ANALYZE)`` of the whole database (what autovacuum would do, now)."""

        def run() -> Reclaimed:
            with self.engine().connect() as connection:
                auto = connection.execution_options(isolation_level="AUTOCOMMIT")
                dead_before, size_before = _dead_and_size(auto)
                started = time.perf_counter()
                auto.exec_driver_sql("VACUUM (ANALYZE)")
                seconds = time.perf_counter() - started
                dead_after, size_after = _dead_and_size(auto)
            return Reclaimed(
                "VACUUM (ANALYZE)",
                size_before,
                size_after,
                seconds,
                dead_rows_before=dead_before,
                dead_rows_after=dead_after,
            )

        result: Reclaimed = step(run)
        self.last_reclaim, self.last_reclaim_at = result, time.time()
        return result

    def tables(self, connection: Connection) -> tuple[list[TableVacuum], bool]:
        """Every table's dead rows and vacuums; whether autovacuum runs on the server."""
        settings: dict[str, str] = dict(
            connection.exec_driver_sql(
                "SELECT name, setting FROM pg_settings WHERE name IN ('autovacuum', "
                "'autovacuum_vacuum_threshold', 'autovacuum_vacuum_scale_factor')"
            ).all()
        )
        server_on = settings.get("autovacuum", "on") == "on"
        threshold = float(settings.get("autovacuum_vacuum_threshold", 50))
        scale = float(settings.get("autovacuum_vacuum_scale_factor", 0.2))
        rows = connection.exec_driver_sql(
            "SELECT s.relname, s.n_live_tup, s.n_dead_tup, c.reltuples, c.reloptions, "
            "s.last_vacuum, s.last_autovacuum FROM pg_stat_user_tables s "
            "JOIN pg_class c ON c.oid = s.relid ORDER BY s.n_dead_tup DESC, s.relname"
        ).all()
        found = []
        for name, live, dead, reltuples, reloptions, last_vacuum, last_autovacuum in rows:
            options = dict(o.split("=", 1) for o in (reloptions or []) if "=" in o)
            table_threshold = float(options.get("autovacuum_vacuum_threshold", threshold))
            table_scale = float(options.get("autovacuum_vacuum_scale_factor", scale))
            enabled = server_on and options.get("autovacuum_enabled", "true") != "false"
            rows_estimate = max(float(reltuples or 0), float(live or 0))
            found.append(
                TableVacuum(
                    name=str(name),
                    live_rows=int(live or 0),
                    dead_rows=int(dead or 0),
                    trigger_rows=int(table_threshold + table_scale * rows_estimate),
                    autovacuum=enabled,
                    last_vacuum=last_vacuum,
                    last_autovacuum=last_autovacuum,
                )
            )
        return found, server_on

    def status(self, connection: Connection) -> MaintenanceStatus:
        tables, server_on = self.tables(connection)
        behind = [t for t in tables if t.behind]
        worst = max(tables, key=lambda t: (t.dead_rows, t.dead_ratio), default=None)
        data = {
            "autovacuum": server_on,
            "tables": [t.to_json() for t in tables],
            "last_vacuum_command": _iso_ts(self.last_reclaim_at),
        }
        lines = []
        for table in sorted(tables, key=lambda t: (-t.dead_rows, t.name))[:5]:
            lines.append(
                f"  • {table.name}: {table.dead_rows:,} dead ({table.dead_ratio:.0%}), "
                f"vacuumed {_ago(table.last_vacuumed)}"
            )
        values = {
            "dead_rows": float(sum(t.dead_rows for t in tables)),
            "tables_behind": float(len(behind)),
        }
        if behind:
            described = "; ".join(
                f"{t.name} ({t.dead_rows:,} dead rows, {t.dead_ratio:.0%}; vacuumed "
                f"{_ago(t.last_vacuumed)}{'' if t.autovacuum else '; autovacuum off'})"
                for t in behind[:3]
            )
            more = f" and {len(behind) - 3} more" if len(behind) > 3 else ""
            outcome = degraded(
                f"autovacuum is behind on {described}{more}: run `dbkeeper db vacuum`, and "
                "check autovacuum (the server's autovacuum, its workers and cost limits)",
                values=values,
            )
        elif worst is None:
            outcome = healthy("no tables yet", values=values)
        else:
            state = "autovacuum keeps up" if server_on else "autovacuum is off on the server"
            outcome = healthy(
                f"{state}: {len(tables)} tables; the most dead rows in {worst.name} "
                f"({worst.dead_rows:,}, {worst.dead_ratio:.0%}; vacuumed "
                f"{_ago(worst.last_vacuumed)})",
                values=values,
            )
        return MaintenanceStatus(outcome, data, lines)


def _dead_and_size(connection: Connection) -> tuple[int, int]:
    dead = connection.exec_driver_sql(
        "SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables"
    ).scalar()
    size = connection.exec_driver_sql("SELECT pg_database_size(current_database())").scalar()
    return int(dead or 0), int(size or 0)


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat(timespec="seconds") if moment else None


def _iso_ts(moment: float | None) -> str | None:
    return _iso(datetime.fromtimestamp(moment, UTC)) if moment is not None else None


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    return f"{duration((datetime.now(UTC) - moment).total_seconds())} ago"


def maintenance_for(database: DatabaseService, settings: MaintenanceSettings) -> Maintenance:
    if database.dialect == "sqlite":
        return SqliteMaintenance(database, settings)
    return PostgresMaintenance(database, settings)
