"""A backup disk that fills up or turns read-only: every failure recorded and alerted, nothing
held afterwards (the next backup in the same process, another process's, the shutdown one).

Real small file systems (``tests/support/tmpfs.py``): a tmpfs with few bytes and few inodes
fills for real, so even creating the backup lock fails with ENOSPC.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dbkeeper.config import settings_from_mapping
from tests.conftest import SettingsFactory
from tests.support.backups import add_users, listing, open_plugin
from tests.support.hosts import free_port, running_host
from tests.support.process import run_cli, write_config
from tests.support.tmpfs import mounted_tmpfs

pytestmark = pytest.mark.timeout(120)
LOCK = ".dbkeeper-backup.lock"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs with 64 inodes, only root's."""
    with mounted_tmpfs(tmp_path / "small-disk", "size=4m,nr_inodes=64,mode=0700") as mount:
        yield mount


def fill(disk: Path) -> None:
    """Use up every byte and every inode of ``disk``."""
    filler = disk / "filler"
    filler.mkdir(exist_ok=True)
    with open(filler / "bytes", "ab", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError:
            pass
    for number in range(10_000):
        try:
            (filler / f"inode-{number}").touch()
        except OSError:
            return
    raise AssertionError("the small disk never filled up")


def free(disk: Path) -> None:
    for path in (disk / "filler").iterdir():
        path.unlink()
    (disk / "filler").rmdir()


async def until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_full_disk_while_taking_the_backup_lock_holds_nothing_afterwards(
    small_disk: Path,
    sqlite_url: str,
    make_settings: SettingsFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sections = {
        "backup": {"dir": str(small_disk), "interval_seconds": 1, "compression": "none"},
        "health": {"http_port": free_port()},
    }
    settings = make_settings(sqlite_url, **sections)
    caplog.set_level(logging.INFO)
    write_config(  # for the other processes
        tmp_path / "config.toml",
        {"database": {"url": sqlite_url}, "backup": {"dir": str(small_disk), "keep": 30}},
    )
    async with running_host(settings, job_queue=True) as (_host, plugin):
        backups = plugin.backups
        add_users(plugin.operations, 10)
        await until(lambda: any(b.reason == "scheduled" for b in backups.list()), "a backup")
        # Between two backups nobody holds the lock; without its file, taking it must create
        # it, on a disk with no byte and no inode left.
        (small_disk / LOCK).unlink()
        fill(small_disk)
        taken = len(backups.list())
        await until(lambda: backups.stats().last_failure is not None, "the failure")

        failure = backups.stats().last_failure
        assert failure is not None and failure.reason == "scheduled"
        assert f"no space left in {small_disk}" in failure.error
        await until(lambda: "ALERT" in caplog.text and "no space left" in caplog.text, "alert")
        assert "Traceback" not in caplog.text  # the job caught it: nothing escaped to PTB
        # Recorded for other processes too (the record's room was kept while there was room).
        code, listed = await asyncio.to_thread(run_cli, ["backup", "list"], cwd=tmp_path)
        assert "last failure: " in listed and "no space left" in listed, listed

        free(small_disk)
        # The next scheduled backup of this very process runs ...
        await until(lambda: len(backups.list()) > taken, "a backup after the space came back")
        # ... and another process's backup is not refused by a lock this one kept.
        for _ in range(3):  # a scheduled backup may hold it for a moment: then it says so
            code, output = await asyncio.to_thread(run_cli, ["backup", "create"], cwd=tmp_path)
            if "already running" not in output and "another process" not in output:
                break
        assert code == 0, output
    # The shutdown backup ran too.
    assert plugin.backups.list()[0].reason == "shutdown"
    assert plugin.backups.stats().last_failure is None


@pytest.fixture
def cli_workdir(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """config.toml with the database in data/ (a normal disk) and backups on ``disk/``."""
    disk = tmp_path / "disk"
    sections = {
        "database": {"url": f"sqlite:///{tmp_path / 'data' / 'bot.db'}"},
        "backup": {"dir": str(disk), "compression": "none"},
    }
    write_config(tmp_path / "config.toml", sections)
    plugin = open_plugin(settings_from_mapping(sections, environ={}))
    add_users(plugin, 10)
    plugin.close()
    yield tmp_path, disk


def _one_error_line(code: int, output: str, expected: str) -> None:
    assert code == 1, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("dbkeeper: error:")]
    assert len(errors) == 1 and expected in errors[0], output


def test_backup_create_on_a_full_disk_is_one_line_and_recorded(
    cli_workdir: tuple[Path, Path],
) -> None:
    workdir, disk = cli_workdir
    with mounted_tmpfs(disk, "size=4m,nr_inodes=64,mode=0700"):
        code, output = run_cli(["backup", "create"], cwd=workdir)
        assert code == 0, output
        fill(disk)
        code, output = run_cli(["backup", "create"], cwd=workdir)
        _one_error_line(code, output, f"no space left in {disk}")
        code, listed = run_cli(["backup", "list"], cwd=workdir)
        assert code == 0 and "1 backup, " in listed
        assert "last failure: " in listed and "(manual): " in listed and "no space left" in listed
        free(disk)
        assert not any(name.startswith(".dbkeeper-tmp-") for name in listing(disk))


def test_backup_create_on_a_read_only_disk_is_one_line_and_recorded(
    cli_workdir: tuple[Path, Path],
) -> None:
    workdir, disk = cli_workdir
    with mounted_tmpfs(disk, "ro,size=1m,mode=0700"):
        code, output = run_cli(["backup", "create"], cwd=workdir)
        _one_error_line(code, output, "is on a read-only file system")
        code, listed = run_cli(["backup", "list"], cwd=workdir)
        assert code == 0 and "no backups in" in listed
        # Nowhere to write in the backup directory: recorded beside the database instead.
        assert "last failure: " in listed and "read-only file system" in listed
    assert (workdir / "data" / "bot.db.backup-failure.json").is_file()
