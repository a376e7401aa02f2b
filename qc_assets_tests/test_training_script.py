"""The student training script, run out of process through Dagster Pipes, on the tiny Qwen3 student (CPU, offline)."""

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from qc_assets.categories import CATEGORY_NAMES
from qc_assets.defs.student import store
from qc_assets.defs.student import train as train_script
from qc_assets.models.tiny import build_tiny_student
from qc_assets.settings import SAMPLE_CORPUS

REPO = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "qc_assets.defs.student.train"]
# One torch thread: the tiny model gains nothing from more, and on a busy CI machine OpenMP threads that wait for
# each other make a 1-second training run take twenty.
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1"}
QUERIES = ["味噌汁の作り方", "鎌倉幕府はいつ始まったか", "よく眠るための習慣", "食中毒を防ぐには", "日本の四季"]
MANIFEST_FIELDS = {
    "checkpoint", "base_model", "base_model_path", "dataset_version", "hyperparameters", "metrics", "created_at",
    "tiny_model", "versions",
}
METRIC_FIELDS = {
    "steps", "final_loss", "loss_curve", "train_tokens", "tokens_per_second", "wall_seconds", "peak_memory_bytes",
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
        "import sys, qc_assets.defs.student.train; "
        "print(sorted(m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')))"
    )
    completed = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
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
    assert MANIFEST_FIELDS <= manifest.keys() and METRIC_FIELDS <= manifest["metrics"].keys()
    assert manifest["checkpoint"] == extras["checkpoint_id"]
    assert manifest["base_model"] == "tiny" and manifest["base_model_path"] == str(inputs["model_dir"])
    assert manifest["dataset_version"] == extras["dataset_version"]
    assert manifest["hyperparameters"] == {**extras["hyperparameters"], "resolved_precision": "fp32"}
    assert manifest["tiny_model"] is True and manifest["metrics"]["device"] == "cpu"
    assert manifest["metrics"]["loss_curve"] == metadata["loss_curve"]
    assert manifest["metrics"]["train_examples_used"] == manifest["metrics"]["train_examples"] == 40
    assert manifest["metrics"]["train_examples_truncated"] == 0
    assert set(manifest["versions"]) >= {"trl", "transformers", "peft", "torch"}
    assert manifest["created_at"].endswith("+00:00")
    assert [found.checkpoint for found in store.list_checkpoints(Path(extras["checkpoints_root"]))] == [
        extras["checkpoint_id"]
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
        inputs, "tiny--01234567--unpublished", checkpoints_root=str(inputs["root"] / "unpublished"),
        hyperparameters=hyperparameters(max_steps=1),
    )
    with pytest.raises(OSError, match="disk full"):
        train_script.train(extras, log=lambda line: None)
    assert list((Path(extras["checkpoints_root"]) / "tiny").iterdir()) == []


def labelled(trainer, tokenizer, index: int = 0) -> tuple[str, str, list[int], list[int]]:
    example = trainer.train_dataset[index]
    input_ids, labels = example["input_ids"], example["labels"]
    trained = tokenizer.decode([token for token, label in zip(input_ids, labels) if label != -100])
    masked = tokenizer.decode([token for token, label in zip(input_ids, labels) if label == -100])
    return trained, masked, input_ids, labels


def test_the_loss_is_on_the_assistant_answer_only(inputs, tmp_path):
    trainer, tokenizer, facts = train_script.build_trainer(extras_for(inputs, "unused"), tmp_path)
    assert facts["chat_template_source"] == "model"
    for index in range(3):
        trained, _, input_ids, labels = labelled(trainer, tokenizer, index)
        assert trained == QUERIES[index % len(QUERIES)] + "<|im_end|>"
        # One contiguous span of labels, equal to the input ids there; all else is -100: the system turn, the
        # document, the empty think block before the answer and the newline after <|im_end|>.
        span = [position for position, label in enumerate(labels) if label != -100]
        assert span == list(range(span[0], span[-1] + 1))
        assert [labels[position] for position in span] == [input_ids[position] for position in span]
        prompt = tokenizer.decode(input_ids[: span[0]])
        assert prompt.startswith(f"<|im_start|>system\n{CATEGORY_NAMES[index % len(CATEGORY_NAMES)]}<|im_end|>")
        assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert tokenizer.decode(input_ids[span[-1] + 1 :]) == "\n"
    # The collator keeps these labels (padding adds -100), so the batch the model sees is masked the same way.
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert (batch["labels"][0][: len(trainer.train_dataset[0]["labels"])] == torch.tensor(labelled(trainer, tokenizer)[3])).all()


def test_qwen3s_own_template_trains_with_trls_training_twin_and_generates_without_thinking(inputs, tmp_path):
    from trl.chat_template_utils import (
        qwen3_chat_template,
        qwen3_training_chat_template,
    )

    # The tiny student with Qwen3's original chat template (no generation markers), as Qwen/Qwen3-* ships it.
    model_dir = tmp_path / "qwen3-template"
    model_dir.mkdir()
    for path in inputs["model_dir"].iterdir():
        (model_dir / path.name).write_bytes(path.read_bytes())
    (model_dir / "chat_template.jinja").write_text(qwen3_chat_template, encoding="utf-8")
    extras = extras_for(inputs, "unused", base_model="Qwen/Qwen3-1.7B", base_model_path=str(model_dir))
    trainer, tokenizer, facts = train_script.build_trainer(extras, tmp_path / "out")
    assert facts["chat_template_source"] == "trl" and trainer.chat_template == qwen3_training_chat_template
    # The tokenizer that is saved keeps the original template: generation renders it with enable_thinking=False.
    assert tokenizer.chat_template == qwen3_chat_template
    trained, masked, _, _ = labelled(trainer, tokenizer)
    assert trained.startswith("<think>\n\n</think>\n\n" + QUERIES[0] + "<|im_end|>")
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "title"}, {"role": "user", "content": "文書"}],
        add_generation_prompt=True, tokenize=False, enable_thinking=False,
    )
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert masked.endswith("<|im_start|>assistant\n")


def test_a_template_without_markers_that_trl_cannot_patch_fails_naming_the_model(inputs, tmp_path):
    model_dir = tmp_path / "plain-template"
    model_dir.mkdir()
    for path in inputs["model_dir"].iterdir():
        (model_dir / path.name).write_bytes(path.read_bytes())
    (model_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        encoding="utf-8",
    )
    extras = extras_for(inputs, "unused", base_model="acme/plain-chat", base_model_path=str(model_dir))
    with pytest.raises(train_script.TrainingInputError, match="acme/plain-chat.*generation"):
        train_script.build_trainer(extras, tmp_path / "out")
