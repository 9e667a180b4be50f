"""The host: what plugins plug into, and the order in which they start and stop."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Literal

from dbkeeper.admin import AdminGuard
from dbkeeper.alerts import Alerter
from dbkeeper.config import Settings
from dbkeeper.health import HealthRegistry
from dbkeeper.http_api import HealthServer
from dbkeeper.logs import SECRETS
from dbkeeper.metrics import Metrics
from dbkeeper.monitor import HealthMonitor
from dbkeeper.plugin import Deadline, Plugin, StartupError
from dbkeeper.telegram_check import TelegramAPICheck
from telegram.ext import Application, JobQueue

if TYPE_CHECKING:
    from dbkeeper.plugins.database.leader import Leadership

log = logging.getLogger("dbkeeper.host")


State = Literal["starting", "running", "stopping", "stopped"]


class Host:
    """Settings, the PTB application and its job queue, the plugins, and the health side.

    Plugins start in the order given and stop in the reverse order, so the database plugin,
    given first, is ready before anything that needs it and closes after all of them.

    Health: plugins add checks to ``health`` (the registry) in ``setup``; ``monitor`` runs
    them, ``alerts`` tells the admins, ``metrics`` and ``http`` serve the results.
    """

    def __init__(
        self, settings: Settings, application: Application, plugins: Sequence[Plugin] = ()
    ) -> None:
        SECRETS.add(*settings.secrets())  # redacted from every answer, message and log line
        self.settings = settings
        self.application = application
        self.plugins: list[Plugin] = []
        self._started: list[Plugin] = []
        self.state: State = "starting"
        self._born = time.monotonic()
        self.health = HealthRegistry(timeout=settings.health.check_timeout_seconds)
        self.monitor = HealthMonitor(self.health, settings.health)
        self.instance = settings.instance.display_name
        self.alerts = Alerter(
            settings, application.bot if self.telegram_enabled else None, source=self.instance
        )
        self.monitor.add_listener(self.alerts.observe)
        self.metrics = Metrics(self.monitor, self.alerts)
        self.http = HealthServer(self)
        self.admin = AdminGuard(settings.telegram.admin_ids, settings.telegram.alert_chat_id)
        self.leadership: Leadership | None = None  # set when instances elect a leader
        self._telegram_ready: list[Callable[[], Awaitable[None]]] = []
        if self.telegram_enabled:
            self.health.add("telegram_api", TelegramAPICheck(application.bot))
        for plugin in plugins:
            self.add(plugin)

    @property
    def telegram_enabled(self) -> bool:
        return not self.settings.local_mode

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._born

    @property
    def job_queue(self) -> JobQueue:
        job_queue = self.application.job_queue
        if job_queue is None:  # pragma: no cover - the dependency carries the extra
            raise RuntimeError("python-telegram-bot was installed without its job-queue extra")
        return job_queue

    async def alert(self, text: str, *, key: str | None = None) -> None:
        """Tell the admins about a problem (failed backup, failed migration, ...).

        Returns at once: delivery (Telegram, or the log in local mode) happens in the
        background. ``key`` groups repeats of the same problem: within
        ``[health] alert_repeat_seconds`` only the first is sent.
        """
        await self.alerts.alert(text, key=key)

    @property
    def is_leader(self) -> bool:
        return self.leadership is None or self.leadership.is_leader

    @property
    def leader(self) -> str | None:
        """The leading instance's name (this one's without an election)."""
        return self.instance if self.leadership is None else self.leadership.leader

    def set_leadership(self, leadership: Leadership) -> None:
        """Only the leader alerts from now on; standbys log what they would have sent."""
        self.leadership = leadership
        self.alerts.standing_by = lambda: (
            None if leadership.is_leader else (leadership.leader or "another instance")
        )

    def describe_instance(self) -> str:
        """Which instance answers and which one leads, for chat answers."""
        if self.is_leader:
            return f"answered by {self.instance} (the leader)"
        return f"answered by {self.instance}; {self.leader or 'no instance'} leads"

    def on_telegram_ready(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` once the Bot API is reachable (command menus and the like)."""
        self._telegram_ready.append(callback)

    async def telegram_ready(self) -> None:
        for callback in self._telegram_ready:
            try:
                await callback()
            except Exception:
                log.exception("a Telegram start-up step failed; the bot runs on")

    def add(self, plugin: Plugin) -> None:
        self.plugins.append(plugin)
        plugin.setup(self)

    async def start(self) -> None:
        """HTTP API, then every plugin in order, then the health checks (the first one starts
        at once, in the background).

        The HTTP API binds first so that a port in use stops startup before any migration;
        ``/readyz`` answers 503 until the plugins have started. If anything fails, what was
        started is stopped again and the error re-raised.
        """
        try:
            await self.http.start()
            for plugin in self.plugins:
                await plugin.start()
                self._started.append(plugin)
            self.state = "running"
            self.monitor.start(self.job_queue)
        except BaseException:
            await self.stop(Deadline.after(self.settings.shutdown.timeout_seconds))
            raise

    async def stop(self, deadline: Deadline) -> None:
        """Health checks stop, plugins stop in reverse order, queued alerts are delivered
        (until ``deadline``), and the HTTP API closes last."""
        self.state = "stopping"
        await self.monitor.stop()
        log.info("shutdown: health monitor stopped")
        while self._started:
            plugin = self._started.pop()
            try:
                await plugin.stop(deadline)
            except Exception:
                log.exception("plugin %s did not stop cleanly", plugin.name)
        await self.alerts.close(deadline)
        await self.http.stop()
        self.state = "stopped"


__all__ = ["Host", "StartupError"]
