"""Database care as the plugin wires it: GET /api/stats, what /dbstats shows, its jobs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from dbkeeper.plugins.database.care import CareSummary
from dbkeeper.plugins.database.care.growth import Sample, forecast
from dbkeeper.plugins.database.care.retention import TableResult
from dbkeeper.plugins.database.commands import format_care
from tests.conftest import SettingsFactory
from tests.support.hosts import free_port, get, running_host


async def test_get_api_stats_json(database_url: str, make_settings: SettingsFactory) -> None:
    settings = make_settings(
        database_url,
        health={"http_port": free_port()},
        retention={"events": {"keep_days": 7}},
    )
    async with running_host(settings, job_queue=True) as (host, plugin):
        await plugin.database.run(
            lambda session: session.execute(text("INSERT INTO chats (id, type) VALUES (1, 'x')"))
        )
        status, body, _ = await get(host, "/api/stats")
        jobs = {job.name for job in host.job_queue.jobs()}
    assert status == 200
    assert set(body) == {
        "timestamp",
        "dialect",
        "database",
        "growth",
        "maintenance",
        "retention",
        "queries",
    }
    assert body["dialect"] == database_url.split(":")[0].split("+")[0]
    database = body["database"]
    assert database["tables"] == 4 and database["records_per_table"]["chats"] >= 0
    assert database["size_bytes"] > 0
    assert set(body["growth"]) == {
        "size_bytes",
        "samples",
        "span_seconds",
        "bytes_per_day",
        "disk_free_bytes",
        "disk_full_at",
        "days_left",
        "alert_below_days",
        "alarming",
    }
    assert body["growth"]["alert_below_days"] == 14 and body["growth"]["samples"] >= 1
    assert body["growth"]["bytes_per_day"] is None  # seconds of history: no forecast yet
    maintenance = body["maintenance"]
    assert maintenance["status"] == "healthy"
    if database_url.startswith("sqlite"):
        assert maintenance["auto_vacuum"] == "incremental"
        assert {"free_pages", "free_ratio", "vacuum_free_ratio", "last_optimize"} <= set(
            maintenance
        )
        assert "database-optimize" in jobs
    else:
        tables = {t["table"]: t for t in maintenance["tables"]}
        assert {"dead_rows", "dead_ratio", "last_vacuum", "last_autovacuum"} <= set(tables["chats"])
    assert body["retention"] == {
        "events": {"column": "created_at", "keep_days": 7.0, "last_run": None}
    }
    assert body["queries"]["tracking"] is True and body["queries"]["statements"] >= 1
    assert "database-daily-care" in jobs


def test_dbstats_shows_the_three_worst_queries_growth_maintenance_and_retention() -> None:
    now = datetime.now(UTC)
    history = [
        Sample(now - timedelta(hours=h), 50_000_000 - h * 50_000, None) for h in range(48, 0, -1)
    ]
    worst = [
        {
            "query": f"SELECT <{i}> FROM events WHERE payload = ?",
            "calls": 1200 * i,
            "total_ms": 900.0 * i,
            "mean_ms": 0.75,
            "max_ms": 95.0,
            "rows": 0,
        }
        for i in (3, 2, 1)
    ]
    summary = CareSummary(
        dialect="sqlite",
        tracking=True,
        slow_ms=100,
        worst=worst,
        forecast=forecast(history, 50_000_000, 12_000_000, 300),
        maintenance=["Free pages 12% of 52.40 MB (reclaimed above 25%, auto_vacuum incremental)"],
        retention=[
            TableResult(
                "events",
                "created_at",
                30,
                now - timedelta(days=30),
                removed=1204,
                kept_referenced=3,
                batches=3,
                longest_lock_seconds=0.008,
            )
        ],
        rules={"events": ("created_at", 30.0)},
    )
    lines = format_care(summary)
    assert lines[0] == "<b>Worst queries</b> (by total time; over 100 ms is logged)"
    assert lines[1] == (
        "1. <code>SELECT &lt;3&gt; FROM events WHERE payload = ?</code> — 3,600 calls, "
        "2,700 ms in total, mean 0.8 ms, max 95 ms"
    )
    assert lines[2].startswith("2. <code>SELECT &lt;2&gt;") and lines[3].startswith("3. ")
    assert lines[4].startswith("⚠️ <b>Growth</b> 50.00 MB, +1.20 MB/day, 12.00 MB free: the disk")
    assert lines[5:7] == [
        "<b>Maintenance</b>",
        "  Free pages 12% of 52.40 MB (reclaimed above 25%, auto_vacuum incremental)",
    ]
    assert lines[7] == "<b>Retention</b>"
    assert lines[8].startswith("  • events: 30 days by created_at; last run 0s ago: events: ")
    assert "removed 1,204 rows" in lines[8] and "3 older rows still referenced kept" in lines[8]

    quiet = CareSummary("sqlite", True, 100, [], None, [])
    assert format_care(quiet) == ["<b>Queries</b> none timed yet"]
