"""The ``telegram_api`` health check: can the bot reach the Bot API, and how fast.

Each run makes one ``getMe`` call (initializing the bot first if the application has not
connected yet). An unreachable Bot API makes the check *degraded*, not unhealthy: the
database, which dbkeeper keeps, is fine, and a readiness probe must not take the instance out
of service for an outage of Telegram's that no restart can fix.
"""

from __future__ import annotations

import time

from telegram import Bot
from telegram.error import InvalidToken

from dbkeeper.health import Outcome, degraded, describe, healthy, unhealthy
from dbkeeper.texts import duration


class TelegramAPICheck:
    def __init__(self, bot: Bot) -> None:
        self.bot = bot
        self.last_contact: float | None = None  # monotonic time of the last answer

    async def __call__(self) -> Outcome:
        started = time.monotonic()
        try:
            await self.bot.initialize()
            me = await self.bot.get_me()
        except InvalidToken:
            return unhealthy("the Bot API rejected the token; check [telegram] token")
        except Exception as error:
            since = (
                f"last successful contact {duration(started - self.last_contact)} ago"
                if self.last_contact is not None
                else "no successful contact since startup"
            )
            return degraded(f"unreachable ({describe(error)}); {since}")
        self.last_contact = time.monotonic()
        latency = (self.last_contact - started) * 1000
        return healthy(
            f"reachable as @{me.username}",
            latency_ms=latency,
            values={"round_trip_seconds": latency / 1000},
        )
