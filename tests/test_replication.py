"""Replication with the real Litestream, to a file:// replica (and, for a snapshot while
replicating and a killed Litestream, to SeaweedFS too), in the real host.

What a user would see: the child process and its arguments, the generated files and their
modes, the replica's files, rows restored from it, log lines and alerts, the health check.
The S3 side (SeaweedFS, outages, the lost machine) is in tests/e2e/test_replication.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dbkeeper.config import Settings
from dbkeeper.plugin import Deadline, StartupError
from dbkeeper.plugins.database import DatabasePlugin
from dbkeeper.plugins.database.offsite.litestream import (
    LtxFile,
    ReplicationError,
    meta_dir,
    runtime_dir,
)
from dbkeeper.plugins.database.offsite.replica import Replica, Window, replica_for
from tests.conftest import SettingsFactory
from tests.support.backups import add_users, sqlite_user_ids
from tests.support.hosts import build_host, free_port, running_host
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, S3Server, running_s3

pytestmark = pytest.mark.timeout(90)
SECRET = "replication-test-secret-Zq8x1"


def replicated_to(
    offsite: dict[str, str], sqlite_url: str, make_settings: SettingsFactory
) -> Settings:
    """SQLite, replicated every 0.2 s to ``[offsite]``."""
    return make_settings(
        sqlite_url,
        offsite=offsite,
        replication={"enabled": True, "sync_interval_seconds": 0.2, "max_lag_seconds": 3},
        health={"http_port": free_port()},
    )


@pytest.fixture
def replicated(tmp_path: Path, sqlite_url: str, make_settings: SettingsFactory) -> Settings:
    """SQLite, replicated every 0.2 s to a directory (another disk, in real life)."""
    (tmp_path / "offsite").mkdir()  # a mounted disk: the backups' copies go there too
    return replicated_to({"url": f"file://{tmp_path / 'offsite'}"}, sqlite_url, make_settings)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS on 127.0.0.1, started only for the tests that replicate to S3."""
    with running_s3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(params=["directory", "seaweedfs"])
