"""Connection hygiene for the health server: slow and idle clients are closed, malformed
requests cost one quiet line.

A connection that sends nothing, sends its request a byte at a time, or stays idle after an
answer is closed after ``IDLE_SECONDS`` (aiohttp's keep-alive timer, which also runs before
the first request), so a few such clients cannot hold sockets forever. A request aiohttp
cannot parse is answered 400 by aiohttp and logged here as one line naming the error class,
never with a traceback or the client's bytes (they may be anything, secrets included).
"""

from __future__ import annotations

import logging
from typing import Any

IDLE_SECONDS = 10.0


class _OneLine(logging.Filter):
    """aiohttp's protocol errors without their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(error).__name__}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


PROTOCOL_LOG = logging.getLogger("dbkeeper.http.protocol")
PROTOCOL_LOG.addFilter(_OneLine())


def runner_options() -> dict[str, Any]:
    """Options for ``web.AppRunner``: the idle bound and the quiet protocol logger."""
    return {"keepalive_timeout": IDLE_SECONDS, "logger": PROTOCOL_LOG}
