"""An analyst's session for the concurrency test: one connection held open, querying until told to stop.

Prints one JSON line: how many queries ran, and every inconsistency or error seen.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from qc_assets.lake.resource import LakeResource


def main(catalog: str, data_path: str, stop_file: str, rows_per_shard: int) -> None:
    queries, problems, max_rows = 0, [], 0
    lake = LakeResource(catalog=catalog, data_path=data_path, read_only=True)
    with lake.get_connection() as connection:
        while not Path(stop_file).exists():
            try:
                per_shard = connection.execute(
                    "SELECT shard, count(*), count(DISTINCT doc_id) FROM corpus GROUP BY shard"
                ).fetchall()
            except Exception as error:
                problems.append(f"{type(error).__name__}: {error}")
                continue
            queries += 1
            for shard, rows, distinct in per_shard:
                if rows != rows_per_shard or distinct != rows:
                    problems.append(f"shard {shard}: {rows} rows, {distinct} distinct ids")
            max_rows = max(max_rows, sum(rows for _, rows, _ in per_shard))
            time.sleep(0.02)
    print(json.dumps({"queries": queries, "problems": problems[:20], "max_rows": max_rows}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
