"""A real vLLM engine (PyPI's CPU build) on a checkpoint the graph trained: the `vllm` generation backend in process,
the same checkpoint behind vLLM's OpenAI-compatible server for the `openai` backend, and greedy parity with the
`transformers` backend."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from qc_assets.categories import CATEGORIES, LabelError
from qc_assets.defs.generation.assets import answer_token_cap
from qc_assets.defs.generation.backends import GenerationRequest, open_generator
from qc_assets.defs.student.store import model_slug
from qc_assets.models.tiny import sample_texts
from qc_assets.paths import SAMPLE_CORPUS
from qc_assets.settings import Settings, load_settings
from qc_assets_tests.conftest import (
    build_talkative_student,
    lake_rows,
    materialization_metadata,
    materialize,
    materialize_asset,
    tick_checkpoint_sensor,
)
from qc_assets_tests.vllm_engine import VLLMServer, engine_environment

SHARDS = ("sample-00000", "sample-00001")
pytestmark = pytest.mark.long(35)


@dataclass
class Trained:
    environment: dict[str, str]
    instance: dg.DagsterInstance
    base_model: Path
    checkpoint: str
    path: Path
    work_dir: Path

    def with_settings(self, **extra: str) -> Settings:
        return load_settings({**self.environment, **extra})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Iterator[Trained]:
    """Two sample shards through corpus, replayed labels, SFT and training, as `make run` does. The base model is the
    tiny student redrawn to answer each prompt differently, and a few gentle steps keep it so: thirty steps from the
    tiny student's own init teach it to end every turn at once, and engines that agree on "" prove little."""
    work_dir = tmp_path_factory.mktemp("vllm")
    source = work_dir / "corpus"
    source.mkdir()
    for shard in SHARDS:
        shutil.copy(SAMPLE_CORPUS / f"{shard}.jsonl", source)
    base_model = build_talkative_student(work_dir / "base")
    environment = {
        "QC_DATA_DIR": str(work_dir / "data"),
        "QC_CORPUS_SOURCE": str(source),
        "QC_SCORER_MODEL": "tiny",
        "QC_SFT_TEST_FRACTION": "0.3",
        "QC_STUDENT_BASE_MODELS": str(base_model),
        "QC_STUDENT_MAX_STEPS": "6",
        "QC_STUDENT_LEARNING_RATE": "1e-4",
        "QC_STUDENT_BATCH_SIZE": "4",
        "QC_STUDENT_GRADIENT_ACCUMULATION": "1",
        "QC_STUDENT_MAX_LENGTH": "1024",
    }
    saved = dict(os.environ)
    os.environ.update({**engine_environment(work_dir / "vllm-cache"), "OMP_NUM_THREADS": "1"})
    settings = load_settings(environment)
    try:
        with dg.instance_for_test() as instance:
            for shard in SHARDS:
                assert materialize(settings, shard, instance).success
            assert materialize_asset(settings, "sft_dataset", instance).success
            result = materialize_asset(settings, "student_checkpoints", instance, partition=model_slug(str(base_model)))
            assert result.success
            metadata = materialization_metadata(result, "student_checkpoints")
            assert tick_checkpoint_sensor(settings, instance), "the sensor did not take the new checkpoint"
            yield Trained(environment, instance, base_model, metadata["checkpoint"], Path(metadata["path"]), work_dir)
    finally:
        os.environ.clear()
        os.environ.update(saved)


Generated = dict[tuple[str, str, str], tuple[str, int]]


def generate_in_lake(trained: Trained, settings: Settings) -> Generated:
    """Each shard's generated_queries partition of the trained checkpoint: (shard, doc_id, category) -> (query,
    output tokens)."""
    for shard in SHARDS:
        partition = dg.MultiPartitionKey({"checkpoint": trained.checkpoint, "shard": shard})
        result = materialize_asset(settings, "generated_queries", trained.instance, partition=partition)
        assert result.success
    rows = lake_rows(settings, "SELECT shard, doc_id, category, query, output_tokens, backend FROM generated_queries")
    assert {row[5] for row in rows} == {settings.generation_backend}
    return {(shard, doc_id, category): (query, tokens) for shard, doc_id, category, query, tokens, _ in rows}


def evaluated_documents(trained: Trained) -> list[tuple[str, str]]:
    return lake_rows(
        trained.with_settings(),
        "SELECT doc_id, text FROM corpus WHERE doc_id IN (SELECT DISTINCT doc_id FROM generated_queries) ORDER BY 1",
    )


@pytest.fixture(scope="module")
def vllm_queries(trained) -> Generated:
    return generate_in_lake(trained, trained.with_settings(QC_GENERATION_BACKEND="vllm"))


def test_the_vllm_backend_generates_every_shard_in_process_from_the_trained_checkpoint(trained, vllm_queries):
    documents = evaluated_documents(trained)
    assert len(documents) >= 4
    assert len(vllm_queries) == len(documents) * len(CATEGORIES)
    assert {category for _, _, category in vllm_queries} == set(CATEGORIES)
    assert len({query for query, _ in vllm_queries.values()}) > len(CATEGORIES)
    assert all(
        0 < tokens <= answer_token_cap(CATEGORIES[category]) for (_, _, category), (_, tokens) in vllm_queries.items()
    )


