"""The SFT dataset: valid teacher labels in seed 000's format, split by document, exported as a HF dataset.

Rows are `{"system": category, "user": text, "assistant": query}` (never the teacher's reasoning); labels over
their category's cap are real teacher answers and stay in, counted on the card. A document's
split is a function of its id alone (md5, the same in DuckDB and Python), so it never changes when shards are
added and a document never lands in both splits. Each distinct content gets its own version directory, written
aside and renamed into place, `current.json` pointing at the newest (qc_assets/hf_export.py). The export goes shard by shard, so its memory
is one shard's, however large the corpus.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from qc_assets.categories import CATEGORIES
from qc_assets.hf_export import CARD, is_written, point_at, save_splits, write_version

SPLITS = ("train", "test")
_HASH_SPACE = 2**64


def _threshold(test_fraction: float) -> str:
    """The first 16 hex digits of md5 below which a document is in test; fixed-width hex sorts like numbers."""
    return format(min(_HASH_SPACE - 1, int(test_fraction * _HASH_SPACE)), "016x")


def is_test_document(doc_id: str, test_fraction: float) -> bool:
    """Python twin of `split_is_test_sql`."""
    return hashlib.md5(doc_id.encode("utf-8")).hexdigest()[:16] < _threshold(test_fraction)


def split_is_test_sql(doc_id_column: str, test_fraction: float) -> str:
    return f"(substr(md5({doc_id_column}), 1, 16) < '{_threshold(test_fraction)}')"


@dataclass(frozen=True)
class SftExport:
    version: str
    directory: Path
    counts: dict[str, dict[str, int]]  # split -> category -> rows
    over_cap: dict[str, int]  # category -> rows over its cap, both splits
    mean_chars: dict[str, float]
    created: bool
    rows: int

    @property
    def hf_dir(self) -> Path:
        return self.directory / "hf"


# The dataset's columns, in order; `system` is the category, `user` the document, `assistant` the query.
COLUMNS = ("system", "user", "assistant", "doc_id", "shard", "teacher", "prompt_version")
BATCH_ROWS = 4096

# One corpus shard's labels by the configured teacher in the wanted prompt versions, in row order ($1: teacher,
# $2: shard). Small: keys and answers, never the documents. `record` is the row's part of the content version:
# doc_id, system, assistant, teacher and prompt_version separated by \x1f and ended by \x1e (a NULL query counts as
# the text None). A NULL over_cap is a label within its cap.
_SHARD_LABELS_SQL = """
    SELECT l.category AS system, l.query AS assistant, l.doc_id, l.shard, l.teacher, l.prompt_version,
           coalesce(l.over_cap, false) AS over_cap,
           l.doc_id || chr(31) || l.category || chr(31) || coalesce(l.query, 'None') || chr(31) || l.teacher
               || chr(31) || l.prompt_version || chr(30) AS record,
           {split} AS split
    FROM teacher_labels l
    JOIN wanted_versions w USING (category, prompt_version)
    WHERE l.teacher = $1 AND l.shard = $2
    ORDER BY l.doc_id, l.category
"""


def split_name_sql(doc_id_column: str, test_fraction: float) -> str:
    """The document's split as 'train' or 'test'."""
    return f"CASE WHEN {split_is_test_sql(doc_id_column, test_fraction)} THEN 'test' ELSE 'train' END"


class ContentVersion:
    """A hash of the rows' keys and answers (not the documents), in row order, fed shard by shard with Arrow arrays
    of each row's `record` (see _SHARD_LABELS_SQL)."""

    def __init__(self, test_fraction: float) -> None:
        self._digest = hashlib.sha256(f"{test_fraction!r}\0".encode())

    def add(self, records: pa.Array) -> None:
        # The records lie back to back in the array's values buffer: hashed there, without a Python string each.
        records = records.cast(pa.string())
        if len(records):
            _, offset_buffer, value_buffer = records.buffers()
            offsets = pa.Array.from_buffers(pa.int32(), len(records) + 1, [None, offset_buffer], offset=records.offset)
            self._digest.update(value_buffer[offsets[0].as_py() : offsets[-1].as_py()])

    def hexdigest(self) -> str:
        return self._digest.hexdigest()[:12]


