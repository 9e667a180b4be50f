"""Health checks: the three statuses, check results, and the registry plugins add checks to.

A check is an async function returning an :class:`Outcome`. The registry runs every check at
once, each bounded by ``[health] check_timeout_seconds``: a check that does not answer in time
is reported unhealthy and left behind (never awaited again), so a hung database can delay a
report by at most the timeout. The overall status is the worst one.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dbkeeper.logs import redact
from dbkeeper.texts import duration

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
    failing_as: str  # what the check reports while an earlier run of it still hangs


@dataclass
class _InFlight:
    task: asyncio.Task[Outcome]
    started: float  # monotonic
    abandoned: bool = False  # timed out once: later runs report it instead of waiting again


class HealthRegistry:
    """The checks of every plugin, run together into one :class:`HealthReport`.

    This is the one place that bounds checks in time. Each check runs at most once at a time:
    callers that ask while it runs (the monitor and an HTTP request, say) share that run. A run
    that does not answer within the timeout is reported unhealthy and asked to stop (its task
    is cancelled); until it has really ended, later runs report that it still hangs instead of
    starting another (a check stuck on a dead server never piles up threads).
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._checks: dict[str, Check] = {}
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._in_flight: dict[str, _InFlight] = {}

    def add(
        self,
        name: str,
        function: CheckFunction,
        *,
        readiness: bool = False,
        failing_as: str = "",
    ) -> None:
        """Register a check; ``readiness`` checks must not be unhealthy for ``/readyz``.

        ``failing_as``: the start of its message while an earlier run still hangs, e.g.
        "cannot reach the database".
        """
        if name in self._checks:
            raise ValueError(f"a health check named {name!r} is already registered")
        self._checks[name] = Check(name, function, readiness, failing_as)

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
        flight = self._in_flight.get(check.name)
        if flight is not None and not flight.task.done() and flight.abandoned:
            prefix = f"{check.failing_as}: " if check.failing_as else ""
            return CheckResult(
                check.name,
                Status.UNHEALTHY,
                f"{prefix}still waiting for the previous check, started "
                f"{duration(started - flight.started)} ago",
                None,
                0.0,
            )
        if flight is None or flight.task.done():
            task = asyncio.ensure_future(check.function())
            task.add_done_callback(_retrieve)
            flight = self._in_flight[check.name] = _InFlight(task, started)
        remaining = max(0.0, self.timeout - (started - flight.started))
        done, _ = await asyncio.wait({flight.task}, timeout=remaining)
        elapsed_ms = (time.monotonic() - started) * 1000
        if not done:
            if not flight.abandoned:
                flight.abandoned = True
                flight.task.cancel()  # the check interrupts its work; never awaited here
            return CheckResult(
                check.name,
                Status.UNHEALTHY,
                f"no answer within {self.timeout:g}s (timed out)",
                None,
                elapsed_ms,
            )
        try:
            outcome = flight.task.result()
        except asyncio.CancelledError:
            outcome = unhealthy(f"no answer within {self.timeout:g}s (timed out)")
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

    async def close(self) -> None:
        for closer in self._closers:
            try:
                await closer()
            except Exception:
                log.exception("stopping a health check's background work failed")


def _retrieve(task: asyncio.Task[Outcome]) -> None:
    """Collect the result of a run nobody may await any more, so its error is not 'lost'."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("a health check ended with %s", describe(task.exception()))


def describe(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """A message as served and sent: one line, no secrets, bounded length."""
    flat = redact(" ".join(text.split()))
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
