"""The status page in a real browser (headless Chromium): the checks, the backups on a
timeline, a chart, a screenshot; behind the token beyond loopback; fresh or stale."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

from tests.conftest import SettingsFactory, require_tool
from tests.support import browser
from tests.support.backups import add_users
from tests.support.hosts import free_port, get, running_host

TOKEN = "status-page-token-0123456789"
ROOT = Path(__file__).resolve().parents[1]


async def test_the_page_shows_checks_backups_and_a_chart_in_a_real_browser(
    sqlite_url: str, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    require_tool(browser.missing())
    settings = make_settings(
        sqlite_url,
        health={"http_port": free_port(), "http_host": "0.0.0.0", "http_token": TOKEN},
    )
    async with running_host(settings) as (host, plugin):
        await plugin.backup_now()
        await plugin.backup_now()
        await host.monitor.check()
        url = f"http://127.0.0.1:{host.http.port}/"

        def look() -> tuple[list[str], list[str], list[str], str, str, Path]:
            with browser.chromium() as page:
                page.send_header("Authorization", f"Bearer {TOKEN}")
                page.open(url)
                checks = page.wait_for("#checks tr.check")
                backups = page.find_all("tr.backup")
                charts = page.find_all("svg.chart circle.mark")
                sizes = page.find_all("svg.chart polyline.series")  # the size over time
                title = page.script("return document.title")
                header = page.text("header h1")
                shot = page.screenshot(tmp_path / "status-page.png")
                assert sizes, "no size chart"
                sections = [page.text(f"section:nth-of-type({i}) h2") for i in range(2, 6)]
                assert {"Size and growth", "Slowest queries", "Backups"} <= set(sections)
                # Everything it loaded came from the bot itself (today nothing: the script and
                # the charts are inline): it works with no network.
                loaded = page.script(
                    "return performance.getEntriesByType('resource').map(r => r.name)"
                )
                origin = f"http://127.0.0.1:{host.http.port}/"
                assert all(str(name).startswith(origin) for name in loaded), loaded
                return checks, backups, charts, title, header, shot

        import asyncio

        checks, backups, marks, title, header, shot = await asyncio.to_thread(look)
    assert len(checks) == len(host.health.names) >= 6
    assert len(backups) == 2 and len(marks) == 2  # both backups, each a mark on the timeline
    assert title.startswith("dbkeeper: ") and header.startswith("dbkeeper is ")
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 800 and height >= 600


async def test_without_the_token_the_page_is_401_and_says_nothing(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        sqlite_url,
        health={"http_port": free_port(), "http_host": "0.0.0.0", "http_token": TOKEN},
    )
    async with running_host(settings) as (host, _):
        status, _, text = await get(host, "/")
        assert status == 401 and "dbkeeper is" not in text and "<table" not in text


async def test_the_page_says_when_its_data_is_stale(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(sqlite_url, health={"http_port": free_port()})
    async with running_host(settings) as (host, _):
        status, _, fresh = await get(host, "/")
        assert status == 200 and "id='stale' class='banner' hidden" in fresh
        report = host.monitor.last
        assert report is not None
        import dataclasses

        host.monitor.last = dataclasses.replace(report, timestamp=report.timestamp - 3600)
        _, _, stale = await get(host, "/")
        assert "Stale: the last health check ran 1h 0m ago." in stale
        host.monitor.last = report


async def test_each_backup_shows_its_full_check_and_a_damaged_one_is_named(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    import asyncio
    import dataclasses

    settings = make_settings(sqlite_url, health={"http_port": free_port()})
    async with running_host(settings) as (host, plugin):
        backups = plugin.operations.backups
        taken = [await plugin.backup_now() for _ in range(2)]
        for backup in taken:
            await asyncio.to_thread(backups.full_checks.wait_for, backup.name, 30)
        damaged = dataclasses.replace(taken[0], full_check="failed", full_check_problem="x")
        await asyncio.to_thread(backups.store.update, damaged)
        status, _, page = await get(host, "/")
    assert status == 200
    row = page[page.index(f"<code>{taken[1].name}</code>") :].split("</tr>", 1)[0]
    assert "<td>✓</td>" in row  # passed its full check
    assert f"<code>{taken[0].name}</code>" not in page  # not listed among the sound ones...
    assert (  # ...but named
        "Failed the full integrity check, marked damaged (kept, never restored): "
        f"{taken[0].name}" in page
    )


async def test_no_secret_and_no_users_data_on_the_page(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    from sqlalchemy import text

    settings = make_settings(
        sqlite_url.replace("sqlite:///", "sqlite:///"),
        health={"http_port": free_port(), "http_host": "0.0.0.0", "http_token": TOKEN},
        telegram={"token": "123456789:AAExampleExampleExampleExampleExam"},
    )
    async with running_host(settings) as (host, plugin):
        await plugin.database.run(
            lambda s: s.execute(
                text("INSERT INTO users (id, first_name) VALUES (1, 'Private Person Name')")
            )
        )
        await plugin.backup_now()
        import aiohttp

        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://127.0.0.1:{host.http.port}/", headers={"Authorization": f"Bearer {TOKEN}"}
            ) as answer,
        ):
            page = await answer.text()
    assert answer.status == 200
    for secret in (TOKEN, "AAExampleExampleExampleExampleExam", "Private Person Name"):
        assert secret not in page


async def test_the_page_reads_on_a_phone_without_sideways_scrolling(
    sqlite_url: str, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    require_tool(browser.missing())
    settings = make_settings(sqlite_url, health={"http_port": free_port()})
    async with running_host(settings) as (host, plugin):
        await plugin.backup_now()
        await host.monitor.check()
        url = f"http://127.0.0.1:{host.http.port}/"

        def look() -> tuple[int, int, float, Path]:
            with browser.chromium() as page:
                page.emulate_phone()
                page.open(url)
                page.wait_for("#checks tr.check")
                page_width = page.script("return document.documentElement.scrollWidth")
                screen = page.script("return window.innerWidth")
                text_size = page.script(
                    "return parseFloat(getComputedStyle(document.querySelector('main')).fontSize)"
                )
                return page_width, screen, text_size, page.screenshot(tmp_path / "phone.png")

        import asyncio

        page_width, screen, text_size, shot = await asyncio.to_thread(look)
    assert screen == 390
    assert page_width <= screen, "the page scrolls sideways on a phone"
    assert text_size >= 14  # the viewport meta keeps the text readable, not zoomed out
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_the_page_shows_the_off_site_copies_and_the_replication_lag(
    tmp_path: Path, make_settings: SettingsFactory
) -> None:
    """Everything on (off-site copies, Litestream replication to another directory): the
    backups copied off-site are marked in the table and on the timeline, and the replication
    section draws the lag against its limit."""
    require_tool(browser.missing())
    (tmp_path / "offsite").mkdir()
    settings = make_settings(
        f"sqlite:///{tmp_path / 'data' / 'bot.db'}",
        health={"http_port": free_port(), "http_cache_seconds": 0.01},
        offsite={"url": f"file://{tmp_path / 'offsite'}"},
        replication={"enabled": True, "sync_interval_seconds": 0.2, "max_lag_seconds": 5},
    )
    async with running_host(settings) as (host, plugin):
        assert plugin.uploads is not None
        add_users(plugin.operations, 20)
        await plugin.backup_now()
        await plugin.uploads.wait()
        for _ in range(3):  # a few points of lag
            await host.monitor.check()
        url = f"http://127.0.0.1:{host.http.port}/"

        def look() -> dict[str, object]:
            with browser.chromium() as page:
                page.open(url)
                page.wait_for("#checks tr.check")
                sections = page.script(
                    "return Array.from(document.querySelectorAll('section h2'))"
                    ".map(h => h.textContent)"
                )
                return {
                    "sections": sections,
                    "offsite": page.text("#offsite"),
                    "headers": page.script(
                        "return Array.from(document.querySelectorAll('tr.backup')[0]"
                        ".closest('table').querySelectorAll('th')).map(th => th.textContent)"
                    ),
                    "copied": page.script(
                        "return Array.from(document.querySelectorAll('tr.backup'))"
                        ".map(r => r.lastElementChild.textContent)"
                    ),
                    "marks": len(page.find_all("svg.timeline circle.mark.offsite")),
                    "lag": page.script(
                        "const h = Array.from(document.querySelectorAll('section h2'))"
                        ".find(h => h.textContent === 'Replication');"
                        "const s = h.closest('section');"
                        "return [s.querySelectorAll('svg.chart polyline.series').length,"
                        " s.querySelectorAll('svg.chart line.limit').length, s.textContent]"
                    ),
                    "shot": page.screenshot(tmp_path / "everything.png"),
                }

        import asyncio

        seen = await asyncio.to_thread(look)
    assert "Replication" in seen["sections"]
    assert str(seen["offsite"]).startswith(f"Off-site (file://{tmp_path / 'offsite'}/backups): ")
    assert "| 1 copy |" in str(seen["offsite"])
    assert seen["headers"] == [
        "name",
        "reason",
        "taken",
        "size",
        "schema",
        "full check",
        "off-site",
    ]
    assert seen["copied"] == ["✓"]  # the one backup, copied off-site
    assert seen["marks"] == 1
    series, limit, text = seen["lag"]  # type: ignore[misc]
    assert series == 1 and limit == 1, text
    assert "lag " in text and "dbkeeper backup restore --latest" in text
    assert f"file://{tmp_path / 'offsite'}/replica" in text


def test_the_readme_picture_is_taken_by_the_documented_command(tmp_path: Path) -> None:
    """The README shows docs/status-page.png and says which command takes it again: that
    command captures a full page of a running bot (backups, off-site, replication)."""
    require_tool(browser.missing())
    readme = (ROOT / "README.md").read_text()
    assert "](docs/status-page.png)" in readme
    assert "`.venv/bin/python docs/status_page_screenshot.py`" in readme
    committed = (ROOT / "docs" / "status-page.png").read_bytes()
    assert committed[:8] == b"\x89PNG\r\n\x1a\n"
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "docs" / "status_page_screenshot.py"),
            "--out",
            str(shot),
            "--root",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    width, height = struct.unpack(">II", shot.read_bytes()[16:24])
    assert width == 1100 and height > 1500  # the whole page, not the window
    assert not (tmp_path / "demo").exists()  # the demo bot is gone
    refused = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "status_page_screenshot.py"), "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "is not empty" in refused.stderr
    assert shot.exists()  # nothing of an existing directory was touched
