"""Seed 000's 100M-document case, projected from what `bench/scaling.py` measured here, next to seed 000's own
projection (about 7,000 hours and $40,000 with the DeepSeek-R1 API; about 140 hours with the 1.7B student on one
RTX 5090).

Every input is tagged with where it comes from:
- measured here (from scaling.json, the largest size it ran): the requests per document (one per category), the
  teacher client's capacity at zero latency, the orchestration and storage overhead per document, the lake's bytes
  per document and the peak memory;
- taken from seed 000: R1's price and latency (100,000 documents, 100 requests at once, about 7 hours and $40: so
  about 25 s a request and $0.0004 a request) and the student's rate on one RTX 5090 (10,000 documents in under
  100 s with vLLM). No GPU was measured here unless generation_scoring.json holds a vLLM rate, which then
  replaces seed 000's.

Seed 000 counts one query per document; this pipeline asks for seven (one per category), so its teacher bill and
generation time are seven of seed 000's units per document. Both are shown.

    python bench/projection.py [--scaling bench/results/scaling.json] [--documents 100000000] [--gpus 1,8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qc_assets.benchmarks import RESULTS_DIR, figure, write_results
from qc_assets.categories import CATEGORIES

ROOT = Path(__file__).resolve().parent.parent

# Seed 000, as published (see ../shared/seeds/000_*.txt).
SEED_R1_DOCUMENTS = 100_000
SEED_R1_HOURS = 7.0
SEED_R1_USD = 40.0
SEED_R1_CONCURRENCY = 100
SEED_PROJECTED_R1_HOURS = 7_000.0
SEED_PROJECTED_R1_USD = 40_000.0
SEED_STUDENT_DOCUMENTS = 10_000
SEED_STUDENT_SECONDS = 100.0  # "under 100 s": an upper bound, so the rate below is a lower bound
SEED_PROJECTED_STUDENT_HOURS = 140.0
SEED_DOCUMENTS = 100_000_000

R1_SECONDS_PER_REQUEST = SEED_R1_HOURS * 3600 * SEED_R1_CONCURRENCY / SEED_R1_DOCUMENTS
R1_USD_PER_REQUEST = SEED_R1_USD / SEED_R1_DOCUMENTS
SEED_STUDENT_REQUESTS_PER_SECOND = SEED_STUDENT_DOCUMENTS / SEED_STUDENT_SECONDS


def largest_size(scaling: dict) -> dict:
    if not scaling.get("sizes"):
        raise ValueError("scaling.json holds no measured size; run bench/scaling.py first")
    return max(scaling["sizes"], key=lambda size: size["documents"])


def gpu_generation_rate(generation: dict | None) -> tuple[float, str]:
    """Generation requests per second per GPU: vLLM's, when generation_scoring.json measured one on a GPU."""
    for row in (generation or {}).get("figures", []):
        if row["measure"].startswith("generation, vllm backend (") and row["unit"] == "req/s":
            return row["value"], f"measured here ({row['measure']})"
    return SEED_STUDENT_REQUESTS_PER_SECOND, "seed 000 (RTX 5090, vLLM: 10,000 documents in under 100 s)"


