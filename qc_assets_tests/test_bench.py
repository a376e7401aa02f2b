"""`qc bench --quick` as a smoke test: every benchmark script runs and reports figures. No timing is asserted."""

from __future__ import annotations

import json
import math

import pytest

from qc_assets.benchmarks import BENCHMARKS, TABLE_END, TABLE_START, render_table, update_readme
from qc_assets_tests.conftest import run_qc


@pytest.mark.timeout(600)
def test_qc_bench_quick_runs_every_benchmark_and_writes_one_results_file(tmp_path):
    result = run_qc(["bench", "--quick", "--results-dir", str(tmp_path)], {})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert summary["quick"] is True
    assert list(summary["benchmarks"]) == [benchmark.name for benchmark in BENCHMARKS]
    for name, entry in summary["benchmarks"].items():
        assert entry["status"] == "ok", name
        figures = entry["results"]["figures"]
        assert figures, f"{name} reported no figure"
        for row in figures:
            assert isinstance(row["value"], (int, float)) and math.isfinite(row["value"]) and row["value"] >= 0, (name, row)
            if row["reference_value"] is not None and row["ratio"] is not None:
                assert row["ratio"] == pytest.approx(row["value"] / row["reference_value"], rel=0.02), (name, row)
    table = (tmp_path / "performance.md").read_text(encoding="utf-8")
    assert table.count("\n| ") == sum(len(entry["results"]["figures"]) for entry in summary["benchmarks"].values()) + 1
    assert "| Whole graph |" in table and "qc bench --quick" in table


def test_a_failed_benchmark_is_a_row_and_the_readme_table_is_replaced_between_its_markers(tmp_path):
    summary = {
        "quick": False, "started_at": "2026-11-21T00:00:00+00:00",
        "machine": {"cpus": 2, "device": "cpu", "python": "3.11"},
        "benchmarks": {
            "corpus_ingest": {"status": "failed", "exit_status": 1},
            "teacher_client": {
                "status": "ok",
                "results": {"figures": [{
                    "measure": "openai backend", "value": 900.0, "unit": "req/s", "reference": "raw client",
                    "reference_value": 6000.0, "ratio": 0.15, "goal": "≥ 500 req/s", "goal_met": True,
                }]},
            },
        },
    }
    table = render_table(summary)
    assert "| Corpus ingest | failed (exit status 1) |" in table
    assert "| Teacher client | openai backend | 900 req/s | raw client: 6,000 | 0.15 | ≥ 500 req/s: met |" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nprose before\n{TABLE_START}\nold table\n{TABLE_END}\nprose after\n", encoding="utf-8")
    update_readme(table, readme)
    text = readme.read_text(encoding="utf-8")
    assert "old table" not in text and table in text
    assert text.startswith("# title\n\nprose before\n") and text.endswith(f"{TABLE_END}\nprose after\n")
    readme.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no `qc bench` markers"):
        update_readme(table, readme)
