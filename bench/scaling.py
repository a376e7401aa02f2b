"""The whole graph at 1,000, 10,000 and 100,000 documents: wall time, time per document per stage, peak memory,
storage, and the orchestration/storage overhead left when model compute is taken out.

For each size: synthetic Japanese-like shards of `--shard-docs` documents (default 10,000, a realistic shard:
fineweb-2-edu-japanese's hold about 97,000, and a shard is what one run holds; so 100,000 documents = 10 shards,
10,000 = one, 1,000 = one shard of 1,000), the teacher test server at zero latency as an `openai` teacher, the tiny
student and cross-encoder (`qc models tiny`), and the real `qc run` as a subprocess, exactly what a user runs. Then,
from the run's own Dagster instance (QC_DATA_DIR/dagster): each run's start and end, each step's duration, and
the compute seconds the assets record (training, generation, cross-encoder scoring: wall and CPU).

- Time per document: every stage's wall span and every asset's step time, in ms per document. The reference for
  linearity is the same figure at the previous size: per-document cost at 100,000 within 1.2x of that at 10,000.
- Peak memory: the largest resident set of any process of the run (`qc run`, its worker processes, the Pipes
  training subprocess), from wait4() on `qc run`: Linux gives a waited-for process's maximum over itself and every
  descendant it waited for (RUSAGE_BOTH), so grandchildren count. A psutil sampler (0.5 s) also names the
  biggest process. The teacher server is this script's child and is not in it. Goal: flat from 10,000 to 100,000.
- Storage: bytes under the lake (catalog + parquet files) and under the whole QC_DATA_DIR.
- Overhead: wall time minus model compute (tiny-model training steps; generation and cross-encoder scoring, each
  with loading its model, as those assets count their model compute; the teacher's latency is 0 here), per document; goal under 1 ms per document at 100,000. Accounting for the
  teacher: its test server runs on the same cores; its CPU seconds are reported and never subtracted. The teacher
  client's work (the openai SDK, about 1 ms of CPU a request, 7 requests a document; the journal; lake writes) is
  the pipeline's and is in the overhead; a second figure takes out the wall time while any teacher_labels step
  runs (what a real teacher's latency would fill), leaving orchestration and storage.
- CPU account, robust when other work shares the machine: CPU seconds of `qc run` and all its descendants (wait4)
  minus the model compute's CPU seconds (and minus the labelling's, for the second figure).

    python bench/scaling.py [--sizes 1000,10000,100000] [--shard-docs 10000] [--quick] [--keep DIR]
    python bench/scaling.py --sizes 10000,100000 --light-models      # less model compute, same pipeline
    python bench/scaling.py --sizes 1000,10000 --code /path/to/old/checkout   # before/after

Writes bench/results/scaling.json (or --json PATH). Not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from qc_assets.benchmarks import RESULTS_DIR, figure, write_results
from qc_assets.defs.corpus.synthetic import write_fineweb_shard
from qc_assets.testing.teacher_server import run_teacher_server

ROOT = Path(__file__).resolve().parent.parent

QC = Path(sys.executable).parent / "qc"
LINEARITY_GOAL = 1.2
# --light-models: shorter queries and shorter scored pairs, for a 100,000-document run that fits in an hour on 2 cores.
LIGHT_MODELS = {"QC_GENERATION_MAX_NEW_TOKENS": "16", "QC_SCORER_MAX_LENGTH": "128"}
OVERHEAD_GOAL_MS = 1.0
# What each asset records as model compute (seconds), by metadata key: the generation and scoring assets count
# loading their model as part of it.
COMPUTE_KEYS = {
    "student_checkpoints": ("train_seconds",),
    "generated_queries": ("generate_seconds", "model_load_seconds"),
    "reranker_scores": ("score_seconds", "model_load_seconds"),
}
# The same, in CPU seconds of the process (every thread), for the CPU account (robust to a busy machine).
COMPUTE_CPU_KEYS = {
    "student_checkpoints": "train_cpu_seconds",
    "generated_queries": "generate_cpu_seconds",
    "reranker_scores": "score_cpu_seconds",
}


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


class MemorySampler(threading.Thread):
    """Samples the resident set of every process under `pid` twice a second; remembers the biggest of each kind."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.peak_by_kind: dict[str, int] = defaultdict(int)
        self.peak_tree = 0
        self.samples: list[tuple[float, int, int, int]] = []  # (time, pid, parent pid, rss)

    @staticmethod
    def kind(process) -> str:
        try:
            line = " ".join(process.cmdline())
        except Exception:
            return "?"
        if "qc_assets.training.train" in line:
            return "training subprocess"
        if "multiprocessing" in line or "spawn_main" in line:
            return "run worker"
        if "/qc " in line or line.endswith("/qc") or " run" in line:
            return "qc run"
        return "other (resource tracker, log tailers)"

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except self.psutil.NoSuchProcess:
                return
            tree = 0
            for process in processes:
                try:
                    rss = process.memory_info().rss
                    self.samples.append((time.time(), process.pid, process.ppid(), rss))
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    continue
                tree += rss
                kind = self.kind(process)
                self.peak_by_kind[kind] = max(self.peak_by_kind[kind], rss)
            self.peak_tree = max(self.peak_tree, tree)
            self.stop.wait(self.interval_s)


