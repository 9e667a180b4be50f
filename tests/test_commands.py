"""What the chat commands say: escaped for HTML, cut to Telegram's limits, verdict first."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dbkeeper.health import CheckResult, HealthReport, Status
from dbkeeper.plugins.database.backup.manifest import Backup
from dbkeeper.plugins.database.backup.pipeline import BackupFailure, BackupStats
from dbkeeper.plugins.database.commands import (
    TABLES_SHOWN,
    format_backup,
    format_dbstats,
    format_health,
)
from dbkeeper.plugins.database.health.checks import DatabaseStatistics
from dbkeeper.plugins.database.health.probes import Overview
from dbkeeper.plugins.database.migrate.history import MigrationStats
from dbkeeper.plugins.database.migrate.migrator import MigrationStatus
from dbkeeper.texts import split_message

NOW = datetime.now(UTC)


def _report(*checks: tuple[str, Status, str]) -> HealthReport:
    results = {
        name: CheckResult(name, status, message, None, 1.0) for name, status, message in checks
    }
    worst = Status.worst(r.status for r in results.values())
    return HealthReport(worst, results, time.time(), time.monotonic(), 3.0)


def _statistics(tables: dict[str, int]) -> DatabaseStatistics:
    return DatabaseStatistics(
        status=MigrationStatus("0003", 3, "0003", 3, ()),
        migrations=MigrationStats(3, 1, NOW, 42),
        overview=Overview(tables),
        size_bytes=5_000_000,
    )


def _backup(name: str = "bot-db-2026-11-25_10-00-00.db.gz") -> Backup:
    return Backup(
        name=name,
        path=Path("/nowhere") / name,
        size_bytes=3_000_000,
        created_at=NOW - timedelta(hours=2),
        reason="manual",
        compression="gzip",
        sha256="ab" * 32,
        schema_version=3,
        tables={"users": 10, "chats": 1, "alembic_version": 1},  # the version is not counted
        duration_seconds=1.25,
    )


def test_health_puts_the_verdict_and_the_problems_first_and_escapes_messages() -> None:
    text = format_health(
        _report(
            ("database", Status.HEALTHY, "Schema v3 | 4 tables | 1,234 records"),
            ("database_integrity", Status.UNHEALTHY, "row <5> missing from index ix_*_a"),
            ("disk_space", Status.DEGRADED, "low & falling"),
        ),
        "answered by a:1 (the leader)",
    )
    lines = text.splitlines()
    assert lines[0] == "🔴 <b>unhealthy</b>"
    assert lines[1] == "<i>answered by a:1 (the leader)</i>"
    assert lines[2].startswith("🔴 <b>database_integrity</b>: row &lt;5&gt; missing")
    assert lines[3] == "⚠️ <b>disk_space</b>: low &amp; falling"
    assert "<5>" not in text


def test_dbstats_lists_tables_largest_first_cut_and_escaped() -> None:
    tables = {f"t{i:02d}": i * 10 for i in range(40)}
    tables["<weird_*name>"] = 10_000
    stats = BackupStats(
        count=2,
        total_bytes=6_000_000,
        newest=_backup(),
        oldest=_backup("bot-db-2026-11-20_10-00-00.db.gz"),
        last_failure=BackupFailure(NOW, "scheduled", "disk full: <no space> left"),
        last_success_at=NOW,
        last_duration_seconds=1.0,
    )
    text = format_dbstats(_statistics(tables), stats, "postgresql+psycopg://bot:***@db/bot")
    lines = text.splitlines()
    assert "Schema v3 (0 pending)" in lines
    assert lines[2].startswith("Migrations: 3 applied, 1 failed, last ")
    listed = [line for line in lines if line.startswith("  • ")]
    assert len(listed) == TABLES_SHOWN
    assert listed[0] == "  • &lt;weird_*name&gt;: ≈10,000" and listed[1] == "  • t39: ≈390"
    assert f"… and {41 - TABLES_SHOWN} more tables" in text
    assert "<b>Backups</b> 2 · 6.00 MB" in text
    assert "disk full: &lt;no space&gt; left" in text


def test_empty_backups_and_backup_answer() -> None:
    empty = BackupStats(0, 0, None, None, None, None, None)
    assert "<b>Backups</b> none yet" in format_dbstats(_statistics({}), empty, "sqlite:///x.db")
    answer = format_backup(_backup("bot-db-<x>.db.gz"))
    assert "<code>bot-db-&lt;x&gt;.db.gz</code>" in answer
    assert "3.00 MB (gzip) in 1.2s" in answer and "2 tables, 11 rows" in answer


def test_long_answers_are_split_under_telegrams_limit_at_line_ends() -> None:
    text = "\n".join(f"line {i} " + "x" * 90 for i in range(200))
    pieces = split_message(text)
    assert len(pieces) > 1 and all(len(p) <= 4096 for p in pieces)
    assert "\n".join(pieces) == text


def test_a_megabyte_is_one_truth_in_chat_logs_and_the_command_line() -> None:
    """MB meant 1000² on the command line and 1024² in chat; now 1000² everywhere."""
    from dbkeeper.texts import MB, megabytes, size

    assert MB == 1_000_000
    assert megabytes(45_230_000) == "45.23 MB" and size(45_230_000) == "45.2 MB"
    assert megabytes(1_500_000_000) == "1.50 GB" and size(1_500_000_000) == "1.5 GB"
