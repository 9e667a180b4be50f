"""Maintenance: planner statistics, free space given back while the bot writes, never during a
backup; PostgreSQL's autovacuum watched; ``db optimize`` and ``db vacuum``."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from dbkeeper.config import Settings
from dbkeeper.health import Status
from dbkeeper.plugins.database.backup.engines.base import Limits
from dbkeeper.plugins.database.care import Care
from dbkeeper.plugins.database.errors import BackupInProgress
from dbkeeper.plugins.database.operations import Operations
from tests.conftest import SettingsFactory
from tests.support.care import execute, numbers, wait_until
from tests.support.hosts import free_port, running_host
from tests.support.process import run_cli, write_config

ROWS = 8_000
PAYLOAD = 2_000  # bytes per row: ROWS rows make about 17 MB


def _fill_and_free_half(url: str, file: Path) -> None:
    """Rows of text, then the older half deleted: about half the file's pages are free."""
    execute(
        url,
        "INSERT INTO chats (id, type) VALUES (1, 'private')",
        "INSERT INTO events (chat_id, kind, payload) SELECT 1, 'message', "
        f"hex(randomblob({PAYLOAD // 2})) FROM {numbers(url, ROWS)} AS n",
    )
    execute(url, f"DELETE FROM events WHERE id <= {ROWS // 2}")
    with sqlite3.connect(file) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _free_ratio(file: Path) -> float:
    with sqlite3.connect(file) as connection:
        free = connection.execute("PRAGMA freelist_count").fetchone()[0]
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
    return float(free / pages)


