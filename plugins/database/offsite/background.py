"""The running bot's uploads: in the background, one sync at a time, stoppable at shutdown.

A backup is committed and listed first; its upload then runs here, on a daemon thread, so that
neither the backup lock, nor a chat command, nor the job queue waits for the network (a job
still running at shutdown would hold up the shutdown backup). Requests that arrive while a
sync runs make it run once more afterwards (a sync uploads every backup still missing).

At shutdown ``stop`` stops the running sync at its next chunk; ``final`` then uploads what
is missing (the shutdown backup first) within what is left of the budget. What does not fit
waits for the next start. A failed sync is alerted (key ``database.offsite``: repeats within
``[health] alert_repeat_seconds`` collapse into one message); the local backups are never
touched by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable

from dbkeeper.plugin import Deadline

from ..backup.engines.base import Limits
from ..timeouts import in_daemon_thread
from .uploads import OffsiteCopies, UploadReport

log = logging.getLogger("dbkeeper.offsite")
ALERT_KEY = "database.offsite"


class BackgroundUploads:
    def __init__(
        self, offsite: OffsiteCopies, alert: Callable[[str, str], Awaitable[None]]
    ) -> None:
        self.offsite = offsite
        self._alert = alert  # (text, key)
        self._stop = threading.Event()
        self._task: asyncio.Task[UploadReport | None] | None = None
        self._again = False

    def request(self) -> None:
        """Upload what is missing off-site, soon (returns at once)."""
        if self._stop.is_set():
            return
        self._again = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="dbkeeper-offsite-upload")

    async def wait(self) -> UploadReport | None:
        """The report of the sync that covers every request made so far."""
        task = self._task
        if task is None:
            return None
        return await asyncio.shield(task)

    async def stop(self, deadline: Deadline) -> None:
        """No more background uploads; the running one stops at its next chunk (waited for
        until ``deadline``; a request in flight on a hung server is left to its thread)."""
        self._stop.set()
        task = self._task
        if task is None or task.done():
            return
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline.remaining()))
        if not task.done():
            log.info("shutdown: the off-site upload did not stop in time; left behind")

    async def final(self, budget: Deadline) -> UploadReport | None:
        """The shutdown upload, within ``budget``; what does not fit waits for the next start."""
        if budget.expired:
            log.info("shutdown: no time left to upload off-site; the next start does it")
            return None
        report = await self._sync(Limits(budget), budget.remaining() + 0.5)
        if report is None:
            log.info("shutdown: the off-site upload ran out of time; the next start finishes it")
        await self._report(report)
        return report

    async def _loop(self) -> UploadReport | None:
        report = None
        while self._again and not self._stop.is_set():
            self._again = False
            report = await self._sync(Limits(None, (self._stop,)), None)
            await self._report(report)
        return report

    async def _sync(self, limits: Limits, timeout: float | None) -> UploadReport | None:
        future = in_daemon_thread(lambda: self.offsite.sync(limits), "dbkeeper-offsite-upload")
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return None

    async def _report(self, report: UploadReport | None) -> None:
        if report is None or report.failure is None:
            return
        await self._alert(
            f"{report.failure}. The local backups are kept; the upload is tried again with "
            "the next backup.",
            ALERT_KEY,
        )
