"""Fine-tune the student on the SFT dataset and publish a checkpoint: the out-of-process half of the training asset.

Run as `python -m qc_assets.defs.student.train` under Dagster Pipes, by `PipesSubprocessClient` on this machine or
`PipesK8sClient` on a GPU pod. It imports dagster-pipes and the ML libraries only, never `dagster`, and takes every
input from the Pipes extras:

    base_model          the model id recorded in the manifest ("Qwen/Qwen3-1.7B", "tiny")
    base_model_path     what `from_pretrained` loads (a hub id, or a local directory)
    dataset_dir         a `DatasetDict.save_to_disk` directory whose "train" split has columns system (category),
                        user (document), assistant (query); other columns are ignored
    dataset_version     recorded in the manifest
    checkpoints_root    the checkpoint store root; `slug` and `checkpoint_id` name the checkpoint inside it
    hyperparameters     {method: "full"|"lora", max_steps (-1: use epochs), num_train_epochs, learning_rate,
                        per_device_train_batch_size, gradient_accumulation_steps, max_length, warmup_ratio, lora_r,
                        lora_alpha, lora_dropout, seed, logging_steps, precision: "auto"|"bf16"|"fp32"}, and
                        optionally gradient_checkpointing (bool; default: on with CUDA, off on CPU)
    tiny                optional bool, recorded in the manifest as tiny_model

Loss is on the assistant turn only (TRL's `assistant_only_loss`, which needs `{% generation %}` markers in the chat
template). The tokenizer is saved with the template generation uses: the model's own one (Qwen3's, rendered with
`enable_thinking=False`, which puts the same empty think block into the prompt that training put before the
answer). The checkpoint is written into a hidden staging directory and published by `store.publish` (manifest
last, then one rename), so a failed run never leaves a visible checkpoint.
"""

from __future__ import annotations

import math
import os
import random
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import datasets
import peft
import torch
import transformers
import trl
from dagster_pipes import open_dagster_pipes
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from qc_assets.defs.student.store import publish, staging_directory

REQUIRED_EXTRAS = (
    "base_model",
    "base_model_path",
    "dataset_dir",
    "dataset_version",
    "checkpoints_root",
    "slug",
    "checkpoint_id",
    "hyperparameters",
)
REQUIRED_HYPERPARAMETERS = (
    "method",
    "max_steps",
    "num_train_epochs",
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "warmup_ratio",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "seed",
    "logging_steps",
    "precision",
)
DATASET_COLUMNS = ("system", "user", "assistant")
# Passed to apply_chat_template at generation (and used here to check the prompt against the training rendering).
# Templates that do not know the variable ignore it.
GENERATION_TEMPLATE_KWARGS = {"enable_thinking": False}

Log = Callable[[str], Any]


class TrainingInputError(ValueError):
    """Extras or a dataset that the training script cannot use; the message says which."""


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def check_extras(extras: Mapping[str, Any]) -> dict[str, Any]:
    missing = [key for key in REQUIRED_EXTRAS if extras.get(key) in (None, "")]
    if missing:
        raise TrainingInputError(f"missing Pipes extras: {', '.join(missing)}")
    hyperparameters = extras["hyperparameters"]
    if not isinstance(hyperparameters, Mapping):
        raise TrainingInputError(f"extras.hyperparameters must be a mapping, got {type(hyperparameters).__name__}")
    missing = [key for key in REQUIRED_HYPERPARAMETERS if key not in hyperparameters]
    if missing:
        raise TrainingInputError(f"missing hyperparameters: {', '.join(missing)}")
    if hyperparameters["method"] not in ("full", "lora"):
        raise TrainingInputError(f"hyperparameters.method must be 'full' or 'lora', got {hyperparameters['method']!r}")
    if hyperparameters["precision"] not in ("auto", "bf16", "fp32"):
        raise TrainingInputError(
            f"hyperparameters.precision must be 'auto', 'bf16' or 'fp32', got {hyperparameters['precision']!r}"
        )
    if not 0 <= float(hyperparameters["warmup_ratio"]) < 1:
        raise TrainingInputError(f"hyperparameters.warmup_ratio must be in [0, 1), got {hyperparameters['warmup_ratio']}")
    return dict(extras)


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def examples_needed(hp: Mapping[str, Any]) -> int | None:
    """How many training examples a run with a step count can use at most (None: every example, by epochs).

    max_steps optimizer steps of per_device_train_batch_size x gradient_accumulation_steps examples each, plus an
    eighth for the examples TRL drops (a prompt that fills max_length), so the run rarely needs a second pass.
    """
    steps = int(hp["max_steps"])
    if steps <= 0:
        return None
    needed = steps * int(hp["per_device_train_batch_size"]) * int(hp["gradient_accumulation_steps"])
    return needed + needed // 8


