"""The admin guard with a real PTB Application polling the Telegram Bot API stand-in."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest
from telegram import Update
from telegram.ext import Application, ContextTypes

from dbkeeper.admin import AdminGuard
from tests.support.telegram_api import TelegramAPIStandIn

ADMIN, STRANGER, ALERT_CHAT, OTHER_GROUP = 1001, 2002, -100555, -100777


@pytest.fixture
def api() -> TelegramAPIStandIn:
    with TelegramAPIStandIn() as standin:
        yield standin


async def _running(api: TelegramAPIStandIn, guard: AdminGuard) -> AsyncIterator[list[str]]:
    ran: list[str] = []

    async def secret(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        ran.append(f"{update.effective_user.id}@{update.effective_chat.id}")
        await update.effective_message.reply_text("the secret schema")

    app = (
        Application.builder()
        .token(api.token)
        .base_url(api.base_url)
        .base_file_url(api.base_file_url)
        .build()
    )

    async def ping(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await update.effective_message.reply_text("pong")

    app.add_handlers(guard.command("dbstats", secret))
    app.add_handlers(guard.command("ping", ping))
    await app.initialize()
    await app.updater.start_polling(poll_interval=0, timeout=1)
    await app.start()
    try:
        yield ran
    finally:
        await app.updater.stop()
        await app.stop()
        await app.shutdown()


@pytest.fixture
async def ran(api: TelegramAPIStandIn) -> AsyncIterator[list[str]]:
    async for value in _running(api, AdminGuard([ADMIN], alert_chat_id=ALERT_CHAT)):
        yield value


async def _wait_for_log(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in r.getMessage() for r in caplog.records):
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line with {text!r}: {caplog.text}")
        await asyncio.sleep(0.01)


async def test_admin_in_private_chat_is_answered(api: TelegramAPIStandIn, ran: list[str]) -> None:
    api.push_command("/dbstats", user_id=ADMIN)
    message = await api.wait_for_message_async("the secret schema", chat_id=ADMIN)
    assert message["chat_id"] == ADMIN and ran == [f"{ADMIN}@{ADMIN}"]


async def test_admin_in_the_alert_chat_is_answered(api: TelegramAPIStandIn, ran: list[str]) -> None:
    api.push_command(
        "/dbstats@dbkeeper_test_bot", user_id=ADMIN, chat_id=ALERT_CHAT, chat_type="supergroup"
    )
    await api.wait_for_message_async("the secret schema", chat_id=ALERT_CHAT)


@pytest.mark.parametrize(
    ("user", "chat", "chat_type", "reason"),
    [
        (STRANGER, STRANGER, "private", "not an admin"),
        (STRANGER, ALERT_CHAT, "supergroup", "not an admin"),
        (ADMIN, OTHER_GROUP, "group", "private chats and the alert chat only"),
    ],
)
async def test_refused_without_answer_or_action_and_logged(
    api: TelegramAPIStandIn,
    ran: list[str],
    caplog: pytest.LogCaptureFixture,
    user: int,
    chat: int,
    chat_type: str,
    reason: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="dbkeeper.admin")
    api.push_command("/dbstats", user_id=user, chat_id=chat, chat_type=chat_type)
    await _wait_for_log(caplog, f"refused /dbstats from user {user} in chat {chat}")
    assert reason in caplog.text
    assert ran == [] and api.sent_messages() == []


async def test_no_admins_configured_refuses_everyone(
    api: TelegramAPIStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    guard = AdminGuard([])
    guard.warn_if_no_admins()
    assert "admin_ids is empty: every admin command" in caplog.text
    async for ran in _running(api, guard):
        api.push_command("/dbstats", user_id=ADMIN)
        await _wait_for_log(caplog, f"refused /dbstats from user {ADMIN}")
        assert "no admins configured" in caplog.text
        assert ran == [] and api.sent_messages() == []


async def test_an_edited_command_does_not_run_again(
    api: TelegramAPIStandIn, ran: list[str]
) -> None:
    update_id = api.push_command("/dbstats", user_id=ADMIN)
    await api.wait_for_message_async("the secret schema", chat_id=ADMIN)
    original = next(u for u in api.calls("getUpdates") if u.response and u.response.get("result"))
    edited = dict(original.response["result"][0])
    edited["update_id"] = update_id + 1
    edited["edited_message"] = {**edited.pop("message"), "edit_date": 1}
    api.push_update(edited)
    api.push_command("/ping", user_id=ADMIN)  # a sentinel, handled after the edit
    await api.wait_for_message_async("pong", chat_id=ADMIN)
    assert len(ran) == 1  # the handler starts (and records) before any later update's reply


def test_refusals_are_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    """A stranger sending 300 commands costs a few log lines, not 300."""
    from dbkeeper.admin import RateLimitedLog

    now = [1000.0]
    limited = RateLimitedLog(logging.getLogger("dbkeeper.admin"), clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="dbkeeper.admin")
    for number in range(300):
        limited.warning("refused /backup from user %s (%d)", STRANGER, number)
    assert len(caplog.records) == 10
    now[0] += 61
    limited.warning("refused /backup from user %s (%d)", STRANGER, 300)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[10] == "290 more refusals in the last 61s were not logged one by one"
    assert lines[11] == f"refused /backup from user {STRANGER} (300)" and len(lines) == 12


async def test_a_flood_of_refused_commands_logs_a_few_lines(
    api: TelegramAPIStandIn, ran: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dbkeeper.admin")
    for _ in range(40):
        api.push_command("/dbstats", user_id=STRANGER)
    api.push_command("/ping", user_id=ADMIN)  # a sentinel, handled after the flood
    await api.wait_for_message_async("pong", chat_id=ADMIN)
    await _wait_for_log(caplog, "refused /dbstats")
    refused = [r for r in caplog.records if "refused /dbstats" in r.getMessage()]
    assert 1 <= len(refused) <= 10 and ran == []
