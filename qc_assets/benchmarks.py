"""`qc bench`: every benchmark script under bench/, one results file, and the README's performance table.

Each script measures its subject next to a reference in the same process and writes a JSON file whose `figures`
list holds rows made by `figure()`. This module runs the scripts one after the other (they share the machine,
so running them together would skew each other; `--quick`, a smoke run whose figures mean nothing, runs two at
a time), gathers the files into `results.json`, and renders the rows as the markdown table that sits between the
README's two `qc bench` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from qc_assets.paths import PROJECT_ROOT

BENCH_DIR = PROJECT_ROOT / "bench"
RESULTS_DIR = BENCH_DIR / "results"
README = PROJECT_ROOT / "README.md"
TABLE_START = "<!-- qc bench: table start (written by `qc bench`; edits here are overwritten) -->"
TABLE_END = "<!-- qc bench: table end -->"


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    quick_args: tuple[str, ...]
    full_args: tuple[str, ...] = ()
    # Benchmarks whose results this one reads.
    needs: tuple[str, ...] = ()

    @property
    def script(self) -> Path:
        return BENCH_DIR / f"{self.name}.py"


BENCHMARKS = (
    Benchmark("corpus_ingest", "Corpus ingest", ("--rows", "2000")),
    Benchmark("teacher_client", "Teacher client", ("--quick",)),
    Benchmark("generation_scoring", "Generation and scoring", ("--quick",)),
    Benchmark("round_trip", "Round trip and hard negatives", ("--quick",)),
    Benchmark("student_training", "Student training", ("--steps", "3", "--methods", "full")),
    # Light models: the same pipeline with shorter queries and scored pairs, so 100,000 documents fit in about an
    # hour on 2 cores; model compute is taken out of the overhead figures either way.
    Benchmark("scaling", "Whole graph", ("--quick",), ("--light-models",)),
    # After scaling: it projects from what scaling measured.
    Benchmark("projection", "Projection (seed 000's 100M documents)", (), needs=("scaling",)),
)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def figure(
    measure: str,
    value: float,
    unit: str,
    reference: str | None = None,
    reference_value: float | None = None,
    ratio: float | None = None,
    goal: str | None = None,
    goal_met: bool | None = None,
) -> dict:
    """One row of the performance table: a measured value, the reference it is compared with, and the goal. The
    ratio keeps 3 significant digits, so a small one stays as exact as a large one."""
    if ratio is not None:
        ratio = float(f"{ratio:.3g}")
    return {
        "measure": measure,
        "value": value,
        "unit": unit,
        "reference": reference,
        "reference_value": reference_value,
        "ratio": ratio,
        "goal": goal,
        "goal_met": goal_met,
    }


def write_results(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def machine() -> dict:
    device = "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "device": device,
    }


def run_benchmarks(quick: bool, names: tuple[str, ...], results_dir: Path, echo: Callable[[str], None]) -> dict:
    chosen = [benchmark for benchmark in BENCHMARKS if not names or benchmark.name in names]
    unknown = set(names) - {benchmark.name for benchmark in BENCHMARKS}
    if unknown:
        raise ValueError(f"unknown benchmark {sorted(unknown)}; known: {', '.join(b.name for b in BENCHMARKS)}")
    summary: dict = {
        "quick": quick,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "benchmarks": {},
    }
    earlier = _earlier_entries(results_dir, quick, summary["machine"]) if names else {}

    def run(benchmark: Benchmark, needed: list[Future]) -> None:
        for future in needed:
            future.result()
        output = results_dir / f"{benchmark.name}.json"
        output.unlink(missing_ok=True)
        command = [
            sys.executable,
            str(benchmark.script),
            *(benchmark.quick_args if quick else benchmark.full_args),
            "--json",
            str(output),
        ]
        heading = f"\n== {benchmark.title}: {' '.join(command[1:])}"
        if not quick:
            echo(heading)
        started = time.perf_counter()
        # The libraries' progress bars would bury the figures each script prints. Side by side, each script's
        # output is shown whole when it ends rather than interleaved.
        finished = subprocess.run(
            command,
            cwd=PROJECT_ROOT,
            check=False,
            env={**os.environ, "TQDM_DISABLE": "1"},
            capture_output=quick,
            text=True,
        )
        if quick:
            echo(heading + "\n" + finished.stdout + finished.stderr)
        entry: dict = {
            "seconds": round(time.perf_counter() - started, 1),
            "exit_status": finished.returncode,
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if finished.returncode == 0 and output.exists():
            entry["status"] = "ok"
            entry["results"] = json.loads(output.read_text(encoding="utf-8"))
        else:
            entry["status"] = "failed"
        summary["benchmarks"][benchmark.name] = entry

    # A benchmark waits for those it needs, which start first (the whole graph, the longest, before the rest);
    # submitted in that order, each has a worker by the time a later one waits.
    needed_first = sorted(chosen, key=lambda benchmark: not any(benchmark.name in other.needs for other in chosen))
    with ThreadPoolExecutor(max_workers=2 if quick else 1) as pool:
        futures: dict[str, Future] = {}
        for benchmark in needed_first:
            needed = [futures[name] for name in benchmark.needs if name in futures]
            futures[benchmark.name] = pool.submit(run, benchmark, needed)
        for future in futures.values():
            future.result()
    # `--only` updates its benchmarks and keeps the others' last figures from the same machine, so one slow
    # benchmark can be measured again without the rest.
    summary["benchmarks"] = {
        benchmark.name: summary["benchmarks"].get(benchmark.name) or earlier[benchmark.name]
        for benchmark in BENCHMARKS
        if benchmark.name in summary["benchmarks"] or benchmark.name in earlier
    }
    summary["seconds"] = round(sum(entry["seconds"] for entry in summary["benchmarks"].values()), 1)
    write_results(results_dir / "results.json", summary)
    table = render_table(summary)
    (results_dir / "performance.md").write_text(table + "\n", encoding="utf-8")
    return summary


def _earlier_entries(results_dir: Path, quick: bool, this_machine: dict) -> dict:
    path = results_dir / "results.json"
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text(encoding="utf-8"))
    if earlier.get("quick") != quick or earlier.get("machine") != this_machine:
        return {}
    return {name: entry for name, entry in earlier["benchmarks"].items() if entry.get("status") == "ok"}


def is_complete(summary: dict) -> bool:
    """Every benchmark has figures from a full run: what the README's table shows."""
    return not summary["quick"] and all(
        summary["benchmarks"].get(benchmark.name, {}).get("status") == "ok" for benchmark in BENCHMARKS
    )


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.3g}"


