"""Retention: rows older than ``[retention]`` says are deleted, in small batches.

::

    [retention]
    events = { column = "created_at", keep_days = 30 }

Once a day (and on ``dbkeeper db cleanup``) each named table loses the rows whose time column
is older than ``keep_days``, ``BATCH_ROWS`` at a time, each batch its own short transaction, with
a pause after each as long as the batch took (at least ``PAUSE_SECONDS``) so that the bot's
writers get the lock in between: the longest any writer waits is one batch (measured and
reported: "longest write lock"). A row still referenced by a foreign key of another row (any
table, the same one included) is kept, whatever the key's ``ON DELETE`` says, and counted.
``--dry-run`` counts what would go.

The rules are checked against the live schema when the bot starts: a table or column that
does not exist, a bookkeeping table, or a column that holds no time stops startup with one
line naming it.

The time column may hold dates and times (SQLite's text, PostgreSQL's ``timestamp``,
``timestamptz`` or ``date``) or unix seconds (a number). On SQLite the cutoff is written the way
the column's values are (``2026-01-31 10:00:00`` or ``2026-01-31T10:00:00``), so that text
compares as time.

PostgreSQL: a batch first locks its candidates (``FOR UPDATE SKIP LOCKED``: rows another
transaction holds are left for the next run), then deletes those still unreferenced in a
second statement, with a fresh snapshot: a reference added meanwhile keeps its row.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, TypeVar

from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy import types as sqltypes

from ..engines import create_database_engine
from ..errors import DatabaseError
from ..migrate.bookkeeping import is_bookkeeping
from ..service import DatabaseService
from ..settings import RetentionRule, RetentionSettings

log = logging.getLogger("dbkeeper.retention")
T = TypeVar("T")
Step = Callable[[Callable[[], T]], T]
BATCH_ROWS = 500
PAUSE_SECONDS = 0.02
Kind = Literal["text", "datetime", "date", "epoch"]


class RetentionError(DatabaseError):
    """A ``[retention]`` rule that does not fit the database (checked at startup)."""


def direct(work: Callable[[], T]) -> T:
    return work()


@dataclass(frozen=True)
class Reference:
    """A foreign key of ``table`` pointing at the rule's table."""

    table: str
    columns: tuple[str, ...]
    referred: tuple[str, ...]


@dataclass(frozen=True)
class Target:
    """One rule, checked against the live schema."""

    table: str
    column: str
    keep_days: float
    kind: Kind
    references: tuple[Reference, ...]
    keys: tuple[str, ...]  # what names a row: ("rowid",), ("ctid",), or the primary key

    def cutoff(self, now: datetime) -> datetime:
        return now - timedelta(days=self.keep_days)


@dataclass
class TableResult:
    table: str
    column: str
    keep_days: float
    cutoff: datetime
    removed: int = 0  # rows deleted (a dry run: rows that would go)
    kept_referenced: int = 0  # older rows kept because another row refers to them
    batches: int = 0
    longest_lock_seconds: float = 0.0  # the longest batch transaction
    seconds: float = 0.0
    dry_run: bool = False
    finished_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def describe(self) -> str:
        older = f"older than {self.keep_days:g} days (before {self.cutoff:%Y-%m-%d %H:%M} UTC)"
        kept = (
            f"; {self.kept_referenced:,} older {'rows' if self.kept_referenced != 1 else 'row'} "
            f"still referenced {'would stay' if self.dry_run else 'kept'}"
            if self.kept_referenced
            else ""
        )
        if self.dry_run:
            return f"{self.table}: {self.removed:,} rows {older} would go{kept}"
        batches = (
            f" in {self.batches} batches (longest write lock "
            f"{self.longest_lock_seconds * 1000:.0f} ms)"
            if self.batches
            else ""
        )
        return f"{self.table}: removed {self.removed:,} rows {older}{batches}{kept}"

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "column": self.column,
            "keep_days": self.keep_days,
            "cutoff": self.cutoff.isoformat(timespec="seconds"),
            "removed": self.removed,
            "kept_referenced": self.kept_referenced,
            "batches": self.batches,
            "longest_lock_ms": round(self.longest_lock_seconds * 1000, 3),
            "seconds": round(self.seconds, 3),
            "dry_run": self.dry_run,
            "finished_at": self.finished_at.isoformat(timespec="seconds"),
        }


