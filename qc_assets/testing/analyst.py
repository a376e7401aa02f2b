"""An analyst re-running `qc sql` (a new process each time) while runs write, and what every answer must satisfy."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qc_assets.lake.resource import LakeResource
from qc_assets.settings import load_settings
from qc_assets.testing.helpers import run_qc

# Per shard: documents, distinct ids, labels (from the label_costs view) and labels whose document is missing.
ANALYST_QUERY = """
SELECT c.shard, c.documents, c.distinct_ids, coalesce(l.labels, 0)::BIGINT AS labels, coalesce(l.quarantined, 0)::BIGINT AS quarantined,
       (SELECT count(*) FROM teacher_labels t WHERE t.shard = c.shard
          AND NOT EXISTS (SELECT 1 FROM corpus d WHERE d.doc_id = t.doc_id)) AS labels_without_document
FROM (SELECT shard, count(*) AS documents, count(DISTINCT doc_id) AS distinct_ids FROM corpus GROUP BY shard) c
LEFT JOIN (SELECT shard, sum(labels) AS labels, sum(quarantined) AS quarantined FROM label_costs GROUP BY shard) l
  USING (shard)
"""


@dataclass
class AnalystSession:
    env: dict[str, str]
    query_file: Path
    answers: list[list[dict]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def ask(self) -> list[dict] | None:
        answer = run_qc(["sql", "--format", "json", "--file", str(self.query_file)], self.env)
        if answer.returncode != 0:
            self.failures.append(answer.stderr[-2000:])
            return None
        return json.loads(answer.stdout)

    def final_by_shard(self) -> dict[str, dict]:
        return {row["shard"]: row for row in self.ask() or []}


@contextlib.contextmanager
def analyst_session(work: Path, env: dict[str, str], pause_s: float = 0.0) -> Iterator[AnalystSession]:
    """Query the lake in a loop, in a thread, until the block ends, waiting `pause_s` between queries (each is a new
    process: back to back, they take a core)."""
    settings = load_settings(env)
    with LakeResource(catalog=settings.catalog, data_path=settings.data_path).get_connection():
        pass
    (query_file := work / "analyst.sql").write_text(ANALYST_QUERY, encoding="utf-8")
    session = AnalystSession(env, query_file)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            answer = session.ask()
            if answer is not None:
                session.answers.append(answer)
            stop.wait(pause_s)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        yield session
    finally:
        stop.set()
        thread.join(timeout=120)


def inconsistencies(answers: list[list[dict]], final: dict[str, dict]) -> list[str]:
    """What no answer may show while runs write: a corpus partition half there or doubled, more labels than a
    shard's documents have categories, a label without its document, a shard's labels going back."""
    problems = []
    labels_seen: dict[str, int] = {}
    for answer in answers:
        for row in answer:
            shard = row["shard"]
            if not row["documents"] == row["distinct_ids"] == final[shard]["documents"]:
                problems.append(f"corpus of {shard} half there or doubled: {row}")
            if row["labels"] + row["quarantined"] > 7 * row["documents"]:
                problems.append(f"more labels than documents × categories: {row}")
            if row["labels_without_document"]:
                problems.append(f"labels without their document: {row}")
            if row["labels"] < labels_seen.get(shard, 0):
                problems.append(f"labels of {shard} went back: {row}")
            labels_seen[shard] = row["labels"]
    return problems
