"""`qc bench --quick` as a smoke test: every benchmark script runs and reports figures. No timing is asserted."""

from __future__ import annotations

import json
import math

import pytest

from qc_assets.benchmarks import (
    BENCHMARKS,
    TABLE_END,
    TABLE_START,
    render_table,
    update_readme,
)
from qc_assets_tests.conftest import run_qc


@pytest.mark.long(400)
@pytest.mark.timeout(1500)
def test_qc_bench_quick_runs_every_benchmark_and_writes_one_results_file(tmp_path):
    # The whole graph's smoke run (scaling) fine-tunes the tiny cross-encoder and scores every teacher label.
    result = run_qc(["bench", "--quick", "--results-dir", str(tmp_path)], {}, timeout=1400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert summary["quick"] is True
    assert list(summary["benchmarks"]) == [benchmark.name for benchmark in BENCHMARKS]
    for name, entry in summary["benchmarks"].items():
        assert entry["status"] == "ok", name
        figures = entry["results"]["figures"]
        assert figures, f"{name} reported no figure"
        for row in figures:
            assert isinstance(row["value"], (int, float)) and math.isfinite(row["value"]) and row["value"] >= 0, (
                name,
                row,
            )
            if row["reference_value"] is not None and row["ratio"] is not None:
                assert row["ratio"] == pytest.approx(row["value"] / row["reference_value"], rel=0.02), (name, row)
    table = (tmp_path / "performance.md").read_text(encoding="utf-8")
    assert table.count("\n| ") == sum(len(entry["results"]["figures"]) for entry in summary["benchmarks"].values()) + 1
    assert "| Whole graph |" in table and "qc bench --quick" in table


def test_a_failed_benchmark_is_a_row_and_the_readme_table_is_replaced_between_its_markers(tmp_path):
    summary = {
        "quick": False,
        "started_at": "2026-11-21T00:00:00+00:00",
        "machine": {"cpus": 2, "device": "cpu", "python": "3.11"},
        "benchmarks": {
            "corpus_ingest": {"status": "failed", "exit_status": 1},
            "teacher_client": {
                "status": "ok",
                "results": {
                    "figures": [
                        {
                            "measure": "openai backend",
                            "value": 900.0,
                            "unit": "req/s",
                            "reference": "raw client",
                            "reference_value": 6000.0,
                            "ratio": 0.15,
                            "goal": "≥ 500 req/s",
                            "goal_met": True,
                        }
                    ]
                },
            },
        },
    }
    table = render_table(summary)
    assert "| Corpus ingest | failed (exit status 1) |" in table
    assert "| Teacher client | openai backend | 900 req/s | raw client: 6,000 | 0.15 | ≥ 500 req/s: met |" in table
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# title\n\nprose before\n{TABLE_START}\nold table\n{TABLE_END}\nprose after\n", encoding="utf-8"
    )
    update_readme(table, readme)
    text = readme.read_text(encoding="utf-8")
    assert "old table" not in text and table in text
    assert text.startswith("# title\n\nprose before\n") and text.endswith(f"{TABLE_END}\nprose after\n")
    readme.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no `qc bench` markers"):
        update_readme(table, readme)


