"""The database plugin's Prometheus metrics, read from the last health report (no queries).

``dbkeeper_database_up``, ``_round_trip_seconds``, ``_size_bytes``, ``_schema_version``,
``_tables``, ``_records`` (an estimate), ``_migrations_pending``,
``_migration_duration_seconds{revision}`` (PostgreSQL adds ``_checksum_failures`` and
``_connections``); ``dbkeeper_backups``, ``_backups_size_bytes``,
``dbkeeper_backup_last_success_timestamp_seconds``, ``_last_duration_seconds``,
``dbkeeper_backups_full_check_pending``, ``_full_check_failed``,
``_volume_free_bytes``, ``_next_size_bytes``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dbkeeper.health import CheckResult, HealthReport, Status
from dbkeeper.metrics import PREFIX, gauge

if TYPE_CHECKING:
    from .checks import DatabaseHealth

# (check, value) -> (metric name, help)
FROM_CHECKS = {
    ("database", "round_trip_seconds"): (
        "database_round_trip_seconds",
        "Round trip of a trivial query in the last health check.",
    ),
    ("database", "schema_version"): ("database_schema_version", "Schema version (v3 = 0003)."),
    ("database", "tables"): ("database_tables", "Tables of the bot (bookkeeping excluded)."),
    ("database", "records"): (
        "database_records",
        "Records in the bot's tables, estimated (max rowid / planner statistics).",
    ),
    ("database_migrations", "pending"): (
        "database_migrations_pending",
        "Revisions not yet applied.",
    ),
    ("database_size", "size_bytes"): ("database_size_bytes", "Size of the database."),
    ("database_size", "wal_bytes"): ("database_wal_size_bytes", "SQLite write-ahead log size."),
    ("database_backups", "count"): ("backups", "Backups kept (complete and verified)."),
    ("database_backups", "interval_seconds"): (
        "backup_interval_seconds",
        "[backup] interval_seconds: a scheduled backup is due this often.",
    ),
    ("database_migrations", "failed"): (
        "database_migrations_failed",
        "Pending revisions whose last attempt failed.",
    ),
    ("database_backups", "size_bytes"): ("backups_size_bytes", "Size of all backups kept."),
    ("database_backups", "full_check_pending"): (
        "backups_full_check_pending",
        "Listed SQLite backups whose full integrity_check has not run yet.",
    ),
    ("database_backups", "full_check_failed"): (
        "backups_full_check_failed",
        "Backups that failed their full integrity_check (marked damaged, kept).",
    ),
    ("database_backups", "last_success_timestamp_seconds"): (
        "backup_last_success_timestamp_seconds",
        "When the last successful backup was taken (unix time).",
    ),
    ("database_backups", "last_duration_seconds"): (
        "backup_last_duration_seconds",
        "How long the last backup took.",
    ),
    ("disk_space", "free_bytes"): (
        "backup_volume_free_bytes",
        "Free space on the volume of the backup directory.",
    ),
    ("disk_space", "needed_bytes"): (
        "backup_next_size_bytes",
        "Space the next backup is expected to need at its peak.",
    ),
    ("database_integrity", "checksum_failures"): (
        "database_checksum_failures",
        "PostgreSQL data checksum failures in this database (pg_stat_database).",
    ),
    ("database_integrity", "connections"): (
        "database_connections",
        "PostgreSQL client connections to the server.",
    ),
}


class DatabaseMetrics(Collector):
    def __init__(
        self, health: DatabaseHealth, last_report: Callable[[], HealthReport | None]
    ) -> None:
        self.health = health
        self.last_report = last_report

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        report = self.last_report()
        if report is None:
            return
        reached = _check(report, "database")
        if reached is not None:
            yield gauge(
                "database_up",
                "1 when the last health check reached the database, else 0.",
                0 if reached.status is Status.UNHEALTHY else 1,
            )
        for (check_name, value_name), (metric, documentation) in FROM_CHECKS.items():
            check = _check(report, check_name)
            if check is not None and value_name in check.values:
                yield gauge(metric, documentation, check.values[value_name])
        durations = GaugeMetricFamily(
            f"{PREFIX}_database_migration_duration_seconds",
            "How long each revision's last successful upgrade took.",
            labels=["revision"],
        )
        for revision, seconds in sorted(self.health.migration_seconds.items()):
            durations.add_metric([revision], seconds)
        yield durations


def _check(report: HealthReport, name: str) -> CheckResult | None:
    return report.checks.get(name)
