"""Alerts to the admins: when to send (the policy) and how (Telegram, or the log).

The rules follow Alertmanager's: messages on *transitions*, never one per check run.

- A check that gets worse (healthy -> degraded -> unhealthy, or a new check that is not
  healthy) triggers one message for that run, naming every check that got worse with its
  message, and listing the other checks still failing.
- A check that is healthy again is *resolved*, with how long its problem lasted; when the
  overall status is healthy again the message says so with the length of the whole episode.
  Getting better without recovering (unhealthy -> degraded) sends nothing.
- Changes come at most once a minute (``GROUP_SECONDS``, Alertmanager's grouping): what gets
  worse or recovers within a minute of the last message waits for the next report after it,
  so checks failing one after the other in an outage, or a flapping one, make one message.
  The first message of a problem and the final "healthy again" are never held.
- While a problem lasts, a reminder goes out at most every ``[health] alert_repeat_seconds``
  (4 hours by default) after the last message about it.
- One-off events (a failed backup, a failed startup) come through :meth:`Alerter.alert`; a
  ``key`` makes repeats of the same event within the repeat interval collapse into one.

Delivery never blocks the caller: texts go to a queue that a background task sends, retrying
while the Bot API fails, waiting out flood control, and splitting texts to Telegram's 4096
characters. At shutdown :meth:`Alerter.close` delivers what is queued, bounded by the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dtm
import logging
import socket
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from telegram import Bot
from telegram.error import (
    BadRequest,
    Forbidden,
    InvalidToken,
    RetryAfter,
    TelegramError,
)
from telegram.warnings import PTBDeprecationWarning

from dbkeeper.config import Settings
from dbkeeper.health import CheckResult, HealthReport, Status
from dbkeeper.logs import redact
from dbkeeper.plugin import Deadline
from dbkeeper.texts import duration, split_message

log = logging.getLogger("dbkeeper.alerts")
ICONS = {Status.HEALTHY: "✅", Status.DEGRADED: "⚠️", Status.UNHEALTHY: "🔴"}
MAX_QUEUED = 200  # chunks; beyond this the oldest are dropped (and logged)
BACKOFF_MAX_SECONDS = 60.0
PER_CHAT_INTERVAL_SECONDS = 1.0  # Telegram: about one message per second per chat
GROUP_SECONDS = 60.0  # changes within this of the last message wait and go out together


# -- the policy --------------------------------------------------------------------------------


@dataclass
class _Problem:
    status: Status
    since: float  # monotonic


class AlertPolicy:
    """Turns health reports and events into the texts to send (pure: no I/O)."""

    def __init__(
        self,
        repeat_seconds: float,
        *,
        source: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.repeat_seconds = repeat_seconds
        self.source = source or socket.gethostname()
        self._clock = clock
        self._problems: dict[str, _Problem] = {}
        self._episode_since: float | None = None
        self._last_sent: float | None = None
        self._events: dict[str, float] = {}
        # Held back by the grouping: checks that got worse, checks that recovered (how long).
        self._held_worse: set[str] = set()
        self._held_resolved: dict[str, float] = {}

    def observe(self, report: HealthReport) -> str | None:
        """The message this report calls for, if any."""
        now = self._clock()
        worse: list[CheckResult] = []
        resolved: list[tuple[CheckResult, float]] = []
        for check in report.checks.values():
            previous = self._problems.get(check.name)
            if check.status is Status.HEALTHY:
                if previous is not None:
                    resolved.append((check, now - previous.since))
                    del self._problems[check.name]
                continue
            if previous is None:
                self._problems[check.name] = _Problem(check.status, now)
                worse.append(check)
            elif check.status.rank > previous.status.rank:
                previous.status = check.status
                worse.append(check)
            else:
                previous.status = check.status
        for gone in set(self._problems) - set(report.checks):
            del self._problems[gone]  # a check that is no longer registered
        # What the grouping held, merged with this report's changes (the latest word counts).
        self._held_worse |= {c.name for c in worse}
        for check, lasted in resolved:
            self._held_resolved[check.name] = lasted
        self._held_worse -= {c.name for c, _ in resolved}
        for name in self._held_worse:
            self._held_resolved.pop(name, None)
        worse = [c for name, c in report.checks.items() if name in self._held_worse]
        resolved = [
            (c, self._held_resolved[name])
            for name, c in report.checks.items()
            if name in self._held_resolved
        ]

        if report.status is Status.HEALTHY:
            self._held_worse, self._held_resolved = set(), {}
            if self._episode_since is None:
                return None
            lasted, self._episode_since, self._last_sent = now - self._episode_since, None, None
            lines = [f"✅ {self._who()} is healthy again; the problem lasted {duration(lasted)}."]
            lines += [_recovered(c, t) for c, t in resolved]
            return "\n".join(lines)

        if self._episode_since is None:
            self._episode_since = now
        failing = [c for c in report.checks.values() if c.status is not Status.HEALTHY]
        if worse or resolved:
            if self._last_sent is not None and now - self._last_sent < GROUP_SECONDS:
                return None  # held: goes out with the first report a minute after the last
            self._last_sent = now
            self._held_worse, self._held_resolved = set(), {}
            names = {c.name for c in worse}
            lines = [f"{ICONS[report.status]} {self._who()} is {report.status.value}"]
            lines += [_line(c) for c in worse]
            lines += [_recovered(c, t) for c, t in resolved]
            still = [c for c in failing if c.name not in names]
            if still:
                lines.append("Still failing:")
                lines += [_line(c) for c in still]
            return "\n".join(lines)
        if self._last_sent is not None and now - self._last_sent < self.repeat_seconds:
            return None
        self._last_sent = now
        lines = [
            f"⏰ {self._who()} is still {report.status.value} "
            f"(for {duration(now - self._episode_since)})"
        ]
        lines += [_line(c) for c in failing]
        return "\n".join(lines)

    def event(self, text: str, key: str | None) -> str | None:
        """The message for a one-off event; None when the same ``key`` was sent recently."""
        now = self._clock()
        if key is not None:
            sent = self._events.get(key)
            if sent is not None and now - sent < self.repeat_seconds:
                return None
            self._events[key] = now
        return f"{self._who()}: {text}"

    def _who(self) -> str:
        return f"dbkeeper on {self.source}"


def _line(check: CheckResult) -> str:
    return f"{ICONS[check.status]} {check.name}: {check.status.value} — {check.message}"


def _recovered(check: CheckResult, lasted: float) -> str:
    return f"✅ {check.name} recovered after {duration(lasted)}: {check.message}"


# -- delivery ----------------------------------------------------------------------------------


def retry_after_seconds(error: RetryAfter) -> float:
    """``RetryAfter.retry_after`` is an int, or a timedelta with ``PTB_TIMEDELTA`` (v22.2)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = error.retry_after
    if isinstance(value, dtm.timedelta):
        return value.total_seconds()
    return float(value)


