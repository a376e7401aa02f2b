"""The training memory plan: the accelerator memory a student's training needs, estimated from the model's config
alone (parameters counted on torch's meta device, no weights loaded), so that a run that cannot fit fails in
seconds, before loading weights, instead of running out of memory in its first step.

Components, in bytes:

    weights      full fine-tuning: fp32 master weights (4 per parameter), under bf16 autocast too; LoRA: the frozen
                 base in the training precision (2 bf16, 4 fp32) plus fp32 adapters (4 per adapter parameter)
    autocast     full fine-tuning in bf16: the bf16 copy autocast makes of every weight, kept for backward (2)
    gradients    fp32, of what trains (4)
    optimizer    AdamW's two fp32 moments (8 per trained parameter); 8-bit optimizers 2
    activations  what backward keeps per token and layer (the norms' fp32 intermediates, q/k/v before and after
                 RoPE, attention in and out through SDPA (no length x length scores), the MLP's gate, up and
                 their product); with gradient checkpointing each layer's input only, plus one layer's full set
                 while it is recomputed
    logits       batch x length x vocab in fp32, as a plain causal-LM loss holds them. TRL's fused LM head scores
                 in tiles, so this is an upper bound, which leaves room for what the estimate leaves out

A plan fits when its total is at most USABLE_FRACTION of the device's memory (the rest: CUDA context, allocator
fragmentation, temporaries). `plan_memory` keeps the effective batch and shrinks the per-device batch (more
accumulation) until the plan fits; when no batch fits, the error names the changes that would, with their sizes.

    python -m qc_assets.training.memory        # the README's table: seed 000's four students on an 80 GiB GPU
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import TypedDict

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

GIB = 2**30
USABLE_FRACTION = 0.9
FP32 = 4
EIGHT_BIT_OPTIMIZER = "paged_adamw_8bit"


class MemoryPlanError(RuntimeError):
    """No per-device batch fits the device; the message has the estimate and what would fit."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a model: its parameter count and the sizes that set its activations."""

    parameters: int
    lora_features: int  # in + out features summed over the linear layers LoRA's "all-linear" wraps (all but the head)
    layers: int
    hidden: int
    intermediate: int
    attention: int  # query width: heads x head_dim
    key_value: int  # key (= value) width: key/value heads x head_dim
    vocab: int

    @classmethod
    def of(cls, config: PretrainedConfig) -> ModelShape:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        head = model.get_output_embeddings()
        text = config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(
            parameters=sum(parameter.numel() for parameter in model.parameters()),  # tied weights count once
            lora_features=sum(
                module.in_features + module.out_features
                for module in model.modules()
                if isinstance(module, torch.nn.Linear) and module is not head
            ),
            layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            intermediate=text.intermediate_size,
            attention=text.num_attention_heads * head_dim,
            key_value=(text.num_key_value_heads or text.num_attention_heads) * head_dim,
            vocab=text.vocab_size,
        )


@dataclass(frozen=True)
class TrainingSetup:
    """The choices that set training memory."""

    method: str  # "full" or "lora"
    precision: str  # "bf16" or "fp32" (resolved)
    batch_size: int  # per device
    gradient_accumulation: int
    max_length: int
    gradient_checkpointing: bool
    lora_r: int
    optimizer: str  # a transformers `optim` name

    def describe(self) -> str:
        method = "LoRA" if self.method == "lora" else "full fine-tuning"
        checkpointing = "gradient checkpointing" if self.gradient_checkpointing else "no gradient checkpointing"
        return (
            f"{method}, {self.precision}, per-device batch {self.batch_size} x {self.gradient_accumulation} "
            f"accumulation, max_length {self.max_length}, {checkpointing}, {self.optimizer}"
        )


@dataclass(frozen=True)
class MemoryPlan:
    setup: TrainingSetup
    components: dict[str, int]  # bytes

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def gib(self) -> dict[str, float]:
        """Per component and in total, in GiB: the metadata and the log line."""
        return {
            **{name: round(size / GIB, 2) for name, size in self.components.items()},
            "total": round(self.total / GIB, 2),
        }

    def summary(self) -> str:
        parts = ", ".join(f"{name} {size_text(size)}" for name, size in self.components.items() if size)
        return f"{size_text(self.total)} ({parts})"


