"""Quoting for SQL text built in Python (the one place for identifiers and the one for string literals), and the
catalog setting's parts.

Values belong in parameters (`?`, `$name`) wherever DuckDB takes them; these are for the places it does not
(table and column names, file paths in table functions, ATTACH, LOAD, secrets, comments).
"""

from __future__ import annotations


def sql_identifier(name: str) -> str:
    """A table or column name as a double-quoted SQL identifier: `a"b` -> `"a""b"`."""
    return '"' + name.replace('"', '""') + '"'


def sql_literal(value: str) -> str:
    """A string as a single-quoted SQL literal: `it's` -> `'it''s'`."""
    return "'" + value.replace("'", "''") + "'"


def catalog_parts(catalog: str) -> tuple[str, str]:
    """(kind, location) of a QC_LAKE_CATALOG value: ("sqlite", path) or ("postgres", libpq dsn)."""
    kind, _, location = catalog.partition(":")
    if kind not in ("sqlite", "postgres"):
        raise ValueError(f"QC_LAKE_CATALOG must start with sqlite: or postgres:, got {catalog!r}")
    return kind, location
