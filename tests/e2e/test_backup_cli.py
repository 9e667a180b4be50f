"""Backups as an operator meets them: the CLI, a running bot, signals, a killed backup."""

from __future__ import annotations

import os
import pty
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dbkeeper.config import settings_from_mapping
from tests.support.backups import add_users, listing, open_plugin, user_ids
from tests.support.hosts import free_port
from tests.support.process import REPO, BotProcess, run_cli, write_config

pytestmark = pytest.mark.timeout(120)


def _workdir(tmp_path: Path, **backup: object) -> tuple[Path, str]:
    """A working directory with config.toml and a migrated database holding 10 users."""
    url = f"sqlite:///{tmp_path / 'data' / 'bot.db'}"
    sections = {
        "database": {"url": url, "retry_backoff_seconds": [0.1]},
        "backup": {"dir": str(tmp_path / "backups"), **backup},
        "health": {"http_port": free_port()},  # `run` beside other tests
    }
    write_config(tmp_path / "config.toml", sections)
    plugin = open_plugin(settings_from_mapping(sections, environ={}))
    add_users(plugin, 10)
    plugin.close()
    return tmp_path, url


def _backup_names(tmp_path: Path) -> list[str]:
    return [
        n for n in listing(tmp_path / "backups") if n.startswith("bot-db-") and "manifest" not in n
    ]


def test_create_list_verify_restore_from_the_command_line(tmp_path: Path) -> None:
    workdir, url = _workdir(tmp_path, compression="zstd", compress_min_bytes=0)
    code, output = run_cli(["backup", "create"], cwd=workdir)
    assert code == 0, output
    [name] = _backup_names(tmp_path)
    assert name.endswith(".db.zst")
    assert f"created {name}: " in output and ", manual, taken " in output
    # Not a terminal: plain lines per phase, no bar.
    assert "copying the database: done" in output and "compressing: done" in output
    assert "checking integrity: done" in output and "[#" not in output

    code, output = run_cli(["backup", "list"], cwd=workdir)
    assert code == 0 and f"\n{name} " in "\n" + output
    assert "1 backup, " in output and "newest " in output

    code, output = run_cli(["backup", "verify"], cwd=workdir)
    assert code == 0 and f"ok      {name}" in output

    plugin = open_plugin(settings_from_mapping({"database": {"url": url}}, environ={}))
    add_users(plugin, 5, start=11)
    plugin.close()
    with BotProcess(["backup", "restore", name], cwd=workdir) as process:
        assert process.wait() == 1  # stdin is empty: the question is answered "no"
    assert "Replace the database" in process.output and "[y/N]" in process.output
    assert user_ids(url) == list(range(1, 16))  # nothing happened

    code, output = run_cli(["backup", "restore", name, "--yes"], cwd=workdir)
    assert code == 0, output
    assert (
        f"restored {name} (schema v3)" in output and "the previous database is saved as" in output
    )
    assert user_ids(url) == list(range(1, 11))

    code, output = run_cli(["backup", "restore", "../data/bot.db", "--yes"], cwd=workdir)
    assert code == 1
    assert "dbkeeper: error: '../data/bot.db' is not a backup name" in output


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    workdir, _ = _workdir(tmp_path, compression="gzip", compress_min_bytes=0)
    leader, follower = pty.openpty()
    environment = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"}
    environment.pop("DATABASE_URL", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "dbkeeper", "backup", "create"],
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env=environment,
    )
    os.close(follower)
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process is done
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    os.close(leader)
    assert process.wait(30) == 0
    text = output.decode(errors="replace")
    assert "copying the database" in text and "compressing" in text
    assert "100%" in text and "#" in text  # click's bar, drawn on the terminal
    assert "copying the database: done" not in text  # the plain lines are for pipes


