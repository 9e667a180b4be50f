"""The host: what plugins plug into, and the order in which they start and stop."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from telegram.ext import Application, JobQueue

from bot.config import Settings
from bot.plugin import Deadline, Plugin, StartupError

log = logging.getLogger("dbkeeper.host")


class Host:
    """Settings, the PTB application and its job queue, and the plugins.

    Plugins start in the order given and stop in the reverse order, so the database plugin,
    given first, is ready before anything that needs it and closes after all of them.
    """

    def __init__(
        self, settings: Settings, application: Application, plugins: Sequence[Plugin] = ()
    ) -> None:
        self.settings = settings
        self.application = application
        self.plugins: list[Plugin] = []
        self._started: list[Plugin] = []
        for plugin in plugins:
            self.add(plugin)

    @property
    def telegram_enabled(self) -> bool:
        return not self.settings.local_mode

    @property
    def job_queue(self) -> JobQueue:
        job_queue = self.application.job_queue
        if job_queue is None:  # pragma: no cover - the dependency carries the extra
            raise RuntimeError("python-telegram-bot was installed without its job-queue extra")
        return job_queue

    async def alert(self, text: str, *, key: str | None = None) -> None:
        """Tell the admins about a problem (failed backup, failed migration, ...).

        The health issue replaces this with the alerter (Telegram, or the log in local mode);
        ``key`` groups repeats of the same problem.
        """
        log.warning("alert%s: %s", f" [{key}]" if key else "", text)

    def add(self, plugin: Plugin) -> None:
        self.plugins.append(plugin)
        plugin.setup(self)

    async def start(self) -> None:
        """Start every plugin in order; if one fails, stop those already started and re-raise."""
        for plugin in self.plugins:
            try:
                await plugin.start()
            except BaseException:
                await self.stop(Deadline.after(self.settings.shutdown.timeout_seconds))
                raise
            self._started.append(plugin)

    async def stop(self, deadline: Deadline) -> None:
        """Stop started plugins in reverse order; one failing does not keep the others running."""
        while self._started:
            plugin = self._started.pop()
            try:
                await plugin.stop(deadline)
            except Exception:
                log.exception("plugin %s did not stop cleanly", plugin.name)


__all__ = ["Host", "StartupError"]
