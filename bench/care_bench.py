"""Database care's costs: timing the bot's statements, giving free space back, retention.

    python bench/care_bench.py [--rounds 21] [--handlers 300] [--size-mb 256] [--old-rows 200000]
                               [--postgres URL]

1. **Timing overhead.** A write-heavy handler loop, as the members feature runs on every update
   (``merge`` the user, ``merge`` the chat, ``add`` an event: five statements and a commit,
   through ``DatabaseService.run``), with and without ``[queries] track``. Rounds alternate
   (on-off, off-on, ...) so that both see the same machine; the figure is the median of the
   rounds' ratios. Target: at most 5 % slower. Also the hook's own cost per statement, alone.
2. **Giving free space back.** A SQLite database of ``--size-mb`` with half its pages free (the
   older half of ``events`` deleted) while a writer commits a row every 2 ms through the bot's
   service: plain ``VACUUM`` (a database made without auto_vacuum) against dbkeeper's steps of
   ``PRAGMA incremental_vacuum``; the longest a commit waited in each, and for comparison with
   nothing running.
3. **Retention.** ``--old-rows`` events older than the cutoff deleted by ``[retention]`` while
   the same writer commits: the longest write lock a batch held, and the writer's longest wait.

Everything it builds goes to ``bench/out/`` (git ignores it).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import threading
import time
import timeit
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from dbkeeper.config import Settings, settings_from_mapping  # noqa: E402
from dbkeeper.plugins.database.care import Care  # noqa: E402
from dbkeeper.plugins.database.care.queries import QueryStats  # noqa: E402
from dbkeeper.plugins.database.operations import Operations  # noqa: E402
from dbkeeper.plugins.members.models import Chat, Event, User  # noqa: E402

OUT = ROOT / "bench" / "out"


def settings_for(url: str, **sections: dict[str, Any]) -> Settings:
    raw: dict[str, dict[str, Any]] = {
        "database": {"url": url},
        "backup": {"dir": str(OUT / "care-backups"), "on_shutdown": False},
    }
    raw.update(sections)
    return settings_from_mapping(raw, environ={})


# -- 1. timing overhead ----------------------------------------------------------------------


async def handler_loop(ops: Operations, count: int, offset: int) -> float:
    """``count`` updates as the members feature records them; seconds taken."""
    started = time.perf_counter()
    for i in range(count):
        user = offset + i % 500 + 1
        now = datetime.now(UTC)

        def record(session: Session, user: int = user, now: datetime = now) -> None:
            session.merge(User(id=user, first_name="bench", last_seen_at=now))
            session.merge(Chat(id=user, type="private"))
            session.add(Event(chat_id=user, user_id=user, kind="command", payload="start"))

        await ops.database.run(record)
    return time.perf_counter() - started


async def overhead(url: str, rounds: int, handlers: int) -> dict[str, float]:
    settings = settings_for(url)
    ops = Operations(settings)
    await asyncio.to_thread(ops.open)
    stats = QueryStats(settings.queries)
    try:
        await handler_loop(ops, handlers, 0)  # warm: caches, pages, the first users
        ratios, on_times, off_times = [], [], []
        for number in range(rounds):
            timed: dict[bool, float] = {}
            for tracking in (True, False) if number % 2 == 0 else (False, True):
                if tracking:
                    stats.install(ops.database.engine)
                else:
                    stats.uninstall()
                timed[tracking] = await handler_loop(ops, handlers, 0)
            stats.uninstall()
            ratios.append(timed[True] / timed[False])
            on_times.append(timed[True] / handlers)
            off_times.append(timed[False] / handlers)
        per_handler = stats.statements / (handlers * (rounds))
    finally:
        await asyncio.to_thread(ops.close)
    return {
        "ratio": statistics.median(ratios),
        "ratio_p25": statistics.quantiles(ratios, n=4)[0],
        "ratio_p75": statistics.quantiles(ratios, n=4)[2],
        "on_ms": statistics.median(on_times) * 1000,
        "off_ms": statistics.median(off_times) * 1000,
        "statements_per_handler": per_handler,
    }


def hook_cost() -> float:
    """Microseconds of the two hooks and the bookkeeping for one statement, alone."""
    stats = QueryStats(settings_for("sqlite:///unused.db").queries)
    statement = "SELECT users.id, users.first_name FROM users WHERE users.id = ?"

    class Context:
        pass

    class Cursor:
        rowcount = -1

    context, cursor = Context(), Cursor()

    def one() -> None:
        stats._before(None, cursor, statement, (1,), context, False)
        stats._after(None, cursor, statement, (1,), context, False)

    one()
    runs = 200_000
    return min(timeit.repeat(one, number=runs, repeat=5)) / runs * 1e6


# -- a writer, as the bot --------------------------------------------------------------------


class Writer:
    """Commits one small row every 2 ms through the bot's service; records each wait."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops
        self.waits: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.ops.database.session() as session:
            session.execute(
                text("CREATE TABLE IF NOT EXISTS bench_writes (id INTEGER PRIMARY KEY, at REAL)")
            )
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                with self.ops.database.session() as session:
                    session.execute(
                        text("INSERT INTO bench_writes (at) VALUES (:at)"), {"at": started}
                    )
            except Exception:
                self.errors += 1
            self.waits.append(time.perf_counter() - started)
            time.sleep(0.002)

    def start(self) -> Writer:
        self._thread.start()
        while len(self.waits) < 20:
            time.sleep(0.01)
        self.waits.clear()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(30)
        return {
            "commits": len(self.waits),
            "longest_ms": max(self.waits) * 1000,
            "median_ms": statistics.median(self.waits) * 1000,
            "errors": self.errors,
        }


