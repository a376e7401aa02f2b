"""A real vLLM engine (PyPI's CPU build) on a checkpoint the graph trained: the `vllm` generation backend in process,
the same checkpoint behind vLLM's OpenAI-compatible server for the `openai` backend, and greedy parity with the
`transformers` backend."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from qc_assets.categories import CATEGORIES
from qc_assets.defs.generation.assets import answer_token_cap
from qc_assets.defs.generation.backends import GenerationRequest, open_generator
from qc_assets.settings import SAMPLE_CORPUS, Settings, load_settings
from qc_assets_tests.conftest import lake_rows, materialization_metadata, materialize, materialize_asset
from qc_assets_tests.vllm_engine import VLLMServer, engine_environment

SHARDS = ("sample-00000", "sample-00001")
pytestmark = pytest.mark.long(90)


@dataclass
class Trained:
    settings: Settings
    instance: dg.DagsterInstance
    checkpoint: str
    path: Path
    work_dir: Path

    def with_settings(self, **extra: str) -> Settings:
        return load_settings({**self.environment, **extra})

    @property
    def environment(self) -> dict[str, str]:
        return {
            "QC_DATA_DIR": str(self.settings.data_dir), "QC_CORPUS_SOURCE": self.settings.corpus_source,
            "QC_STUDENT_BASE_MODELS": "tiny", "QC_SCORER_MODEL": "tiny", "QC_SFT_TEST_FRACTION": "0.3",
        }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Iterator[Trained]:
    """Two sample shards through corpus, replayed labels, SFT and the tiny student's training, as `make run` does."""
    work_dir = tmp_path_factory.mktemp("vllm")
    source = work_dir / "corpus"
    source.mkdir()
    for shard in SHARDS:
        shutil.copy(SAMPLE_CORPUS / f"{shard}.jsonl", source)
    saved = dict(os.environ)
    os.environ.update({**engine_environment(work_dir / "vllm-cache"), "OMP_NUM_THREADS": "1"})
    settings = load_settings({
        "QC_DATA_DIR": str(work_dir / "data"), "QC_CORPUS_SOURCE": str(source), "QC_STUDENT_BASE_MODELS": "tiny",
        "QC_SCORER_MODEL": "tiny", "QC_SFT_TEST_FRACTION": "0.3",
    })
    try:
        with dg.instance_for_test() as instance:
            for shard in SHARDS:
                assert materialize(settings, shard, instance).success
            assert materialize_asset(settings, "sft_dataset", instance).success
            result = materialize_asset(settings, "student_checkpoints", instance, partition="tiny")
            assert result.success
            metadata = materialization_metadata(result, "student_checkpoints")
            yield Trained(settings, instance, metadata["checkpoint"], Path(metadata["path"]), work_dir)
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
        trained.settings,
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
    # Thirty steps on the sample's labels: the student answers, and not with one string for every prompt.
    assert len({query for query, _ in vllm_queries.values()}) > len(CATEGORIES)
    assert all(0 < tokens <= answer_token_cap(CATEGORIES[category]) for (_, _, category), (_, tokens) in vllm_queries.items())


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
