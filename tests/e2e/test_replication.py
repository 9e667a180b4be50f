"""Replication to a real S3-compatible server (SeaweedFS on 127.0.0.1), with real processes.

The lost machine (SIGKILL, everything local deleted, `backup restore --latest` in an empty
directory), a point-in-time restore between two batches, the storage going away for a while
(lag alert, then resolved, nothing lost), and credentials that never show.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dbkeeper.config import settings_from_mapping
from dbkeeper.health import Status
from dbkeeper.plugins.database.offsite.litestream import ReplicationError
from dbkeeper.plugins.database.offsite.replica import replica_for
from tests.support.backups import add_users
from tests.support.hosts import free_port, running_host
from tests.support.process import BotProcess, run_cli, write_config
from tests.support.s3 import S3Server, running_s3

pytestmark = pytest.mark.timeout(120)
ACCESS_KEY = "replication-e2e-access"
SECRET = "replication-e2e-secret-Wx93kq0pZ"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)


def sections(workdir: Path, s3: S3Server, bucket: str, **extra: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "database": {"url": f"sqlite:///{workdir / 'data' / 'bot.db'}"},
        "backup": {"dir": str(workdir / "backups")},
        "health": {"http_port": free_port()},
        "offsite": {"url": f"s3://{bucket}/bot", "endpoint": s3.endpoint},
        "replication": {"enabled": True, "sync_interval_seconds": 0.5},
    }
    for name, values in extra.items():
        raw.setdefault(name, {}).update(values)
    return raw


def ids(database: Path) -> list[int]:
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return [row[0] for row in connection.execute("SELECT id FROM users ORDER BY id")]
    finally:
        connection.close()


def insert(database: Path, start: int, count: int) -> None:
    """Rows committed one by one by another process's connection (the bot's own writer)."""
    connection = sqlite3.connect(database, timeout=10, isolation_level=None)
    try:
        for user in range(start, start + count):
            connection.execute(
                "INSERT INTO users (id, first_name) VALUES (?, ?)", (user, f"user {user}")
            )
    finally:
        connection.close()


def wait_until(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.1)


def replica_ids(raw: dict[str, Any], scratch: Path) -> list[int] | None:
    """The users of the replica's newest state (None: nothing replicated yet)."""
    settings = settings_from_mapping(raw, environ={})
    database = Path(raw["database"]["url"].removeprefix("sqlite:///"))
    out = scratch / f"check-{time.monotonic_ns()}.db"
    try:
        replica_for(settings, database, "sqlite").restore_into(out)
    except ReplicationError:
        return None
    return ids(out)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_lost_machine_comes_back_with_restore_latest(
    s3: S3Server, tmp_path: Path, credentials: None
) -> None:
    s3.create_bucket("lost-machine")
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    raw = sections(old, s3, "lost-machine")
    write_config(old / "config.toml", raw)
    database = old / "data" / "bot.db"
    with BotProcess(["run"], cwd=old) as bot:
        line = bot.wait_for_line("streams bot.db to s3://lost-machine/bot/replica")
        pid = int(re.search(r"\(pid (\d+)\)", line).group(1))  # type: ignore[union-attr]
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes()
        insert(database, 1, 100)
        wait_until(lambda: replica_ids(raw, tmp_path) == list(range(1, 101)), "first batch")
        port = raw["health"]["http_port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
            health = answer.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
        insert(database, 101, 50)  # committed just before the machine dies
        bot.process.kill()  # SIGKILL: no shutdown of dbkeeper's own
        bot.wait()
        # Litestream dies with it, after its final sync (the kernel sends it SIGTERM).
        wait_until(lambda: not alive(pid), "Litestream exits with the bot", 10)
    assert SECRET.encode() not in arguments and ACCESS_KEY.encode() not in arguments
    assert SECRET not in bot.output + health + metrics
    assert '"replication": {"status": "healthy", "message": "lag ' in health
    assert "dbkeeper_replication_up 1.0" in metrics
    assert "dbkeeper_replication_lag_seconds " in metrics

    shutil.rmtree(old / "data")  # the machine is gone: database, backups, Litestream's state
    shutil.rmtree(old / "backups", ignore_errors=True)
    shutil.copy(old / "config.toml", new / "config.toml")
    (new / "config.toml").write_text((old / "config.toml").read_text().replace(str(old), str(new)))
    started = time.monotonic()
    code, output = run_cli(["backup", "restore", "--latest", "--yes"], cwd=new)
    seconds = time.monotonic() - started
    assert code == 0, output
    assert (
        "restored the state replicated at " in output and "the newest the replica holds" in output
    )
    assert ids(new / "data" / "bot.db") == list(range(1, 151))
    assert SECRET not in output
    print(f"restore --latest took {seconds:.2f}s (whole command)")

    code, output = run_cli(["replication", "status"], cwd=new)
    assert code == 0, output
    assert "replica:    s3://lost-machine/bot/replica (Litestream 0.5" in output
    assert "litestream: not running here" in output and "restorable: from 20" in output
    assert SECRET not in output


def test_a_point_in_time_restore_between_two_batches(
    s3: S3Server, tmp_path: Path, credentials: None
) -> None:
    s3.create_bucket("point-in-time")
    live, new = tmp_path / "live", tmp_path / "new"
    raw = sections(live, s3, "point-in-time")
    settings = settings_from_mapping(raw, environ={})
    new.mkdir()
    write_config(new / "config.toml", {**raw, "database": {"url": f"sqlite:///{new}/bot.db"}})

    async def two_batches() -> datetime:
        async with running_host(settings) as (_, plugin):
            add_users(plugin.operations, 40)
            await asyncio.to_thread(
                wait_until, lambda: replica_ids(raw, tmp_path) == list(range(1, 41)), "batch A"
            )
            await asyncio.sleep(1.5)  # the moment asked for lies between the two batches
            between = datetime.now(UTC)
            await asyncio.sleep(1.5)
            add_users(plugin.operations, 40, start=100)
            await asyncio.to_thread(
                wait_until, lambda: len(replica_ids(raw, tmp_path) or []) == 80, "batch B"
            )
            return between

    between = asyncio.run(two_batches())
    at = between.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    code, output = run_cli(["backup", "restore", "--at", at, "--yes"], cwd=new)
    assert code == 0, output
    assert ids(new / "bot.db") == list(range(1, 41))  # batch A, and nothing of batch B
    assert "restored the state replicated at" in output and "the last state before" in output

    # A time the replica cannot restore is refused before anything runs.
    (new / "bot.db").unlink()
    for moment, reason in (
        (between - timedelta(days=1), "outside the replica's retention window: it goes back to"),
        (between + timedelta(days=1), "is in the future"),
    ):
        code, output = run_cli(
            ["backup", "restore", "--at", moment.strftime("%Y-%m-%dT%H:%M:%SZ"), "--yes"], cwd=new
        )
        assert code == 1 and reason in output and "Nothing was changed." in output, output
        assert not (new / "bot.db").exists()
    code, output = run_cli(["backup", "restore", "--at", "2026-12-01 10:00", "--yes"], cwd=new)
    assert code == 2 and "names no time zone" in output, output


def test_the_storage_going_away_alerts_the_lag_then_resolves_and_loses_nothing(
    s3: S3Server, tmp_path: Path, credentials: None, caplog: pytest.LogCaptureFixture
) -> None:
    s3.create_bucket("outage")
    raw = sections(
        tmp_path,
        s3,
        "outage",
        health={"interval_seconds": 0.5},
        replication={"max_lag_seconds": 2},
    )
    settings = settings_from_mapping(raw, environ={})

    async def outage() -> list[int]:
        async with running_host(settings, job_queue=True) as (host, plugin):

            async def status() -> Status | None:
                report = host.monitor.last
                check = report.checks.get("replication") if report else None
                return check.status if check else None

            add_users(plugin.operations, 20)
            await asyncio.to_thread(
                wait_until, lambda: replica_ids(raw, tmp_path) is not None, "first upload"
            )
            s3.stop_gateway()
            try:
                for batch in range(8):  # the bot keeps writing while the storage is away
                    add_users(plugin.operations, 5, start=100 + 10 * batch)
                    await asyncio.sleep(0.5)
                    if await status() is Status.UNHEALTHY:
                        break
                assert await status() is Status.UNHEALTHY
            finally:
                s3.start_gateway()
            deadline = time.monotonic() + 60
            while await status() is not Status.HEALTHY:
                assert time.monotonic() < deadline, "the replica never caught up"
                await asyncio.sleep(0.2)
            return sorted(set(ids(tmp_path / "data" / "bot.db")))

    live = asyncio.run(outage())
    assert replica_ids(raw, tmp_path) == live  # nothing lost
    alerts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ALERT")]
    behind = [a for a in alerts if "replication: unhealthy" in a and "behind" in a]
    assert behind, alerts
    assert any("replication recovered after" in a for a in alerts), alerts


def test_a_drill_while_the_storage_is_away_fails(
    s3: S3Server, tmp_path: Path, credentials: None
) -> None:
    s3.create_bucket("drill-outage")
    raw = sections(tmp_path, s3, "drill-outage", replication={"restore_timeout_seconds": 2})
    settings = settings_from_mapping(raw, environ={})

    async def scenario() -> tuple[Any, Any]:
        async with running_host(settings) as (host, plugin):
            add_users(plugin.operations, 10)
            await asyncio.to_thread(
                wait_until, lambda: replica_ids(raw, tmp_path) is not None, "first upload"
            )
            s3.stop_gateway()
            try:
                add_users(plugin.operations, 5, start=100)  # not uploaded yet
                result = await plugin.replication.drill()
                check = (await host.monitor.check()).checks["replication"]
            finally:
                s3.start_gateway()
            return result, check

    result, check = asyncio.run(scenario())
    assert result is not None and not result.ok
    assert "could not upload the newest changes within 2s" in result.problem
    assert "is the storage reachable?" in result.problem
    assert check.status is Status.DEGRADED and "restore drill FAILED" in check.message


def test_a_shutdown_neither_waits_for_a_drill_nor_hides_a_failed_final_sync(
    s3: S3Server, tmp_path: Path, credentials: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    s3.create_bucket("drill-shutdown")
    raw = sections(tmp_path, s3, "drill-shutdown", replication={"restore_timeout_seconds": 60})
    settings = settings_from_mapping(raw, environ={})

    async def scenario() -> float:
        host_stopped = 0.0
        async with running_host(settings) as (_, plugin):
            add_users(plugin.operations, 10)
            await asyncio.to_thread(
                wait_until, lambda: replica_ids(raw, tmp_path) is not None, "first upload"
            )
            s3.stop_gateway()
            add_users(plugin.operations, 5, start=100)  # left for the final sync
            await plugin.replication.scheduled_drill()  # waits up to 60 s for the storage
            await asyncio.sleep(0.5)
            host_stopped = time.monotonic()
        return time.monotonic() - host_stopped

    try:
        seconds = asyncio.run(scenario())
    finally:
        s3.start_gateway()
    assert seconds < settings.shutdown.timeout_seconds, seconds
    assert "restore drill stopped: shutting down" in caplog.text
    assert not (tmp_path / "data" / ".bot.db-replication" / "drill.json").exists()
    alerts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ALERT")]
    assert [a for a in alerts if "Litestream's final sync failed" in a], alerts
