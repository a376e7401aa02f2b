"""Student training throughput: the training script (TRL SFTTrainer) next to a plain PyTorch loop, same process.

The reference is a hand-written forward/backward/AdamW loop over the same chat-formatted examples, batch size and
model: the ratio is what TRL's data handling, masking and trainer machinery cost or save. On a GPU, the figure is
also given against the physical limit from the verified facts (a Qwen3-1.7B-shaped model costs about 3 x 3.4 GFLOP
per trained token; an H100 does about 790 TFLOP/s bf16 dense).

    python bench/student_training.py                        # tiny Qwen3 on CPU, full and LoRA
    python bench/student_training.py --shape qwen3-1.7b     # random weights of Qwen3-1.7B's shape (GPU)

Writes bench/results/student_training.json (or --json PATH). Not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import datasets
import torch
from transformers import AutoTokenizer, Qwen3ForCausalLM

from qc_assets.benchmarks import RESULTS_DIR, figure, write_results
from qc_assets.models.tiny import build_tiny_student, sample_texts
from qc_assets.paths import SAMPLE_CORPUS, SAMPLE_TEACHER_LABELS
from qc_assets.training.memory import seed_student_configs
from qc_assets.training.train import train

ROOT = Path(__file__).resolve().parent.parent

H100_BF16_FLOPS = 790e12
QWEN3_1_7B_TRAIN_FLOP_PER_TOKEN = 3 * 3.4e9


def qwen3_1_7b_shaped(tokenizer_dir: Path, target: Path) -> Path:
    """Random weights with Qwen3-1.7B's shape (verified facts); the tiny tokenizer, since only FLOPs matter."""
    config = seed_student_configs()["Qwen/Qwen3-1.7B"]
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(target)
    return target


def sft_dataset(directory: Path) -> Path:
    texts = {}
    for path in sorted(SAMPLE_CORPUS.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            texts[record["id"]] = record["text"].strip()
    rows = [json.loads(line) for line in SAMPLE_TEACHER_LABELS.read_text(encoding="utf-8").splitlines()]
    table = {
        "system": [row["category"] for row in rows],
        "user": [texts[row["doc_id"]] for row in rows],
        "assistant": [row["query"] for row in rows],
    }
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table)}).save_to_disk(str(directory))
    return directory


def plain_loop_tokens_per_second(
    model_dir: Path, dataset_dir: Path, steps: int, batch_size: int, max_length: int
) -> float:
    """The reference: tokenize with the chat template, pad, and run forward/backward/AdamW by hand."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = datasets.load_from_disk(str(dataset_dir))["train"]
    conversations = [
        [
            {"role": "system", "content": r["system"]},
            {"role": "user", "content": r["user"]},
            {"role": "assistant", "content": r["assistant"]},
        ]
        for r in rows
    ]
    tokens = 0
    started = None
    for step in range(steps + 1):  # step 0 warms up and is not timed
        batch = conversations[(step * batch_size) % len(conversations) :][:batch_size]
        encoded = tokenizer.apply_chat_template(
            batch,
            tokenize=True,
            return_dict=True,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        loss = model(**encoded, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            continue
        tokens += int(encoded["attention_mask"].sum())
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("tiny", "qwen3-1.7b"), default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument(
        "--json", type=Path, default=RESULTS_DIR / "student_training.json", help="Where the results go."
    )
    args = parser.parse_args()
    results: dict = {"shape": args.shape, "device": "cuda" if torch.cuda.is_available() else "cpu", "steps": args.steps}
    figures: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        tiny = build_tiny_student(work / "tiny", sample_texts())
        model_dir = tiny if args.shape == "tiny" else qwen3_1_7b_shaped(tiny, work / "qwen3-1.7b-shaped")
        dataset_dir = sft_dataset(work / "sft")
        reference = plain_loop_tokens_per_second(model_dir, dataset_dir, args.steps, args.batch_size, args.max_length)
        results["plain_loop_tokens_per_second"] = round(reference, 1)
        print(f"{args.shape} on {results['device']}, batch {args.batch_size}, {args.steps} steps")
        print(f"  plain PyTorch loop (reference)   {reference:10.1f} tokens/s")
        for method in args.methods.split(","):
            metrics = train(
                {
                    "base_model": args.shape,
                    "base_model_path": str(model_dir),
                    "dataset_dir": str(dataset_dir),
                    "dataset_version": "bench",
                    "checkpoints_root": str(work / "checkpoints"),
                    "slug": args.shape,
                    "checkpoint_id": f"bench-{method}",
                    "tiny": args.shape == "tiny",
                    "hyperparameters": {
                        "method": method,
                        "max_steps": args.steps,
                        "num_train_epochs": 1.0,
                        "learning_rate": 1e-4,
                        "per_device_train_batch_size": args.batch_size,
                        "gradient_accumulation_steps": 1,
                        "max_length": args.max_length,
                        "warmup_ratio": 0.0,
                        "lora_r": 16,
                        "lora_alpha": 32,
                        "lora_dropout": 0.05,
                        "seed": 0,
                        "logging_steps": max(1, args.steps // 4),
                        "precision": "auto",
                    },
                },
                log=lambda _line: None,
            )["manifest"]["metrics"]
            rate = metrics["tokens_per_second"]
            entry = {
                "tokens_per_second": round(rate, 1),
                "vs_plain_loop": round(rate / reference, 3),
                "peak_memory_bytes": metrics["peak_memory_bytes"],
                "final_loss": metrics["final_loss"],
            }
            if args.shape == "qwen3-1.7b" and results["device"] == "cuda":
                entry["vs_h100_physical_limit"] = round(rate * QWEN3_1_7B_TRAIN_FLOP_PER_TOKEN / H100_BF16_FLOPS, 3)
            results[method] = entry
            figures.append(
                figure(
                    f"training script, {method}, {args.shape} on {results['device']}",
                    round(rate, 1),
                    "tokens/s",
                    "plain PyTorch loop",
                    round(reference, 1),
                    entry["vs_plain_loop"],
                )
            )
            if "vs_h100_physical_limit" in entry:
                figures.append(
                    figure(
                        f"training script, {method}, share of the H100's bf16 limit",
                        round(rate, 1),
                        "tokens/s",
                        "H100 physical limit",
                        round(H100_BF16_FLOPS / QWEN3_1_7B_TRAIN_FLOP_PER_TOKEN),
                        entry["vs_h100_physical_limit"],
                    )
                )
            figures.append(
                figure(f"training script, {method}, peak memory", round(metrics["peak_memory_bytes"] / 2**30, 2), "GiB")
            )
            print(
                f"  training script, {method:<4}            {rate:10.1f} tokens/s = {entry['vs_plain_loop']:.3f} x reference, "
                f"peak memory {metrics['peak_memory_bytes'] / 2**30:.2f} GiB"
                + (
                    f", {entry['vs_h100_physical_limit']:.3f} of the H100 limit"
                    if "vs_h100_physical_limit" in entry
                    else ""
                )
            )
    results["figures"] = figures
    write_results(args.json, results)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
