"""`qc estimate`: label a pilot sample with the configured teacher and project cost and hours for the corpus.

The pilot's labels are ordinary labels, written to the lake under their keys, so the full run does not pay
for them again. Figures come from the lake rows of the pilot documents, so a repeated estimate costs nothing.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from qc_assets.categories import CATEGORIES
from qc_assets.defs.teacher.assets import TeacherResource, read_documents
from qc_assets.defs.teacher.backends import Budget
from qc_assets.defs.teacher.labeling import LabelingReport, ShardRun, label_shard
from qc_assets.lake.resource import LakeResource

# Seed 000: 100k documents through the R1 API at concurrency 100 took about 7 h and $40; its 100M-document
# projection is about 7,000 h and $40,000. One query per document there, seven per document here.
SEED_DOCUMENTS = 100_000_000
SEED_HOURS = 7_000
SEED_USD = 40_000


@dataclass
class Projection:
    teacher: str
    pilot_documents: int
    pilot_labels: int
    pilot_cost_usd: float
    cost_per_label_usd: float
    tokens_per_label: dict[str, float]
    latency_mean_s: float
    concurrency: int
    corpus_documents: int
    corpus_documents_measured: bool
    report: LabelingReport

    def hours(self, documents: int) -> float:
        labels = documents * len(CATEGORIES)
        return labels * self.latency_mean_s / self.concurrency / 3600

    def cost(self, documents: int) -> float:
        return documents * len(CATEGORIES) * self.cost_per_label_usd

    def lines(self) -> list[str]:
        tokens = ", ".join(f"{name} {value:,.0f}" for name, value in self.tokens_per_label.items())
        basis = "materialized corpus" if self.corpus_documents_measured else "mean of materialized shards x all shards"
        return [
            f"teacher {self.teacher}: pilot of {self.pilot_documents} documents, {self.pilot_labels} labels "
            f"(${self.pilot_cost_usd:.4f}; {self.report.requests} requests made now)",
            f"measured here: ${self.cost_per_label_usd:.6f} per label; tokens per label: {tokens}; "
            f"mean latency {self.latency_mean_s:.2f}s at concurrency {self.concurrency}",
            f"this corpus ({self.corpus_documents:,} documents, {basis}): "
            f"{self.corpus_documents * len(CATEGORIES):,} labels, ${self.cost(self.corpus_documents):,.2f}, "
            f"{self.hours(self.corpus_documents):,.1f} h",
            f"seed 000's case ({SEED_DOCUMENTS:,} documents x {len(CATEGORIES)} categories): "
            f"${self.cost(SEED_DOCUMENTS):,.0f}, {self.hours(SEED_DOCUMENTS):,.0f} h "
            f"(seed 000's own projection, one query per document: about ${SEED_USD:,} and {SEED_HOURS:,} h)",
            "hours assume the provider sustains the configured concurrency at the pilot's latency",
        ]


def estimate(
    teacher: TeacherResource, lake: LakeResource, shard: str | None, documents: int, shard_count: int, log
) -> Projection:
    with lake.get_connection() as connection:
        per_shard = dict(
            connection.execute("SELECT shard, count(*) FROM corpus GROUP BY shard ORDER BY shard").fetchall()
        )
    if not per_shard:
        raise ValueError("the lake has no corpus yet: run `qc run --select corpus` first")
    shard = shard or next(iter(per_shard))
    if shard not in per_shard:
        raise ValueError(f"shard {shard!r} has no documents in the lake; materialized: {', '.join(per_shard)}")
    pilot = read_documents(lake, shard, limit=documents)
    backend = teacher.open_backend(teacher.max_usd)
    report = label_shard(
        ShardRun(shard, "qc-estimate"),
        documents=pilot,
        backend=backend,
        budget=Budget(max_usd=teacher.max_usd),
        sinks=teacher.sinks(lake),
        log=log,
    )
    with lake.get_connection() as connection:
        connection.register("pilot", _pilot_table(pilot))
        rows = connection.execute(
            "SELECT cost_usd, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, latency_s "
            "FROM teacher_labels JOIN pilot USING (doc_id) WHERE shard = $1 AND teacher = $2",
            [shard, backend.teacher],
        ).fetchall()
    if not rows:
        raise ValueError(
            f"the pilot produced no labels ({report.count('quarantined')} quarantined); see teacher_quarantine"
        )
    names = ("input", "cached_input", "output", "reasoning")
    latencies = [row[5] for row in rows if row[5] is not None]
    measured_all = len(per_shard) >= shard_count
    corpus_documents = (
        sum(per_shard.values()) if measured_all else round(statistics.mean(per_shard.values()) * shard_count)
    )
    return Projection(
        teacher=backend.teacher,
        pilot_documents=len(pilot),
        pilot_labels=len(rows),
        pilot_cost_usd=sum(row[0] for row in rows),
        cost_per_label_usd=statistics.mean(row[0] for row in rows),
        tokens_per_label={name: statistics.mean(row[i + 1] for row in rows) for i, name in enumerate(names)},
        latency_mean_s=statistics.mean(latencies) if latencies else 0.0,
        concurrency=teacher.concurrency,
        corpus_documents=corpus_documents,
        corpus_documents_measured=measured_all,
        report=report,
    )


def _pilot_table(pilot: list[tuple[str, str]]):
    import pyarrow as pa

    return pa.table({"doc_id": pa.array([doc_id for doc_id, _ in pilot], pa.string())})
