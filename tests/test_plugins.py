"""The plugin contract as a plugin author meets it: a second plugin loaded from the
configuration adds a health check, an admin command and a CLI group; a broken plugin name and a
bad plugin section each stop startup with one line; the host imports no plugin."""

from __future__ import annotations

import ast
import json
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hosts import free_port
from tests.support.process import REPO, BotProcess, run_cli, write_config
from tests.support.telegram_api import DEFAULT_TOKEN, TelegramAPIStandIn

ADMIN, STRANGER = 4201, 6666

EXTRA_PLUGIN = '''
"""A plugin as an author writes one: a section, a check, an admin command, a CLI group."""

from dataclasses import dataclass

import click

from dbkeeper.config import at_least, setting
from dbkeeper.health import healthy
from dbkeeper.plugin import Plugin


@dataclass(frozen=True)
class ExtraSettings:
    answer: int = setting(42, at_least(1), doc="the answer")


@click.group()
def extra() -> None:
    """The extra plugin's commands."""


@extra.command()
@click.pass_obj
def hello(obj) -> None:
    """Say hello with the configured answer."""
    click.echo(f"hello from extra, answer {obj.settings.section(ExtraSettings).answer}")


class ExtraPlugin(Plugin):
    name = "extra"
    sections = {"extra": ExtraSettings}

    @classmethod
    def commands(cls):
        return [extra]

    def setup(self, context) -> None:
        answer = context.section(ExtraSettings).answer

        async def check():
            return healthy(f"answer {answer}")

        async def command(update, _context) -> None:
            await update.effective_message.reply_text(f"extra says {answer}")

        context.add_check("extra", check)
        if context.telegram_enabled:
            context.add_admin_command("extra", command, "The extra plugin's answer")


plugin = ExtraPlugin
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A bot directory with a plugin of its own beside its configuration."""
    (tmp_path / "extra.py").write_text(EXTRA_PLUGIN)
    return tmp_path


def _config(project: Path, **sections: dict) -> Path:
    values: dict[str, dict] = {
        "bot": {"plugins": ["dbkeeper.plugins.members", "extra"]},
        "database": {"url": f"sqlite:///{project / 'data' / 'bot.db'}"},
        "backup": {"dir": str(project / "backups"), "interval_seconds": 3600},
        "health": {"http_port": free_port(), "interval_seconds": 3600},
    }
    for name, extra in sections.items():
        values.setdefault(name, {}).update(extra)
    return write_config(project / "config.toml", values)


def test_a_plugin_from_the_config_adds_a_cli_group_and_a_health_check(project: Path) -> None:
    _config(project, extra={"answer": 7})
    code, output = run_cli(["--help"], cwd=project)
    assert code == 0
    listed = {line.split()[0] for line in output.split("Commands:")[1].splitlines() if line.strip()}
    assert {"run", "health", "db", "backup", "extra"} <= listed, output

    code, output = run_cli(["extra", "hello"], cwd=project)
    assert (code, output.strip()) == (0, "hello from extra, answer 7")

    code, output = run_cli(["db", "migrate"], cwd=project)
    assert code == 0, output
    code, output = run_cli(["health", "--json"], cwd=project)
    checks = json.loads(output[output.index("{") :])["checks"]
    assert checks["extra"] == {"status": "healthy", "message": "answer 7"}
    assert "database" in checks


def test_a_plugin_command_answers_an_admin_through_the_bot_api(project: Path) -> None:
    with TelegramAPIStandIn() as api:
        _config(
            project,
            telegram={"token": DEFAULT_TOKEN, "api_base_url": api.base_url, "admin_ids": [ADMIN]},
        )
        with BotProcess(["run"], cwd=project) as bot:
            bot.wait_for_line("taking updates from Telegram (polling)")
            api.push_command("/extra", user_id=ADMIN)
            api.wait_for_message("extra says 42", chat_id=ADMIN)
            api.push_command("/extra", user_id=STRANGER)
            bot.wait_for_line(f"refused /extra from user {STRANGER}")
            # The admins' menu lists the database plugin's commands and the extra one.
            menu = [c for c in api.calls("setMyCommands") if c.ok][-1].params["commands"]
            assert [c["command"] for c in menu][-4:] == ["health", "dbstats", "backup", "extra"]
            assert bot.stop() == 0
        assert api.sent_messages(STRANGER) == []


@pytest.mark.parametrize(
    ("plugins", "expected"),
    [
        (
            ["no_such_module"],
            "dbkeeper: config.toml: [bot] plugins: 'no_such_module' cannot be imported: "
            "ModuleNotFoundError: No module named 'no_such_module'",
        ),
        (
            ["extra:Missing"],
            "dbkeeper: config.toml: [bot] plugins: 'extra:Missing': extra has no 'Missing' "
            "(name the class as 'module:Class', or export it as 'plugin')",
        ),
        (
            ["json"],
            "dbkeeper: config.toml: [bot] plugins: 'json': json has no 'plugin' (name the class "
            "as 'module:Class', or export it as 'plugin')",
        ),
        (
            ["extra:ExtraSettings"],
            "dbkeeper: config.toml: [bot] plugins: 'extra:ExtraSettings' is not a dbkeeper "
            "plugin (a Plugin subclass)",
        ),
    ],
)
def test_a_plugin_that_cannot_be_loaded_stops_startup_with_one_line(
    project: Path, plugins: list[str], expected: str
) -> None:
    _config(project, bot={"plugins": plugins})
    code, output = run_cli(["run"], cwd=project)
    assert (code, output.strip()) == (2, expected)
    assert not (project / "data").exists()  # nothing was started


def test_a_bad_plugin_section_stops_startup_with_one_line(project: Path) -> None:
    _config(project, extra={"answer": 0})
    code, output = run_cli(["run"], cwd=project)
    assert (code, output.strip()) == (
        2,
        "dbkeeper: config.toml: [extra] answer = 0: must be at least 1",
    )
    _config(project, extra={"answer": "many"})
    code, output = run_cli(["run"], cwd=project)
    assert (code, output.strip()) == (
        2,
        'dbkeeper: config.toml: [extra] answer: expected an integer, got "many"',
    )
    _config(project, bot={"plugins": []}, extra={"answer": 3})  # not loaded: not a section
    code, output = run_cli(["run"], cwd=project)
    assert code == 2 and output.strip().startswith(
        "dbkeeper: config.toml: unknown section [extra] (known: bot, telegram,"
    )
    assert not (project / "data").exists()


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        (
            0,
            "plugins 'database' (dbkeeper.plugins.database.plugin:DatabasePlugin) and 'extra' "
            "(extra:ExtraPlugin) both have order 0, the database plugin's",
        ),
        (-5, "plugin 'extra' (extra:ExtraPlugin) has order -5: orders start at 0"),
    ],
)
def test_no_plugin_starts_before_the_database_plugin(
    project: Path, order: int, expected: str
) -> None:
    """The database plugin is first to start and last to stop: a plugin that claims its
    place is refused with one line, before anything starts."""
    source = EXTRA_PLUGIN.replace(
        '    name = "extra"\n', f'    name = "extra"\n    order = {order}\n'
    )
    (project / "extra.py").write_text(source)
    _config(project)
    code, output = run_cli(["run"], cwd=project)
    assert code == 2 and expected in output and len(output.strip().splitlines()) == 1, output
    assert not (project / "data").exists()


def _imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield ("." * node.level) + node.module


def test_the_host_imports_no_plugin() -> None:
    """bot/ is the host: plugins reach it through their context, never the other way round."""
    offending = [
        f"{path.relative_to(REPO)}: {name}"
        for path in sorted((REPO / "bot").rglob("*.py"))
        for name in _imports(path)
        if name.split(".")[0] == "plugins" or name.startswith("dbkeeper.plugins")
    ]
    assert offending == []


def test_every_package_directory_is_installed() -> None:
    """The wheel lists its packages by name (package-dir maps the folders): none forgotten."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = {folder: package for package, folder in pyproject["package-dir"].items()}
    found = set()
    for folder, package in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *relative.parts]))
    assert sorted(found) == sorted(pyproject["packages"])
