"""Health checks: the registry's rules, and the database checks on real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from dbkeeper.app import build_application
from dbkeeper.health import HealthRegistry, HealthReport, Outcome, Status, degraded, healthy
from dbkeeper.host import Host
from dbkeeper.plugins.database import DatabasePlugin
from dbkeeper.plugins.database.errors import BackupError
from dbkeeper.plugins.database.operations import Operations
from dbkeeper.plugins.members.models import Chat
from tests.conftest import SettingsFactory
from tests.support.hosts import free_port, running_host
from tests.support.revisions import BROKEN, add_revision
from tests.support.tcp_proxy import TCPProxy, postgres_proxy_fixture  # noqa: F401 (proxy)
from tests.support.tmpfs import mounted_tmpfs

SECRET_URL = "postgresql+psycopg://bot:s3cret-pw-4711@db.example/bot"
TOKEN = "123456:TEST-TOKEN-abcdefghijklmnopqrstuvwxyz0123456789"


async def _fine() -> Outcome:
    return healthy("fine", latency_ms=1.5)


async def _slow_disk() -> Outcome:
    return degraded("slow disk")


def corrupt_sqlite(path: Path) -> None:
    """Overwrite every page after the first (the schema) with garbage, as a failing disk would."""
    data = path.read_bytes()
    page = int.from_bytes(data[16:18], "big")
    assert len(data) > page, "the database has a single page; nothing to corrupt"
    with path.open("r+b") as handle:
        handle.seek(page)
        handle.write(b"\xff" * (len(data) - page))


async def add_chats(plugin: DatabasePlugin, count: int) -> None:
    await plugin.database.run(
        lambda s: s.add_all([Chat(id=i, type="group") for i in range(1, count + 1)])
    )


DATABASE_CHECKS = ("database", "database_migrations", "database_integrity", "database_size")


def database_checks_healthy(report: HealthReport) -> bool:
    return all(report.checks[name].status is Status.HEALTHY for name in DATABASE_CHECKS)


async def until(predicate, timeout: float = 10.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll an async predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


# -- the registry ---------------------------------------------------------------------------


async def test_overall_status_is_the_worst_and_checks_keep_their_order() -> None:
    registry = HealthRegistry(timeout=1)
    registry.add("b_fine", _fine)
    registry.add("a_slow", _slow_disk)
    report = await registry.run()
    assert report.status is Status.DEGRADED
    assert list(report.checks) == ["b_fine", "a_slow"]
    assert report.checks["b_fine"].to_json() == {
        "status": "healthy",
        "message": "fine",
        "latencyMs": 1.5,
    }
    assert report.checks["a_slow"].to_json() == {"status": "degraded", "message": "slow disk"}
    with pytest.raises(ValueError, match="already registered"):
        registry.add("a_slow", _fine)
    empty = await HealthRegistry(timeout=1).run()
    assert empty.status is Status.HEALTHY


async def test_a_hung_check_is_unhealthy_after_the_timeout_and_never_holds_the_report() -> None:
    released = asyncio.Event()

    async def hangs() -> Outcome:
        await released.wait()
        return healthy("late")

    async def ignores_cancellation() -> Outcome:
        while not released.is_set():
            try:
                await released.wait()
            except asyncio.CancelledError:
                continue
        return healthy("late")

    registry = HealthRegistry(timeout=0.2)
    registry.add("hangs", hangs)
    registry.add("stubborn", ignores_cancellation)
    registry.add("fine", _fine)
    try:
        report = await asyncio.wait_for(registry.run(), timeout=5)
    finally:
        released.set()
    assert report.status is Status.UNHEALTHY
    for name in ("hangs", "stubborn"):
        assert report.checks[name].status is Status.UNHEALTHY
        assert report.checks[name].message == "no answer within 0.2s (timed out)"
    assert report.checks["fine"].status is Status.HEALTHY
    await asyncio.sleep(0)  # let the abandoned checks end


async def test_concurrent_callers_share_the_running_check_instead_of_failing() -> None:
    """The monitor and anyone else (an HTTP request, a benchmark) asking at once: one run of
    each check, both healthy. Before, the second caller got "still waiting" as unhealthy."""
    runs = 0
    gate = asyncio.Event()

    async def slow() -> Outcome:
        nonlocal runs
        runs += 1
        await gate.wait()
        return healthy("fine and slow")

    registry = HealthRegistry(timeout=5)
    registry.add("slow", slow, failing_as="cannot check")
    first = asyncio.ensure_future(registry.run())
    second = asyncio.ensure_future(registry.run())
    await asyncio.sleep(0.05)
    gate.set()
    reports = await asyncio.gather(first, second)
    assert runs == 1
    assert [r.checks["slow"].message for r in reports] == ["fine and slow"] * 2
    assert all(r.status is Status.HEALTHY for r in reports)
    third = await registry.run()  # the next run is a new one
    assert runs == 2 and third.status is Status.HEALTHY


async def test_a_failing_check_is_unhealthy_and_no_secret_reaches_its_message() -> None:
    async def leaks() -> Outcome:
        raise RuntimeError(f"cannot open {SECRET_URL} with token {TOKEN}")

    async def tells() -> Outcome:
        return degraded(f"connected to {SECRET_URL}\nas bot {TOKEN}")

    registry = HealthRegistry(timeout=1)
    registry.add("leaks", leaks)
    registry.add("tells", tells)
    report = await registry.run()
    failed, told = report.checks["leaks"], report.checks["tells"]
    assert failed.status is Status.UNHEALTHY
    assert failed.message.startswith("check failed: RuntimeError: cannot open ")
    assert told.status is Status.DEGRADED and "\n" not in told.message
    for message in (failed.message, told.message):
        assert "s3cret-pw-4711" not in message and TOKEN not in message
        assert "bot:***@db.example" in message


# -- the database checks --------------------------------------------------------------------


async def test_database_checks_give_the_contract_messages(
    database_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(database_url, health={"http_port": free_port()})
    async with running_host(settings) as (host, plugin):
        report = host.monitor.last
        assert report is not None
        assert list(report.checks) == [
            "database",
            "database_migrations",
            "database_integrity",
            "database_size",
            "database_backups",
            "disk_space",
            "database_maintenance",
            "database_growth",
        ]
        database = report.checks["database"]
        assert database.message == "Schema v3 | 4 tables | 0 records"
        assert database.latency_ms is not None and database.latency_ms > 0
        assert report.checks["database_migrations"].message == "v3 (0 pending)"
        assert re.fullmatch(
            r"[\d.]+ MB \(warning above 500 MB\)", report.checks["database_size"].message
        )
        assert re.fullmatch(
            r"[\d,.]+ [MG]B free for backups in .*backups \(the next one needs about [\d.]+ MB\)",
            report.checks["disk_space"].message,
        )
        backups = report.checks["database_backups"]
        # A fresh install is not a problem: not until its first backup is overdue (issue 10).
        assert backups.status is Status.HEALTHY
        assert re.fullmatch(
            r"0 backups \| 0.00 MB \| no backup yet; the first is due in \d+s", backups.message
        )
        assert report.status is Status.HEALTHY

        taken = await plugin.backup_now()
        report = await host.monitor.check()
        assert report.status is Status.HEALTHY, report
        assert report.checks["database_backups"].message == (
            f"1 backup | {taken.size_bytes / 1_000_000:.2f} MB"
        )
        assert report.checks["database_backups"].values["last_success_timestamp_seconds"] > 0

        # PostgreSQL's live-tuple counts reach the statistics views when the inserting session
        # flushes them (up to ~10 s idle); ANALYZE sets the planner's estimate (what autovacuum
        # does on a busy table). In the inserting transaction itself, PostgreSQL subtracts that
        # session's pending counts: ANALYZE run on another pooled session counted them twice
        # once they were flushed (2,468; seen under load).
        def insert_and_analyze(session: Session) -> None:
            session.add_all([Chat(id=i, type="group") for i in range(1, 1235)])
            session.flush()
            session.execute(text("ANALYZE"))

        await plugin.database.run(insert_and_analyze)

        async def counted() -> bool:
            report = await host.monitor.check()
            return report.checks["database"].message == "Schema v3 | 4 tables | 1,234 records"

        await until(counted, what="the record estimate to reach 1,234")


async def test_sqlite_integrity_and_postgresql_statistics(
    database_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(database_url, health={"http_port": free_port()})
    async with running_host(settings) as (host, _):
        integrity = (await host.monitor.check()).checks["database_integrity"]
    assert integrity.status is Status.HEALTHY
    if database_url.startswith("sqlite"):
        assert integrity.message == "quick_check ok"
    else:
        assert re.fullmatch(
            r"checksums (on|off), 0 failures \| \d+ of \d+ connections \| "
            r"0 idle in transaction > 5 minutes",
            integrity.message,
        ), integrity.message


async def test_a_database_above_the_size_warning_is_degraded(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(sqlite_url, health={"http_port": free_port(), "size_warning_mb": 0.01})
    async with running_host(settings) as (host, _):
        report = host.monitor.last
    assert report is not None and report.status is Status.DEGRADED
    size = report.checks["database_size"]
    assert size.status is Status.DEGRADED
    assert re.fullmatch(r"[\d.]+ MB, above the 0.01 MB warning: .*", size.message)
    assert size.values["size_bytes"] > 0.01 * 1_000_000


async def test_pending_and_failed_revisions_make_migrations_unhealthy(
    sqlite_url: str, make_settings: SettingsFactory, scripts_dir: Path
) -> None:
    """A database behind the code is unhealthy, and says which revision failed and why.

    (With ``auto_upgrade`` off such a bot refuses to start, naming ``dbkeeper db migrate``;
    the checks as ``dbkeeper health`` runs them still report it.)"""
    migrations = {"script_location": str(scripts_dir)}
    settings = make_settings(sqlite_url, health={"http_port": free_port()}, migrations=migrations)
    async with running_host(settings):
        pass  # the database is at v3
    add_revision(scripts_dir, BROKEN, doc="broken")
    settings = make_settings(
        sqlite_url,
        health={"http_port": free_port()},
        migrations={**migrations, "auto_upgrade": False},
    )
    host = Host(settings, build_application(settings), mode="check")
    try:
        report = await host.health.run()
        assert report is not None and report.status is Status.UNHEALTHY
        pending = report.checks["database_migrations"]
        assert pending.status is Status.UNHEALTHY
        assert pending.message == "v3 (1 pending): 0004 (head v4)"
        operations = Operations(settings)
        with pytest.raises(Exception, match="applying revision 0004"):
            await asyncio.to_thread(operations.migrate)
        operations.close()
        failed = (await host.health.run()).checks["database_migrations"]
    finally:
        await host.health.close()
    assert failed.message.startswith(
        "v3 (1 pending): 0004 (head v4); 0004 failed: OperationalError: no such table"
    )
    assert failed.values["failed"] == 1


async def test_a_corrupted_sqlite_file_is_unhealthy_with_the_integrity_message(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(sqlite_url, health={"http_port": free_port()})
    async with running_host(settings) as (host, plugin):
        await plugin.database.run(
            lambda s: s.add_all([Chat(id=i, type="group") for i in range(300)])
        )
        await asyncio.to_thread(plugin.operations.flush)  # all in the main file, the WAL empty
        assert plugin.database.file is not None
        corrupt_sqlite(plugin.database.file)
        report = await host.monitor.check()
    integrity = report.checks["database_integrity"]
    assert report.status is Status.UNHEALTHY
    assert integrity.status is Status.UNHEALTHY
    # SQLite's own words: "database disk image is malformed", or the pointer map's pages
    # (auto_vacuum = incremental) it read first
    assert integrity.message.startswith("quick_check found corruption: ")


async def test_a_large_sqlite_database_is_scanned_in_the_background(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    # quick_check_max_mb = 0: every database counts as large, so quick_check leaves the check.
    settings = make_settings(
        sqlite_url,
        health={
            "http_port": free_port(),
            "quick_check_max_mb": 0,
            "integrity_interval_seconds": 0.2,
        },
    )
    async with running_host(settings) as (host, plugin):
        first = host.monitor.last
        assert first is not None
        assert re.fullmatch(
            r"file header ok; quick_check running \([\d.]+ MB: checked in the background "
            r"every 0s\)",
            first.checks["database_integrity"].message,
        )

        async def scanned() -> str | None:
            check = (await host.monitor.check()).checks["database_integrity"]
            return check.message if check.message.startswith("quick_check ok") else None

        assert re.fullmatch(r"quick_check ok \d+s ago \(.*\)", await until(scanned))

        await plugin.database.run(
            lambda s: s.add_all([Chat(id=i, type="group") for i in range(300)])
        )
        await asyncio.to_thread(plugin.operations.flush)
        assert plugin.database.file is not None
        corrupt_sqlite(plugin.database.file)

        async def found() -> Outcome | None:
            check = (await host.monitor.check()).checks["database_integrity"]
            return check if check.status is Status.UNHEALTHY else None

        damaged = await until(found, what="the background scan to find the corruption")
    assert damaged.message.startswith("quick_check found corruption: ")


async def test_a_locked_postgresql_table_times_out_as_unhealthy_then_recovers(
    postgres_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        postgres_url, health={"http_port": free_port(), "check_timeout_seconds": 0.5}
    )
    async with running_host(settings) as (host, _):
        locker = create_engine(postgres_url, poolclass=NullPool)
        with locker.connect() as connection:
            connection.exec_driver_sql("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
            report = await asyncio.wait_for(host.monitor.check(), timeout=5)
            connection.rollback()
        locker.dispose()
        assert report.status is Status.UNHEALTHY
        for name in ("database", "database_migrations"):
            message = report.checks[name].message
            assert message == "no answer within 0.5s (timed out)" or "lock timeout" in message

        async def recovered() -> bool:
            return database_checks_healthy(await host.monitor.check())

        await until(recovered, what="health after the lock was released")


async def test_a_stopped_postgresql_is_unhealthy_within_the_check_timeout(
    postgres_url: str, make_settings: SettingsFactory, proxy: TCPProxy
) -> None:
    settings = make_settings(
        proxy.url(postgres_url), health={"http_port": free_port(), "check_timeout_seconds": 2}
    )
    async with running_host(settings) as (host, _):
        proxy.refuse()
        started = time.monotonic()
        report = await host.monitor.check()
        took = time.monotonic() - started
        database = report.checks["database"]
        assert report.status is Status.UNHEALTHY
        assert database.status is Status.UNHEALTHY
        assert took < 2 + 1, took
        assert database.message.startswith("cannot reach the database: OperationalError"), database
        assert "refused" in database.message.lower()
        assert report.checks["database_migrations"].status is Status.UNHEALTHY

        proxy.forward()
        report = await host.monitor.check()
        assert report.checks["database"].status is Status.HEALTHY, report


async def test_a_hung_postgresql_times_out_and_the_check_recovers(
    postgres_url: str, make_settings: SettingsFactory, proxy: TCPProxy
) -> None:
    settings = make_settings(
        proxy.url(postgres_url), health={"http_port": free_port(), "check_timeout_seconds": 0.5}
    )
    async with running_host(settings) as (host, _):
        proxy.hang()
        report = await asyncio.wait_for(host.monitor.check(), timeout=5)
        assert report.status is Status.UNHEALTHY
        for name in DATABASE_CHECKS:
            assert report.checks[name].message == "no answer within 0.5s (timed out)"
        # The threads still wait (connect_timeout, 2 s): the next run does not start more.
        again = await asyncio.wait_for(host.monitor.check(), timeout=5)
        assert again.checks["database"].message.startswith(
            "cannot reach the database: still waiting for the previous check, started "
        )

        proxy.forward()

        async def recovered() -> bool:
            return database_checks_healthy(await host.monitor.check())

        await until(recovered, what="health after the server answered again")


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB filesystem (tmpfs): far too small for a backup of the test database."""
    with mounted_tmpfs(tmp_path / "small", "size=64k") as target:
        yield target