class Writer:
    """The bot, committing one row at a time through its database service."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops
        self.latencies: list[float] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        user = 0
        while not self._stop.is_set():
            user += 1
            started = time.perf_counter()
            try:
                with self.ops.database.session() as session:
                    session.execute(
                        text("INSERT INTO users (id, first_name) VALUES (:id, 'w')"), {"id": user}
                    )
            except Exception as error:
                self.errors.append(error)
            self.latencies.append(time.perf_counter() - started)
            time.sleep(0.002)

    def __enter__(self) -> Writer:
        self._thread.start()
        wait_until(lambda: len(self.latencies) >= 5, what="the writer's first commits")
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def opened(
    sqlite_url: str, make_settings: SettingsFactory
) -> Iterator[tuple[Operations, Settings]]:
    settings = make_settings(sqlite_url)
    ops = Operations(settings)
    ops.open()
    try:
        yield ops, settings
    finally:
        ops.close()


def test_vacuum_shrinks_a_file_with_half_its_pages_free_while_a_writer_keeps_committing(
    opened: tuple[Operations, Settings], sqlite_url: str
) -> None:
    ops, settings = opened
    file = ops.database.file
    assert file is not None
    _fill_and_free_half(sqlite_url, file)
    before = file.stat().st_size
    assert 0.45 < _free_ratio(file) < 0.55
    care = Care(ops.database, ops.backups, settings)
    try:
        with Writer(ops) as writer:
            committed = len(writer.latencies)
            result = care.vacuum_now()
            committed_during = len(writer.latencies) - committed
    finally:
        care.dispose()
    assert result.method == "incremental" and result.steps > 1
    after = file.stat().st_size
    assert after < 0.6 * before, (before, after)
    assert _free_ratio(file) < 0.05
    assert writer.errors == []
    assert committed_during >= 10  # the writer went on committing between the steps
    assert max(writer.latencies) < 1.0  # one short step at most, never the whole vacuum
    assert result.longest_step_seconds < 1.0
    assert "gave back" in result.describe()
    rows = execute(sqlite_url, "SELECT count(*) FROM events")[0][0][0]
    assert rows == ROWS // 2  # nothing but free pages went


def test_a_database_made_without_auto_vacuum_is_vacuumed_once_then_in_steps(
    tmp_path: Path, make_settings: SettingsFactory
) -> None:
    file = tmp_path / "old.db"
    with sqlite3.connect(file) as connection:  # made before dbkeeper: auto_vacuum none
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    url = f"sqlite:///{file}"
    settings = make_settings(url, migrations={"script_location": "none"})
    ops = Operations(settings)
    ops.open()
    care = Care(ops.database, ops.backups, settings)
    try:
        for expected in ("vacuum", "incremental"):
            execute(
                url,
                f"INSERT INTO notes (body) SELECT hex(randomblob(1000)) FROM {numbers(url, 4000)}",
            )
            execute(url, "DELETE FROM notes WHERE id <= (SELECT max(id) - 1000 FROM notes)")
            before = file.stat().st_size
            with sqlite3.connect(file) as connection:
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            before = max(before, file.stat().st_size)
            result = care.vacuum_now()
            assert result.method == expected, result
            assert file.stat().st_size < 0.5 * before
        with sqlite3.connect(file) as connection:
            assert connection.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    finally:
        care.dispose()
        ops.close()


def test_no_vacuum_while_a_backup_or_restore_runs(
    opened: tuple[Operations, Settings], sqlite_url: str
) -> None:
    ops, settings = opened
    file = ops.database.file
    assert file is not None
    _fill_and_free_half(sqlite_url, file)
    before = file.stat().st_size
    care = Care(ops.database, ops.backups, settings)
    try:
        with ops.backups.exclusive("scheduled backup", wait=False, limits=Limits()):
            with pytest.raises(BackupInProgress, match="scheduled backup is already running"):
                care.vacuum_now()
            assert file.stat().st_size == before
        assert care.vacuum_now().method == "incremental"  # once the backup is done
    finally:
        care.dispose()
    assert file.stat().st_size < 0.6 * before


async def test_the_running_bot_reclaims_free_space_after_a_backup(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        sqlite_url, health={"http_port": free_port()}, backup={"compression": "none"}
    )
    async with running_host(settings, job_queue=True) as (_host, plugin):
        file = plugin.database.file
        _fill_and_free_half(sqlite_url, file)
        before = file.stat().st_size
        await plugin.backup_now("manual")  # reclaiming follows a backup, when the bot is quiet
        care = plugin.care
        await asyncio.to_thread(
            wait_until, lambda: care.maintenance.last_reclaim, 20, "the reclaim after the backup"
        )
        assert file.stat().st_size < 0.6 * before
        status = await plugin.care.check_maintenance()
    assert status.status is Status.HEALTHY and "auto_vacuum incremental" in status.message


def test_optimize_refreshes_statistics_on_the_bots_connections_and_at_close(
    opened: tuple[Operations, Settings], sqlite_url: str
) -> None:
    ops, settings = opened
    execute(
        sqlite_url,
        "INSERT INTO chats (id, type) VALUES (1, 'private')",
        "INSERT INTO events (chat_id, kind, created_at) SELECT 1, 'message', "
        f"'2026-01-01 00:00:00' FROM {numbers(sqlite_url, 2000)}",
        "INSERT INTO users (id, first_name, last_seen_at) SELECT i, 'u', '2026-01-01' "
        f"FROM {numbers(sqlite_url, 2000)}",
    )

    def planned(query: str) -> None:  # the bot's query: the planner looks at an index
        with ops.database.session(write=False) as session:
            session.execute(text(query)).all()

    def analyzed() -> set[str]:
        with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as connection:
            exists = connection.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'"
            ).fetchone()
            rows = connection.execute("SELECT tbl FROM sqlite_stat1").fetchall() if exists else []
        return {row[0] for row in rows}

    care = Care(ops.database, ops.backups, settings)
    care.maintenance.install(ops.database.engine)
    try:
        planned("SELECT id FROM events WHERE chat_id = 1 AND created_at > '2026'")
        assert "events" not in analyzed()
        ops.database.close()  # the pool closes its connections: each runs PRAGMA optimize
        assert "events" in analyzed()

        ops.database.connect()
        care.maintenance.install(ops.database.engine)
        planned("SELECT id FROM users WHERE last_seen_at > '2026'")
        assert "users" not in analyzed()
        assert care.maintenance.optimize() >= 1  # the periodic run, on the idle connections
        assert "users" in analyzed()
    finally:
        care.dispose()


def test_optimize_and_vacuum_on_the_command_line(tmp_path: Path, database_url: str) -> None:
    write_config(
        tmp_path / "config.toml",
        {"database": {"url": database_url}, "backup": {"dir": str(tmp_path / "backups")}},
    )
    assert run_cli(["db", "migrate"], cwd=tmp_path)[0] == 0
    execute(
        database_url,
        "INSERT INTO chats (id, type) VALUES (1, 'private')",
        "INSERT INTO events (chat_id, kind, payload) SELECT 1, 'message', 'x' FROM "
        f"{numbers(database_url, 3000)} AS n",
        "DELETE FROM events WHERE id <= 2000",
    )
    code, output = run_cli(["db", "optimize"], cwd=tmp_path)
    assert code == 0, output
    assert re.search(
        r"^ANALYZE: planner statistics of \d+ tables refreshed in \d+ ms$", output, re.M
    )
    code, output = run_cli(["db", "vacuum"], cwd=tmp_path)
    assert code == 0, output
    if database_url.startswith("sqlite"):
        assert "gave back" in output or "nothing to reclaim" in output
    else:
        assert re.search(r"^VACUUM \(ANALYZE\): [\d,]+ dead row versions removed", output, re.M)


async def test_postgresql_autovacuum_falling_behind_degrades_the_check_until_vacuumed(
    postgres_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(postgres_url, health={"http_port": free_port()})
    async with running_host(settings) as (_host, plugin):
        care = plugin.care
        assert (await care.check_maintenance()).status is Status.HEALTHY
        execute(
            postgres_url,
            "CREATE TABLE big (id int PRIMARY KEY, body text) WITH (autovacuum_enabled = false)",
            f"INSERT INTO big SELECT i, 'x' FROM {numbers(postgres_url, 10_000)} AS n",
        )
        execute(postgres_url, "DELETE FROM big WHERE id <= 8000")

        async def degraded() -> str | None:
            outcome = await care.check_maintenance()
            return outcome.message if outcome.status is Status.DEGRADED else None

        deadline = time.monotonic() + 10
        message = await degraded()
        while message is None and time.monotonic() < deadline:  # statistics arrive in ~1 s
            await asyncio.sleep(0.2)
            message = await degraded()
        assert message is not None
        assert message.startswith("autovacuum is behind on big (8,000 dead rows, 80%")
        assert "vacuumed never; autovacuum off" in message
        summary = await care.summary()
        assert any("big: 8,000 dead (80%), vacuumed never" in line for line in summary.maintenance)

        result = await asyncio.to_thread(care.vacuum_now)
        assert result.dead_rows_before >= 8000 and result.dead_rows_after < 100
        assert "dead row versions removed" in result.describe()
        outcome = await care.check_maintenance()
    assert outcome.status is Status.HEALTHY, outcome.message
