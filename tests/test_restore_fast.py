"""A restore at the limit of the machine (issue 14): the replaced SQLite file is kept by a second
name (no copy), a backup proven by its sha256 chain is not checked again, and the disk holds
at most the live file and the staging copy at once. Real files, real processes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import sqlite3
import textwrap
import time
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

import pytest
import zstandard

from dbkeeper.config import settings_from_mapping
from dbkeeper.plugin import Deadline
from dbkeeper.plugins.database import DatabasePlugin
from dbkeeper.plugins.database.backup.manifest import Backup, manifest_path, read_manifest
from dbkeeper.plugins.database.errors import InvalidBackup
from dbkeeper.plugins.database.operations import Operations
from tests.conftest import SettingsFactory
from tests.support.backups import (
    SkippingClock,
    add_users,
    decompressed,
    listing,
    open_plugin,
    user_ids,
)
from tests.support.hosts import free_port
from tests.support.process import run_cli, start_at_gate, write_config
from tests.support.tmpfs import mounted_tmpfs

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def plugin(sqlite_url: str, make_settings: SettingsFactory) -> Iterator[Operations]:
    settings = make_settings(sqlite_url, backup={"compression": "zstd", "compress_min_bytes": 0})
    opened = open_plugin(settings, SkippingClock())
    yield opened
    opened.close()


def _file(plugin: Operations) -> Path:
    assert plugin.database.file is not None
    return plugin.database.file


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checks(database: Path) -> tuple[str, str]:
    """(quick_check, integrity_check) of a database file, read without changing it."""
    connection = sqlite3.connect(f"file:{database}?immutable=1", uri=True)
    try:
        quick = connection.execute("PRAGMA quick_check").fetchone()[0]
        full = connection.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        connection.close()
    return quick, full


def _break_an_index(database: Path) -> None:
    """An index that no longer matches its table: every page and B-tree is sound (quick_check
    passes), the index's entries are another column's (integrity_check fails)."""
    connection = sqlite3.connect(database, isolation_level=None)
    try:
        connection.execute("CREATE INDEX ix_test_names ON users (first_name)")
        connection.execute("PRAGMA writable_schema = ON")
        connection.execute(
            "UPDATE sqlite_master SET sql = 'CREATE INDEX ix_test_names ON users (last_name)' "
            "WHERE name = 'ix_test_names'"
        )
    finally:
        connection.close()
    quick, full = _checks(database)
    assert quick == "ok" and full != "ok", (quick, full)


def _fields(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def _rewritten(backup: Backup, content: Path) -> Backup:
    """``backup``'s file replaced by ``content`` compressed, and its manifest by one that
    matches it: sha256 of file and content, as a backup taken and fully checked would have
    (``full_check`` passed, where manifests record it)."""
    data = content.read_bytes()
    packed = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)
    backup.path.write_bytes(packed)
    checked = {"full_check": "passed"} if "full_check" in _fields(Backup) else {}
    record = replace(
        backup,
        size_bytes=len(packed),
        sha256=hashlib.sha256(packed).hexdigest(),
        content_bytes=len(data),
        content_sha256=hashlib.sha256(data).hexdigest(),
        **checked,
    )
    manifest_path(backup.path).write_text(record.to_json())
    return record


# -- the replaced database is kept as it is ------------------------------------------------------


def test_the_replaced_file_itself_is_the_pre_restore_backup_listed_and_compressed_later(
    plugin: Operations, sqlite_url: str
) -> None:
    add_users(plugin, 10)
    backup = plugin.backups.create("manual")
    add_users(plugin, 5, start=11)
    live = _file(plugin)
    inode = live.stat().st_ino

    report = plugin.restore(backup.name)

    assert user_ids(sqlite_url) == list(range(1, 11))
    kept = report.safety
    assert kept is not None and kept.reason == "pre-restore"
    assert kept.path.stat().st_ino == inode  # the old file itself: not one byte copied
    assert kept.path.stat().st_nlink == 1 and live.stat().st_ino != inode
    assert kept.name.endswith(".db") and kept.compression == "none"
    assert kept.pending_compression == "zstd" and kept.tables["users"] == 15
    assert kept.sha256 == kept.content_sha256 == _sha256(kept.path)
    assert kept.path.parent == plugin.backups.store.directory
    assert [(b.name, b.reason) for b in plugin.backups.list()] == [
        (kept.name, "pre-restore"),
        (backup.name, "manual"),
    ]
    assert not [n for n in listing(live.parent) if n.startswith(".dbkeeper-tmp-")]

    [compressed] = plugin.backups.compress_pending()  # later, as the next start does

    assert compressed.name == kept.name + ".zst" and compressed.pending_compression is None
    assert compressed.content_sha256 == kept.sha256
    assert not kept.path.exists()
    assert [b.name for b in plugin.backups.list()] == [compressed.name, backup.name]
    undo = plugin.restore(compressed.name)  # and the restore can be undone
    assert user_ids(sqlite_url) == list(range(1, 16))
    assert undo.safety is not None and undo.safety.tables["users"] == 10


def test_a_backup_directory_on_another_file_system_gets_a_verified_copy_and_says_so(
    tmp_path: Path,
    sqlite_url: str,
    make_settings: SettingsFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with mounted_tmpfs(tmp_path / "elsewhere", "size=64m") as elsewhere:
        settings = make_settings(
            sqlite_url,
            backup={
                "dir": str(elsewhere / "backups"),
                "compression": "zstd",
                "compress_min_bytes": 0,
            },
        )
        plugin = open_plugin(settings, SkippingClock())
        try:
            add_users(plugin, 10)
            backup = plugin.backups.create("manual")
            add_users(plugin, 5, start=11)
            with caplog.at_level(logging.INFO, logger="dbkeeper"):
                report = plugin.restore(backup.name)
            assert user_ids(sqlite_url) == list(range(1, 11))
            kept = report.safety
            assert kept is not None and kept.reason == "pre-restore"
            assert kept.compression == "zstd" and kept.pending_compression is None
            assert kept.tables["users"] == 15
            assert "cannot be kept by a second name" in caplog.text
            assert "taking a copy of it instead" in caplog.text
        finally:
            plugin.close()


async def test_a_running_bot_compresses_the_replaced_file_in_the_background(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        sqlite_url, backup={"on_shutdown": False, "compression": "zstd", "compress_min_bytes": 0}
    )
    plugin = DatabasePlugin(settings)
    await plugin.start()
    try:
        add_users(plugin, 10)
        backup = await plugin.backup_now("manual")
        add_users(plugin, 5, start=11)
        report = await plugin.restore(backup.name)
        assert report.safety is not None and report.safety.pending_compression == "zstd"
        compressed = report.safety.name + ".zst"
        deadline = time.monotonic() + 30
        while compressed not in [b.name for b in plugin.backups.list()]:
            assert time.monotonic() < deadline, [b.name for b in plugin.backups.list()]
            await asyncio.sleep(0.02)
        assert not report.safety.path.exists()
        assert user_ids(sqlite_url) == list(range(1, 11))
    finally:
        await plugin.stop(Deadline.after(9))


# -- a backup proven by its sha256 chain is not checked again -----------------------------------


def test_a_checked_backup_is_restored_on_its_sha256_chain_without_the_full_check(
    plugin: Operations, tmp_path: Path
) -> None:
    add_users(plugin, 50)
    backup = plugin.backups.create("manual")
    content = decompressed(backup.path, tmp_path / "content.db")
    _break_an_index(content)  # what only integrity_check sees
    _rewritten(backup, content)  # the manifest says: this content passed its checks
    add_users(plugin, 5, start=51)

    report = plugin.restore(backup.name)

    # Restored: nothing but the manifest's two sha256 stood for the content, as designed.
    assert report.name == backup.name
    assert _sha256(_file(plugin)) == _sha256(content)
    assert _checks(_file(plugin))[1] != "ok"


def test_a_backup_without_a_manifest_still_gets_the_full_check(
    plugin: Operations, tmp_path: Path
) -> None:
    add_users(plugin, 50)
    backup = plugin.backups.create("manual")
    content = decompressed(backup.path, tmp_path / "content.db")
    _break_an_index(content)
    _rewritten(backup, content)
    manifest_path(backup.path).unlink()  # copied in by hand: its own checks alone
    before = _sha256(_file(plugin))

    with pytest.raises(InvalidBackup, match="fails SQLite's integrity check"):
        plugin.restore(backup.name)

    assert _sha256(_file(plugin)) == before
    assert [b.reason for b in plugin.backups.list()] == []  # nothing kept: nothing replaced


def test_the_replaced_file_is_quick_checked_and_fully_checked_when_restored(
    plugin: Operations, sqlite_url: str
) -> None:
    add_users(plugin, 50)
    backup = plugin.backups.create("manual")
    plugin.close()
    _break_an_index(_file(plugin))  # the live database: only integrity_check sees it

    report = plugin.restore(backup.name)

    kept = report.safety  # listed (its pages and B-trees are sound), never trusted
    assert kept is not None and kept.path.exists()
    with pytest.raises(InvalidBackup, match="fails SQLite's integrity check"):
        plugin.restore(kept.name)
    assert user_ids(sqlite_url) == list(range(1, 51))


# -- never more than twice the database on disk -------------------------------------------------


def _on_disk(*directories: Path) -> int:
    """Bytes of the files in ``directories``, each file once (a second name adds nothing)."""
    seen: dict[tuple[int, int], int] = {}
    for directory in directories:
        for entry in os.scandir(directory):
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            seen[(info.st_dev, info.st_ino)] = info.st_size
    return sum(seen.values())


def test_a_restore_holds_at_most_twice_the_database_on_disk(plugin: Operations) -> None:
    add_users(plugin, 12_000, text_size=600)  # about 8 MB
    backup = plugin.backups.create("manual")
    add_users(plugin, 100, start=20_000, text_size=600)
    plugin.close()
    live = _file(plugin)
    directories = (live.parent, plugin.backups.store.directory)
    database = live.stat().st_size
    before = _on_disk(*directories)  # the live file and the backup being restored
    peak = [before]

    def sample(phase: str, done: int, total: int | None) -> None:
        peak.append(_on_disk(*directories))

    plugin.restore(backup.name, progress=sample)

    assert len(peak) > 10  # sampled all along the restore
    extra = max(peak) - before
    assert extra <= database * 1.05, (extra, database)  # the staging copy, nothing else


# -- killed during the restore ------------------------------------------------------------------

# ``dbkeeper ARGS`` that stops (forever) at the moment named by argv[1]: ``link`` right after
# the live file got its second name, ``swap`` right before the rename onto the live file,
# ``swapped`` right after it.
GATED = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path

    moment, live = sys.argv[1], Path(sys.argv[2]).resolve()
    real_replace, real_link = os.replace, os.link

    def stop_here(what):
        print("GATE:", what, flush=True)
        time.sleep(3600)

    def gated_replace(source, target, *args, **kwargs):
        onto_live = Path(target).resolve() == live
        if moment == "swap" and onto_live:
            stop_here(f"about to rename {source} onto the live database")
        real_replace(source, target, *args, **kwargs)
        if moment == "swapped" and onto_live:
            stop_here(f"renamed {source} onto the live database")

    def gated_link(source, target, *args, **kwargs):
        real_link(source, target, *args, **kwargs)
        if moment == "link" and Path(source).resolve() == live:
            stop_here(f"linked the live database as {target}")

    os.replace, os.link = gated_replace, gated_link
    from dbkeeper.cli import main

    main(sys.argv[3:])
    """
)


