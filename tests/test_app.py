"""The application dbkeeper builds: getUpdates reaches Telegram only while the gate allows."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from dbkeeper.app import AnyApplication, build_application, gate_updates
from dbkeeper.config import settings_from_mapping
from tests.support.telegram_api import DEFAULT_TOKEN, TelegramAPIStandIn


@pytest.fixture
async def bot_app() -> AsyncIterator[tuple[AnyApplication, TelegramAPIStandIn]]:
    with TelegramAPIStandIn() as api:
        raw = {"telegram": {"token": DEFAULT_TOKEN, "api_base_url": api.base_url}}
        application = build_application(settings_from_mapping(raw, environ={}))
        await application.bot.initialize()
        try:
            yield application, api
        finally:
            await application.bot.shutdown()


async def test_get_updates_never_reaches_telegram_while_the_gate_is_closed(
    bot_app: tuple[AnyApplication, TelegramAPIStandIn],
) -> None:
    application, api = bot_app
    leading = False
    assert gate_updates(application, lambda: leading)
    api.push_command("/health", user_id=1)
    assert await application.bot.get_updates(timeout=0) == ()
    assert api.calls("getUpdates") == []  # a standby's call never left the process
    leading = True
    updates = await application.bot.get_updates(timeout=0)
    assert [u.message.text for u in updates if u.message] == ["/health"]


async def test_updates_that_arrive_after_the_lead_was_lost_are_left_to_the_leader(
    bot_app: tuple[AnyApplication, TelegramAPIStandIn],
) -> None:
    """Asked before the request (leading) and again when the answer came (not any more, as
    after a pause past the lease): the updates are dropped, unconfirmed, for the new leader."""
    application, api = bot_app
    answers = iter([True, False])
    allows: Callable[[], bool] = lambda: next(answers)  # noqa: E731
    gate_updates(application, allows)
    api.push_command("/health", user_id=1)
    assert await application.bot.get_updates(timeout=0) == ()
    assert len(api.calls("getUpdates")) == 1
    assert len(api.pending_updates()) == 1  # still Telegram's to hand out


def test_an_application_built_elsewhere_is_left_alone() -> None:
    from telegram.ext import ApplicationBuilder

    application = ApplicationBuilder().token(DEFAULT_TOKEN).build()
    assert not gate_updates(application, lambda: False)
