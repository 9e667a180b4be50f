"""Health checks: the three statuses, check results, and the registry plugins add checks to.

A check is an async function returning an :class:`Outcome`. The registry runs every check at
once, each bounded by ``[health] check_timeout_seconds``: a check that does not answer in time
is reported unhealthy and left behind (never awaited again), so a hung database can delay a
report by at most the timeout. The overall status is the worst one.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dbkeeper.logs import redact

log = logging.getLogger("dbkeeper.health")
T = TypeVar("T")
MESSAGE_LIMIT = 500


class Status(enum.Enum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"

    @property
    def rank(self) -> int:
        """0 healthy, 1 degraded, 2 unhealthy: the value of the status metrics."""
        return _RANKS[self]

    @classmethod
    def worst(cls, statuses: Iterable[Status]) -> Status:
        return max(statuses, key=lambda status: status.rank, default=cls.HEALTHY)


_RANKS = {Status.HEALTHY: 0, Status.DEGRADED: 1, Status.UNHEALTHY: 2}


@dataclass(frozen=True)
class Outcome:
    """What a check function returns.

    ``values`` are measured figures in base units (``round_trip_seconds``, ``size_bytes``);
    plugins turn them into metrics.
    """

    status: Status
    message: str
    latency_ms: float | None = None
    values: Mapping[str, float] = field(default_factory=dict)


def healthy(message: str, **kwargs: Any) -> Outcome:
    return Outcome(Status.HEALTHY, message, **kwargs)


def degraded(message: str, **kwargs: Any) -> Outcome:
    return Outcome(Status.DEGRADED, message, **kwargs)


def unhealthy(message: str, **kwargs: Any) -> Outcome:
    return Outcome(Status.UNHEALTHY, message, **kwargs)


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    message: str  # one line, secrets removed
    latency_ms: float | None
    duration_ms: float  # how long the check took (or the timeout)
    values: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"status": self.status.value, "message": self.message}
        if self.latency_ms is not None:
            answer["latencyMs"] = round(self.latency_ms, 2)
        return answer


@dataclass(frozen=True)
class HealthReport:
    status: Status
    checks: Mapping[str, CheckResult]
    timestamp: float  # wall clock (unix seconds) when the checks started
    monotonic: float  # monotonic clock at the same moment, for ages
    duration_ms: float

    def age(self) -> float:
        return time.monotonic() - self.monotonic

    def problems(self) -> list[CheckResult]:
        return [c for c in self.checks.values() if c.status is not Status.HEALTHY]

    def to_json(self, uptime: float) -> dict[str, Any]:
        """The contract's shape (``GET /health``, ``dbkeeper health --json``)."""
        return {
            "status": self.status.value,
            "timestamp": round(self.timestamp, 3),
            "uptime": round(uptime, 3),
            "checks": {name: check.to_json() for name, check in self.checks.items()},
        }


CheckFunction = Callable[[], Awaitable[Outcome]]


@dataclass(frozen=True)
class Check:
    name: str
    function: CheckFunction
    readiness: bool  # part of /readyz (the bot cannot work while it fails)


class HealthRegistry:
    """The checks of every plugin, run together into one :class:`HealthReport`."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._checks: dict[str, Check] = {}
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._abandoned: set[asyncio.Task[Outcome]] = set()

    def add(self, name: str, function: CheckFunction, *, readiness: bool = False) -> None:
        """Register a check; ``readiness`` checks must not be unhealthy for ``/readyz``."""
        if name in self._checks:
            raise ValueError(f"a health check named {name!r} is already registered")
        self._checks[name] = Check(name, function, readiness)

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Run ``closer`` when health checking stops (end background work of a plugin)."""
        self._closers.append(closer)

    @property
    def names(self) -> list[str]:
        return list(self._checks)

    @property
    def readiness_names(self) -> list[str]:
        return [check.name for check in self._checks.values() if check.readiness]

    async def run(self) -> HealthReport:
        """Run every check concurrently, each within the timeout."""
        timestamp, started = time.time(), time.monotonic()
        results = await asyncio.gather(*(self._run_one(c) for c in self._checks.values()))
        checks = {result.name: result for result in results}
        return HealthReport(
            status=Status.worst(result.status for result in results),
            checks=checks,
            timestamp=timestamp,
            monotonic=started,
            duration_ms=(time.monotonic() - started) * 1000,
        )

    async def _run_one(self, check: Check) -> CheckResult:
        started = time.monotonic()
        task = asyncio.ensure_future(check.function())
        done, _ = await asyncio.wait({task}, timeout=self.timeout)
        elapsed_ms = (time.monotonic() - started) * 1000
        if not done:
            # Cancel, but never wait for it: a check that ignores cancellation must not hang
            # the report. Keep a reference until it ends so its error is retrieved.
            task.cancel()
            self._abandoned.add(task)
            task.add_done_callback(self._forget)
            return CheckResult(
                check.name,
                Status.UNHEALTHY,
                f"no answer within {self.timeout:g}s (timed out)",
                None,
                elapsed_ms,
            )
        try:
            outcome = task.result()
        except Exception as error:
            log.debug("health check %s failed", check.name, exc_info=True)
            outcome = unhealthy(f"check failed: {describe(error)}")
        return CheckResult(
            check.name,
            outcome.status,
            one_line(outcome.message),
            outcome.latency_ms,
            elapsed_ms,
            dict(outcome.values),
        )

    def _forget(self, task: asyncio.Task[Outcome]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("an abandoned health check ended with %s", describe(task.exception()))

    async def close(self) -> None:
        for closer in self._closers:
            try:
                await closer()
            except Exception:
                log.exception("stopping a health check's background work failed")


def in_daemon_thread(work: Callable[[], T], name: str = "dbkeeper-check") -> asyncio.Future[T]:
    """Run blocking ``work()`` on a new daemon thread; await the returned future for its result.

    For health checks, not for the bot's work: a thread stuck on a dead server is abandoned
    when the check times out, and as a daemon it can hold neither a shared pool nor the exit.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = work()
        except BaseException as caught:
            error = caught
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def describe(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """A message as served and sent: one line, no secrets, bounded length."""
    flat = redact(" ".join(text.split()))
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
