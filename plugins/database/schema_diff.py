"""Alembic's ``compare_metadata`` differences as sentences an operator can act on."""

from __future__ import annotations

from typing import Any


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
