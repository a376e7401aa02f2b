"""The student_checkpoints asset on the tiny Qwen3: Pipes training (settings through to the memory plan), the
checkpoints table, hand-dropped checkpoints."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import pytest
from transformers import AutoConfig

from qc_assets.defs.student.store import MANIFEST, list_checkpoints
from qc_assets.models.tiny import STUDENT_DIR, ensure_tiny_models, sample_texts
from qc_assets.paths import SAMPLE_CORPUS
from qc_assets.training.memory import (
    GIB,
    USABLE_FRACTION,
    ModelShape,
    TrainingSetup,
    estimate,
)
from qc_assets_tests.conftest import (
    lake_rows,
    materialization_metadata,
    materialize,
    materialize_asset,
)

FEW_STEPS = {"ops": {"student_checkpoints": {"config": {"max_steps": 4}}}}


@pytest.mark.long(60)
def test_the_tiny_student_trains_through_pipes_registers_once_and_sees_checkpoints_dropped_in_by_hand(
    settings_for, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    settings = settings_for(SAMPLE_CORPUS, QC_STUDENT_BASE_MODELS="tiny")
    # A memory limit that the tiny student's batch of 4 misses and a batch of 2 fits: the setting reaches the
    # training script, whose plan halves the batch and doubles the accumulation.
    model_dir = ensure_tiny_models(settings.data_root / "models", sample_texts())[STUDENT_DIR]
    batch_of_2 = TrainingSetup("full", "fp32", 2, 2, settings.student_max_length, False, 16, settings.student_optimizer)
    limit = estimate(ModelShape.of(AutoConfig.from_pretrained(model_dir)), batch_of_2).total * 1.01 / USABLE_FRACTION
    settings = settings_for(SAMPLE_CORPUS, QC_STUDENT_BASE_MODELS="tiny", QC_STUDENT_MEMORY_LIMIT_GIB=str(limit / GIB))
    with dg.instance_for_test() as instance:
        for path in sorted(SAMPLE_CORPUS.glob("*.jsonl")):
            assert materialize(settings, path.stem, instance).success
        assert materialize_asset(settings, "sft_dataset", instance).success
        result = materialize_asset(settings, "student_checkpoints", instance, partition="tiny", run_config=FEW_STEPS)
        assert result.success
        metadata = materialization_metadata(result, "student_checkpoints")
        assert metadata["steps"] == 4 and metadata["trained_now"] is True and metadata["tiny_model"] is True
        assert (metadata["per_device_train_batch_size"], metadata["gradient_accumulation_steps"]) == (2, 2)
        assert 0 < metadata["memory_plan_gib"]["total"] <= limit / GIB
        logs = [event.message for event in instance.all_logs(result.run_id) if event.message]
        assert any(message.startswith("step 4/4 loss") for message in logs)
        (row,) = lake_rows(
            settings, "SELECT checkpoint, base_model, steps, tiny_model, dataset_version FROM checkpoints"
        )
        assert row[1:4] == ("tiny", 4, True) and row[0] == metadata["checkpoint"]

        again = materialize_asset(settings, "student_checkpoints", instance, partition="tiny", run_config=FEW_STEPS)
        assert materialization_metadata(again, "student_checkpoints")["trained_now"] is False
        assert len(lake_rows(settings, "SELECT * FROM checkpoints")) == 1

        root = settings.data_root / "checkpoints"
        (trained,) = list_checkpoints(root)
        dropped = trained.path.parent / "tiny--handmade--20260101T000000Z"
        shutil.copytree(trained.path, dropped)
        manifest = json.loads((dropped / MANIFEST).read_text())
        manifest.update(checkpoint=dropped.name, created_at="2026-01-01T00:00:00+00:00")
        (dropped / MANIFEST).write_text(json.dumps(manifest))
        shutil.copytree(trained.path, trained.path.parent / "no-manifest", ignore=shutil.ignore_patterns(MANIFEST))
        corrupt = trained.path.parent / "corrupt-manifest"
        shutil.copytree(trained.path, corrupt)
        (corrupt / MANIFEST).write_text("{not json")
        third = materialize_asset(settings, "student_checkpoints", instance, partition="tiny", run_config=FEW_STEPS)
        assert third.success
        warnings = [
            event.message for event in instance.all_logs(third.run_id) if event.message and "ignoring" in event.message
        ]
        assert any("no-manifest" in message for message in warnings)
        assert any("corrupt-manifest" in message and "unreadable" in message for message in warnings)
    checkpoints = [row[0] for row in lake_rows(settings, "SELECT checkpoint FROM checkpoints ORDER BY created_at")]
    assert checkpoints == [dropped.name, trained.checkpoint]


def test_without_an_sft_dataset_the_student_fails_saying_what_to_materialize(settings_for):
    settings = settings_for(SAMPLE_CORPUS, QC_STUDENT_BASE_MODELS="tiny")
    with dg.instance_for_test() as instance:
        result = materialize_asset(settings, "student_checkpoints", instance, partition="tiny")
    assert not result.success
    assert "sft_dataset" in result.failure_data_for_node("student_checkpoints").user_failure_data.description
