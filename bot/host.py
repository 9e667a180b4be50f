"""The host: what plugins plug into, and the order in which they start and stop.

The host owns the PTB application and its job queue, the health side (registry, monitor,
alerts, metrics, HTTP API), the admin rule and the leadership service. Each plugin gets a
:class:`~dbkeeper.plugin.PluginContext` onto these, never the host itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

from telegram.ext import Application, ContextTypes, JobQueue

from dbkeeper.admin import AdminGuard
from dbkeeper.alerts import Alerter
from dbkeeper.config import Settings
from dbkeeper.health import HealthRegistry, HealthReport, Status, describe
from dbkeeper.http_api import HealthServer
from dbkeeper.leadership import LeaderElection, SingleInstance
from dbkeeper.logs import SECRETS
from dbkeeper.metrics import Metrics
from dbkeeper.monitor import HealthMonitor
from dbkeeper.plugin import (
    GROUPS_PER_PLUGIN,
    Deadline,
    Job,
    Plugin,
    PluginContext,
    StartupError,
    StartupInterrupted,
)
from dbkeeper.status_page import StatusPage
from dbkeeper.systemd import SystemdNotifier
from dbkeeper.telegram_check import TelegramAPICheck

log = logging.getLogger("dbkeeper.host")
# PTB handler groups of the plugins (10 each): after the bot's own (group 0 and up to 99).
HANDLER_GROUP_BASE = 100

State = Literal["starting", "running", "stopping", "stopped"]
# run: the bot (dbkeeper run, or embedded in a bot); check: one health check from the command
# line (plugins register their checks, nothing is started, nothing runs in the background).
Mode = Literal["run", "check"]


class Host:
    """Settings, the PTB application and its job queue, the plugins, and the health side.

    Plugins start in ``order`` (the database plugin first, ready before anything that needs it)
    and stop in reverse order (the database plugin last).
    """

    def __init__(
        self,
        settings: Settings,
        application: Application[Any, Any, Any, Any, Any, Any],
        plugins: Sequence[Plugin] | None = None,
        *,
        mode: Mode = "run",
    ) -> None:
        SECRETS.add(*settings.secrets())  # redacted from every answer, message and log line
        self.settings = settings
        self.application = application
        self.mode = mode
        if plugins is None:
            plugins = [cls() for cls in settings.plugins]
        self.plugins: list[Plugin] = sorted(plugins, key=lambda plugin: plugin.order)
        self._started: list[Plugin] = []
        self.state: State = "starting"
        self._stop_deadline: Deadline | None = None  # set by a stop requested while starting
        self._born = time.monotonic()
        self.instance = settings.instance.display_name
        self.leadership: LeaderElection = SingleInstance(self.instance)
        self._leadership_provided = False
        self.health = HealthRegistry(timeout=settings.health.check_timeout_seconds)
        self.monitor = HealthMonitor(self.health, settings.health)
        self.alerts = Alerter(
            settings, application.bot if self.telegram_enabled else None, source=self.instance
        )
        self.alerts.standing_by = self._standing_by
        self.monitor.add_listener(self.alerts.observe)
        self.systemd = SystemdNotifier()
        self.monitor.add_listener(self._tell_systemd)
        self.metrics = Metrics(self.monitor, self.alerts)
        self.status = StatusPage(self)
        self.http = HealthServer(self)
        self.admin = AdminGuard(settings.telegram.admin_ids, settings.telegram.alert_chat_id)
        self._telegram_ready: list[Callable[[], Awaitable[None]]] = []
        self._published: dict[str, Any] = {}
        # An embedding bot's own post_init/post_stop/post_shutdown (see dbkeeper.embed).
        self.bot_hooks: dict[str, Callable[[Any], Awaitable[None]]] = {}
        if self.telegram_enabled:
            self.health.add("telegram_api", TelegramAPICheck(application.bot))
            self.on_telegram_ready(self._register_admin_menu)
        for index, plugin in enumerate(self.plugins):
            group = HANDLER_GROUP_BASE + index * GROUPS_PER_PLUGIN
            plugin.setup(PluginContext(self, plugin, group))
        if self.telegram_enabled and self.admin.menu:
            self.admin.warn_if_no_admins()

    @property
    def telegram_enabled(self) -> bool:
        return not self.settings.local_mode

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._born

    @property
    def job_queue(self) -> JobQueue[Any]:
        job_queue = self.application.job_queue
        if job_queue is None:
            raise StartupError(
                "the PTB application has no job queue: build it with the job queue (the "
                "python-telegram-bot[job-queue] extra, and no .job_queue(None))"
            )
        return job_queue

    # -- what plugins ask for (through their context) ---------------------------------------------

    async def alert(self, text: str, *, key: str | None = None) -> None:
        """Tell the admins; returns at once (delivery happens in the background)."""
        await self.alerts.alert(text, key=key)

    @property
    def is_leader(self) -> bool:
        return self.leadership.is_leader

    @property
    def leader(self) -> str | None:
        return self.leadership.leader

    def set_leadership(self, election: LeaderElection) -> None:
        if self._leadership_provided:
            raise RuntimeError("a leader election is already provided by another plugin")
        self._leadership_provided = True
        self.leadership = election

    def _standing_by(self) -> str | None:
        """Only the leader alerts (or a leader cut off from the election, for the outage it
        sees); standbys log what they would have sent."""
        if self.leadership.sends_alerts:
            return None
        return self.leadership.leader or "another instance"

    def _tell_systemd(self, report: HealthReport) -> None:
        """READY=1 at the moment ``/readyz`` would first answer 200."""
        if self.state == "running" and not self.systemd.ready and not self.not_ready(report):
            self.systemd.ready_now(f"{report.status.value}; {self.describe_instance()}")

    def not_ready(self, report: HealthReport | None) -> dict[str, str]:
        """The readiness checks that fail (check -> message); empty: ready (``/readyz``)."""
        failing = {}
        for name in self.health.readiness_names:
            check = report.checks.get(name) if report is not None else None
            if check is None or check.status is Status.UNHEALTHY:
                failing[name] = check.message if check is not None else "not checked yet"
        return failing

    def describe_instance(self) -> str:
        """Which instance answers and which one leads, for chat answers."""
        if self.is_leader:
            return f"answered by {self.instance} (the leader)"
        return f"answered by {self.instance}; {self.leader or 'no instance'} leads"

    def on_telegram_ready(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` once the Bot API is reachable (command menus and the like)."""
        self._telegram_ready.append(callback)

    async def telegram_ready(self) -> None:
        self._apply_publications()  # the application's initialize may have replaced bot_data
        for callback in self._telegram_ready:
            try:
                await callback()
            except Exception:
                log.exception("a Telegram start-up step failed; the bot runs on")

    def publish(self, key: str, value: Any) -> None:
        self._published[key] = value
        self._apply_publications()

    def _apply_publications(self) -> None:
        for key, value in self._published.items():
            self.application.bot_data[key] = value

    def add_job(
        self, owner: str, job: Job, *, name: str, interval: float | None, first: float | None
    ) -> None:
        queue = self.job_queue
        if queue.get_jobs_by_name(name):
            return

        async def run(_context: ContextTypes.DEFAULT_TYPE) -> None:
            try:
                await job()
            except Exception as error:
                log.exception("job %s of plugin %s failed", name, owner)
                await self.alert(f"{owner}: the job {name} failed: {describe(error)}", key=name)

        if interval is None:
            queue.run_once(run, when=first or 0, name=name)
            return
        queue.run_repeating(
            run,
            interval=interval,
            first=first if first is not None else interval,
            name=name,
            job_kwargs={
                "max_instances": 1,
                "coalesce": True,
                "misfire_grace_time": max(1, round(interval)),
            },
        )

    def remove_jobs(self, name: str) -> None:
        queue = self.application.job_queue
        if queue is None:
            return
        for job in queue.get_jobs_by_name(name):
            job.schedule_removal()

    async def _register_admin_menu(self) -> None:
        """The admin commands in the admins' chats only, after the bot's own menu."""
        from telegram import BotCommand, BotCommandScopeChat, BotCommandScopeChatMember
        from telegram.error import TelegramError

        if not self.admin.menu or not self.admin.admin_ids:
            return
        bot = self.application.bot
        try:
            own = list(await bot.get_my_commands())  # the bot's menu for everyone
        except TelegramError as error:
            log.warning("could not read the bot's command menu: %s", error)
            own = []
        ours = {command for command, _ in self.admin.menu}
        menu = [c for c in own if c.command not in ours]
        menu += [BotCommand(command, description) for command, description in self.admin.menu]
        admins = sorted(self.admin.admin_ids)
        scopes: list[BotCommandScopeChat | BotCommandScopeChatMember] = [
            BotCommandScopeChat(admin) for admin in admins
        ]
        alert_chat = self.admin.alert_chat_id
        if alert_chat and alert_chat not in self.admin.admin_ids:
            scopes += [BotCommandScopeChatMember(alert_chat, admin) for admin in admins]
        for scope in scopes:
            try:
                await bot.set_my_commands(menu, scope=scope)
            except TelegramError as error:
                log.warning("could not register the command menu for %s: %s", scope.type, error)

    # -- start and stop ----------------------------------------------------------------------------

    async def start(self) -> None:
        """HTTP API, then every plugin in order, then the health checks (the first one starts
        at once, in the background).

        The HTTP API binds first so that a port in use stops startup before any migration;
        ``/readyz`` answers 503 until the plugins have started. If anything fails, what was
        started is stopped again and the error re-raised.
        """
        try:
            self.job_queue  # noqa: B018 - fails early, naming the missing job queue
            await self.http.start()
            for plugin in self.plugins:
                if self._stop_deadline is not None:  # interrupted: start nothing more
                    raise StartupInterrupted(f"stopped before plugin {plugin.name} started")
                await plugin.start()
                self._started.append(plugin)
            self._apply_publications()
            self.state = "running"
            self.monitor.start(self.job_queue)
        except BaseException:
            deadline = self._stop_deadline
            await self.stop(deadline or Deadline.after(self.settings.shutdown.timeout_seconds))
            raise

    async def interrupt(self, why: str, deadline: Deadline) -> None:
        """A stop was requested while starting: every plugin is asked to give up its start
        (the host does not know which one is busy, e.g. migrating); ``start`` then fails and
        stops what it started by ``deadline``."""
        self._stop_deadline = deadline
        for plugin in self.plugins:
            try:
                await plugin.interrupt(why)
            except Exception:
                log.exception("plugin %s could not be interrupted", plugin.name)

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
