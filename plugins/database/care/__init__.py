"""Database care: the bot's statements timed, the database kept in shape, old rows deleted,
growth watched. One module per concept:

``queries``      the bot's statements by shape, the slow query log with plans, pg_stat_statements
``maintenance``  planner statistics (``PRAGMA optimize``, ``ANALYZE``), free space and vacuum
``retention``    ``[retention]``: old rows deleted in small batches, referenced rows kept
``growth``       size samples, the growth rate, the day the disk fills

:class:`Care` puts them together for the database plugin. Through the plugin's context it adds
the checks ``database_maintenance`` and ``database_growth``, the metrics
(``dbkeeper_query_duration_seconds`` ...), ``GET /api/queries`` and ``GET /api/stats``, and its
jobs: planner statistics every ``[maintenance] optimize_interval_seconds``, and once a day
retention and the size history. Free space is reclaimed after a backup, when the bot is quiet.
Scheduled work runs on the leader only, as background tasks that stop between two short steps
when the bot stops; each step goes through the database service's work gate (a restore waits
for it, and it waits for a restore).

The command line (``dbkeeper db optimize``, ``db vacuum``, ``db cleanup``) and ``/dbstats``
call the same methods.
"""

from __future__ import annotations

import asyncio
import html
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import Connection

from dbkeeper.charts import line_chart
from dbkeeper.config import HealthSettings, Settings
from dbkeeper.health import HealthReport, Outcome, unhealthy
from dbkeeper.metrics import PREFIX, gauge
from dbkeeper.plugin import PluginContext
from dbkeeper.texts import megabytes

from ..backup.engines.base import Limits
from ..errors import BackupInProgress, describe_error
from ..health.probes import Probe, probe_for
from ..service import DatabaseService
from ..settings import (
    NO_MIGRATIONS,
    MaintenanceSettings,
    MigrationSettings,
    QuerySettings,
    RetentionSettings,
)
from ..timeouts import Interrupter, offload
from .growth import Forecast, Growth, forecast
from .maintenance import Analyzed, Reclaimed, maintenance_for
from .queries import BUCKETS, OPERATIONS, QueryStats, SlowQueryLog, server_statements
from .retention import Retention, RetentionError, TableResult

if TYPE_CHECKING:
    from ..backup.pipeline import Backups

__all__ = ["Care", "CareSummary", "RetentionError"]

log = logging.getLogger("dbkeeper.care")
T = TypeVar("T")
OPTIMIZE_JOB = "database-optimize"
DAILY_JOB = "database-daily-care"
RECLAIM_JOB = "database-reclaim"
DAILY_SECONDS = 86400.0
DAILY_FIRST_SECONDS = 300.0  # the first retention run, after the start has settled
RECLAIM_DELAY_SECONDS = 2.0  # after a backup
QUIET_SECONDS = 2.0  # no statement of the bot for this long: a quiet moment
QUIET_RETRY_SECONDS = 30.0
QUIET_ATTEMPTS = 20  # then the reclaim goes ahead anyway: its steps are short
STOP_WAIT_SECONDS = 5.0
QUERIES_SHOWN = 20
QUERIES_MAX = 500
NO_STORE = {"Cache-Control": "no-store"}


@dataclass
class CareSummary:
    """What ``/dbstats`` shows of database care."""

    dialect: str
    tracking: bool
    slow_ms: float
    worst: list[dict[str, Any]]  # the three shapes with the most total time
    forecast: Forecast | None
    maintenance: list[str]
    retention: list[TableResult] = field(default_factory=list)
    rules: dict[str, tuple[str, float]] = field(default_factory=dict)  # table -> (column, days)


