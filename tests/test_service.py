"""The database service: engines as configured, connect retries, async work off the loop."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import threading
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from dbkeeper.plugins.database.errors import DatabaseUnavailable
from dbkeeper.plugins.database.service import DatabaseService
from tests.conftest import SettingsFactory


def test_sqlite_file_is_created_with_wal_busy_timeout_and_foreign_keys(
    tmp_path: Path, make_settings: SettingsFactory
) -> None:
    url = f"sqlite:///{tmp_path / 'nested' / 'dir' / 'bot.db'}"
    service = DatabaseService(make_settings(url, database={"busy_timeout_ms": 1234}).database)
    service.connect()
    try:
        assert (tmp_path / "nested" / "dir" / "bot.db").is_file()
        with service.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 1234
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        with service.connection() as connection:
            connection.execute(text("CREATE TABLE parent (id INTEGER PRIMARY KEY)"))
            connection.execute(
                text("CREATE TABLE child (id INTEGER PRIMARY KEY, p INTEGER REFERENCES parent(id))")
            )
        with pytest.raises(IntegrityError), service.connection() as connection:
            connection.execute(text("INSERT INTO child (id, p) VALUES (1, 99)"))
    finally:
        service.close()


def test_sqlite_ddl_is_transactional(sqlite_url: str, make_settings: SettingsFactory) -> None:
    """The stdlib driver would autocommit DDL; a failed unit must leave no table behind."""
    service = DatabaseService(make_settings(sqlite_url).database)
    service.connect()
    try:
        with pytest.raises(RuntimeError), service.connection() as connection:
            connection.execute(text("CREATE TABLE half_done (id INTEGER)"))
            raise RuntimeError("boom")
        with service.engine.connect() as connection:
            names = connection.exec_driver_sql("SELECT name FROM sqlite_master").scalars().all()
        assert "half_done" not in names
    finally:
        service.close()


async def test_run_and_read_work_on_worker_threads(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    service = DatabaseService(make_settings(sqlite_url).database)
    await asyncio.to_thread(service.connect)
    loop_thread = threading.get_ident()
    try:

        def write(session) -> int:
            session.execute(text("CREATE TABLE t (v INTEGER)"))
            session.execute(text("INSERT INTO t VALUES (1), (2)"))
            return threading.get_ident()

        worker = await service.run(write)
        total = await service.read(lambda s: s.execute(text("SELECT sum(v) FROM t")).scalar())
        assert worker != loop_thread
        assert total == 3
    finally:
        await asyncio.to_thread(service.close)


async def test_gate_holds_new_work_until_reopened(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    service = DatabaseService(make_settings(sqlite_url).database)
    await asyncio.to_thread(service.connect)
    try:
        async with service.gate.closed():
            pending = asyncio.create_task(service.read(lambda s: s.execute(text("SELECT 1"))))
            await asyncio.sleep(0)  # let it reach the gate
            assert not pending.done()
        await asyncio.wait_for(pending, 10)
    finally:
        await asyncio.to_thread(service.close)


def test_sqlite_path_under_a_file_fails_clearly(
    tmp_path: Path, make_settings: SettingsFactory
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    service = DatabaseService(make_settings(f"sqlite:///{blocker / 'bot.db'}").database)
    with pytest.raises(DatabaseUnavailable) as caught:
        service.connect()
    message = str(caught.value)
    assert f"cannot create the directory {blocker}" in message
    assert "writable location" in message


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A directory on a read-only tmpfs: unwritable even for root."""
    target = tmp_path / "ro"
    target.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)], capture_output=True
    )
    if mounted.returncode != 0:
        target.chmod(0o500)  # without mount rights (not root) permissions do the job
        if _can_write(target):
            pytest.skip("cannot make an unwritable directory here (root without mount rights)")
    yield target
    if mounted.returncode == 0:
        subprocess.run(["umount", str(target)], check=False)
    target.chmod(0o700)


