"""The scoring stage's round trip and hard-negative mining: throughput of each step, same process.

A synthetic shard (Japanese-like documents of 600-1,000 characters, `japanese_like_texts`) and queries cut from
short spans of random documents, so each query has a known source document. The steps run as
`qc_assets/defs/scoring/assets.py::_score_rows` chains them:
  a. first stage: `lexical_checks(index, items, candidates=K)`, K = QC_ROUND_TRIP_CANDIDATES' default.
     Reference: the plain loop over the same shard, `index.bm25_scores(query)` then `np.argsort` for the top K.
  b. second stage: the tiny cross-encoder (`open_scorer`, on CPU unless CUDA is there) on every pair of
     `scored_pairs` (each query with its source and its K candidates). Reference: the same scorer on one (query,
     source) pair per query, what scoring cost before the round trip; per query, the ratio is the round trip's
     added model cost.
  c. `round_trips`, `mine` for the pairs that pass (with the asset's own per-shard cache of bigram sets) and
     `copying` for every pair, each part timed; then again in the worst case for mining, the upper bound the
     projection uses: every pair mined, its source ranked first far above every candidate, so that every
     candidate reaches the near-duplicate guard and its bigram set is computed (the tiny scorer's random weights
     pass few pairs and score candidates within the margin of the source, which skips that guard). Reference: a.
  d. the whole chain a + b + c per query. Reference: b's reference, the model cost per query before.
Also the index's build time and the build's peak-RSS increase next to `index.nbytes`.

Projection to seed 000's 100M documents at 7 queries a document (one per category), on one CPU core, from the CPU
seconds measured here: the index builds, linear in documents; the first stage with per-shard indexes of ~97,000
documents (fineweb-2-edu-japanese's shards), its per-query cost scaled linearly from this shard's size (BM25 scores
every document of the shard; the fixed per-query part does not grow, so this is an upper bound); mining and
copying in c's worst case, split into the work per pair (measured again with every bigram set cached) and one
bigram set per document, as the asset's cache computes each at most once a shard. The cross-encoder's part belongs
on a GPU and is measured by bench/generation_scoring.py, not projected here.

    python bench/round_trip.py            # 10,000 documents, 2,000 queries (about 41,000 scored pairs)
    python bench/round_trip.py --quick    # 1,000 documents, 200 queries, max_length 128, 1 thread: a smoke run

The CPU steps (a, its reference, c) run `--repeats` times, alternately, and the fastest run counts; the
cross-encoder runs once a side (it is the long part). Tiny models come from QC_DATA_DIR/models when QC_DATA_DIR is
set, else a temporary directory. On a small shared CPU the cross-encoder's figures swing widely (see
bench/generation_scoring.py; `--threads 1` steadies them). Writes bench/results/round_trip.json (or --json PATH).
Not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import torch

# bench/ is on sys.path when this runs as a script: seed 000's document count is projection.py's.
from projection import SEED_DOCUMENTS

from qc_assets.benchmarks import RESULTS_DIR, figure, machine, positive_int, write_results
from qc_assets.categories import CATEGORIES
from qc_assets.defs.corpus.synthetic import japanese_like_texts
from qc_assets.defs.scoring.copying import copying
from qc_assets.defs.scoring.lexical import LexicalCheck, ShardIndex, lexical_checks
from qc_assets.defs.scoring.negatives import Negatives, NegativeSettings, bigram_sets, mine
from qc_assets.defs.scoring.round_trip import RoundTrip, RoundTripSettings, round_trips, scored_pairs
from qc_assets.defs.scoring.scorers import QueryScorer, open_scorer
from qc_assets.models.tiny import CROSS_ENCODER_DIR, ensure_tiny_models, sample_texts
from qc_assets.settings import Settings

# fineweb-2-edu-japanese's shards hold about 97,000 documents each (README, bench/scaling.py); one index a shard.
SHARD_DOCUMENTS = 97_000
QUERIES_PER_DOCUMENT = len(CATEGORIES)
DOCUMENT_CHARS = (600, 1000)
QUERY_CHARS = (12, 30)
WARM_UP = 8  # items each step runs once, untimed, before its timed runs

Item = tuple[str, str]  # (query, source doc_id)
T = TypeVar("T")


def setting(name: str):
    """A Settings field's default: the figures follow what the pipeline runs unless configured otherwise."""
    return Settings.model_fields[name].default


