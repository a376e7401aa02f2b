"""Fine-tune the student on the SFT dataset and publish a checkpoint: the out-of-process half of the training asset.

Run as `python -m qc_assets.training.train` under Dagster Pipes, by `PipesSubprocessClient` on this machine or
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
                        optionally gradient_checkpointing (bool; default: on with CUDA, off on CPU) and optimizer
                        (a transformers `optim` name; default adamw_torch_fused)
    save_steps          optional: optimizer steps between resumable states (default 500)
    memory_limit_gib    optional: the memory the plan must fit (default: the GPU's; no check on CPU)
    tiny                optional bool, recorded in the manifest as tiny_model

The loss is on the completion only, whatever the chat template: each example is built here as token ids, the prompt
exactly as generation builds it and the completion as the template renders the answer after it, ending with the
end-of-turn token (`qc_assets.chat_format.training_example`). Before any weights are loaded, a memory plan
(`memory.py`) picks the largest per-device batch that fits the GPU, keeping the effective batch, or fails naming
what would fit. Every `save_steps` steps the trainer saves its state (model, optimizer, scheduler, RNG) into a work
directory keyed by the run's inputs (`store.work_directory`); a run of the same inputs that was killed resumes
there. The checkpoint is written into a hidden staging directory and published by `store.publish` (manifest last,
then one rename), so a failed run never leaves a visible checkpoint; the work directory goes once it is published.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import resource
import shutil
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import datasets
import peft
import torch
import transformers
import trl
from dagster_pipes import open_dagster_pipes
from filelock import FileLock, Timeout
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PrinterCallback,
    TrainerCallback,
    TrainerState,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig, SFTTrainer

from qc_assets.chat_format import GENERATION_TEMPLATE_KWARGS, training_example
from qc_assets.defs.student.store import publish, staging_directory, work_directory
from qc_assets.training.memory import (
    GIB,
    MemoryPlan,
    ModelShape,
    TrainingSetup,
    plan_memory,
)

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
DEFAULT_OPTIMIZER = "adamw_torch_fused"
DEFAULT_SAVE_STEPS = 500
TRAINER_STATE = "trainer_state.json"  # the last file the trainer writes into a saved state

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
        raise TrainingInputError(
            f"hyperparameters.warmup_ratio must be in [0, 1), got {hyperparameters['warmup_ratio']}"
        )
    if save_steps(extras) < 1:
        raise TrainingInputError(f"extras.save_steps must be at least 1, got {extras['save_steps']}")
    if extras.get("memory_limit_gib") is not None and float(extras["memory_limit_gib"]) <= 0:
        raise TrainingInputError(f"extras.memory_limit_gib must be positive, got {extras['memory_limit_gib']}")
    return dict(extras)


def save_steps(extras: Mapping[str, Any]) -> int:
    value = extras.get("save_steps")
    return DEFAULT_SAVE_STEPS if value is None else int(value)


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def examples_needed(hp: Mapping[str, Any]) -> int | None:
    """How many training examples a run with a step count can use at most (None: every example, by epochs).

    max_steps optimizer steps of per_device_train_batch_size x gradient_accumulation_steps examples each, plus an
    eighth for the examples dropped because their prompt fills max_length, so the run rarely needs a second pass.
    """
    steps = int(hp["max_steps"])
    if steps <= 0:
        return None
    needed = steps * int(hp["per_device_train_batch_size"]) * int(hp["gradient_accumulation_steps"])
    return needed + needed // 8


def load_rows(
    dataset_dir: str | os.PathLike, limit: int | None = None, seed: int = 0
) -> tuple[dict[str, list[str]], int]:
    """The train split's system (category), user (document) and assistant (query) columns, and the split's size.

    With `limit` below the split's size, a uniform random sample of `limit` rows (fixed by `seed`), in split order:
    a run of a few hundred steps then reads, checks and tokenizes those rows only, not a corpus-sized split (the
    trainer shuffles what it gets, so it sees a uniform sample either way). The split is memory-mapped and the rows
    used are copied into memory, so nothing writes cache files into the dataset directory, which may be read-only
    (a mounted volume on the training pod).
    """
    directory = Path(dataset_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"dataset_dir {directory} does not exist or is not a directory")
    loaded = datasets.load_from_disk(str(directory))
    if not isinstance(loaded, datasets.DatasetDict):
        raise TrainingInputError(f"{directory}: expected a DatasetDict with a 'train' split, got a single Dataset")
    if "train" not in loaded:
        raise TrainingInputError(f"{directory}: no 'train' split (splits: {', '.join(loaded)})")
    train = loaded["train"]
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
    return columns, total


# ---------------------------------------------------------------------------------------------------------------
# Examples


@dataclasses.dataclass(frozen=True)
class Examples:
    """The tokenized training set and what happened on the way."""

    dataset: datasets.Dataset  # input_ids and completion_mask (1 on the completion), untruncated
    dropped: int  # the prompt alone fills max_length: nothing of the answer would be left to learn
    truncated: int  # cut at max_length: the end of the answer (and its end-of-turn token) is not trained
    completion_sources: dict[str, int]  # how many completions came from the template, how many are answer + eos
    end_of_turn: list[str]  # the tokens the completions end with


def tokenize_examples(rows: Mapping[str, list[str]], tokenizer, max_length: int) -> Examples:
    input_ids: list[list[int]] = []
    completion_masks: list[list[int]] = []
    sources: Counter[str] = Counter()
    endings: set[str] = set()
    dropped = truncated = 0
    for category, text, answer in zip(*(rows[column] for column in DATASET_COLUMNS)):
        example = training_example(tokenizer, category, text, answer)
        if len(example.prompt_ids) >= max_length:
            dropped += 1
            continue
        truncated += len(example.prompt_ids) + len(example.completion_ids) > max_length
        input_ids.append(example.prompt_ids + example.completion_ids)
        completion_masks.append([0] * len(example.prompt_ids) + [1] * len(example.completion_ids))
        sources[example.completion_source] += 1
        endings.add(example.end_of_turn)
    if not input_ids:
        raise TrainingInputError(
            f"every training example's prompt fills max_length={max_length} tokens: nothing to train on"
        )
    return Examples(
        dataset=datasets.Dataset.from_dict({"input_ids": input_ids, "completion_mask": completion_masks}),
        dropped=dropped,
        truncated=truncated,
        completion_sources=dict(sources),
        end_of_turn=sorted(endings),
    )


# ---------------------------------------------------------------------------------------------------------------
# Memory plan


def load_dtype(setup: TrainingSetup) -> torch.dtype:
    # bf16: LoRA keeps the frozen base in bf16; full fine-tuning keeps fp32 master weights under bf16 autocast (pure
    # bf16 AdamW loses most updates at SFT learning rates) and the checkpoint is cast to bf16 when saved.
    return torch.bfloat16 if setup.precision == "bf16" and setup.method == "lora" else torch.float32


def device_memory_bytes(limit_gib: float | None) -> int | None:
    """What the plan must fit: the limit when one is set, else the GPU's memory; None (no check) on CPU."""
    if limit_gib is not None:
        return int(float(limit_gib) * GIB)
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return None