async def test_a_backup_volume_too_small_for_the_next_backup_is_degraded(
    sqlite_url: str,
    make_settings: SettingsFactory,
    small_volume: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(
        sqlite_url,
        health={"http_port": free_port()},
        backup={"dir": str(small_volume / "backups"), "on_shutdown": False},
    )
    async with running_host(settings) as (host, plugin):
        await add_chats(plugin, 2000)  # a few hundred KB: more than the volume holds
        report = await host.monitor.check()
        disk = report.checks["disk_space"]
        assert disk.status is Status.DEGRADED
        assert re.fullmatch(
            r"not enough space: 0\.\d\d MB free for backups in .*/small/backups "
            r"\(the next one needs about 0\.\d\d MB\)",
            disk.message,
        ), disk.message
        assert disk.values["free_bytes"] < disk.values["needed_bytes"]

        with pytest.raises(BackupError):
            await plugin.backup_now()
        backups = (await host.monitor.check()).checks["database_backups"]
    assert backups.status is Status.DEGRADED
    assert re.fullmatch(
        r"0 backups \| 0.00 MB \| no backup yet \| the last attempt failed \d+s ago: .*",
        backups.message,
    )
    alerts = [r.getMessage() for r in caplog.records if r.name == "dbkeeper.alerts"]
    assert any("disk_space: degraded — not enough space" in line for line in alerts)
