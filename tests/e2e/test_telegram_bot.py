"""The bot as it runs: a real ``python -m dbkeeper run`` process, the real PTB Application, talking
HTTP to the Telegram Bot API stand-in. Admin commands, refusals, a failing Bot API, and the
graceful shutdown with a backup in progress."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.hosts import free_port
from tests.support.process import BotProcess, write_config
from tests.support.telegram_api import DEFAULT_TOKEN, TelegramAPIStandIn

pytestmark = pytest.mark.timeout(120)
ADMIN, STRANGER = 4201, 6666
TOKEN_SECRET = DEFAULT_TOKEN.split(":", 1)[1]


@pytest.fixture
def api() -> Iterator[TelegramAPIStandIn]:
    with TelegramAPIStandIn() as standin:
        yield standin


def _start(tmp_path: Path, api: TelegramAPIStandIn, **sections: dict[str, Any]) -> BotProcess:
    values: dict[str, dict[str, Any]] = {
        "telegram": {
            "token": DEFAULT_TOKEN,
            "api_base_url": api.base_url,
            "admin_ids": [ADMIN],
        },
        "database": {"url": f"sqlite:///{tmp_path / 'data' / 'bot.db'}"},
        "backup": {"dir": str(tmp_path / "backups"), "interval_seconds": 3600},
        "health": {"http_port": free_port(), "interval_seconds": 3600},
    }
    for name, extra in sections.items():
        values.setdefault(name, {}).update(extra)
    config = write_config(tmp_path / "config.toml", values)
    return BotProcess(["--config", str(config), "run"], cwd=tmp_path)


def _backups(tmp_path: Path) -> list[str]:
    directory = tmp_path / "backups"
    if not directory.is_dir():
        return []
    return sorted(n for n in os.listdir(directory) if n.startswith("bot-db-") and ".json" not in n)


def _fill(tmp_path: Path, megabytes: int) -> None:
    """Rows that do not compress much, so that a backup takes a noticeable moment."""
    with sqlite3.connect(tmp_path / "data" / "bot.db", timeout=10) as connection:
        connection.execute("INSERT OR IGNORE INTO chats (id, type) VALUES (1, 'private')")
        connection.executemany(
            "INSERT INTO events (chat_id, kind, payload) VALUES (1, 'noise', ?)",
            [(os.urandom(2048).hex(),) for _ in range(megabytes * 256)],
        )


def _texts(api: TelegramAPIStandIn, chat: int) -> list[str]:
    return [m["text"] for m in api.sent_messages(chat)]


def test_admin_commands_answer_and_strangers_get_nothing(
    tmp_path: Path, api: TelegramAPIStandIn
) -> None:
    with _start(tmp_path, api) as bot:
        bot.wait_for_line("taking updates from Telegram (polling)")
        # The command menu is registered for the admin's chat only.
        menus = [c for c in api.calls("setMyCommands") if c.ok]
        assert len(menus) == 1 and menus[0].params["scope"] == {"type": "chat", "chat_id": ADMIN}

        api.push_command("/help", user_id=ADMIN)
        help_text = api.wait_for_message("/dbstats", chat_id=ADMIN)["text"]
        assert "/health" in help_text and "/backup" in help_text

        api.push_command("/health", user_id=ADMIN)
        health = api.wait_for_message(lambda m: "database_migrations" in m["text"], ADMIN)
        assert health["parse_mode"] == "HTML"
        first_line = health["text"].splitlines()[0]
        assert "<b>healthy</b>" in first_line  # the verdict first (a fresh install is healthy)
        assert "Schema v3 | 4 tables" in health["text"] and "v3 (0 pending)" in health["text"]
        assert "(the leader)" in health["text"]

        api.push_command("/backup", user_id=ADMIN)
        answer = api.wait_for_message("✅ Backup", chat_id=ADMIN)["text"]
        [name] = _backups(tmp_path)[:1]
        assert name in answer and "Verified: quick_check ok (the full integrity check runs now" in (
            answer
        )
        manifest = json.loads((tmp_path / "backups" / f"{name}.manifest.json").read_text())
        assert manifest["reason"] == "manual" and manifest["sha256"][:16] in answer

        api.push_command("/dbstats", user_id=ADMIN)
        stats = api.wait_for_message(lambda m: m["text"].startswith("<b>Database</b>"), ADMIN)
        text = stats["text"]
        assert "Schema v3 (0 pending)" in text and "Migrations: 3 applied, 0 failed" in text
        # The admin who talked to the bot is a member now (the members feature records everyone).
        assert "4 tables" in text and "• users: ≈1" in text
        assert "<b>Backups</b> 1 ·" in text
        # Database care: the bot's own statements (the members feature's writes), its growth.
        assert "<b>Worst queries</b> (by total time; over 100 ms is logged)" in text
        assert "\n1. <code>" in text and " calls, " in text
        assert "<b>Growth</b> " in text and "<b>Maintenance</b>" in text

        # A stranger, in private and in a group: no answer, no backup, one log line each.
        before = _backups(tmp_path)
        api.push_command("/backup", user_id=STRANGER)
        api.push_command("/dbstats", user_id=STRANGER, chat_id=-100999, chat_type="group")
        bot.wait_for_line(f"refused /backup from user {STRANGER}")
        bot.wait_for_line(f"refused /dbstats from user {STRANGER} in chat -100999")
        assert api.sent_messages(STRANGER) == [] and api.sent_messages(-100999) == []
        assert _backups(tmp_path) == before
        # The members feature greets anyone on /start; a stranger's /help has no admin command.
        api.push_command("/start", user_id=STRANGER)
        greeting = api.wait_for_message("dbkeeper keeps alive", chat_id=STRANGER)["text"]
        assert greeting.startswith("Hello, ")
        api.push_command("/help", user_id=STRANGER)
        public_help = api.wait_for_message("/start", chat_id=STRANGER)["text"]
        assert "/backup" not in public_help and "/dbstats" not in public_help
        assert bot.stop() == 0
    with sqlite3.connect(tmp_path / "data" / "bot.db") as connection:
        members = {row[0] for row in connection.execute("SELECT id FROM users")}
    assert {ADMIN, STRANGER} <= members  # everyone the bot saw is recorded
    assert DEFAULT_TOKEN not in bot.output and TOKEN_SECRET not in bot.output


def test_a_second_backup_while_one_runs_is_told_so(tmp_path: Path, api: TelegramAPIStandIn) -> None:
    with _start(tmp_path, api, backup={"compression": "gzip"}) as bot:
        bot.wait_for_line("taking updates from Telegram (polling)")
        _fill(tmp_path, 24)
        api.push_command("/backup", user_id=ADMIN)
        api.push_command("/backup", user_id=ADMIN)
        bot.wait_for_line("(manual) started")
        api.push_command("/health", user_id=ADMIN)  # answered while the backup runs
        api.wait_for_message("✅ Backup", chat_id=ADMIN, timeout=60)
        texts = _texts(api, ADMIN)
        health = next(i for i, t in enumerate(texts) if "database_migrations" in t)
        assert health < texts.index(next(t for t in texts if t.startswith("✅ Backup")))
        assert sum("already running" in t for t in texts) == 1
        assert sum(t.startswith("✅ Backup") for t in texts) == 1
        assert len(_backups(tmp_path)) == 1
        assert bot.stop() == 0


def test_a_failing_bot_api_neither_crashes_the_bot_nor_loses_alerts(
    tmp_path: Path, api: TelegramAPIStandIn
) -> None:
    api.fail(status=500)  # every method but getUpdates, from the start
    api.fail("getUpdates", status=500)
    with _start(tmp_path, api, health={"interval_seconds": 0.5, "size_warning_mb": 0.01}) as bot:
        bot.wait_for_line("cannot reach the Telegram Bot API")
        bot.wait_for_line("ALERT")  # degraded: above the size warning; queued, not lost
        bot.wait_for_line("dbkeeper is running")  # database work went on regardless
        api.recover()
        alert = api.wait_for_message("degraded", chat_id=ADMIN, timeout=60)
        assert "above the 0.01 MB warning" in alert["text"]
        api.push_command("/health", user_id=ADMIN)
        api.wait_for_message(lambda m: "database_migrations" in m["text"], ADMIN, timeout=30)
        assert bot.process.poll() is None
        assert bot.stop() == 0
    assert DEFAULT_TOKEN not in bot.output and TOKEN_SECRET not in bot.output


def test_sigterm_during_a_backup_finishes_it_then_shuts_down_in_order(
    tmp_path: Path, api: TelegramAPIStandIn
) -> None:
    with _start(tmp_path, api, backup={"compression": "gzip", "on_shutdown": True}) as bot:
        bot.wait_for_line("taking updates from Telegram (polling)")
        _fill(tmp_path, 24)
        api.push_command("/backup", user_id=ADMIN)
        bot.wait_for_line("(manual) started")
        started = time.monotonic()
        bot.send(signal.SIGTERM)
        bot.wait_for_line("shutdown: taking the final backup")
        bot.send(signal.SIGTERM)  # an impatient second signal changes nothing
        code = bot.wait()
        elapsed = time.monotonic() - started
    output = bot.output
    assert code == 0, output
    assert elapsed < 9.5  # within the shutdown budget (docker stop allows 10 s)
    reasons = [
        json.loads((tmp_path / "backups" / f"{n}.manifest.json").read_text())["reason"]
        for n in _backups(tmp_path)
    ]
    assert sorted(reasons) == ["manual", "shutdown"]  # both complete, verified, listed
    assert any(t.startswith("✅ Backup") for t in _texts(api, ADMIN))  # answered before exit
    steps = [
        "received SIGTERM: shutting down",
        "shutdown: stopping taking updates",
        "shutdown: waiting for running handlers and jobs",
        "(manual): ",  # the backup in progress completes
        "shutdown: running handlers and jobs finished",
        "shutdown: health monitor stopped",
        "shutdown: scheduled backups stopped",
        "shutdown: database flushed",
        "shutdown: taking the final backup",
        "received SIGTERM again: the graceful shutdown is already running",
        "(shutdown): ",
        "shutdown: database closed",
        "shutdown complete",
    ]
    positions = [output.find(step) for step in steps]
    assert all(p >= 0 for p in positions), list(zip(steps, positions, strict=True))
    assert positions == sorted(positions), list(zip(steps, positions, strict=True))
    assert DEFAULT_TOKEN not in output and TOKEN_SECRET not in output


def test_without_admins_every_command_is_refused_and_startup_warns(
    tmp_path: Path, api: TelegramAPIStandIn
) -> None:
    with _start(tmp_path, api, telegram={"admin_ids": []}) as bot:
        bot.wait_for_line("admin_ids is empty: every admin command")
        bot.wait_for_line("taking updates from Telegram (polling)")
        api.push_command("/health", user_id=ADMIN)
        bot.wait_for_line(f"refused /health from user {ADMIN}")
        assert api.sent_messages() == []
        assert bot.stop() == 0
