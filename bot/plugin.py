"""The plugin contract: what a plugin is, and the narrow context it gets from the host.

A plugin is a class with a ``name``, the configuration sections it owns, its ``dbkeeper``
sub-commands, and three steps the host calls in this order:

``setup(context)``
    Register what it offers: health checks, metrics, jobs, chat handlers, HTTP routes. No I/O.
``start()``
    Become ready (connect, migrate, schedule). Raise :class:`StartupError` to stop startup.
``interrupt(why)``
    Only while ``start`` runs, when a stop is requested (SIGINT/SIGTERM): make ``start`` give
    up soon, raising :class:`StartupInterrupted` (a running migration is rolled back).
``stop(deadline)``
    Finish work and release resources before ``deadline``.

Plugins start in ``order`` (the database plugin's is 0: first to start, last to stop) and stop
in reverse. A plugin never sees the host: everything it may do goes through its
:class:`PluginContext`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    import click
    from aiohttp import web
    from prometheus_client.registry import Collector
    from telegram import Bot
    from telegram.ext import BaseHandler, filters

    from dbkeeper.config import Settings
    from dbkeeper.health import CheckFunction, HealthReport
    from dbkeeper.host import Host
    from dbkeeper.leadership import LeaderElection

T = TypeVar("T")
GROUPS_PER_PLUGIN = 10
Job = Callable[[], Awaitable[None]]
Handler = Callable[["web.Request"], Awaitable["web.StreamResponse"]]


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


class OperatorError(Exception):
    """An error meant for operators: the message says what happened, what was kept safe and
    what to do. The command line prints it as one line and exits with status 1."""


class StartupError(OperatorError):
    """A plugin could not start; the message says what happened and what to do."""


class StartupInterrupted(StartupError):
    """A plugin gave up starting because a stop was requested (see ``Plugin.interrupt``)."""


class Plugin:
    """Base class of plugins; subclasses set the class attributes and override the steps."""

    #: Unique among the loaded plugins; names its handler group and its log lines.
    name: ClassVar[str] = "plugin"
    #: Lower starts earlier and stops later. 0 is the database plugin's alone (a plugin with
    #: 0 or less beside it stops startup); features use 100.
    order: ClassVar[int] = 100
    #: Configuration sections this plugin owns: ``{"backup": BackupSettings}``.
    sections: ClassVar[Mapping[str, type]] = {}
    #: The SQLAlchemy ``MetaData`` of the tables this plugin uses (schema validation), if any.
    metadata: ClassVar[Any] = None

    @classmethod
    def companions(cls, raw: Mapping[str, Any]) -> Sequence[str]:
        """Plugins (import strings) loaded with this one when ``[bot] plugins`` is not set."""
        return ()

    @classmethod
    def commands(cls) -> Sequence[click.Command]:
        """This plugin's ``dbkeeper`` sub-commands (click commands or groups)."""
        return ()

    def setup(self, context: PluginContext) -> None:
        """Register checks, metrics, jobs, handlers and routes with ``context`` (no I/O)."""

    async def start(self) -> None:
        """Become ready: connect, migrate, schedule. Raise ``StartupError`` to stop startup."""

    async def interrupt(self, why: str) -> None:
        """A stop was requested while ``start`` runs: make it give up soon (``why`` says why),
        raising ``StartupInterrupted``. Called on the event loop; must not block."""

    async def stop(self, deadline: Deadline) -> None:
        """Finish work and release resources before ``deadline``."""


