"""The status page's "Replication" section: the ``replication`` check's verdict, the lag over
time against ``[replication] max_lag_seconds``, where the replica is and the last restore drill.

It reads what the checks recorded (the last health report, the lag history the check keeps in
memory, the drill's record file): opening the page never asks Litestream or the storage.
"""

from __future__ import annotations

import asyncio
import html
from typing import TYPE_CHECKING

from dbkeeper.charts import line_chart

from .drill import last_drill

if TYPE_CHECKING:
    from .replication import Replication


async def replication_section(replication: Replication) -> str:
    context = replication.context
    report = context.last_health_report if context is not None else None
    check = report.checks.get("replication") if report is not None else None
    if check is None:
        verdict = "<p class='empty'>not checked yet</p>"
    else:
        verdict = f"<p class='status-{check.status.value}'>{html.escape(check.message)}</p>"
    settings = replication.settings
    chart = line_chart(
        list(replication.lag_history),
        limit=settings.max_lag_seconds,
        label=lambda seconds: f"{seconds:.1f} s",
        title="replication lag over time (the red rule: max_lag_seconds)",
    )
    database = replication.database
    drill = await asyncio.to_thread(last_drill, database) if database is not None else None
    drilled = (
        html.escape(drill.describe())
        if drill is not None
        else "no restore drill yet (the leader runs one a few minutes after it starts)"
    )
    location = replication.offsite.location
    where = html.escape(location.url_for("replica")) if location is not None else "?"
    return (
        verdict
        + chart
        + f"<p>Replica <code>{where}</code>, restorable up to {settings.retention_hours:g} h "
        "back: <code>dbkeeper backup restore --latest</code> or <code>--at TIME</code>.</p>"
        + f"<p>{drilled}</p>"
    )