def size_text(size: int) -> str:
    return f"{size / GIB:.1f} GiB" if size >= GIB else f"{size / 2**20:.0f} MiB"


def estimate(shape: ModelShape, setup: TrainingSetup) -> MemoryPlan:
    activation_bytes = 2 if setup.precision == "bf16" else FP32
    trained = shape.parameters if setup.method == "full" else setup.lora_r * shape.lora_features
    if setup.method == "full":
        weights = FP32 * shape.parameters
    else:
        weights = activation_bytes * shape.parameters + FP32 * trained
    tokens = setup.batch_size * setup.max_length
    return MemoryPlan(
        setup,
        {
            "weights": weights,
            "autocast": 2 * shape.parameters if setup.method == "full" and setup.precision == "bf16" else 0,
            "gradients": FP32 * trained,
            "optimizer": optimizer_bytes_per_parameter(setup.optimizer) * trained,
            "activations": tokens * _activation_bytes_per_token(shape, activation_bytes, setup.gradient_checkpointing),
            "logits": FP32 * tokens * shape.vocab,
        },
    )


def optimizer_bytes_per_parameter(optimizer: str) -> int:
    return 2 if "8bit" in optimizer else 2 * FP32


def _activation_bytes_per_token(shape: ModelShape, element_bytes: int, checkpointing: bool) -> int:
    layer = element_bytes * (6 * shape.hidden + 5 * shape.attention + 4 * shape.key_value + 4 * shape.intermediate)
    layer += FP32 * 4 * shape.hidden  # both RMSNorms upcast to fp32 and keep input and normalized values
    if checkpointing:
        return shape.layers * element_bytes * shape.hidden + layer
    return shape.layers * layer


