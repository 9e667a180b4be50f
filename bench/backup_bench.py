"""Backup benchmark: dbkeeper's backups against reference tools on the same ~1 GiB database.

    python bench/backup_bench.py                 # ~1 GiB database in bench/out/ (git-ignored)
    python bench/backup_bench.py --size-mb 200   # a quicker run

Every figure is measured in this run, on this machine, as a ratio to a reference tool on the
same file, so the ratios travel between machines better than the seconds:

* uncompressed backup vs ``cp`` then ``sync`` of the copy, and vs ``sqlite3 .backup``;
* gzip / zstd backups vs the same copy followed by ``gzip -6`` / ``zstd -3`` (and ``sync``);
* peak memory of the process taking the backup (``VmHWM``, reset just before it starts);
* the longest event-loop stall while the backup runs inside the bot's event loop, with bot
  handlers reading the database through the service meanwhile.

Each dbkeeper backup runs in a child process: a real ``DatabasePlugin`` started on an event
loop, ``await plugin.backup_now()``, with a 1 ms ticker measuring how late the loop wakes up.
The source file is read once beforehand, so every contender reads it from the page cache.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "den", "pra", "stu", "qui"]


def vocabulary(rng: random.Random, size: int = 3000) -> list[str]:
    return ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(size)]


# -- the database ----------------------------------------------------------------------------


def generate(path: Path, size_mb: int) -> None:
    """A bot database at head schema: users, chats and a large events log with text payloads."""
    from dbkeeper.config import settings_from_mapping
    from dbkeeper.plugins.database import DatabasePlugin

    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    settings = settings_from_mapping(
        {"database": {"url": f"sqlite:///{path}"}, "backup": {"dir": str(path.parent / "x")}},
        environ={},
    )
    plugin = DatabasePlugin(settings)
    plugin.operations.open()
    plugin.operations.close()
    rng = random.Random(42)
    words = vocabulary(rng)
    pool = [
        json.dumps(
            {
                "text": " ".join(rng.choices(words, k=rng.randint(3, 40))),
                "message_id": rng.randint(1, 10**9),
                "amount": round(rng.uniform(0, 1000), 2),
            }
        )
        for _ in range(200_000)
    ]
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA synchronous = OFF")
    connection.execute("BEGIN")
    connection.executemany(
        "INSERT INTO users (id, username, first_name, language_code, is_blocked) "
        "VALUES (?, ?, ?, 'en', 0)",
        ((i, f"user{i}", f"User {i}") for i in range(1, 200_001)),
    )
    connection.executemany(
        "INSERT INTO chats (id, type, title) VALUES (?, 'group', ?)",
        ((-i, f"chat {i}") for i in range(1, 50_001)),
    )
    connection.execute("COMMIT")
    target = size_mb * 1_000_000
    batch = 50_000
    n = 0
    while _logical_size(connection) < target:
        rows = [
            (
                -rng.randint(1, 50_000),
                rng.randint(1, 200_000),
                rng.choice(("command", "message", "callback")),
                pool[rng.randrange(len(pool))],
                f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} 12:{n % 60:02d}:00",
            )
            for _ in range(batch)
        ]
        connection.execute("BEGIN")
        connection.executemany(
            "INSERT INTO events (chat_id, user_id, kind, payload, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            rows,
        )
        connection.execute("COMMIT")
        n += batch
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()


def _logical_size(connection: sqlite3.Connection) -> int:
    pages = connection.execute("PRAGMA page_count").fetchone()[0]
    return pages * connection.execute("PRAGMA page_size").fetchone()[0]


def warm(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(1 << 24):
            pass


# -- reference tools ---------------------------------------------------------------------------


def timed(commands: list[list[str]] | list[str], shell: bool = False) -> float:
    os.sync()  # every contender starts without dirty pages left by the one before
    started = time.perf_counter()
    for command in commands:
        subprocess.run(command, check=True, shell=shell)
    return time.perf_counter() - started


def reference_copy(source: Path, scratch: Path) -> float:
    copy = scratch / "copy.db"
    copy.unlink(missing_ok=True)
    seconds = timed([["cp", str(source), str(copy)], ["sync", str(copy)]])
    copy.unlink()
    return seconds


def our_copy(source: Path, scratch: Path) -> float:
    """dbkeeper's snapshot step alone (the copy and its fsync), as ``backup create`` takes it."""
    from dbkeeper.plugins.database.backup.engines.base import Limits
    from dbkeeper.plugins.database.backup.engines.sqlite import SqliteBackupEngine

    copy = scratch / "ours.db"
    copy.unlink(missing_ok=True)
    subprocess.run(["sync"], check=True)
    started = time.perf_counter()
    SqliteBackupEngine(source).snapshot(copy, lambda *_: None, Limits(None, ()))
    seconds = time.perf_counter() - started
    copy.unlink()
    return seconds


