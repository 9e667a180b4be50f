"""Who may run admin commands, and where their answers may be read.

Admin commands answer with the bot's internals (schema, table sizes, backups) and start work
(a backup), so the rule is narrow: the sender must be in ``[telegram] admin_ids`` and the chat
must be private or the configured alert chat. In any other group an admin's answer would be
read by every member, so the command is refused there too.

The rule is a PTB filter on each admin command's handler, so an update it does not match goes
on to every other handler: the bot's own ``/start`` or a command of the same name in the bot's
group. Refusals get no answer (nothing to learn from probing the bot) and a log line with the
user and chat ids, at a bounded rate: a stranger sending 300 commands costs a few lines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from telegram import Chat, Update
from telegram.ext import BaseHandler, CommandHandler, ContextTypes, filters

log = logging.getLogger("dbkeeper.admin")
Callback = Callable[[Update, Any], Coroutine[Any, Any, Any]]
REFUSALS_LOGGED_PER_MINUTE = 10


class RateLimitedLog:
    """At most ``limit`` lines per ``period`` seconds; then one line saying how many were left
    out, when the period is over and the next one is logged."""

    def __init__(
        self,
        logger: logging.Logger,
        limit: int = REFUSALS_LOGGED_PER_MINUTE,
        period: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.limit = limit
        self.period = period
        self._clock = clock
        self._window_start = -period
        self._in_window = 0
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = self._clock()
        if now - self._window_start >= self.period:
            if self._suppressed:
                self.logger.warning(
                    "%d more refusals in the last %.0fs were not logged one by one",
                    self._suppressed,
                    now - self._window_start,
                )
            self._window_start, self._in_window, self._suppressed = now, 0, 0
        if self._in_window < self.limit:
            self._in_window += 1
            self.logger.warning(message, *args)
        else:
            self._suppressed += 1


class AdminGuard:
    def __init__(self, admin_ids: Iterable[int], alert_chat_id: int = 0) -> None:
        self.admin_ids = frozenset(admin_ids)
        self.alert_chat_id = alert_chat_id
        self.menu: list[tuple[str, str]] = []  # (command, description) for the admins' menu
        self.refusals = RateLimitedLog(log)
        chats: filters.BaseFilter = filters.ChatType.PRIVATE
        if alert_chat_id:
            chats = chats | filters.Chat(chat_id=alert_chat_id)
        # An empty filters.User matches nobody: with no admins every command is refused.
        self.filter: filters.BaseFilter = filters.User(user_id=self.admin_ids) & chats

    @property
    def has_admins(self) -> bool:
        return bool(self.admin_ids)

    def refusal(self, update: Update) -> str | None:
        """Why ``update`` may not run an admin command; None when it may."""
        user, chat = update.effective_user, update.effective_chat
        if user is None or chat is None:
            return "no sender"
        if user.id not in self.admin_ids:
            return "not an admin" if self.admin_ids else "no admins configured"
        if chat.type != Chat.PRIVATE and chat.id != self.alert_chat_id:
            return "admin commands are answered in private chats and the alert chat only"
        return None

    def command(self, name: str, callback: Callback) -> list[BaseHandler[Any, Any, Any]]:
        """Handlers for ``/name``: the admin's (filtered), then the refusal's log line.

        Only new messages count (an edited ``/backup`` does not start a second backup), and the
        handler does not block: a slow command never stops the bot answering others.
        """
        new_messages = filters.UpdateType.MESSAGE

        async def refuse(update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
            user, chat = update.effective_user, update.effective_chat
            self.refusals.warning(
                "refused /%s from user %s in chat %s (%s): %s",
                name,
                user.id if user else "?",
                chat.id if chat else "?",
                chat.type if chat else "?",
                self.refusal(update) or "not allowed",
            )

        return [
            CommandHandler(name, callback, filters=new_messages & self.filter, block=False),
            CommandHandler(name, refuse, filters=new_messages, block=False),
        ]

    def warn_if_no_admins(self) -> None:
        if not self.admin_ids:
            commands = ", ".join(f"/{command}" for command, _ in self.menu) or "none yet"
            log.warning(
                "[telegram] admin_ids is empty: every admin command (%s) is refused; add your "
                "Telegram user id to use them",
                commands,
            )
