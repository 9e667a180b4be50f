"""The migrator on real databases (a SQLite file and a PostgreSQL database) with real revisions."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, inspect, text

from dbkeeper.config import Settings
from dbkeeper.plugins.database.engines import SQLITE_BEGIN
from dbkeeper.plugins.database.errors import (
    MigrationError,
    MigrationInterrupted,
    SchemaTooNew,
    UnmanagedDatabase,
)
from dbkeeper.plugins.database.migrate.migrator import MigrationReport, Migrator
from dbkeeper.plugins.database.migrate.revisions import Revision, Revisions, resolve_location
from dbkeeper.plugins.database.operations import Operations
from dbkeeper.plugins.database.service import DatabaseService
from dbkeeper.plugins.members.models import metadata
from tests.conftest import SettingsFactory
from tests.support.revisions import ADD_NOTES, BROKEN, FOREVER, LONG, add_revision

HEAD_TABLES = {"users", "chats", "chat_settings", "events"}
REPO = Path(__file__).resolve().parent.parent
# The first version of revision 0003 (a subquery per user), as databases may have applied it.
USER_ACTIVITY_V1 = REPO / "bench" / "revisions" / "0003_user_activity_v1.py"


class Steps:
    """The migrator's changes as ``Operations`` drives them, without the safety backups."""

    def __init__(self, migrator: Migrator) -> None:
        self.migrator = migrator

    def __getattr__(self, name: str) -> Any:
        return getattr(self.migrator, name)

    def upgrade(self, target: str = "head") -> MigrationReport:
        with self.migrator.locked() as schema:
            return schema.migrate(target)

    def downgrade(self, target: str) -> MigrationReport:
        with self.migrator.locked() as schema:
            schema.close_interrupted()
            return schema.downgrade(target)

    def baseline(self, target: str) -> Revision:
        revision = self.migrator.revisions.find(target)
        assert revision is not None
        with self.migrator.locked() as schema:
            schema.baseline(revision)
        return revision


def make_migrator(settings: Settings, **kwargs: Any) -> Steps:
    revisions = Revisions(resolve_location(settings.migrations.script_location))
    return Steps(
        Migrator(settings.database, settings.migrations, revisions, metadata=metadata, **kwargs)
    )


class Opened:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database = DatabaseService(settings.database)
        self.database.connect()
        self.sleeps: list[float] = []
        self.migrator = make_migrator(settings, sleep=self.sleeps.append)

    def rows(self, sql: str) -> list[tuple]:
        with self.database.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql))]

    def tables(self) -> set[str]:
        with self.database.engine.connect() as connection:
            return set(inspect(connection).get_table_names())

    def close(self) -> None:
        self.migrator.close()
        self.database.close()


@pytest.fixture
def opened(database_url: str, make_settings: SettingsFactory, scripts_dir: Path) -> Iterator:
    """Open a migrator on the test database, with migrations from a private copy."""
    instances: list[Opened] = []

    def open_(**sections: dict) -> Opened:
        sections.setdefault("migrations", {}).setdefault("script_location", str(scripts_dir))
        instance = Opened(make_settings(database_url, **sections))
        instances.append(instance)
        return instance

    yield open_
    for instance in instances:
        instance.close()


def test_fresh_database_reaches_head_with_one_history_row_per_revision(opened) -> None:
    db = opened()
    report = db.migrator.upgrade()
    assert [step.revision.id for step in report.steps] == ["0001", "0002", "0003"]
    assert (report.from_version, report.to_version) == (0, 3)
    assert db.tables() >= HEAD_TABLES
    status = db.migrator.status()
    assert status.at_head and status.current == "0003" and status.current_version == 3
    rows = db.rows(
        "SELECT version, direction, attempt, success, error, execution_ms, checksum, host, pid, "
        "started_at, finished_at FROM schema_migrations ORDER BY id"
    )
    assert [(r[0], r[1], r[2], bool(r[3]), r[4]) for r in rows] == [
        ("0001", "upgrade", 1, True, None),
        ("0002", "upgrade", 1, True, None),
        ("0003", "upgrade", 1, True, None),
    ]
    for row in rows:
        assert row[5] >= 0 and len(row[6]) == 64 and row[7] and row[8] > 0
        assert row[9] is not None and row[10] is not None
    report = db.migrator.validate()
    assert report.ok and report.drift == [] and report.changed_revisions == []
    stats = db.migrator.stats()
    assert (stats.applied, stats.failed) == (3, 0) and stats.last_applied_at is not None


