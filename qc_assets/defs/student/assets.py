"""The student_checkpoints asset: one partition per base model, trained out of process through Dagster Pipes."""

import sys
from pathlib import Path

import dagster as dg
import duckdb
from pydantic import Field

from qc_assets.defs.sft.assets import SFT_DATASET, SftResource
from qc_assets.defs.student.store import Checkpoint, list_checkpoints, model_slug, new_checkpoint_id
from qc_assets.execution import GPU_POD, GPU_POOL
from qc_assets.hf_export import current_version
from qc_assets.lake.resource import LakeResource
from qc_assets.lake.tables import CHECKPOINTS
from qc_assets.models.tiny import STUDENT_DIR, ensure_tiny_models, sample_texts
from qc_assets.settings import TINY_STUDENT, Settings

TRAINING_MODULE = "qc_assets.training.train"
TINY_DEFAULTS = {
    "max_steps": 30,
    "learning_rate": 3e-3,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
}


class StudentResource(dg.ConfigurableResource):
    """How students are trained (QC_STUDENT_*) and where checkpoints go."""

    checkpoints_root: str = Field(description="The checkpoint store, QC_DATA_DIR/checkpoints.")
    models_dir: str = Field(description="Where `qc models tiny` puts the tiny models, QC_DATA_DIR/models.")
    method: str = Field(description="QC_STUDENT_METHOD: full or lora.")
    max_steps: int | None = Field(description="QC_STUDENT_MAX_STEPS")
    epochs: float = Field(description="QC_STUDENT_EPOCHS")
    learning_rate: float | None = Field(description="QC_STUDENT_LEARNING_RATE")
    batch_size: int = Field(description="QC_STUDENT_BATCH_SIZE")
    gradient_accumulation: int = Field(description="QC_STUDENT_GRADIENT_ACCUMULATION")
    max_length: int = Field(description="QC_STUDENT_MAX_LENGTH")
    lora_r: int = Field(description="QC_STUDENT_LORA_R")
    optimizer: str = Field(description="QC_STUDENT_OPTIMIZER")
    save_steps: int = Field(description="QC_STUDENT_SAVE_STEPS")
    memory_limit_gib: float | None = Field(description="QC_STUDENT_MEMORY_LIMIT_GIB")

    @classmethod
    def from_settings(cls, settings: Settings) -> "StudentResource":
        return cls(
            checkpoints_root=str(settings.data_root / "checkpoints"),
            models_dir=str(settings.data_root / "models"),
            method=settings.student_method,
            max_steps=settings.student_max_steps,
            epochs=settings.student_epochs,
            learning_rate=settings.student_learning_rate,
            batch_size=settings.student_batch_size,
            gradient_accumulation=settings.student_gradient_accumulation,
            max_length=settings.student_max_length,
            lora_r=settings.student_lora_r,
            optimizer=settings.student_optimizer,
            save_steps=settings.student_save_steps,
            memory_limit_gib=settings.student_memory_limit_gib,
        )

    def base_model_path(self, base_model: str) -> str:
        """`tiny` is built on first use (offline, seconds), as `qc models tiny` would."""
        if base_model != TINY_STUDENT:
            return base_model
        return str(ensure_tiny_models(Path(self.models_dir), sample_texts())[STUDENT_DIR])

    def hyperparameters(
        self, base_model: str, method: str | None, max_steps: int | None, learning_rate: float | None
    ) -> dict:
        method = method or self.method
        tiny = base_model == TINY_STUDENT
        values = {
            "method": method,
            "max_steps": max_steps or self.max_steps or (TINY_DEFAULTS["max_steps"] if tiny else -1),
            "num_train_epochs": self.epochs,
            "learning_rate": learning_rate
            or self.learning_rate
            or (TINY_DEFAULTS["learning_rate"] if tiny else 2e-4 if method == "lora" else 1e-5),
            "per_device_train_batch_size": TINY_DEFAULTS["per_device_train_batch_size"] if tiny else self.batch_size,
            "gradient_accumulation_steps": TINY_DEFAULTS["gradient_accumulation_steps"]
            if tiny
            else self.gradient_accumulation,
            "max_length": self.max_length,
            "warmup_ratio": 0.03,
            "lora_r": self.lora_r,
            "lora_alpha": 2 * self.lora_r,
            "lora_dropout": 0.05,
            "seed": 42,
            "logging_steps": 1 if tiny else 10,
            "precision": "auto",
            "optimizer": self.optimizer,
        }
        return values


class StudentRunConfig(dg.Config):
    method: str | None = Field(default=None, description="`full` or `lora`; default QC_STUDENT_METHOD.")
    max_steps: int | None = Field(default=None, description="Optimizer steps; default QC_STUDENT_MAX_STEPS.")
    learning_rate: float | None = Field(default=None, description="Default QC_STUDENT_LEARNING_RATE.")
    force: bool = Field(default=False, description="Train again even when a checkpoint of the same inputs exists.")


