"""The SFT dataset: seed 000's row format, a split by document that never leaks or moves, datasets round trips."""

from __future__ import annotations

import json
import random

import dagster as dg
import datasets
import duckdb
import pyarrow.parquet as pq

from qc_assets.categories import CATEGORIES
from qc_assets.defs.sft.dataset import is_test_document, split_is_test_sql
from qc_assets.hf_export import current_version
from qc_assets.paths import SAMPLE_CORPUS
from qc_assets_tests.conftest import document, materialization_metadata, materialize, materialize_asset, write_jsonl


def test_the_split_is_the_same_in_python_and_duckdb_and_has_the_configured_size():
    rng = random.Random(7)
    ids = [f"doc-{rng.getrandbits(64):x}" for _ in range(5000)] + ["qc-sample-00-00", "日本語のid", ""]
    connection = duckdb.connect()
    in_sql = dict(
        connection.execute(f"SELECT id, {split_is_test_sql('id', 0.2)} FROM unnest($1) AS t(id)", [ids]).fetchall()
    )
    assert all(in_sql[doc_id] == is_test_document(doc_id, 0.2) for doc_id in ids)
    share = sum(in_sql.values()) / len(ids)
    assert 0.18 < share < 0.22
    # A larger fraction only moves documents into test, never out of it.
    assert all(is_test_document(doc_id, 0.3) for doc_id in ids if is_test_document(doc_id, 0.2))


def sft_rows(settings) -> dict[str, list[dict]]:
    directory = current_version(settings.data_root / "sft")
    loaded = datasets.load_from_disk(str(directory / "hf"))
    return {split: list(loaded[split]) for split in loaded}


def test_the_sample_becomes_a_split_dataset_that_round_trips_through_datasets(settings_for, tmp_path):
    source = tmp_path / "corpus"
    shards = sorted(SAMPLE_CORPUS.glob("*.jsonl"))
    for path in shards[:3]:
        (source / path.name).parent.mkdir(parents=True, exist_ok=True)
        (source / path.name).write_bytes(path.read_bytes())
    settings = settings_for(source, QC_SFT_TEST_FRACTION="0.25")
    with dg.instance_for_test() as instance:
        for path in shards[:3]:
            assert materialize(settings, path.stem, instance).success
        result = materialize_asset(settings, "sft_dataset", instance)
        assert result.success
        metadata = materialization_metadata(result, "sft_dataset")
        rows = sft_rows(settings)
        directory = current_version(settings.data_root / "sft")
        # Nothing of the build is left beside the version: no staging directory, no datasets cache.
        assert sorted(path.name for path in directory.parent.iterdir()) == sorted(["current.json", directory.name])
        assert sorted(path.name for path in directory.iterdir()) == ["README.md", "hf", "parquet"]

        assert set(rows["train"][0]) >= {"system", "user", "assistant"} and "reasoning" not in rows["train"][0]
        train_docs = {row["doc_id"] for row in rows["train"]}
        test_docs = {row["doc_id"] for row in rows["test"]}
        assert train_docs and test_docs and not train_docs & test_docs
        assert all(is_test_document(doc, 0.25) for doc in test_docs) and not any(
            is_test_document(doc, 0.25) for doc in train_docs
        )
        assert {row["system"] for row in rows["train"]} == set(CATEGORIES)
        labels = {
            (row["doc_id"], row["category"]): row["query"]
            for row in map(
                json.loads, (SAMPLE_CORPUS.parent / "teacher" / "handwritten-sample.jsonl").read_text().splitlines()
            )
        }
        assert all(
            labels[(row["doc_id"], row["system"])] == row["assistant"] for split in rows.values() for row in split
        )
        assert metadata["train_rows"] == len(rows["train"]) and metadata["test_rows"] == len(rows["test"])
        assert metadata["train_rows"] + metadata["test_rows"] == 48 * 7

        from_parquet = datasets.load_dataset(
            "parquet",
            data_files={split: str(directory / "parquet" / f"{split}.parquet") for split in ("train", "test")},
        )
        assert sorted(map(json.dumps, from_parquet["test"].to_list())) == sorted(map(json.dumps, rows["test"]))
        card = (directory / "README.md").read_text(encoding="utf-8")
        assert "handwritten-sample" in card and "| title | `replay` |" in card

        again = materialize_asset(settings, "sft_dataset", instance)
        assert materialization_metadata(again, "sft_dataset")["new_version"] is False

        # A new shard adds documents; every document keeps the split it had.
        (source / shards[3].name).write_bytes(shards[3].read_bytes())
        settings = settings_for(source, QC_SFT_TEST_FRACTION="0.25")
        assert materialize(settings, shards[3].stem, instance).success
        grown = materialize_asset(settings, "sft_dataset", instance)
        assert materialization_metadata(grown, "sft_dataset")["version"] != metadata["version"]
        rows_after = sft_rows(settings)
        assert {row["doc_id"] for row in rows_after["test"]} >= test_docs
        assert {row["doc_id"] for row in rows_after["train"]} >= train_docs
        assert len({row["doc_id"] for row in rows_after["train"] + rows_after["test"]}) == 64


