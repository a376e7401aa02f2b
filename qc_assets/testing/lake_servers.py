"""Real servers on 127.0.0.1 for the lake's scale-out path: PostgreSQL for the DuckLake catalog, and an S3 server
(rclone) for its files. Each picks a free loopback port, keeps its data and log in a fresh directory, and is stopped
and deleted on exit.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

import psutil

from qc_assets.orchestration.service import free_loopback_port
from qc_assets.testing.helpers import BIN

START_TIMEOUT_S = 60
# PostgreSQL refuses to run as root; as root, its commands run as the postgres user that Debian's package creates.
AS_POSTGRES = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def server_directory(prefix: str) -> Path:
    """A fresh directory under /tmp, not pytest's tmp_path: as root, postgres must traverse every parent, and
    /tmp/pytest-of-root is private to root."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    if AS_POSTGRES:
        shutil.chown(directory, "postgres", "postgres")
    return directory


def postgres_bin() -> Path:
    """Debian's server binaries (the newest version installed), else whatever is on PATH."""
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parts[-3]))
    initdb = installed[-1] if installed else shutil.which("initdb")
    if not initdb:
        raise RuntimeError("PostgreSQL's initdb was not found: `make test` installs Debian's postgresql package")
    return Path(initdb).parent


class PostgresServer:
    """A throwaway PostgreSQL cluster: trust authentication on 127.0.0.1 only, fsync off (tests need no durability
    across a machine crash, and fsync costs seconds per database created)."""

    ROLE = "qc"

    def __init__(self):
        self.bin = postgres_bin()
        self.port = free_loopback_port()
        self.directory = server_directory("qc-postgres-")
        self.data = self.directory / "data"
        self.log_path = self.directory / "postgres.log"

    def _run(self, *command: str, as_postgres: bool = False, timeout: float = START_TIMEOUT_S) -> None:
        """Run a PostgreSQL tool; on failure, raise with its output and the server's log."""
        prefix = AS_POSTGRES if as_postgres else []
        # cwd: the postgres user may not be allowed into the test's working directory.
        done = subprocess.run([*prefix, *command], cwd=self.directory, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(
                f"{Path(command[0]).name} failed ({done.returncode}): {done.stdout}{done.stderr}\n"
                f"PostgreSQL log ({self.log_path}):\n{log_tail(self.log_path)}"
            )

    def _sql(self, statement: str) -> None:
        """As the superuser, over TCP (trusted on loopback), so it needs no switch of user."""
        self._run(
            str(self.bin / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            statement,
        )

    def __enter__(self) -> Self:
        try:
            self._run(
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                as_postgres=True,
            )
            options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.directory} -c fsync=off"
            # -w: pg_ctl returns once the server accepts connections, or fails after -t seconds.
            self._run(
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(START_TIMEOUT_S),
                "-o",
                options,
                "start",
                as_postgres=True,
                timeout=START_TIMEOUT_S + 10,
            )
            self._sql(f"CREATE ROLE {self.ROLE} LOGIN")
        except BaseException:
            self.__exit__()
            raise
        return self

    def create_database(self, name: str) -> str:
        """A new database owned by the test role; returns its libpq DSN (for `QC_LAKE_CATALOG=postgres:<dsn>`)."""
        if not IDENTIFIER.fullmatch(name):
            raise ValueError(f"not a plain PostgreSQL identifier: {name!r}")
        self._sql(f"CREATE DATABASE {name} OWNER {self.ROLE}")
        return f"host=127.0.0.1 port={self.port} dbname={name} user={self.ROLE}"

    def __exit__(self, *_) -> None:
        if (self.data / "postmaster.pid").exists():
            # fast: roll back open sessions (a test's leftover connections) instead of waiting for them to end.
            subprocess.run(
                [*AS_POSTGRES, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                cwd=self.directory,
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(self.directory, ignore_errors=True)


class S3Server:
    """`rclone serve s3` over a local directory: every top-level folder is a bucket, SigV4 with a random key."""

    def __init__(self, buckets: tuple[str, ...] = ("lake", "smoke")):
        self.buckets = buckets
        self.port = free_loopback_port()
        self.directory = Path(tempfile.mkdtemp(prefix="qc-s3-", dir="/tmp"))
        self.root = self.directory / "buckets"
        self.log_path = self.directory / "rclone.log"
        self.key_id = secrets.token_hex(10)
        self.secret = secrets.token_hex(20)
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.root.mkdir()
        for bucket in self.buckets:
            (self.root / bucket).mkdir()
        command = [
            str(BIN / "rclone"),
            "serve",
            "s3",
            str(self.root),
            "--addr",
            f"127.0.0.1:{self.port}",
            "--auth-key",
            f"{self.key_id},{self.secret}",
            # An empty config: a developer's own rclone.conf must not change the server.
            "--config",
            "",
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        process = self.process
        assert process is not None, "_wait_ready runs after __enter__ has started rclone"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited ({process.returncode}):\n{log_tail(self.log_path)}")
            # Its own listening socket, not a connect: another process may have taken the port since it was picked.
            if any(
                connection.status == psutil.CONN_LISTEN and connection.laddr.port == self.port
                for connection in psutil.Process(process.pid).net_connections(kind="tcp")
            ):
                return
            time.sleep(0.05)
        raise TimeoutError(
            f"rclone serve s3 not listening on {self.endpoint} after {START_TIMEOUT_S}s:\n{log_tail(self.log_path)}"
        )

    def bucket(self, name: str) -> str:
        """One of the buckets made before the server started. rclone caches directory listings (5 minutes by
        default), so a bucket made on disk later would stay unseen; turning that cache off (`--dir-cache-time 0s`)
        makes writes under nested prefixes take seconds each, and DuckDB's uploads time out."""
        if name not in self.buckets:
            raise ValueError(f"bucket {name!r} was not made at start; S3Server(buckets=...) has {self.buckets}")
        return name

    def environment(self) -> dict[str, str]:
        """What the AWS SDKs (and the lake, through AWS_ENDPOINT_URL) read to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def __exit__(self, *_) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
