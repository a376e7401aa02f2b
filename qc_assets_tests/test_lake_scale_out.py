"""The lake where users outgrow one machine: its catalog in a real PostgreSQL 15 and its files on a real S3 server,
both on 127.0.0.1 and started by the suite (`lake_on_postgres_and_s3`). Two "machines" are two processes with their
own QC_DATA_DIR (their own Dagster instance, journals and locks) sharing only the lake."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from qc_assets.defs.corpus.synthetic import write_fineweb_shard
from qc_assets.lake.resource import LakeResource, extension_file, s3_secret_sql
from qc_assets.paths import PROJECT_ROOT
from qc_assets.testing.analyst import analyst_session, inconsistencies
from qc_assets_tests.conftest import BIN, run_qc
from qc_assets_tests.test_concurrency import _first_attach

SAMPLE_DOCUMENTS = 64
# Read from the files themselves: DuckLake answers count(*) from its catalog, even when the files are unreachable.
CORPUS_CHECK = (
    "SELECT count(*) AS n, count(DISTINCT doc_id) AS ids, coalesce(sum(length(text)), 0) AS chars FROM corpus"
)


def clean_env(env: dict[str, str]) -> dict[str, str]:
    outside = {key: value for key, value in os.environ.items() if not key.startswith(("QC_", "AWS_"))}
    return {**outside, **env}


def corpus_check(env: dict[str, str]) -> tuple[int, int, int]:
    answer = run_qc(["sql", "--format", "csv", CORPUS_CHECK], clean_env(env))
    assert answer.returncode == 0, answer.stderr[-2000:]
    return tuple(int(value) for value in answer.stdout.splitlines()[1].split(","))


def two_machines_ingest(tmp_path: Path, lake: dict[str, str], round_: int) -> list[subprocess.CompletedProcess]:
    """`qc run --select corpus` on two machines at once, each with its own QC_DATA_DIR, into one lake."""
    processes = [
        subprocess.Popen(
            [str(BIN / "qc"), "run", "--select", "corpus"],
            env=clean_env({**lake, "QC_DATA_DIR": str(tmp_path / f"round-{round_}-{machine}")}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for machine in ("a", "b")
    ]
    return [(process.wait(timeout=300), process.stdout.read()) for process in processes]


@pytest.fixture
def sqlite_lake(tmp_path) -> dict[str, str]:
    shared = tmp_path / "shared-lake"
    return {"QC_LAKE_CATALOG": f"sqlite:{shared / 'catalog.sqlite'}", "QC_LAKE_DATA_PATH": f"{shared / 'files'}/"}


@pytest.mark.long(300)
@pytest.mark.parametrize("catalog", ["postgres", "sqlite"])
def test_two_machines_replacing_the_same_new_partitions_leave_exactly_one_copy(catalog, tmp_path, request):
    # Before writers took turns on PostgreSQL, two runs replacing a partition that had no rows yet both committed:
    # 80, 96 or 128 rows for 64 documents in most rounds. A reader runs `qc sql` throughout.
    expected_chars = None
    for round_ in range(3 if catalog == "postgres" else 2):
        lake = (
            request.getfixturevalue("lake_on_postgres_and_s3")
            if catalog == "postgres"
            else {
                key: value.replace("shared-lake", f"shared-lake-{round_}")
                for key, value in request.getfixturevalue("sqlite_lake").items()
            }
        )
        reader_env = {**lake, "QC_DATA_DIR": str(tmp_path / f"reader-{round_}")}
        (tmp_path / f"reader-{round_}").mkdir()
        with analyst_session(tmp_path / f"reader-{round_}", reader_env, pause_s=0.5) as analyst:
            outcomes = two_machines_ingest(tmp_path, lake, round_)
        assert [status for status, _ in outcomes] == [0, 0], [output[-3000:] for _, output in outcomes]
        rows, ids, chars = corpus_check(reader_env)
        assert rows == ids == SAMPLE_DOCUMENTS, f"round {round_}: {rows} rows for {ids} documents"
        expected_chars = expected_chars or chars
        assert chars == expected_chars
        assert not analyst.failures, analyst.failures[:2]
        assert not inconsistencies(analyst.answers, analyst.final_by_shard())


@pytest.mark.long(30)
def test_processes_attaching_a_fresh_postgres_catalog_at_once_all_succeed(request):
    # Four processes starting together failed 30 of 40 attaches ("duplicate key value violates unique constraint",
    # "relation ducklake_metadata already exists") before the first use took the catalog's init lock.
    context = multiprocessing.get_context("spawn")
    for _ in range(3):
        lake = request.getfixturevalue("lake_on_postgres")
        results = context.Queue()
        start_at = time.time() + 5
        processes = [
            context.Process(
                target=_first_attach, args=(lake["QC_LAKE_CATALOG"], lake["QC_LAKE_DATA_PATH"], start_at, results)
            )
            for _ in range(4)
        ]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=120) for _ in processes]
        for process in processes:
            process.join(timeout=60)
        assert outcomes == [("ok", 0)] * 4, outcomes


def snapshots(catalog: str) -> int:
    """DuckLake's commits so far, read from the catalog's own table: milliseconds, where `qc sql` takes seconds."""
    import psycopg

    with psycopg.connect(catalog.removeprefix("postgres:")) as session:
        return session.execute("SELECT count(*) FROM ducklake_snapshot").fetchone()[0]


@pytest.mark.long(40)
def test_a_writer_killed_mid_commit_on_postgres_resumes_with_nothing_lost_or_doubled(lake_on_postgres_and_s3, tmp_path):
    # Twelve synthetic shards, one run at a time, killed the moment the first shard's commit lands: the next shard is
    # being read or committed.
    source = tmp_path / "corpus"
    documents = set()
    for shard in range(12):
        path = write_fineweb_shard(source / f"shard-{shard:02d}.parquet", count=40, mean_chars=400, seed=shard)
        documents |= {text for text in pq.read_table(path, columns=["text"]).column("text").to_pylist()}
    expected = len({text.strip() for text in documents if 100 <= len(text.strip()) <= 2000})
    env = {**lake_on_postgres_and_s3, "QC_DATA_DIR": str(tmp_path / "data"), "QC_CORPUS_SOURCE": str(source)}
    with LakeResource(catalog=env["QC_LAKE_CATALOG"], data_path=env["QC_LAKE_DATA_PATH"]).get_connection():
        pass  # the empty lake, so that its commits can be counted from the start
    before = snapshots(env["QC_LAKE_CATALOG"])
    writer = subprocess.Popen(
        [str(BIN / "qc"), "run", "--select", "corpus"],
        env=clean_env(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while snapshots(env["QC_LAKE_CATALOG"]) == before:
            assert writer.poll() is None and time.monotonic() < deadline, "the writer ended before anything committed"
            time.sleep(0.02)
    finally:
        os.killpg(writer.pid, signal.SIGKILL)
        writer.wait()
    partial_rows = corpus_check(env)[0]
    assert 0 < partial_rows < expected, "the kill came after every shard had committed"
    # The killed writer's session may have held the catalog's write lock: the server frees it with the session.
    resumed = run_qc(["run", "--select", "corpus"], clean_env(env))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rows, ids, _ = corpus_check(env)
    assert rows == ids == expected


def test_a_custom_s3_endpoint_becomes_a_temporary_path_style_secret_with_tls_from_its_scheme():
    assert s3_secret_sql({"AWS_ACCESS_KEY_ID": "k"}) is None
    plain = s3_secret_sql(
        {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    )
    assert plain.startswith("CREATE OR REPLACE TEMPORARY SECRET")
    assert "ENDPOINT '127.0.0.1:9000'" in plain and "URL_STYLE 'path'" in plain and "USE_SSL false" in plain
    assert "REGION 'us-east-1'" in plain and "KEY_ID 'k'" in plain and "SECRET 's'" in plain
    tls = s3_secret_sql(
        {
            "AWS_ENDPOINT_URL": "http://ignored:1",
            "AWS_ENDPOINT_URL_S3": "https://r2.example.com",
            "AWS_REGION": "auto",
            "AWS_SESSION_TOKEN": "t",
        }
    )
    assert "ENDPOINT 'r2.example.com'" in tls and "USE_SSL true" in tls and "REGION 'auto'" in tls
    assert "SESSION_TOKEN 't'" in tls
    with pytest.raises(ValueError, match="AWS_ENDPOINT_URL"):
        s3_secret_sql({"AWS_ENDPOINT_URL": "127.0.0.1:9000"})


# Every value is read from the parquet files: lengths of texts and queries, the scores themselves.
WHOLE_GRAPH_CHECK = """
SELECT
  (SELECT sum(length(text)) FROM corpus) AS corpus_chars,
  (SELECT count(*) FROM generated_queries) AS generated,
  (SELECT count(*) FILTER (WHERE length(query) >= 0) FROM generated_queries) AS generated_read,
  (SELECT count(*) FROM reranker_scores WHERE score BETWEEN 0 AND 1) AS scored,
  (SELECT count(*) FROM teacher_labels) AS labelled,
  (SELECT count(DISTINCT source) FROM reranker_scores) AS sources,
  (SELECT sum(n)::BIGINT FROM eval_summary WHERE category = 'all') AS summarised,
  (SELECT count(*) FROM teacher_vs_student) AS compared
