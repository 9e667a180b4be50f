"""Building the python-telegram-bot ``Application`` from the settings."""

from __future__ import annotations

from typing import Any

from telegram.ext import AIORateLimiter, Application, ApplicationBuilder

from dbkeeper.config import Settings

# Local mode has no token, yet the job queue (PTB's APScheduler integration) needs an
# Application to run jobs with. This placeholder is never initialized, so nothing ever uses it
# to reach Telegram.
LOCAL_MODE_TOKEN = "0:local-mode-without-telegram"


Builder = ApplicationBuilder[Any, Any, Any, Any, Any, Any]


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


def build_application(settings: Settings) -> Application[Any, Any, Any, Any, Any, Any]:
    """The application ``dbkeeper run`` drives."""
    builder = configure_builder(Application.builder(), settings)
    if settings.local_mode:
        builder = builder.updater(None)
    # Updates run concurrently so that a slow command (a backup) never stalls the others.
    return builder.concurrent_updates(True).build()


def _file_url(base: str) -> str:
    """``http://host:8081/bot`` serves files under ``http://host:8081/file/bot``."""
    head, _, tail = base.rpartition("/")
    return f"{head}/file/{tail}" if tail.startswith("bot") else f"{base}/file"
