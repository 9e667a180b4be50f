"""dbkeeper in someone else's bot, installed from a wheel into the bot's own environment.

The bot has its own ``bot/`` and ``plugins/`` packages and a ``migrations/`` directory made by
``alembic init`` with two revisions, and embeds dbkeeper in a PTB ``Application`` of its own.
Its schema is migrated and recorded, nothing of dbkeeper's example schema appears, backups and
health work on its tables, and a restore inside the running bot hands the bot's database access
the restored database.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hosts import free_port
from tests.support.process import BotProcess, run_cli
from tests.support.telegram_api import DEFAULT_TOKEN, TelegramAPIStandIn
from tests.support.user_project import (
    build_wheel,
    configure,
    install_entry_point_plugin,
    make_project,
    make_venv,
)

pytestmark = pytest.mark.timeout(300)
ADMIN, STRANGER = 4201, 6666


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dbkeeper installed from its wheel (not editable) into a new environment: its bin/."""
    root = tmp_path_factory.mktemp("installed")
    return make_venv(root / "venv", build_wheel(root / "dist"))


def _notes(project: Path) -> list[str]:
    with sqlite3.connect(project / "data" / "notes.db") as connection:
        return [text for (text,) in connection.execute("SELECT text FROM notes ORDER BY id")]


def _tables(project: Path) -> set[str]:
    with sqlite3.connect(project / "data" / "notes.db") as connection:
        return {name for (name,) in connection.execute("SELECT name FROM sqlite_master")}


@pytest.mark.parametrize("share_connection", [False, True], ids=["alembic-init-env", "shared"])
def test_the_bots_own_schema_is_migrated_recorded_backed_up_and_checked(
    tmp_path: Path, installed: Path, share_connection: bool
) -> None:
    project = make_project(tmp_path, installed, admin=ADMIN, share_connection=share_connection)
    configure(project, health={"http_port": free_port()})
    dbkeeper = [str(installed / "dbkeeper")]

    code, output = run_cli(["db", "status"], cwd=project, program=dbkeeper)
    assert code == 0, output
    assert "revisions: migrations" in output and "pending:   2" in output
    assert not (project / "data").exists()  # a read-only command created nothing

    code, output = run_cli(["db", "migrate"], cwd=project, program=dbkeeper)
    assert code == 0 and "migrated v0 -> v2: 2 revision(s)" in output, output
    # An env.py made by `alembic init` runs unchanged (dbkeeper hands it the URL); until it
    # shares dbkeeper's connection, dbkeeper says what that costs.
    assert ("opens its own connection" in output) is not share_connection
    tables = _tables(project)
    assert {"notes", "alembic_version", "schema_migrations"} <= tables
    assert not tables & {"users", "chats", "chat_settings", "events"}  # no example schema

    code, output = run_cli(["db", "history"], cwd=project, program=dbkeeper)
    rows = [line for line in output.splitlines() if " upgrade " in line]
    assert code == 0 and len(rows) == 2, output
    assert "create notes" in rows[0] and "note authors" in rows[1]
    assert all(" ok " in row for row in rows)
    columns = {row.index(" upgrade ") for row in rows}
    assert len(columns) == 1  # hex ids line up

    code, output = run_cli(["db", "status"], cwd=project, program=dbkeeper)
    head = output.split("schema:    ")[1].split("\n")[0]
    assert head.startswith("v2 (") and "; head v2 (" in head and "pending:   0" in output

    with sqlite3.connect(project / "data" / "notes.db") as connection:
        connection.execute("INSERT INTO notes (text) VALUES ('kept')")
    code, output = run_cli(["backup", "create"], cwd=project, program=dbkeeper)
    assert code == 0 and "created bot-db-" in output, output
    code, output = run_cli(["backup", "verify"], cwd=project, program=dbkeeper)
    assert code == 0 and output.count("ok      bot-db-") == 1, output

    code, output = run_cli(["health", "--json"], cwd=project, program=dbkeeper)
    report = json.loads(output[output.index("{") :])
    assert report["checks"]["database"]["message"] == "Schema v2 | 1 table | 1 record"
    assert report["checks"]["database_migrations"]["message"] == "v2 (0 pending)"
    assert report["checks"]["database_backups"]["message"].startswith("1 backup |")


