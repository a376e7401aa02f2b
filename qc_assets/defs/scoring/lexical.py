"""A lexical check on generated queries: character-bigram BM25 over one shard, with no model.

Japanese has no spaces, so the terms are overlapping character bigrams of the NFKC-normalised, lower-cased
text with whitespace, punctuation and invisible control/format characters dropped. For a (query, source
document) pair the check gives two numbers:

- overlap: the share of the query's distinct bigrams that occur in the source document (0..1). A query that
  copies the document scores near 1; a paraphrase with no shared bigram scores 0.
- rank: where the source document ranks among the shard's documents by BM25 for the query (1 = first).
  Ties count only documents with a strictly higher score. A source document that shares no bigram with the
  query (an empty query included) gets the last rank, len(index): with no lexical evidence it ranks nowhere,
  where the strict-ties rule would put every document of the shard first when nothing matches. In a
  single-document shard that last rank is 1.

BM25 is Lucene's variant (as Lucene >= 8 and bm25s's default "lucene" method): for each distinct query term t
that a document d contains, idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl)), with
idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)), always positive, so a score is 0 exactly when the document
shares no bigram with the query. A query's repeated bigrams count once.

The index is written with numpy rather than a BM25 library. bm25s, the obvious candidate, takes Python lists
of tokens and builds its index in Python loops over every token: on a 100,000-document shard of ~1,000
characters (100M bigram tokens, 2 CPU cores) the token lists alone took 70 s and 8 GB to build, bm25s's index
47 s more, 9.8 GB at peak, where this index takes 6-20 s and 1-2 GB.
Here tokenisation, counting and placement are array operations over chunks of documents: codepoints come from
one NFKC pass over a chunk's joined text, a bigram is the integer key a * 0x110001 + b, and sorting the
(term, document) keys counts them (np.sort, not np.unique, whose hash path in numpy 2.4 is far slower on
int64). Each chunk is tokenised once and kept in 8 bytes a pair until every chunk is placed.

Postings are term-major: for each term, the sorted numbers of the documents that contain it and their
precomputed BM25 weights (int32 + float32). A term in at least half of the shard's documents (particles and
endings: "ます", "して"...) is a dense float32 row over the shard instead, never bigger than its postings
and summed without a scatter. Scoring a query is a np.bincount over its rare terms' postings plus a sum of its
common terms' rows.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A bigram (a, b) of codepoints is the key a * _BASE + b; a one-character text's single term is a * _BASE + _UNI.
_UNI = 0x110000
_BASE = 0x110001
_SEP = "\x00"  # joins a chunk's texts; dropped like other control characters
_CHUNK_DOCS = 8192  # documents per chunk while indexing: the local document number takes _DOC_BITS bits
_DOC_BITS = 13
_CHUNK_CHARS = 8_000_000  # and at most about this many characters per chunk, to bound transient memory


def _dropped(char: str) -> bool:
    category = unicodedata.category(char)
    return category[0] in "PZ" or category in ("Cc", "Cf")


@functools.cache
def _bmp_drop_table() -> np.ndarray:
    """Whether each BMP codepoint is dropped (whitespace, punctuation, control, format); astral ones are looked up."""
    return np.fromiter((_dropped(chr(cp)) for cp in range(0x10000)), dtype=bool, count=0x10000)


def _sorted_unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values, sorted, and how often each occurs. Sort-based: numpy 2.4's np.unique takes a hash path
    for integers that is tens of times slower on millions of int64 keys."""
    values = np.sort(values)
    if len(values) == 0:
        return values, np.zeros(0, dtype=np.int64)
    first = np.ones(len(values), dtype=bool)
    first[1:] = values[1:] != values[:-1]
    starts = np.flatnonzero(first)
    return values[starts], np.diff(np.append(starts, len(values)))


def _keep_mask(cps: np.ndarray) -> np.ndarray:
    table = _bmp_drop_table()
    astral = cps >= 0x10000
    if not astral.any():
        return ~table[cps]
    drop = np.zeros(len(cps), dtype=bool)
    drop[~astral] = table[cps[~astral]]
    distinct = _sorted_unique(cps[astral])[0]
    distinct_drop = np.fromiter((_dropped(chr(int(cp))) for cp in distinct), dtype=bool, count=len(distinct))
    drop[astral] = distinct_drop[np.searchsorted(distinct, cps[astral])]
    return ~drop


