"""The Telegram Bot API stand-in against the real python-telegram-bot."""

from __future__ import annotations

import asyncio
import datetime as dtm
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from telegram import Bot, BotCommand, BotCommandScopeChat, Update
from telegram.error import (
    Conflict,
    EndPointNotFound,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TimedOut,
)
from telegram.ext import Application, CommandHandler, ContextTypes

from tests.support.telegram_api import DEFAULT_TOKEN, TelegramAPIStandIn

TOKEN = DEFAULT_TOKEN


@pytest.fixture
def standin() -> Iterator[TelegramAPIStandIn]:
    with TelegramAPIStandIn() as s:
        yield s


def build_app(s: TelegramAPIStandIn, token: str = TOKEN) -> Application:
    return (
        Application.builder()
        .token(token)
        .base_url(s.base_url)
        .base_file_url(s.base_file_url)
        .build()
    )


@pytest.fixture
async def app(standin: TelegramAPIStandIn) -> AsyncIterator[Application]:
    application = build_app(standin)
    await application.initialize()
    try:
        yield application
    finally:
        await application.shutdown()


def seconds(value: int | dtm.timedelta) -> float:
    return value.total_seconds() if isinstance(value, dtm.timedelta) else float(value)


async def test_initialize_gets_the_configured_bot(app: Application, standin: TelegramAPIStandIn):
    assert app.bot.username == "dbkeeper_test_bot"
    assert app.bot.id == 123456
    assert [c.method for c in standin.calls()] == ["getMe"]
    assert standin.base_url == f"http://127.0.0.1:{standin.port}/bot"
    assert standin.base_file_url == f"http://127.0.0.1:{standin.port}/file/bot"


async def test_send_message_is_recorded(app: Application, standin: TelegramAPIStandIn):
    first = await app.bot.send_message(42, "<b>hello</b>", parse_mode="HTML")
    second = await app.bot.send_message(-1001234, "group")

    assert first.text == "<b>hello</b>"
    assert first.chat.id == 42
    assert first.chat.type == "private"
    assert second.chat.type == "supergroup"
    assert second.message_id > first.message_id
    [sent] = standin.sent_messages(42)
    assert sent["chat_id"] == 42
    assert sent["text"] == "<b>hello</b>"
    assert sent["parse_mode"] == "HTML"
    assert sent["message_id"] == first.message_id
    assert standin.sent_messages(-1001234)[0]["parse_mode"] is None
    assert len(standin.sent_messages()) == 2


async def test_send_document_uploads_bytes(app: Application, standin: TelegramAPIStandIn):
    payload = bytes(range(256)) * 40 + b"\r\n--boundary\r\n\r\n" + bytes(100)
    message = await app.bot.send_document(
        42, document=payload, filename="backup.sql.zst", caption="nightly backup ✓"
    )

    assert message.document is not None
    assert message.document.file_name == "backup.sql.zst"
    assert message.document.file_size == len(payload)
    assert message.caption == "nightly backup ✓"
    [doc] = standin.sent_documents(42)
    assert doc["data"] == payload
    assert doc["filename"] == "backup.sql.zst"
    assert doc["caption"] == "nightly backup ✓"
    assert standin.calls("sendDocument")[0].files["document"] == ("backup.sql.zst", payload)

    # The file URL serves what was uploaded.
    tg_file = await app.bot.get_file(message.document.file_id)
    assert bytes(await tg_file.download_as_bytearray()) == payload


async def test_oversized_upload_is_rejected(app: Application, standin: TelegramAPIStandIn):
    standin.max_upload_bytes = 1000
    with pytest.raises(NetworkError, match="Request Entity Too Large"):
        await app.bot.send_document(42, document=b"x" * 2000, filename="big.bin")
    [call] = standin.calls("sendDocument")
    assert (call.status, call.upload_bytes) == (413, 2000)
    assert standin.sent_documents() == []


async def test_wrong_token_is_invalid(standin: TelegramAPIStandIn):
    wrong = "999:WRONG-token"
    application = build_app(standin, token=wrong)
    try:
        with pytest.raises(InvalidToken):
            await application.initialize()
    finally:
        await application.bot.shutdown()  # initialize() leaves the HTTP clients open
    [call] = standin.calls()
    assert (call.method, call.status, call.authorized) == ("getMe", 401, False)
    assert call.response == {"ok": False, "error_code": 401, "description": "Unauthorized"}
    assert wrong not in repr(call) and TOKEN not in standin.summary() + repr(standin)


async def test_unknown_method(app: Application, standin: TelegramAPIStandIn):
    with pytest.raises(EndPointNotFound):
        await app.bot.do_api_request("noSuchMethod")
    assert standin.calls("noSuchMethod")[0].status == 404


