"""`dagster dev` (webserver, daemon and code server) on the project's instance, and its GraphQL API.

`qc ui` replaces itself with it; `qc run` starts one on a free loopback port for as long as it runs, asks it for a
backfill through the same GraphQL mutation the UI's "Materialize" dialog sends, and stops it at the end.
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
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

from qc_assets.paths import PROJECT_ROOT

LOCATION = "qc_assets"
REPOSITORY = "__repository__"
UNFINISHED_BACKFILL_STATUSES = {"REQUESTED", "CANCELING", "FAILING"}

WORKSPACE_QUERY = """
{
  workspaceOrError {
    __typename
    ... on PythonError { message }
    ... on Workspace {
      locationEntries { name loadStatus locationOrLoadError { __typename ... on PythonError { message } } }
    }
  }
}
"""
BACKFILL_MUTATION = """
mutation Backfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on PartitionSetNotFoundError { message }
  }
}
"""
BACKFILL_QUERY = """
query Backfill($backfillId: String!) {
  partitionBackfillOrError(backfillId: $backfillId) {
    __typename
    ... on PythonError { message }
    ... on PartitionBackfill {
      status
      assetBackfillData {
        assetBackfillStatuses {
          __typename
          ... on AssetPartitionsStatusCounts {
            assetKey { path } numPartitionsTargeted numPartitionsMaterialized numPartitionsFailed
          }
          ... on UnpartitionedAssetStatus { assetKey { path } materialized failed }
        }
      }
    }
  }
}
"""
UNFINISHED_BACKFILLS_QUERY = """
{
  partitionBackfillsOrError(status: REQUESTED) {
    __typename
    ... on PartitionBackfills { results { id tags { key value } } }
  }
}
"""
CANCEL_BACKFILL_MUTATION = """
mutation Cancel($backfillId: String!) {
  cancelPartitionBackfill(backfillId: $backfillId) { __typename ... on PythonError { message } }
}
"""
SENSOR_TICK_QUERY = """
query Tick($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename
    ... on Sensor { sensorState { status ticks(limit: 1) { timestamp status } } }
  }
}
"""


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


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, so a killed `qc run` leaves no daemon behind
    launching runs on its own (Linux; elsewhere the child outlives it)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class GraphQLError(RuntimeError):
    pass


class DagsterService:
    """`dagster dev` on 127.0.0.1:`port`, its output in `log_path`, spoken to over GraphQL."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None):
        self.port = port or free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen | None = None

    @classmethod
    def at(cls, url: str) -> Self:
        """One already running (the UI's), which this process neither starts nor stops."""
        service = cls({}, Path(os.devnull))
        service.url = url
        return service

    def command(self) -> list[str]:
        return dagster_dev_command("127.0.0.1", self.port)

    def start(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self, grace: float = 30) -> None:
        """SIGINT, as Ctrl-C: `dagster dev` stops its webserver, daemon and code server; SIGKILL after `grace`."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 30) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            # GraphQL's own errors (a query the schema refuses) come back as HTTP 500 with a JSON body.
            raise GraphQLError(
                f"GraphQL answered {error.code}: {error.read().decode(errors='replace')[:2000]}"
            ) from None
        if body.get("errors"):
            raise GraphQLError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def check_alive(self, waiting_for: str) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"dagster dev exited with code {self.process.returncode} while waiting for {waiting_for}; "
                f"its output ({self.log_path}):\n{self.log_tail()}"
            )

    def _location_state(self) -> tuple[bool, str]:
        """(loaded, what is known): a load error raises at once."""
        workspace = self.graphql(WORKSPACE_QUERY, timeout=10)["workspaceOrError"]
        if workspace["__typename"] != "Workspace":
            raise RuntimeError(f"the workspace could not be read: {workspace}")
        entries = workspace["locationEntries"]
        errors = [
            f"{entry['name']}: {entry['locationOrLoadError']['message']}"
            for entry in entries
            if (entry["locationOrLoadError"] or {}).get("__typename") == "PythonError"
        ]
        if errors:
            raise RuntimeError("the code location failed to load:\n" + "\n".join(errors))
        loaded = bool(entries) and all(
            entry["loadStatus"] == "LOADED"
            and (entry["locationOrLoadError"] or {}).get("__typename") == "RepositoryLocation"
            for entry in entries
        )
        return loaded, f"locations {[(entry['name'], entry['loadStatus']) for entry in entries]}"

    def wait_until_loaded(self, timeout: float = 180) -> None:
        """Until the webserver answers and every code location has loaded."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            self.check_alive("the webserver")
            try:
                loaded, last = self._location_state()
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
                loaded, last = False, f"{type(error).__name__}: {error}"
            if loaded:
                return
            time.sleep(0.5)
        raise TimeoutError(f"dagster dev at {self.url} was not ready after {timeout:.0f}s ({last}):\n{self.log_tail()}")

    def launch_backfill(self, params: dict) -> str:
        """`launchPartitionBackfill` with `params` (LaunchBackfillParams); the backfill's id."""
        result = self.graphql(BACKFILL_MUTATION, {"params": params})["launchPartitionBackfill"]
        if result["__typename"] != "LaunchBackfillSuccess":
            raise RuntimeError(f"the backfill was refused: {result.get('message', result)}")
        return result["backfillId"]

    def backfill(self, backfill_id: str) -> dict:
        """The backfill's status and its per-asset counts."""
        result = self.graphql(BACKFILL_QUERY, {"backfillId": backfill_id})["partitionBackfillOrError"]
        if result["__typename"] != "PartitionBackfill":
            raise RuntimeError(f"backfill {backfill_id}: {result}")
        return result

    def unfinished_backfills(self, tag: tuple[str, str]) -> list[str]:
        """Ids of the backfills still REQUESTED that carry `tag`."""
        result = self.graphql(UNFINISHED_BACKFILLS_QUERY)["partitionBackfillsOrError"]
        return [
            backfill["id"]
            for backfill in result.get("results", [])
            if {"key": tag[0], "value": tag[1]} in backfill["tags"]
        ]

    def cancel_backfill(self, backfill_id: str) -> None:
        self.graphql(CANCEL_BACKFILL_MUTATION, {"backfillId": backfill_id})

    def last_sensor_tick(self, sensor: str) -> dict | None:
        """The sensor's latest tick (`timestamp`, `status`), None before its first; raises for an unknown sensor."""
        selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "sensorName": sensor}
        result = self.graphql(SENSOR_TICK_QUERY, {"selector": selector})["sensorOrError"]
        if result["__typename"] != "Sensor":
            raise RuntimeError(f"sensor {sensor}: {result}")
        ticks = result["sensorState"]["ticks"]
        return ticks[0] if ticks else None


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
