"""Tiny models of the real architectures, built offline from the sample corpus, for the embedded default and tests.

Causal LMs of the students' architectures (Qwen3ForCausalLM for Qwen3-1.7B/4B, Qwen2ForCausalLM for
TinySwallow-1.5B, LlamaForCausalLM for sarashina2.2-3b) with a byte-level BPE tokenizer and any chat template, and an
XLMRobertaForSequenceClassification cross-encoder with one label (the architecture of bge-reranker-v2-m3). The
default `tiny` student is the Qwen3 one with the chat template Qwen3 ships (TRL's copy of it).

The students' weights are random. The cross-encoder starts random too, then is fine-tuned for ~15 s on the sample's
train-split teacher pairs, ranking each query's source above its character-bigram BM25 rivals: a random one scores
every pair alike, which leaves the hard-negative guard nothing to keep and re-ranking nothing to sort by. Seconds of
training on ~60 documents teach a model this small little about relevance: its scores differ from pair to pair, but
are still those of a tiny model. Whatever these models produce is marked as coming from tiny models.
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

from qc_assets.paths import SAMPLE_CORPUS, SAMPLE_TEACHER_LABELS

TINY_MARKER = "qc_tiny_model.json"
STUDENT_DIR = "tiny-qwen3-student"
CROSS_ENCODER_DIR = "tiny-xlmr-cross-encoder"
_SEED = 0
CROSS_ENCODER_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
# The cross-encoder marker's "recipe": a directory built by an older recipe (or, before fine-tuning, by none) is
# rebuilt. Bump it whenever the cross-encoder's build changes what it scores.
CROSS_ENCODER_RECIPE = 1
# Fine-tuning, sized to take ~15 s of a 2-core CPU: 4 epochs of the ~420 train-split queries, 16 a batch, each
# with its source and up to 3 rivals, cut to 128 tokens. A higher rate, or 8 a batch, can collapse the model to one
# score.
_FINE_TUNE_EPOCHS = 4
_FINE_TUNE_BATCH_SIZE = 16
_FINE_TUNE_LEARNING_RATE = 1e-3
_FINE_TUNE_MAX_LENGTH = 128


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


def _is_current(model_dir: Path, recipe: int | None) -> bool:
    """A tiny model whose marker names the recipe (None: any marker will do)."""
    if not is_tiny(model_dir):
        return False
    return recipe is None or json.loads((model_dir / TINY_MARKER).read_text(encoding="utf-8")).get("recipe") == recipe


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


def _mark(directory: Path, architecture: str, note: str, **fields: object) -> None:
    marker = {"tiny": True, "architecture": architecture, "note": note, **fields}
    (directory / TINY_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


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
    """A 2-layer XLM-R cross-encoder with one label, fine-tuned on the sample (see the module's docstring)."""
    tokenizer = _cross_encoder_tokenizer(texts, vocab_size)
    _random_cross_encoder(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    _fine_tune_cross_encoder(directory)
    _mark(
        directory,
        "XLMRobertaForSequenceClassification",
        "fine-tuned from random weights on the sample's train-split teacher pairs with character-bigram BM25 "
        "negatives: its scores are still those of a tiny model",
        recipe=CROSS_ENCODER_RECIPE,
    )
    return directory


def _cross_encoder_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bpe = _train_bpe(texts, vocab_size, CROSS_ENCODER_SPECIAL_TOKENS)
    bpe.post_processor = processors.RobertaProcessing(
        ("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")), add_prefix_space=False
    )
    return PreTrainedTokenizerFast(
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


def _random_cross_encoder(tokenizer):
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

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
        # Seconds of fine-tuning leave nothing to regularise, and attention dropout takes a slow path on CPU.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    # One output, the relevance score. num_labels is a property over id2label, not one of the config's fields.
    config.num_labels = 1
    torch.manual_seed(_SEED)
    return XLMRobertaForSequenceClassification(config)


def _fine_tune_cross_encoder(directory: Path) -> None:
    """Train the saved model to rank each train-split query's source above its BM25 rivals, and save it over
    itself in transformers' layout.

    LambdaLoss over (query, [source, rivals...]) lists rewards only how a query's documents compare, not which
    queries or documents score high in general. The token embeddings stay random and frozen, so that a token is
    only itself and what the layers learn is to compare the query's tokens with the document's, not the train
    documents' topics.
    """
    import tempfile

    from datasets import Dataset
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )
    from sentence_transformers.cross_encoder.losses import LambdaLoss
    from transformers import PrinterCallback

    lists = sample_training_lists()
    dataset = Dataset.from_dict(
        {
            "query": [query for query, _ in lists],
            "documents": [documents for _, documents in lists],
            "labels": [[1.0] + [0.0] * (len(documents) - 1) for _, documents in lists],
        }
    )
    model = CrossEncoder(str(directory), device="cpu", local_files_only=True, max_length=_FINE_TUNE_MAX_LENGTH)
    model.model.get_input_embeddings().requires_grad_(False)
    # The trainer wants an output directory even when it saves nothing; nothing of it should outlive training.
    with tempfile.TemporaryDirectory(prefix="qc-tiny-cross-encoder-") as scratch:
        args = CrossEncoderTrainingArguments(
            output_dir=scratch,
            num_train_epochs=_FINE_TUNE_EPOCHS,
            per_device_train_batch_size=_FINE_TUNE_BATCH_SIZE,
            learning_rate=_FINE_TUNE_LEARNING_RATE,
            warmup_steps=0.1,  # a share of the steps
            seed=_SEED,
            data_seed=_SEED,
            use_cpu=True,  # the same model on every machine, GPU or not
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
        )
        trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=LambdaLoss(model))
        trainer.remove_callback(PrinterCallback)  # which stands in for the progress bar and prints the metrics
        trainer.train()
    model.model.save_pretrained(directory)


