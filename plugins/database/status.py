"""The database plugin's sections of the status page: the schema and its migrations, and the
backups (local and off-site) on a timeline. Counts and sizes only: no row of users' data, and
every outside value escaped. Reads go through the health checks' probe connections and the
off-site state file, off the event loop; never a request to the storage."""

from __future__ import annotations

import asyncio
import html
import time
from datetime import UTC, datetime

from dbkeeper.charts import Mark, timeline
from dbkeeper.texts import counted, duration, megabytes

from .backup.pipeline import Backups
from .backup.retention import SAFETY_REASONS
from .health.checks import DatabaseHealth
from .migrate.history import Attempt
from .offsite.checks import summary as offsite_summary
from .offsite.uploads import OffsiteCopies, OffsiteStatus

ATTEMPTS_SHOWN = 6
BACKUPS_SHOWN = 8


def _when(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


class StatusSections:
    def __init__(
        self, health: DatabaseHealth, backups: Backups, offsite: OffsiteCopies | None = None
    ) -> None:
        self.health = health
        self.backups = backups
        self.offsite = offsite

    async def schema(self) -> str:
        stats = await self.health.statistics()
        attempts: list[Attempt] = await self.health.read(
            "status-attempts",
            lambda connection: self.health.migrator.attempts(ATTEMPTS_SHOWN, connection),
        )
        status = stats.status
        pending = (
            f"<b class='status-unhealthy'>{len(status.pending)} pending</b>: "
            + ", ".join(html.escape(r.label) for r in status.pending)
            if status.pending
            else "at head"
        )
        rows = "".join(
            f"<tr><td><code>{html.escape(a.version)}</code></td><td>{a.direction}</td>"
            f"<td class='status-{'healthy' if a.success else 'unhealthy'}'>{a.status}</td>"
            f"<td class='hide-narrow'>{html.escape(_when(a.started_at))}</td>"
            f"<td class='num'>{'' if a.execution_ms is None else f'{a.execution_ms:,} ms'}</td>"
            f"<td class='wrap'>{html.escape(a.error or a.description)}</td></tr>"
            for a in attempts
        )
        overview = stats.overview
        return (
            f"<p>Schema <b>{html.escape(status.current_name)}</b> ({pending}) · "
            f"{megabytes(stats.size_bytes)} · {counted(overview.tables, 'table')} · "
            f"≈{counted(overview.records, 'record')}</p>"
            "<table><tr><th>revision</th><th>direction</th><th>result</th>"
            "<th class='hide-narrow'>started</th><th>took</th><th>description / error</th></tr>"
            f"{rows or '<tr><td colspan=6 class=empty>no migration yet</td></tr>'}</table>"
        )

    async def backups_section(self) -> str:
        offsite = self.offsite
        backups, stats, copies = await asyncio.to_thread(
            lambda: (
                self.backups.list(),
                self.backups.stats(),
                offsite.status() if offsite is not None else None,
            )
        )
        now = time.time()
        start = min([b.created_at.timestamp() for b in backups] + [now - 86400])
        off_site = _copied(copies)
        marks = [
            Mark(
                b.created_at.timestamp(),
                f"{b.name} ({b.reason}, {megabytes(b.size_bytes)}"
                + (", copied off-site)" if b.name in off_site else ")"),
                "safety" if b.reason in SAFETY_REASONS else "offsite" if b.name in off_site else "",
            )
            for b in backups
        ]
        where = "<th>off-site</th>" if copies is not None else ""
        rows = "".join(
            f"<tr class='backup'><td><code>{html.escape(b.name)}</code></td>"
            f"<td>{html.escape(b.reason)}</td>"
            f"<td class='hide-narrow'>{html.escape(_when(b.created_at))}</td>"
            f"<td class='num'>{megabytes(b.size_bytes)}</td>"
            f"<td class='num'>v{b.schema_version}</td>"
            f"<td>{'✓' if b.fully_checked else html.escape(b.full_check)}</td>"
            + (f"<td>{'✓' if b.name in off_site else '—'}</td>" if copies is not None else "")
            + "</tr>"
            for b in backups[:BACKUPS_SHOWN]
        )
        summary = (
            f"{stats.count} backup{'' if stats.count == 1 else 's'} · "
            f"{megabytes(stats.total_bytes)} · newest "
            f"{duration(now - stats.newest.created_at.timestamp())} ago"
            if stats.newest is not None
            else "no backup yet"
        )
        failure = ""
        if stats.last_failure is not None:
            failure = (
                f"<p class='status-unhealthy'>The last attempt failed "
                f"{duration(now - stats.last_failure.at.timestamp())} ago: "
                f"{html.escape(stats.last_failure.error[:300])}</p>"
            )
        if stats.full_check_failed:
            names = ", ".join(b.name for b in stats.full_check_failed)
            failure += (
                f"<p class='status-unhealthy'>Failed the full integrity check, marked damaged "
                f"(kept, never restored): {html.escape(names)}</p>"
            )
        if copies is not None:
            assert offsite is not None
            state = "status-unhealthy" if copies.failing else ""
            summary += (
                f"</p><p id='offsite' class='{state}'>Off-site ({html.escape(offsite.where)}): "
                f"{html.escape(offsite_summary(copies))}"
            )
            if copies.failing:
                summary += f"; the last upload failed: {html.escape(copies.last_failure[:300])}"
        return (
            f"<p>{summary}</p>{failure}"
            + timeline(marks, start=start, end=now, title="backups over time")
            + "<table><tr><th>name</th><th>reason</th><th class='hide-narrow'>taken</th>"
            f"<th>size</th><th>schema</th><th>full check</th>{where}</tr>"
            + (rows or "<tr><td colspan=7 class=empty>none yet</td></tr>")
            + "</table>"
        )


def _copied(status: OffsiteStatus | None) -> frozenset[str]:
    """The backups with a copy off-site that this setup knows of (uploaded or adopted)."""
    if status is None:
        return frozenset()
    return frozenset(status.own_copies or ()) | (
        {status.last_upload_name} if status.last_upload_name else set()
    )
