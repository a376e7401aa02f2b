"""Versioned dataset exports on disk, shared by the SFT dataset and the training pairs.

A version directory is written aside and renamed into place, so it is complete or absent; `current.json` beside the
versions names the newest. Each version holds its splits as parquet files, the same rows as a `save_to_disk`
dataset under `hf/`, and a dataset card.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

CURRENT = "current.json"
CARD = "README.md"
# datasets' default `max_shard_size` for save_to_disk: an arrow file per this many bytes of a split.
MAX_SHARD_BYTES = 500 * 2**20


def write_version(directory: Path, fill: Callable[[Path], None]) -> None:
    """`fill(staging)` writes the version's files; the staging directory then becomes `directory` in one rename."""
    staging = directory.with_name(f".{directory.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    fill(staging)
    os.rename(staging, directory)


def is_written(directory: Path) -> bool:
    return (directory / CARD).is_file()


def save_splits(
    parquet_paths: Mapping[str, Path],
    rows: Mapping[str, int],
    hf_dir: Path,
    cache_dir: Path,
    features: datasets.Features,
) -> None:
    """The parquet splits (their columns in `features`, others left out) as a `save_to_disk` dataset;
    `from_parquet` converts them a row group at a time, through Arrow files in `cache_dir`, removed after."""
    import datasets

    columns: Sequence[str] = list(features)
    splits = datasets.DatasetDict(
        {
            # datasets' parquet reader refuses a file without rows.
            split: datasets.Dataset.from_parquet(
                str(path), split=split, features=features, columns=columns, cache_dir=str(cache_dir)
            )
            if rows[split]
            else datasets.Dataset.from_dict({name: [] for name in columns}, features=features)
            for split, path in parquet_paths.items()
        }
    )
    for split, dataset in splits.items():
        if len(dataset) != rows[split]:
            raise RuntimeError(f"split {split}: {len(dataset)} rows written where {rows[split]} were counted")
    splits.save_to_disk(str(hf_dir), max_shard_size=MAX_SHARD_BYTES)
    # save_to_disk gives an empty split no arrow file, and load_from_disk cannot load a split without one.
    for split, dataset in splits.items():
        if not len(dataset):
            dataset.save_to_disk(str(hf_dir / split), num_shards=1)
    shutil.rmtree(cache_dir, ignore_errors=True)


def point_at(root: Path, version: str) -> None:
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
