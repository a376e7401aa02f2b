"""Where raw documents come from: local parquet/jsonl files or a Hugging Face dataset, one shard per file."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from qc_assets.lake.sql import sql_identifier, sql_literal
from qc_assets.naming import slug

HF_PREFIX = "hf:"
_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
BAD_ROWS_SHOWN = 20


class CorpusSourceError(ValueError):
    """The source as a whole cannot be used (nothing found, names collide)."""


class ShardReadError(ValueError):
    """One shard cannot be read; the message names its file and the problem."""


@dataclass(frozen=True)
class Shard:
    key: str
    location: str
    format: str


@dataclass
class ShardRows:
    """The readable rows of a shard as a DuckDB relation, and the rows that could not be read, by position.

    Parquet stays on disk for DuckDB's own parallel reader; rows parsed in Python arrive as an Arrow table.
    """

    num_rows: int
    table: pa.Table | None = None
    parquet_select: str | None = None
    bad_rows: list[tuple[int, str]] = field(default_factory=list)

    def relation(self, connection: duckdb.DuckDBPyConnection) -> str:
        """A FROM-clause item with columns source_id, raw_text, source_row."""
        if self.parquet_select is not None:
            return f"({self.parquet_select})"
        connection.register("raw_rows", self.table)
        return "raw_rows"


ROWS_SCHEMA = pa.schema([("source_id", pa.string()), ("raw_text", pa.string()), ("source_row", pa.int64())])


class CorpusSource(Protocol):
    def shards(self) -> list[Shard]: ...

    def read(self, shard: Shard) -> ShardRows: ...


def shard_key(relative_name: str) -> str:
    """A shard's partition key from its file name, without the format suffix: `2024/a b.parquet` -> `2024__a_b`.

    No digest: keys stay readable, and two files that map to one key stop the run (`_unique_shards`)."""
    stem = relative_name
    for suffix in _FORMATS:
        stem = stem.removesuffix(suffix)
    return slug(stem, separator="__", trim="_", fallback="shard", digest="never")


def _unique_shards(candidates: list[tuple[str, str, str]], source: str) -> list[Shard]:
    seen: dict[str, str] = {}
    shards = []
    for key, location, file_format in sorted(candidates):
        if key in seen:
            raise CorpusSourceError(
                f"QC_CORPUS_SOURCE={source!r}: {seen[key]} and {location} both map to shard key {key!r}; rename one"
            )
        seen[key] = location
        shards.append(Shard(key=key, location=location, format=file_format))
    return shards


def _check_text_type(text_type: pa.DataType, location: str, text_column: str) -> None:
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise ShardReadError(f"{location}: column {text_column!r} holds {text_type}, not text")


def _missing_text_column(location: str, text_column: str, columns: list[str]) -> ShardReadError:
    return ShardReadError(f"{location}: no column {text_column!r} (QC_CORPUS_TEXT_COLUMN); columns are {columns}")


def _rows_from_arrow(table: pa.Table, location: str, text_column: str, id_column: str) -> ShardRows:
    if text_column not in table.column_names:
        raise _missing_text_column(location, text_column, table.column_names)
    text = table.column(text_column)
    _check_text_type(text.type, location, text_column)
    if id_column in table.column_names:
        ids = table.column(id_column).cast(pa.string())
    else:
        ids = pa.nulls(table.num_rows, pa.string())
    rows = pa.table([ids, text.cast(pa.string()), pa.array(range(table.num_rows), pa.int64())], schema=ROWS_SCHEMA)
    return ShardRows(num_rows=rows.num_rows, table=rows)


def read_parquet(location: str, text_column: str, id_column: str) -> ShardRows:
    """Checks the footer and schema here, so a broken file fails with its name before any SQL runs."""
    try:
        schema = pq.read_schema(location)
        num_rows = pq.read_metadata(location).num_rows
    except (OSError, pa.ArrowException) as error:
        raise ShardReadError(f"{location}: not a readable parquet file ({error})") from error
    if text_column not in schema.names:
        raise _missing_text_column(location, text_column, schema.names)
    _check_text_type(schema.field(text_column).type, location, text_column)
    source_id = f"CAST({sql_identifier(id_column)} AS VARCHAR)" if id_column in schema.names else "NULL::VARCHAR"
    select = (
        f"SELECT {source_id} AS source_id, {sql_identifier(text_column)} AS raw_text, file_row_number AS source_row "
        f"FROM read_parquet({sql_literal(location)}, file_row_number = true)"
    )
    return ShardRows(num_rows=num_rows, parquet_select=select)


def read_jsonl(location: str, text_column: str, id_column: str) -> ShardRows:
    """Line by line, so one broken line costs that line only and is reported with its number."""
    ids: list[str | None] = []
    texts: list[str] = []
    rows: list[int] = []
    bad_rows: list[tuple[int, str]] = []
    try:
        handle = open(location, "rb")  # noqa: SIM115 (closed by the `with` below; only opening is guarded)
    except OSError as error:
        raise ShardReadError(f"{location}: cannot open ({error.strerror})") from error
    with handle:
        for row, raw_line in enumerate(handle):
            if not raw_line.strip():
                bad_rows.append((row, "empty line"))
                continue
            try:
                record = json.loads(raw_line.decode("utf-8"))
            except UnicodeDecodeError as error:
                bad_rows.append((row, f"not UTF-8 ({error.reason} at byte {error.start})"))
                continue
            except json.JSONDecodeError as error:
                bad_rows.append((row, f"broken JSON ({error.msg} at column {error.colno})"))
                continue
            if not isinstance(record, dict):
                bad_rows.append((row, f"a JSON {type(record).__name__}, not an object"))
                continue
            text = record.get(text_column)
            if not isinstance(text, str):
                problem = "missing" if text is None else f"a {type(text).__name__}, not a string"
                bad_rows.append((row, f"field {text_column!r} is {problem}"))
                continue
            doc_id = record.get(id_column)
            if doc_id is not None and not isinstance(doc_id, (str, int)):
                bad_rows.append((row, f"field {id_column!r} is a {type(doc_id).__name__}"))
                continue
            ids.append(None if doc_id is None else str(doc_id))
            texts.append(text)
            rows.append(row)
    if (
        not texts
        and bad_rows
        and all(problem.startswith(f"field {text_column!r} is missing") for _, problem in bad_rows)
    ):
        raise ShardReadError(f"{location}: no row has the field {text_column!r} (QC_CORPUS_TEXT_COLUMN)")
    table = pa.table(
        [pa.array(ids, pa.string()), pa.array(texts, pa.string()), pa.array(rows, pa.int64())], schema=ROWS_SCHEMA
    )
    return ShardRows(num_rows=table.num_rows, table=table, bad_rows=bad_rows)


@dataclass(frozen=True)
class LocalFiles:
    """A directory (searched recursively), a glob, or one file of parquet/jsonl shards."""

    source: str
    text_column: str = "text"
    id_column: str = "id"

    def shards(self) -> list[Shard]:
        path = Path(self.source).expanduser()
        if any(char in self.source for char in "*?["):
            files = [Path(name) for name in glob.glob(str(path), recursive=True)]
            base = None
        elif path.is_dir():
            files = [candidate for candidate in path.rglob("*") if candidate.is_file()]
            base = path
        elif path.is_file():
            files, base = [path], None
        else:
            raise CorpusSourceError(f"QC_CORPUS_SOURCE={self.source!r}: no such file or directory")
        candidates = [
            (
                shard_key(str(file.relative_to(base)) if base else file.name),
                str(file.resolve()),
                _FORMATS[file.suffix.lower()],
            )
            for file in files
            if file.suffix.lower() in _FORMATS
        ]
        if not candidates:
            raise CorpusSourceError(f"QC_CORPUS_SOURCE={self.source!r}: no .parquet or .jsonl files found")
        return _unique_shards(candidates, self.source)

    def read(self, shard: Shard) -> ShardRows:
        reader = read_parquet if shard.format == "parquet" else read_jsonl
        return reader(shard.location, self.text_column, self.id_column)


@dataclass(frozen=True)
class HuggingFaceDataset:
    """A dataset on the Hugging Face Hub (or a local folder laid out like one), through `datasets`.

    The file listing needs the network once; it is cached under QC_DATA_DIR so later start-ups are offline.
    """

    name: str
    config: str | None
    split: str
    cache_dir: Path
    text_column: str = "text"
    id_column: str = "id"

    @property
    def _listing_file(self) -> Path:
        slug = shard_key(f"{self.name}__{self.config or 'default'}__{self.split}")
        return self.cache_dir / f"{slug}.json"

    def _data_files(self) -> list[str]:
        if self._listing_file.exists():
            return json.loads(self._listing_file.read_text())
        import datasets

        try:
            builder = datasets.load_dataset_builder(self.name, self.config)
        except Exception as error:
            raise CorpusSourceError(
                f"QC_CORPUS_SOURCE=hf:{self.name} (config {self.config!r}): cannot list the dataset ({error})"
            ) from error
        data_files = builder.config.data_files or {}
        if self.split not in data_files:
            raise CorpusSourceError(f"QC_CORPUS_SPLIT={self.split!r}: hf:{self.name} has splits {sorted(data_files)}")
        files = [str(location) for location in data_files[self.split]]
        self._listing_file.parent.mkdir(parents=True, exist_ok=True)
        self._listing_file.write_text(json.dumps(files, indent=1))
        return files

    def shards(self) -> list[Shard]:
        candidates = []
        for location in self._data_files():
            suffix = Path(location.split("?")[0]).suffix.lower()
            if suffix in _FORMATS:
                candidates.append((shard_key(Path(location).name), location, _FORMATS[suffix]))
        if not candidates:
            raise CorpusSourceError(
                f"QC_CORPUS_SOURCE=hf:{self.name}: split {self.split!r} has no parquet or jsonl files"
            )
        return _unique_shards(candidates, f"hf:{self.name}")

    def read(self, shard: Shard) -> ShardRows:
        import datasets

        builder = "parquet" if shard.format == "parquet" else "json"
        try:
            dataset = datasets.load_dataset(builder, data_files=[shard.location], split="train")
        except Exception as error:
            raise ShardReadError(f"{shard.location}: cannot be loaded by datasets ({error})") from error
        return _rows_from_arrow(dataset.data.table, shard.location, self.text_column, self.id_column)


def open_corpus_source(
    source: str, hf_config: str | None, hf_split: str, text_column: str, id_column: str, listing_cache_dir: Path
) -> CorpusSource:
    if source.startswith(HF_PREFIX):
        return HuggingFaceDataset(
            name=source.removeprefix(HF_PREFIX),
            config=hf_config,
            split=hf_split,
            cache_dir=listing_cache_dir,
            text_column=text_column,
            id_column=id_column,
        )
    return LocalFiles(source, text_column, id_column)