class PluginContext:
    """What one plugin may do with the host. Created by the host, one per plugin."""

    def __init__(self, host: Host, plugin: Plugin, group: int) -> None:
        self._host = host
        self._plugin = plugin
        #: The first PTB handler group of this plugin: after the bot's own (group 0 and up).
        self.handler_group = group

    # -- configuration and identity --------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._host.settings

    def section(self, cls: type[T]) -> T:
        """This plugin's validated configuration section declared by ``cls``."""
        return self.settings.section(cls)

    @property
    def instance(self) -> str:
        """This instance's name (``[instance] name`` or host:pid)."""
        return self._host.instance

    @property
    def one_shot(self) -> bool:
        """True for ``dbkeeper health``: checks run once; no background work, nothing started."""
        return self._host.mode == "check"

    @property
    def telegram_enabled(self) -> bool:
        """False in local mode (no token): no chat, alerts go to the log."""
        return self._host.telegram_enabled

    @property
    def bot(self) -> Bot:
        bot: Bot = self._host.application.bot
        return bot

    @property
    def plugin_metadata(self) -> list[Any]:
        """The ``metadata`` of every loaded plugin that declares one."""
        return [cls.metadata for cls in self.settings.plugins if cls.metadata is not None]

    def add_secret(self, *values: str | None) -> None:
        """Values never to appear in logs, chat messages or HTTP answers."""
        from dbkeeper.logs import SECRETS

        SECRETS.add(*values)

    # -- health, metrics, HTTP -------------------------------------------------------------------

    def add_check(
        self,
        name: str,
        check: CheckFunction,
        *,
        readiness: bool = False,
        failing_as: str = "",
    ) -> None:
        """A health check; ``readiness``: ``/readyz`` fails while it is unhealthy.

        The host bounds it in time and never runs it twice at once (``HealthRegistry``);
        ``failing_as`` starts its message while an earlier run of it still hangs.
        """
        self._host.health.add(name, check, readiness=readiness, failing_as=failing_as)

    def on_health_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Called when health checking stops (to end a check's background work)."""
        self._host.health.on_close(closer)

    def add_metrics(self, collector: Collector) -> None:
        self._host.metrics.register(collector)

    @property
    def last_health_report(self) -> HealthReport | None:
        return self._host.monitor.last

    async def health_report(self) -> HealthReport:
        """A fresh health report (or the run in progress)."""
        return await self._host.monitor.check()

    def add_status_section(self, title: str, render: Callable[[], Awaitable[str]]) -> None:
        """A section of the status page (``GET /``): ``render()`` returns its HTML, every
        outside value escaped; no secret, no row of users' data."""
        self._host.status.add(title, render)

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """An HTTP route on the health server (for operators: ``/api/...``)."""
        self._host.http.add_route(method, path, handler)

    # -- work ------------------------------------------------------------------------------------

    def add_job(
        self,
        job: Job,
        *,
        name: str,
        interval: float | None = None,
        first: float | None = None,
    ) -> None:
        """Run ``job`` every ``interval`` seconds (first after ``first``), or once after
        ``first`` when ``interval`` is None. A job of the same name already scheduled is kept.
        A job that raises is logged and alerted; it never reaches PTB's error handlers.
        """
        self._host.add_job(self._plugin.name, job, name=name, interval=interval, first=first)

    def remove_jobs(self, name: str) -> None:
        self._host.remove_jobs(name)

    async def alert(self, text: str, *, key: str | None = None) -> None:
        """Tell the admins (Telegram, or the log in local mode); returns at once."""
        await self._host.alert(text, key=key)

    # -- Telegram ----------------------------------------------------------------------------------

    def add_handler(self, handler: BaseHandler[Any, Any, Any], *, group: int = 0) -> None:
        """A chat handler in this plugin's own groups, after the bot's own handlers.

        ``group`` (0-9) picks one of the plugin's groups: PTB runs at most one handler per
        group, so a handler that must see every update gets a group of its own.
        """
        if not 0 <= group < GROUPS_PER_PLUGIN:
            raise ValueError(f"group must be between 0 and {GROUPS_PER_PLUGIN - 1}")
        self._host.application.add_handler(handler, group=self.handler_group + group)

    def add_admin_command(
        self,
        command: str,
        callback: Callable[..., Coroutine[Any, Any, Any]],
        description: str,
    ) -> None:
        """``/command`` for admins in private chats or the alert chat (a PTB filter); anyone
        else gets nothing and a log line (at a bounded rate). Listed in the admins' menu."""
        for handler in self._host.admin.command(command, callback):
            self.add_handler(handler)
        self._host.admin.menu.append((command, description))

    @property
    def admin_filter(self) -> filters.BaseFilter:
        """PTB filter: an admin, in a private chat or the alert chat."""
        return self._host.admin.filter

    def is_admin(self, user_id: int) -> bool:
        return user_id in self._host.admin.admin_ids

    @property
    def admin_commands(self) -> list[tuple[str, str]]:
        """(command, description) of every admin command the plugins registered."""
        return list(self._host.admin.menu)

    def on_telegram_ready(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` once the Bot API is reachable (after the application initialized)."""
        self._host.on_telegram_ready(callback)

    def publish(self, key: str, value: Any) -> None:
        """Make ``value`` reachable from any handler as ``context.bot_data[key]``."""
        self._host.publish(key, value)

    # -- several instances -------------------------------------------------------------------------

    @property
    def leadership(self) -> LeaderElection:
        """Who leads: the service another plugin provides, or this instance alone."""
        return self._host.leadership

    def provide_leadership(self, election: LeaderElection) -> None:
        """Offer the host a leader election (at most one plugin does)."""
        self._host.set_leadership(election)

    def describe_instance(self) -> str:
        """Which instance answers and which one leads, for chat answers."""
        return self._host.describe_instance()


__all__ = [
    "Deadline",
    "OperatorError",
    "Plugin",
    "PluginContext",
    "StartupError",
    "StartupInterrupted",
]
