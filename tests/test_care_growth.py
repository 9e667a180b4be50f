"""Growth: the size history, the forecast, and the alert when the disk fills within 14 days."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, insert, select, text

from dbkeeper.health import Status
from dbkeeper.plugins.database.care import Care
from dbkeeper.plugins.database.care.growth import Sample, forecast
from dbkeeper.plugins.database.migrate.bookkeeping import size_samples
from dbkeeper.plugins.database.operations import Operations
from tests.conftest import SettingsFactory
from tests.support.care import wait_until
from tests.support.hosts import free_port, get, running_host
from tests.support.tmpfs import mounted_tmpfs

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
MB = 1_000_000


def _history(per_day: float, days: float = 2, every_hours: float = 1) -> list[Sample]:
    count = int(days * 24 / every_hours)
    return [
        Sample(
            NOW - timedelta(hours=every_hours * (count - i)),
            int(100 * MB + per_day * (i - count) * every_hours / 24),
            None,
        )
        for i in range(count)
    ]


def test_the_forecast_is_the_least_squares_growth_and_when_the_free_space_runs_out() -> None:
    found = forecast(_history(10 * MB), 100 * MB, 50 * MB, 300, now=NOW)
    assert found.bytes_per_day == pytest.approx(10 * MB, rel=1e-6)
    assert found.full_at is not None
    assert abs(found.full_at - (NOW + timedelta(days=5))) < timedelta(seconds=1)
    assert "+10.00 MB/day, 50.00 MB free: the disk is full in about 5 days (2026-12-06)" in (
        found.describe()
    )

    calm = forecast(_history(0.1 * MB), 100 * MB, 50 * MB, 300, now=NOW)
    assert calm.full_at is not None and not calm.alarming
    assert abs(calm.full_at - (NOW + timedelta(days=500))) < timedelta(minutes=1)
    shrinking = forecast(_history(-1 * MB), 100 * MB, 50 * MB, 300, now=NOW)
    assert shrinking.full_at is None and "not growing toward a full disk" in shrinking.describe()
    unseen = forecast(_history(10 * MB), 100 * MB, None, 300, now=NOW)  # a remote server
    assert unseen.full_at is None and "not visible from here" in unseen.describe()

    young = forecast(_history(10 * MB, days=0.02), 100 * MB, 50 * MB, 300, now=NOW)
    assert young.bytes_per_day is None  # 29 minutes of history: less than 10 intervals of 300 s
    assert "not enough history for a forecast yet" in young.describe()
    assert young.outcome().status is Status.HEALTHY


def test_the_history_is_coarsened_to_a_sample_a_day_and_forgotten_after_400_days(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(sqlite_url)
    ops = Operations(settings)
    ops.open()
    care = Care(ops.database, ops.backups, settings)
    now = datetime.now(UTC)
    hourly = [now - timedelta(hours=h) for h in range(1, 24 * 5)]  # five days, hourly
    ancient = [now - timedelta(days=500), now - timedelta(days=401)]
    try:
        with care.maintenance.engine().begin() as connection:
            connection.execute(
                insert(size_samples),
                [{"taken_at": t, "size_bytes": 1, "disk_free_bytes": 2} for t in hourly + ancient],
            )
        with care.maintenance.engine().connect() as connection:
            removed = care.growth.compact(connection, now=now)
            kept = [
                t.replace(tzinfo=UTC)
                for (t,) in connection.execute(
                    select(size_samples.c.taken_at).order_by(size_samples.c.taken_at)
                )
            ]
    finally:
        care.dispose()
        ops.close()
    recent = [t for t in kept if now - t <= timedelta(days=2)]
    older = [t for t in kept if now - t > timedelta(days=2)]
    assert len(recent) == 48  # every hourly sample of the last two days stays
    assert len({t.date() for t in older}) == len(older)  # older: one a day
    assert all(now - t < timedelta(days=400) for t in kept)
    assert removed == len(hourly) + len(ancient) - len(kept)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "disk", "size=48m") as target:
        yield target


async def test_a_fast_growing_database_on_a_small_disk_alerts_once(
    small_disk: Path,
    tmp_path: Path,
    make_settings: SettingsFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(
        f"sqlite:///{small_disk / 'bot.db'}",
        health={"http_port": free_port(), "interval_seconds": 0.5},
        backup={"dir": str(tmp_path / "backups"), "on_shutdown": False},
    )
    caplog.set_level(logging.WARNING, logger="dbkeeper.alerts")
    stop = threading.Event()

    async with running_host(settings, job_queue=True) as (host, plugin):

        def grow() -> None:  # about 1 MB a second: the 48 MB disk fills within a minute
            chunk = 0
            while not stop.is_set():
                chunk += 1
                with plugin.database.session() as session:
                    session.execute(
                        text("INSERT INTO users (id, first_name) VALUES (:id, :name)"),
                        {"id": chunk, "name": "x" * 100_000},
                    )
                stop.wait(0.1)

        def growth_alerts() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.name == "dbkeeper.alerts" and "database_growth" in r.getMessage()
            ]

        writer = threading.Thread(target=grow, daemon=True)
        writer.start()
        try:
            [alert] = await asyncio.to_thread(wait_until, growth_alerts, 30, "the growth alert")
            checks_then = host.monitor.runs
            await asyncio.to_thread(
                wait_until, lambda: host.monitor.runs >= checks_then + 4, 10, "more checks"
            )
        finally:
            stop.set()
            writer.join(10)
        _, stats, _ = await get(host, "/api/stats")
        metrics = (await get(host, "/metrics"))[2]
    assert "database_growth: degraded — the disk fills within 14 days" in alert
    assert "B/day" in alert and "free: the disk is full in about" in alert
    assert growth_alerts() == [alert]  # once, not once per check
    growth = stats["growth"]
    assert growth["alarming"] is True and growth["days_left"] < 1
    assert growth["bytes_per_day"] > 10 * MB and 0 < growth["disk_free_bytes"] < 48 * 1024 * 1024
    assert "dbkeeper_database_growth_bytes_per_second" in metrics
    assert "dbkeeper_database_disk_full_timestamp_seconds" in metrics


async def test_the_alert_is_resolved_when_the_disk_no_longer_fills_within_14_days(
    small_disk: Path,
    tmp_path: Path,
    make_settings: SettingsFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(
        f"sqlite:///{small_disk / 'bot.db'}",
        health={"http_port": free_port()},
        backup={"dir": str(tmp_path / "backups"), "on_shutdown": False},
    )
    caplog.set_level(logging.WARNING, logger="dbkeeper.alerts")
    async with running_host(settings) as (host, plugin):
        engine = plugin.care.maintenance.engine()
        now = datetime.now(UTC)

        def history(per_day: float) -> None:
            """A day of hourly samples growing ``per_day`` up to the database's size now."""
            with engine.begin() as connection:
                connection.execute(delete(size_samples))
                size = plugin.care.growth.measure(connection)[0]
                connection.execute(
                    insert(size_samples),
                    [
                        {
                            "taken_at": now - timedelta(hours=h),
                            "size_bytes": int(size - per_day * h / 24),
                            "disk_free_bytes": None,
                        }
                        for h in range(24, 0, -1)
                    ],
                )

        await asyncio.to_thread(history, 20 * MB)  # 48 MB free: full in about 2 days
        degraded = (await host.monitor.check()).checks["database_growth"]
        await asyncio.to_thread(history, 0)
        healthy = (await host.monitor.check()).checks["database_growth"]
    assert degraded.status is Status.DEGRADED and "+20.00 MB/day" in degraded.message
    assert healthy.status is Status.HEALTHY and "not growing toward a full disk" in healthy.message
    alerts = [r.getMessage() for r in caplog.records if r.name == "dbkeeper.alerts"]
    assert any("database_growth: degraded" in line for line in alerts)
    assert any("✅ database_growth recovered after" in line for line in alerts), alerts


