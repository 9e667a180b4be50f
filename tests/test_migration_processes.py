"""Migrations across real processes: racing starts, a process killed mid-revision, a signal
during a long revision."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from dbkeeper.plugins.database.locks import ADVISORY_NAMESPACE, MIGRATION_LOCK_ID
from tests.support.hosts import free_port
from tests.support.process import BotProcess, run_cli, write_config
from tests.support.revisions import FOREVER, GATED, LONG, add_revision
from tests.support.tcp_proxy import TCPProxy

pytestmark = pytest.mark.timeout(180)
SHUTDOWN_BUDGET = 9.0  # [shutdown] timeout_seconds by default: under docker stop's 10 s


def _config(tmp_path: Path, url: str, scripts_dir: Path, **migrations: object) -> Path:
    return write_config(
        tmp_path / "config.toml",
        {
            "database": {"url": url, "retry_backoff_seconds": [0.1]},
            "migrations": {
                "script_location": str(scripts_dir),
                "lock_timeout_seconds": 120,
                **migrations,
            },
            "backup": {"dir": str(tmp_path / "backups")},
            "health": {"http_port": free_port()},
        },
    )


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


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


@pytest.mark.parametrize(
    ("command", "expected_status"),
    [(["run"], 0), (["db", "migrate"], 1)],
    ids=["run", "db-migrate"],
)
def test_sigterm_interrupts_a_long_revision_within_the_shutdown_budget(
    tmp_path: Path,
    database_url: str,
    scripts_dir: Path,
    command: list[str],
    expected_status: int,
) -> None:
    """SIGTERM while a revision's statement runs (for hours): the statement is cancelled, the
    revision rolled back, the attempt recorded as interrupted, and the process is gone within
    the shutdown budget; the next start applies the revision."""
    add_revision(scripts_dir, LONG, doc="long")
    gate = tmp_path / "gate"
    gate.mkdir()
    args = ["--config", str(_config(tmp_path, database_url, scripts_dir)), *command]
    env = {"DBKEEPER_GATE_DIR": str(gate), "DBKEEPER_LONG_ROWS": FOREVER}
    with BotProcess(args, cwd=tmp_path, env=env) as process:
        _wait_for_files(gate, "entered-*", 1)  # 0001-0003 applied, 0004 about to count
        if database_url.startswith("postgresql"):
            _wait_until(
                lambda: _query(
                    database_url,
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                    "AND query LIKE '%generate_series%' AND pid <> pg_backend_pid()",
                )
                == [(1,)],
                "the long statement to run on the server",
            )
        signalled = time.monotonic()
        process.send(signal.SIGTERM)
        code = process.wait(60)
        took = time.monotonic() - signalled
    output = process.output
    assert took < SHUTDOWN_BUDGET, f"exited {took:.1f}s after SIGTERM:\n{output}"
    assert code == expected_status, output
    assert "Traceback" not in output
    assert "interrupted" in output and "rolled back" in output
    if command == ["db", "migrate"]:
        errors = [line for line in output.splitlines() if line.startswith("dbkeeper: error:")]
        assert len(errors) == 1 and "0004 (long) was interrupted (received SIGTERM)" in errors[0]
    else:
        assert "dbkeeper is running" not in output
        assert output.rstrip().endswith("shutdown complete")
    assert _query(database_url, "SELECT version_num FROM alembic_version") == [("0003",)]
    assert _query(database_url, "SELECT count(*) FROM chats WHERE id = 4343") == [(0,)]
    rows = _query(
        database_url,
        "SELECT attempt, success, error FROM schema_migrations WHERE version = '0004' ORDER BY id",
    )
    assert [(attempt, success) for attempt, success, _ in rows] == [(1, False)]
    assert rows[0][2].startswith("interrupted: received SIGTERM")
    code, history = run_cli(["--config", args[1], "db", "history"], cwd=tmp_path)
    assert code == 0 and any(
        " 0004 " in line and " interrupted " in line for line in history.splitlines()
    ), history

    # The next start (the revision now counts briefly) applies it.
    if command == ["run"]:
        with BotProcess(args, cwd=tmp_path) as again:
            again.wait_for_line("dbkeeper is running")
            assert again.stop() == 0, again.output
    else:
        code, again_output = run_cli(args, cwd=tmp_path)
        assert code == 0, again_output
    assert _query(database_url, "SELECT version_num FROM alembic_version") == [("0004",)]
    assert _query(database_url, "SELECT count(*) FROM chats WHERE id = 4343") == [(1,)]
    rows = _query(
        database_url,
        "SELECT success FROM schema_migrations WHERE version = '0004' ORDER BY id",
    )
    assert [bool(success) for (success,) in rows] == [False, True]


def test_a_signal_while_waiting_for_the_migration_lock_stops_at_once(
    tmp_path: Path, database_url: str, scripts_dir: Path
) -> None:
    """A bot starting while `db migrate` holds the lock: SIGTERM ends its wait, nothing is
    applied by it, exit 0 within the budget; the migration goes on undisturbed."""
    add_revision(scripts_dir, GATED, doc="gated")
    gate = tmp_path / "gate"
    gate.mkdir()
    config = _config(tmp_path, database_url, scripts_dir)
    env = {"DBKEEPER_GATE_DIR": str(gate)}
    with BotProcess(["--config", str(config), "db", "migrate"], cwd=tmp_path, env=env) as holder:
        _wait_for_files(gate, "entered-*", 1)  # the bot starts once `db migrate` holds the lock
        assert int(next(gate.glob("entered-*")).name.split("-")[1]) == holder.pid
        with BotProcess(["--config", str(config), "run"], cwd=tmp_path, env=env) as bot:
            bot.wait_for_line("another process is migrating this database")
            signalled = time.monotonic()
            bot.send(signal.SIGTERM)
            code = bot.wait(30)
            took = time.monotonic() - signalled
        (gate / "release").touch()
        assert holder.wait(60) == 0, holder.output
    assert took < SHUTDOWN_BUDGET and code == 0, bot.output
    assert "Traceback" not in bot.output
    assert "nothing was applied while waiting" in bot.output
    assert len(list(gate.glob("entered-*"))) == 1
    rows = _query(
        database_url,
        "SELECT version, count(*) FROM schema_migrations GROUP BY version ORDER BY version",
    )
    assert rows == [("0001", 1), ("0002", 1), ("0003", 1), ("0004", 1)]


def _migration_lock_session(url: str) -> int | None:
    """The server pid of the session holding the migration lock, if any."""
    rows = _query(
        url,
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
        f"AND classid = {ADVISORY_NAMESPACE} AND objid = {MIGRATION_LOCK_ID} AND objsubid = 2",
    )
    return rows[0][0] if rows else None


@pytest.mark.parametrize("loss", ["terminated", "cut"])
def test_losing_the_migrating_session_never_applies_a_revision_twice(
    tmp_path: Path, postgres_url: str, scripts_dir: Path, loss: str
) -> None:
    """PostgreSQL: process A holds the lock on the connection it migrates on, inside revision
    0004, while B waits. A's session dies (pg_terminate_backend, or the network cut by a
    proxy): with it go A's transaction and the lock. B applies 0004; A finds it done once it
    has the lock again. Every revision is applied and recorded as applied exactly once, and
    both exit 0 without a traceback."""
    add_revision(scripts_dir, GATED, doc="gated")
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {"DBKEEPER_GATE_DIR": str(gate)}
    with TCPProxy() as proxy:
        a_dir, b_dir = tmp_path / "a", tmp_path / "b"
        a_dir.mkdir()
        b_dir.mkdir()
        a_url = proxy.url(postgres_url) if loss == "cut" else postgres_url
        a_config = _config(a_dir, a_url, scripts_dir)
        b_config = _config(b_dir, postgres_url, scripts_dir)
        with (
            BotProcess(["--config", str(a_config), "db", "migrate"], cwd=a_dir, env=env) as a,
        ):
            _wait_for_files(gate, "entered-*", 1)  # A is inside 0004, holding the lock
            a_session = _migration_lock_session(postgres_url)
            assert a_session is not None
            with BotProcess(
                ["--config", str(b_config), "db", "migrate"], cwd=b_dir, env=env
            ) as b:
                b.wait_for_line("another process is migrating this database")
                if loss == "terminated":
                    _query(postgres_url, f"SELECT pg_terminate_backend({a_session})")
                else:
                    proxy.refuse()  # A's connections drop; A cannot reconnect for now
                # B takes the lock and enters 0004 in turn
                _wait_for_files(gate, "entered-*", 2)
                assert _migration_lock_session(postgres_url) not in (None, a_session)
                (gate / "release").touch()
                assert b.wait(60) == 0, b.output
                if loss == "cut":
                    a.wait_for_line("cannot reach the database to take the migration lock")
                    proxy.forward()
                a_code = a.wait(60)
    outputs = {"A": a.output, "B": b.output}
    assert a_code == 0, a.output
    for name, output in outputs.items():
        assert "Traceback" not in output, f"{name}:\n{output}"
    assert "lost the migration lock" in a.output
    assert "0004 (gated) was applied by another instance meanwhile" in a.output
    assert "applied by another instance while this one waited: 0004" in a.output
    assert "applied 0004 (gated)" in b.output
    applied = _query(
        postgres_url,
        "SELECT version, count(*) FROM schema_migrations WHERE success AND direction = 'upgrade' "
        "GROUP BY version ORDER BY version",
    )
    assert applied == [("0001", 1), ("0002", 1), ("0003", 1), ("0004", 1)]
    assert _query(postgres_url, "SELECT count(*) FROM chats WHERE id = 4242") == [(1,)]
    assert _query(postgres_url, "SELECT version_num FROM alembic_version") == [("0004",)]
    # A's own attempt is on record as failed, with what happened to it
    failed = _query(
        postgres_url,
        "SELECT pid, error FROM schema_migrations WHERE version = '0004' AND NOT success",
    )
    assert [pid for pid, _ in failed] == [a.pid]


def test_pending_revisions_with_auto_upgrade_off_are_refused_once(
    tmp_path: Path, database_url: str, scripts_dir: Path
) -> None:
    """[migrations] auto_upgrade = false and a revision pending: the bot does not start, with
    one error naming the command that applies it, and changes nothing."""
    config = _config(tmp_path, database_url, scripts_dir, auto_upgrade=False)
    code, output = run_cli(["--config", str(config), "db", "migrate", "--to", "0002"], cwd=tmp_path)
    assert code == 0, output
    code, output = run_cli(["--config", str(config), "run"], cwd=tmp_path)
    assert code == 1, output
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output
    assert "1 revision pending (v2 -> v3) and [migrations] auto_upgrade is off" in errors[0]
    assert "run `dbkeeper db migrate` to apply them" in errors[0]
    for wrong in ("critical tables are missing", "runs on v", "Traceback", "dbkeeper is running"):
        assert wrong not in output
    assert _query(database_url, "SELECT version_num FROM alembic_version") == [("0002",)]
