"""Schema migrations with Alembic as the engine, one revision at a time, every attempt recorded.

The shape follows the suggestion of our migration research: take a lock that one process holds
at a time, then call ``alembic.command.upgrade`` once per pending revision inside a transaction
of our own. That gives each revision its duration, its own history row, retries of transient
errors, and all-or-nothing application (a killed process leaves the previous version).

Alembic's ``command`` module keeps its state in module globals, so within a process only one
thread may change a schema at a time (``_SCHEMA_CHANGES``, held around the cross-process lock).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TypedDict

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from dbkeeper import migrations
from dbkeeper.config import MigrationSettings
from sqlalchemy import Connection, Engine, MetaData, inspect

from .engine import SQLITE_BEGIN, create_database_engine
from .errors import (
    MigrationError,
    SchemaTooNew,
    UnmanagedDatabase,
    describe_error,
    is_transient,
)
from .history import HISTORY_TABLE, Attempt, MigrationHistory, MigrationStats, utcnow
from .locks import AdvisoryLock, FileLock, NoLock, SchemaLock, acquire
from .models import metadata as bot_metadata
from .schema_diff import describe_diffs
from .service import DatabaseService

log = logging.getLogger("dbkeeper.migrations")
_SCHEMA_CHANGES = threading.Lock()
BOOKKEEPING_TABLES = {HISTORY_TABLE, "alembic_version"}
DEFAULT_SCRIPT_LOCATION = Path(migrations.__file__).parent


@dataclass(frozen=True)
class Revision:
    id: str
    version: int
    description: str
    down_revision: str | None
    path: Path
    checksum: str

    @property
    def label(self) -> str:
        return f"{self.id} ({self.description})" if self.description else self.id


@dataclass(frozen=True)
class MigrationStatus:
    current: str | None
    current_version: int
    head: str | None
    head_version: int
    pending: tuple[Revision, ...]

    @property
    def at_head(self) -> bool:
        return not self.pending and self.current == self.head


@dataclass(frozen=True)
class AppliedStep:
    revision: Revision
    direction: str
    duration_ms: int
    attempts: int


@dataclass
class MigrationReport:
    from_version: int
    to_version: int
    steps: list[AppliedStep] = field(default_factory=list)
    interrupted: list[Attempt] = field(default_factory=list)

    @property
    def total_ms(self) -> int:
        return sum(step.duration_ms for step in self.steps)


@dataclass
class ValidationReport:
    missing_tables: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)
    changed_revisions: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Missing critical tables are fatal; drift and changed files are warnings."""
        return not self.missing_tables

    def problems(self) -> list[str]:
        lines = [f"critical table missing: {name}" for name in self.missing_tables]
        lines += [f"schema drift: {line}" for line in self.drift]
        lines += self.changed_revisions
        return lines


BeforeApply = Callable[[Sequence[Revision]], None]