def project(scaling: dict, generation: dict | None, documents: int, gpus: list[int]) -> dict:
    measured = largest_size(scaling)
    per_document = len(CATEGORIES)
    requests = documents * per_document
    labels = measured["teacher_labels"]
    client_cpu_per_request = measured["cpu"]["teacher_labelling_cpu_seconds"] / (measured["documents"] * per_document)
    # A request waits R1_SECONDS_PER_REQUEST; to keep `concurrency` requests in flight the client must start
    # concurrency / latency requests a second, which one process sustains while that stays under its capacity.
    # One labelling process's rate: labels over the time its request loops ran (runs of shards go in parallel).
    loop_seconds = labels.get("request_loop_seconds_sum")
    client_capacity = (
        measured["documents"] * per_document / loop_seconds if loop_seconds else labels["labels_per_second"]
    )
    concurrency_one_process_sustains = client_capacity * R1_SECONDS_PER_REQUEST
    teacher_hours = requests * R1_SECONDS_PER_REQUEST / SEED_R1_CONCURRENCY / 3600
    teacher_usd = requests * R1_USD_PER_REQUEST
    rate, rate_source = gpu_generation_rate(generation)
    generation_hours = {n: requests / rate / n / 3600 for n in gpus}
    seed_unit_generation_hours = documents / rate / 3600
    overhead_hours = measured["overhead_without_teacher_ms_per_document"] * documents / 1000 / 3600
    overhead_cpu_hours = measured["cpu"]["overhead_without_teacher_cpu_ms_per_document"] * documents / 1000 / 3600
    lake_bytes = measured["lake_bytes"] / measured["documents"] * documents
    inputs = {
        "documents": documents,
        "requests_per_document": {"value": per_document, "source": "this pipeline (one per category)"},
        "r1_seconds_per_request": {
            "value": round(R1_SECONDS_PER_REQUEST, 2),
            "source": "seed 000 (7 h for 100,000 at 100 at once)",
        },
        "r1_usd_per_request": {"value": R1_USD_PER_REQUEST, "source": "seed 000 ($40 for 100,000, night discount)"},
        "r1_concurrency": {"value": SEED_R1_CONCURRENCY, "source": "seed 000"},
        "generation_requests_per_second_per_gpu": {"value": rate, "source": rate_source},
        "teacher_client_labels_per_second": {
            "value": round(client_capacity, 1),
            "source": f"measured here, one process, {measured['documents']:,} documents, latency 0",
        },
        "teacher_client_cpu_ms_per_request": {
            "value": round(client_cpu_per_request * 1000, 3),
            "source": "measured here",
        },
        "overhead_ms_per_document": {
            "value": measured["overhead_without_teacher_ms_per_document"],
            "source": "measured here (wall − model compute − labelling)",
        },
        "lake_bytes_per_document": {
            "value": round(measured["lake_bytes"] / measured["documents"]),
            "source": "measured here",
        },
        "peak_rss_bytes": {"value": measured["peak_rss_bytes"], "source": "measured here"},
    }
    projection = {
        "teacher_hours": round(teacher_hours),
        "teacher_usd": round(teacher_usd),
        "teacher_hours_one_query_per_document": round(teacher_hours / per_document),
        "teacher_usd_one_query_per_document": round(teacher_usd / per_document),
        "concurrency_one_client_process_sustains": round(concurrency_one_process_sustains),
        "generation_hours_by_gpus": {str(n): round(hours, 1) for n, hours in generation_hours.items()},
        "generation_hours_one_query_per_document_one_gpu": round(seed_unit_generation_hours, 1),
        "orchestration_overhead_hours": round(overhead_hours, 1),
        "orchestration_overhead_cpu_hours": round(overhead_cpu_hours, 1),
        "lake_gib": round(lake_bytes / 2**30, 1),
    }
    rows = [
        figure(
            f"{documents:,} documents: teacher (R1 API), 7 queries a document",
            projection["teacher_hours"],
            "h",
            "seed 000's projection (1 query a document)",
            SEED_PROJECTED_R1_HOURS,
            teacher_hours / SEED_PROJECTED_R1_HOURS,
        ),
        figure(
            f"{documents:,} documents: teacher cost, 7 queries a document",
            projection["teacher_usd"],
            "USD",
            "seed 000's projection (1 query a document)",
            SEED_PROJECTED_R1_USD,
            teacher_usd / SEED_PROJECTED_R1_USD,
        ),
        figure(
            f"{documents:,} documents: teacher, 1 query a document (seed 000's unit)",
            projection["teacher_hours_one_query_per_document"],
            "h",
            "seed 000's projection",
            SEED_PROJECTED_R1_HOURS,
            teacher_hours / per_document / SEED_PROJECTED_R1_HOURS,
        ),
        figure(
            "requests in flight one labelling process can keep up with at R1's latency",
            projection["concurrency_one_client_process_sustains"],
            "requests",
            "seed 000's concurrency",
            SEED_R1_CONCURRENCY,
            concurrency_one_process_sustains / SEED_R1_CONCURRENCY,
        ),
    ]
    for n, hours in generation_hours.items():
        rows.append(
            figure(
                f"{documents:,} documents: student generation on {n} GPU{'s' if n > 1 else ''}, 7 queries a document",
                round(hours, 1),
                "h",
                "seed 000's projection (1 GPU, 1 query a document)",
                SEED_PROJECTED_STUDENT_HOURS,
                hours / SEED_PROJECTED_STUDENT_HOURS,
            )
        )
    rows.append(
        figure(
            f"{documents:,} documents: student generation on 1 GPU, 1 query a document (seed 000's unit)",
            round(seed_unit_generation_hours, 1),
            "h",
            "seed 000's projection",
            SEED_PROJECTED_STUDENT_HOURS,
            seed_unit_generation_hours / SEED_PROJECTED_STUDENT_HOURS,
        )
    )
    rows.append(
        figure(
            f"{documents:,} documents: orchestration and storage overhead (one lane)",
            projection["orchestration_overhead_hours"],
            "h",
            "student generation on 1 GPU, 7 queries a document",
            round(generation_hours[gpus[0]] * gpus[0], 1),
            overhead_hours / (generation_hours[gpus[0]] * gpus[0]),
        )
    )
    rows.append(figure(f"{documents:,} documents: lake size", projection["lake_gib"], "GiB"))
    return {"inputs": inputs, "projection": projection, "figures": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "projection.json", help="Where the results go.")
    parser.add_argument("--scaling", type=Path, default=None, help="scaling.json (default: next to --json)")
    parser.add_argument(
        "--generation",
        type=Path,
        default=None,
        help="generation_scoring.json, for a measured GPU rate (default: next to --json, if there)",
    )
    parser.add_argument("--documents", type=int, default=SEED_DOCUMENTS)
    parser.add_argument("--gpus", default="1,8", help="comma-separated GPU counts for the student")
    args = parser.parse_args()
    scaling_path = args.scaling or args.json.parent / "scaling.json"
    if not scaling_path.exists():
        parser.error(f"{scaling_path} does not exist: run bench/scaling.py (or `qc bench`) first")
    generation_path = args.generation or args.json.parent / "generation_scoring.json"
    generation = json.loads(generation_path.read_text(encoding="utf-8")) if generation_path.exists() else None
    gpus = [int(n) for n in args.gpus.split(",")]
    result = project(json.loads(scaling_path.read_text(encoding="utf-8")), generation, args.documents, gpus)
    print(f"Projection for {args.documents:,} documents (inputs and where each comes from):")
    for name, entry in result["inputs"].items():
        if isinstance(entry, dict):
            print(f"  {name:<42} {entry['value']!s:<14} {entry['source']}")
    print("Projected:")
    for name, value in result["projection"].items():
        print(f"  {name:<42} {value}")
    write_results(args.json, {"scaling": str(scaling_path), **result})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
