"""The bot's statements timed by shape: the slow query log, bounded memory, GET /api/queries,
the metric, and PostgreSQL's pg_stat_statements (absent and present)."""

from __future__ import annotations

import asyncio
import logging
import re
import tracemalloc

import pytest
from sqlalchemy import create_engine, text

from dbkeeper.plugins.database import BOT_DATA_KEY
from dbkeeper.plugins.database.care.queries import QueryStats, shape_of
from dbkeeper.plugins.database.commands import format_care
from tests.conftest import SettingsFactory
from tests.support.care import execute, numbers, private_postgres, wait_until
from tests.support.hosts import free_port, get, running_host
from tests.support.readme import block

SECRET = "needle-7f3a-private"  # a user's data, passed as a parameter: it must never show


@pytest.mark.parametrize(
    ("statement", "shape", "operation"),
    [
        (
            "SELECT id FROM users WHERE name = 'alice' AND age > 30 -- who",
            "SELECT id FROM users WHERE name = ? AND age > ?",
            "select",
        ),
        (
            "SELECT * FROM t WHERE a IN (?, ?, ?) AND b = %(b)s",
            "SELECT * FROM t WHERE a IN (?) AND b = ?",
            "select",
        ),
        (
            "INSERT INTO t (a, b) VALUES (?, ?), (?, ?), (?, ?)",
            "INSERT INTO t (a, b) VALUES (?)",
            "insert",
        ),
        ("UPDATE t SET a = $1 WHERE id = $2", "UPDATE t SET a = ? WHERE id = ?", "update"),
        (
            "WITH old AS (SELECT id FROM t) DELETE FROM t WHERE id IN (SELECT id FROM old)",
            "WITH old AS (SELECT id FROM t) DELETE FROM t WHERE id IN (SELECT id FROM old)",
            "delete",
        ),
        (
            "SELECT x1, t2.c3 FROM t2 WHERE c3 = E'it''s' OR c4 = 1.5e3",
            "SELECT x1, t2.c3 FROM t2 WHERE c3 = ? OR c4 = ?",
            "select",
        ),
        ("BEGIN IMMEDIATE", "BEGIN IMMEDIATE", "transaction"),
    ],
)
def test_shapes_drop_literals_and_parameters(statement: str, shape: str, operation: str) -> None:
    found = shape_of(statement)
    assert (found.text, found.operation) == (shape, operation)
    assert found.key == shape_of(statement.replace("30", "31").replace("alice", "bob")).key


async def test_a_handler_doing_a_full_scan_is_logged_once_naming_the_table_never_its_values(
    database_url: str, make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        database_url, health={"http_port": free_port()}, queries={"slow_ms": 1}
    )
    caplog.set_level(logging.WARNING, logger="dbkeeper.queries")
    async with running_host(settings) as (host, plugin):
        url = database_url
        execute(
            url,
            "INSERT INTO chats (id, type) VALUES (1, 'private')",
            "INSERT INTO events (chat_id, kind, payload, created_at) SELECT 1, 'message', "
            f"'text ' || i, '2026-01-01 00:00:00' FROM {numbers(url, 150_000)} AS n",
        )
        database = host.application.bot_data[BOT_DATA_KEY]

        async def handler() -> list[int]:  # what a bot's handler does: a lookup by text
            rows = await database.read(
                lambda session: session.execute(
                    text("SELECT id FROM events WHERE payload = :payload"), {"payload": SECRET}
                ).all()
            )
            return [row[0] for row in rows]

        for _ in range(5):
            assert await handler() == []

        def slow_lines() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.name == "dbkeeper.queries" and "FROM events WHERE payload" in r.getMessage()
            ]

        await asyncio.to_thread(wait_until, slow_lines, 10, "the slow query line")
        await asyncio.sleep(0.3)  # any second line would have come by now
        [line] = slow_lines()
        assert "slow query:" in line and "logged once per shape" in line
        assert "SELECT id FROM events WHERE payload = ?" in line
        assert "a full scan of events filtered on payload" in line
        assert (
            ("SCAN events" in line) if url.startswith("sqlite") else ("Seq Scan on events" in line)
        )
        if url.startswith("sqlite"):  # the README shows this very line
            shown = block("illustration", "slow-query").text.strip().split(": ", 1)[1]
            assert re.sub(r"\d+", "N", line) == re.sub(r"\d+", "N", shown)

        _, queries, raw_queries = await get(host, "/api/queries")
        _, _, raw_stats = await get(host, "/api/stats")
        _, _, metrics = await get(host, "/metrics")
        summary = await plugin.care.summary()
    scan = next(q for q in queries["queries"] if "FROM events WHERE payload" in q["query"])
    assert scan["calls"] == 5 and scan["slow_calls"] == 5
    assert scan["rows"] == (None if url.startswith("sqlite") else 0)  # SQLite: not known
    shown = [caplog.text, raw_queries, raw_stats, metrics, "\n".join(format_care(summary))]
    assert not any(SECRET in text_ for text_ in shown)


