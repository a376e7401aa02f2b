"""Every user-facing setting, read from `QC_*` environment variables and checked once at start-up.

The README's settings table lists the same variables; a wrong value fails here with the variable's name,
before Dagster loads anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from qc_assets.defs.teacher.prices import UtcWindow
from qc_assets.lake.sql import catalog_parts
from qc_assets.paths import SAMPLE_CORPUS, SAMPLE_TEACHER_LABELS

ENV_PREFIX = "QC_"
SEED_STUDENT_BASE_MODELS = (
    "Qwen/Qwen3-1.7B",
    "Qwen/Qwen3-4B",
    "sbintuitions/sarashina2.2-3b-instruct-v0.1",
    "SakanaAI/TinySwallow-1.5B-Instruct",
)
TINY_STUDENT = "tiny"
DEFAULT_OPENAI_TEACHER_MODEL = "deepseek-v4-flash"


class SettingsError(ValueError):
    """A `QC_*` variable holds a value the project cannot use."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = Field(
        default=Path("data"), description="Where everything the pipeline writes goes (lake, Dagster home)."
    )
    corpus_source: str = Field(
        default=str(SAMPLE_CORPUS),
        description="A local directory, glob or file of parquet/jsonl shards, or `hf:<dataset name>`.",
    )
    corpus_config: str | None = Field(default=None, description="Hugging Face dataset config (hf: sources).")
    corpus_split: str = Field(default="train", description="Hugging Face dataset split (hf: sources).")
    corpus_text_column: str = Field(default="text", description="Column holding the document text.")
    corpus_id_column: str = Field(default="id", description="Column holding the document id.")
    corpus_min_chars: int = Field(default=100, ge=1, description="Shorter cleaned texts are dropped.")
    corpus_max_chars: int = Field(default=2000, ge=1, description="Longer cleaned texts are dropped.")
    lake_catalog: str | None = Field(
        default=None,
        description="DuckLake catalog; default `sqlite:<data_dir>/lake/catalog.sqlite`, or `postgres:<libpq dsn>`.",
    )
    lake_data_path: str | None = Field(
        default=None, description="DuckLake data files; default `<data_dir>/lake/files/`, or `s3://bucket/prefix/`."
    )

    teacher_backend: Literal["replay", "openai"] = Field(
        default="replay",
        description="`openai`: any OpenAI-compatible endpoint (DeepSeek's API, vLLM, SGLang, Ollama); "
        "`replay`: import existing labels.",
    )
    teacher_base_url: str = Field(default="https://api.deepseek.com", description="Chat-completions endpoint (openai).")
    teacher_model: str | None = Field(
        default=None,
        description=f"Teacher model, stored in every label's key; default `{DEFAULT_OPENAI_TEACHER_MODEL}` (openai) "
        "or the replay source's name (replay).",
    )
    teacher_thinking: Literal["enabled", "disabled"] | None = Field(
        default=None, description="Turn the model's thinking on or off (openai); unset: the endpoint's default."
    )
    teacher_reasoning_effort: str | None = Field(
        default=None, description="`reasoning_effort` sent as given, e.g. `high` or `max` (openai); unset: not sent."
    )
    teacher_response_format: Literal["json_schema", "json_object", "none"] | None = Field(
        default=None,
        description="Structured output (openai): each category's JSON schema, any JSON object, or none; "
        "unset: `json_object` for api.deepseek.com, `none` elsewhere.",
    )
    teacher_window: str | None = Field(
        default=None,
        description="UTC window of the discount schedule, like `16:30-00:30`; unset: the price entry's off-peak "
        "window, if it has one.",
    )
    teacher_api_key: SecretStr | None = Field(default=None, description="API key (openai); never logged or stored.")
    teacher_concurrency: int = Field(default=100, ge=1, le=2000, description="Requests in flight at most.")
    teacher_max_attempts: int = Field(default=6, ge=1, le=50, description="Attempts per key before quarantine.")
    teacher_timeout_s: float = Field(
        default=600.0, gt=0, description="Per-request timeout; a thinking model can take minutes."
    )
    teacher_backoff_s: float = Field(
        default=1.0, ge=0, description="Longest wait before the first retry; doubles per attempt, with jitter."
    )
    teacher_max_tokens: int = Field(default=8192, ge=16, description="Completion cap, reasoning included.")
    teacher_price: str | None = Field(
        default=None,
        description="A price table entry (see `qc_assets/defs/teacher/prices.py`) or "
        "`input=<usd>,output=<usd>[,cached=<usd>]` per million tokens; default by model.",
    )
    teacher_max_usd: float | None = Field(default=None, gt=0, description="Hard spend cap per run, in USD.")
    teacher_batch_size: int = Field(default=256, ge=1, description="Labels per lake write while labelling.")
    teacher_flush_seconds: float = Field(
        default=5.0, gt=0, description="Longest wait before buffered labels are written."
    )
    teacher_replay_source: str = Field(
        default=str(SAMPLE_TEACHER_LABELS),
        description="Labels to import (replay): a parquet/jsonl file or `hf:<dataset name>`.",
    )
    teacher_replay_columns: str = Field(
        default="doc_id=doc_id,category=category,query=query",
        description="How the replay source's columns map: `doc_id` or `text`, then `category` and `query` "
        "(long format) or one `<category>=<column>` per category (wide); optional `reasoning`.",
    )
    teacher_replay_split: str = Field(default="train", description="Split of an hf: replay source.")

    sft_test_fraction: float = Field(
        default=0.1, gt=0, lt=1, description="Share of documents in the test split (by a hash of doc_id)."
    )
    sft_hub_repo: str | None = Field(default=None, description="Push the SFT dataset to this Hugging Face repo.")
    hf_token: SecretStr | None = Field(default=None, description="Hugging Face token for pushes; never logged.")
    student_base_models: str = Field(
        default=",".join(SEED_STUDENT_BASE_MODELS),
        description="Comma-separated base models to fine-tune (hub ids, local paths, or `tiny`); one partition each.",
    )
    student_method: Literal["full", "lora"] = Field(default="full", description="Full fine-tuning or LoRA (merged).")
    student_max_steps: int | None = Field(
        default=None, ge=1, description="Optimizer steps; default: QC_STUDENT_EPOCHS (30 steps for `tiny`)."
    )
    student_epochs: float = Field(default=1.0, gt=0, description="Epochs when QC_STUDENT_MAX_STEPS is unset.")
    student_learning_rate: float | None = Field(
        default=None, gt=0, description="Default 1e-5 (full), 2e-4 (LoRA), 3e-3 (`tiny`)."
    )
    student_batch_size: int = Field(
        default=8,
        ge=1,
        description="Per-device batch size; smaller (more accumulation) where the memory plan needs it.",
    )
    student_gradient_accumulation: int = Field(default=4, ge=1, description="Gradient accumulation steps.")
    student_max_length: int = Field(default=2048, ge=32, description="Tokens per example; longer ones are cut.")
    student_lora_r: int = Field(default=16, ge=1, description="LoRA rank (QC_STUDENT_METHOD=lora).")
    student_optimizer: str = Field(
        default="adamw_torch_fused",
        min_length=1,
        description="A transformers `optim` name; the memory plan counts 8 bytes per trained parameter, 2 for 8-bit ones.",
    )
    student_save_steps: int = Field(
        default=500, ge=1, description="Optimizer steps between resumable training states (killed runs resume there)."
    )
    student_memory_limit_gib: float | None = Field(
        default=None,
        gt=0,
        description="Accelerator memory the training plan must fit; default the GPU's (no check on CPU).",
    )

    gpu_slots: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Steps that use the GPU (training, local generation, scoring) at once across all runs: the "
        "limit of Dagster's `gpu` pool. One per GPU.",
    )
    generation_backend: Literal["transformers", "vllm", "openai"] = Field(
        default="transformers",
        description="`transformers` (batched generate; the CPU default), `vllm` (in-process, GPUs), "
        "`openai` (a running `vllm serve` or any OpenAI-compatible server).",
    )
    generation_base_url: str | None = Field(default=None, description="Server for the `openai` generation backend.")
    generation_batch_size: int = Field(default=64, ge=1, description="Prompts per generate call.")
    generation_max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Answer cap in tokens for every category; default per category: twice its character cap plus 8.",
    )
    generation_max_empty_rate: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Share of empty generated queries (per checkpoint and category) above which the "
        "`empty_queries` check fails and blocks scoring.",
    )
    generation_temperature: float = Field(default=0.0, ge=0, description="0 is greedy.")
    scorer_model: str = Field(
        default="BAAI/bge-reranker-v2-m3",
        description="Cross-encoder for reranker scores: a hub id, a local directory, or `tiny`.",
    )
    scorer_max_length: int = Field(default=512, ge=16, description="Tokens per (query, document) pair.")
    scorer_batch_size: int = Field(default=32, ge=1, description="Pairs per forward pass.")
    round_trip_candidates: int = Field(
        default=20,
        ge=1,
        description="Round trip: the first stage's (character-bigram BM25's) best documents per query that the "
        "cross-encoder re-ranks; each costs one more scored pair.",
    )
    round_trip_top_k: int = Field(
        default=1,
        ge=1,
        description="Round trip: a (query, document) pair passes when the re-ranked candidates put its document "
        "within this rank.",
    )

    @model_validator(mode="after")
    def _length_window_is_not_empty(self) -> Settings:
        if self.corpus_min_chars > self.corpus_max_chars:
            raise ValueError(
                f"QC_CORPUS_MIN_CHARS ({self.corpus_min_chars}) is larger than QC_CORPUS_MAX_CHARS ({self.corpus_max_chars})"
            )
        return self

    @field_validator("lake_catalog")
    @classmethod
    def _catalog_kind_is_known(cls, value: str | None) -> str | None:
        if value is not None:
            catalog_parts(value)
        return value

    @field_validator("teacher_window")
    @classmethod
    def _window_parses(cls, value: str | None) -> str | None:
        if value is not None:
            UtcWindow.parse(value)
        return value

    round_trip_max_gap: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="The report's `round_trip_vs_teacher` check warns when a checkpoint's round-trip pass rate is "
        "below the teacher's by more than this.",
    )
    negatives_per_pair: int = Field(
        default=3, ge=0, description="Hard negatives kept per pair that passes the round trip."
    )
    negatives_relative_margin: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="A candidate the cross-encoder scores above positive - |positive| * this is too close to be a "
        "negative (sentence-transformers' `relative_margin`).",
    )
    negatives_max_similarity: float = Field(
        default=0.8,
        ge=0,
        le=1,
        description="A candidate whose character bigrams overlap the positive's by at least this Jaccard is a near "
        "duplicate, never a negative.",
    )
    score_teacher_train_split: bool = Field(
        default=True,
        description="Score the teacher's labels of train-split documents too (round trip, hard negatives): the "
        "training pairs' train split. The report compares sources on the test split either way.",
    )
    training_pairs_hub_repo: str | None = Field(
        default=None,
        description="Push each new version of the training pairs to this Hugging Face dataset repo, one config per "
        "source.",
    )

    @model_validator(mode="after")
    def _round_trip_top_k_is_within_the_candidates(self) -> Settings:
        if self.round_trip_top_k > self.round_trip_candidates:
            raise ValueError(
                f"QC_ROUND_TRIP_TOP_K ({self.round_trip_top_k}) is larger than QC_ROUND_TRIP_CANDIDATES "
                f"({self.round_trip_candidates}): no pair could pass beyond the candidates"
            )
        return self

    @model_validator(mode="after")
    def _student_models_are_named(self) -> Settings:
        if not self.student_models:
            raise ValueError("QC_STUDENT_BASE_MODELS names no model")
        return self

    @property
    def data_root(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def dagster_home(self) -> Path:
        return self.data_root / "dagster"

    @property
    def student_models(self) -> list[str]:
        return [model.strip() for model in self.student_base_models.split(",") if model.strip()]

    @property
    def teacher_dir(self) -> Path:
        return self.data_root / "teacher"

    @property
    def catalog(self) -> str:
        return self.lake_catalog or f"sqlite:{self.data_root / 'lake' / 'catalog.sqlite'}"

    @property
    def data_path(self) -> str:
        return self.lake_data_path or f"{self.data_root / 'lake' / 'files'}/"


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Read the settings, turning pydantic's field-level errors into messages that name the variable."""
    source = os.environ if environ is None else environ
    known = {env_name(name): name for name in Settings.model_fields}
    unknown = sorted(key for key in source if key.startswith(ENV_PREFIX) and key not in known)
    if unknown:
        raise SettingsError(f"unknown setting {', '.join(unknown)}; the known ones are {', '.join(sorted(known))}")
    values = {name: source[key] for key, name in known.items() if key in source and source[key] != ""}
    try:
        return Settings.model_validate(values)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            message = item["msg"].removeprefix("Value error, ")
            if not item["loc"]:
                problems.append(message)
                continue
            variable = env_name(str(item["loc"][0]))
            given = f" (got {source[variable]!r})" if variable in source else ""
            problems.append(f"{variable}{given}: {message}")
        raise SettingsError("invalid setting: " + "; ".join(problems)) from None