"""

# The README's "offline and with the project's settings" snippet, on whatever lake the environment names.
README_PYTHON_SNIPPET = """
from qc_assets.lake.resource import LakeResource
from qc_assets.settings import load_settings

settings = load_settings()
with LakeResource(catalog=settings.catalog, data_path=settings.data_path, read_only=True).get_connection() as con:
    print(con.sql("SELECT count(*), round(sum(score), 6) FROM reranker_scores").fetchone())
"""


@pytest.mark.long(500)
@pytest.mark.timeout(1200)
def test_the_whole_graph_runs_on_a_postgres_catalog_with_its_files_on_s3(lake_on_postgres_and_s3, s3_server, tmp_path):
    env = clean_env(
        {
            **lake_on_postgres_and_s3,
            "QC_DATA_DIR": str(tmp_path / "data"),
            "QC_STUDENT_BASE_MODELS": "tiny",
            "QC_SCORER_MODEL": "tiny",
        }
    )
    done = run_qc(["run"], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    prefix = env["QC_LAKE_DATA_PATH"].removeprefix("s3://").rstrip("/")
    on_s3 = {
        path.relative_to(s3_server.root / prefix).parts[1] for path in (s3_server.root / prefix).rglob("*.parquet")
    }
    assert {"corpus", "generated_queries", "reranker_scores"} <= on_s3, on_s3
    assert not list((tmp_path / "data").rglob("ducklake-*.parquet")), "the lake wrote files outside S3"
    rows, ids, _ = corpus_check(env)
    assert rows == ids == SAMPLE_DOCUMENTS
    answer = run_qc(["sql", "--format", "json", WHOLE_GRAPH_CHECK], env)
    assert answer.returncode == 0, answer.stderr[-2000:]
    (found,) = json.loads(answer.stdout)
    # The checkpoint's queries of the sample's test documents and every teacher label are scored; the report and
    # the comparison cover the test documents, the same keys for both.
    assert found["generated"] == found["generated_read"] > 0
    assert found["scored"] == found["generated"] + found["labelled"] and found["sources"] == 2
    assert found["summarised"] == 2 * found["generated"] and found["compared"] == found["generated"]
    snippet = subprocess.run(
        [str(BIN / "python"), "-c", README_PYTHON_SNIPPET], env=env, capture_output=True, text=True, timeout=120
    )
    assert snippet.returncode == 0, snippet.stderr[-2000:]
    assert snippet.stdout.startswith(f"({found['scored']}, "), snippet.stdout


def readme_scale_out_sql() -> str:
    """The README's DuckDB snippet for the PostgreSQL + S3 lake, as printed there."""
    text = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("**The lake on PostgreSQL and S3.**") :]
    return section[section.index("```sql\n") + len("```sql\n") : section.index("```", section.index("```sql\n") + 6)]


