"""The lake: DuckDB in front of a DuckLake catalog, so many writers and open analyst sessions coexist.

A single .duckdb file admits one read-write process and locks every other process out, readers included.
DuckLake keeps the catalog in SQLite (one machine) or PostgreSQL (many machines) and the rows in parquet
files, and every DuckDB process attaches it on its own. Writers take turns, one transaction at a time: on a SQLite
catalog through a lock file beside it, on a PostgreSQL catalog through an advisory lock its server holds, so the
turns reach across machines. Readers never take a lock that a writer waits on.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import duckdb
import pyarrow as pa
from dagster_duckdb import DuckDBResource
from filelock import FileLock
from pydantic import Field

from qc_assets.lake.sql import catalog_parts, sql_identifier, sql_literal
from qc_assets.lake.tables import TABLES, VIEWS, Table

if TYPE_CHECKING:
    import psycopg

LAKE = "lake"
_RETRYABLE = ("database is locked", "conflict", "sqlite_busy", "could not serialize")
_tables_ready: set[tuple[str, str]] = set()
T = TypeVar("T")
log = logging.getLogger(__name__)


def fetch_row(result: duckdb.DuckDBPyConnection) -> tuple[Any, ...]:
    """The one row of an aggregate, or of the count an INSERT or DELETE reports; no row there is a DuckDB fault."""
    row = result.fetchone()
    if row is None:
        raise RuntimeError("DuckDB returned no row where the statement always yields one")
    return row


def extension_file(name: str) -> str:
    """DuckDB cannot download extensions here; the duckdb-extension-* wheels carry them."""
    package = f"duckdb_extension_{name}"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise RuntimeError(
            f"the DuckDB extension {name!r} is needed but the package {package.replace('_', '-')}"
            f"=={duckdb.__version__} is not installed"
        ) from None
    if module.__file__ is None:
        raise RuntimeError(f"{package} has no __init__.py: reinstall {package.replace('_', '-')}=={duckdb.__version__}")
    root = Path(module.__file__).parent / "extensions"
    matches = sorted(root.glob(f"v{duckdb.__version__}/{name}.duckdb_extension"))
    if not matches:
        raise RuntimeError(f"{package} has no build of {name} for duckdb {duckdb.__version__} under {root}")
    return str(matches[0])


def _load_extension(connection: duckdb.DuckDBPyConnection, name: str) -> None:
    connection.execute(f"LOAD {sql_literal(extension_file(name))}")


def is_retryable(error: Exception) -> bool:
    return isinstance(error, duckdb.Error) and any(text in str(error).lower() for text in _RETRYABLE)


def retry_transient(work: Callable[[], T], what: str, deadline_s: float = 600.0) -> T:
    """Run `work` until it gets past the lake's optimistic concurrency; other errors propagate at once."""
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return work()
        except duckdb.Error as error:
            attempt += 1
            waited = time.monotonic() - started
            if not is_retryable(error) or waited > deadline_s:
                raise
            pause = random.uniform(0, min(2.0, 0.02 * 2**attempt))
            log.debug("%s: concurrent commit, retry %d in %.2fs (%s)", what, attempt, pause, error)
            time.sleep(pause)


