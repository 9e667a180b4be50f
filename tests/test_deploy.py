"""What operators deploy, tested for real: the systemd unit (verified by systemd-analyze, its
notify protocol against a real NOTIFY_SOCKET), the container's command as PID 1 under SIGTERM,
the Dockerfile's health check, and the compose example."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_tool
from tests.support.hosts import free_port
from tests.support.process import REPO, BotProcess, write_config
from tests.support.revisions import GATED, add_revision

DEPLOY = REPO / "deploy"
SHUTDOWN_BUDGET = 9  # [shutdown] timeout_seconds' default


def _unit() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / "dbkeeper.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_the_systemd_unit_is_verified_by_systemd(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    require_tool(None if analyze else "systemd-analyze is not installed here")
    assert analyze is not None
    unit = (DEPLOY / "systemd" / "dbkeeper.service").read_text()
    # This machine has neither the dbkeeper user nor /opt/dbkeeper: point it at what exists.
    unit = unit.replace(
        "/opt/dbkeeper/venv/bin/dbkeeper", str(Path(sys.executable).parent / "dbkeeper")
    )
    unit = re.sub(r"^(User|Group)=.*$", r"\1=root", unit, flags=re.M)
    (tmp_path / "dbkeeper.service").write_text(unit)
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "dbkeeper.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_the_systemd_unit_fits_dbkeeper() -> None:
    unit = _unit()
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["KillSignal"] == ["SIGTERM"]
    assert int(unit["TimeoutStopSec"][0]) > SHUTDOWN_BUDGET  # the final backup fits
    assert int(unit["WatchdogSec"][0]) > 0
    for hardening in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "PrivateDevices"):
        assert unit[hardening] == ["yes"], hardening
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ReadWritePaths"] == ["/var/lib/dbkeeper"] == unit["WorkingDirectory"]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    listener.bind(path)
    listener.settimeout(30)
    try:
        yield listener, path
    finally:
        listener.close()


def _readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_systemd_hears_ready_when_readyz_turns_200_then_watchdog_then_stopping(
    tmp_path: Path, scripts_dir: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    listener, path = notify_socket
    add_revision(scripts_dir, GATED, doc="gated")  # 0004 holds startup until released
    port = free_port()
    write_config(
        tmp_path / "config.toml",
        {
            "database": {"url": f"sqlite:///{tmp_path / 'bot.db'}"},
            "migrations": {"script_location": str(scripts_dir)},
            "backup": {"dir": str(tmp_path / "backups")},
            "health": {"http_port": port},
        },
    )
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000", "DBKEEPER_GATE_DIR": str(gate)}
    with BotProcess(["run"], cwd=tmp_path, env=env) as bot:
        deadline = time.monotonic() + 30
        while not any(gate.glob("entered-*")):  # held inside revision 0004
            assert time.monotonic() < deadline and bot.process.poll() is None, bot.output
            time.sleep(0.02)
        messages: list[str] = []
        deadline = time.monotonic() + 5
        listener.settimeout(0.5)
        while time.monotonic() < deadline and len(messages) < 3:
            try:
                messages.append(listener.recv(4096).decode())
            except TimeoutError:
                continue
        # While migrating: the watchdog is fed (the loop turns), READY is not said, /readyz 503.
        assert messages and all(m == "WATCHDOG=1" for m in messages), messages
        assert _readyz(port) == 503
        (gate / "release").write_text("")
        listener.settimeout(30)
        while True:
            message = listener.recv(4096).decode()
            if message.startswith("READY=1"):
                break
        assert _readyz(port) == 200  # the same moment: /readyz answers 200
        assert "STATUS=" in message
        bot.send(signal.SIGTERM)
        while True:
            message = listener.recv(4096).decode()
            if message.startswith("STOPPING=1"):
                break
        assert bot.wait(30) == 0


def _dockerfile() -> dict[str, str]:
    """The last value of each instruction; ENV values gathered as NAME=value lines."""
    instructions: dict[str, str] = {"ENV": ""}
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            if keyword == "ENV":
                instructions["ENV"] += " ".join(rest.split()) + "\n"
            else:
                instructions[keyword] = " ".join(rest.split())
    return instructions


def test_the_dockerfile_runs_as_a_user_with_a_volume_and_a_graceful_stop() -> None:
    docker = _dockerfile()
    assert docker["USER"] not in ("root", "0")
    assert json.loads(docker["VOLUME"]) == ["/data"] and docker["WORKDIR"] == "/data"
    assert docker["STOPSIGNAL"] == "SIGTERM"
    assert "/livez" in docker["HEALTHCHECK"]
    assert json.loads(docker["ENTRYPOINT"]) == ["dbkeeper"]
    assert json.loads(docker["CMD"]) == ["run"]  # /data/config.toml when it is there


def _child_of(pid: int, timeout: float = 10) -> int:
    """The process ``unshare --fork`` started (PID 1 in its namespace)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children")
        found = children.read_text().split() if children.exists() else []
        if found:
            return int(found[0])
        time.sleep(0.02)
    raise AssertionError("unshare started no child")


