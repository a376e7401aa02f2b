"""Teacher client overhead against the local test server, every figure next to a reference from the same run.

- Latency 0: requests/s of the `openai` backend (official async SDK, retries, adaptive limit), and labels/s of
  the whole labelling path (journal + batched lake writes), next to a raw-socket HTTP client driving the same
  server: how close the client gets to what the server and loopback allow. Goal: at least 500 requests/s.
- Latency 200 ms, concurrency 100: achieved requests/s as a ratio of the ideal 100 / 0.2 s = 500/s. Goal 0.9.

    python bench/teacher_client.py [--requests 3000] [--quick]

Writes bench/results/teacher_client.json (or --json PATH). Not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from pathlib import Path

from qc_assets.benchmarks import RESULTS_DIR, figure, write_results
from qc_assets.categories import CATEGORIES
from qc_assets.defs.teacher.backends import Budget, LabelRequest
from qc_assets.defs.teacher.key_budget import KeyBudget, budget_name
from qc_assets.defs.teacher.labeling import LabelSinks, ShardRun, _event_loop_factory, label_shard
from qc_assets.defs.teacher.openai_teacher import OpenAITeacher
from qc_assets.defs.teacher.prices import PRICES
from qc_assets.lake.resource import LakeResource
from qc_assets.testing.teacher_server import raw_http_load, run_teacher_server

ROOT = Path(__file__).resolve().parent.parent

CONCURRENCY = 100
LATENCY_S = 0.2


def documents(count: int, tag: str) -> list[tuple[str, str]]:
    body = "これは教師ラベルの計測に使う日本語の文章で、検索クエリを作るための内容を少し含んでいます。" * 6
    return [(f"{tag}-{index:06d}", f"{tag}の文書{index}番。{body}") for index in range(count)]


def backend_for(base_url: str, work: Path) -> OpenAITeacher:
    """As the teacher asset opens it, the key's budget shared between runs included."""
    return OpenAITeacher(
        base_url=base_url,
        model="bench-teacher",
        api_key="bench",
        price=PRICES["deepseek-v4-flash"],
        concurrency=CONCURRENCY,
        max_attempts=3,
        timeout_s=30,
        backoff_s=0.05,
        key_budget=KeyBudget(work / "keys", budget_name(base_url, "bench"), CONCURRENCY),
    )


def backend_rate(base_url: str, docs: list[tuple[str, str]], work: Path) -> tuple[float, int]:
    """Requests per second through the backend alone (no journal, no lake)."""
    backend = backend_for(base_url, work)
    requests = [
        LabelRequest(doc_id, "bench", category, text) for doc_id, text in docs for category in CATEGORIES.values()
    ]

    async def drive() -> int:
        labelled = 0
        async for outcome in backend.label_all(requests, Budget()):
            labelled += outcome.status == "labeled"
        await backend.aclose()
        return labelled

    started = time.perf_counter()
    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        labelled = runner.run(drive())
    elapsed = time.perf_counter() - started
    return backend.requests / elapsed, labelled


def full_path_rate(base_url: str, docs: list[tuple[str, str]], work: Path) -> tuple[float, int]:
    """Labels per second through `label_shard`: journal, batched lake writes, progress counting."""
    lake = LakeResource(catalog=f"sqlite:{work / 'catalog.sqlite'}", data_path=f"{work / 'files'}/")
    started = time.perf_counter()
    report = label_shard(
        ShardRun("bench", "bench"),
        documents=docs,
        backend=backend_for(base_url, work),
        budget=Budget(),
        sinks=LabelSinks(lake, work / "journal", batch_size=256, flush_seconds=5.0),
        log=lambda _: None,
    )
    elapsed = time.perf_counter() - started
    return report.count("labeled") / elapsed, report.lake_writes


