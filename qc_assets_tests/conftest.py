from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pytest

from qc_assets.definitions import build_definitions
from qc_assets.lake.resource import LakeResource
from qc_assets.models.tiny import ensure_tiny_models, sample_texts
from qc_assets.settings import Settings, load_settings
from qc_assets.testing.helpers import BIN, document, run_qc, write_jsonl  # noqa: F401  (the tests' helpers, here for them)
from qc_assets.testing.lake_servers import PostgresServer, S3Server

# Tests never reach a hub; a code path that tried would fail here instead of hanging on the closed network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


def _expected_seconds(item: pytest.Item) -> float:
    marker = item.get_closest_marker("long")
    return marker.args[0] if marker else 0.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long tests first, shared between the two halves of the list: `make test` (pytest -n 2 --dist worksteal) hands
    each of its two processes one half to start with, so each starts with its share of the long tests, which then
    overlap the short ones instead of ending the suite. Shares are balanced longest first."""
    long_tests = sorted((item for item in items if _expected_seconds(item)), key=_expected_seconds, reverse=True)
    if not long_tests:
        return
    short_tests = [item for item in items if not _expected_seconds(item)]
    shares: tuple[list[pytest.Item], list[pytest.Item]] = ([], [])
    for item in long_tests:
        min(shares, key=lambda share: sum(map(_expected_seconds, share))).append(item)
    first_half_short = max(0, len(items) // 2 - len(shares[0]))
    items[:] = shares[0] + short_tests[:first_half_short] + shares[1] + short_tests[first_half_short:]


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models, built once per test session: the cross-encoder's fine-tune takes seconds of both cores.
    Under xdist the workers share the session's directory, and ensure_tiny_models' file lock has one build while
    the others wait."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny-models"
    ensure_tiny_models(shared, sample_texts())
    return shared


@pytest.fixture
def environment(tmp_path: Path) -> Callable[..., dict[str, str]]:
    def make(source: Path | str, **extra: str) -> dict[str, str]:
        return {"QC_DATA_DIR": str(tmp_path / "data"), "QC_CORPUS_SOURCE": str(source), **extra}

    return make


@pytest.fixture
def settings_for(environment) -> Callable[..., Settings]:
    return lambda source, **extra: load_settings(environment(source, **extra))


def materialize(
    settings: Settings, partition: str, instance: dg.DagsterInstance, run_config: dict | None = None
) -> dg.ExecuteInProcessResult:
    """One run of a shard partition: the corpus and teacher_labels assets."""
    keys = [dg.AssetKey("corpus"), dg.AssetKey("teacher_labels")]
    job = build_definitions(settings).get_repository_def().get_implicit_job_def_for_assets(keys)
    return job.execute_in_process(
        partition_key=partition, instance=instance, raise_on_error=False, run_config=run_config, asset_selection=keys
    )


def lake_rows(settings: Settings, query: str, parameters: list | None = None) -> list[tuple]:
    lake = LakeResource(catalog=settings.catalog, data_path=settings.data_path, read_only=True)
    with lake.get_connection() as connection:
        return connection.execute(query, parameters or []).fetchall()


def materialization_metadata(result: dg.ExecuteInProcessResult, node: str = "corpus") -> dict:
    (event,) = result.asset_materializations_for_node(node)
    return {key: value.value for key, value in event.metadata.items()}


def materialize_asset(
    settings: Settings,
    asset: str,
    instance: dg.DagsterInstance,
    partition: str | None = None,
    run_config: dict | None = None,
) -> dg.ExecuteInProcessResult:
    """One run of one asset (and partition), as `qc run --select <asset>` would launch it."""
    repository = build_definitions(settings).get_repository_def()
    job = repository.get_implicit_job_def_for_assets([dg.AssetKey(asset)])
    return job.execute_in_process(
        instance=instance,
        partition_key=partition,
        asset_selection=[dg.AssetKey(asset)],
        raise_on_error=False,
        run_config=run_config,
    )


def tick_checkpoint_sensor(settings: Settings, instance: dg.DagsterInstance) -> list[dg.RunRequest]:
    """One tick of the `new_checkpoints` sensor, its new checkpoint partitions added as the daemon adds them; its
    run requests, which the test materializes itself."""
    repository = build_definitions(settings).get_repository_def()
    sensor = repository.get_sensor_def("new_checkpoints")
    result = sensor(dg.build_sensor_context(instance=instance, repository_def=repository))
    if isinstance(result, dg.SkipReason):
        return []
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys or ()))
    return list(result.run_requests)


def build_talkative_student(directory: Path) -> Path:
    """The tiny student with its weights redrawn larger. With the usual small init, greedy decoding answers every
    prompt alike (newlines, or the end of the turn at once), so every query would be "". Redrawn, the answers are
    still gibberish, but they differ from prompt to prompt, so order, determinism, batching and engine parity are
    actually tested."""
    import torch
    from transformers import AutoModelForCausalLM

    from qc_assets.models.tiny import build_tiny_student, sample_texts

    build_tiny_student(directory, sample_texts())
    model = AutoModelForCausalLM.from_pretrained(directory)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.25)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL per test process (xdist worker); tests isolate themselves with a database each."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One S3 server per test process (xdist worker); tests isolate themselves with a prefix each."""
    with S3Server() as server:
        yield server


@pytest.fixture
def lake_on_postgres_and_s3(postgres_server: PostgresServer, s3_server: S3Server) -> dict[str, str]:
    """The environment of a fresh lake: its catalog in a new PostgreSQL database, its files under a new S3 prefix."""
    name = f"lake_{uuid.uuid4().hex[:16]}"
    return {
        "QC_LAKE_CATALOG": f"postgres:{postgres_server.create_database(name)}",
        "QC_LAKE_DATA_PATH": f"s3://{s3_server.bucket('lake')}/{name}/",
        **s3_server.environment(),
    }


@pytest.fixture
def lake_on_postgres(postgres_server: PostgresServer, tmp_path: Path) -> dict[str, str]:
    """The environment of a fresh lake whose catalog is a new PostgreSQL database and whose files are a directory
    every "machine" of the test shares."""
    name = f"lake_{uuid.uuid4().hex[:16]}"
    return {
        "QC_LAKE_CATALOG": f"postgres:{postgres_server.create_database(name)}",
        "QC_LAKE_DATA_PATH": f"{tmp_path / name / 'files'}/",
    }
