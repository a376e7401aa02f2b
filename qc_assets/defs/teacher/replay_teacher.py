"""The `replay` teacher: import labels that already exist instead of paying for them again.

The source is a local parquet/jsonl file or a Hugging Face dataset (`hf:<name>`, e.g. the published 83k-row
R1 set), with a column mapping. Labels still go through the categories' validators: an imported label that is
no label (empty, several lines) is quarantined like a bad API answer; one over its cap is kept and flagged.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
from filelock import FileLock

from qc_assets.categories import CATEGORIES, Category, LabelError
from qc_assets.defs.teacher.backends import Budget, LabelOutcome, LabelRequest
from qc_assets.lake.sql import sql_identifier, sql_literal

HF_PREFIX = "hf:"
REPLAY_PROMPT_VERSION = "replay"
_KEY_FIELDS = ("doc_id", "text")
_LONG_FIELDS = ("category", "query", "reasoning")


class ReplayError(ValueError):
    """The replay source or its column mapping cannot be used; the message names the setting or file."""


@dataclass(frozen=True)
class ReplayColumns:
    """`doc_id` or `text` matches documents; long format has `category` and `query` columns, wide format one
    column per category. `reasoning` is optional in long format."""

    match_field: str
    match_column: str
    category: str | None = None
    query: str | None = None
    reasoning: str | None = None
    per_category: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> ReplayColumns:
        mapping: dict[str, str] = {}
        for part in spec.split(","):
            name, sep, column = (piece.strip() for piece in part.partition("="))
            if not sep or not name or not column:
                raise ReplayError(f"QC_TEACHER_REPLAY_COLUMNS: {part!r} is not <field>=<column>")
            if name in mapping:
                raise ReplayError(f"QC_TEACHER_REPLAY_COLUMNS: {name!r} is mapped twice")
            mapping[name] = column
        matches = [name for name in _KEY_FIELDS if name in mapping]
        if len(matches) != 1:
            raise ReplayError("QC_TEACHER_REPLAY_COLUMNS: map exactly one of doc_id= or text= to match documents")
        match_field = matches[0]
        rest = {name: column for name, column in mapping.items() if name != match_field}
        if "category" in rest:
            unknown = sorted(set(rest) - set(_LONG_FIELDS))
            if unknown or "query" not in rest:
                raise ReplayError(
                    "QC_TEACHER_REPLAY_COLUMNS: long format takes category=, query= and optionally reasoning=; "
                    + (f"unexpected {', '.join(unknown)}" if unknown else "query= is missing")
                )
            return cls(match_field, mapping[match_field], rest["category"], rest["query"], rest.get("reasoning"))
        unknown = sorted(set(rest) - set(CATEGORIES))
        if unknown or not rest:
            raise ReplayError(
                "QC_TEACHER_REPLAY_COLUMNS: give category= and query= (long format) or <category>=<column> "
                f"for categories among {', '.join(CATEGORIES)}" + (f"; unknown {', '.join(unknown)}" if unknown else "")
            )
        return cls(match_field, mapping[match_field], per_category=rest)

    def select_sql(self, source_sql: str) -> str:
        """(match, category, query, reasoning) rows of the source, in a stable order."""

        match = f"CAST({sql_identifier(self.match_column)} AS VARCHAR)"
        if self.category is not None:
            if self.query is None:
                raise ReplayError("QC_TEACHER_REPLAY_COLUMNS: long format (category=) needs query= as well")
            reasoning = f"CAST({sql_identifier(self.reasoning)} AS VARCHAR)" if self.reasoning else "NULL"
            return (
                f"SELECT {match} AS match, CAST({sql_identifier(self.category)} AS VARCHAR) AS category, "
                f"CAST({sql_identifier(self.query)} AS VARCHAR) AS query, {reasoning} AS reasoning FROM {source_sql}"
            )
        return " UNION ALL ".join(
            f"SELECT {match} AS match, '{category}' AS category, CAST({sql_identifier(column)} AS VARCHAR) AS query, "
            f"NULL AS reasoning FROM {source_sql}"
            for category, column in self.per_category.items()
        )


def replay_source_name(source: str) -> str:
    if source.startswith(HF_PREFIX):
        return source.removeprefix(HF_PREFIX).rstrip("/").split("/")[-1]
    return Path(source).name.split(".")[0]


class ReplayTeacher:
    def __init__(self, source: str, columns: ReplayColumns, split: str, cache_dir: Path, teacher: str | None = None):
        self.source = source
        self.columns = columns
        self.split = split
        self.cache_dir = cache_dir
        self.teacher = teacher or replay_source_name(source)
        self.requests = 0

    def prompt_version(self, category: Category) -> str:
        return REPLAY_PROMPT_VERSION

    async def aclose(self) -> None:
        return None

    def _source_sql(self) -> str:
        if self.source.startswith(HF_PREFIX):
            path = self._hf_parquet()
        else:
            path = Path(self.source).expanduser()
            if not path.is_file():
                raise ReplayError(f"QC_TEACHER_REPLAY_SOURCE: no file at {path}")
        literal = sql_literal(str(path))
        if path.suffix == ".parquet":
            return f"read_parquet({literal})"
        if path.suffix in (".jsonl", ".json", ".ndjson"):
            return f"read_json({literal}, format = 'newline_delimited')"
        raise ReplayError(f"QC_TEACHER_REPLAY_SOURCE: {path} is neither .parquet nor .jsonl")

    def _hf_parquet(self) -> Path:
        """One parquet copy of the dataset split under QC_DATA_DIR, made once, so each shard reads it fast."""
        name = self.source.removeprefix(HF_PREFIX)
        digest = hashlib.sha256(f"{name}\0{self.split}".encode()).hexdigest()[:16]
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        target = self.cache_dir / f"{digest}.parquet"
        with FileLock(str(target) + ".lock"):
            if not target.exists():
                import datasets

                try:
                    dataset = datasets.load_dataset(name, split=self.split)
                except Exception as error:
                    raise ReplayError(
                        f"QC_TEACHER_REPLAY_SOURCE: cannot load {name!r} split {self.split!r}: {error}"
                    ) from error
                partial = target.with_suffix(".partial")
                dataset.to_parquet(str(partial))
                partial.rename(target)
        return target

    def _candidates(self, requests: list[LabelRequest]) -> dict[tuple[str, str], list[tuple[str | None, str | None]]]:
        match_values = {
            request.doc_id if self.columns.match_field == "doc_id" else request.text for request in requests
        }
        wanted = pa.table({"match": pa.array(sorted(match_values), pa.string())})
        connection = duckdb.connect()
        try:
            connection.register("wanted", wanted)
            rows = connection.execute(
                f"SELECT s.match, s.category, s.query, s.reasoning FROM ({self.columns.select_sql(self._source_sql())}) s "
                "JOIN wanted USING (match) ORDER BY s.match, s.category, s.query"
            ).fetchall()
        except duckdb.Error as error:
            raise ReplayError(f"QC_TEACHER_REPLAY_SOURCE {self.source}: {error}") from error
        finally:
            connection.close()
        found: dict[tuple[str, str], list[tuple[str | None, str | None]]] = {}
        for match, category, query, reasoning in rows:
            found.setdefault((match, category), []).append((query, reasoning))
        return found

    async def label_all(
        self, requests: Iterable[LabelRequest], budget: Budget, record: Callable[[LabelOutcome], None] | None = None
    ) -> AsyncIterator[LabelOutcome]:
        requests = list(requests)
        if not requests:
            return
        found = self._candidates(requests)
        for request in requests:
            match = request.doc_id if self.columns.match_field == "doc_id" else request.text
            candidates = found.get((match, request.category.name), [])
            if not candidates:
                yield LabelOutcome(request=request, status="absent")
                continue
            outcome = LabelOutcome(request=request, status="quarantined", raw_output=candidates[0][0])
            labels = []
            for query, reasoning in candidates:
                try:
                    labels.append((request.category.validate(query), reasoning))
                except LabelError as error:
                    outcome.error = f"replayed label rejected: {error}"
            if labels:
                # The first label within the cap, else the first over it.
                outcome.query, outcome.reasoning = min(labels, key=lambda label: request.category.over_cap(label[0]))
                outcome.status, outcome.error = "labeled", None
            if record is not None:
                record(outcome)
            yield outcome
