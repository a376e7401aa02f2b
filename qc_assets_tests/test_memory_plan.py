"""The training memory plan on configs of seed 000's four students' real shapes, built here (meta device, no download)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from qc_assets.settings import SEED_STUDENT_BASE_MODELS
from qc_assets.training.memory import (
    GIB,
    USABLE_FRACTION,
    MemoryPlanError,
    ModelShape,
    default_setup,
    estimate,
    plan_memory,
    seed_student_configs,
    table,
)

REPO = Path(__file__).resolve().parents[1]
GPU_80 = 80 * GIB
# The model cards' parameter counts (tied embeddings counted once).
PUBLISHED_PARAMETERS = {
    "Qwen/Qwen3-1.7B": 1.7e9,
    "Qwen/Qwen3-4B": 4.0e9,
    "sbintuitions/sarashina2.2-3b-instruct-v0.1": 3.36e9,
    "SakanaAI/TinySwallow-1.5B-Instruct": 1.54e9,
}


@pytest.fixture(scope="module")
def shapes() -> dict[str, ModelShape]:
    return {model: ModelShape.of(config) for model, config in seed_student_configs().items()}


def test_the_shapes_are_seed_000s_students_with_their_published_sizes(shapes):
    assert set(shapes) == set(SEED_STUDENT_BASE_MODELS)
    for model, shape in shapes.items():
        assert shape.parameters == pytest.approx(PUBLISHED_PARAMETERS[model], rel=0.02), model
    # sarashina2.2 has an untied output head: its embedding matrix counts twice.
    sarashina = shapes["sbintuitions/sarashina2.2-3b-instruct-v0.1"]
    assert sarashina.vocab == 102400 and sarashina.attention == 16 * 160 and sarashina.key_value == 8 * 160


@pytest.mark.parametrize("method", ["full", "lora"])
def test_every_student_fits_one_80_gib_gpu_with_the_defaults_and_the_same_effective_batch(shapes, method):
    setup = default_setup(method)
    for model, shape in shapes.items():
        plan = plan_memory(shape, setup, GPU_80, model)
        assert plan.total <= USABLE_FRACTION * GPU_80, (model, plan.summary())
        assert (
            plan.setup.batch_size * plan.setup.gradient_accumulation == setup.batch_size * setup.gradient_accumulation
        )
        assert plan.setup.gradient_checkpointing and plan.setup.precision == "bf16"
        # The largest batch that fits: the next larger divisor of the configured batch would not.
        larger = [
            size for size in range(plan.setup.batch_size + 1, setup.batch_size + 1) if setup.batch_size % size == 0
        ]
        if larger:
            bigger = dataclasses.replace(plan.setup, batch_size=larger[0])
            assert estimate(shape, bigger).total > USABLE_FRACTION * GPU_80, model


def test_qwen3_4b_full_fine_tuning_at_batch_8_without_checkpointing_fails_naming_the_remedies(shapes):
    shape = shapes["Qwen/Qwen3-4B"]
    setup = dataclasses.replace(default_setup("full"), gradient_checkpointing=False)
    assert estimate(shape, setup).total > GPU_80
    with pytest.raises(MemoryPlanError) as failure:
        plan_memory(shape, setup, GPU_80, "Qwen/Qwen3-4B")
    message = str(failure.value)
    assert message.startswith("Qwen/Qwen3-4B does not fit in 72.0 GiB")
    assert "even per-device batch 1 x 32 needs" in message  # the smaller batch was tried
    remedies = message.split("What would fit:\n")[1].splitlines()
    assert [line.split(" (")[0].strip() for line in remedies] == [
        "- LoRA",
        "- gradient checkpointing",
        "- an 8-bit optimizer",
    ]
    assert all(" GiB" in line for line in remedies)  # each with its estimated size
    # Gradient checkpointing alone fits, at a smaller per-device batch with more accumulation.
    checkpointed = plan_memory(shape, dataclasses.replace(setup, gradient_checkpointing=True), GPU_80, "Qwen/Qwen3-4B")
    assert (
        f"per-device batch {checkpointed.setup.batch_size} x {checkpointed.setup.gradient_accumulation}" in remedies[1]
    )


def test_the_components_follow_the_method_and_precision(shapes):
    shape = shapes["Qwen/Qwen3-1.7B"]
    full = estimate(shape, default_setup("full")).components
    lora = estimate(shape, default_setup("lora")).components
    parameters = shape.parameters
    # Full fine-tuning in bf16: fp32 master weights, their bf16 autocast copies, fp32 gradients, AdamW's two moments.
    assert (full["weights"], full["autocast"], full["gradients"], full["optimizer"]) == (
        4 * parameters,
        2 * parameters,
        4 * parameters,
        8 * parameters,
    )
    # LoRA: the frozen base in bf16; gradients and optimizer state for the adapters only.
    adapters = 16 * shape.lora_features
    assert lora["weights"] == 2 * parameters + 4 * adapters and lora["autocast"] == 0
    assert (lora["gradients"], lora["optimizer"]) == (4 * adapters, 8 * adapters)
    assert full["logits"] == 4 * 8 * 2048 * shape.vocab
    # Without gradient checkpointing every layer keeps its activations: many times more.
    unchecked = estimate(shape, dataclasses.replace(default_setup("full"), gradient_checkpointing=False)).components
    assert unchecked["activations"] > 10 * full["activations"]
    # An 8-bit optimizer keeps 2 bytes per parameter.
    eight_bit = estimate(shape, dataclasses.replace(default_setup("full"), optimizer="paged_adamw_8bit")).components
    assert eight_bit["optimizer"] == 2 * parameters


def test_a_cpu_run_without_a_limit_is_not_checked(shapes):
    setup = dataclasses.replace(default_setup("full"), gradient_checkpointing=False)
    assert plan_memory(shapes["Qwen/Qwen3-4B"], setup, None, "Qwen/Qwen3-4B").setup == setup


def test_the_readme_table_is_what_the_command_prints():
    printed = subprocess.run(
        [sys.executable, "-m", "qc_assets.training.memory"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert printed.returncode == 0, printed.stderr
    assert table(80.0) in printed.stdout
    assert table(80.0) in (REPO / "README.md").read_text(encoding="utf-8")