@pytest.fixture
def api() -> Iterator[TelegramAPIStandIn]:
    with TelegramAPIStandIn() as standin:
        yield standin


def test_the_embedded_bot_answers_first_and_a_restore_hands_it_the_restored_database(
    tmp_path: Path, installed: Path, api: TelegramAPIStandIn
) -> None:
    project = make_project(tmp_path, installed, admin=ADMIN, share_connection=True)
    configure(
        project,
        telegram={"admin_ids": [ADMIN], "api_base_url": api.base_url},
        health={"http_port": free_port(), "interval_seconds": 3600},
    )
    bot_py = [str(installed / "python"), "bot.py"]
    with BotProcess(
        [], cwd=project, program=bot_py, env={"TELEGRAM_BOT_TOKEN": DEFAULT_TOKEN}
    ) as bot:
        bot.wait_for_line("taking updates from Telegram (polling)")

        # The bot's own /start answers anyone; dbkeeper never answers nor blocks it.
        api.push_command("/start", user_id=STRANGER)
        api.wait_for_message("Welcome to the notes bot!", chat_id=STRANGER)
        api.push_command("/start", user_id=ADMIN)
        api.wait_for_message("Welcome to the notes bot!", chat_id=ADMIN)
        # dbkeeper's admin commands answer the admin, on the bot's own schema.
        api.push_command("/health", user_id=ADMIN)
        health = api.wait_for_message(lambda m: "database_migrations" in m["text"], ADMIN)
        assert "Schema v2 | 1 table" in health["text"] and "v2 (0 pending)" in health["text"]
        api.push_command("/health", user_id=STRANGER)
        bot.wait_for_line(f"refused /health from user {STRANGER}")

        for count, text in enumerate(("first", "second"), 1):
            api.push_command(f"/note {text}", user_id=STRANGER)
            api.wait_for_message(f"noted ({count} notes)", chat_id=STRANGER)
        api.push_command("/backup", user_id=ADMIN)
        api.wait_for_message("✅ Backup", chat_id=ADMIN, timeout=60)
        api.push_command("/note third", user_id=STRANGER)
        api.wait_for_message("noted (3 notes)", chat_id=STRANGER)

        api.push_command("/rollback", user_id=ADMIN)
        api.wait_for_message("restored bot-db-", chat_id=ADMIN, timeout=60)
        api.push_command("/note after", user_id=STRANGER)
        # Through the bot's database access, into the restored database: 3 notes again.
        api.wait_for(
            lambda: [m["text"] for m in api.sent_messages(STRANGER)].count("noted (3 notes)") == 2,
            30,
            "the note written after the restore",
        )
        assert _notes(project) == ["first", "second", "after"]
        assert bot.stop() == 0
    output = bot.output
    assert DEFAULT_TOKEN not in output
    foreign = [line for line in output.splitlines() if "an engine that is not dbkeeper's" in line]
    assert foreign == [], output
    assert api.sent_messages(STRANGER)[0]["text"] == "Welcome to the notes bot!"


def test_a_plugin_installed_with_pip_is_loaded_through_its_entry_point(
    tmp_path: Path, installed: Path
) -> None:
    install_entry_point_plugin(tmp_path / "src", installed)
    try:
        _check_installed_plugin(tmp_path, installed)
    finally:  # the environment is shared by this module's tests
        subprocess.run([str(installed / "pip"), "uninstall", "-q", "-y", "dbkeeper-hello"])


def _check_installed_plugin(tmp_path: Path, installed: Path) -> None:
    project = make_project(tmp_path / "bot", installed, admin=ADMIN, share_connection=True)
    configure(project, health={"http_port": free_port()})
    dbkeeper = [str(installed / "dbkeeper")]
    code, output = run_cli(["--help"], cwd=project, program=dbkeeper)
    assert code == 0 and "hello" in output.split("Commands:")[1], output
    assert run_cli(["hello"], cwd=project, program=dbkeeper) == (
        0,
        "hello from an installed plugin",
    )
    assert run_cli(["db", "migrate"], cwd=project, program=dbkeeper)[0] == 0
    code, output = run_cli(["health", "--json"], cwd=project, program=dbkeeper)
    checks = json.loads(output[output.index("{") :])["checks"]
    assert checks["hello"]["message"] == "installed and loaded" and "database" in checks
