"""Every code block of the README does what it claims (see tests/support/readme.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dbkeeper.config import settings_from_mapping
from tests.support.hosts import free_port
from tests.support.process import REPO, BotProcess, run_cli, write_config
from tests.support.readme import KINDS, block, blocks
from tests.support.telegram_api import DEFAULT_TOKEN, TelegramAPIStandIn


def test_every_block_says_what_the_tests_do_with_it() -> None:
    unmarked = [f"README.md line {b.line}" for b in blocks() if b.kind not in KINDS]
    assert unmarked == []


def _checkout(target: Path) -> Path:
    """The repository's tracked files, as a clean clone has them."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        source, copy = REPO / name, target / name
        if source.is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy)
    return target


@pytest.mark.timeout(300)
def test_quick_start_installs_and_runs_the_bot_until_ctrl_c(tmp_path: Path) -> None:
    checkout = _checkout(tmp_path / "dbkeeper")
    command = block("run", "quick-start").text.strip()
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("DBKEEPER_", "VIRTUAL"))
    }
    environment.pop("PYTHONPATH", None)
    process = subprocess.Popen(
        ["bash", "-c", command],
        cwd=checkout,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if "dbkeeper is running" in line:
            os.killpg(process.pid, signal.SIGINT)  # Ctrl+C
    assert process.wait(60) == 0, "".join(lines)
    output = "".join(lines)
    assert "local mode: no Telegram token" in output and "shutdown complete" in output
    assert (checkout / "data" / "bot.db").is_file()


def test_the_test_command_is_what_ci_runs() -> None:
    assert block("ci").text.strip() in (REPO / ".ci" / "run").read_text().splitlines()


def test_the_config_error_transcript(tmp_path: Path) -> None:
    transcript = block("transcript").text.strip().splitlines()
    assert transcript[0] == "$ dbkeeper run"
    (tmp_path / "config.toml").write_text("[backup]\nkeep = 0\n")
    code, output = run_cli(transcript[0].split()[2:], cwd=tmp_path)
    assert code == 2 and output.strip().splitlines() == transcript[1:]


@pytest.mark.parametrize("index", range(sum(b.kind == "config" for b in blocks())))
def test_the_config_examples_load(tmp_path: Path, index: int, monkeypatch) -> None:
    example = [b for b in blocks() if b.kind == "config"][index]
    (tmp_path / "alembic").mkdir()
    (tmp_path / "alembic" / "env.py").write_text("")
    monkeypatch.chdir(tmp_path)
    settings = settings_from_mapping(tomllib.loads(example.text), environ={})
    assert settings.sections  # every key known and valid


def test_the_alembic_revision_command_writes_the_next_numbered_revision(tmp_path: Path) -> None:
    checkout = _checkout(tmp_path / "dbkeeper")
    (checkout / ".venv").symlink_to(Path(sys.executable).parent.parent)
    code, output = run_cli(["db", "migrate"], cwd=checkout)
    assert code == 0, output
    command = block("run", "alembic-revision").text.strip()
    result = subprocess.run(
        ["bash", "-c", command], cwd=checkout, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    created = checkout / "migrations" / "versions" / "0004_add_subscriptions.py"
    assert created.is_file(), result.stdout + result.stderr
    assert "Revision ID: 0004\nRevises: 0003" in created.read_text()


def test_the_backup_list_illustration_has_the_real_header(tmp_path: Path) -> None:
    shown = block("illustration", "backup-list").text.splitlines()
    write_config(tmp_path / "config.toml", {"backup": {"dir": str(tmp_path / "backups")}})
    assert run_cli(["db", "migrate"], cwd=tmp_path)[0] == 0
    assert run_cli(["backup", "create"], cwd=tmp_path)[0] == 0
    code, output = run_cli(["backup", "list"], cwd=tmp_path)
    assert code == 0 and shown[1] in output.splitlines(), output


def test_the_embedded_bot_runs_answers_and_stops(tmp_path: Path) -> None:
    (tmp_path / "mybot.py").write_text(block("run", "embedded-bot").text)
    with TelegramAPIStandIn() as api:
        write_config(
            tmp_path / "config.toml",
            {
                "telegram": {"api_base_url": api.base_url},
                "health": {"http_port": free_port()},
            },
        )
        program = [sys.executable, "mybot.py"]
        env = {"TELEGRAM_BOT_TOKEN": DEFAULT_TOKEN, "PYTHONPATH": str(REPO)}
        with BotProcess([], cwd=tmp_path, program=program, env=env) as bot:
            bot.wait_for_line("taking updates from Telegram (polling)")
            api.push_command("/start", user_id=777)
            api.wait_for_message("Hello! My database is sqlite.", chat_id=777)
            assert bot.stop(signal.SIGINT) == 0
        api.fail(status=500)  # the Bot API unreachable: database work starts regardless
        api.fail("getUpdates", status=500)
        with BotProcess([], cwd=tmp_path, program=program, env=env) as bot:
            bot.wait_for_line("cannot reach the Telegram Bot API")
            bot.wait_for_line("dbkeeper is running")
            assert bot.stop(signal.SIGINT) == 0
    with BotProcess([], cwd=tmp_path, program=program, env={"PYTHONPATH": str(REPO)}) as bot:
        bot.wait_for_line("local mode: no Telegram token")  # and without a token
        bot.wait_for_line("dbkeeper is running")
        assert bot.stop(signal.SIGINT) == 0


def test_the_plugin_example_loads_from_the_config(tmp_path: Path) -> None:
    (tmp_path / "greeter.py").write_text(block("run", "plugin").text)
    write_config(
        tmp_path / "config.toml",
        {
            "bot": {"plugins": ["greeter"]},
            "greeter": {"greeting": "Hi there"},
            "health": {"http_port": free_port()},
        },
    )
    code, output = run_cli(["greet"], cwd=tmp_path)
    assert (code, output.strip()) == (0, "Hi there")
    assert run_cli(["db", "migrate"], cwd=tmp_path)[0] == 0
    code, output = run_cli(["health"], cwd=tmp_path)
    assert "greeter" in output and "ready to say 'Hi there'" in output