def test_the_readmes_duckdb_snippet_reads_a_postgres_and_s3_lake(lake_on_postgres_and_s3, s3_server):
    lake = lake_on_postgres_and_s3
    with pytest.MonkeyPatch.context() as patch:
        for key, value in lake.items():
            patch.setenv(key, value)
        LakeResource(catalog=lake["QC_LAKE_CATALOG"], data_path=lake["QC_LAKE_DATA_PATH"]).transaction(
            # Enough rows for a parquet file on S3: DuckLake keeps a handful inline in its catalog.
            lambda c: c.execute(
                "INSERT INTO teacher_labels (doc_id, category, teacher, query) "
                "SELECT 'd' || i, 'keywords', 't', 'q' FROM range(2000) AS r(i)"
            ),
            "labels",
        )
    prefix = s3_server.root / lake["QC_LAKE_DATA_PATH"].removeprefix("s3://")
    assert list(prefix.rglob("*.parquet")), "the labels were not written to S3"
    snippet = readme_scale_out_sql()
    endpoint = s3_server.endpoint.removeprefix("http://")
    for placeholder, value in {
        "KEY_ID '...'": f"KEY_ID '{s3_server.key_id}'",
        "SECRET '...'": f"SECRET '{s3_server.secret}'",
        "minio.example.com:9000": endpoint,
        "USE_SSL true": "USE_SSL false",
        "host=postgresql port=5432 dbname=qc_lake user=qc": lake["QC_LAKE_CATALOG"].removeprefix("postgres:"),
        "s3://qc-lake/lake/": lake["QC_LAKE_DATA_PATH"],
    }.items():
        assert placeholder in snippet, placeholder
        snippet = snippet.replace(placeholder, value)
    connection = duckdb.connect()
    # The DuckDB CLI installs these from the network; offline, the wheels the project installs carry them.
    for extension in ("ducklake", "postgres_scanner", "httpfs"):
        connection.execute(f"LOAD '{extension_file(extension)}'")
    statements = [
        statement for statement in snippet.split(";") if statement.strip() and not statement.strip().startswith("LOAD")
    ]
    for statement in statements[:-1]:
        connection.execute(statement)
    assert connection.execute(statements[-1]).fetchall() == [("keywords", 2000)]
