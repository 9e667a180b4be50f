"""Who may run admin commands, and where their answers may be read.

Admin commands answer with the bot's internals (schema, table sizes, backups) and start work
(a backup), so the rule is narrow: the sender must be in ``[telegram] admin_ids`` and the chat
must be private or the configured alert chat. In any other group an admin's answer would be
read by every member, so the command is refused there too. Refusals get no answer at all
(nothing to learn from probing the bot) and one log line with the user and chat ids.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from telegram import Chat, Update
from telegram.ext import CommandHandler, ContextTypes, filters

log = logging.getLogger("dbkeeper.admin")
Callback = Callable[[Update, ContextTypes.DEFAULT_TYPE], Awaitable[Any]]


class AdminGuard:
    def __init__(self, admin_ids: Iterable[int], alert_chat_id: int = 0) -> None:
        self.admin_ids = frozenset(admin_ids)
        self.alert_chat_id = alert_chat_id

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

    def command(self, name: str, callback: Callback) -> CommandHandler:
        """A handler for ``/name`` that runs ``callback`` only for admins in allowed chats.

        Only new messages count (an edited ``/backup`` does not start a second backup), and the
        handler does not block: a slow command never stops the bot answering others.
        """

        async def guarded(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            reason = self.refusal(update)
            if reason is not None:
                user, chat = update.effective_user, update.effective_chat
                log.warning(
                    "refused /%s from user %s in chat %s (%s): %s",
                    name,
                    user.id if user else "?",
                    chat.id if chat else "?",
                    chat.type if chat else "?",
                    reason,
                )
                return
            await callback(update, context)

        return CommandHandler(name, guarded, filters=filters.UpdateType.MESSAGE, block=False)

    def warn_if_no_admins(self) -> None:
        if not self.admin_ids:
            log.warning(
                "[telegram] admin_ids is empty: every admin command (/backup, /health, /dbstats) "
                "is refused; add your Telegram user id to use them"
            )
