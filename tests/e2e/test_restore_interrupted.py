"""A restore killed at its most dangerous moment, and what the next commands do about it.

The restore runs as a real ``dbkeeper backup restore`` process, held at a gate just before the
rename that puts the backup in place (``os.replace`` onto the live file, wrapped by the test),
then killed with SIGKILL. There must be a database file at that instant: before, the live
database had been moved away first, so the next start created and served an empty one.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbkeeper.config import settings_from_mapping
from tests.support.backups import add_users, listing, open_plugin, user_ids
from tests.support.hosts import free_port
from tests.support.process import BotProcess, run_cli, start_at_gate, write_config

pytestmark = pytest.mark.timeout(120)

# ``dbkeeper ARGS`` that stops (forever) right before any rename onto the live database file.
GATED = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path

    live = Path(sys.argv[1]).resolve()
    real_replace = os.replace

    def gated(source, target, *args, **kwargs):
        if Path(target).resolve() == live:
            print("GATE: about to rename", source, "onto the live database", flush=True)
            time.sleep(3600)
        return real_replace(source, target, *args, **kwargs)

    os.replace = gated
    from dbkeeper.cli import main

    main(sys.argv[2:])
    """
)


def _workdir(tmp_path: Path) -> Path:
    sections = {
        "database": {"url": f"sqlite:///{tmp_path / 'data' / 'bot.db'}"},
        "backup": {"dir": str(tmp_path / "backups"), "compress_min_bytes": 0},
        "health": {"http_port": free_port()},  # `run` beside other tests
    }
    write_config(tmp_path / "config.toml", sections)
    plugin = open_plugin(settings_from_mapping(sections, environ={}))
    add_users(plugin, 300, text_size=300)
    plugin.close()
    return tmp_path


def _damage(database: Path) -> bytes:
    """Overwrite the last 8 KiB: the live database fails its integrity check."""
    with database.open("r+b") as handle:
        handle.seek(-8192, os.SEEK_END)
        handle.write(b"\x5a" * 8192)
    return database.read_bytes()


def _staging(data: Path) -> list[str]:
    return [name for name in listing(data) if name.startswith(".dbkeeper-tmp-restore-")]


@pytest.fixture
def gated_restore(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A workdir with a backup of 300 users, 5 more users since, and the live file damaged."""
    workdir = _workdir(tmp_path)
    code, output = run_cli(["backup", "create"], cwd=workdir)
    assert code == 0, output
    name = next(n for n in listing(workdir / "backups") if n.endswith(".db.gz"))
    yield workdir, name


def test_a_restore_killed_before_the_swap_leaves_the_database_in_place(
    gated_restore: tuple[Path, str],
) -> None:
    workdir, name = gated_restore
    database, data, backups = workdir / "data" / "bot.db", workdir / "data", workdir / "backups"
    damaged = _damage(database)
    args = [str(database), "backup", "restore", name, "--yes"]
    restore = start_at_gate(GATED, args, workdir, "its swap")
    try:
        # The dangerous moment: the verified copy is staged, the damaged database kept apart
        # (a second name in the backup directory; checked, and set aside, after the swap).
        [kept] = [n for n in listing(backups) if n.startswith(".dbkeeper-kept-")]
        [staged] = _staging(data)
        # Another command meanwhile cleans up, but never the files of a running restore.
        code, output = run_cli(["backup", "list"], cwd=workdir)
        assert code == 0 and _staging(data) == [staged], output
        restore.send_signal(signal.SIGKILL)
        restore.wait(10)
    finally:
        restore.kill()
        restore.wait()

    assert database.is_file(), "no database file after the kill"
    assert database.read_bytes() == damaged  # the old database, in place and whole
    assert (backups / kept).read_bytes() == damaged  # and kept apart
    # The next command cleans up: the staging copy, and the second name of the live file
    # (the restore did not happen, so nothing is set aside: it is as before it started).
    code, output = run_cli(["backup", "list"], cwd=workdir)
    assert code == 0 and _staging(data) == [] and not (backups / kept).exists(), output
    assert database.read_bytes() == damaged and database.stat().st_nlink == 1
    # Doing it again finishes the job.
    code, output = run_cli(["backup", "restore", name, "--yes"], cwd=workdir)
    assert code == 0, output
    assert user_ids(f"sqlite:///{database}") == list(range(1, 301))
    [aside] = [n for n in listing(data) if n.startswith("bot.db.damaged-")]
    assert (data / aside).read_bytes() == damaged  # the damaged one, kept beside it


def _interrupted(workdir: Path, how: str) -> Path:
    """The state an interrupted restore of an older dbkeeper left: no database file, and
    beside it the database set aside or the verified copy it was about to put in place."""
    database = workdir / "data" / "bot.db"
    if how == "set aside":
        left = database.with_name("bot.db.damaged-bot-db-2026-01-31_03-00-00")
    else:
        left = database.with_name(".dbkeeper-tmp-restore-bot.db.4242-0badf00d")
    database.rename(left)
    return left


@pytest.mark.parametrize("how", ["set aside", "staged"])
@pytest.mark.parametrize("command", [["run"], ["db", "migrate"], ["backup", "list"]])
def test_no_empty_database_is_created_where_a_restore_was_interrupted(
    tmp_path: Path, how: str, command: list[str]
) -> None:
    workdir = _workdir(tmp_path)
    database = workdir / "data" / "bot.db"
    left = _interrupted(workdir, how)
    kept = left.read_bytes()

    code, output = run_cli(command, cwd=workdir)

    assert not database.exists(), output  # no empty database served in its place
    assert left.read_bytes() == kept  # what the restore left is there, untouched
    if command == ["backup", "list"]:  # reads only; cleaning up leaves it alone
        assert code == 0, output
        return
    assert code == 1 and "Traceback" not in output, output
    assert f"there is no database at {database}, but" in output
    assert f"`mv {left} {database}`" in output  # what to do
    assert "dbkeeper backup restore NAME" in output


def test_a_database_missing_after_an_interrupted_restore_can_be_restored(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path)
    code, output = run_cli(["backup", "create"], cwd=workdir)
    assert code == 0, output
    name = next(n for n in listing(workdir / "backups") if n.endswith(".db.gz"))
    _interrupted(workdir, "set aside")
    code, output = run_cli(["backup", "restore", name, "--yes"], cwd=workdir)
    assert code == 0, output
    database = workdir / "data" / "bot.db"
    assert user_ids(f"sqlite:///{database}") == list(range(1, 301))
    with BotProcess(["run"], cwd=workdir) as bot:  # and it starts again
        bot.wait_for_line("dbkeeper is running")
        assert bot.stop() == 0
    connection = sqlite3.connect(database)
    assert connection.execute("SELECT count(*) FROM users").fetchone()[0] == 300
    connection.close()
