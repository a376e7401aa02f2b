"""The whole graph SIGKILLed at points in every stage and resumed with `qc run`, against an uninterrupted run.

Used by `test_reliability.py`, one kill per stage; `crash_and_resume` takes any list of kill points. Each kill takes down `qc run`'s whole process group (the runs' worker processes and the training
subprocess with it), as a crash of the machine would, right after a marker of the stage shows in the run's output
(or, for labelling, after the teacher server has answered a number of requests). Then `qc run` starts again.

The comparison is of what a user keeps: the corpus, the labels (query text included), the SFT dataset version,
the generated queries' and scores' keys, the evaluation's sources and counts; checkpoints by base model and SFT
version, since a checkpoint's name carries the time it was trained.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from qc_assets.defs.student.store import list_checkpoints
from qc_assets.lake.resource import LakeResource
from qc_assets.settings import load_settings
from qc_assets.testing.helpers import BIN, document, write_jsonl
from qc_assets.testing.teacher_server import chat_requests

PLANTED_KEY = "sk-planted-3f9a1c77e0b24d55-never-print"
PLANTED_HUB_TOKEN = "hf_plantedTOKEN8c1d2e3f4a5b6c7d"
TEACHER_CONCURRENCY = 4


@dataclass(frozen=True)
class KillPoint:
    stage: str
    marker: str | None = None  # a line of `qc run`'s output containing this
    requests: int | None = None  # or: the teacher server has answered this many chat requests
    occurrence: int = 1
    delay_s: float = 0.0


# One point per stage, in the graph's order.
KILL_POINTS = (
    KillPoint("corpus", marker="corpus - read "),
    KillPoint("teacher_labels", requests=40),
    KillPoint("sft_dataset", marker="sft_dataset - SFT dataset"),
    KillPoint("student_checkpoints", marker="student_checkpoints - step 3/"),
    KillPoint("generated_queries", marker="generated_queries - transformers: "),
    KillPoint("reranker_scores", marker="reranker_scores - scoring with"),
    KillPoint("eval_summary", marker="success  generated_queries, reranker_scores"),
)


@dataclass
class KillOutcome:
    point: KillPoint
    killed: bool
    seconds: float


@dataclass
class Report:
    kills: list[KillOutcome] = field(default_factory=list)
    final_exit: int | None = None
    differences: list[str] = field(default_factory=list)
    keys_paid_twice: int = 0
    in_flight_bound: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    secret_leaks: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def shard_document(shard: int, index: int) -> str:
    return document(shard * 100 + index, "障害")


def shard_document_head(shard: int, index: int) -> str:
    """The first sentence of document `index` of `shard`, found in no other document of the corpus."""
    return shard_document(shard, index).partition("。")[0]


def write_multi_shard_corpus(root: Path, shards: int = 2, documents: int = 6) -> Path:
    for shard in range(shards):
        write_jsonl(
            root / f"shard-{shard}.jsonl",
            [{"id": f"s{shard}-{i:03d}", "text": shard_document(shard, i)} for i in range(documents)],
        )
    return root


def graph_environment(data_dir: Path, corpus: Path, server) -> dict[str, str]:
    return {
        "QC_DATA_DIR": str(data_dir),
        "QC_CORPUS_SOURCE": str(corpus),
        "QC_TEACHER_BACKEND": "openai",
        "QC_TEACHER_BASE_URL": server.base_url,
        "QC_TEACHER_MODEL": "crash-teacher",
        "QC_TEACHER_API_KEY": PLANTED_KEY,
        "HF_TOKEN": PLANTED_HUB_TOKEN,
        "QC_TEACHER_CONCURRENCY": str(TEACHER_CONCURRENCY),
        "QC_TEACHER_BATCH_SIZE": "4",
        "QC_TEACHER_BACKOFF_S": "0.05",
        "QC_TEACHER_PRICE": "input=1,output=2",
        "QC_STUDENT_BASE_MODELS": "tiny",
        "QC_SCORER_MODEL": "tiny",
        "QC_SFT_TEST_FRACTION": "0.3",
        "QC_GENERATION_MAX_NEW_TOKENS": "8",
        "QC_STUDENT_MAX_STEPS": "6",
        "OMP_NUM_THREADS": "1",
    }


def _start(env: dict[str, str], output: list[str]) -> tuple[subprocess.Popen, threading.Thread]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("QC_")}
    process = subprocess.Popen(
        [str(BIN / "qc"), "run"],
        env={**clean, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )

    def read() -> None:
        assert process.stdout is not None  # stdout=subprocess.PIPE
        for line in process.stdout:
            output.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return process, reader


def run_until_killed(env: dict[str, str], server, point: KillPoint, timeout_s: float = 300) -> tuple[KillOutcome, str]:
    output: list[str] = []
    started = time.monotonic()
    baseline = len(chat_requests(server))
    process, reader = _start(env, output)
    killed = False
    while time.monotonic() - started < timeout_s:
        if point.requests is not None:
            reached = len(chat_requests(server)) - baseline >= point.requests
        else:
            marker = point.marker
            assert marker is not None, f"kill point {point.stage} has neither a marker nor a request count"
            reached = sum(marker in line for line in list(output)) >= point.occurrence
        if reached:
            time.sleep(point.delay_s)
            killed = process.poll() is None
            if killed:
                os.killpg(process.pid, signal.SIGKILL)
            break
        if process.poll() is not None:
            break
        time.sleep(0.005)
    else:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    reader.join(timeout=10)
    return KillOutcome(point, killed, round(time.monotonic() - started, 1)), "".join(output)


def run_to_end(env: dict[str, str]) -> tuple[int, str]:
    output: list[str] = []
    process, reader = _start(env, output)
    process.wait(timeout=900)
    reader.join(timeout=10)
    return process.returncode, "".join(output)


def lake_state(data_dir: Path) -> dict[str, list]:
    """What a user keeps, comparable between two data directories."""
    settings = load_settings({"QC_DATA_DIR": str(data_dir)})
    lake = LakeResource(catalog=settings.catalog, data_path=settings.data_path, read_only=True)
    checkpoints = list_checkpoints(data_dir / "checkpoints")
    by_name = {c.checkpoint: f"{c.manifest.get('base_model')}@{c.manifest.get('dataset_version')}" for c in checkpoints}
    with lake.get_connection() as connection:

        def rows(query: str) -> list:
            return sorted(connection.execute(query).fetchall())

        state = {
            "corpus": rows("SELECT doc_id, shard, text FROM corpus"),
            "teacher_labels": rows("SELECT doc_id, shard, category, query, teacher FROM teacher_labels"),
            "teacher_quarantine": rows("SELECT doc_id, category FROM teacher_quarantine"),
            "checkpoints": sorted(
                by_name.get(name, f"unlisted:{name}") for (name,) in rows("SELECT checkpoint FROM checkpoints")
            ),
            "generated_queries": sorted(
                (by_name.get(checkpoint, checkpoint), doc_id, shard, category)
                for checkpoint, doc_id, shard, category in rows(
                    "SELECT checkpoint, doc_id, shard, category FROM generated_queries"
                )
            ),
            "reranker_scores": sorted(
                (by_name.get(source, source), doc_id, category)
                for source, doc_id, category in rows("SELECT source, doc_id, category FROM reranker_scores")
            ),
            "eval_summary": sorted(
                (by_name.get(source, source), category, n)
                for source, category, n in rows("SELECT source, category, n FROM eval_summary")
            ),
        }
    state["checkpoint_directories"] = sorted(by_name.values())
    current = data_dir / "sft" / "current.json"
    state["sft_version"] = [json.loads(current.read_text())["version"]] if current.exists() else []
    return state


def compare(expected: dict[str, list], actual: dict[str, list]) -> list[str]:
    differences = []
    for name, rows in expected.items():
        got = actual.get(name, [])
        duplicated = [row for row, count in Counter(map(repr, got)).items() if count > 1]
        if duplicated:
            differences.append(f"{name}: {len(duplicated)} duplicated rows, e.g. {duplicated[0]}")
        missing, extra = set(map(repr, rows)) - set(map(repr, got)), set(map(repr, got)) - set(map(repr, rows))
        if missing:
            differences.append(f"{name}: {len(missing)} rows missing, e.g. {sorted(missing)[0]}")
        if extra:
            differences.append(f"{name}: {len(extra)} rows extra, e.g. {sorted(extra)[0]}")
    return differences


def keys_paid_twice(server) -> int:
    delivered = Counter(
        (entry["category"], entry["text_key"])
        for entry in chat_requests(server)
        if entry["delivered"] and entry.get("status") == 200
    )
    return sum(count - 1 for count in delivered.values())


def find_secrets(paths: list[Path], texts: list[str], secrets: tuple[str, ...]) -> list[str]:
    """Where any secret shows: in the given texts (process output), in any file's bytes, and inside every parquet
    file's values (compressed pages hide strings from a byte search)."""
    import duckdb

    leaks = []
    for index, text in enumerate(texts):
        leaks += [f"output {index}" for secret in secrets if secret in text]
    encoded = [secret.encode() for secret in secrets]
    for root in paths:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes()
            leaks += [str(path) for secret in encoded if secret in data]
            if path.suffix == ".parquet":
                connection = duckdb.connect()
                try:
                    values = repr(connection.execute("SELECT * FROM read_parquet($1)", [str(path)]).fetchall())
                finally:
                    connection.close()
                leaks += [f"{path} (values)" for secret in secrets if secret in values]
    return leaks