def test_progress_is_logged_one_line_per_revision(opened, caplog) -> None:
    db = opened()
    with caplog.at_level(logging.INFO, logger="dbkeeper.migrations"):
        db.migrator.upgrade()
    applied = [r.getMessage() for r in caplog.records if r.getMessage().startswith("applied ")]
    assert len(applied) == 3
    assert applied[0].startswith("applied 0001 (users and chats) in ") and applied[0].endswith("ms")


def test_old_database_with_data_is_upgraded_to_head(opened) -> None:
    db = opened()
    db.migrator.upgrade("0002")
    assert db.migrator.status().current == "0002"
    with db.database.connection() as connection:
        connection.execute(text("INSERT INTO users (id, first_name) VALUES (1, 'Ann'), (2, 'Bo')"))
        connection.execute(text("INSERT INTO chats (id, type) VALUES (1, 'private')"))
        connection.execute(
            text(
                "INSERT INTO events (chat_id, user_id, kind, created_at) VALUES "
                "(1, 1, 'command', '2026-01-01 10:00:00'), (1, 1, 'command', '2026-02-01 10:00:00')"
            )
        )
    report = db.migrator.upgrade()
    assert [s.revision.id for s in report.steps] == ["0003"]
    rows = db.rows("SELECT id, first_name, is_blocked, last_seen_at FROM users ORDER BY id")
    assert [(r[0], r[1], bool(r[2])) for r in rows] == [(1, "Ann", False), (2, "Bo", False)]
    assert str(rows[0][3]).startswith("2026-02-01") and rows[1][3] is None  # backfilled
    assert db.rows("SELECT count(*) FROM events") == [(2,)]


def test_downgrade_and_upgrade_again(opened) -> None:
    db = opened()
    db.migrator.upgrade()
    report = db.migrator.downgrade("-1")
    assert [s.revision.id for s in report.steps] == ["0003"] and report.to_version == 2
    columns = {c["name"] for c in inspect(db.database.engine).get_columns("users")}
    assert "last_seen_at" not in columns
    db.migrator.downgrade("base")
    assert db.tables() & HEAD_TABLES == set()
    assert db.migrator.status().current is None
    db.migrator.upgrade()
    assert db.migrator.status().at_head and db.migrator.validate().drift == []
    directions = [r[0] for r in db.rows("SELECT direction FROM schema_migrations ORDER BY id")]
    assert directions == ["upgrade"] * 3 + ["downgrade"] * 3 + ["upgrade"] * 3


def test_broken_revision_fails_at_once_is_recorded_and_rolled_back(opened, scripts_dir) -> None:
    db = opened()
    db.migrator.upgrade()
    add_revision(scripts_dir, BROKEN, doc="broken")
    db.migrator = make_migrator(db.settings, sleep=db.sleeps.append)
    with pytest.raises(MigrationError) as caught:
        db.migrator.upgrade()
    message = str(caught.value)
    assert "applying revision 0004 (broken) failed" in message
    assert "no_such_table" in message and "stays at the version before it" in message
    assert db.sleeps == []  # a SQL error is permanent: no retries
    assert db.migrator.status().current == "0003"
    assert "notes" not in db.tables()  # the revision's DDL was rolled back with it
    assert db.rows("SELECT count(*) FROM chats WHERE id = 777") == [(0,)]
    failed = db.rows(
        "SELECT version, attempt, success, error, finished_at FROM schema_migrations "
        "WHERE version = '0004'"
    )
    assert len(failed) == 1
    version, attempt, success, error, finished = failed[0]
    assert (version, attempt, bool(success)) == ("0004", 1, False)
    assert "no_such_table" in error and finished is not None
    assert db.migrator.stats().failed == 1


