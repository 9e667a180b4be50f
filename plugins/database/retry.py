"""The one retry policy: which errors are worth another attempt, and how long to wait first.

Connecting at startup and applying a revision both retry transient errors (a lock, a lost
connection, a serialization failure, the server restarting) ``attempts`` times with the
configured backoff; anything else fails at once, because trying the same thing again cannot
help. Waiting for a lock someone else holds is not a retry: ``locks.acquire`` polls for that.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import exc as sa_exc

from dbkeeper.logs import redact

T = TypeVar("T")
# SQLSTATEs that say "try again": serialization failure, deadlock, lock not available,
# the server shutting down or restarting, too many connections.
TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300"}
_SQLITE_TRANSIENT_CODES = {
    getattr(sqlite3, name)
    for name in ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_BUSY_SNAPSHOT", "SQLITE_BUSY_RECOVERY")
    if hasattr(sqlite3, name)
}
_SQLITE_TRANSIENT_TEXT = ("database is locked", "database table is locked", "database is busy")


def is_transient(error: BaseException) -> bool:
    """True when retrying the same work could succeed: locks, lost connections, deadlocks."""
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, sa_exc.TimeoutError):  # no free connection in the pool, yet
        return True
    original = getattr(error, "orig", None) or error
    sqlstate = getattr(original, "sqlstate", None)
    if sqlstate:
        return sqlstate in TRANSIENT_SQLSTATES or sqlstate.startswith("08")
    if isinstance(original, sqlite3.OperationalError):
        if getattr(original, "sqlite_errorcode", None) in _SQLITE_TRANSIENT_CODES:
            return True
        return any(text in str(original).lower() for text in _SQLITE_TRANSIENT_TEXT)
    module = type(original).__module__
    # psycopg raises OperationalError without a SQLSTATE when the connection itself is lost.
    return module.startswith("psycopg") and type(original).__name__ == "OperationalError"


def describe_error(error: BaseException, limit: int = 2000) -> str:
    """One readable line for logs, history rows and chat: class, SQLSTATE, message; no secrets."""
    original = getattr(error, "orig", None) or error
    sqlstate = getattr(original, "sqlstate", None)
    message = " ".join(str(original).split()) or type(original).__name__
    prefix = type(original).__name__
    if sqlstate:
        prefix += f" [{sqlstate}]"
    text = redact(f"{prefix}: {message}")
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries of transient failures, waiting ``backoff[n]`` after the n-th (the
    last delay repeats)."""

    attempts: int
    backoff: Sequence[float]
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return float(self.backoff[min(attempt - 1, len(self.backoff) - 1)])

    def run(
        self,
        work: Callable[[int], T],
        *,
        on_retry: Callable[[int, BaseException, float], None],
        on_failure: Callable[[int, BaseException, bool], None] | None = None,
        retryable: Callable[[BaseException], bool] = is_transient,
    ) -> T:
        """``work(attempt)`` until it succeeds; retried while ``retryable`` and attempts remain.

        ``on_failure(attempt, error, retrying)`` sees every failure (to record it);
        ``on_retry(attempt, error, delay)`` is told before each wait. The last error is raised.
        """
        for attempt in range(1, self.attempts + 1):
            try:
                return work(attempt)
            except Exception as error:
                retrying = attempt < self.attempts and retryable(error)
                if on_failure is not None:
                    on_failure(attempt, error, retrying)
                if not retrying:
                    raise
                delay = self.delay(attempt)
                on_retry(attempt, error, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


def log_retry(log: logging.Logger, doing: str, attempts: int) -> Callable[..., None]:
    """An ``on_retry`` that logs one line per retry."""

    def report(attempt: int, error: BaseException, delay: float) -> None:
        log.warning(
            "%s failed (attempt %d of %d): %s; retrying in %.1fs",
            doing,
            attempt,
            attempts,
            describe_error(error),
            delay,
        )

    return report