def _prepare_sqlite_catalog(path: Path) -> None:
    """WAL lets readers keep reading while one writer commits; the default journal blocks both ways."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path, timeout=60) as catalog:
        if catalog.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            catalog.execute("PRAGMA journal_mode=WAL")


# The write lock of each connection attached to a SQLite catalog (by id; dropped when the connection closes): one
# FileLock per catalog, shared by its connections, so that a thread already holding it may take it again.
_write_locks: dict[int, FileLock] = {}
_catalog_write_locks: dict[str, FileLock] = {}


def _write_lock(connection: duckdb.DuckDBPyConnection):
    """One writer at a time on a catalog, across processes, threads and (PostgreSQL) machines.

    DuckLake lets writers commit concurrently and resolves their conflicts itself, and it resolves some wrongly:
    - on a SQLite catalog it lost a commit here: a labelling run's 12 labels were written to a parquet file that the
      catalog never registered, with no error, while another shard's run committed beside it (bench/reliability.py);
    - on a PostgreSQL catalog two transactions that each replace a partition that has no rows yet both commit (a
      DELETE that removed nothing does not conflict with an INSERT), doubling its rows.
    Serialized, no commit ever meets another, and a transaction starts from every commit before it. Readers take
    no lock."""
    return _write_locks.get(id(connection)) or nullcontext()


class AdvisoryLock:
    """A session-level advisory lock on a PostgreSQL server: every machine that reaches the catalog sees it, and the
    server frees it when the holder's session ends, a killed process included. The session opens on first use and
    is kept for the DuckDB connection's life; re-entering from the thread that holds it is a no-op, as FileLock's is."""

    def __init__(self, dsn: str, name: str) -> None:
        self.dsn = dsn
        self.key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        self._session: psycopg.Connection | None = None
        self._depth = 0

    def __enter__(self) -> AdvisoryLock:
        if self._depth == 0:
            if self._session is None:
                import psycopg

                self._session = psycopg.connect(self.dsn, autocommit=True)
            self._session.execute("SELECT pg_advisory_lock(%s)", (self.key,))
        self._depth += 1
        return self

    def __exit__(self, *exc_info) -> None:
        self._depth -= 1
        if self._depth == 0 and self._session is not None:
            self._session.execute("SELECT pg_advisory_unlock(%s)", (self.key,))

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


@contextmanager
def _held_once(lock: AdvisoryLock) -> Iterator[None]:
    try:
        with lock:
            yield
    finally:
        lock.close()


def _catalog_lock(catalog: str, purpose: str):
    """The lock that makes `purpose` ("write" or "init") one process at a time on this catalog. The write lock's
    PostgreSQL session lasts as long as the connection; the init lock's only as long as it is held."""
    kind, location = catalog_parts(catalog)
    if kind == "postgres":
        lock = AdvisoryLock(location, f"qc_assets lake {purpose}")
        return lock if purpose == "write" else _held_once(lock)
    Path(location).parent.mkdir(parents=True, exist_ok=True)
    if purpose == "write":
        # filelock's default lock is per thread (reentrant within one), so a run's writer thread and its main thread
        # exclude each other as two processes do; one FileLock per catalog, shared by its connections.
        return _catalog_write_locks.setdefault(location, FileLock(f"{location}.{purpose}.lock"))
    return FileLock(f"{location}.{purpose}.lock")


def s3_secret_sql(environ: dict[str, str] | os._Environ = os.environ) -> str | None:
    """A temporary (never written) DuckDB secret for a custom S3 endpoint (MinIO, R2, rclone, on-premise), or None.

    DuckDB's httpfs reads AWS keys and region from the environment but not AWS_ENDPOINT_URL[_S3], so without this
    every request would go to amazonaws.com. Such endpoints are addressed path-style; TLS follows the URL's scheme."""
    endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return None
    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise ValueError(f"AWS_ENDPOINT_URL must be http(s)://host[:port], got {endpoint!r}")
    options = {
        "KEY_ID": environ.get("AWS_ACCESS_KEY_ID"),
        "SECRET": environ.get("AWS_SECRET_ACCESS_KEY"),
        "SESSION_TOKEN": environ.get("AWS_SESSION_TOKEN"),
        "REGION": environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "ENDPOINT": url.netloc,
        "URL_STYLE": "path",
    }
    settings = [f"{name} {sql_literal(value)}" for name, value in options.items() if value]
    settings.append(f"USE_SSL {'true' if url.scheme == 'https' else 'false'}")
    return f"CREATE OR REPLACE TEMPORARY SECRET qc_lake_s3 (TYPE s3, {', '.join(settings)})"


