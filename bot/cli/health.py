"""``dbkeeper health [--json]``: one full health check, as the running bot would make it.

Exit status: 0 healthy, 1 degraded, 2 unhealthy. Nothing is migrated, nothing is alerted; a
large SQLite database is not scanned page by page (the running bot does that in the
background; ``dbkeeper backup verify`` checks backups fully).
"""

from __future__ import annotations

import asyncio
import json
import time

import click

from dbkeeper.cli.context import CliContext
from dbkeeper.config import Settings
from dbkeeper.health import HealthReport, Status

EXIT_STATUS = {Status.HEALTHY: 0, Status.DEGRADED: 1, Status.UNHEALTHY: 2}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the HTTP API's JSON instead.")
@click.pass_obj
def health(obj: CliContext, as_json: bool) -> None:
    """One full health check; exit status 0 healthy, 1 degraded, 2 unhealthy."""
    started = time.monotonic()
    report = asyncio.run(_check(obj.settings))
    if as_json:
        click.echo(json.dumps(report.to_json(time.monotonic() - started), indent=2))
    else:
        click.echo(
            f"{report.status.value} ({len(report.checks)} checks in {report.duration_ms:.0f} ms)"
        )
        width = max((len(name) for name in report.checks), default=0)
        for check in report.checks.values():
            latency = f" ({check.latency_ms:.1f} ms)" if check.latency_ms is not None else ""
            click.echo(
                f"  {check.name:<{width}}  {check.status.value:<9}  {check.message}{latency}"
            )
    raise SystemExit(EXIT_STATUS[report.status])


async def _check(settings: Settings) -> HealthReport:
    from dbkeeper.app import build_application
    from dbkeeper.host import Host

    host = Host(settings, build_application(settings), mode="check")
    try:
        return await host.health.run()  # the registry, not the monitor: no alerts from here
    finally:
        await host.health.close()
        if host.telegram_enabled:
            await host.application.bot.shutdown()
