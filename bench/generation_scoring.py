"""Generation and scoring throughput: the project's backends next to plain transformers code, same process.

Generation: `open_generator("transformers", ...)` (and `vllm` on CUDA when it imports) on test-like requests:
synthetic Japanese-like documents of about 1,000 characters, each asked for all 7 categories, as the
generated_queries asset does (so one pipeline document = 7 requests; seed 000's "10k documents in under 100 s" was
one query per document, which is why its anchor is compared in tokens/s, not documents/s). The prompt is the SFT
rendering (category as system turn, document as user turn, chat template with enable_thinking=False).
  Reference: the minimal hand-written loop a user would write: the same checkpoint loaded with
  AutoModelForCausalLM, the same prompts through `apply_chat_template(..., padding=True)` with left padding, the
  same batch size, greedy `model.generate`, the same max_new_tokens, then `batch_decode`. The random-weight models
  stop at arbitrary points, so both sides are forced to produce exactly max_new_tokens tokens (min_new_tokens on
  both; `--natural-length` turns this off, and then only the tokens/s figures compare).
  Anchor: seed 000's vLLM on an RTX 5090, 48,000 input and 2,200 output tokens/s: only meaningful on a GPU with
  `--shape qwen3-1.7b`; otherwise printed as n/a.

Scoring: `open_scorer(...)` (sentence-transformers CrossEncoder, sigmoid) on (query, document) pairs, next to the
same checkpoint through AutoModelForSequenceClassification, forward + sigmoid in batches of the same size. With
`--shape bge-reranker-v2-m3` on a GPU, also the ratio to the physical limit (about 2,500 pairs/s of about 520
tokens on an H100 at 100% use, verified facts).

Shapes: `tiny` (default: the project's tiny random models, from QC_DATA_DIR/models when QC_DATA_DIR is set, else a
temporary directory); `qwen3-1.7b` and/or `bge-reranker-v2-m3` (comma-separated) swap in random weights with the
real configuration (the tiny tokenizers: same FLOPs per token, real vocabulary size). The big shapes are meant
for a GPU; on a CPU they run, very slowly.

    python bench/generation_scoring.py                                     # tiny models, CPU: about 1-3 minutes
    python bench/generation_scoring.py --quick                             # smoke run, well under 30 s
    python bench/generation_scoring.py --shape qwen3-1.7b,bge-reranker-v2-m3   # on a GPU

Each side is warmed up on one batch, then both run `--repeats` times alternately (each side first in turn) and the
fastest run of each side counts; every run's time is kept in the JSON. On a small shared CPU the figures swing
widely: torch uses one thread per core, and when another CPU-bound process (a second torch process above all)
shares the cores, its threads spin at every barrier and a run can take 10-20 times longer. `--threads 1` gives
steadier figures there. Writes bench/results/generation_scoring.json (or --json PATH). Not a test: nothing here
asserts a timing.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Qwen3ForCausalLM,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from qc_assets.benchmarks import figure, machine, positive_int, write_results
from qc_assets.categories import CATEGORY_NAMES
from qc_assets.defs.corpus.synthetic import japanese_like_texts, sentence_pool
from qc_assets.defs.generation.backends import (
    GENERATION_TEMPLATE_KWARGS,
    GenerationRequest,
    GeneratorUnavailable,
    messages_for,
    open_generator,
    postprocess,
    stop_token_ids,
)
from qc_assets.defs.scoring.scorers import open_scorer
from qc_assets.models.tiny import CROSS_ENCODER_DIR, STUDENT_DIR, ensure_tiny_models, sample_texts
from qc_assets.training.memory import seed_student_configs

ROOT = Path(__file__).resolve().parent.parent

CATEGORIES_PER_DOCUMENT = len(CATEGORY_NAMES)
# Seed 000's anchor (verified facts): vLLM on an RTX 5090, Qwen3-1.7B, 10k documents (one query each) in < 100 s.
SEED000_INPUT_TOKENS_PER_S = 48_000.0
SEED000_OUTPUT_TOKENS_PER_S = 2_200.0
SEED000_REQUESTS_PER_S = 100.0
# Physical limit (verified facts): a bge-reranker-v2-m3-shaped pair of ~520 tokens costs ~0.31 TFLOP; an H100 does
# ~790 TFLOP/s bf16 dense: about 2,500 pairs/s at 100% use.
H100_RERANKER_PAIRS_PER_S = 2_500.0
H100_RERANKER_PAIR_TOKENS = 520
GENERATION_SHAPES = ("tiny", "qwen3-1.7b")
SCORING_SHAPES = ("tiny", "bge-reranker-v2-m3")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Models


def qwen3_1_7b_shaped(tokenizer_dir: Path, target: Path) -> Path:
    """Random weights with Qwen3-1.7B's shape (verified facts), the tiny tokenizer (its ids fit the real vocab)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = seed_student_configs()["Qwen/Qwen3-1.7B"]
    config.bos_token_id = None
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model
    _free()
    return target


