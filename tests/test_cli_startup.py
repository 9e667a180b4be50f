"""What a ``dbkeeper`` command line loads: only what the command needs.

Every command imports each plugin's module (for its config section and its sub-commands). PTB
and Alembic cost a command a third of its start-up; the commands that neither talk to Telegram
nor migrate must not pay for them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.support.process import run_cli

PROBE = """
import json, runpy, sys
sys.argv = ["dbkeeper", *sys.argv[1:]]
try:
    runpy.run_module("dbkeeper", run_name="__main__")
except SystemExit as end:
    code = end.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"telegram", "alembic", "aiohttp"})
print("LOADED:" + json.dumps({"code": code, "heavy": heavy}))
"""


def loaded_by(tmp_path: Path, *args: str) -> dict[str, object]:
    _, output = run_cli(args, cwd=tmp_path, program=[sys.executable, "-c", PROBE])
    line = next(x for x in output.splitlines() if x.startswith("LOADED:"))
    result: dict[str, object] = json.loads(line.removeprefix("LOADED:"))
    return result


@pytest.mark.parametrize(
    "args",
    [["backup", "list"], ["--help"], ["health", "--help"], ["backup", "create", "--help"]],
    ids=" ".join,
)
def test_commands_that_neither_chat_nor_migrate_import_neither_ptb_nor_alembic(
    tmp_path: Path, args: list[str]
) -> None:
    assert loaded_by(tmp_path, *args) == {"code": 0, "heavy": []}


def test_the_probe_sees_what_a_migration_loads(tmp_path: Path) -> None:
    """The probe above would pass on a broken import hook too: a migration must load Alembic."""
    assert loaded_by(tmp_path, "db", "migrate") == {"code": 0, "heavy": ["alembic"]}


def test_checks_on_several_threads_import_alembic_once(tmp_path: Path) -> None:
    """`dbkeeper health` runs its checks on threads at once, and three of them need Alembic
    first thing: imported by each on its own, two deadlocked (``_DeadlockError``) or one saw a
    half-initialized module, nearly every run."""
    assert run_cli(["db", "migrate"], cwd=tmp_path)[0] == 0
    for _ in range(3):
        _, output = run_cli(["health"], cwd=tmp_path)
        assert "database_migrations" in output, output
        assert "Deadlock" not in output and "ImportError" not in output, output
