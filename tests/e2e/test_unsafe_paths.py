"""Links and foreign directories where dbkeeper writes: refused with one line, nothing written.

Every lock and state file is opened without following a link and never truncated through a
path; the directories dbkeeper writes into (the backup directory, the SQLite database's) must
belong to this user (or root) and not be writable by everyone. Each case runs the real command
line against real files and checks that the database stayed byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from dbkeeper.config import settings_from_mapping
from dbkeeper.plugins.database.backup.store import BackupStore
from dbkeeper.plugins.database.locks import UnsafePath, open_private
from tests.support.backups import add_users, listing, open_plugin, user_ids
from tests.support.hosts import free_port
from tests.support.process import BotProcess, run_cli, write_config

pytestmark = pytest.mark.timeout(120)
NOBODY = 65534


def _workdir(tmp_path: Path) -> Path:
    """config.toml and a migrated database with 10 users in data/, backups in backups/."""
    sections = {
        "database": {"url": f"sqlite:///{tmp_path / 'data' / 'bot.db'}"},
        "backup": {"dir": str(tmp_path / "backups")},
        "health": {"http_port": free_port()},  # `run` beside other tests
    }
    write_config(tmp_path / "config.toml", sections)
    plugin = open_plugin(settings_from_mapping(sections, environ={}))
    add_users(plugin, 10)
    plugin.close()
    return tmp_path


def _database(workdir: Path) -> Path:
    return workdir / "data" / "bot.db"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _refused_in_one_line(code: int, output: str, *expected: str) -> str:
    """Exit status 1, no traceback, one error line that says what and where."""
    assert code == 1, output
    assert "Traceback" not in output, output
    errors = [
        line
        for line in output.splitlines()
        if line.startswith("dbkeeper: error:") or "ERROR dbkeeper.lifecycle: startup failed" in line
    ]
    assert len(errors) == 1, output
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


# -- every lock, planted as a symbolic link to the live database --------------------------------


def test_backup_lock_linked_to_the_database_is_refused(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path)
    database, backups = _database(workdir), workdir / "backups"
    backups.mkdir(mode=0o700)
    (backups / ".dbkeeper-backup.lock").symlink_to(database)
    before = _digest(database)

    code, output = run_cli(["backup", "create"], cwd=workdir)

    _refused_in_one_line(code, output, ".dbkeeper-backup.lock is a symbolic link", "Remove it")
    assert _digest(database) == before  # it was cut to 0 bytes before
    assert not any(name.startswith("bot-db-") for name in listing(backups))
    code, listed = run_cli(["backup", "list"], cwd=workdir)
    assert code == 0 and "last failure: " in listed and "is a symbolic link" in listed


def test_backup_lock_hard_linked_to_the_database_is_refused(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path)
    database, backups = _database(workdir), workdir / "backups"
    backups.mkdir(mode=0o700)
    os.link(database, backups / ".dbkeeper-backup.lock")  # same file system: a second name
    before = _digest(database)

    code, output = run_cli(["backup", "create"], cwd=workdir)

    _refused_in_one_line(code, output, "has 2 names")
    assert _digest(database) == before


@pytest.mark.parametrize("command", [["db", "migrate"], ["run"]])
def test_migration_lock_linked_to_the_database_is_refused(
    tmp_path: Path, command: list[str]
) -> None:
    workdir = _workdir(tmp_path)
    database = _database(workdir)
    database.with_name("bot.db.migrate.lock").unlink(missing_ok=True)
    database.with_name("bot.db.migrate.lock").symlink_to(database)
    before = _digest(database)

    code, output = run_cli(command, cwd=workdir)

    _refused_in_one_line(code, output, "bot.db.migrate.lock is a symbolic link")
    assert _digest(database) == before


def test_leader_lock_linked_to_the_database_stops_the_start(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path)
    database = _database(workdir)
    database.with_name("bot.db.leader.lock").symlink_to(database)
    before = _digest(database)

    code, output = run_cli(["run"], cwd=workdir)

    _refused_in_one_line(code, output, "bot.db.leader.lock is a symbolic link")
    assert "dbkeeper is running" not in output
    assert _digest(database) == before


def test_in_use_lock_linked_to_the_database_is_refused_by_run_and_restore(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path)
    database = _database(workdir)
    code, output = run_cli(["backup", "create"], cwd=workdir)
    assert code == 0, output
    name = next(n for n in listing(workdir / "backups") if n.endswith(".db"))
    database.with_name("bot.db.inuse.lock").symlink_to(database)
    before = _digest(database)

    code, output = run_cli(["backup", "restore", name, "--yes"], cwd=workdir)
    _refused_in_one_line(code, output, "bot.db.inuse.lock is a symbolic link")
    assert _digest(database) == before

    code, output = run_cli(["run"], cwd=workdir)
    _refused_in_one_line(code, output, "bot.db.inuse.lock is a symbolic link")
    assert _digest(database) == before


def test_a_running_bot_never_writes_through_a_lock_planted_while_it_runs(tmp_path: Path) -> None:
    """The locks a running bot takes later (the backup lock, for each backup) are opened
    anew each time: a link planted after the start is refused too, and alerted."""
    workdir = _workdir(tmp_path)
    write_config(
        workdir / "config.toml",
        {
            "database": {"url": f"sqlite:///{_database(workdir)}"},
            "backup": {"dir": str(workdir / "backups"), "interval_seconds": 1},
            "health": {"http_port": free_port()},
        },
    )
    database, backups = _database(workdir), workdir / "backups"
    with BotProcess(["run"], cwd=workdir) as bot:
        bot.wait_for_line("(scheduled): ")
        lock = backups / ".dbkeeper-backup.lock"
        lock.unlink()
        lock.symlink_to(database)
        bot.wait_for_line(lambda line: "ALERT" in line and "is a symbolic link" in line)
        lock.unlink()  # the operator removes it: the next backups run again
        count = bot.output.count("(scheduled): ")
        bot.wait_for_line(lambda line: bot.output.count("(scheduled): ") > count)
        assert bot.stop(signal.SIGTERM) == 0
    assert "Traceback" not in bot.output
    assert user_ids(f"sqlite:///{database}") == list(range(1, 11))  # whole, with its rows


# -- state files: manifests, temporary files, the failure record --------------------------------


def test_state_files_are_never_written_through_a_link(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path)
    database, backups = _database(workdir), workdir / "backups"
    backups.mkdir(mode=0o700)
    # The failure records, planted as links to a precious file, and a backup that fails.
    precious = tmp_path / "precious.db"
    precious.write_bytes(database.read_bytes())
    (backups / ".dbkeeper-last-failure.json").symlink_to(precious)
    database.with_name("bot.db.backup-failure.json").symlink_to(precious)
    healthy = database.read_bytes()
    with database.open("r+b") as handle:  # a damaged database: its backup fails verification
        handle.seek(-8192, os.SEEK_END)
        handle.write(b"\x5a" * 8192)
    code, output = run_cli(["backup", "create"], cwd=workdir)
    assert code == 1 and "failed verification" in output and "Traceback" not in output
    assert "could not record the backup failure" in output
    assert precious.read_bytes() == healthy  # never written through the links
    database.write_bytes(healthy)
    # A manifest planted as a link is never read through, nor trusted: the backup is damaged.
    (backups / ".dbkeeper-last-failure.json").unlink()
    code, output = run_cli(["backup", "create"], cwd=workdir)
    assert code == 0, output
    name = next(n for n in listing(backups) if n.startswith("bot-db-") and n.endswith(".db"))
    manifest = backups / (name + ".manifest.json")
    manifest.unlink()
    manifest.symlink_to(database)
    before = _digest(database)
    code, listed = run_cli(["backup", "list"], cwd=workdir)
    assert code == 0 and "no backups in" in listed
    assert f"DAMAGED    {name}: its manifest {manifest.name} cannot be read (a symbolic link)" in (
        listed
    )
    assert _digest(database) == before
    # Temporary files are created new (O_EXCL): an existing name, a link, is never reused.
    store = BackupStore(backups)
    planted = store.temp("x")
    planted.symlink_to(database)
    with pytest.raises(FileExistsError):
        open_private(planted, new=True)
    with pytest.raises(UnsafePath, match="is a symbolic link"):
        open_private(planted)
    assert _digest(database) == before


# -- the directories dbkeeper writes into ------------------------------------------------------

Spoil = Callable[[Path], None]
SPOILS: dict[str, tuple[Spoil, str]] = {
    "writable by everyone": (lambda path: path.chmod(0o777), "is writable by every user"),
    "owned by another user": (
        lambda path: os.chown(path, NOBODY, NOBODY),
        f"belongs to another user (uid {NOBODY})",
    ),
}


@pytest.mark.parametrize("spoil", SPOILS)
def test_an_unsafe_backup_directory_is_refused(tmp_path: Path, spoil: str) -> None:
    workdir = _workdir(tmp_path)
    backups = workdir / "backups"
    backups.mkdir(mode=0o700)
    change, expected = SPOILS[spoil]
    change(backups)
    before = _digest(_database(workdir))

    code, output = run_cli(["backup", "create"], cwd=workdir)

    _refused_in_one_line(code, output, f"the backup directory {backups} {expected}")
    assert listing(backups) == []  # nothing written there, not even the lock
    assert _digest(_database(workdir)) == before
    code, listed = run_cli(["backup", "list"], cwd=workdir)  # recorded beside the database
    assert code == 0 and "last failure: " in listed and expected in listed


@pytest.mark.parametrize("spoil", SPOILS)
@pytest.mark.parametrize("command", [["run"], ["db", "migrate"], ["backup", "create"]])
def test_an_unsafe_database_directory_is_refused(
    tmp_path: Path, spoil: str, command: list[str]
) -> None:
    workdir = _workdir(tmp_path)
    data = workdir / "data"
    change, expected = SPOILS[spoil]
    change(data)
    before, files = _digest(_database(workdir)), listing(data)

    code, output = run_cli(command, cwd=workdir)

    _refused_in_one_line(code, output, f"{data} {expected}")
    assert listing(data) == files and _digest(_database(workdir)) == before


def test_a_backup_name_planted_as_a_link_is_never_read_through(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path)
    backups = workdir / "backups"
    backups.mkdir(mode=0o700)
    planted = backups / "bot-db-2001-01-01_00-00-00.db"
    planted.symlink_to(_database(workdir))
    before = _digest(_database(workdir))

    code, output = run_cli(["backup", "restore", planted.name, "--yes"], cwd=workdir)
    _refused_in_one_line(code, output, "is not a regular file (a link?)")
    code, listed = run_cli(["backup", "list"], cwd=workdir)
    assert code == 0 and "no backups in" in listed
    assert f"DAMAGED    {planted.name}: is not a regular file" in listed
    assert _digest(_database(workdir)) == before
