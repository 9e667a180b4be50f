"""Is the schema what the bot expects? Checked after every migration.

Three questions, from the configured ``MetaData`` (``[migrations] metadata``, default the
loaded plugins' models) and the revisions:

* critical tables (``[migrations] critical_tables``, default every table of the metadata)
  exist - fatal when not;
* drift: Alembic's ``compare_metadata`` between the metadata and the live schema, as sentences
  an operator can act on - a warning;
* applied revision files unchanged since they were applied (sha256 in ``schema_migrations``;
  a rewrite that declares the earlier checksum in ``supersedes_checksums`` is not a change)
  - a warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, MetaData, inspect

from .alembic_import import load_alembic
from .bookkeeping import is_bookkeeping
from .revisions import Revision


@dataclass
class ValidationReport:
    missing_tables: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)
    changed_revisions: list[str] = field(default_factory=list)
    compared: bool = True  # False: no metadata is known, so drift was not checked

    @property
    def ok(self) -> bool:
        """Missing critical tables are fatal; drift and changed files are warnings."""
        return not self.missing_tables

    def problems(self) -> list[str]:
        lines = [f"critical table missing: {name}" for name in self.missing_tables]
        lines += [f"schema drift: {line}" for line in self.drift]
        lines += self.changed_revisions
        return lines


def merged_metadata(sources: Sequence[MetaData]) -> MetaData | None:
    """One ``MetaData`` holding the tables of several (the loaded plugins' models)."""
    if not sources:
        return None
    if len(sources) == 1:
        return sources[0]
    merged = MetaData(naming_convention=sources[0].naming_convention)
    for source in sources:
        for table in source.tables.values():
            table.to_metadata(merged)
    return merged


def validate(
    connection: Connection,
    metadata: MetaData | None,
    critical_tables: Sequence[str],
    revisions: Sequence[Revision],
    applied_checksums: dict[str, str],
) -> ValidationReport:
    report = ValidationReport()
    live = set(inspect(connection).get_table_names())
    declared = sorted(metadata.tables) if metadata is not None else []
    critical = list(critical_tables) or declared
    report.missing_tables = [name for name in critical if name not in live]
    if metadata is None:
        report.compared = False
    else:
        load_alembic()
        from alembic.autogenerate import compare_metadata
        from alembic.runtime.migration import MigrationContext

        context = MigrationContext.configure(
            connection,
            opts={
                "compare_type": True,
                "include_object": lambda obj, name, type_, *_: (
                    not (type_ == "table" and is_bookkeeping(name))
                ),
            },
        )
        report.drift = describe_diffs(compare_metadata(context, metadata))
    for revision in revisions:
        recorded = applied_checksums.get(revision.id)
        if recorded and not revision.accepts(recorded):
            report.changed_revisions.append(
                f"revision {revision.id} changed since it was applied "
                f"(sha256 {recorded[:12]} then, {revision.checksum[:12]} now); a database "
                "built from scratch may differ from this one. If the change was meant and has "
                f"the same effect, add {recorded!r} to supersedes_checksums in "
                f"{revision.path.name}"
            )
    return report


def describe_diffs(diffs: list[Any]) -> list[str]:
    lines: list[str] = []
    for diff in diffs:
        if isinstance(diff, list):  # column modifications come grouped per column
            lines.extend(describe_diffs(diff))
        else:
            lines.append(describe_diff(diff))
    return lines


def describe_diff(diff: tuple[Any, ...]) -> str:
    kind = diff[0]
    if kind == "add_table":
        return f"table {diff[1].name} is declared but missing from the database"
    if kind == "remove_table":
        return f"table {diff[1].name} is in the database but not declared"
    if kind == "add_column":
        return f"column {diff[2]}.{diff[3].name} is declared but missing from the database"
    if kind == "remove_column":
        return f"column {diff[2]}.{diff[3].name} is in the database but not declared"
    if kind in ("add_index", "remove_index"):
        index = diff[1]
        where = (
            "declared but missing from the database"
            if kind == "add_index"
            else ("in the database but not declared")
        )
        columns = ", ".join(c.name for c in index.columns)
        return f"index {index.name} on {index.table.name}({columns}) is {where}"
    if kind in ("add_fk", "remove_fk", "add_constraint", "remove_constraint"):
        constraint = diff[1]
        table = getattr(constraint.table, "name", "?")
        where = (
            "declared but missing from the database"
            if kind.startswith("add")
            else ("in the database but not declared")
        )
        return f"constraint {constraint.name or '(unnamed)'} on {table} is {where}"
    if kind == "modify_type":
        _, _, table, column, _, live, declared = diff
        return f"column {table}.{column} is {live} in the database but declared {declared}"
    if kind == "modify_nullable":
        _, _, table, column, _, live, declared = diff
        return (
            f"column {table}.{column} is {'NULL' if live else 'NOT NULL'} in the database "
            f"but declared {'NULL' if declared else 'NOT NULL'}"
        )
    if kind == "modify_default":
        _, _, table, column, _, live, declared = diff
        return f"column {table}.{column} defaults to {live} in the database, declared {declared}"
    return f"{kind}: {diff[1:]}"