async def test_raw_http_envelopes(standin: TelegramAPIStandIn):
    async with aiohttp.ClientSession() as http:
        url = f"{standin.base_url}{TOKEN}"
        async with http.get(f"{url}/getMe") as r:
            assert r.status == 200
            body = await r.json()
            assert body["ok"] is True and body["result"]["is_bot"] is True
        async with http.post(f"{url}/sendMessage", json={"chat_id": 7, "text": "json"}) as r:
            assert r.status == 200
        async with http.get(f"{url}/sendMessage", params={"chat_id": "8", "text": "q"}) as r:
            assert r.status == 200
        async with http.post(f"{url}/nope") as r:
            assert r.status == 404
            assert await r.json() == {
                "ok": False,
                "error_code": 404,
                "description": "Not Found: method not found",
            }
        async with http.post(f"{standin.base_url}1:x/getMe") as r:
            assert r.status == 401
    assert [m["text"] for m in standin.sent_messages()] == ["json", "q"]
    assert standin.sent_messages(8)[0]["chat_id"] == 8


async def test_injected_failure_then_success(app: Application, standin: TelegramAPIStandIn):
    standin.fail(times=1, status=500)
    with pytest.raises(NetworkError, match="Internal Server Error"):
        await app.bot.send_message(42, "first")
    await app.bot.send_message(42, "second")

    assert [c.status for c in standin.calls("sendMessage")] == [500, 200]
    assert [m["text"] for m in standin.sent_messages(42)] == ["second"]


async def test_fail_until_recover(app: Application, standin: TelegramAPIStandIn):
    standin.fail("sendMessage", status=502, description="Bad Gateway")
    for _ in range(3):
        with pytest.raises(NetworkError, match="Bad Gateway"):
            await app.bot.send_message(42, "x")
    await app.bot.send_chat_action(42, "typing")  # other methods are unaffected
    standin.recover()
    await app.bot.send_message(42, "ok")
    assert [m["text"] for m in standin.sent_messages()] == ["ok"]


@pytest.mark.filterwarnings("ignore:.*retry_after.*:DeprecationWarning")
async def test_flood_raises_retry_after(app: Application, standin: TelegramAPIStandIn):
    standin.flood("sendMessage", retry_after=7)
    with pytest.raises(RetryAfter) as caught:
        await app.bot.send_message(42, "spam")
    assert seconds(caught.value.retry_after) == 7
    [call] = standin.calls("sendMessage")
    assert call.response["parameters"] == {"retry_after": 7}
    await app.bot.send_message(42, "later")
    assert len(standin.sent_messages(42)) == 1


async def test_delay_makes_the_client_time_out(app: Application, standin: TelegramAPIStandIn):
    standin.delay("sendMessage", 2)
    with pytest.raises(TimedOut):
        await app.bot.send_message(42, "slow", read_timeout=0.05)
    standin.delay("sendMessage", None)
    await app.bot.send_message(42, "fast")
    assert [m["text"] for m in standin.sent_messages()] == ["fast"]


async def test_commands_per_scope(app: Application, standin: TelegramAPIStandIn):
    assert await app.bot.set_my_commands([BotCommand("health", "Check health")])
    chat_scope = BotCommandScopeChat(42)
    assert await app.bot.set_my_commands([BotCommand("backup", "Back up")], scope=chat_scope)

    assert [c.command for c in await app.bot.get_my_commands()] == ["health"]
    assert [c.command for c in await app.bot.get_my_commands(scope=chat_scope)] == ["backup"]
    assert standin.commands({"type": "chat", "chat_id": 42}) == [
        {"command": "backup", "description": "Back up"}
    ]
    assert await app.bot.delete_my_commands(scope=chat_scope)
    assert await app.bot.get_my_commands(scope=chat_scope) == ()
    assert await app.bot.answer_callback_query("123")
    assert await app.bot.log_out()
    assert await app.bot.close()


async def test_get_updates_offset_and_limit(app: Application, standin: TelegramAPIStandIn):
    ids = [standin.push_text(f"m{i}", user_id=5) for i in range(3)]

    first = await app.bot.get_updates(limit=2)
    assert [u.update_id for u in first] == ids[:2]
    rest = await app.bot.get_updates(offset=ids[1] + 1)
    assert [u.update_id for u in rest] == ids[2:]
    assert rest[0].message is not None and rest[0].message.text == "m2"
    assert [u["update_id"] for u in standin.pending_updates()] == ids[2:]
    assert await app.bot.get_updates(offset=ids[2] + 1) == ()
    assert standin.pending_updates() == []


async def test_pushed_updates_parse_in_ptb(app: Application, standin: TelegramAPIStandIn):
    standin.push_command("/backup@dbkeeper_test_bot now", user_id=7, chat_id=-55, chat_type="group")
    standin.push_text("post", user_id=7, chat_id=-1009, chat_type="channel")
    standin.push_callback_query("confirm", user_id=7)

    command, post, query = await app.bot.get_updates()
    assert command.message is not None and command.effective_user is not None
    assert command.message.chat.type == "group" and command.effective_user.id == 7
    assert command.message.parse_entity(command.message.entities[0]) == "/backup@dbkeeper_test_bot"
    assert post.channel_post is not None and post.channel_post.text == "post"
    assert query.callback_query is not None and query.callback_query.data == "confirm"
    assert query.callback_query.message is not None


