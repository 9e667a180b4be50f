"""Helpers for an Alembic ``env.py`` that dbkeeper runs.

dbkeeper hands ``env.py`` the database URL as ``sqlalchemy.url`` (so a directory made by
``alembic init`` works unchanged) and, in ``config.attributes["connection"]``, a connection
already inside the transaction of the revision. An ``env.py`` that uses that connection lets
each revision commit together with its history row, and lets a signal interrupt a long
revision. The few lines, in ``run_migrations_online()`` of an ``alembic init`` env.py::

    from dbkeeper.plugins.database import alembic_env

    def run_migrations_online() -> None:
        if alembic_env.run_on_shared_connection(context, target_metadata):
            return
        ...  # the generated code: an engine of its own, for the plain alembic command

``include_object`` keeps dbkeeper's bookkeeping tables (``schema_migrations``,
``alembic_version``) out of ``alembic revision --autogenerate``.
"""

from __future__ import annotations

from typing import Any

from .migrate.bookkeeping import is_bookkeeping


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Leave dbkeeper's bookkeeping tables out of autogenerate and drift detection."""
    return not (type_ == "table" and name is not None and is_bookkeeping(name))


def shared_connection(config: Any) -> Any:
    """The connection dbkeeper hands ``env.py`` (None when run by the plain alembic command)."""
    return config.attributes.get("connection")


def run_on_shared_connection(context: Any, target_metadata: Any = None, **options: Any) -> bool:
    """Run the migrations on dbkeeper's connection, if there is one; True when it did.

    ``options`` go to ``context.configure`` (``render_as_batch`` is on for SQLite unless given).
    """
    connection = shared_connection(context.config)
    if connection is None:
        return False
    metadata = context.config.attributes.get("target_metadata") or target_metadata
    options.setdefault("render_as_batch", connection.dialect.name == "sqlite")
    options.setdefault("include_object", include_object)
    context.configure(connection=connection, target_metadata=metadata, **options)
    with context.begin_transaction():
        context.run_migrations()
    return True