def bge_reranker_v2_m3_shaped(tokenizer_dir: Path, target: Path) -> Path:
    """Random weights with bge-reranker-v2-m3's shape (verified facts), the tiny cross-encoder's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = XLMRobertaConfig(
        vocab_size=250002,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=8194,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = XLMRobertaForSequenceClassification(config).to(torch.bfloat16)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model
    _free()
    return target


def _free() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    """Process-wide: the resident-set high-water mark (CPU), and on CUDA the allocator's peak since the last reset."""
    figures = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if DEVICE == "cuda":
        figures["peak_cuda_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return figures


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def test_like_requests(documents: int, chars: int, seed: int) -> list[GenerationRequest]:
    """Every document asked for every category, document-major, as the generated_queries asset builds them."""
    return [
        GenerationRequest(key=(row, name), category=name, text=text)
        for row, text in enumerate(japanese_like_texts(documents, chars, seed=seed))
        for name in CATEGORY_NAMES
    ]


def query_document_pairs(count: int, chars: int, seed: int) -> list[tuple[str, str]]:
    """Short Japanese queries ("日本と学校の仕組み") with documents of about `chars` characters."""
    texts = japanese_like_texts(count, chars, seed=seed)
    pool = sentence_pool(512, seed + 1)
    queries = [pool[index % len(pool)].split("、", 1)[1].split("について", 1)[0] for index in range(count)]
    return list(zip(queries, texts, strict=True))


# ---------------------------------------------------------------------------------------------------------------
# Generation


class PlainGenerateLoop:
    """The reference: what a user writes with transformers alone for the same prompts."""

    def __init__(self, model_dir: Path, batch_size: int, max_new_tokens: int, fixed_length: bool) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE).to(DEVICE).eval()
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config)
        self.batch_size, self.max_new_tokens, self.fixed_length = batch_size, max_new_tokens, fixed_length

    def run(self, requests: list[GenerationRequest]) -> tuple[list[str], int, int]:
        """(queries, input tokens, output tokens up to and including the first stop token)."""
        queries: list[str] = []
        input_tokens = output_tokens = 0
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            encoded = self.tokenizer.apply_chat_template(
                [messages_for(r.category, r.text) for r in batch],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                padding=True,
                return_tensors="pt",
                **GENERATION_TEMPLATE_KWARGS,
            ).to(DEVICE)
            with torch.inference_mode():
                output = self.model.generate(
                    **encoded,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    eos_token_id=self.stop_ids,
                    pad_token_id=self.tokenizer.pad_token_id,
                    min_new_tokens=self.max_new_tokens if self.fixed_length else None,
                )
            generated = output[:, encoded["input_ids"].shape[1] :]
            queries += [postprocess(text) for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]
            input_tokens += int(encoded["attention_mask"].sum())
            for row in generated.tolist():
                output_tokens += next((i + 1 for i, token in enumerate(row) if token in self.stop_ids), len(row))
        return queries, input_tokens, output_tokens

    def close(self) -> None:
        del self.model
        _free()