def _run_in_transaction(connection: duckdb.DuckDBPyConnection, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
    with _write_lock(connection):
        connection.execute("BEGIN")
        try:
            result = work(connection)
            connection.execute("COMMIT")
            return result
        except BaseException:
            try:
                connection.execute("ROLLBACK")
            except duckdb.Error:
                pass  # a failed COMMIT has already ended the transaction
            raise


class LakeResource(DuckDBResource):
    """DuckDBResource whose connections have the DuckLake lake attached and selected."""

    database: str = Field(default=":memory:", description="DuckDB's own database; the data lives in the lake.")
    catalog: str = Field(description="`sqlite:<path>` or `postgres:<libpq dsn>` (QC_LAKE_CATALOG).")
    data_path: str = Field(description="Where DuckLake writes parquet files (QC_LAKE_DATA_PATH).")
    read_only: bool = Field(default=False, description="Attach for reading only (analysts).")

    def _attach(self, connection: duckdb.DuckDBPyConnection) -> None:
        _load_extension(connection, "ducklake")
        kind, location = catalog_parts(self.catalog)
        if kind == "sqlite":
            _load_extension(connection, "sqlite_scanner")
            if not self.read_only:
                _prepare_sqlite_catalog(Path(location))
            elif not Path(location).exists():
                raise FileNotFoundError(f"no lake at {location}: nothing has been materialized yet (QC_DATA_DIR)")
        else:
            _load_extension(connection, "postgres_scanner")
        if not self.read_only:
            _write_locks[id(connection)] = _catalog_lock(self.catalog, "write")
        if self.data_path.startswith(("s3://", "gs://", "gcs://", "r2://", "az://", "https://")):
            _load_extension(connection, "httpfs")
            secret = s3_secret_sql()
            if secret is not None:
                connection.execute(secret)
        elif not self.read_only:
            Path(self.data_path).mkdir(parents=True, exist_ok=True)
        options = [f"DATA_PATH {sql_literal(self.data_path)}"]
        if self.read_only:
            options.append("READ_ONLY")
        statement = f"ATTACH {sql_literal('ducklake:' + self.catalog)} AS {LAKE} ({', '.join(options)})"
        retry_transient(lambda: connection.execute(statement), "attach lake")
        connection.execute(f"USE {LAKE}")

    def _ensure_tables(self, connection: duckdb.DuckDBPyConnection) -> None:
        key = (self.catalog, self.data_path)
        if key in _tables_ready:
            return

        def create_or_evolve(connection: duckdb.DuckDBPyConnection) -> None:
            for table in TABLES.values():
                connection.execute(table.create_sql())
                existing = {row[0] for row in connection.execute(f"DESCRIBE {sql_identifier(table.name)}").fetchall()}
                for statement in table.add_missing_columns_sql(existing):
                    connection.execute(statement)
            comments = dict(
                connection.execute(
                    "SELECT view_name, comment FROM duckdb_views() WHERE database_name = ?", [LAKE]
                ).fetchall()
            )
            for view in VIEWS.values():
                if comments.get(view.name) != view.comment:
                    connection.execute(view.create_sql())
                    connection.execute(f"COMMENT ON VIEW {sql_identifier(view.name)} IS {sql_literal(view.comment)}")

        retry_transient(lambda: _run_in_transaction(connection, create_or_evolve), "create lake tables")
        _tables_ready.add(key)

    def _first_use_lock(self):
        """A lock held while a process first attaches the catalog and creates the tables.

        Two processes that attach a new catalog at once both initialise DuckLake's metadata in it, and two that
        create the tables at once can have one of them commit a schema change under the other's running
        transaction: either way a run fails (SQLite: "database disk image is malformed", a table not found;
        PostgreSQL: "duplicate key value violates unique constraint", "relation ducklake_metadata already exists"),
        which `qc run --parallel` on a fresh QC_DATA_DIR did. Only the first connection of each process takes it.
        """
        if self.read_only or (self.catalog, self.data_path) in _tables_ready:
            return nullcontext()
        return _catalog_lock(self.catalog, "init")

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        connection = duckdb.connect(
            self.database,
            config={"custom_user_agent": "qc_assets", "preserve_insertion_order": False, **self.connection_config},
        )
        try:
            with self._first_use_lock():
                self._attach(connection)
                if not self.read_only:
                    self._ensure_tables(connection)
            yield connection
        finally:
            write_lock = _write_locks.pop(id(connection), None)
            if isinstance(write_lock, AdvisoryLock):
                write_lock.close()
            connection.close()

    def transaction(self, work: Callable[[duckdb.DuckDBPyConnection], T], what: str) -> T:
        """Run `work` in one lake transaction, re-running it whole when another writer committed first."""
        with self.get_connection() as connection:
            return run_transaction(connection, work, what)


def run_transaction(
    connection: duckdb.DuckDBPyConnection, work: Callable[[duckdb.DuckDBPyConnection], T], what: str
) -> T:
    """`LakeResource.transaction` on a connection the caller keeps open across many writes."""
    return retry_transient(lambda: _run_in_transaction(connection, work), what)


def replace_partition(
    connection: duckdb.DuckDBPyConnection, table: Table, partition: dict[str, str], rows_relation: str
) -> int:
    """Delete a partition's rows and insert the new ones; call inside `LakeResource.transaction`."""
    name = sql_identifier(table.name)
    where = " AND ".join(f"{sql_identifier(column)} = ?" for column in partition)
    values = list(partition.values())
    connection.execute(f"DELETE FROM {name} WHERE {where}", values)
    columns = ", ".join(sql_identifier(column) for column in table.column_names)
    connection.execute(f"INSERT INTO {name} ({columns}) SELECT {columns} FROM {rows_relation}")
    return fetch_row(connection.execute(f"SELECT count(*) FROM {name} WHERE {where}", values))[0]


def replace_partition_rows(
    connection: duckdb.DuckDBPyConnection, table: Table, partition: dict[str, str], rows: pa.Table
) -> int:
    """`replace_partition` from an Arrow table of rows."""
    view = f"{table.name}_new_rows"
    connection.register(view, rows)
    try:
        return replace_partition(connection, table, partition, view)
    finally:
        # The connection outlives this write: it should not hold on to the rows.
        connection.unregister(view)