def while_writing(ops: Operations, work: Callable[[], Any]) -> tuple[Any, float, dict[str, float]]:
    writer = Writer(ops).start()
    started = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - started
    return result, seconds, writer.stop()


# -- 2. giving free space back -----------------------------------------------------------------


def build_half_free(path: Path, size_mb: int, incremental: bool) -> None:
    """``events`` of about ``size_mb``, then its older half deleted: half the pages free."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    connection = sqlite3.connect(path, isolation_level=None)
    if incremental:
        connection.execute("PRAGMA auto_vacuum = INCREMENTAL")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, payload TEXT)")
    rows = size_mb * 1_000_000 // 1100
    connection.execute("BEGIN")
    connection.executemany(
        "INSERT INTO events (payload) VALUES (?)", (("x" * 1000,) for _ in range(rows))
    )
    connection.execute("COMMIT")
    connection.execute(f"DELETE FROM events WHERE id <= {rows // 2}")
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()


def reclaim(size_mb: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for name, incremental in (("nothing running", True), ("VACUUM", False), ("incremental", True)):
        path = OUT / f"care-free-{'inc' if incremental else 'none'}.db"
        build_half_free(path, size_mb, incremental)
        before = path.stat().st_size
        settings = settings_for(f"sqlite:///{path}", migrations={"script_location": "none"})
        ops = Operations(settings)
        ops.open()
        care = Care(ops.database, ops.backups, settings)
        try:
            if name == "nothing running":
                _, seconds, writer = while_writing(ops, lambda: time.sleep(2.0))
                longest_step = 0.0
                steps = 0
            else:
                result, seconds, writer = while_writing(ops, care.maintenance.vacuum)
                longest_step, steps = result.longest_step_seconds, result.steps
        finally:
            care.dispose()
            ops.close()
        results[name] = {
            "before_mb": before / 1e6,
            "after_mb": path.stat().st_size / 1e6,
            "seconds": seconds,
            "steps": steps,
            "longest_step_ms": longest_step * 1000,
            **writer,
        }
    return results


# -- 3. retention ------------------------------------------------------------------------------


def retention(old_rows: int) -> dict[str, float]:
    path = OUT / "care-retention.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    url = f"sqlite:///{path}"
    settings = settings_for(url, retention={"events": {"column": "created_at", "keep_days": 30}})
    ops = Operations(settings)
    ops.open()
    old = (datetime.now(UTC) - timedelta(days=60)).strftime("%Y-%m-%d %H:%M:%S.%f")
    new = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("INSERT INTO chats (id, type) VALUES (1, 'group')")
    connection.execute("BEGIN")
    connection.executemany(
        "INSERT INTO events (chat_id, kind, payload, created_at) VALUES (1, 'message', ?, ?)",
        ((f"message {i}", old if i < old_rows else new) for i in range(old_rows + old_rows // 10)),
    )
    connection.execute("COMMIT")
    connection.close()
    care = Care(ops.database, ops.backups, settings)
    try:
        results, seconds, writer = while_writing(ops, care.retention.run)
    finally:
        care.dispose()
        ops.close()
    [events] = results
    return {
        "removed": events.removed,
        "batches": events.batches,
        "longest_lock_ms": events.longest_lock_seconds * 1000,
        "seconds": seconds,
        **writer,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--handlers", type=int, default=300)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--old-rows", type=int, default=200_000)
    parser.add_argument("--postgres", default="", help="also time the handler loop there")
    parser.add_argument("--only", choices=("overhead", "reclaim", "retention"), default=None)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}")

    if args.only in (None, "overhead"):
        print(f"hooks alone: {hook_cost():.2f} µs per statement")
        targets = [("SQLite", f"sqlite:///{OUT / 'care-overhead.db'}")]
        if args.postgres:
            targets.append(("PostgreSQL", args.postgres))
        for name, url in targets:
            if url.startswith("sqlite"):
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{OUT / 'care-overhead.db'}{suffix}").unlink(missing_ok=True)
            found = asyncio.run(overhead(url, args.rounds, args.handlers))
            print(
                f"{name}: handler {found['off_ms']:.3f} ms untracked, {found['on_ms']:.3f} ms "
                f"tracked ({found['statements_per_handler']:.1f} statements); ratio median "
                f"{found['ratio']:.3f} (quartiles {found['ratio_p25']:.3f}-"
                f"{found['ratio_p75']:.3f}) over {args.rounds} interleaved rounds of "
                f"{args.handlers} handlers"
            )

    if args.only in (None, "reclaim"):
        for name, found in reclaim(args.size_mb).items():
            print(
                f"{name:>16}: {found['before_mb']:.0f} MB -> {found['after_mb']:.0f} MB in "
                f"{found['seconds']:.2f}s ({found['steps']:.0f} steps, longest "
                f"{found['longest_step_ms']:.1f} ms); writer: {found['commits']:.0f} commits, "
                f"median {found['median_ms']:.2f} ms, longest {found['longest_ms']:.1f} ms, "
                f"{found['errors']:.0f} errors"
            )

    if args.only in (None, "retention"):
        found = retention(args.old_rows)
        print(
            f"retention: {found['removed']:,.0f} rows in {found['batches']:.0f} batches, "
            f"{found['seconds']:.2f}s; longest write lock {found['longest_lock_ms']:.1f} ms; "
            f"writer: {found['commits']:.0f} commits, median {found['median_ms']:.2f} ms, "
            f"longest {found['longest_ms']:.1f} ms, {found['errors']:.0f} errors"
        )


if __name__ == "__main__":
    main()
