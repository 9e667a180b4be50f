"""The members feature: who talks to the bot, in which chats; and a greeting for everyone.

It is the example plugin to copy: it declares a config section and its tables (``metadata``,
so the database plugin validates them), adds its handlers through its context, and does all its
database work through the database dbkeeper publishes (``context.bot_data[BOT_DATA_KEY]``),
off the event loop, so a restore pauses it and hands it the restored database.

Every update records its user and chat (a write per update: a real write load); commands are
also logged as events. ``/start`` greets anyone; ``/help`` lists the commands (the admin ones
for admins only).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, ClassVar

from dbkeeper.config import setting
from dbkeeper.plugin import Plugin, PluginContext
from dbkeeper.plugins.database import BOT_DATA_KEY
from dbkeeper.texts import escape

from .models import Chat, Event, User, metadata

if TYPE_CHECKING:
    # Every `dbkeeper` command imports each plugin's module (for its config section and its
    # sub-commands): PTB, which only the running bot needs, is imported in ``setup``.
    from sqlalchemy.orm import Session
    from telegram import Update
    from telegram.ext import ContextTypes

log = logging.getLogger("dbkeeper.members")
PUBLIC_COMMANDS = [("start", "Say hello"), ("help", "What I can do")]


def _greeting(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


@dataclass(frozen=True)
class MembersSettings:
    greeting: str = setting(
        "Hello, {first_name}! I am a bot whose database dbkeeper keeps alive.",
        _greeting,
        doc="what /start answers; {first_name} is the user's first name",
    )
    record_events: bool = setting(True, doc="log every command as a row of events")


class MembersPlugin(Plugin):
    name = "members"
    sections: ClassVar[Mapping[str, type]] = {"members": MembersSettings}
    metadata = metadata

    def setup(self, context: PluginContext) -> None:
        self.context = context
        self.settings = context.section(MembersSettings)
        if not context.telegram_enabled:
            return
        from telegram import Update
        from telegram.ext import CommandHandler, TypeHandler

        # Recording sees every update, in a group of its own: it never keeps another handler
        # (this plugin's or the bot's) from answering.
        context.add_handler(TypeHandler(Update, self.record, block=False), group=0)
        context.add_handler(CommandHandler("start", self.greet, block=False), group=1)
        context.add_handler(CommandHandler("help", self.show_help, block=False), group=1)

    async def record(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        user, chat, message = update.effective_user, update.effective_chat, update.message
        if user is None and chat is None:
            return
        command = None
        if message is not None and message.text and message.text.startswith("/"):
            command = message.text.split()[0][1:].split("@")[0][:32]
        now = datetime.now(UTC)

        def write(session: Session) -> None:
            if user is not None:
                session.merge(
                    User(
                        id=user.id,
                        username=user.username,
                        first_name=(user.first_name or "")[:64],
                        last_name=user.last_name,
                        language_code=user.language_code,
                        last_seen_at=now,
                    )
                )
            if chat is not None:
                session.merge(Chat(id=chat.id, type=chat.type, title=chat.title))
                if command and self.settings.record_events:
                    session.add(
                        Event(
                            chat_id=chat.id,
                            user_id=user.id if user is not None else None,
                            kind="command",
                            payload=command,
                            created_at=now,
                        )
                    )

        try:
            await context.bot_data[BOT_DATA_KEY].run(write)
        except Exception as error:  # recording must never break the bot's answers
            log.warning("could not record update %s: %s", update.update_id, error)

    async def greet(self, update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
        user, message = update.effective_user, update.effective_message
        if message is None:
            return
        name = user.first_name if user is not None else "there"
        await message.reply_text(self.settings.greeting.format(first_name=name), do_quote=False)

    async def show_help(self, update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user = update.effective_message, update.effective_user
        if message is None:
            return
        lines = ["<b>Commands</b>"]
        lines += [f"/{command} — {escape(text)}" for command, text in PUBLIC_COMMANDS]
        if user is not None and self.context.is_admin(user.id):
            lines.append("<b>For admins</b> (dbkeeper keeps this bot's database alive)")
            lines += [f"/{c} — {escape(text)}" for c, text in self.context.admin_commands]
        await message.reply_text("\n".join(lines), parse_mode="HTML", do_quote=False)


plugin = MembersPlugin
__all__ = ["MembersPlugin", "MembersSettings", "plugin"]