def test_transient_lock_is_retried_with_backoff(
    sqlite_url: str, make_settings: SettingsFactory, scripts_dir: Path, caplog
) -> None:
    """Another connection holds the write lock past the busy timeout: attempt 2 succeeds."""
    settings = make_settings(
        sqlite_url,
        database={"busy_timeout_ms": 100, "retry_backoff_seconds": [0.05]},
        migrations={"script_location": str(scripts_dir), "retries": 3},
    )
    db = Opened(settings)
    try:
        db.migrator.upgrade("0002")
        blocker = _hold_write_lock(db.database)

        released = threading.Event()

        class ReleaseOnRetry(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "transient" in record.getMessage() and not released.is_set():
                    blocker.rollback()
                    blocker.close()
                    released.set()

        handler = ReleaseOnRetry()
        logging.getLogger("dbkeeper.migrations").addHandler(handler)
        try:
            report = db.migrator.upgrade()
        finally:
            logging.getLogger("dbkeeper.migrations").removeHandler(handler)
        assert released.is_set()
        assert report.steps[0].attempts == 2 and db.sleeps == [0.05]
        rows = db.rows(
            "SELECT attempt, success, error FROM schema_migrations WHERE version = '0003' "
            "ORDER BY id"
        )
        assert [(a, bool(s)) for a, s, _ in rows] == [(1, False), (2, True)]
        assert "database is locked" in rows[0][2]
    finally:
        db.close()


def test_transient_errors_give_up_after_the_configured_retries(
    sqlite_url: str, make_settings: SettingsFactory, scripts_dir: Path
) -> None:
    settings = make_settings(
        sqlite_url,
        database={"busy_timeout_ms": 50, "retry_backoff_seconds": [0.01, 0.02]},
        migrations={"script_location": str(scripts_dir), "retries": 3},
    )
    db = Opened(settings)
    try:
        db.migrator.upgrade("0002")
        blocker = _hold_write_lock(db.database)
        try:
            with pytest.raises(MigrationError, match="still failed after 3 attempts"):
                db.migrator.upgrade()
        finally:
            blocker.rollback()
            blocker.close()
        assert db.sleeps == [0.01, 0.02]
        # The blocker held the lock throughout, so not even the failures could be written;
        # nothing was left half-done either.
        assert db.rows("SELECT count(*) FROM schema_migrations WHERE version = '0003'") == [(0,)]
        assert db.migrator.status().current == "0002"
    finally:
        db.close()


def test_database_created_before_dbkeeper_is_not_broken(opened) -> None:
    db = opened()
    with db.database.connection() as connection:
        metadata.create_all(connection)
        connection.execute(text("INSERT INTO users (id, first_name) VALUES (5, 'Existing')"))
    with pytest.raises(UnmanagedDatabase) as caught:
        db.migrator.upgrade()
    message = str(caught.value)
    assert "no migration history" in message and "dbkeeper db baseline head" in message
    assert "Nothing was changed" in message
    assert db.rows("SELECT count(*) FROM users") == [(1,)]
    adopted = db.migrator.baseline("head")
    assert adopted.id == "0003"
    assert db.migrator.status().at_head and db.migrator.validate().drift == []
    assert db.migrator.upgrade().steps == []
    assert db.rows("SELECT direction, success FROM schema_migrations") == [("baseline", True)]


def test_schema_newer_than_the_code_is_refused(opened) -> None:
    db = opened()
    db.migrator.upgrade()
    with db.database.connection() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0009'"))
    with pytest.raises(SchemaTooNew) as caught:
        db.migrator.upgrade()
    assert "schema v9 (0009), newer than this code knows (its head is v3 (0003))" in str(
        caught.value
    )
    with pytest.raises(SchemaTooNew):
        db.migrator.status()


def test_validation_reports_drift_missing_tables_and_changed_revision_files(
    opened, scripts_dir: Path
) -> None:
    db = opened()
    db.migrator.upgrade()
    with db.database.connection() as connection:
        connection.execute(text("ALTER TABLE chats ADD COLUMN sneaky INTEGER"))
        connection.execute(text("DROP TABLE chat_settings"))
    revision = next((scripts_dir / "versions").glob("0002_*.py"))
    revision.write_text(revision.read_text() + "\n# edited after it was applied\n")
    report = make_migrator(db.settings).validate()
    assert report.missing_tables == ["chat_settings"] and not report.ok
    assert "column chats.sneaky is in the database but not declared" in report.drift
    assert "table chat_settings is declared but missing from the database" in report.drift
    assert len(report.changed_revisions) == 1
    assert report.changed_revisions[0].startswith("revision 0002 changed since it was applied")


def test_critical_tables_can_be_configured(opened) -> None:
    db = opened(migrations={"critical_tables": ["users", "payments"]})
    db.migrator.upgrade()
    assert db.migrator.validate().missing_tables == ["payments"]


def test_upgrade_to_a_target_and_unknown_targets(opened) -> None:
    db = opened()
    assert [s.revision.id for s in db.migrator.upgrade("1").steps] == ["0001"]
    assert [s.revision.id for s in db.migrator.upgrade("v2").steps] == ["0002"]
    with pytest.raises(MigrationError, match="no revision '0042'"):
        db.migrator.upgrade("0042")
    with pytest.raises(MigrationError, match="is newer"):
        db.migrator.downgrade("0003")


def test_a_new_revision_is_applied_on_top(opened, scripts_dir: Path) -> None:
    db = opened()
    db.migrator.upgrade()
    add_revision(scripts_dir, ADD_NOTES, doc="add notes")
    migrator = make_migrator(db.settings)
    assert [r.id for r in migrator.status().pending] == ["0004"]
    assert [s.revision.id for s in migrator.upgrade().steps] == ["0004"]
    assert "notes" in db.tables()
    migrator.close()


def test_interrupt_cancels_the_running_statement_rolls_back_and_records_it(
    opened, scripts_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From another thread (as a signal handler does): the long statement is cancelled by the
    database, the revision rolled back, the attempt recorded as interrupted."""
    db = opened()
    db.migrator.upgrade()
    add_revision(scripts_dir, LONG, doc="long")
    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv("DBKEEPER_GATE_DIR", str(gate))
    monkeypatch.setenv("DBKEEPER_LONG_ROWS", FOREVER)
    migrator = make_migrator(db.settings)
    outcome: list[BaseException] = []

    def upgrade() -> None:
        try:
            migrator.upgrade()
        except BaseException as error:
            outcome.append(error)

    worker = threading.Thread(target=upgrade)
    worker.start()
    deadline = time.monotonic() + 30
    while not any(gate.iterdir()):
        assert time.monotonic() < deadline, "the revision never started"
        time.sleep(0.01)
    migrator.interrupt("test stop")
    worker.join(10)
    assert not worker.is_alive(), "the statement was not cancelled"
    migrator.close()
    assert len(outcome) == 1 and isinstance(outcome[0], MigrationInterrupted)
    assert "0004 (long) was interrupted (test stop) and rolled back" in str(outcome[0])
    assert db.migrator.status().current == "0003"
    assert db.rows("SELECT count(*) FROM chats WHERE id = 4343") == [(0,)]
    rows = db.rows("SELECT success, error FROM schema_migrations WHERE version = '0004'")
    assert [(bool(s), e) for s, e in rows] == [
        (False, "interrupted: test stop; the revision was rolled back")
    ]


def test_interrupt_before_a_revision_starts_runs_nothing_of_it(opened) -> None:
    db = opened()
    db.migrator.upgrade("0001")
    with db.migrator.locked() as schema:
        status, pending = schema.plan("head")
        db.migrator.interrupt("test stop")  # after planning, as if during the safety backup
        with pytest.raises(MigrationInterrupted, match="stopped before applying revision 0002"):
            schema.upgrade(pending, status)
    with pytest.raises(MigrationInterrupted, match="stopped before migrating"):
        db.migrator.upgrade()  # a stop already requested: not even the plan's first step
    assert db.migrator.status().current == "0001"
    assert db.rows("SELECT count(*) FROM schema_migrations") == [(1,)]  # 0001's only


def test_interrupt_during_the_pre_migration_backup_applies_nothing(
    sqlite_url: str, make_settings: SettingsFactory, scripts_dir: Path, caplog
) -> None:
    """Through ``Operations``, as the bot and `db migrate` run it: a stop while the safety
    backup is taken ends the backup, and no revision starts."""
    settings = make_settings(sqlite_url, migrations={"script_location": str(scripts_dir)})
    ops = Operations(settings, metadata=metadata)
    ops.database.connect()
    ops.migrate("0002")

    class InterruptOnBackup(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "(pre-migration) started" in record.getMessage():
                ops.migrator.interrupt("test stop")

    handler = InterruptOnBackup()
    caplog.set_level(logging.INFO, logger="dbkeeper.backup")
    logging.getLogger("dbkeeper.backup").addHandler(handler)
    try:
        with pytest.raises(MigrationInterrupted, match="while taking the pre-migration backup"):
            ops.migrate()
        assert ops.migrator.status().current == "0002"
    finally:
        logging.getLogger("dbkeeper.backup").removeHandler(handler)
        ops.close()
    assert ops.backups.list() == []
    assert ops.migrator.attempts()[0].version == "0002"  # nothing recorded for 0003


def _use_first_0003(scripts_dir: Path) -> Path:
    """Put the first version of 0003 in place of today's; returns today's file (moved aside)."""
    today = scripts_dir / "versions" / "0003_user_activity.py"
    kept = scripts_dir / "0003_user_activity.today"
    today.rename(kept)
    today.write_bytes(USER_ACTIVITY_V1.read_bytes())
    return kept


def _seed_activity(db: Opened) -> None:
    """Users with many, one and no events; events without a user; ties; several chats."""
    with db.database.connection() as connection:
        connection.execute(
            text(
                "INSERT INTO users (id, first_name) VALUES "
                "(1, 'many'), (2, 'one'), (3, 'none'), (4, 'tie'), (5, 'other chats')"
            )
        )
        connection.execute(
            text("INSERT INTO chats (id, type) VALUES (10, 'group'), (11, 'private')")
        )
        events = [
            (10, 1, "2026-01-01 10:00:00"),
            (10, 1, "2026-03-01 09:30:00"),
            (11, 1, "2026-02-01 23:59:59"),
            (10, 2, "2026-01-15 12:00:00"),
            (10, None, "2026-12-31 00:00:00"),  # no user: nobody's last-seen
            (10, 4, "2026-05-05 05:05:05"),
            (11, 4, "2026-05-05 05:05:05"),
            (11, 5, "2025-12-31 23:00:00"),
            (10, 5, "2026-07-01 08:00:00"),
        ]
        for chat, user, at in events:
            connection.execute(
                text(
                    "INSERT INTO events (chat_id, user_id, kind, created_at) "
                    "VALUES (:chat, :user, 'message', :at)"
                ),
                {"chat": chat, "user": user, "at": at},
            )


def test_rewritten_0003_gives_what_its_first_version_gave(opened, scripts_dir: Path) -> None:
    """The same data migrated by the first 0003 and by today's: the same rows and schema."""
    revision = scripts_dir / "versions" / "0003_user_activity.py"
    today = _use_first_0003(scripts_dir)
    results = []
    for version in ("first", "today"):
        if version == "today":
            revision.write_bytes(today.read_bytes())
        db = opened()
        db.migrator.upgrade("0002")
        _seed_activity(db)
        db.migrator.upgrade()
        assert db.migrator.validate().drift == []
        schema = inspect(db.database.engine)
        results.append(
            (
                db.rows("SELECT id, is_blocked, last_seen_at FROM users ORDER BY id"),
                [(c["name"], str(c["type"]), c["nullable"]) for c in schema.get_columns("users")],
                sorted((i["name"], tuple(i["column_names"])) for i in schema.get_indexes("users")),
            )
        )
        db.migrator.downgrade("base")
    assert results[0] == results[1]
    seen = {user: str(at)[:19] if at is not None else None for user, _, at in results[1][0]}
    assert seen == {
        1: "2026-03-01 09:30:00",
        2: "2026-01-15 12:00:00",
        3: None,
        4: "2026-05-05 05:05:05",
        5: "2026-07-01 08:00:00",
    }


def test_rewrite_declaring_the_old_checksum_is_not_reported_as_changed(
    opened, scripts_dir: Path
) -> None:
    """A database that applied the first 0003 is not warned about today's, which declares the
    first one's checksum; a change that declares nothing still is."""
    today = _use_first_0003(scripts_dir)
    db = opened()
    db.migrator.upgrade()
    first = hashlib.sha256(USER_ACTIVITY_V1.read_bytes()).hexdigest()
    assert db.rows("SELECT checksum FROM schema_migrations WHERE version = '0003'") == [(first,)]

    revision = scripts_dir / "versions" / "0003_user_activity.py"
    revision.write_bytes(today.read_bytes())
    migrator = make_migrator(db.settings)
    assert first in migrator.revisions.by_id()["0003"].supersedes
    report = migrator.validate()
    assert report.changed_revisions == [] and report.ok

    # Applied again from today's file, then edited without declaring it: reported, with what
    # to add should the edit be meant.
    migrator.downgrade("0002")
    migrator.upgrade()
    applied = migrator.revisions.by_id()["0003"].checksum
    revision.write_text(revision.read_text() + "\n# edited after it was applied\n")
    report = make_migrator(db.settings).validate()
    assert len(report.changed_revisions) == 1
    warning = report.changed_revisions[0]
    assert warning.startswith("revision 0003 changed since it was applied")
    assert f"add '{applied}' to supersedes_checksums in 0003_user_activity.py" in warning
    migrator.close()


def test_supersedes_checksums_must_be_checksums(opened, scripts_dir: Path) -> None:
    path = add_revision(scripts_dir, ADD_NOTES, doc="add notes")
    path.write_text(path.read_text() + '\nsupersedes_checksums = ("51d6394a",)\n')
    with pytest.raises(MigrationError, match="supersedes_checksums must be a tuple of sha256"):
        make_migrator(opened().settings).status()


def _hold_write_lock(database: DatabaseService) -> Connection:
    """A connection in a BEGIN IMMEDIATE transaction: SQLite's write lock, held until rollback."""
    connection = database.engine.connect().execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
    connection.begin()
    return connection
