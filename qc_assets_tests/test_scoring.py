"""The scoring side: the cross-encoder scorer (on the tiny model) and the character-bigram BM25 check."""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from qc_assets.defs.corpus.synthetic import japanese_like_texts
from qc_assets.defs.scoring import lexical
from qc_assets.defs.scoring.copying import Copying, copying
from qc_assets.defs.scoring.lexical import LexicalCheck, ShardIndex, char_bigrams, lexical_checks
from qc_assets.defs.scoring.negatives import Negatives, NegativeSettings, jaccard, mine
from qc_assets.defs.scoring.round_trip import RoundTrip, RoundTripSettings, round_trips, scored_pairs
from qc_assets.defs.scoring.scorers import QueryScorer, open_scorer, scorer_name
from qc_assets.models.tiny import CROSS_ENCODER_DIR

# --- the cross-encoder scorer -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cross_encoder(tiny_models_dir) -> Path:
    return tiny_models_dir / CROSS_ENCODER_DIR


@pytest.fixture(scope="module")
def scorer(tiny_cross_encoder):
    scorer = open_scorer(str(tiny_cross_encoder), max_length=128)
    yield scorer
    scorer.close()


def _pairs() -> list[tuple[str, str]]:
    docs = japanese_like_texts(20, 300, seed=7)
    pairs = [(doc[5 : 5 + 10 + 3 * i], doc[: 40 + 37 * i]) for i, doc in enumerate(docs)]
    return pairs + [("", "質問のない文書です。"), ("文書のない質問", ""), ("同じ", "同じ"), ("同じ", "同じ")]


def test_the_scorer_gives_one_score_in_0_1_per_pair_in_the_callers_order(scorer):
    pairs = _pairs()
    logged: list[str] = []
    scores = scorer.score(pairs, log=logged.append)

    assert isinstance(scorer, QueryScorer)
    assert len(scores) == len(pairs) and all(isinstance(score, float) for score in scores)
    assert all(0.0 <= score <= 1.0 for score in scores)
    assert logged and scorer.name in logged[-1]
    assert scores[-1] == scores[-2]
    # The tiny model's scores differ enough for the order checks below to bite.
    assert np.ptp(scores) > 1e-5
    # Reversed input gives reversed output: the length sorting is undone.
    assert np.allclose(scorer.score(pairs[::-1], log=lambda _: None)[::-1], scores, rtol=0, atol=1e-6)
    assert scorer.score([], log=logged.append) == []


def test_scores_do_not_depend_on_the_batch_size_and_repeat_exactly(tiny_cross_encoder, scorer):
    pairs = _pairs()
    reference = scorer.score(pairs, log=lambda _: None)
    assert scorer.score(pairs, log=lambda _: None) == reference
    for batch_size in (1, 5):
        other = open_scorer(str(tiny_cross_encoder), max_length=128, batch_size=batch_size)
        try:
            assert np.allclose(other.score(pairs, log=lambda _: None), reference, rtol=0, atol=1e-6)
        finally:
            other.close()


def test_max_length_truncates_the_pair(tiny_cross_encoder):
    short = open_scorer(str(tiny_cross_encoder), max_length=16)
    try:
        prefix = "日本の教育制度の歴史と課題について説明します。" * 4
        first, second = short.score([("教育", prefix + "まったく別の続き"), ("教育", prefix + "異なる後半の文")])
        assert first == pytest.approx(second, abs=1e-7)
    finally:
        short.close()


def test_the_name_carries_the_model_and_the_max_length(tiny_cross_encoder, scorer, tmp_path):
    assert scorer.name == f"{CROSS_ENCODER_DIR}@128"
    other = open_scorer(str(tiny_cross_encoder), max_length=64)
    assert other.name == f"{CROSS_ENCODER_DIR}@64" != scorer.name
    other.close()
    # A local directory is named by its last component, wherever it lies.
    moved = shutil.copytree(tiny_cross_encoder, tmp_path / "elsewhere" / CROSS_ENCODER_DIR)
    assert scorer_name(str(moved), 128) == scorer.name
    assert scorer_name("BAAI/bge-reranker-v2-m3", 512) == "BAAI/bge-reranker-v2-m3@512"
    named = open_scorer(str(tiny_cross_encoder), max_length=32, name="tiny-cross-encoder@32")
    assert named.name == "tiny-cross-encoder@32"
    named.close()