async def test_get_api_queries_json_and_the_metric(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(sqlite_url, health={"http_port": free_port()})
    async with running_host(settings) as (host, plugin):
        for user in range(3):
            await plugin.database.run(
                lambda session, user=user: session.execute(
                    text("INSERT INTO users (id, first_name) VALUES (:id, :name)"),
                    {"id": user, "name": f"user {user}"},
                )
            )
        status, body, _ = await get(host, "/api/queries?limit=2")
        assert (await get(host, "/api/queries?limit=0"))[0] == 400
        assert (await get(host, "/api/queries?limit=x"))[0] == 400
        _, _, metrics = await get(host, "/metrics")
    assert status == 200
    assert set(body) == {
        "since",
        "slow_ms",
        "statements",
        "slow_statements",
        "shapes",
        "max_shapes",
        "evicted_shapes",
        "queries",
        "tracking",
        "server",
    }
    assert body["tracking"] is True and body["slow_ms"] == 100 and body["max_shapes"] == 500
    assert len(body["queries"]) == 2
    insert = next(q for q in body["queries"] if q["query"].startswith("INSERT INTO users"))
    assert insert == {
        "query": "INSERT INTO users (id, first_name) VALUES (?)",
        "operation": "insert",
        "calls": 3,
        "total_ms": insert["total_ms"],
        "mean_ms": insert["mean_ms"],
        "max_ms": insert["max_ms"],
        "rows": 3,
        "slow_calls": 0,
    }
    assert 0 < insert["max_ms"] <= insert["total_ms"]
    assert body["server"]["available"] is False and "SQLite" in body["server"]["reason"]
    assert "# TYPE dbkeeper_query_duration_seconds histogram" in metrics
    assert 'dbkeeper_query_duration_seconds_count{operation="insert"} 3.0' in metrics
    assert 'dbkeeper_query_duration_seconds_bucket{le="+Inf",operation="insert"} 3.0' in metrics


async def test_dbkeepers_own_statements_are_never_listed(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    """Migrations ran, health checks, a backup, a flush: /api/queries lists the bot's own
    statement and nothing of dbkeeper's (its probes and bookkeeping use other engines)."""
    settings = make_settings(sqlite_url, health={"http_port": free_port()})
    async with running_host(settings) as (host, plugin):
        await plugin.database.run(
            lambda session: session.execute(
                text("INSERT INTO users (id, first_name) VALUES (1, 'x')")
            )
        )
        await plugin.backup_now()
        await host.monitor.check()
        status, body, _ = await get(host, "/api/queries?limit=500")
    assert status == 200
    # The write transaction's BEGIN IMMEDIATE is the bot's too: its time is the wait for the
    # write lock, which a handler pays.
    assert sorted(q["query"] for q in body["queries"]) == [
        "BEGIN IMMEDIATE",
        "INSERT INTO users (id, first_name) VALUES (?)",
    ]


def test_a_long_statement_is_cut_in_its_shape_but_not_merged_with_another() -> None:
    from dbkeeper.plugins.database.care.queries import MAX_SQL_CHARS, shape_of

    columns = ", ".join(f"c{i}" for i in range(400))
    one = shape_of(f"SELECT {columns} FROM users WHERE id = 5")
    other = shape_of(f"SELECT {columns} FROM chats WHERE id = 5")
    assert len(one.text) == MAX_SQL_CHARS and one.text.endswith("…")
    assert one.text.startswith("SELECT c0, c1, c2") and one.text == other.text
    assert one.key != other.key  # the same first 1,000 characters, two shapes


def test_a_burst_of_10000_distinct_statements_does_not_grow_memory(
    tmp_path, make_settings: SettingsFactory
) -> None:
    """Every statement a new shape (a bot building SQL by hand): at most max_shapes are kept,
    and what the tracker holds after 10,000 is what it held after 2,000."""
    settings = make_settings(f"sqlite:///{tmp_path / 'burst.db'}", queries={"max_shapes": 100})
    stats = QueryStats(settings.queries)
    engine = create_engine(f"sqlite:///{tmp_path / 'burst.db'}")
    stats.install(engine)
    module = stats.record.__code__.co_filename

    def held() -> int:
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, module)])
        return sum(stat.size for stat in snapshot.statistics("filename"))

    tracemalloc.start()
    try:
        with engine.connect() as connection:
            for i in range(2_000):
                connection.exec_driver_sql(f"SELECT ? AS column_{i}", (i,))
            after_2000 = held()
            for i in range(2_000, 10_000):
                connection.exec_driver_sql(f"SELECT ? AS column_{i}", (i,))
            after_10000 = held()
    finally:
        tracemalloc.stop()
        stats.uninstall()
        engine.dispose()
    assert stats.statements == 10_000
    assert stats.shapes <= 100 and stats.evicted >= 9_900
    assert len(stats._shapes) <= 400
    assert after_10000 - after_2000 < 64_000, (after_2000, after_10000)