def write_corpus(directory: Path, documents: int, shard_docs: int, mean_chars: int) -> int:
    shards = 0
    for start in range(0, documents, shard_docs):
        count = min(shard_docs, documents - start)
        write_fineweb_shard(directory / f"train-{shards:05d}.parquet", count, mean_chars, seed=shards)
        shards += 1
    return shards


def build_tiny_models(directory: Path, env: dict[str, str]) -> Path:
    models = directory / "data" / "models"
    if not models.exists():
        subprocess.run(
            [str(QC), "models", "tiny"],
            env={**env, "QC_DATA_DIR": str(directory / "data")},
            check=True,
            capture_output=True,
        )
    return models


def run_qc(env: dict[str, str], log_path: Path, code: Path) -> tuple[int, float, int, float, MemorySampler]:
    """`qc run` as a subprocess; (exit status, wall seconds, max RSS of it and its descendants in bytes, their CPU
    seconds, sampler)."""
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(QC), "run"], env=env, cwd=code, stdout=log, stderr=subprocess.STDOUT)
        sampler = MemorySampler(process.pid)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    return process.returncode, wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime, sampler


def instance_figures(dagster_home: Path) -> dict:
    """Runs, steps and compute seconds from the run's Dagster instance."""
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(dagster_home))
    try:
        # A fresh instance: its runs are the backfill's and those the sensor and the automation launched after it.
        records = instance.get_run_records()
        stages: dict[str, dict] = {}
        steps: dict[str, dict] = defaultdict(lambda: {"seconds": 0.0, "count": 0, "intervals": []})
        compute: dict[str, float] = defaultdict(float)
        compute_cpu: dict[str, float] = defaultdict(float)
        step_processes: list[tuple[str, int | None, float, float]] = []
        metadata: dict[str, list[dict]] = defaultdict(list)
        counted: set[tuple[str, str]] = set()
        for record in records:
            run = record.dagster_run
            keys = sorted(key.to_user_string() for key in (run.asset_selection or ()))
            label = ", ".join(keys)
            stage = stages.setdefault(
                label,
                {
                    "runs": 0,
                    "start": float("inf"),
                    "end": 0.0,
                    "create": float("inf"),
                    "run_seconds": 0.0,
                    "step_seconds": 0.0,
                    "statuses": defaultdict(int),
                },
            )
            stage["runs"] += 1
            stage["statuses"][run.status.value] += 1
            created = record.create_timestamp.timestamp()
            start, end = record.start_time or created, record.end_time or created
            stage["create"] = min(stage["create"], created)
            stage["start"] = min(stage["start"], start)
            stage["end"] = max(stage["end"], end)
            stage["run_seconds"] += end - start
            step_pids = {
                event.dagster_event.step_key: event.dagster_event.pid
                for event in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
            }
            for step in instance.get_run_step_stats(run.run_id):
                if step.start_time is None or step.end_time is None:
                    continue
                step_processes.append((step.step_key, step_pids.get(step.step_key), step.start_time, step.end_time))
                seconds = step.end_time - step.start_time
                steps[step.step_key]["seconds"] += seconds
                steps[step.step_key]["count"] += 1
                steps[step.step_key]["intervals"].append((step.start_time, step.end_time))
                stage["step_seconds"] += seconds
            for event in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
                materialization = event.asset_materialization
                asset = materialization.asset_key.to_user_string()
                values = {
                    key: value.value
                    for key, value in materialization.metadata.items()
                    if isinstance(value.value, (int, float, str, bool))
                }
                metadata[asset].append(values)
                # A partition-range run records its run-wide compute on every partition's materialization.
                if (run.run_id, asset) in counted:
                    continue
                counted.add((run.run_id, asset))
                for key in COMPUTE_KEYS.get(asset, ()):
                    if isinstance(values.get(key), (int, float)):
                        compute[asset] += float(values[key])
                if isinstance(values.get(COMPUTE_CPU_KEYS.get(asset, "")), (int, float)):
                    compute_cpu[asset] += float(values[COMPUTE_CPU_KEYS[asset]])
        return {
            "stages": stages,
            "steps": dict(steps),
            "compute": dict(compute),
            "compute_cpu": dict(compute_cpu),
            "metadata": dict(metadata),
            "step_processes": step_processes,
        }
    finally:
        instance.dispose()


