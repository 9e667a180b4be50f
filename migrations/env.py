"""Alembic environment of dbkeeper's example schema (the members feature's tables).

dbkeeper hands Alembic a connection that is already inside a transaction: each revision then
commits, together with its history row, or rolls back as one unit (``alembic_env``). Run from
the ``alembic`` command line (to write a new revision), the environment builds its own
connection from dbkeeper's configuration instead.
"""

from __future__ import annotations

from alembic import context
from alembic.script import ScriptDirectory

from dbkeeper.plugins.database import alembic_env
from dbkeeper.plugins.members.models import metadata as members_metadata

config = context.config


def next_revision_id(context_, revision, directives):
    """New revisions get the next zero-padded number (0004, 0005, ...) unless --rev-id is given."""
    script = directives[0]
    if config.cmd_opts is not None and getattr(config.cmd_opts, "rev_id", None):
        return
    heads = ScriptDirectory.from_config(config).get_heads()
    numbers = [int(head) for head in heads if head.isdigit()]
    script.rev_id = f"{(max(numbers) if numbers else 0) + 1:04d}"


OPTIONS = {"process_revision_directives": next_revision_id, "compare_type": True}


def run_online() -> None:
    if alembic_env.run_on_shared_connection(context, members_metadata, **OPTIONS):
        return
    from dbkeeper.config import load_settings
    from dbkeeper.plugins.database.engines import create_database_engine
    from dbkeeper.plugins.database.settings import DatabaseSettings

    settings = load_settings().section(DatabaseSettings)
    engine = create_database_engine(settings, purpose="migrations")
    with engine.begin() as connection:
        context.configure(
            connection=connection,
            target_metadata=members_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            include_object=alembic_env.include_object,
            **OPTIONS,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    from dbkeeper.config import load_settings
    from dbkeeper.plugins.database.engines import database_url
    from dbkeeper.plugins.database.settings import DatabaseSettings

    context.configure(
        url=database_url(load_settings().section(DatabaseSettings)),
        target_metadata=members_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_online()