def _shard_rows(
    connection: duckdb.DuckDBPyConnection, teacher: str, shard: str, test_fraction: float, documents: str
) -> tuple[pa.Table, pa.Table, pa.Array]:
    """One shard's labels that have their document in the shard, the shard's corpus rows (a select list, doc_id
    first), and for each label the position of its document among them. A label is paired with the document text
    it was made from: the one in its own shard."""
    labels = connection.execute(
        _SHARD_LABELS_SQL.format(split=split_name_sql("l.doc_id", test_fraction)), [teacher, shard]
    ).to_arrow_table()
    corpus = connection.execute(f"SELECT {documents} FROM corpus WHERE shard = $1", [shard]).to_arrow_table()
    position = pc.index_in(labels["doc_id"], value_set=corpus["doc_id"])
    has_document = pc.is_valid(position)
    return labels.filter(has_document), corpus, position.filter(has_document)


@dataclass
class _Summary:
    counts: dict[str, dict[str, int]]
    over_cap: dict[str, int]
    rows: dict[str, int]
    chars: dict[str, int]
    version: str = ""


def _summarize(
    connection: duckdb.DuckDBPyConnection, teacher: str, test_fraction: float, shards: list[str]
) -> _Summary:
    """Rows per split and category, rows over their cap per category, characters of user and assistant and the
    content version, shard by shard: the documents' lengths are read, never their text held."""
    summary = _Summary(
        {split: {} for split in SPLITS},
        dict.fromkeys(CATEGORIES, 0),
        dict.fromkeys(SPLITS, 0),
        {"user": 0, "assistant": 0},
    )
    version = ContentVersion(test_fraction)
    for shard in shards:
        labels, corpus, position = _shard_rows(connection, teacher, shard, test_fraction, "doc_id, n_chars")
        version.add(labels["record"].combine_chunks())
        for system, n in zip(*pc.value_counts(labels["system"].filter(labels["over_cap"])).flatten()):
            summary.over_cap[system.as_py()] += n.as_py()
        for split in SPLITS:
            systems = labels["system"].filter(pc.equal(labels["split"], split))
            for system, n in zip(*pc.value_counts(systems).flatten()):
                summary.counts[split][system.as_py()] = summary.counts[split].get(system.as_py(), 0) + n.as_py()
            summary.rows[split] += len(systems)
        summary.chars["user"] += pc.sum(corpus["n_chars"].take(position)).as_py() or 0
        summary.chars["assistant"] += pc.sum(pc.utf8_length(labels["assistant"])).as_py() or 0
    summary.counts = {split: dict(sorted(counts.items())) for split, counts in summary.counts.items()}
    summary.version = version.hexdigest()
    return summary


def _write_parquet(
    connection: duckdb.DuckDBPyConnection, teacher: str, test_fraction: float, shards: list[str], paths: dict[str, Path]
) -> None:
    """Each split's rows into its parquet file, in order (shard, doc_id, category), a batch at a time."""
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.string()) for name in COLUMNS])
    writers = {split: pq.ParquetWriter(path, schema) for split, path in paths.items()}
    try:
        for shard in shards:
            labels, corpus, position = _shard_rows(connection, teacher, shard, test_fraction, "doc_id, text")
            for split, writer in writers.items():
                in_split = pc.equal(labels["split"], split)
                part, part_position = labels.filter(in_split), position.filter(in_split)
                # A document's text goes into each of its rows, one per category: joined a batch at a time, so
                # memory holds the shard's texts once.
                for start in range(0, len(part), BATCH_ROWS):
                    texts = corpus["text"].take(part_position.slice(start, BATCH_ROWS))
                    batch = part.slice(start, BATCH_ROWS).append_column("user", texts)
                    writer.write_table(batch.select(list(COLUMNS)).cast(schema))
            del labels, corpus, position
    finally:
        for writer in writers.values():
            writer.close()