def peak_rss_by_step(step_processes: list, samples: list) -> dict[str, int]:
    """The largest resident set seen while each asset step ran, in the process that ran it or a child of it (the
    training subprocess), over all the step's runs."""
    peaks: dict[str, int] = defaultdict(int)
    for step, pid, start, end in step_processes:
        if pid is None:
            continue
        for moment, sample_pid, parent, rss in samples:
            if start <= moment <= end and pid in (sample_pid, parent):
                peaks[step] = max(peaks[step], rss)
    return dict(peaks)


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Wall-clock time covered by any of the intervals (runs of one stage overlap when they run in parallel)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def fill_compute_fallbacks(figures: dict, log: str) -> None:
    """Code from before the assets recorded compute seconds: derive them from the rates they did record, and the
    cross-encoder's from its "N pairs scored in S s" log lines."""
    compute, metadata = figures["compute"], figures["metadata"]
    if "generated_queries" not in compute:
        compute["generated_queries"] = sum(
            values["documents"] / values["documents_per_second"]
            for values in metadata.get("generated_queries", [])
            if values.get("documents_per_second")
        )
    if "student_checkpoints" not in compute:
        compute["student_checkpoints"] = sum(
            values["train_tokens"] / values["tokens_per_second"]
            for values in metadata.get("student_checkpoints", [])
            if values.get("tokens_per_second")
        )
    if "reranker_scores" not in compute:
        compute["reranker_scores"] = sum(float(seconds) for seconds in re.findall(r"pairs scored in ([0-9.]+)s", log))


