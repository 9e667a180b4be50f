"""How long the periodic health check takes on a 1 GiB SQLite database (target: under 100 ms).

    python bench/health_bench.py [--size-mb 1024] [--runs 50]

Builds (once, then reuses) ``bench/out/health-1024mb.db`` with the backup benchmark's
generator (``backup_bench.generate``: the bot's schema, migrated by dbkeeper, 200,000 users,
50,000 chats and events with JSON payloads of varied length in random order, so that the
indexes are as scattered as a real bot's). Then it starts the real host (local mode, HTTP API
on a free port) and times:

- the periodic check: every registered check, as the monitor runs it every five minutes;
- each check on its own (from the same runs);
- ``GET /health`` with the result fresh (cached) and stale (a check runs);
- for comparison, what the check avoids: ``count(*)`` of every table, ``PRAGMA quick_check``
  and ``PRAGMA integrity_check`` on the live database.

The page cache is warm (the database was just built or read); a periodic check on a cold cache
reads the same handful of pages from disk.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import sqlite3
import statistics
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from backup_bench import generate  # noqa: E402

from dbkeeper.app import build_application  # noqa: E402
from dbkeeper.config import Settings, settings_from_mapping  # noqa: E402
from dbkeeper.health import Status  # noqa: E402
from dbkeeper.host import Host  # noqa: E402
from dbkeeper.plugin import Deadline  # noqa: E402
from dbkeeper.plugins.database import DatabasePlugin  # noqa: E402

OUT = ROOT / "bench" / "out"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def settings_for(database: Path, port: int) -> Settings:
    return settings_from_mapping(
        {
            "database": {"url": f"sqlite:///{database}"},
            "backup": {"dir": str(OUT / "health-backups"), "on_shutdown": False},
            "health": {"http_port": port},
        },
        environ={},
    )


def build_database(path: Path, size_mb: int) -> None:
    """The backup benchmark's bot database (``generate``), ``size_mb`` MB of pages."""
    if path.exists() and path.stat().st_size >= size_mb * 1_000_000 * 0.98 and _generated(path):
        print(f"reusing {path} ({path.stat().st_size / 1e6:,.0f} MB)")
        return
    started = time.monotonic()
    twin = path.with_name(f"bench-{size_mb}mb.db")  # the backup benchmark's: the same rows
    if twin.exists() and _generated(twin):
        print(f"copying {twin} to {path} ...", flush=True)
        shutil.copyfile(twin, path)
    else:
        print(f"building {path} ({size_mb} MB) ...", flush=True)
        generate(path, size_mb)
    print(
        f"built in {time.monotonic() - started:.0f}s: {path.stat().st_size / 1e6:,.0f} MB",
        flush=True,
    )


def _generated(path: Path) -> bool:
    """Whether ``path`` was built by ``generate`` (not by an older version of this bench)."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return bool(connection.execute("SELECT count(*) FROM chats").fetchone()[0] == 50_000)
    except sqlite3.Error:
        return False
    finally:
        connection.close()


def timed(function, *args) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    function(*args)
    return (time.perf_counter() - started) * 1000


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (
        f"median {statistics.median(ordered):7.2f} ms  p95 {p95:7.2f} ms  max {ordered[-1]:7.2f} ms"
    )


def http_get(port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as answer:
        answer.read()


async def measure(path: Path, runs: int) -> int:
    """The figures, printed; returns how many check results were unhealthy (should be 0)."""
    port = free_port()
    settings = settings_for(path, port)
    plugin = DatabasePlugin(settings)
    host = Host(settings, build_application(settings), [plugin])
    started = time.perf_counter()
    await host.start()  # the first check starts the background quick_check: let it finish
    while True:
        scan = (await host.health.run()).checks["database_integrity"].message
        if scan.startswith("quick_check"):
            break
        await asyncio.sleep(0.05)
    print(
        f"startup and the first background quick_check: {time.perf_counter() - started:.1f}s "
        f"({scan})"
    )
    try:
        totals: list[float] = []
        per_check: dict[str, list[float]] = {}
        failures: list[str] = []  # a check that fails while the bench asks beside the monitor
        report = None
        for _ in range(runs):
            started = time.perf_counter()
            report = await host.health.run()
            totals.append((time.perf_counter() - started) * 1000)
            for check in report.checks.values():
                per_check.setdefault(check.name, []).append(check.duration_ms)
                if check.status is Status.UNHEALTHY:
                    failures.append(f"{check.name}: {check.message}")
        assert report is not None
        print(f"\nperiodic check, {len(report.checks)} checks, {runs} runs:")
        print(f"  all checks together   {summary(totals)}")
        for name, values in per_check.items():
            print(f"  {name:<21} {summary(values)}")
        print("  messages:")
        for check in report.checks.values():
            print(f"    {check.name}: {check.status.value}: {check.message}")
        print(f"  unhealthy results in {runs} runs: {len(failures)}")
        for failure in sorted(set(failures)):
            print(f"    {failure}")

        fresh = [await asyncio.to_thread(timed, http_get, port) for _ in range(runs)]
        print(f"\nGET /health, fresh result reused: {summary(fresh)}")
        stale = []
        for _ in range(runs):
            host.monitor.last = None  # force a new check for this request
            stale.append(await asyncio.to_thread(timed, http_get, port))
        print(f"GET /health, check runs:         {summary(stale)}")
    finally:
        await host.stop(Deadline.after(30))

    connection = sqlite3.connect(path)
    tables = [
        name
        for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    print("\nwhat the periodic check avoids, once each:")

    def run(sql: str) -> None:
        connection.execute(sql).fetchall()

    count = sum(timed(run, f'SELECT count(*) FROM "{table}"') for table in tables)
    print(f"  count(*) of every table     {count:9.1f} ms")
    print(f"  PRAGMA quick_check          {timed(run, 'PRAGMA quick_check'):9.1f} ms")
    print(f"  PRAGMA integrity_check      {timed(run, 'PRAGMA integrity_check'):9.1f} ms")
    connection.close()
    return len(failures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=50)
    arguments = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"health-{arguments.size_mb}mb.db"
    build_database(path, arguments.size_mb)
    print(
        f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs"
    )
    if asyncio.run(measure(path, arguments.runs)):
        sys.exit("some checks were unhealthy while the benchmark ran (see above)")


if __name__ == "__main__":
    main()