def _workdir(tmp_path: Path) -> Path:
    sections = {
        "database": {"url": f"sqlite:///{tmp_path / 'data' / 'bot.db'}"},
        "backup": {"dir": str(tmp_path / "backups"), "compress_min_bytes": 0},
        "health": {"http_port": free_port()},
    }
    write_config(tmp_path / "config.toml", sections)
    plugin = open_plugin(settings_from_mapping(sections, environ={}))
    add_users(plugin, 300, text_size=300)
    plugin.close()
    return tmp_path


def _with_five_more_users(tmp_path: Path) -> tuple[Path, str]:
    """A workdir with a backup of 300 users, and 5 more users since; the backup's name."""
    workdir = _workdir(tmp_path)
    code, output = run_cli(["backup", "create"], cwd=workdir)
    assert code == 0, output
    [name] = [n for n in listing(workdir / "backups") if n.endswith(".db.gz")]
    connection = sqlite3.connect(workdir / "data" / "bot.db")
    connection.executemany(
        "INSERT INTO users (id, first_name) VALUES (?, 'later')", [(i,) for i in range(301, 306)]
    )
    connection.commit()
    connection.close()
    return workdir, name


@contextlib.contextmanager
def _restore_stopped_at(moment: str, workdir: Path, name: str) -> Iterator[None]:
    """``dbkeeper backup restore NAME`` held at ``moment``; killed (SIGKILL) on leaving."""
    database = workdir / "data" / "bot.db"
    args = [moment, str(database), "backup", "restore", name, "--yes"]
    restore = start_at_gate(GATED, args, workdir, "the gate")
    try:
        yield
    finally:
        restore.send_signal(signal.SIGKILL)
        restore.wait(10)