def _can_write(directory: Path) -> bool:
    try:
        (directory / ".probe").write_text("x")
    except OSError:
        return False
    (directory / ".probe").unlink()
    return True


def test_unwritable_sqlite_directory_fails_clearly(
    read_only_dir: Path, make_settings: SettingsFactory
) -> None:
    service = DatabaseService(make_settings(f"sqlite:///{read_only_dir / 'bot.db'}").database)
    with pytest.raises(DatabaseUnavailable, match="is not writable"):
        service.connect()


def test_unreachable_postgresql_is_retried_then_fails_clearly(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    url = "postgresql+psycopg://bot:topsecret@127.0.0.1:1/bot"
    settings = make_settings(
        url, database={"connect_retries": 3, "retry_backoff_seconds": [0.01, 0.02]}
    )
    service = DatabaseService(settings.database)
    waits: list[float] = []
    with caplog.at_level(logging.WARNING), pytest.raises(DatabaseUnavailable) as caught:
        service.connect(sleep=waits.append)
    message = str(caught.value)
    assert message.startswith("cannot connect to postgresql+psycopg://bot:***@127.0.0.1:1/bot")
    assert "after 3 attempts" in message and "server is running" in message
    assert "topsecret" not in message and "topsecret" not in caplog.text
    assert waits == [0.01, 0.02]  # the configured backoff; the last delay repeats if needed
    assert caplog.text.count("attempt 1 of 3") == 1 and caplog.text.count("attempt 2 of 3") == 1


def test_connect_succeeds_on_postgresql(postgres_url: str, make_settings: SettingsFactory) -> None:
    service = DatabaseService(make_settings(postgres_url).database)
    service.connect()
    try:
        with service.connection() as connection:
            assert connection.execute(text("SELECT 1")).scalar() == 1
    finally:
        service.close()


@pytest.mark.parametrize("kind", ["directory", "garbage"])
def test_sqlite_file_that_cannot_be_opened_is_retried_then_fails(
    kind: str, tmp_path: Path, make_settings: SettingsFactory
) -> None:
    path = tmp_path / "bot.db"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"this is not a SQLite database, just some text" * 100)
    before = path.read_bytes() if kind == "garbage" else None
    service = DatabaseService(make_settings(f"sqlite:///{path}").database)
    waits: list[float] = []
    with pytest.raises(DatabaseUnavailable) as caught:
        service.connect(sleep=waits.append)
    assert "after 3 attempts" in str(caught.value)
    assert "SQLite database" in str(caught.value)
    assert len(waits) == 2
    if before is not None:
        assert path.read_bytes() == before  # nothing was written over it


async def test_an_engine_of_the_bots_own_is_reported_at_startup_and_when_it_connects(
    sqlite_url: str, make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A restore can pause and hand over only the database access dbkeeper gives out; an engine
    the bot made itself is named at startup, and one made later when it first connects."""
    from sqlalchemy import create_engine

    from tests.support.hosts import free_port, running_host

    caplog.set_level(logging.WARNING, logger="dbkeeper.database")
    early = create_engine(sqlite_url)  # made at import time, as many bots do
    elsewhere = create_engine(sqlite_url.replace("bot.db", "other.db"))
    settings = make_settings(sqlite_url, health={"http_port": free_port()})
    async with running_host(settings) as (_, plugin):
        warned = [r.getMessage() for r in caplog.records if "not dbkeeper's" in r.getMessage()]
        assert len(warned) == 1 and "restore cannot pause it" in warned[0]
        late = create_engine(sqlite_url)
        with late.connect():
            pass
        with plugin.database.session() as session:  # dbkeeper's own access is never reported
            session.execute(text("SELECT 1"))
        with elsewhere.connect():  # another database: none of dbkeeper's business
            pass
        warned = [r.getMessage() for r in caplog.records if "not dbkeeper's" in r.getMessage()]
        assert len(warned) == 2
    for engine in (early, late, elsewhere):
        engine.dispose()
