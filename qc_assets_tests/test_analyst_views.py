"""The analysts' views answer their questions from the raw tables, for every DuckDB client that attaches the lake."""

from __future__ import annotations

import pyarrow as pa
import pytest

from qc_assets.lake import resource
from qc_assets.lake.resource import LakeResource
from qc_assets.lake.tables import TABLES, VIEWS

TEACHER = "deepseek-reasoner"


def lake_for(tmp_path, read_only: bool = False) -> LakeResource:
    return LakeResource(
        catalog=f"sqlite:{tmp_path / 'lake' / 'catalog.sqlite'}",
        data_path=str(tmp_path / "lake" / "data"),
        read_only=read_only,
    )


def insert(connection, table: str, rows: list[dict]) -> None:
    columns = TABLES[table].column_names
    connection.register("incoming", pa.Table.from_pylist([{name: row.get(name) for name in columns} for row in rows]))
    names = ", ".join(f'"{name}"' for name in columns)
    connection.execute(f'INSERT INTO "{table}" ({names}) SELECT {names} FROM incoming')
    connection.unregister("incoming")


def spend(attempts: int, cost: float) -> dict:
    return {
        "attempts": attempts,
        "cost_usd": cost,
        "input_tokens": 100 * attempts,
        "cached_input_tokens": 10 * attempts,
        "output_tokens": 50 * attempts,
        "reasoning_tokens": 40 * attempts,
    }


@pytest.fixture
def lake(tmp_path):
    lake = lake_for(tmp_path)
    documents = [
        {"doc_id": f"d{i}", "shard": shard, "text": f"文書{i}の本文。" * 30, "n_chars": 240}
        for i, shard in enumerate(["s0", "s0", "s1"])
    ]
    labels = [
        {"doc_id": "d0", "shard": "s0", "category": "title", "teacher": TEACHER, "query": "題0", **spend(1, 0.01)},
        {"doc_id": "d0", "shard": "s0", "category": "faq", "teacher": TEACHER, "query": "問0", **spend(3, 0.03)},
        {"doc_id": "d1", "shard": "s0", "category": "title", "teacher": TEACHER, "query": "題1", **spend(2, 0.02)},
        {"doc_id": "d2", "shard": "s1", "category": "title", "teacher": TEACHER, "query": "題2", **spend(1, 0.01)},
        {
            "doc_id": "d2",
            "shard": "s1",
            "category": "title",
            "teacher": "other-teacher",
            "query": "別",
            **spend(1, 0.5),
        },
    ]
    quarantined = [
        {
            "doc_id": "d1",
            "shard": "s0",
            "category": "faq",
            "teacher": TEACHER,
            "error": "summary exceeds the cap",
            "raw_output": '{"query": "長すぎる"}',
            "run_id": "run-1",
            **spend(6, 0.06),
        },
    ]
    scores = [
        {
            "doc_id": "d0",
            "shard": "s0",
            "category": "title",
            "source": f"teacher:{TEACHER}",
            "scorer": "bge@512",
            "score": 0.9,
            "query": "題0",
            "bm25_rank": 1,
        },
        {
            "doc_id": "d0",
            "shard": "s0",
            "category": "title",
            "source": "ckpt-a",
            "scorer": "bge@512",
            "score": 0.95,
            "query": "生徒0",
            "bm25_rank": 2,
            "rerank_rank": 1,
            "round_trip": True,
            "negative_doc_ids": ["d1"],
            "negative_ranks": [2],
            "negative_scores": [0.3],
            "negatives_too_close": 1,
            "negatives_near_duplicate": 0,
        },
        {
            "doc_id": "d0",
            "shard": "s0",
            "category": "title",
            "source": "ckpt-b",
            "scorer": "bge@512",
            "score": 0.7,
            "query": "生徒0b",
            "bm25_rank": 4,
        },
        {
            "doc_id": "d0",
            "shard": "s0",
            "category": "title",
            "source": "ckpt-a",
            "scorer": "other@512",
            "score": 0.1,
            "query": "生徒0",
            "bm25_rank": 2,
        },
        {
            "doc_id": "d2",
            "shard": "s1",
            "category": "title",
            "source": "ckpt-a",
            "scorer": "bge@512",
            "score": 0.4,
            "query": "生徒2",
            "bm25_rank": 1,
        },
    ]

    def fill(connection) -> None:
        insert(connection, "corpus", documents)
        insert(connection, "teacher_labels", labels)
        insert(connection, "teacher_quarantine", quarantined)
        insert(connection, "reranker_scores", scores)

    lake.transaction(fill, "fill the test lake")
    return lake


def rows(lake: LakeResource, sql: str) -> list[dict]:
    with lake.get_connection() as connection:
        relation = connection.sql(sql)
        return [dict(zip(relation.columns, row)) for row in relation.fetchall()]


