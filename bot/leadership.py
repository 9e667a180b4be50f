"""Who leads among several instances of one bot: the service the host and its plugins ask.

The leader does what must happen once per bot, not once per instance: scheduled and shutdown
backups, alerts, and (in polling mode) taking Telegram updates. The host only asks; a plugin
that can elect (the database plugin, through a lock in the shared database) provides the
election with ``PluginContext.provide_leadership``. Without one, this instance leads alone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

ChangeCallback = Callable[[bool], Awaitable[None]]


class LeaderElection(Protocol):
    @property
    def is_leader(self) -> bool:
        """Whether this instance leads right now."""

    @property
    def leader(self) -> str | None:
        """The leading instance's name, as last seen (None: nobody, or unknown)."""

    def on_change(self, callback: ChangeCallback) -> None:
        """Call ``callback(is_leader)`` whenever this instance gains or loses leadership."""


class SingleInstance:
    """No election: this instance leads, always."""

    def __init__(self, instance: str) -> None:
        self.instance = instance

    @property
    def is_leader(self) -> bool:
        return True

    @property
    def leader(self) -> str | None:
        return self.instance

    def on_change(self, callback: ChangeCallback) -> None:
        pass