def replicated_anywhere(
    request: pytest.FixtureRequest,
    sqlite_url: str,
    make_settings: SettingsFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    """``replicated``, to a directory or to a bucket of its own on the S3 server."""
    if request.param == "directory":
        settings: Settings = request.getfixturevalue("replicated")
        return settings
    server: S3Server = request.getfixturevalue("s3")
    bucket = f"replica-{uuid.uuid4().hex[:12]}"
    server.create_bucket(bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    offsite = {"url": f"s3://{bucket}/bot", "endpoint": server.endpoint}
    return replicated_to(offsite, sqlite_url, make_settings)


def replica(settings: Settings, plugin: DatabasePlugin) -> Replica:
    return replica_for(settings, plugin.database.file, "sqlite")


def child_pid(plugin: DatabasePlugin) -> int:
    assert plugin.replication is not None and plugin.replication.replicator is not None
    pid = plugin.replication.replicator.pid
    assert pid is not None, "Litestream is not running"
    return pid


async def until(condition: Callable[[], Awaitable[bool] | bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.1)


async def replicated_ids(settings: Settings, plugin: DatabasePlugin, tmp_path: Path) -> list[int]:
    """The user ids of the replica's newest state (restored into a scratch file)."""
    out = tmp_path / f"restored-{time.monotonic_ns()}.db"
    await asyncio.to_thread(replica(settings, plugin).restore_into, out)
    return sqlite_user_ids(out)


def live_ids(database: Path) -> list[int]:
    """The user ids of the live database, its write-ahead log included."""
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return [row[0] for row in connection.execute("SELECT id FROM users ORDER BY id")]
    finally:
        connection.close()


async def caught_up(settings: Settings, plugin: DatabasePlugin, tmp_path: Path) -> None:
    """Wait until the replica holds every user of the live database."""
    live = live_ids(plugin.database.file)

    async def same() -> bool:
        try:
            return await replicated_ids(settings, plugin, tmp_path) == live
        except ReplicationError:  # nothing uploaded yet
            return False

    await until(same, "the replica catches up", 15)


# -- the child process -----------------------------------------------------------------------------


async def test_litestream_runs_with_a_private_configuration_and_no_credentials_in_sight(
    replicated: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "replication-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    caplog.set_level(logging.DEBUG)
    async with running_host(replicated) as (host, plugin):
        pid = child_pid(plugin)
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert arguments[1:5] == [b"replicate", b"-no-expand-env", b"-config", arguments[4]]
        assert SECRET.encode() not in b" ".join(arguments)
        environment = dict(
            line.split(b"=", 1)
            for line in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if b"=" in line
        )
        # Litestream 0.5 fails on AWS_CA_BUNDLE ("unable to add custom RootCAs"): translated
        assert b"AWS_CA_BUNDLE" not in environment
        assert environment[b"SSL_CERT_FILE"] == b"/etc/ssl/certs/ca-certificates.crt"
        assert environment[b"AWS_EC2_METADATA_DISABLED"] == b"true"
        assert environment[b"AWS_SECRET_ACCESS_KEY"] == SECRET.encode()  # by environment only
        config = Path(arguments[4].decode())
        assert config.parent == runtime_dir(plugin.database.file)
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
        assert SECRET not in config.read_text()
        assert os.getpgid(pid) != os.getpgid(0)  # a process group of its own
        add_users(plugin.operations, 5)
        await caught_up(replicated, plugin, tmp_path)
        report = await host.monitor.check()
        check = report.checks["replication"]
        assert check.status.value == "healthy", check.message
        assert check.message.startswith("lag ") and "| last sync 20" in check.message
        answer = str(report.to_json(1))
    assert SECRET not in caplog.text and SECRET not in answer
    with pytest.raises(ProcessLookupError):  # stopped with the bot
        os.kill(pid, 0)


async def test_a_missing_or_old_litestream_stops_startup_naming_what_was_found(
    replicated: Settings, tmp_path: Path
) -> None:
    old = tmp_path / "litestream"
    old.write_text("#!/bin/sh\necho v0.3.13\n")
    old.chmod(0o755)
    cases = {
        str(tmp_path / "nowhere" / "litestream"): "is not an executable file",
        str(old): f"{old} is Litestream 0.3.13, too old: dbkeeper needs 0.5 or newer",
    }
    for binary, expected in cases.items():
        settings = replicated.with_section("replication", litestream_bin=binary)
        host, _ = build_host(settings)
        with pytest.raises(StartupError, match=expected):
            await host.start()
        await host.stop(Deadline.after(5))
        assert not Path(settings.database.url.removeprefix("sqlite:///")).exists()  # first


async def test_replication_on_postgresql_is_said_once_and_ignored(
    postgres_url: str, make_settings: SettingsFactory, tmp_path: Path, caplog
) -> None:
    settings = make_settings(
        postgres_url,
        offsite={"url": f"file://{tmp_path / 'offsite'}"},
        replication={"enabled": True},
        health={"http_port": free_port()},
    )
    async with running_host(settings) as (host, plugin):
        assert "replication" not in (await host.monitor.check()).checks
        assert plugin.operations.wal_owner is None
    assert "[replication] enabled applies to SQLite only" in caplog.text


async def test_only_the_leader_replicates_and_a_standby_takes_over(
    tmp_path: Path, sqlite_url: str, make_settings: SettingsFactory
) -> None:
    one, two = (
        make_settings(
            sqlite_url,
            offsite={"url": f"file://{tmp_path / 'offsite'}"},
            replication={"enabled": True, "sync_interval_seconds": 0.2},
            health={"http_port": free_port()},
            instance={"name": name, "leader_poll_seconds": 0.2},
        )
        for name in ("one", "two")
    )
    first, first_plugin = build_host(one)
    await first.start()
    second, second_plugin = build_host(two)
    try:
        await second.start()
        assert first_plugin.replication and second_plugin.replication
        assert first_plugin.replication.replicator and second_plugin.replication.replicator
        assert first_plugin.replication.replicator.running
        assert not second_plugin.replication.replicator.running  # one Litestream per database
        check = (await second.monitor.check()).checks["replication"]
        assert check.status.value == "healthy" and check.message == "standing by: one replicates"
        await first.stop(Deadline.after(5))
        await first.application.bot.shutdown()
        await until(
            lambda: second_plugin.replication.replicator.running, "the new leader replicates", 10
        )
        add_users(second_plugin.operations, 30)
        await caught_up(two, second_plugin, tmp_path)
    finally:
        await second.stop(Deadline.after(5))
        await second.application.bot.shutdown()


SIGNAL_COUNTER = """
import os, signal, sys, time
out = sys.argv[1]
def count(signum, frame):
    with open(out, "a") as handle:
        handle.write("TERM\\n")
signal.signal(signal.SIGTERM, count)
open(out, "w").close()
time.sleep(1.5)
"""

SPAWNING_PARENT = """
import os, signal, subprocess, sys, threading, time
from dbkeeper.plugins.database.children import dies_with
from dbkeeper.plugins.database.offsite.replication import guarded
counter, out, mode = sys.argv[1:4]
argv = [sys.executable, "-c", counter, out]
def spawn():
    if mode == "guarded":
        subprocess.Popen(guarded(*argv), process_group=0, preexec_fn=dies_with(os.getpid()),
                         stdout=subprocess.DEVNULL)
    else:  # the first version: Litestream a direct child with a parent-death SIGTERM
        subprocess.Popen(argv, process_group=0, preexec_fn=dies_with(os.getpid(), signal.SIGTERM))
    while not os.path.exists(out):
        time.sleep(0.01)
for _ in range(10):
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
worker = threading.Thread(target=spawn)  # the thread that forks ends first ...
worker.start()
worker.join()
time.sleep(0.2)
os.kill(os.getpid(), signal.SIGKILL)  # ... then the whole process is killed
"""


def test_litestream_gets_one_sigterm_however_its_parents_threads_die(tmp_path: Path) -> None:
    """The kernel sends the parent-death signal each time a child is handed from a dying thread
    to another; Litestream takes a second SIGTERM as "stop now" and skips its final sync. Under
    its one-thread guardian it gets exactly one, wherever dbkeeper forked it."""
    counts = {}
    for mode in ("guarded", "direct"):
        out = tmp_path / f"{mode}.count"
        subprocess.run(
            [sys.executable, "-c", SPAWNING_PARENT, SIGNAL_COUNTER, str(out), mode],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            check=False,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not out.read_text():
            time.sleep(0.05)
        time.sleep(0.5)  # any further signal arrives within this
        counts[mode] = out.read_text().count("TERM")
    assert counts["guarded"] == 1
    assert counts["direct"] >= 2  # what the guardian is there for


# -- checkpoints, snapshots ------------------------------------------------------------------------


async def test_flush_while_replicating_never_stalls_the_writers(
    replicated: Settings, tmp_path: Path
) -> None:
    """A TRUNCATE checkpoint waits for Litestream's read lock while holding the writers back
    for the whole busy timeout (2 s here), and fails anyway: with replication on it is skipped."""
    async with running_host(replicated) as (_, plugin):
        add_users(plugin.operations, 10)
        await caught_up(replicated, plugin, tmp_path)
        file = plugin.database.file
        stalls: list[float] = []
        done = threading.Event()

        def write() -> None:
            connection = sqlite3.connect(file, timeout=10, isolation_level=None)
            n = 1000
            while not done.is_set():
                started = time.monotonic()
                connection.execute("INSERT INTO users (id, first_name) VALUES (?, 'w')", (n,))
                stalls.append(time.monotonic() - started)
                n += 1
                time.sleep(0.01)
            connection.close()

        writer = threading.Thread(target=write)
        writer.start()
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await asyncio.to_thread(plugin.operations.flush)
        flush_seconds = time.monotonic() - started
        await asyncio.sleep(0.3)
        done.set()
        writer.join()
    assert flush_seconds < 0.5
    assert max(stalls) < 0.5, f"a write waited {max(stalls):.2f}s"


def full_snapshots(window: Window, database_bytes: int) -> list[LtxFile]:
    """Files that hold the whole database: snapshots (level 9) and forced full syncs (level 0)."""
    return [
        f for f in window.files if f.level == 9 or (f.level == 0 and f.size >= database_bytes // 2)
    ]


async def test_backups_while_replicating_cause_no_new_snapshot(
    replicated_anywhere: Settings, tmp_path: Path
) -> None:
    async with running_host(replicated_anywhere) as (_, plugin):
        add_users(plugin.operations, 3000, text_size=1000)  # about 3 MB
        await caught_up(replicated_anywhere, plugin, tmp_path)
        size = plugin.database.file.stat().st_size

        async def snapshot_taken() -> bool:  # Litestream's first, a second after its start
            return bool(
                (await asyncio.to_thread(replica(replicated_anywhere, plugin).window)).snapshots
            )

        await until(snapshot_taken, "the first snapshot", 15)
        before = await asyncio.to_thread(replica(replicated_anywhere, plugin).window)
        for round_ in range(3):
            add_users(plugin.operations, 50, start=10_000 + 100 * round_, text_size=1000)
            await plugin.backup_now("manual", wait=True)
        await caught_up(replicated_anywhere, plugin, tmp_path)
        after = await asyncio.to_thread(replica(replicated_anywhere, plugin).window)
    assert full_snapshots(after, size) == full_snapshots(before, size)
    new = [f for f in after.files if f not in before.files and f.level == 0]
    assert new and sum(f.size for f in new) < size // 4, [f.size for f in new]


# -- crashes ---------------------------------------------------------------------------------------


async def test_killed_litestream_is_restarted_and_alerted_once(
    replicated_anywhere: Settings, tmp_path: Path, caplog
) -> None:
    async with running_host(replicated_anywhere) as (host, plugin):
        for _kill in range(2):  # two crashes in a row: one episode, one alert
            pid = child_pid(plugin)
            os.kill(pid, signal.SIGKILL)
            await until(
                lambda pid=pid: plugin.replication.replicator.pid not in (None, pid),
                "Litestream restarted",
                10,
            )
        add_users(plugin.operations, 20)
        await caught_up(replicated_anywhere, plugin, tmp_path)
        report = await host.monitor.check()
        assert report.checks["replication"].message.endswith("| 2 restarts")
    alerts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ALERT")]
    crashes = [a for a in alerts if "replication stopped: Litestream exited (signal SIGKILL)" in a]
    assert len(crashes) == 1, alerts
    assert "Restarting it in 1s" in crashes[0]


# -- restores --------------------------------------------------------------------------------------


async def test_a_restore_in_the_running_bot_goes_on_replicating_the_restored_database(
    replicated: Settings, tmp_path: Path
) -> None:
    async with running_host(replicated) as (_, plugin):
        add_users(plugin.operations, 10)
        backup = await plugin.backup_now("manual")
        add_users(plugin.operations, 10, start=100)
        await caught_up(replicated, plugin, tmp_path)
        pid = child_pid(plugin)
        await plugin.restore(backup.name)
        assert not meta_dir(plugin.database.file).exists() or child_pid(plugin) != pid
        add_users(plugin.operations, 5, start=500)
        await caught_up(replicated, plugin, tmp_path)
        ids = await replicated_ids(replicated, plugin, tmp_path)
    assert ids == [*range(1, 11), *range(500, 505)]


def test_the_readme_example_configures_replication() -> None:
    import tomllib

    from dbkeeper.config import settings_from_mapping
    from dbkeeper.plugins.database.settings import OffsiteSettings, ReplicationSettings
    from tests.support.readme import block

    example = tomllib.loads(block("illustration", "replication-config").text)
    settings = settings_from_mapping(example, environ={})
    assert settings.section(ReplicationSettings).enabled
    assert settings.section(OffsiteSettings).url == "s3://my-bucket/bot"


def test_the_generated_configuration(tmp_path: Path, make_settings: SettingsFactory) -> None:
    """Literal values from one template: Go durations, the S3 replica under <url>/replica,
    server-side encryption passed through, nothing from the environment."""
    import yaml

    from dbkeeper.plugins.database.offsite.litestream import Target, render_config
    from dbkeeper.plugins.database.settings import OffsiteSettings, ReplicationSettings

    key = tmp_path / "sse-c.key"
    key.write_text("a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2U=\n")
    settings = make_settings(
        "sqlite:///x.db",
        offsite={
            "url": "s3://bucket/some/prefix/",
            "endpoint": "http://127.0.0.1:9",
            "sse_customer_key_path": str(key),
        },
        replication={"enabled": True, "sync_interval_seconds": 0.5, "retention_hours": 12},
    )
    target = Target.of(settings.section(OffsiteSettings))
    text = render_config(
        tmp_path / "a$HOME" / "bot.db",
        target,
        settings.section(ReplicationSettings),
        socket=tmp_path / "control.sock",
        shutdown_sync_seconds=3,
    )
    config = yaml.safe_load(text)
    assert config["snapshot"] == {"interval": "12h", "retention": "12h"}
    assert config["shutdown-sync-timeout"] == "3s"
    [database] = config["dbs"]
    assert database["path"] == str(tmp_path / "a$HOME" / "bot.db")  # -no-expand-env keeps $
    assert database["replica"] == {
        "type": "s3",
        "bucket": "bucket",
        "path": "some/prefix/replica",
        "region": "us-east-1",
        "endpoint": "http://127.0.0.1:9",
        "force-path-style": True,
        "sse-customer-algorithm": "AES256",
        "sse-customer-key-path": str(key),
        "sync-interval": "500ms",
    }
    assert "a2V5" not in text  # the key stays in its file


def test_times_outside_the_window_are_refused_before_anything_runs(
    replicated: Settings, tmp_path: Path
) -> None:
    replica_ = replica_for(replicated, tmp_path / "data" / "bot.db", "sqlite")
    now = datetime.now(UTC)
    window = Window([LtxFile(0, 1, 1, 100, now - timedelta(hours=2)), LtxFile(0, 2, 2, 10, now)])
    with pytest.raises(ReplicationError, match="outside the replica's retention window: it goes"):
        replica_.check_time(now - timedelta(hours=3), window)
    with pytest.raises(ReplicationError, match="is in the future"):
        replica_.check_time(now + timedelta(hours=1), window)
    replica_.check_time(now - timedelta(hours=1), window)  # inside: no error


# -- the drill -------------------------------------------------------------------------------------


async def test_the_drill_passes_on_a_sound_replica_and_alerts_on_a_damaged_one(
    replicated: Settings, tmp_path: Path, caplog
) -> None:
    async with running_host(replicated) as (host, plugin):
        add_users(plugin.operations, 50)
        assert plugin.replication is not None
        result = await plugin.replication.drill()
        assert result is not None and result.ok, result
        assert result.rows >= 50
        # The replica loses its files (a lifecycle rule gone wrong, say): the next drill fails.
        for ltx in (tmp_path / "offsite" / "replica").rglob("*.ltx"):
            ltx.write_bytes(b"\0" * ltx.stat().st_size)
        result = await plugin.replication.drill()
        assert result is not None and not result.ok
        report = await host.monitor.check()
        check = report.checks["replication"]
        assert check.status.value == "degraded" and "restore drill FAILED" in check.message
        assert not list(runtime_dir(plugin.database.file).glob("drill-*"))  # scratch removed
    alerts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ALERT")]
    assert [a for a in alerts if "replication: degraded" in a and "restore drill FAILED" in a]


def test_scratch_files_of_dead_processes_are_removed_and_no_others(tmp_path: Path) -> None:
    from dbkeeper.plugins.database.offsite.litestream import remove_leftovers

    database = tmp_path / "bot.db"
    directory = runtime_dir(database)
    directory.mkdir()
    dead = _dead_pid()
    names = [
        f"drill-{dead}-ab12.db",
        f"drill-{dead}-ab12.db.tmp",
        f"command-{dead}-cd34.yml",
        f"drill-{os.getpid()}-ef56.db",  # a drill running now
        "litestream.yml",
        "drill.json",
    ]
    for name in names:
        (directory / name).write_text("x")
    remove_leftovers(database)
    assert sorted(p.name for p in directory.iterdir()) == sorted(names[3:])


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# -- what operators see ----------------------------------------------------------------------------


def test_dbstats_health_and_replication_status_show_the_running_replication(
    tmp_path: Path,
) -> None:
    from tests.support.process import BotProcess, run_cli, write_config
    from tests.support.telegram_api import DEFAULT_TOKEN, TelegramAPIStandIn

    admin = 4201
    with TelegramAPIStandIn() as api:
        write_config(
            tmp_path / "config.toml",
            {
                "telegram": {
                    "token": DEFAULT_TOKEN,
                    "api_base_url": api.base_url,
                    "admin_ids": [admin],
                },
                "database": {"url": f"sqlite:///{tmp_path / 'data' / 'bot.db'}"},
                "backup": {"dir": str(tmp_path / "backups")},
                "health": {"http_port": free_port()},
                "offsite": {"url": f"file://{tmp_path / 'offsite'}"},
                "replication": {"enabled": True},
            },
        )
        with BotProcess(["run"], cwd=tmp_path) as bot:
            bot.wait_for_line("dbkeeper is running")
            bot.wait_for_line("snapshot complete")  # Litestream's first upload
            api.push_command("/dbstats", user_id=admin)
            answer = api.wait_for_message("Replication", chat_id=admin)["text"]
            _code, health = run_cli(["health"], cwd=tmp_path)
            code_status, status = run_cli(["replication", "status"], cwd=tmp_path)
            assert bot.stop() == 0
    assert "<b>Replication</b> ✅ lag " in answer and "| last sync 20" in answer, answer
    # ``dbkeeper health`` (another process) asks the running Litestream through its socket.
    assert re.search(r"\n  replication +healthy +lag \d+\.\d s \| last sync 20", health), health
    assert code_status == 0, status
    assert re.search(r"litestream: running \(pid \d+\): lag \d+\.\d s, last sync 20", status)
    assert "restorable: from 20" in status and "(1 snapshots)" in status
