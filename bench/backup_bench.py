"""Backup benchmark: what a user runs, against reference pipelines, in one process run.

    python bench/backup_bench.py                       # 100 MB, 3 rounds (a few minutes)
    python bench/backup_bench.py --sizes 100,1024,4096 # the issue's sizes (4 GiB: about an hour)
    python bench/backup_bench.py --no-postgres         # SQLite only

For each size it builds a bot database once (``bench/out/``, git-ignored; the same rows in a
PostgreSQL database ``dbkeeper_bench_<size>``), then runs rounds. In each round every
contender runs once, dbkeeper's and the references interleaved, so that both see the same
machine; the figures are medians over the rounds, as ratios of wall time and of CPU time.

dbkeeper is timed as a user runs it: ``dbkeeper --config bench.toml backup create`` and
``backup restore NAME --yes``, whole processes. "listed" is when ``backup create`` prints
``created``; "full check done" is when the backup's manifest says ``full_check: passed``
(polled; without that field the full check ran before the backup was listed). The in-process
time of the pipeline (the manifest's ``duration_seconds``, what the bot measures) is shown
beside it. The references (shell pipelines of the real tools) verify what dbkeeper verifies:

* zstd backup: ``cp; (zstd -3 ∥ sqlite3 quick_check); zstd -t; sync`` and ``cp; zstd -3; sync``
* uncompressed backup: ``cp; sync``
* full check done: ``cp; (zstd -3 ∥ sqlite3 integrity_check); zstd -t; sync``
* restore: ``zstd -d; sync; mv``
* PostgreSQL backup: ``pg_dump -Fc -Z0 | zstd -3; sync`` (the issue's) and
  ``pg_dump -Fc -Z0; (zstd -3 ∥ pg_restore -f /dev/null); zstd -t; sync`` (what dbkeeper does)
* PostgreSQL restore: ``zstd -dc | pg_restore --clean --single-transaction``

CPU time is the user + system time of the process and every child it waited for (``wait4``);
the PostgreSQL server's own work is not in it (both sides run the same pg_dump/pg_restore).
How busy the machine was: the load average before each round, and the CPU time of every
other process during each run (``/proc/stat`` minus ours). Peak memory is the largest RSS of
one process of the tree; disk peak is how much the free space fell below its level at the
start of the run (sampled every 20 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "den", "pra", "stu", "qui"]
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
POLL = 0.02
FULL_CHECK_DEADLINE = 3600.0
TIMES = "\N{MULTIPLICATION SIGN}"


def vocabulary(rng: random.Random, size: int = 3000) -> list[str]:
    return ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(size)]


# -- the database ----------------------------------------------------------------------------


def generate(path: Path, size_mb: int) -> None:
    """A bot database at head schema: users, chats and a large events log with text payloads
    in random order (the index on them is realistic: an integrity check walks it)."""
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
    pages = int(connection.execute("PRAGMA page_count").fetchone()[0])
    return pages * int(connection.execute("PRAGMA page_size").fetchone()[0])


def generate_postgres(source: Path, database: str) -> str:
    """The same rows in a PostgreSQL database of their own (migrated by dbkeeper); its URL."""
    from sqlalchemy import create_engine, text

    from dbkeeper.config import settings_from_mapping
    from dbkeeper.plugins.database import DatabasePlugin

    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + database
    lite = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    events = lite.execute("SELECT count(*) FROM events").fetchone()[0]
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        exists = connection.execute(
            text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": database}
        ).first()
    if exists:  # built by an earlier run: reused when it holds the same rows
        engine = create_engine(url)
        with contextlib.suppress(Exception), engine.connect() as connection:
            if connection.execute(text("SELECT count(*) FROM events")).scalar() == events:
                engine.dispose()
                admin.dispose()
                lite.close()
                return url
        engine.dispose()
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{database}"'))
    admin.dispose()
    settings = settings_from_mapping(
        {"database": {"url": url}, "backup": {"dir": str(source.parent / "x")}}, environ={}
    )
    plugin = DatabasePlugin(settings)
    plugin.operations.open()
    plugin.operations.close()
    engine = create_engine(url)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for table in ("users", "chats", "events"):
            columns = [row[1] for row in lite.execute(f"PRAGMA table_info({table})")]
            names = ", ".join(columns)
            with cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                for row in lite.execute(f"SELECT {names} FROM {table}"):
                    copy.write_row(row)
        raw.commit()
    finally:
        raw.close()
        lite.close()
        engine.dispose()
    with create_engine(url, isolation_level="AUTOCOMMIT").connect() as connection:
        connection.execute(text("VACUUM ANALYZE"))
    return url


def pg_size(url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return int(
                connection.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
            )
    finally:
        engine.dispose()


def warm(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(1 << 24):
            pass


# -- measuring one run -------------------------------------------------------------------------


@dataclass
class Run:
    wall: float  # seconds, start to exit
    cpu: float  # user + system seconds of the process tree
    rss: int  # bytes, the largest VmHWM of a process of the tree (sampled every POLL)
    anon: int  # bytes, the largest RssAnon of a process of the tree (sampled every POLL)
    others: float  # CPU seconds of every other process meanwhile
    disk: int  # bytes: how far the free space fell below its level at the start
    marks: dict[str, float] = field(default_factory=dict)  # event -> seconds from the start
    cpu_marks: dict[str, float] = field(default_factory=dict)  # event -> CPU seconds by then
    output: str = ""


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS


def tree_cpu(pid: int) -> float:
    """User + system seconds of ``pid`` and the children it has waited for, so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / CLOCK_TICKS  # utime stime cutime cstime


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, now."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                text = Path(f"/proc/{current}/task/{task}/children").read_text()
                queue += [int(child) for child in text.split()]
    return found