def measure(
    size: int,
    shard_docs: int,
    mean_chars: int,
    work: Path,
    models: Path | None,
    base_env: dict,
    code: Path,
) -> dict:
    directory = work / f"size-{size}"
    if directory.exists():
        shutil.rmtree(directory)
    corpus_dir, data_dir = directory / "corpus", directory / "data"
    shards = write_corpus(corpus_dir, size, shard_docs, mean_chars)
    if models is not None:
        shutil.copytree(models, data_dir / "models")
    with run_teacher_server(directory, {"latency_ms": 0, "rules": []}) as server:
        env = {
            **base_env,
            "QC_DATA_DIR": str(data_dir),
            "QC_CORPUS_SOURCE": str(corpus_dir),
            "QC_TEACHER_BACKEND": "openai",
            "QC_TEACHER_BASE_URL": server.base_url,
            "QC_TEACHER_MODEL": "bench-teacher",
            "QC_TEACHER_PRICE": "free",
            "QC_TEACHER_BACKOFF_S": "0.05",
        }
        server_cpu_before = server.cpu_seconds()
        status, wall, peak_rss, cpu, sampler = run_qc(env, directory / "qc-run.log", code)
        server_cpu = server.cpu_seconds() - server_cpu_before
    if status != 0:
        tail = (directory / "qc-run.log").read_text(errors="replace")[-4000:]
        raise RuntimeError(f"qc run failed for {size} documents (exit {status}):\n{tail}")
    figures = instance_figures(data_dir / "dagster")
    fill_compute_fallbacks(figures, (directory / "qc-run.log").read_text(errors="replace"))
    compute_s = sum(figures["compute"].values())
    # The teacher's side of labelling: at latency 0 the exchange costs the client's CPU (the openai SDK, about 1 ms
    # a request; see bench/teacher_client.py) and the test server's. The wall time while any teacher_labels step
    # ran, and what its requests loop took (metadata `seconds`), summed over shards.
    teacher_steps = [
        interval
        for key, step in figures["steps"].items()
        if key.endswith("teacher_labels")
        for interval in step["intervals"]
    ]
    teacher_wall = union_seconds(teacher_steps)
    teacher_loop = sum(values.get("seconds", 0.0) for values in figures["metadata"].get("teacher_labels", []))
    teacher_step_sum = sum(stop - start for start, stop in teacher_steps)
    teacher_cpu = sum(values.get("cpu_seconds", 0.0) for values in figures["metadata"].get("teacher_labels", []))
    compute_cpu_s = sum(figures["compute_cpu"].values())
    # Only when every compute figure has its CPU twin (code from before did not record them).
    cpu_account = len(figures["compute_cpu"]) == len(COMPUTE_CPU_KEYS) and teacher_cpu > 0
    stage_spans = {label: stage["end"] - stage["create"] for label, stage in figures["stages"].items()}
    return {
        "documents": size,
        "shards": shards,
        "wall_seconds": round(wall, 2),
        "ms_per_document": round(1000 * wall / size, 3),
        "stages": {
            label: {
                "runs": stage["runs"],
                "statuses": dict(stage["statuses"]),
                "wall_seconds": round(stage_spans[label], 2),
                "ms_per_document": round(1000 * stage_spans[label] / size, 3),
                "run_seconds_sum": round(stage["run_seconds"], 2),
                "step_seconds_sum": round(stage["step_seconds"], 2),
            }
            for label, stage in sorted(figures["stages"].items(), key=lambda item: item[1]["create"])
        },
        "outside_stages_seconds": round(wall - sum(stage_spans.values()), 2),
        "steps": {
            step: {
                "seconds_sum": round(value["seconds"], 2),
                "runs": value["count"],
                "wall_seconds": round(union_seconds(value["intervals"]), 2),
                "ms_per_document": round(1000 * value["seconds"] / size, 3),
            }
            for step, value in figures["steps"].items()
        },
        "compute_seconds": {asset: round(seconds, 2) for asset, seconds in figures["compute"].items()},
        "overhead_seconds": round(wall - compute_s, 2),
        "overhead_ms_per_document": round(1000 * (wall - compute_s) / size, 3),
        "teacher_server_cpu_seconds": round(server_cpu, 2),
        "teacher_labels": {
            "wall_seconds": round(teacher_wall, 2),
            "step_seconds_sum": round(teacher_step_sum, 2),
            "request_loop_seconds_sum": round(teacher_loop, 2),
            "labels_per_second": round(7 * size / teacher_wall, 1) if teacher_wall else None,
        },
        "cpu": {
            "qc_run_tree_cpu_seconds": round(cpu, 2),
            "model_compute_cpu_seconds": {asset: round(value, 2) for asset, value in figures["compute_cpu"].items()},
            "teacher_labelling_cpu_seconds": round(teacher_cpu, 2),
            "overhead_cpu_seconds": round(cpu - compute_cpu_s, 2) if cpu_account else None,
            "overhead_cpu_ms_per_document": round(1000 * (cpu - compute_cpu_s) / size, 3) if cpu_account else None,
            "overhead_without_teacher_cpu_ms_per_document": round(1000 * (cpu - compute_cpu_s - teacher_cpu) / size, 3)
            if cpu_account
            else None,
        },
        "overhead_without_teacher_seconds": round(wall - compute_s - teacher_wall, 2),
        "overhead_without_teacher_ms_per_document": round(1000 * (wall - compute_s - teacher_wall) / size, 3),
        "peak_rss_bytes": peak_rss,
        "peak_rss_by_process_kind": dict(sampler.peak_by_kind),
        "peak_rss_by_step": peak_rss_by_step(figures["step_processes"], sampler.samples),
        "peak_rss_tree_sum_bytes": sampler.peak_tree,
        "lake_bytes": tree_bytes(data_dir / "lake"),
        "data_dir_bytes": tree_bytes(data_dir),
        "asset_metadata": figures["metadata"],
    }


