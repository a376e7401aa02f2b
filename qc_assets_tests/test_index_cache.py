"""Each shard's BM25 index is built once and reused: by the run's other partitions, and by later runs from disk."""

from __future__ import annotations

from qc_assets.defs.corpus.synthetic import japanese_like_texts
from qc_assets.defs.scoring.index_cache import ShardIndexes, fingerprint
from qc_assets.defs.scoring.lexical import ShardIndex, lexical_checks


def _shard(count: int, seed: int) -> dict[str, str]:
    return {f"doc-{seed}-{i}": text for i, text in enumerate(japanese_like_texts(count, 120, seed=seed))}


def _checks(index: ShardIndex, texts: dict[str, str]):
    items = [(text[5:25], doc_id) for doc_id, text in texts.items()]
    return lexical_checks(index, items, candidates=5)


def test_a_saved_index_loads_back_memory_mapped_and_ranks_exactly_as_built(tmp_path):
    texts = _shard(30, seed=1)
    built = ShardIndex(list(texts), list(texts.values()))
    built.save(tmp_path / "index")
    loaded = ShardIndex.load(tmp_path / "index")
    assert loaded.doc_ids == built.doc_ids and loaded.nbytes == built.nbytes
    assert _checks(loaded, texts) == _checks(built, texts)


def test_a_shards_index_is_built_once_then_kept_in_memory_then_loaded_by_later_runs(tmp_path):
    first, second = _shard(20, seed=2), _shard(25, seed=3)
    run = ShardIndexes(tmp_path)
    index = run.get("shard-a", first)
    assert run.get("shard-a", first) is index
    run.get("shard-b", second)
    assert (run.built, run.loaded, run.reused) == (2, 0, 1)

    later = ShardIndexes(tmp_path)
    assert _checks(later.get("shard-a", first), first) == _checks(index, first)
    assert (later.built, later.loaded) == (0, 1)


def test_changed_documents_make_a_new_index_and_the_stale_one_goes(tmp_path):
    texts = _shard(20, seed=4)
    ShardIndexes(tmp_path).get("shard-a", texts)
    changed = {**texts, "doc-4-0": "まったく別の文章になった。"}
    assert fingerprint(changed) != fingerprint(texts)
    run = ShardIndexes(tmp_path)
    run.get("shard-a", changed)
    assert run.built == 1
    (shard_dir,) = [path for path in tmp_path.iterdir()]
    assert [path.name for path in shard_dir.iterdir()] == [fingerprint(changed)]


def test_a_concurrent_run_that_saved_the_same_index_first_wins(tmp_path, monkeypatch):
    texts = _shard(10, seed=5)
    ShardIndexes(tmp_path).get("shard-a", texts)
    # As if another process had saved it between this run's look and its own save.
    monkeypatch.setattr(ShardIndex, "is_saved", classmethod(lambda cls, directory: False))
    run = ShardIndexes(tmp_path)
    run.get("shard-a", texts)
    (shard_dir,) = list(tmp_path.iterdir())
    assert [path.name for path in shard_dir.iterdir()] == [fingerprint(texts)]
