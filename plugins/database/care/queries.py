"""The bot's own statements, timed and grouped by shape; a slow shape is logged once, with its plan.

What is timed: every statement that goes through the database service's engine (``run``,
``read``, ``engine``, ``sessions``): from the moment SQLAlchemy hands it to the driver until the
driver returns. For a SQLite ``SELECT`` that is until its first row (reading the others is the
caller's); a scan that finds little is timed whole. dbkeeper's own work (health probes,
migrations, the leader lock, backups, database care) runs on engines of its own
(``engines``) and is never counted.

A *shape* is the statement with comments, literals and parameters replaced by ``?``, lists of
them collapsed (``IN (?)``, ``VALUES (?)``) and its text cut at ``MAX_SQL_CHARS``: the calls of
one handler, whatever their values, are one shape. Parameter values are never read, kept or
shown (they are users' data); only how many there are, so that a plan can be asked with NULLs.

Cost: two SQLAlchemy hooks per statement; the shape of a statement text is computed once and
cached (bounded), so a call costs a dictionary lookup, a lock and a few additions
(``bench/care_bench.py``). Memory is bounded: at most ``[queries] max_shapes`` shapes are kept;
when a new one arrives with the table full, the tenth with the least total time goes (as
pg_stat_statements does), and how many went is reported.

A statement slower than ``[queries] slow_ms`` is logged once per shape (not per call), with
what its plan says, asked on a read-only connection of its own, off the event loop and off the
bot's thread: SQLite ``EXPLAIN QUERY PLAN`` (a full scan names its table and the columns its
``WHERE`` filters on), PostgreSQL ``EXPLAIN`` of a generic plan (never ``ANALYZE``, which would
run the statement again; the plan shows ``$1``, not values). Literals in the plan are masked.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, event

from ..engines import create_database_engine
from ..retry import describe_error
from ..service import DatabaseService
from ..settings import QuerySettings
from ..timeouts import Interrupter, offload

log = logging.getLogger("dbkeeper.queries")
MAX_SQL_CHARS = 1000  # a shape's text is cut here (its identity is the whole normalized text)
CACHED_SQL_CHARS = 4096  # longer statement texts are normalized on every call, never kept
OPERATIONS = ("select", "insert", "update", "delete", "transaction", "other")
# Histogram buckets of dbkeeper_query_duration_seconds (seconds).
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
EVICT_SHARE = 10  # when full, the 1/10 of the shapes with the least total time go
QUEUED_PLANS = 32  # slow shapes waiting for their plan; beyond, a shape is tried again later
PLAN_TIMEOUT_SECONDS = 10.0


# -- shapes ----------------------------------------------------------------------------------

_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
_STRINGS = re.compile(r"(?:[EeXxBbNn]|[Uu]&)?'(?:[^']|'')*'|\$(?:[A-Za-z_]\w*)?\$.*?\$\w*\$", re.S)
_NUMBERS = re.compile(
    r"(?<![\w$.\"])[-+]?(?:0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+)(?![\w\"])"
)
_PLACEHOLDERS = re.compile(r"%\([^)]*\)s|%s|\$\d+|\?\d*|(?<![:\w]):[A-Za-z_]\w*|@[A-Za-z_]\w*")
_LIST = re.compile(r"\(\s*\?(?:\s*,\s*\?)+\s*\)")
_ROWS = re.compile(r"\(\?\)(?:\s*,\s*\(\?\))+")
_SPACE = re.compile(r"\s+")
_FIRST_WORD = re.compile(r"\s*\(*\s*([A-Za-z]+)")
_DML = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|REPLACE)\b", re.I)
_KINDS = {
    "SELECT": "select",
    "VALUES": "select",
    "INSERT": "insert",
    "REPLACE": "insert",
    "UPDATE": "update",
    "DELETE": "delete",
    "BEGIN": "transaction",
    "COMMIT": "transaction",
    "END": "transaction",
    "ROLLBACK": "transaction",
    "SAVEPOINT": "transaction",
    "RELEASE": "transaction",
}


@dataclass(frozen=True)
class Shape:
    key: int  # the hash of the whole normalized text
    text: str  # normalized, cut at MAX_SQL_CHARS
    operation: str  # one of OPERATIONS

    @property
    def explainable(self) -> bool:
        return self.operation in ("select", "insert", "update", "delete")


def mask_literals(text: str) -> str:
    """``text`` with string and number literals replaced by ``?`` (plans, error messages)."""
    return _NUMBERS.sub("?", _STRINGS.sub("?", text))


def shape_of(statement: str) -> Shape:
    """The shape of ``statement``: literals and parameters removed, lists collapsed."""
    text = _COMMENTS.sub(" ", statement)
    text = _PLACEHOLDERS.sub("?", mask_literals(text))
    text = _ROWS.sub("(?)", _LIST.sub("(?)", text))
    text = _SPACE.sub(" ", text).strip().rstrip(";").rstrip()
    shown = text if len(text) <= MAX_SQL_CHARS else text[: MAX_SQL_CHARS - 1] + "…"
    return Shape(hash(text), shown, _operation(text))


def _operation(text: str) -> str:
    found = _FIRST_WORD.match(text)
    word = found.group(1).upper() if found else ""
    if word == "WITH":  # the statement after the common table expressions
        depth = 0
        for index, char in enumerate(text):
            depth += (char == "(") - (char == ")")
            at_top = depth == 0 and index > 0 and text[index - 1] in " )"
            if at_top and (dml := _DML.match(text, index)):
                return _KINDS[dml.group(1).upper()]
        return "other"
    return _KINDS.get(word, "other")


# -- what is kept per shape ----------------------------------------------------------------------


class ShapeStats:
    """The figures of one shape (seconds; rows written, or returned where the driver says:
    psycopg counts a SELECT's rows, SQLite's driver does not until they are read)."""

    __slots__ = ("calls", "max", "rows", "rows_known", "shape", "slow", "total")

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.calls = 0
        self.total = 0.0
        self.max = 0.0
        self.rows = 0
        self.rows_known = False
        self.slow = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "query": self.shape.text,
            "operation": self.shape.operation,
            "calls": self.calls,
            "total_ms": round(self.total * 1000, 3),
            "mean_ms": round(self.total * 1000 / self.calls, 3) if self.calls else 0.0,
            "max_ms": round(self.max * 1000, 3),
            "rows": self.rows if self.rows_known else None,
            "slow_calls": self.slow,
        }


@dataclass(frozen=True)
class SlowStatement:
    """A statement over ``slow_ms`` whose shape was not logged yet: what asking its plan needs.

    ``statement`` is the text the driver got (placeholders, never values); ``parameters`` the
    parameters' names, or how many there are.
    """

    shape: Shape
    statement: str
    parameters: int | tuple[str, ...]
    elapsed: float


def parameter_skeleton(parameters: Any, executemany: bool) -> int | tuple[str, ...]:
    """How the parameters look, without their values: their names, or their number."""
    if executemany and isinstance(parameters, Sequence) and not isinstance(parameters, str):
        parameters = parameters[0] if parameters else ()
    if isinstance(parameters, Mapping):
        return tuple(str(name) for name in parameters)
    if isinstance(parameters, Sequence) and not isinstance(parameters, str):
        return len(parameters)
    return 0


class QueryStats:
    """The bot's statements by shape, a histogram per operation, and the slow ones.

    ``record`` is the hot path (any thread); everything else reads a copy made under the lock.
    """

    def __init__(
        self,
        settings: QuerySettings,
        *,
        on_slow: Callable[[SlowStatement], None] | None = None,
    ) -> None:
        self.settings = settings
        self.slow_seconds = settings.slow_ms / 1000
        self.max_shapes = settings.max_shapes
        self.on_slow = on_slow
        self._lock = threading.Lock()
        self._entries: dict[int, ShapeStats] = {}
        self._shapes: dict[str, Shape] = {}  # statement text -> shape (a cache, bounded)
        self._reported: set[int] = set()  # shapes whose slow statement was handed on
        self._buckets = {op: [0] * (len(BUCKETS) + 1) for op in OPERATIONS}
        self._sums = dict.fromkeys(OPERATIONS, 0.0)
        self.statements = 0
        self.slow_statements = 0
        self.evicted = 0
        self.since = time.time()
        self.last_statement = 0.0  # time.monotonic() of the latest one (0: none yet)
        self._engine: Engine | None = None

    # -- on the engine ---------------------------------------------------------------------------

    def install(self, engine: Engine) -> None:
        """Time every statement of ``engine`` from now on."""
        if self._engine is engine:
            return
        self.uninstall()
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)
        self._engine = engine

    def uninstall(self) -> None:
        if self._engine is not None:
            event.remove(self._engine, "before_cursor_execute", self._before)
            event.remove(self._engine, "after_cursor_execute", self._after)
            self._engine = None

    @staticmethod
    def _before(
        _conn: Any, _cursor: Any, _statement: str, _parameters: Any, context: Any, _many: bool
    ) -> None:
        context._dbkeeper_started = time.perf_counter()

    def _after(
        self, _conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        try:
            elapsed = time.perf_counter() - context._dbkeeper_started
            self.record(statement, elapsed, cursor.rowcount, parameters, many)
        except Exception:  # installed while it ran; or a fault here: never the bot's problem
            log.debug("a statement was not timed", exc_info=True)

    # -- the hot path ------------------------------------------------------------------------------

    def record(
        self,
        statement: str,
        elapsed: float,
        rows: int = -1,
        parameters: Any = None,
        executemany: bool = False,
    ) -> None:
        """Count one execution of ``statement`` that took ``elapsed`` seconds (``rows``: what
        the driver's ``rowcount`` says; negative when it does not know)."""
        shape = self._shapes.get(statement)
        if shape is None:
            shape = shape_of(statement)
            if len(statement) <= CACHED_SQL_CHARS:
                if len(self._shapes) >= 4 * self.max_shapes:
                    self._shapes.clear()  # bounded: statement texts come back, shapes stay
                self._shapes[statement] = shape
        slow = elapsed >= self.slow_seconds
        with self._lock:
            entry = self._entries.get(shape.key)
            if entry is None:
                entry = self._admit(shape)
            entry.calls += 1
            entry.total += elapsed
            if elapsed > entry.max:
                entry.max = elapsed
            if rows >= 0:
                entry.rows += rows
                entry.rows_known = True
            self._buckets[shape.operation][bisect.bisect_left(BUCKETS, elapsed)] += 1
            self._sums[shape.operation] += elapsed
            self.statements += 1
            if slow:
                entry.slow += 1
                self.slow_statements += 1
                slow = shape.key not in self._reported
                if slow:
                    if len(self._reported) >= 20 * self.max_shapes:
                        self._reported.clear()
                    self._reported.add(shape.key)
        self.last_statement = time.monotonic()
        if slow and self.on_slow is not None:
            skeleton = parameter_skeleton(parameters, executemany)
            self.on_slow(SlowStatement(shape, statement, skeleton, elapsed))

    def _admit(self, shape: Shape) -> ShapeStats:
        """A new shape (under the lock); when the table is full, the cheapest tenth goes first."""
        if len(self._entries) >= self.max_shapes:
            count = max(1, self.max_shapes // EVICT_SHARE)
            for victim in heapq.nsmallest(count, self._entries.values(), key=_total):
                del self._entries[victim.shape.key]
            self.evicted += count
        entry = self._entries[shape.key] = ShapeStats(shape)
        return entry

    def forget_report(self, shape: Shape) -> None:
        """Its plan could not be asked now: the next slow call of the shape tries again."""
        with self._lock:
            self._reported.discard(shape.key)

    # -- reading ---------------------------------------------------------------------------------

    @property
    def shapes(self) -> int:
        return len(self._entries)

    def top(self, limit: int = 20) -> list[dict[str, Any]]:
        """The shapes with the most total time, costliest first."""
        with self._lock:
            ranked = heapq.nlargest(limit, self._entries.values(), key=_total)
            return [entry.to_json() for entry in ranked]

    def histogram(self) -> dict[str, tuple[list[int], float]]:
        """Per operation: counts per bucket (not cumulative; the last is above every bound)
        and the sum of seconds."""
        with self._lock:
            return {op: (list(self._buckets[op]), self._sums[op]) for op in OPERATIONS}

    def to_json(self, limit: int = 20) -> dict[str, Any]:
        return {
            "since": round(self.since, 3),
            "slow_ms": self.settings.slow_ms,
            "statements": self.statements,
            "slow_statements": self.slow_statements,
            "shapes": self.shapes,
            "max_shapes": self.max_shapes,
            "evicted_shapes": self.evicted,
            "queries": self.top(limit),
        }


def _total(entry: ShapeStats) -> float:
    return entry.total


# -- plans -------------------------------------------------------------------------------------

_SQLITE_SCAN = re.compile(r"^SCAN (?:TABLE )?([^\s(]\S*)")
_POSTGRES_SCAN = re.compile(r"Seq Scan on (\S+)")
_WHERE = re.compile(
    r"\bWHERE\b(.*?)(?=\bGROUP BY\b|\bORDER BY\b|\bLIMIT\b|\bHAVING\b|\bRETURNING\b"
    r"|\bUNION\b|\bWINDOW\b|\)\s*$|$)",
    re.I | re.S,
)
_COMPARED = re.compile(
    r"((?:\"[^\"]+\"|[A-Za-z_][\w$]*)(?:\.(?:\"[^\"]+\"|[A-Za-z_][\w$]*))?)\s*"
    r"(?:=|==|!=|<>|<=|>=|<|>|\bIS\b|\bNOT\b|\bIN\b|\bLIKE\b|\bGLOB\b|\bBETWEEN\b|\bMATCH\b)",
    re.I,
)
_NOT_COLUMNS = {"and", "or", "not", "null", "exists", "case", "when", "then", "else", "end"}


@dataclass(frozen=True)
class Plan:
    lines: list[str]  # what the database says, literals masked
    full_scans: list[str]  # tables read whole
    error: str | None = None

    def describe(self, shape: Shape) -> str:
        """One line: the plan, and what a full scan means for this statement."""
        if self.error is not None:
            return f"plan unavailable: {self.error}"
        text = "plan: " + ("; ".join(line.strip() for line in self.lines) or "no table read")
        for table in self.full_scans:
            columns = where_columns(shape.text, table)
            if columns:
                listed = ", ".join(columns)
                text += (
                    f" | a full scan of {table} filtered on {listed}: an index on "
                    f"{table}({listed}) would avoid it"
                )
            else:
                text += f" | a full scan of {table}"
        return text


def where_columns(text: str, table: str) -> list[str]:
    """The columns the statement's ``WHERE`` compares, those of ``table`` when qualified."""
    clause = _WHERE.search(text)
    if clause is None:
        return []
    bare = table.strip('"').split(".")[-1].lower()
    found: list[str] = []
    for (name,) in (m.groups() for m in _COMPARED.finditer(clause.group(1))):
        owner, _, column = name.rpartition(".")
        column = column.strip('"')
        if column.lower() in _NOT_COLUMNS or (owner and owner.strip('"').lower() != bare):
            continue
        if column not in found:
            found.append(column)
    return found


def sqlite_plan(connection: Connection, slow: SlowStatement) -> Plan:
    parameters: Any
    if isinstance(slow.parameters, tuple):
        parameters = dict.fromkeys(slow.parameters)
    else:
        parameters = (None,) * slow.parameters
    rows = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + slow.statement, parameters).all()
    lines = [mask_literals(str(row[3])) for row in rows]
    scans = [m.group(1) for line in lines if (m := _SQLITE_SCAN.match(line))]
    return Plan(lines, [table for table in scans if table.upper() != "CONSTANT"])


_PYFORMAT = re.compile(r"%\(([^)]*)\)s|%s|%%")


def dollar_parameters(statement: str) -> tuple[str, int]:
    """psycopg's ``%(name)s``/``%s`` placeholders as PostgreSQL's ``$1``; their number."""
    names: dict[str, int] = {}
    positional = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal positional
        if match.group(0) == "%%":
            return "%"
        if match.group(1) is None:
            positional += 1
            return f"${positional}"
        return f"${names.setdefault(match.group(1), len(names) + 1)}"

    text = _PYFORMAT.sub(replace, statement)
    return text, max(positional, len(names))


def postgres_plan(connection: Connection, slow: SlowStatement) -> Plan:
    """``EXPLAIN`` of the generic plan of a prepared statement: no values, never run."""
    text, count = dollar_parameters(slow.statement)
    raw = connection.execution_options(no_parameters=True)
    with raw.begin():
        raw.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
        raw.exec_driver_sql("PREPARE dbkeeper_plan AS " + text)
        arguments = f"({', '.join(['NULL'] * count)})" if count else ""
        rows = raw.exec_driver_sql(f"EXPLAIN (COSTS OFF) EXECUTE dbkeeper_plan{arguments}").all()
        raw.exec_driver_sql("DEALLOCATE dbkeeper_plan")
    lines = [mask_literals(str(row[0])) for row in rows]
    scans = [m.group(1) for line in lines if (m := _POSTGRES_SCAN.search(line))]
    return Plan(lines, scans)


class SlowQueryLog:
    """Logs each slow shape once with its plan; plans are asked on a task of the event loop
    that offloads them to a thread of their own (``timeouts.offload``), inside the service's
    work gate (a restore waits for a plan in progress)."""

    def __init__(self, database: DatabaseService, stats: QueryStats, timeout: float) -> None:
        self.database = database
        self.stats = stats
        self.timeout = min(timeout, PLAN_TIMEOUT_SECONDS)
        self._engine: Engine | None = None
        self._queue: asyncio.Queue[SlowStatement] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.logged = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(QUEUED_PLANS)
        self._task = asyncio.create_task(self._explain_each(), name="dbkeeper-slow-queries")
        self.stats.on_slow = self.submit

    async def stop(self) -> None:
        self.stats.on_slow = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._engine is not None:
            await asyncio.to_thread(self._engine.dispose)
            self._engine = None

    def submit(self, slow: SlowStatement) -> None:
        """From any thread (the bot's): hand the statement to the loop, never wait."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(self._enqueue, slow)

    def _enqueue(self, slow: SlowStatement) -> None:
        assert self._queue is not None
        try:
            self._queue.put_nowait(slow)
        except asyncio.QueueFull:
            self.stats.forget_report(slow.shape)

    async def _explain_each(self) -> None:
        assert self._queue is not None
        while True:
            slow = await self._queue.get()
            try:
                line = await self.explain(slow)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # never let one statement stop the others' logging
                line = f"plan unavailable: {type(error).__name__}"
            self.logged += 1
            log.warning(
                "slow query: %.0f ms (over [queries] slow_ms %g), logged once per shape: %s | %s",
                slow.elapsed * 1000,
                self.stats.settings.slow_ms,
                slow.shape.text,
                line,
            )

    async def explain(self, slow: SlowStatement) -> str:
        """What the statement's plan says, in one line (``Plan.describe``)."""
        if not slow.shape.explainable:
            if re.search(r"\b(IMMEDIATE|EXCLUSIVE)\b", slow.shape.text, re.I):
                return "no plan: this BEGIN waited for the write lock (another writer held it)"
            return "no plan for this kind of statement"
        interrupter = Interrupter()
        reader = sqlite_plan if self.database.dialect == "sqlite" else postgres_plan

        def ask() -> Plan:
            with self._connect() as connection:
                if self.database.dialect == "sqlite":
                    driver: Any = connection.connection.driver_connection
                    interrupter.arm(driver.interrupt)
                try:
                    return reader(connection, slow)
                except Exception as error:
                    return Plan([], [], _plain(error))
                finally:
                    interrupter.disarm()

        async with self.database.gate.enter():
            plan = await asyncio.wait_for(
                offload(ask, interrupter, name="dbkeeper-explain"), self.timeout
            )
        return plan.describe(slow.shape)

    @contextlib.contextmanager
    def _connect(self) -> Any:
        if self._engine is None:
            self._engine = create_database_engine(
                self.database.settings, "probe", timeout=self.timeout
            )
        with self._engine.connect() as connection:
            yield connection


def _plain(error: BaseException) -> str:
    """An error of the database, without the statement or anything it quoted."""
    return mask_literals(describe_error(error, limit=200))


# -- the server's view (PostgreSQL) ---------------------------------------------------------------


def server_statements(connection: Connection, limit: int) -> dict[str, Any]:
    """pg_stat_statements' view of this database (every client's statements, dbkeeper's too),
    or why it is not available. Its texts are normalized by the server; literals it keeps
    (in utility statements) are masked here too."""
    answer: dict[str, Any] = {"source": "pg_stat_statements", "available": False}
    version = connection.exec_driver_sql(
        "SELECT extversion FROM pg_extension WHERE extname = 'pg_stat_statements'"
    ).scalar()
    loaded = _preloaded(connection)
    if version is None:
        answer["reason"] = "pg_stat_statements is not installed in this database" + (
            ": CREATE EXTENSION pg_stat_statements"
            if loaded
            else " (the server must load it, shared_preload_libraries = "
            "'pg_stat_statements', which takes a restart; then CREATE EXTENSION "
            "pg_stat_statements)"
        )
        return answer
    old = tuple(int(part) for part in str(version).split(".")[:2]) < (1, 8)
    total, mean, most = (
        ("total_time", "mean_time", "max_time")
        if old
        else ("total_exec_time", "mean_exec_time", "max_exec_time")
    )
    try:
        with connection.begin_nested() if connection.in_transaction() else connection.begin():
            rows = connection.exec_driver_sql(
                f"SELECT query, calls, {total}, {mean}, {most}, rows FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                f"ORDER BY {total} DESC LIMIT {int(limit)}"
            ).all()
    except Exception as error:
        reason = describe_error(error, limit=300)
        if "shared_preload_libraries" in reason:
            reason = (
                "pg_stat_statements is installed but the server does not load it: add it to "
                "shared_preload_libraries and restart PostgreSQL"
            )
        answer["reason"] = mask_literals(reason)
        return answer
    answer["available"] = True
    answer["version"] = str(version)
    answer["queries"] = [
        {
            "query": shape_of(str(query)).text,
            "calls": int(calls),
            "total_ms": round(float(total_ms), 3),
            "mean_ms": round(float(mean_ms), 3),
            "max_ms": round(float(max_ms), 3),
            "rows": int(count),
        }
        for query, calls, total_ms, mean_ms, max_ms, count in rows
    ]
    return answer


def _preloaded(connection: Connection) -> bool | None:
    """Whether the server loads pg_stat_statements (None: not allowed to see)."""
    try:
        with connection.begin_nested() if connection.in_transaction() else connection.begin():
            found = connection.exec_driver_sql("SHOW shared_preload_libraries").scalar()
    except Exception:
        return None
    return "pg_stat_statements" in [part.strip() for part in str(found or "").split(",")]