def test_a_closed_scorer_refuses_to_score(tiny_cross_encoder):
    scorer = open_scorer(str(tiny_cross_encoder), max_length=32)
    scorer.close()
    scorer.close()
    with pytest.raises(RuntimeError, match="closed"):
        scorer.score([("質問", "文書")])


# --- character-bigram BM25 ----------------------------------------------------------------------------------

DOCS = {
    "fuji": "富士山は静岡県と山梨県にまたがる日本一高い山で、標高は3776メートルです。夏には多くの登山者が訪れます。",
    "tea": "静岡県はお茶の産地として知られています。緑茶の生産量は全国でも上位です。",
    "rail": "新幹線は東京と大阪を結ぶ高速鉄道で、1964年に開業しました。多くの人が利用しています。",
    "sushi": "寿司は酢飯に魚介類を合わせた日本料理です。回転寿司の店も全国に広がっています。",
    "abc": "ＡＢＣ株式会社はｶﾀｶﾅの社名を使わない会社です。",
    "kyoto": "京都には多くの寺社があり、毎年たくさんの観光客が訪れています。",
}


@pytest.fixture(scope="module")
def index() -> ShardIndex:
    fillers = japanese_like_texts(40, 200, seed=11)
    ids = [*DOCS, *(f"filler-{i}" for i in range(len(fillers)))]
    return ShardIndex(ids, [*DOCS.values(), *fillers])


def _reference_bm25(texts: list[str], query: str, k1: float = 1.2, b: float = 0.75) -> np.ndarray:
    tokens = [char_bigrams(text) for text in texts]
    n, avgdl = len(texts), sum(map(len, tokens)) / len(texts)
    df = Counter(term for terms in tokens for term in set(terms))
    scores = []
    for terms in tokens:
        tf = Counter(terms)
        scores.append(
            sum(
                math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                * tf[t]
                / (tf[t] + k1 * (1 - b + b * len(terms) / avgdl))
                for t in set(char_bigrams(query))
                if tf[t]
            )
        )
    return np.array(scores)


def test_char_bigrams_normalise_and_drop_whitespace_and_punctuation():
    assert char_bigrams("日本、 の。") == ["日本", "本の"]
    assert char_bigrams("ＡＢＣ") == char_bigrams("ABC") == char_bigrams("abc") == ["ab", "bc"]
    assert char_bigrams("ｶﾀｶﾅ") == char_bigrams("カタカナ")
    assert char_bigrams("あ") == ["あ"]
    assert char_bigrams("「あ」") == ["あ"]
    assert char_bigrams("") == [] and char_bigrams(" 、。！\n\u200b") == []


def test_a_query_from_the_documents_own_words_overlaps_more_and_ranks_it_first(index):
    own, other = "日本一高い山で、標高は3776メートル", "京都の寺社と観光客"
    assert index.overlap(own, "fuji") == 1.0
    assert index.overlap(other, "fuji") < index.overlap(own, "fuji")
    assert index.rank_of(own, "fuji") == 1
    assert index.rank_of(other, "kyoto") == 1
    assert index.rank_of(other, "fuji") > 1


def test_a_paraphrase_with_no_shared_bigram_has_overlap_0_and_the_last_rank(index):
    paraphrase = "ふじさんのたかさ"
    assert not set(char_bigrams(paraphrase)) & set(char_bigrams(DOCS["fuji"]))
    assert index.overlap(paraphrase, "fuji") == 0.0
    assert index.bm25_scores(paraphrase)[index.doc_ids.index("fuji")] == 0.0
    assert index.rank_of(paraphrase, "fuji") == len(index)


def test_bm25_scores_match_a_direct_computation_and_ranks_follow_them(index):
    texts = [*DOCS.values(), *japanese_like_texts(40, 200, seed=11)]
    assert index._dense.shape[0] > 0 and len(index._docs) > 0  # both the dense rows and the sparse postings
    queries = ["静岡県のお茶", "日本一高い山", "多くの人が訪れます", "寿司", "観点から説明", "の", "zzz"]
    for query in queries:
        scores = index.bm25_scores(query)
        assert scores.shape == (len(index),)
        assert np.allclose(scores, _reference_bm25(texts, query), rtol=1e-5, atol=1e-6), query
        for row, doc_id in enumerate(index.doc_ids):
            expected = 1 + int(np.sum(scores > scores[row])) if scores[row] > 0 else len(index)
            assert index.rank_of(query, doc_id) == expected


