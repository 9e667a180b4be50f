"""``dbkeeper db ...`` as an operator runs it: output, exit status, confirmation."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from dbkeeper.plugins.members.models import metadata
from tests.support.process import BotProcess, run_cli, write_config


@pytest.fixture
def workdir(tmp_path: Path, database_url: str) -> Path:
    write_config(
        tmp_path / "config.toml",
        {
            "database": {"url": database_url, "retry_backoff_seconds": [0.1]},
            "backup": {"dir": str(tmp_path / "backups")},
        },
    )
    return tmp_path


def test_status_migrate_history(workdir: Path) -> None:
    code, output = run_cli(["db", "status"], cwd=workdir)
    assert code == 0, output
    assert "schema:    v0 (empty); head v3 (0003)" in output
    assert "pending:   3" in output and "  - 0001 (users and chats)" in output

    code, output = run_cli(["db", "migrate"], cwd=workdir)
    assert code == 0 and "migrated v0 -> v3: 3 revision(s)" in output

    code, output = run_cli(["db", "status"], cwd=workdir)
    assert "schema:    v3 (0003); head v3 (0003)" in output and "pending:   0" in output
    assert "history:   3 applied, 0 failed, last applied 20" in output

    code, output = run_cli(["db", "history"], cwd=workdir)
    lines = [line for line in output.splitlines() if " upgrade " in line]
    assert code == 0 and len(lines) == 3
    assert " 0001 " in lines[0] and " ok " in lines[0] and "users and chats" in lines[0]


def test_downgrade_asks_first_then_reverts(workdir: Path) -> None:
    run_cli(["db", "migrate"], cwd=workdir)
    with BotProcess(["db", "downgrade", "2"], cwd=workdir) as process:
        code = process.wait()  # stdin is empty: the prompt aborts
    assert code != 0 and "Revert" in process.output and "[y/N]" in process.output
    code, output = run_cli(["db", "status"], cwd=workdir)
    assert "schema:    v3" in output  # nothing was reverted without confirmation

    code, output = run_cli(["db", "downgrade", "2", "--yes"], cwd=workdir)
    assert code == 0 and "reverted v3 -> v2: 1 revision(s)" in output
    code, output = run_cli(["db", "migrate"], cwd=workdir)
    assert code == 0 and "migrated v2 -> v3" in output


def test_existing_database_is_refused_then_adopted_with_baseline(
    workdir: Path, database_url: str
) -> None:
    (workdir / "data").mkdir(exist_ok=True)  # where the SQLite URL points
    engine = create_engine(database_url)
    with engine.begin() as connection:
        metadata.create_all(connection)
        connection.execute(text("INSERT INTO chats (id, type) VALUES (1, 'group')"))
    engine.dispose()

    code, output = run_cli(["db", "migrate"], cwd=workdir)
    assert code == 1
    assert "dbkeeper: error: the database already has 4 tables" in output
    assert "dbkeeper db baseline head" in output and "Nothing was changed" in output
    engine = create_engine(database_url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert tables == {"users", "chats", "chat_settings", "events"}  # no bookkeeping table either

    code, output = run_cli(["db", "baseline", "head"], cwd=workdir)
    assert code == 0 and "adopted at v3 (0003" in output and "warning" not in output
    code, output = run_cli(["db", "migrate"], cwd=workdir)
    assert code == 0 and "nothing to apply; schema is at v3" in output
    code, output = run_cli(["db", "history"], cwd=workdir)
    assert " baseline " in output


def test_downgrade_takes_a_relative_revision_as_the_readme_writes_it(workdir: Path) -> None:
    run_cli(["db", "migrate"], cwd=workdir)
    code, output = run_cli(["db", "downgrade", "-1", "--yes"], cwd=workdir)
    assert code == 0 and "reverted v3 -> v2: 1 revision(s)" in output, output
    code, output = run_cli(["db", "downgrade", "--yes", "-1"], cwd=workdir)
    assert code == 0 and "reverted v2 -> v1: 1 revision(s)" in output, output


@pytest.mark.parametrize("data_dir", [False, True], ids=["empty-directory", "data-directory"])
def test_read_only_commands_create_nothing_and_say_there_is_no_database(
    tmp_path: Path, data_dir: bool
) -> None:
    """Default settings (sqlite:///data/bot.db, backups in data/backups), nothing there yet."""
    if data_dir:
        (tmp_path / "data").mkdir()
    before = sorted(tmp_path.rglob("*"))
    expected = {
        ("db", "status"): (0, "(no database yet: `dbkeeper db migrate` creates it)"),
        ("db", "history"): (1, "dbkeeper: error: there is no database at data/bot.db yet"),
        ("health",): (2, "cannot reach the database: there is no database at data/bot.db yet"),
        ("backup", "list"): (0, "no backups in data/backups"),
    }
    for args, (status, says) in expected.items():
        code, output = run_cli(list(args), cwd=tmp_path)
        assert code == status and says in output, f"{args}:\n{output}"
        assert "Traceback" not in output
        assert sorted(tmp_path.rglob("*")) == before, f"{args} created files"


def test_unknown_revision_is_a_clear_error(workdir: Path) -> None:
    code, output = run_cli(["db", "migrate", "--to", "0042"], cwd=workdir)
    assert code == 1
    assert "dbkeeper: error: no revision '0042'" in output
