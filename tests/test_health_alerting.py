"""The whole health side at work: a real host, a real PTB bot, the Bot API stand-in, a real file.

A live SQLite database is corrupted on disk; the admins hear about it once (however many checks
run), the HTTP API says 503, and after a restore they hear that it is resolved.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbkeeper.health import Status
from tests.conftest import SettingsFactory
from tests.support.hosts import free_port, get, running_host
from tests.support.telegram_api import DEFAULT_TOKEN, TelegramAPIStandIn
from tests.test_health import add_chats, corrupt_sqlite

ADMIN_CHAT = -100424242


@pytest.fixture
def standin() -> Iterator[TelegramAPIStandIn]:
    with TelegramAPIStandIn() as api:
        yield api


async def test_corruption_is_alerted_once_then_resolved_after_a_restore(
    sqlite_url: str, make_settings: SettingsFactory, standin: TelegramAPIStandIn
) -> None:
    settings = make_settings(
        sqlite_url,
        health={"http_port": free_port(), "interval_seconds": 0.05, "http_cache_seconds": 0.01},
        telegram={
            "token": DEFAULT_TOKEN,
            "api_base_url": standin.base_url,
            "alert_chat_id": ADMIN_CHAT,
        },
        backup={"on_shutdown": False},
    )
    async with running_host(settings, job_queue=True) as (host, plugin):
        await add_chats(plugin, 500)
        good = await plugin.backup_now()
        assert (await host.monitor.check()).status.value == "healthy"
        # A fresh install is not a problem: nothing was alerted before its first backup.
        assert standin.sent_messages(ADMIN_CHAT) == []
        assert host.monitor.is_healthy()
        assert host.monitor.last is not None
        assert host.monitor.last.checks["telegram_api"].message == "reachable as @dbkeeper_test_bot"

        await asyncio.to_thread(plugin.operations.flush)
        assert plugin.database.file is not None
        corrupt_sqlite(plugin.database.file)
        alert = await standin.wait_for_message_async("database_integrity", chat_id=ADMIN_CHAT)
        assert alert["text"].startswith("🔴 dbkeeper on ")
        assert "🔴 database_integrity: unhealthy — quick_check found corruption: " in alert["text"]
        runs = host.monitor.runs
        deadline = time.monotonic() + 10
        while host.monitor.runs < runs + 5:  # five more checks, all unhealthy
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        status, body, _ = await get(host, "/health")
        assert (status, body["status"]) == (503, "unhealthy")
        assert alerted_worse(standin, "database_integrity") == 1  # once, not once per run

        # A safety copy of a damaged database cannot be verified, so the restore asks for the
        # damaged file to be moved aside first (plugins/database/backup.py says so).
        for suffix in ("", "-wal", "-shm"):
            damaged = Path(f"{plugin.database.file}{suffix}")
            if damaged.exists():
                damaged.rename(damaged.with_name(damaged.name + ".damaged"))
        await plugin.restore(good.name)
        resolved = await standin.wait_for_message_async(
            lambda m: "healthy again" in m["text"] and "database_integrity" in m["text"],
            chat_id=ADMIN_CHAT,
        )
        assert "✅ database_integrity recovered after " in resolved["text"]
        assert "the problem lasted " in resolved["text"]
        status, body, _ = await get(host, "/health")
        assert (status, body["status"]) == (200, "healthy")
        assert body["checks"]["database"]["message"] == "Schema v3 | 4 tables | 500 records"
    # Moving the damaged file aside may have made more checks fail for a moment (their own
    # alert), but the corruption itself was announced once and resolved once.
    assert alerted_worse(standin, "database_integrity") == 1
    resolved = [m for m in standin.sent_messages(ADMIN_CHAT) if "integrity recovered" in m["text"]]
    assert len(resolved) == 1
    assert host.monitor.last is not None and host.monitor.last.status is Status.HEALTHY


def alerted_worse(standin: TelegramAPIStandIn, check: str) -> int:
    """How many alerts announced ``check`` as getting worse (not as "still failing")."""
    count = 0
    for message in standin.sent_messages(ADMIN_CHAT):
        news = message["text"].split("\nStill failing:")[0].splitlines()[1:]
        count += any(line.split(" ", 1)[1].startswith(f"{check}: ") for line in news)
    return count
