"""Who leads among several instances of one bot: the service the host and its plugins ask.

The leader does what must happen once per bot, not once per instance: scheduled and shutdown
backups, alerts, and (in polling mode) taking Telegram updates. The host only asks; a plugin
that can elect (the database plugin, through a lease in the shared database) provides the
election with ``PluginContext.provide_leadership``. Without one, this instance leads alone.

``is_leader`` is true only while this instance may act as the leader *now*: an election may
turn it false on its own (a lease that ran out) before the ``on_change`` callbacks run, so
whatever acts for the leader asks it right before acting.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Protocol

ChangeCallback = Callable[[bool], Awaitable[None]]


class LeaderElection(Protocol):
    @property
    def is_leader(self) -> bool:
        """Whether this instance may act as the leader right now."""

    @property
    def leader(self) -> str | None:
        """The leading instance's name, as last seen (None: nobody, or unknown)."""

    @property
    def sends_alerts(self) -> bool:
        """Whether this instance sends the alerts: the leader does, and so does a leader cut
        off from the election until it learns whether another took over (an outage of the
        shared database is then reported by it, not by nobody)."""

    @property
    def margin_seconds(self) -> float:
        """How long before a standby may take over a leader that stopped confirming has
        stopped acting: anything the leader starts (a long poll) must end within this."""

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

    @property
    def sends_alerts(self) -> bool:
        return True

    @property
    def margin_seconds(self) -> float:
        return math.inf

    def on_change(self, callback: ChangeCallback) -> None:
        pass