def largest(pid: int, field: str) -> int:
    """The largest ``field`` of ``/proc/PID/status`` over the process tree, in bytes.

    ``VmHWM``: the peak RSS (not ``ru_maxrss``: a child forked from this large process inherits
    its size until exec); it counts the mapped pages of an mmap'ed file, which are page cache.
    ``RssAnon``: the process's own memory now (sampled, so a peak between samples is missed).
    """
    peak = 0
    for member in descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    peak = max(peak, int(line.split()[1]) * 1024)
    return peak


class DiskWatch:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.start = shutil.disk_usage(directory).free
        self.lowest = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(POLL):
            self.lowest = min(self.lowest, shutil.disk_usage(self.directory).free)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(0, self.start - self.lowest)


def measure(
    command: list[str] | str,
    where: Path,
    *,
    env: dict[str, str] | None = None,
    watch: Callable[[float], dict[str, float]] | None = None,
    lines: dict[str, str] | None = None,
) -> Run:
    """Run ``command`` (a shell line if a string) to its end.

    ``lines``: mark -> prefix of an output line; the time (and CPU time) it appeared is kept.
    ``watch(start)``: polled while it runs and once after; returns marks found (a manifest).
    """
    os.sync()  # no dirty pages of the run before
    marks: dict[str, float] = {}
    cpu_marks: dict[str, float] = {}
    output: list[str] = []
    disk = DiskWatch(where)
    busy = machine_busy()
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        shell=isinstance(command, str),
        executable="/bin/bash" if isinstance(command, str) else None,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            for mark, prefix in (lines or {}).items():
                if mark not in marks and line.startswith(prefix):
                    marks[mark] = time.perf_counter() - started
                    cpu_marks[mark] = tree_cpu(process.pid)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    rss = anon = 0
    while True:
        rss = max(rss, largest(process.pid, "VmHWM"))  # before wait4: the process is there
        anon = max(anon, largest(process.pid, "RssAnon"))
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if watch is not None:
            marks.update({k: v for k, v in watch(started).items() if k not in marks})
        time.sleep(POLL)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    cpu = usage.ru_utime + usage.ru_stime
    others = max(0.0, machine_busy() - busy - cpu)
    run = Run(wall, cpu, rss, anon, others, disk.stop(), marks, cpu_marks)
    run.output = "".join(output)
    if process.returncode != 0:
        raise RuntimeError(f"{command!r} failed ({process.returncode}):\n{run.output[-3000:]}")
    if watch is not None:  # what happens after the process (a background check) has a deadline
        deadline = time.monotonic() + FULL_CHECK_DEADLINE
        while True:
            found = watch(started)
            marks.update({k: v for k, v in found.items() if k not in marks})
            if "pending" not in found or time.monotonic() > deadline:
                break
            time.sleep(POLL)
        marks.pop("pending", None)
    return run


# -- dbkeeper, as a user runs it ---------------------------------------------------------------


