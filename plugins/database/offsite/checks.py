"""The ``offsite`` health check and the ``dbkeeper_offsite_*`` metrics.

"last upload 2026-12-01 10:00:01 UTC (5m ago) | 7 copies | 45.23 MB" (then the copies of
unknown origin, kept and never rotated, when there are some: see ``uploads``): read from what
the syncs recorded beside the backups (``.dbkeeper-offsite.json``), never from the storage, so
a check costs no request and works the same for every process sharing the backup directory.
Degraded when the last sync failed, when the last upload is older than twice ``[backup]
interval_seconds``, or when nothing is off-site once the first backup (and its grace) is past.

Metrics (from the last health report, like the database plugin's others):
``dbkeeper_offsite_last_upload_timestamp_seconds``, ``dbkeeper_offsite_copies``,
``dbkeeper_offsite_size_bytes`` and the counter ``dbkeeper_offsite_upload_failures_total``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from prometheus_client.core import CounterMetricFamily, Metric

from dbkeeper.health import HealthReport, Outcome, degraded, healthy, unhealthy
from dbkeeper.metrics import PREFIX, CheckGauges
from dbkeeper.plugin import PluginContext
from dbkeeper.texts import duration, megabytes

from ..retry import describe_error
from ..timeouts import offload
from .uploads import OffsiteCopies, OffsiteStatus, foreign_note

CHECK = "offsite"


def when(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def summary(status: OffsiteStatus, now: datetime | None = None, *, foreign: bool = True) -> str:
    """``last upload 2026-12-01 10:00:01 UTC (5m ago) | 7 copies | 45.23 MB``, then (unless
    ``foreign`` is False), when some are of unknown origin, ``| 2 copies not uploaded from
    here are kept (never rotated): ...`` (not a problem: the check stays healthy)."""
    now = now or datetime.now(UTC)
    copies = f"{status.copies} cop{'y' if status.copies == 1 else 'ies'}"
    if status.last_upload_at is None:
        last = "no upload yet"
    else:
        ago = duration((now - status.last_upload_at).total_seconds())
        last = f"last upload {when(status.last_upload_at)} ({ago} ago)"
    text = f"{last} | {copies} | {megabytes(status.total_bytes)}"
    if foreign and status.foreign_copies:
        text += f" | {foreign_note(status.foreign_copies)}"
    return text


def problems(
    status: OffsiteStatus, interval_seconds: float, now: datetime, first_due: bool = True
) -> list[str]:
    """What is wrong; ``first_due``: whether the first upload should have happened by now."""
    found = []
    if status.failing and status.last_failure_at is not None:
        ago = duration((now - status.last_failure_at).total_seconds())
        found.append(f"the last upload failed {ago} ago: {status.last_failure}")
    elif status.last_upload_at is None:
        if first_due:
            found.append("nothing uploaded yet")
    elif (now - status.last_upload_at).total_seconds() > 2 * interval_seconds:
        age = duration((now - status.last_upload_at).total_seconds())
        every = duration(interval_seconds)
        found.append(f"the last upload is {age} old (a backup is due every {every})")
    return found


class OffsiteHealth:
    def __init__(self, offsite: OffsiteCopies, interval_seconds: float) -> None:
        self.offsite = offsite
        self.interval_seconds = interval_seconds
        # Set by the running plugin (monotonic): until then a fresh setup with nothing off-site
        # yet is no problem (its first backup, or the catch-up of the existing ones, is coming).
        self.first_upload_due: float | None = None

    def register(self, context: PluginContext) -> None:
        context.add_check(CHECK, self.check, failing_as="cannot read the off-site state")
        context.add_metrics(OffsiteMetrics(lambda: context.last_health_report))

    async def check(self) -> Outcome:
        try:
            status = await offload(self.offsite.status, name="dbkeeper-check-offsite")
        except Exception as error:
            return unhealthy(f"cannot read the off-site state: {describe_error(error, 400)}")
        now = datetime.now(UTC)
        values: dict[str, float] = {
            "copies": status.copies,
            "size_bytes": status.total_bytes,
            "upload_failures_total": status.failures_total,
        }
        if status.last_upload_at is not None:
            values["last_upload_timestamp_seconds"] = status.last_upload_at.timestamp()
        message = summary(status, now)
        due = self.first_upload_due
        first_due = due is None or time.monotonic() > due
        found = problems(status, self.interval_seconds, now, first_due)
        if status.last_upload_at is None and not found:
            message += " | the first follows the first backup"
        if found:
            return degraded(" | ".join([message, *found]), values=values)
        return healthy(message, values=values)


GAUGES = {
    "last_upload_timestamp_seconds": (
        "offsite_last_upload_timestamp_seconds",
        "When the last backup was copied off-site (unix time).",
    ),
    "copies": ("offsite_copies", "Backup copies off-site (complete and verified)."),
    "size_bytes": ("offsite_size_bytes", "Size of the backup copies off-site."),
}


class OffsiteMetrics(CheckGauges):
    """``dbkeeper_offsite_*`` from the last ``offsite`` check, and the failed uploads' counter."""

    def __init__(self, last_report: Callable[[], HealthReport | None]) -> None:
        super().__init__(CHECK, GAUGES, last_report)

    def collect(self) -> Iterator[Metric]:
        yield from super().collect()
        check = self.result()
        if check is not None and "upload_failures_total" in check.values:
            yield CounterMetricFamily(
                f"{PREFIX}_offsite_upload_failures",
                "Off-site uploads that failed (recorded beside the backups, across restarts).",
                value=check.values["upload_failures_total"],
            )
