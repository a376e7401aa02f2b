"""First-stage lexical retrieval for Japanese: the project's character-bigram BM25 next to bm25s with other tokens.

Every teacher label's query (qc_assets/sample/teacher/handwritten-sample.jsonl: 7 categories a document) asks for
its source document among the sample corpus's documents (qc_assets/sample/corpus/*.jsonl), in two setups:
  per shard: each shard file is its own index and a query is scored against its source's shard only;
  whole sample: one index over every shard.
The documents are the raw texts of rows whose "text" is a string with something besides whitespace (the corpus
stage's NFKC, cleaning and dedup are not applied: a near-copy row stays); labels whose document is absent are left out.

Retrievers, all BM25 in Lucene's variant with k1=1.2, b=0.75 (bm25s's default k1 is 1.5, so it is passed):
  1. reference: ShardIndex (qc_assets/defs/scoring/lexical.py), character bigrams, queried with lexical_checks;
  2. bm25s on the same tokens (lexical.char_bigrams): should rank as the reference does, which the run checks;
  3. bm25s on SudachiPy + sudachidict-core morphemes, split mode C and A, as their normalized_form;
  4. bm25s on fugashi + unidic-lite morphemes, as the surface form and as the lemma (the surface where a word has
     none, as unknown words).
Morphemes are NFKC-normalised and lower-cased, as the reference's bigrams are, and punctuation (補助記号) and
whitespace (空白) morphemes are dropped. For bm25s, a query's repeated tokens count once, as the reference's do.

One rule for every retriever: the source's rank is 1 + the number of documents scoring strictly higher, and a
source scoring 0 is not retrieved (rank = the index's size, and no hit at any cut-off). Figures: recall@1,
recall@10 and MRR@10 of the source; index build seconds (tokenising the documents included) and queries per second
(tokenising the query, scoring every document, the source's rank and the top 10 included, as lexical_checks
does with candidates=10). Tokenizer and dictionary loading is a one-off and left out of both. Each retriever runs
`--repeats` times, retrievers interleaved so background load hits them alike; the fastest run counts. The sample
is small (65 documents), so the timings say more about per-call overhead than about scale: the lexical module's
docstring has the 100,000-document comparison that ruled bm25s out for the pipeline's index.

    PYTHONPATH=. .venv/bin/python bench/lexical_retrieval.py            # about 20 s on 2 cores

Needs the retrieval-bench extra (pip install '.[retrieval-bench]'); not registered in `qc bench`, whose CI smoke
run has none of these libraries. Writes bench/results/lexical_retrieval.json (or --json PATH).
"""

from __future__ import annotations

import argparse
import json
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from qc_assets.benchmarks import RESULTS_DIR, figure, machine, positive_int, write_results
from qc_assets.defs.scoring.lexical import ShardIndex, char_bigrams, lexical_checks
from qc_assets.paths import SAMPLE_CORPUS, SAMPLE_TEACHER_LABELS

try:
    import bm25s
    import fugashi
    import sudachidict_core  # noqa: F401  (sudachipy's Dictionary(dict="core") loads it)
    import sudachipy
    import unidic_lite
except ImportError as error:
    raise SystemExit(
        f"bench/lexical_retrieval.py needs {error.name}, which is not installed: pip install '.[retrieval-bench]'"
    ) from error

K1, B = 1.2, 0.75
TOP = 10
LIBRARIES = ("bm25s", "sudachipy", "sudachidict-core", "fugashi", "unidic-lite")
# Part-of-speech heads of punctuation and whitespace in both Sudachi's and UniDic's tag sets.
DROPPED_POS = frozenset({"補助記号", "空白"})

Item = tuple[str, str]  # (query, source doc_id)
Tokenise = Callable[[str], list[str]]


# ---------------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Group:
    """One index's documents and the queries asked of it."""

    doc_ids: list[str]
    texts: list[str]
    items: list[Item]


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def load_shards(directory: Path) -> dict[str, dict[str, str]]:
    """shard name -> {doc_id: raw text}, rows without a usable text skipped (the sample has a blank one)."""
    shards: dict[str, dict[str, str]] = {}
    for path in sorted(directory.glob("*.jsonl")):
        rows = read_jsonl(path)
        shards[path.stem] = {
            row["id"]: row["text"] for row in rows if isinstance(row.get("text"), str) and row["text"].strip()
        }
    return shards