def load_conversations(dataset_dir: str | os.PathLike, limit: int | None = None, seed: int = 0) -> tuple[datasets.Dataset, int]:
    """The train split as conversations: system (category), user (document), assistant (query); nothing else, and
    the split's size.

    With `limit` below the split's size, a uniform random sample of `limit` rows (fixed by `seed`), in split order:
    a run of a few hundred steps then reads, checks and tokenizes those rows only, not a corpus-sized split (the
    trainer shuffles what it gets, so it sees a uniform sample either way). The split is memory-mapped; the rows
    used are copied into memory, so neither this nor TRL's preprocessing writes cache files into the dataset
    directory, which may be read-only (a mounted volume on the training pod).
    """
    directory = Path(dataset_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"dataset_dir {directory} does not exist or is not a directory")
    loaded = datasets.load_from_disk(str(directory))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise TrainingInputError(f"{directory}: no 'train' split (splits: {', '.join(loaded)})")
        train = loaded["train"]
    else:
        raise TrainingInputError(f"{directory}: expected a DatasetDict with a 'train' split, got a single Dataset")
    missing = [column for column in DATASET_COLUMNS if column not in train.column_names]
    if missing:
        raise TrainingInputError(f"{directory}: the train split lacks columns {', '.join(missing)}")
    total = len(train)
    if total == 0:
        raise TrainingInputError(f"{directory}: the train split is empty")
    train = train.select_columns(list(DATASET_COLUMNS))
    if limit is not None and limit < total:
        train = train.select(sorted(random.Random(seed).sample(range(total), limit)), keep_in_memory=True)
    columns = train.to_dict()
    unusable = sum(
        1
        for row in zip(*(columns[column] for column in DATASET_COLUMNS))
        if not all(isinstance(value, str) and value.strip() for value in row)
    )
    if unusable:
        raise TrainingInputError(
            f"{directory}: {unusable} train rows have an empty or non-string {', '.join(DATASET_COLUMNS)} value"
        )
    conversations = datasets.Dataset.from_dict(
        {
            "messages": [
                [
                    {"role": "system", "content": system},
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": assistant},
                ]
                for system, user, assistant in zip(columns["system"], columns["user"], columns["assistant"])
            ]
        }
    )
    return conversations, total


# ---------------------------------------------------------------------------------------------------------------
# Chat template


def training_chat_template(tokenizer, base_model: str) -> tuple[str, str]:
    """The template to train with, and where it came from ("model" or "trl").

    The model's own template when it marks the assistant's tokens with `{% generation %}`; else TRL's patched
    training twin of it (TRL recognises a template by exact text: Qwen3's original one maps to `qwen3_training`,
    which always renders the empty think block the original renders with enable_thinking=False, and marks it plus
    the answer and `<|im_end|>` for the loss).
    """
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise TrainingInputError(f"base model {base_model!r}: its tokenizer has no chat template")
    if has_generation_markers(template):
        return template, "model"
    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError as error:
        raise TrainingInputError(
            f"base model {base_model!r}: its chat template has no {{% generation %}} markers and TRL "
            f"{trl.__version__} has no training version of it, so the loss cannot be put on the assistant tokens "
            f"only ({error})"
        ) from None
    if not patched or not has_generation_markers(patched):
        raise TrainingInputError(
            f"base model {base_model!r}: TRL returned no training chat template with {{% generation %}} markers"
        )
    return patched, "trl"


