"""Revision 0003 (the user activity backfill): its first version against today's, same data.

    .venv/bin/python bench/migration_bench.py                       # both engines, every size
    .venv/bin/python bench/migration_bench.py --engines sqlite --sizes 2000,10000 --limit 30

For each engine and size it builds a database at v2 with USERS users, 5 x USERS events (one in
ten without a user, in 1,000 chats, times spread over a year), then migrates a copy of it to v3
with each version of revision 0003 through dbkeeper's own ``Migrator`` (the path ``dbkeeper db
migrate`` and the bot take), and times the revision.

The first version (``bench/revisions/0003_user_activity_v1.py``) reads every event once per
user. It gets ``--limit`` seconds; then it is stopped with ``Migrator.interrupt``, the path a
SIGTERM takes, which also measures how fast a signal ends a long statement. Where both finish,
their results are compared (every user's ``last_seen_at``): the rewrite must be equivalent.

SQLite files go to ``bench/out/`` (git-ignored); PostgreSQL databases are created on
``DBKEEPER_TEST_POSTGRES_URL`` (default the test server, 127.0.0.1:5432) and dropped.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import random
import shutil
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

OUT = HERE / "out"
FIRST_VERSION = HERE / "revisions" / "0003_user_activity_v1.py"
POSTGRES = os.environ.get(
    "DBKEEPER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
EVENTS_PER_USER = 5
CHATS = 1000


@dataclass
class Outcome:
    seconds: float
    finished: bool
    fingerprint: str | None = None  # sha256 of every user's (id, last_seen_at)
    stop_seconds: float | None = None  # interrupt requested -> migrator returned


# -- databases -----------------------------------------------------------------------------------


def scripts(variant: str, root: Path) -> Path:
    """A copy of migrations/ with the given version of 0003."""
    target = root / f"migrations-{variant}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(REPO / "migrations", target, ignore=shutil.ignore_patterns("__pycache__"))
    if variant == "first":
        (target / "versions" / "0003_user_activity.py").write_bytes(FIRST_VERSION.read_bytes())
    return target


def settings_for(url: str, location: Path):  # type: ignore[no-untyped-def]
    from dbkeeper.config import settings_from_mapping

    return settings_from_mapping(
        {
            "database": {"url": url},
            "migrations": {"script_location": str(location), "retries": 1},
            "backup": {"dir": str(OUT / "migration-backups")},
        },
        environ={},
    )


def migrator_for(url: str, location: Path):  # type: ignore[no-untyped-def]
    from dbkeeper.plugins.database.migrate.migrator import Migrator
    from dbkeeper.plugins.database.migrate.revisions import Revisions

    settings = settings_for(url, location)
    return Migrator(settings.database, settings.migrations, Revisions(location))


def upgrade(migrator, target: str = "head"):  # type: ignore[no-untyped-def]
    with migrator.locked() as schema:
        status, pending = schema.plan(target)
        return schema.upgrade(pending, status)


def rows(users: int, seed: int = 3) -> tuple[list[tuple], list[tuple]]:
    rng = random.Random(seed)
    people = [(i, f"user{i}") for i in range(1, users + 1)]
    events = [
        (
            rng.randint(1, CHATS),
            rng.randint(1, users) if rng.random() < 0.9 else None,
            "message",
            f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
        )
        for _ in range(users * EVENTS_PER_USER)
    ]
    return people, events


def fill(url: str, users: int) -> None:
    """The bot's data at v2: users, chats and the events log."""
    people, events = rows(users)
    chats = [(i, "group") for i in range(1, CHATS + 1)]
    engine = create_engine(url)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if engine.dialect.name == "sqlite":
            cursor.executemany("INSERT INTO users (id, first_name) VALUES (?, ?)", people)
            cursor.executemany("INSERT INTO chats (id, type) VALUES (?, ?)", chats)
            cursor.executemany(
                "INSERT INTO events (chat_id, user_id, kind, created_at) VALUES (?, ?, ?, ?)",
                events,
            )
        else:
            for table, columns, values in (
                ("users", "id, first_name", people),
                ("chats", "id, type", chats),
                ("events", "chat_id, user_id, kind, created_at", events),
            ):
                with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:  # type: ignore[attr-defined]
                    for row in values:
                        copy.write_row(row)
            cursor.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
        engine.dispose()


@contextmanager
def postgres_database(template: str | None = None) -> Iterator[str]:
    name = f"dbkeeper_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        suffix = f' TEMPLATE "{template}"' if template else ""
        connection.execute(text(f'CREATE DATABASE "{name}"{suffix}'))
    try:
        yield make_url(POSTGRES).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def fingerprint(url: str) -> str:
    engine = create_engine(url)
    digest = hashlib.sha256()
    with engine.connect() as connection:
        for user, seen in connection.execute(
            text("SELECT id, last_seen_at FROM users ORDER BY id")
        ):
            digest.update(f"{user}|{str(seen)[:19] if seen is not None else ''}\n".encode())
    engine.dispose()
    return digest.hexdigest()


