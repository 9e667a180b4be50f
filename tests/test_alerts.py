"""Alerts: the transition rules, and delivery through a real PTB bot to the Bot API stand-in."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from dbkeeper.alerts import Alerter, AlertPolicy
from dbkeeper.app import build_application
from dbkeeper.config import Settings, settings_from_mapping
from dbkeeper.health import CheckResult, HealthReport, Status
from dbkeeper.plugin import Deadline
from dbkeeper.texts import duration, split_message
from tests.support.telegram_api import DEFAULT_TOKEN, TelegramAPIStandIn

H, D, U = Status.HEALTHY, Status.DEGRADED, Status.UNHEALTHY


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def report(**statuses: Status) -> HealthReport:
    """A report with one check per keyword; each message says the check's status."""
    checks = {
        name: CheckResult(name, status, f"{name} is {status.value}", None, 1.0)
        for name, status in statuses.items()
    }
    return HealthReport(Status.worst(statuses.values()), checks, time.time(), 0.0, 1.0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def policy(clock: Clock) -> AlertPolicy:
    return AlertPolicy(repeat_seconds=4 * 3600, source="box", clock=clock)


# -- the policy ---------------------------------------------------------------------------------


def test_healthy_reports_send_nothing(policy: AlertPolicy) -> None:
    assert policy.observe(report(database=H, database_size=H)) is None


def test_a_problem_is_sent_once_then_reminded_after_the_repeat_interval(
    policy: AlertPolicy, clock: Clock
) -> None:
    first = policy.observe(report(database=H, database_integrity=U))
    assert first == (
        "🔴 dbkeeper on box is unhealthy\n"
        "🔴 database_integrity: unhealthy — database_integrity is unhealthy"
    )
    for _ in range(10):  # every five minutes for 50 minutes: nothing new
        clock.now += 300
        assert policy.observe(report(database=H, database_integrity=U)) is None
    clock.now = 1000 + 4 * 3600
    reminder = policy.observe(report(database=H, database_integrity=U))
    assert reminder == (
        "⏰ dbkeeper on box is still unhealthy (for 4h 0m)\n"
        "🔴 database_integrity: unhealthy — database_integrity is unhealthy"
    )
    clock.now += 300
    assert policy.observe(report(database=H, database_integrity=U)) is None


def test_recovery_is_resolved_with_how_long_the_problem_lasted(
    policy: AlertPolicy, clock: Clock
) -> None:
    assert policy.observe(report(database=U)) is not None
    clock.now += 125
    assert policy.observe(report(database=U)) is None
    clock.now += 600
    resolved = policy.observe(report(database=H))
    assert resolved == (
        "✅ dbkeeper on box is healthy again; the problem lasted 12m 5s.\n"
        "✅ database recovered after 12m 5s: database is healthy"
    )
    clock.now += 300
    assert policy.observe(report(database=H)) is None


def test_worse_is_sent_better_is_not(policy: AlertPolicy, clock: Clock) -> None:
    assert policy.observe(report(database_backups=D)) is not None
    clock.now += 60
    worse = policy.observe(report(database_backups=U))
    assert worse is not None and worse.startswith("🔴 dbkeeper on box is unhealthy\n")
    clock.now += 60
    assert policy.observe(report(database_backups=D)) is None  # better, not recovered
    clock.now += 60
    again = policy.observe(report(database_backups=D, disk_space=D))  # a new problem
    assert again == (
        "⚠️ dbkeeper on box is degraded\n"
        "⚠️ disk_space: degraded — disk_space is degraded\n"
        "Still failing:\n"
        "⚠️ database_backups: degraded — database_backups is degraded"
    )


def test_a_check_that_recovers_while_another_fails_is_resolved_alone(
    policy: AlertPolicy, clock: Clock
) -> None:
    policy.observe(report(database=U, database_size=D))
    clock.now += 90
    message = policy.observe(report(database=H, database_size=D))
    assert message == (
        "⚠️ dbkeeper on box is degraded\n"
        "✅ database recovered after 1m 30s: database is healthy\n"
        "Still failing:\n"
        "⚠️ database_size: degraded — database_size is degraded"
    )


def test_changes_within_a_minute_of_the_last_message_go_out_together(
    policy: AlertPolicy, clock: Clock
) -> None:
    """An outage that takes the checks down one after the other, and a check that flaps: one
    message, then one more a minute later, then the recovery at once."""
    assert policy.observe(report(database=U, database_growth=H)) is not None
    for growth in (U, H, U):  # within the minute: held
        clock.now += 10
        assert policy.observe(report(database=U, database_growth=growth)) is None
    clock.now += 30
    assert policy.observe(report(database=U, database_growth=U)) == (
        "🔴 dbkeeper on box is unhealthy\n"
        "🔴 database_growth: unhealthy — database_growth is unhealthy\n"
        "Still failing:\n"
        "🔴 database: unhealthy — database is unhealthy"
    )
    clock.now += 5
    assert policy.observe(report(database=U, database_growth=H)) is None  # held
    clock.now += 5  # the end of the outage is never held
    assert policy.observe(report(database=H, database_growth=H)) == (
        "✅ dbkeeper on box is healthy again; the problem lasted 1m 10s.\n"
        "✅ database recovered after 1m 10s: database is healthy\n"
        "✅ database_growth recovered after 35s: database_growth is healthy"
    )


def test_events_with_a_key_are_not_repeated_within_the_interval(
    policy: AlertPolicy, clock: Clock
) -> None:
    assert policy.event("backup failed: disk full", "backup") == (
        "dbkeeper on box: backup failed: disk full"
    )
    clock.now += 3600
    assert policy.event("backup failed: disk full again", "backup") is None
    assert policy.event("startup failed", "startup") is not None
    assert policy.event("no key: always sent", None) is not None
    assert policy.event("no key: always sent", None) is not None
    clock.now += 4 * 3600
    assert policy.event("backup failed: still full", "backup") is not None


def test_durations_read_naturally() -> None:
    assert [duration(s) for s in (0, 45, 725, 12000, 190000)] == [
        "0s",
        "45s",
        "12m 5s",
        "3h 20m",
        "2d 4h",
    ]


def test_long_texts_are_split_at_line_ends_within_telegrams_limit() -> None:
    lines = [f"line {i:04d} " + "x" * 90 for i in range(100)]  # ~10,000 characters
    pieces = split_message("\n".join(lines))
    assert len(pieces) == 3
    assert all(len(piece) <= 4096 for piece in pieces)
    assert "\n".join(pieces).splitlines() == lines
    # Telegram counts UTF-16 code units: an emoji outside the BMP counts twice.
    emoji = split_message("🔴" * 3000)
    assert [len(piece.encode("utf-16-le")) // 2 for piece in emoji] == [4096, 1904]
    assert split_message("") == []


def test_a_count_of_one_is_singular() -> None:
    from dbkeeper.texts import counted

    assert [counted(n, "table") for n in (0, 1, 4, 1234)] == [
        "0 tables",
        "1 table",
        "4 tables",
        "1,234 tables",
    ]


def test_the_message_limit_is_telegrams() -> None:
    from telegram.constants import MessageLimit

    from dbkeeper.texts import MAX_MESSAGE_LENGTH

    assert MAX_MESSAGE_LENGTH == MessageLimit.MAX_TEXT_LENGTH


# -- delivery -----------------------------------------------------------------------------------


@pytest.fixture
def standin() -> Iterator[TelegramAPIStandIn]:
    with TelegramAPIStandIn() as api:
        yield api


def telegram_settings(api: TelegramAPIStandIn, **telegram: Any) -> Settings:
    values = {"token": DEFAULT_TOKEN, "api_base_url": api.base_url, "admin_ids": [11, 22]}
    return settings_from_mapping({"telegram": {**values, **telegram}}, environ={})


@contextlib.asynccontextmanager
async def alerter(settings: Settings) -> AsyncIterator[Alerter]:
    """The host's alerter on a real PTB bot (not initialized: the alerter does it lazily)."""
    bot = build_application(settings).bot
    alerts = Alerter(settings, bot)
    try:
        yield alerts
    finally:
        await alerts.close(Deadline.after(5))
        await bot.shutdown()


async def test_alerts_go_to_each_admin_or_to_the_alert_chat(standin: TelegramAPIStandIn) -> None:
    async with alerter(telegram_settings(standin)) as alerts:
        await alerts.alert("backup failed: disk full", key="backup")
        for chat in (11, 22):
            sent = await standin.wait_for_message_async("backup failed", chat_id=chat)
            assert sent["text"].endswith(": backup failed: disk full")
    async with alerter(telegram_settings(standin, alert_chat_id=-100777)) as alerts:
        await alerts.alert("second", key="other")
        await standin.wait_for_message_async("second", chat_id=-100777)
    assert [m["chat_id"] for m in standin.sent_messages()] == [11, 22, -100777]


async def test_health_transitions_are_delivered(standin: TelegramAPIStandIn) -> None:
    async with alerter(telegram_settings(standin, alert_chat_id=5)) as alerts:
        alerts.observe(report(database=U))
        alerts.observe(report(database=U))
        alerts.observe(report(database=H))
        await standin.wait_for_message_async("healthy again", chat_id=5)
    texts = [m["text"] for m in standin.sent_messages(5)]
    assert len(texts) == 2
    assert "🔴 database: unhealthy — database is unhealthy" in texts[0]
    assert "✅ database recovered after 0s" in texts[1]


@pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")  # PTB's own
async def test_flood_control_is_waited_out(standin: TelegramAPIStandIn) -> None:
    standin.flood("sendMessage", retry_after=1, times=1)
    async with alerter(telegram_settings(standin, alert_chat_id=5)) as alerts:
        await alerts.alert("after the flood")
        await standin.wait_for_message_async("after the flood", chat_id=5, timeout=10)
    statuses = [call.status for call in standin.calls("sendMessage")]
    assert statuses == [429, 200]
    first, second = standin.calls("sendMessage")
    assert second.time - first.time >= 1.0


async def test_a_failing_bot_api_is_retried_in_the_background(
    standin: TelegramAPIStandIn,
) -> None:
    standin.fail()  # every method answers 500
    async with alerter(telegram_settings(standin, alert_chat_id=5)) as alerts:
        started = time.monotonic()
        await alerts.alert("while Telegram is down")
        assert time.monotonic() - started < 0.5  # returned at once
        await standin.wait_for_async(lambda: standin.calls(), description="a first attempt")
        assert standin.sent_messages() == []
        standin.recover()
        await standin.wait_for_message_async("while Telegram is down", chat_id=5, timeout=10)
    assert standin.calls()[0].status == 500  # failed, then retried
    assert alerts.sent == 1 and alerts.dropped == 0


async def test_closing_gives_up_at_the_deadline_when_the_bot_api_is_dead(
    standin: TelegramAPIStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    settings = telegram_settings(standin, alert_chat_id=5)
    bot = build_application(settings).bot
    alerts = Alerter(settings, bot)
    standin.fail()
    await alerts.alert("nobody will read this")
    started = time.monotonic()
    await alerts.close(Deadline.after(1.0))
    assert time.monotonic() - started < 2.0
    await bot.shutdown()
    assert alerts.dropped == 1
    assert "1 alert message(s) not delivered before shutdown" in caplog.text


async def test_long_alerts_arrive_whole_in_pieces_of_at_most_4096(
    standin: TelegramAPIStandIn,
) -> None:
    lines = [f"{i:03d} " + "y" * 60 for i in range(100)]  # ~6,500 characters
    async with alerter(telegram_settings(standin, alert_chat_id=5)) as alerts:
        await alerts.alert("\n".join(lines))
        await standin.wait_for_async(lambda: len(standin.sent_messages(5)) == 2, timeout=10)
    texts = [m["text"] for m in standin.sent_messages(5)]
    assert all(len(text) <= 4096 for text in texts)
    assert "\n".join(texts).splitlines()[1:] == lines[1:]  # the first line carries the prefix


async def test_no_secret_reaches_a_chat_message(standin: TelegramAPIStandIn) -> None:
    async with alerter(telegram_settings(standin, alert_chat_id=5)) as alerts:
        await alerts.alert(
            f"cannot open postgresql://bot:hunter2-pw@db/bot with bot token {DEFAULT_TOKEN}"
        )
        sent = await standin.wait_for_message_async("cannot open", chat_id=5)
    assert "hunter2-pw" not in sent["text"] and DEFAULT_TOKEN not in sent["text"]
    assert "postgresql://bot:***@db/bot" in sent["text"]


async def test_local_mode_alerts_go_to_the_log(caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_from_mapping({}, environ={})
    alerts = Alerter(settings, None)
    caplog.set_level(logging.WARNING, logger="dbkeeper.alerts")
    alerts.observe(report(database=U))
    await alerts.alert("backup failed: disk full", key="backup")
    await alerts.alert("backup failed: disk full", key="backup")  # collapsed
    await alerts.close(Deadline.after(1))
    lines = [r.getMessage() for r in caplog.records if r.name == "dbkeeper.alerts"]
    assert len(lines) == 2
    assert lines[0].startswith("ALERT 🔴 dbkeeper on ") and "| 🔴 database: unhealthy" in lines[0]
    assert lines[1].endswith(": backup failed: disk full")
    assert alerts.sent == 2


async def test_whoever_announced_a_problem_resolves_it_even_when_standing_by() -> None:
    """A leader cut off from the database alerts its outage; replaced meanwhile, it still sends
    the resolution (nobody else announced it). A standby never resolves what it did not say."""
    settings = settings_from_mapping({}, environ={})
    speaking = {"alpha": True, "beta": False}
    alpha, beta = Alerter(settings, None, source="alpha"), Alerter(settings, None, source="beta")
    alpha.standing_by = lambda: None if speaking["alpha"] else "beta"
    beta.standing_by = lambda: None if speaking["beta"] else "alpha"
    alpha.observe(report(database=U))  # only alpha is cut off
    beta.observe(report(database=H))
    speaking.update(alpha=False, beta=True)  # beta took over meanwhile
    for alerts in (alpha, beta):
        alerts.observe(report(database=H))
    assert (alpha.sent, beta.sent) == (2, 0)
    alpha.observe(report(database=U))  # a new problem, seen while standing by: not sent
    alpha.observe(report(database=H))
    assert alpha.sent == 2

    speaking.update(alpha=True, beta=False)
    beta.observe(report(database=U))  # a problem of beta's while it stands by (logged only)
    speaking.update(alpha=False, beta=True)  # it leads before its problem ends
    beta.observe(report(database=H))
    assert beta.sent == 0  # no "healthy again" for a problem nobody was told of
