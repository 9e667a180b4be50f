"""The ``schema_migrations`` table: one row per attempt to apply, revert or adopt a revision.

A row is written *before* each attempt (success NULL: "running") and committed on its own, so
an attempt whose process was killed stays visible. On success the row is completed inside the
revision's own transaction, atomic with Alembic's version bump; on failure it is completed in a
fresh transaction after the rollback, with the error and the attempt number.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from .bookkeeping import HISTORY_TABLE, bookkeeping_metadata, schema_migrations

INTERRUPTED = "interrupted: "  # how the error of an interrupted attempt begins


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; every time dbkeeper writes is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Attempt:
    """One row of ``schema_migrations``."""

    id: int
    version: str
    description: str
    direction: str
    attempt: int
    started_at: datetime
    finished_at: datetime | None
    execution_ms: int | None
    success: bool | None
    error: str | None
    checksum: str | None
    host: str
    pid: int

    @property
    def status(self) -> str:
        if self.success is None:
            return "running"
        if self.success:
            return "ok"
        return "interrupted" if (self.error or "").startswith(INTERRUPTED) else "failed"

    @classmethod
    def from_row(cls, row: Any) -> Attempt:
        values = dict(row._mapping)
        values["started_at"] = as_utc(values["started_at"])
        values["finished_at"] = as_utc(values["finished_at"])
        return cls(**values)


@dataclass(frozen=True)
class MigrationStats:
    applied: int  # successful upgrade attempts ever recorded
    failed: int  # failed attempts (errors and interrupted runs)
    last_applied_at: datetime | None
    total_ms: int  # time spent in successful upgrades


class MigrationHistory:
    """Reads and writes ``schema_migrations``; every method takes the connection to use."""

    table = schema_migrations

    def ensure_table(self, connection: Connection) -> None:
        bookkeeping_metadata.create_all(connection, checkfirst=True)

    def exists(self, connection: Connection) -> bool:
        return connection.dialect.has_table(connection, HISTORY_TABLE)

    def start(
        self,
        connection: Connection,
        *,
        version: str,
        description: str,
        direction: str,
        attempt: int,
        checksum: str | None,
        started_at: datetime | None = None,
    ) -> int:
        """Insert a "running" row (success NULL) for an attempt about to start."""
        result = connection.execute(
            insert(schema_migrations).values(
                version=version,
                description=description[:255],
                direction=direction,
                attempt=attempt,
                started_at=started_at or utcnow(),
                checksum=checksum,
                host=socket.gethostname()[:255],
                pid=os.getpid(),
            )
        )
        key = result.inserted_primary_key
        assert key is not None
        return int(key[0])

    def insert_failed(
        self,
        connection: Connection,
        *,
        version: str,
        description: str,
        direction: str,
        attempt: int,
        checksum: str | None,
        started_at: datetime,
        execution_ms: int,
        error: str,
    ) -> None:
        """Insert a complete row for a failed attempt whose "running" row could not be written."""
        attempt_id = self.start(
            connection,
            version=version,
            description=description,
            direction=direction,
            attempt=attempt,
            checksum=checksum,
            started_at=started_at,
        )
        self.finish(
            connection,
            attempt_id,
            success=False,
            execution_ms=execution_ms,
            error=error,
            finished_at=started_at + timedelta(milliseconds=execution_ms),
        )

    def finish(
        self,
        connection: Connection,
        attempt_id: int,
        *,
        success: bool,
        execution_ms: int,
        error: str | None = None,
        finished_at: datetime | None = None,
    ) -> None:
        connection.execute(
            update(schema_migrations)
            .where(schema_migrations.c.id == attempt_id)
            .values(
                finished_at=finished_at or utcnow(),
                execution_ms=execution_ms,
                success=success,
                error=error,
            )
        )

    def close_interrupted(self, connection: Connection) -> list[Attempt]:
        """Mark attempts left running by a process that died; call only while holding the lock."""
        rows = connection.execute(
            select(schema_migrations).where(schema_migrations.c.success.is_(None))
        ).all()
        stale = [Attempt.from_row(row) for row in rows]
        for attempt in stale:
            connection.execute(
                update(schema_migrations)
                .where(schema_migrations.c.id == attempt.id)
                .values(
                    success=False,
                    finished_at=utcnow(),
                    error=(
                        f"{INTERRUPTED}the process (pid {attempt.pid} on {attempt.host}) stopped "
                        "before the revision finished; its changes were rolled back"
                    ),
                )
            )
        return stale

    def attempts(self, connection: Connection, limit: int | None = None) -> list[Attempt]:
        """Newest first."""
        if not self.exists(connection):
            return []
        query = select(schema_migrations).order_by(schema_migrations.c.id.desc())
        if limit:
            query = query.limit(limit)
        return [Attempt.from_row(row) for row in connection.execute(query)]

    def applied_checksums(self, connection: Connection) -> dict[str, str]:
        """Checksum of each revision as of its latest successful upgrade or baseline."""
        if not self.exists(connection):
            return {}
        rows = connection.execute(
            select(schema_migrations.c.version, schema_migrations.c.checksum)
            .where(
                schema_migrations.c.success.is_(True),
                schema_migrations.c.direction.in_(("upgrade", "baseline")),
            )
            .order_by(schema_migrations.c.id)
        )
        return {version: checksum for version, checksum in rows if checksum}

    def stats(self, connection: Connection) -> MigrationStats:
        if not self.exists(connection):
            return MigrationStats(0, 0, None, 0)
        t = schema_migrations
        upgrades = t.c.direction == "upgrade"
        applied, last, total = connection.execute(
            select(
                func.count(),
                func.max(t.c.finished_at),
                func.coalesce(func.sum(t.c.execution_ms), 0),
            ).where(upgrades, t.c.success.is_(True))
        ).one()
        failed = connection.execute(
            select(func.count()).select_from(t).where(t.c.success.is_(False))
        ).scalar_one()
        return MigrationStats(int(applied), int(failed), as_utc(last), int(total))
