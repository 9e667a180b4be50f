"""dbkeeper in a bot that keeps PTB's own ``run_polling()``: the bot's settings stay its own,
dbkeeper starts in ``post_init`` and stops in ``post_stop``, and the bot's hooks still run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dbkeeper.config import settings_from_mapping
from tests.support.hosts import free_port
from tests.support.telegram_api import DEFAULT_TOKEN, TelegramAPIStandIn


def test_run_polling_brings_dbkeeper_up_and_down_with_the_bots_settings_and_hooks(
    tmp_path: Path,
) -> None:
    from telegram.ext import AIORateLimiter, ApplicationBuilder, CommandHandler

    import dbkeeper

    seen: list[str] = []
    states: dict[str, Any] = {}

    async def own_post_init(application: Any) -> None:
        seen.append("post_init")
        states["at post_init"] = host.state
        states["database"] = (tmp_path / "data" / "bot.db").is_file()

    async def ping(update: Any, context: Any) -> None:  # the bot's own handler
        await update.effective_message.reply_text("pong")
        context.application.stop_running()

    async def own_post_stop(_application: Any) -> None:
        seen.append("post_stop")
        states["at post_stop"] = host.state  # the bot's hook runs before dbkeeper stops

    async def own_post_shutdown(_application: Any) -> None:
        seen.append("post_shutdown")

    limiter = AIORateLimiter(max_retries=1)
    with TelegramAPIStandIn() as api:
        application = (
            ApplicationBuilder()
            .token(DEFAULT_TOKEN)
            .base_url(api.base_url)
            .rate_limiter(limiter)
            .post_init(own_post_init)
            .post_stop(own_post_stop)
            .post_shutdown(own_post_shutdown)
            .build()
        )
        application.add_handler(CommandHandler("ping", ping))
        base_url = application.bot.base_url
        settings = settings_from_mapping(
            {
                "database": {"url": f"sqlite:///{tmp_path / 'data' / 'bot.db'}"},
                "backup": {"dir": str(tmp_path / "backups")},
                "health": {"http_port": free_port()},
            },
            environ={},
            embedded=True,
        )
        host = dbkeeper.install(application, settings=settings)
        api.push_command("/ping", user_id=7)
        application.run_polling(stop_signals=None, close_loop=False)
        # It polled the stand-in at the bot's own base URL, and the bot's handler answered.
        assert [m["text"] for m in api.sent_messages(7)] == ["pong"]

    assert seen == ["post_init", "post_stop", "post_shutdown"]
    assert states == {"at post_init": "running", "database": True, "at post_stop": "running"}
    assert host.state != "running"
    assert application.bot.base_url == base_url and application.bot.rate_limiter is limiter
    backups = [p.name for p in (tmp_path / "backups").iterdir() if p.name.startswith("bot-db-")]
    assert any(name.endswith(".manifest.json") for name in backups)  # the shutdown backup