async def test_postgresql_without_pg_stat_statements_says_so(
    postgres_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(postgres_url, health={"http_port": free_port()})
    async with running_host(settings) as (host, _):
        status, body, _ = await get(host, "/api/queries")
    assert status == 200
    server = body["server"]
    assert server["source"] == "pg_stat_statements" and server["available"] is False
    assert "not installed" in server["reason"] and "shared_preload_libraries" in server["reason"]


async def test_postgresql_with_pg_stat_statements_lists_the_servers_view(
    make_settings: SettingsFactory,
) -> None:
    """On a private server that loads pg_stat_statements (the shared test server does not,
    and changing that takes a restart)."""
    with private_postgres("shared_preload_libraries=pg_stat_statements") as url:
        execute(
            url,
            "CREATE EXTENSION pg_stat_statements",
            "CREATE TABLE notes (id serial PRIMARY KEY, body text)",
            f"INSERT INTO notes (body) VALUES ('{SECRET}')",
        )
        settings = make_settings(
            url, health={"http_port": free_port()}, migrations={"script_location": "none"}
        )
        async with running_host(settings) as (host, plugin):
            await plugin.database.read(
                lambda session: session.execute(
                    text("SELECT id FROM notes WHERE body = :body"), {"body": SECRET}
                ).all()
            )
            status, body, raw = await get(host, "/api/queries?limit=50")
    assert status == 200
    server = body["server"]
    assert server["available"] is True and server["version"]
    texts = [query["query"] for query in server["queries"]]
    assert any("FROM notes WHERE body = ?" in query for query in texts), texts
    assert all(
        {"calls", "total_ms", "mean_ms", "max_ms", "rows"} <= set(q) for q in server["queries"]
    )
    assert SECRET not in raw
