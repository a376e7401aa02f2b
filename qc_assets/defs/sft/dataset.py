"""The SFT dataset: valid teacher labels in seed 000's format, split by document, exported as a HF dataset.

Rows are `{"system": category, "user": text, "assistant": query}` (never the teacher's reasoning). A document's
split is a function of its id alone (md5, the same in DuckDB and Python), so it never changes when shards are
added and a document never lands in both splits. Each distinct content gets its own version directory, written
aside and renamed into place; `current.json` points at the newest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from qc_assets.categories import CATEGORIES

SPLITS = ("train", "test")
CURRENT = "current.json"
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
    mean_chars: dict[str, float]
    created: bool
    rows: int

    @property
    def hf_dir(self) -> Path:
        return self.directory / "hf"


# The dataset's columns, in order; `system` is the category, `user` the document, `assistant` the query.
COLUMNS = ("system", "user", "assistant", "doc_id", "shard", "teacher", "prompt_version")
# datasets' default `max_shard_size` for save_to_disk: an arrow file per this many bytes of a split.
MAX_SHARD_BYTES = 500 * 2**20
BATCH_ROWS = 4096
# DuckDB's memory while it joins and sorts every label with its document: beyond it, it spills to the staging
# directory, so a corpus of any size is exported in bounded memory.
EXPORT_MEMORY_LIMIT = "512MB"


def _rows_sql(select: str, test_fraction: float, where: str = "", order: bool = True) -> str:
    """The configured teacher's labels of the wanted prompt versions, joined with their documents ($1: teacher)."""
    return f"""
        SELECT {select}
        FROM teacher_labels l
        JOIN wanted_versions w USING (category, prompt_version)
        JOIN corpus c ON c.doc_id = l.doc_id
        WHERE l.teacher = $1 {where}
        {"ORDER BY l.doc_id, l.category" if order else ""}
    """


def _split_sql(test_fraction: float) -> str:
    return f"CASE WHEN {split_is_test_sql('l.doc_id', test_fraction)} THEN 'test' ELSE 'train' END"


# Each row's part of the version: doc_id, system, assistant, teacher and prompt_version, separated by \x1f and ended
# by \x1e. Only the query can be NULL; it counts as the text None, as it always has, so versions stay what they were.
_VERSION_RECORD_SQL = (
    "l.doc_id || chr(31) || l.category || chr(31) || coalesce(l.query, 'None') || chr(31) || l.teacher || chr(31) "
    "|| l.prompt_version || chr(30)"
)


def content_version(records, test_fraction: float) -> str:
    """A hash of the rows' keys and answers (not the documents), in row order; `records` are Arrow batches whose
    one string column holds each row's _VERSION_RECORD_SQL."""
    digest = hashlib.sha256(f"{test_fraction!r}\0".encode())
    for batch in records:
        # The records of a batch lie back to back in its values buffer: hashed there, without a Python string each.
        values = batch.column(0).cast(pa.string())
        if len(values):
            _, offset_buffer, value_buffer = values.buffers()
            offsets = pa.Array.from_buffers(pa.int32(), len(values) + 1, [None, offset_buffer], offset=values.offset)
            digest.update(value_buffer[offsets[0].as_py():offsets[-1].as_py()])
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class _SplitSize:
    rows: int
    nbytes: int