def test_without_labels_the_dataset_fails_saying_what_to_materialize(settings_for, tmp_path):
    source = write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"id": "x", "text": document(0)}]).parent
    settings = settings_for(source)
    with dg.instance_for_test() as instance:
        assert materialize(settings, "a", instance).success
        result = materialize_asset(settings, "sft_dataset", instance)
    assert not result.success
    assert "teacher_labels" in result.failure_data_for_node("sft_dataset").user_failure_data.description


def test_a_split_without_documents_is_an_empty_split_that_loads(settings_for, tmp_path):
    source = tmp_path / "corpus"
    (source / "a.jsonl").parent.mkdir(parents=True)
    sample = sorted(SAMPLE_CORPUS.glob("*.jsonl"))[0]
    (source / "a.jsonl").write_bytes(sample.read_bytes())
    # No document of the shard falls below this fraction: the test split is empty.
    settings = settings_for(source, QC_SFT_TEST_FRACTION="0.000001")
    with dg.instance_for_test() as instance:
        assert materialize(settings, "a", instance).success
        result = materialize_asset(settings, "sft_dataset", instance)
        assert result.success
        metadata = materialization_metadata(result, "sft_dataset")
    rows = sft_rows(settings)
    assert len(rows["test"]) == metadata["test_rows"] == 0 and len(rows["train"]) == metadata["train_rows"] > 0
    directory = current_version(settings.data_root / "sft")
    empty = pq.read_table(directory / "parquet" / "test.parquet")
    assert (
        empty.num_rows == 0
        and empty.column_names == pq.read_table(directory / "parquet" / "train.parquet").column_names
    )


def test_export_goes_shard_by_shard_pairs_each_label_with_its_own_shards_document_and_splits_files_by_size(
    tmp_path, monkeypatch
):
    import datasets
    import pyarrow as pa

    from qc_assets import hf_export
    from qc_assets.defs.sft import dataset
    from qc_assets.lake.resource import LakeResource

    lake = LakeResource(catalog=f"sqlite:{tmp_path / 'catalog.sqlite'}", data_path=f"{tmp_path / 'files'}/")
    versions = {name: category.prompt_version for name, category in CATEGORIES.items()}
    documents = [
        (f"d{shard}-{index}", f"s{shard}", f"本文 {shard}-{index}") for shard in (2, 0, 1) for index in range(3)
    ]
    labels = [
        (doc_id, shard, name, f"{name} {doc_id}") for doc_id, shard, _ in documents for name in ("title", "query")
    ]
    # A label whose document is in another shard, and one whose document is gone: neither has a row.
    labels += [("d0-0", "s1", "title", "wrong shard"), ("gone", "s0", "title", "no document")]
    with lake.get_connection() as connection:
        connection.register("docs", pa.table(list(zip(*documents)), names=["doc_id", "shard", "text"]))
        connection.execute(
            "INSERT INTO corpus (doc_id, shard, text, n_chars, source, source_row, text_hash, ingested_at) "
            "SELECT doc_id, shard, text, length(text), 'x', 0, 0, now() FROM docs"
        )
        connection.register("labels", pa.table(list(zip(*labels)), names=["doc_id", "shard", "category", "query"]))
        connection.execute(
            "INSERT INTO teacher_labels (doc_id, shard, category, query, teacher, prompt_version, created_at) "
            f"SELECT l.doc_id, l.shard, l.category, l.query, 't', v.v, now() FROM labels l JOIN "
            f"(VALUES {', '.join(f'({name!r}, {version!r})' for name, version in versions.items())}) v(c, v) "
            "ON v.c = l.category"
        )
        # One label flagged over its cap; the others' NULL flag counts as within it.
        connection.execute("UPDATE teacher_labels SET over_cap = true WHERE doc_id = 'd1-2' AND category = 'query'")
        monkeypatch.setattr(hf_export, "MAX_SHARD_BYTES", 1)
        export = dataset.export_from_lake(connection, tmp_path / "sft", "t", versions, 0.5)
    text_of = {doc_id: text for doc_id, _, text in documents}
    expected = sorted(
        (
            {
                "system": name,
                "user": text_of[doc_id],
                "assistant": query,
                "doc_id": doc_id,
                "shard": shard,
                "teacher": "t",
                "prompt_version": versions[name],
            }
            for doc_id, shard, name, query in labels[:-2]
        ),
        key=lambda row: (row["shard"], row["doc_id"], row["system"]),
    )
    loaded = datasets.load_from_disk(str(export.hf_dir))
    assert loaded["train"].to_list() + loaded["test"].to_list() != []
    for split in dataset.SPLITS:
        wanted = [row for row in expected if dataset.is_test_document(row["doc_id"], 0.5) == (split == "test")]
        assert loaded[split].to_list() == wanted
        # A byte per file: save_to_disk gives every row its own arrow file.
        assert len(list((export.hf_dir / split).glob("data-*.arrow"))) == max(1, len(wanted))
    assert (
        export.rows == len(expected)
        and sum(export.counts["train"].values()) + sum(export.counts["test"].values()) == 18
    )
    assert export.over_cap == {**dict.fromkeys(CATEGORIES, 0), "query": 1}
    card = (export.directory / "README.md").read_text(encoding="utf-8")
    train, test = (export.counts[split].get("query", 0) for split in dataset.SPLITS)
    assert "- over cap: 1 rows" in card and f"| query | `{versions['query']}` | {train} | {test} | 1 |" in card