def write_config(path: Path, url: str, backups: Path, codec: str) -> Path:
    path.write_text(
        f'[database]\nurl = "{url}"\n\n'
        f'[backup]\ndir = "{backups}"\ncompression = "{codec}"\ncompress_min_bytes = 0\n'
        "keep = 1000\non_shutdown = false\n"
    )
    return path


def dbkeeper(config: Path, *arguments: str) -> list[str]:
    return [str(Path(sys.executable).with_name("dbkeeper")), "--config", str(config), *arguments]


def newest_manifest(directory: Path, before: set[str]) -> dict[str, Any] | None:
    names = sorted(
        n for n in os.listdir(directory) if n.endswith(".manifest.json") and n not in before
    )
    for name in reversed(names):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads((directory / name).read_text())
            if data.get("reason") == "manual":
                return dict(data)
    return None


def backup_create(config: Path, directory: Path) -> tuple[Run, dict[str, Any]]:
    """``dbkeeper backup create``: listed (its ``created`` line), full check done (the manifest
    says so, or the process ended when the manifest has no such field), the whole process."""
    directory.mkdir(parents=True, exist_ok=True)
    before = set(os.listdir(directory))

    def full_check(started: float) -> dict[str, float]:
        manifest = newest_manifest(directory, before)
        if manifest is None or "full_check" not in manifest:
            return {}
        if manifest["full_check"] == "pending":
            return {"pending": 0.0}
        return {"full check done": time.perf_counter() - started}

    run = measure(
        dbkeeper(config, "backup", "create"),
        directory,
        watch=full_check,
        lines={"listed": "created "},
    )
    manifest = newest_manifest(directory, before)
    assert manifest is not None, run.output
    if manifest.get("full_check", "passed") != "passed":
        raise RuntimeError(f"the full check of {manifest['name']} did not pass: {manifest}")
    run.marks.setdefault("listed", run.wall)
    run.cpu_marks.setdefault("listed", run.cpu)
    run.marks.setdefault("full check done", run.wall)
    return run, manifest


def remove_backups(directory: Path) -> None:
    for item in directory.iterdir() if directory.is_dir() else []:
        if item.is_file():
            item.unlink()


# -- the references ------------------------------------------------------------------------------


def q(path: Path) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"


def ref_zstd_checked(source: Path, scratch: Path, check: str) -> str:
    copy, packed = scratch / "ref.db", scratch / "ref.db.zst"
    return (
        f"rm -f {q(packed)}; cp {q(source)} {q(copy)} && "
        f"{{ zstd -3 -q {q(copy)} -o {q(packed)} & "
        f"test \"$(sqlite3 {q(copy)} 'PRAGMA {check}')\" = ok; c=$?; wait $!; z=$?; "
        f"test $c = 0 -a $z = 0; }} && zstd -q -t {q(packed)} && sync {q(packed)} && "
        f"rm {q(copy)} {q(packed)}"
    )


def ref_zstd(source: Path, scratch: Path) -> str:
    copy, packed = scratch / "ref.db", scratch / "ref.db.zst"
    return (
        f"rm -f {q(packed)}; cp {q(source)} {q(copy)} && zstd -3 -q {q(copy)} -o {q(packed)} && "
        f"sync {q(packed)} && rm {q(copy)} {q(packed)}"
    )


def ref_copy(source: Path, scratch: Path) -> str:
    copy = scratch / "ref.db"
    return f"cp {q(source)} {q(copy)} && sync {q(copy)} && rm {q(copy)}"


def ref_restore(backup: Path, live: Path) -> str:
    staging = live.with_name(live.name + ".ref-tmp")
    return (
        f"rm -f {q(staging)}; zstd -d -q {q(backup)} -o {q(staging)} && sync {q(staging)} && "
        f"mv {q(staging)} {q(live)}"
    )


def pg_env(url: str) -> dict[str, str]:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        PGHOST=parsed.host or "127.0.0.1",
        PGPORT=str(parsed.port or 5432),
        PGUSER=parsed.username or "postgres",
        PGDATABASE=parsed.database or "",
    )
    return env


def ref_pg_pipe(scratch: Path) -> str:
    packed = scratch / "ref.dump.zst"
    return (
        f"set -o pipefail; pg_dump -Fc -Z0 | zstd -3 -q -o {q(packed)} -f && sync {q(packed)} && "
        f"rm {q(packed)}"
    )


