"""For the database care tests: SQL run the way another program would (the driver itself, not
an engine the bot's database would report), waiting for log lines, a private PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

POSTGRES_BIN = Path("/usr/lib/postgresql")


def execute(url: str, *statements: str | tuple[str, Sequence[Any]]) -> list[list[tuple[Any, ...]]]:
    """Run ``statements`` (text, or text and parameters) in one transaction with the driver
    itself; the rows each returned."""
    results: list[list[tuple[Any, ...]]] = []
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        connection = sqlite3.connect(parsed.database or "", isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            for statement in statements:
                sql, parameters = statement if isinstance(statement, tuple) else (statement, ())
                results.append(connection.execute(sql, parameters).fetchall())
            connection.execute("COMMIT")
        finally:
            connection.close()
        return results
    plain = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain) as connection:
        for statement in statements:
            sql, parameters = statement if isinstance(statement, tuple) else (statement, ())
            cursor = connection.execute(sql.replace("?", "%s"), parameters)
            results.append(cursor.fetchall() if cursor.description else [])
    return results


def numbers(url: str, count: int) -> str:
    """A row source of 1..count for INSERT ... SELECT, in the URL's dialect."""
    if url.startswith("sqlite"):
        return (
            f"(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count}) "
            "SELECT i FROM n)"
        )
    return f"(SELECT generate_series(1, {count}) AS i)"


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``condition`` until it is truthy (its value), failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def private_postgres(*options: str) -> Iterator[str]:
    """A PostgreSQL server of the test's own (``initdb`` in a scratch directory, on a free
    port, with ``options`` such as ``shared_preload_libraries=pg_stat_statements``): the shared
    test server's configuration is never touched. Yields the URL of its ``postgres`` database;
    skips where the server programs are not installed."""
    versions = sorted(POSTGRES_BIN.glob("*/bin/initdb")) if POSTGRES_BIN.is_dir() else []
    if not versions:
        pytest.skip("no PostgreSQL server programs (initdb) on this machine")
    bin_dir = versions[-1].parent
    root = Path(tempfile.mkdtemp(prefix="dbkeeper-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start a private PostgreSQL")
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    try:
        done = subprocess.run(
            [
                *as_user,
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"initdb failed: {done.stderr.strip()[-300:]}")
        settings = [
            f"port={port}",
            "listen_addresses=127.0.0.1",
            f"unix_socket_directories={root}",
            "fsync=off",
            *options,
        ]
        flags = " ".join(f"-c {setting}" for setting in settings)
        done = subprocess.run(
            [
                *as_user,
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                flags,
                "-l",
                str(root / "log"),
                "-w",
                "-t",
                "30",
                "start",
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"a private PostgreSQL did not start: {done.stderr.strip()[-300:]}")
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(
                [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
