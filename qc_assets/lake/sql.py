"""Quoting for SQL text built in Python: the one place for identifiers and the one for string literals.

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