def ref_pg_checked(scratch: Path) -> str:
    raw, packed = scratch / "ref.dump", scratch / "ref.dump.zst"
    return (
        f"rm -f {q(packed)}; pg_dump -Fc -Z0 -f {q(raw)} && "
        f"{{ zstd -3 -q {q(raw)} -o {q(packed)} & pg_restore -f /dev/null {q(raw)}; c=$?; "
        f"wait $!; z=$?; test $c = 0 -a $z = 0; }} && zstd -q -t {q(packed)} && "
        f"sync {q(packed)} && rm {q(raw)} {q(packed)}"
    )


def ref_pg_restore(backup: Path) -> str:
    return (
        f"set -o pipefail; zstd -dc -q {q(backup)} | pg_restore --clean --if-exists "
        '--single-transaction --no-owner -d "$PGDATABASE"'
    )


# -- rounds ---------------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    run: Callable[[], Run]
    results: list[Run] = field(default_factory=list)


@dataclass
class Comparison:
    label: str
    ours: str  # contender name
    mark: str  # "wall" or a mark of the contender's runs
    reference: str
    target: float | None
    manifest: str | None = None  # its in-process time: the manifests of this kind (listed)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def value(run: Run, mark: str) -> tuple[float, float]:
    """(wall, CPU) of ``run`` up to ``mark``."""
    if mark == "wall":
        return run.wall, run.cpu
    return run.marks[mark], run.cpu_marks.get(mark, run.cpu)


def cell(text: str) -> str:
    """``text`` for a Markdown table cell (a shell pipe would end the cell)."""
    return text.replace("|", "\\|")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def gb(value: float) -> str:
    return f"{value / 1e9:,.2f} GB" if value >= 1e9 else f"{value / 1e6:,.0f} MB"


