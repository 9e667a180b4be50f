"""The health monitor: first check at startup, periodic checks on the job queue, sharing."""

from __future__ import annotations

import asyncio
import time

from dbkeeper.config import HealthSettings
from dbkeeper.health import HealthRegistry, Outcome, Status, healthy
from dbkeeper.monitor import HISTORY_SIZE, HealthMonitor
from tests.conftest import SettingsFactory
from tests.support.hosts import free_port, running_host


async def test_first_check_at_startup_then_every_interval_on_the_job_queue(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        sqlite_url, health={"http_port": free_port(), "interval_seconds": 0.02}
    )
    async with running_host(settings, job_queue=True) as (host, plugin):
        monitor = host.monitor
        assert monitor.runs >= 1 and monitor.last is not None  # before the job queue started
        assert monitor.is_healthy()  # a fresh install is not a problem (no backup due yet)
        await plugin.backup_now()
        assert (await monitor.check()).status is Status.HEALTHY
        deadline = time.monotonic() + 15
        while monitor.runs <= HISTORY_SIZE + 2:
            assert time.monotonic() < deadline, f"only {monitor.runs} runs"
            await asyncio.sleep(0.05)
        assert len(monitor.history) == HISTORY_SIZE
        assert monitor.history[-1] is monitor.last
        stamps = [report.timestamp for report in monitor.history]
        assert stamps == sorted(stamps)


def _counting_monitor(cache: float = 10) -> tuple[HealthMonitor, list[int]]:
    calls: list[int] = []

    async def counted() -> Outcome:
        calls.append(1)
        await asyncio.sleep(0.05)  # long enough for the concurrent callers to overlap
        return healthy("ok")

    registry = HealthRegistry(timeout=1)
    registry.add("counted", counted)
    return HealthMonitor(registry, HealthSettings(http_cache_seconds=cache)), calls


async def test_concurrent_callers_share_one_run_and_fresh_reports_are_reused() -> None:
    monitor, calls = _counting_monitor()
    reports = await asyncio.gather(*(monitor.latest(max_age=10) for _ in range(50)))
    assert len(calls) == 1
    assert all(report is reports[0] for report in reports)
    assert await monitor.latest(max_age=10) is reports[0]  # fresh enough: no new run
    assert len(calls) == 1
    newer = await monitor.latest(max_age=0)  # too old for this caller: runs again
    assert newer is not reports[0] and len(calls) == 2
    assert monitor.runs == 2 and monitor.is_healthy()


async def test_listeners_hear_every_run_and_a_failing_listener_does_not_stop_the_others() -> None:
    monitor, _ = _counting_monitor()
    heard: list[Status] = []

    def broken(_report: object) -> None:
        raise RuntimeError("listener bug")

    monitor.add_listener(broken)
    monitor.add_listener(lambda report: heard.append(report.status))
    await monitor.check()
    await monitor.check()
    assert heard == [Status.HEALTHY, Status.HEALTHY]


async def test_after_stop_the_last_report_is_served_and_nothing_runs() -> None:
    monitor, calls = _counting_monitor()
    last = await monitor.check()
    await monitor.stop()
    assert await monitor.check() is last
    assert await monitor.latest(max_age=0) is last
    assert len(calls) == 1