def smaller_batches(setup: TrainingSetup) -> list[TrainingSetup]:
    """The setup, then each smaller per-device batch that divides it, with the accumulation that keeps the
    effective batch (per-device x accumulation) the same."""
    return [
        replace(setup, batch_size=size, gradient_accumulation=setup.gradient_accumulation * setup.batch_size // size)
        for size in range(setup.batch_size, 0, -1)
        if setup.batch_size % size == 0
    ]


def largest_fitting(shape: ModelShape, setup: TrainingSetup, usable: int) -> MemoryPlan | None:
    for candidate in smaller_batches(setup):
        plan = estimate(shape, candidate)
        if plan.total <= usable:
            return plan
    return None


def plan_memory(shape: ModelShape, setup: TrainingSetup, device_bytes: int | None, model: str) -> MemoryPlan:
    """The plan to train with: the setup as given when there is no limit to check (CPU), else the largest per-device
    batch that fits USABLE_FRACTION of device_bytes; MemoryPlanError when none does."""
    if device_bytes is None:
        return estimate(shape, setup)
    usable = int(device_bytes * USABLE_FRACTION)
    plan = largest_fitting(shape, setup, usable)
    if plan is not None:
        return plan
    smallest = estimate(shape, smaller_batches(setup)[-1])
    raise MemoryPlanError(
        f"{model} does not fit in {usable / GIB:.1f} GiB ({USABLE_FRACTION:.0%} of {device_bytes / GIB:.1f} GiB): "
        f"{setup.describe()} needs {estimate(shape, setup).summary()}, and even per-device batch 1 x "
        f"{smallest.setup.gradient_accumulation} needs {smallest.total / GIB:.1f} GiB. What would fit:\n"
        + "\n".join(f"  - {line}" for line in remedies(shape, setup, usable))
    )


class _SetupChange(TypedDict, total=False):
    """Fields of TrainingSetup that a remedy changes."""

    method: str
    gradient_checkpointing: bool
    optimizer: str


def remedies(shape: ModelShape, setup: TrainingSetup, usable: int) -> list[str]:
    """Each change that applies to the setup, with the largest per-device batch it fits at and its size; all of
    them together when none fits alone."""
    changes: list[tuple[str, _SetupChange]] = []
    if setup.method == "full":
        changes.append(("LoRA (QC_STUDENT_METHOD=lora)", {"method": "lora"}))
    if not setup.gradient_checkpointing:
        changes.append(
            ("gradient checkpointing (hyperparameter gradient_checkpointing: true)", {"gradient_checkpointing": True})
        )
    if "8bit" not in setup.optimizer:
        changes.append(
            (
                f"an 8-bit optimizer (QC_STUDENT_OPTIMIZER={EIGHT_BIT_OPTIMIZER}, needs bitsandbytes)",
                {"optimizer": EIGHT_BIT_OPTIMIZER},
            )
        )
    found = [_remedy(shape, replace(setup, **change), usable, name) for name, change in changes]
    if len(changes) > 1 and all(plan is None for plan, _ in found):
        together: _SetupChange = {}
        for _, change in changes:
            together.update(change)
        found.append(_remedy(shape, replace(setup, **together), usable, "all of these together"))
    return [line for _, line in found] or ["nothing this estimate knows of: a larger GPU"]


def _remedy(shape: ModelShape, setup: TrainingSetup, usable: int, name: str) -> tuple[MemoryPlan | None, str]:
    plan = largest_fitting(shape, setup, usable)
    if plan is not None:
        batch = f"per-device batch {plan.setup.batch_size} x {plan.setup.gradient_accumulation}"
        return plan, f"{name}: {batch}, {plan.total / GIB:.1f} GiB"
    smallest = estimate(shape, smaller_batches(setup)[-1])
    return None, f"{name}: still {smallest.total / GIB:.1f} GiB at per-device batch 1, not enough alone"


# ---------------------------------------------------------------------------------------------------------------
# Seed 000's students, for the README's table and the tests: their configs' shapes, built here without a download.


def seed_student_configs() -> dict[str, PretrainedConfig]:
    return {
        "Qwen/Qwen3-1.7B": Qwen3Config(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=True,
        ),
        "Qwen/Qwen3-4B": Qwen3Config(
            vocab_size=151936,
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=True,
        ),
        "sbintuitions/sarashina2.2-3b-instruct-v0.1": LlamaConfig(
            vocab_size=102400,
            hidden_size=2560,
            intermediate_size=8960,
            num_hidden_layers=32,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=160,
            tie_word_embeddings=False,
        ),
        "SakanaAI/TinySwallow-1.5B-Instruct": Qwen2Config(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    }


def default_setup(method: str) -> TrainingSetup:
    """The student settings' defaults as a GPU run resolves them: bf16 and gradient checkpointing."""
    from qc_assets.settings import Settings

    fields = Settings.model_fields
    return TrainingSetup(
        method=method,
        precision="bf16",
        batch_size=fields["student_batch_size"].default,
        gradient_accumulation=fields["student_gradient_accumulation"].default,
        max_length=fields["student_max_length"].default,
        gradient_checkpointing=True,
        lora_r=fields["student_lora_r"].default,
        optimizer=fields["student_optimizer"].default,
    )


def table(device_gib: float) -> str:
    components = ("weights", "autocast", "gradients", "optimizer", "activations", "logits")
    rows = [
        "| base model | parameters | method | per-device batch x accumulation | "
        + " | ".join(components)
        + " | total GiB |",
        "|---|---|---|---|" + "---|" * (len(components) + 1),
    ]
    for model, config in seed_student_configs().items():
        shape = ModelShape.of(config)
        for method in ("full", "lora"):
            plan = plan_memory(shape, default_setup(method), int(device_gib * GIB), model)
            sizes = plan.gib()
            rows.append(
                f"| {model} | {shape.parameters / 1e9:.2f} B | {method} | "
                f"{plan.setup.batch_size} x {plan.setup.gradient_accumulation} | "
                + " | ".join(f"{sizes[name]:.1f}" for name in components)
                + f" | **{sizes['total']:.1f}** |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description="The memory plan of seed 000's students with the default settings.")
    parser.add_argument("--device-gib", type=float, default=80.0, help="GPU memory to plan for (default 80).")
    args = parser.parse_args()
    print(
        f"Memory plans on a {args.device_gib:g} GiB GPU ({USABLE_FRACTION:.0%} usable), bf16, max_length "
        f"{default_setup('full').max_length}, gradient checkpointing, default settings otherwise:\n"
    )
    print(table(args.device_gib))


if __name__ == "__main__":
    main()
