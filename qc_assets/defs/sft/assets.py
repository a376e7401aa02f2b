"""The sft_dataset asset: the configured teacher's valid labels as a train/test Hugging Face dataset."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from qc_assets.categories import CATEGORIES
from qc_assets.defs.sft.dataset import SPLITS, export_from_lake
from qc_assets.defs.teacher.assets import TeacherResource
from qc_assets.lake.resource import LakeResource
from qc_assets.lake.tables import TEACHER_LABELS
from qc_assets.settings import Settings, env_name

SFT_DATASET = "sft_dataset"


class SftResource(dg.ConfigurableResource):
    """Where the SFT dataset goes and how it is split (QC_SFT_*)."""

    root: str = Field(description="Versions of the exported dataset, under QC_DATA_DIR/sft.")
    test_fraction: float = Field(description="QC_SFT_TEST_FRACTION")
    hub_repo: str | None = Field(description="QC_SFT_HUB_REPO: push each new version there.")
    hf_token: str | None = Field(description="QC_HF_TOKEN, as an EnvVar.")

    @classmethod
    def from_settings(cls, settings: Settings) -> "SftResource":
        return cls(
            root=str(settings.data_root / "sft"),
            test_fraction=settings.sft_test_fraction,
            hub_repo=settings.sft_hub_repo,
            hf_token=dg.EnvVar(env_name("hf_token")) if settings.hf_token else None,
        )


def _counts_table(rows: dict[str, dict[str, int]], over_cap: dict[str, int]) -> str:
    lines = ["| category | train | test | over cap |", "|---|---|---|---|"]
    lines += [
        f"| {name} | {rows['train'].get(name, 0)} | {rows['test'].get(name, 0)} | {over_cap.get(name, 0)} |"
        for name in CATEGORIES
    ]
    return "\n".join(lines)


@dg.asset(
    name=SFT_DATASET,
    deps=[TEACHER_LABELS.name],
    group_name="sft",
    kinds={"huggingface", "parquet"},
    description="Valid labels of the configured teacher as {system: category, user: text, assistant: query}, "
    "split by document; saved with save_to_disk and as parquet, with a dataset card, under QC_DATA_DIR/sft/<version>.",
)
def sft_dataset(
    context: dg.AssetExecutionContext, sft: SftResource, teacher: TeacherResource, lake: LakeResource
) -> dg.MaterializeResult:
    teacher_name, prompt_versions = teacher.identity()
    with lake.get_connection() as connection:
        exported = export_from_lake(connection, Path(sft.root), teacher_name, prompt_versions, sft.test_fraction)
    if exported.rows == 0:
        raise dg.Failure(
            description=f"no valid labels of teacher {teacher_name!r} with the current prompt versions: "
            "materialize teacher_labels first (or check QC_TEACHER_BACKEND / QC_TEACHER_MODEL)"
        )
    totals = {split: sum(exported.counts[split].values()) for split in SPLITS}
    over_cap = sum(exported.over_cap.values())
    context.log.info(
        f"SFT dataset {exported.version}: {totals['train']} train and {totals['test']} test rows from "
        f"{teacher_name}, {over_cap} of them over their category's cap "
        f"({'written' if exported.created else 'unchanged, already'} at {exported.directory})"
    )
    if sft.hub_repo and exported.created:
        if not sft.hf_token:
            raise dg.Failure(description="QC_SFT_HUB_REPO is set but QC_HF_TOKEN is not")
        import datasets

        context.log.info(f"pushing {exported.version} to the Hugging Face Hub as {sft.hub_repo}")
        datasets.load_from_disk(str(exported.hf_dir)).push_to_hub(sft.hub_repo, token=sft.hf_token)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": exported.rows,
            "version": exported.version,
            "path": dg.MetadataValue.path(str(exported.directory)),
            "teacher": teacher_name,
            "prompt_versions": dg.MetadataValue.json(prompt_versions),
            "train_rows": totals["train"],
            "test_rows": totals["test"],
            "test_fraction": sft.test_fraction,
            "over_cap_rows": over_cap,
            "rows_by_category": dg.MetadataValue.md(_counts_table(exported.counts, exported.over_cap)),
            "mean_user_chars": round(exported.mean_chars["user"], 1),
            "mean_assistant_chars": round(exported.mean_chars["assistant"], 1),
            "new_version": exported.created,
        }
    )
