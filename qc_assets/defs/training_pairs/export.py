"""Training pairs: each source's queries that pass the round trip, with their hard negatives, in the layout
sentence-transformers' trainers read directly.

One dataset per source (the teacher, each checkpoint), under the configured scorer and round trip:
`(anchor, positive, negative_1..negative_n)`, the query, its document and the first n negatives the scoring stage
mined. A pair with fewer than n negatives is left out (the trainers need every column in every row) and counted.
Splits follow the SFT dataset's document split; negatives are mined within their positive's split, and a row whose
negatives cross it anyway (scored before that rule) is left out, so train and test share no document.

The rows go shard by shard and split by split through parquet files (with where each row came from: source, shard,
doc_id, category, scores), which datasets converts into the `save_to_disk` dataset of the trainer columns alone.
Memory holds one shard's pairs and texts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from qc_assets.defs.sft.dataset import SPLITS, split_is_test_sql, split_name_sql
from qc_assets.defs.training_pairs.card import Origin, card
from qc_assets.hf_export import CARD, is_written, point_at, save_splits, write_version
from qc_assets.lake.resource import fetch_row
from qc_assets.naming import slug


@dataclass(frozen=True)
class PairSelection:
    """Which scored pairs become rows: the scorer's and round trip's, with at least `negatives` hard negatives."""

    scorer: str
    round_trip_k: int
    negatives: int
    test_fraction: float

    @property
    def columns(self) -> list[str]:
        """The trainers' columns, in their order."""
        return ["anchor", "positive", *(f"negative_{i}" for i in range(1, self.negatives + 1))]

    @property
    def parameters(self) -> dict[str, object]:
        return {"scorer": self.scorer, "k": self.round_trip_k}

    def kept_sql(self) -> str:
        first = f"s.negative_doc_ids[1:{self.negatives}]"
        crosses = f"{split_is_test_sql('x', self.test_fraction)} != {split_is_test_sql('s.doc_id', self.test_fraction)}"
        return (
            f"(s.round_trip AND coalesce(len(s.negative_doc_ids), 0) >= {self.negatives} "
            f"AND len(list_filter({first}, lambda x: x = s.doc_id OR {crosses})) = 0)"
        )

    def split_sql(self) -> str:
        return split_name_sql("s.doc_id", self.test_fraction)


_SOURCE_ROWS = "s.source = $source AND s.scorer = $scorer AND s.round_trip_k = $k"


@dataclass
class SourceCounts:
    """Per split and category: pairs scored, passing the round trip, and kept as rows."""

    scored: dict[str, dict[str, int]] = field(default_factory=lambda: {split: {} for split in SPLITS})
    passed: dict[str, dict[str, int]] = field(default_factory=lambda: {split: {} for split in SPLITS})
    kept: dict[str, dict[str, int]] = field(default_factory=lambda: {split: {} for split in SPLITS})
    content: list[tuple] = field(default_factory=list)

    def rows(self, split: str) -> int:
        return sum(self.kept[split].values())

    def total(self, measure: str) -> int:
        return sum(sum(by_category.values()) for by_category in getattr(self, measure).values())


def count_source(connection: duckdb.DuckDBPyConnection, source: str, selection: PairSelection) -> SourceCounts:
    kept = selection.kept_sql()
    record = (
        "s.shard || chr(31) || s.doc_id || chr(31) || s.category || chr(31) || s.query || chr(31) || "
        f"array_to_string(s.negative_doc_ids[1:{selection.negatives}], chr(31))"
    )
    result = connection.execute(
        f"""SELECT {selection.split_sql()} AS split, s.category, count(*), count(*) FILTER (s.round_trip),
                   count(*) FILTER ({kept}), bit_xor(md5_number_upper({record})) FILTER ({kept}),
                   bit_xor(md5_number_lower({record})) FILTER ({kept})
            FROM reranker_scores s WHERE {_SOURCE_ROWS} GROUP BY ALL ORDER BY ALL""",
        {"source": source, **selection.parameters},
    ).fetchall()
    counts = SourceCounts()
    for split, category, scored, passed, kept_rows, upper, lower in result:
        counts.scored[split][category] = scored
        counts.passed[split][category] = passed
        counts.kept[split][category] = kept_rows
        counts.content.append((split, category, kept_rows, str(upper), str(lower)))
    return counts


def content_version(source: str, selection: PairSelection, counts: SourceCounts) -> str:
    key = json.dumps([source, selection.scorer, selection.round_trip_k, selection.negatives, counts.content])
    return hashlib.sha256(f"{selection.test_fraction!r}\0{key}".encode()).hexdigest()[:12]


def _pairs_sql(selection: PairSelection) -> str:
    """The kept pairs of one shard and split, without texts: joining the corpus once per negative lets the
    optimizer pair the corpus with itself on the shard alone, a product that grows as the shard's size cubed."""
    return f"""
        SELECT s.query AS anchor, s.source, s.shard, s.doc_id, s.category, s.score AS positive_score,
               s.negative_doc_ids[1:{selection.negatives}] AS negative_doc_ids,
               s.negative_scores[1:{selection.negatives}] AS negative_scores
        FROM reranker_scores s
        WHERE {_SOURCE_ROWS} AND {selection.kept_sql()} AND s.shard = $shard AND {selection.split_sql()} = $split
        ORDER BY s.doc_id, s.category
    """


