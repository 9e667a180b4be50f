"""Which checks a SQLite backup passed: quick_check inline, the full integrity_check after.

Real files throughout: a page of the live database overwritten (quick_check fails: nothing is
listed), an index whose entries no longer match its table (quick_check passes, the full check
does not: listed, then marked damaged, alerted, shown), shutdowns and restarts of the plugin,
the command line and a running bot talking to a Telegram stand-in.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from dbkeeper.health import Status
from dbkeeper.plugin import Deadline
from dbkeeper.plugins.database import DatabasePlugin
from dbkeeper.plugins.database.backup.manifest import manifest_path
from dbkeeper.plugins.database.errors import BackupError
from dbkeeper.plugins.database.health.checks import DatabaseHealth
from dbkeeper.plugins.database.operations import Operations
from tests.conftest import SettingsFactory
from tests.support.backups import SkippingClock, add_users, listing, open_plugin
from tests.support.care import wait_until
from tests.support.hosts import free_port
from tests.support.process import BotProcess, run_cli, write_config

pytestmark = pytest.mark.timeout(90)
STATE_FILES = [".dbkeeper-backup.lock", ".dbkeeper-last-failure.json"]


def spoil_an_index(database: Path) -> None:
    """An index whose entries no longer match its table: every page and B-tree stays sound
    (``quick_check`` passes), ``integrity_check`` finds rows missing from the index."""
    connection = sqlite3.connect(database, isolation_level=None)
    try:
        connection.execute("CREATE TABLE notes (a INTEGER, b INTEGER)")
        connection.execute("CREATE INDEX notes_by_a ON notes (a)")
        connection.executemany("INSERT INTO notes VALUES (?, ?)", [(i, -i) for i in range(1, 300)])
        version = connection.execute("PRAGMA schema_version").fetchone()[0]
        connection.execute("PRAGMA writable_schema = ON")
        connection.execute(
            "UPDATE sqlite_master SET sql = 'CREATE INDEX notes_by_a ON notes (b)' "
            "WHERE name = 'notes_by_a'"
        )
        connection.execute(f"PRAGMA schema_version = {version + 1}")  # others reload it
        connection.execute("PRAGMA writable_schema = OFF")
    finally:
        connection.close()
    check = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:  # what the test relies on, on this SQLite
        assert check.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        assert check.execute("PRAGMA integrity_check").fetchall() != [("ok",)]
    finally:
        check.close()


def manifest(path: Path) -> dict[str, object]:
    return json.loads(manifest_path(path).read_text())


@pytest.fixture
def clock() -> SkippingClock:
    return SkippingClock()


@pytest.fixture
def make_ops(
    sqlite_url: str, make_settings: SettingsFactory, clock: SkippingClock
) -> Iterator[Callable[..., Operations]]:
    made: list[Operations] = []

    def make(**backup: object) -> Operations:
        opened = open_plugin(make_settings(sqlite_url, backup=backup), clock)
        made.append(opened)
        return opened

    yield make
    for opened in made:
        opened.backups.full_checks.stop()
        opened.close()


def _file(ops: Operations) -> Path:
    assert ops.database.file is not None
    return ops.database.file


def _health(ops: Operations) -> DatabaseHealth:
    return DatabaseHealth(
        ops.database,
        ops.migrator,
        ops.backups,
        ops.settings.health,
        ops.backup_settings,
        background_scans=False,
    )


# -- inline: quick_check ----------------------------------------------------------------------


def test_quick_check_catches_a_damaged_page_inline_and_nothing_is_listed(make_ops) -> None:
    ops = make_ops(compression="zstd", compress_min_bytes=0)
    add_users(ops, 300, text_size=300)
    ops.close()
    with _file(ops).open("r+b") as handle:  # the last pages: rows of users
        handle.seek(-8192, os.SEEK_END)
        handle.write(b"\xa5" * 8192)

    with pytest.raises(BackupError) as caught:
        ops.backups.create("manual")
    assert "quick_check" in str(caught.value) and "failed verification" in str(caught.value)
    assert ops.backups.list() == []
    assert listing(ops.backups.store.directory) == STATE_FILES  # no copy, no scratch left


# -- after: the full integrity_check ------------------------------------------------------------


def test_the_full_check_runs_after_listing_on_the_kept_raw_copy_and_is_recorded(
    make_ops,
) -> None:
    ops = make_ops(compression="zstd", compress_min_bytes=0)
    add_users(ops, 500, text_size=200)
    checks = ops.backups.full_checks
    checks.start()
    info = ops.backups.create("manual")

    assert info.full_check == "pending" and info.quick_check_at is not None  # as listed
    assert "quick check" in info.phases and "check" not in info.phases
    result = checks.wait_for(info.name, timeout=30)
    assert result is not None and result.full_check == "passed"
    written = manifest(info.path)
    assert written["full_check"] == "passed" and written["full_check_problem"] is None
    quick = datetime.fromisoformat(str(written["quick_check_at"]))
    full = datetime.fromisoformat(str(written["full_check_at"]))
    assert info.created_at - timedelta(seconds=1) <= quick <= full
    assert isinstance(written["phases"], dict) and "full check" in written["phases"]
    # The raw copy it was checked on is gone: the directory holds the backup alone.
    wait_until(lambda: not checks.in_use(), 30, "the kept raw copy to go")
    assert listing(info.path.parent) == sorted(
        [*STATE_FILES, info.name, info.name + ".manifest.json"]
    )
    assert ops.backups.verify(info.name)[0].ok


def test_verify_records_its_full_check_either_way(
    make_ops, caplog: pytest.LogCaptureFixture
) -> None:
    """``backup verify`` is a full check: a pending backup it finds damaged is marked so (a
    restore refuses it); a backup marked failed that passes now (the same bytes: the earlier
    failure was a read error) is no longer damaged, and the log says why."""
    ops = make_ops(compression="zstd", compress_min_bytes=0, keep=5)
    add_users(ops, 50)
    good = ops.backups.create("manual")
    spoil_an_index(_file(ops))
    bad = ops.backups.create("manual")
    assert good.full_check == bad.full_check == "pending"

    [checked] = ops.backups.verify(bad.name)
    assert not checked.ok and "missing from index" in str(checked.problem)
    assert manifest(bad.path)["full_check"] == "failed"
    listed = ops.backups.scan()
    assert [b.name for b in listed.backups] == [good.name]
    assert [d.name for d in listed.damaged] == [bad.name]

    ops.backups.store.update(replace(good, full_check="failed", full_check_problem="EIO"))
    assert sorted(d.name for d in ops.backups.scan().damaged) == sorted([bad.name, good.name])
    with caplog.at_level("WARNING"):
        assert ops.backups.verify(good.name)[0].ok
    written = manifest(good.path)
    assert written["full_check"] == "passed" and written["full_check_problem"] is None
    assert [d.name for d in ops.backups.scan().damaged] == [bad.name]
    assert "the earlier one failed (EIO) on the same bytes" in caplog.text


async def test_a_backup_failing_only_the_full_check_is_listed_then_marked_damaged(
    make_ops, caplog: pytest.LogCaptureFixture
) -> None:
    ops = make_ops(compression="zstd", compress_min_bytes=0, keep=5)
    add_users(ops, 50)
    good = ops.backups.create("scheduled")
    assert ops.backups.verify(good.name)[0].ok  # verify runs the full check: recorded
    assert manifest(good.path)["full_check"] == "passed"
    spoil_an_index(_file(ops))

    # Listed on quick_check: nothing is wrong with any page.
    bad = ops.backups.create("scheduled")
    assert [b.name for b in ops.backups.list()] == [bad.name, good.name]
    assert bad.full_check == "pending"
    failures = []
    ops.backups.full_checks.on_failure = failures.append
    ops.backups.full_checks.start()
    result = ops.backups.full_checks.wait_for(bad.name, timeout=30)

    assert result is not None and result.full_check == "failed"
    assert [f.name for f in failures] == [bad.name]  # the bot alerts through this
    written = manifest(bad.path)
    assert written["full_check"] == "failed" and written["full_check_at"]
    assert "missing from index notes_by_a" in str(written["full_check_problem"])
    assert bad.path.exists()  # never deleted
    listed = ops.backups.scan()
    assert [b.name for b in listed.backups] == [good.name]
    [damaged] = listed.damaged
    assert damaged.name == bad.name and damaged.label == "DAMAGED"
    assert "failed the full integrity check" in damaged.problem
    stats = ops.backups.stats()
    assert [b.name for b in stats.full_check_failed] == [bad.name]
    outcome = await _health(ops).check_backups()
    assert outcome.status == Status.DEGRADED
    assert f"1 backup failed the full integrity check and is marked damaged: {bad.name}" in (
        outcome.message
    )
    assert "damaged file not counted" not in outcome.message  # said once, precisely
    assert outcome.values["full_check_failed"] == 1 and outcome.values["full_check_pending"] == 0
    # verify names it too, and a restore refuses it.
    [checked] = ops.backups.verify(bad.name)
    assert not checked.ok and "missing from index" in str(checked.problem)


def test_rotation_never_removes_the_newest_fully_checked_backup(make_ops) -> None:
    ops = make_ops(compression="zstd", compress_min_bytes=0, keep=2)
    checks = ops.backups.full_checks
    checks.start()
    checked = ops.backups.create("scheduled")
    assert (result := checks.wait_for(checked.name, timeout=30)) is not None
    assert result.full_check == "passed"
    checks.stop()  # from now on every backup stays pending
    pending = [ops.backups.create("scheduled") for _ in range(3)]

    names = [b.name for b in ops.backups.list()]
    assert names == [pending[2].name, pending[1].name, checked.name]  # beyond keep = 2
    assert not pending[0].path.exists()
    assert all(b.full_check == "pending" for b in pending)
    # Once a newer one passes, the older checked one goes with the next rotation.
    assert ops.backups.verify(pending[2].name)[0].ok
    newest = ops.backups.create("scheduled")
    assert [b.name for b in ops.backups.list()] == [newest.name, pending[2].name]


def test_a_backup_preempts_a_running_full_check_which_runs_again_after(
    make_ops, caplog: pytest.LogCaptureFixture
) -> None:
    ops = make_ops(compression="none", keep=5)
    add_users(ops, 20_000, text_size=100)
    checks = ops.backups.full_checks
    first = ops.backups.create("scheduled")  # no thread yet: pending
    inside, release = threading.Event(), threading.Event()
    engine = ops.backups.engine
    real = engine.full_check

    def slow_full_check(raw, progress, limits):  # type: ignore[no-untyped-def]
        inside.set()
        while not release.is_set():  # a long check: it gives up only when told to
            limits.check()
            release.wait(0.01)
        return real(raw, progress, limits)

    engine.full_check = slow_full_check  # type: ignore[method-assign]
    with caplog.at_level("INFO", logger="dbkeeper.backup"):
        checks.start()
        assert inside.wait(30)
        second = ops.backups.create("manual", wait=False)  # not refused, not kept waiting
        assert "full check of " + first.name + " was stopped" in caplog.text
        release.set()
        assert (done := checks.wait_for(second.name, timeout=30)) is not None
        assert done.full_check == "passed"
        assert (again := checks.wait_for(first.name, timeout=30)) is not None
        assert again.full_check == "passed"


async def test_the_shutdown_backup_leaves_its_full_check_to_the_next_start(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(sqlite_url, backup={"compress_min_bytes": 0, "compression": "zstd"})
    plugin = DatabasePlugin(settings)
    await plugin.start()
    add_users(plugin.operations, 50)
    await plugin.stop(Deadline.after(9))
    [backup] = plugin.backups.list()
    assert backup.reason == "shutdown" and backup.full_check == "pending"
    assert backup.quick_check_at is not None and backup.full_check_at is None
    assert listing(backup.path.parent) == sorted(
        [*STATE_FILES, backup.name, backup.name + ".manifest.json"]
    )  # no raw copy left behind for a check that did not run

    restarted = DatabasePlugin(make_settings(sqlite_url, backup={"on_shutdown": False}))
    await restarted.start()
    try:
        checks = restarted.backups.full_checks
        result = await asyncio.to_thread(checks.wait_for, backup.name, 30)
        assert result is not None and result.full_check == "passed"
        assert manifest(backup.path)["full_check"] == "passed"
        assert restarted.backups.stats().full_check_pending == []
    finally:
        await restarted.stop(Deadline.after(9))


async def test_a_raw_shutdown_backup_is_checked_and_compressed_at_the_next_start(
    sqlite_url: str, make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dbkeeper.plugins.database.backup import pipeline

    monkeypatch.setitem(pipeline.ASSUMED_RATES, "gzip", 1.0)  # compressing never fits
    settings = make_settings(sqlite_url, backup={"compress_min_bytes": 0, "compression": "gzip"})
    plugin = DatabasePlugin(settings)
    await plugin.start()
    add_users(plugin.operations, 50)
    await plugin.stop(Deadline.after(9))
    [raw] = plugin.backups.list()
    assert (raw.pending_compression, raw.full_check) == ("gzip", "pending")

    restarted = DatabasePlugin(make_settings(sqlite_url, backup={"on_shutdown": False}))
    await restarted.start()
    try:
        assert restarted._deferred is not None
        await restarted._deferred  # the deferred compression, after or before the check
        deadline = time.monotonic() + 30
        while (packed := restarted.backups.list()[0]).full_check == "pending":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        # Neither result is lost to the other: compressed, and fully checked.
        assert packed.name == raw.name + ".gz" and packed.pending_compression is None
        assert packed.full_check == "passed" and packed.full_check_at is not None
    finally:
        await restarted.stop(Deadline.after(9))


async def test_a_full_check_pending_for_long_is_reported(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    earlier = SkippingClock()
    earlier.offset = -timedelta(hours=3)
    ops = open_plugin(make_settings(sqlite_url, backup={"interval_seconds": 86400}), earlier)
    try:
        old = ops.backups.create("scheduled")
        outcome = await _health(ops).check_backups()
    finally:
        ops.close()
    assert outcome.status == Status.DEGRADED
    assert f"is pending ({old.name} for 3h" in outcome.message
    assert outcome.values["full_check_pending"] == 1


def test_old_manifests_read_as_fully_checked(make_ops) -> None:
    ops = make_ops(compression="zstd", compress_min_bytes=0, keep=1)
    info = ops.backups.create("scheduled")
    path = manifest_path(info.path)
    data = json.loads(path.read_text())
    for key in ("quick_check_at", "full_check", "full_check_at", "full_check_problem"):
        del data[key]  # as written before these fields existed
    path.write_text(json.dumps(data))

    [old] = ops.backups.list()
    assert old.fully_checked and old.full_check_text == "passed (inline)"
    assert ops.backups.stats().newest_fully_checked == old
    # Rotation keeps it as the newest fully checked backup while the new one is pending.
    new = ops.backups.create("scheduled")
    assert [b.name for b in ops.backups.list()] == [new.name, old.name]


# -- what people see ----------------------------------------------------------------------------


def test_backup_create_and_list_on_the_command_line(tmp_path: Path) -> None:
    database = tmp_path / "data" / "bot.db"
    write_config(
        tmp_path / "config.toml",
        {
            "database": {"url": f"sqlite:///{database}"},
            "backup": {"dir": str(tmp_path / "backups"), "compress_min_bytes": 0},
        },
    )
    assert run_cli(["db", "migrate"], cwd=tmp_path)[0] == 0
    code, created = run_cli(["backup", "create"], cwd=tmp_path)
    assert code == 0, created
    assert re.search(r"full integrity check passed 20\d\d-\d\d-\d\d \d\d:\d\d UTC in", created)
    code, left = run_cli(["backup", "create", "--no-full-check"], cwd=tmp_path)
    assert code == 0, left
    assert "full integrity check pending: the running bot runs it" in left
    code, shown = run_cli(["backup", "list"], cwd=tmp_path)
    assert code == 0, shown
    header, first, second = shown.splitlines()[:3]
    assert "full check" in header
    assert re.search(r" pending +\d", first) and re.search(r" passed 20\S+ \S+ UTC +\d", second)

    spoil_an_index(database)
    code, failed = run_cli(["backup", "create"], cwd=tmp_path)
    assert code == 1 and "full integrity check FAILED" in failed, failed
    assert "missing from index notes_by_a" in failed
    code, shown = run_cli(["backup", "list"], cwd=tmp_path)
    assert re.search(r"DAMAGED +bot-db-\S+: failed the full integrity check", shown), shown


def test_a_running_bot_alerts_a_failed_full_check_and_dbstats_shows_it(tmp_path: Path) -> None:
    from tests.support.telegram_api import DEFAULT_TOKEN, TelegramAPIStandIn

    admin = 4242
    database = tmp_path / "data" / "bot.db"
    with TelegramAPIStandIn() as api:
        write_config(
            tmp_path / "config.toml",
            {
                "telegram": {
                    "token": DEFAULT_TOKEN,
                    "api_base_url": api.base_url,
                    "admin_ids": [admin],
                },
                "database": {"url": f"sqlite:///{database}"},
                "backup": {"dir": str(tmp_path / "backups"), "compress_min_bytes": 0},
                "health": {"http_port": free_port()},
            },
        )
        assert run_cli(["db", "migrate"], cwd=tmp_path)[0] == 0
        spoil_an_index(database)
        with BotProcess(["run"], cwd=tmp_path) as bot:
            bot.wait_for_line("dbkeeper is running")
            api.push_command("/backup", user_id=admin)
            answer = api.wait_for_message("✅ Backup", chat_id=admin)
            alert = api.wait_for_message("failed its full integrity check", chat_id=admin)
            api.push_command("/dbstats", user_id=admin)
            stats = api.wait_for_message("FAILED its full integrity check", chat_id=admin)
            _code, health = run_cli(["health"], cwd=tmp_path)
            assert bot.stop() == 0
    assert "Verified: quick_check ok (the full integrity check runs now" in answer["text"]
    assert "missing from index notes_by_a" in alert["text"]
    assert "marked damaged and kept" in alert["text"]
    assert "Full integrity check: no backup has passed yet" in stats["text"]
    assert "failed the full integrity check and is marked damaged" in health, health


# -- the read-back of a zstd file ---------------------------------------------------------------


def test_the_zstd_read_back_catches_a_flipped_byte_through_the_frame_checksum(
    tmp_path: Path,
) -> None:
    import zstandard

    from dbkeeper.plugins.database.backup.compression import CorruptData, compress, read_back

    source = tmp_path / "copy.db"
    source.write_bytes(os.urandom(3 << 20))  # incompressible: stored as raw blocks, so only
    packed = tmp_path / "copy.db.zst"  # the content checksum can tell a flipped byte
    content, file = compress(source, packed, "zstd")
    assert read_back(packed, "zstd") == (file, content.bytes)

    data = bytearray(packed.read_bytes())
    data[len(data) // 2] ^= 0x01
    packed.write_bytes(bytes(data))
    with pytest.raises(CorruptData, match="damaged"):
        read_back(packed, "zstd")
    # A frame without a content checksum cannot prove anything: refused.
    unchecked = tmp_path / "unchecked.zst"
    unchecked.write_bytes(zstandard.ZstdCompressor(write_checksum=False).compress(b"x" * 1000))
    with pytest.raises(CorruptData, match="no content checksum"):
        read_back(unchecked, "zstd")


async def test_a_standby_leaves_full_checks_to_the_leader_and_runs_them_once_it_leads(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    """On a shared backup directory a standby's check would hold the directory the leader's
    backups need: a standby checks nothing; once it leads, it checks what is pending."""
    from dbkeeper.plugins.database.leadership import Leadership
    from dbkeeper.plugins.database.service import DatabaseService
    from tests.support.hosts import running_host

    settings = make_settings(sqlite_url, backup={"compress_min_bytes": 0, "compression": "zstd"})
    plugin = DatabasePlugin(settings)
    await plugin.start()
    add_users(plugin.operations, 50)
    await plugin.stop(Deadline.after(9))
    [backup] = plugin.backups.list()
    assert backup.full_check == "pending"

    holder = DatabaseService(settings.database)
    holder.connect()
    leader = Leadership(holder.settings, instance="alpha:1", poll_seconds=3600)
    await leader.start()
    standby_settings = make_settings(
        sqlite_url,
        backup={"on_shutdown": False},
        health={"http_port": free_port()},
        instance={"leader_poll_seconds": 0.3},
    )
    try:
        assert leader.is_leader
        async with running_host(standby_settings) as (_host, standby):
            assert standby.leadership is not None and not standby.leadership.is_leader
            checks = standby.backups.full_checks
            assert await asyncio.to_thread(checks.wait_for, backup.name, 30) is None
            assert manifest(backup.path)["full_check"] == "pending"

            await leader.stop()  # the standby takes over, and checks what was left
            deadline = time.monotonic() + 30
            while not standby.leadership.is_leader:
                assert time.monotonic() < deadline, "the standby did not take over"
                await asyncio.sleep(0.05)
            result = await asyncio.to_thread(checks.wait_for, backup.name, 30)
            assert result is not None and result.full_check == "passed"
            assert manifest(backup.path)["full_check"] == "passed"
    finally:
        await leader.stop()
        holder.close()
