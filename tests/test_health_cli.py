"""``dbkeeper health [--json]`` as a real process: what it prints and its exit status."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sqlalchemy import create_engine, text

from dbkeeper.config import settings_from_mapping
from tests.support.hosts import free_port, running_host
from tests.support.process import run_cli, write_config


def _setup(tmp_path: Path) -> tuple[Path, dict]:
    sections = {
        "database": {"url": f"sqlite:///{tmp_path / 'bot.db'}"},
        "backup": {"dir": str(tmp_path / "backups"), "on_shutdown": False},
        "health": {"http_port": free_port()},
    }
    return write_config(tmp_path / "config.toml", sections), sections


async def test_healthy_exits_0_and_prints_every_check(tmp_path: Path) -> None:
    config, sections = _setup(tmp_path)
    async with running_host(settings_from_mapping(sections, environ={})) as (_, plugin):
        await plugin.backup_now()
    code, output = run_cli(["--config", str(config), "health"], cwd=tmp_path)
    assert code == 0, output
    lines = output.splitlines()
    assert re.fullmatch(r"healthy \(8 checks in \d+ ms\)", lines[0])
    assert re.fullmatch(
        r"  database +healthy +Schema v3 \| 4 tables \| 0 records \([\d.]+ ms\)", lines[1]
    )
    assert re.fullmatch(r"  database_migrations +healthy +v3 \(0 pending\)", lines[2])
    assert [line.split()[0] for line in lines[1:]] == [
        "database",
        "database_migrations",
        "database_integrity",
        "database_size",
        "database_backups",
        "disk_space",
        "database_maintenance",
        "database_growth",
    ]


async def test_degraded_exits_1(tmp_path: Path) -> None:
    config, sections = _setup(tmp_path)
    async with running_host(settings_from_mapping(sections, environ={})):
        pass  # migrated, never backed up
    code, output = run_cli(["--config", str(config), "health"], cwd=tmp_path)
    assert code == 1, output
    assert output.startswith("degraded ")
    assert re.search(r"  database_backups +degraded +0 backups \| 0.00 MB \| no backup yet", output)


def test_unhealthy_exits_2_with_the_contract_json(tmp_path: Path) -> None:
    config, _ = _setup(tmp_path)
    engine = create_engine(f"sqlite:///{tmp_path / 'bot.db'}")  # a database, never migrated
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE notes (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    code, output = run_cli(["--config", str(config), "health", "--json"], cwd=tmp_path)
    assert code == 2, output
    body = json.loads(output)
    assert set(body) == {"status", "timestamp", "uptime", "checks"}
    assert body["status"] == "unhealthy"
    assert body["checks"]["database_migrations"] == {
        "status": "unhealthy",
        "message": "v0 (3 pending): 0001, 0002, 0003 (head v3)",
    }
    assert body["checks"]["database"]["message"] == "Schema v0 | 1 table | 0 records"
