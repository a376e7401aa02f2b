"""Character-bigram BM25 indexes kept per shard: built once, then reused by every source and every scoring run.

A run scores its partitions shard by shard and holds one index at a time, so its memory does not grow with the
shards. Each index is saved under QC_DATA_DIR/indexes/<shard>/<fingerprint>/, the fingerprint a hash of the
shard's doc_ids and texts: a later run (another checkpoint's, say) maps it back from disk instead of building it,
and a shard whose documents changed gets a new index, the old one removed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qc_assets.defs.scoring.lexical import ShardIndex
from qc_assets.naming import slug

# Part of the fingerprint: a change to how the index is built or saved makes every saved index stale.
INDEX_FORMAT = 1


def fingerprint(texts: Mapping[str, str]) -> str:
    digest = hashlib.sha256(f"character-bigram BM25 {INDEX_FORMAT}\0".encode())
    for doc_id, text in texts.items():
        digest.update(f"{doc_id}\x1f{text}\x1e".encode())
    return digest.hexdigest()[:16]


@dataclass
class ShardIndexes:
    root: Path
    built: int = 0
    loaded: int = 0
    reused: int = 0
    seconds: float = 0.0
    _current: tuple[str, ShardIndex] | None = field(default=None, repr=False)

    def get(self, shard: str, texts: Mapping[str, str]) -> ShardIndex:
        started = time.perf_counter()
        key = fingerprint(texts)
        if self._current is not None and self._current[0] == key:
            self.reused += 1
        else:
            self._current = None  # the previous shard's index goes before the next one comes
            self._current = (key, self._load_or_build(shard, key, texts))
        self.seconds += time.perf_counter() - started
        return self._current[1]

    def _load_or_build(self, shard: str, key: str, texts: Mapping[str, str]) -> ShardIndex:
        directory = self.root / slug(shard) / key
        if ShardIndex.is_saved(directory):
            self.loaded += 1
            return ShardIndex.load(directory)
        index = ShardIndex(list(texts), list(texts.values()))
        self.built += 1
        _store(index, directory)
        return index


def _store(index: ShardIndex, directory: Path) -> None:
    """Saved aside and renamed into place; another run that saved the same index first wins. Indexes of the
    shard's earlier documents are removed."""
    staging = directory.with_name(f".{directory.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    index.save(staging)
    try:
        os.rename(staging, directory)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    for other in directory.parent.iterdir():
        if other.name != directory.name and not other.name.startswith("."):
            shutil.rmtree(other, ignore_errors=True)