def _schema(selection: PairSelection) -> pa.Schema:
    text = [(name, pa.string()) for name in selection.columns]
    provenance = [(name, pa.string()) for name in ("source", "shard", "doc_id", "category")]
    scores = [
        ("positive_score", pa.float64()),
        ("negative_doc_ids", pa.list_(pa.string())),
        ("negative_scores", pa.list_(pa.float64())),
    ]
    return pa.schema(text + provenance + scores)


def _shard_rows(
    connection: duckdb.DuckDBPyConnection, source: str, selection: PairSelection, shard: str, split: str
) -> pa.Table:
    """One shard's rows of a split: its pairs, then each document's text looked up among the shard's (one shard's
    texts in memory at a time)."""
    import pyarrow.compute as pc

    pairs = connection.execute(
        _pairs_sql(selection), {"source": source, "shard": shard, "split": split, **selection.parameters}
    ).to_arrow_table()
    corpus = connection.execute("SELECT doc_id, text FROM corpus WHERE shard = $1", [shard]).to_arrow_table()

    def texts(doc_ids: pa.ChunkedArray) -> pa.ChunkedArray:
        found = corpus["text"].take(pc.index_in(doc_ids, value_set=corpus["doc_id"]))
        if found.null_count:
            missing = doc_ids.filter(pc.is_null(found))[0].as_py()
            raise ValueError(f"training pairs of {source}: document {missing!r} is not in shard {shard}'s corpus")
        return found

    columns = {"anchor": pairs["anchor"], "positive": texts(pairs["doc_id"])}
    for i in range(selection.negatives):
        columns[f"negative_{i + 1}"] = texts(pc.list_element(pairs["negative_doc_ids"], i))
    provenance = {name: pairs[name] for name in pairs.column_names if name != "anchor"}
    return pa.table({**columns, **provenance})


def _write_parquet(
    connection: duckdb.DuckDBPyConnection, source: str, selection: PairSelection, paths: dict[str, Path]
) -> None:
    import pyarrow.parquet as pq

    shards = [
        shard
        for (shard,) in connection.execute(
            "SELECT DISTINCT shard FROM reranker_scores WHERE source = $1 ORDER BY shard", [source]
        ).fetchall()
    ]
    schema = _schema(selection)
    for split, path in paths.items():
        with pq.ParquetWriter(path, schema) as writer:
            for shard in shards:
                writer.write_table(_shard_rows(connection, source, selection, shard, split).cast(schema))


@dataclass(frozen=True)
class PairsExport:
    source: str
    version: str
    directory: Path
    counts: SourceCounts
    created: bool

    @property
    def hf_dir(self) -> Path:
        return self.directory / "hf"

    @property
    def rows(self) -> int:
        return self.counts.total("kept")


def source_root(root: Path, source: str) -> Path:
    return root / slug(source, fill="-", digest="if_changed")


def export_source(
    connection: duckdb.DuckDBPyConnection, root: Path, source: str, selection: PairSelection, origin: Origin
) -> PairsExport:
    """The source's rows as the version they make, written when new. Run inside one transaction (one snapshot)."""
    counts = count_source(connection, source, selection)
    version = content_version(source, selection, counts)
    directory = source_root(root, source) / version
    created = not is_written(directory)
    if created:

        def fill(staging: Path) -> None:
            import datasets

            (staging / "parquet").mkdir()
            paths = {split: staging / "parquet" / f"{split}.parquet" for split in SPLITS}
            _write_parquet(connection, source, selection, paths)
            features = datasets.Features({name: datasets.Value("string") for name in selection.columns})
            rows = {split: counts.rows(split) for split in SPLITS}
            save_splits(paths, rows, staging / "hf", staging / "cache", features)
            (staging / CARD).write_text(card(source, version, selection, counts, origin), encoding="utf-8")

        write_version(directory, fill)
    point_at(source_root(root, source), version)
    return PairsExport(source, version, directory, counts, created)


def verify(directory: Path, selection: PairSelection) -> dict[str, int]:
    """Read back from the version's parquet files: rows with a negative that is their positive (same document or
    same text), and documents (positives or negatives) in both splits."""
    files = {split: "'" + str(directory / "parquet" / f"{split}.parquet").replace("'", "''") + "'" for split in SPLITS}
    negatives = ", ".join(f"negative_{i}" for i in range(1, selection.negatives + 1)) or "NULL"
    documents = "SELECT doc_id FROM read_parquet({0}) UNION SELECT unnest(negative_doc_ids) FROM read_parquet({0})"
    with duckdb.connect() as connection:
        (own,) = fetch_row(
            connection.execute(
                f"SELECT count(*) FROM read_parquet([{', '.join(files.values())}]) "
                f"WHERE list_contains(negative_doc_ids, doc_id) OR positive IN ({negatives})"
            )
        )
        (shared,) = fetch_row(
            connection.execute(
                f"SELECT count(*) FROM (({documents.format(files['train'])}) "
                f"INTERSECT ({documents.format(files['test'])}))"
            )
        )
    return {"negative_is_its_positive": own, "documents_in_both_splits": shared}
