"""The admin chat commands: /health, /dbstats (database care's figures too), /backup.

Each handler is a thin caller of the plugin (the same methods the CLI and the HTTP API use);
this module only decides what to say. Answers use HTML parse mode with every outside value
escaped, are readable on a phone (one fact per line, the verdict first) and are split at
Telegram's 4096 characters. Who is answered at all is the host's admin rule (a PTB filter on
each handler, in the plugin's own handler group: the bot's own handlers see every update).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from telegram import Update
from telegram.constants import ChatAction, FileSizeLimit, ParseMode
from telegram.error import TelegramError
from telegram.ext import ContextTypes

from dbkeeper.health import HealthReport, Status
from dbkeeper.plugin import PluginContext
from dbkeeper.texts import counted, duration, escape, megabytes, split_message

from .backup.manifest import Backup
from .backup.pipeline import BackupStats
from .care import CareSummary
from .errors import BackupError, BackupInProgress
from .health.checks import DatabaseStatistics
from .offsite.checks import summary as offsite_summary
from .offsite.uploads import OffsiteStatus, UploadReport

if TYPE_CHECKING:
    from .plugin import DatabasePlugin

log = logging.getLogger("dbkeeper.commands")
ICONS = {Status.HEALTHY: "✅", Status.DEGRADED: "⚠️", Status.UNHEALTHY: "🔴"}
MENU = [
    ("health", "Database health, one line per check"),
    ("dbstats", "Schema, migrations, tables and backups"),
    ("backup", "Take a verified backup now"),
]
TABLES_SHOWN = 15
QUERY_CHARS = 160  # a statement's shape in /dbstats is cut here (GET /api/queries has more)
ERROR_CHARS = 400  # an error quoted in an answer is cut here: the log has all of it


class AdminCommands:
    def __init__(self, plugin: DatabasePlugin, context: PluginContext) -> None:
        self.plugin = plugin
        self.context = context

    def install(self) -> None:
        callbacks = {"health": self.health, "dbstats": self.dbstats, "backup": self.backup}
        for command, description in MENU:
            self.context.add_admin_command(command, callbacks[command], description)

    # -- the commands ---------------------------------------------------------------------

    async def health(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        report = await self.context.health_report()
        await self._answer(update, format_health(report, self.context.describe_instance()))

    async def dbstats(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert self.plugin.health is not None
        try:
            stats = await self.plugin.health.statistics()
        except Exception as error:  # a hung or unreachable database: say so, do not go silent
            await self._answer(
                update,
                f"🔴 Cannot read the database statistics: {escape(_short(error))}\n"
                "/health shows what is wrong.",
            )
            return
        backups = await asyncio.to_thread(self.plugin.backups.stats)
        care = None
        if self.plugin.care is not None:
            try:
                timeout = self.context.settings.health.check_timeout_seconds
                care = await asyncio.wait_for(self.plugin.care.summary(), timeout)
            except Exception as error:  # the rest of the answer still stands
                log.warning("/dbstats: database care figures unavailable: %s", _short(error))
        offsite = self.plugin.operations.offsite
        copies = await asyncio.to_thread(offsite.status) if offsite is not None else None
        text = format_dbstats(
            stats,
            backups,
            self.plugin.database.display_url,
            self.context.describe_instance(),
            care=care,
            offsite=copies,
        )
        replication = self.plugin.replication
        if replication is not None and replication.applies:  # its lines (offsite/replication)
            text += f"\n<b>Replication</b> {escape(await replication.summary())}"
        await self._answer(update, text)

    async def backup(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if self.plugin.backups.running:
            await self._answer(update, "⏳ A backup is already running; I did not start another.")
            return
        await self._answer(update, "⏳ Taking a backup…")
        try:
            info = await self.plugin.backup_now("manual")
        except BackupInProgress:
            await self._answer(update, "⏳ A backup is already running; I did not start another.")
            return
        except BackupError as error:
            await self._answer(
                update,
                f"❌ The backup failed: {escape(_short(error))}\nOlder backups are untouched.",
            )
            return
        await self._answer(update, format_backup(info))
        if self.plugin.uploads is not None:
            report = await self.plugin.uploads.wait()
            if report is not None:
                await self._answer(update, format_upload(report, info.name))
        if self.plugin.operations.backup_settings.send_to_chat:
            await self._upload(update, context, info)

    # -- plumbing -------------------------------------------------------------------------

    async def _upload(
        self, update: Update, context: ContextTypes.DEFAULT_TYPE, info: Backup
    ) -> None:
        limit = self.upload_limit()
        if info.size_bytes > limit:
            where = (
                "a local Bot API server"
                if limit > FileSizeLimit.FILESIZE_UPLOAD
                else ("Telegram's Bot API")
            )
            await self._answer(
                update,
                f"📎 Not sent: {megabytes(info.size_bytes)} is over the {megabytes(limit)} "
                f"upload limit of {where}. The file stays in the backup directory.",
            )
            return
        chat = update.effective_chat
        assert chat is not None
        await context.bot.send_chat_action(chat.id, ChatAction.UPLOAD_DOCUMENT)
        data = await asyncio.to_thread(info.path.read_bytes)  # PTB would read it on the loop
        try:
            await context.bot.send_document(
                chat.id,
                document=data,
                filename=info.name,
                caption=f"sha256 {info.sha256}",
                write_timeout=300,
                read_timeout=300,
            )
        except TelegramError as error:
            await self._answer(update, f"📎 Not sent: {escape(_short(error))}")

    def upload_limit(self) -> int:
        if self.context.settings.telegram.local_bot_api:
            return int(FileSizeLimit.FILESIZE_UPLOAD_LOCAL_MODE)
        return int(FileSizeLimit.FILESIZE_UPLOAD)

    async def _answer(self, update: Update, text: str) -> None:
        message = update.effective_message
        assert message is not None
        for piece in split_message(text):
            await message.reply_text(piece, parse_mode=ParseMode.HTML, do_quote=False)


# -- what the answers say (pure: tested without Telegram) -------------------------------------


def format_health(report: HealthReport, instance: str = "") -> str:
    age = report.age()
    lines = [f"{ICONS[report.status]} <b>{report.status.value}</b>"]
    if instance:
        lines.append(f"<i>{escape(instance)}</i>")
    for check in sorted(report.checks.values(), key=lambda c: (-c.status.rank, c.name)):
        latency = f" ({check.latency_ms:.0f} ms)" if check.latency_ms is not None else ""
        lines.append(
            f"{ICONS[check.status]} <b>{escape(check.name)}</b>: {escape(check.message)}{latency}"
        )
    lines.append(f"checked {duration(age)} ago" if age >= 1 else "checked just now")
    return "\n".join(lines)


def format_dbstats(
    stats: DatabaseStatistics,
    backups: BackupStats,
    url: str,
    instance: str = "",
    *,
    care: CareSummary | None = None,
    offsite: OffsiteStatus | None = None,
) -> str:
    status, migrations, overview = stats.status, stats.migrations, stats.overview
    lines = [f"<b>Database</b> {escape(url)}"]
    if instance:
        lines.append(f"<i>{escape(instance)}</i>")
    lines.append(f"Schema v{status.current_version} ({len(status.pending)} pending)")
    last = _when(migrations.last_applied_at) if migrations.last_applied_at else "never"
    lines.append(
        f"Migrations: {migrations.applied} applied, {migrations.failed} failed, "
        f"last {last}, {migrations.total_ms:,} ms in total"
    )
    lines.append(
        f"Size {megabytes(stats.size_bytes)} · {counted(overview.tables, 'table')} · "
        f"≈{counted(overview.records, 'record')}"
    )
    ranked = sorted(overview.records_per_table.items(), key=lambda item: (-item[1], item[0]))
    for name, records in ranked[:TABLES_SHOWN]:
        lines.append(f"  • {escape(name)}: ≈{records:,}")
    if len(ranked) > TABLES_SHOWN:
        rest = sum(records for _, records in ranked[TABLES_SHOWN:])
        lines.append(f"  … and {len(ranked) - TABLES_SHOWN} more tables (≈{rest:,} records)")
    if backups.count:
        assert backups.newest is not None and backups.oldest is not None
        lines.append(
            f"<b>Backups</b> {backups.count} · {megabytes(backups.total_bytes)} · newest "
            f"{_when(backups.newest.created_at)} ({_ago(backups.newest.created_at)}) · oldest "
            f"{_when(backups.oldest.created_at)}"
        )
    else:
        lines.append("<b>Backups</b> none yet")
    lines += _full_check_lines(backups)
    other_damaged = backups.damaged - len(backups.full_check_failed)
    if other_damaged > 0:
        lines.append(
            f"⚠️ {other_damaged} damaged backup file{'s' if other_damaged > 1 else ''} not "
            "counted (<code>dbkeeper backup list</code> names them)"
        )
    if backups.last_failure is not None:
        lines.append(
            f"⚠️ Last backup attempt failed {_ago(backups.last_failure.at)}: "
            f"{escape(_short(backups.last_failure.error))}"
        )
    if offsite is not None:
        lines.append(f"<b>Off-site</b> {escape(offsite_summary(offsite))}")
        if offsite.failing and offsite.last_failure_at is not None:
            lines.append(
                f"⚠️ Last upload failed {_ago(offsite.last_failure_at)}: "
                f"{escape(_short(offsite.last_failure))}"
            )
    if care is not None:
        lines += format_care(care)
    return "\n".join(lines)


def _full_check_lines(backups: BackupStats) -> list[str]:
    """/dbstats' full integrity checks: the newest backup that passed, pending, failed."""
    if not backups.count and not backups.full_check_failed:
        return []
    checked = backups.newest_fully_checked
    text = (
        f"newest passed: {escape(checked.name)} ({escape(checked.full_check_text)})"
        if checked is not None
        else "no backup has passed yet"
    )
    pending = len(backups.full_check_pending)
    if pending:
        running = " (one running)" if backups.checking else ""
        text += f" · {pending} pending{running}"
    lines = [f"Full integrity check: {text}"]
    for backup in backups.full_check_failed:
        lines.append(
            f"⚠️ {escape(backup.name)} FAILED its full integrity check (marked damaged): "
            f"{escape(_short(backup.full_check_problem or ''))}"
        )
    return lines


