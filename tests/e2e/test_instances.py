"""Several bot instances on one PostgreSQL database: real processes, the real service, the Bot
API stand-in. One leads (backups, alerts, polling); a standby takes over when it dies."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.support.hosts import free_port
from tests.support.process import BotProcess, run_cli, write_config
from tests.support.tcp_proxy import TCPProxy
from tests.support.telegram_api import DEFAULT_TOKEN, TelegramAPIStandIn

pytestmark = pytest.mark.timeout(150)
ADMIN = 4201
Start = Callable[..., BotProcess]


@pytest.fixture
def api() -> Iterator[TelegramAPIStandIn]:
    with TelegramAPIStandIn() as standin:
        yield standin


@pytest.fixture
def start(tmp_path: Path, postgres_url: str, api: TelegramAPIStandIn) -> Iterator[Start]:
    """Start an instance named ``name`` on the shared database and backup directory."""
    running: list[BotProcess] = []

    def launch(name: str, url: str | None = None, **sections: dict[str, Any]) -> BotProcess:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        values: dict[str, dict[str, Any]] = {
            "telegram": {
                "token": DEFAULT_TOKEN,
                "api_base_url": api.base_url,
                "admin_ids": [ADMIN],
            },
            "database": {"url": url or postgres_url, "retry_backoff_seconds": [0.2]},
            "backup": {"dir": str(tmp_path / "backups"), "interval_seconds": 2},
            "health": {"http_port": free_port(), "interval_seconds": 3600},
            "instance": {"name": name, "leader_poll_seconds": 0.5},
        }
        for section, extra in sections.items():
            values.setdefault(section, {}).update(extra)
        config = write_config(workdir / "config.toml", values)
        process = BotProcess(["--config", str(config), "run"], cwd=workdir)
        process.http_port = values["health"]["http_port"]  # type: ignore[attr-defined]
        running.append(process)
        return process

    yield launch
    for process in running:
        process.kill()


def _manifests(tmp_path: Path) -> list[dict[str, Any]]:
    directory = tmp_path / "backups"
    return (
        [
            json.loads((directory / name).read_text())
            for name in sorted(os.listdir(directory))
            if name.endswith(".manifest.json")
        ]
        if directory.is_dir()
        else []
    )


def _health(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


def _wait(predicate: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_one_leader_backs_up_and_polls_and_a_standby_takes_over_when_it_is_killed(
    tmp_path: Path, start: Start, api: TelegramAPIStandIn
) -> None:
    alpha = start("alpha")
    alpha.wait_for_line("taking updates from Telegram (polling)")
    beta, gamma = start("beta"), start("gamma")
    for standby in (beta, gamma):
        standby.wait_for_line("standing by: alpha leads and polls Telegram")
    alpha.wait_for_line("(scheduled): ")
    _wait(lambda: len(_manifests(tmp_path)) >= 2, "two scheduled backups")

    # Each instance reports its own view over HTTP, and names the leader.
    view = _health(gamma.http_port)
    assert view["instance"] == "gamma" and view["leader"] == "alpha"
    api.push_command("/health", user_id=ADMIN)
    assert "answered by alpha (the leader)" in api.wait_for_message("answered by", ADMIN)["text"]

    # A standby that stops takes no shutdown backup: the leader does that.
    assert gamma.stop() == 0
    assert "no final backup here (alpha leads and takes it)" in gamma.output

    alpha.send(signal.SIGKILL)
    alpha.wait()
    killed_at = time.monotonic()
    beta.wait_for_line("beta is now the leader", timeout=10)
    assert time.monotonic() - killed_at < 2 + 1  # within one backup interval (+ a poll)
    beta.wait_for_line("taking updates from Telegram (polling)")
    api.reset_calls()
    api.push_command("/health", user_id=ADMIN)
    assert "answered by beta (the leader)" in api.wait_for_message("answered by", ADMIN)["text"]
    beta.wait_for_line("(scheduled): ")  # the new leader takes the scheduled backups
    assert beta.stop() == 0
    assert "(shutdown): " in beta.output

    reasons = [m["reason"] for m in _manifests(tmp_path)]
    assert "shutdown" in reasons and set(reasons) <= {"scheduled", "shutdown"}
    assert ") started" not in gamma.output  # a standby never backed anything up
    assert api.conflicts == 0  # never two getUpdates pollers at once


def test_webhook_mode_every_instance_answers_the_same(
    tmp_path: Path, start: Start, api: TelegramAPIStandIn
) -> None:
    secret = "hook-secret-123"
    ports = {name: free_port() for name in ("alpha", "beta")}
    processes = {}
    for name, port in ports.items():  # alpha first, so that alpha leads
        processes[name] = start(
            name,
            telegram={
                "webhook_url": f"http://127.0.0.1:{port}/hook",
                "webhook_port": port,
                "webhook_listen": "127.0.0.1",
                "webhook_secret": secret,
            },
        )
        processes[name].wait_for_line("taking updates from Telegram through the webhook")
    assert api.calls("getUpdates") == []  # nobody polls in webhook mode
    answers = {}
    for name, port in ports.items():
        api.push_command("/health", user_id=ADMIN)
        update = api.pending_updates()[-1]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/hook",
            data=json.dumps(update).encode(),
            headers={
                "Content-Type": "application/json",
                "X-Telegram-Bot-Api-Secret-Token": secret,
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        answers[name] = api.wait_for_message(
            lambda m, n=name: f"answered by {n}" in m["text"], ADMIN
        )["text"]
    forged = urllib.request.Request(
        f"http://127.0.0.1:{ports['beta']}/hook",
        data=json.dumps(api.pending_updates()[-1]).encode(),
        headers={"Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": "wrong"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(forged, timeout=10)
    assert refused.value.code == 403  # only Telegram (who knows the secret) is listened to
    assert "answered by alpha (the leader)" in answers["alpha"]
    assert "answered by beta; alpha leads" in answers["beta"]
    same = [line for line in answers["alpha"].splitlines() if "database_migrations" in line]
    assert same and same[0] in answers["beta"]
    for process in processes.values():
        assert process.stop() == 0
        assert secret not in process.output and DEFAULT_TOKEN not in process.output


def test_a_postgresql_restart_is_survived_with_one_alert_and_one_resolved_message(
    tmp_path: Path, start: Start, api: TelegramAPIStandIn, postgres_url: str
) -> None:
    with TCPProxy(("127.0.0.1", 5432)) as proxy:
        url = proxy.url(postgres_url)
        fast = {"interval_seconds": 0.5, "check_timeout_seconds": 1}
        backup = {"interval_seconds": 3600}
        alpha = start("alpha", url, health=fast, backup=backup)
        alpha.wait_for_line("taking updates from Telegram (polling)")
        beta = start("beta", url, health=fast, backup=backup)
        beta.wait_for_line("standing by: alpha leads")
        # the first backup (10 s after start) makes both healthy; then the server goes away
        alpha.wait_for_line("(scheduled): ", timeout=30)
        _wait(lambda: _health(alpha.http_port)["status"] == "healthy", "alpha healthy")
        _wait(lambda: _health(beta.http_port)["status"] == "healthy", "beta healthy")
        api.reset_calls()

        proxy.refuse()  # the server is down: connections dropped, new ones refused
        _wait(lambda: _health(alpha.http_port)["status"] == "unhealthy", "alpha unhealthy")
        _wait(lambda: _health(beta.http_port)["status"] == "unhealthy", "beta unhealthy")
        api.wait_for_message("unhealthy", ADMIN, timeout=30)
        proxy.forward()  # and back
        _wait(lambda: _health(alpha.http_port)["status"] == "healthy", "alpha healthy again")
        _wait(lambda: _health(beta.http_port)["status"] == "healthy", "beta healthy again")
        api.wait_for_message("healthy again", ADMIN, timeout=30)
        beta.wait_for_line("not alerting (standby")  # beta saw it too and left it to alpha
        assert "beta is now the leader" not in beta.output  # alpha kept its role throughout

        texts = [m["text"] for m in api.sent_messages(ADMIN)]
        assert sum("unhealthy" in t and "healthy again" not in t for t in texts) == 1, texts
        assert sum("healthy again" in t for t in texts) == 1, texts
        # The bot itself works on after the restart.
        api.push_command("/dbstats", user_id=ADMIN)
        api.wait_for_message("Schema v3 (0 pending)", ADMIN)
        for process in (beta, alpha):
            assert process.stop() == 0


def test_an_instance_with_older_code_refuses_a_newer_schema(
    tmp_path: Path, postgres_url: str
) -> None:
    write_config(
        tmp_path / "config.toml",
        {"database": {"url": postgres_url}, "health": {"http_port": free_port()}},
    )
    assert run_cli(["db", "migrate"], cwd=tmp_path)[0] == 0
    engine = create_engine(postgres_url)
    with engine.begin() as connection:  # what newer code's revision 0004 leaves behind
        connection.execute(text("UPDATE alembic_version SET version_num = '0004'"))
    engine.dispose()
    code, output = run_cli(["run"], cwd=tmp_path)
    assert code == 1
    assert "schema v4 (0004), newer than this code knows (its head is v3 (0003))" in output
    assert "Refusing to run" in output
