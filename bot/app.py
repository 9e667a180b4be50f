"""Building the python-telegram-bot ``Application`` from the settings."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from telegram.ext import AIORateLimiter, Application, ApplicationBuilder
from telegram.request import HTTPXRequest, RequestData

from dbkeeper.config import Settings

AnyApplication = Application[Any, Any, Any, Any, Any, Any]

# Local mode has no token, yet the job queue (PTB's APScheduler integration) needs an
# Application to run jobs with. This placeholder is never initialized, so nothing ever uses it
# to reach Telegram.
LOCAL_MODE_TOKEN = "0:local-mode-without-telegram"


Builder = ApplicationBuilder[Any, Any, Any, Any, Any, Any]

_NO_UPDATES = b'{"ok": true, "result": []}'
STANDBY_PAUSE_SECONDS = 0.2  # a gated getUpdates answers after this, so polling never spins


class LeaderOnlyUpdates(HTTPXRequest):
    """PTB's ``getUpdates`` connection, open to the leader only.

    A leader may lose its lease while PTB's polling loop runs (a process paused past its
    lease, a database cut off): before it has stopped polling, its next ``getUpdates`` would
    take the updates from the new leader (Telegram answers one of them 409 Conflict). Asked
    right before each request and again when the answer arrives, ``allows`` keeps every such
    call here: it answers "no updates" and never reaches Telegram, and updates that arrive
    after the lease ran out are dropped unconfirmed, so Telegram hands them to the leader.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.allows: Callable[[], bool] = lambda: True

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: Any = HTTPXRequest.DEFAULT_NONE,
        write_timeout: Any = HTTPXRequest.DEFAULT_NONE,
        connect_timeout: Any = HTTPXRequest.DEFAULT_NONE,
        pool_timeout: Any = HTTPXRequest.DEFAULT_NONE,
    ) -> tuple[int, bytes]:
        if not self.allows():
            await asyncio.sleep(STANDBY_PAUSE_SECONDS)
            return HTTPStatus.OK, _NO_UPDATES
        answer = await super().do_request(
            url,
            method,
            request_data,
            read_timeout=read_timeout,
            write_timeout=write_timeout,
            connect_timeout=connect_timeout,
            pool_timeout=pool_timeout,
        )
        return answer if self.allows() else (HTTPStatus.OK, _NO_UPDATES)


def gate_updates(application: AnyApplication, allows: Callable[[], bool]) -> bool:
    """Let ``getUpdates`` through only while ``allows()``. False for an application that was
    not built by :func:`build_application` (a bot's own: its requests are left alone)."""
    # PTB keeps the getUpdates request first in ``Bot._request`` and has no public accessor.
    requests = getattr(application.bot, "_request", ())
    gate = requests[0] if requests else None
    if not isinstance(gate, LeaderOnlyUpdates):
        return False
    gate.allows = allows
    return True


def configure_builder(builder: Builder, settings: Settings) -> Builder:
    """The token (none: local mode's placeholder), the Bot API's base URL, and PTB's
    ``AIORateLimiter`` for every Bot API call (chat answers and alerts): it keeps within
    Telegram's flood limits and retries a call that Telegram asks to wait for."""
    telegram = settings.telegram
    builder = builder.token(telegram.token or LOCAL_MODE_TOKEN).rate_limiter(
        AIORateLimiter(max_retries=2)
    )
    if telegram.api_base_url:
        base = telegram.api_base_url.rstrip("/")
        builder = builder.base_url(base).base_file_url(_file_url(base))
    return builder


def build_application(settings: Settings) -> AnyApplication:
    """The application ``dbkeeper run`` drives; its ``getUpdates`` go through
    :class:`LeaderOnlyUpdates`. (Not in :func:`configure_builder`: a bot's own builder may
    still set ``get_updates_*`` options, which PTB refuses once a request object is set.)"""
    builder = configure_builder(Application.builder(), settings)
    # one connection, as PTB's builder makes it for getUpdates
    builder = builder.get_updates_request(LeaderOnlyUpdates(connection_pool_size=1))
    if settings.local_mode:
        builder = builder.updater(None)
    # Updates run concurrently so that a slow command (a backup) never stalls the others.
    return builder.concurrent_updates(True).build()


def _file_url(base: str) -> str:
    """``http://host:8081/bot`` serves files under ``http://host:8081/file/bot``."""
    head, _, tail = base.rpartition("/")
    return f"{head}/file/{tail}" if tail.startswith("bot") else f"{base}/file"
