"""The README's reliability figures: the whole graph SIGKILLed several times in every stage, from `qc run` and from
the UI.

`qc run`: one uninterrupted `qc run` of the whole graph (2 shards of 6 documents, tiny models, the test teacher
with a planted API key), then the same graph with `qc run`'s process group SIGKILLed at three points in each of its
7 stages, each kill followed by the next `qc run`, which resumes. Printed: the kills that landed per stage, whether
the final run succeeded, every difference from the uninterrupted lake (missing, extra or duplicated rows), the
teacher keys paid for twice (only answers in flight at a kill can be: the bound is the kills in labelling times
the concurrency), and whether the planted key or hub token shows in any file, parquet value or output.

The UI: the whole graph launched from `qc ui` (3 shards; one backfill, then the checkpoint sensor and the report's
automation), with the webserver and then the daemon SIGKILLed in each stage and `qc ui` started again after each
kill, a checkpoint dropped in by hand during labelling and an analyst running `qc sql` throughout. Printed: the
kills that landed per stage and victim, the runs that did not succeed, the teacher keys paid twice (goal 0: no run
worker is killed), the analyst's failed or inconsistent answers, and what is wrong in the final lake.

    python bench/reliability.py [--only cli|ui] [--json bench/results/reliability.json] [--keep DIR]

These are the scenarios of qc_assets_tests/test_reliability.py and test_ui_whole_graph.py with more kills; together
they take about 11 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from qc_assets.testing.crash_resume import KillPoint, crash_and_resume
from qc_assets.testing.ui_whole_graph import EVERY_UI_KILL, run_whole_graph_from_the_ui

ROOT = Path(__file__).resolve().parents[1]

# Three points per stage, in the graph's order: each kill's resumed run is the next point's victim. Labelling
# points count the teacher's answers from the start of that run.
KILL_PLAN = (
    KillPoint("corpus", marker="corpus - read "),
    KillPoint("corpus", marker="corpus - read ", delay_s=0.3),
    KillPoint("corpus", marker="corpus - read ", occurrence=2),
    KillPoint("teacher_labels", requests=10),
    KillPoint("teacher_labels", requests=20),
    KillPoint("teacher_labels", requests=15),
    KillPoint("sft_dataset", marker="sft_dataset - SFT dataset"),
    KillPoint("sft_dataset", marker="sft_dataset - SFT dataset", delay_s=0.1),
    KillPoint("sft_dataset", marker="sft_dataset - SFT dataset", delay_s=0.3),
    KillPoint("student_checkpoints", marker="student_checkpoints - step 1/"),
    KillPoint("student_checkpoints", marker="student_checkpoints - step 3/"),
    KillPoint("student_checkpoints", marker="student_checkpoints - step 5/"),
    KillPoint("generated_queries", marker="generated_queries - transformers: "),
    KillPoint("generated_queries", marker="generated_queries - transformers: ", delay_s=1.0),
    KillPoint("generated_queries", marker="generated_queries - transformers: ", delay_s=2.0),
    KillPoint("reranker_scores", marker="reranker_scores - scoring with"),
    KillPoint("reranker_scores", marker="reranker_scores - scoring with", delay_s=0.5),
    KillPoint("reranker_scores", marker="reranker_scores - scoring with", delay_s=1.5),
    KillPoint("eval_summary", marker="success  generated_queries, reranker_scores"),
    KillPoint("eval_summary", marker="success  generated_queries, reranker_scores", delay_s=0.5),
    KillPoint("eval_summary", marker="success  generated_queries, reranker_scores", delay_s=1.0),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("cli", "ui"), default=None, help="one of the two scenarios")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "reliability.json")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temporary dir)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="qc-reliability-"))
    results, ok = {}, True
    try:
        if args.only in (None, "cli"):
            results["cli"], passed = command_line_kills(work / "cli")
            ok = ok and passed
        if args.only in (None, "ui"):
            results["ui"], passed = ui_kills(work / "ui")
            ok = ok and passed
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"wrote {args.json}")
    if not ok:
        sys.exit(1)


def command_line_kills(work: Path) -> tuple[dict, bool]:
    started = time.perf_counter()
    report = crash_and_resume(work, KILL_PLAN)
    planned = Counter(point.stage for point in KILL_PLAN)
    landed = Counter(kill.point.stage for kill in report.kills if kill.killed)
    print("qc run, its process group SIGKILLed:")
    print(f"{'stage':<22} {'kills planned':>13} {'kills landed':>12}")
    for stage in planned:
        print(f"{stage:<22} {planned[stage]:>13} {landed[stage]:>12}")
    print(f"final qc run exit status: {report.final_exit}")
    print(
        f"differences from the uninterrupted lake: {len(report.differences)}"
        + "".join(f"\n  {difference}" for difference in report.differences)
    )
    print(
        f"rows compared: {sum(report.rows.values())} ({', '.join(f'{name} {count}' for name, count in report.rows.items())})"
    )
    print(
        f"teacher keys paid twice: {report.keys_paid_twice} (bound: {report.in_flight_bound}, the answers in flight "
        "at the kills in labelling)"
    )
    print(f"planted secrets found: {len(report.secret_leaks)}" + "".join(f"\n  {leak}" for leak in report.secret_leaks))
    print(f"took {time.perf_counter() - started:.0f} s\n")
    passed = not (
        report.final_exit != 0
        or report.differences
        or report.secret_leaks
        or report.keys_paid_twice > report.in_flight_bound
    )
    return {
        "kills_planned": dict(planned),
        "kills_landed": dict(landed),
        "kills": [{"stage": kill.point.stage, "killed": kill.killed, "seconds": kill.seconds} for kill in report.kills],
        "final_exit": report.final_exit,
        "differences": report.differences,
        "rows": report.rows,
        "keys_paid_twice": report.keys_paid_twice,
        "in_flight_bound": report.in_flight_bound,
        "secret_leaks": report.secret_leaks,
    }, passed


def ui_kills(work: Path) -> tuple[dict, bool]:
    work.mkdir(parents=True, exist_ok=True)
    report = run_whole_graph_from_the_ui(work, EVERY_UI_KILL, timeout_s=1800)
    print("qc ui, its webserver or daemon SIGKILLed and qc ui started again:")
    print(f"{'stage':<22} {'webserver killed':>16} {'daemon killed':>13}")
    landed = {(kill.point.stage, kill.point.victim): kill.killed for kill in report.kills}
    for stage in dict.fromkeys(point.stage for point in EVERY_UI_KILL):
        print(
            f"{stage:<22} {'yes' if landed[stage, 'webserver'] else 'missed':>16} "
            f"{'yes' if landed[stage, 'daemon'] else 'missed':>13}"
        )
    failed_runs = [
        f"{run.run_id} {run.status} {','.join(run.assets)} {run.partition}"
        for run in report.runs
        if run.status != "SUCCESS"
    ]
    print(
        f"runs: {len(report.runs)}, not successful: {len(failed_runs)}" + "".join(f"\n  {run}" for run in failed_runs)
    )
    print(
        f"backfill: {report.backfill_status}; the sensor's runs ran beside labelling: {report.sensor_fired_during_labelling}"
    )
    print(f"teacher keys paid twice: {report.keys_paid_twice}")
    print(
        f"analyst queries: {report.analyst_queries}, failed: {len(report.analyst_failures)}, "
        f"inconsistent answers: {len(report.analyst_inconsistencies)}"
    )
    print(
        f"problems in the final lake: {len(report.lake_problems)}" + "".join(f"\n  {p}" for p in report.lake_problems)
    )
    print(f"took {report.seconds:.0f} s\n")
    passed = not (
        failed_runs
        or report.keys_paid_twice
        or report.analyst_failures
        or report.analyst_inconsistencies
        or report.lake_problems
        or report.backfill_status != "COMPLETED_SUCCESS"
    )
    return {
        "kills": [
            {"stage": kill.point.stage, "victim": kill.point.victim, "killed": kill.killed, "seconds": kill.at_seconds}
            for kill in report.kills
        ],
        "runs": len(report.runs),
        "failed_runs": failed_runs,
        "backfill_status": report.backfill_status,
        "sensor_fired_during_labelling": report.sensor_fired_during_labelling,
        "keys_paid_twice": report.keys_paid_twice,
        "analyst_queries": report.analyst_queries,
        "analyst_failures": report.analyst_failures,
        "analyst_inconsistencies": report.analyst_inconsistencies,
        "lake_problems": report.lake_problems,
        "seconds": report.seconds,
    }, passed


if __name__ == "__main__":
    main()
