"""Prometheus metrics, one ``CollectorRegistry`` per host (so tests can run many hosts).

Metrics are read at scrape time from what the health monitor last measured; nothing is queried
while collecting. The host's own metrics:

- ``dbkeeper_health_status`` and ``dbkeeper_health_check_status{check}``: 0 healthy,
  1 degraded, 2 unhealthy;
- ``dbkeeper_health_check_duration_seconds{check}``,
  ``dbkeeper_health_last_check_timestamp_seconds``, ``dbkeeper_health_checks_total`` (runs);
- ``dbkeeper_alerts_sent_total``, ``dbkeeper_alerts_dropped_total``;
- ``process_*`` from prometheus_client's process collector.

Plugins add their own with :meth:`Metrics.register` (the database plugin: ``dbkeeper_database_*``,
``dbkeeper_backup*``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dbkeeper.health import CheckResult, HealthReport

if TYPE_CHECKING:  # the host's parts: plugins' collectors (and the CLI) import this module
    from aiohttp.typedefs import Handler

    from dbkeeper.alerts import Alerter
    from dbkeeper.monitor import HealthMonitor

PREFIX = "dbkeeper"


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


class CheckGauges(Collector):
    """Gauges read from one check's values in the last health report (no work of its own).

    ``gauges``: value name -> (metric name without the prefix, documentation); a value the
    check did not report is left out. ``silent``: no metric at all for such a result (a standby
    that does not do the work).
    """

    def __init__(
        self,
        check: str,
        gauges: Mapping[str, tuple[str, str]],
        last_report: Callable[[], HealthReport | None],
        *,
        silent: Callable[[CheckResult], bool] = lambda result: False,
    ) -> None:
        self.check, self.gauges, self.last_report, self.silent = check, gauges, last_report, silent

    def describe(self) -> Iterable[Metric]:
        return []

    def result(self) -> CheckResult | None:
        report = self.last_report()
        result = report.checks.get(self.check) if report is not None else None
        return None if result is None or self.silent(result) else result

    def collect(self) -> Iterator[Metric]:
        result = self.result()
        if result is None:
            return
        for value, (name, documentation) in self.gauges.items():
            if value in result.values:
                yield gauge(name, documentation, result.values[value])


class Metrics:
    def __init__(self, monitor: HealthMonitor, alerter: Alerter) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(_HealthCollector(monitor, alerter))

    def register(self, collector: Collector) -> None:
        self.registry.register(collector)

    def handler(self) -> Handler:
        from prometheus_client.aiohttp import make_aiohttp_handler

        return make_aiohttp_handler(self.registry)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


class _HealthCollector(Collector):
    def __init__(self, monitor: HealthMonitor, alerter: Alerter) -> None:
        self.monitor = monitor
        self.alerter = alerter

    def describe(self) -> Iterable[Metric]:
        return []  # names depend on the checks registered; collected at scrape time

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            f"{PREFIX}_health_checks",
            "Health check runs (all checks together) since the process started.",
            value=self.monitor.runs,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_alerts_sent",
            "Alert messages delivered (to Telegram, or to the log in local mode).",
            value=self.alerter.sent,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_alerts_dropped",
            "Alert messages given up on (Telegram refused them or did not answer by shutdown).",
            value=self.alerter.dropped,
        )
        yield gauge(
            "health_interval_seconds",
            "[health] interval_seconds: a health check runs this often.",
            self.monitor.settings.interval_seconds,
        )
        report = self.monitor.last
        if report is None:
            return
        yield gauge(
            "health_status",
            "Overall health: 0 healthy, 1 degraded, 2 unhealthy.",
            report.status.rank,
        )
        yield gauge(
            "health_last_check_timestamp_seconds",
            "When the last health check ran (unix time).",
            report.timestamp,
        )
        status = GaugeMetricFamily(
            f"{PREFIX}_health_check_status",
            "Status of each health check: 0 healthy, 1 degraded, 2 unhealthy.",
            labels=["check"],
        )
        took = GaugeMetricFamily(
            f"{PREFIX}_health_check_duration_seconds",
            "How long each health check took in its last run.",
            labels=["check"],
        )
        for check in report.checks.values():
            status.add_metric([check.name], check.status.rank)
            took.add_metric([check.name], check.duration_ms / 1000)
        yield status
        yield took
