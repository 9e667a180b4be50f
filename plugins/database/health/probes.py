"""What the health checks ask the database, one class per dialect.

Every check opens a *fresh* connection of its own (no pool), read-only, with every wait
bounded by the check timeout: a SQLite busy timeout no longer than the check's, a PostgreSQL
``connect_timeout``, ``statement_timeout`` and ``lock_timeout``. A pooled connection to a
server that stopped answering would block its thread with no timeout at all; a fresh one
fails within ``connect_timeout``. A fresh SQLite connection also reads what is on disk now,
not pages a long-lived connection has cached.

Cheap by design, so a check every five minutes costs next to nothing even on a large
database: record counts are estimates (SQLite: ``max(rowid)`` per table, one B-tree descent;
PostgreSQL: the statistics in ``pg_stat_user_tables``/``pg_class``), sizes come from page
counts or ``pg_database_size``. Only SQLite's ``quick_check`` reads every page; the health
module decides when it runs.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from dbkeeper.health import Outcome, degraded, healthy, unhealthy

from ..engines import create_database_engine
from ..migrate.bookkeeping import BOOKKEEPING_TABLES
from ..service import DatabaseService
from ..timeouts import Interrupter

SQLITE_MAGIC = b"SQLite format 3\x00"
CONNECTIONS_WARNING_RATIO = 0.9
IDLE_IN_TRANSACTION_WARNING = "5 minutes"


@dataclass(frozen=True)
class Overview:
    records_per_table: dict[str, int]  # estimates (see the module docstring)

    @property
    def tables(self) -> int:
        return len(self.records_per_table)

    @property
    def records(self) -> int:
        return sum(self.records_per_table.values())


class Probe:
    """The dialect-specific questions; the health checks ask them on a fresh connection."""

    scans_pages = False  # True when ``integrity(scan=True)`` reads the whole database

    def __init__(self, database: DatabaseService, timeout: float) -> None:
        self.database = database
        self.timeout = timeout
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()

    @contextlib.contextmanager
    def connect(self, interrupter: Interrupter | None = None) -> Iterator[Connection]:
        with self._engine_lock:
            if self._engine is None:
                self._engine = self._create_engine()
        with self._engine.connect() as connection:
            if interrupter is not None:
                interrupter.arm(self._abort(connection))
            try:
                yield connection
            finally:
                if interrupter is not None:
                    interrupter.disarm()

    def dispose(self) -> None:
        with self._engine_lock:
            if self._engine is not None:
                self._engine.dispose()
            self._engine = None

    def _create_engine(self) -> Engine:
        return create_database_engine(self.database.settings, "probe", timeout=self.timeout)

    def _abort(self, connection: Connection) -> Callable[[], None] | None:
        """What aborts this connection's running statement from another thread, if anything."""
        return None

    def overview(self, connection: Connection) -> Overview:
        raise NotImplementedError

    def size_bytes(self, connection: Connection) -> dict[str, float]:
        """``size_bytes`` at least; other figures where the dialect has them."""
        raise NotImplementedError

    def integrity(self, connection: Connection, *, scan: bool) -> Outcome:
        raise NotImplementedError


