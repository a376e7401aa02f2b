"""Tiny models of the real architectures, built offline from the sample corpus, for the embedded default and tests.

Causal LMs of the students' architectures (Qwen3ForCausalLM for Qwen3-1.7B/4B, Qwen2ForCausalLM for
TinySwallow-1.5B, LlamaForCausalLM for sarashina2.2-3b) with a byte-level BPE tokenizer and any chat template, and an
XLMRobertaForSequenceClassification cross-encoder with one label (the architecture of bge-reranker-v2-m3). The
default `tiny` student is the Qwen3 one with the chat template Qwen3 ships (TRL's copy of it). Their weights are
random: whatever they produce is marked as coming from tiny models, and their scores mean nothing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TypedDict

from filelock import FileLock

from qc_assets.paths import SAMPLE_CORPUS

TINY_MARKER = "qc_tiny_model.json"
STUDENT_DIR = "tiny-qwen3-student"
CROSS_ENCODER_DIR = "tiny-xlmr-cross-encoder"
_SEED = 0
CROSS_ENCODER_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


@dataclass(frozen=True)
class TinyChat:
    """A chat template and the special tokens it writes; eos, pad and bos must be among special_tokens."""

    template: str
    special_tokens: tuple[str, ...]
    eos_token: str
    pad_token: str
    bos_token: str | None = None


QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)


def trl_chat_template(name: str) -> str:
    """A chat template TRL ships (`trl/chat_templates/<name>.jinja`): byte for byte the model family's own."""
    return files("trl").joinpath("chat_templates", f"{name}.jinja").read_text(encoding="utf-8")


def qwen_chat(template_name: str = "qwen3") -> TinyChat:
    """Qwen's tokens (eos `<|im_end|>`, pad `<|endoftext|>`, no bos) with TRL's qwen3 or qwen2_5 template."""
    return TinyChat(
        trl_chat_template(template_name), QWEN_SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def llama3_chat(template: str | None = None) -> TinyChat:
    """Llama 3's tokens (eos `<|eot_id|>`, bos `<|begin_of_text|>`), TRL's llama3 template unless another is given."""
    return TinyChat(
        template or trl_chat_template("llama3"),
        LLAMA3_SPECIAL_TOKENS,
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        bos_token="<|begin_of_text|>",
    )


ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


class _TokenIds(TypedDict):
    eos_token_id: int | None
    pad_token_id: int | None
    bos_token_id: int | None


class _SharedConfig(_TokenIds):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    max_position_embeddings: int
    rms_norm_eps: float


def _config(architecture: str, vocab_size: int, token_ids: _TokenIds):
    """A 2-layer config of the architecture; head_dim 32 everywhere, since vLLM's CPU attention refuses less."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    shared: _SharedConfig = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        **token_ids,
    }
    if architecture == "qwen3":
        return Qwen3Config(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            **shared,
        )
    if architecture == "qwen2":  # TinySwallow: Qwen2 with q/k/v biases, tied embeddings; head_dim = 64 / 2
        return Qwen2Config(num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True, **shared)
    if architecture == "llama":  # sarashina2.2: untied embeddings
        return LlamaConfig(
            num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False, **shared
        )
    raise ValueError(f"unknown tiny architecture {architecture!r}: qwen3, qwen2 or llama")


def is_tiny(model_dir: Path) -> bool:
    return (Path(model_dir) / TINY_MARKER).is_file()


def _train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _mark(directory: Path, architecture: str, note: str) -> None:
    (directory / TINY_MARKER).write_text(
        json.dumps({"tiny": True, "architecture": architecture, "note": note}, indent=2) + "\n", encoding="utf-8"
    )


def build_tiny_causal_lm(
    directory: Path, texts: list[str], architecture: str, chat: TinyChat, vocab_size: int = 2000
) -> Path:
    """A random-weight causal LM of the architecture ("qwen3", "qwen2", "llama") with the chat's template and tokens."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    roles = {"eos_token": chat.eos_token, "pad_token": chat.pad_token, "bos_token": chat.bos_token}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(texts, vocab_size, list(chat.special_tokens)),
        additional_special_tokens=[token for token in chat.special_tokens if token not in roles.values()],
        **{role: token for role, token in roles.items() if token is not None},
    )
    tokenizer.chat_template = chat.template
    config = _config(
        architecture,
        len(tokenizer),
        {
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        },
    )
    torch.manual_seed(_SEED)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    _mark(
        directory, ARCHITECTURES[architecture], "random weights, 2 layers of width 64: a stand-in for a real base model"
    )
    return directory


def build_tiny_student(directory: Path, texts: list[str], vocab_size: int = 2000) -> Path:
    """The default `tiny` student: a Qwen3 with Qwen3's own chat template (no generation marks)."""
    return build_tiny_causal_lm(directory, texts, "qwen3", qwen_chat("qwen3"), vocab_size)


def build_tiny_cross_encoder(directory: Path, texts: list[str], vocab_size: int = 2000) -> Path:
    import torch
    from tokenizers import processors
    from transformers import (
        PreTrainedTokenizerFast,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
    )

    bpe = _train_bpe(texts, vocab_size, CROSS_ENCODER_SPECIAL_TOKENS)
    bpe.post_processor = processors.RobertaProcessing(
        ("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")), add_prefix_space=False
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=512,
    )
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=514,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # One output, the relevance score. num_labels is a property over id2label, not one of the config's fields.
    config.num_labels = 1
    torch.manual_seed(_SEED)
    XLMRobertaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    _mark(directory, "XLMRobertaForSequenceClassification", "random weights: its scores mean nothing")
    return directory


def sample_texts() -> list[str]:
    """The embedded sample corpus, which the tiny tokenizers are trained on."""
    return [
        json.loads(line)["text"]
        for path in sorted(SAMPLE_CORPUS.glob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def ensure_tiny_models(models_dir: Path, texts: list[str], force: bool = False) -> dict[str, Path]:
    """Build whichever tiny model is missing (a directory counts once its marker, written last, exists)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models_dir / ".build.lock")):
        return _build_missing(models_dir, texts, force)


def _build_missing(models_dir: Path, texts: list[str], force: bool) -> dict[str, Path]:
    built = {}
    for name, builder in ((STUDENT_DIR, build_tiny_student), (CROSS_ENCODER_DIR, build_tiny_cross_encoder)):
        target = models_dir / name
        if force or not is_tiny(target):
            partial = models_dir / f".{name}.partial"
            if partial.exists():
                shutil.rmtree(partial)
            builder(partial, texts)
            if target.exists():
                shutil.rmtree(target)
            partial.rename(target)
        built[name] = target
    return built
