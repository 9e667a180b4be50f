"""The health HTTP API (aiohttp), bound to ``[health] http_host:http_port``.

- ``GET /health``, ``GET /api/health``: the contract's JSON; 200 healthy or degraded, 503
  unhealthy (and 503 while starting, before the first check).
- ``GET /livez``: the process and its event loop answer; never touches the database.
- ``GET /readyz``: 200 once the plugins have started and the readiness checks (database
  reachable, schema at head) are not unhealthy; 503 while starting, stopping or failing.
- ``GET /metrics``: Prometheus text format.
- ``GET /``: the status page for operators (``dbkeeper.status_page``).

Health answers reuse a report younger than ``[health] http_cache_seconds``; otherwise one
check runs and every request waiting meanwhile shares it. Messages are redacted when the
checks produce them; the answers carry nothing else that could hold a secret.
"""

from __future__ import annotations

import base64
import errno
import hmac
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler

from dbkeeper.health import HealthReport, Status
from dbkeeper.http_guard import runner_options
from dbkeeper.plugin import StartupError

if TYPE_CHECKING:
    from dbkeeper.host import Host

log = logging.getLogger("dbkeeper.http")
NO_STORE = {"Cache-Control": "no-store"}
OPEN_PATHS = frozenset({"/livez", "/readyz"})  # probes: never behind the token


def _authorized(request: web.Request, token: str) -> bool:
    """``Authorization: Bearer TOKEN`` (Prometheus) or Basic with TOKEN as the password (a
    browser's login prompt), compared in constant time."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    else:
        return False
    return hmac.compare_digest(given.encode(), token.encode())


class HealthServer:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.settings = host.settings.health
        self.app = web.Application(middlewares=[self._operators_only])
        self.app.router.add_get("/", host.status.handle)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/api/health", self._health)
        self.app.router.add_get("/livez", self._livez)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
        self._metrics_handler = host.metrics.handler()
        self.extra_routes: list[str] = []
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def add_route(self, method: str, path: str, handler: Any) -> None:
        """A plugin's route (before ``start``): operators' pages and JSON under ``/api``."""
        self.app.router.add_route(method, path, handler)
        self.extra_routes.append(path)

    async def start(self) -> None:
        """Listen; a port in use (or any bind error) stops startup naming the address."""
        where = f"{self.settings.http_host}:{self.settings.http_port}"
        runner = web.AppRunner(
            self.app, access_log=None, handler_cancellation=True, **runner_options()
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.settings.http_host, self.settings.http_port)
            await site.start()
        except OSError as error:
            await runner.cleanup()
            if error.errno == errno.EADDRINUSE:
                reason = (
                    f"port {self.settings.http_port} is already in use (another dbkeeper, or "
                    "another program). Stop it, or set [health] http_port to a free port"
                )
            else:
                reason = f"{error.strerror or error}. Check [health] http_host and http_port"
            raise StartupError(f"the health HTTP API cannot listen on {where}: {reason}") from None
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info(
            "health HTTP API on http://%s:%d (/health, /livez, /readyz, /metrics)",
            self.settings.http_host,
            self.port,
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers --------------------------------------------------------------------------

    async def _report(self) -> HealthReport | None:
        if self.host.state == "starting":
            return None
        return await self.host.monitor.latest(self.settings.http_cache_seconds)

    async def _health(self, _request: web.Request) -> web.Response:
        report = await self._report()
        if report is None:
            body: dict[str, Any] = {
                "status": Status.UNHEALTHY.value,
                "timestamp": round(time.time(), 3),
                "uptime": round(self.host.uptime, 3),
                "checks": {},
                "message": "starting: the first health check has not run yet",
            }
            return web.json_response(body, status=503, headers=NO_STORE)
        code = 503 if report.status is Status.UNHEALTHY else 200
        body = report.to_json(self.host.uptime)
        body["instance"] = self.host.instance  # each instance answers with its own view
        body["leader"] = self.host.leader
        return web.json_response(body, status=code, headers=NO_STORE)

    async def _livez(self, _request: web.Request) -> web.Response:
        # Whether this instance leads right now: from memory, never the database.
        body = {
            "status": "alive",
            "uptime": round(self.host.uptime, 3),
            "leading": self.host.is_leader,
        }
        return web.json_response(body, headers=NO_STORE)

    async def _readyz(self, _request: web.Request) -> web.Response:
        if self.host.state != "running":
            return web.json_response({"status": self.host.state}, status=503, headers=NO_STORE)
        failing = self.host.not_ready(await self._report())
        if failing:
            body = {"status": "not ready", "checks": failing}
            return web.json_response(body, status=503, headers=NO_STORE)
        return web.json_response({"status": "ready"}, headers=NO_STORE)

    @web.middleware
    async def _operators_only(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        """With ``[health] http_token``: everything but the probes asks for it."""
        token = self.settings.http_token
        if not token or request.path in OPEN_PATHS or _authorized(request, token):
            return await handler(request)
        return web.json_response(
            {"status": "unauthorized", "message": "this page needs [health] http_token"},
            status=401,
            headers={**NO_STORE, "WWW-Authenticate": 'Basic realm="dbkeeper", charset="UTF-8"'},
        )

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        await self._report()  # fresh enough, like /health
        return await self._metrics_handler(request)