def _summarize(connection: duckdb.DuckDBPyConnection, teacher: str, test_fraction: float):
    """Rows per split and category, mean characters of user and assistant, and each split's size in bytes."""
    rows = connection.execute(
        _rows_sql(
            f"""{_split_sql(test_fraction)} AS split, l.category AS system, count(*) AS n,
                sum(length(c.text)) AS user_chars, sum(length(l.query)) AS assistant_chars,
                sum(strlen(c.text) + strlen(l.query) + strlen(l.category) + strlen(l.doc_id) + strlen(l.shard)
                    + strlen(l.teacher) + strlen(l.prompt_version)) AS nbytes""",
            test_fraction, order=False,
        ) + " GROUP BY ALL",
        [teacher],
    ).fetchall()
    counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    sizes = {split: _SplitSize(0, 0) for split in SPLITS}
    chars = {"user": 0, "assistant": 0}
    for split, system, n, user_chars, assistant_chars, nbytes in rows:
        counts[split][system] = n
        # Arrow strings also take a 4-byte offset per value.
        sizes[split] = _SplitSize(sizes[split].rows + n, sizes[split].nbytes + int(nbytes) + 4 * len(COLUMNS) * n)
        chars["user"] += int(user_chars)
        chars["assistant"] += int(assistant_chars)
    total = sum(size.rows for size in sizes.values())
    mean_chars = {column: (chars[column] / total if total else 0.0) for column in chars}
    return counts, sizes, mean_chars


def _write_split(
    connection: duckdb.DuckDBPyConnection, teacher: str, test_fraction: float, split: str, size: _SplitSize,
    hf_dir: Path, parquet_path: Path, fingerprint: str,
) -> None:
    """Stream one split, in order, into parquet and into `save_to_disk`'s layout (contiguous arrow shards of at most
    about MAX_SHARD_BYTES, state.json, dataset_info.json), as `Dataset.save_to_disk` would write it."""
    import datasets
    import pyarrow.parquet as pq
    from datasets.arrow_writer import ArrowWriter
    from datasets.utils.py_utils import asdict

    features = datasets.Features({name: datasets.Value("string") for name in COLUMNS})
    # An empty split still gets one (empty) arrow file: `load_from_disk` cannot load a split without any.
    shards = max(1, min(size.rows, int(size.nbytes / MAX_SHARD_BYTES) + 1))
    # Dataset.shard(contiguous=True)'s boundaries.
    ends, start = [], 0
    for index in range(shards):
        start += size.rows // shards + (1 if index < size.rows % shards else 0)
        ends.append(start)
    names = [f"data-{index:05d}-of-{shards:05d}.arrow" for index in range(shards)]
    hf_dir.mkdir(parents=True)
    reader = connection.execute(
        _rows_sql(", ".join(f'{expression} AS "{name}"' for name, expression in _COLUMN_SQL.items()), test_fraction,
                  where=f"AND {_split_sql(test_fraction)} = '{split}'"),
        [teacher],
    ).to_arrow_reader(BATCH_ROWS)
    schema = pa.schema([(name, pa.string()) for name in COLUMNS])
    shard, written, writer = 0, 0, None
    with pq.ParquetWriter(parquet_path, schema) as parquet:
        try:
            for batch in reader:
                batch = pa.Table.from_batches([batch]).cast(schema)
                parquet.write_table(batch)
                while len(batch):
                    if writer is None:
                        writer = ArrowWriter(features=features, path=str(hf_dir / names[shard]), embed_local_files=True)
                    take = min(len(batch), ends[shard] - written)
                    writer.write_table(batch.slice(0, take))
                    batch, written = batch.slice(take), written + take
                    if written == ends[shard]:
                        writer.finalize()
                        writer.close()
                        writer, shard = None, shard + 1
            if size.rows == 0:
                writer = ArrowWriter(features=features, path=str(hf_dir / names[0]), embed_local_files=True)
                writer.finalize()
        finally:
            if writer is not None:
                writer.close()
    if written != size.rows:
        raise RuntimeError(f"SFT split {split}: {written} rows written where {size.rows} were counted (the lake changed?)")
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (hf_dir / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    info = asdict(datasets.DatasetInfo(features=features))
    (hf_dir / "dataset_info.json").write_text(json.dumps({key: info[key] for key in sorted(info)}, indent=2), encoding="utf-8")


_COLUMN_SQL = {
    "system": "l.category", "user": "c.text", "assistant": "l.query", "doc_id": "l.doc_id", "shard": "l.shard",
    "teacher": "l.teacher", "prompt_version": "l.prompt_version",
}


def _card(version: str, rows: dict[str, dict[str, int]], teacher: str, prompt_versions: dict[str, str],
          test_fraction: float, mean_chars: dict[str, float]) -> str:
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
        "",
        "| category | prompt version | train | test |",
        "|---|---|---|---|",
        *(
            f"| {name} | `{prompt_versions[name]}` | {rows['train'].get(name, 0)} | {rows['test'].get(name, 0)} |"
            for name in CATEGORIES
        ),
        f"| all | | {sum(rows['train'].values())} | {sum(rows['test'].values())} |",
        "",
    ]
    return "\n".join(lines)