def _dates(summary: dict) -> str:
    dates = sorted({entry.get("measured_at", summary["started_at"])[:10] for entry in summary["benchmarks"].values()})
    return " to ".join([dates[0], dates[-1]] if len(dates) > 1 else dates) if dates else summary["started_at"][:10]


def render_table(summary: dict) -> str:
    device = summary["machine"]["device"]
    lines = [
        f"Measured by `qc bench{' --quick' if summary['quick'] else ''}` on {_dates(summary)}: "
        f"{summary['machine']['cpus']} CPUs, device {device}, Python {summary['machine']['python']}.",
        "",
        "| benchmark | measure | value | reference | ratio | goal |",
        "|---|---|---|---|---|---|",
    ]
    titles = {benchmark.name: benchmark.title for benchmark in BENCHMARKS}
    for name, entry in summary["benchmarks"].items():
        if entry["status"] != "ok":
            lines.append(f"| {titles[name]} | failed (exit status {entry['exit_status']}) | | | | |")
            continue
        for row in entry["results"].get("figures", []):
            reference = row["reference"] or "—"
            if row["reference_value"] is not None:
                reference = f"{reference}: {_number(row['reference_value'])}"
            goal = row["goal"] or ""
            if row["goal"] and row["goal_met"] is not None:
                goal += ": met" if row["goal_met"] else ": not met"
            lines.append(
                f"| {titles[name]} | {row['measure']} | {_number(row['value'])} {row['unit']} | {reference} | "
                f"{_number(row['ratio'])} | {goal} |"
            )
    return "\n".join(lines)


def update_readme(table: str, readme: Path = README) -> None:
    """Replace the table between the README's markers; the prose around it is the authors'."""
    text = readme.read_text(encoding="utf-8")
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{readme} has no `qc bench` markers ({TABLE_START} … {TABLE_END})")
    before, rest = text.split(TABLE_START, 1)
    _, after = rest.split(TABLE_END, 1)
    readme.write_text(f"{before}{TABLE_START}\n{table}\n{TABLE_END}{after}", encoding="utf-8")