def register_checkpoints(lake: LakeResource, checkpoints: list[Checkpoint]) -> int:
    """Add rows for complete checkpoints the table lacks (trained here or dropped in by hand)."""
    if not checkpoints:
        return 0
    rows = [
        (
            checkpoint.checkpoint,
            checkpoint.base_model,
            str(checkpoint.path),
            checkpoint.manifest.get("dataset_version"),
            checkpoint.manifest.get("hyperparameters", {}).get("method"),
            checkpoint.manifest.get("metrics", {}).get("steps"),
            checkpoint.manifest.get("metrics", {}).get("final_loss"),
            checkpoint.manifest.get("metrics", {}).get("tokens_per_second"),
            bool(checkpoint.manifest.get("tiny_model", False)),
            checkpoint.created_at,
        )
        for checkpoint in checkpoints
    ]
    columns = ", ".join(CHECKPOINTS.column_names)

    def work(connection: duckdb.DuckDBPyConnection) -> int:
        known = {row[0] for row in connection.execute("SELECT checkpoint FROM checkpoints").fetchall()}
        new = [row for row in rows if row[0] not in known]
        if new:
            placeholders = ", ".join("?" for _ in CHECKPOINTS.columns)
            connection.executemany(f"INSERT INTO checkpoints ({columns}) VALUES ({placeholders})", new)
        return len(new)

    return lake.transaction(work, "register checkpoints")


def _same_inputs(checkpoint: Checkpoint, base_model: str, dataset_version: str, hyperparameters: dict) -> bool:
    recorded = dict(checkpoint.manifest.get("hyperparameters", {}))
    recorded.pop("resolved_precision", None)
    return (
        checkpoint.base_model == base_model
        and checkpoint.manifest.get("dataset_version") == dataset_version
        and all(recorded.get(key) == value for key, value in hyperparameters.items())
    )


def build_student_asset(base_models: list[str]) -> dg.AssetsDefinition:
    by_slug = {model_slug(model): model for model in base_models}

    @dg.asset(
        name="student_checkpoints",
        partitions_def=dg.StaticPartitionsDefinition(list(by_slug)),
        deps=[SFT_DATASET],
        group_name="student",
        op_tags=GPU_POD,
        pool=GPU_POOL,
        kinds={"pytorch", "huggingface"},
        description="A student fine-tuned on the current SFT dataset with TRL's SFTTrainer (loss on the answer and "
        "its end-of-turn token only), in a subprocess through Dagster Pipes, after a memory plan that fits the GPU; "
        "resumes a killed run; published to QC_DATA_DIR/checkpoints/<model>/<id>/ with a manifest.",
        metadata={
            "dagster/column_schema": CHECKPOINTS.dagster_schema(),
            "dagster/table_name": f"lake.{CHECKPOINTS.name}",
        },
    )
    def student_checkpoints(
        context: dg.AssetExecutionContext,
        config: StudentRunConfig,
        student: StudentResource,
        sft: SftResource,
        lake: LakeResource,
        pipes_subprocess_client: dg.PipesSubprocessClient,
    ) -> dg.MaterializeResult:
        slug = context.partition_key
        base_model = by_slug[slug]
        dataset_dir = current_version(Path(sft.root))
        if dataset_dir is None:
            raise dg.Failure(description=f"no SFT dataset under {sft.root}: materialize sft_dataset first")
        hyperparameters = student.hyperparameters(base_model, config.method, config.max_steps, config.learning_rate)
        root = Path(student.checkpoints_root)
        existing = list_checkpoints(root, warn=context.log.warning)
        register_checkpoints(lake, existing)
        if not config.force:
            for checkpoint in existing:
                if _same_inputs(checkpoint, base_model, dataset_dir.name, hyperparameters):
                    context.log.info(f"{checkpoint.checkpoint} was trained on the same inputs: not training again")
                    return dg.MaterializeResult(
                        metadata={
                            "checkpoint": checkpoint.checkpoint,
                            "path": dg.MetadataValue.path(str(checkpoint.path)),
                            "trained_now": False,
                        }
                    )
        checkpoint_id = new_checkpoint_id(slug, dataset_dir.name)
        context.log.info(f"training {base_model} on SFT dataset {dataset_dir.name} as {checkpoint_id}")
        extras = {
            "base_model": base_model,
            "base_model_path": student.base_model_path(base_model),
            "dataset_dir": str(dataset_dir / "hf"),
            "dataset_version": dataset_dir.name,
            "checkpoints_root": str(root),
            "slug": slug,
            "checkpoint_id": checkpoint_id,
            "hyperparameters": hyperparameters,
            "save_steps": student.save_steps,
            "memory_limit_gib": student.memory_limit_gib,
            "tiny": base_model == TINY_STUDENT,
        }
        result = pipes_subprocess_client.run(
            command=[sys.executable, "-m", TRAINING_MODULE], context=context, extras=extras
        ).get_materialize_result()
        register_checkpoints(
            lake, [c for c in list_checkpoints(root, warn=context.log.warning) if c.checkpoint == checkpoint_id]
        )
        return dg.MaterializeResult(
            metadata={**(result.metadata or {}), "dataset_version": dataset_dir.name, "trained_now": True}
        )

    return student_checkpoints
