"""Labelling one shard exactly once, whatever the backend: journal first, lake in batches, resume after any kill.

Each outcome is appended to a journal file the moment it arrives, then written to the lake in batches. The
journal is split into segments at every batch and a segment is deleted once its batch has committed, so it
holds only what the lake may not have. The next run for the shard replays what is left before asking for
anything, and asks only for keys the lake does not hold: a kill at any point (kill -9 included) loses at most
the requests in flight, never an answer already received. Inserts skip keys already present, so replaying a
segment whose batch did commit writes nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import duckdb
import pyarrow as pa
from filelock import FileLock, Timeout

from qc_assets.categories import CATEGORIES
from qc_assets.defs.teacher.backends import Budget, LabelOutcome, LabelRequest, TeacherBackend, Usage
from qc_assets.lake.resource import LakeResource, fetch_row, run_transaction
from qc_assets.lake.tables import TEACHER_LABELS, TEACHER_QUARANTINE, Table
from qc_assets.naming import slug

KEY_COLUMNS = ("doc_id", "category", "teacher", "prompt_version")
PROGRESS_EVERY_S = 10.0


def path_component(name: str) -> str:
    """A file name for a shard or teacher that cannot escape its directory, unique per name."""
    return slug(name)


class Journal:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._handle: TextIO | None = None
        self._segment: Path | None = None

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob("segment-*.jsonl"), key=lambda path: int(path.stem.split("-")[1]))

    @staticmethod
    def read(segment: Path) -> tuple[list[dict], int]:
        """The rows of a segment; a line torn by a kill mid-write is skipped and counted."""
        rows, torn = [], 0
        with open(segment, encoding="utf-8") as handle:
            for line in handle:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    torn += 1
        return rows, torn

    def start_segment(self) -> Path | None:
        """Close the current segment (returned) and open the next."""
        closed = self._segment
        if self._handle is not None:
            self._handle.close()
        existing = self.segments()
        number = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        self._segment = self.directory / f"segment-{number:06d}.jsonl"
        self._handle = open(self._segment, "a", encoding="utf-8")  # noqa: SIM115 (kept open across appends)
        return closed

    def append(self, row: dict) -> None:
        # One write per row and a flush: the line reaches the OS at once, so SIGKILL cannot lose it.
        assert self._handle is not None
        self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._segment is not None and self._segment.exists() and self._segment.stat().st_size == 0:
            self._segment.unlink()
        self._segment = None


SPEND_COLUMNS = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens", "cost_usd", "attempts")


def _with_earlier_spend_sql(incoming: str, shard_parameter: str) -> str:
    """`incoming` with the spend of the key's quarantine row from an earlier run added, so that a key's row keeps
    everything ever paid for it. A quarantine row of the same run is a replayed batch, whose spend is already in."""
    key_match = " AND ".join(f'q."{key}" = i."{key}"' for key in KEY_COLUMNS)
    sums = ", ".join(
        f'i."{column}" + CASE WHEN q.run_id IS DISTINCT FROM i.run_id THEN coalesce(q."{column}", 0) ELSE 0 END AS "{column}"'
        for column in SPEND_COLUMNS
    )
    return (
        f"(SELECT i.* REPLACE ({sums}) FROM {incoming} i "
        f"LEFT JOIN teacher_quarantine q ON q.shard = {shard_parameter} AND {key_match})"
    )


def _insert_new_sql(table: Table, incoming: str, shard_parameter: str) -> str:
    columns = ", ".join(f'"{name}"' for name in table.column_names)
    casts = ", ".join(f'CAST(i."{column.name}" AS {column.sql_type})' for column in table.columns)
    key_match = " AND ".join(f't."{key}" = i."{key}"' for key in KEY_COLUMNS)
    keys = ", ".join(f'i."{key}"' for key in KEY_COLUMNS)
    return (
        f'INSERT INTO "{table.name}" ({columns}) SELECT {casts} FROM {_with_earlier_spend_sql(incoming, shard_parameter)} i '
        f'WHERE NOT EXISTS (SELECT 1 FROM "{table.name}" t WHERE t.shard = {shard_parameter} AND {key_match}) '
        f"QUALIFY row_number() OVER (PARTITION BY {keys}) = 1"
    )


def _delete_keys_sql(table: Table, incoming: str, shard_parameter: str) -> str:
    key_match = " AND ".join(f't."{key}" = i."{key}"' for key in KEY_COLUMNS)
    return (
        f'DELETE FROM "{table.name}" t WHERE t.shard = {shard_parameter} '
        f"AND EXISTS (SELECT 1 FROM {incoming} i WHERE {key_match})"
    )


def _plain_insert_sql(table: Table, incoming: str) -> str:
    columns = ", ".join(f'"{name}"' for name in table.column_names)
    casts = ", ".join(f'CAST(i."{column.name}" AS {column.sql_type})' for column in table.columns)
    return f'INSERT INTO "{table.name}" ({columns}) SELECT {casts} FROM {incoming} i'


def _key(row: dict) -> tuple[str, str, str, str]:
    return (row["doc_id"], row["category"], row["teacher"], row["prompt_version"])


def write_outcome_rows(
    connection: duckdb.DuckDBPyConnection,
    shard: str,
    rows: list[dict],
    known: KnownKeys | None = None,
) -> int:
    """Write one batch in one transaction: new labels (present keys skipped), their quarantine rows cleared,
    new quarantine rows replacing the old ones for their keys. Returns the labels inserted.

    `known` is what the live labelling path knows about the shard's keys while it holds the shard's lock: which keys
    the lake held when the run started (never asked again, so never in a batch) and which have quarantine rows.
    With it, a batch of labels whose keys are all new and never quarantined is a plain insert: no anti-join
    against the shard's labels and no quarantine lookup, whose cost would grow with every batch the shard has.
    Without it (replaying the journal, where a segment may have committed already), every check is made.
    """
    labels = [_with_over_cap(row) for row in rows if row["kind"] == "label"]
    quarantined = [row for row in rows if row["kind"] == "quarantine"]
    plain = known is not None and not any(_key(row) in known.quarantined for row in labels)

    def work(connection: duckdb.DuckDBPyConnection) -> int:
        inserted = 0
        if labels:
            connection.register("incoming_labels", pa.Table.from_pylist(labels))
            if plain:
                inserted = fetch_row(connection.execute(_plain_insert_sql(TEACHER_LABELS, "incoming_labels")))[0]
            else:
                inserted = fetch_row(
                    connection.execute(_insert_new_sql(TEACHER_LABELS, "incoming_labels", "$1"), [shard])
                )[0]
                connection.execute(_delete_keys_sql(TEACHER_QUARANTINE, "incoming_labels", "$1"), [shard])
            connection.unregister("incoming_labels")
        if quarantined:
            connection.register("incoming_quarantine", pa.Table.from_pylist(quarantined))
            connection.execute(
                f"CREATE OR REPLACE TEMP TABLE quarantine_with_earlier_spend AS "
                f"SELECT * FROM {_with_earlier_spend_sql('incoming_quarantine', '$1')}",
                [shard],
            )
            connection.execute(_delete_keys_sql(TEACHER_QUARANTINE, "incoming_quarantine", "$1"), [shard])
            columns = ", ".join(f'"{name}"' for name in TEACHER_QUARANTINE.column_names)
            casts = ", ".join(f'CAST(i."{c.name}" AS {c.sql_type})' for c in TEACHER_QUARANTINE.columns)
            # A key labelled by an earlier batch stays labelled: its late failure is not news.
            connection.execute(
                f"INSERT INTO teacher_quarantine ({columns}) SELECT {casts} FROM quarantine_with_earlier_spend i "
                "WHERE NOT EXISTS (SELECT 1 FROM teacher_labels t WHERE t.shard = $1 AND "
                + " AND ".join(f't."{key}" = i."{key}"' for key in KEY_COLUMNS)
                + ")",
                [shard],
            )
            connection.unregister("incoming_quarantine")
            connection.execute("DROP TABLE quarantine_with_earlier_spend")
        return inserted

    inserted = run_transaction(connection, work, f"write teacher labels of shard {shard}")
    if known is not None:
        known.quarantined.update(_key(row) for row in quarantined)
    return inserted


def _with_over_cap(label_row: dict) -> dict:
    # Derived from the label as it is written, not journaled with it: every row gets the flag, whichever run
    # journaled it.
    return {**label_row, "over_cap": CATEGORIES[label_row["category"]].over_cap(label_row["query"])}


@dataclass
class KnownKeys:
    """Keys of the shard (this teacher) that have a quarantine row, as the run holding the shard's lock knows them:
    those in the lake when it started, plus those it quarantined itself."""

    quarantined: set[tuple[str, str, str, str]] = field(default_factory=set)


def outcome_row(outcome: LabelOutcome, backend: TeacherBackend, run_id: str) -> dict:
    request = outcome.request
    row: dict[str, object] = {
        "kind": "label" if outcome.status == "labeled" else "quarantine",
        "doc_id": request.doc_id,
        "shard": request.shard,
        "category": request.category.name,
        "teacher": backend.teacher,
        "prompt_version": backend.prompt_version(request.category),
        "input_tokens": outcome.usage.input_tokens,
        "cached_input_tokens": outcome.usage.cached_input_tokens,
        "output_tokens": outcome.usage.output_tokens,
        "reasoning_tokens": outcome.usage.reasoning_tokens,
        "cost_usd": outcome.usage.cost_usd,
        "attempts": outcome.attempts,
        "run_id": run_id,
        "created_at": datetime.now(UTC).isoformat(),
    }
    if outcome.status == "labeled":
        row.update(query=outcome.query, reasoning=outcome.reasoning, latency_s=outcome.latency_s)
    else:
        row.update(raw_output=outcome.raw_output, error=outcome.error)
    return row


@dataclass
class LabelingReport:
    shard: str
    teacher: str
    keys_total: int = 0
    keys_already_labeled: int = 0
    keys_to_ask: int = 0
    recovered_from_journal: int = 0
    torn_journal_lines: int = 0
    by_category: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    over_cap: Counter = field(default_factory=Counter)  # labels over their category's cap, per category
    retries: Counter = field(default_factory=Counter)
    usage: Usage = field(default_factory=Usage)
    requests: int = 0
    lake_writes: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU (event loop, SDK, journal, lake writer thread) while labelling
    latencies: list[float] = field(default_factory=list)
    lowest_concurrency: int | None = None
    stopped_because: str | None = None

    def count(self, status: str) -> int:
        return sum(counter[status] for counter in self.by_category.values())

    @property
    def keys_not_asked(self) -> int:
        """Keys this run had to label but never finished asking for (budget or deadline reached)."""
        return self.keys_to_ask - self.count("labeled") - self.count("quarantined") - self.count("absent")


def _event_loop_factory():
    """uvloop where it is installed: the client spends most of its CPU in the event loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _existing_keys(connection: duckdb.DuckDBPyConnection, shard: str, teacher: str) -> set[tuple[str, str, str]]:
    rows = connection.execute(
        "SELECT doc_id, category, prompt_version FROM teacher_labels WHERE shard = $1 AND teacher = $2",
        [shard, teacher],
    ).fetchall()
    return set(rows)


