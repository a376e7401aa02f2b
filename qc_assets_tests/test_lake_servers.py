"""The servers the scale-out tests run the lake on are real: PostgreSQL answers SQL, and the S3 server checks
signatures and keeps what is written to it. Both are spoken to through the DuckDB extensions the lake loads."""

from __future__ import annotations

from urllib.parse import urlsplit

import duckdb
import pytest

from qc_assets.lake.resource import LakeResource, _load_extension
from qc_assets.lake.sql import sql_literal
from qc_assets.testing.lake_servers import PostgresServer, S3Server


def postgres_connection(dsn: str) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect()
    _load_extension(connection, "postgres_scanner")
    connection.execute(f"ATTACH {sql_literal(dsn)} AS pg (TYPE postgres)")
    return connection


def s3_connection(s3: S3Server, secret: str) -> duckdb.DuckDBPyConnection:
    """httpfs with an explicit secret: it ignores AWS_ENDPOINT_URL, and the lake's own endpoint support is not under
    test here."""
    connection = duckdb.connect()
    _load_extension(connection, "httpfs")
    connection.execute(
        f"CREATE TEMPORARY SECRET (TYPE s3, KEY_ID {sql_literal(s3.key_id)}, SECRET {sql_literal(secret)}, "
        f"REGION 'us-east-1', ENDPOINT {sql_literal(urlsplit(s3.endpoint).netloc)}, URL_STYLE 'path', USE_SSL false)"
    )
    return connection


def test_postgres_answers_sql_and_lets_the_role_create_tables(postgres_server: PostgresServer) -> None:
    connection = postgres_connection(postgres_server.create_database("smoke"))
    (version,) = connection.execute("SELECT * FROM postgres_query('pg', 'SELECT version()')").fetchone()
    assert version.startswith("PostgreSQL "), version
    # DuckLake creates its metadata tables as this role.
    connection.execute("CALL postgres_execute('pg', 'CREATE TABLE made_by_role (x int)')")
    assert connection.execute("SELECT count(*) FROM pg.made_by_role").fetchone() == (0,)


def test_s3_server_rejects_a_wrong_secret(s3_server: S3Server) -> None:
    bucket = s3_server.bucket("smoke")
    with pytest.raises(duckdb.Error, match="403"):
        s3_connection(s3_server, "not-the-secret").execute(f"COPY (SELECT 1 AS x) TO 's3://{bucket}/denied.parquet'")
    assert not (s3_server.root / bucket / "denied.parquet").exists()


def test_s3_server_keeps_what_is_written(s3_server: S3Server) -> None:
    bucket = s3_server.bucket("smoke")
    connection = s3_connection(s3_server, s3_server.secret)
    connection.execute(f"COPY (SELECT 42 AS x) TO 's3://{bucket}/prefix/x.parquet'")
    assert connection.execute(f"SELECT x FROM 's3://{bucket}/prefix/x.parquet'").fetchall() == [(42,)]
    assert (s3_server.root / bucket / "prefix" / "x.parquet").stat().st_size > 0


def test_each_lake_gets_its_own_database_and_prefix(
    lake_on_postgres_and_s3: dict[str, str], s3_server: S3Server
) -> None:
    environment = lake_on_postgres_and_s3
    kind, _, dsn = environment["QC_LAKE_CATALOG"].partition(":")
    assert kind == "postgres"
    connection = postgres_connection(dsn)
    assert connection.execute("SELECT * FROM postgres_query('pg', 'SELECT current_user')").fetchone() == ("qc",)
    database = dict(part.split("=") for part in dsn.split())["dbname"]
    assert environment["QC_LAKE_DATA_PATH"] == f"s3://lake/{database}/"
    assert environment["AWS_ENDPOINT_URL"] == s3_server.endpoint


def test_the_lake_writes_its_files_to_a_custom_endpoint_named_only_by_aws_endpoint_url(
    lake_on_postgres_and_s3: dict[str, str], s3_server: S3Server, monkeypatch
) -> None:
    for key, value in lake_on_postgres_and_s3.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    lake = LakeResource(
        catalog=lake_on_postgres_and_s3["QC_LAKE_CATALOG"], data_path=lake_on_postgres_and_s3["QC_LAKE_DATA_PATH"]
    )
    # Enough rows to be written as a parquet file: DuckLake may keep a handful inline in its catalog.
    lake.transaction(
        lambda c: c.execute(
            "INSERT INTO checkpoints (checkpoint, base_model, path, tiny_model) "
            "SELECT 'c' || i, 'tiny', '/x', true FROM range(2000) t(i)"
        ),
        "write rows",
    )
    prefix = lake_on_postgres_and_s3["QC_LAKE_DATA_PATH"].removeprefix("s3://")
    assert list((s3_server.root / prefix).rglob("*.parquet")), "no file reached the S3 server"
    reader = LakeResource(catalog=lake.catalog, data_path=lake.data_path, read_only=True)
    with reader.get_connection() as connection:
        # A column, not count(*): DuckLake answers count(*) from its catalog without reading the files.
        assert connection.execute("SELECT sum(length(checkpoint)), min(base_model) FROM checkpoints").fetchone() == (
            sum(len(f"c{i}") for i in range(2000)),
            "tiny",
        )
