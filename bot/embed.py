"""Adding dbkeeper to a bot built with PTB's ``ApplicationBuilder``: one call, then run.

::

    application = ApplicationBuilder().token(token).build()
    application.add_handler(CommandHandler("start", start))   # the bot's own handlers
    dbkeeper.install(application, config="config.toml")
    dbkeeper.run(application)                                  # or application.run_polling()

``install`` loads the configuration (``[migrations] script_location`` names the bot's Alembic
directory) and the database plugin, adds its admin commands in a handler group after the bot's
own, and publishes the database under ``context.bot_data["dbkeeper.database"]``. The
application is used as it is: its token, base URL and rate limiter.

``dbkeeper.run(application)`` runs it the way ``dbkeeper run`` does: database work (migrations,
health, backups) starts first, even while the Bot API is unreachable or without a token
(``LOCAL_MODE_TOKEN``); SIGINT/SIGTERM stop it gracefully with a final backup; the bot's own
``post_init``/``post_stop``/``post_shutdown`` still run. ``application.run_polling()`` works
too (dbkeeper starts in ``post_init`` and stops in ``post_stop``), but PTB gives up at once
when the Bot API cannot be reached, and then nothing of dbkeeper starts.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from typing import Any

from telegram.ext import Application, ApplicationBuilder

from dbkeeper.app import LOCAL_MODE_TOKEN, configure_builder
from dbkeeper.config import Settings, load_settings
from dbkeeper.host import Host
from dbkeeper.logs import protect_logging
from dbkeeper.plugin import Deadline

AnyApplication = Application[Any, Any, Any, Any, Any, Any]
AnyBuilder = ApplicationBuilder[Any, Any, Any, Any, Any, Any]
_HOSTS: weakref.WeakKeyDictionary[AnyApplication, Host] = weakref.WeakKeyDictionary()


def application_builder(config: str | os.PathLike[str] | None = None) -> AnyBuilder:
    """An ``ApplicationBuilder`` from the configuration's ``[telegram]`` section: the token
    (``TELEGRAM_BOT_TOKEN``; none: local mode), ``api_base_url`` and PTB's rate limiter. Add
    what your bot needs, ``build()``, then ``install``."""
    settings = load_settings(config, required=config is not None, embedded=True)
    return configure_builder(Application.builder(), settings)


def install(
    application: AnyApplication,
    config: str | os.PathLike[str] | None = None,
    *,
    settings: Settings | None = None,
) -> Host:
    """Add dbkeeper to ``application``; returns the host (``dbkeeper.run`` finds it)."""
    if application in _HOSTS:
        raise RuntimeError("dbkeeper is already installed on this application")
    if settings is None:
        settings = load_settings(config, required=config is not None, embedded=True)
    token = application.bot.token
    settings = settings.with_section("telegram", token="" if token == LOCAL_MODE_TOKEN else token)
    protect_logging(settings.logging.level, settings.secrets())
    host = Host(settings, application)
    host.bot_hooks = {
        name: hook
        for name in ("post_init", "post_stop", "post_shutdown")
        if (hook := getattr(application, name)) is not None
    }
    _chain_hooks(application, host)
    _HOSTS[application] = host
    return host


def run(application: AnyApplication) -> int:
    """Run an application dbkeeper was installed on until SIGINT/SIGTERM; the exit status."""
    from dbkeeper.lifecycle import run as run_host

    host = _HOSTS.get(application)
    if host is None:
        raise RuntimeError("call dbkeeper.install(application) before dbkeeper.run(application)")
    return asyncio.run(run_host(host))


def _chain_hooks(application: AnyApplication, host: Host) -> None:
    """For ``run_polling``/``run_webhook``: start in ``post_init``, stop in ``post_stop``."""
    own = dict(host.bot_hooks)

    async def post_init(app: AnyApplication) -> None:
        if host.state == "starting":
            await host.start()  # PTB starts the job queue right after post_init
        await host.telegram_ready()
        if "post_init" in own:
            await own["post_init"](app)

    async def post_stop(app: AnyApplication) -> None:
        if "post_stop" in own:
            await own["post_stop"](app)
        if host.state == "running":
            await host.stop(Deadline.after(host.settings.shutdown.timeout_seconds))

    application.post_init = post_init
    application.post_stop = post_stop
