"""The README's reliability figures: the whole graph SIGKILLed several times in every stage, then compared.

One uninterrupted `qc run` of the whole graph (2 shards of 6 documents, tiny models, the test teacher with a
planted API key), then the same graph with `qc run`'s process group SIGKILLed at three points in each of its 7
stages, each kill followed by the next `qc run`, which resumes. Printed: the kills that landed per stage, whether
the final run succeeded, every difference from the uninterrupted lake (missing, extra or duplicated rows), the
teacher keys paid for twice (only answers in flight at a kill can be: the bound is the kills in labelling times
the concurrency), and whether the planted key or hub token shows in any file, parquet value or output.

    python bench/reliability.py [--json bench/results/reliability.json] [--keep DIR]

This is qc_assets_tests/test_reliability.py's scenario with more kills; it takes about ten minutes on 2 cores.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qc_assets_tests.crash_resume import KillPoint, crash_and_resume  # noqa: E402

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
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "reliability.json")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temporary dir)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="qc-reliability-"))
    started = time.perf_counter()
    try:
        report = crash_and_resume(work, KILL_PLAN)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    planned = Counter(point.stage for point in KILL_PLAN)
    landed = Counter(kill.point.stage for kill in report.kills if kill.killed)
    print(f"{'stage':<22} {'kills planned':>13} {'kills landed':>12}")
    for stage in planned:
        print(f"{stage:<22} {planned[stage]:>13} {landed[stage]:>12}")
    print(f"final qc run exit status: {report.final_exit}")
    print(f"differences from the uninterrupted lake: {len(report.differences)}"
          + "".join(f"\n  {difference}" for difference in report.differences))
    print(f"rows compared: {sum(report.rows.values())} ({', '.join(f'{name} {count}' for name, count in report.rows.items())})")
    print(f"teacher keys paid twice: {report.keys_paid_twice} (bound: {report.in_flight_bound}, the answers in flight "
          "at the kills in labelling)")
    print(f"planted secrets found: {len(report.secret_leaks)}" + "".join(f"\n  {leak}" for leak in report.secret_leaks))
    print(f"took {time.perf_counter() - started:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "kills_planned": dict(planned), "kills_landed": dict(landed),
        "kills": [{"stage": kill.point.stage, "killed": kill.killed, "seconds": kill.seconds} for kill in report.kills],
        "final_exit": report.final_exit, "differences": report.differences, "rows": report.rows,
        "keys_paid_twice": report.keys_paid_twice, "in_flight_bound": report.in_flight_bound,
        "secret_leaks": report.secret_leaks,
    }, indent=2), encoding="utf-8")
    print(f"wrote {args.json}")
    if report.final_exit != 0 or report.differences or report.secret_leaks or report.keys_paid_twice > report.in_flight_bound:
        sys.exit(1)


if __name__ == "__main__":
    main()
