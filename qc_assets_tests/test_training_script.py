"""The student training script, run out of process through Dagster Pipes, on tiny models (CPU, offline): the Qwen3
student for the Pipes run, LoRA, failures and resuming; tiny Qwen3, Qwen2 and Llama models with TRL's shipped chat
templates and templates neither TRL nor the project ships for the completion-only examples."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
)
from trl import SFTConfig

from qc_assets.categories import CATEGORY_NAMES
from qc_assets.chat_format import training_example
from qc_assets.defs.generation.backends import PromptBuilder
from qc_assets.defs.student import store
from qc_assets.models.tiny import (
    TinyChat,
    build_tiny_causal_lm,
    build_tiny_student,
    llama3_chat,
    qwen_chat,
)
from qc_assets.paths import SAMPLE_CORPUS
from qc_assets.training import train as train_script
from qc_assets.training.memory import (
    GIB,
    USABLE_FRACTION,
    MemoryPlanError,
    ModelShape,
    estimate,
)

REPO = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "qc_assets.training.train"]
# One torch thread: the tiny model gains nothing from more, and on a busy CI machine OpenMP threads that wait for
# each other make a 1-second training run take twenty.
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1"}
QUERIES = ["味噌汁の作り方", "鎌倉幕府はいつ始まったか", "よく眠るための習慣", "食中毒を防ぐには", "日本の四季"]
MANIFEST_FIELDS = {
    "checkpoint",
    "base_model",
    "base_model_path",
    "dataset_version",
    "hyperparameters",
    "metrics",
    "created_at",
    "tiny_model",
    "versions",
}
METRIC_FIELDS = {
    "steps",
    "final_loss",
    "loss_curve",
    "train_tokens",
    "tokens_per_second",
    "wall_seconds",
    "peak_memory_bytes",
    "device",
}


def hyperparameters(**overrides) -> dict:
    return {
        "method": "full",
        "max_steps": 10,
        "num_train_epochs": 1.0,
        "learning_rate": 3e-3,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_length": 256,
        "warmup_ratio": 0.0,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "seed": 0,
        "logging_steps": 1,
        "precision": "auto",
        **overrides,
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("training")
    texts = [
        json.loads(line)["text"]
        for path in sorted(SAMPLE_CORPUS.glob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
    ]
    model_dir = build_tiny_student(root / "tiny-student", texts)
    # Documents are cut to 200 characters so that every prompt fits max_length=256 and steps stay fast on a CPU.
    rows = [
        {
            "system": CATEGORY_NAMES[index % len(CATEGORY_NAMES)],
            "user": texts[index % len(texts)][:200],
            "assistant": QUERIES[index % len(QUERIES)],
            "doc_id": f"doc-{index}",
            "teacher": "replay",
        }
        for index in range(40)
    ]
    dataset_dir = root / "sft"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "validation": datasets.Dataset.from_list(rows[:4])}
    ).save_to_disk(str(dataset_dir))
    return {"root": root, "model_dir": model_dir, "dataset_dir": dataset_dir}


def extras_for(inputs: dict, checkpoint_id: str, **overrides) -> dict:
    return {
        "base_model": "tiny",
        "base_model_path": str(inputs["model_dir"]),
        "dataset_dir": str(inputs["dataset_dir"]),
        "dataset_version": "0123456789abcdef",
        "checkpoints_root": str(inputs["root"] / "checkpoints"),
        "slug": "tiny",
        "checkpoint_id": checkpoint_id,
        "hyperparameters": hyperparameters(),
        "tiny": True,
        **overrides,
    }


def metadata_of(result: dg.ExecuteInProcessResult) -> dict:
    (event,) = result.asset_materializations_for_node("student_checkpoint")
    return {key: value.value for key, value in event.metadata.items()}


def generate(checkpoint: Path, text: str) -> tuple[int, int]:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    conversation = [{"role": "system", "content": CATEGORY_NAMES[0]}, {"role": "user", "content": text}]
    inputs = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True, enable_thinking=False
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return inputs["input_ids"].shape[1], output.shape[1]


@pytest.fixture(scope="module")
def full_run(inputs) -> dict:
    extras = extras_for(inputs, "tiny--01234567--full")
    with dg.instance_for_test() as instance:
        result = materialize_training_on(instance, extras)
        logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
    return {"extras": extras, "result": result, "logs": logs}


def materialize_training_on(instance: dg.DagsterInstance, extras: dict) -> dg.ExecuteInProcessResult:
    @dg.asset(name="student_checkpoint")
    def student_checkpoint(context: dg.AssetExecutionContext, pipes_subprocess_client: dg.PipesSubprocessClient):
        return pipes_subprocess_client.run(
            command=COMMAND, context=context, extras=extras, cwd=str(REPO), env=SUBPROCESS_ENV
        ).get_materialize_result()

    return dg.materialize(
        [student_checkpoint],
        resources={"pipes_subprocess_client": dg.PipesSubprocessClient()},
        instance=instance,
        raise_on_error=False,
    )


def test_the_script_never_imports_dagster_itself():
    # On the GPU pod only dagster-pipes and the ML libraries are installed.
    probe = (
        "import sys, qc_assets.training.train; "
        "print(sorted(m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], check=False, capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def test_a_pipes_run_streams_progress_and_publishes_a_complete_checkpoint(inputs, full_run):
    result, extras = full_run["result"], full_run["extras"]
    assert result.success
    metadata = metadata_of(result)
    assert metadata["steps"] == extras["hyperparameters"]["max_steps"] == 10
    assert metadata["method"] == "full" and metadata["tiny_model"] is True
    assert [step for step, _ in metadata["loss_curve"]] == list(range(1, 11))
    assert metadata["final_loss"] == metadata["loss_curve"][-1][1]
    assert metadata["train_tokens"] > 0 and metadata["tokens_per_second"] > 0 and metadata["peak_memory_bytes"] > 0

    # The progress lines sent with pipes.log reached the Dagster event log.
    step_lines = [message for message in full_run["logs"] if message.startswith("step ")]
    assert [line.split()[1] for line in step_lines] == [f"{step}/10" for step in range(1, 11)]
    assert all(" loss " in line and " lr " in line for line in step_lines)

    checkpoints = Path(extras["checkpoints_root"]) / "tiny"
    checkpoint = checkpoints / extras["checkpoint_id"]
    assert Path(metadata["path"]) == checkpoint
    assert not [path for path in checkpoints.iterdir() if path.name.endswith(".partial")]
    manifest = store.read_manifest(checkpoint)
    assert manifest.keys() >= MANIFEST_FIELDS and manifest["metrics"].keys() >= METRIC_FIELDS
    assert manifest["checkpoint"] == extras["checkpoint_id"]
    assert manifest["base_model"] == "tiny" and manifest["base_model_path"] == str(inputs["model_dir"])
    assert manifest["dataset_version"] == extras["dataset_version"]
    assert manifest["hyperparameters"] == {**extras["hyperparameters"], "resolved_precision": "fp32"}
    assert manifest["tiny_model"] is True and manifest["metrics"]["device"] == "cpu"
    assert manifest["metrics"]["loss_curve"] == metadata["loss_curve"]
    assert manifest["metrics"]["train_examples_used"] == manifest["metrics"]["train_examples"] == 40
    assert manifest["metrics"]["train_examples_truncated"] == manifest["metrics"]["train_examples_dropped"] == 0
    assert manifest["metrics"]["resumed_from_step"] is None and metadata["resumed_from_step"] is None
    assert manifest["chat_format"]["completion_sources"] == {"template": 40}
    assert manifest["chat_format"]["end_of_turn"] == ["<|im_end|>"]
    # The memory plan reached the materialization; on CPU nothing caps it, so the configured batch stays.
    assert metadata["memory_plan_gib"] == manifest["training"]["memory_plan_gib"]
    assert set(metadata["memory_plan_gib"]) == {
        "weights",
        "autocast",
        "gradients",
        "optimizer",
        "activations",
        "logits",
        "total",
    }
    assert metadata["per_device_train_batch_size"] == 4 and metadata["gradient_accumulation_steps"] == 1
    # Published: the resumable states are gone.
    assert not list((Path(extras["checkpoints_root"]) / store.WORK_DIR).rglob("checkpoint-*"))
    assert set(manifest["versions"]) >= {"trl", "transformers", "peft", "torch"}
    assert manifest["created_at"].endswith("+00:00")
    # The module's other runs (LoRA) may have published beside it, depending on which test a worker ran first.
    assert extras["checkpoint_id"] in [
        found.checkpoint for found in store.list_checkpoints(Path(extras["checkpoints_root"]))
    ]

    # A plain transformers checkpoint that generates from the saved template's generation prompt.
    prompt_length, total_length = generate(checkpoint, "毎日の食卓に欠かせない味噌汁")
    assert total_length > prompt_length
    assert (checkpoint / "chat_template.jinja").read_text(encoding="utf-8") == AutoTokenizer.from_pretrained(
        inputs["model_dir"]
    ).chat_template


def test_full_fine_tuning_lowers_the_loss(full_run):
    # The tiny student has random weights and a learning rate of 3e-3 (100x a real SFT rate) moves it fast: in 10
    # steps the loss on the query tokens falls by about 1 nat, well clear of step-to-step noise.
    curve = metadata_of(full_run["result"])["loss_curve"]
    first, last = curve[0][1], curve[-1][1]
    assert last < first - 0.3, curve


def test_a_lora_run_publishes_a_merged_plain_checkpoint(inputs):
    extras = extras_for(
        inputs,
        "tiny--01234567--lora",
        hyperparameters=hyperparameters(method="lora", max_steps=3, learning_rate=1e-2),
    )
    with dg.instance_for_test() as instance:
        result = materialize_training_on(instance, extras)
    assert result.success
    metadata = metadata_of(result)
    assert metadata["method"] == "lora" and metadata["steps"] == 3
    checkpoint = Path(metadata["path"])
    assert store.read_manifest(checkpoint)["training"]["merged_lora"] is True
    # Merged: no adapter files, no LoRA tensors, the base model's tensor names, and changed weights.
    assert not (checkpoint / "adapter_config.json").exists()
    merged, base = load_file(checkpoint / "model.safetensors"), load_file(inputs["model_dir"] / "model.safetensors")
    assert merged.keys() == base.keys() and not any("lora" in name for name in merged)
    changed = [name for name in base if not torch.equal(merged[name], base[name])]
    assert any(name.endswith("q_proj.weight") for name in changed)
    prompt_length, total_length = generate(checkpoint, "ぐっすり眠れない日が続くと")
    assert total_length > prompt_length


def test_a_failing_run_fails_the_asset_with_the_error_and_publishes_nothing(inputs):
    extras = extras_for(inputs, "tiny--01234567--broken", dataset_dir=str(inputs["root"] / "no-such-dataset"))
    with dg.instance_for_test() as instance:
        result = materialize_training_on(instance, extras)
        events = instance.all_logs(result.run_id)
    assert not result.success
    errors = [
        event.dagster_event.engine_event_data.error
        for event in events
        if event.dagster_event is not None
        and event.dagster_event.is_engine_event
        and event.dagster_event.engine_event_data.error is not None
    ]
    assert any("no-such-dataset" in error.message and "does not exist" in error.message for error in errors), errors
    step_failure = result.failure_data_for_node("student_checkpoint")
    assert step_failure is not None
    assert not (Path(extras["checkpoints_root"]) / "tiny" / extras["checkpoint_id"]).exists()


def test_a_failure_while_publishing_leaves_no_checkpoint_and_no_staging(inputs, monkeypatch):
    def broken_publish(staging, manifest):
        raise OSError("disk full")

    monkeypatch.setattr(train_script, "publish", broken_publish)
    extras = extras_for(
        inputs,
        "tiny--01234567--unpublished",
        checkpoints_root=str(inputs["root"] / "unpublished"),
        hyperparameters=hyperparameters(max_steps=1),
    )
    with pytest.raises(OSError, match="disk full"):
        train_script.train(extras, log=lambda line: None)
    assert list((Path(extras["checkpoints_root"]) / "tiny").iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Completion-only examples under any chat template

# sarashina2.2's turn format (neither TRL nor the project ships its template): role tags, eos after every turn.
SARASHINA_LIKE = TinyChat(
    template=(
        "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    ),
    special_tokens=("<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<think>"),
    eos_token="</s>",
    pad_token="<pad>",
    bos_token="<s>",
)
# A generation prompt that opens a think block the rendering of an answered turn lacks (as DeepSeek-R1's distills
# do): the prompt is no prefix of the whole conversation, so the completion is the answer and eos.
THINK_PROMPT = dataclasses.replace(
    SARASHINA_LIKE,
    template=SARASHINA_LIKE.template.replace("'<|assistant|>' }}{% endif", "'<|assistant|><think>\\n' }}{% endif"),
)
# name: (architecture, chat, the token every completion ends with, where completions come from)
CHATS = {
    "qwen3-trl-qwen3": ("qwen3", qwen_chat("qwen3"), "<|im_end|>", "template"),
    "qwen2-trl-qwen2_5": ("qwen2", qwen_chat("qwen2_5"), "<|im_end|>", "template"),
    "llama-trl-llama3": ("llama", llama3_chat(), "<|eot_id|>", "template"),
    "llama-sarashina-like": ("llama", SARASHINA_LIKE, "</s>", "template"),
    "llama-think-prompt": ("llama", THINK_PROMPT, "</s>", "answer+eos"),
}


def corpus_texts() -> list[str]:
    return [
        json.loads(line)["text"]
        for path in sorted(SAMPLE_CORPUS.glob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
    ]


@pytest.mark.parametrize("name", list(CHATS))
def test_any_chat_template_trains_the_answer_and_its_end_of_turn_after_the_generators_exact_prompt(
    name, inputs, tmp_path
):
    architecture, chat, end_of_turn, source = CHATS[name]
    model_dir = build_tiny_causal_lm(tmp_path / name, corpus_texts(), architecture, chat)
    # 10 steps of 4 need every one of the 40 rows, so the examples are the split's rows in order.
    extras = extras_for(inputs, "unused", base_model=f"acme/{name}", base_model_path=str(model_dir))
    trainer, tokenizer, facts = train_script.build_trainer(extras, tmp_path / "out")
    assert tokenizer.chat_template == chat.template
    assert facts["completion_sources"] == {source: 40} and facts["end_of_turn"] == [end_of_turn]
    assert facts["train_examples_truncated"] == facts["train_examples_dropped"] == 0

    rows = datasets.load_from_disk(str(inputs["dataset_dir"]))["train"]
    prompts = PromptBuilder(tokenizer, extras["hyperparameters"]["max_length"])
    assert len(trainer.train_dataset) == len(rows)
    for row, example in zip(rows, trainer.train_dataset):
        input_ids, labels = example["input_ids"], example["labels"]
        start = next(position for position, label in enumerate(labels) if label != -100)
        # The prompt: untrained, and token for token what every generation backend sends for this row.
        assert set(labels[:start]) == {-100}
        assert input_ids[:start] == prompts.build(row["system"], row["user"])[1]
        # The completion: trained to the end, exactly the answer and the end-of-turn token.
        assert labels[start:] == input_ids[start:]
        assert tokenizer.decode(input_ids[start:]) == row["assistant"] + end_of_turn
    # The collator pads labels with -100 and keeps them otherwise: the batch the model sees is masked the same way.
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    first = trainer.train_dataset[0]["labels"]
    assert batch["labels"][0][: len(first)].tolist() == first
    assert set(batch["labels"][0][len(first) :].tolist()) <= {-100}

    trainer.args.max_steps = 3
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 3 and losses and all(math.isfinite(loss) for loss in losses)


def test_examples_are_cut_at_max_length_and_dropped_when_the_prompt_alone_fills_it(inputs):
    tokenizer = AutoTokenizer.from_pretrained(inputs["model_dir"])
    short, long = corpus_texts()[0][:20], corpus_texts()[1][:400]
    fitting = training_example(tokenizer, CATEGORY_NAMES[0], short, QUERIES[0])
    max_length = len(fitting.prompt_ids) + len(fitting.completion_ids) - 1  # one token short for the short row
    assert len(training_example(tokenizer, CATEGORY_NAMES[0], long, QUERIES[0]).prompt_ids) >= max_length
    rows = {"system": [CATEGORY_NAMES[0]] * 2, "user": [short, long], "assistant": [QUERIES[0]] * 2}
    examples = train_script.tokenize_examples(rows, tokenizer, max_length)
    assert (len(examples.dataset), examples.truncated, examples.dropped) == (1, 1, 1)
    with pytest.raises(train_script.TrainingInputError, match="fills max_length"):
        train_script.tokenize_examples({key: values[1:] for key, values in rows.items()}, tokenizer, max_length)


def test_a_checkpoint_stops_at_the_end_of_turn_token_its_answers_end_with(inputs, tmp_path):
    # Llama 3 base's tokenizer: eos is <|end_of_text|>, while its template ends every turn with <|eot_id|>.
    chat = dataclasses.replace(llama3_chat(), eos_token="<|end_of_text|>")
    model_dir = build_tiny_causal_lm(tmp_path / "llama3-base", corpus_texts(), "llama", chat)
    extras = extras_for(
        inputs,
        "llama3-base--01234567",
        base_model="acme/llama3-base",
        base_model_path=str(model_dir),
        checkpoints_root=str(tmp_path / "checkpoints"),
        hyperparameters=hyperparameters(max_steps=1),
    )
    checkpoint = Path(train_script.train(extras, log=lambda line: None)["path"])
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    eos = GenerationConfig.from_pretrained(checkpoint).eos_token_id
    assert set(tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])) <= set(eos)


# ---------------------------------------------------------------------------------------------------------------
# transformers versions, memory plan, resuming


def test_the_checkpointing_switch_is_a_field_of_the_installed_sft_config(tmp_path):
    fields = {field.name for field in dataclasses.fields(SFTConfig)}
    for enabled in (True, False):
        kwargs = train_script.checkpointing_kwargs(enabled)
        (name,) = kwargs
        assert name in fields
        # bf16=False: TRL's default (bf16) is refused on a CPU-only machine.
        assert getattr(SFTConfig(output_dir=str(tmp_path), bf16=False, **kwargs), name) is enabled


def test_the_installed_sft_config_accepts_every_setting_the_script_passes(inputs, tmp_path):
    plan = train_script.plan_run(extras_for(inputs, "unused"))
    config = train_script.sft_config(hyperparameters(warmup_ratio=0.1), plan.setup, tmp_path / "out", save_steps=7)
    # warmup_ratio travels as a float warmup_steps below 1: a share of the total steps.
    assert config.warmup_steps == 0.1 and config.get_warmup_steps(100) == 10
    assert config.include_num_input_tokens_seen == "non_padding"
    assert config.completion_only_loss is True and config.assistant_only_loss is False
    assert (config.save_strategy, config.save_steps, config.save_total_limit) == ("steps", 7, 1)
    assert config.use_cpu is not torch.cuda.is_available() and config.optim == "adamw_torch_fused"


def test_a_plan_that_cannot_fit_fails_before_loading_weights_naming_what_would_fit(inputs, tmp_path, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the memory plan was checked")

    monkeypatch.setattr(train_script.AutoModelForCausalLM, "from_pretrained", no_weights)
    extras = extras_for(inputs, "too-big", checkpoints_root=str(tmp_path / "checkpoints"), memory_limit_gib=0.001)
    with pytest.raises(MemoryPlanError) as failure:
        train_script.train(extras, log=lambda line: None)
    message = str(failure.value)
    assert "does not fit" in message and "even per-device batch 1 x 4 needs" in message
    assert "LoRA (QC_STUDENT_METHOD=lora)" in message and "8-bit optimizer" in message
    assert "gradient checkpointing" in message and "all of these together" in message
    assert not (tmp_path / "checkpoints").exists()


def test_the_per_device_batch_shrinks_until_the_plan_fits_keeping_the_effective_batch(inputs, tmp_path):
    extras = extras_for(inputs, "unused")
    configured = train_script.plan_run(extras).setup
    shape = ModelShape.of(AutoConfig.from_pretrained(inputs["model_dir"]))
    four = estimate(shape, configured).total
    two = estimate(shape, dataclasses.replace(configured, batch_size=2, gradient_accumulation=2)).total
    limit_gib = (two + four) / 2 / USABLE_FRACTION / GIB
    trainer, _, _ = train_script.build_trainer({**extras, "memory_limit_gib": limit_gib}, tmp_path)
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (2, 2)


CHILD = (
    "import json, sys; from qc_assets.training.train import train; "
    "train(json.load(open(sys.argv[1])), log=lambda line: None)"
)


@pytest.mark.long(20)
def test_a_killed_run_resumes_from_its_last_saved_state_and_finishes_its_steps(inputs, tmp_path):
    extras = extras_for(
        inputs,
        "tiny--01234567--killed",
        checkpoints_root=str(tmp_path / "checkpoints"),
        hyperparameters=hyperparameters(max_steps=20),
        save_steps=2,
    )
    (tmp_path / "extras.json").write_text(json.dumps(extras))
    run = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "extras.json")],
        cwd=REPO,
        env={**os.environ, **SUBPROCESS_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    work = tmp_path / "checkpoints" / store.WORK_DIR
    deadline = time.monotonic() + 120
    try:
        while not list(work.glob("tiny/*/checkpoint-*/trainer_state.json")):
            assert run.poll() is None, "the run ended before it saved a state"
            assert time.monotonic() < deadline, "no state saved in 120 s"
            time.sleep(0.02)
    finally:
        run.kill()  # SIGKILL: no handler runs, as when a pod is pre-empted
        run.wait()
    assert run.returncode == -9, "the run finished before it was killed"
    assert not (tmp_path / "checkpoints" / "tiny" / extras["checkpoint_id"]).exists()

    lines: list[str] = []
    result = train_script.train({**extras, "checkpoint_id": "tiny--01234567--resumed"}, log=lines.append)
    metrics = result["manifest"]["metrics"]
    resumed = metrics["resumed_from_step"]
    assert resumed in range(2, 20, 2)
    assert any(line.startswith(f"resuming from the state saved at step {resumed} ") for line in lines)
    assert metrics["steps"] == 20
    assert [step for step, _ in metrics["loss_curve"]] == list(range(resumed + 1, 21))
    assert not list(work.rglob("checkpoint-*"))
