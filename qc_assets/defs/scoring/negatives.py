"""Hard negatives for pairs that pass the round trip: the source's best-ranked rivals that are truly negative.

Taken in the re-ranked order ("top" sampling in sentence-transformers' `mine_hard_negatives`, whose guard this
matches), from the candidates the round trip already scored, so mining costs no model call. Two guards keep false
negatives out:

- too close: a candidate the cross-encoder scores above positive - |positive| * relative_margin (the reference's
  `relative_margin`) may well answer the query too;
- near duplicate: a candidate whose character bigrams overlap the positive's by Jaccard >= max_similarity is the
  same text with small edits, whatever a (possibly tiny, random) scorer says. Exact duplicates never get here: the
  corpus stage removes them.

Only candidates `eligible` for the source are considered: the scoring stage passes "in the source document's SFT
split", so the training pairs' train and test splits share no document, negatives included.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from qc_assets.defs.scoring.lexical import char_bigrams


@dataclass(frozen=True)
class NegativeSettings:
    per_pair: int
    relative_margin: float
    max_similarity: float


@dataclass(frozen=True)
class Negatives:
    doc_ids: tuple[str, ...]
    ranks: tuple[int, ...]  # each negative's rank among the re-ranked candidates (the positive's included)
    scores: tuple[float, ...]
    too_close: int  # candidates the score guard removed
    near_duplicates: int  # candidates the near-duplicate guard removed (and the score guard let through)


def bigram_sets(texts: Mapping[str, str]) -> Callable[[str], frozenset[str]]:
    """doc_id -> its set of character bigrams, each computed once (a shard's documents recur as candidates)."""
    cache: dict[str, frozenset[str]] = {}

    def bigrams(doc_id: str) -> frozenset[str]:
        if doc_id not in cache:
            cache[doc_id] = frozenset(char_bigrams(texts[doc_id]))
        return cache[doc_id]

    return bigrams


def jaccard(first: frozenset[str], second: frozenset[str]) -> float:
    union = first | second
    return len(first & second) / len(union) if union else 1.0


def mine(
    source: str,
    reranked: Sequence[tuple[str, float]],
    bigrams: Callable[[str], frozenset[str]],
    settings: NegativeSettings,
    eligible: Callable[[str], bool] = lambda doc_id: True,
) -> Negatives:
    """`reranked`: the candidates (doc_id, cross-encoder score) best first, the source among them."""
    positive = dict(reranked)[source]
    ceiling = positive - abs(positive) * settings.relative_margin
    kept: list[tuple[str, int, float]] = []
    too_close = near_duplicates = 0
    for rank, (doc_id, score) in enumerate(reranked, start=1):
        if doc_id == source or not eligible(doc_id):
            continue
        if score > ceiling:
            too_close += 1
        elif jaccard(bigrams(doc_id), bigrams(source)) >= settings.max_similarity:
            near_duplicates += 1
        elif len(kept) < settings.per_pair:
            kept.append((doc_id, rank, score))
    return Negatives(
        tuple(doc_id for doc_id, _, _ in kept),
        tuple(rank for _, rank, _ in kept),
        tuple(score for _, _, score in kept),
        too_close,
        near_duplicates,
    )