def mib(value: int) -> str:
    return f"{value / 2**20:,.0f} MiB"


def print_size(result: dict) -> None:
    size = result["documents"]
    print(
        f"\n{size:,} documents, {result['shards']} shards: wall {result['wall_seconds']:.1f} s = "
        f"{result['ms_per_document']:.3f} ms/document"
    )
    print(f"  {'stage (qc run)':<42} {'runs':>4} {'wall s':>8} {'ms/doc':>8} {'step s (sum)':>12}")
    for label, stage in result["stages"].items():
        print(
            f"  {label:<42} {stage['runs']:>4} {stage['wall_seconds']:>8.1f} {stage['ms_per_document']:>8.3f} "
            f"{stage['step_seconds_sum']:>12.1f}"
        )
    print(
        f"  {'(start-up, planning, between stages, summary)':<42} {'':>4} {result['outside_stages_seconds']:>8.1f} "
        f"{1000 * result['outside_stages_seconds'] / size:>8.3f}"
    )
    print(f"  {'asset step':<42} {'runs':>4} {'s (sum)':>8} {'ms/doc':>8} {'compute s':>12}")
    for step, value in sorted(result["steps"].items()):
        asset = step.split(".")[-1]
        compute = result["compute_seconds"].get(asset)
        print(
            f"  {step:<42} {value['runs']:>4} {value['seconds_sum']:>8.1f} {value['ms_per_document']:>8.3f} "
            f"{'' if compute is None else f'{compute:12.1f}'}"
        )
    print(
        f"  model compute {sum(result['compute_seconds'].values()):.1f} s; overhead {result['overhead_seconds']:.1f} s "
        f"= {result['overhead_ms_per_document']:.3f} ms/document (goal < {OVERHEAD_GOAL_MS} at 100,000); "
        f"teacher server CPU {result['teacher_server_cpu_seconds']:.1f} s (counted in the overhead)"
    )
    teacher = result["teacher_labels"]
    print(
        f"  teacher_labels: {teacher['wall_seconds']:.1f} s of wall time ({teacher['labels_per_second']} labels/s; request "
        f"loops {teacher['request_loop_seconds_sum']:.1f} s of {teacher['step_seconds_sum']:.1f} s of steps, summed over "
        f"shards); overhead without it {result['overhead_without_teacher_seconds']:.1f} s = "
        f"{result['overhead_without_teacher_ms_per_document']:.3f} ms/document"
    )
    cpu = result["cpu"]
    if cpu["overhead_cpu_ms_per_document"] is not None:
        print(
            f"  CPU: qc run and its descendants {cpu['qc_run_tree_cpu_seconds']:.1f} s, model compute "
            f"{sum(cpu['model_compute_cpu_seconds'].values()):.1f} s, teacher labelling {cpu['teacher_labelling_cpu_seconds']:.1f} s; "
            f"overhead {cpu['overhead_cpu_ms_per_document']:.3f} ms CPU/document, without the teacher's labelling "
            f"{cpu['overhead_without_teacher_cpu_ms_per_document']:.3f}"
        )
    kinds = ", ".join(
        f"{kind} {mib(rss)}"
        for kind, rss in sorted(result["peak_rss_by_process_kind"].items(), key=lambda item: -item[1])
    )
    print(
        f"  peak RSS {mib(result['peak_rss_bytes'])} (largest process; sampled: {kinds}; "
        f"whole tree at once {mib(result['peak_rss_tree_sum_bytes'])})"
    )
    steps = ", ".join(f"{step.split('.')[-1]} {mib(rss)}" for step, rss in sorted(result["peak_rss_by_step"].items()))
    print(f"  peak RSS by step (its process and children): {steps}")
    print(f"  storage: lake {mib(result['lake_bytes'])}, QC_DATA_DIR {mib(result['data_dir_bytes'])}")