async def test_a_schema_dbkeeper_leaves_alone_gets_no_table_its_samples_stay_in_memory(
    tmp_path: Path, make_settings: SettingsFactory
) -> None:
    file = tmp_path / "own.db"
    with sqlite3.connect(file) as connection:
        connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY)")
    settings = make_settings(
        f"sqlite:///{file}",
        health={"http_port": free_port(), "interval_seconds": 0.05},
        migrations={"script_location": "none"},
    )
    async with running_host(settings) as (host, plugin):  # its first check took a sample
        await asyncio.sleep(0.05)
        await host.monitor.check()
        _, stats, _ = await get(host, "/api/stats")
    with sqlite3.connect(file) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert tables == {"notes"}
    assert stats["growth"]["samples"] >= 3  # two kept in memory, and the size now
    assert len(plugin.care.growth.memory) >= 2


async def test_backups_keep_the_size_history_but_do_not_count_it_among_the_rows(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        sqlite_url, health={"http_port": free_port(), "interval_seconds": 0.05}
    )
    async with running_host(settings) as (host, plugin):  # its first check took a sample
        await asyncio.sleep(0.05)
        await host.monitor.check()  # and another
        info = await plugin.backup_now()
    assert info.tables["dbkeeper_size_samples"] >= 2  # backed up and verified like any table
    # The rows are the bot's, as the health check counts them: bookkeeping is not among them.
    assert "dbkeeper_size_samples" not in info.bot_tables and "schema_migrations" in info.tables
    assert info.rows == sum(info.bot_tables.values()) == 0  # a new bot has no users yet