def test_the_containers_command_as_pid_1_stops_gracefully_with_a_final_backup(
    tmp_path: Path,
) -> None:
    require_tool(None if shutil.which("unshare") else "util-linux unshare is not installed")
    docker = _dockerfile()
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    # No config.toml: the image starts on the defaults and its environment (the volume holds
    # a config only when the operator puts one there).
    command = [*json.loads(docker["ENTRYPOINT"]), *json.loads(docker["CMD"])]
    token = "container-token-0123456789"
    image_env = dict(line.split("=", 1) for line in docker["ENV"].splitlines())
    assert image_env["DBKEEPER_HTTP_HOST"] == "0.0.0.0"
    env = {
        **image_env,
        "DBKEEPER_HTTP_TOKEN": token,
        "DBKEEPER_HTTP_PORT": str(port),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    # --kill-child: a failing test that kills unshare takes dbkeeper (its PID 1) with it
    program = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
    with BotProcess(command, cwd=data, env=env, program=program) as bot:
        pid1 = _child_of(bot.pid)
        bot.wait_for_line("dbkeeper is running")
        pids = Path(f"/proc/{pid1}/status").read_text().split("NSpid:")[1].splitlines()[0].split()
        assert pids == [str(pid1), "1"]  # dbkeeper is PID 1 in its namespace, as in a container
        # The image's HEALTHCHECK, as Docker runs it (on the port configured here).
        probe = json.loads(docker["HEALTHCHECK"].split(" CMD ", 1)[1])
        probe = [p.replace("3001", str(port)) for p in probe]
        probe[0] = sys.executable
        assert subprocess.run(probe, timeout=10).returncode == 0
        started = time.monotonic()
        os.kill(pid1, signal.SIGTERM)  # what `docker stop` sends to PID 1
        assert bot.wait(30) == 0, bot.output
        assert time.monotonic() - started < SHUTDOWN_BUDGET + 1
    backups = [p.name for p in (data / "data" / "backups").iterdir() if p.suffix != ".json"]
    assert any(name.startswith("bot-db-") for name in backups), bot.output
    assert "(shutdown)" in bot.output and "shutdown complete" in bot.output
    assert token not in bot.output


def test_the_compose_example_runs_two_instances_on_postgresql() -> None:
    compose = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "bot-1", "bot-2"} <= set(services)
    for name in ("bot-1", "bot-2"):
        bot = services[name]
        assert (
            bot["init"] is True and bot["depends_on"]["postgres"]["condition"] == "service_healthy"
        )
        grace = int(str(bot["stop_grace_period"]).rstrip("s"))
        assert grace > SHUTDOWN_BUDGET
        environment = bot["environment"]
        assert environment["DATABASE_URL"].startswith("postgresql+psycopg://")
        for secret in ("TELEGRAM_BOT_TOKEN", "DBKEEPER_HTTP_TOKEN"):
            assert environment[secret].startswith("${"), secret  # never written in the file
        assert any(volume.endswith(":/data/data/backups") for volume in bot["volumes"])
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]


def test_the_readme_installs_what_the_unit_runs() -> None:
    from tests.support.readme import block

    steps = block("illustration", "deploy-systemd").text
    unit = _unit()
    [start] = unit["ExecStart"]
    venv, config = start.split()[0].removesuffix("/bin/dbkeeper"), start.split()[2]
    assert f"python3 -m venv {venv}" in steps and f"{venv}/bin/pip install" in steps
    assert f"config.toml {config}" in steps
    assert unit["EnvironmentFile"] == ["-/etc/dbkeeper/env"] and "/etc/dbkeeper/env" in steps
    assert unit["User"] == ["dbkeeper"] and "--home-dir /var/lib/dbkeeper" in steps
    assert "deploy/systemd/dbkeeper.service /etc/systemd/system/" in steps
