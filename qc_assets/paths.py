"""Where the package, the project's instance files and the embedded sample are. No dependencies beyond the
standard library, so benchmark scripts run where only the ML libraries are installed (the lent GPU machine)."""

from __future__ import annotations

from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent


def _is_checkout(directory: Path) -> bool:
    pyproject = directory / "pyproject.toml"
    return pyproject.is_file() and 'name = "qc_assets"' in pyproject.read_text(encoding="utf-8")


# The repository when the package runs from a checkout (editable install or PYTHONPATH). Installed, the package's
# project/ folder: the repository's dagster.yaml and workspace.yaml, which qc_assets/project/ links to and a
# build copies in, so `qc run` and `qc ui` read the same instance settings from any working directory.
PROJECT_ROOT = PACKAGE_ROOT.parent if _is_checkout(PACKAGE_ROOT.parent) else PACKAGE_ROOT / "project"
# The embedded default's inputs are package data, found beside the code in a checkout and an install alike.
SAMPLE_CORPUS = PACKAGE_ROOT / "sample" / "corpus"
SAMPLE_TEACHER_LABELS = PACKAGE_ROOT / "sample" / "teacher" / "handwritten-sample.jsonl"