def test_lexical_checks_equal_the_single_checks_in_the_given_order(index):
    items = [
        ("静岡県のお茶", "tea"),
        ("静岡県のお茶", "fuji"),
        ("新幹線の開業", "rail"),
        ("", "sushi"),
        ("静岡県のお茶", "tea"),
        ("回転寿司", "filler-3"),
        ("ふじさん", "fuji"),
    ]
    checks = lexical_checks(index, items)
    assert checks == [LexicalCheck(index.overlap(q, d), index.rank_of(q, d), ()) for q, d in items]
    assert checks[0] == checks[4] and checks[0].rank == 1
    assert lexical_checks(index, []) == []
    with pytest.raises(KeyError, match="nowhere"):
        lexical_checks(index, [("寿司", "nowhere")])


def test_the_first_stage_candidates_are_the_best_bm25_documents_best_first_ties_in_document_order(index):
    for query in ["静岡県のお茶", "新幹線の開業", "回転寿司", "", "ふじさん"]:
        scores = index.bm25_scores(query)
        ranked = sorted((row for row in range(len(index)) if scores[row] > 0), key=lambda row: (-scores[row], row))
        for n in (1, 3, len(index) + 5):
            check = lexical_checks(index, [(query, index.doc_ids[0])], candidates=n)[0]
            assert check.candidates == tuple(index.doc_ids[row] for row in ranked[:n])
    tied = ShardIndex(["d", "c", "b", "a"], ["お茶の話", "寿司の話です", "寿司の話です", "寿司の話です"])
    assert lexical_checks(tied, [("寿司", "a")], candidates=2)[0].candidates == ("c", "b")


def test_nfkc_matches_full_width_and_half_width_forms(index):
    assert index.overlap("abc株式会社", "abc") == 1.0
    assert index.rank_of("ABC株式会社", "abc") == 1
    assert index.overlap("カタカナ", "abc") == 1.0


def test_an_empty_query_has_overlap_0_and_the_last_rank(index):
    for query in ("", "  、。！"):
        assert index.overlap(query, "fuji") == 0.0
        assert index.rank_of(query, "fuji") == len(index) > 1
        assert not index.bm25_scores(query).any()
    single = ShardIndex(["only"], ["ただ一つの文書です。"])
    assert single.overlap("", "only") == 0.0 and single.rank_of("", "only") == 1
    assert single.rank_of("文書", "only") == 1
    empty = ShardIndex([], [])
    assert len(empty) == 0 and empty.bm25_scores("文書").shape == (0,)


def test_the_index_does_not_depend_on_how_documents_are_chunked(index, monkeypatch):
    texts = [*DOCS.values(), *japanese_like_texts(40, 200, seed=11)]
    monkeypatch.setattr(lexical, "_CHUNK_DOCS", 7)
    chunked = ShardIndex(index.doc_ids, texts)
    for query in ("静岡県のお茶", "観点から説明します", "の", "あ"):
        assert np.array_equal(chunked.bm25_scores(query), index.bm25_scores(query))
    assert np.array_equal(chunked._docs, index._docs)


def test_documents_left_empty_or_with_one_character_are_indexed():
    index = ShardIndex(["empty", "one", "two"], ["、。", "猫", "猫と犬"])
    assert index.overlap("猫", "one") == 1.0 and index.rank_of("猫", "one") == 1
    assert index.overlap("猫と", "two") == 1.0 and index.overlap("猫と", "one") == 0.0
    assert index.rank_of("猫", "empty") == 3
    with pytest.raises(ValueError):
        ShardIndex(["a", "a"], ["x", "y"])


# --- the round trip and copying -----------------------------------------------------------------------------


def _bigram_jaccard(query: str, document: str) -> float:
    """A second stage that disagrees with BM25's weighting: plain bigram Jaccard similarity."""
    a, b = set(char_bigrams(query)), set(char_bigrams(document))
    return len(a & b) / len(a | b) if a | b else 0.0