def plan_run(extras: Mapping[str, Any]) -> MemoryPlan:
    """The memory plan for the base model's config (no weights loaded); MemoryPlanError when nothing fits."""
    hp = extras["hyperparameters"]
    setup = TrainingSetup(
        method=hp["method"],
        precision=resolve_precision(hp["precision"]),
        batch_size=int(hp["per_device_train_batch_size"]),
        gradient_accumulation=int(hp["gradient_accumulation_steps"]),
        max_length=int(hp["max_length"]),
        gradient_checkpointing=bool(hp.get("gradient_checkpointing", torch.cuda.is_available())),
        lora_r=int(hp["lora_r"]),
        optimizer=hp.get("optimizer", DEFAULT_OPTIMIZER),
    )
    shape = ModelShape.of(AutoConfig.from_pretrained(extras["base_model_path"]))
    limit = device_memory_bytes(extras.get("memory_limit_gib"))
    return plan_memory(shape, setup, limit, extras["base_model"])


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


def checkpointing_kwargs(enabled: bool) -> dict[str, Any]:
    """transformers 5.23 renamed TrainingArguments' gradient_checkpointing to activation_checkpointing; the range
    vLLM allows (5.16-5.19) has only the old name. TRL defaults it to on: always set whichever exists."""
    names = {field.name for field in dataclasses.fields(SFTConfig)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def sft_config(
    hp: Mapping[str, Any], setup: TrainingSetup, output_dir: str | os.PathLike, save_steps: int
) -> SFTConfig:
    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=int(hp["max_steps"]),
        num_train_epochs=float(hp["num_train_epochs"]),
        learning_rate=float(hp["learning_rate"]),
        per_device_train_batch_size=setup.batch_size,
        gradient_accumulation_steps=setup.gradient_accumulation,
        max_length=setup.max_length,
        # transformers 5 dropped `warmup_ratio`: a float `warmup_steps` below 1 is the ratio of the total steps.
        warmup_steps=float(hp["warmup_ratio"]),
        seed=int(hp["seed"]),
        logging_steps=hp["logging_steps"],  # an int, or a float below 1 for a ratio of the total steps
        logging_first_step=True,
        bf16=setup.precision == "bf16",  # TRL's default is bf16=True, even on CPU: always set it
        fp16=False,
        optim=setup.optimizer,
        **checkpointing_kwargs(setup.gradient_checkpointing),
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # transformers refuses precision="bf16" on CPU without it
        completion_only_loss=True,  # labels only where completion_mask is 1
        packing=False,
        report_to="none",
        save_strategy="steps",
        save_steps=save_steps,
        # The newest state only: the older one is deleted after the new one is complete, so a run killed while
        # saving still has the previous one.
        save_total_limit=1,
        # Counts attention-mask tokens (prompt and answer, not padding); "all" would count padding too.
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )


