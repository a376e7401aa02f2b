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
    rows: dict[str, dict[str, int]]
    mean_chars: dict[str, float]
    created: bool

    @property
    def hf_dir(self) -> Path:
        return self.directory / "hf"


def select_rows(
    connection: duckdb.DuckDBPyConnection, teacher: str, prompt_versions: dict[str, str], test_fraction: float
) -> pa.Table:
    wanted = pa.table({
        "category": pa.array(list(prompt_versions), pa.string()),
        "prompt_version": pa.array(list(prompt_versions.values()), pa.string()),
    })
    connection.register("wanted_versions", wanted)
    try:
        return connection.execute(
            f"""
            SELECT l.category AS system, c.text AS "user", l.query AS assistant,
                   CASE WHEN {split_is_test_sql('l.doc_id', test_fraction)} THEN 'test' ELSE 'train' END AS split,
                   l.doc_id, l.shard, l.teacher, l.prompt_version
            FROM teacher_labels l
            JOIN wanted_versions w USING (category, prompt_version)
            JOIN corpus c ON c.doc_id = l.doc_id
            WHERE l.teacher = $1
            ORDER BY l.doc_id, l.category
            """,
            [teacher],
        ).to_arrow_table()
    finally:
        connection.unregister("wanted_versions")


def content_version(rows: pa.Table, test_fraction: float) -> str:
    digest = hashlib.sha256(f"{test_fraction!r}\0".encode())
    for batch in rows.select(["doc_id", "system", "assistant", "teacher", "prompt_version"]).to_batches(50_000):
        for doc_id, system, assistant, teacher, version in zip(*(column.to_pylist() for column in batch.columns)):
            digest.update(f"{doc_id}\x1f{system}\x1f{assistant}\x1f{teacher}\x1f{version}\x1e".encode())
    return digest.hexdigest()[:12]


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


def export(rows: pa.Table, root: Path, teacher: str, prompt_versions: dict[str, str], test_fraction: float) -> SftExport:
    import datasets
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    version = content_version(rows, test_fraction)
    counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    for row in rows.group_by(["split", "system"]).aggregate([("doc_id", "count")]).to_pylist():
        counts[row["split"]][row["system"]] = row["doc_id_count"]
    mean_chars = {
        column: (pc.mean(pc.utf8_length(rows[column])).as_py() or 0.0) if rows.num_rows else 0.0
        for column in ("user", "assistant")
    }
    directory = root / version
    if (directory / "README.md").exists():
        _point_at(root, version)
        return SftExport(version, directory, counts, mean_chars, created=False)
    staging = root / f".{version}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "parquet").mkdir(parents=True)
    by_split = {split: rows.filter(pc.equal(rows["split"], split)).drop_columns(["split"]) for split in SPLITS}
    dataset = datasets.DatasetDict({split: datasets.Dataset(table) for split, table in by_split.items()})
    dataset.save_to_disk(str(staging / "hf"))
    for split, table in by_split.items():
        pq.write_table(table, staging / "parquet" / f"{split}.parquet")
    (staging / "README.md").write_text(
        _card(version, counts, teacher, prompt_versions, test_fraction, mean_chars), encoding="utf-8"
    )
    os.rename(staging, directory)
    _point_at(root, version)
    return SftExport(version, directory, counts, mean_chars, created=True)


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