def test_the_round_trip_re_ranks_the_first_stages_candidates_and_passes_pairs_within_top_k(index):
    texts = dict(zip(index.doc_ids, [*DOCS.values(), *japanese_like_texts(40, 200, seed=11)]))
    items = [
        ("静岡県のお茶", "tea"),
        ("静岡県のお茶", "fuji"),
        ("回転寿司の店", "sushi"),
        ("新幹線", "kyoto"),
        ("", "abc"),
    ]
    checks = lexical_checks(index, items, candidates=3)
    to_score = scored_pairs(items, checks)
    assert len(to_score) == len(set(to_score))
    assert {pair for pair in items} <= set(to_score)
    assert {(query, doc) for (query, _), check in zip(items, checks) for doc in check.candidates} <= set(to_score)

    score = {pair: _bigram_jaccard(pair[0], texts[pair[1]]) for pair in to_score}
    trips = round_trips(items, checks, lambda query, doc: score[query, doc], RoundTripSettings(3, 1))
    for (query, source), check, trip in zip(items, checks, trips):
        if source not in check.candidates:
            assert (trip.rerank_rank, trip.passed) == (None, False), (query, source)
            continue
        expected = sorted(check.candidates, key=lambda doc: (-score[query, doc], check.candidates.index(doc)))
        assert trip.rerank_rank == 1 + expected.index(source) and trip.passed == (trip.rerank_rank == 1)
    assert (trips[0].rerank_rank, trips[0].passed) == (1, True)
    assert trips[0].reranked == tuple(
        sorted(((doc, score["静岡県のお茶", doc]) for doc in checks[0].candidates), key=lambda item: -item[1])
    )
    assert trips[3] == trips[4] == RoundTrip(None, False)
    # Fuji is a candidate for the tea query, but not its best: it fails at top_k 1 and passes at top_k 3.
    assert trips[1].rerank_rank is not None and trips[1].rerank_rank > 1 and not trips[1].passed
    wider = round_trips(items, checks, lambda query, doc: score[query, doc], RoundTripSettings(3, 3))
    assert wider[1].passed


def test_a_constant_second_stage_keeps_the_first_stages_order(index):
    items = [("静岡県のお茶", "fuji"), ("静岡県のお茶", "tea")]
    checks = lexical_checks(index, items, candidates=5)
    trips = round_trips(items, checks, lambda query, doc: 0.5, RoundTripSettings(5, 1))
    assert [trip.rerank_rank for trip in trips] == [
        check.candidates.index(source) + 1 for (_, source), check in zip(items, checks)
    ]


def test_copying_measures_the_longest_verbatim_run_of_the_query_in_its_document():
    document = DOCS["fuji"]
    assert copying("日本一高い山", document) == Copying(1.0, True)
    assert copying("日本一高い山はどこ", document) == Copying(6 / 9, False)
    assert copying("ｶﾞｲﾄﾞ", "ガイドです") == Copying(1.0, True)  # NFKC, as the corpus and BM25 compare
    assert copying("英語の質問", document).share < 0.5 and copying("", document) == Copying(0.0, False)


def test_mining_keeps_the_best_rivals_the_score_and_near_duplicate_guards_let_through():
    texts = {
        "src": DOCS["fuji"],
        "dup": DOCS["fuji"].replace("3776", "3,776"),  # the same text with a small edit
        **{name: DOCS[name] for name in ("tea", "rail", "sushi", "kyoto", "abc")},
    }
    bigrams = {doc_id: frozenset(char_bigrams(text)) for doc_id, text in texts.items()}
    assert jaccard(bigrams["src"], bigrams["dup"]) >= 0.8 > jaccard(bigrams["src"], bigrams["tea"])
    reranked = [("tea", 0.9), ("src", 0.8), ("rail", 0.78), ("dup", 0.5), ("sushi", 0.4), ("kyoto", 0.3), ("abc", 0.2)]
    settings = NegativeSettings(per_pair=2, relative_margin=0.05, max_similarity=0.8)
    mined = mine("src", reranked, bigrams.__getitem__, settings)
    # tea scores above the positive and rail within 5% of it: both may answer the query; dup is the positive.
    assert mined == Negatives(("sushi", "kyoto"), (5, 6), (0.4, 0.3), too_close=2, near_duplicates=1)
    assert mine("src", reranked, bigrams.__getitem__, NegativeSettings(10, 0.0, 0.8)).doc_ids == (
        "rail",
        "sushi",
        "kyoto",
        "abc",
    )
    # Candidates of the other split are passed over, not counted: the training pairs' splits share no document.
    other_split = {"sushi", "tea"}
    assert mine("src", reranked, bigrams.__getitem__, settings, lambda doc_id: doc_id not in other_split) == Negatives(
        ("kyoto", "abc"), (6, 7), (0.3, 0.2), too_close=1, near_duplicates=1
    )
    # A scorer that cannot tell documents apart (a random-weight cross-encoder) leaves no negative.
    flat = [(doc_id, 0.5048) for doc_id in texts]
    assert mine("src", flat, bigrams.__getitem__, settings) == Negatives((), (), (), len(texts) - 1, 0)
