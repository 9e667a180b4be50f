"""The database plugin: PTB-facing wiring around the plain classes that do the work.

In dbkeeper's own host it is the first plugin (ready before anything that needs the database,
closed after all of them). In someone else's bot, ``install`` chains it onto the application's
``post_init`` / ``post_stop`` hooks, which ``run_polling`` and ``run_webhook`` call::

    plugin = DatabasePlugin(load_settings("config.toml"))
    plugin.install(application)
    ...
    user = await plugin.database.read(lambda s: s.get(User, user_id))
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from sqlalchemy import MetaData

from bot.config import Settings
from bot.plugin import Deadline, Plugin, StartupError

from .errors import DatabaseError
from .migrator import MigrationReport, Migrator, ValidationReport
from .service import DatabaseService

if TYPE_CHECKING:
    from telegram.ext import Application

    from bot.host import Host

log = logging.getLogger("dbkeeper.database")


class DatabasePlugin(Plugin):
    name = "database"

    def __init__(self, settings: Settings, *, metadata: MetaData | None = None) -> None:
        self.settings = settings
        self.database = DatabaseService(settings.database)
        self.migrator = Migrator(self.database, settings.migrations, metadata=metadata)
        self.host: Host | None = None
        self.last_migration: MigrationReport | None = None
        self.last_validation: ValidationReport | None = None

    # -- PTB wiring ---------------------------------------------------------------------------

    def install(self, application: Application) -> Host:
        """Use the plugin in your own PTB bot (``run_polling``/``run_webhook`` call the hooks)."""
        from bot.host import Host

        host = Host(self.settings, application, [self])
        previous_init, previous_stop = application.post_init, application.post_stop

        async def post_init(app: Application) -> None:
            await host.start()
            if previous_init is not None:
                await previous_init(app)

        async def post_stop(app: Application) -> None:
            if previous_stop is not None:
                await previous_stop(app)
            await host.stop(Deadline.after(self.settings.shutdown.timeout_seconds))

        application.post_init = post_init
        application.post_stop = post_stop
        return host

    def setup(self, host: Host) -> None:
        self.host = host

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self.open)
        except DatabaseError as error:
            await asyncio.to_thread(self.close)
            raise StartupError(str(error)) from error

    async def stop(self, deadline: Deadline) -> None:
        await asyncio.to_thread(self.close)

    # -- the work, plain and blocking (the CLI calls these directly) --------------------------

    def open(self) -> None:
        """Connect, bring the schema to head (if ``auto_upgrade``), and validate it."""
        self.database.connect()
        if self.settings.migrations.auto_upgrade:
            self.last_migration = self.migrate()
        else:
            status = self.migrator.status()  # refuses a schema newer than the code
            if status.pending:
                log.warning(
                    "%d revision%s pending (auto_upgrade is off); the bot runs on v%d until "
                    "`dbkeeper db migrate` brings it to v%d",
                    len(status.pending),
                    "s" if len(status.pending) > 1 else "",
                    status.current_version,
                    status.head_version,
                )
        self.last_validation = self.validate()

    def migrate(self, target: str = "head") -> MigrationReport:
        """Apply pending revisions (one transaction each, every attempt recorded)."""
        return self.migrator.upgrade(target)

    def downgrade(self, target: str) -> MigrationReport:
        return self.migrator.downgrade(target)

    def validate(self) -> ValidationReport:
        """Check the schema after migrating; missing critical tables are fatal."""
        report = self.migrator.validate()
        for line in report.drift:
            log.warning("schema drift: %s", line)
        for line in report.changed_revisions:
            log.warning("%s", line)
        if not report.ok:
            raise DatabaseError(
                "critical tables are missing after migrating: "
                + ", ".join(report.missing_tables)
                + ". The schema does not match the revisions; check `dbkeeper db history`."
            )
        if not report.drift and not report.changed_revisions:
            log.info("schema validated: every critical table present, no drift")
        return report

    def flush(self) -> None:
        """Move the SQLite write-ahead log into the database file (nothing to do elsewhere)."""
        if self.database.connected and self.database.dialect == "sqlite":
            # On the driver connection: inside SQLAlchemy's BEGIN the checkpoint could not finish.
            connection = self.database.engine.raw_connection()
            try:
                busy, _, moved = connection.driver_connection.execute(
                    "PRAGMA wal_checkpoint(TRUNCATE)"
                ).fetchone()
            finally:
                connection.close()
            if busy:
                log.warning("WAL checkpoint incomplete: another connection is still reading")
            elif moved > 0:
                log.info("flushed the write-ahead log into the database (%d pages)", moved)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.migrator.close()
            self.database.close()
