"""Migrations across real processes: racing starts, a process killed mid-revision."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.support.process import BotProcess, write_config
from tests.support.revisions import GATED, add_revision

pytestmark = pytest.mark.timeout(180)


def _config(tmp_path: Path, url: str, scripts_dir: Path) -> Path:
    return write_config(
        tmp_path / "config.toml",
        {
            "database": {"url": url, "retry_backoff_seconds": [0.1]},
            "migrations": {"script_location": str(scripts_dir), "lock_timeout_seconds": 120},
            "backup": {"dir": str(tmp_path / "backups")},
        },
    )


def _wait_for_files(directory: Path, pattern: str, count: int, timeout: float = 60) -> list[Path]:
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(directory.glob(pattern))
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} {pattern} in {directory}, found {found}")
        time.sleep(0.02)


def _query(url: str, sql: str) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql))]
    finally:
        engine.dispose()


def test_three_processes_racing_apply_each_revision_once(
    tmp_path: Path, database_url: str, scripts_dir: Path
) -> None:
    add_revision(scripts_dir, GATED, doc="gated")
    gate = tmp_path / "gate"
    gate.mkdir()
    config = _config(tmp_path, database_url, scripts_dir)
    env = {"DBKEEPER_GATE_DIR": str(gate)}
    processes = [
        BotProcess(["--config", str(config), "db", "migrate"], cwd=tmp_path, env=env)
        for _ in range(3)
    ]
    try:
        # One process gets the lock and stops inside revision 0004; the two others wait for it.
        entered = _wait_for_files(gate, "entered-*", 1)
        holder_pid = int(entered[0].name.split("-")[1])
        waiting = [p for p in processes if p.pid != holder_pid]
        assert len(waiting) == 2
        for process in waiting:
            process.wait_for_line("another process is migrating this database")
        (gate / "release").touch()
        codes = [process.wait(60) for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert codes == [0, 0, 0], "\n\n".join(p.output for p in processes)
    assert len(list(gate.glob("entered-*"))) == 1  # revision 0004 ran in one process only
    rows = _query(
        database_url,
        "SELECT version, count(*), sum(CASE WHEN success THEN 1 ELSE 0 END) "
        "FROM schema_migrations GROUP BY version ORDER BY version",
    )
    assert rows == [("0001", 1, 1), ("0002", 1, 1), ("0003", 1, 1), ("0004", 1, 1)]
    assert _query(database_url, "SELECT count(*) FROM chats WHERE id = 4242") == [(1,)]
    assert _query(database_url, "SELECT version_num FROM alembic_version") == [("0004",)]
    outputs = [p.output for p in processes]
    assert sum("applied 0004" in output for output in outputs) == 1
    assert sum("nothing to apply" in output for output in outputs) == 2


def test_process_killed_mid_revision_leaves_previous_version_and_next_start_finishes(
    tmp_path: Path, database_url: str, scripts_dir: Path
) -> None:
    add_revision(scripts_dir, GATED, doc="gated")
    gate = tmp_path / "gate"
    gate.mkdir()
    config = _config(tmp_path, database_url, scripts_dir)
    args = ["--config", str(config), "db", "migrate"]
    with BotProcess(args, cwd=tmp_path, env={"DBKEEPER_GATE_DIR": str(gate)}) as victim:
        _wait_for_files(gate, "entered-*", 1)  # inside 0004, its row inserted, not committed
        victim.send(signal.SIGKILL)
        assert victim.wait() == -signal.SIGKILL
    assert _query(database_url, "SELECT version_num FROM alembic_version") == [("0003",)]
    assert _query(database_url, "SELECT count(*) FROM chats WHERE id = 4242") == [(0,)]
    running = _query(
        database_url, "SELECT version, attempt FROM schema_migrations WHERE success IS NULL"
    )
    assert running == [("0004", 1)]  # the attempt was visible while it ran

    with BotProcess(args, cwd=tmp_path) as again:  # no gate: 0004 runs straight through
        assert again.wait(60) == 0, again.output
        assert "was interrupted" in again.output
    assert _query(database_url, "SELECT version_num FROM alembic_version") == [("0004",)]
    assert _query(database_url, "SELECT count(*) FROM chats WHERE id = 4242") == [(1,)]
    rows = _query(
        database_url,
        "SELECT attempt, success, error FROM schema_migrations WHERE version = '0004' ORDER BY id",
    )
    assert [(a, bool(s)) for a, s, _ in rows] == [(1, False), (1, True)]
    assert rows[0][2].startswith("interrupted: the process (pid")