@pytest.mark.parametrize("moment", ["link", "swap"])
def test_a_restore_killed_after_setting_the_live_file_aside_leaves_it_working(
    tmp_path: Path, moment: str
) -> None:
    workdir, name = _with_five_more_users(tmp_path)
    database, backups = workdir / "data" / "bot.db", workdir / "backups"
    with _restore_stopped_at(moment, workdir, name):
        twins = [
            n for n in listing(backups) if os.path.samefile(backups / n, database)
        ]  # the live file, by a second name in the backup directory
        assert len(twins) == 1 and database.stat().st_nlink == 2, listing(backups)
        code, output = run_cli(["backup", "list"], cwd=workdir)  # never while it runs
        assert code == 0 and (backups / twins[0]).exists(), output

    assert user_ids(f"sqlite:///{database}") == list(range(1, 306))  # in place, whole
    code, output = run_cli(["backup", "list"], cwd=workdir)  # the next command cleans up
    assert code == 0, output
    assert not (backups / twins[0]).exists() and database.stat().st_nlink == 1
    assert not [n for n in listing(backups) if n.startswith(".dbkeeper-tmp-")]
    assert name in output and "\n1 backup, " in output, output  # the twin is not listed
    with sqlite3.connect(database) as check:  # and it is a working database
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        check.execute("INSERT INTO users (id, first_name) VALUES (400, 'after')")
    # Doing it again finishes the job, and keeps what it replaced.
    code, output = run_cli(["backup", "restore", name, "--yes"], cwd=workdir)
    assert code == 0, output
    assert user_ids(f"sqlite:///{database}") == list(range(1, 301))
    kept = [n for n in listing(backups) if n.endswith(".db")]
    assert len(kept) == 1 and database.stat().st_nlink == 1


