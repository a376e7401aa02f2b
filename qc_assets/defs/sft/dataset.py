"""The SFT dataset: valid teacher labels in seed 000's format, split by document, exported as a HF dataset.

Rows are `{"system": category, "user": text, "assistant": query}` (never the teacher's reasoning). A document's
split is a function of its id alone (md5, the same in DuckDB and Python), so it never changes when shards are
added and a document never lands in both splits. Each distinct content gets its own version directory, written
aside and renamed into place; `current.json` points at the newest. The export goes shard by shard, so its memory
is one shard's, however large the corpus.
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
import pyarrow.compute as pc

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

# One corpus shard's labels by the configured teacher in the wanted prompt versions, in row order ($1: teacher,
# $2: shard). Small: keys and answers, never the documents. `record` is the row's part of the content version:
# doc_id, system, assistant, teacher and prompt_version separated by \x1f and ended by \x1e (a NULL query counts as
# the text None).
_SHARD_LABELS_SQL = """
    SELECT l.category AS system, l.query AS assistant, l.doc_id, l.shard, l.teacher, l.prompt_version,
           l.doc_id || chr(31) || l.category || chr(31) || coalesce(l.query, 'None') || chr(31) || l.teacher
               || chr(31) || l.prompt_version || chr(30) AS record,
           {split} AS split
    FROM teacher_labels l
    JOIN wanted_versions w USING (category, prompt_version)
    WHERE l.teacher = $1 AND l.shard = $2
    ORDER BY l.doc_id, l.category
"""


def _split_sql(test_fraction: float) -> str:
    return f"CASE WHEN {split_is_test_sql('l.doc_id', test_fraction)} THEN 'test' ELSE 'train' END"


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
            self._digest.update(value_buffer[offsets[0].as_py():offsets[-1].as_py()])

    def hexdigest(self) -> str:
        return self._digest.hexdigest()[:12]


def _shard_rows(connection: duckdb.DuckDBPyConnection, teacher: str, shard: str, test_fraction: float,
                documents: str) -> tuple[pa.Table, pa.Table, pa.Array]:
    """One shard's labels that have their document in the shard, the shard's corpus rows (a select list, doc_id
    first), and for each label the position of its document among them. A label is paired with the document text
    it was made from: the one in its own shard."""
    labels = connection.execute(
        _SHARD_LABELS_SQL.format(split=_split_sql(test_fraction)), [teacher, shard]
    ).to_arrow_table()
    corpus = connection.execute(f"SELECT {documents} FROM corpus WHERE shard = $1", [shard]).to_arrow_table()
    position = pc.index_in(labels["doc_id"], value_set=corpus["doc_id"])
    has_document = pc.is_valid(position)
    return labels.filter(has_document), corpus, position.filter(has_document)


@dataclass
class _Summary:
    counts: dict[str, dict[str, int]]
    rows: dict[str, int]
    nbytes: dict[str, int]
    chars: dict[str, int]
    version: str = ""


def _summarize(connection: duckdb.DuckDBPyConnection, teacher: str, test_fraction: float, shards: list[str]) -> _Summary:
    """Rows per split and category, characters of user and assistant, each split's size in bytes and the content
    version, shard by shard: the documents' lengths are read, never their text held."""
    summary = _Summary({split: {} for split in SPLITS}, dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0),
                       {"user": 0, "assistant": 0})
    version = ContentVersion(test_fraction)
    for shard in shards:
        labels, corpus, position = _shard_rows(
            connection, teacher, shard, test_fraction, "doc_id, n_chars, strlen(text) AS nbytes"
        )
        documents = corpus.take(position)
        version.add(labels["record"].combine_chunks())
        label_bytes = pc.fill_null(pc.binary_length(labels["assistant"]), 0)
        for name in ("system", "doc_id", "shard", "teacher", "prompt_version"):
            label_bytes = pc.add(label_bytes, pc.binary_length(labels[name]))
        # Arrow strings also take a 4-byte offset per value.
        row_bytes = pc.add(pc.add(label_bytes, documents["nbytes"]), 4 * len(COLUMNS))
        for split in SPLITS:
            in_split = pc.equal(labels["split"], split)
            systems = labels["system"].filter(in_split)
            for system, n in zip(*pc.value_counts(systems).flatten()):
                summary.counts[split][system.as_py()] = summary.counts[split].get(system.as_py(), 0) + n.as_py()
            summary.rows[split] += len(systems)
            summary.nbytes[split] += pc.sum(row_bytes.filter(in_split)).as_py() or 0
        summary.chars["user"] += pc.sum(documents["n_chars"]).as_py() or 0
        summary.chars["assistant"] += pc.sum(pc.utf8_length(labels["assistant"])).as_py() or 0
    summary.counts = {split: dict(sorted(counts.items())) for split, counts in summary.counts.items()}
    summary.version = version.hexdigest()
    return summary


