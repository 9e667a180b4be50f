"""What a plugin is: something the host sets up, starts in order and stops in reverse order."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dbkeeper.host import Host


@dataclass(frozen=True)
class Deadline:
    """A point in time work must finish by (monotonic clock); shared by every shutdown step."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0


class StartupError(Exception):
    """A plugin could not start; the message says what happened and what to do."""


class Plugin:
    """Base class of plugins. ``setup`` only registers things; I/O belongs in ``start``."""

    name = "plugin"

    def setup(self, host: Host) -> None:
        """Register handlers, jobs and health checks with the host (no I/O)."""

    async def start(self) -> None:
        """Become ready: connect, migrate, schedule. Raise ``StartupError`` to stop startup."""

    async def stop(self, deadline: Deadline) -> None:
        """Finish work and release resources before ``deadline``."""
