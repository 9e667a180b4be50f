"""``/metrics`` over real HTTP, parsed back with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SettingsFactory
from tests.support.hosts import free_port, get, running_host
from tests.support.tcp_proxy import TCPProxy, postgres_proxy_fixture  # noqa: F401 (proxy)

GAUGES = {
    "dbkeeper_health_status",
    "dbkeeper_health_check_status",
    "dbkeeper_health_check_duration_seconds",
    "dbkeeper_health_last_check_timestamp_seconds",
    "dbkeeper_database_up",
    "dbkeeper_database_round_trip_seconds",
    "dbkeeper_database_size_bytes",
    "dbkeeper_database_schema_version",
    "dbkeeper_database_tables",
    "dbkeeper_database_records",
    "dbkeeper_database_migrations_pending",
    "dbkeeper_database_migration_duration_seconds",
    "dbkeeper_backups",
    "dbkeeper_backups_size_bytes",
    "dbkeeper_backup_last_success_timestamp_seconds",
    "dbkeeper_backup_last_duration_seconds",
    "dbkeeper_backup_volume_free_bytes",
    "dbkeeper_backup_next_size_bytes",
}
COUNTERS = {"dbkeeper_health_checks", "dbkeeper_alerts_sent", "dbkeeper_alerts_dropped"}


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> {labels: value}; counters under their family name (without ``_total``)."""
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            found.setdefault(family.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics[name][tuple(sorted(labels.items()))]


async def test_metrics_parse_back_with_prometheus_names_and_the_measured_values(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        sqlite_url, health={"http_port": free_port(), "http_cache_seconds": 0.01}
    )
    async with running_host(settings) as (host, plugin):
        backup = await plugin.backup_now()
        await asyncio.sleep(0.02)
        url = f"http://127.0.0.1:{host.http.port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            status, text = response.status, await response.text()
            content_type = response.headers["Content-Type"]
    assert status == 200
    assert content_type.startswith("text/plain; version=")
    metrics = parse(text)
    assert set(metrics) >= GAUGES | COUNTERS, sorted(GAUGES | COUNTERS - set(metrics))
    for family in text_string_to_metric_families(text):
        assert family.name.startswith(("dbkeeper_", "process_", "python_")), family.name
        if family.name in COUNTERS:
            assert family.type == "counter"
            assert {s.name for s in family.samples} == {family.name + "_total"}
        if family.name in GAUGES:
            assert family.type == "gauge"
    assert value(metrics, "dbkeeper_database_up") == 1
    assert value(metrics, "dbkeeper_database_schema_version") == 3
    assert value(metrics, "dbkeeper_database_tables") == 4
    assert value(metrics, "dbkeeper_database_migrations_pending") == 0
    assert 0 < value(metrics, "dbkeeper_database_round_trip_seconds") < 1
    assert value(metrics, "dbkeeper_database_size_bytes") > 4096
    assert value(metrics, "dbkeeper_health_status") == 0
    checks = {
        dict(labels)["check"]: v for labels, v in metrics["dbkeeper_health_check_status"].items()
    }
    assert checks == {
        "database": 0,
        "database_migrations": 0,
        "database_integrity": 0,
        "database_size": 0,
        "database_backups": 0,
        "disk_space": 0,
        "database_maintenance": 0,
        "database_growth": 0,
    }
    revisions = {
        dict(labels)["revision"]
        for labels in metrics["dbkeeper_database_migration_duration_seconds"]
    }
    assert revisions == {"0001", "0002", "0003"}
    assert value(metrics, "dbkeeper_backups") == 1
    assert value(metrics, "dbkeeper_backups_size_bytes") == backup.size_bytes
    assert abs(value(metrics, "dbkeeper_backup_last_success_timestamp_seconds") - time.time()) < 60
    assert value(metrics, "dbkeeper_backup_last_duration_seconds") == pytest.approx(
        backup.duration_seconds
    )
    assert value(metrics, "dbkeeper_backup_volume_free_bytes") > 0
    assert value(metrics, "dbkeeper_health_checks") >= 2


async def test_metrics_follow_the_database_going_down_and_coming_back(
    postgres_url: str, make_settings: SettingsFactory, proxy: TCPProxy
) -> None:
    settings = make_settings(
        proxy.url(postgres_url),
        health={"http_port": free_port(), "http_cache_seconds": 0.01, "check_timeout_seconds": 2},
    )
    async with running_host(settings) as (host, _):
        proxy.refuse()
        await asyncio.sleep(0.02)
        down = parse((await get(host, "/metrics"))[2])
        proxy.forward()
        await asyncio.sleep(0.02)
        up = parse((await get(host, "/metrics"))[2])
    assert value(down, "dbkeeper_database_up") == 0
    assert value(down, "dbkeeper_health_status") == 2
    assert value(down, "dbkeeper_health_check_status", check="database") == 2
    assert value(up, "dbkeeper_database_up") == 1
    assert value(up, "dbkeeper_health_check_status", check="database") == 0
