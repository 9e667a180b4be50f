"""Shared fixtures: real SQLite files, a fresh PostgreSQL database per test, settings builders.

PostgreSQL tests need the service on 127.0.0.1:5432 (override with DBKEEPER_TEST_POSTGRES_URL,
an URL of a role allowed to create databases). Without it they skip with the reason; with
DBKEEPER_REQUIRE_POSTGRES=1 (as in CI) a missing service fails them instead.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from dbkeeper.config import Settings, settings_from_mapping

REPO = Path(__file__).resolve().parent.parent
ADMIN_POSTGRES_URL = os.environ.get(
    "DBKEEPER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REQUIRE_POSTGRES = os.environ.get("DBKEEPER_REQUIRE_POSTGRES") == "1"
_postgres_problem: str | None = None
_postgres_checked = False


def _postgres_unavailable() -> str | None:
    """Why PostgreSQL cannot be used, or None when it can (checked once per session)."""
    global _postgres_checked, _postgres_problem
    if not _postgres_checked:
        _postgres_checked = True
        engine = create_engine(ADMIN_POSTGRES_URL, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception as error:  # any failure means "not available here"
            _postgres_problem = (
                f"PostgreSQL not reachable at {make_url(ADMIN_POSTGRES_URL).render_as_string()}"
                f" ({type(error).__name__}); set DBKEEPER_TEST_POSTGRES_URL to run these tests"
            )
        finally:
            engine.dispose()
    return _postgres_problem


REQUIRE_TOOLS = os.environ.get("DBKEEPER_REQUIRE_TOOLS") == "1"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Write the package's bytecode once. The suite starts hundreds of ``dbkeeper`` processes;
    under PYTHONDONTWRITEBYTECODE=1 (set on CI's machines) an editable install leaves none, and
    each process compiled the package's ~80 modules again: 0.2-0.3 s of CPU apiece."""
    import compileall

    for package in ("bot", "plugins", "migrations"):
        compileall.compile_dir(REPO / package, quiet=1)


def require_tool(problem: str | None) -> None:
    """Skip, saying why, when a system tool (a browser, promtool, ...) is missing; fail
    instead with DBKEEPER_REQUIRE_TOOLS=1 (CI installs them: .ci/run)."""
    if problem is None:
        return
    if REQUIRE_TOOLS:
        pytest.fail(f"DBKEEPER_REQUIRE_TOOLS=1 but {problem}")
    pytest.skip(problem)


def require_postgres() -> None:
    problem = _postgres_unavailable()
    if problem is None:
        return
    if REQUIRE_POSTGRES:
        pytest.fail(f"DBKEEPER_REQUIRE_POSTGRES=1 but {problem}")
    pytest.skip(problem)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A freshly created, empty PostgreSQL database, dropped after the test."""
    require_postgres()
    name = f"dbkeeper_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(ADMIN_POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(ADMIN_POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'data' / 'bot.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Runs the test once on a SQLite file and once on a PostgreSQL database."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return request.getfixturevalue("sqlite_url")


@pytest.fixture
def scripts_dir(tmp_path: Path) -> Path:
    """A copy of the real migrations/ directory that a test may add revisions to."""
    target = tmp_path / "migrations"
    shutil.copytree(
        REPO / "migrations", target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return target


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(tmp_path: Path) -> SettingsFactory:
    """Settings for a test: fast retries, files under tmp_path; sections override by dict."""

    def build(url: str, **sections: dict[str, Any]) -> Settings:
        raw: dict[str, dict[str, Any]] = {
            "database": {"url": url, "retry_backoff_seconds": [0.05], "busy_timeout_ms": 2000},
            "backup": {"dir": str(tmp_path / "backups")},
            "migrations": {"lock_timeout_seconds": 60},
        }
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        return settings_from_mapping(raw, environ={})

    return build