def _normalised_codepoints(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Kept codepoints of the normalised texts, and the position in `texts` each one comes from.

    NFKC over the joined text equals the join of each text's NFKC: the separator is a starter that composes with
    nothing, so no normalisation crosses it.
    """
    joined = _SEP.join(text.replace(_SEP, "") for text in texts)
    normalised = unicodedata.normalize("NFKC", joined).lower()
    cps = np.frombuffer(normalised.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    doc = np.cumsum(cps == 0, dtype=np.int64)
    keep = _keep_mask(cps)
    return cps[keep].astype(np.int64), doc[keep]


def _term_keys(cps: np.ndarray, doc: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(term keys, their document, terms per document) for kept codepoints grouped by document."""
    same = doc[:-1] == doc[1:]
    keys = cps[:-1][same] * _BASE + cps[1:][same]
    key_doc = doc[:-1][same]
    chars = np.bincount(doc, minlength=n_docs)
    single = chars[doc] == 1
    if single.any():
        keys = np.concatenate([keys, cps[single] * _BASE + _UNI])
        key_doc = np.concatenate([key_doc, doc[single]])
    lengths = np.where(chars == 1, 1, np.maximum(chars - 1, 0))
    return keys, key_doc, lengths


def _query_keys(queries: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every query's distinct term keys, sorted, one query after another, and where each query's keys start (with
    the end as a last bound). All queries are tokenised in one pass: a pass per query cost more in numpy's per-call
    overhead than in the work, thousands of queries a shard."""
    cps, doc = _normalised_codepoints(queries)
    keys, key_doc, _ = _term_keys(cps, doc, len(queries))
    order = np.lexsort((keys, key_doc))
    keys, key_doc = keys[order], key_doc[order]
    distinct = np.ones(len(keys), dtype=bool)
    distinct[1:] = (keys[1:] != keys[:-1]) | (key_doc[1:] != key_doc[:-1])
    keys, key_doc = keys[distinct], key_doc[distinct]
    return keys, np.searchsorted(key_doc, np.arange(len(queries) + 1))


def char_bigrams(text: str) -> list[str]:
    """NFKC-normalise, lower-case, drop whitespace, punctuation and control/format characters, then overlapping
    2-grams. A text left with one character gives that character; one left empty gives []."""
    cps, _ = _normalised_codepoints([text])
    kept = cps.astype(np.uint32).tobytes().decode("utf-32-le", "surrogatepass")
    if len(kept) == 1:
        return [kept]
    return [kept[i : i + 2] for i in range(len(kept) - 1)]


def _chunks(texts: Sequence[str]):
    start = 0
    while start < len(texts):
        end, chars = start, 0
        while end < len(texts) and end - start < _CHUNK_DOCS and (end == start or chars < _CHUNK_CHARS):
            chars += len(texts[end])
            end += 1
        yield start, end
        start = end


class _Chunk:
    """One chunk's distinct (term, document) pairs, sorted by term then document, in 8 bytes a pair."""

    __slots__ = ("vocab", "df", "local_term", "doc", "tf", "lengths")

    def __init__(self, texts: Sequence[str]):
        cps, doc = _normalised_codepoints(texts)
        keys, key_doc, self.lengths = _term_keys(cps, doc, len(texts))
        del cps, doc
        pairs, tf = _sorted_unique((keys << _DOC_BITS) | key_doc)
        del keys, key_doc
        pair_keys = pairs >> _DOC_BITS
        first = np.ones(len(pairs), dtype=bool)
        first[1:] = pair_keys[1:] != pair_keys[:-1]
        starts = np.flatnonzero(first)
        self.vocab = pair_keys[starts]
        self.df = np.diff(np.append(starts, len(pairs)))
        self.local_term = (np.cumsum(first) - 1).astype(np.int32)
        self.doc = (pairs & ((1 << _DOC_BITS) - 1)).astype(np.uint16)
        # BM25 saturates in tf: a count clipped at 65,535 changes a weight by less than 1e-4 of itself.
        self.tf = np.minimum(tf, 0xFFFF).astype(np.uint16)


class ShardIndex:
    """Character-bigram BM25 over one shard's documents (see the module's docstring)."""

    def __init__(self, doc_ids: Sequence[str], texts: Sequence[str], k1: float = 1.2, b: float = 0.75):
        if len(doc_ids) != len(texts):
            raise ValueError(f"{len(doc_ids)} doc_ids for {len(texts)} texts")
        self._set_documents(doc_ids, k1, b)
        n = len(self.doc_ids)

        # Pass 1: tokenise each chunk once, keeping its pairs compactly; the shard's vocabulary and frequencies.
        chunks: list[tuple[int, _Chunk]] = []
        lengths = np.zeros(n, dtype=np.int64)
        for start, end in _chunks(texts):
            chunk = _Chunk(texts[start:end])
            lengths[start:end] = chunk.lengths
            chunks.append((start, chunk))
        if chunks:
            self._vocab = _sorted_unique(np.concatenate([chunk.vocab for _, chunk in chunks]))[0]
        else:
            self._vocab = np.zeros(0, dtype=np.int64)
        vocab_size = len(self._vocab)
        df = np.zeros(vocab_size, dtype=np.int64)
        for _, chunk in chunks:
            chunk.vocab = np.searchsorted(self._vocab, chunk.vocab)  # now the chunk's term numbers in the shard
            df[chunk.vocab] += chunk.df
        self.idf = np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)
        self.doc_lengths = lengths
        avgdl = float(lengths.mean()) if n and lengths.mean() > 0 else 1.0
        norm = (self.k1 * (1.0 - self.b + self.b * lengths / avgdl)).astype(np.float32)

        # Which terms are dense rows, which sparse postings.
        dense = (2 * df >= n) & (df > 0)
        self._dense_row = np.full(vocab_size, -1, dtype=np.int64)
        self._dense_row[dense] = np.arange(int(dense.sum()))
        self._dense = np.zeros((int(dense.sum()), n), dtype=np.float32)
        self._indptr = np.zeros(vocab_size + 1, dtype=np.int64)
        np.cumsum(np.where(dense, 0, df), out=self._indptr[1:])

        # Pass 2: place each chunk's pairs, releasing the chunk as it goes. Chunks come in document order and each
        # is sorted by term then document, so every term's postings end up sorted by document.
        nnz = int(self._indptr[-1])
        self._docs = np.empty(nnz, dtype=np.int32)
        self._weights = np.empty(nnz, dtype=np.float32)
        fill = self._indptr[:-1].copy()
        chunks.reverse()
        while chunks:
            start, chunk = chunks.pop()
            term = chunk.vocab[chunk.local_term]
            docs = chunk.doc.astype(np.int64) + start
            tf = chunk.tf.astype(np.float32)
            weights = self.idf[term] * tf / (tf + norm[docs])
            del chunk, tf
            row = self._dense_row[term]
            in_dense = row >= 0
            self._dense[row[in_dense], docs[in_dense]] = weights[in_dense]
            term, docs, weights = term[~in_dense], docs[~in_dense], weights[~in_dense]
            if len(term) == 0:
                continue
            first = np.ones(len(term), dtype=bool)
            first[1:] = term[1:] != term[:-1]
            group_start = np.maximum.accumulate(np.where(first, np.arange(len(term)), 0))
            position = fill[term] + (np.arange(len(term)) - group_start)
            fill += np.bincount(term, minlength=vocab_size)
            self._docs[position] = docs
            self._weights[position] = weights

    def _set_documents(self, doc_ids: Sequence[str], k1: float, b: float) -> None:
        self.doc_ids = list(doc_ids)
        self._row = {doc_id: row for row, doc_id in enumerate(self.doc_ids)}
        if len(self._row) != len(self.doc_ids):
            raise ValueError("doc_ids are not unique")
        self.k1, self.b = float(k1), float(b)

    _ARRAYS = ("_vocab", "idf", "doc_lengths", "_dense_row", "_dense", "_indptr", "_docs", "_weights")
    _META = "index.json"

    def save(self, directory: Path) -> None:
        """One .npy file per array and the documents' ids, in a new directory."""
        directory.mkdir(parents=True)
        for name in self._ARRAYS:
            np.save(directory / f"{name.lstrip('_')}.npy", getattr(self, name))
        meta = {"k1": self.k1, "b": self.b, "doc_ids": self.doc_ids}
        (directory / self._META).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> ShardIndex:
        """A saved index with its arrays memory-mapped: loading reads the ids, the pages come as queries need them."""
        meta = json.loads((directory / cls._META).read_text(encoding="utf-8"))
        index = cls.__new__(cls)
        index._set_documents(meta["doc_ids"], meta["k1"], meta["b"])
        for name in cls._ARRAYS:
            setattr(index, name, np.load(directory / f"{name.lstrip('_')}.npy", mmap_mode="r"))
        return index

    @classmethod
    def is_saved(cls, directory: Path) -> bool:
        return (directory / cls._META).is_file()

    def __len__(self) -> int:
        return len(self.doc_ids)

    @property
    def nbytes(self) -> int:
        """Memory held by the index arrays (not the doc_id list and its dict)."""
        arrays = (
            self._vocab,
            self._indptr,
            self._docs,
            self._weights,
            self._dense,
            self._dense_row,
            self.idf,
            self.doc_lengths,
        )
        return sum(array.nbytes for array in arrays)

    def _row_of(self, doc_id: str) -> int:
        try:
            return self._row[doc_id]
        except KeyError:
            raise KeyError(f"document {doc_id!r} is not in this shard index") from None

    def _terms(self, queries: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """For each query: (dense rows, sparse term numbers) of its distinct bigrams present in the shard, and the
        count of its distinct bigrams, present or not."""
        keys, bounds = _query_keys(queries)
        position = np.searchsorted(self._vocab, keys)
        found = position < len(self._vocab)
        found[found] = self._vocab[position[found]] == keys[found]
        absent = -2  # neither a dense row (>= 0) nor sparse (-1)
        rows = np.full(len(keys), absent, dtype=np.int64)
        rows[found] = self._dense_row[position[found]]
        terms = []
        for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            query_rows, query_positions = rows[start:end], position[start:end]
            terms.append((query_rows[query_rows >= 0], query_positions[query_rows == -1], end - start))
        return terms

    def _postings(self, terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(terms) == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        starts, ends = self._indptr[terms], self._indptr[terms + 1]
        docs = np.concatenate([self._docs[s:e] for s, e in zip(starts, ends)])
        weights = np.concatenate([self._weights[s:e] for s, e in zip(starts, ends)])
        return docs, weights

    def _scores(self, dense_rows: np.ndarray, sparse_docs: np.ndarray, sparse_weights: np.ndarray) -> np.ndarray:
        scores = np.bincount(sparse_docs, weights=sparse_weights, minlength=len(self)).astype(np.float64, copy=False)
        if len(dense_rows):
            scores += self._dense[dense_rows].sum(axis=0, dtype=np.float64)
        return scores

    def _hits(self, dense_rows: np.ndarray, sparse_docs: np.ndarray, row: int) -> int:
        """How many of the query's terms the document contains (a term lists a document at most once)."""
        return int(np.count_nonzero(self._dense[dense_rows, row] > 0)) + int(np.count_nonzero(sparse_docs == row))

    def bm25_scores(self, query: str) -> np.ndarray:
        """BM25 score of every document of the shard for the query (float64, in doc_ids order)."""
        dense_rows, sparse_terms, _ = self._terms([query])[0]
        return self._scores(dense_rows, *self._postings(sparse_terms))

    def overlap(self, query: str, doc_id: str) -> float:
        """Share of the query's distinct bigrams that occur in the document (0 for a query with none)."""
        row = self._row_of(doc_id)
        dense_rows, sparse_terms, distinct = self._terms([query])[0]
        if distinct == 0:
            return 0.0
        hits = int(np.count_nonzero(self._dense[dense_rows, row] > 0))
        for term in sparse_terms:
            postings = self._docs[self._indptr[term] : self._indptr[term + 1]]
            at = np.searchsorted(postings, row)
            hits += bool(at < len(postings) and postings[at] == row)
        return hits / distinct

    def rank_of(self, query: str, doc_id: str) -> int:
        """1 + the number of documents scoring strictly higher; len(self) when the document scores 0."""
        return _rank(self.bm25_scores(query), self._row_of(doc_id))


def _rank(scores: np.ndarray, row: int) -> int:
    score = scores[row]
    if score <= 0:
        return len(scores)
    return 1 + int(np.count_nonzero(scores > score))


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """The rows of the `n` best-scoring documents with a score above 0, best first, ties in document order."""
    positive = np.flatnonzero(scores > 0)
    if len(positive) > n:
        positive = positive[np.argpartition(-scores[positive], n - 1)[:n]]
        # argpartition leaves ties at the boundary arbitrary: keep the lowest rows among those tied with the n-th.
        cutoff = scores[positive].min()
        above, tied = np.flatnonzero(scores > cutoff), np.flatnonzero(scores == cutoff)
        positive = np.concatenate([above, tied[: n - len(above)]])
    return positive[np.lexsort((positive, -scores[positive]))]


@dataclass(frozen=True)
class LexicalCheck:
    overlap: float  # share of the query's distinct bigrams found in its source document
    rank: int  # the source document's rank in the shard (see the module's docstring)
    candidates: tuple[str, ...]  # the shard's best documents for the query, best first: the first stage's output


def lexical_checks(index: ShardIndex, items: Sequence[tuple[str, str]], candidates: int = 0) -> list[LexicalCheck]:
    """(query, source doc_id) -> its check with the query's top `candidates` documents, in the order given; each
    distinct query is scored once."""
    rows = [index._row_of(doc_id) for _, doc_id in items]
    by_query: dict[str, list[int]] = {}
    for position, (query, _) in enumerate(items):
        by_query.setdefault(query, []).append(position)
    results: list[LexicalCheck | None] = [None] * len(items)
    for positions, (dense_rows, sparse_terms, distinct) in zip(by_query.values(), index._terms(list(by_query))):
        sparse_docs, sparse_weights = index._postings(sparse_terms)
        scores = index._scores(dense_rows, sparse_docs, sparse_weights)
        top = tuple(index.doc_ids[row] for row in _top(scores, candidates)) if candidates else ()
        for position in positions:
            row = rows[position]
            overlap = index._hits(dense_rows, sparse_docs, row) / distinct if distinct else 0.0
            results[position] = LexicalCheck(overlap, _rank(scores, row), top)
    return results  # type: ignore[return-value]