def format_care(care: CareSummary) -> list[str]:
    """/dbstats' database care: the three worst query shapes, growth, maintenance, retention."""
    lines = []
    if not care.tracking:
        lines.append("<b>Queries</b> not timed ([queries] track = false)")
    elif not care.worst:
        lines.append("<b>Queries</b> none timed yet")
    else:
        lines.append(f"<b>Worst queries</b> (by total time; over {care.slow_ms:g} ms is logged)")
        for rank, query in enumerate(care.worst, 1):
            text = query["query"]
            text = text if len(text) <= QUERY_CHARS else text[: QUERY_CHARS - 1] + "…"
            lines.append(
                f"{rank}. <code>{escape(text)}</code> — {query['calls']:,} calls, "
                f"{query['total_ms']:,.0f} ms in total, mean {query['mean_ms']:.1f} ms, "
                f"max {query['max_ms']:,.0f} ms"
            )
    if care.forecast is not None:
        icon = "⚠️ " if care.forecast.alarming else ""
        lines.append(f"{icon}<b>Growth</b> {escape(care.forecast.describe())}")
    if care.maintenance:
        lines.append("<b>Maintenance</b>")
        lines += [f"  {escape(line.strip())}" for line in care.maintenance]
    if care.rules:
        done = {result.table: result for result in care.retention}
        lines.append("<b>Retention</b>")
        for table, (column, days) in care.rules.items():
            last = done.get(table)
            outcome = f"; last run {_ago(last.finished_at)}: {last.describe()}" if last else ""
            lines.append(f"  • {escape(table)}: {days:g} days by {escape(column)}{escape(outcome)}")
    return lines