def lora_config(hp: Mapping[str, Any]) -> peft.LoraConfig | None:
    if hp["method"] != "lora":
        return None
    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        target_modules="all-linear",
        r=int(hp["lora_r"]),
        lora_alpha=int(hp["lora_alpha"]),
        lora_dropout=float(hp["lora_dropout"]),
    )


def build_trainer(
    extras: Mapping[str, Any],
    output_dir: str | os.PathLike,
    callbacks: list[TrainerCallback] | None = None,
    plan: MemoryPlan | None = None,
) -> tuple[SFTTrainer, Any, dict[str, Any]]:
    """Plan memory, tokenize the examples, load the model and build the SFTTrainer (saving into output_dir).

    Returns the trainer, the tokenizer to save (with its own chat template, the one generation uses), and facts for
    the manifest.
    """
    extras = check_extras(extras)
    hp = extras["hyperparameters"]
    plan = plan or plan_run(extras)
    rows, train_rows = load_rows(extras["dataset_dir"], examples_needed(hp), int(hp["seed"]))
    tokenizer = AutoTokenizer.from_pretrained(extras["base_model_path"])
    if not tokenizer.chat_template:
        raise TrainingInputError(f"base model {extras['base_model']!r}: its tokenizer has no chat template")
    examples = tokenize_examples(rows, tokenizer, plan.setup.max_length)

    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(extras["base_model_path"], dtype=load_dtype(plan.setup)),
        args=sft_config(hp, plan.setup, output_dir, save_steps(extras)),
        train_dataset=examples.dataset,
        processing_class=tokenizer,
        peft_config=lora_config(hp),
        callbacks=callbacks,
    )
    # Progress reaches Dagster through PipesProgress; the trainer's own printer would repeat it as raw dicts.
    trainer.remove_callback(PrinterCallback)
    facts = {
        "load_dtype": str(load_dtype(plan.setup)).removeprefix("torch."),
        "train_examples": train_rows,
        # With a step count, a seeded uniform sample of the split big enough for every step (see examples_needed).
        "train_examples_sampled": len(rows["system"]),
        # The map-style Dataset passed in above, which SFTTrainer keeps map-style.
        "train_examples_used": len(cast(datasets.Dataset, trainer.train_dataset)),
        "train_examples_dropped": examples.dropped,
        "train_examples_truncated": examples.truncated,
        "completion_sources": examples.completion_sources,
        "end_of_turn": examples.end_of_turn,
    }
    return trainer, tokenizer, facts


# ---------------------------------------------------------------------------------------------------------------
# Resumable state


def last_saved_state(work: Path) -> Path | None:
    """The newest complete state the trainer saved in work (its trainer_state.json, written last, reads back);
    incomplete ones (a run killed while saving) are removed, so a new save of the same step starts clean."""
    complete = []
    for directory in work.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        try:
            complete.append((TrainerState.load_from_json(str(directory / TRAINER_STATE)).global_step, directory))
        except (OSError, ValueError, TypeError):  # missing, half-written, or another transformers' format
            shutil.rmtree(directory, ignore_errors=True)
    return max(complete)[1] if complete else None


def run_inputs(extras: Mapping[str, Any], setup: TrainingSetup) -> dict[str, Any]:
    """What makes two runs the same run: a state saved by one is a valid start for the other."""
    return {
        "base_model": extras["base_model"],
        "base_model_path": str(extras["base_model_path"]),
        "dataset_version": extras["dataset_version"],
        "hyperparameters": dict(extras["hyperparameters"]),
        # The plan may shrink the per-device batch on a smaller GPU; a saved state counts batches of its own size.
        "per_device_train_batch_size": setup.batch_size,
        "gradient_accumulation_steps": setup.gradient_accumulation,
    }


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