def test_label_costs_counts_labels_quarantine_and_every_dollar_per_shard_category_and_teacher(lake):
    costs = {(row["shard"], row["category"], row["teacher"]): row for row in rows(lake, "SELECT * FROM label_costs")}
    assert set(costs) == {
        ("s0", "faq", TEACHER),
        ("s0", "title", TEACHER),
        ("s1", "title", TEACHER),
        ("s1", "title", "other-teacher"),
    }
    faq = costs[("s0", "faq", TEACHER)]
    assert (faq["labels"], faq["quarantined"], faq["requests"]) == (1, 1, 9)
    assert faq["cost_usd"] == pytest.approx(0.09) and faq["usd_per_label"] == pytest.approx(0.09)
    assert (faq["input_tokens"], faq["cached_input_tokens"], faq["output_tokens"], faq["reasoning_tokens"]) == (
        900,
        90,
        450,
        360,
    )
    title = costs[("s0", "title", TEACHER)]
    assert (title["labels"], title["quarantined"], title["cost_usd"]) == (2, 0, pytest.approx(0.03))
    assert costs[("s1", "title", "other-teacher")]["cost_usd"] == pytest.approx(0.5)
    (total,) = rows(lake, "SELECT sum(cost_usd) AS total FROM label_costs")
    assert total["total"] == pytest.approx(0.01 + 0.03 + 0.02 + 0.01 + 0.5 + 0.06)


def test_teacher_vs_student_pairs_each_student_query_with_the_teachers_under_the_same_scorer(lake):
    pairs = rows(lake, "SELECT * FROM teacher_vs_student ORDER BY checkpoint")
    # d2 has no teacher score and `other@512` scored no teacher query: neither can be compared.
    assert [(row["doc_id"], row["checkpoint"], row["scorer"]) for row in pairs] == [
        ("d0", "ckpt-a", "bge@512"),
        ("d0", "ckpt-b", "bge@512"),
    ]
    first, second = pairs
    assert (first["teacher"], first["teacher_query"], first["student_query"]) == (f"teacher:{TEACHER}", "題0", "生徒0")
    assert (first["teacher_score"], first["student_score"]) == (0.9, 0.95)
    assert first["score_gain"] == pytest.approx(0.05) and second["score_gain"] == pytest.approx(-0.2)
    assert (first["teacher_bm25_rank"], second["student_bm25_rank"]) == (1, 4)
    assert first["document"].startswith("文書0の本文。")


def test_round_trip_negatives_shows_each_kept_negative_and_pairs_without_any_once(lake):
    found = rows(
        lake,
        "SELECT source, scorer, doc_id, negative, negative_doc_id, negative_rank, negative_score, "
        "negatives_too_close, left(negative_start, 3) AS negative_start, left(document_start, 3) AS document_start "
        "FROM round_trip_negatives ORDER BY source, scorer, doc_id",
    )
    assert len(found) == 5
    (mined,) = [
        row for row in found if row["source"] == "ckpt-a" and row["scorer"] == "bge@512" and row["doc_id"] == "d0"
    ]
    assert mined == {
        "source": "ckpt-a",
        "scorer": "bge@512",
        "doc_id": "d0",
        "negative": 1,
        "negative_doc_id": "d1",
        "negative_rank": 2,
        "negative_score": 0.3,
        "negatives_too_close": 1,
        "negative_start": "文書1",
        "document_start": "文書0",
    }
    assert all(row["negative"] is None and row["document_start"] for row in found if row is not mined)


def test_quarantine_shows_why_with_the_document_start(lake):
    (row,) = rows(lake, "SELECT * FROM quarantine")
    assert (row["doc_id"], row["category"], row["error"], row["attempts"]) == (
        "d1",
        "faq",
        "summary exceeds the cap",
        6,
    )
    assert row["raw_output"] == '{"query": "長すぎる"}' and row["document_start"].startswith("文書1の本文。")
    assert len(row["document_start"]) == 200


def test_views_are_in_the_catalog_for_read_only_clients_and_are_replaced_only_when_their_definition_changes(
    lake, tmp_path, monkeypatch
):
    reader = lake_for(tmp_path, read_only=True)
    described = {
        row["view_name"]: row["comment"]
        for row in rows(reader, "SELECT view_name, comment FROM duckdb_views() WHERE database_name = 'lake'")
    }
    assert described == {view.name: view.comment for view in VIEWS.values()}
    assert rows(reader, "SELECT count(*) AS n FROM teacher_vs_student") == [{"n": 2}]

    def snapshots() -> int:
        return rows(reader, "SELECT count(*) AS n FROM lake.snapshots()")[0]["n"]

    before = snapshots()
    resource._tables_ready.clear()
    with lake.get_connection():
        pass
    assert snapshots() == before, "an unchanged view must not be rewritten by every new process"

    changed = VIEWS["quarantine"].__class__(
        name="quarantine", description=VIEWS["quarantine"].description, sql="SELECT doc_id FROM teacher_quarantine"
    )
    monkeypatch.setitem(VIEWS, "quarantine", changed)
    resource._tables_ready.clear()
    with lake.get_connection():
        pass
    assert rows(reader, "SELECT * FROM quarantine") == [{"doc_id": "d1"}]
