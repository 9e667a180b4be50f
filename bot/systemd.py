"""Telling systemd how the bot is doing (``Type=notify``), when systemd asks for it.

When systemd starts dbkeeper with ``NOTIFY_SOCKET`` set (deploy/systemd/dbkeeper.service):

* ``READY=1`` once the bot is ready: the same moment ``/readyz`` turns 200 (started, the
  database reachable and its schema at head), not before, so ``systemctl start`` and units
  ordered after dbkeeper wait for a database that works;
* ``STOPPING=1`` when the graceful shutdown starts;
* ``WATCHDOG=1`` every half of ``WatchdogSec`` from a task on the event loop: if the loop stops
  turning (a deadlock, a blocking call), the pings stop and systemd restarts the service;
* ``STATUS=...`` lines that ``systemctl status`` shows.

Without ``NOTIFY_SOCKET`` (any other way of running) every call does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

log = logging.getLogger("dbkeeper.systemd")


class SystemdNotifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        environ = dict(os.environ if environ is None else environ)
        self.address = environ.get("NOTIFY_SOCKET", "")
        self.watchdog_seconds = 0.0
        usec, pid = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1e6
        self.ready = False
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *lines: str) -> None:
        """Send ``KEY=value`` lines to systemd (never raises: systemd is an onlooker)."""
        if not self.enabled:
            return
        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]  # an abstract socket
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall("\n".join(lines).encode())
        except OSError as error:
            log.debug("could not notify systemd: %s", error)

    def ready_now(self, status: str) -> None:
        """``READY=1`` (once)."""
        if not self.ready:
            self.ready = True
            self.notify("READY=1", f"STATUS={status}")
            if self.enabled:
                log.info("told systemd: ready")

    def stopping(self, status: str = "shutting down") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def start_watchdog(self) -> None:
        if self.enabled and self.watchdog_seconds > 0 and self._watchdog is None:
            self._watchdog = asyncio.create_task(self._ping(), name="dbkeeper-watchdog")

    async def stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None

    async def _ping(self) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_seconds / 2)