def test_a_restore_killed_right_after_its_swap_leaves_both_databases(tmp_path: Path) -> None:
    workdir, name = _with_five_more_users(tmp_path)
    database, backups = workdir / "data" / "bot.db", workdir / "backups"
    with _restore_stopped_at("swapped", workdir, name):
        pass

    assert user_ids(f"sqlite:///{database}") == list(range(1, 301))  # the backup's
    code, output = run_cli(["backup", "list"], cwd=workdir)
    assert code == 0 and "\n2 backups, " in output, output
    [kept] = [n for n in listing(backups) if n.endswith(".db")]  # the replaced one, listed
    assert kept in output and "pre-restore" in output
    assert not os.path.samefile(backups / kept, database)
    code, output = run_cli(["backup", "restore", kept, "--yes"], cwd=workdir)  # undone
    assert code == 0, output
    assert user_ids(f"sqlite:///{database}") == list(range(1, 306))


def test_the_replaced_file_is_listed_after_the_swap_and_a_kill_in_between_loses_nothing(
    tmp_path: Path,
) -> None:
    workdir, name = _with_five_more_users(tmp_path)
    database, backups = workdir / "data" / "bot.db", workdir / "backups"
    with _restore_stopped_at("swapped", workdir, name):
        # Swapped, and the replaced file is not listed yet: its sha256 and quick_check (which
        # its manifest records) come after the swap, not before it.
        [kept] = [n for n in listing(backups) if n.startswith(".dbkeeper-kept-")]
        assert not os.path.samefile(backups / kept, database)
        manifests = [n for n in listing(backups) if n.endswith(".manifest.json")]
        assert manifests == [name + ".manifest.json"], listing(backups)

    assert user_ids(f"sqlite:///{database}") == list(range(1, 301))  # the backup's
    code, output = run_cli(["backup", "list"], cwd=workdir)  # the next command lists it
    assert code == 0 and "\n2 backups, " in output, output
    listed = kept.removeprefix(".dbkeeper-kept-")
    assert listed in output and "pre-restore" in output, output
    assert not [n for n in listing(backups) if n.startswith((".dbkeeper-kept", ".dbkeeper-tmp"))]
    record = read_manifest(backups / listed)
    assert record is not None and record.reason == "pre-restore"
    assert record.full_check == "pending" and record.tables["users"] == 305
    assert _sha256(backups / listed) == record.sha256  # nothing lost: the old file, whole
    assert _checks(backups / listed) == ("ok", "ok")
    code, output = run_cli(["backup", "restore", listed, "--yes"], cwd=workdir)  # undone
    assert code == 0, output
    assert user_ids(f"sqlite:///{database}") == list(range(1, 306))
