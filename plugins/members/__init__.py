"""The members feature (dbkeeper's example plugin): users, chats, chat settings, events."""

from .plugin import MembersPlugin, MembersSettings

plugin = MembersPlugin
__all__ = ["MembersPlugin", "MembersSettings", "plugin"]