def test_the_running_bot_backs_up_on_schedule_and_at_shutdown(tmp_path: Path) -> None:
    workdir, url = _workdir(tmp_path, interval_seconds=1, keep=3, compress_min_bytes=0)
    with BotProcess(["run"], cwd=workdir) as bot:
        bot.wait_for_line("dbkeeper is running")
        line = bot.wait_for_line("(scheduled): ")
        assert "verified in" in line
        deadline = time.monotonic() + 30
        while bot.output.count("(scheduled): ") < 3:  # one a second
            assert time.monotonic() < deadline, bot.output
            time.sleep(0.05)
        # Restoring under a running bot from another process is refused, nothing changes.
        name = _backup_names(tmp_path)[-1]  # the newest: rotation takes the oldest first
        code, output = run_cli(["backup", "restore", name, "--yes"], cwd=workdir)
        assert code == 1 and "is in use by a running bot" in output
        assert user_ids(url) == list(range(1, 11))
        # A write just before the signal is in the shutdown backup.
        with sqlite3.connect(tmp_path / "data" / "bot.db", timeout=10) as connection:
            connection.execute("INSERT INTO users (id, first_name) VALUES (4242, 'last')")
        connection.close()
        started = time.monotonic()
        code = bot.stop(signal.SIGTERM)
        elapsed = time.monotonic() - started
    output = bot.output
    assert code == 0, output
    assert elapsed < 9  # within the shutdown budget (docker stop's grace is 10 s)
    assert "shutdown: taking the final backup" in output
    shutdown_line = next(line for line in output.splitlines() if "(shutdown): " in line)
    shutdown_name = shutdown_line.split("backup ", 1)[1].split(" ", 1)[0]
    assert output.rstrip().endswith("shutdown complete")
    assert output.count("(scheduled): ") >= 3 and "rotated out" in output
    code, listed = run_cli(["backup", "list"], cwd=workdir)
    rows = [line for line in listed.splitlines() if line.startswith("bot-db-")]
    assert len(rows) == 3  # keep = 3: rotation ran
    assert rows[0].startswith(shutdown_name) and " shutdown " in rows[0]
    assert rows[0].rstrip().endswith(" 11")  # the 11 users: bookkeeping rows are not counted
    assert all("scheduled" in row or "shutdown" in row for row in rows)


def test_a_killed_backup_leaves_no_backup_and_the_next_command_cleans_up(tmp_path: Path) -> None:
    workdir, url = _workdir(tmp_path, compression="gzip", compress_min_bytes=0)
    plugin = open_plugin(settings_from_mapping({"database": {"url": url}}, environ={}))
    with plugin.database.connection() as connection:  # ~40 MB: gzip takes a while
        from sqlalchemy import text

        noise = os.urandom(20_000_000).hex()
        connection.execute(
            text("INSERT INTO users (id, first_name, last_name) VALUES (:id, 'n', :t)"),
            [{"id": 1000 + i, "t": noise[i * 40_000 : (i + 1) * 40_000]} for i in range(1000)],
        )
    plugin.close()
    backups = tmp_path / "backups"
    with BotProcess(["backup", "create"], cwd=workdir) as process:
        deadline = time.monotonic() + 30
        while not any(n.startswith(".dbkeeper-tmp-") for n in listing(backups)):
            assert time.monotonic() < deadline and process.process.poll() is None
            time.sleep(0.005)
        process.kill()  # SIGKILL in the middle of the backup
    leftovers = [n for n in listing(backups) if n.startswith(".dbkeeper-tmp-")]
    assert leftovers and _backup_names(tmp_path) == []  # nothing looks like a backup

    # Any command cleans up (not only the next `dbkeeper run`).
    code, output = run_cli(["backup", "list"], cwd=workdir)
    assert code == 0 and "no backups in" in output
    assert "removed 1 leftover" in output and leftovers[0] in output
    assert not any(n.startswith(".dbkeeper-tmp-") for n in listing(backups))


def test_db_downgrade_takes_a_backup_first(tmp_path: Path) -> None:
    workdir, _ = _workdir(tmp_path)
    code, output = run_cli(["db", "downgrade", "2", "--yes"], cwd=workdir)
    assert code == 0, output
    [name] = _backup_names(tmp_path)
    assert f"backup taken before: {name}" in output
    code, listed = run_cli(["backup", "list"], cwd=workdir)
    assert " pre-downgrade " in listed and "    v3  " in listed


def test_restore_beside_a_running_bot_says_in_use_even_while_it_backs_up(tmp_path: Path) -> None:
    """The reason that lasts (a bot runs on the database) comes before the passing one (a
    backup holds the directory): never "try again when it is done", then another refusal."""
    from dbkeeper.plugins.database.locks import backup_lock

    workdir, url = _workdir(tmp_path)
    code, output = run_cli(["backup", "create"], cwd=workdir)
    assert code == 0, output
    [name] = _backup_names(tmp_path)
    with BotProcess(["run"], cwd=workdir) as bot:
        bot.wait_for_line("dbkeeper is running")
        busy = backup_lock(tmp_path / "backups")  # as while the bot takes a backup
        assert busy.try_acquire()
        try:
            code, output = run_cli(["backup", "restore", name, "--yes"], cwd=workdir)
        finally:
            busy.release()
        assert code == 1 and "Traceback" not in output, output
        assert "is in use by a running bot" in output and "try again" not in output
        assert user_ids(url) == list(range(1, 11))
        assert bot.stop() == 0