def run_size(size_mb: int, out: Path, rounds: int, postgres: bool) -> list[str]:
    database = out / f"bench-{size_mb}mb.db"
    if not database.exists() or database.stat().st_size < size_mb * 1_000_000 * 0.95:
        print(f"generating a {size_mb} MB bot database in {database} ...", flush=True)
        started = time.perf_counter()
        generate(database, size_mb)
        print(f"  generated in {time.perf_counter() - started:.0f}s", flush=True)
    scratch = out / f"scratch-{size_mb}mb"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    live = scratch / "live" / "bot.db"
    live.parent.mkdir()
    shutil.copyfile(database, live)
    backups = {codec: scratch / f"backups-{codec}" for codec in ("zstd", "none")}
    configs = {
        codec: write_config(scratch / f"{codec}.toml", f"sqlite:///{live}", directory, codec)
        for codec, directory in backups.items()
    }
    warm(live)
    manifests: dict[str, list[dict[str, Any]]] = {}
    last: dict[str, Path] = {}

    def ours_create(codec: str, key: str) -> Callable[[], Run]:
        def go() -> Run:
            remove_backups(backups[codec])
            run, manifest = backup_create(configs[codec], backups[codec])
            manifests.setdefault(key, []).append(manifest)
            last[key] = backups[codec] / manifest["name"]
            return run

        return go

    def ours_restore() -> Run:
        name = last["zstd"].name
        run = measure(dbkeeper(configs["zstd"], "backup", "restore", name, "--yes"), scratch)
        for item in backups["zstd"].iterdir():  # keep the backup, drop the safety copy
            if not item.name.startswith(name):
                item.unlink()
        for item in live.parent.iterdir():  # and whatever the restore kept beside the database
            if item.is_file() and not item.name.startswith(live.name):
                item.unlink()
        return run

    contenders = [
        Contender("dbkeeper zstd backup", ours_create("zstd", "zstd")),
        Contender(
            "cp; (zstd -3 ∥ quick_check); zstd -t; sync",
            lambda: measure(ref_zstd_checked(live, scratch, "quick_check"), scratch),
        ),
        Contender("cp; zstd -3; sync", lambda: measure(ref_zstd(live, scratch), scratch)),
        Contender(
            "cp; (zstd -3 ∥ integrity_check); zstd -t; sync",
            lambda: measure(ref_zstd_checked(live, scratch, "integrity_check"), scratch),
        ),
        Contender("dbkeeper restore", ours_restore),
        Contender(
            "zstd -d; sync; mv",
            lambda: measure(ref_restore(last["zstd"], scratch / "ref-live.db"), scratch),
        ),
        Contender("dbkeeper uncompressed backup", ours_create("none", "none")),
        Contender("cp; sync", lambda: measure(ref_copy(live, scratch), scratch)),
    ]
    comparisons = [
        Comparison(
            "zstd backup, listed",
            "dbkeeper zstd backup",
            "listed",
            "cp; (zstd -3 ∥ quick_check); zstd -t; sync",
            1.2,
            "zstd",
        ),
        Comparison(
            "zstd backup, listed",
            "dbkeeper zstd backup",
            "listed",
            "cp; zstd -3; sync",
            1.2,
            "zstd",
        ),
        Comparison(
            "zstd backup, full check done",
            "dbkeeper zstd backup",
            "full check done",
            "cp; (zstd -3 ∥ integrity_check); zstd -t; sync",
            1.2,
        ),
        Comparison(
            "zstd backup, whole process",
            "dbkeeper zstd backup",
            "wall",
            "cp; (zstd -3 ∥ integrity_check); zstd -t; sync",
            None,
        ),
        Comparison(
            "uncompressed backup, listed",
            "dbkeeper uncompressed backup",
            "listed",
            "cp; sync",
            2.0,
            "none",
        ),
        Comparison("restore (whole process)", "dbkeeper restore", "wall", "zstd -d; sync; mv", 1.5),
    ]
    pg_url = None
    if postgres:
        pg_name = f"dbkeeper_bench_{size_mb}"
        print(f"loading the same rows into PostgreSQL database {pg_name} ...", flush=True)
        started = time.perf_counter()
        pg_url = generate_postgres(live, pg_name)
        print(
            f"  loaded in {time.perf_counter() - started:.0f}s: {gb(pg_size(pg_url))}", flush=True
        )
        pg_backups = scratch / "backups-pg"
        pg_config = write_config(scratch / "pg.toml", pg_url, pg_backups, "zstd")
        env = pg_env(pg_url)

        def ours_pg() -> Run:
            remove_backups(pg_backups)
            run, manifest = backup_create(pg_config, pg_backups)
            manifests.setdefault("pg", []).append(manifest)
            last["pg"] = pg_backups / manifest["name"]
            return run

        def ours_pg_restore() -> Run:
            name = last["pg"].name
            run = measure(dbkeeper(pg_config, "backup", "restore", name, "--yes"), scratch)
            for item in pg_backups.iterdir():
                if not item.name.startswith(name):
                    item.unlink()
            return run

        contenders += [
            Contender("dbkeeper PostgreSQL backup", ours_pg),
            Contender(
                "pg_dump -Fc -Z0 | zstd -3; sync",
                lambda: measure(ref_pg_pipe(scratch), scratch, env=env),
            ),
            Contender(
                "pg_dump -Fc -Z0; (zstd -3 ∥ pg_restore -f /dev/null); zstd -t; sync",
                lambda: measure(ref_pg_checked(scratch), scratch, env=env),
            ),
            Contender("dbkeeper PostgreSQL restore", ours_pg_restore),
            Contender(
                "zstd -dc | pg_restore",
                lambda: measure(ref_pg_restore(last["pg"]), scratch, env=env),
            ),
        ]
        comparisons += [
            Comparison(
                "PostgreSQL backup, listed",
                "dbkeeper PostgreSQL backup",
                "listed",
                "pg_dump -Fc -Z0 | zstd -3; sync",
                1.1,
                "pg",
            ),
            Comparison(
                "PostgreSQL backup, listed",
                "dbkeeper PostgreSQL backup",
                "listed",
                "pg_dump -Fc -Z0; (zstd -3 ∥ pg_restore -f /dev/null); zstd -t; sync",
                None,
                "pg",
            ),
            Comparison(
                "PostgreSQL restore (whole process)",
                "dbkeeper PostgreSQL restore",
                "wall",
                "zstd -dc | pg_restore",
                1.3,
            ),
        ]

    loads: list[str] = []
    for number in range(rounds):
        loads.append(load())
        print(f"round {number + 1}/{rounds} (load average {loads[-1]})", flush=True)
        for contender in contenders:
            result = contender.run()
            contender.results.append(result)
            print(
                f"  {contender.name:<72} {result.wall:8.2f}s  CPU {result.cpu:7.2f}s  "
                f"others' CPU {result.others:6.2f}s",
                flush=True,
            )
    loads.append(load())

    by_name = {c.name: c for c in contenders}
    size = live.stat().st_size
    lines = [
        f"## {gb(size)} SQLite database ({size_mb} MB asked)"
        + (f", PostgreSQL {gb(pg_size(pg_url))}" if pg_url else ""),
        "",
    ]
    lines.append(f"load average before each round and after the last: {'; '.join(loads)}")
    lines.append("")
    lines.append(
        "| measurement | dbkeeper wall | reference | ref. wall | wall ratio | CPU ratio "
        "| in-process ratio | target |"
    )
    lines.append("|---|---:|---|---:|---:|---:|---:|---|")
    for comparison in comparisons:
        ours = by_name[comparison.ours].results
        theirs = by_name[comparison.reference].results
        walls = [value(r, comparison.mark)[0] for r in ours]
        cpus = [value(r, comparison.mark)[1] for r in ours]
        ref_wall = median([r.wall for r in theirs])
        ref_cpu = median([r.cpu for r in theirs])
        wall_ratio = median(walls) / ref_wall
        cpu_ratio = median(cpus) / ref_cpu if ref_cpu else float("nan")
        in_process_ratio = "—"
        if comparison.manifest in manifests:
            seconds = median([m["duration_seconds"] for m in manifests[comparison.manifest]])
            in_process_ratio = f"{seconds / ref_wall:.2f}{TIMES}"
        target = "—"
        if comparison.target is not None:
            met = "met" if wall_ratio <= comparison.target else "**missed**"
            target = f"≤ {comparison.target}{TIMES} — {met}"
        lines.append(
            f"| {comparison.label} | {median(walls):.2f} s | `{cell(comparison.reference)}` | "
            f"{ref_wall:.2f} s | {wall_ratio:.2f}{TIMES} | {cpu_ratio:.2f}{TIMES} | "
            f"{in_process_ratio} | {target} |"
        )
    lines.append("")
    lines.append(
        "| run | wall (median; all) | CPU | others' CPU | peak RSS | own memory | disk peak |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for contender in contenders:
        runs = contender.results
        each = ", ".join(f"{r.wall:.2f}" for r in runs)
        lines.append(
            f"| {cell(contender.name)} | {median([r.wall for r in runs]):.2f} s ({each}) | "
            f"{median([r.cpu for r in runs]):.2f} s | {median([r.others for r in runs]):.2f} s | "
            f"{gb(max(r.rss for r in runs))} | {gb(max(r.anon for r in runs))} | "
            f"{gb(max(r.disk for r in runs))} |"
        )
    lines.append("")
    for key, label in (("zstd", "zstd"), ("none", "uncompressed"), ("pg", "PostgreSQL")):
        found = manifests.get(key)
        if not found:
            continue
        in_process = median([m["duration_seconds"] for m in found])
        phases: dict[str, list[float]] = {}
        for manifest in found:
            for phase, seconds in manifest.get("phases", {}).items():
                phases.setdefault(phase, []).append(seconds)
        shown = ", ".join(f"{p} {median(v):.2f}" for p, v in phases.items())
        lines.append(
            f"- {label}: in-process (manifest `duration_seconds`, what the bot measures) "
            f"{in_process:.2f} s; phases (s, medians): {shown}; {gb(found[-1]['size_bytes'])} "
            f"from {gb(found[-1]['content_bytes'])} ({found[-1]['compression']})"
        )
    lines.append("")
    shutil.rmtree(scratch, ignore_errors=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sizes", default="100", help="database sizes in MB (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per size (default 3)")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    arguments = parser.parse_args()
    out: Path = arguments.out
    out.mkdir(parents=True, exist_ok=True)
    # The whole command as a user runs it: an installed release has its bytecode (pip writes it);
    # an editable checkout under PYTHONDONTWRITEBYTECODE=1 would compile ~80 modules per run.
    import compileall

    for package in ("bot", "plugins", "migrations"):
        compileall.compile_dir(HERE.parent / package, quiet=1)
    print(
        f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}; SQLite "
        f"{sqlite3.sqlite_version}; {gb(shutil.disk_usage(out).free)} free in {out}",
        flush=True,
    )
    report: list[str] = []
    for size in (int(s) for s in arguments.sizes.split(",")):
        report += run_size(size, out, arguments.rounds, not arguments.no_postgres)
        print("\n".join(report), flush=True)
    print("\n".join(report))


if __name__ == "__main__":
    main()