def raw_reference_rate(server, docs: list[tuple[str, str]], seconds: float) -> float:
    bodies = []
    for index, (_, text) in enumerate(docs[:300]):
        category = list(CATEGORIES.values())[index % len(CATEGORIES)]
        body = json.dumps(
            {"model": "bench-teacher", "messages": [{"role": "user", "content": category.prompt(text)}]},
            ensure_ascii=False,
        ).encode()
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        bodies.append(head.encode() + body)
    ok, _, elapsed = raw_http_load(server.port, bodies, CONCURRENCY, seconds)
    return ok / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="requests per measurement at latency 0")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "teacher_client.json", help="Where the results go.")
    args = parser.parse_args()
    zero_docs = max(1, (300 if args.quick else args.requests) // len(CATEGORIES))
    slow_docs = max(1, (700 if args.quick else 7000) // len(CATEGORIES))
    results: dict = {"machine": f"{platform.machine()}, {platform.python_version()}", "concurrency": CONCURRENCY}
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        with run_teacher_server(work) as server:
            raw = raw_reference_rate(server, documents(300, "raw"), 1.0 if args.quick else 3.0)
            backend, _ = backend_rate(server.base_url, documents(zero_docs, "zero"), work / "backend0")
            full, writes = full_path_rate(server.base_url, documents(zero_docs, "full"), work / "lake0")
            results["latency_0"] = {
                "raw_http_client_req_per_s": round(raw, 1),
                "backend_req_per_s": round(backend, 1),
                "backend_vs_raw": round(backend / raw, 3),
                "full_path_labels_per_s": round(full, 1),
                "full_path_vs_raw": round(full / raw, 3),
                "full_path_lake_writes": writes,
                "goal_req_per_s": 500,
            }
            server.set_plan({"latency_ms": int(LATENCY_S * 1000)})
            ideal = CONCURRENCY / LATENCY_S
            backend, _ = backend_rate(server.base_url, documents(slow_docs, "slow"), work / "backend200")
            full, _ = full_path_rate(server.base_url, documents(slow_docs, "slowfull"), work / "lake200")
            results["latency_200ms"] = {
                "ideal_req_per_s": ideal,
                "backend_req_per_s": round(backend, 1),
                "backend_vs_ideal": round(backend / ideal, 3),
                "full_path_labels_per_s": round(full, 1),
                "full_path_vs_ideal": round(full / ideal, 3),
                "goal_ratio": 0.9,
            }
    zero, slow = results["latency_0"], results["latency_200ms"]
    print(f"latency 0, concurrency {CONCURRENCY} ({zero_docs * 7} requests):")
    print(f"  raw HTTP client (reference)  {zero['raw_http_client_req_per_s']:8.1f} req/s")
    print(
        f"  openai backend               {zero['backend_req_per_s']:8.1f} req/s  = {zero['backend_vs_raw']:.3f} x reference (goal >= 500 req/s)"
    )
    print(
        f"  whole labelling path         {zero['full_path_labels_per_s']:8.1f} labels/s = {zero['full_path_vs_raw']:.3f} x reference ({zero['full_path_lake_writes']} lake writes)"
    )
    print(
        f"latency 200 ms, concurrency {CONCURRENCY} ({slow_docs * 7} requests), ideal {slow['ideal_req_per_s']:.0f} req/s:"
    )
    print(
        f"  openai backend               {slow['backend_req_per_s']:8.1f} req/s  = {slow['backend_vs_ideal']:.3f} x ideal (goal >= 0.9)"
    )
    print(
        f"  whole labelling path         {slow['full_path_labels_per_s']:8.1f} labels/s = {slow['full_path_vs_ideal']:.3f} x ideal"
    )
    raw = zero["raw_http_client_req_per_s"]
    results["figures"] = [
        figure(
            "openai backend, latency 0",
            zero["backend_req_per_s"],
            "req/s",
            "raw HTTP client, same server",
            raw,
            zero["backend_vs_raw"],
            "≥ 500 req/s",
            zero["backend_req_per_s"] >= 500,
        ),
        figure(
            "whole labelling path, latency 0",
            zero["full_path_labels_per_s"],
            "labels/s",
            "raw HTTP client, same server",
            raw,
            zero["full_path_vs_raw"],
        ),
        figure(
            "openai backend, 200 ms, concurrency 100",
            slow["backend_req_per_s"],
            "req/s",
            "ideal 100 / 0.2 s",
            slow["ideal_req_per_s"],
            slow["backend_vs_ideal"],
            "≥ 0.9 of ideal",
            slow["backend_vs_ideal"] >= 0.9,
        ),
        figure(
            "whole labelling path, 200 ms, concurrency 100",
            slow["full_path_labels_per_s"],
            "labels/s",
            "ideal 100 / 0.2 s",
            slow["ideal_req_per_s"],
            slow["full_path_vs_ideal"],
        ),
    ]
    write_results(args.json, results)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
