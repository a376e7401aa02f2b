"""Small helpers of the suite and the benchmarks: the environment's scripts, corpus files, `qc` as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# The environment's console scripts (`qc`, `dagster`, `dg`), beside its interpreter.
BIN = Path(sys.executable).parent


def write_jsonl(path: Path, records: list[dict | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return path


def document(index: int, topic: str = "文書") -> str:
    return f"{topic}{index}番。" + "これは試験用の日本語の文章で、長さの条件を満たすために繰り返しています。" * 4


def run_qc(args: list[str], env: dict[str, str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """`qc <args>` in a fresh process with `env` over this one's environment, less its own QC_* settings."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("QC_")}
    return subprocess.run(
        [str(BIN / "qc"), *args], env={**clean, **env}, capture_output=True, text=True, timeout=timeout, **kwargs
    )