def comparisons(results: list[dict]) -> tuple[list[dict], list[dict]]:
    """Each size against the previous one (per-document cost ratio, peak memory ratio), and the table's rows."""
    rows, pairs = [], []
    for previous, current in zip(results, results[1:]):
        pair = {
            "from": previous["documents"],
            "to": current["documents"],
            "ms_per_document_ratio": round(current["ms_per_document"] / previous["ms_per_document"], 3),
            "overhead_ms_per_document_ratio": round(
                current["overhead_ms_per_document"] / previous["overhead_ms_per_document"], 3
            )
            if previous["overhead_ms_per_document"] > 0
            else None,
            "peak_rss_ratio": round(current["peak_rss_bytes"] / previous["peak_rss_bytes"], 3),
            "stage_ms_per_document_ratio": {
                label: round(stage["ms_per_document"] / previous["stages"][label]["ms_per_document"], 3)
                for label, stage in current["stages"].items()
                if label in previous["stages"] and previous["stages"][label]["ms_per_document"] > 0
            },
        }
        pairs.append(pair)
        reference = f"same at {previous['documents']:,} documents"
        rows.append(
            figure(
                f"whole graph, {current['documents']:,} documents: time per document",
                current["ms_per_document"],
                "ms",
                reference,
                previous["ms_per_document"],
                pair["ms_per_document_ratio"],
                f"≤ {LINEARITY_GOAL}x the per-document cost at {previous['documents']:,}",
                pair["ms_per_document_ratio"] <= LINEARITY_GOAL,
            )
        )
        # Memory should not grow with the number of shards; a bigger shard is a bigger working set, so the goal
        # holds between sizes whose shards are the same size.
        same_shard_size = previous["documents"] // previous["shards"] == current["documents"] // current["shards"]
        rows.append(
            figure(
                f"whole graph, {current['documents']:,} documents: peak RSS",
                round(current["peak_rss_bytes"] / 2**20),
                "MiB",
                reference,
                round(previous["peak_rss_bytes"] / 2**20),
                pair["peak_rss_ratio"],
                "flat (≤ 1.1x) with shards of the same size" if same_shard_size else None,
                pair["peak_rss_ratio"] <= 1.1 if same_shard_size else None,
            )
        )
    for result in results:
        at_goal_size = result["documents"] >= 100_000
        for key, what in (
            ("overhead_ms_per_document", "overhead (wall − model compute) per document"),
            (
                "overhead_without_teacher_ms_per_document",
                "overhead without the teacher's labelling (wall − model compute − teacher_labels) per document",
            ),
        ):
            met = result[key] < OVERHEAD_GOAL_MS if at_goal_size else None
            rows.append(
                figure(
                    f"whole graph, {result['documents']:,} documents: {what}",
                    result[key],
                    "ms",
                    "wall time per document",
                    result["ms_per_document"],
                    round(result[key] / result["ms_per_document"], 3),
                    f"< {OVERHEAD_GOAL_MS} ms at 100,000 documents" if at_goal_size else None,
                    met,
                )
            )
    return pairs, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated document counts")
    parser.add_argument("--shard-docs", type=int, default=10_000, help="documents per shard")
    parser.add_argument("--mean-chars", type=int, default=1000, help="mean characters per document")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: one size of 100 documents, light models, 3 training steps, the tiny models "
        "built by the run itself",
    )
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temporary dir)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "scaling.json", help="Where the results go.")
    parser.add_argument(
        "--light-models",
        action="store_true",
        help=f"less model compute: {', '.join(f'{k}={v}' for k, v in LIGHT_MODELS.items())} (the orchestration and "
        "storage paths are the same; compare sizes measured with the same setting)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS for the run (torch's threads per process). On a machine other work shares, 1 avoids "
        "OpenMP threads waiting on each other, which can make the model compute ten times slower",
    )
    parser.add_argument(
        "--code",
        type=Path,
        default=ROOT,
        help="run `qc` on the qc_assets package of this checkout (e.g. an earlier commit, for before/after)",
    )
    args = parser.parse_args()
    sizes = [100] if args.quick else [int(size) for size in args.sizes.split(",")]
    base_env = {key: value for key, value in os.environ.items() if not key.startswith("QC_")}
    base_env.update(
        {
            "QC_STUDENT_BASE_MODELS": "tiny",
            "QC_SCORER_MODEL": "tiny",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    if args.light_models or args.quick:
        base_env.update(LIGHT_MODELS)
    if args.threads:
        base_env["OMP_NUM_THREADS"] = base_env["MKL_NUM_THREADS"] = str(args.threads)
    if args.quick:
        # A smoke run: a few training steps instead of the tiny student's 30.
        base_env["QC_STUDENT_MAX_STEPS"] = "3"
    code = args.code.resolve()
    if code != ROOT:
        base_env["PYTHONPATH"] = str(code) + (os.pathsep + base_env["PYTHONPATH"] if base_env.get("PYTHONPATH") else "")
    work = args.keep or Path(tempfile.mkdtemp(prefix="qc-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        # Built once and copied into each size's data directory, so that no size's time includes building them.
        models = None if args.quick else build_tiny_models(work / "models", base_env)
        for size in sizes:
            print(
                f"== {size:,} documents ({-(-size // args.shard_docs)} shards of up to {args.shard_docs:,})", flush=True
            )
            result = measure(size, args.shard_docs, args.mean_chars, work, models, base_env, code)
            print_size(result)
            results.append(result)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    pairs, rows = comparisons(results)
    for pair in pairs:
        print(
            f"\n{pair['to']:,} vs {pair['from']:,} documents: per-document cost {pair['ms_per_document_ratio']:.3f}x "
            f"(goal ≤ {LINEARITY_GOAL}), overhead per document {pair['overhead_ms_per_document_ratio']}x, "
            f"peak RSS {pair['peak_rss_ratio']:.3f}x (goal flat)"
        )
        for label, ratio in pair["stage_ms_per_document_ratio"].items():
            print(f"    {label:<42} {ratio:.3f}x")
    payload = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "code": str(code),
        "light_models": LIGHT_MODELS if args.light_models or args.quick else None,
        "threads": args.threads,
        "shard_documents": args.shard_docs,
        "mean_chars": args.mean_chars,
        "sizes": results,
        "comparisons": pairs,
        "figures": rows,
    }
    write_results(args.json, payload)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
