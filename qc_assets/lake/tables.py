"""The lake's data contract: every table's columns, in one place.

Asset keys match table names. Later stages add their tables here, so analysts and code read one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str
    description: str


@dataclass(frozen=True)
class Table:
    name: str
    description: str
    columns: tuple[Column, ...]
    partition_columns: tuple[str, ...]

    @property
    def column_names(self) -> list[str]:
        return [column.name for column in self.columns]

    def create_sql(self) -> str:
        body = ", ".join(f'"{column.name}" {column.sql_type}' for column in self.columns)
        return f'CREATE TABLE IF NOT EXISTS "{self.name}" ({body})'

    def add_missing_columns_sql(self, existing: set[str]) -> list[str]:
        return [
            f'ALTER TABLE "{self.name}" ADD COLUMN "{column.name}" {column.sql_type}'
            for column in self.columns
            if column.name not in existing
        ]

    def dagster_schema(self) -> dg.TableSchema:
        return dg.TableSchema(
            columns=[
                dg.TableColumn(name=column.name, type=column.sql_type, description=column.description)
                for column in self.columns
            ]
        )


CORPUS = Table(
    name="corpus",
    description="Cleaned documents, one row per document, deduplicated by normalized text across shards.",
    columns=(
        Column("doc_id", "VARCHAR", "The source's id, or <shard>:<row> where the source has none."),
        Column("shard", "VARCHAR", "Partition key: the source file the document came from."),
        Column("text", "VARCHAR", "Text with control characters removed and outer whitespace trimmed."),
        Column("n_chars", "INTEGER", "Characters (code points) of text."),
        Column("source", "VARCHAR", "The file or dataset URL the shard was read from."),
        Column("source_row", "BIGINT", "Zero-based row of the document in its source file."),
        Column("text_hash", "UBIGINT", "Upper 64 bits of the md5 of text, for deduplication."),
        Column("ingested_at", "TIMESTAMP WITH TIME ZONE", "When the shard was materialized."),
    ),
    partition_columns=("shard",),
)

TABLES: dict[str, Table] = {table.name: table for table in (CORPUS,)}