# -- one run -------------------------------------------------------------------------------------


def migrate_0003(url: str, location: Path, limit: float) -> Outcome:
    """Time revision 0003 on a database at v2; interrupt it after ``limit`` seconds."""
    from dbkeeper.plugins.database.errors import MigrationInterrupted

    migrator = migrator_for(url, location)
    asked: list[float] = []

    def stop() -> None:
        asked.append(time.perf_counter())
        migrator.interrupt(f"the benchmark's limit of {limit:g}s")

    timer = threading.Timer(limit, stop)
    started = time.perf_counter()
    timer.start()
    try:
        upgrade(migrator)
    except MigrationInterrupted:
        ended = time.perf_counter()
        return Outcome(ended - started, False, stop_seconds=ended - asked[0])
    finally:
        timer.cancel()
        migrator.close()
    return Outcome(time.perf_counter() - started, True, fingerprint(url))


def remove_sqlite(path: Path) -> None:
    """The database file and what SQLite and dbkeeper keep beside it."""
    for suffix in ("", "-wal", "-shm", ".migrate.lock"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def run_sqlite(users: int, limit: float, locations: dict[str, Path]) -> dict[str, Outcome]:
    seed = OUT / f"migration-{users}-v2.db"
    remove_sqlite(seed)
    url = f"sqlite:///{seed}"
    upgrade(migrator_for(url, locations["today"]), "0002")
    fill(url, users)
    connection = sqlite3.connect(seed)
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()
    results = {}
    for variant, location in locations.items():
        copy = OUT / f"migration-{users}-{variant}.db"
        remove_sqlite(copy)
        shutil.copyfile(seed, copy)
        results[variant] = migrate_0003(f"sqlite:///{copy}", location, limit)
        remove_sqlite(copy)
    remove_sqlite(seed)
    return results


def run_postgres(users: int, limit: float, locations: dict[str, Path]) -> dict[str, Outcome]:
    results = {}
    with postgres_database() as seed:
        upgrade(migrator_for(seed, locations["today"]), "0002")
        fill(seed, users)
        template = make_url(seed).database
        for variant, location in locations.items():
            with postgres_database(template) as url:
                results[variant] = migrate_0003(url, location, limit)
    return results


# -- report --------------------------------------------------------------------------------------


def describe(outcome: Outcome) -> str:
    if outcome.finished:
        return f"{outcome.seconds:.2f} s"
    return f"> {outcome.seconds:.0f} s (stopped)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--sizes", default="2000,10000,200000", help="users per run")
    parser.add_argument("--limit", type=float, default=60.0, help="seconds for each run")
    args = parser.parse_args()
    logging.getLogger("dbkeeper").setLevel(logging.ERROR)  # the table is the output
    OUT.mkdir(exist_ok=True)
    locations = {variant: scripts(variant, OUT) for variant in ("first", "today")}
    sqlite_version = sqlite3.sqlite_version
    print(
        f"# {os.cpu_count()} CPUs, Python {platform.python_version()}, SQLite {sqlite_version}"
        f"; first version limited to {args.limit:g} s"
    )
    print("| engine | users | events | first version | today's | speed-up | same result |")
    print("|---|---:|---:|---:|---:|---:|---|")
    stops = []
    for engine in args.engines.split(","):
        for users in (int(size) for size in args.sizes.split(",")):
            run = run_sqlite if engine == "sqlite" else run_postgres
            results = run(users, args.limit, locations)
            first, today = results["first"], results["today"]
            speedup = first.seconds / today.seconds
            same = (
                "yes"
                if first.finished and first.fingerprint == today.fingerprint
                else ("DIFFERENT" if first.finished else "(first stopped)")
            )
            print(
                f"| {engine} | {users:,} | {users * EVENTS_PER_USER:,} | {describe(first)} | "
                f"{describe(today)} | {'>' if not first.finished else ''}{speedup:,.0f}x | "
                f"{same} |",
                flush=True,
            )
            for outcome in results.values():
                if outcome.stop_seconds is not None:
                    stops.append((engine, users, outcome.stop_seconds))
    for engine, users, seconds in stops:
        print(
            f"# {engine}, {users:,} users: interrupt -> revision rolled back and recorded in "
            f"{seconds * 1000:.0f} ms"
        )
    shutil.rmtree(OUT / "migration-backups", ignore_errors=True)
    for location in locations.values():
        shutil.rmtree(location, ignore_errors=True)


if __name__ == "__main__":
    main()
