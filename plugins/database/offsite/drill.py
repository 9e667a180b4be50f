"""The restore drill: proof, on a schedule, that the replica restores. Blocking.

The replica's newest state is restored into a scratch file beside the database (the same disk a
real restore would need), proven sound like any backup (SQLite's integrity check, the rows of
every table), and its row counts compared with the live database's. The live database keeps
changing meanwhile, so it is counted just before the restore (after asking Litestream to upload
everything committed so far) and just after: a replica count between the two is right. The
result is kept in ``drill.json`` in the replication directory, so a drill that failed is still
reported after a restart, and the schedule survives restarts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from dbkeeper.texts import counted

from ..backup.engines.base import BackupEngine, Limits, no_progress
from ..errors import DatabaseError
from ..locks import open_private
from ..migrate.bookkeeping import REPLICATION_TABLES
from .litestream import ensure_private_dir, runtime_dir, write_private
from .replica import Replica

log = logging.getLogger("dbkeeper.replication")
RECORD_NAME = "drill.json"


@dataclass(frozen=True)
class DrillResult:
    at: datetime
    ok: bool
    seconds: float
    problem: str | None = None
    position: str | None = None  # what was restored (``Position.describe``)
    tables: int = 0
    rows: int = 0

    def describe(self) -> str:
        if self.ok:
            return (
                f"restore drill ok at {self.at:%Y-%m-%d %H:%M} UTC: "
                f"{counted(self.tables, 'table')}, {counted(self.rows, 'row')}, "
                f"restored in {self.seconds:.1f}s"
            )
        return (
            f"restore drill FAILED at {self.at:%Y-%m-%d %H:%M} UTC, a restore from the replica "
            f"would fail or lose data now: {(self.problem or '').rstrip('.')}"
        )

    def to_json(self) -> str:
        data = asdict(self)
        data["at"] = self.at.isoformat()
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> DrillResult:
        data = json.loads(text)
        data["at"] = datetime.fromisoformat(data["at"])
        return cls(**data)


def record_path(database: Path) -> Path:
    return runtime_dir(database.resolve()) / RECORD_NAME


def last_drill(database: Path) -> DrillResult | None:
    """The last drill's result, if one ran (and its record reads)."""
    path = record_path(database)
    try:
        fd = open_private(path, create=False)
    except (FileNotFoundError, DatabaseError, OSError):
        return None
    try:
        with os.fdopen(fd, "r") as handle:
            return DrillResult.from_json(handle.read(65536))
    except (ValueError, TypeError, KeyError):
        return None


def live_counts(database: Path, busy_timeout: float) -> dict[str, int]:
    """Rows per table of the live database, in one read transaction (creates nothing)."""
    uri = f"file:{quote(str(database.resolve()))}?mode=ro"
    connection = sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None)
    try:
        connection.execute("BEGIN")
        names = [
            row[0]
            for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
            if row[0] not in REPLICATION_TABLES
        ]
        counts = {
            name: connection.execute(
                f'SELECT count(*) FROM "{name.replace(chr(34), chr(34) * 2)}"'
            ).fetchone()[0]
            for name in names
        }
        connection.execute("COMMIT")
        return counts
    finally:
        connection.close()


def compare(
    replica: dict[str, int | None], before: dict[str, int], after: dict[str, int]
) -> list[str]:
    """What the replica lacks, against the live counts before and after its restore."""
    problems = []
    for table in sorted(set(before) & set(after)):
        if table not in replica:
            problems.append(f"table {table} is missing")
            continue
        count = replica[table]
        low, high = sorted((before[table], after[table]))
        if count is not None and not low <= count <= high:
            live = f"{low:,}" if low == high else f"{low:,}-{high:,}"
            problems.append(f"{table} has {count:,} rows, the live database {live}")
    return problems


def run_drill(
    replica: Replica,
    engine: BackupEngine,
    database: Path,
    *,
    busy_timeout: float,
    limits: Limits,
    sync: Callable[[Limits], None] | None = None,
) -> DrillResult:
    """Restore the replica into a scratch file, check it, compare it; record the result."""
    started = time.monotonic()
    at = datetime.now(UTC)
    directory = ensure_private_dir(runtime_dir(database.resolve()))
    scratch = directory / f"drill-{os.getpid()}-{secrets.token_hex(4)}.db"
    try:
        before = live_counts(database, busy_timeout)
        if sync is not None:
            sync(limits)  # everything counted so far is on the replica
        position = replica.restore_into(scratch, None, limits)
        facts = engine.check(scratch, no_progress, limits)
        after = live_counts(database, busy_timeout)
        tables = {k: v for k, v in facts.tables.items() if k not in REPLICATION_TABLES}
        problems = compare(tables, before, after)
        result = DrillResult(
            at,
            not problems,
            round(time.monotonic() - started, 3),
            "the restored replica differs from the live database: " + "; ".join(problems[:5])
            if problems
            else None,
            position.describe(),
            len(tables),
            sum(count or 0 for count in tables.values()),
        )
    except (DatabaseError, OSError, sqlite3.Error) as error:
        result = DrillResult(at, False, round(time.monotonic() - started, 3), str(error))
    finally:
        for path in (scratch, scratch.with_name(scratch.name + ".tmp")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    with contextlib.suppress(OSError, DatabaseError):
        write_private(record_path(database), result.to_json())
    (log.info if result.ok else log.error)("%s", result.describe())
    return result
