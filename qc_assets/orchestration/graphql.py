"""The Dagster webserver's GraphQL API, as far as `qc run` and the tests use it: the calls the UI's own pages make."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

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


class GraphQLError(RuntimeError):
    pass


class DagsterGraphQL:
    """A webserver at `url` (`qc ui`'s, or the one `qc run` starts)."""

    def __init__(self, url: str):
        self.url = url

    def check_alive(self, waiting_for: str) -> None:
        """Raise when the processes behind the webserver have died; those started elsewhere are not watched."""

    def log_tail(self) -> str:
        return "(its output is not this process's to read)"

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
        raise TimeoutError(
            f"Dagster's webserver at {self.url} was not ready after {timeout:.0f}s ({last}):\n{self.log_tail()}"
        )

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
