"""The replication's Prometheus metrics, read from the last health report (no work of its own).

``dbkeeper_replication_lag_seconds``, ``_last_sync_timestamp_seconds``, ``_up``,
``_max_lag_seconds``, ``_drill_last_success_timestamp_seconds``; none on a standby (it does not
replicate).
"""

from __future__ import annotations

from collections.abc import Callable

from dbkeeper.health import HealthReport, Status
from dbkeeper.metrics import CheckGauges

FROM_CHECK = {
    "lag_seconds": (
        "replication_lag_seconds",
        "Seconds since Litestream last confirmed the replica caught up.",
    ),
    "last_sync_timestamp_seconds": (
        "replication_last_sync_timestamp_seconds",
        "When the replica was last caught up (unix time).",
    ),
    "up": ("replication_up", "1 while Litestream runs and answers, else 0."),
    "max_lag_seconds": (
        "replication_max_lag_seconds",
        "[replication] max_lag_seconds: the replication check is unhealthy past this lag.",
    ),
    "drill_last_success_timestamp_seconds": (
        "replication_drill_last_success_timestamp_seconds",
        "When the last successful restore drill ran (unix time).",
    ),
}


def replication_metrics(last_report: Callable[[], HealthReport | None]) -> CheckGauges:
    """``dbkeeper_replication_*``; none on a standby (it does not replicate)."""
    return CheckGauges(
        "replication",
        FROM_CHECK,
        last_report,
        silent=lambda check: check.status is Status.HEALTHY and "standing by" in check.message,
    )