def reference_sqlite3(source: Path, scratch: Path) -> float:
    copy = scratch / "sqlite3.db"
    copy.unlink(missing_ok=True)
    seconds = timed([["sqlite3", str(source), f".backup '{copy}'"]])
    copy.unlink()
    return seconds


def reference_compressed(source: Path, scratch: Path, codec: str) -> float:
    copy = scratch / "copy.db"
    copy.unlink(missing_ok=True)
    packed = scratch / ("copy.db.gz" if codec == "gzip" else "copy.db.zst")
    tool = (
        f"gzip -6 -c {copy} > {packed}" if codec == "gzip" else f"zstd -3 -q -c {copy} > {packed}"
    )
    seconds = timed([f"cp {source} {copy}", tool, f"sync {packed}"], shell=True)
    copy.unlink()
    packed.unlink()
    return seconds


# -- dbkeeper, inside a bot's event loop (child process) -------------------------------------


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


async def child(database: Path, directory: Path, codec: str) -> dict:
    from sqlalchemy import text

    from dbkeeper.config import settings_from_mapping
    from dbkeeper.plugin import Deadline
    from dbkeeper.plugins.database import DatabasePlugin

    settings = settings_from_mapping(
        {
            "database": {"url": f"sqlite:///{database}"},
            "migrations": {"auto_upgrade": False},
            "backup": {
                "dir": str(directory),
                "compression": codec,
                "compress_min_bytes": 0,
                "on_shutdown": False,
            },
        },
        environ={},
    )
    plugin = DatabasePlugin(settings)
    await plugin.start()
    gc.freeze()  # as the bot's lifecycle does once started
    stop = asyncio.Event()
    lateness: list[tuple[float, float]] = []  # (when the tick started, how late it woke up)
    reads: list[float] = []
    collections: list[tuple[float, float]] = []  # garbage collections: (start, end)

    def on_gc(phase: str, _info: dict) -> None:
        if phase == "start":
            collections.append((time.perf_counter(), float("inf")))
        elif collections:
            collections[-1] = (collections[-1][0], time.perf_counter())

    gc.callbacks.append(on_gc)

    async def ticker() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            lateness.append((started, time.perf_counter() - started - 0.001))

    async def handler() -> None:  # what a bot handler does: a query through the service
        while not stop.is_set():
            started = time.perf_counter()
            await plugin.database.read(
                lambda s: s.execute(text("SELECT count(*) FROM users WHERE id < 100")).scalar()
            )
            reads.append(time.perf_counter() - started)
            await asyncio.sleep(0.01)

    baseline = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of the backup alone
    tasks = [asyncio.create_task(ticker()), asyncio.create_task(handler())]
    started = time.perf_counter()
    info = await plugin.backup_now("manual")
    seconds = time.perf_counter() - started
    peak = status("VmHWM")
    stop.set()
    await asyncio.gather(*tasks)
    gc.callbacks.remove(on_gc)

    def during_gc(start: float, late: float) -> bool:
        end = start + 0.001 + late
        return any(a < end and b > start for a, b in collections)

    others = [late for start, late in lateness if not during_gc(start, late)]
    await plugin.stop(Deadline.after(30))
    result = {
        "codec": codec,
        "seconds": seconds,
        "phases": info.phases,
        "size_bytes": info.size_bytes,
        "content_bytes": info.content_bytes,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "max_stall_ms": max(late for _, late in lateness) * 1000,
        "max_stall_without_gc_ms": max(others) * 1000,
        "max_gc_ms": max((b - a for a, b in collections), default=0.0) * 1000,
        "ticks": len(lateness),
        "max_read_ms": max(reads) * 1000 if reads else None,
        "reads": len(reads),
    }
    for backup in plugin.backups.list():
        backup.path.unlink()
        backup.path.with_name(backup.name + ".manifest.json").unlink()
    return result


