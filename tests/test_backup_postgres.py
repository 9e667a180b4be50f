"""PostgreSQL backups on the real service with the real pg_dump and pg_restore."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from dbkeeper.plugins.database import DatabasePlugin
from dbkeeper.plugins.database.errors import BackupError, InvalidBackup, MigrationError
from dbkeeper.plugins.database.operations import Operations
from tests.conftest import SettingsFactory
from tests.support.backups import SkippingClock, add_users, open_plugin, user_ids

pytestmark = [pytest.mark.timeout(90), pytest.mark.postgres]


@pytest.fixture
def plugin_factory(
    postgres_url: str, make_settings: SettingsFactory
) -> Iterator[Callable[..., DatabasePlugin]]:
    made: list[DatabasePlugin] = []

    def make(url: str = postgres_url, **backup: object) -> DatabasePlugin:
        plugin = open_plugin(make_settings(url, backup=backup), SkippingClock())
        made.append(plugin)
        return plugin

    yield make
    for plugin in made:
        plugin.close()


def _state(url: str) -> tuple[str | None, list[int], int]:
    """What a user sees of the database: its version, its users, its history rows."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
            history = connection.execute(text("SELECT count(*) FROM schema_migrations")).scalar()
    finally:
        engine.dispose()
    return version, user_ids(url), int(history or 0)


def test_dump_counts_exactly_what_it_holds_while_a_writer_commits(
    plugin_factory, postgres_url: str
) -> None:
    plugin = plugin_factory()
    add_users(plugin, 100)
    committed: list[int] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        engine = create_engine(postgres_url)
        next_id = 10_000
        try:
            while not stop.is_set():
                with engine.begin() as connection:
                    connection.execute(
                        text("INSERT INTO users (id, first_name) VALUES (:id, 'w')"),
                        {"id": next_id},
                    )
                committed.append(next_id)
                next_id += 1
        except BaseException as error:
            errors.append(error)
        finally:
            engine.dispose()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while len(committed) < 20:
            assert time.monotonic() < deadline and not errors
            time.sleep(0.005)
        info = plugin.backups.create("manual")
        seen = len(committed)
        while len(committed) < seen + 20:  # the writer went on during and after the dump
            assert time.monotonic() < deadline and not errors
            time.sleep(0.005)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert info.name.endswith(".dump") and info.compression == "custom"
    assert info.path.stat().st_mode & 0o777 == 0o600
    assert info.schema_version == 3 and info.tables["schema_migrations"] == 3
    assert plugin.backups.verify(info.name)[0].ok

    report = plugin.restore(info.name)
    restored = [i for i in user_ids(postgres_url) if i >= 10_000]
    assert len(user_ids(postgres_url)) == info.tables["users"]  # the manifest counted the dump
    assert restored == committed[: len(restored)] and len(restored) >= 20
    assert report.safety is not None and report.safety.tables["users"] == 100 + len(committed)


def test_restore_of_an_older_schema_on_postgresql(plugin_factory, postgres_url: str) -> None:
    plugin = plugin_factory()
    plugin.downgrade("0002")
    add_users(plugin, 3)
    old = plugin.backups.create("manual")
    plugin.migrate()
    add_users(plugin, 2, start=10)
    report = plugin.restore(old.name)
    assert [s.revision.id for s in report.reopened.steps] == ["0003"]
    assert _state(postgres_url)[:2] == ("0003", [1, 2, 3])
    reasons = sorted(b.reason for b in plugin.backups.list())
    assert reasons == ["manual", "pre-downgrade", "pre-migration", "pre-restore"]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def _alone(path: Path) -> Path:
    path.with_name(path.name + ".manifest.json").unlink()
    return path