def export_from_lake(
    connection: duckdb.DuckDBPyConnection, root: Path, teacher: str, prompt_versions: dict[str, str], test_fraction: float
) -> SftExport:
    """The teacher's valid labels with their documents as the dataset version they make, written when new.

    Streamed from DuckDB, never held whole: the version comes from the rows' keys and answers, the counts from an
    aggregate, and the rows go in batches into parquet and arrow files, while DuckDB joins and sorts within
    EXPORT_MEMORY_LIMIT (spilling beyond it). Memory stays flat however large the corpus.
    """
    wanted = pa.table({
        "category": pa.array(list(prompt_versions), pa.string()),
        "prompt_version": pa.array(list(prompt_versions.values()), pa.string()),
    })
    connection.register("wanted_versions", wanted)
    # One snapshot of the lake for every query below, so counts, version and rows agree.
    connection.execute("BEGIN TRANSACTION")
    try:
        counts, sizes, mean_chars = _summarize(connection, teacher, test_fraction)
        rows = sum(size.rows for size in sizes.values())
        if rows == 0:
            return SftExport("", root, counts, mean_chars, created=False, rows=0)
        records = connection.execute(_rows_sql(_VERSION_RECORD_SQL, test_fraction), [teacher]).to_arrow_reader(50_000)
        version = content_version(records, test_fraction)
        directory = root / version
        if (directory / "README.md").exists():
            _point_at(root, version)
            return SftExport(version, directory, counts, mean_chars, created=False, rows=rows)
        staging = root / f".{version}.partial"
        if staging.exists():
            shutil.rmtree(staging)
        (staging / "parquet").mkdir(parents=True)
        spill = staging / ".spill"
        connection.execute(f"SET memory_limit = '{EXPORT_MEMORY_LIMIT}'")
        connection.execute(f"SET temp_directory = {_literal(str(spill))}")
        for split in SPLITS:
            _write_split(
                connection, teacher, test_fraction, split, sizes[split], staging / "hf" / split,
                staging / "parquet" / f"{split}.parquet", hashlib.sha256(f"{version}:{split}".encode()).hexdigest()[:16],
            )
        (staging / "hf" / "dataset_dict.json").write_text(json.dumps({"splits": list(SPLITS)}), encoding="utf-8")
        shutil.rmtree(spill, ignore_errors=True)
        (staging / "README.md").write_text(
            _card(version, counts, teacher, prompt_versions, test_fraction, mean_chars), encoding="utf-8"
        )
        os.rename(staging, directory)
        _point_at(root, version)
        return SftExport(version, directory, counts, mean_chars, created=True, rows=rows)
    finally:
        connection.execute("ROLLBACK")
        connection.unregister("wanted_versions")


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _point_at(root: Path, version: str) -> None:
    pointer = root / (CURRENT + ".tmp")
    pointer.write_text(json.dumps({"version": version}) + "\n", encoding="utf-8")
    os.replace(pointer, root / CURRENT)


def current_version(root: Path) -> Path | None:
    try:
        version = json.loads((root / CURRENT).read_text(encoding="utf-8"))["version"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None
    directory = root / version
    return directory if directory.is_dir() else None
