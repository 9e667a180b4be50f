"""The status page (``GET /`` on the health server): one page an operator opens in a browser.

The host draws the frame: the overall status, this instance and who leads, every check, and
how fresh all of it is. Plugins add sections (``PluginContext.add_status_section``): the
database plugin adds the schema and its migrations, the backups on a timeline, the size over
time with its forecast, replication and the slowest queries.

Everything is drawn on the server (charts are inline SVG, the style sheet is inline), so the
page loads nothing from anywhere and reads the same with no network. A few lines of inline
script reload its content every ``REFRESH_SECONDS`` without a flicker and say, in a banner,
when the data is stale: the last health check is older than twice ``[health]
interval_seconds``, or the bot stopped answering. It is for operators: behind ``[health]
http_token`` beyond loopback, no secret in it (every check message is redacted when made) and
no row of users' data (counts and sizes only).
"""

from __future__ import annotations

import html
import importlib.resources
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from aiohttp import web

from dbkeeper.texts import duration

if TYPE_CHECKING:
    from dbkeeper.host import Host

log = logging.getLogger("dbkeeper.http")
REFRESH_SECONDS = 15
Render = Callable[[], Awaitable[str]]
_STATIC = importlib.resources.files("dbkeeper") / "static"
STYLE = (_STATIC / "status.css").read_text(encoding="utf-8")
SCRIPT = (_STATIC / "status.js").read_text(encoding="utf-8")




@dataclass(frozen=True)
class Section:
    title: str
    render: Render


class StatusPage:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.sections: list[Section] = []

    def add(self, title: str, render: Render) -> None:
        self.sections.append(Section(title, render))

    async def handle(self, _request: web.Request) -> web.Response:
        return web.Response(
            text=await self.render(),
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

    def stale_after(self) -> float:
        """Seconds after which the last check is too old to trust."""
        return max(2 * self.host.settings.health.interval_seconds, 60.0)

    async def render(self) -> str:
        host = self.host
        report = host.monitor.last
        if host.state == "starting" or report is None:
            status, verdict = "starting", "starting"
        else:
            status, verdict = report.status.value, report.status.value
        now = time.time()
        stale = report is not None and now - report.timestamp > self.stale_after()
        checked = (
            f"checked {duration(now - report.timestamp)} ago" if report else "not checked yet"
        )
        parts = [
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
            "<meta name='viewport' content='width=device-width, initial-scale=1'>",
            f"<title>dbkeeper: {html.escape(verdict)}</title><style>{STYLE}</style></head><body>",
            f"<header class='{status}'><h1>dbkeeper is {html.escape(verdict)}</h1>",
            f"<p>{html.escape(host.describe_instance())} · up {duration(host.uptime)} · "
            f"{html.escape(checked)}</p></header>",
            f"<main data-report='{report.timestamp if report else ''}' "
            f"data-generated='{now:.0f}'>",
            f"<div id='stale' class='banner'{'' if stale else ' hidden'}>",
            f"Stale: the last health check ran {duration(now - report.timestamp)} ago."
            if stale and report
            else "",
            "</div>",
            self._checks(),
        ]
        for section in self.sections:
            try:
                body = await section.render()
            except Exception as error:  # one broken section never takes the page down
                log.warning("status page section %r failed: %s", section.title, error)
                body = f"<p class='empty'>unavailable: {html.escape(type(error).__name__)}</p>"
            parts.append(f"<section><h2>{html.escape(section.title)}</h2>{body}</section>")
        parts.append(
            f"<p class='muted'>Generated {datetime.fromtimestamp(now, UTC):%Y-%m-%d %H:%M:%S}"
            f" UTC; refreshes every {REFRESH_SECONDS}s.</p></main>"
        )
        parts.append(
            "<script>"
            + SCRIPT.replace("__REFRESH__", str(REFRESH_SECONDS)).replace(
                "__STALE__", f"{self.stale_after():g}"
            )
            + "</script></body></html>"
        )
        return "".join(parts)

    def _checks(self) -> str:
        report = self.host.monitor.last
        if report is None:
            return "<section id='checks'><h2>Checks</h2><p class='empty'>not yet</p></section>"
        rows = []
        for check in sorted(report.checks.values(), key=lambda c: (-c.status.rank, c.name)):
            latency = f"{check.latency_ms:.0f} ms" if check.latency_ms is not None else ""
            rows.append(
                f"<tr class='check' data-check='{html.escape(check.name)}'>"
                f"<td><span class='dot {check.status.value}' title='{check.status.value}'></span> "
                f"<b>{html.escape(check.name).replace('_', '_<wbr>')}</b></td>"
                f"<td class='status-{check.status.value} hide-narrow'>{check.status.value}</td>"
                f"<td class='wrap'>{html.escape(check.message)}</td>"
                f"<td class='num hide-narrow'>{latency}</td></tr>"
            )
        return (
            "<section id='checks'><h2>Checks</h2><table><tr><th>check</th>"
            "<th class='hide-narrow'>status</th><th>message</th>"
            "<th class='hide-narrow'>latency</th></tr>"
            + "".join(rows)
            + "</table></section>"
        )