class Migrator:
    """Applies, reverts and inspects the schema of one database."""

    def __init__(
        self,
        database: DatabaseService,
        settings: MigrationSettings,
        *,
        metadata: MetaData | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.database = database
        self.settings = settings
        self.metadata = metadata if metadata is not None else bot_metadata
        self.script_location = Path(settings.script_location or DEFAULT_SCRIPT_LOCATION)
        self.history = MigrationHistory()
        self._sleep = sleep
        self._script: ScriptDirectory | None = None
        self._migration_engine: Engine | None = None

    # -- revisions on disk -------------------------------------------------------------------

    @property
    def script(self) -> ScriptDirectory:
        if self._script is None:
            self._script = ScriptDirectory.from_config(self._config())
        return self._script

    def revisions(self) -> list[Revision]:
        """All revisions, oldest first."""
        scripts = list(reversed(list(self.script.walk_revisions("base", "heads"))))
        heads = self.script.get_heads()
        if len(heads) > 1:
            raise MigrationError(
                f"the migrations in {self.script_location} have {len(heads)} heads "
                f"({', '.join(heads)}); dbkeeper needs one line of revisions. Merge them with "
                "`alembic merge heads`."
            )
        return [self._revision(script, index) for index, script in enumerate(scripts, 1)]

    def revision(self, spec: str) -> Revision | None:
        """Find a revision by id ("0002"), number ("2", "v2"), "head", or "base" (None)."""
        if spec in ("base", "0", "v0"):
            return None
        revisions = self.revisions()
        if spec == "head" and revisions:
            return revisions[-1]
        wanted = spec[1:] if spec[:1] in ("v", "V") and spec[1:].isdigit() else spec
        for revision in revisions:
            if revision.id == wanted or (wanted.isdigit() and revision.version == int(wanted)):
                return revision
        raise MigrationError(
            f"no revision {spec!r} in {self.script_location}; `dbkeeper db history` lists them"
        )

    def _revision(self, script: Script, position: int) -> Revision:
        path = Path(script.path)
        down = script.down_revision
        if isinstance(down, tuple):
            down = down[0] if down else None
        return Revision(
            id=script.revision,
            version=int(script.revision) if script.revision.isdigit() else position,
            description=(script.doc or "").strip().splitlines()[0] if script.doc else "",
            down_revision=down,
            path=path,
            checksum=hashlib.sha256(path.read_bytes()).hexdigest(),
        )

    def _config(self, connection: Connection | None = None) -> Config:
        config = Config()
        config.set_main_option("script_location", str(self.script_location).replace("%", "%%"))
        config.attributes["target_metadata"] = self.metadata
        if connection is not None:
            config.attributes["connection"] = connection
        return config

    # -- state of the database ----------------------------------------------------------------

    def current(self, connection: Connection | None = None) -> str | None:
        """The revision the database is at; None when it has no version yet."""
        with self._reading(connection) as conn:
            heads = MigrationContext.configure(conn).get_current_heads()
        if len(heads) > 1:
            raise MigrationError(f"the database has several current revisions: {heads}")
        return heads[0] if heads else None

    def status(self, connection: Connection | None = None) -> MigrationStatus:
        revisions = self.revisions()
        current = self.current(connection)
        known = {r.id: r for r in revisions}
        self._check_known(current, known, revisions)
        ids = [r.id for r in revisions]
        done = ids.index(current) + 1 if current else 0
        head = revisions[-1] if revisions else None
        return MigrationStatus(
            current=current,
            current_version=known[current].version if current else 0,
            head=head.id if head else None,
            head_version=head.version if head else 0,
            pending=tuple(revisions[done:]),
        )

    def current_version(self) -> int:
        return self.status().current_version

    def pending(self) -> list[Revision]:
        return list(self.status().pending)

    def stats(self) -> MigrationStats:
        with self._reading() as conn:
            return self.history.stats(conn)

    def attempts(self, limit: int | None = None) -> list[Attempt]:
        with self._reading() as conn:
            return self.history.attempts(conn, limit)

    def _check_known(
        self, current: str | None, known: dict[str, Revision], revisions: list[Revision]
    ) -> None:
        if current is None or current in known:
            return
        head = revisions[-1] if revisions else None
        head_text = f"v{head.version} ({head.id})" if head else "no revisions"
        newer = current.isdigit() and (head is None or int(current) > head.version)
        if newer:
            raise SchemaTooNew(
                f"the database is at schema v{int(current)} ({current}), newer than this code "
                f"knows (its head is {head_text}): newer code has migrated it. Refusing to run "
                "on a schema this version does not understand; deploy the newer code, or "
                "restore a backup taken before that upgrade."
            )
        raise SchemaTooNew(
            f"the database is at revision {current!r}, which is not among the revisions in "
            f"{self.script_location} (head {head_text}). Refusing to run on an unknown schema."
        )

    # -- changing the schema ------------------------------------------------------------------

    def upgrade(
        self, target: str = "head", *, before_apply: BeforeApply | None = None
    ) -> MigrationReport:
        """Apply pending revisions up to ``target``, one transaction each.

        ``before_apply`` is called with the pending revisions (under the lock, once, only when
        the database already has a version): the place for a pre-migration backup.
        """
        with self._locked() as engine:
            interrupted = self._close_interrupted(engine)
            status = self.status()
            pending = list(status.pending)
            if target != "head":
                goal = self.revision(target)
                ids = [r.id for r in pending]
                reached = goal is None or goal.id not in ids
                pending = [] if reached else pending[: ids.index(goal.id) + 1]
            report = MigrationReport(status.current_version, status.current_version)
            report.interrupted = interrupted
            if not pending:
                log.info(
                    "schema is at v%d%s; nothing to apply",
                    status.current_version,
                    " (head)" if status.at_head else "",
                )
                return report
            if status.current is None:
                self._refuse_unmanaged(engine)
            if before_apply is not None and status.current is not None:
                before_apply(pending)
            log.info(
                "applying %d revision%s: v%d -> v%d (%s)",
                len(pending),
                "s" if len(pending) > 1 else "",
                status.current_version,
                pending[-1].version,
                ", ".join(r.id for r in pending),
            )
            for revision in pending:
                report.steps.append(self._apply(engine, revision, "upgrade"))
                report.to_version = revision.version
            log.info(
                "schema is at v%d after %d revision%s in %d ms",
                report.to_version,
                len(report.steps),
                "s" if len(report.steps) > 1 else "",
                report.total_ms,
            )
            return report

    def downgrade(self, target: str) -> MigrationReport:
        """Revert revisions down to ``target`` (a revision, a number, "-1" or "base")."""
        with self._locked() as engine:
            self._close_interrupted(engine)
            status = self.status()
            revisions = self.revisions()
            applied = revisions[: len(revisions) - len(status.pending)]
            if target.startswith("-") and target[1:].isdigit():
                keep = max(0, len(applied) - int(target[1:]))
            else:
                goal = self.revision(target)
                keep = 0 if goal is None else [r.id for r in revisions].index(goal.id) + 1
                if keep > len(applied):
                    raise MigrationError(
                        f"the database is at v{status.current_version}; {target} is newer. "
                        "Use `dbkeeper db migrate` to go forward."
                    )
            report = MigrationReport(status.current_version, status.current_version)
            for revision in reversed(applied[keep:]):
                report.steps.append(self._apply(engine, revision, "downgrade"))
                report.to_version = self._version_below(revision, revisions)
            if not report.steps:
                log.info("schema is already at v%d; nothing to revert", status.current_version)
            return report

    def baseline(self, target: str) -> Revision:
        """Adopt a database created outside dbkeeper: record it as being at ``target``."""
        revision = self.revision(target)
        if revision is None:
            raise MigrationError("baseline needs a revision such as 0001 or head, not base")
        with self._locked() as engine:
            current = self.current()
            if current is not None:
                raise MigrationError(
                    f"the database is already managed (at {current}); baseline is only for "
                    "databases without a migration history. Use db migrate or db downgrade."
                )
            started = time.monotonic()
            with self._transaction(engine) as conn:
                attempt_id = self.history.start(
                    conn, direction="baseline", attempt=1, **_row_fields(revision)
                )
                command.stamp(self._config(conn), revision.id)
                self.history.finish(conn, attempt_id, success=True, execution_ms=_ms_since(started))
            log.info("adopted the database at v%d (%s)", revision.version, revision.label)
            return revision

    def _apply(self, engine: Engine, revision: Revision, direction: str) -> AppliedStep:
        """Run one revision up or down, retrying transient errors; raise on anything else.

        Each attempt first commits a "running" row, then runs the revision in a transaction of
        its own that also completes the row. When even the first write is blocked (another
        writer holds SQLite's lock), the failed attempt is written at the next chance instead.
        """
        attempts = self.settings.retries
        verb = "applying" if direction == "upgrade" else "reverting"
        unrecorded: list[FailedAttempt] = []
        for attempt in range(1, attempts + 1):
            started_at, started = utcnow(), time.monotonic()
            attempt_id: int | None = None
            try:
                with self._transaction(engine) as conn:
                    for failure in unrecorded:
                        self.history.insert_failed(conn, **failure)
                    attempt_id = self.history.start(
                        conn,
                        direction=direction,
                        attempt=attempt,
                        started_at=started_at,
                        **_row_fields(revision),
                    )
                unrecorded.clear()
                with self._transaction(engine, immediate=True) as conn:
                    config = self._config(conn)
                    if direction == "upgrade":
                        command.upgrade(config, revision.id)
                    else:
                        command.downgrade(config, revision.down_revision or "base")
                    self._check_foreign_keys(conn)
                    self.history.finish(
                        conn, attempt_id, success=True, execution_ms=_ms_since(started)
                    )
            except Exception as error:
                elapsed, reason = _ms_since(started), describe_error(error)
                transient = is_transient(error)
                retrying = transient and attempt < attempts
                if retrying:
                    log.warning(
                        "%s revision %s failed (attempt %d of %d, transient): %s; "
                        "retrying in %.1fs",
                        verb,
                        revision.id,
                        attempt,
                        attempts,
                        reason,
                        self._backoff(attempt),
                    )
                failure = FailedAttempt(
                    direction=direction,
                    attempt=attempt,
                    started_at=started_at,
                    execution_ms=elapsed,
                    error=reason,
                    **_row_fields(revision),
                )
                if not self._record_failure(engine, attempt_id, failure):
                    unrecorded.append(failure)
                if not transient:
                    raise MigrationError(
                        f"{verb} revision {revision.label} failed: {reason}. The change was "
                        "rolled back and the database stays at the version before it; fix the "
                        "revision and start again (`dbkeeper db history` shows every attempt)."
                    ) from error
                if not retrying:
                    raise MigrationError(
                        f"{verb} revision {revision.label} still failed after {attempts} "
                        f"attempts: {reason}. The database stays at the version before it; "
                        "start again once the database is free."
                    ) from error
                self._sleep(self._backoff(attempt))
                continue
            log.info(
                "%s %s in %d ms%s",
                "applied" if direction == "upgrade" else "reverted",
                revision.label,
                elapsed_ms := _ms_since(started),
                f" (attempt {attempt})" if attempt > 1 else "",
            )
            return AppliedStep(revision, direction, elapsed_ms, attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _record_failure(
        self, engine: Engine, attempt_id: int | None, failure: FailedAttempt
    ) -> bool:
        """Write a failed attempt on a fresh transaction, after the rollback; False if blocked."""
        try:
            with self._transaction(engine) as conn:
                if attempt_id is None:
                    self.history.insert_failed(conn, **failure)
                else:
                    self.history.finish(
                        conn,
                        attempt_id,
                        success=False,
                        execution_ms=failure["execution_ms"],
                        error=failure["error"],
                    )
            return True
        except Exception as error:
            log.warning(
                "could not record the failed attempt yet (%s); it is written at the next chance",
                describe_error(error),
            )
            return False

    def _check_foreign_keys(self, conn: Connection) -> None:
        """SQLite migrations run with foreign keys off; refuse to commit rows that break them."""
        if conn.dialect.name != "sqlite":
            return
        problems = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
        if problems:
            sample = ", ".join(
                f"{t} row {rowid} -> {parent}" for t, rowid, parent, _ in problems[:5]
            )
            raise MigrationError(f"the revision left {len(problems)} broken foreign keys: {sample}")

    def _close_interrupted(self, engine: Engine) -> list[Attempt]:
        with self._transaction(engine) as conn:
            self.history.ensure_table(conn)
            stale = self.history.close_interrupted(conn)
        for attempt in stale:
            log.warning(
                "an earlier attempt to %s %s (pid %d on %s, started %s) was interrupted; "
                "its changes were rolled back",
                "apply" if attempt.direction == "upgrade" else "revert",
                attempt.version,
                attempt.pid,
                attempt.host,
                f"{attempt.started_at:%Y-%m-%d %H:%M:%S} UTC",
            )
        return stale

    def _refuse_unmanaged(self, engine: Engine) -> None:
        with engine.connect() as conn:
            tables = sorted(set(inspect(conn).get_table_names()) - BOOKKEEPING_TABLES)
        if not tables:
            return
        declared = set(self.metadata.tables)
        suggestion = (
            "`dbkeeper db baseline head` (its tables match the current schema)"
            if declared and declared <= set(tables)
            else "`dbkeeper db baseline REV` with the revision its schema matches"
        )
        shown = ", ".join(tables[:8]) + (", ..." if len(tables) > 8 else "")
        raise UnmanagedDatabase(
            f"the database already has {len(tables)} table{'s' if len(tables) > 1 else ''} "
            f"({shown}) but no migration history: it was created before dbkeeper managed it. "
            f"Nothing was changed. Adopt it with {suggestion}, then start again; "
            "`dbkeeper db status` lists the revisions."
        )

    def _backoff(self, attempt: int) -> float:
        delays = self.database.settings.retry_backoff_seconds
        return float(delays[min(attempt - 1, len(delays) - 1)])

    @staticmethod
    def _version_below(revision: Revision, revisions: list[Revision]) -> int:
        by_id = {r.id: r for r in revisions}
        below = by_id.get(revision.down_revision or "")
        return below.version if below else 0

    # -- validation ---------------------------------------------------------------------------

    def validate(self) -> ValidationReport:
        """Critical tables present, live schema as declared, applied revision files unchanged."""
        report = ValidationReport()
        with self._reading() as conn:
            live = set(inspect(conn).get_table_names())
            critical = self.settings.critical_tables or tuple(sorted(self.metadata.tables))
            report.missing_tables = [name for name in critical if name not in live]
            context = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    "include_object": lambda obj, name, type_, *_: (
                        not (type_ == "table" and name in BOOKKEEPING_TABLES)
                    ),
                },
            )
            report.drift = describe_diffs(compare_metadata(context, self.metadata))
            applied = self.history.applied_checksums(conn)
        for revision in self.revisions():
            recorded = applied.get(revision.id)
            if recorded and recorded != revision.checksum:
                report.changed_revisions.append(
                    f"revision {revision.id} changed since it was applied "
                    f"(sha256 {recorded[:12]} then, {revision.checksum[:12]} now); a database "
                    "built from scratch may differ from this one"
                )
        return report

    # -- plumbing -----------------------------------------------------------------------------

    def _engine(self) -> Engine:
        if self._migration_engine is None:
            self._migration_engine = create_database_engine(
                self.database.settings, purpose="migrations"
            )
        return self._migration_engine

    def close(self) -> None:
        if self._migration_engine is not None:
            self._migration_engine.dispose()
            self._migration_engine = None

    @contextlib.contextmanager
    def _reading(self, connection: Connection | None = None) -> Iterator[Connection]:
        if connection is not None:
            yield connection
            return
        engine = self.database.engine if self.database.connected else self._engine()
        with engine.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def _transaction(self, engine: Engine, *, immediate: bool = False) -> Iterator[Connection]:
        with engine.connect() as conn:
            if immediate and conn.dialect.name == "sqlite":
                conn = conn.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
            with conn.begin():
                yield conn

    def _lock(self, engine: Engine) -> SchemaLock:
        if self.database.dialect == "postgresql":
            return AdvisoryLock(engine)
        if self.database.file is None:
            return NoLock()  # in-memory: private to this process, which _SCHEMA_CHANGES covers
        return FileLock(self.database.file.with_name(self.database.file.name + ".migrate.lock"))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Engine]:
        """Hold the schema lock (this process's thread lock, then the cross-process lock)."""
        engine = self._engine()
        with _SCHEMA_CHANGES:
            lock = self._lock(engine)
            acquire(
                lock,
                timeout=self.settings.lock_timeout_seconds,
                on_wait=lambda holder: log.info(
                    "another process is migrating this database (%s); waiting for it", holder
                ),
            )
            try:
                yield engine
            finally:
                lock.release()


class FailedAttempt(TypedDict):
    version: str
    description: str
    checksum: str
    direction: str
    attempt: int
    started_at: datetime
    execution_ms: int
    error: str


def _row_fields(revision: Revision) -> dict[str, str]:
    return {
        "version": revision.id,
        "description": revision.description,
        "checksum": revision.checksum,
    }


def _ms_since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
