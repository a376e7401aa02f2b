"""The real `qc ui` (webserver and daemon) as a test fixture: started on a free loopback port, spoken to over
GraphQL, and stopped with its whole process group, so that no dagster process outlives the test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

from qc_assets.orchestration.graphql import UNFINISHED_BACKFILL_STATUSES, DagsterGraphQL
from qc_assets.orchestration.service import free_loopback_port
from qc_assets.testing.helpers import BIN

TERMINAL_RUN_STATUSES = {"SUCCESS", "FAILURE", "CANCELED"}
# How each child of `dagster dev` shows in its command line.
UI_PROCESS_NAMES = {
    "webserver": (b"dagster-webserver", b"dagster_webserver"),
    "daemon": (b"dagster._daemon", b"dagster-daemon"),
}

RUN_QUERY = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on PythonError { message }
    ... on RunNotFoundError { message }
    ... on Run { runId status tags { key value } assetSelection { path } }
  }
}
"""

LAUNCH_RESULT = """
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
"""
LAUNCH_MUTATION = (
    "mutation Launch($params: ExecutionParams!) { launchRun(executionParams: $params) {" + LAUNCH_RESULT + "} }"
)
REEXECUTE_MUTATION = (
    "mutation Reexecute($parentRunId: String!) { launchRunReexecution(reexecutionParams: "
    "{parentRunId: $parentRunId, strategy: FROM_FAILURE}) {" + LAUNCH_RESULT + "} }"
)

RUN_ERRORS_QUERY = """
query RunErrors($runId: ID!) {
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection {
      events {
        __typename
        ... on MessageEvent { message level stepKey }
        ... on ErrorEvent { error { message } }
      }
    }
  }
}
"""


def _command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""


