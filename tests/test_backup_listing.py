"""Listings never trust a manifest alone: damaged, foreign, future-dated and unreadable entries
are shown as such and never counted (health, /dbstats, metrics) or rotated in place of good
ones; a manifest that does not parse makes its backup unusable, never a backup without one."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from dbkeeper.config import settings_from_mapping
from dbkeeper.health import Status
from dbkeeper.plugins.database.backup.manifest import Backup, manifest_path
from dbkeeper.plugins.database.commands import format_dbstats
from dbkeeper.plugins.database.errors import InvalidBackup
from dbkeeper.plugins.database.health.checks import DatabaseHealth
from dbkeeper.plugins.database.operations import Operations
from tests.conftest import SettingsFactory
from tests.support.backups import SkippingClock, add_users, fingerprint, open_plugin, user_ids
from tests.support.process import run_cli, write_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def clock() -> SkippingClock:
    return SkippingClock()


@pytest.fixture
def ops(
    sqlite_url: str, make_settings: SettingsFactory, clock: SkippingClock
) -> Iterator[Operations]:
    settings = make_settings(
        sqlite_url, backup={"compression": "gzip", "compress_min_bytes": 0, "keep": 3}
    )
    opened = open_plugin(settings, clock)
    add_users(opened, 50)
    yield opened
    opened.close()


def _health(ops: Operations) -> DatabaseHealth:
    return DatabaseHealth(
        ops.database,
        ops.migrator,
        ops.backups,
        ops.settings.health,
        ops.backup_settings,
        background_scans=False,
    )


def _names(backups: list[Backup]) -> list[str]:
    return [backup.name for backup in backups]


def _truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _zero(path: Path) -> None:
    os.truncate(path, 0)


def _foreign_database(path: Path) -> None:
    """Another application's SQLite database in place of the backup, as large as it was."""
    other = path.with_name("other-app.sqlite")
    connection = sqlite3.connect(other)
    connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    connection.execute("INSERT INTO notes (body) VALUES ('not a bot database')")
    connection.commit()
    connection.close()
    data = other.read_bytes()
    other.unlink()
    size = path.stat().st_size
    path.write_bytes((data + b"\0" * size)[:size])


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "half-truncated": (_truncate_half, "bytes but its manifest says"),
    "zero bytes": (_zero, "is empty (0 bytes)"),
    "another application's database": (_foreign_database, "does not start as a gzip file"),
}


@pytest.mark.parametrize("damage", DAMAGE)
async def test_a_damaged_backup_is_listed_as_damaged_and_never_counted(
    ops: Operations, damage: str
) -> None:
    first, second, third = (ops.backups.create("scheduled") for _ in range(3))
    spoil, expected = DAMAGE[damage]
    spoil(second.path)

    listing = ops.backups.scan()
    assert _names(listing.backups) == [third.name, first.name]
    [entry] = listing.damaged
    assert entry.name == second.name and entry.label == "DAMAGED" and expected in entry.problem
    stats = ops.backups.stats()
    assert stats.count == 2 and stats.damaged == 1
    assert stats.total_bytes == first.size_bytes + third.size_bytes
    outcome = await _health(ops).check_backups()
    assert outcome.status == Status.DEGRADED
    assert outcome.message.startswith("2 backups | ")
    assert "1 damaged file not counted" in outcome.message
    assert outcome.values["count"] == 2  # what /metrics exports as dbkeeper_backups
    assert "damaged backup file not counted" in format_dbstats_of(ops)
    # Rotation (keep 3) counts only sound backups: the damaged one never stands in for a
    # good one, and is left for the operator to look at.
    fourth = ops.backups.create("scheduled")
    assert _names(ops.backups.list()) == [fourth.name, third.name, first.name]
    assert second.path.exists()
    # Verifying everything names it with what is wrong.
    results = {result.name: result for result in ops.backups.verify()}
    assert not results[second.name].ok and results[first.name].ok


def format_dbstats_of(ops: Operations) -> str:
    """/dbstats renders the same ``BackupStats``; its database part is not what is tested."""
    from tests.test_commands import _statistics

    return format_dbstats(_statistics({}), ops.backups.stats(), ops.database.display_url)


