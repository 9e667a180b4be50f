"""Restoring SQLite backups: rows come back, bad input changes nothing, the bot keeps running."""

from __future__ import annotations

import asyncio
import gzip
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import zstandard
from sqlalchemy import text

from dbkeeper.plugin import Deadline
from dbkeeper.plugins.database import DatabasePlugin
from dbkeeper.plugins.database.errors import InvalidBackup
from tests.conftest import SettingsFactory
from tests.support.backups import (
    SkippingClock,
    add_users,
    fingerprint,
    listing,
    open_plugin,
    user_ids,
)

pytestmark = pytest.mark.timeout(60)
OLD = "bot-db-2001-01-01_00-00-00"  # names of hand-made files in the backup directory


@pytest.fixture
def plugin(sqlite_url: str, make_settings: SettingsFactory) -> Iterator[DatabasePlugin]:
    settings = make_settings(sqlite_url, backup={"compression": "gzip", "compress_min_bytes": 0})
    opened = open_plugin(settings, SkippingClock())
    yield opened
    opened.close()


def _leave_rows_in_the_wal(database: Path) -> None:
    """A writer killed mid-flight: its committed row (id 99) is only in the -wal file."""
    script = (
        "import os, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('PRAGMA wal_autocheckpoint = 0')\n"
        "c.execute(\"INSERT INTO users (id, first_name) VALUES (99, 'in the wal only')\")\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(database)], check=True)
    assert database.with_name(database.name + "-wal").stat().st_size > 0


def _file(plugin: DatabasePlugin) -> Path:
    assert plugin.database.file is not None
    return plugin.database.file


def _backups(plugin: DatabasePlugin) -> Path:
    plugin.backups.store.ensure()
    return plugin.backups.store.directory


def test_restore_brings_the_rows_back_and_keeps_the_replaced_database(
    plugin: DatabasePlugin, sqlite_url: str
) -> None:
    add_users(plugin, 10)
    backup = plugin.backups.create("manual")
    add_users(plugin, 5, start=11)
    plugin.close()
    _leave_rows_in_the_wal(_file(plugin))

    report = plugin.restore(backup.name)

    assert user_ids(sqlite_url) == list(range(1, 11))
    assert report.safety is not None and report.safety.reason == "pre-restore"
    assert report.safety.tables["users"] == 16  # the safety copy read the -wal's rows too
    add_users(plugin, 1, start=500)  # the restored database is open and writable
    undo = plugin.restore(report.safety.name)  # and the restore can be undone
    assert user_ids(sqlite_url) == [*range(1, 16), 99]
    assert undo.safety is not None and undo.safety.tables["users"] == 11
    with sqlite3.connect(_file(plugin)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_stale_wal_left_beside_a_removed_database_is_not_replayed_into_the_restored_one(
    plugin: DatabasePlugin, sqlite_url: str
) -> None:
    add_users(plugin, 10)
    backup = plugin.backups.create("manual")
    plugin.close()
    _leave_rows_in_the_wal(_file(plugin))
    _file(plugin).unlink()  # an operator removed a broken database, not its -wal
    report = plugin.restore(backup.name)
    assert report.safety is None  # nothing left to keep
    assert user_ids(sqlite_url) == list(range(1, 11))  # the old log's row 99 is not there
    with sqlite3.connect(_file(plugin)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_restore_of_an_older_schema_migrates_it_forward(
    plugin: DatabasePlugin, sqlite_url: str
) -> None:
    plugin.downgrade("0002")
    add_users(plugin, 3)
    old = plugin.backups.create("manual")
    assert old.schema_version == 2
    plugin.migrate()
    add_users(plugin, 3, start=4)
    report = plugin.restore(old.name)
    assert report.schema_version == 2
    assert [step.revision.id for step in report.reopened.steps] == ["0003"]
    assert plugin.migrator.status().current == "0003"
    assert user_ids(sqlite_url) == [1, 2, 3]
    reasons = [b.reason for b in plugin.backups.list()]
    assert reasons.count("pre-downgrade") == 1 and reasons.count("pre-migration") == 1


# -- bad input: a clear error and nothing changed -----------------------------------------------


def _backup_files(plugin: DatabasePlugin) -> list[str]:
    return [name for name in listing(_backups(plugin)) if not name.startswith(".dbkeeper-")]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path, at: float = 0.5, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_manifest(path: Path) -> None:
    path.with_name(path.name + ".manifest.json").unlink()


def _take(plugin: DatabasePlugin, codec: str) -> Path:
    plugin.backups.settings = replace(plugin.backups.settings, compression=codec)
    return plugin.backups.create("manual").path


def truncated_gz(plugin: DatabasePlugin) -> str:
    path = _take(plugin, "gzip")
    _truncate(path)
    return path.name


def truncated_gz_alone(plugin: DatabasePlugin) -> str:
    path = _take(plugin, "gzip")
    _drop_manifest(path)
    _truncate(path)
    return path.name


def truncated_zst_alone(plugin: DatabasePlugin) -> str:
    path = _take(plugin, "zstd")
    _drop_manifest(path)
    _truncate(path)
    return path.name


def flipped(plugin: DatabasePlugin) -> str:
    path = _take(plugin, "gzip")
    _flip(path)
    return path.name


def flipped_gz_alone(plugin: DatabasePlugin) -> str:
    path = _take(plugin, "gzip")
    _drop_manifest(path)
    _flip(path)
    return path.name


def flipped_zst_alone(plugin: DatabasePlugin) -> str:
    path = _take(plugin, "zstd")
    _drop_manifest(path)
    _flip(path)
    return path.name


def flipped_raw_alone(plugin: DatabasePlugin) -> str:
    path = _take(plugin, "none")
    _drop_manifest(path)
    with sqlite3.connect(f"file:{path}?immutable=1", uri=True) as connection:
        root = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = 'users'")
        page = root.fetchone()[0] * connection.execute("PRAGMA page_size").fetchone()[0]
    connection.close()
    _flip(path, at=(page - 2048) / path.stat().st_size, count=2048)  # the end of users' page:
    return path.name  # its rows (a fixed offset may fall in a page's unused middle)


def not_sqlite(plugin: DatabasePlugin) -> str:
    (_backups(plugin) / f"{OLD}.db").write_text("this is a shopping list, not a database\n")
    return f"{OLD}.db"


def not_sqlite_gz(plugin: DatabasePlugin) -> str:
    (_backups(plugin) / f"{OLD}.db.gz").write_bytes(gzip.compress(b"just some text" * 100))
    return f"{OLD}.db.gz"


def other_application(plugin: DatabasePlugin) -> str:
    path = _backups(plugin) / f"{OLD}.db.zst"
    scratch = _backups(plugin).parent / "other.db"
    with sqlite3.connect(scratch) as connection:
        connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        connection.execute("INSERT INTO notes (body) VALUES ('hello')")
    connection.close()
    path.write_bytes(zstandard.ZstdCompressor().compress(scratch.read_bytes()))
    return path.name


def newer_schema(plugin: DatabasePlugin) -> str:
    source = _take(plugin, "none")
    path = _backups(plugin) / f"{OLD}.db"
    shutil.copyfile(source, path)
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '0009'")
    connection.close()
    return path.name


def empty(plugin: DatabasePlugin) -> str:
    (_backups(plugin) / f"{OLD}.db.gz").write_bytes(b"")
    return f"{OLD}.db.gz"


def missing(plugin: DatabasePlugin) -> str:
    return f"{OLD}.db.gz"


def postgres_dump(plugin: DatabasePlugin) -> str:
    (_backups(plugin) / f"{OLD}.dump").write_bytes(b"PGDMP" + b"\0" * 100)
    return f"{OLD}.dump"


BAD: dict[str, tuple[Callable[[DatabasePlugin], str], str]] = {
    "truncated .gz": (truncated_gz, "but its manifest says"),
    "truncated .gz, no manifest": (truncated_gz_alone, "the gzip data ends early"),
    "truncated .zst, no manifest": (truncated_zst_alone, "the zstd data ends early"),
    "flipped bytes": (flipped, "does not match its manifest"),
    "flipped bytes in .gz, no manifest": (flipped_gz_alone, "is damaged: the gzip data"),
    "flipped bytes in .zst, no manifest": (flipped_zst_alone, "is damaged: the zstd data"),
    "flipped bytes in .db, no manifest": (flipped_raw_alone, "fails SQLite's integrity check"),
    "not SQLite": (not_sqlite, "is not a SQLite database"),
    "not SQLite, compressed": (not_sqlite_gz, "is not a SQLite database"),
    "another application's database": (other_application, "is not a backup of this bot"),
    "newer schema": (newer_schema, "is at schema v9 (0009), newer than this code knows"),
    "empty file": (empty, "is empty (0 bytes)"),
    "no such backup": (missing, "there is no backup named"),
    "a PostgreSQL dump": (postgres_dump, "is a PostgreSQL backup, and this database is sqlite"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_backup_is_refused_and_the_live_database_stays_byte_for_byte(
    plugin: DatabasePlugin, case: str
) -> None:
    make, expected = BAD[case]
    add_users(plugin, 20)
    name = make(plugin)
    plugin.close()  # nothing of ours touches the file while we compare it
    before, backups_before = fingerprint(_file(plugin)), _backup_files(plugin)
    data_before = listing(_file(plugin).parent)

    with pytest.raises(InvalidBackup) as caught:
        plugin.restore(name)

    message = str(caught.value)
    assert expected in message, message
    assert "The live database was not touched" in message or "Nothing was changed" in message
    assert fingerprint(_file(plugin)) == before
    assert _backup_files(plugin) == backups_before  # no safety copy, no leftovers
    assert listing(_file(plugin).parent) == data_before  # no staging file left beside it


@pytest.mark.parametrize("name", ["../data/bot.db", "/etc/passwd", "sub/bot-db-x.db", "bot.db"])
def test_restore_takes_names_not_paths(plugin: DatabasePlugin, name: str) -> None:
    plugin.close()
    before = fingerprint(_file(plugin))
    with pytest.raises(InvalidBackup, match="is not a backup name: give a name"):
        plugin.restore(name)
    assert fingerprint(_file(plugin)) == before


def test_verify_reports_damage_without_deleting(plugin: DatabasePlugin) -> None:
    good = plugin.backups.create("manual")
    bad = plugin.backups.create("manual")
    _flip(bad.path)
    results = {r.name: r for r in plugin.backups.verify()}
    assert results[good.name].ok and not results[bad.name].ok
    assert "does not match its manifest" in (results[bad.name].problem or "")
    assert bad.path.exists()  # verification reports; deleting is the operator's call


def test_a_damaged_live_database_is_set_aside_as_it_was_then_restored(
    plugin: DatabasePlugin, sqlite_url: str
) -> None:
    add_users(plugin, 300, text_size=300)
    good = plugin.backups.create("manual")
    plugin.close()
    live = _file(plugin)
    with live.open("r+b") as handle:  # the live database is damaged
        handle.seek(-8192, os.SEEK_END)
        handle.write(b"\x5a" * 8192)
    damaged_bytes = live.read_bytes()

    report = plugin.restore(good.name)  # no verified safety copy can exist of it ...

    assert report.safety is None and len(report.set_aside) == 1
    kept = report.set_aside[0]
    assert kept.parent == live.parent and kept.name.startswith("bot.db.damaged-bot-db-")
    assert kept.read_bytes() == damaged_bytes  # ... so its very bytes are kept instead
    assert user_ids(sqlite_url) == list(range(1, 301))
    assert [b.reason for b in plugin.backups.list()] == ["manual"]


async def test_restore_while_the_bot_runs_pauses_database_work_and_resumes(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(sqlite_url, backup={"on_shutdown": False})
    plugin = DatabasePlugin(settings)
    await plugin.start()
    try:
        add_users(plugin, 10)
        backup = await plugin.backup_now("manual")
        add_users(plugin, 5, start=11)
        counts: list[int] = []
        errors: list[BaseException] = []
        stop = asyncio.Event()

        async def handler() -> None:  # what bot handlers do: database work through the service
            while not stop.is_set():
                try:
                    count = await plugin.database.read(
                        lambda s: s.execute(text("SELECT count(*) FROM users")).scalar_one()
                    )
                except BaseException as error:
                    errors.append(error)
                    return
                counts.append(count)
                await asyncio.sleep(0)

        task = asyncio.create_task(handler())
        while len(counts) < 5:
            await asyncio.sleep(0.001)
        report = await plugin.restore(backup.name)
        after = len(counts)
        while len(counts) < after + 5:
            await asyncio.sleep(0.001)
        stop.set()
        await task
        assert errors == []
        switch = counts.index(10)
        assert set(counts[:switch]) == {15} and set(counts[switch:]) == {10}
        assert report.safety is not None and report.safety.tables["users"] == 15
        await plugin.database.run(
            lambda s: s.execute(text("INSERT INTO users (id, first_name) VALUES (77, 'new')"))
        )
        assert 77 in user_ids(sqlite_url)
    finally:
        await plugin.stop(Deadline.after(9))