def sample_training_lists() -> list[tuple[str, list[str]]]:
    """(query, [its source's text, then its rivals' texts]) for each train-split teacher pair that has a rival.

    The rivals are the query's best BM25 candidates among the train-split documents, up to the pipeline's default
    number of negatives per pair, skipping near duplicates of the source as the pipeline's hard-negative guard does.
    """
    from qc_assets.defs.scoring.lexical import ShardIndex, char_bigrams, lexical_checks
    from qc_assets.defs.scoring.negatives import jaccard

    per_pair, max_similarity = _negative_defaults()
    documents = {doc_id: text for doc_id, text in sample_documents().items() if not is_test_split(doc_id)}
    pairs = [(query, doc_id) for query, doc_id in sample_teacher_pairs() if doc_id in documents]
    bigrams = {doc_id: frozenset(char_bigrams(text)) for doc_id, text in documents.items()}
    # Enough candidates that the source and a near duplicate or two still leave per_pair of them.
    checks = lexical_checks(ShardIndex(list(documents), list(documents.values())), pairs, candidates=per_pair + 4)
    lists = []
    for (query, source), check in zip(pairs, checks, strict=True):
        rivals = [
            doc_id
            for doc_id in check.candidates
            if doc_id != source and jaccard(bigrams[doc_id], bigrams[source]) < max_similarity
        ][:per_pair]
        if rivals:
            lists.append((query, [documents[doc_id] for doc_id in (source, *rivals)]))
    return lists


def _negative_defaults() -> tuple[int, float]:
    """The pipeline's own hard-negative defaults: negatives per pair and the near-duplicate Jaccard bound."""
    from qc_assets.settings import Settings

    fields = Settings.model_fields
    return fields["negatives_per_pair"].default, fields["negatives_max_similarity"].default


def is_test_split(doc_id: str) -> bool:
    """Whether the document is in the SFT test split at the default test fraction (held out of every training)."""
    from qc_assets.defs.sft.dataset import is_test_document
    from qc_assets.settings import Settings

    return is_test_document(doc_id, Settings.model_fields["sft_test_fraction"].default)


def sample_documents() -> dict[str, str]:
    """doc_id -> text of the embedded sample corpus, in file order."""
    rows = (
        json.loads(line)
        for path in sorted(SAMPLE_CORPUS.glob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    )
    return {row["id"]: row["text"] for row in rows}


def sample_texts() -> list[str]:
    """The embedded sample corpus, which the tiny tokenizers are trained on."""
    return list(sample_documents().values())


def sample_teacher_pairs() -> list[tuple[str, str]]:
    """(query, doc_id) of the sample's handwritten teacher labels."""
    lines = SAMPLE_TEACHER_LABELS.read_text(encoding="utf-8").splitlines()
    return [(label["query"], label["doc_id"]) for label in (json.loads(line) for line in lines if line.strip())]


def ensure_tiny_models(models_dir: Path, texts: list[str], force: bool = False) -> dict[str, Path]:
    """Build whichever tiny model is missing or out of date (a directory counts once its marker, written last,
    exists; the cross-encoder's only if the marker names the current recipe)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models_dir / ".build.lock")):
        return _build_missing(models_dir, texts, force)


def _build_missing(models_dir: Path, texts: list[str], force: bool) -> dict[str, Path]:
    built = {}
    builders = (
        (STUDENT_DIR, build_tiny_student, None),
        (CROSS_ENCODER_DIR, build_tiny_cross_encoder, CROSS_ENCODER_RECIPE),
    )
    for name, builder, recipe in builders:
        target = models_dir / name
        if force or not _is_current(target, recipe):
            partial = models_dir / f".{name}.partial"
            if partial.exists():
                shutil.rmtree(partial)
            builder(partial, texts)
            if target.exists():
                shutil.rmtree(target)
            partial.rename(target)
        built[name] = target
    return built
