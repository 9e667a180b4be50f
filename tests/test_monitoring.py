"""What operators load into Prometheus and Grafana: the alert rules pass promtool's own checks
and unit tests, the scrape configuration loads, and every metric the rules and the dashboard
read is one a running bot exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from sqlalchemy import create_engine, insert

from dbkeeper.plugins.database.migrate.bookkeeping import size_samples
from tests.conftest import SettingsFactory, require_tool
from tests.support.hosts import free_port, get, running_host
from tests.support.process import REPO

PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dbkeeper.json"
METRIC_NAME = re.compile(r"\b((?:dbkeeper|process)_[a-z0-9_]+)")


def _promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    require_tool(None if promtool else "promtool is not installed here (Debian: prometheus)")
    assert promtool is not None
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _rules() -> list[dict]:
    document = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _panels() -> list[dict]:
    return json.loads(DASHBOARD.read_text())["panels"]


def _dashboard_expressions() -> list[str]:
    return [target["expr"] for panel in _panels() for target in panel.get("targets", [])]


def test_the_alert_rules_pass_promtool_checks_and_their_unit_tests() -> None:
    checked = _promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", "alerts.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout + tested.stderr


def test_every_alert_rule_has_a_unit_test_that_fires_it() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    rules = {rule["alert"] for rule in _rules()}
    assert rules - fired == set(), "rules no test fires"
    for rule in _rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_scrape_configuration_loads(tmp_path: Path) -> None:
    # The example reads the token from /etc/prometheus/dbkeeper-token, absent here.
    token = tmp_path / "dbkeeper-token"
    token.write_text("a-token\n")
    config = (PROMETHEUS / "prometheus.yml").read_text()
    assert "/etc/prometheus/dbkeeper-token" in config
    (tmp_path / "prometheus.yml").write_text(
        config.replace("/etc/prometheus/dbkeeper-token", str(token))
    )
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path / "alerts.yml")
    checked = _promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(_rules())} rules found" in checked.stdout


def test_the_dashboard_is_importable_and_asks_for_its_data_source() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in _panels()]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in _panels():
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        position = panel["gridPos"]
        cells = {
            (x, y)
            for x in range(position["x"], position["x"] + position["w"])
            for y in range(position["y"], position["y"] + position["h"])
        }
        assert position["x"] + position["w"] <= 24, panel["title"]
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
    used = {name for expr in _dashboard_expressions() for name in re.findall(r"\$(\w+)", expr)}
    assert used <= set(variables), used - set(variables)


async def test_every_metric_the_rules_and_the_dashboard_read_is_exported(
    sqlite_url: str, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    """With every feature the rules watch switched on: off-site copies and replication."""
    wanted = {
        name
        for expr in [rule["expr"] for rule in _rules()] + _dashboard_expressions()
        for name in METRIC_NAME.findall(expr)
    }
    assert len(wanted) > 20  # the pattern reads the expressions
    offsite = tmp_path / "other-disk"
    offsite.mkdir()
    settings = make_settings(
        sqlite_url,
        health={"http_port": free_port(), "http_cache_seconds": 0.01, "interval_seconds": 1},
        offsite={"url": f"file://{offsite}"},
        replication={"enabled": True, "sync_interval_seconds": 0.2},
    )
    async with running_host(settings) as (host, plugin):
        await plugin.backup_now()
        assert plugin.uploads is not None and (await plugin.uploads.wait()) is not None
        _seed_growth(sqlite_url)
        await host.monitor.check()
        status, _, text = await get(host, "/metrics")
    assert status == 200
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    assert wanted - exported == set(), "read by the rules or the dashboard, never exported"


def _seed_growth(url: str) -> None:
    """Two minutes of size samples rising to the database's size, so the growth forecast (ten
    one-second check intervals of history suffice) names the day the disk is full."""
    now = datetime.now(UTC)
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            size = connection.exec_driver_sql(
                "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()"
            ).scalar_one()
            connection.execute(
                insert(size_samples),
                [
                    {
                        "taken_at": now - timedelta(seconds=120 - 10 * i),
                        "size_bytes": size * i // 12,
                    }
                    for i in range(12)
                ],
            )
    finally:
        engine.dispose()