class DagsterUI(DagsterGraphQL):
    """`qc ui --port <free port>` (the default host) in its own session, its output in `log_path`."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None):
        self.port = port or free_loopback_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.log_path = log_path
        # The processes to account for at the end are those carrying this environment, whatever their group.
        self._marker = f"QC_DATA_DIR={env['QC_DATA_DIR']}"
        clean = {key: value for key, value in os.environ.items() if not key.startswith(("QC_", "DAGSTER_"))}
        self.env = {**clean, **env}
        self.process: subprocess.Popen | None = None

    def start(self) -> Self:
        # A child inherits an ignored SIGINT (pytest started in the background has one), and `dagster dev`
        # maps SIGTERM to SIGINT's handler: with SIGINT ignored nothing would ever stop it gracefully.
        restore = None
        try:
            if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
                restore = signal.signal(signal.SIGINT, signal.default_int_handler)
        except ValueError:  # not the main thread
            pass
        try:
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    [str(BIN / "qc"), "ui", "--port", str(self.port)],
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        finally:
            if restore is not None:
                signal.signal(signal.SIGINT, restore)
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self, waiting_for: str) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"`qc ui` exited with code {self.process.returncode} while waiting for {waiting_for}; "
                f"its output:\n{self.log_tail()}"
            )

    def run(self, run_id: str) -> dict:
        result = self.graphql(RUN_QUERY, {"runId": run_id})["runOrError"]
        if result["__typename"] != "Run":
            raise RuntimeError(f"run {run_id}: {result}")
        return result

    def launch(self, assets: list[str], partition: str) -> str:
        """Materialize one partition of the assets, as the Materialize button does; returns the run id."""
        params = {
            "selector": {
                "repositoryLocationName": "qc_assets",
                "repositoryName": "__repository__",
                "pipelineName": "__ASSET_JOB",
                "assetSelection": [{"path": [asset]} for asset in assets],
            },
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]},
            "mode": "default",
        }
        return self._launched(self.graphql(LAUNCH_MUTATION, {"params": params})["launchRun"])

    def reexecute_from_failure(self, run_id: str) -> str:
        """The run page's "Re-execute from failure"; returns the new run's id."""
        return self._launched(self.graphql(REEXECUTE_MUTATION, {"parentRunId": run_id})["launchRunReexecution"])

    def launch_asset_backfill(self, assets: list[str], partitions: list[str] | None = None) -> str:
        """The assets' partitions launched as a backfill, as the "Materialize selected" dialog does (every partition
        of every asset, in dependency order, when `partitions` is None); its id."""
        chosen = {"allPartitions": True} if partitions is None else {"partitionNames": partitions}
        return self.launch_backfill({**chosen, "assetSelection": [{"path": [asset]} for asset in assets]})

    def wait_for_backfill(self, backfill_id: str, timeout: float = 300) -> str:
        """The backfill's status once the daemon has finished with it."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive(f"backfill {backfill_id}")
            status = self.backfill(backfill_id)["status"]
            if status not in UNFINISHED_BACKFILL_STATUSES:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"backfill {backfill_id} still {status} after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(1)

    @staticmethod
    def _launched(result: dict) -> str:
        if result["__typename"] != "LaunchRunSuccess":
            raise RuntimeError(f"the launch was refused: {result}")
        return result["run"]["runId"]

    def run_errors(self, run_id: str) -> list[str]:
        logs = self.graphql(RUN_ERRORS_QUERY, {"runId": run_id})["logsForRun"]
        messages = []
        for event in logs.get("events", []):
            if event.get("level") in ("ERROR", "CRITICAL") or event.get("error"):
                error = (event.get("error") or {}).get("message", "")
                messages.append(f"[{event.get('stepKey') or '-'}] {event.get('message', '')} {error}".strip())
        return messages

    def wait_for_run(self, run_id: str, timeout: float = 180) -> dict:
        """The run once it has finished, whatever its outcome; a run still going at the deadline raises."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive(f"run {run_id}")
            run = self.run(run_id)
            if run["status"] in TERMINAL_RUN_STATUSES:
                return run
            if time.monotonic() > deadline:
                hint = " (QUEUED: is the daemon running?)" if run["status"] == "QUEUED" else ""
                raise TimeoutError(
                    f"run {run_id} still {run['status']}{hint} after {timeout:.0f}s; UI output:\n{self.log_tail()}"
                )
            time.sleep(1)

    def processes(self) -> list[int]:
        """Live processes (not zombies) in the UI's process group or started with its environment."""
        found = []
        group = self.process.pid if self.process else None
        marker = self._marker.encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat = (entry / "stat").read_text()
                state, _ppid, pgid = stat.rsplit(")", 1)[1].split()[:3]
                if state == "Z":
                    continue
                if int(pgid) == group or marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):  # gone, a kernel thread, or not ours to read
                continue
        return found

    def process_of(self, kind: str, timeout: float = 120) -> int:
        """The one process of `kind` ("webserver" or "daemon") that this `qc ui` started, once it has."""
        names = UI_PROCESS_NAMES[kind]
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive(f"its {kind} to start")
            found = [pid for pid in self.processes() if any(name in _command_line(pid) for name in names)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1 or time.monotonic() > deadline:
                raise RuntimeError(f"expected one {kind} process of `qc ui`, found {found}:\n{self.log_tail()}")
            time.sleep(0.2)

    def kill(self, kind: str) -> bool:
        """SIGKILL the webserver or the daemon, as the OOM killer would; True once `qc ui` has noticed and shut down."""
        process = self.process
        if process is None:
            raise RuntimeError("`qc ui` has not been started")
        os.kill(self.process_of(kind), signal.SIGKILL)
        process.wait(timeout=60)
        return "shut down unexpectedly" in self.log_path.read_text(encoding="utf-8", errors="replace")

    def listening_addresses(self) -> set[tuple[str, int]]:
        """(address, port) of every TCP socket listening in one of the UI's processes (webserver, daemon, code
        server), from /proc: the sockets the processes hold, matched to the kernel's table of listeners."""
        inodes = set()
        for pid in self.processes():
            try:
                for descriptor in Path(f"/proc/{pid}/fd").iterdir():
                    target = os.readlink(descriptor)
                    if target.startswith("socket:["):
                        inodes.add(target[len("socket:[") : -1])
            except OSError:
                continue
        listening = set()
        for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
            for row in Path(table).read_text().splitlines()[1:]:
                fields = row.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                address, port = local.split(":")
                raw = bytes.fromhex(address)
                # The kernel prints each 32-bit word in host (little-endian) order.
                raw = b"".join(raw[index : index + 4][::-1] for index in range(0, len(raw), 4))
                listening.add((socket.inet_ntop(family, raw), int(port, 16)))
        return listening

    def stop(self, grace: float = 30) -> list[int]:
        """Ctrl-C to the whole group, as a terminal would; SIGKILL for whatever is left after `grace` seconds.

        Returns the processes that had to be killed; raises if any survives even that.
        """
        if self.process is None:
            return []
        group = self.process.pid
        try:
            os.killpg(group, signal.SIGINT)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.processes():
            time.sleep(0.2)
        self.process.poll()
        killed = self.processes()
        for pid in killed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.processes():
            time.sleep(0.2)
        survivors = self.processes()
        if survivors:
            raise RuntimeError(f"processes of `qc ui` survived SIGKILL: {survivors}")
        return killed