def load_items(path: Path, known: set[str]) -> list[Item]:
    return [(row["query"], row["doc_id"]) for row in read_jsonl(path) if row["doc_id"] in known]


def setups(shards: dict[str, dict[str, str]], items: list[Item]) -> dict[str, list[Group]]:
    def group(docs: dict[str, str]) -> Group:
        return Group(list(docs), list(docs.values()), [item for item in items if item[1] in docs])

    whole = {doc_id: text for docs in shards.values() for doc_id, text in docs.items()}
    return {"per shard": [group(docs) for docs in shards.values()], "whole sample": [group(whole)]}


# ---------------------------------------------------------------------------------------------------------------
# Tokenisers


def normalise(token: str) -> str:
    return unicodedata.normalize("NFKC", token).lower()


def sudachi_tokeniser(mode: str) -> Tokenise:
    tokenizer = sudachipy.Dictionary(dict="core").tokenizer(mode=mode)

    def tokenise(text: str) -> list[str]:
        return [
            normalise(morpheme.normalized_form())
            for morpheme in tokenizer.tokenize(text)
            if morpheme.part_of_speech()[0] not in DROPPED_POS
        ]

    return tokenise


def fugashi_tokeniser(form: str) -> Tokenise:
    # unidic-lite named explicitly: fugashi would take the full unidic package instead were it installed.
    tagger = fugashi.Tagger(f'-d "{unidic_lite.DICDIR}"')

    def tokenise(text: str) -> list[str]:
        words = [word for word in tagger(text) if word.feature.pos1 not in DROPPED_POS]
        if form == "lemma":
            return [normalise(word.feature.lemma or word.surface) for word in words]
        return [normalise(word.surface) for word in words]

    return tokenise


# ---------------------------------------------------------------------------------------------------------------
# Retrievers


def source_rank(scores: np.ndarray, row: int) -> tuple[int, bool]:
    """(rank, retrieved) by the one rule: 1 + documents scoring strictly higher; a zero score is not retrieved."""
    if scores[row] <= 0:
        return len(scores), False
    return 1 + int(np.count_nonzero(scores > scores[row])), True


def top_rows(scores: np.ndarray, n: int) -> np.ndarray:
    """The first stage's output, as lexical_checks(candidates=n) gives it: best n positive scores, ties by row."""
    order = np.argsort(-scores, kind="stable")[:n]
    return order[scores[order] > 0]


class Reference:
    name = "ShardIndex, char bigrams (reference)"
    tokenise_s = 0.0  # tokenising happens inside the index and lexical_checks, not timed apart

    def build(self, group: Group) -> ShardIndex:
        return ShardIndex(group.doc_ids, group.texts, k1=K1, b=B)

    def search(self, index: ShardIndex, items: Sequence[Item]) -> list[tuple[int, bool]]:
        # overlap > 0 exactly when the source shares a bigram with the query, that is when its score is > 0.
        return [(check.rank, check.overlap > 0) for check in lexical_checks(index, items, candidates=TOP)]


class Bm25sRetriever:
    def __init__(self, name: str, tokenise: Tokenise) -> None:
        self.name, self.tokenise = name, tokenise
        self.tokenise_s = 0.0  # time spent in self.tokenise, to tell it from bm25s's own

    def tokens(self, text: str) -> list[str]:
        started = time.perf_counter()
        tokens = self.tokenise(text)
        self.tokenise_s += time.perf_counter() - started
        return tokens

    def build(self, group: Group) -> tuple[bm25s.BM25, dict[str, int]]:
        model = bm25s.BM25(k1=K1, b=B, method="lucene")
        model.index([self.tokens(text) for text in group.texts], show_progress=False)
        return model, {doc_id: row for row, doc_id in enumerate(group.doc_ids)}

    def scores(self, model: bm25s.BM25, query: str) -> np.ndarray:
        # get_scores would count a repeated token again and fails on a query with no token; ids of the distinct
        # tokens known to the index do neither.
        return model.get_scores_from_ids(model.get_tokens_ids(list(dict.fromkeys(self.tokens(query)))))

    def search(self, built: tuple[bm25s.BM25, dict[str, int]], items: Sequence[Item]) -> list[tuple[int, bool]]:
        model, rows = built
        found = []
        for query, doc_id in items:
            scores = self.scores(model, query)
            top_rows(
                scores, TOP
            )  # unused here, but a first stage hands it on: the timing covers it, as the reference's
            found.append(source_rank(scores, rows[doc_id]))
        return found