def _final_model(trainer: SFTTrainer, tokenizer, method: str, precision: str, end_of_turn: list[str]):
    model = trainer.accelerator.unwrap_model(trainer.model)
    if method == "lora":
        model = model.merge_and_unload()
    if precision == "bf16" and model.dtype != torch.bfloat16:
        model = model.to(torch.bfloat16)
    model.config.use_cache = True  # gradient checkpointing turns the cache off; generation wants it on
    _stop_at(model.generation_config, tokenizer.convert_tokens_to_ids(end_of_turn))
    return model


def _stop_at(generation_config, token_ids: list[int]) -> None:
    """Generators stop at the checkpoint's eos ids: the token every trained answer ends with must be one of them
    (Llama 3's turns end with <|eot_id|> where its eos may be <|end_of_text|>)."""
    eos = generation_config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    ids += [token_id for token_id in token_ids if token_id not in ids]
    generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids


def train(extras: Mapping[str, Any], log: Log = print) -> dict[str, Any]:
    """Train (resuming a killed run of the same inputs), publish the checkpoint, and return what the
    materialization reports."""
    started = time.perf_counter()
    extras = check_extras(extras)
    target = Path(extras["checkpoints_root"]) / extras["slug"] / extras["checkpoint_id"]
    if target.exists():
        raise FileExistsError(f"checkpoint {target} already exists")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    plan = plan_run(extras)
    _log_plan(plan, extras, log)
    work = work_directory(Path(extras["checkpoints_root"]), extras["slug"], run_inputs(extras, plan.setup))
    work.mkdir(parents=True, exist_ok=True)
    # One run per work directory: two would overwrite each other's saved states. A killed run's lock dies with it.
    lock = FileLock(str(work) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RuntimeError(f"another run of the same inputs is training in {work}") from None
    try:
        result = _train_in(work, extras, plan, log, started)
    finally:
        lock.release()
    shutil.rmtree(work, ignore_errors=True)
    Path(lock.lock_file).unlink(missing_ok=True)
    return result


def _log_plan(plan: MemoryPlan, extras: Mapping[str, Any], log: Log) -> None:
    log(f"memory plan for {extras['base_model']}: {plan.setup.describe()}: {plan.summary()}")
    configured = int(extras["hyperparameters"]["per_device_train_batch_size"])
    if plan.setup.batch_size != configured:
        log(
            f"per-device batch {configured} does not fit: training with {plan.setup.batch_size} x "
            f"{plan.setup.gradient_accumulation} accumulation, the same effective batch"
        )


def _train_in(work: Path, extras: dict[str, Any], plan: MemoryPlan, log: Log, started: float) -> dict[str, Any]:
    progress = PipesProgress(log)
    trainer, tokenizer, facts = build_trainer(extras, work, callbacks=[progress], plan=plan)
    log(_start_line(extras, plan.setup, facts))
    resume = last_saved_state(work)
    resumed = None if resume is None else TrainerState.load_from_json(str(resume / TRAINER_STATE))
    if resumed is not None:
        log(f"resuming from the state saved at step {resumed.global_step} ({resume})")
    train_started, train_cpu_started = time.perf_counter(), time.process_time()
    output = trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    train_seconds = time.perf_counter() - train_started
    tokens = int(trainer.state.num_input_tokens_seen)
    # On resume the trainer's count includes the killed run's tokens; the rate is this run's own.
    run_tokens = tokens - (0 if resumed is None else int(resumed.num_input_tokens_seen))
    final_loss = progress.loss_curve[-1][1] if progress.loss_curve else float(output.training_loss)
    metrics = {
        "steps": int(trainer.state.global_step),
        "resumed_from_step": None if resumed is None else resumed.global_step,
        "final_loss": final_loss,
        "loss_curve": progress.loss_curve,
        "train_tokens": tokens,
        "tokens_per_second": run_tokens / train_seconds if train_seconds > 0 else 0.0,
        "train_seconds": train_seconds,
        "train_cpu_seconds": time.process_time() - train_cpu_started,
        "peak_memory_bytes": _peak_memory_bytes(),
        "device": _device(),
        "train_examples": facts["train_examples"],
        "train_examples_sampled": facts["train_examples_sampled"],
        "train_examples_used": facts["train_examples_used"],
        "train_examples_dropped": facts["train_examples_dropped"],
        "train_examples_truncated": facts["train_examples_truncated"],
    }
    model = _final_model(
        trainer, tokenizer, extras["hyperparameters"]["method"], plan.setup.precision, facts["end_of_turn"]
    )
    staging = staging_directory(Path(extras["checkpoints_root"]), extras["slug"], extras["checkpoint_id"])
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)  # its own chat template: the one generation uses
        metrics["wall_seconds"] = time.perf_counter() - started
        manifest = _manifest(extras, plan, facts, metrics, model)
        target = publish(staging, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(
        f"published checkpoint {extras['checkpoint_id']} at {target} ({metrics['steps']} steps, final loss "
        f"{final_loss:.4f})"
    )
    return {"path": str(target), "manifest": manifest}


def _start_line(extras: Mapping[str, Any], setup: TrainingSetup, facts: Mapping[str, Any]) -> str:
    hp = extras["hyperparameters"]
    sample = (
        f" (a sample of {facts['train_examples_sampled']} for {hp['max_steps']} steps)"
        if facts["train_examples_sampled"] < facts["train_examples"]
        else ""
    )
    return (
        f"training {extras['base_model']} ({setup.method}, {setup.precision}, device {_device()}, per-device batch "
        f"{setup.batch_size} x {setup.gradient_accumulation}) on {facts['train_examples_used']}/"
        f"{facts['train_examples']} examples{sample} ({facts['train_examples_truncated']} cut at max_length "
        f"{setup.max_length}, {facts['train_examples_dropped']} dropped: the prompt alone fills it); completions "
        f"{facts['completion_sources']}, ending with {', '.join(facts['end_of_turn'])}"
    )


def _manifest(
    extras: Mapping[str, Any], plan: MemoryPlan, facts: Mapping[str, Any], metrics: dict[str, Any], model
) -> dict[str, Any]:
    hp = extras["hyperparameters"]
    return {
        "checkpoint": extras["checkpoint_id"],
        "base_model": extras["base_model"],
        "base_model_path": str(extras["base_model_path"]),
        "dataset_version": extras["dataset_version"],
        "hyperparameters": {**hp, "resolved_precision": plan.setup.precision},
        "metrics": metrics,
        "created_at": datetime.now(UTC).isoformat(),
        "tiny_model": bool(extras.get("tiny", False)),
        "chat_format": {
            "loss": "completion only: the prompt's ids as generation builds them, then the completion's",
            "completion_sources": facts["completion_sources"],
            "end_of_turn": facts["end_of_turn"],
            "generation_template_kwargs": GENERATION_TEMPLATE_KWARGS,
        },
        "training": {
            "load_dtype": facts["load_dtype"],
            "saved_dtype": str(model.dtype).removeprefix("torch."),
            "gradient_checkpointing": plan.setup.gradient_checkpointing,
            "optimizer": plan.setup.optimizer,
            "per_device_train_batch_size": plan.setup.batch_size,
            "gradient_accumulation_steps": plan.setup.gradient_accumulation,
            "memory_plan_gib": plan.gib(),
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


def materialization_metadata(result: Mapping[str, Any]) -> dict[str, Any]:
    manifest = result["manifest"]
    metrics = manifest["metrics"]
    training = manifest["training"]
    return {
        "checkpoint": manifest["checkpoint"],
        "path": {"raw_value": result["path"], "type": "path"},
        "base_model": manifest["base_model"],
        "dataset_version": manifest["dataset_version"],
        "steps": {"raw_value": metrics["steps"], "type": "int"},
        "resumed_from_step": _int(metrics["resumed_from_step"]),
        "final_loss": _float(metrics["final_loss"]),
        "loss_curve": {"raw_value": metrics["loss_curve"], "type": "json"},
        "train_tokens": {"raw_value": metrics["train_tokens"], "type": "int"},
        "tokens_per_second": {"raw_value": metrics["tokens_per_second"], "type": "float"},
        "train_seconds": {"raw_value": metrics["train_seconds"], "type": "float"},
        "train_cpu_seconds": {"raw_value": metrics["train_cpu_seconds"], "type": "float"},
        "wall_seconds": {"raw_value": metrics["wall_seconds"], "type": "float"},
        "peak_memory_bytes": {"raw_value": metrics["peak_memory_bytes"], "type": "int"},
        "memory_plan_gib": {"raw_value": training["memory_plan_gib"], "type": "json"},
        "per_device_train_batch_size": {"raw_value": training["per_device_train_batch_size"], "type": "int"},
        "gradient_accumulation_steps": {"raw_value": training["gradient_accumulation_steps"], "type": "int"},
        "device": metrics["device"],
        "method": manifest["hyperparameters"]["method"],
        "precision": manifest["hyperparameters"]["resolved_precision"],
        "tiny_model": {"raw_value": manifest["tiny_model"], "type": "bool"},
    }


def _int(value: int | None) -> dict[str, Any]:
    return {"raw_value": value, "type": "int"} if value is not None else {"raw_value": None, "type": "null"}


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