def format_backup(info: Backup) -> str:
    checked = (
        "quick_check ok (the full integrity check runs now, in the background: an alert if "
        "it fails)"
        if info.full_check == "pending"
        else "integrity ok"
    )
    return (
        f"✅ Backup <code>{escape(info.name)}</code>\n"
        f"{megabytes(info.size_bytes)} ({escape(info.compression)}) in "
        f"{info.duration_seconds:.1f}s · schema v{info.schema_version} · "
        f"{counted(len(info.bot_tables), 'table')}, {counted(info.rows, 'row')}\n"
        f"Verified: {checked}, sha256 <code>{info.sha256[:16]}</code>…"
    )


def format_upload(report: UploadReport, name: str) -> str:
    """What the upload after ``/backup`` did."""
    if report.failure is not None:
        return (
            f"⚠️ Not copied off-site: {escape(_short(report.failure))}\nThe backup is kept "
            "here; the next backup uploads it."
        )
    if report.deferred is not None:
        return f"⏳ Off-site copy postponed: {escape(report.deferred)}"
    copy = report.uploaded_name(name)
    copies = f"{report.copies} cop{'y' if report.copies == 1 else 'ies'} off-site"
    if report.foreign:
        copies += f" ({report.foreign} not uploaded from here, kept)"
    if copy is None:
        return f"☁️ {copies}"
    encrypted = ", age-encrypted" if copy.encrypted else ""
    return (
        f"☁️ Copied off-site: <code>{escape(copy.object_key)}</code> "
        f"({megabytes(copy.size_bytes)}{encrypted}), read back and verified · {copies}"
    )


def _when(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def _ago(moment: datetime) -> str:
    return f"{duration((datetime.now(UTC) - moment).total_seconds())} ago"


def _short(error: BaseException | str) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 1] + "…"