def ours(database: Path, scratch: Path, codec: str) -> dict:
    directory = scratch / f"backups-{codec}"
    os.sync()
    output = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            codec,
            "--database",
            str(database),
            "--out",
            str(directory),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


# -- the run -------------------------------------------------------------------------------------


def mb(value: float) -> str:
    return f"{value / 1e6:,.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=1074, help="database size (default ~1 GiB)")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the fast measurements")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--database", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        print(json.dumps(asyncio.run(child(arguments.database, arguments.out, arguments.child))))
        return

    out: Path = arguments.out
    out.mkdir(parents=True, exist_ok=True)
    database = out / "bench.db"
    if not database.exists() or database.stat().st_size < arguments.size_mb * 1_000_000 * 0.95:
        print(f"generating a {arguments.size_mb} MB bot database in {database} ...", flush=True)
        started = time.perf_counter()
        generate(database, arguments.size_mb)
        print(f"  generated in {time.perf_counter() - started:.0f}s", flush=True)
    size = database.stat().st_size
    scratch = out / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    warm(database)
    cpus = os.cpu_count()
    print(
        f"database: {database} ({mb(size)}); {cpus} CPUs; Python {sys.version.split()[0]}; "
        f"SQLite {sqlite3.sqlite_version}"
    )

    repeat = arguments.repeat
    # The copy alone, interleaved with the reference so that both see the same disk weather.
    pairs = [(our_copy(database, scratch), reference_copy(database, scratch)) for _ in range(5)]
    own_copy = statistics.median(ours for ours, _ in pairs)
    copy = statistics.median(reference for _, reference in pairs)
    cli = statistics.median(reference_sqlite3(database, scratch) for _ in range(repeat))
    raw_runs = [ours(database, scratch, "none") for _ in range(repeat)]
    raw = sorted(raw_runs, key=lambda r: r["seconds"])[repeat // 2]
    snapshot = statistics.median(r["phases"]["snapshot"] for r in raw_runs)
    zstd_ref = statistics.median(
        reference_compressed(database, scratch, "zstd") for _ in range(repeat)
    )
    zstd_runs = [ours(database, scratch, "zstd") for _ in range(repeat)]
    zstd = sorted(zstd_runs, key=lambda r: r["seconds"])[repeat // 2]
    gzip_ref = reference_compressed(database, scratch, "gzip")  # slow: once
    gzip = ours(database, scratch, "gzip")

    rows = [
        ("uncompressed: the copy (snapshot + fsync)", own_copy, copy, "cp + sync"),
        ("  the same, inside the bot (median phase)", snapshot, copy, "cp + sync"),
        ("uncompressed: verified backup, total", raw["seconds"], copy, "cp + sync"),
        ("sqlite3 .backup", cli, copy, "cp + sync"),
        ("zstd: verified backup, total", zstd["seconds"], zstd_ref, "cp + zstd -3 + sync"),
        ("gzip: verified backup, total", gzip["seconds"], gzip_ref, "cp + gzip -6 + sync"),
    ]
    print()
    print(f"{'measurement':<42} {'seconds':>8}  {'reference':<22} {'seconds':>8}  {'ratio':>6}")
    for label, value, reference, name in rows:
        print(
            f"{label:<42} {value:>8.2f}  {name:<22} {reference:>8.2f}  {value / reference:>5.2f}x"
        )
    print()
    for result, runs in ((raw, raw_runs), (zstd, zstd_runs), (gzip, [gzip])):
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in sorted(result["phases"].items()))
        stall = max(r["max_stall_ms"] for r in runs)
        stall_without_gc = max(r["max_stall_without_gc_ms"] for r in runs)
        collection = max(r["max_gc_ms"] for r in runs)
        slowest = max(r["max_read_ms"] for r in runs)
        peak = max(r["peak_rss"] for r in runs)
        print(
            f"{result['codec']:<5} {mb(result['content_bytes'])} -> {mb(result['size_bytes'])}; "
            f"phases: {phases}"
        )
        print(
            f"      worst of {len(runs)} run(s): peak RSS {mb(peak)} "
            f"(process at rest {mb(result['baseline_rss'])}); longest event-loop stall "
            f"{stall:.1f} ms (1 ms ticker), {stall_without_gc:.1f} ms apart from garbage "
            f"collections (longest {collection:.1f} ms); slowest handler query {slowest:.1f} ms"
        )
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
