"""pg_dump and pg_restore die with a killed ``dbkeeper`` (process group, parent-death signal).

The command runs as a real process on the real PostgreSQL service; the test holds a lock that
keeps its tool waiting inside the server, SIGKILLs the command, and checks that the tool is
gone and that nothing was done behind the dead command's back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Connection, create_engine, text

from dbkeeper.config import settings_from_mapping
from tests.support.backups import add_users, listing, open_plugin, user_ids
from tests.support.process import BotProcess, write_config

pytestmark = [pytest.mark.timeout(120), pytest.mark.postgres]
APPLICATION = "dbkeeper-backup"  # PGAPPNAME of the tools


def children(pid: int) -> dict[int, str]:
    """The processes whose parent is ``pid``: {pid: command line}."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found[int(stat.parent.name)] = cmdline
        except (OSError, IndexError, ValueError):
            continue
    return found


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaps yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_until(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def tool_sessions(admin: Connection, state: str | None = None) -> int:
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND "
    query += "application_name = :app" + (" AND wait_event_type = :state" if state else "")
    return int(admin.execute(text(query), {"app": APPLICATION, "state": state}).scalar_one())


def test_a_killed_restore_takes_its_pg_restore_with_it(tmp_path: Path, postgres_url: str) -> None:
    sections = {"database": {"url": postgres_url}, "backup": {"dir": str(tmp_path / "backups")}}
    write_config(tmp_path / "config.toml", sections)
    ops = open_plugin(settings_from_mapping(sections, environ={}))
    add_users(ops, 10)
    backup = ops.backups.create("manual")
    add_users(ops, 5, start=11)
    ops.close()

    engine = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    holder, admin = engine.connect(), engine.connect()
    try:
        # pg_restore waits for this lock inside the server (to drop the table), inside its one
        # transaction, long after it started.
        holder.execute(text("BEGIN"))
        holder.execute(text("LOCK TABLE users IN ACCESS SHARE MODE"))
        args = ["backup", "restore", backup.name, "--yes"]
        with BotProcess(args, cwd=tmp_path) as process:
            wait_until(lambda: tool_sessions(admin, "Lock"), "pg_restore waiting for the lock")
            [pid] = [p for p, line in children(process.pid).items() if "pg_restore" in line]
            process.kill()  # SIGKILL: no handler, no cleanup of its own
        wait_until(lambda: not alive(pid), "pg_restore to die with its parent", timeout=10)
        holder.execute(text("COMMIT"))  # the lock goes: an orphan would go on now
        wait_until(lambda: tool_sessions(admin) == 0, "the tool's session to end")
    finally:
        holder.close()
        admin.close()
        engine.dispose()
    # Nothing was replaced (pg_restore's transaction died with it); the backups are as they
    # were (and the restore's complete safety copy, taken before its pg_restore started).
    assert user_ids(postgres_url) == list(range(1, 16))
    names = [n for n in listing(tmp_path / "backups") if n.endswith(".dump")]
    assert names[0] == backup.name and len(names) == 2


# The same guard for every tool (pg_dump included), shown on a tool that would run for minutes.
RUN_TOOL = """
import sys, threading
from dbkeeper.config import settings_from_mapping
from dbkeeper.plugins.database.backup.engines.base import Limits
from dbkeeper.plugins.database.backup.engines.postgres import PostgresBackupEngine

settings = settings_from_mapping({"database": {"url": "postgresql+psycopg://b@127.0.0.1:1/b"}})
engine = PostgresBackupEngine(settings.database)
stop = threading.Event()
tool = ["sleep", "300"]  # like pg_dump and pg_restore (without -j): no children of its own
if sys.argv[1] == "stop":  # a failure here: the whole group goes, whatever the tool started
    tool = ["sh", "-c", "sleep 300 & sleep 301"]
    threading.Timer(1.0, stop.set).start()
try:
    engine._run(tool, Limits(None, (stop,)), failure=RuntimeError)
except Exception as error:
    print("stopped:", type(error).__name__, flush=True)
"""


def _descendants(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        found += [child, *_descendants(child)]
    return found


@pytest.mark.parametrize("how", ["parent killed", "stop"])
def test_a_tool_and_what_it_started_never_outlive_their_command(how: str) -> None:
    import subprocess
    import sys

    from tests.support.process import REPO

    parent = subprocess.Popen(
        [sys.executable, "-c", RUN_TOOL, "stop" if how == "stop" else "run"],
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        started = 3 if how == "stop" else 1
        wait_until(lambda: len(_descendants(parent.pid)) == started, "the tool")
        tools = _descendants(parent.pid)
        if how == "parent killed":
            parent.kill()
        else:
            assert parent.stdout is not None
            assert parent.stdout.readline().strip() == "stopped: Interrupted"
        wait_until(lambda: not any(alive(pid) for pid in tools), "the tools to die", timeout=5)
    finally:
        parent.kill()
        parent.wait()