def force_fixed_length(generator, max_new_tokens: int) -> str | None:
    """Make the backend emit exactly max_new_tokens tokens; None if done, else why not. Touches the backend's
    internals (its generation config / sampling params): a benchmark-only knob, not a backend option."""
    if generator.name == "transformers":
        generator.model.generation_config.min_new_tokens = max_new_tokens
        return None
    if generator.name == "vllm":
        import vllm

        plain = generator.sampling_params

        @functools.cache
        def fixed_length(category: str):
            old = plain(category)
            return vllm.SamplingParams(
                temperature=old.temperature,
                max_tokens=old.max_tokens,
                min_tokens=max_new_tokens,
                stop_token_ids=old.stop_token_ids,
                detokenize=old.detokenize,
            )

        generator.sampling_params = fixed_length
        return None
    return f"no fixed-length knob for backend {generator.name}"


def rates(seconds: float, requests: int, input_tokens: int, output_tokens: int) -> dict:
    return {
        "seconds": round(seconds, 3),
        "requests_per_s": _sig(requests / seconds),
        "documents_per_s": _sig(requests / seconds / CATEGORIES_PER_DOCUMENT),
        "input_tokens_per_s": _sig(input_tokens / seconds),
        "output_tokens_per_s": _sig(output_tokens / seconds),
        "mean_input_tokens": round(input_tokens / requests, 1),
        "mean_output_tokens": round(output_tokens / requests, 2),
    }


def _sig(value: float, digits: int = 4) -> float:
    """Four significant digits: ratios computed from stored figures stay within rounding of the true ones."""
    if value == 0:
        return 0.0
    from math import floor, log10

    return round(value, max(0, digits - 1 - floor(log10(abs(value)))))


def _ratio(value: float, reference: float) -> float:
    return _sig(value / reference, 3)


def time_backend(generator, requests: list[GenerationRequest]) -> tuple[float, list[str], int, int]:
    _sync()
    started = time.perf_counter()
    results = generator.generate(requests)
    _sync()
    seconds = time.perf_counter() - started
    return (
        seconds,
        [r.query for r in results],
        sum(r.input_tokens for r in results),
        sum(r.output_tokens for r in results),
    )


def time_reference(
    reference: PlainGenerateLoop, requests: list[GenerationRequest]
) -> tuple[float, list[str], int, int]:
    _sync()
    started = time.perf_counter()
    queries, input_tokens, output_tokens = reference.run(requests)
    _sync()
    return time.perf_counter() - started, queries, input_tokens, output_tokens


