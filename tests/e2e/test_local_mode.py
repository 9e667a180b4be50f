"""The bot as a real process in local mode: no token, no network; signals stop it with exit 0."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.support.process import BotProcess, run_cli, write_config
from tests.support.revisions import BROKEN, add_revision

pytestmark = pytest.mark.timeout(120)


def _local_config(tmp_path: Path, url: str, **sections: dict) -> Path:
    values: dict[str, dict] = {
        "database": {"url": url, "retry_backoff_seconds": [0.1]},
        "backup": {"dir": str(tmp_path / "backups")},
    }
    for name, extra in sections.items():
        values.setdefault(name, {}).update(extra)
    return write_config(tmp_path / "config.toml", values)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_local_mode_migrates_runs_and_stops_gracefully(tmp_path: Path, sig: signal.Signals) -> None:
    _local_config(tmp_path, "sqlite:///data/bot.db")
    with BotProcess(["run"], cwd=tmp_path) as bot:  # config.toml in the working directory
        bot.wait_for_line("dbkeeper is running")
        assert (tmp_path / "data" / "bot.db").is_file()
        code = bot.stop(sig)
    output = bot.output
    assert code == 0, output
    assert output.count("local mode: no Telegram token") == 1
    assert "applying 3 revisions: v0 -> v3" in output
    assert f"received {sig.name}: shutting down" in output
    assert output.rstrip().endswith("shutdown complete")
    engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'bot.db'}")
    with engine.connect() as connection:
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    engine.dispose()
    assert version == "0003"


def test_no_subcommand_means_run(tmp_path: Path) -> None:
    config = _local_config(tmp_path, f"sqlite:///{tmp_path / 'bot.db'}")
    with BotProcess(["--config", str(config)], cwd=tmp_path) as bot:
        bot.wait_for_line("dbkeeper is running")
        assert bot.stop() == 0


def test_failed_migration_stops_startup_with_nonzero_status(
    tmp_path: Path, scripts_dir: Path
) -> None:
    add_revision(scripts_dir, BROKEN, doc="broken")
    database = tmp_path / "bot.db"
    config = _local_config(
        tmp_path, f"sqlite:///{database}", migrations={"script_location": str(scripts_dir)}
    )
    code, output = run_cli(["--config", str(config), "run"], cwd=tmp_path)
    assert code == 1, output
    assert "startup failed: applying revision 0004 (broken) failed" in output
    assert "dbkeeper is running" not in output
    engine = create_engine(f"sqlite:///{database}")
    with engine.connect() as connection:
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        failed = connection.execute(
            text("SELECT count(*) FROM schema_migrations WHERE success = 0")
        ).scalar()
    engine.dispose()
    assert (version, failed) == ("0003", 1)


def test_unreachable_database_stops_startup_with_a_clear_message(tmp_path: Path) -> None:
    config = _local_config(
        tmp_path,
        "postgresql+psycopg://bot:pw-never-shown@127.0.0.1:1/bot",
        database={"connect_retries": 2, "retry_backoff_seconds": [0.05]},
    )
    code, output = run_cli(["--config", str(config), "run"], cwd=tmp_path)
    assert code == 1
    expected = "startup failed: cannot connect to postgresql+psycopg://bot:***@127.0.0.1:1/bot"
    assert expected in output
    assert "pw-never-shown" not in output