@dataclass(frozen=True)
class Timing:
    wall: float
    cpu: float


def timed(run: Callable[[], T]) -> tuple[T, Timing]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, Timing(time.perf_counter() - wall, time.process_time() - cpu)


def fastest(timings: list[Timing]) -> Timing:
    return min(timings, key=lambda timing: timing.wall)


def _sig(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def synthetic_shard(documents: int, seed: int) -> dict[str, str]:
    """doc_id -> text, each cut to a random length in DOCUMENT_CHARS: BM25's length normalisation sees a spread."""
    rng = np.random.default_rng(seed)
    texts = japanese_like_texts(documents, DOCUMENT_CHARS[1], seed=seed)
    lengths = rng.integers(DOCUMENT_CHARS[0], DOCUMENT_CHARS[1] + 1, size=documents)
    return {f"doc-{row:06d}": text[:length] for row, (text, length) in enumerate(zip(texts, lengths.tolist()))}


def span_queries(texts: dict[str, str], count: int, seed: int) -> list[Item]:
    """Queries cut from short spans of random documents (distinct ones while there are enough), with their source."""
    rng = np.random.default_rng(seed)
    doc_ids = list(texts)
    sources = rng.choice(len(doc_ids), size=count, replace=count > len(doc_ids))
    items = []
    for row in sources.tolist():
        text = texts[doc_ids[row]]
        length = int(rng.integers(QUERY_CHARS[0], QUERY_CHARS[1] + 1))
        start = int(rng.integers(0, max(1, len(text) - length)))
        items.append((text[start : start + length], doc_ids[row]))
    return items


# ---------------------------------------------------------------------------------------------------------------
# Steps


def plain_top_k(index: ShardIndex, queries: Sequence[str], k: int) -> list[tuple[str, ...]]:
    """The reference first stage: every query scored on its own, the whole score vector sorted."""
    return [
        tuple(index.doc_ids[row] for row in np.argsort(-index.bm25_scores(query), kind="stable")[:k])
        for query in queries
    ]


def first_stage(index: ShardIndex, items: list[Item], candidates: int, repeats: int) -> dict:
    """a and its reference, alternately, each first in turn."""
    queries = [query for query, _ in items]
    runs: dict[str, list[Timing]] = {"lexical_checks": [], "plain_loop": []}
    outputs: dict[str, object] = {}
    steps = {
        "lexical_checks": lambda: lexical_checks(index, items, candidates=candidates),
        "plain_loop": lambda: plain_top_k(index, queries, candidates),
    }
    lexical_checks(index, items[:WARM_UP], candidates=candidates)  # first calls pay one-off costs: not timed
    plain_top_k(index, queries[:WARM_UP], candidates)
    for repeat in range(repeats):
        for name in list(steps) if repeat % 2 == 0 else list(steps)[::-1]:
            outputs[name], timing = timed(steps[name])
            runs[name].append(timing)
    return {"checks": outputs["lexical_checks"], "plain": outputs["plain_loop"], "runs": runs}


def open_tiny_scorer(models_dir: Path, max_length: int) -> QueryScorer:
    path = ensure_tiny_models(models_dir, sample_texts())[CROSS_ENCODER_DIR]
    return open_scorer(
        str(path),
        max_length=max_length,
        batch_size=setting("scorer_batch_size"),
        name=f"tiny-cross-encoder@{max_length}",
    )


def second_stage(scorer: QueryScorer, texts: dict[str, str], items: list[Item], checks: list[LexicalCheck]) -> dict:
    """b: the round trip's pairs, and the reference, the source pair alone, once each after a warm-up batch."""
    pairs = scored_pairs(items, checks)

    def score(chosen: list[Item]) -> list[float]:
        # The scorer's own progress lines would bury the figures.
        return scorer.score([(query, texts[doc_id]) for query, doc_id in chosen], log=lambda _: None)

    score(pairs[: setting("scorer_batch_size")])
    _, source = timed(functools.partial(score, items))
    scores, round_trip = timed(functools.partial(score, pairs))
    return {"pairs": pairs, "scored": dict(zip(pairs, scores)), "source": source, "round_trip": round_trip}


Reranked = Sequence[tuple[str, float]]  # (doc_id, cross-encoder score) best first


def mine_pairs(chosen: list[tuple[str, Reranked]], bigrams: Callable[[str], frozenset[str]]) -> list[Negatives]:
    """(source doc_id, its re-ranked candidates) -> its negatives."""
    settings = NegativeSettings(
        setting("negatives_per_pair"), setting("negatives_relative_margin"), setting("negatives_max_similarity")
    )
    return [mine(doc_id, reranked, bigrams, settings) for doc_id, reranked in chosen]


def to_mine(items: list[Item], checks: list[LexicalCheck], trips: list[RoundTrip], worst_case: bool):
    """The pairs `mine` gets: those that pass, as the asset does; or, worst case, every pair with its source ranked
    first far above every candidate. The tiny scorer's random weights make few round trips pass and score every
    candidate within the margin of the source, which the score guard drops before the near-duplicate guard
    computes any bigram set; in the worst case every candidate reaches that guard."""
    if not worst_case:
        return [(doc_id, trip.reranked) for (_, doc_id), trip in zip(items, trips) if trip.passed]
    return [
        (doc_id, ((doc_id, 1.0), *((candidate, 0.0) for candidate in check.candidates if candidate != doc_id)))
        for (_, doc_id), check in zip(items, checks)
    ]


def mining_and_copying(
    items: list[Item],
    checks: list[LexicalCheck],
    scored: dict[Item, float],
    texts: dict[str, str],
    worst_case: bool,
) -> dict:
    """c as the asset runs it, each part timed; `worst_case`: every pair mined, every candidate bigram-checked."""
    settings = RoundTripSettings(setting("round_trip_candidates"), setting("round_trip_top_k"))
    trips, trip_time = timed(lambda: round_trips(items, checks, lambda query, doc_id: scored[query, doc_id], settings))
    chosen = to_mine(items, checks, trips, worst_case)
    bigrams = bigram_sets(texts)  # a new cache, as the asset makes one per call
    mined, mine_time = timed(functools.partial(mine_pairs, chosen, bigrams))
    _, copy_time = timed(lambda: [copying(query, texts[doc_id]) for query, doc_id in items])
    # Not part of c: the same pairs mined again with every bigram set cached, which splits mining's cost into the
    # cache's fills (once per document a shard) and the work per pair, for the projection.
    _, cached_time = timed(functools.partial(mine_pairs, chosen, bigrams))
    return {
        "passed": sum(trip.passed for trip in trips),
        "mined": len(mined),
        "near_duplicates": sum(negatives.near_duplicates for negatives in mined),
        # Exact in the worst case only, where every candidate and source gets its bigram set.
        "bigram_sets": len({doc_id for source, reranked in chosen for doc_id in (source, *dict(reranked))}),
        "parts": {"round_trips": trip_time, "mining": mine_time, "copying": copy_time},
        "mining_cached": cached_time,
    }


def total(parts: dict[str, Timing]) -> Timing:
    return Timing(sum(part.wall for part in parts.values()), sum(part.cpu for part in parts.values()))


def third_stage(items, checks, scored, texts, repeats: int) -> dict:
    """c as the asset runs it and in the worst case, alternately; the fastest run of each counts."""
    runs: dict[str, list[dict]] = {"as_asset": [], "worst_case": []}
    mining_and_copying(items[:WARM_UP], checks[:WARM_UP], scored, texts, worst_case=True)
    for repeat in range(repeats):
        for name in ("as_asset", "worst_case") if repeat % 2 == 0 else ("worst_case", "as_asset"):
            runs[name].append(mining_and_copying(items, checks, scored, texts, worst_case=name == "worst_case"))
    best = {name: min(variant, key=lambda run: total(run["parts"]).wall) for name, variant in runs.items()}
    return {
        "best": best,
        "run_seconds": {
            name: [round(total(run["parts"]).wall, 3) for run in variant] for name, variant in runs.items()
        },
    }


# ---------------------------------------------------------------------------------------------------------------
# Measure


def build_index(texts: dict[str, str]) -> tuple[ShardIndex, dict]:
    before = peak_rss_bytes()
    index, timing = timed(lambda: ShardIndex(list(texts), list(texts.values())))
    return index, {
        "seconds": round(timing.wall, 3),
        "cpu_seconds": round(timing.cpu, 3),
        # The high-water mark's rise: the build's transient arrays count, not only what the index keeps.
        "peak_rss_delta_bytes": peak_rss_bytes() - before,
        "nbytes": index.nbytes,
    }


def measure(args: argparse.Namespace, models_dir: Path) -> dict:
    candidates = setting("round_trip_candidates")
    texts = synthetic_shard(args.documents, seed=1)
    items = span_queries(texts, args.queries, seed=2)
    # Before the model loads, so the peak-RSS rise is the index's.
    index, index_figures = build_index(texts)
    first = first_stage(index, items, candidates, args.repeats)
    checks = first["checks"]
    scorer = open_tiny_scorer(models_dir, args.max_length)
    try:
        second = second_stage(scorer, texts, items, checks)
    finally:
        scorer.close()
    third = third_stage(items, checks, second["scored"], texts, args.repeats)
    return {
        "documents": len(texts),
        "mean_document_chars": round(sum(map(len, texts.values())) / len(texts), 1),
        "queries": len(items),
        "mean_query_chars": round(sum(len(query) for query, _ in items) / len(items), 1),
        "candidates": candidates,
        "top_k": setting("round_trip_top_k"),
        "repeats": args.repeats,
        "scorer_device": getattr(scorer, "device", "cpu"),
        "scorer_max_length": args.max_length,
        "index": index_figures,
        "first_stage": first_stage_section(items, first),
        "second_stage": second_stage_section(items, second),
        "third_stage": third_stage_section(items, third),
    }


def _rates(timing: Timing, count: int) -> dict:
    return {
        "seconds": round(timing.wall, 4),
        "cpu_seconds": round(timing.cpu, 4),
        "per_s": _sig(count / timing.wall),
        "cpu_seconds_per_item": _sig(timing.cpu / count),
    }


def first_stage_section(items: list[Item], first: dict) -> dict:
    checks, plain = first["checks"], first["plain"]
    return {
        "lexical_checks": _rates(fastest(first["runs"]["lexical_checks"]), len(items)),
        "plain_loop": _rates(fastest(first["runs"]["plain_loop"]), len(items)),
        "run_seconds": {name: [round(t.wall, 3) for t in runs] for name, runs in first["runs"].items()},
        # Ties keep document order on both sides, so the candidates agree unless fewer than K documents score > 0.
        "same_candidates": sum(check.candidates == top for check, top in zip(checks, plain)),
        "source_among_candidates": sum(source in check.candidates for (_, source), check in zip(items, checks)),
    }


def second_stage_section(items: list[Item], second: dict) -> dict:
    pairs = len(second["pairs"])
    return {
        "pairs": pairs,
        "pairs_per_query": round(pairs / len(items), 2),
        "round_trip": _rates(second["round_trip"], pairs),
        "round_trip_queries_per_s": _sig(len(items) / second["round_trip"].wall),
        "source_only": _rates(second["source"], len(items)),
    }


def third_stage_section(items: list[Item], third: dict) -> dict:
    def section(run: dict) -> dict:
        return {
            **_rates(total(run["parts"]), len(items)),
            **{name: run[name] for name in ("passed", "mined", "near_duplicates", "bigram_sets")},
            "part_seconds": {name: round(part.wall, 4) for name, part in run["parts"].items()},
            "mining_cached_seconds": round(run["mining_cached"].wall, 4),
        }

    worst = third["best"]["worst_case"]
    parts, fills = worst["parts"], max(worst["bigram_sets"], 1)
    per_pair = (parts["round_trips"].cpu + parts["copying"].cpu + worst["mining_cached"].cpu) / len(items)
    return {
        **{name: section(run) for name, run in third["best"].items()},
        # For the projection: the worst case's CPU seconds per pair with the cache warm, and per bigram set.
        "worst_case_cpu_seconds_per_pair_cached": _sig(per_pair),
        "cpu_seconds_per_bigram_set": _sig(max(parts["mining"].cpu - worst["mining_cached"].cpu, 0.0) / fills),
        "run_seconds": third["run_seconds"],
    }


# ---------------------------------------------------------------------------------------------------------------
# Projection and report


def project(measured: dict, documents: int = SEED_DOCUMENTS) -> dict:
    """CPU hours on one core for the steps that stay on the CPU, at `documents` with QUERIES_PER_DOCUMENT each."""
    queries = documents * QUERIES_PER_DOCUMENT
    index_cpu_per_document = measured["index"]["cpu_seconds"] / measured["documents"]
    shard_scale = SHARD_DOCUMENTS / measured["documents"]
    first_cpu_per_query = measured["first_stage"]["lexical_checks"]["cpu_seconds_per_item"] * shard_scale
    third = measured["third_stage"]
    # Each document's bigram set is computed at most once a shard (per scored source), the rest per pair.
    mining_cpu = third["worst_case_cpu_seconds_per_pair_cached"] * queries
    mining_cpu += third["cpu_seconds_per_bigram_set"] * documents
    hours = {
        "index_build_cpu_hours": index_cpu_per_document * documents / 3600,
        "first_stage_cpu_hours": first_cpu_per_query * queries / 3600,
        "mining_copying_cpu_hours": mining_cpu / 3600,
    }
    return {
        "documents": documents,
        "queries": queries,
        "shard_documents": SHARD_DOCUMENTS,
        "shards": -(-documents // SHARD_DOCUMENTS),
        "first_stage_scale_from_measured_shard": round(shard_scale, 2),
        **{name: round(value, 1) for name, value in hours.items()},
        "total_cpu_hours": round(sum(hours.values()), 1),
        "cross_encoder": "not projected: it runs on a GPU, measured by bench/generation_scoring.py",
    }


def stage_figures(results: dict) -> list[dict]:
    first, second, third = results["first_stage"], results["second_stage"], results["third_stage"]
    k, n = results["candidates"], results["documents"]
    a, plain = first["lexical_checks"]["per_s"], first["plain_loop"]["per_s"]
    b, b_ref = second["round_trip"]["per_s"], second["source_only"]["per_s"]
    b_queries = second["round_trip_queries_per_s"]
    c, c_upper = third["as_asset"]["per_s"], third["worst_case"]["per_s"]
    d = _sig(1 / (1 / a + 1 / b_queries + 1 / c))
    model = f"tiny cross-encoder, {results['scorer_device']}, max_length {results['scorer_max_length']}"
    pass_share = third["as_asset"]["passed"] / results["queries"]
    return [
        figure(
            f"a. first stage: lexical_checks, top {k} of {n:,} documents",
            a,
            "queries/s",
            f"plain loop: bm25_scores + argsort top {k}",
            plain,
            a / plain,
        ),
        figure(
            f"b. second stage: the round trip's pairs, {second['pairs_per_query']:.1f} a query ({model})",
            b,
            "pairs/s",
            "the same scorer on the source pair alone",
            b_ref,
            b / b_ref,
        ),
        figure(
            f"b. second stage per query ({model})",
            b_queries,
            "queries/s",
            "the source pair alone (the model cost before the round trip)",
            b_ref,
            b_queries / b_ref,
        ),
        figure(
            f"c. round trips + mining ({pass_share:.0%} pass) + copying, as the asset runs them",
            c,
            "pairs/s",
            "a. first stage",
            a,
            c / a,
        ),
        figure(
            "c. worst case: every pair mined, every candidate bigram-checked (upper bound)",
            c_upper,
            "pairs/s",
            "a. first stage",
            a,
            c_upper / a,
        ),
        figure(
            f"d. whole chain a + b + c ({model})",
            d,
            "queries/s",
            "the cross-encoder on the source pair alone",
            b_ref,
            d / b_ref,
        ),
    ]


def index_figures(results: dict) -> list[dict]:
    index = results["index"]
    return [
        figure(f"index build, {results['documents']:,} documents", index["seconds"], "s"),
        figure(
            "index build, peak RSS increase",
            _sig(index["peak_rss_delta_bytes"] / 2**20),
            "MiB",
            "index.nbytes",
            _sig(index["nbytes"] / 2**20),
            index["peak_rss_delta_bytes"] / index["nbytes"],
        ),
    ]


def projection_figures(projection: dict) -> list[dict]:
    scale = f"{projection['documents']:,} documents, {QUERIES_PER_DOCUMENT} queries a document"
    shards = f"{projection['shard_documents']:,}-document shards"
    return [
        figure(f"{scale}: index builds", projection["index_build_cpu_hours"], "CPU h"),
        figure(f"{scale}: first stage, {shards} (upper bound)", projection["first_stage_cpu_hours"], "CPU h"),
        figure(f"{scale}: mining + copying (upper bound)", projection["mining_copying_cpu_hours"], "CPU h"),
    ]


def print_summary(results: dict) -> None:
    r = results
    print(
        f"shard: {r['documents']:,} documents of ~{r['mean_document_chars']:.0f} chars; {r['queries']:,} queries of "
        f"~{r['mean_query_chars']:.0f} chars cut from random documents; K = {r['candidates']} candidates, "
        f"top_k = {r['top_k']}; CPU steps best of {r['repeats']}; {r['torch_threads']} torch threads"
    )
    first, third = r["first_stage"], r["third_stage"]
    print(
        f"a: same candidates as the plain loop {first['same_candidates']}/{r['queries']}, source among them "
        f"{first['source_among_candidates']}/{r['queries']}; runs (s) {first['run_seconds']}"
    )
    print(
        f"c: {third['as_asset']['passed']}/{r['queries']} round trips pass (the tiny scorer's weights are random); "
        f"mined {third['as_asset']['mined']} as the asset, {third['worst_case']['mined']} in the worst case "
        f"({third['worst_case']['near_duplicates']} near-duplicate candidates, {third['worst_case']['bigram_sets']} "
        f"bigram sets, mined again cached in {third['worst_case']['mining_cached_seconds']} s); parts (s) as the asset "
        f"{third['as_asset']['part_seconds']}, worst case {third['worst_case']['part_seconds']}; "
        f"runs (s) {third['run_seconds']}"
    )
    for row in r["figures"]:
        line = f"  {row['measure']}: {row['value']:,.4g} {row['unit']}"
        if row["reference_value"] is not None:
            line += f"  vs {row['reference']}: {row['reference_value']:,.4g} = x{row['ratio']:.3g}"
        print(line)
    print(
        f"  ({r['projection']['total_cpu_hours']:,.1f} CPU h in all; cross-encoder {r['projection']['cross_encoder']})"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--documents", type=positive_int, help="documents in the shard (default 10,000; quick 1,000)")
    parser.add_argument("--queries", type=positive_int, help="queries (default 2,000; quick 200)")
    parser.add_argument(
        "--repeats", type=positive_int, help="timed runs of each CPU step, the fastest counts (3; quick 1)"
    )
    parser.add_argument(
        "--max-length",
        type=positive_int,
        help="the scorer's max_length (default QC_SCORER_MAX_LENGTH's, 512; quick 128)",
    )
    parser.add_argument(
        "--threads", type=positive_int, help="torch intra-op threads (default: torch's own, one per core; quick 1)"
    )
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "round_trip.json")
    args = parser.parse_args()
    # (quick, default); quick's max_length is bench/scaling.py's light models': the cross-encoder is most of the run.
    defaults = {
        "documents": (1_000, 10_000),
        "queries": (200, 2_000),
        "repeats": (1, 3),
        "max_length": (128, setting("scorer_max_length")),
        # One torch thread: on busy cores torch's threads spin at every barrier and the smoke run takes minutes.
        "threads": (1, None),
    }
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qc-bench-round-trip-") as scratch:
        data_dir = os.environ.get("QC_DATA_DIR")
        results = measure(args, Path(data_dir) / "models" if data_dir else Path(scratch) / "models")
    results["machine"] = machine()
    results["quick"] = args.quick
    results["torch_threads"] = torch.get_num_threads()
    results["projection"] = project(results)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["figures"] = stage_figures(results) + index_figures(results) + projection_figures(results["projection"])
    print_summary(results)
    write_results(args.json, results)
    print(f"wrote {args.json} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