class TelegramSender:
    """Sends texts to chats from a background task; failures are retried, never raised.

    The bot is initialized lazily (the first alert may come before the application has
    connected, e.g. a migration failing at startup), each attempt bounded by ``init_timeout``.
    """

    def __init__(
        self,
        bot: Bot,
        chat_ids: Sequence[int],
        *,
        init_timeout: float = 10.0,
        per_chat_interval: float = PER_CHAT_INTERVAL_SECONDS,
    ) -> None:
        self.bot = bot
        self.chat_ids = list(chat_ids)
        self.init_timeout = init_timeout
        self.per_chat_interval = per_chat_interval
        self.sent = 0
        self.dropped = 0
        self._queue: deque[tuple[int, str]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._last_to: dict[int, float] = {}

    def submit(self, text: str) -> None:
        for chat_id in self.chat_ids:
            for piece in split_message(text):
                self._queue.append((chat_id, piece))
        while len(self._queue) > MAX_QUEUED:
            self._queue.popleft()
            self.dropped += 1
            log.error("too many undelivered alerts; dropped the oldest")
        self._idle.clear()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._deliver(), name="dbkeeper-alerts")

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def _deliver(self) -> None:
        backoff = 1.0
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            chat_id, text = self._queue[0]
            try:
                await asyncio.wait_for(self.bot.initialize(), self.init_timeout)
                await self._pace(chat_id)
                await self.bot.send_message(chat_id, text)
            except RetryAfter as error:
                wait = retry_after_seconds(error)
                log.warning("Telegram flood control: waiting %.0fs before the next alert", wait)
                await asyncio.sleep(wait)
                continue
            except (InvalidToken, Forbidden, BadRequest) as error:
                # Retrying cannot help: a wrong chat id, a bot the admin blocked, a bad token.
                self._queue.popleft()
                self.dropped += 1
                log.error("alert to chat %s not delivered: %s", chat_id, redact(str(error)))
                continue
            except (TelegramError, TimeoutError, OSError) as error:
                log.warning(
                    "cannot send an alert to Telegram (%s); retrying in %.0fs",
                    redact(str(error) or type(error).__name__),
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)
                continue
            except Exception:  # a bug must not stop the delivery of later alerts
                self._queue.popleft()
                self.dropped += 1
                log.exception("alert to chat %s not delivered", chat_id)
                continue
            self._last_to[chat_id] = time.monotonic()
            self._queue.popleft()
            self.sent += 1
            backoff = 1.0

    async def _pace(self, chat_id: int) -> None:
        last = self._last_to.get(chat_id)
        if last is not None:
            wait = self.per_chat_interval - (time.monotonic() - last)
            if wait > 0:
                await asyncio.sleep(wait)

    async def close(self, deadline: Deadline) -> None:
        """Deliver what is queued until ``deadline``; then give up on the rest."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), deadline.remaining())
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._queue:
            self.dropped += len(self._queue)
            log.error(
                "%d alert message(s) not delivered before shutdown (the Bot API did not "
                "answer in time); they are in this log",
                len(self._queue),
            )
            self._queue.clear()


class Alerter:
    """The host's alerts: health transitions and events, to Telegram or to the log."""

    def __init__(self, settings: Settings, bot: Bot | None, *, source: str | None = None) -> None:
        self.policy = AlertPolicy(settings.health.alert_repeat_seconds, source=source)
        self.logged = 0
        # With several instances on one database only the leader alerts; this names the
        # leader while this instance stands by (None: send). Set by the database plugin.
        self.standing_by: Callable[[], str | None] = lambda: None
        self._announced = False  # this instance sent the opening message of the current problem
        telegram = settings.telegram
        chats = [telegram.alert_chat_id] if telegram.alert_chat_id else list(telegram.admin_ids)
        self.telegram: TelegramSender | None = None
        if bot is not None and chats:
            self.telegram = TelegramSender(bot, chats)
        elif bot is not None:
            log.warning(
                "alerts go to the log only: set [telegram] alert_chat_id or admin_ids to "
                "receive them in Telegram"
            )

    def observe(self, report: HealthReport) -> None:
        """Health monitor listener. Whoever announced a problem also says it is resolved, even
        if it stands by meanwhile (a leader cut off from the database, replaced meanwhile); a
        problem nobody was told of (seen while standing by) ends without a message."""
        text = self.policy.observe(report)
        if text is None:
            return
        if report.status is Status.HEALTHY:
            announced, self._announced = self._announced, False
            if announced:
                self._send(text, resolves=True)
            else:  # a standby's problem, or one begun before it led: nobody was told of it
                log.info("not alerting a recovery that was never announced: %s", text[:200])
        elif self._send(text):
            self._announced = True

    async def alert(self, text: str, *, key: str | None = None) -> None:
        """Send an event alert (returns at once; delivery happens in the background)."""
        message = self.policy.event(text, key)
        if message is None:
            log.info("alert%s not repeated (sent recently): %s", _key(key), redact(text))
            return
        self._send(message)

    def _send(self, text: str, *, resolves: bool = False) -> bool:
        """Send ``text`` unless this instance stands by (``resolves``: send anyway)."""
        text = redact(text)
        leader = None if resolves else self.standing_by()
        if leader is not None:
            log.info("not alerting (standby; %s leads and alerts): %s", leader, text[:200])
            return False
        self.logged += 1
        log.warning("ALERT %s", text.replace("\n", " | "))
        if self.telegram is not None:
            self.telegram.submit(text)
        return True

    @property
    def sent(self) -> int:
        """Messages delivered to Telegram, or written to the log when there is no Telegram."""
        return self.telegram.sent if self.telegram is not None else self.logged

    @property
    def dropped(self) -> int:
        return self.telegram.dropped if self.telegram is not None else 0

    async def close(self, deadline: Deadline) -> None:
        if self.telegram is not None:
            await self.telegram.close(deadline)


def _key(key: str | None) -> str:
    return f" [{key}]" if key else ""