async def test_long_poll_times_out_empty(standin: TelegramAPIStandIn):
    async with aiohttp.ClientSession() as http:
        url = f"{standin.base_url}{TOKEN}/getUpdates"
        async with http.post(url, data={"timeout": "0.2"}) as r:
            assert await r.json() == {"ok": True, "result": []}
    [call] = standin.calls("getUpdates")
    assert call.params["timeout"] == 0.2


async def test_long_poll_is_woken_by_a_push_from_another_thread(
    app: Application, standin: TelegramAPIStandIn
):
    poll = asyncio.create_task(app.bot.get_updates(timeout=30))
    await standin.wait_for_async(lambda: standin.polls_waiting == 1, timeout=5)
    pusher = threading.Thread(target=standin.push_command, args=("/ping",), kwargs={"user_id": 9})
    pusher.start()
    updates = await asyncio.wait_for(poll, timeout=5)
    pusher.join()
    assert updates[0].message is not None and updates[0].message.text == "/ping"


async def test_second_get_updates_terminates_the_waiting_one(
    app: Application, standin: TelegramAPIStandIn
):
    other = Bot(TOKEN, base_url=standin.base_url)
    async with other:
        first = asyncio.create_task(app.bot.get_updates(timeout=30))
        await standin.wait_for_async(lambda: standin.polls_waiting == 1, timeout=5)
        second = asyncio.create_task(other.get_updates(timeout=30))

        with pytest.raises(Conflict, match="terminated by other getUpdates request"):
            await asyncio.wait_for(first, timeout=5)
        assert standin.conflicts == 1
        await standin.wait_for_async(lambda: standin.polls_waiting == 1, timeout=5)
        update_id = standin.push_text("after", user_id=3)
        assert [u.update_id for u in await asyncio.wait_for(second, timeout=5)] == [update_id]


async def test_get_updates_conflicts_with_a_webhook(app: Application, standin: TelegramAPIStandIn):
    assert await app.bot.set_webhook("https://example.invalid/hook")
    assert (await app.bot.get_webhook_info()).url == "https://example.invalid/hook"
    with pytest.raises(Conflict, match="webhook is active"):
        await app.bot.get_updates()
    assert await app.bot.delete_webhook()
    assert await app.bot.get_updates() == ()


async def test_polling_application_answers_a_command(standin: TelegramAPIStandIn):
    async def health(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.effective_message is not None
        await update.effective_message.reply_text(f"healthy {context.args}")

    application = build_app(standin)
    application.add_handler(CommandHandler("health", health))
    async with application:
        assert application.updater is not None
        await application.updater.start_polling(drop_pending_updates=True)
        await application.start()
        try:
            standin.push_command("/health", user_id=42)
            reply = await standin.wait_for_message_async("healthy", chat_id=42, timeout=5)
            assert reply["text"] == "healthy []"

            standin.push_command(
                "/health@dbkeeper_test_bot now",
                user_id=42,
                chat_id=-100777,
                chat_type="supergroup",
            )
            reply = await standin.wait_for_message_async(
                lambda m: m["text"] == "healthy ['now']", chat_id=-100777, timeout=5
            )
            assert reply["chat_id"] == -100777
        finally:
            await application.updater.stop()
            await application.stop()

    assert standin.pending_updates() == []  # confirmed by the final offset
    assert standin.conflicts == 0
    assert len(standin.sent_messages(42)) == 1


def test_wait_for_times_out_with_a_summary(standin: TelegramAPIStandIn):
    standin.push_text("unanswered", user_id=1)
    with pytest.raises(AssertionError) as caught:
        standin.wait_for_message("never", chat_id=1, timeout=0.05)
    text = str(caught.value)
    assert "a message containing 'never' to chat 1" in text
    assert "updates pending (unconfirmed): 1" in text


def test_wait_for_sees_a_request_from_another_thread(standin: TelegramAPIStandIn):
    def send() -> None:
        request = urllib.request.Request(
            f"{standin.base_url}{TOKEN}/sendMessage",
            data=b"chat_id=5&text=from+a+thread",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200

    thread = threading.Thread(target=send)
    thread.start()
    msg = standin.wait_for_message(lambda m: m["chat_id"] == 5, timeout=5)
    thread.join()
    assert msg["text"] == "from a thread"
    calls = standin.wait_for(lambda: standin.calls("sendMessage"), timeout=1)
    assert calls[0].params == {"chat_id": 5, "text": "from a thread"}
    standin.reset_calls()
    assert standin.calls() == []


async def test_restart_keeps_the_port(app: Application, standin: TelegramAPIStandIn):
    base_url = standin.base_url
    standin.stop()
    assert not standin.running
    with pytest.raises(NetworkError):
        await app.bot.send_message(42, "during the outage")
    standin.start()
    assert standin.base_url == base_url
    await app.bot.send_message(42, "after the outage")
    assert [m["text"] for m in standin.sent_messages()] == ["after the outage"]
