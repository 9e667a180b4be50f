"""Taking SQLite backups: real files, real writers, real disks that fill up."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from dbkeeper.plugin import Deadline
from dbkeeper.plugins.database import DatabasePlugin
from dbkeeper.plugins.database.backup import pipeline as backup_module
from dbkeeper.plugins.database.backup.engines.sqlite import SqliteBackupEngine
from dbkeeper.plugins.database.backup.pipeline import Backups
from dbkeeper.plugins.database.errors import BackupError, BackupInProgress
from tests.conftest import SettingsFactory
from tests.support.backups import (
    SkippingClock,
    add_users,
    decompressed,
    fingerprint,
    listing,
    open_plugin,
    sqlite_user_ids,
    user_ids,
)
from tests.support.process import run_cli, write_config
from tests.support.tmpfs import mounted_tmpfs

pytestmark = pytest.mark.timeout(60)
# dbkeeper's own files in a backup directory: the lock, and the room kept for the last failure.
STATE_FILES = [".dbkeeper-backup.lock", ".dbkeeper-last-failure.json"]
NAME = re.compile(r"^bot-db-\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.db(\.gz|\.zst)?$")


@pytest.fixture
def clock() -> SkippingClock:
    return SkippingClock()


@pytest.fixture
def plugin_factory(
    sqlite_url: str, make_settings: SettingsFactory, clock: SkippingClock
) -> Iterator[Callable[..., DatabasePlugin]]:
    made: list[DatabasePlugin] = []

    def make(*, real_clock: bool = False, **backup: object) -> DatabasePlugin:
        plugin = open_plugin(
            make_settings(sqlite_url, backup=backup), None if real_clock else clock
        )
        made.append(plugin)
        return plugin

    yield make
    for plugin in made:
        plugin.close()


def _database(plugin: DatabasePlugin) -> Path:
    assert plugin.database.file is not None
    return plugin.database.file


@pytest.mark.parametrize("codec", ["gzip", "zstd", "none"])
def test_backup_is_compressed_verified_described_and_private(
    plugin_factory, tmp_path: Path, codec: str
) -> None:
    plugin = plugin_factory(compression=codec, compress_min_bytes=0)
    add_users(plugin, 200, text_size=100)
    info = plugin.backups.create("manual")

    suffix = {"gzip": ".db.gz", "zstd": ".db.zst", "none": ".db"}[codec]
    assert NAME.match(info.name) and info.name.endswith(suffix)
    assert info.path.stat().st_mode & 0o777 == 0o600  # users' data: owner only
    manifest_file = info.path.with_name(info.name + ".manifest.json")
    assert manifest_file.stat().st_mode & 0o777 == 0o600
    manifest = json.loads(manifest_file.read_text())
    import hashlib

    assert manifest["sha256"] == hashlib.sha256(info.path.read_bytes()).hexdigest()
    assert manifest["size_bytes"] == info.path.stat().st_size == info.size_bytes
    assert (manifest["reason"], manifest["compression"]) == ("manual", codec)
    assert manifest["schema_version"] == 3 and manifest["schema_revision"] == "0003"
    assert manifest["tables"]["users"] == 200 and manifest["tables"]["schema_migrations"] == 3
    # Counted as the health check counts (4 tables, the users' rows): dbkeeper's bookkeeping
    # is backed up but never counted.
    assert (len(info.bot_tables), info.rows) == (4, 200)
    assert manifest["created_at"].endswith("+00:00")
    # Any standard tool reads it, and it holds the rows.
    copy = decompressed(info.path, tmp_path / "copy.db")
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == manifest["content_sha256"]
    assert sqlite_user_ids(copy) == list(range(1, 201))
    # Nothing else was left in the directory.
    directory = info.path.parent
    assert listing(directory) == sorted([*STATE_FILES, info.name, info.name + ".manifest.json"])
    assert [b.name for b in plugin.backups.list()] == [info.name]
    assert plugin.backups.verify()[0].ok


def test_small_backups_stay_uncompressed(plugin_factory) -> None:
    plugin = plugin_factory(compression="gzip", compress_min_bytes=1 << 20)
    info = plugin.backups.create("manual")
    assert info.name.endswith(".db") and info.compression == "none"
    assert info.content_bytes == info.size_bytes < 1 << 20


def test_writer_committing_throughout_a_backup_never_fails_and_the_backup_is_its_start(
    plugin_factory, sqlite_url: str, tmp_path: Path
) -> None:
    plugin = plugin_factory(compression="zstd", compress_min_bytes=0)
    add_users(plugin, 2000, text_size=200)
    committed: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        next_id = 100_000
        from sqlalchemy import text

        while not stop.is_set():
            try:
                with plugin.database.session() as session:
                    session.execute(
                        text("INSERT INTO users (id, first_name) VALUES (:id, 'w')"),
                        {"id": next_id},
                    )
            except BaseException as error:  # "database is locked" would land here
                errors.append(error)
                return
            committed.append(next_id)
            next_id += 1

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 20
        while len(committed) < count and not errors:
            assert time.monotonic() < deadline, "the writer stopped committing"
            time.sleep(0.001)

    at_copy: list[int] = []

    def progress(phase: str, done: int, total: int | None) -> None:
        if phase == "snapshot" and not at_copy:
            at_copy.append(len(committed))
            wait_for(at_copy[0] + 30)  # the writer commits while the copy is open

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_for(5)
        before = len(committed)
        info = plugin.backups.create("manual", progress=progress)
        wait_for(len(committed) + 5)  # and after it
    finally:
        stop.set()
        thread.join()
    assert errors == []
    copy = sqlite_user_ids(decompressed(info.path, tmp_path / "copy.db"))
    in_backup = [i for i in copy if i >= 100_000]
    assert in_backup == committed[: len(in_backup)]  # a consistent prefix: no gaps, no extras
    assert before <= len(in_backup) <= at_copy[0] + 1  # all before it, none made during it
    assert len(committed) >= len(in_backup) + 30
    assert info.tables["users"] == 2000 + len(in_backup)
    live = [i for i in user_ids(sqlite_url) if i >= 100_000]
    assert live == committed  # the live database lost nothing


def test_rotation_keeps_the_newest_and_safety_copies_apart(plugin_factory) -> None:
    plugin = plugin_factory(keep=2)
    safety = plugin.backups.create("pre-restore")
    routine = [plugin.backups.create(reason).name for reason in ("scheduled",) * 3 + ("manual",)]
    names = [b.name for b in plugin.backups.list()]
    assert names == [routine[3], routine[2], safety.name]  # newest first; the safety copy stays
    directory = safety.path.parent
    for gone in routine[:2]:
        assert not (directory / gone).exists()
        assert not (directory / (gone + ".manifest.json")).exists()
    newer = [plugin.backups.create("pre-migration").name for _ in range(2)]
    assert [b.name for b in plugin.backups.list()] == [
        newer[1],
        newer[0],
        routine[3],
        routine[2],
    ]  # safety copies rotate among themselves only


def test_a_failing_backup_deletes_nothing_and_is_reported(
    plugin_factory, sqlite_url: str, make_settings: SettingsFactory
) -> None:
    plugin = plugin_factory(keep=1, compression="none", real_clock=True)
    add_users(plugin, 300, text_size=300)
    good = plugin.backups.create("scheduled")
    plugin.close()
    database = _database(plugin)
    with database.open("r+b") as handle:  # damage the last pages (rows of users)
        handle.seek(-8192, os.SEEK_END)
        handle.write(b"\xa5" * 8192)

    with pytest.raises(BackupError) as caught:
        plugin.backups.create("scheduled")
    message = str(caught.value)
    assert "failed verification" in message and "integrity check" in message
    assert "existing backups are untouched" in message
    assert [b.name for b in plugin.backups.list()] == [good.name]  # rotation did not run
    assert listing(good.path.parent) == sorted(
        [
            ".dbkeeper-backup.lock",
            ".dbkeeper-last-failure.json",
            good.name,
            good.name + ".manifest.json",
        ]
    )
    stats = plugin.backups.stats()
    assert stats.last_failure is not None and stats.last_failure.reason == "scheduled"
    assert "integrity check" in stats.last_failure.error
    # Another process (a fresh manager) sees the failure too, until a backup succeeds.
    fresh = DatabasePlugin(make_settings(sqlite_url))
    assert fresh.backups.stats().last_failure == stats.last_failure
    database.unlink()
    healthy = open_plugin(make_settings(sqlite_url, backup={"keep": 1}))
    try:
        healthy.backups.create("manual")
        assert healthy.backups.stats().last_failure is None
        assert fresh.backups.stats().last_failure is None
    finally:
        healthy.close()


def test_missing_database_is_a_clear_failure(
    plugin_factory, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    plugin = plugin_factory()
    settings = make_settings(f"sqlite:///{tmp_path / 'nowhere.db'}")
    manager = Backups(settings.backup, SqliteBackupEngine(tmp_path / "nowhere.db"), plugin.migrator)
    with pytest.raises(BackupError, match=r"there is no database at .*nowhere\.db"):
        manager.create("manual")
    assert manager.list() == []


def test_two_backups_in_one_second_get_the_next_second(plugin_factory) -> None:
    plugin = plugin_factory(real_clock=True)
    first = plugin.backups.create("manual")
    second = plugin.backups.create("manual")
    assert first.name < second.name  # names sort in the order taken
    assert second.created_at.replace(microsecond=0) > first.created_at.replace(microsecond=0)
    assert [b.name for b in plugin.backups.list()] == [second.name, first.name]


def test_one_backup_at_a_time_others_wait_or_are_told(
    plugin_factory, sqlite_url: str, tmp_path: Path
) -> None:
    plugin = plugin_factory()
    inside, release = threading.Event(), threading.Event()
    results: list[object] = []

    def slow(phase: str, done: int, total: int | None) -> None:
        if phase == "snapshot":
            inside.set()
            release.wait(20)

    def run(reason: str, **kwargs: object) -> None:
        try:
            results.append(plugin.backups.create(reason, **kwargs))
        except BaseException as error:
            results.append(error)

    running = threading.Thread(target=run, args=("scheduled",), kwargs={"progress": slow})
    running.start()
    assert inside.wait(20)
    assert plugin.backups.running
    with pytest.raises(BackupInProgress, match=r"a scheduled backup is already running"):
        plugin.backups.create("manual")
    # Another process is told as well (the directory's lock), with exit status 1.
    config = write_config(
        tmp_path / "config.toml",
        {"database": {"url": sqlite_url}, "backup": {"dir": str(tmp_path / "backups")}},
    )
    code, output = run_cli(["--config", str(config), "backup", "create"], cwd=tmp_path)
    assert code == 1 and "another process is taking a backup or restoring" in output
    waiting = threading.Thread(target=run, args=("pre-migration",), kwargs={"wait": True})
    waiting.start()
    release.set()
    running.join(20)
    waiting.join(20)
    assert len(results) == 2 and not any(isinstance(r, BaseException) for r in results)
    assert {b.reason for b in plugin.backups.list()} == {"scheduled", "pre-migration"}
    assert not plugin.backups.running


def test_stats_and_estimate(plugin_factory) -> None:
    plugin = plugin_factory(compression="gzip", compress_min_bytes=0)
    empty = plugin.backups.stats()
    assert (empty.count, empty.total_bytes, empty.newest, empty.last_success_at) == (
        0,
        0,
        None,
        None,
    )
    live = _database(plugin).stat().st_size
    assert plugin.backups.estimate_next_bytes() >= 2 * live  # raw + compressed, ratio unknown
    add_users(plugin, 100)
    first = plugin.backups.create("scheduled")
    second = plugin.backups.create("manual")
    stats = plugin.backups.stats()
    assert stats.count == 2 and stats.total_bytes == first.size_bytes + second.size_bytes
    assert (stats.newest, stats.oldest) == (second, first)
    assert stats.last_success_at == second.created_at and stats.last_failure is None
    assert stats.last_duration_seconds is not None and stats.last_duration_seconds >= 0
    estimate = plugin.backups.estimate_next_bytes()
    third = plugin.backups.create("manual")
    assert estimate >= third.content_bytes + third.size_bytes  # its peak: raw and compressed
    assert estimate <= 4 * (third.content_bytes + third.size_bytes)  # and not wildly more


async def test_shutdown_backup_stays_raw_when_compression_would_not_fit_then_compressed_next_start(
    sqlite_url: str, make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(backup_module.ASSUMED_RATES, "gzip", 1.0)  # 1 byte/s: never fits
    settings = make_settings(sqlite_url, backup={"compress_min_bytes": 0, "compression": "gzip"})
    plugin = DatabasePlugin(settings)
    await plugin.start()
    add_users(plugin, 50)
    await plugin.stop(Deadline.after(9))
    [raw] = plugin.backups.list()
    assert raw.reason == "shutdown" and raw.name.endswith(".db")
    assert (raw.compression, raw.pending_compression, raw.tables["users"]) == ("none", "gzip", 50)

    restarted = DatabasePlugin(make_settings(sqlite_url, backup={"on_shutdown": False}))
    await restarted.start()
    assert restarted._deferred is not None
    await restarted._deferred  # the background compression of the next start
    [packed] = restarted.backups.list()
    assert packed.name == raw.name + ".gz" and packed.compression == "gzip"
    assert (packed.created_at, packed.reason, packed.pending_compression) == (
        raw.created_at,
        "shutdown",
        None,
    )
    assert packed.content_sha256 == raw.content_sha256 and not raw.path.exists()
    assert restarted.backups.verify(packed.name)[0].ok
    await restarted.stop(Deadline.after(9))


async def test_shutdown_backup_is_compressed_when_it_fits(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(sqlite_url, backup={"compress_min_bytes": 0, "compression": "zstd"})
    plugin = DatabasePlugin(settings)
    await plugin.start()
    add_users(plugin, 50)
    await plugin.stop(Deadline.after(9))
    [backup] = plugin.backups.list()
    assert backup.name.endswith(".db.zst") and backup.pending_compression is None
    assert backup.reason == "shutdown" and backup.tables["users"] == 50
    assert listing(backup.path.parent) == sorted(
        [*STATE_FILES, backup.name, backup.name + ".manifest.json"]
    )


# -- a disk that fills up -----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real file system that runs out of space."""
    with mounted_tmpfs(tmp_path / "small-disk", "size=4m,mode=0700") as mount:
        yield mount


