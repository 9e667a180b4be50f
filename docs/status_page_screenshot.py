"""Regenerate ``docs/status-page.png``, the README's picture of the status page.

    .venv/bin/python docs/status_page_screenshot.py [--root DIR] [--out PNG]

A real bot (the database plugin in-process, as the tests run it) on a SQLite database under
``DIR/data`` with a week of daily backups, copies of them on a second disk (``file://``),
Litestream replicating there too, the example plugin's tables filled, a handler's full scan
among the queries, and three weeks of size samples so that the growth chart has a history.
Headless Chromium (Debian's ``chromium`` and ``chromium-driver``) loads the page from the
running bot and captures all of it. Nothing talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dbkeeper.config import settings_from_mapping
from dbkeeper.plugins.database.handle import BOT_DATA_KEY
from dbkeeper.plugins.database.migrate.bookkeeping import size_samples
from tests.support import browser
from tests.support.backups import SkippingClock, add_users, open_plugin
from tests.support.hosts import free_port, running_host

PICTURE = Path(__file__).with_name("status-page.png")
DAYS_OF_BACKUPS = 6
DAYS_OF_SAMPLES = 21
USERS_PER_DAY = 8000


def settings_for(root: Path) -> object:
    return settings_from_mapping(
        {
            "database": {"url": f"sqlite:///{root / 'data' / 'bot.db'}"},
            "backup": {"dir": str(root / "backups"), "compression": "zstd"},
            "health": {"http_port": free_port(), "http_cache_seconds": 0.01},
            "queries": {"slow_ms": 5},
            "offsite": {"url": f"file://{root / 'offsite-disk'}"},
            "replication": {"enabled": True, "sync_interval_seconds": 1, "max_lag_seconds": 10},
        },
        environ={},
    )


def a_week_of_backups(root: Path) -> None:
    """Daily backups over the past week, the database growing between them."""
    clock = SkippingClock()
    clock.offset = -timedelta(days=DAYS_OF_BACKUPS, hours=3)
    operations = open_plugin(settings_for(root), clock)  # type: ignore[arg-type]
    try:
        for day in range(DAYS_OF_BACKUPS):
            add_users(operations, USERS_PER_DAY, start=1 + day * USERS_PER_DAY, text_size=60)
            operations.backups.create("scheduled")
            clock.offset += timedelta(days=1)
        now = datetime.now(UTC)
        with operations.database.connection() as connection:  # as the growth check measures
            pages = connection.exec_driver_sql("PRAGMA page_count").scalar_one()
            size_now = pages * connection.exec_driver_sql("PRAGMA page_size").scalar_one()
        per_hour = size_now / (DAYS_OF_SAMPLES * 24 * 1.6)  # it started at about a third
        with operations.database.connection() as connection:
            for hours in range(DAYS_OF_SAMPLES * 24, 0, -6):
                size = int(size_now - hours * per_hour - (hours % 24) * per_hour / 3)
                connection.execute(
                    insert(size_samples).values(
                        taken_at=now - timedelta(hours=hours),
                        size_bytes=size,
                        disk_free_bytes=9_000_000_000 - size,
                    )
                )
    finally:
        operations.close()


async def capture(root: Path, picture: Path) -> Path:
    async with running_host(settings_for(root)) as (host, plugin):  # type: ignore[arg-type]
        database = host.application.bot_data[BOT_DATA_KEY]
        for word in ("hello", "settings", "stats"):  # a handler's full scan, and lookups
            await database.read(
                lambda session, word=word: session.execute(
                    text("SELECT id FROM users WHERE last_name = :word"), {"word": word}
                ).all()
            )
            await database.read(
                lambda session: session.execute(
                    text("SELECT count(*) FROM users WHERE id < :id"), {"id": 100}
                ).all()
            )
        await plugin.backup_now()
        if plugin.uploads is not None:
            await plugin.uploads.wait()
        replication = plugin.replication
        assert replication is not None
        deadline = time.monotonic() + 60
        while (await replication.state()).last_sync is None:  # Litestream's first sync
            assert time.monotonic() < deadline, "Litestream did not sync within a minute"
            await asyncio.sleep(0.2)
        for _ in range(4):  # a few points of lag
            await host.monitor.check()
        url = f"http://127.0.0.1:{host.http.port}/"

        def look() -> Path:
            with browser.chromium() as page:
                page.open(url)
                page.wait_for("#checks tr.check")
                height = page.script("return document.documentElement.scrollHeight")
                page.cdp(
                    "Emulation.setDeviceMetricsOverride",
                    width=1100,
                    height=int(height),
                    deviceScaleFactor=1,
                    mobile=False,
                )
                return page.screenshot(picture)

        return await asyncio.to_thread(look)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="where the demo bot lives (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=PICTURE, help=f"default: {PICTURE}")
    arguments = parser.parse_args()
    problem = browser.missing()
    if problem:
        sys.exit(problem)
    root = arguments.root or Path(tempfile.mkdtemp(prefix="dbkeeper-demo-"))
    if root.exists() and any(root.iterdir()):
        sys.exit(f"{root} is not empty: the demo bot needs a directory of its own (removed after)")
    (root / "offsite-disk").mkdir(parents=True, exist_ok=True)  # "the second disk, mounted"
    try:
        a_week_of_backups(root)
        print(asyncio.run(capture(root, arguments.out)))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
