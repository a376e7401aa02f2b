"""Cleaning rules for raw documents, as DuckDB SQL so a 100k-row shard is cleaned in a few vectorized passes.

Texts lose control characters and outer whitespace. A document's first occurrence wins: within a shard by
row, across shards by shard key order, for both the cleaned text (by hash) and the id. Every drop is counted
by reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from qc_assets.lake.resource import fetch_row
from qc_assets.lake.sql import sql_identifier
from qc_assets.lake.tables import CORPUS

# C0 controls except tab and newline (a lone CR included, after CRLF became LF), DEL and C1 controls.
_CONTROL_CHARS = r"[\x00-\x08\x0B-\x1F\x7F-\x9F]"
_WHITESPACE = r"[\s\p{Z}]"
# One regex pass finds the few rows that need cleaning; only those pay for the rewriting passes.
_NEEDS_CLEANING = f"{_CONTROL_CHARS}|^{_WHITESPACE}|{_WHITESPACE}$"
STAGED = "corpus_staged"

DROP_REASONS = (
    "empty",
    "too_short",
    "too_long",
    "duplicate_text_in_shard",
    "duplicate_id_in_shard",
    "duplicate_text_earlier_shard",
    "duplicate_id_earlier_shard",
)


@dataclass(frozen=True)
class LengthWindow:
    min_chars: int
    max_chars: int


def stage_shard(
    connection: duckdb.DuckDBPyConnection, rows: str, shard: str, source: str, window: LengthWindow
) -> None:
    """Clean `rows` (a relation with source_id, raw_text, source_row) into the temporary table STAGED.

    Each row gets a `status`: 'ok' or the reason it is dropped.
    """
    connection.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE {STAGED} AS
        WITH flagged AS (
            SELECT source_id, source_row, raw_text,
                   regexp_matches(raw_text, '{_NEEDS_CLEANING}') AS needs_cleaning
            FROM {rows}
        ), cleaned AS (
            SELECT source_id, source_row,
                   CASE WHEN needs_cleaning THEN regexp_replace(
                            regexp_replace(replace(raw_text, chr(13) || chr(10), chr(10)), '{_CONTROL_CHARS}', '', 'g'),
                            '^{_WHITESPACE}+|{_WHITESPACE}+$', '', 'g')
                        ELSE raw_text END AS text,
                   needs_cleaning AND regexp_matches(raw_text, '{_CONTROL_CHARS}') AS had_controls
            FROM flagged
        ), measured AS (
            SELECT coalesce(nullif(source_id, ''), $shard || ':' || source_row) AS doc_id,
                   $shard AS shard, text, length(text)::INTEGER AS n_chars, $source AS source, source_row,
                   md5_number_upper(text) AS text_hash, had_controls
            FROM cleaned
        ), judged AS (
            SELECT *,
                   CASE WHEN n_chars = 0 THEN 'empty'
                        WHEN n_chars < $min_chars THEN 'too_short'
                        WHEN n_chars > $max_chars THEN 'too_long'
                        ELSE 'ok' END AS length_status
            FROM measured
        ), text_ranked AS (
            SELECT *, row_number() OVER (
                PARTITION BY text_hash, length_status = 'ok' ORDER BY source_row) AS text_rank
            FROM judged
        ), id_ranked AS (
            SELECT *, row_number() OVER (
                PARTITION BY doc_id, length_status = 'ok' AND text_rank = 1 ORDER BY source_row) AS id_rank
            FROM text_ranked
        )
        SELECT * EXCLUDE (length_status, text_rank, id_rank),
               CASE WHEN length_status <> 'ok' THEN length_status
                    WHEN text_rank > 1 THEN 'duplicate_text_in_shard'
                    WHEN id_rank > 1 THEN 'duplicate_id_in_shard'
                    ELSE 'ok' END AS status,
               now() AS ingested_at
        FROM id_ranked
        """,
        {"shard": shard, "source": source, "min_chars": window.min_chars, "max_chars": window.max_chars},
    )


def resolve_against_lake(connection: duckdb.DuckDBPyConnection, shard: str) -> int:
    """Inside the write transaction: give way to earlier shards, take over from later ones.

    Returns how many rows of later shards were removed because this shard holds their first occurrence.
    """
    corpus = sql_identifier(CORPUS.name)
    connection.execute(
        f"""
        UPDATE {STAGED} SET status = CASE
            WHEN text_hash IN (SELECT text_hash FROM {corpus} WHERE shard < $shard) THEN 'duplicate_text_earlier_shard'
            ELSE 'duplicate_id_earlier_shard' END
        WHERE status = 'ok' AND (
            text_hash IN (SELECT text_hash FROM {corpus} WHERE shard < $shard)
            OR doc_id IN (SELECT doc_id FROM {corpus} WHERE shard < $shard))
        """,
        {"shard": shard},
    )
    (removed,) = fetch_row(
        connection.execute(
            f"""
            DELETE FROM {corpus}
            WHERE shard > $shard AND (
                text_hash IN (SELECT text_hash FROM {STAGED} WHERE status = 'ok')
                OR doc_id IN (SELECT doc_id FROM {STAGED} WHERE status = 'ok'))
            """,
            {"shard": shard},
        )
    )
    return removed


@dataclass(frozen=True)
class StagedSummary:
    status_counts: dict[str, int]
    control_character_rows: int
    n_chars_min: int
    n_chars_mean: float
    n_chars_max: int


def summarize_staged(connection: duckdb.DuckDBPyConnection) -> StagedSummary:
    """Everything the asset reports, from the staging table, so no second lake connection is needed."""
    counts = dict(connection.execute(f"SELECT status, count(*) FROM {STAGED} GROUP BY status").fetchall())
    controls, n_min, n_mean, n_max = fetch_row(
        connection.execute(
            f"""
            SELECT count(*) FILTER (WHERE had_controls),
                   min(n_chars) FILTER (WHERE status = 'ok'),
                   avg(n_chars) FILTER (WHERE status = 'ok'),
                   max(n_chars) FILTER (WHERE status = 'ok')
            FROM {STAGED}
            """
        )
    )
    return StagedSummary(
        status_counts={reason: counts.get(reason, 0) for reason in ("ok", *DROP_REASONS)},
        control_character_rows=controls,
        n_chars_min=n_min or 0,
        n_chars_mean=round(float(n_mean or 0), 1),
        n_chars_max=n_max or 0,
    )