class _SplitWriter:
    """One split into parquet and into `save_to_disk`'s layout (contiguous arrow files of at most about
    MAX_SHARD_BYTES, state.json, dataset_info.json), as `Dataset.save_to_disk` would write it, batch by batch."""

    def __init__(self, hf_dir: Path, parquet_path: Path, rows: int, nbytes: int, fingerprint: str) -> None:
        import datasets
        import pyarrow.parquet as pq

        self.features = datasets.Features({name: datasets.Value("string") for name in COLUMNS})
        self.schema = pa.schema([(name, pa.string()) for name in COLUMNS])
        self.hf_dir, self.rows, self.fingerprint = hf_dir, rows, fingerprint
        # An empty split still gets one (empty) arrow file: `load_from_disk` cannot load a split without any.
        files = max(1, min(rows, int(nbytes / MAX_SHARD_BYTES) + 1))
        # Dataset.shard(contiguous=True)'s boundaries.
        self.ends, end = [], 0
        for index in range(files):
            end += rows // files + (1 if index < rows % files else 0)
            self.ends.append(end)
        self.names = [f"data-{index:05d}-of-{files:05d}.arrow" for index in range(files)]
        hf_dir.mkdir(parents=True)
        self.parquet = pq.ParquetWriter(parquet_path, self.schema)
        self.file, self.written, self.writer = 0, 0, None

    def write(self, table: pa.Table) -> None:
        from datasets.arrow_writer import ArrowWriter

        table = table.select(list(COLUMNS)).cast(self.schema)
        self.parquet.write_table(table)
        while len(table):
            if self.writer is None:
                self.writer = ArrowWriter(features=self.features, path=str(self.hf_dir / self.names[self.file]),
                                          embed_local_files=True)
            take = min(len(table), self.ends[self.file] - self.written)
            self.writer.write_table(table.slice(0, take))
            table, self.written = table.slice(take), self.written + take
            if self.written == self.ends[self.file]:
                self.writer.finalize()
                self.writer.close()
                self.writer, self.file = None, self.file + 1

    def finish(self, split: str) -> None:
        import datasets
        from datasets.arrow_writer import ArrowWriter
        from datasets.utils.py_utils import asdict

        self.parquet.close()
        if self.rows == 0:
            self.writer = ArrowWriter(features=self.features, path=str(self.hf_dir / self.names[0]), embed_local_files=True)
            self.writer.finalize()
        if self.writer is not None:
            self.writer.close()
        if self.written != self.rows:
            raise RuntimeError(f"SFT split {split}: {self.written} rows written where {self.rows} were counted")
        state = {
            "_data_files": [{"filename": name} for name in self.names],
            "_fingerprint": self.fingerprint,
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (self.hf_dir / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        info = asdict(datasets.DatasetInfo(features=self.features))
        (self.hf_dir / "dataset_info.json").write_text(
            json.dumps({key: info[key] for key in sorted(info)}, indent=2), encoding="utf-8"
        )


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

    Shard by shard, never the whole dataset at once: a first pass over the shards' labels and their documents'
    lengths gives the counts, sizes and version; a second joins each shard's labels with its documents' text and
    writes them, in order (shard, doc_id, category), into parquet and arrow files. Memory holds one shard.
    """
    wanted = pa.table({
        "category": pa.array(list(prompt_versions), pa.string()),
        "prompt_version": pa.array(list(prompt_versions.values()), pa.string()),
    })
    connection.register("wanted_versions", wanted)
    # One snapshot of the lake for every query below, so counts, version and rows agree.
    connection.execute("BEGIN TRANSACTION")
    try:
        shards = [shard for (shard,) in connection.execute(
            "SELECT DISTINCT shard FROM teacher_labels WHERE teacher = $1 ORDER BY shard", [teacher]
        ).fetchall()]
        summary = _summarize(connection, teacher, test_fraction, shards)
        counts, rows = summary.counts, sum(summary.rows.values())
        mean_chars = {column: (chars / rows if rows else 0.0) for column, chars in summary.chars.items()}
        if rows == 0:
            return SftExport("", root, counts, mean_chars, created=False, rows=0)
        version = summary.version
        directory = root / version
        if (directory / "README.md").exists():
            _point_at(root, version)
            return SftExport(version, directory, counts, mean_chars, created=False, rows=rows)
        staging = root / f".{version}.partial"
        if staging.exists():
            shutil.rmtree(staging)
        (staging / "parquet").mkdir(parents=True)
        writers = {
            split: _SplitWriter(
                staging / "hf" / split, staging / "parquet" / f"{split}.parquet", summary.rows[split],
                summary.nbytes[split], hashlib.sha256(f"{version}:{split}".encode()).hexdigest()[:16],
            )
            for split in SPLITS
        }
        for shard in shards:
            labels, corpus, position = _shard_rows(connection, teacher, shard, test_fraction, "doc_id, text")
            for split, writer in writers.items():
                in_split = pc.equal(labels["split"], split)
                part, part_position = labels.filter(in_split), position.filter(in_split)
                # A document's text goes into each of its rows, one per category: joined a batch at a time, so
                # memory holds the shard's texts once.
                for start in range(0, len(part), BATCH_ROWS):
                    texts = corpus["text"].take(part_position.slice(start, BATCH_ROWS))
                    writer.write(part.slice(start, BATCH_ROWS).append_column("user", texts))
            del labels, corpus, position
        for split, writer in writers.items():
            writer.finish(split)
        (staging / "hf" / "dataset_dict.json").write_text(json.dumps({"splits": list(SPLITS)}), encoding="utf-8")
        (staging / "README.md").write_text(
            _card(version, counts, teacher, prompt_versions, test_fraction, mean_chars), encoding="utf-8"
        )
        os.rename(staging, directory)
        _point_at(root, version)
        return SftExport(version, directory, counts, mean_chars, created=True, rows=rows)
    finally:
        connection.execute("ROLLBACK")
        connection.unregister("wanted_versions")


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