class Retention:
    """The ``[retention]`` rules of one database."""

    def __init__(self, database: DatabaseService, settings: RetentionSettings) -> None:
        self.database = database
        self.rules: dict[str, RetentionRule] = dict(settings.tables)
        self._engine: Engine | None = None
        self.last: dict[str, TableResult] = {}

    @property
    def configured(self) -> bool:
        return bool(self.rules)

    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = create_database_engine(self.database.settings, "maintenance")
        return self._engine

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # -- the rules against the schema -------------------------------------------------------

    def targets(self, connection: Connection | None = None) -> list[Target]:
        """Each rule checked against the live schema; ``RetentionError`` names the first that
        does not fit."""
        if not self.rules:
            return []
        if connection is None:
            with self.engine().connect() as own:
                return self.targets(own)
        inspector = inspect(connection)
        tables = sorted(inspector.get_table_names())
        shown = ", ".join(t for t in tables if not is_bookkeeping(t)) or "none"
        found = []
        for name, rule in self.rules.items():
            if is_bookkeeping(name):
                raise RetentionError(
                    f"[retention] {name}: {name} is dbkeeper's own bookkeeping table; it keeps "
                    "what it needs by itself. Remove it from [retention]."
                )
            if name not in tables:
                raise RetentionError(
                    f"[retention] {name}: there is no table {name} in the database (tables: "
                    f"{shown}); fix the name or remove it from [retention]"
                )
            columns = {c["name"]: c for c in inspector.get_columns(name)}
            if rule.column not in columns:
                raise RetentionError(
                    f'[retention] {name}.column = "{rule.column}": the table {name} has no column '
                    f"{rule.column} (columns: {', '.join(columns)})"
                )
            kind = self._kind(name, rule.column, columns[rule.column]["type"])
            references = tuple(
                Reference(
                    other,
                    tuple(key["constrained_columns"]),
                    tuple(
                        key["referred_columns"]
                        or inspector.get_pk_constraint(name)["constrained_columns"]
                    ),
                )
                for other in tables
                for key in inspector.get_foreign_keys(other)
                if key["referred_table"] == name
            )
            keys = self._row_keys(connection, name, inspector)
            found.append(Target(name, rule.column, float(rule.keep_days), kind, references, keys))
        return found

    def _kind(self, table: str, column: str, column_type: Any) -> Kind:
        if isinstance(column_type, sqltypes.Integer | sqltypes.Numeric | sqltypes.Float):
            return "epoch"
        if isinstance(column_type, sqltypes.DateTime):
            return "datetime" if self.database.dialect != "sqlite" else "text"
        if isinstance(column_type, sqltypes.Date):
            return "date" if self.database.dialect != "sqlite" else "text"
        if self.database.dialect == "sqlite" and isinstance(column_type, sqltypes.String):
            return "text"  # SQLite keeps dates and times as text
        raise RetentionError(
            f'[retention] {table}.column = "{column}": {column} is {column_type}, not a date, '
            "a time or a number of unix seconds; name the table's time column"
        )

    def _row_keys(self, connection: Connection, table: str, inspector: Any) -> tuple[str, ...]:
        if self.database.dialect != "sqlite":
            return ("ctid",)
        try:
            connection.exec_driver_sql(f"SELECT rowid FROM {_q(table)} LIMIT 0")
            return ("rowid",)
        except Exception:  # a WITHOUT ROWID table: its primary key names a row
            return tuple(inspector.get_pk_constraint(table)["constrained_columns"])

    # -- running ---------------------------------------------------------------------------

    def run(
        self,
        *,
        dry_run: bool = False,
        stop: threading.Event | None = None,
        step: Step[Any] = direct,
        now: datetime | None = None,
    ) -> list[TableResult]:
        """Delete (or, ``dry_run``, count) what every rule lets go; blocking. ``step`` runs
        each unit of work (a running bot passes one through its work gate)."""
        stop = stop or threading.Event()
        now = now or datetime.now(UTC)
        results = []
        for target in step(self.targets):
            if stop.is_set():
                break
            result = TableResult(
                target.table, target.column, target.keep_days, target.cutoff(now), dry_run=dry_run
            )
            started = time.perf_counter()
            cutoff = step(functools.partial(self._cutoff_value, target, now))
            if cutoff is not None:
                if dry_run:
                    result.removed = step(functools.partial(self._count, target, cutoff, False))
                else:
                    self._delete(target, cutoff, result, stop, step)
                if target.references:
                    result.kept_referenced = step(
                        functools.partial(self._count, target, cutoff, True)
                    )
            result.seconds = time.perf_counter() - started
            result.finished_at = datetime.now(UTC)
            if not dry_run:
                self.last[target.table] = result
                log.info("retention: %s", result.describe())
            results.append(result)
        return results

    def _delete(
        self,
        target: Target,
        cutoff: Any,
        result: TableResult,
        stop: threading.Event,
        step: Step[Any],
    ) -> None:
        while not stop.is_set():
            deleted, seconds, more = step(functools.partial(self._batch, target, cutoff))
            result.batches += 1
            result.removed += deleted
            result.longest_lock_seconds = max(result.longest_lock_seconds, seconds)
            if not more:
                break
            stop.wait(max(PAUSE_SECONDS, seconds))  # the bot's writers get the lock meanwhile

    def _batch(self, target: Target, cutoff: Any) -> tuple[int, float, bool]:
        """One short transaction deleting up to ``BATCH_ROWS`` rows: (rows, seconds it held
        the lock, whether there may be more)."""
        old_and_free = self._condition(target, referenced=False)
        table = _q(target.table)
        with self.engine().connect() as connection:
            if self.database.dialect == "sqlite":
                keys = ", ".join(_key(k) for k in target.keys)
                inner = ", ".join(f"c.{_key(k)}" for k in target.keys)
                driver: Any = connection.connection.driver_connection
                started = time.perf_counter()
                driver.execute("BEGIN IMMEDIATE")
                try:
                    deleted = driver.execute(
                        f"DELETE FROM {table} WHERE ({keys}) IN (SELECT {inner} FROM {table} AS c "
                        f"WHERE {old_and_free} LIMIT {BATCH_ROWS})",
                        {"cutoff": cutoff},
                    ).rowcount
                    driver.execute("COMMIT")
                except BaseException:
                    driver.execute("ROLLBACK")
                    raise
                held = time.perf_counter() - started
                # The batch's pages go to the file here, not in the bot's next commit.
                driver.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                return int(deleted), held, deleted >= BATCH_ROWS
            started = time.perf_counter()
            with connection.begin():
                locked = [
                    str(row[0])
                    for row in connection.execute(
                        text(
                            f"SELECT c.ctid FROM {table} AS c WHERE {old_and_free} "
                            f"LIMIT {BATCH_ROWS} FOR UPDATE SKIP LOCKED"
                        ),
                        {"cutoff": cutoff},
                    )
                ]
                deleted = 0
                if locked:  # again with a fresh snapshot: a reference added meanwhile counts
                    deleted = connection.execute(
                        text(
                            f"DELETE FROM {table} AS c WHERE c.ctid = ANY(CAST(:rows AS tid[])) "
                            f"AND {old_and_free}"
                        ),
                        {"rows": locked, "cutoff": cutoff},
                    ).rowcount
            return int(deleted), time.perf_counter() - started, len(locked) >= BATCH_ROWS

    def _count(self, target: Target, cutoff: Any, referenced: bool) -> int:
        condition = self._condition(target, referenced=referenced)
        with self.engine().connect() as connection:
            found = connection.execute(
                text(f"SELECT count(*) FROM {_q(target.table)} AS c WHERE {condition}"),
                {"cutoff": cutoff},
            ).scalar()
        return int(found or 0)

    def _condition(self, target: Target, *, referenced: bool) -> str:
        """Older than the cutoff, and (not) referenced by any other row."""
        older = f"c.{_q(target.column)} < :cutoff"
        if not target.references:
            return older if not referenced else "1 = 0"
        exists = []
        for index, ref in enumerate(target.references):
            alias = f"r{index}"
            joined = " AND ".join(
                f"{alias}.{_q(mine)} = c.{_q(theirs)}"
                for mine, theirs in zip(ref.columns, ref.referred, strict=True)
            )
            if ref.table == target.table:  # a row referring to itself does not hold it
                differs = "IS NOT" if self.database.dialect == "sqlite" else "IS DISTINCT FROM"
                keys = " OR ".join(f"{alias}.{_key(k)} {differs} c.{_key(k)}" for k in target.keys)
                joined += f" AND ({keys})"
            exists.append(f"EXISTS (SELECT 1 FROM {_q(ref.table)} AS {alias} WHERE {joined})")
        if referenced:
            return f"{older} AND ({' OR '.join(exists)})"
        return f"{older} AND NOT " + " AND NOT ".join(exists)

    def _cutoff_value(self, target: Target, now: datetime) -> Any:
        """The cutoff as the column holds time (None: the table is empty of times)."""
        moment = target.cutoff(now)
        if target.kind == "datetime":
            return moment
        if target.kind == "date":
            return moment.date()
        with self.engine().connect() as connection:
            sample = connection.exec_driver_sql(
                f"SELECT {_q(target.column)} FROM {_q(target.table)} "
                f"WHERE {_q(target.column)} IS NOT NULL LIMIT 1"
            ).scalar()
        if sample is None:
            return None
        if target.kind == "epoch" or isinstance(sample, int | float):
            seconds = moment.timestamp()
            return seconds * 1000 if float(sample) > 1e11 else seconds  # milliseconds
        if isinstance(sample, datetime | date):
            return moment
        shown = str(sample)
        separator = "T" if len(shown) > 10 and shown[10] == "T" else " "
        if len(shown) <= 10:
            return f"{moment:%Y-%m-%d}"
        fraction = f".{moment:%f}" if len(shown) > 19 and shown[19] == "." else ""
        return f"{moment:%Y-%m-%d}{separator}{moment:%H:%M:%S}{fraction}"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _key(name: str) -> str:
    """A row key as SQL: the engines' own row ids stay bare (quoted, they are names)."""
    return name if name in ("rowid", "ctid") else _q(name)
