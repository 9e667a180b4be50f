"""The health monitor: one check at startup, then one every ``[health] interval_seconds``.

It keeps the last report and a short history, tells its listeners (the alerter) about every
report, and serves "a fresh-enough report" to the HTTP API: a report younger than
``[health] http_cache_seconds`` is reused, and concurrent callers share one run, so many
clients polling at once cost one check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from telegram.ext import ContextTypes, Job, JobQueue

from dbkeeper.config import HealthSettings
from dbkeeper.health import HealthRegistry, HealthReport, Status

log = logging.getLogger("dbkeeper.health")
JOB_NAME = "dbkeeper-health-check"
HISTORY_SIZE = 20
Listener = Callable[[HealthReport], None]


class HealthMonitor:
    def __init__(self, registry: HealthRegistry, settings: HealthSettings) -> None:
        self.registry = registry
        self.settings = settings
        self.last: HealthReport | None = None
        self.history: deque[HealthReport] = deque(maxlen=HISTORY_SIZE)
        self.runs = 0
        self._listeners: list[Listener] = []
        self._running: asyncio.Task[HealthReport] | None = None
        self._job: Job[Any] | None = None
        self._first: asyncio.Future[None] | None = None
        self._stopped = False

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(report)`` after every run (it must not block)."""
        self._listeners.append(listener)

    def is_healthy(self) -> bool:
        """True when the last report is healthy (degraded and unhealthy are not)."""
        return self.last is not None and self.last.status is Status.HEALTHY

    def start(self, job_queue: JobQueue[Any]) -> None:
        """Start the first check now, in the background, and schedule the periodic ones.

        Startup does not wait for the first check: a slow check (an unreachable Bot API, a hung
        server) must not hold the bot back; requests that arrive meanwhile join the run. The
        job queue's defaults (``max_instances=1, coalesce=True``) skip a periodic run while the
        previous one is still going instead of queueing them.
        """
        self._stopped = False
        self._first = asyncio.ensure_future(self._first_check())
        self._job = job_queue.run_repeating(
            self._scheduled,
            interval=self.settings.interval_seconds,
            first=self.settings.interval_seconds,
            name=JOB_NAME,
        )

    async def _first_check(self) -> None:
        report = await self.check()
        log.info(
            "first health check: %s in %.0f ms (%s)",
            report.status.value,
            report.duration_ms,
            _summary(report),
        )

    async def _scheduled(self, _context: ContextTypes.DEFAULT_TYPE) -> None:
        await self.check()

    async def check(self) -> HealthReport:
        """Run every check now, or join the run already in progress; after stop, the last."""
        if self._stopped and self.last is not None:
            return self.last
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._run())
        return await asyncio.shield(self._running)

    async def latest(self, max_age: float) -> HealthReport | None:
        """The last report if younger than ``max_age`` seconds, else a new one."""
        if self.last is not None and (self._stopped or self.last.age() <= max_age):
            return self.last
        if self._stopped:
            return None
        return await self.check()

    async def _run(self) -> HealthReport:
        report = await self.registry.run()
        self.runs += 1
        self.last = report
        self.history.append(report)
        log.debug("health check: %s in %.0f ms", report.status.value, report.duration_ms)
        for listener in self._listeners:
            try:
                listener(report)
            except Exception:
                log.exception("a health listener failed")
        return report

    async def stop(self) -> None:
        """No more checks: the job is removed, a run in progress ends, background work stops."""
        self._stopped = True
        if self._job is not None:
            with contextlib.suppress(Exception):  # the scheduler may already be shut down
                self._job.schedule_removal()
            self._job = None
        for running in (self._first, self._running):
            if running is not None and not running.done():
                # Every check is bounded by the timeout, so this wait is too.
                with contextlib.suppress(Exception):
                    await running
        await self.registry.close()


def _summary(report: HealthReport) -> str:
    problems = report.problems()
    if not problems:
        return f"{len(report.checks)} checks healthy"
    return "; ".join(f"{c.name}: {c.status.value}: {c.message}" for c in problems)
