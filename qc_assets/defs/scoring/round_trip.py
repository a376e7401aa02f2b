"""The round trip, Promptagator's filter: does retrieval find a query's source document again?

The first stage is the shard's character-bigram BM25 (`lexical.py`): its best `candidates` documents for the
query go to the second stage, the configured cross-encoder, which re-ranks them; ties keep the first stage's order.
A pair passes when its source document is among the re-ranked `top_k`. A source document the first stage missed
has no re-ranked rank and does not pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qc_assets.defs.scoring.lexical import LexicalCheck


@dataclass(frozen=True)
class RoundTripSettings:
    candidates: int  # first-stage documents the cross-encoder re-ranks
    top_k: int  # a pair passes when its source document is re-ranked within these


@dataclass(frozen=True)
class RoundTrip:
    rerank_rank: int | None  # the source document's rank after re-ranking; None: not among the candidates
    passed: bool
    reranked: tuple[tuple[str, float], ...] = ()  # (doc_id, cross-encoder score) best first, when re-ranked


def scored_pairs(items: Sequence[tuple[str, str]], checks: Sequence[LexicalCheck]) -> list[tuple[str, str]]:
    """Every distinct (query, doc_id) the cross-encoder scores: each query with its source document and its
    first-stage candidates."""
    pairs = dict.fromkeys(
        pair
        for (query, source), check in zip(items, checks)
        for pair in [(query, source), *((query, candidate) for candidate in check.candidates)]
    )
    return list(pairs)


def round_trips(
    items: Sequence[tuple[str, str]],
    checks: Sequence[LexicalCheck],
    score: Callable[[str, str], float],
    settings: RoundTripSettings,
) -> list[RoundTrip]:
    """(query, source doc_id) with its first-stage check -> its round trip, in the order given; `score(query,
    doc_id)` is the cross-encoder's score of a pair from `scored_pairs`."""
    results = []
    for (query, source), check in zip(items, checks):
        candidates = check.candidates[: settings.candidates]
        if source not in candidates:
            results.append(RoundTrip(None, False))
            continue
        scores = [score(query, candidate) for candidate in candidates]
        order = sorted(range(len(candidates)), key=lambda position: (-scores[position], position))
        rank = 1 + order.index(candidates.index(source))
        reranked = tuple((candidates[position], scores[position]) for position in order)
        results.append(RoundTrip(rank, rank <= settings.top_k, reranked))
    return results