def retrievers() -> list[Reference | Bm25sRetriever]:
    return [
        Reference(),
        Bm25sRetriever("bm25s, char bigrams", char_bigrams),
        Bm25sRetriever("bm25s, Sudachi C, normalized_form", sudachi_tokeniser("C")),
        Bm25sRetriever("bm25s, Sudachi A, normalized_form", sudachi_tokeniser("A")),
        Bm25sRetriever("bm25s, fugashi/unidic-lite, surface", fugashi_tokeniser("surface")),
        Bm25sRetriever("bm25s, fugashi/unidic-lite, lemma", fugashi_tokeniser("lemma")),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Run:
    found: list[tuple[int, bool]]  # (rank, retrieved) per item, the setup's items in order
    build_s: float
    query_s: float
    build_tokenise_s: float
    query_tokenise_s: float


def run_once(retriever: Reference | Bm25sRetriever, groups: list[Group]) -> Run:
    found: list[tuple[int, bool]] = []
    build_s = query_s = build_tokenise_s = query_tokenise_s = 0.0
    for group in groups:
        retriever.tokenise_s = 0.0
        started = time.perf_counter()
        index = retriever.build(group)
        build_s += time.perf_counter() - started
        build_tokenise_s += retriever.tokenise_s
        retriever.tokenise_s = 0.0
        started = time.perf_counter()
        found += retriever.search(index, group.items)  # type: ignore[arg-type]
        query_s += time.perf_counter() - started
        query_tokenise_s += retriever.tokenise_s
    return Run(found, build_s, query_s, build_tokenise_s, query_tokenise_s)


def fastest(runs: list[Run]) -> Run:
    best_build = min(runs, key=lambda run: run.build_s)
    best_query = min(runs, key=lambda run: run.query_s)
    return Run(
        runs[-1].found, best_build.build_s, best_query.query_s, best_build.build_tokenise_s, best_query.query_tokenise_s
    )


def quality(found: list[tuple[int, bool]]) -> dict:
    hits = [rank if retrieved else None for rank, retrieved in found]
    return {
        "recall_at_1": float(np.mean([rank is not None and rank <= 1 for rank in hits])),
        "recall_at_10": float(np.mean([rank is not None and rank <= 10 for rank in hits])),
        "mrr_at_10": float(np.mean([1 / rank if rank is not None and rank <= 10 else 0.0 for rank in hits])),
        "not_retrieved": sum(rank is None for rank in hits),
    }


def summarise(run: Run, queries: int) -> dict:
    return {
        **quality(run.found),
        "build_seconds": run.build_s,
        "build_tokenise_seconds": run.build_tokenise_s,
        "query_seconds": run.query_s,
        "query_tokenise_seconds": run.query_tokenise_s,
        "queries_per_second": queries / run.query_s,
    }


def max_score_difference(groups: list[Group]) -> float:
    """Largest |reference score - bm25s bigram score| over every query and document: the two should be one BM25."""
    bigrams = Bm25sRetriever("bigrams", char_bigrams)
    largest = 0.0
    for group in groups:
        index, (model, _) = ShardIndex(group.doc_ids, group.texts, k1=K1, b=B), bigrams.build(group)
        for query, _ in group.items:
            difference = np.abs(index.bm25_scores(query) - bigrams.scores(model, query)).max()
            largest = max(largest, float(difference))
    return largest


def measure_setup(groups: list[Group], chosen: list[Reference | Bm25sRetriever], repeats: int) -> dict:
    runs: dict[str, list[Run]] = {retriever.name: [] for retriever in chosen}
    for _ in range(repeats):
        for retriever in chosen:
            runs[retriever.name].append(run_once(retriever, groups))
    queries = sum(len(group.items) for group in groups)
    best = {name: fastest(name_runs) for name, name_runs in runs.items()}
    reference, bigrams = best[chosen[0].name].found, best[chosen[1].name].found
    return {
        "indexes": len(groups),
        "documents": sum(len(group.doc_ids) for group in groups),
        "queries": queries,
        "repeats": repeats,
        "retrievers": {name: summarise(run, queries) for name, run in best.items()},
        "bigram_agreement": {
            "ranks_differing": sum(a != b for a, b in zip(reference, bigrams)),
            "max_score_difference": max_score_difference(groups),
        },
    }


# ---------------------------------------------------------------------------------------------------------------
# Report


def figures_for(results: dict) -> list[dict]:
    rows = []
    for setup, section in results["setups"].items():
        named = section["retrievers"]
        reference_name = next(iter(named))
        reference = named[reference_name]
        for name, figures in list(named.items())[1:]:
            for key, unit in (
                ("recall_at_10", ""),
                ("mrr_at_10", ""),
                ("build_seconds", "s"),
                ("queries_per_second", "queries/s"),
            ):
                value, base = figures[key], reference[key]
                rows.append(
                    figure(f"{setup}: {name}, {key}", value, unit, reference_name, base, value / base if base else None)
                )
    return rows


def print_setup(setup: str, section: dict) -> None:
    print(
        f"\n{setup}: {section['indexes']} index(es), {section['documents']} documents, {section['queries']} queries, "
        f"fastest of {section['repeats']}"
    )
    print(
        f"  {'retriever':<40}{'R@1':>7}{'R@10':>7}{'MRR@10':>8}{'miss':>6}"
        f"{'build ms':>10}{'x ref':>7}{'queries/s':>11}{'x ref':>7}"
    )
    named = section["retrievers"]
    reference = next(iter(named.values()))
    for name, f in named.items():
        print(
            f"  {name:<40}{f['recall_at_1']:>7.3f}{f['recall_at_10']:>7.3f}{f['mrr_at_10']:>8.3f}"
            f"{f['not_retrieved']:>6}{f['build_seconds'] * 1000:>10.1f}"
            f"{f['build_seconds'] / reference['build_seconds']:>7.2f}{f['queries_per_second']:>11,.0f}"
            f"{f['queries_per_second'] / reference['queries_per_second']:>7.3f}"
        )
    agreement = section["bigram_agreement"]
    print(
        f"  bm25s bigrams vs reference: {agreement['ranks_differing']} of {section['queries']} source ranks differ, "
        f"largest score difference {agreement['max_score_difference']:.2g}"
    )


def print_summary(results: dict) -> None:
    versions = ", ".join(f"{name} {version}" for name, version in results["versions"].items())
    print(f"lexical retrieval on the sample, BM25 k1={K1} b={B}; {versions}")
    print(
        "miss: sources scoring 0 (not retrieved). x ref: build time / the reference's (above 1 is slower), "
        "queries/s / the reference's (above 1 is faster)"
    )
    for setup, section in results["setups"].items():
        print_setup(setup, section)
    print(f"\ntokeniser loading (left out of the timings): {results['tokeniser_load_seconds']:.2f} s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed runs per retriever; the fastest counts")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "lexical_retrieval.json", help="where results go")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    shards = load_shards(SAMPLE_CORPUS)
    items = load_items(SAMPLE_TEACHER_LABELS, {doc_id for docs in shards.values() for doc_id in docs})
    loading = time.perf_counter()
    chosen = retrievers()
    results: dict = {
        "machine": machine(),
        "versions": {name: metadata.version(name) for name in LIBRARIES},
        "k1": K1,
        "b": B,
        "tokeniser_load_seconds": time.perf_counter() - loading,
        "setups": {name: measure_setup(groups, chosen, args.repeats) for name, groups in setups(shards, items).items()},
    }
    results["figures"] = figures_for(results)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print_summary(results)
    write_results(args.json, results)
    print(f"wrote {args.json} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
