"""Hostile and broken input: property-based tests (hypothesis) over corpus lines and teacher outputs, and shard files
whose names carry quotes, SQL and spaces, empty shards and a huge document.

Each property is checked against a plain-Python model of the rule, so a wrong verdict on any generated input fails,
not only a crash.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qc_assets.categories import CATEGORIES, LabelError
from qc_assets.definitions import build_definitions
from qc_assets.defs.corpus.cleaning import STAGED, LengthWindow, stage_shard
from qc_assets.defs.corpus.sources import read_jsonl
from qc_assets_tests.conftest import document, lake_rows, materialization_metadata, materialize, write_jsonl

WINDOW = LengthWindow(min_chars=4, max_chars=60)
_CONTROLS = re.compile(r"[\x00-\x08\x0B-\x1F\x7F-\x9F]")

# Text that reaches the edges: controls, NUL, CR/LF, odd spaces (U+3000, U+2028), emoji, Japanese, RTL marks.
hostile_text = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(["\x00", "\r", "\n", "\t", "\u3000", "\u2028", "\x85", "\x7f", "\u200f", " ", "文"]),
    ),
    max_size=80,
)
good_object = st.fixed_dictionaries(
    {"text": hostile_text},
    optional={"id": st.one_of(st.sampled_from(["a", "b", "c", "'; DROP TABLE corpus; --", "../x"]), st.integers(0, 3))},
)
bad_object = st.one_of(
    st.fixed_dictionaries({"text": st.one_of(st.integers(), st.none(), st.lists(st.integers(), max_size=2))}),
    st.fixed_dictionaries({"text": hostile_text, "id": st.one_of(st.lists(st.integers(), max_size=2), st.floats())}),
)
line = st.one_of(
    good_object.map(lambda value: ("object", json.dumps(value, ensure_ascii=False).encode())),
    bad_object.map(lambda value: ("bad", json.dumps(value).encode())),
    st.binary(max_size=30).filter(lambda raw: b"\n" not in raw).map(lambda raw: ("raw", raw)),
    st.sampled_from([b"[1, 2]", b'"text"', b'{"text": ', b"", b"\xff\xfe{}"]).map(lambda raw: ("raw", raw)),
)


def _clean(text: str) -> str:
    return _CONTROLS.sub("", text.replace("\r\n", "\n")).strip()


def _model(lines: list[tuple[str, bytes]]) -> tuple[set[int], set[int], dict[int, tuple[str, str]]]:
    """Which lines are unreadable, which of those lack the text field, and for each readable line its status and
    cleaned text, by the documented rules: lengths first, then the first occurrence of a text wins, then the first
    occurrence of an id among those."""
    unreadable, without_text, verdicts = set(), set(), {}
    seen_texts, seen_ids = set(), set()
    for row, (_, raw) in enumerate(lines):
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            unreadable.add(row)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            unreadable.add(row)
            if isinstance(record, dict) and record.get("text") is None:
                without_text.add(row)
            continue
        doc_id = record.get("id")
        if doc_id is not None and not isinstance(doc_id, (str, int)):
            unreadable.add(row)
            continue
        text = _clean(record["text"])
        doc_id = str(doc_id) if doc_id not in (None, "") else f"shard:{row}"
        if not text:
            status = "empty"
        elif len(text) < WINDOW.min_chars:
            status = "too_short"
        elif len(text) > WINDOW.max_chars:
            status = "too_long"
        elif text in seen_texts:
            status = "duplicate_text_in_shard"
        else:
            seen_texts.add(text)
            status = "duplicate_id_in_shard" if doc_id in seen_ids else "ok"
            seen_ids.add(doc_id)
        verdicts[row] = (status, text)
    return unreadable, without_text, verdicts


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(line, max_size=25))
def test_every_corpus_line_is_kept_cleaned_dropped_for_its_reason_or_reported_by_number(lines):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "shard.jsonl"
        path.write_bytes(b"\n".join(raw for _, raw in lines) + (b"\n" if lines else b""))
        unreadable, without_text, verdicts = _model(lines)
        if not verdicts and unreadable and unreadable == without_text:
            # A shard where no row has the text field is refused whole, naming the setting.
            with pytest.raises(ValueError, match="QC_CORPUS_TEXT_COLUMN"):
                read_jsonl(str(path), "text", "id")
            return
        rows = read_jsonl(str(path), "text", "id")
        assert {row for row, _ in rows.bad_rows} == unreadable
        assert all(reason for _, reason in rows.bad_rows)
        connection = duckdb.connect()
        stage_shard(connection, rows.relation(connection), "shard", str(path), WINDOW)
        staged = {
            row: (status, text)
            for row, status, text in connection.execute(f"SELECT source_row, status, text FROM {STAGED}").fetchall()
        }
        connection.close()
    assert staged == verdicts


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400), st.sampled_from(sorted(CATEGORIES)))
def test_any_teacher_output_is_a_valid_label_or_a_label_error(content, name):
    category = CATEGORIES[name]
    try:
        label = category.parse(content)
    except LabelError as error:
        assert str(error).startswith(f"{name}: ")
        return
    assert label == category.validate(label)


label_text = st.text(st.characters(codec="utf-8", exclude_characters="\n\r"), min_size=1, max_size=60).filter(
    lambda text: text.strip()
)


@settings(max_examples=200, deadline=None)
@given(
    label_text,
    st.sampled_from(sorted(CATEGORIES)),
    st.sampled_from(["{}", '<think>{{"query": "x"}}</think>{}', "```json\n{}\n```", "Here it is: {} Done."]),
    st.booleans(),
)
def test_a_valid_query_in_any_wrapping_parses_to_the_validators_label(query, name, wrapping, ascii_only):
    category = CATEGORIES[name]
    try:
        expected = category.validate(query)
    except LabelError:
        return
    body = json.dumps({"query": query}, ensure_ascii=ascii_only)
    assert category.parse(wrapping.format(body)) == expected


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.sampled_from(sorted(CATEGORIES)))
def test_a_document_cannot_close_the_prompts_frame_or_add_an_instruction_block(text, name):
    category = CATEGORIES[name]
    prompt = category.prompt(text)
    template = category.prompt_template
    before, after = template.split("{text}")
    assert prompt.startswith(before) and prompt.endswith(after)
    inserted = prompt[len(before) : len(prompt) - len(after)]
    # Every tag the template uses to frame the document is gone from what the document put in.
    for tag in re.findall(r"</?[^<>\s]+>", template):
        assert tag not in inserted


def test_shard_files_named_with_quotes_sql_and_spaces_empty_shards_and_a_huge_document(settings_for, tmp_path):
    source = tmp_path / "corpus"
    hostile = 'it\'s "odd"; DROP TABLE corpus; --'
    write_jsonl(source / f"{hostile}.jsonl", [{"id": f"q{i}'--", "text": document(i)} for i in range(3)])
    write_jsonl(
        source / "with spaces.jsonl", [{"id": "s1", "text": document(10)}, {"id": "huge", "text": "長" * 2_000_000}]
    )
    (source / "empty.jsonl").write_bytes(b"")
    pq.write_table(
        pa.table({"text": pa.array([], pa.string()), "id": pa.array([], pa.string())}), source / "no_rows.parquet"
    )
    corpus_settings = settings_for(source)
    keys = build_partition_keys(corpus_settings)
    assert all(key.replace("_", "").isalnum() or "-" in key for key in keys), keys
    with dg.instance_for_test() as instance:
        results = {key: materialize(corpus_settings, key, instance) for key in keys}
    assert all(result.success for result in results.values()), {key: r.success for key, r in results.items()}
    counts = dict(lake_rows(corpus_settings, "SELECT shard, count(*) FROM corpus GROUP BY shard"))
    odd_key = next(key for key in keys if key.startswith("it"))
    assert counts == {odd_key: 3, "with_spaces": 1}
    assert lake_rows(corpus_settings, "SELECT doc_id FROM corpus WHERE shard = $1 ORDER BY doc_id", [odd_key]) == [
        ("q0'--",),
        ("q1'--",),
        ("q2'--",),
    ]
    spaces = materialization_metadata(results["with_spaces"])
    assert spaces["dropped_too_long"] == 1
    for empty in ("empty", "no_rows"):
        assert materialization_metadata(results[empty])["dagster/row_count"] == 0


def build_partition_keys(corpus_settings) -> list[str]:
    definitions = build_definitions(corpus_settings)
    return list(definitions.get_assets_def("corpus").partitions_def.get_partition_keys())