def _quarantined_keys(
    connection: duckdb.DuckDBPyConnection, shard: str, teacher: str
) -> set[tuple[str, str, str, str]]:
    rows = connection.execute(
        "SELECT doc_id, category, teacher, prompt_version FROM teacher_quarantine WHERE shard = $1 AND teacher = $2",
        [shard, teacher],
    ).fetchall()
    return set(rows)


@dataclass(frozen=True)
class ShardRun:
    """The shard being labelled and the run labelling it, whose id every row it writes carries."""

    shard: str
    run_id: str


@dataclass(frozen=True)
class LabelSinks:
    """Where answers go: each to the journal under `journal_root` as it arrives, then to the lake in batches of
    `batch_size` rows, or sooner once `flush_seconds` have passed since the last write."""

    lake: LakeResource
    journal_root: Path
    batch_size: int
    flush_seconds: float


def label_shard(
    run: ShardRun,
    *,
    documents: list[tuple[str, str]],
    backend: TeacherBackend,
    budget: Budget,
    sinks: LabelSinks,
    log: Callable[[str], None],
) -> LabelingReport:
    """Label every (document, category) of `documents` that the lake does not hold for this teacher."""
    report = LabelingReport(shard=run.shard, teacher=backend.teacher)
    directory = sinks.journal_root / path_component(backend.teacher) / path_component(run.shard)
    with _shard_lock(directory, run.shard, backend.teacher, log), sinks.lake.get_connection() as connection:
        # Batches are small; one DuckDB thread writes them without taking a core from the event loop.
        connection.execute("SET threads = 1")
        journal = Journal(directory)
        _replay_journal(connection, journal, run.shard, report, log)
        requests = _requests_to_ask(connection, run.shard, documents, backend, report, log)
        known = KnownKeys(_quarantined_keys(connection, run.shard, backend.teacher))
        writer = _BatchWriter(connection, journal, run.shard, sinks, report, known)
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
                runner.run(
                    _collect(requests, run=run, backend=backend, budget=budget, writer=writer, report=report, log=log)
                )
        finally:
            journal.close()
            report.seconds = time.perf_counter() - started
            report.cpu_seconds = time.process_time() - cpu_started
            report.requests = getattr(backend, "requests", 0)
            report.lowest_concurrency = getattr(getattr(backend, "limit", None), "lowest", None)
            report.stopped_because = budget.stopped_because
    return report


