"""Runs whose `qc run` was killed: found, marked failed, and their GPU pool slots given back.

A `qc run` killed with SIGKILL (or a machine that lost power) leaves its runs STARTED in Dagster's run storage for
ever, and a step that held a slot of the `gpu` pool keeps it: the next run's GPU step would wait for a slot that is
never freed. Without a daemon nothing notices. So each `qc run` worker holds an exclusive lock on a file of its own
for as long as it lives and tags its runs with that file's name; the kernel drops the lock when the process dies,
however it dies. The next `qc run` takes each STARTED run's lock: if it can, the worker is gone, and the run is
reported failed (its partitions run again in this `qc run`) and its slots freed.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from pathlib import Path

import dagster as dg

WORKER_TAG = "qc/worker"
LAUNCHED_BY_TAG = "qc/launched_by"
_UNFINISHED = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED]

_held: tuple[str, int] | None = None


def workers_dir(dagster_home: Path) -> Path:
    return dagster_home / "qc-workers"


def worker_token(dagster_home: Path) -> str:
    """This process's token, its lock taken the first time; the lock lives as long as the process."""
    global _held
    if _held is None:
        directory = workers_dir(dagster_home)
        directory.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        descriptor = os.open(directory / f"{token}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        _held = (token, descriptor)
    return _held[0]


def _worker_is_gone(dagster_home: Path, token: str) -> bool:
    path = workers_dir(dagster_home) / f"{token}.lock"
    try:
        descriptor = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(descriptor)
    return True


def recover_abandoned_runs(instance: dg.DagsterInstance, dagster_home: Path) -> list[str]:
    """Fail the runs of `qc run` workers that are gone and free their pool slots; returns their run ids."""
    recovered = []
    runs = instance.get_runs(dg.RunsFilter(statuses=_UNFINISHED, tags={LAUNCHED_BY_TAG: "qc run"}))
    for run in runs:
        token = run.tags.get(WORKER_TAG)
        if token is None or not _worker_is_gone(dagster_home, token):
            continue
        instance.report_run_failed(run, "the qc run process running it is gone (killed or crashed); a later qc run "
                                        "marked it failed and runs its partitions again")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        (workers_dir(dagster_home) / f"{token}.lock").unlink(missing_ok=True)
        recovered.append(run.run_id)
    return recovered