async def test_a_manifest_dated_9999_is_flagged_and_does_not_hide_stale_backups(
    ops: Operations, clock: SkippingClock
) -> None:
    clock.offset = -timedelta(days=3)
    old = ops.backups.create("scheduled")
    forged = ops.backups.create("scheduled")
    clock.offset = timedelta()
    data = json.loads(manifest_path(forged.path).read_text())
    data["created_at"] = "9999-12-31T23:59:59+00:00"
    manifest_path(forged.path).write_text(json.dumps(data))

    listing = ops.backups.scan()
    assert _names(listing.backups) == [old.name]
    [entry] = listing.damaged
    assert "is dated in the future (9999-12-31 23:59:59 UTC)" in entry.problem
    stats = ops.backups.stats()
    assert stats.newest is not None and stats.newest.name == old.name
    outcome = await _health(ops).check_backups()
    assert outcome.status == Status.DEGRADED
    assert "the newest is 3d 0h old" in outcome.message, outcome.message
    # A time that disagrees with the name is not trusted either.
    data["created_at"] = "2001-01-01T00:00:00+00:00"
    manifest_path(forged.path).write_text(json.dumps(data))
    [entry] = ops.backups.scan().damaged
    assert "is not the time in its name" in entry.problem


MALFORMED = {
    "tables not a mapping": {"tables": "users"},
    "a count that is text": {"size_bytes": "12"},
    "a time that is a number": {"created_at": 5},
    "a time past year 9999 in UTC": {"created_at": "9999-12-31T23:59:59-01:00"},
    "a field missing": {"sha256": None},
    "nested garbage": {"phases": {"snapshot": [1, 2]}},
}


@pytest.mark.parametrize("case", MALFORMED)
def test_one_malformed_manifest_never_crashes_backup_list(tmp_path: Path, case: str) -> None:
    url = f"sqlite:///{tmp_path / 'data' / 'bot.db'}"
    sections = {"database": {"url": url}, "backup": {"dir": str(tmp_path / "backups")}}
    write_config(tmp_path / "config.toml", sections)
    ops = open_plugin(settings_from_mapping(sections, environ={}), SkippingClock())
    try:
        good, bad = ops.backups.create("manual"), ops.backups.create("manual")
    finally:
        ops.close()
    data = json.loads(manifest_path(bad.path).read_text())
    for key, value in MALFORMED[case].items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    manifest_path(bad.path).write_text(json.dumps(data))

    code, output = run_cli(["backup", "list"], cwd=tmp_path)

    assert code == 0 and "Traceback" not in output, output
    assert f"\n{good.name} " in "\n" + output and "1 backup, " in output
    assert f"DAMAGED    {bad.name}: its manifest {bad.name}.manifest.json cannot be read" in output
    code, output = run_cli(["health"], cwd=tmp_path)
    assert "Traceback" not in output and "1 backup |" in output, output


def test_an_unparsable_manifest_makes_its_backup_unusable_never_unchecked(
    sqlite_url: str, make_settings: SettingsFactory, clock: SkippingClock
) -> None:
    ops = open_plugin(make_settings(sqlite_url, backup={"compression": "none"}), clock)
    add_users(ops, 50)
    backup = ops.backups.create("manual")
    data = backup.path.read_bytes()  # a change only the checksum can see (a name, not a page)
    assert data.count(b"user 17") == 1
    backup.path.write_bytes(data.replace(b"user 17", b"user 71"))
    manifest_path(backup.path).write_text('{"format": 1, "name": ')  # and a broken manifest
    add_users(ops, 5, start=51)
    ops.close()
    live = Path(sqlite_url.removeprefix("sqlite:///"))
    before = fingerprint(live)

    with pytest.raises(InvalidBackup) as caught:
        ops.restore(backup.name)

    message = str(caught.value)
    assert "cannot be read (not JSON" in message and "checksum cannot be compared" in message
    assert "Nothing was changed" in message
    assert fingerprint(live) == before
    assert user_ids(sqlite_url) == list(range(1, 56))
    [entry] = ops.backups.scan().damaged
    assert "not usable until `dbkeeper backup verify` passes" in entry.problem
    [result] = ops.backups.verify(backup.name)
    assert not result.ok and "cannot be read" in (result.problem or "")
    assert ops.backups.stats().count == 0


def test_a_foreign_file_without_manifest_is_shown_unverified_and_refused(
    ops: Operations, sqlite_url: str
) -> None:
    good = ops.backups.create("manual")
    foreign = good.path.with_name("bot-db-2001-01-01_00-00-00.db")
    _foreign = sqlite3.connect(foreign)
    _foreign.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY)")
    _foreign.commit()
    _foreign.close()

    listing = ops.backups.scan()
    assert _names(listing.backups) == [good.name]
    [entry] = listing.damaged
    assert entry.label == "UNVERIFIED" and "has no manifest" in entry.problem
    assert ops.backups.stats().count == 1
    ops.close()
    live = Path(sqlite_url.removeprefix("sqlite:///"))
    before = fingerprint(live)
    with pytest.raises(InvalidBackup, match="is not a backup of this bot's database"):
        ops.restore(foreign.name)
    assert fingerprint(live) == before