def crash_and_resume(work: Path, points: tuple[KillPoint, ...] = KILL_POINTS) -> Report:
    """An uninterrupted run and a killed-and-resumed one on the same corpus, side by side, and what differs."""
    from qc_assets.testing.teacher_server import run_teacher_server

    corpus = write_multi_shard_corpus(work / "corpus")
    report = Report()
    plan = {"latency_ms": 20, "rules": []}
    for name in ("reference", "crashed"):
        (work / name).mkdir(parents=True, exist_ok=True)
    # The uninterrupted run goes in a thread, on its own teacher server and data directory: the two share only the
    # corpus, and the kills below never touch its process group.
    reference: dict = {}

    def run_reference() -> None:
        with run_teacher_server(work / "reference", plan, api_key=PLANTED_KEY) as server:
            reference["exit"], reference["output"] = run_to_end(
                graph_environment(work / "reference" / "data", corpus, server)
            )

    uninterrupted = threading.Thread(target=run_reference)
    uninterrupted.start()
    try:
        with run_teacher_server(work / "crashed", plan, api_key=PLANTED_KEY) as server:
            env = graph_environment(work / "crashed" / "data", corpus, server)
            for point in points:
                outcome, output = run_until_killed(env, server, point)
                report.kills.append(outcome)
                report.outputs.append(output)
            report.final_exit, output = run_to_end(env)
            report.outputs.append(output)
            report.keys_paid_twice = keys_paid_twice(server)
    finally:
        uninterrupted.join()
    if reference.get("exit") != 0:
        raise RuntimeError(
            f"the uninterrupted run failed ({reference.get('exit')}):\n{reference.get('output', '')[-4000:]}"
        )
    report.outputs.insert(0, reference["output"])
    labelling_kills = sum(kill.killed for kill in report.kills if kill.point.stage == "teacher_labels")
    report.in_flight_bound = labelling_kills * TEACHER_CONCURRENCY
    actual = lake_state(work / "crashed" / "data")
    report.differences = compare(lake_state(work / "reference" / "data"), actual)
    report.rows = {name: len(rows) for name, rows in actual.items()}
    report.secret_leaks = find_secrets(
        [work / "reference" / "data", work / "crashed" / "data"], report.outputs, (PLANTED_KEY, PLANTED_HUB_TOKEN)
    )
    return report
