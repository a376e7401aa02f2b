"""Neural query scorers: a cross-encoder judges how well a query fits its source document, 0..1.

`open_scorer` loads a sentence-transformers CrossEncoder with one output label (bge-reranker-v2-m3,
hotchpotch/japanese-reranker-*, the tiny XLM-R cross-encoder of qc_assets.models.tiny) and applies a sigmoid to
its logit, so every score lies in 0..1 whatever activation the checkpoint's own configuration names.

Pairs are scored longest first (by the characters of query plus document) in batches of `batch_size`, and the
scores are put back in the caller's order: batches of similar length pad little. On CUDA the model runs in
bfloat16, on CPU in float32.

The scorer's `name` is stored in every score row and is part of its key, so it names what changes the score: the
model and the max_length that truncates the pair. It defaults to f"{model}@{max_length}" for a hub id and to
f"{directory name}@{max_length}" for a local directory, so that a model under QC_DATA_DIR gives the same name
wherever QC_DATA_DIR is; two different local models in directories of the same name need an explicit `name`.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

_logger = logging.getLogger(__name__)
LOG_EVERY_S = 5.0


@runtime_checkable
class QueryScorer(Protocol):
    name: str

    def score(self, pairs: Sequence[tuple[str, str]], log: Callable[[str], None] = _logger.info) -> list[float]:
        """(query, document) pairs -> scores in 0..1, in the same order."""
        ...

    def close(self) -> None: ...


def scorer_name(model: str, max_length: int) -> str:
    """f"{model}@{max_length}", with a local directory named by its last component."""
    path = Path(model)
    label = path.resolve().name if path.is_dir() else model
    return f"{label}@{max_length}"


class CrossEncoderScorer:
    """A sentence-transformers CrossEncoder with one label, sigmoid on top."""

    def __init__(self, model: str, *, max_length: int, batch_size: int, name: str):
        import torch
        from sentence_transformers import CrossEncoder

        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be positive, got {batch_size} and {max_length}")
        self.name = name
        self.model_id = model
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self._activation = torch.nn.Sigmoid()
        self._model = CrossEncoder(
            model,
            max_length=max_length,
            device=self.device,
            model_kwargs={"dtype": dtype},
            activation_fn=self._activation,
        )
        if self._model.num_labels != 1:
            labels = self._model.num_labels
            self.close()
            raise ValueError(f"{model} has {labels} labels; a query scorer needs a cross-encoder with one")

    def score(self, pairs: Sequence[tuple[str, str]], log: Callable[[str], None] = _logger.info) -> list[float]:
        if self._model is None:
            raise RuntimeError(f"scorer {self.name} is closed")
        pairs = [(str(query), str(document)) for query, document in pairs]
        if not pairs:
            return []
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]), reverse=True)
        scores = [0.0] * len(pairs)
        started = last_log = time.monotonic()
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            predicted = self._model.predict(
                [pairs[i] for i in batch],
                batch_size=self.batch_size,
                show_progress_bar=False,
                activation_fn=self._activation,
                convert_to_numpy=True,
            )
            for i, value in zip(batch, predicted.tolist()):
                scores[i] = float(value)
            now = time.monotonic()
            done = start + len(batch)
            if now - last_log >= LOG_EVERY_S and done < len(order):
                log(f"{self.name}: {done}/{len(order)} pairs scored, {done / (now - started):.1f} pairs/s")
                last_log = now
        elapsed = time.monotonic() - started
        log(f"{self.name}: {len(order)} pairs scored in {elapsed:.1f}s ({len(order) / max(elapsed, 1e-9):.1f} pairs/s)")
        return scores

    def close(self) -> None:
        if getattr(self, "_model", None) is None:
            return
        self._model = None
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def __enter__(self) -> CrossEncoderScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_scorer(model: str, *, max_length: int = 512, batch_size: int = 32, name: str | None = None) -> QueryScorer:
    """Load `model` (hub id or local directory) as a cross-encoder scorer; see the module's docstring for `name`."""
    return CrossEncoderScorer(
        model, max_length=max_length, batch_size=batch_size, name=name or scorer_name(model, max_length)
    )