def _load_projection():
    import importlib.util

    from qc_assets.benchmarks import BENCH_DIR

    spec = importlib.util.spec_from_file_location("projection", BENCH_DIR / "projection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_projection_scales_seed_000s_inputs_by_seven_queries_a_document_and_uses_a_measured_gpu_rate():
    projection = _load_projection()
    measured = {
        "documents": 10_000,
        "lake_bytes": 10_000 * 1_000,
        "peak_rss_bytes": 2**30,
        "teacher_labels": {"labels_per_second": 500.0},
        "overhead_without_teacher_ms_per_document": 2.0,
        "cpu": {"teacher_labelling_cpu_seconds": 70.0, "overhead_without_teacher_cpu_ms_per_document": 1.5},
    }
    scaling = {"sizes": [{**measured, "documents": 1_000}, measured]}
    result = projection.project(scaling, None, 100_000_000, [1, 8])["projection"]
    # Seed 000: 100,000 requests in 7 h at 100 at once for $40; 7 requests a document here.
    assert result["teacher_hours_one_query_per_document"] == 7_000
    assert result["teacher_usd_one_query_per_document"] == 40_000
    assert (result["teacher_hours"], result["teacher_usd"]) == (49_000, 280_000)
    assert result["concurrency_one_client_process_sustains"] == round(500 * 25.2)
    # Seed 000's student rate: 10,000 documents in 100 s on one GPU.
    assert result["generation_hours_one_query_per_document_one_gpu"] == pytest.approx(100_000_000 / 100 / 3600, abs=0.1)
    assert result["generation_hours_by_gpus"]["8"] == pytest.approx(700_000_000 / 100 / 8 / 3600, abs=0.1)
    assert result["orchestration_overhead_hours"] == pytest.approx(2.0e-3 * 1e8 / 3600, abs=0.1)
    assert result["lake_gib"] == pytest.approx(1e11 / 2**30, abs=0.1)
    measured_gpu = {
        "figures": [{"measure": "generation, vllm backend (Qwen3-1.7B shape, H100)", "unit": "req/s", "value": 400.0}]
    }
    faster = projection.project(scaling, measured_gpu, 100_000_000, [1])
    assert faster["projection"]["generation_hours_one_query_per_document_one_gpu"] == pytest.approx(
        1e8 / 400 / 3600, abs=0.1
    )
    assert faster["inputs"]["generation_requests_per_second_per_gpu"]["source"].startswith("measured here")
    with pytest.raises(ValueError, match="no measured size"):
        projection.project({"sizes": []}, None, 1, [1])


def _scaling_results(documents: int = 10_000) -> dict:
    measured = {
        "documents": documents,
        "lake_bytes": documents * 1_000,
        "peak_rss_bytes": 2**30,
        "teacher_labels": {"labels_per_second": 500.0},
        "overhead_without_teacher_ms_per_document": 2.0,
        "cpu": {"teacher_labelling_cpu_seconds": 70.0, "overhead_without_teacher_cpu_ms_per_document": 1.5},
    }
    return {"sizes": [measured], "figures": []}


def test_only_measures_one_benchmark_again_and_keeps_the_others_figures_from_the_same_machine(tmp_path):
    from qc_assets.benchmarks import is_complete, machine, run_benchmarks

    (tmp_path / "scaling.json").write_text(json.dumps(_scaling_results()), encoding="utf-8")
    kept = {
        "status": "ok",
        "seconds": 1.0,
        "exit_status": 0,
        "measured_at": "2026-11-20T00:00:00+00:00",
        "results": {
            "figures": [
                {
                    "measure": "kept",
                    "value": 1.0,
                    "unit": "x",
                    "reference": None,
                    "reference_value": None,
                    "ratio": None,
                    "goal": None,
                    "goal_met": None,
                }
            ]
        },
    }
    earlier = {
        "quick": False,
        "started_at": "2026-11-20T00:00:00+00:00",
        "machine": machine(),
        "benchmarks": {b.name: kept for b in BENCHMARKS if b.name != "projection"},
    }
    (tmp_path / "results.json").write_text(json.dumps(earlier), encoding="utf-8")
    summary = run_benchmarks(False, ("projection",), tmp_path, lambda _: None)
    assert list(summary["benchmarks"]) == [b.name for b in BENCHMARKS]
    assert summary["benchmarks"]["projection"]["status"] == "ok"
    assert summary["benchmarks"]["projection"]["results"]["projection"]["teacher_usd"] == 280_000
    assert summary["benchmarks"]["scaling"] == kept and is_complete(summary)
    assert "on 2026-11-20 to " in render_table(summary)
    # Figures from another machine are never mixed in.
    earlier["machine"] = {**machine(), "cpus": 999}
    (tmp_path / "results.json").write_text(json.dumps(earlier), encoding="utf-8")
    alone = run_benchmarks(False, ("projection",), tmp_path, lambda _: None)
    assert list(alone["benchmarks"]) == ["projection"] and not is_complete(alone)