class SQLiteProbe(Probe):
    scans_pages = True

    def _abort(self, connection: Connection) -> Callable[[], None] | None:
        driver: Any = connection.connection.driver_connection
        return driver.interrupt  # type: ignore[no-any-return]

    def overview(self, connection: Connection) -> Overview:
        names = [
            name
            for (name,) in connection.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
            if name not in BOOKKEEPING_TABLES
        ]
        estimates = self._stat1(connection)
        records: dict[str, int] = {}
        for name in names:
            quoted = '"' + name.replace('"', '""') + '"'
            try:  # the largest rowid: one descent of the table's B-tree, whatever its size
                found = connection.exec_driver_sql(f"SELECT max(rowid) FROM {quoted}").scalar()
            except OperationalError:  # a WITHOUT ROWID table: ANALYZE's estimate, if any
                found = estimates.get(name, 0)
            records[name] = int(found or 0)
        return Overview(records)

    def _stat1(self, connection: Connection) -> dict[str, int]:
        exists = connection.exec_driver_sql(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_stat1'"
        ).first()
        if exists is None:
            return {}
        rows = connection.exec_driver_sql("SELECT tbl, stat FROM sqlite_stat1 WHERE idx IS NULL")
        return {tbl: int(stat.split()[0]) for tbl, stat in rows if stat}

    def size_bytes(self, connection: Connection) -> dict[str, float]:
        page_size = connection.exec_driver_sql("PRAGMA page_size").scalar() or 0
        pages = connection.exec_driver_sql("PRAGMA page_count").scalar() or 0
        free = connection.exec_driver_sql("PRAGMA freelist_count").scalar() or 0
        wal = 0
        if self.database.file is not None:
            with contextlib.suppress(OSError):
                wal = os.stat(f"{self.database.file}-wal").st_size
        return {
            "size_bytes": page_size * pages + wal,
            "wal_bytes": wal,
            "free_bytes": page_size * free,
        }

    def integrity(self, connection: Connection, *, scan: bool) -> Outcome:
        problem = self.header_problem()
        if problem is not None:
            return unhealthy(f"the database file's header is damaged: {problem}")
        if not scan:
            return healthy("file header ok")
        return self.quick_check(connection)

    def quick_check(self, connection: Connection) -> Outcome:
        """``PRAGMA quick_check``: every page read, B-trees and free list checked (not indexes
        against their tables: that is ``integrity_check``, run on each backup instead)."""
        try:
            rows = [row for (row,) in connection.exec_driver_sql("PRAGMA quick_check(20)")]
        except DBAPIError as error:
            code = getattr(error.orig, "sqlite_errorcode", None)
            if code not in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                raise
            rows = [str(error.orig)]
        if rows == ["ok"]:
            return healthy("quick_check ok")
        lines = [line for row in rows for line in str(row).splitlines()]
        lines = [line for line in lines if not line.startswith("*** in database")] or lines
        shown = "; ".join(lines[:3]) + (f" (and {len(lines) - 3} more)" if len(lines) > 3 else "")
        return unhealthy(f"quick_check found corruption: {shown}")

    def header_problem(self) -> str | None:
        """Checks the first 100 bytes (cheap): magic string, page size, file length."""
        path = self.database.file
        if path is None:
            return None
        try:
            with Path(path).open("rb") as handle:
                header = handle.read(100)
            length = os.stat(path).st_size
        except OSError as error:
            return f"cannot read {path}: {error.strerror}"
        if length == 0:
            return None  # a new, empty database
        if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
            return "it does not start with the SQLite signature"
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        if page_size < 512 or page_size & (page_size - 1):
            return f"impossible page size {page_size}"
        if length % page_size:
            return f"the file length {length} is not a whole number of {page_size}-byte pages"
        return None


class PostgreSQLProbe(Probe):
    def overview(self, connection: Connection) -> Overview:
        rows = connection.exec_driver_sql(
            "SELECT c.relname, CASE WHEN s.n_live_tup > 0 OR c.reltuples < 0 "
            "THEN s.n_live_tup ELSE c.reltuples::bigint END "
            "FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid"
        ).all()
        return Overview(
            {name: max(0, int(n or 0)) for name, n in rows if name not in BOOKKEEPING_TABLES}
        )

    def size_bytes(self, connection: Connection) -> dict[str, float]:
        size = connection.exec_driver_sql("SELECT pg_database_size(current_database())").scalar()
        return {"size_bytes": int(size or 0)}

    def integrity(self, connection: Connection, *, scan: bool) -> Outcome:
        """Data checksum failures and connection health, from the statistics views."""
        failures, last_failure = connection.exec_driver_sql(
            "SELECT checksum_failures, checksum_last_failure FROM pg_stat_database "
            "WHERE datname = current_database()"
        ).one()
        checksums = connection.exec_driver_sql("SHOW data_checksums").scalar()
        used, idle = connection.exec_driver_sql(
            "SELECT count(*) FILTER (WHERE backend_type = 'client backend'), "
            "count(*) FILTER (WHERE state IN ('idle in transaction', "
            "'idle in transaction (aborted)') "
            f"AND now() - state_change > interval '{IDLE_IN_TRANSACTION_WARNING}') "
            "FROM pg_stat_activity"
        ).one()
        limit = int(connection.exec_driver_sql("SHOW max_connections").scalar() or 0)
        reserved = int(
            connection.exec_driver_sql("SHOW superuser_reserved_connections").scalar() or 0
        )
        available = max(1, limit - reserved)
        values = {
            "checksum_failures": float(failures or 0),
            "connections": float(used),
            "connections_max": float(available),
            "idle_in_transaction": float(idle),
        }
        summary = (
            f"checksums {checksums}, {failures or 0} failures | {used} of {available} "
            f"connections | {idle} idle in transaction > {IDLE_IN_TRANSACTION_WARNING}"
        )
        if failures:
            when = (
                f" (last {last_failure.astimezone(UTC):%Y-%m-%d %H:%M} UTC)" if last_failure else ""
            )
            return unhealthy(f"data checksum failures{when}: {summary}", values=values)
        if used >= CONNECTIONS_WARNING_RATIO * available:
            return degraded(f"connections nearly exhausted: {summary}", values=values)
        if idle:
            return degraded(f"sessions idle in a transaction: {summary}", values=values)
        return healthy(summary, values=values)


def probe_for(database: DatabaseService, timeout: float) -> Probe:
    if database.dialect == "sqlite":
        return SQLiteProbe(database, timeout)
    return PostgreSQLProbe(database, timeout)
