"""The checkpoint store: `<root>/<base-model-slug>/<checkpoint-id>/` with weights, tokenizer and a manifest.

A checkpoint is visible only through its manifest, which is written last, inside a hidden staging directory that
is then renamed into place in one step: a reader sees a complete checkpoint or none. Checkpoints trained
elsewhere are dropped in by hand the same way (copy, then add the manifest). Training keeps its resumable states
under `<root>/.work/`, which listings skip like every hidden name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from qc_assets.naming import slug

MANIFEST = "manifest.json"
WORK_DIR = ".work"  # resumable training states, hidden from listings
REQUIRED_FIELDS = ("checkpoint", "base_model", "dataset_version", "hyperparameters", "metrics", "created_at")
log = logging.getLogger(__name__)


def model_slug(base_model: str) -> str:
    """A directory and partition name for a base model id or path: `Qwen/Qwen3-1.7B` -> `Qwen--Qwen3-1.7B`.

    Readable as the hub id itself where it can be; a digest only where characters were lost (paths, odd names)."""
    return slug(base_model, separator="--", fill="-", trim=".-", fallback="model", digest="if_changed")


def new_checkpoint_id(slug: str, dataset_version: str, now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{slug}--{dataset_version[:8]}--{stamp}"


@dataclass(frozen=True)
class Checkpoint:
    checkpoint: str
    base_model: str
    path: Path
    manifest: dict

    @property
    def created_at(self) -> str:
        return self.manifest["created_at"]


class ManifestError(ValueError):
    pass


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{directory}: no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"{path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: the manifest is not a JSON object")
    missing = [field for field in REQUIRED_FIELDS if field not in manifest]
    if missing:
        raise ManifestError(f"{path}: manifest lacks {', '.join(missing)}")
    if manifest["checkpoint"] != directory.name:
        raise ManifestError(
            f"{path}: manifest names checkpoint {manifest['checkpoint']!r}, directory is {directory.name!r}"
        )
    return manifest


def list_checkpoints(root: Path, warn=log.warning) -> list[Checkpoint]:
    """Complete checkpoints, oldest first; staging directories are skipped silently, broken ones with a warning."""
    found: list[Checkpoint] = []
    if not root.is_dir():
        return found
    for slug_dir in sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")):
        for directory in sorted(path for path in slug_dir.iterdir() if path.is_dir() and not path.name.startswith(".")):
            try:
                manifest = read_manifest(directory)
            except ManifestError as error:
                warn(f"ignoring checkpoint directory {error}")
                continue
            found.append(Checkpoint(manifest["checkpoint"], manifest["base_model"], directory, manifest))
    return sorted(found, key=lambda checkpoint: (checkpoint.created_at, checkpoint.checkpoint))


def work_directory(root: Path, slug: str, inputs: dict) -> Path:
    """Where a training run keeps its resumable state: hidden, and the same for every run of the same inputs (a
    hash of them), so a killed run's successor finds it."""
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return root / WORK_DIR / slug / key


def staging_directory(root: Path, slug: str, checkpoint_id: str) -> Path:
    """Where a checkpoint is written before it appears; hidden, so listings never see it."""
    directory = root / slug / f".{checkpoint_id}.partial"
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    return directory


def publish(staging: Path, manifest: dict) -> Path:
    """Write the manifest last, then rename the staging directory into place (atomic on one filesystem)."""
    missing = [field for field in REQUIRED_FIELDS if field not in manifest]
    if missing:
        raise ManifestError(f"manifest lacks {', '.join(missing)}")
    target = staging.parent / manifest["checkpoint"]
    if target.exists():
        raise FileExistsError(f"checkpoint {target} already exists")
    temporary = staging / (MANIFEST + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, ensure_ascii=False, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, staging / MANIFEST)
    os.rename(staging, target)
    return target
