"""Logging set-up that keeps secrets out of every line.

PTB's HTTP client (httpx) logs each request URL at INFO, and Bot API URLs carry the token
(``https://api.telegram.org/bot<TOKEN>/getUpdates``); PTB's ``InvalidToken`` message quotes it
too. Rather than trusting every library, the formatter redacts the final text of each record,
traceback included: the configured secrets by value, and anything shaped like a bot token or a
password inside a URL.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable

REDACTED = "[REDACTED]"
_BOT_TOKEN = re.compile(r"(?<![0-9])\d{5,}:[A-Za-z0-9_-]{30,}")
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s/]+)@")
_NOISY_LOGGERS = {
    "httpx": logging.WARNING,  # logs request URLs, which contain the bot token
    "httpcore": logging.WARNING,
    "apscheduler": logging.WARNING,  # one line per job run
    "alembic": logging.WARNING,  # the migrator logs one line per revision itself
    "aiohttp.access": logging.WARNING,
}


class SecretStore:
    """The secret values known to this process; shared by every redacting formatter."""

    def __init__(self) -> None:
        self._values: set[str] = set()

    def add(self, *values: str | None) -> None:
        for value in values:
            if value and len(value) >= 4:
                self._values.add(value)

    def redact(self, text: str) -> str:
        for value in sorted(self._values, key=len, reverse=True):
            if value in text:
                text = text.replace(value, REDACTED)
        text = _BOT_TOKEN.sub(REDACTED, text)
        return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


SECRETS = SecretStore()


def redact(text: str) -> str:
    """Remove every known secret (and anything shaped like one) from ``text``."""
    return SECRETS.redact(text)


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return SECRETS.redact(super().format(record))


class RedactingFilter(logging.Filter):
    """For handlers someone else set up (a bot that embeds dbkeeper): the record's message is
    redacted before their formatter sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = SECRETS.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_text is None:
            record.exc_text = SECRETS.redact(logging.Formatter().formatException(record.exc_info))
        return True


def protect_logging(level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    """Logging for dbkeeper inside someone else's program: its own set-up when the program has
    none; otherwise its handlers keep their format and get secrets redacted."""
    SECRETS.add(*secrets)
    root = logging.getLogger()
    if not root.handlers:
        setup_logging(level)
        return
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    for name, noisy_level in _NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(max(noisy_level, logging.getLogger(name).level))


def setup_logging(level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    """Send logs to stderr, one line per event, with secrets redacted."""
    SECRETS.add(*secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_dbkeeper", False):
            root.removeHandler(existing)
    handler._dbkeeper = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name, noisy_level in _NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(max(noisy_level, root.level))
    logging.captureWarnings(True)
