"""Dagster's processes on the project's instance (code server, webserver, daemon), and the webserver's GraphQL API.

`qc ui` replaces itself with `dagster dev`, which starts all three; `qc run` starts them itself for as long as it
runs, asks the webserver for a backfill through the same GraphQL mutation the UI's "Materialize" dialog sends, and
stops them at the end.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

from qc_assets.orchestration.graphql import LOCATION, DagsterGraphQL
from qc_assets.paths import PROJECT_ROOT

DEFINITIONS_MODULE = "qc_assets.definitions"


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dagster_dev_command(host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-w",
        str(PROJECT_ROOT / "workspace.yaml"),
        "-h",
        host,
        "-p",
        str(port),
    ]


def _script(name: str) -> str:
    """A console script of this environment (`dagster-daemon`, `dagster-webserver`), beside its interpreter."""
    return str(Path(sys.executable).with_name(name))


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, so a killed `qc run` leaves no daemon behind
    launching runs on its own (Linux; elsewhere the child outlives it)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class DagsterService(DagsterGraphQL):
    """Dagster's processes for one `qc run` on the project's instance, each logging to `log_dir`: a code server for
    the code location, the webserver on 127.0.0.1:`port` (spoken to over GraphQL), and, once `start_daemon` is
    called, the daemon, which runs backfills, the run queue and sensors.

    The daemon starts last, once the backfill is in: its backfill loop looks for work every 30 s from its start, so
    a backfill already there is picked up at once instead of up to 30 s later. `dagster dev` starts all three at once.
    """

    def __init__(self, env: dict[str, str], log_dir: Path, port: int | None = None):
        self.port = port or free_loopback_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.log_dir = log_dir
        self.log_path = log_dir / "webserver.log"
        self.env = env
        self.grpc_port = free_loopback_port()
        self.processes: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, command: list[str], to_log: bool = True) -> None:
        """Start `command`; its output goes to `name`.log, or with `to_log` False, to this process's own output."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "wb") as log:
            self.processes[name] = subprocess.Popen(
                command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log if to_log else None,
                stderr=subprocess.STDOUT if to_log else None,
                preexec_fn=_die_with_parent,
            )

    def _workspace(self) -> list[str]:
        """The code server as the `qc_assets` location, the name the UI's workspace.yaml gives it, so that runs
        launched here and there belong to the same location."""
        workspace = self.log_dir / "workspace.yaml"
        workspace.write_text(
            "load_from:\n  - grpc_server:\n      host: 127.0.0.1\n"
            f"      port: {self.grpc_port}\n      location_name: {LOCATION}\n"
        )
        return ["-w", str(workspace)]

    def start(self) -> Self:
        """The code server, then (once it answers) the webserver."""
        self._spawn(
            "code-server",
            [sys.executable, "-m", "dagster", "code-server", "start", "-m", DEFINITIONS_MODULE]
            + ["-h", "127.0.0.1", "-p", str(self.grpc_port)],
            # The runs' workers are its children: their step logs are `qc run`'s progress, shown as they come.
            to_log=False,
        )
        self._wait_for_code_server()
        webserver = [_script("dagster-webserver"), "-h", "127.0.0.1", "-p", str(self.port)]
        self._spawn("webserver", webserver + self._workspace())
        return self

    def start_daemon(self) -> None:
        self._spawn("daemon", [_script("dagster-daemon"), "run", *self._workspace()])

    def _wait_for_code_server(self, timeout: float = 180) -> None:
        check = [sys.executable, "-m", "dagster", "api", "grpc-health-check", "-p", str(self.grpc_port)]
        deadline = time.monotonic() + timeout
        while subprocess.run(check, capture_output=True, env=self.env).returncode != 0:
            self.check_alive("the code server")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the code server did not answer in {timeout:.0f}s (its output is above)")
            time.sleep(0.5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self, grace: float = 30) -> None:
        """SIGTERM to each, the daemon first (no new runs), then SIGKILL to any left after `grace` seconds."""
        for name in ("daemon", "webserver", "code-server"):
            process = self.processes.get(name)
            if process is not None and process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + grace
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log_tail(self, name: str = "webserver", lines: int = 40) -> str:
        try:
            text = (self.log_dir / f"{name}.log").read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self, waiting_for: str) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(
                    f"Dagster's {name} exited with code {process.returncode} while waiting for {waiting_for}; "
                    f"its output ({self.log_dir / name}.log):\n{self.log_tail(name)}"
                )


def child_environment(data_root: Path) -> dict[str, str]:
    """This process's environment for `dagster dev`, with QC_DATA_DIR absolute: the code server resolves a relative
    one against its own working directory."""
    return {**os.environ, "QC_DATA_DIR": str(data_root)}


class InstanceServiceLock:
    """One `dagster dev` per instance: its daemon is the one that runs backfills, sensors and the run queue, and two
    would both act on them. Held by `qc run` for as long as its own runs, and by `qc ui` (through `exec`, the lock
    being on an inherited descriptor) for as long as the UI runs; `service.json` beside it says where it listens."""

    def __init__(self, dagster_home: Path):
        self.path = dagster_home / "service.lock"
        self.info_path = dagster_home / "service.json"
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd

    def publish(self, kind: str, url: str, keep_across_exec: bool = False) -> None:
        """Record who holds the lock and where it listens; with `keep_across_exec` the lock survives `exec`."""
        self.info_path.write_text(json.dumps({"kind": kind, "url": url, "pid": os.getpid()}))
        if keep_across_exec and self._fd is not None:
            os.set_inheritable(self._fd, True)

    def holder(self) -> dict:
        try:
            return json.loads(self.info_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def release(self) -> None:
        if self._fd is not None:
            self.info_path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