def check_template_consistency(tokenizer, train_template: str, conversation: list[dict], base_model: str) -> None:
    """The generation prompt (saved template, thinking off) must be exactly how training renders the prompt part."""
    trained = tokenizer.apply_chat_template(conversation, chat_template=train_template, tokenize=False)
    prompt = tokenizer.apply_chat_template(
        conversation[:-1], add_generation_prompt=True, tokenize=False, **GENERATION_TEMPLATE_KWARGS
    )
    if not trained.startswith(prompt):
        raise TrainingInputError(
            f"base model {base_model!r}: the generation prompt is not a prefix of the training rendering, so the "
            f"model would be trained on a different context than it sees at generation.\n"
            f"generation prompt ends: {prompt[-120:]!r}\ntraining text there: {trained[len(prompt) - 120:len(prompt)]!r}"
        )
    encoded = tokenizer.apply_chat_template(
        conversation,
        chat_template=train_template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    answer = tokenizer.decode([t for t, keep in zip(encoded["input_ids"], encoded["assistant_masks"]) if keep])
    if conversation[-1]["content"] not in answer:
        raise TrainingInputError(
            f"base model {base_model!r}: the training template's assistant mask does not cover the answer "
            f"(masked text: {answer!r})"
        )


# ---------------------------------------------------------------------------------------------------------------
# Trainer


class PipesProgress(TrainerCallback):
    """Streams one line per logged step and keeps the loss curve; forces a log at the last step."""

    def __init__(self, log: Log):
        self.log = log
        self.loss_curve: list[list[float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps and args.logging_strategy != "no":
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return
        step = state.global_step
        if self.loss_curve and self.loss_curve[-1][0] == step:
            return
        loss = float(logs["loss"])
        self.loss_curve.append([step, loss])
        line = f"step {step}/{state.max_steps} loss {loss:.4f}"
        if "learning_rate" in logs:
            line += f" lr {float(logs['learning_rate']):.3e}"
        if "grad_norm" in logs:
            line += f" grad_norm {float(logs['grad_norm']):.3f}"
        if "mean_token_accuracy" in logs:
            line += f" acc {float(logs['mean_token_accuracy']):.3f}"
        self.log(line)


def build_trainer(
    extras: Mapping[str, Any], output_dir: str | os.PathLike, callbacks: list[TrainerCallback] | None = None
) -> tuple[SFTTrainer, Any, dict[str, Any]]:
    """Load data, tokenizer and model and build the SFTTrainer (its train_dataset is already tokenized and masked).

    Returns the trainer, the tokenizer to save (with the generation template), and facts for the manifest.
    """
    extras = check_extras(extras)
    hp = extras["hyperparameters"]
    base_model = extras["base_model"]
    precision = resolve_precision(hp["precision"])
    method = hp["method"]

    conversations, train_rows = load_conversations(extras["dataset_dir"], examples_needed(hp), int(hp["seed"]))

    tokenizer = AutoTokenizer.from_pretrained(extras["base_model_path"])
    train_template, template_source = training_chat_template(tokenizer, base_model)
    check_template_consistency(tokenizer, train_template, conversations[0]["messages"], base_model)

    # bf16: LoRA keeps the frozen base in bf16; full fine-tuning keeps fp32 master weights under bf16 autocast
    # (pure bf16 AdamW loses most updates at SFT learning rates) and the checkpoint is cast to bf16 when saved.
    if precision == "bf16" and method == "lora":
        load_dtype = torch.bfloat16
    else:
        load_dtype = torch.float32
    model = AutoModelForCausalLM.from_pretrained(extras["base_model_path"], dtype=load_dtype)

    peft_config = None
    if method == "lora":
        peft_config = peft.LoraConfig(
            task_type="CAUSAL_LM",
            target_modules="all-linear",
            r=int(hp["lora_r"]),
            lora_alpha=int(hp["lora_alpha"]),
            lora_dropout=float(hp["lora_dropout"]),
        )

    gradient_checkpointing = bool(hp.get("gradient_checkpointing", torch.cuda.is_available()))
    config = SFTConfig(
        output_dir=str(output_dir),
        max_steps=int(hp["max_steps"]),
        num_train_epochs=float(hp["num_train_epochs"]),
        learning_rate=float(hp["learning_rate"]),
        per_device_train_batch_size=int(hp["per_device_train_batch_size"]),
        gradient_accumulation_steps=int(hp["gradient_accumulation_steps"]),
        max_length=int(hp["max_length"]),
        # transformers 5 dropped `warmup_ratio`: a float `warmup_steps` below 1 is the ratio of the total steps.
        warmup_steps=float(hp["warmup_ratio"]),
        seed=int(hp["seed"]),
        logging_steps=hp["logging_steps"],  # an int, or a float below 1 for a ratio of the total steps
        logging_first_step=True,
        bf16=precision == "bf16",  # TRL's default is bf16=True, even on CPU: always set it
        fp16=False,
        # transformers 5.23 renamed gradient_checkpointing (TRL defaults that one to True) to activation_checkpointing
        activation_checkpointing=gradient_checkpointing,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # transformers refuses precision="bf16" on CPU without it
        assistant_only_loss=True,
        packing=False,
        report_to="none",
        save_strategy="no",
        # Counts attention-mask tokens (prompt and answer, not padding); "all" would count padding too.
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=conversations,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    # Progress reaches Dagster through PipesProgress; the trainer's own printer would repeat it as raw dicts.
    trainer.remove_callback(PrinterCallback)
    # SFTTrainer swaps in the same TRL template itself when the model's has no markers; make sure it did.
    expected = None if template_source == "model" else train_template
    if trainer.chat_template != expected:
        raise RuntimeError(
            f"base model {base_model!r}: SFTTrainer chose a different training chat template than expected"
        )
    used = len(trainer.train_dataset)
    if used == 0:
        raise TrainingInputError(
            f"every training example's prompt fills max_length={hp['max_length']} tokens: nothing to train on"
        )
    facts = {
        "precision": precision,
        "load_dtype": str(load_dtype).removeprefix("torch."),
        "chat_template_source": template_source,
        "gradient_checkpointing": gradient_checkpointing,
        "train_examples": train_rows,
        # With a step count, a seeded uniform sample of the split big enough for every step (see examples_needed).
        "train_examples_sampled": len(conversations),
        # Examples whose prompt alone fills max_length are dropped by TRL (nothing left to learn from).
        "train_examples_used": used,
        # Examples cut at max_length: the end of their answer (and its end-of-turn token) is not trained.
        "train_examples_truncated": sum(
            len(ids) >= int(hp["max_length"]) for ids in trainer.train_dataset["input_ids"]
        ),
    }
    return trainer, tokenizer, facts


# ---------------------------------------------------------------------------------------------------------------
# Training run


def _device() -> str:
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu"


def _peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _final_model(trainer: SFTTrainer, method: str, precision: str):
    model = trainer.accelerator.unwrap_model(trainer.model)
    if method == "lora":
        model = model.merge_and_unload()
    if precision == "bf16" and model.dtype != torch.bfloat16:
        model = model.to(torch.bfloat16)
    model.config.use_cache = True  # gradient checkpointing turns the cache off; generation wants it on
    return model


def train(extras: Mapping[str, Any], log: Log = print) -> dict[str, Any]:
    """Train, publish the checkpoint, and return what the materialization reports."""
    started = time.perf_counter()
    extras = check_extras(extras)
    hp = dict(extras["hyperparameters"])
    root = Path(extras["checkpoints_root"])
    slug, checkpoint_id = extras["slug"], extras["checkpoint_id"]
    if (root / slug / checkpoint_id).exists():
        raise FileExistsError(f"checkpoint {root / slug / checkpoint_id} already exists")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    progress = PipesProgress(log)
    with tempfile.TemporaryDirectory(prefix="qc-student-train-") as scratch:
        trainer, tokenizer, facts = build_trainer(extras, scratch, callbacks=[progress])
        log(
            f"training {extras['base_model']} ({hp['method']}, {facts['precision']}, device {_device()}) on "
            f"{facts['train_examples_used']}/{facts['train_examples']} examples"
            + (f" (a sample of {facts['train_examples_sampled']} for {hp['max_steps']} steps)"
               if facts["train_examples_sampled"] < facts["train_examples"] else "")
            + f" ({facts['train_examples_truncated']} cut at max_length {hp['max_length']}), chat template from "
            f"{facts['chat_template_source']}"
        )
        train_started, train_cpu_started = time.perf_counter(), time.process_time()
        output = trainer.train()
        train_seconds = time.perf_counter() - train_started
        train_cpu_seconds = time.process_time() - train_cpu_started
        steps = int(trainer.state.global_step)
        train_tokens = int(trainer.state.num_input_tokens_seen)
        peak_memory = _peak_memory_bytes()
        model = _final_model(trainer, hp["method"], facts["precision"])

        staging = staging_directory(root, slug, checkpoint_id)
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)  # its own chat template: the one generation uses
            loss_curve = progress.loss_curve
            final_loss = loss_curve[-1][1] if loss_curve else float(output.training_loss)
            metrics = {
                "steps": steps,
                "final_loss": final_loss,
                "loss_curve": loss_curve,
                "train_tokens": train_tokens,
                "tokens_per_second": train_tokens / train_seconds if train_seconds > 0 else 0.0,
                "train_seconds": train_seconds,
                "train_cpu_seconds": train_cpu_seconds,
                "wall_seconds": time.perf_counter() - started,
                "peak_memory_bytes": peak_memory,
                "device": _device(),
                "train_examples": facts["train_examples"],
                "train_examples_sampled": facts["train_examples_sampled"],
                "train_examples_used": facts["train_examples_used"],
                "train_examples_truncated": facts["train_examples_truncated"],
            }
            manifest = {
                "checkpoint": checkpoint_id,
                "base_model": extras["base_model"],
                "base_model_path": str(extras["base_model_path"]),
                "dataset_version": extras["dataset_version"],
                "hyperparameters": {**hp, "resolved_precision": facts["precision"]},
                "metrics": metrics,
                "created_at": datetime.now(UTC).isoformat(),
                "tiny_model": bool(extras.get("tiny", False)),
                "chat_template_source": facts["chat_template_source"],
                "generation_chat_template_kwargs": GENERATION_TEMPLATE_KWARGS,
                "training": {
                    "load_dtype": facts["load_dtype"],
                    "saved_dtype": str(model.dtype).removeprefix("torch."),
                    "gradient_checkpointing": facts["gradient_checkpointing"],
                    "assistant_only_loss": True,
                    "merged_lora": hp["method"] == "lora",
                },
                "versions": {
                    "trl": trl.__version__,
                    "transformers": transformers.__version__,
                    "peft": peft.__version__,
                    "torch": torch.__version__,
                    "datasets": datasets.__version__,
                    "dagster_pipes": version("dagster-pipes"),
                },
            }
            target = publish(staging, manifest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log(f"published checkpoint {checkpoint_id} at {target} ({steps} steps, final loss {final_loss:.4f})")
    return {"path": str(target), "manifest": manifest}


def materialization_metadata(result: Mapping[str, Any]) -> dict[str, Any]:
    manifest = result["manifest"]
    metrics = manifest["metrics"]
    return {
        "checkpoint": manifest["checkpoint"],
        "path": {"raw_value": result["path"], "type": "path"},
        "base_model": manifest["base_model"],
        "dataset_version": manifest["dataset_version"],
        "steps": {"raw_value": metrics["steps"], "type": "int"},
        "final_loss": _float(metrics["final_loss"]),
        "loss_curve": {"raw_value": metrics["loss_curve"], "type": "json"},
        "train_tokens": {"raw_value": metrics["train_tokens"], "type": "int"},
        "tokens_per_second": {"raw_value": metrics["tokens_per_second"], "type": "float"},
        "train_seconds": {"raw_value": metrics["train_seconds"], "type": "float"},
        "train_cpu_seconds": {"raw_value": metrics["train_cpu_seconds"], "type": "float"},
        "wall_seconds": {"raw_value": metrics["wall_seconds"], "type": "float"},
        "peak_memory_bytes": {"raw_value": metrics["peak_memory_bytes"], "type": "int"},
        "device": metrics["device"],
        "method": manifest["hyperparameters"]["method"],
        "precision": manifest["hyperparameters"]["resolved_precision"],
        "tiny_model": {"raw_value": manifest["tiny_model"], "type": "bool"},
    }


def _float(value: float) -> dict[str, Any]:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return {"raw_value": float(value), "type": "float"}
    return {"raw_value": None, "type": "null"}


def main() -> None:
    with open_dagster_pipes() as pipes:
        result = train(pipes.extras, log=pipes.log.info)
        pipes.report_asset_materialization(metadata=materialization_metadata(result))


if __name__ == "__main__":
    main()
