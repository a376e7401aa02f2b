"""Tiny models of the real architectures, built offline from the sample corpus, for the embedded default and tests.

A Qwen3ForCausalLM student base (the architecture of Qwen3-1.7B/4B) with a byte-level BPE tokenizer and a
Qwen3-style chat template, and an XLMRobertaForSequenceClassification cross-encoder with one label (the
architecture of bge-reranker-v2-m3). Their weights are random: whatever they produce is marked as coming from
tiny models, and their scores mean nothing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from filelock import FileLock

TINY_MARKER = "qc_tiny_model.json"
STUDENT_DIR = "tiny-qwen3-student"
CROSS_ENCODER_DIR = "tiny-xlmr-cross-encoder"
_SEED = 0

# Qwen3's template with thinking disabled: an empty think block after the assistant tag, at training and at
# generation alike. `{% generation %}` marks the assistant tokens so SFT can put the loss on them only.
STUDENT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}"
    "{%- generation -%}{{ message['content'] + '<|im_end|>' }}{%- endgeneration -%}{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
)
STUDENT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CROSS_ENCODER_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


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


def build_tiny_student(directory: Path, texts: list[str], vocab_size: int = 2000) -> Path:
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(texts, vocab_size, STUDENT_SPECIAL_TOKENS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=STUDENT_SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = STUDENT_CHAT_TEMPLATE
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention refuses head sizes below 32
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(_SEED)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    _mark(directory, "Qwen3ForCausalLM", "random weights, 2 layers of width 64: a stand-in for a real base model")
    return directory


def build_tiny_cross_encoder(directory: Path, texts: list[str], vocab_size: int = 2000) -> Path:
    import torch
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaForSequenceClassification

    bpe = _train_bpe(texts, vocab_size, CROSS_ENCODER_SPECIAL_TOKENS)
    bpe.post_processor = processors.RobertaProcessing(
        ("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")), add_prefix_space=False
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
        model_max_length=512,
    )
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=514,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(_SEED)
    XLMRobertaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    _mark(directory, "XLMRobertaForSequenceClassification", "random weights: its scores mean nothing")
    return directory


def sample_texts() -> list[str]:
    """The embedded sample corpus, which the tiny tokenizers are trained on."""
    from qc_assets.settings import SAMPLE_CORPUS

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