def _card(
    version: str,
    rows: dict[str, dict[str, int]],
    over_cap: dict[str, int],
    teacher: str,
    prompt_versions: dict[str, str],
    test_fraction: float,
    mean_chars: dict[str, float],
) -> str:
    lines = [
        "---",
        "language: [ja]",
        "task_categories: [text-generation]",
        "tags: [query-generation, synthetic, qc_assets]",
        "configs:",
        "- config_name: default",
        "  data_files:",
        *(f"  - split: {split}\n    path: parquet/{split}.parquet" for split in SPLITS),
        "---",
        "",
        f"# qc_assets SFT dataset {version}",
        "",
        "Query-generation training data in the format of query-crafter-japanese: `system` is the category, `user`",
        "the document, `assistant` the teacher's query. The teacher's reasoning is not included.",
        "",
        f"- teacher: `{teacher}`",
        f"- split: by document (md5 of doc_id), test fraction {test_fraction}",
        f"- mean characters: user {mean_chars['user']:.0f}, assistant {mean_chars['assistant']:.1f}",
        f"- over cap: {sum(over_cap.values())} rows whose `assistant` is longer than its category's prompt asks "
        "(characters, or keywords); real teacher answers, kept as written",
        "",
        "| category | prompt version | train | test | over cap |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | `{prompt_versions[name]}` | {rows['train'].get(name, 0)} | {rows['test'].get(name, 0)} "
            f"| {over_cap.get(name, 0)} |"
            for name in CATEGORIES
        ),
        f"| all | | {sum(rows['train'].values())} | {sum(rows['test'].values())} | {sum(over_cap.values())} |",
        "",
    ]
    return "\n".join(lines)


def export_from_lake(
    connection: duckdb.DuckDBPyConnection,
    root: Path,
    teacher: str,
    prompt_versions: dict[str, str],
    test_fraction: float,
) -> SftExport:
    """The teacher's valid labels with their documents as the dataset version they make, written when new.

    Shard by shard, never the whole dataset at once: a first pass over the shards' labels and their documents'
    lengths gives the counts and version; a second joins each shard's labels with its documents' text into the
    splits' parquet files, which datasets then converts batch by batch. Memory holds one shard.
    """
    wanted = pa.table(
        {
            "category": pa.array(list(prompt_versions), pa.string()),
            "prompt_version": pa.array(list(prompt_versions.values()), pa.string()),
        }
    )
    connection.register("wanted_versions", wanted)
    # One snapshot of the lake for every query below, so counts, version and rows agree.
    connection.execute("BEGIN TRANSACTION")
    try:
        shards = [
            shard
            for (shard,) in connection.execute(
                "SELECT DISTINCT shard FROM teacher_labels WHERE teacher = $1 ORDER BY shard", [teacher]
            ).fetchall()
        ]
        summary = _summarize(connection, teacher, test_fraction, shards)
        counts, rows = summary.counts, sum(summary.rows.values())
        mean_chars = {column: (chars / rows if rows else 0.0) for column, chars in summary.chars.items()}
        if rows == 0:
            return SftExport("", root, counts, summary.over_cap, mean_chars, created=False, rows=0)
        version = summary.version
        directory = root / version
        created = not is_written(directory)
        if created:
            card = _card(version, counts, summary.over_cap, teacher, prompt_versions, test_fraction, mean_chars)

            def fill(staging: Path) -> None:
                import datasets

                (staging / "parquet").mkdir()
                parquet_paths = {split: staging / "parquet" / f"{split}.parquet" for split in SPLITS}
                _write_parquet(connection, teacher, test_fraction, shards, parquet_paths)
                features = datasets.Features({name: datasets.Value("string") for name in COLUMNS})
                save_splits(parquet_paths, summary.rows, staging / "hf", staging / "cache", features)
                (staging / CARD).write_text(card, encoding="utf-8")

            write_version(directory, fill)
        point_at(root, version)
        return SftExport(version, directory, counts, summary.over_cap, mean_chars, created=created, rows=rows)
    finally:
        connection.execute("ROLLBACK")
        connection.unregister("wanted_versions")