@contextmanager
def _shard_lock(directory: Path, shard: str, teacher: str, log: Callable[[str], None]) -> Iterator[None]:
    """Two runs labelling one shard would pay twice for its keys, so the second waits for the first and then asks
    only for what is still missing (usually nothing). The lock is the kernel's: a killed holder frees it."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / ".lock"))
    wait = 0.0
    while True:
        try:
            lock.acquire(timeout=wait)
            break
        except Timeout:
            log(
                f"shard {shard} is being labelled by teacher {teacher} in another run; waiting for it "
                f"(lock {lock.lock_file})"
            )
            wait = PROGRESS_EVERY_S
    try:
        yield
    finally:
        lock.release()


def _requests_to_ask(
    connection: duckdb.DuckDBPyConnection,
    shard: str,
    documents: list[tuple[str, str]],
    backend: TeacherBackend,
    report: LabelingReport,
    log: Callable[[str], None],
) -> Iterator[LabelRequest]:
    """The keys of `documents` the lake does not hold for this teacher, counted into `report` and logged."""
    existing = _existing_keys(connection, shard, backend.teacher)
    versions = {name: backend.prompt_version(category) for name, category in CATEGORIES.items()}
    report.keys_total = len(documents) * len(CATEGORIES)
    report.keys_already_labeled = sum(
        (doc_id, name, versions[name]) in existing for doc_id, _ in documents for name in CATEGORIES
    )
    report.keys_to_ask = report.keys_total - report.keys_already_labeled
    log(
        f"shard {shard}: {len(documents)} documents, {report.keys_total} keys; {report.keys_already_labeled} "
        f"already labelled by {backend.teacher}, {report.keys_to_ask} to ask for"
    )
    return (
        LabelRequest(doc_id=doc_id, shard=shard, category=category, text=text)
        for doc_id, text in documents
        for name, category in CATEGORIES.items()
        if (doc_id, name, versions[name]) not in existing
    )


def _replay_journal(connection, journal: Journal, shard: str, report: LabelingReport, log) -> None:
    for segment in journal.segments():
        rows, torn = Journal.read(segment)
        report.torn_journal_lines += torn
        if rows:
            report.recovered_from_journal += write_outcome_rows(connection, shard, rows)
        segment.unlink()
    if report.recovered_from_journal or report.torn_journal_lines:
        log(
            f"shard {shard}: recovered {report.recovered_from_journal} labels an interrupted run had received"
            + (f"; {report.torn_journal_lines} torn journal lines skipped" if report.torn_journal_lines else "")
        )


class _BatchWriter:
    """Rows journaled as they arrive and written to the lake in batches, one batch at a time, each in a thread so
    that answers keep arriving (and being journaled) meanwhile."""

    def __init__(
        self,
        connection: duckdb.DuckDBPyConnection,
        journal: Journal,
        shard: str,
        sinks: LabelSinks,
        report: LabelingReport,
        known: KnownKeys,
    ) -> None:
        self._connection = connection
        self._journal = journal
        self._shard = shard
        self._sinks = sinks
        self._report = report
        self._known = known
        self._buffer: list[dict] = []
        self._writing: asyncio.Task | None = None
        self._last_write = 0.0

    def start(self) -> None:
        self._last_write = time.perf_counter()
        self._journal.start_segment()

    def add(self, row: dict) -> None:
        self._journal.append(row)
        self._buffer.append(row)

    async def write_if_due(self, now: float) -> None:
        """Start a lake write if none is running and the buffer is full or has waited `flush_seconds`."""
        if (
            self._buffer
            and (self._writing is None or self._writing.done())
            and (len(self._buffer) >= self._sinks.batch_size or now - self._last_write >= self._sinks.flush_seconds)
        ):
            await self._start_write()

    async def finish(self) -> None:
        """Wait for the write in progress and write what is left, so that it is not replayed next run."""
        if self._writing is not None:
            await self._writing
        if self._buffer:
            self._write(self._buffer, self._journal.start_segment())

    async def _start_write(self) -> None:
        if self._writing is not None:
            await self._writing
        rows, self._buffer = self._buffer, []
        self._writing = asyncio.create_task(asyncio.to_thread(self._write, rows, self._journal.start_segment()))
        self._last_write = time.perf_counter()

    def _write(self, rows: list[dict], segment: Path | None) -> None:
        write_outcome_rows(self._connection, self._shard, rows, self._known)
        self._report.lake_writes += 1
        if segment is not None:
            segment.unlink(missing_ok=True)


async def _collect(
    requests: Iterator[LabelRequest],
    *,
    run: ShardRun,
    backend: TeacherBackend,
    budget: Budget,
    writer: _BatchWriter,
    report: LabelingReport,
    log: Callable[[str], None],
) -> None:
    last_progress = started = time.perf_counter()
    done = 0

    def record(outcome: LabelOutcome) -> None:
        # Called by the backend as each answer arrives, before its request slot goes to another request.
        if outcome.status in ("labeled", "quarantined"):
            writer.add(outcome_row(outcome, backend, run.run_id))

    writer.start()
    try:
        async for outcome in backend.label_all(requests, budget, record):
            done += 1
            _count_outcome(report, outcome)
            now = time.perf_counter()
            await writer.write_if_due(now)
            if now - last_progress >= PROGRESS_EVERY_S:
                last_progress = now
                rate = done / (now - started)
                log(
                    f"shard {run.shard}: {done}/{report.keys_to_ask} keys done ({report.count('labeled')} labelled, "
                    f"{report.count('quarantined')} quarantined), {rate:.1f}/s, ${report.usage.cost_usd:.4f}, "
                    f"{sum(report.retries.values())} retries"
                )
    finally:
        # Also on the way out of an error: what arrived is written now rather than replayed next run.
        await backend.aclose()
        await writer.finish()


def _count_outcome(report: LabelingReport, outcome: LabelOutcome) -> None:
    category = outcome.request.category
    report.by_category[category.name][outcome.status] += 1
    if outcome.status == "labeled" and outcome.query is not None and category.over_cap(outcome.query):
        report.over_cap[category.name] += 1
    report.retries.update(outcome.retries)
    report.usage.add(outcome.usage)
    if outcome.latency_s is not None:
        report.latencies.append(outcome.latency_s)
