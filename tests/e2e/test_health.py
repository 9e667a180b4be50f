"""The health side in a real ``python -m dbkeeper run`` process: HTTP, ports, alerts, hangs."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.hosts import free_port
from tests.support.process import BotProcess, run_cli, write_config
from tests.support.revisions import BROKEN, add_revision
from tests.support.tcp_proxy import TCPProxy
from tests.support.telegram_api import DEFAULT_TOKEN, TelegramAPIStandIn

pytestmark = pytest.mark.timeout(120)
ADMIN = 777


def _config(tmp_path: Path, url: str, **sections: dict[str, Any]) -> tuple[Path, int]:
    port = free_port()
    values: dict[str, dict[str, Any]] = {
        "database": {"url": url, "retry_backoff_seconds": [0.1]},
        "backup": {"dir": str(tmp_path / "backups"), "on_shutdown": False},
        "health": {"http_port": port},
    }
    for name, extra in sections.items():
        values.setdefault(name, {}).update(extra)
    return write_config(tmp_path / "config.toml", values), port


def _get(port: int, path: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def standin() -> Iterator[TelegramAPIStandIn]:
    with TelegramAPIStandIn() as api:
        yield api


def test_local_mode_serves_health_metrics_and_probes_then_stops(tmp_path: Path) -> None:
    # A database above its size warning: degraded from the first check.
    config, port = _config(
        tmp_path, f"sqlite:///{tmp_path / 'bot.db'}", health={"size_warning_mb": 0.01}
    )
    with BotProcess(["--config", str(config), "run"], cwd=tmp_path) as bot:
        bot.wait_for_line("dbkeeper is running")
        status, text = _get(port, "/health")
        body = json.loads(text)
        assert status == 200 and body["status"] == "degraded"  # the size warning
        assert body["checks"]["database"]["message"] == "Schema v3 | 4 tables | 0 records"
        assert _get(port, "/livez")[0] == 200
        assert _get(port, "/readyz") == (200, '{"status": "ready"}')
        status, text = _get(port, "/metrics")
        names = {family.name for family in text_string_to_metric_families(text)}
        assert {"dbkeeper_database_up", "dbkeeper_health_check_status"} <= names
        code = bot.stop(signal.SIGTERM)
    assert code == 0, bot.output
    assert f"health HTTP API on http://127.0.0.1:{port}" in bot.output
    assert "first health check: degraded" in bot.output
    # Local mode: the alert is a log line.
    assert "ALERT ⚠️ dbkeeper on " in bot.output and "above the 0.01 MB warning" in bot.output
    assert "no backup yet |" not in bot.output  # a fresh install is not a problem
    with pytest.raises(OSError):
        _get(port, "/livez", timeout=2)  # the server closed with the process


def test_a_port_in_use_stops_startup_before_any_migration(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config, _ = _config(
            tmp_path, f"sqlite:///{tmp_path / 'bot.db'}", health={"http_port": port}
        )
        code, output = run_cli(["--config", str(config), "run"], cwd=tmp_path)
    assert code == 1, output
    assert (
        f"startup failed: the health HTTP API cannot listen on 127.0.0.1:{port}: port {port} "
        "is already in use" in output
    )
    assert not (tmp_path / "bot.db").exists()


def test_a_failed_startup_migration_is_alerted_before_the_process_exits(
    tmp_path: Path, scripts_dir: Path, standin: TelegramAPIStandIn
) -> None:
    add_revision(scripts_dir, BROKEN, doc="broken")
    config, _ = _config(
        tmp_path,
        f"sqlite:///{tmp_path / 'bot.db'}",
        migrations={"script_location": str(scripts_dir)},
        telegram={"token": DEFAULT_TOKEN, "api_base_url": standin.base_url, "admin_ids": [ADMIN]},
    )
    code, output = run_cli(["--config", str(config), "run"], cwd=tmp_path)
    assert code == 1, output
    [alert] = standin.sent_messages(ADMIN)
    assert "startup failed: applying revision 0004 (broken) failed" in alert["text"]
    assert DEFAULT_TOKEN not in output


def test_a_dead_bot_api_never_holds_the_exit(
    tmp_path: Path, scripts_dir: Path, standin: TelegramAPIStandIn
) -> None:
    add_revision(scripts_dir, BROKEN, doc="broken")
    standin.fail()  # every Bot API method answers 500
    config, _ = _config(
        tmp_path,
        f"sqlite:///{tmp_path / 'bot.db'}",
        migrations={"script_location": str(scripts_dir)},
        telegram={"token": DEFAULT_TOKEN, "api_base_url": standin.base_url, "admin_ids": [ADMIN]},
        shutdown={"timeout_seconds": 2},
    )
    code, output = run_cli(["--config", str(config), "run"], cwd=tmp_path, timeout=30)
    assert code == 1, output
    assert "1 alert message(s) not delivered before shutdown" in output
    assert standin.sent_messages() == []


def test_a_hung_postgresql_answers_503_in_time_and_shutdown_completes(
    tmp_path: Path, postgres_url: str
) -> None:
    with TCPProxy(("127.0.0.1", 5432)) as proxy:
        config, port = _config(
            tmp_path,
            proxy.url(postgres_url),
            health={"check_timeout_seconds": 1, "http_cache_seconds": 0.1},
        )
        with BotProcess(["--config", str(config), "run"], cwd=tmp_path) as bot:
            bot.wait_for_line("dbkeeper is running")
            proxy.hang()
            time.sleep(0.2)  # let the cached answer expire (http_cache_seconds)
            status, text = _get(port, "/health", timeout=5)
            assert status == 503
            body = json.loads(text)
            assert body["checks"]["database"]["message"] == "no answer within 1s (timed out)"
            assert _get(port, "/livez", timeout=2)[0] == 200
            code = bot.stop(signal.SIGTERM, timeout=20)
            assert code == 0, bot.output
        assert bot.output.rstrip().endswith("shutdown complete")


def test_a_hung_postgresql_does_not_stretch_shutdown_past_its_budget(
    tmp_path: Path, postgres_url: str
) -> None:
    """The final backup cannot reach the server: it gives up at the budget and is reported."""
    with TCPProxy(("127.0.0.1", 5432)) as proxy:
        config, _ = _config(
            tmp_path,
            proxy.url(postgres_url),
            health={"check_timeout_seconds": 1},
            backup={"on_shutdown": True},
        )
        with BotProcess(["--config", str(config), "run"], cwd=tmp_path) as bot:
            bot.wait_for_line("dbkeeper is running")
            proxy.hang()
            started = time.monotonic()
            code = bot.stop(signal.SIGTERM, timeout=20)
            elapsed = time.monotonic() - started
    assert code == 0, bot.output
    assert elapsed < 10, f"shutdown took {elapsed:.1f}s:\n{bot.output}"  # docker stop's grace
    assert "shutdown: taking the final backup" in bot.output
    assert "ALERT" in bot.output.split("shutdown: taking the final backup", 1)[1]
    assert bot.output.rstrip().endswith("shutdown complete")