def generation_benchmark(model_dir: Path, shape: str, args) -> dict:
    requests = test_like_requests(args.documents, args.doc_chars, seed=1)
    warmup = test_like_requests(max(1, -(-args.gen_batch_size // CATEGORIES_PER_DOCUMENT)), args.doc_chars, seed=2)
    warmup = warmup[: args.gen_batch_size]
    fixed = not args.natural_length
    common = {
        "batch_size": args.gen_batch_size,
        "max_new_tokens": args.max_new_tokens,
        "temperature": 0.0,
        "max_input_tokens": args.max_input_tokens,
    }
    section: dict = {
        "backend": "transformers",
        "model_shape": shape,
        "requests": len(requests),
        "documents": args.documents,
        "requests_per_document": CATEGORIES_PER_DOCUMENT,
        "document_chars": args.doc_chars,
        "batch_size": args.gen_batch_size,
        "max_new_tokens": args.max_new_tokens,
        "max_input_tokens": args.max_input_tokens,
        "repeats": args.repeats,
    }
    generator = open_generator("transformers", str(model_dir), **common)
    why_not = force_fixed_length(generator, args.max_new_tokens) if fixed else "--natural-length"
    section["fixed_output_length"] = why_not is None
    reference = PlainGenerateLoop(model_dir, args.gen_batch_size, args.max_new_tokens, why_not is None)
    try:
        generator.generate(warmup)
        reference.run(warmup)
        _reset_peak()
        runs: dict[str, list] = {"backend": [], "reference": []}
        for repeat in range(args.repeats):  # alternately, and each side first in turn: noise hits both alike
            for side in ("backend", "reference") if repeat % 2 == 0 else ("reference", "backend"):
                timed = time_backend if side == "backend" else time_reference
                runs[side].append(timed(generator if side == "backend" else reference, requests))
        # What the backend spends before the model sees anything: templating and tokenizing each prompt.
        started = time.perf_counter()
        for request in requests:
            generator.builder.build(request.category, request.text)
        prompt_seconds = time.perf_counter() - started
    finally:
        generator.close()
        reference.close()
    best_backend, best_reference = (min(runs[side], key=lambda run: run[0]) for side in ("backend", "reference"))
    seconds, queries, input_tokens, output_tokens = best_backend
    section.update(rates(seconds, len(requests), input_tokens, output_tokens))
    section["run_seconds"] = [round(run[0], 3) for run in runs["backend"]]
    section["prompt_build_seconds"] = round(prompt_seconds, 3)
    section["prompt_build_share"] = round(prompt_seconds / seconds, 3)
    r_seconds, r_queries, r_input, r_output = best_reference
    for key, value in rates(r_seconds, len(requests), r_input, r_output).items():
        section[f"reference_{key}"] = value
    section["reference_run_seconds"] = [round(run[0], 3) for run in runs["reference"]]
    for key in ("requests_per_s", "input_tokens_per_s", "output_tokens_per_s"):
        section[f"ratio_{key}"] = _ratio(section[key], section[f"reference_{key}"])
    section["identical_queries"] = sum(a == b for a, b in zip(queries, r_queries, strict=True))
    section["empty_queries"] = sum(not q for q in queries)
    section.update(peak_memory())
    section["seed000_input_tokens_per_s"] = SEED000_INPUT_TOKENS_PER_S
    section["seed000_output_tokens_per_s"] = SEED000_OUTPUT_TOKENS_PER_S
    if anchor_applies(shape):
        section.update(seed000_ratios(section))
    else:
        section["seed000_note"] = anchor_note(shape)
    if DEVICE == "cuda":
        section["vllm"] = vllm_benchmark(model_dir, requests, warmup, common, section, fixed)
    else:
        section["vllm"] = {"skipped": "CPU: vllm is for CUDA machines"}
    return section


def vllm_benchmark(model_dir: Path, requests, warmup, common: dict, section: dict, fixed: bool) -> dict:
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        return {"skipped": f"vllm not importable ({error})"}
    try:
        _reset_peak()
        generator = open_generator("vllm", str(model_dir), **common)
    except GeneratorUnavailable as error:
        return {"skipped": str(error)}
    except Exception as error:
        return {"failed": f"{type(error).__name__}: {error}"}
    try:
        if fixed:
            force_fixed_length(generator, common["max_new_tokens"])
        generator.generate(warmup)
        runs = [time_backend(generator, requests) for _ in range(section["repeats"])]
    except Exception as error:
        return {"failed": f"{type(error).__name__}: {error}"}
    finally:
        generator.close()
    seconds, _, input_tokens, output_tokens = min(runs, key=lambda run: run[0])
    entry = rates(seconds, len(requests), input_tokens, output_tokens)
    entry["run_seconds"] = [round(run[0], 3) for run in runs]
    for key in ("requests_per_s", "input_tokens_per_s", "output_tokens_per_s"):
        entry[f"ratio_{key}"] = _ratio(entry[key], section[f"reference_{key}"])
    if anchor_applies(section["model_shape"]):
        entry.update(seed000_ratios(entry))
    entry.update(peak_memory())
    return entry


def seed000_ratios(figures: dict) -> dict:
    return {
        "ratio_input_tokens_per_s_to_seed000": _ratio(figures["input_tokens_per_s"], SEED000_INPUT_TOKENS_PER_S),
        "ratio_output_tokens_per_s_to_seed000": _ratio(figures["output_tokens_per_s"], SEED000_OUTPUT_TOKENS_PER_S),
    }


def anchor_applies(shape: str) -> bool:
    return DEVICE == "cuda" and shape == "qwen3-1.7b"


def anchor_note(shape: str) -> str:
    return f"n/a ({'CPU' if DEVICE == 'cpu' else 'GPU'}, {'tiny model' if shape == 'tiny' else shape})"


# ---------------------------------------------------------------------------------------------------------------
# Scoring


class PlainSequenceClassifier:
    """The reference: AutoModelForSequenceClassification, forward + sigmoid, batches in the caller's order."""

    def __init__(self, model_dir: Path, batch_size: int, max_length: int) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=DTYPE).to(DEVICE).eval()
        self.batch_size, self.max_length = batch_size, max_length

    def score(self, pairs: list[tuple[str, str]]) -> tuple[list[float], int]:
        scores: list[float] = []
        tokens = 0
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start : start + self.batch_size]
            encoded = self.tokenizer(
                [q for q, _ in batch],
                [d for _, d in batch],
                padding=True,
                truncation="longest_first",
                max_length=self.max_length,
                return_tensors="pt",
            ).to(DEVICE)
            with torch.inference_mode():
                logits = self.model(**encoded).logits[:, 0]
            scores += torch.sigmoid(logits.float()).tolist()
            tokens += int(encoded["attention_mask"].sum())
        return scores, tokens

    def close(self) -> None:
        del self.model
        _free()


def scoring_benchmark(model_dir: Path, shape: str, args) -> dict:
    pairs = query_document_pairs(args.pairs, args.doc_chars, seed=3)
    warmup = query_document_pairs(args.score_batch_size, args.doc_chars, seed=4)
    scorer = open_scorer(str(model_dir), max_length=args.max_length, batch_size=args.score_batch_size, name=shape)
    reference = PlainSequenceClassifier(model_dir, args.score_batch_size, args.max_length)
    quiet = lambda _message: None  # noqa: E731
    try:
        scorer.score(warmup, log=quiet)
        reference.score(warmup)
        _reset_peak()
        runs: dict[str, list[float]] = {"scorer": [], "reference": []}
        for repeat in range(args.repeats):  # as for generation: alternately, each side first in turn
            for side in ("scorer", "reference") if repeat % 2 == 0 else ("reference", "scorer"):
                _sync()
                started = time.perf_counter()
                if side == "scorer":
                    scores = scorer.score(pairs, log=quiet)
                else:
                    reference_scores, tokens = reference.score(pairs)
                _sync()
                runs[side].append(time.perf_counter() - started)
    finally:
        scorer.close()
        reference.close()
    best, best_reference = min(runs["scorer"]), min(runs["reference"])
    section: dict = {
        "scorer": "sentence-transformers CrossEncoder (open_scorer)",
        "model_shape": shape,
        "pairs": len(pairs),
        "batch_size": args.score_batch_size,
        "max_length": args.max_length,
        "repeats": args.repeats,
        "mean_tokens_per_pair": round(tokens / len(pairs), 1),
        "seconds": round(best, 3),
        "pairs_per_s": _sig(len(pairs) / best),
        "reference_seconds": round(best_reference, 3),
        "reference_pairs_per_s": _sig(len(pairs) / best_reference),
        "run_seconds": [round(t, 3) for t in runs["scorer"]],
        "reference_run_seconds": [round(t, 3) for t in runs["reference"]],
    }
    section["ratio_pairs_per_s"] = _ratio(section["pairs_per_s"], section["reference_pairs_per_s"])
    difference = max(abs(a - b) for a, b in zip(scores, reference_scores, strict=True))
    section["max_abs_score_difference"] = float(f"{difference:.3g}")
    section.update(peak_memory())
    section["h100_limit_pairs_per_s"] = H100_RERANKER_PAIRS_PER_S
    if DEVICE == "cuda" and shape == "bge-reranker-v2-m3":
        section["ratio_pairs_per_s_to_h100_limit"] = _ratio(section["pairs_per_s"], H100_RERANKER_PAIRS_PER_S)
    else:
        section["h100_limit_note"] = anchor_note(shape)
    return section


# ---------------------------------------------------------------------------------------------------------------
# Report


def figures_for(results: dict) -> list[dict]:
    rows = []
    where = "GPU" if DEVICE == "cuda" else "CPU"
    generation = results.get("generation")
    if generation:
        label = f"{generation['model_shape']} Qwen3, {where}"
        rows.append(
            figure(
                f"generation, transformers backend ({label})",
                generation["requests_per_s"],
                "req/s",
                "plain model.generate loop",
                generation["reference_requests_per_s"],
                generation["ratio_requests_per_s"],
            )
        )
        for kind, anchor in (("input", SEED000_INPUT_TOKENS_PER_S), ("output", SEED000_OUTPUT_TOKENS_PER_S)):
            ratio = generation.get(f"ratio_{kind}_tokens_per_s_to_seed000")
            reference = "seed 000 vLLM on RTX 5090"
            if ratio is None:  # no ratio, and the anchor in words only: it is not comparable here
                reference += f" ({anchor:,.0f}): {generation['seed000_note']}"
            rows.append(
                figure(
                    f"generation, transformers backend, {kind} tokens ({label})",
                    generation[f"{kind}_tokens_per_s"],
                    "tok/s",
                    reference,
                    anchor if ratio is not None else None,
                    ratio,
                )
            )
        vllm = generation.get("vllm", {})
        if "requests_per_s" in vllm:
            rows.append(
                figure(
                    f"generation, vllm backend ({label})",
                    vllm["requests_per_s"],
                    "req/s",
                    "plain model.generate loop",
                    generation["reference_requests_per_s"],
                    vllm["ratio_requests_per_s"],
                )
            )
            if "ratio_output_tokens_per_s_to_seed000" in vllm:
                rows.append(
                    figure(
                        f"generation, vllm backend, output tokens ({label})",
                        vllm["output_tokens_per_s"],
                        "tok/s",
                        "seed 000 vLLM on RTX 5090",
                        SEED000_OUTPUT_TOKENS_PER_S,
                        vllm["ratio_output_tokens_per_s_to_seed000"],
                    )
                )
    scoring = results.get("scoring")
    if scoring:
        label = f"{scoring['model_shape']} XLM-R, {where}"
        rows.append(
            figure(
                f"scoring, cross-encoder scorer ({label})",
                scoring["pairs_per_s"],
                "pairs/s",
                "plain AutoModelForSequenceClassification + sigmoid",
                scoring["reference_pairs_per_s"],
                scoring["ratio_pairs_per_s"],
            )
        )
        if "ratio_pairs_per_s_to_h100_limit" in scoring:
            rows.append(
                figure(
                    f"scoring, cross-encoder scorer vs physical limit ({label})",
                    scoring["pairs_per_s"],
                    "pairs/s",
                    f"H100 at 100% use, ~{H100_RERANKER_PAIR_TOKENS}-token pairs",
                    H100_RERANKER_PAIRS_PER_S,
                    scoring["ratio_pairs_per_s_to_h100_limit"],
                )
            )
    return rows


def print_summary(results: dict) -> None:
    generation, scoring = results.get("generation"), results.get("scoring")
    print(
        f"device {results['device']} ({results['torch_threads']} torch threads), torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    if generation:
        g = generation
        length = f"exactly {g['max_new_tokens']}" if g["fixed_output_length"] else f"up to {g['max_new_tokens']}"
        print(
            f"generation: {g['model_shape']} model, {g['requests']} requests = {g['documents']} documents x "
            f"{CATEGORIES_PER_DOCUMENT} categories, ~{g['document_chars']} chars/document, batch {g['batch_size']}, "
            f"{length} new tokens, greedy, best of {g['repeats']}"
        )
        print(
            f"  {'':36}{'req/s':>10}{'docs/s':>10}{'input tok/s':>13}{'output tok/s':>14}   in/out tokens per request"
        )
        rows = [("plain model.generate loop (ref)", "reference_"), ("transformers backend", "")]
        vllm = g.get("vllm", {})
        for title, prefix in rows:
            print(
                f"  {title:<36}{g[prefix + 'requests_per_s']:>10.2f}{g[prefix + 'documents_per_s']:>10.2f}"
                f"{g[prefix + 'input_tokens_per_s']:>13.0f}{g[prefix + 'output_tokens_per_s']:>14.1f}   "
                f"{g[prefix + 'mean_input_tokens']:.0f}/{g[prefix + 'mean_output_tokens']:.1f}"
            )
        print(
            f"  transformers backend / reference: {g['ratio_requests_per_s']:.3f} x req/s, "
            f"{g['ratio_input_tokens_per_s']:.3f} x input tok/s, {g['ratio_output_tokens_per_s']:.3f} x output tok/s; "
            f"same query as the reference {g['identical_queries']}/{g['requests']} ({g['empty_queries']} empty); "
            f"prompt building {g['prompt_build_share']:.1%} of the backend's time"
        )
        print(f"  timed runs (s): backend {_runs(g['run_seconds'])}, reference {_runs(g['reference_run_seconds'])}")
        if "requests_per_s" in vllm:
            print(
                f"  {'vllm backend':<36}{vllm['requests_per_s']:>10.2f}{vllm['documents_per_s']:>10.2f}"
                f"{vllm['input_tokens_per_s']:>13.0f}{vllm['output_tokens_per_s']:>14.1f}   "
                f"= {vllm['ratio_requests_per_s']:.3f} x reference req/s"
            )
        else:
            outcome = "failed" if "failed" in vllm else "skipped"
            print(f"  vllm backend: {outcome} ({vllm.get('failed', vllm.get('skipped'))})")
        if not g["fixed_output_length"]:
            print("  output lengths are not forced equal: compare the tokens/s columns, not req/s")
        for name, backend in (("transformers", g), ("vllm", vllm)):
            if "ratio_input_tokens_per_s_to_seed000" in backend:
                print(
                    f"  seed 000 anchor (vLLM, RTX 5090: {SEED000_INPUT_TOKENS_PER_S:,.0f} input, "
                    f"{SEED000_OUTPUT_TOKENS_PER_S:,.0f} output tok/s): {name} "
                    f"{backend['ratio_input_tokens_per_s_to_seed000']:.3f} x input, "
                    f"{backend['ratio_output_tokens_per_s_to_seed000']:.3f} x output"
                )
        if "seed000_note" in g:
            print(
                f"  seed 000 anchor (vLLM, RTX 5090: {SEED000_INPUT_TOKENS_PER_S:,.0f} input, "
                f"{SEED000_OUTPUT_TOKENS_PER_S:,.0f} output tok/s, {SEED000_REQUESTS_PER_S:.0f} docs/s at one query "
                f"each): {g['seed000_note']}"
            )
        print(f"  peak memory: {_memory(g)}")
    if scoring:
        s = scoring
        print(
            f"scoring: {s['model_shape']} cross-encoder, {s['pairs']} (query, document) pairs of "
            f"~{s['mean_tokens_per_pair']:.0f} tokens, batch {s['batch_size']}, max_length {s['max_length']}, "
            f"best of {s['repeats']}"
        )
        print(f"  {'plain forward + sigmoid (ref)':<36}{s['reference_pairs_per_s']:>10.2f} pairs/s")
        print(
            f"  {'open_scorer (CrossEncoder)':<36}{s['pairs_per_s']:>10.2f} pairs/s = {s['ratio_pairs_per_s']:.3f} x "
            f"reference; largest score difference {s['max_abs_score_difference']:.2g}"
        )
        print(f"  timed runs (s): scorer {_runs(s['run_seconds'])}, reference {_runs(s['reference_run_seconds'])}")
        limit = s.get("ratio_pairs_per_s_to_h100_limit")
        print(
            f"  physical limit (H100 at 100%, ~{H100_RERANKER_PAIR_TOKENS}-token pairs, "
            f"{H100_RERANKER_PAIRS_PER_S:,.0f} pairs/s): "
            + (f"{limit:.3f} x" if limit is not None else s["h100_limit_note"])
        )
        print(f"  peak memory: {_memory(s)}")


def _runs(seconds: list[float]) -> str:
    return " ".join(f"{value:.2f}" for value in seconds)


def _memory(section: dict) -> str:
    text = f"{section['peak_rss_bytes'] / 2**30:.2f} GiB resident (process high-water mark so far)"
    if "peak_cuda_allocated_bytes" in section:
        text += f", {section['peak_cuda_allocated_bytes'] / 2**30:.2f} GiB CUDA allocated (timed runs, both sides)"
    return text


# ---------------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shape",
        default="tiny",
        help="tiny (default), or a comma-separated choice of qwen3-1.7b (generation) and "
        "bge-reranker-v2-m3 (scoring); the stage not named uses its tiny model",
    )
    parser.add_argument("--only", choices=("generation", "scoring"), help="run one of the two benchmarks")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run (well under 30 s on CPU)")
    parser.add_argument(
        "--documents",
        type=positive_int,
        help="generation documents, 7 category requests each (quick 2, CPU 32, GPU 256)",
    )
    parser.add_argument("--doc-chars", type=positive_int, default=1000, help="characters per document (default 1000)")
    parser.add_argument(
        "--gen-batch-size", type=positive_int, help="generation batch size, both sides (quick 14, CPU 16, GPU 64)"
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, help="new tokens per query, both sides (quick 16, else 32)"
    )
    parser.add_argument(
        "--max-input-tokens", type=positive_int, default=2048, help="the backend's prompt cap (default 2048)"
    )
    parser.add_argument(
        "--natural-length",
        action="store_true",
        help="let each side stop at its stop token instead of forcing max_new_tokens",
    )
    parser.add_argument("--pairs", type=positive_int, help="scoring pairs (quick 32, CPU 512, GPU 4096)")
    parser.add_argument(
        "--score-batch-size",
        type=positive_int,
        default=32,
        help="scoring batch size (default 32, as QC_SCORER_BATCH_SIZE)",
    )
    parser.add_argument(
        "--max-length", type=positive_int, default=512, help="scoring max_length (default 512, as QC_SCORER_MAX_LENGTH)"
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        help="timed runs per side, alternately; the fastest counts (quick 1, CPU 3, GPU 2)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        help="torch intra-op threads (default: torch's own, one per core); both sides alike",
    )
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "generation_scoring.json")
    args = parser.parse_args()
    shapes = {name.strip() for name in args.shape.split(",") if name.strip()}
    unknown = shapes - set(GENERATION_SHAPES) - set(SCORING_SHAPES)
    if unknown or not shapes:
        parser.error(f"--shape: unknown {sorted(unknown)}; choose tiny, qwen3-1.7b, bge-reranker-v2-m3")
    args.generation_shape = "qwen3-1.7b" if "qwen3-1.7b" in shapes else "tiny"
    args.scoring_shape = "bge-reranker-v2-m3" if "bge-reranker-v2-m3" in shapes else "tiny"
    gpu = DEVICE == "cuda"
    # (quick, CPU default, GPU default)
    defaults = {
        "documents": (2, 32, 256),
        "gen_batch_size": (14, 16, 64),
        "max_new_tokens": (16, 32, 32),
        "pairs": (32, 512, 4096),
        "repeats": (1, 3, 2),
    }
    for name, (quick, cpu, cuda) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else cuda if gpu else cpu)
    return args


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    big = [s for s in (args.generation_shape, args.scoring_shape) if s != "tiny"]
    if big and DEVICE == "cpu":
        print(
            f"warning: {', '.join(big)} on a CPU: random weights of the real size, expect many minutes and "
            "several GiB of memory per copy (two copies are loaded: the backend's and the reference's)"
        )
    results: dict = {
        "machine": machine(),
        "device": f"cuda: {torch.cuda.get_device_name(0)}" if DEVICE == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "shape": {"generation": args.generation_shape, "scoring": args.scoring_shape},
        "quick": args.quick,
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qc-bench-gen-") as scratch:
        work = Path(scratch)
        data_dir = os.environ.get("QC_DATA_DIR")
        tiny = ensure_tiny_models(Path(data_dir) / "models" if data_dir else work / "models", sample_texts())
        if args.only in (None, "generation"):
            model_dir = tiny[STUDENT_DIR]
            if args.generation_shape == "qwen3-1.7b":
                model_dir = qwen3_1_7b_shaped(model_dir, work / "qwen3-1.7b-shaped")
            results["generation"] = generation_benchmark(model_dir, args.generation_shape, args)
        if args.only in (None, "scoring"):
            model_dir = tiny[CROSS_ENCODER_DIR]
            if args.scoring_shape == "bge-reranker-v2-m3":
                model_dir = bge_reranker_v2_m3_shaped(model_dir, work / "bge-reranker-v2-m3-shaped")
            results["scoring"] = scoring_benchmark(model_dir, args.scoring_shape, args)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["figures"] = figures_for(results)
    print_summary(results)
    write_results(args.json, results)
    shown = args.json.relative_to(ROOT) if args.json.is_relative_to(ROOT) else args.json
    print(f"wrote {shown} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
