"""The generated_queries asset's checks and caps: an empty query now and then is reported, not a blocked partition."""

from __future__ import annotations

import dagster as dg

from qc_assets.categories import CATEGORIES
from qc_assets.defs.generation.assets import GenerationResource, GenerationTally, _results, answer_token_cap
from qc_assets.settings import load_settings


def resource(**settings: str) -> GenerationResource:
    return GenerationResource.from_settings(load_settings(settings))


def tally_with(empty: dict[str, int], per_category: int = 100, tiny: bool = False) -> GenerationTally:
    tally = GenerationTally(tiny=tiny)
    for name in CATEGORIES:
        for index in range(per_category):
            tally.add("ckpt-a", name, "" if index < empty.get(name, 0) else "日本の四季", 10, 3)
    return tally


def checks(tally: GenerationTally, generation: GenerationResource) -> dict[str, dg.AssetCheckResult]:
    return {r.check_name: r for r in _results(tally, generation, 1, 1, 1.0) if isinstance(r, dg.AssetCheckResult)}


def test_one_empty_query_passes_and_a_rate_above_the_setting_blocks_with_its_name():
    generation = resource()
    assert generation.max_empty_rate == 0.05
    one = checks(tally_with({"summary": 1}), generation)["empty_queries"]
    assert one.passed and one.metadata["empty_queries"].value == 1

    many = checks(tally_with({"summary": 6}), generation)["empty_queries"]
    assert not many.passed and many.severity == dg.AssetCheckSeverity.ERROR
    assert "ckpt-a, summary" in many.description and "QC_GENERATION_MAX_EMPTY_RATE=0.05" in many.description

    lenient = checks(tally_with({"summary": 6}), resource(QC_GENERATION_MAX_EMPTY_RATE="0.1"))["empty_queries"]
    assert lenient.passed
    tiny = checks(tally_with({"summary": 60}, tiny=True), generation)["empty_queries"]
    assert not tiny.passed and tiny.severity == dg.AssetCheckSeverity.WARN


def test_the_empty_rate_is_reported_per_checkpoint_and_category():
    tally = tally_with({"title": 3})
    tally.add("ckpt-b", "title", "", 5, 1)
    assert tally.empty_rates()[("ckpt-a", "title")] == 0.03
    assert tally.empty_rates()[("ckpt-b", "title")] == 1.0
    assert tally.empty_rates()[("ckpt-a", "query")] == 0.0
    assert "| ckpt-b | title | 1 | 1 | 1.000 |" in tally.empty_table()


def test_each_category_gets_room_for_its_longest_answer_unless_one_cap_is_set():
    caps = resource().token_caps()
    assert caps("summary") == answer_token_cap(CATEGORIES["summary"]) > 2 * CATEGORIES["summary"].max_chars
    assert caps("title") < caps("summary") and caps.longest == caps("summary")
    fixed = resource(QC_GENERATION_MAX_NEW_TOKENS="24").token_caps()
    assert {fixed(name) for name in CATEGORIES} == {24}