def test_vllm_and_transformers_write_the_same_greedy_queries(trained, vllm_queries):
    requests = [
        GenerationRequest(key=(doc_id, name), category=name, text=text)
        for doc_id, text in evaluated_documents(trained)
        for name in CATEGORIES
    ]
    answers = {}
    for backend in ("vllm", "transformers"):
        generator = open_generator(backend, str(trained.path), max_new_tokens=48)
        try:
            answers[backend] = [(result.query, result.output_tokens) for result in generator.generate(requests)]
        finally:
            generator.close()
    assert answers["vllm"] == answers["transformers"]
    # The graph generated with the per-category caps, all longer than 48 tokens: an answer that stopped sooner is the
    # same there.
    in_lake = {(doc_id, category): answer for (_, doc_id, category), answer in vllm_queries.items()}
    stopped = [(request.key, answer) for request, answer in zip(requests, answers["vllm"]) if answer[1] < 48]
    assert stopped and all(in_lake[key] == answer for key, answer in stopped)


def test_the_openai_backend_on_a_vllm_server_of_the_checkpoint_writes_what_the_engine_writes(trained, vllm_queries):
    with VLLMServer(trained.path, [trained.checkpoint], trained.work_dir) as server:
        served = generate_in_lake(
            trained, trained.with_settings(QC_GENERATION_BACKEND="openai", QC_GENERATION_BASE_URL=server.base_url)
        )
    assert served.keys() == vllm_queries.keys()
    for key, (query, tokens) in served.items():
        engine_query, engine_tokens = vllm_queries[key]
        assert tokens == engine_tokens
        if tokens < answer_token_cap(CATEGORIES[key[2]]):
            assert query == engine_query
        else:
            # Cut at its cap inside a character's bytes, the server's detokenizer holds back the last token's text.
            assert engine_query.startswith(query) and len(engine_query) - len(query) <= 2


def test_a_vllm_server_as_the_teacher_lands_labels_through_structured_output(trained):
    """A random-weight model answers gibberish; constrained to each category's JSON schema, the gibberish is a
    well-formed label, and the ledger, costs and journal behave as with any paid endpoint."""
    shard = SHARDS[0]
    with VLLMServer(trained.base_model, ["random-teacher"], trained.work_dir / "teacher") as server:
        assert_an_unconstrained_answer_is_no_label(server)
        settings = trained.with_settings(
            QC_TEACHER_BACKEND="openai",
            QC_TEACHER_BASE_URL=server.base_url,
            QC_TEACHER_MODEL="random-teacher",
            QC_TEACHER_RESPONSE_FORMAT="json_schema",
            QC_TEACHER_MAX_TOKENS="400",
            QC_TEACHER_CONCURRENCY="4",
            QC_TEACHER_PRICE="input=1,output=2",
            QC_TEACHER_TIMEOUT_S="120",
            QC_TEACHER_BATCH_SIZE="16",
        )
        first = materialize_asset(settings, "teacher_labels", trained.instance, partition=shard)
        assert first.success
        second = materialize_asset(settings, "teacher_labels", trained.instance, partition=shard)
        assert second.success
    metadata = materialization_metadata(first, "teacher_labels")
    (documents,) = lake_rows(settings, "SELECT count(*) FROM corpus WHERE shard = ?", [shard])[0]
    labels = lake_rows(
        settings,
        "SELECT category, query, input_tokens, output_tokens, cost_usd, attempts FROM teacher_labels "
        "WHERE teacher = 'random-teacher'",
    )
    quarantined = lake_rows(settings, "SELECT attempts FROM teacher_quarantine WHERE teacher = 'random-teacher'")
    assert metadata["keys"] == documents * len(CATEGORIES) == len(labels) + len(quarantined)
    assert metadata["labeled"] == len(labels) >= 0.9 * metadata["keys"]
    assert metadata["requests"] == sum(row[5] for row in labels) + sum(row[0] for row in quarantined)
    for category, query, input_tokens, output_tokens, cost, _ in labels:
        assert CATEGORIES[category].validate(query) == query
        assert input_tokens > 0 and output_tokens > 0
        assert cost == pytest.approx((input_tokens * 1 + output_tokens * 2) / 1e6)
    journal = settings.teacher_dir / "journal"
    assert not list(journal.rglob("segment-*.jsonl"))
    # The second run asks only for the keys the first quarantined.
    again = materialization_metadata(second, "teacher_labels")
    assert again["keys_already_labeled"] == len(labels)
    assert again["requests"] <= len(quarantined) * settings.teacher_max_attempts
    assert lake_rows(
        settings,
        "SELECT count(*) FROM (SELECT doc_id, category FROM teacher_labels WHERE teacher = 'random-teacher' "
        "GROUP BY ALL HAVING count(*) > 1)",
    ) == [(0,)]


def assert_an_unconstrained_answer_is_no_label(server: VLLMServer) -> None:
    category = CATEGORIES["title"]
    prompt = category.prompt(sample_texts()[0])
    body = {"model": "random-teacher", "messages": [{"role": "user", "content": prompt}], "max_tokens": 64}
    request = urllib.request.Request(
        f"{server.base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        content = json.loads(response.read())["choices"][0]["message"]["content"]
    with pytest.raises(LabelError):
        category.parse(content)