class Care:
    """Database care for one database (see the module docstring)."""

    def __init__(
        self,
        database: DatabaseService,
        backups: Backups,
        settings: Settings,
        *,
        one_shot: bool = False,
    ) -> None:
        self.database = database
        self.backups = backups
        self.health_settings = settings.section(HealthSettings)
        self.query_settings = settings.section(QuerySettings)
        self.maintenance_settings = settings.section(MaintenanceSettings)
        self.one_shot = one_shot
        timeout = self.health_settings.check_timeout_seconds
        self.queries = QueryStats(self.query_settings)
        self.slow_log = SlowQueryLog(database, self.queries, timeout)
        self.maintenance = maintenance_for(database, self.maintenance_settings)
        self.retention = Retention(database, settings.section(RetentionSettings))
        managed = settings.section(MigrationSettings).script_location != NO_MIGRATIONS
        self.growth = Growth(database, self.health_settings.interval_seconds, persist=managed)
        self.probe: Probe = probe_for(database, timeout)
        self.context: PluginContext | None = None
        self._stop = threading.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tracking = False
        self._quiet_attempts = 0
        self._sample_failed = False

    # -- the plugin's steps ------------------------------------------------------------------

    def register(self, context: PluginContext) -> None:
        """Checks and metrics always; routes too unless this is a one-shot health check."""
        self.context = context
        context.add_check(
            "database_maintenance",
            self.check_maintenance,
            failing_as="cannot read the maintenance state",
        )
        context.add_check(
            "database_growth", self.check_growth, failing_as="cannot measure the growth"
        )
        context.on_health_close(self._close_probe)
        context.add_metrics(CareMetrics(self, lambda: context.last_health_report))
        if context.one_shot:
            return
        context.add_route("GET", "/api/queries", self._queries_route)
        context.add_route("GET", "/api/stats", self._stats_route)
        context.add_status_section("Size and growth", self.size_section)
        context.add_status_section("Slowest queries", self.queries_section)

    def check_schema(self) -> None:
        """Blocking, at startup: the ``[retention]`` rules fit the live schema."""
        self.retention.targets()

    async def start(self) -> None:
        """The database is open: time the bot's statements, optimize, schedule."""
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        engine = self.database.engine
        if self.query_settings.track:
            self.queries.install(engine)
            self.slow_log.start()
            self._tracking = True
        self.maintenance.install(engine)
        try:
            await asyncio.to_thread(self.maintenance.at_open, self._gated())
        except Exception as error:
            log.warning("PRAGMA optimize at open failed: %s", describe_error(error))
        if self.context is None or self.one_shot:
            return
        if self.database.dialect == "sqlite":
            interval = self.maintenance_settings.optimize_interval_seconds
            self.context.add_job(self._optimize_job, name=OPTIMIZE_JOB, interval=interval)
        self.context.add_job(
            self._daily_job,
            name=DAILY_JOB,
            interval=DAILY_SECONDS,
            first=min(DAILY_FIRST_SECONDS, DAILY_SECONDS),
        )
        if self.retention.configured:
            rules = ", ".join(
                f"{name} ({rule.keep_days:g} days)" for name, rule in self.retention.rules.items()
            )
            log.info("retention: %s; daily, in batches", rules)

    async def stop(self) -> None:
        """Before the database closes: scheduled work stops between two steps."""
        if self.context is not None:
            for name in (OPTIMIZE_JOB, DAILY_JOB, RECLAIM_JOB):
                self.context.remove_jobs(name)
        self._stop.set()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=STOP_WAIT_SECONDS)
        await self.slow_log.stop()
        if self._tracking:
            self.queries.uninstall()
            self._tracking = False
        await asyncio.to_thread(self.dispose)

    def dispose(self) -> None:
        """Close care's own connections (blocking; the command line calls it when done)."""
        self.maintenance.dispose()
        self.retention.dispose()
        self.probe.dispose()

    async def _close_probe(self) -> None:
        await asyncio.to_thread(self.probe.dispose)

    def after_backup(self) -> None:
        """A backup was just taken: reclaim free space soon, at a quiet moment."""
        if self.context is None or self.one_shot or self.database.dialect != "sqlite":
            return
        self._quiet_attempts = 0
        self.context.add_job(self._reclaim_job, name=RECLAIM_JOB, first=RECLAIM_DELAY_SECONDS)

    # -- checks ------------------------------------------------------------------------------

    async def check_maintenance(self) -> Outcome:
        try:
            status = await self._probe("database_maintenance", self.maintenance.status)
        except Exception as error:
            return unhealthy(f"cannot read the maintenance state: {_reason(error)}")
        return status.outcome

    async def check_growth(self) -> Outcome:
        try:
            prediction = await self._forecast(record=not self.one_shot and self._leading())
        except Exception as error:
            return unhealthy(f"cannot measure the growth: {_reason(error)}")
        return prediction.outcome()

    async def _forecast(self, *, record: bool) -> Forecast:
        def measure(connection: Connection) -> tuple[int, int | None, list[Any]]:
            size, free = self.growth.measure(connection)
            return size, free, self.growth.history(connection)

        size, free, samples = await self._probe("database_growth", measure)
        prediction = forecast(samples, size, free, self.growth.interval)
        if record and self.growth.due(samples):
            try:
                await self._write(lambda: self._record_sample(size, free))
                self._sample_failed = False
            except Exception as error:  # the forecast stands; the next check tries again
                level = logging.DEBUG if self._sample_failed else logging.WARNING
                log.log(level, "could not store a size sample: %s", _reason(error))
                self._sample_failed = True
        return prediction

    def _record_sample(self, size: int, free: int | None) -> None:
        if not self.growth.persist:
            self.growth.record(None, size, free)
            return
        with self.maintenance.engine().connect() as connection:
            self.growth.record(connection, size, free)

    # -- answers -------------------------------------------------------------------------------

    async def summary(self) -> CareSummary:
        """For ``/dbstats``."""
        prediction, status = await asyncio.gather(
            self._forecast(record=False),
            self._probe("statistics", self.maintenance.status),
        )
        return CareSummary(
            dialect=self.database.dialect,
            tracking=self._tracking,
            slow_ms=self.query_settings.slow_ms,
            worst=self.queries.top(3),
            forecast=prediction,
            maintenance=status.lines,
            retention=list(self.retention.last.values()),
            rules={
                name: (rule.column, float(rule.keep_days))
                for name, rule in self.retention.rules.items()
            },
        )

    async def queries_json(self, limit: int = QUERIES_SHOWN) -> dict[str, Any]:
        """``GET /api/queries``: the bot's shapes, costliest first, and the server's view."""
        body = self.queries.to_json(limit)
        body["tracking"] = self._tracking
        if self.database.dialect == "sqlite":
            body["server"] = {
                "source": "pg_stat_statements",
                "available": False,
                "reason": "SQLite keeps no statement statistics of its own: the list above is "
                "all there is",
            }
        else:
            body["server"] = await self._probe(
                "server_statements", lambda c: server_statements(c, limit)
            )
        return body

    async def stats_json(self) -> dict[str, Any]:
        """``GET /api/stats``: size, growth and forecast, maintenance, retention, queries."""

        def collect(connection: Connection) -> tuple[Any, ...]:
            size, free = self.growth.measure(connection)
            samples = self.growth.history(connection)
            overview = self.probe.overview(connection)
            return size, free, samples, overview, self.maintenance.status(connection)

        size, free, samples, overview, status = await self._probe("statistics", collect)
        prediction = forecast(samples, size, free, self.growth.interval)
        status_data: dict[str, Any] = {"status": status.outcome.status.value, **status.data}
        return {
            "timestamp": round(time.time(), 3),
            "dialect": self.database.dialect,
            "database": {
                "size_bytes": size,
                "tables": overview.tables,
                "records": overview.records,
                "records_per_table": dict(
                    sorted(overview.records_per_table.items(), key=lambda item: -item[1])
                ),
            },
            "growth": prediction.to_json(),
            "maintenance": status_data,
            "retention": {
                name: {
                    "column": rule.column,
                    "keep_days": float(rule.keep_days),
                    "last_run": (
                        self.retention.last[name].to_json() if name in self.retention.last else None
                    ),
                }
                for name, rule in self.retention.rules.items()
            },
            "queries": {
                "tracking": self._tracking,
                "statements": self.queries.statements,
                "slow_statements": self.queries.slow_statements,
                "shapes": self.queries.shapes,
            },
        }

    # -- the status page ---------------------------------------------------------------------------

    async def size_section(self) -> str:
        """The size over time, its forecast to the day the disk fills, and the disk's size."""

        def measure(connection: Connection) -> tuple[int, int | None, list[Any]]:
            size, free = self.growth.measure(connection)
            return size, free, self.growth.history(connection)

        size, free, samples = await self._probe("status-growth", measure)
        prediction = forecast(samples, size, free, self.growth.interval)
        now = time.time()
        points = [(s.taken_at.timestamp(), float(s.size_bytes)) for s in samples]
        points.append((now, float(size)))
        ahead: list[tuple[float, float]] = []
        capacity = None if free is None else float(size + free)
        if prediction.bytes_per_day is not None and prediction.bytes_per_day > 0:
            until = prediction.full_at.timestamp() if prediction.full_at else now + 30 * 86400
            until = min(until, now + 365 * 86400)
            ahead = [(until, size + prediction.bytes_per_day * (until - now) / 86400)]
        chart = line_chart(
            points,
            forecast=ahead,
            limit=capacity if ahead and prediction.full_at else None,
            label=megabytes,
            title="database size over time, and its forecast",
        )
        return f"<p>{html.escape(prediction.describe())}</p>{chart}"

    async def queries_section(self) -> str:
        """The costliest statement shapes (normalized: never a value)."""
        if not self._tracking:
            return "<p class='empty'>statement timing is off ([queries])</p>"
        rows = "".join(
            f"<tr><td><code>{html.escape(q['query'][:300])}</code></td>"
            f"<td class='num'>{q['calls']:,}</td><td class='num'>{q['mean_ms']:,.1f} ms</td>"
            f"<td class='num hide-narrow'>{q['max_ms']:,.1f} ms</td>"
            f"<td class='num'>{q['total_ms']:,.0f} ms</td></tr>"
            for q in self.queries.top(5)
        )
        return (
            f"<p>Statements over {self.query_settings.slow_ms:g} ms are logged once per shape "
            "with their plan; the full list is at <code>/api/queries</code>.</p><table><tr>"
            "<th>statement</th><th>calls</th><th>mean</th><th class='hide-narrow'>max</th>"
            "<th>total</th></tr>"
            + (rows or "<tr><td colspan=5 class=empty>no statement yet</td></tr>")
            + "</table>"
        )

    async def _queries_route(self, request: web.Request) -> web.Response:
        raw = request.query.get("limit", str(QUERIES_SHOWN))
        if not raw.isdigit() or not 1 <= int(raw) <= QUERIES_MAX:
            return web.json_response(
                {"error": f"limit must be a whole number from 1 to {QUERIES_MAX}"},
                status=400,
                headers=NO_STORE,
            )
        return web.json_response(await self.queries_json(int(raw)), headers=NO_STORE)

    async def _stats_route(self, _request: web.Request) -> web.Response:
        try:
            body = await self.stats_json()
        except Exception as error:
            return web.json_response(
                {"error": f"cannot read the database statistics: {_reason(error)}"},
                status=503,
                headers=NO_STORE,
            )
        return web.json_response(body, headers=NO_STORE)

    # -- on demand (the command line; blocking) -----------------------------------------------

    def optimize_now(self) -> Analyzed:
        """``dbkeeper db optimize``: fresh planner statistics (``ANALYZE``)."""
        return self.maintenance.analyze()

    def vacuum_now(self) -> Reclaimed:
        """``dbkeeper db vacuum``: reclaim space now; never while a backup or restore runs."""
        with self.backups.exclusive("vacuum", wait=False, limits=Limits()):
            return self.maintenance.vacuum()

    def cleanup_now(self, *, dry_run: bool = False) -> list[TableResult]:
        """``dbkeeper db cleanup``: apply ``[retention]`` now (or say what would go)."""
        return self.retention.run(dry_run=dry_run)

    # -- scheduled work ------------------------------------------------------------------------

    def _leading(self) -> bool:
        return self.context is None or self.context.leadership.is_leader

    async def _optimize_job(self) -> None:
        if self._leading():
            self._spawn(self._optimize(), "dbkeeper-optimize")

    async def _optimize(self) -> None:
        touched = await asyncio.to_thread(self.maintenance.optimize, self._gated())
        log.debug("PRAGMA optimize on %d idle connections of the bot", touched)

    async def _daily_job(self) -> None:
        if self._leading():
            self._spawn(self.daily(), "dbkeeper-daily-care")

    async def daily(self) -> None:
        """Retention, then the day's size sample and the coarsening of the history."""
        if self.retention.configured:
            await asyncio.to_thread(self.retention.run, stop=self._stop, step=self._gated())
        if self._stop.is_set():
            return
        await self._forecast(record=True)
        removed = await self._write(self._compact)
        if removed:
            log.debug("size history: %d older samples coarsened", removed)

    def _compact(self) -> int:
        with self.maintenance.engine().connect() as connection:
            return self.growth.compact(connection)

    async def _reclaim_job(self) -> None:
        if self._leading():
            self._spawn(self._reclaim(), "dbkeeper-reclaim")

    async def _reclaim(self) -> None:
        """Reclaim free pages past ``vacuum_free_ratio``: at a quiet moment, holding the
        backups' lock (no backup or restore meanwhile)."""
        if not await asyncio.to_thread(self.maintenance.reclaim_needed):
            return
        if not self._quiet() and self._quiet_attempts < QUIET_ATTEMPTS:
            self._quiet_attempts += 1
            self._retry_reclaim("the bot is busy")
            return
        try:
            result = await asyncio.to_thread(self._reclaim_exclusively)
        except BackupInProgress as busy:
            self._retry_reclaim(str(busy))
            return
        log.info("free space: %s", result.describe())

    def _reclaim_exclusively(self) -> Reclaimed:
        with self.backups.exclusive("space reclaim", wait=False, limits=Limits()):
            return self.maintenance.reclaim(self._stop, self._gated_from_thread())

    def _retry_reclaim(self, why: str) -> None:
        if self.context is None or self._stop.is_set():
            return
        log.debug("reclaiming free space postponed: %s", why)
        self.context.add_job(self._reclaim_job, name=RECLAIM_JOB, first=QUIET_RETRY_SECONDS)

    def _quiet(self) -> bool:
        if not self._tracking:
            return True
        last = self.queries.last_statement
        return last == 0.0 or time.monotonic() - last >= QUIET_SECONDS

    def _spawn(self, work: Awaitable[None], name: str) -> None:
        if any(task.get_name() == name and not task.done() for task in self._tasks):
            return  # the previous run still goes on

        async def run() -> None:
            try:
                await work
            except Exception as error:
                log.exception("%s failed", name)
                if self.context is not None:
                    await self.context.alert(
                        f"database care: {name.removeprefix('dbkeeper-')} failed: {_reason(error)}",
                        key=name,
                    )

        task = asyncio.create_task(run(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- plumbing ----------------------------------------------------------------------------

    def _gated(self) -> Callable[[Callable[[], T]], T]:
        """For work started from the event loop: each step through the work gate."""
        self._loop = asyncio.get_running_loop()
        return self._gated_from_thread()

    def _gated_from_thread(self) -> Callable[[Callable[[], T]], T]:
        """A ``step`` for blocking work on another thread: each unit waits at the service's
        work gate (a restore waits for it, it waits for a restore); none without a loop."""
        loop = self._loop
        if loop is None:
            return _direct
        gate = self.database.gate

        def step(work: Callable[[], T]) -> T:
            async def inside() -> T:
                async with gate.enter():
                    return await asyncio.to_thread(work)

            return asyncio.run_coroutine_threadsafe(inside(), loop).result()

        return step

    async def _write(self, work: Callable[[], T]) -> T:
        async with self.database.gate.enter():
            return await asyncio.to_thread(work)

    async def _probe(self, name: str, work: Callable[[Connection], T]) -> T:
        """``work(connection)`` on a fresh read-only probe connection, off the event loop, in
        the work gate, interrupted when the caller gives up (as the health checks do)."""
        interrupter = Interrupter()

        def run() -> T:
            with self.probe.connect(interrupter) as connection:
                return work(connection)

        async with self.database.gate.enter():
            return await offload(run, interrupter, name=f"dbkeeper-care-{name}")


def _direct(work: Callable[[], T]) -> T:
    return work()


def _reason(error: BaseException) -> str:
    return describe_error(error, limit=400)


class CareMetrics(Collector):
    """``dbkeeper_query_duration_seconds{operation}`` (a histogram of the bot's statements),
    ``dbkeeper_slow_queries_total``, ``dbkeeper_query_shapes``; from the last health check:
    ``dbkeeper_database_growth_bytes_per_second``,
    ``dbkeeper_database_disk_full_timestamp_seconds``, ``dbkeeper_database_free_bytes``
    (SQLite's free pages), ``dbkeeper_database_dead_rows`` (PostgreSQL)."""

    def __init__(self, care: Care, last_report: Callable[[], HealthReport | None]) -> None:
        self.care = care
        self.last_report = last_report

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        histogram = HistogramMetricFamily(
            f"{PREFIX}_query_duration_seconds",
            "How long the bot's own statements took (dbkeeper's own work excluded).",
            labels=["operation"],
        )
        for operation, (counts, total) in self.care.queries.histogram().items():
            if operation not in OPERATIONS:
                continue
            cumulative, buckets = 0, []
            for bound, count in zip((*BUCKETS, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            histogram.add_metric([operation], buckets, total)
        yield histogram
        yield CounterMetricFamily(
            f"{PREFIX}_slow_queries",
            "Statements of the bot slower than [queries] slow_ms.",
            value=self.care.queries.slow_statements,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_query_shapes",
            "Statement shapes kept in memory (at most [queries] max_shapes).",
            value=self.care.queries.shapes,
        )
        report = self.last_report()
        if report is None:
            return
        for check, value, metric, documentation in _FROM_CHECKS:
            found = report.checks.get(check)
            if found is not None and value in found.values:
                yield gauge(metric, documentation, found.values[value])


_FROM_CHECKS = (
    (
        "database_growth",
        "growth_bytes_per_second",
        "database_growth_bytes_per_second",
        "How fast the database grows (least squares over the last 7 days of samples).",
    ),
    (
        "database_growth",
        "disk_full_timestamp_seconds",
        "database_disk_full_timestamp_seconds",
        "When the database's disk is full at the current growth (unix time).",
    ),
    (
        "database_maintenance",
        "free_bytes",
        "database_free_bytes",
        "SQLite: bytes of free pages in the file (reclaimed past [maintenance] vacuum_free_ratio).",
    ),
    (
        "database_maintenance",
        "dead_rows",
        "database_dead_rows",
        "PostgreSQL: dead row versions waiting for (auto)vacuum.",
    ),
    (
        "database_maintenance",
        "tables_behind",
        "database_tables_behind_autovacuum",
        "PostgreSQL: tables where autovacuum falls behind.",
    ),
)
