"""Leader election between instances sharing a database (in-process; processes in e2e tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from sqlalchemy import create_engine, text

from dbkeeper.config import ConfigError
from dbkeeper.plugins.database.leadership import Leadership
from dbkeeper.plugins.database.service import DatabaseService
from tests.conftest import SettingsFactory

Factory = Callable[[str], Leadership]


@pytest.fixture
async def elect(database_url: str, make_settings: SettingsFactory) -> AsyncIterator[Factory]:
    made: list[tuple[Leadership, DatabaseService]] = []

    def build(name: str) -> Leadership:
        database = DatabaseService(make_settings(database_url).database)
        database.connect()
        # polls by hand
        leadership = Leadership(database.settings, instance=name, poll_seconds=3600)
        made.append((leadership, database))
        return leadership

    yield build
    for leadership, database in made:
        await leadership.stop()
        database.close()


async def test_one_instance_leads_and_a_standby_takes_over(elect: Factory) -> None:
    changes: list[tuple[str, bool]] = []
    first, second = elect("alpha:1"), elect("beta:2")
    for leadership in (first, second):

        async def record(is_leader: bool, name: str = leadership.instance) -> None:
            changes.append((name, is_leader))

        leadership.on_change(record)
    await first.start()
    await second.start()
    assert (first.is_leader, second.is_leader) == (True, False)
    assert second.leader == "alpha:1"  # a standby knows who leads
    await second.poll()
    assert not second.is_leader  # still held

    await first.stop()  # the leader goes away (a dead process releases the same way)
    await second.poll()
    assert not second.is_leader  # free once: the leader may be coming back from an outage
    await second.poll()
    assert second.is_leader and second.leader == "beta:2"
    assert changes == [("alpha:1", True), ("beta:2", True)]


async def test_lost_lock_connection_is_reacquired_without_a_change(
    postgres_url: str, make_settings: SettingsFactory
) -> None:
    database = DatabaseService(make_settings(postgres_url).database)
    database.connect()
    leadership = Leadership(database.settings, instance="solo:1", poll_seconds=3600)
    changes: list[bool] = []

    async def record(is_leader: bool) -> None:
        changes.append(is_leader)

    leadership.on_change(record)
    try:
        await leadership.start()
        admin = create_engine(postgres_url)
        with admin.begin() as connection:  # what a server restart does to our session
            killed = (
                connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = 'dbkeeper-leader solo:1'"
                    )
                )
                .scalars()
                .all()
            )
        admin.dispose()
        assert killed == [True]
        await leadership.poll()
        assert leadership.is_leader and changes == [True]
    finally:
        await leadership.stop()
        database.close()


async def test_a_leader_back_from_an_outage_gets_its_lock_before_a_standby(
    elect: Factory,
) -> None:
    first, second = elect("alpha:1"), elect("beta:2")
    await first.start()
    await second.start()
    assert first._lock is not None
    first._lock.release()  # what an outage does to its lock: gone, while it still leads
    await second.poll()  # the standby sees the lock free once and waits
    await first.poll()  # the leader probes again and takes it back
    await second.poll()
    assert (first.is_leader, second.is_leader) == (True, False)
    assert second.leader == "alpha:1"


async def test_a_poll_finishing_after_stop_keeps_nothing(elect: Factory) -> None:
    first, second = elect("alpha:1"), elect("beta:2")
    await first.start()
    await second.start()
    await first.stop()
    await second.stop()
    await second.poll(eager=True)  # a round still under way when stop ran
    assert not second.is_leader
    third = elect("gamma:3")
    await third.start()
    assert third.is_leader  # the lock was not kept by the stopped instance


def test_an_in_memory_database_is_refused_at_startup(make_settings: SettingsFactory) -> None:
    """Nothing of an in-memory database outlives the process: there is nothing to keep (and no
    other instance could share it), so the configuration says so instead of leading alone."""
    for url in ("sqlite://", "sqlite:///:memory:", "sqlite:///file::memory:?cache=shared"):
        with pytest.raises(ConfigError, match="is an in-memory SQLite database"):
            make_settings(url)


async def test_polling_runs_in_the_background(elect: Factory) -> None:
    first, second = elect("alpha:1"), elect("beta:2")
    second.poll_seconds = 0.05
    await first.start()
    await second.start()
    await first.stop()
    async with asyncio.timeout(10):
        while not second.is_leader:
            await asyncio.sleep(0.01)
