"""The persistent Dagster instance under QC_DATA_DIR/dagster, shared by `qc run`, `qc ui` and every run."""

from __future__ import annotations

import os
import shutil

import dagster as dg
from filelock import FileLock

from qc_assets.execution import GPU_POOL
from qc_assets.paths import PROJECT_ROOT
from qc_assets.settings import Settings


def prepare_dagster_home(settings: Settings) -> str:
    """Point DAGSTER_HOME at QC_DATA_DIR/dagster with the project's dagster.yaml, so runs persist for the UI.

    The first process to open a fresh home creates its SQLite storages; two doing so at once collide
    ("table already exists"), so creation happens once, under a file lock. The `gpu` pool's limit is set to
    QC_GPU_SLOTS here, for `qc run` and the UI alike.
    """
    home = settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    with FileLock(home / ".init.lock"):
        project_config = PROJECT_ROOT / "dagster.yaml"
        instance_config = home / "dagster.yaml"
        if project_config.exists() and (
            not instance_config.exists() or instance_config.read_bytes() != project_config.read_bytes()
        ):
            shutil.copyfile(project_config, instance_config)
        with dg.DagsterInstance.get() as instance:
            storage = instance.event_log_storage
            pool = storage.get_concurrency_info(GPU_POOL)
            if pool.slot_count != settings.gpu_slots or pool.using_default_limit:
                storage.set_concurrency_slots(GPU_POOL, settings.gpu_slots)
    return str(home)
