"""Every user-facing setting, read from `QC_*` environment variables and checked once at start-up.

The README's settings table lists the same variables; a wrong value fails here with the variable's name,
before Dagster loads anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_CORPUS = PROJECT_ROOT / "data" / "sample" / "corpus"
ENV_PREFIX = "QC_"


class SettingsError(ValueError):
    """A `QC_*` variable holds a value the project cannot use."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = Field(
        default=Path("data"), description="Where everything the pipeline writes goes (lake, Dagster home)."
    )
    corpus_source: str = Field(
        default=str(SAMPLE_CORPUS),
        description="A local directory, glob or file of parquet/jsonl shards, or `hf:<dataset name>`.",
    )
    corpus_config: str | None = Field(default=None, description="Hugging Face dataset config (hf: sources).")
    corpus_split: str = Field(default="train", description="Hugging Face dataset split (hf: sources).")
    corpus_text_column: str = Field(default="text", description="Column holding the document text.")
    corpus_id_column: str = Field(default="id", description="Column holding the document id.")
    corpus_min_chars: int = Field(default=100, ge=1, description="Shorter cleaned texts are dropped.")
    corpus_max_chars: int = Field(default=2000, ge=1, description="Longer cleaned texts are dropped.")
    lake_catalog: str | None = Field(
        default=None,
        description="DuckLake catalog; default `sqlite:<data_dir>/lake/catalog.sqlite`, or `postgres:<libpq dsn>`.",
    )
    lake_data_path: str | None = Field(
        default=None, description="DuckLake data files; default `<data_dir>/lake/files/`, or `s3://bucket/prefix/`."
    )

    @model_validator(mode="after")
    def _length_window_is_not_empty(self) -> Settings:
        if self.corpus_min_chars > self.corpus_max_chars:
            raise ValueError(
                f"QC_CORPUS_MIN_CHARS ({self.corpus_min_chars}) is larger than QC_CORPUS_MAX_CHARS ({self.corpus_max_chars})"
            )
        return self

    @property
    def data_root(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def dagster_home(self) -> Path:
        return self.data_root / "dagster"

    @property
    def catalog(self) -> str:
        return self.lake_catalog or f"sqlite:{self.data_root / 'lake' / 'catalog.sqlite'}"

    @property
    def data_path(self) -> str:
        return self.lake_data_path or f"{self.data_root / 'lake' / 'files'}/"


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Read the settings, turning pydantic's field-level errors into messages that name the variable."""
    source = os.environ if environ is None else environ
    known = {env_name(name): name for name in Settings.model_fields}
    unknown = sorted(key for key in source if key.startswith(ENV_PREFIX) and key not in known)
    if unknown:
        raise SettingsError(
            f"unknown setting {', '.join(unknown)}; the known ones are {', '.join(sorted(known))}"
        )
    values = {name: source[key] for key, name in known.items() if key in source and source[key] != ""}
    try:
        return Settings.model_validate(values)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            message = item["msg"].removeprefix("Value error, ")
            if not item["loc"]:
                problems.append(message)
                continue
            variable = env_name(str(item["loc"][0]))
            given = f" (got {source[variable]!r})" if variable in source else ""
            problems.append(f"{variable}{given}: {message}")
        raise SettingsError("invalid setting: " + "; ".join(problems)) from None
