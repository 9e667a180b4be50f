"""Retention: exactly the rows older than the cutoff go, in small batches; rows still referenced
stay and are counted; a rule that does not fit the schema stops startup naming it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from dbkeeper.config import Settings
from dbkeeper.plugins.database.care import Care
from dbkeeper.plugins.database.care.retention import BATCH_ROWS
from dbkeeper.plugins.database.operations import Operations
from dbkeeper.plugins.members.models import Chat, ChatSetting, Event
from tests.conftest import SettingsFactory
from tests.support.hosts import free_port, running_host
from tests.support.process import run_cli, write_config
from tests.support.readme import block

OLD_FILLER = BATCH_ROWS * 2 + 202  # old events beyond the four named ones: three batches
RULES = {
    "events": {"column": "created_at", "keep_days": 30},
    "chats": {"column": "created_at", "keep_days": 30},
}


def _seed(session: Session, now: datetime) -> None:
    """Chats: 1 old but its newer events refer to it; 2 old, settings refer to it; 3 old, only
    old events refer to it; 4 new. Events around the cutoff (a minute either side of 30 days
    before ``now``), and many old ones (of chat 3)."""
    ages = {1: 60, 2: 60, 3: 60, 4: 1}
    for chat, days in ages.items():
        session.add(Chat(id=chat, type="group", created_at=now - timedelta(days=days)))
    session.flush()
    session.add(ChatSetting(chat_id=2, key="lang", value="en"))
    session.add_all(
        [
            Event(id=1, chat_id=3, kind="m", created_at=now - timedelta(days=40)),
            Event(id=2, chat_id=3, kind="m", created_at=now - timedelta(days=30, minutes=1)),
            Event(
                id=3,
                chat_id=1,
                kind="m",
                created_at=now - timedelta(days=30) + timedelta(minutes=1),
            ),
            Event(id=4, chat_id=1, kind="m", created_at=now - timedelta(days=1)),
        ]
    )
    session.add_all(
        Event(id=100 + i, chat_id=3, kind="m", created_at=now - timedelta(days=90))
        for i in range(OLD_FILLER)
    )


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def seeded(
    database_url: str, make_settings: SettingsFactory, now: datetime
) -> Iterator[tuple[Operations, Settings]]:
    settings = make_settings(database_url, retention=RULES)
    ops = Operations(settings)
    ops.open()
    with ops.database.session() as session:
        _seed(session, now)
    try:
        yield ops, settings
    finally:
        ops.close()


def _ids(ops: Operations, column: object) -> set[int]:
    with ops.database.session(write=False) as session:
        return set(session.scalars(select(column)))


def test_exactly_the_rows_older_than_the_cutoff_go_and_referenced_ones_stay(
    seeded: tuple[Operations, Settings], now: datetime
) -> None:
    ops, settings = seeded
    care = Care(ops.database, ops.backups, settings)
    try:
        preview = {r.table: r for r in care.retention.run(dry_run=True, now=now)}
        assert (preview["events"].removed, preview["events"].kept_referenced) == (OLD_FILLER + 2, 0)
        assert (preview["chats"].removed, preview["chats"].kept_referenced) == (0, 3)
        assert len(_ids(ops, Event.id)) == OLD_FILLER + 4  # a dry run deletes nothing

        results = {r.table: r for r in care.retention.run(now=now)}
    finally:
        care.dispose()
    assert _ids(ops, Event.id) == {3, 4}  # 30 days + 1 minute old went; 30 days - 1 minute stays
    assert _ids(ops, Chat.id) == {1, 2, 4}  # 3 went once its old events had gone
    events, chats = results["events"], results["chats"]
    assert (events.removed, events.batches, events.kept_referenced) == (OLD_FILLER + 2, 3, 0)
    assert (chats.removed, chats.kept_referenced) == (1, 2)  # 1 and 2 are still referenced
    assert 0 < events.longest_lock_seconds < 1.0  # each batch a short transaction
    assert events.describe().startswith(f"events: removed {OLD_FILLER + 2:,} rows older than 30")
    assert "in 3 batches (longest write lock" in events.describe()
    assert chats.describe().endswith("; 2 older rows still referenced kept")
    assert _ids(ops, ChatSetting.chat_id) == {2}


def test_cleanup_on_the_command_line(tmp_path: Path, sqlite_url: str) -> None:
    write_config(
        tmp_path / "config.toml",
        {
            "database": {"url": sqlite_url},
            "backup": {"dir": str(tmp_path / "backups")},
            "retention": RULES,
        },
    )
    code, output = run_cli(["db", "cleanup"], cwd=tmp_path)
    assert code == 1 and "there is no database at" in output  # creates nothing
    assert run_cli(["db", "migrate"], cwd=tmp_path)[0] == 0
    ops = Operations(_settings(sqlite_url, tmp_path))
    ops.open()
    with ops.database.session() as session:
        _seed(session, datetime.now(UTC))
    ops.close()

    code, output = run_cli(["db", "cleanup", "--dry-run"], cwd=tmp_path)
    assert code == 0, output
    assert f"events: {OLD_FILLER + 2:,} rows older than 30 days" in output and "would go" in output
    assert "chats: 0 rows older than 30 days" in output
    assert "3 older rows still referenced would stay" in output
    assert output.rstrip().endswith("dry run: nothing was deleted")

    code, output = run_cli(["db", "cleanup"], cwd=tmp_path)
    assert code == 0, output
    assert f"events: removed {OLD_FILLER + 2:,} rows older than 30 days" in output
    assert "chats: removed 1 rows" in output and "2 older rows still referenced kept" in output


def _settings(url: str, tmp_path: Path) -> Settings:
    from dbkeeper.config import settings_from_mapping

    return settings_from_mapping(
        {"database": {"url": url}, "backup": {"dir": str(tmp_path / "backups")}}, environ={}
    )


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        (
            {"evnts": {"keep_days": 30}},
            "[retention] evnts: there is no table evnts in the database (tables: chat_settings, "
            "chats, events, users); fix the name or remove it from [retention]",
        ),
        (
            {"events": {"column": "created", "keep_days": 30}},
            '[retention] events.column = "created": the table events has no column created '
            "(columns: id, chat_id, user_id, kind, payload, created_at)",
        ),
        (
            {"events": {"column": "kind", "keep_days": 30}},
            '[retention] events.column = "kind": kind is VARCHAR(32), not a date',
        ),
        ({"schema_migrations": {"column": "started_at"}}, "dbkeeper's own bookkeeping table"),
    ],
)
def test_a_rule_that_does_not_fit_the_schema_stops_startup_with_one_line(
    tmp_path: Path, postgres_url: str, rules: dict, expected: str
) -> None:
    write_config(
        tmp_path / "config.toml",
        {
            "database": {"url": postgres_url},
            "backup": {"dir": str(tmp_path / "backups")},
            "health": {"http_port": free_port()},
            "retention": rules,
        },
    )
    code, output = run_cli(["run"], cwd=tmp_path)
    assert code == 1, output
    [line] = [line for line in output.splitlines() if "lifecycle: startup failed" in line]
    assert expected in line
    if "evnts" in expected:  # the README shows this very line
        assert line.endswith(block("illustration", "retention-error").text.strip())
    code, output = run_cli(["db", "cleanup", "--dry-run"], cwd=tmp_path)
    assert code == 1 and output.strip().splitlines()[-1].startswith("dbkeeper: error: [retention]")


async def test_the_daily_job_applies_retention_in_the_running_bot(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(sqlite_url, health={"http_port": free_port()}, retention=RULES)
    async with running_host(settings, job_queue=True) as (host, plugin):
        assert host.job_queue.get_jobs_by_name("database-daily-care")
        with plugin.database.session() as session:
            _seed(session, datetime.now(UTC))
        await plugin.care.daily()
        with plugin.database.session(write=False) as session:
            remaining = set(session.scalars(select(Event.id)))
        summary = await plugin.care.summary()
        stats = await plugin.care.stats_json()
    assert remaining == {3, 4}
    assert [result.table for result in summary.retention] == ["events", "chats"]
    assert stats["retention"]["events"]["last_run"]["removed"] == OLD_FILLER + 2
    assert stats["retention"]["chats"]["last_run"]["kept_referenced"] == 2
