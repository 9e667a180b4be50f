"""A bot of someone else's, built the way its author would: its own ``bot/`` package (models),
its own ``plugins/`` package (handler modules), a ``migrations/`` directory made by ``alembic init``
with two revisions (Alembic's hex ids), a ``bot.py`` that embeds dbkeeper, and a config.

dbkeeper is installed into a virtual environment of its own from a wheel (not editable), as a
user installs it; the project runs there.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.process import REPO, write_config
from tests.support.readme import block

MODELS = '''
"""The bot's own tables (its own `bot` package: dbkeeper must not take the name)."""

from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(String(200))
    author: Mapped[int] = mapped_column(Integer, default=0)
'''

HANDLERS = '''
"""The bot's own handlers (its own `plugins` package: dbkeeper must not take that name either)."""

from sqlalchemy import func, select
from telegram import Update
from telegram.ext import ContextTypes

from bot.models import Note
from dbkeeper.plugins.database import BOT_DATA_KEY


async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    await update.effective_message.reply_text("Welcome to the notes bot!")


async def note(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    text = " ".join(context.args) or "(empty)"
    database = context.bot_data[BOT_DATA_KEY]
    await database.run(lambda s: s.add(Note(text=text, author=update.effective_user.id)))
    count = await database.read(lambda s: s.scalar(select(func.count()).select_from(Note)))
    await update.effective_message.reply_text(f"noted ({count} notes)")


async def rollback(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The bot's own admin action: back to the newest backup, inside the running bot."""
    database = context.bot_data[BOT_DATA_KEY]
    newest = (await database.backups())[0]
    report = await database.restore(newest.name)
    await update.effective_message.reply_text(f"restored {report.name}")
'''

BOT = '''
"""The notes bot: its own handlers first, then dbkeeper, then run."""

from telegram.ext import CommandHandler, filters

import dbkeeper
from plugins.handlers import note, rollback, start

application = dbkeeper.application_builder("config.toml").build()
application.add_handler(CommandHandler("start", start))
application.add_handler(CommandHandler("note", note))
application.add_handler(CommandHandler("rollback", rollback, filters=filters.User({ADMIN})))
dbkeeper.install(application, "config.toml")
raise SystemExit(dbkeeper.run(application))
'''

REVISION_ONE = """    op.create_table(
        "notes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("text", sa.String(200), nullable=False),
    )
"""
REVISION_TWO = """    op.add_column(
        "notes", sa.Column("author", sa.Integer(), nullable=False, server_default="0")
    )
"""
# The body alembic's template generates: `pass`, after a docstring in recent versions.
UPGRADE_BODY = re.compile(r'(def upgrade\(\) -> None:\n(?:\s+""".*?"""\n)?)\s+pass\n', re.S)


def build_wheel(target: Path) -> Path:
    """A wheel of this checkout, as a release would be built."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(target), str(REPO)],
        check=True,
        capture_output=True,
    )
    [wheel] = target.glob("dbkeeper-*.whl")
    return wheel


def make_venv(root: Path, wheel: Path) -> Path:
    """A new virtual environment with dbkeeper installed from ``wheel``; its bin directory."""
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    subprocess.run(
        [str(root / "bin" / "pip"), "install", "-q", str(wheel)], check=True, capture_output=True
    )
    return root / "bin"


def make_project(root: Path, bin_dir: Path, *, admin: int, share_connection: bool) -> Path:
    """The notes bot in ``root`` (see the module docstring); returns ``root``."""
    (root / "bot").mkdir(parents=True)
    (root / "bot" / "__init__.py").write_text("")
    (root / "bot" / "models.py").write_text(MODELS)
    (root / "plugins").mkdir()
    (root / "plugins" / "__init__.py").write_text("")
    (root / "plugins" / "handlers.py").write_text(HANDLERS)
    (root / "bot.py").write_text(BOT.replace("{ADMIN}", "{" + str(admin) + "}"))
    alembic = str(bin_dir / "alembic")
    # `migrations/`, as many bots name it: dbkeeper installed leaves that name to the bot.
    subprocess.run([alembic, "init", "migrations"], cwd=root, check=True, capture_output=True)
    for message, body in (("create notes", REVISION_ONE), ("note authors", REVISION_TWO)):
        created = subprocess.run(
            [alembic, "revision", "-m", message],
            cwd=root,
            check=True,
            capture_output=True,
            text=True,
        )
        path = Path(re.search(r"Generating (\S+\.py)", created.stdout)[1])  # type: ignore[index]
        source, count = UPGRADE_BODY.subn(lambda m, b=body: m[1] + b, path.read_text(), count=1)
        assert count == 1, f"no empty upgrade() in {path}"
        path.write_text(source)
    if share_connection:
        env = root / "migrations" / "env.py"
        source = env.read_text()
        marker = "def run_migrations_online() -> None:\n"
        head, _, tail = source.partition(marker)
        docstring_end = tail.index('"""', tail.index('"""') + 3) + 3
        lines = "\n" + block("fragment").text  # the README's lines, exactly
        env.write_text(head + marker + tail[:docstring_end] + lines + tail[docstring_end:])
    return root


def configure(root: Path, **sections: dict[str, Any]) -> Path:
    values: dict[str, dict[str, Any]] = {
        "database": {"url": f"sqlite:///{root / 'data' / 'notes.db'}"},
        "migrations": {"script_location": "migrations", "metadata": "bot.models:Base.metadata"},
        "backup": {"dir": str(root / "backups"), "interval_seconds": 3600},
    }
    for name, extra in sections.items():
        values.setdefault(name, {}).update(extra)
    return write_config(root / "config.toml", values)


ENTRY_POINT_PLUGIN = '''
"""An installed plugin: found through the entry-point group dbkeeper.plugins."""

import click

from dbkeeper.health import healthy
from dbkeeper.plugin import Plugin


@click.command()
def hello() -> None:
    """Say hello from an installed plugin."""
    click.echo("hello from an installed plugin")


class HelloPlugin(Plugin):
    name = "hello"

    @classmethod
    def commands(cls):
        return [hello]

    def setup(self, context) -> None:
        async def check():
            return healthy("installed and loaded")

        context.add_check("hello", check)
'''


def install_entry_point_plugin(root: Path, bin_dir: Path) -> None:
    """A distribution of its own that declares a dbkeeper plugin, installed with pip."""
    package = root / "dbkeeper-hello"
    (package / "dbkeeper_hello").mkdir(parents=True)
    (package / "dbkeeper_hello" / "__init__.py").write_text(ENTRY_POINT_PLUGIN)
    (package / "pyproject.toml").write_text(
        "[build-system]\n"
        'requires = ["setuptools>=68"]\n'
        'build-backend = "setuptools.build_meta"\n\n'
        "[project]\n"
        'name = "dbkeeper-hello"\n'
        'version = "1.0"\n\n'
        '[project.entry-points."dbkeeper.plugins"]\n'
        'hello = "dbkeeper_hello:HelloPlugin"\n'
    )
    subprocess.run(
        [str(bin_dir / "pip"), "install", "-q", "--no-deps", str(package)],
        check=True,
        capture_output=True,
    )
