"""Alembic environment for dbkeeper.

dbkeeper's migrator hands Alembic a connection that is already inside a transaction
(``config.attributes["connection"]``): each revision then commits, together with its history
row, or rolls back as one unit. Run from the ``alembic`` command line (to write a new revision),
the environment builds its own connection from dbkeeper's configuration instead.
"""

from __future__ import annotations

from alembic import context
from alembic.script import ScriptDirectory
from dbkeeper.plugins.database.history import HISTORY_TABLE
from dbkeeper.plugins.database.models import metadata as bot_metadata

config = context.config
IGNORED_TABLES = {HISTORY_TABLE, "alembic_version"}


def include_object(obj, name, type_, reflected, compare_to):
    """Leave dbkeeper's bookkeeping tables out of drift detection and autogenerate."""
    return not (type_ == "table" and name in IGNORED_TABLES)


def next_revision_id(context_, revision, directives):
    """New revisions get the next zero-padded number (0004, 0005, ...) unless --rev-id is given."""
    script = directives[0]
    if config.cmd_opts is not None and getattr(config.cmd_opts, "rev_id", None):
        return
    heads = ScriptDirectory.from_config(config).get_heads()
    numbers = [int(head) for head in heads if head.isdigit()]
    script.rev_id = f"{(max(numbers) if numbers else 0) + 1:04d}"


def run_migrations(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=config.attributes.get("target_metadata", bot_metadata),
        render_as_batch=connection.dialect.name == "sqlite",
        include_object=include_object,
        process_revision_directives=next_revision_id,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    from dbkeeper.config import load_settings
    from dbkeeper.plugins.database.engine import create_database_engine

    engine = create_database_engine(load_settings().database, purpose="migrations")
    with engine.begin() as own_connection:
        run_migrations(own_connection)
    engine.dispose()


if context.is_offline_mode():
    from dbkeeper.config import load_settings
    from dbkeeper.plugins.database.engine import database_url

    context.configure(
        url=database_url(load_settings().database),
        target_metadata=bot_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_online()