DAMAGE = {
    "truncated": (
        lambda p: _alone(p).write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "is damaged: pg_restore cannot read it all",
    ),
    "flipped bytes": (lambda p: _flip(_alone(p)), "is damaged: pg_restore cannot read it all"),
    "flipped bytes, with manifest": (_flip, "does not match its manifest"),
    "not a dump": (lambda p: _alone(p).write_text("hello"), "is not a readable pg_dump archive"),
    "empty": (lambda p: _alone(p).write_bytes(b""), "is empty (0 bytes)"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_dump_is_refused_by_restore_and_verify(
    plugin_factory, postgres_url: str, case: str
) -> None:
    damage, expected = DAMAGE[case]
    plugin = plugin_factory()
    with plugin.database.connection() as connection:  # enough data for the TOC to be small
        connection.execute(
            text("INSERT INTO users (id, first_name, last_name) VALUES (:id, 'n', :noise)"),
            [{"id": i, "noise": os.urandom(32).hex()} for i in range(1, 5001)],
        )
    info = plugin.backups.create("manual")
    damage(info.path)
    add_users(plugin, 1, start=9000)  # the live database moved on
    before = _state(postgres_url)

    with pytest.raises(InvalidBackup) as caught:
        plugin.restore(info.name)
    assert expected in str(caught.value) and "The live database was not touched" in str(
        caught.value
    )
    assert _state(postgres_url) == before
    assert [b.reason for b in plugin.backups.list()] in ([], ["manual"])  # no safety dump
    if case != "empty":
        [result] = plugin.backups.verify(info.name)
        assert not result.ok and expected in (result.problem or "")


def test_missing_pg_dump_is_a_clear_error(plugin_factory, tmp_path: Path) -> None:
    empty = tmp_path / "no-tools"
    empty.mkdir()
    plugin = plugin_factory(pg_bin_dir=str(empty))
    with pytest.raises(BackupError) as caught:
        plugin.backups.create("manual")
    assert f"pg_dump was not found in [backup] pg_bin_dir = {empty}" in str(caught.value)
    assert plugin.backups.list() == []
    assert list(plugin.backups.store.directory.glob("bot-db-*")) == []


def test_old_pg_dump_is_refused_naming_both_versions(plugin_factory, tmp_path: Path) -> None:
    tools = tmp_path / "old-tools"
    tools.mkdir()
    script = tools / "pg_dump"  # stands in for an old client install: it only tells its version
    script.write_text('#!/bin/sh\necho "pg_dump (PostgreSQL) 9.6.24"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    plugin = plugin_factory(pg_bin_dir=str(tools))
    with pytest.raises(BackupError) as caught:
        plugin.backups.create("manual")
    message = str(caught.value)
    assert "pg_dump 9.6.24" in message and "cannot back up this PostgreSQL 15." in message
    assert "major version (15) or newer" in message and "pg_bin_dir" in message


def test_the_password_travels_in_the_environment_only(
    plugin_factory, postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    record = tmp_path / "calls.log"
    for name in ("pg_dump", "pg_restore"):  # the real tools, behind a wrapper that logs argv
        real = shutil.which(name)
        wrapper = tools / name
        wrapper.write_text(
            "#!/bin/sh\n"
            f'echo "{name} $* PGPASSWORD=${{PGPASSWORD:+set}}" >> {record}\n'
            f'exec {real} "$@"\n'
        )
        wrapper.chmod(0o755)
    secret = "pw-never-shown-9f3"
    url = make_url(postgres_url).set(password=secret).render_as_string(hide_password=False)
    plugin = plugin_factory(url, pg_bin_dir=str(tools))
    with caplog.at_level(logging.DEBUG):
        info = plugin.backups.create("manual")
        plugin.restore(info.name)
    calls = record.read_text()
    assert "pg_dump --format=custom" in calls and "pg_restore --clean --if-exists" in calls
    assert "PGPASSWORD=set" in calls and secret not in calls
    manifests = "".join(p.read_text() for p in info.path.parent.glob("*.manifest.json"))
    assert secret not in manifests and secret not in caplog.text
    assert all(secret not in name for name in os.listdir(info.path.parent))


def test_no_migration_without_its_backup(
    plugin_factory, postgres_url: str, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    plugin = plugin_factory()
    plugin.downgrade("0002")
    plugin.close()
    empty = tmp_path / "no-tools"
    empty.mkdir()
    blocked = Operations(make_settings(postgres_url, backup={"pg_bin_dir": str(empty)}))
    try:
        with pytest.raises(MigrationError) as caught:
            blocked.open()  # what startup does: migrate, with a pre-migration backup first
    finally:
        blocked.close()
    message = str(caught.value)
    assert "not applying 1 pending revision without a backup" in message
    assert "pg_dump was not found" in message and "The schema was not changed" in message
    assert _state(postgres_url)[0] == "0002"


def test_restoring_a_safety_copy_does_not_rotate_it_away_midway(
    plugin_factory, postgres_url: str
) -> None:
    plugin = plugin_factory(keep=1)  # one safety copy kept: the next one would replace it
    add_users(plugin, 2)
    first = plugin.backups.create("manual")
    add_users(plugin, 3, start=10)
    undo = plugin.restore(first.name).safety  # holds users 1, 2, 10, 11, 12
    assert undo is not None
    report = plugin.restore(undo.name)  # pg_restore reads that very file
    assert user_ids(postgres_url) == [1, 2, 10, 11, 12]
    assert report.safety is not None and report.safety.name != undo.name
