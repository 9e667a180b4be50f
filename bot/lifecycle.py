"""The bot's lifecycle, written in the order it runs.

Startup
  1. SIGINT and SIGTERM are routed to a graceful shutdown.
  2. The health HTTP API binds ``[health] http_host:http_port``: a port in use stops the
     process with exit status 1 before anything else happens. ``/livez`` answers from here on;
     ``/readyz`` says "starting".
  3. Plugins start in order; the database plugin first (connect, migrate, validate). A plugin
     that cannot start stops the process with exit status 1 and its reason in the log (and in
     an alert to the admins, delivered before the process exits).
  4. The first health check starts (in the background: a slow check never holds startup);
     the next ones are scheduled every ``[health] interval_seconds``. ``/readyz`` answers
     from the checks from here on.
  5. The job queue starts: scheduled health checks and backups run from here on.
  6. Telegram mode: connect to the Bot API (retrying while it is unreachable), register the
     admins' command menu, then take updates: through the webhook on every instance, or by
     polling on the leader only (a standby starts polling when it takes over). Local mode (no
     token): one log line says so; nothing talks to Telegram and alerts go to the log.

Under systemd (``NOTIFY_SOCKET``, deploy/systemd/dbkeeper.service) the watchdog is fed from
the start, READY=1 is said the moment ``/readyz`` first answers 200, STOPPING=1 when the
shutdown starts (``dbkeeper.systemd``).

A signal while starting (steps 2-4; e.g. during a migration that runs for minutes) does not
wait for the start to finish: every plugin is asked to give up (``Plugin.interrupt``; the
database plugin cancels the running revision's statement, rolls it back and records the
attempt as interrupted), then what had started stops in the order below, within the same
budget. Exit status 0: the stop was asked for and done cleanly (the log says what was
interrupted; the next start applies the revision). A start that fails for any other reason
exits 1, as before.

Running, until a signal arrives.

Shutdown, within ``[shutdown] timeout_seconds`` (9 s: under ``docker stop``'s 10 s grace)
  1. Stop taking updates.
  2. Let running handlers and jobs finish (a backup in progress completes); the job queue stops.
  3. Health checks stop; ``/readyz`` says "stopping". Plugins stop in reverse order; the
     database plugin last (flush, final backup, close).
  4. Alerts still queued are delivered (until the deadline: a dead Bot API never holds the
     exit); the HTTP API closes.
  5. Release the Bot API connection (PTB cannot send after this). Exit status 0.

A second signal during shutdown is logged and otherwise ignored: stopping half-way could leave
a half-written backup or a half-closed database.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import math
import signal
import time
from urllib.parse import urlsplit

from telegram.error import InvalidToken, TelegramError

from dbkeeper.app import gate_updates
from dbkeeper.host import Host
from dbkeeper.plugin import Deadline, StartupError, StartupInterrupted

log = logging.getLogger("dbkeeper.lifecycle")
EXIT_OK = 0
EXIT_STARTUP_FAILED = 1
TELEGRAM_RETRY_MAX_SECONDS = 60.0
LONG_POLL_SECONDS = 10.0  # PTB's default getUpdates timeout
LONG_POLL_SPARE_SECONDS = 0.5  # a long poll ends this long before a standby may poll


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a shutdown request; later ones are only logged."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signal_name: str | None = None
        self.failed = False  # set when a fatal error (not a signal) requested the stop
        self.at: float | None = None  # when (monotonic) the stop was requested

    def fail(self, reason: str) -> None:
        log.error("%s", reason)
        self.failed = True
        self._request()

    def _request(self) -> None:
        self.at = time.monotonic()
        self.event.set()

    @property
    def reason(self) -> str:
        return f"received {self.signal_name}" if self.signal_name else "a fatal error"

    def deadline(self, budget: float) -> Deadline:
        """The shutdown deadline: ``budget`` seconds from the request."""
        return Deadline((self.at if self.at is not None else time.monotonic()) + budget)

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._received, sig)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    def _received(self, sig: signal.Signals) -> None:
        name = signal.Signals(sig).name
        if self.event.is_set():
            log.warning("received %s again: the graceful shutdown is already running", name)
            return
        self.signal_name = name
        log.info("received %s: shutting down", name)
        self._request()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for a request (at most ``timeout`` seconds); True if one arrived."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            return False
        return True


async def run(host: Host) -> int:
    """Run the host until SIGINT/SIGTERM; return the process exit status."""
    stop = StopRequest()
    stop.install()
    try:
        return await _run(host, stop)
    finally:
        stop.uninstall()


async def _run(host: Host, stop: StopRequest) -> int:
    host.systemd.start_watchdog()  # the loop turns during a long migration too
    try:
        return await _run_started(host, stop)
    finally:
        await host.systemd.stop_watchdog()


async def _run_started(host: Host, stop: StopRequest) -> int:
    settings = host.settings
    budget = settings.shutdown.timeout_seconds
    # Startup 2-4: the HTTP API, the plugins (the database first), the health checks; a
    # signal meanwhile interrupts them.
    try:
        await _start(host, stop, budget)
    except StartupInterrupted as error:
        log.warning("startup interrupted: %s", error)
        await _release_bot(host)
        log.info("shutdown complete")
        return EXIT_OK
    except StartupError as error:
        log.error("startup failed: %s", error)
        host.systemd.stopping(f"startup failed: {error}")
        await _release_bot(host)
        return EXIT_STARTUP_FAILED
    telegram: asyncio.Task[None] | None = None
    if not stop.event.is_set():  # a signal that came too late to interrupt the start
        # Everything imported and built so far lives until exit: keeping it out of the garbage
        # collector's way shortens its pauses (bench/README.md: a 61 ms stall became 14 ms).
        gc.freeze()
        # Startup 5: scheduled work.
        await host.job_queue.start()
        # Startup 6: Telegram, or say once that there is none.
        if host.telegram_enabled:
            telegram = asyncio.create_task(_start_telegram(host, stop), name="dbkeeper-telegram")
            telegram.add_done_callback(lambda task: _telegram_start_failed(task, stop))
        else:
            log.info(
                "local mode: no Telegram token ([telegram] token or TELEGRAM_BOT_TOKEN), so "
                "chat commands and Telegram alerts are off; the database plugin runs as usual"
            )
        log.info("dbkeeper is running; SIGINT or SIGTERM stops it gracefully")

    await stop.event.wait()

    deadline = stop.deadline(budget)
    host.systemd.stopping()
    log.info("shutdown: budget %.1fs", deadline.remaining())
    if telegram is not None and not telegram.done():
        telegram.cancel()  # still retrying to reach Telegram: give up, we are stopping
    application = host.application
    # Shutdown 1: stop taking updates.
    if application.updater is not None and application.updater.running:
        log.info("shutdown: stopping taking updates")
        await application.updater.stop()
    # Shutdown 2: running handlers and jobs finish; the job queue stops.
    log.info("shutdown: waiting for running handlers and jobs")
    if application.running:
        await application.stop()
    else:
        await host.job_queue.stop(wait=True)
    log.info("shutdown: running handlers and jobs finished")
    await _bot_hook(host, "post_stop")
    # Shutdown 3-4: health checks, plugins in reverse order (the database last), alerts, HTTP.
    await host.stop(deadline)
    # Shutdown 5: the Bot API connection.
    await application.shutdown()  # a no-op when it never connected
    await _bot_hook(host, "post_shutdown")
    await _release_bot(host)
    log.info("shutdown complete")
    return EXIT_STARTUP_FAILED if stop.failed else EXIT_OK


async def _start(host: Host, stop: StopRequest, budget: float) -> None:
    """``host.start()``; a stop requested meanwhile interrupts the plugins' start instead of
    waiting for it (a migration can run for minutes), with the shutdown budget counted from
    the request."""
    starting = asyncio.ensure_future(host.start())
    requested = asyncio.ensure_future(stop.event.wait())
    try:
        await asyncio.wait({starting, requested}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("shutdown: interrupting the start (%s)", stop.reason)
            await host.interrupt(stop.reason, stop.deadline(budget))
        await starting
    finally:
        requested.cancel()


async def _start_telegram(host: Host, stop: StopRequest) -> None:
    """Connect to the Bot API, retrying while it is unreachable, then take updates."""
    application = host.application
    delay = 1.0
    while not stop.event.is_set():
        try:
            await application.initialize()
            break
        except InvalidToken:
            stop.fail(
                "startup failed: Telegram rejected the bot token; "
                "check [telegram] token or TELEGRAM_BOT_TOKEN"
            )
            return
        except TelegramError as error:
            log.warning("cannot reach the Telegram Bot API (%s); retrying in %.0fs", error, delay)
            if await stop.wait(delay):
                return
            delay = min(delay * 2, TELEGRAM_RETRY_MAX_SECONDS)
    if stop.event.is_set():
        return
    log.info("connected to the Telegram Bot API as @%s", application.bot.username)
    await host.telegram_ready()
    await _bot_hook(host, "post_init")
    await application.start()
    telegram = host.settings.telegram
    if telegram.webhook_url:
        await _serve_webhook(host)
    elif application.updater is not None:
        await _poll_while_leading(host)


def _telegram_start_failed(task: asyncio.Task[None], stop: StopRequest) -> None:
    """A Telegram start that failed for good (not a retryable outage) stops the process."""
    if task.cancelled() or task.exception() is None:
        return
    error = task.exception()
    log.error("taking updates from Telegram failed", exc_info=error)
    stop.fail(f"startup failed: cannot take updates from Telegram: {error}")


async def _serve_webhook(host: Host) -> None:
    """Webhook mode: every instance serves the updates Telegram sends it (PTB's server)."""
    telegram = host.settings.telegram
    updater = host.application.updater
    assert updater is not None
    await updater.start_webhook(
        listen=telegram.webhook_listen,
        port=telegram.webhook_port,
        url_path=urlsplit(telegram.webhook_url).path.lstrip("/"),
        webhook_url=telegram.webhook_url,
        secret_token=telegram.webhook_secret or None,
    )
    log.info(
        "taking updates from Telegram through the webhook (%s:%d)",
        telegram.webhook_listen,
        telegram.webhook_port,
    )


def polling_pace(margin: float) -> tuple[dt.timedelta, float]:
    """(getUpdates' long-poll timeout, the pause between requests) for an election margin.

    A long poll sent just before the lease runs out must end before a standby may poll, so it
    lasts less than the margin (half a second to spare for the request's own way). The Bot API
    takes whole seconds: under a margin of 1.5 s there is no long poll at all, and the requests
    are spaced by half the margin instead (PTB's ``poll_interval``).
    """
    seconds = math.floor(min(LONG_POLL_SECONDS, margin - LONG_POLL_SPARE_SECONDS))
    if seconds >= 1:
        return dt.timedelta(seconds=seconds), 0.0
    return dt.timedelta(0), margin / 2


async def _poll_while_leading(host: Host) -> None:
    """Polling mode: Telegram serves one getUpdates poller per token (a second gets 409
    Conflict), so only the leader polls; a standby starts when it takes over.

    Each getUpdates asks the election first (``gate_updates``): a leader whose lease ran out
    sends none, even before it has stopped polling. A long poll lasts at most the election's
    margin (``polling_pace``), so one still open when a leader stopped confirming ends before a
    standby polls."""
    updater = host.application.updater
    assert updater is not None
    gate_updates(host.application, lambda: host.is_leader)
    long_poll, pause = polling_pace(host.leadership.margin_seconds)

    async def follow(is_leader: bool) -> None:
        if host.state in ("stopping", "stopped"):
            return  # shutdown stops the updater itself; never start polling again
        if is_leader and not updater.running:
            await updater.start_polling(
                timeout=long_poll, poll_interval=pause, error_callback=_log_polling_error
            )
            log.info("taking updates from Telegram (polling)")
        elif not is_leader and updater.running:
            await updater.stop()
            log.info("stopped polling: %s leads and polls", host.leader or "no instance now")

    host.leadership.on_change(follow)
    if not host.is_leader:
        log.info("standing by: %s leads and polls Telegram", host.leader or "another instance")
    await follow(host.is_leader)


async def _bot_hook(host: Host, name: str) -> None:
    """A bot that embeds dbkeeper keeps its own ``post_init``/``post_stop``/``post_shutdown``
    (PTB calls them only from ``run_polling``): they run at the same points here."""
    hook = host.bot_hooks.get(name)
    if hook is None:
        return
    try:
        await hook(host.application)
    except Exception:
        log.exception("the bot's %s failed", name)


async def _release_bot(host: Host) -> None:
    """Close the bot's HTTP client when an alert opened it but the application never did."""
    if host.telegram_enabled:
        await host.application.bot.shutdown()  # a no-op when it is not initialized


def _log_polling_error(error: TelegramError) -> None:
    log.warning("fetching updates from Telegram failed: %s; PTB retries", error)
