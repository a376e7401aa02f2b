"""How much of a query is copied from its document: a query that repeats a phrase of its document scores high
with any reranker and teaches a retriever little (`alt_query` is meant to avoid the document's words)."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from difflib import SequenceMatcher


@dataclass(frozen=True)
class Copying:
    share: float  # the longest run of the query found verbatim in the document, as a share of the query (0..1)
    verbatim: bool  # the whole query appears in the document


def _normalised(text: str) -> str:
    return unicodedata.normalize("NFKC", text).strip()


def copying(query: str, document: str) -> Copying:
    """Compared after NFKC normalisation, as the corpus stage and the lexical check compare text."""
    query, document = _normalised(query), _normalised(document)
    if not query:
        return Copying(0.0, False)
    # autojunk off: its heuristic ignores characters frequent in a long document, which in Japanese are the very
    # particles and kana a copied phrase is made of.
    match = SequenceMatcher(None, query, document, autojunk=False).find_longest_match()
    return Copying(match.size / len(query), query in document)