def _leave_free(directory: Path, free: int) -> None:
    """Fill ``directory``'s file system until about ``free`` bytes are left."""
    available = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    (directory / "filler").write_bytes(b"\0" * max(0, available - free))


@pytest.mark.parametrize("phase", ["copy", "compression"])
def test_a_full_disk_fails_the_backup_cleanly(
    small_disk: Path, sqlite_url: str, make_settings: SettingsFactory, phase: str
) -> None:
    codec = "none" if phase == "copy" else "zstd"
    settings = make_settings(
        sqlite_url, backup={"dir": str(small_disk), "compression": codec, "compress_min_bytes": 0}
    )
    plugin = open_plugin(settings, SkippingClock())
    try:
        plugin.database.engine  # noqa: B018 - connected
        noise = base64.b64encode(os.urandom(300 * 400)).decode()  # barely compressible
        with plugin.database.connection() as connection:
            from sqlalchemy import text

            connection.execute(
                text("INSERT INTO users (id, first_name, last_name) VALUES (:id, 'n', :t)"),
                [{"id": i, "t": noise[i * 400 : (i + 1) * 400]} for i in range(1, 301)],
            )
        good = plugin.backups.create("scheduled")
        live = _database(plugin).stat().st_size
        # copy: not even the raw copy fits; compression: it does, the compressed file does not.
        _leave_free(small_disk, live // 2 if phase == "copy" else live + live // 4)

        with pytest.raises(BackupError) as caught:
            plugin.backups.create("scheduled")
        message = str(caught.value)
        assert f"no space left in {small_disk}" in message
        assert "existing backups are untouched" in message
        assert "Free some space" in message
        assert listing(small_disk) == sorted(
            [*STATE_FILES, "filler", good.name, good.name + ".manifest.json"]
        )  # the partial file is gone, the good backup stays
        assert [b.name for b in plugin.backups.list()] == [good.name]
        assert plugin.backups.stats().last_failure is not None
        if phase == "copy":  # no room for a safety backup: a restore stops before the swap
            before = fingerprint(_database(plugin))
            with pytest.raises(BackupError, match="restore stopped before touching the live"):
                plugin.restore(good.name)
            assert fingerprint(_database(plugin)) == before
        (small_disk / "filler").unlink()
        assert plugin.backups.verify(good.name)[0].ok
        assert plugin.backups.create("scheduled").name != good.name  # room again: it works
    finally:
        plugin.close()


async def test_scheduled_backup_runs_through_the_job_queue_and_retries_when_busy(
    sqlite_url: str,
    make_settings: SettingsFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from dbkeeper.plugins.database import plugin as plugin_module
    from tests.support.hosts import free_port, running_host

    monkeypatch.setattr(plugin_module, "BACKUP_RETRY_SECONDS", 0.2)
    settings = make_settings(
        sqlite_url,
        backup={"interval_seconds": 3600, "on_shutdown": False},
        health={"http_port": free_port()},
    )
    # The newest backup is two hours old: the first scheduled one is due at once (1 s).
    earlier = SkippingClock()
    earlier.offset = -timedelta(hours=2)
    old = open_plugin(settings, earlier)
    old.backups.create("manual")
    old.close()

    async with running_host(settings, job_queue=True) as (_host, plugin):
        inside, release = threading.Event(), threading.Event()

        def hold(phase: str, done: int, total: int | None) -> None:
            if phase == "snapshot":
                inside.set()
                release.wait(20)

        with caplog.at_level(logging.INFO, logger="dbkeeper.database"):
            manual = asyncio.create_task(plugin.backup_now("manual", progress=hold))
            assert await asyncio.to_thread(inside.wait, 20)
            deadline = time.monotonic() + 20
            while "scheduled backup postponed" not in caplog.text:  # it came while busy
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            release.set()
            await manual
            while not any(b.reason == "scheduled" for b in plugin.backups.list()):
                assert time.monotonic() < deadline  # ... and was retried soon after
                await asyncio.sleep(0.02)
    reasons = sorted(b.reason for b in plugin.backups.list())
    assert reasons == ["manual", "manual", "scheduled"]


def test_pg_bin_dir_must_be_a_directory(tmp_path: Path) -> None:
    from dbkeeper.config import ConfigError, settings_from_mapping

    missing = tmp_path / "no-such-dir"
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"backup": {"pg_bin_dir": str(missing)}}, environ={})
    assert str(caught.value) == (
        f'configuration: [backup] pg_bin_dir = "{missing}": must be empty or an existing directory'
    )
    settings = settings_from_mapping({"backup": {"pg_bin_dir": str(tmp_path)}}, environ={})
    assert settings.backup.pg_bin_dir == str(tmp_path)


@pytest.mark.parametrize("old_reader", [False, True])
def test_copy_takes_the_file_or_the_backup_api_and_both_hold_the_snapshot(
    plugin_factory, tmp_path: Path, caplog: pytest.LogCaptureFixture, old_reader: bool
) -> None:
    """Usually the database file is copied in the kernel; a reader pinning WAL frames that are
    not checkpointed yet makes the copy fall back to the backup API. Both copy every row."""
    import sqlite3

    plugin = plugin_factory(compression="none")
    add_users(plugin, 500, text_size=100)
    reader = sqlite3.connect(_database(plugin), isolation_level=None)
    try:
        if old_reader:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM users").fetchone()  # pins today's snapshot
            add_users(plugin, 300, start=10_000, text_size=100)  # frames it cannot see
        with caplog.at_level(logging.DEBUG, logger="dbkeeper.backup"):
            info = plugin.backups.create("manual")
    finally:
        reader.close()
    expected = "copying with the backup API" if old_reader else "copying the database file"
    assert expected in caplog.text
    assert info.tables["users"] == (800 if old_reader else 500)
    assert (
        len(sqlite_user_ids(decompressed(info.path, tmp_path / "copy.db"))) == info.tables["users"]
    )
