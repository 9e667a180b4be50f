"""Running the real host in the test process: the database plugin, the health side, HTTP."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from dbkeeper.app import build_application
from dbkeeper.config import Settings
from dbkeeper.host import Host
from dbkeeper.plugin import Deadline
from dbkeeper.plugins.database import DatabasePlugin


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def build_host(settings: Settings) -> tuple[Host, DatabasePlugin]:
    """A host with the plugins ``settings`` names; the database plugin beside it."""
    host = Host(settings, build_application(settings))
    plugin = next(p for p in host.plugins if isinstance(p, DatabasePlugin))
    return host, plugin


@contextlib.asynccontextmanager
async def running_host(
    settings: Settings, *, job_queue: bool = False
) -> AsyncIterator[tuple[Host, DatabasePlugin]]:
    """A started host (HTTP API listening, database migrated, first check done); stopped after.

    ``job_queue``: also start the job queue, so the periodic checks run.
    """
    host, plugin = build_host(settings)
    await host.start()
    await host.monitor.check()  # joins the first check, started in the background
    try:
        if job_queue:
            await host.job_queue.start()
        yield host, plugin
    finally:
        if job_queue:
            await host.job_queue.stop(wait=True)
        await host.stop(Deadline.after(10))
        await host.application.bot.shutdown()


async def get(host: Host, path: str) -> tuple[int, Any, str]:
    """GET ``path`` from the host's HTTP API: (status, JSON or None, text)."""
    url = f"http://{host.settings.health.http_host}:{host.http.port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
        data = await response.json() if response.content_type == "application/json" else None
        return response.status, data, text
