"""The Kubernetes deployment files load: no cluster runs here, so Dagster's, dagster-k8s's and the Kubernetes
client's own parsers validate them, and the references between files (names, ports, paths) must agree."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import dagster as dg
import kubernetes.client
import pytest
import yaml
from dagster._cli import cli as dagster_cli
from dagster._config import process_config, resolve_to_config_type
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.workspace.load import location_origins_from_yaml_paths
from dagster._daemon.cli import cli as daemon_cli
from dagster._serdes import ConfigurableClassData
from dagster_k8s import K8sRunLauncher, k8s_job_executor
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import construct_dagster_k8s_job, get_user_defined_k8s_config
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict
from dagster_webserver.cli import dagster_webserver as webserver_cli

from qc_assets.definitions import build_definitions
from qc_assets.paths import PROJECT_ROOT, SAMPLE_CORPUS, SAMPLE_TEACHER_LABELS
from qc_assets.settings import load_settings

DEPLOY = PROJECT_ROOT / "deploy"
K8S = DEPLOY / "k8s"
GPU_ASSETS = {"student_checkpoints", "generated_queries", "reranker_scores"}
CPU_ASSETS = {"corpus", "teacher_labels", "sft_dataset", "eval_summary", "training_pairs"}
GPU = "nvidia.com/gpu"
CLIS = {"dagster": dagster_cli, "dagster-webserver": webserver_cli, "dagster-daemon": daemon_cli}


def yaml_documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def manifests() -> list[dict]:
    return [document for resource in kustomization()["resources"] for document in yaml_documents(K8S / resource)]


def manifest(kind: str, name: str) -> dict:
    matches = [doc for doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert matches, f"no {kind} {name!r} in the resources of {K8S / 'kustomization.yaml'}"
    return matches[0]


def launcher_config() -> dict:
    return yaml.safe_load((K8S / "dagster.yaml").read_text())["run_launcher"]["config"]


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def instructions(name: str) -> list[str]:
    return [arguments for instruction, arguments in dockerfile() if instruction == name]


def parse_command(argv: list[str]) -> click.Context:
    """A command line parsed by the installed Dagster CLIs: an unknown command or option raises."""
    program, *arguments = argv
    command = CLIS[program]
    context = click.Context(command, info_name=program)
    while isinstance(command, click.Group):
        name, command, arguments = command.resolve_command(context, arguments)
        context = click.Context(command, info_name=name, parent=context)
    return command.make_context(context.info_name, arguments, parent=context.parent)


@pytest.fixture
def deploy_environment(monkeypatch, environment) -> None:
    """The sample corpus and tiny models, as the only QC_* variables in os.environ (code locations read it)."""
    for key in [key for key in os.environ if key.startswith("QC_")]:
        monkeypatch.delenv(key)
    for key, value in environment(SAMPLE_CORPUS, QC_STUDENT_BASE_MODELS="tiny", QC_SCORER_MODEL="tiny").items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def deploy_repository(deploy_environment) -> dg.RepositoryDefinition:
    """The code location as the image's code server and every step pod load it."""
    return ReconstructableRepository.for_module("qc_assets.deploy", "defs", str(PROJECT_ROOT)).get_definition()


@pytest.fixture
def launcher(monkeypatch) -> K8sRunLauncher:
    """The run launcher built from deploy/k8s/dagster.yaml, less the cluster credentials it would load."""
    monkeypatch.setattr("dagster_k8s.launcher.load_kubernetes_config", lambda **_: None)
    data = ConfigurableClassData("dagster_k8s", "K8sRunLauncher", yaml.safe_dump(launcher_config()))
    return data.rehydrate(as_type=K8sRunLauncher)


def gpus(tags: dict[str, str]) -> str | None:
    return get_user_defined_k8s_config(tags).container_config.get("resources", {}).get("limits", {}).get(GPU)


def test_instance_config_passes_dagster_and_each_class_schema(tmp_path, monkeypatch):
    raw = yaml.safe_load((K8S / "dagster.yaml").read_text())
    assert raw["storage"]["postgres"]["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}, (
        "the storage password must come from the environment, never a literal"
    )
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "not-a-secret")
    ref = InstanceRef.from_dir(str(tmp_path), config_dir=str(K8S))
    assert (ref.run_launcher_data.module_name, ref.run_launcher_data.class_name) == ("dagster_k8s", "K8sRunLauncher")
    assert ref.storage_data.class_name == "DagsterPostgresStorage"
    assert ref.run_coordinator_data.class_name == "QueuedRunCoordinator"
    assert ref.settings["telemetry"] == {"enabled": False}
    assert ref.settings["run_monitoring"]["enabled"] is True
    components = {
        "run_launcher": ref.run_launcher_data,
        "run_coordinator": ref.run_coordinator_data,
        "storage": ref.storage_data,
        "run_storage": ref.run_storage_data,
        "event_log_storage": ref.event_storage_data,
        "schedule_storage": ref.schedule_storage_data,
        "compute_logs": ref.compute_logs_data,
        "local_artifact_storage": ref.local_artifact_storage_data,
        "scheduler": ref.scheduler_data,
    }
    for section, data in components.items():
        klass = getattr(importlib.import_module(data.module_name), data.class_name)
        result = process_config(resolve_to_config_type(klass.config_type()), data.config_dict)
        assert result.success, f"{section} ({data.class_name}): " + "; ".join(error.message for error in result.errors)


def test_gpu_stages_and_only_they_request_a_gpu(deploy_repository):
    tags = {key.to_user_string(): assets.op.tags for key, assets in deploy_repository.assets_defs_by_key.items()}
    assert set(tags) == GPU_ASSETS | CPU_ASSETS, "a new asset: add it to GPU_ASSETS or CPU_ASSETS"
    pools = {key.to_user_string(): assets.op.pool for key, assets in deploy_repository.assets_defs_by_key.items()}
    for asset in GPU_ASSETS:
        assert gpus(tags[asset]) == "1", f"{asset} asks for no GPU: {tags[asset]}"
        assert pools[asset] == "gpu", f"{asset} is not limited by the gpu pool"
    for asset in CPU_ASSETS:
        assert gpus(tags[asset]) is None, f"{asset} is CPU work but asks for a GPU"
        assert pools[asset] is None, f"{asset} is CPU work but waits for the gpu pool"


@pytest.mark.parametrize(
    ("backend", "kind", "gpu"),
    [("vllm", "vllm", "1"), ("transformers", "huggingface", "1"), ("openai", "openai", None)],
)
def test_generation_shows_its_engine_and_asks_for_a_gpu_unless_a_served_model_does_the_work(
    settings_for, backend, kind, gpu
):
    settings = settings_for(SAMPLE_CORPUS, QC_GENERATION_BACKEND=backend, QC_STUDENT_BASE_MODELS="tiny")
    generation = build_definitions(settings).resolve_assets_def("generated_queries")
    assert kind in generation.specs_by_key[dg.AssetKey("generated_queries")].kinds
    assert gpus(generation.op.tags) == gpu
    assert generation.op.pool == ("gpu" if gpu else None)


def test_deploy_location_runs_every_job_with_the_k8s_executor(deploy_repository):
    jobs = deploy_repository.get_all_jobs()
    assert jobs and all(job.executor_def is k8s_job_executor for job in jobs), [
        (job.name, job.executor_def.name) for job in jobs
    ]
    local = ReconstructableRepository.for_module("qc_assets.definitions", "defs", str(PROJECT_ROOT)).get_definition()
    assert all(job.executor_def is not k8s_job_executor for job in local.get_all_jobs())


def step_job(launcher: K8sRunLauncher, step_tags: dict[str, str]) -> kubernetes.client.V1Job:
    """The Kubernetes Job that k8s_job_executor would create for a step with these op tags."""
    context = K8sContainerContext.create_for_run(DagsterRun(job_name="__ASSET_JOB"), launcher, include_run_tags=False)
    context = context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(step_tags)))
    return construct_dagster_k8s_job(
        job_config=context.get_k8s_job_config("registry.example.com/qc-assets:test", launcher),
        args=["dagster", "api", "execute_step"],
        job_name="dagster-step-test",
        user_defined_k8s_config=context.run_k8s_config,
        component="step_worker",
    )


def test_step_pods_get_the_settings_the_secrets_the_volume_and_gpus_where_tagged(launcher, deploy_repository):
    student = deploy_repository.assets_defs_by_key[dg.AssetKey("student_checkpoints")].op.tags
    corpus = deploy_repository.assets_defs_by_key[dg.AssetKey("corpus")].op.tags
    for tags, gpu in ((student, "1"), (corpus, None)):
        job = step_job(launcher, tags)
        pod = job.spec.template.spec
        (container,) = pod.containers
        env_from = {(source.config_map_ref or source.secret_ref).name for source in container.env_from}
        assert env_from == {"qc-settings", "qc-secrets"}
        assert {"DAGSTER_PG_PASSWORD"} <= {variable.name for variable in container.env}
        assert {(mount.name, mount.mount_path) for mount in container.volume_mounts} >= {("qc-data", "/data")}
        assert pod.service_account_name == "dagster"
        limits = (container.resources.limits if container.resources else None) or {}
        assert limits.get(GPU) == gpu
        assert any(toleration.key == GPU for toleration in pod.tolerations or []) == bool(gpu)


def test_workspace_points_at_the_code_server_service():
    (origin,) = location_origins_from_yaml_paths([str(K8S / "workspace.yaml")])
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    assert origin.location_name == pyproject["tool"]["dg"]["project"]["code_location_name"]
    service = manifest("Service", origin.host)
    assert origin.port in [port["port"] for port in service["spec"]["ports"]]
    (cmd,) = instructions("CMD")
    served = parse_command(json.loads(cmd)).params
    assert served["port"] == origin.port, "the image serves on another port"
    assert served["location_name"] == origin.location_name


def test_manifests_parse_as_kubernetes_objects():
    for document in manifests():
        model = getattr(kubernetes.client, document["apiVersion"].split("/")[-1].capitalize() + document["kind"])
        try:
            k8s_model_from_dict(model, k8s_snake_case_dict(model, document))
        except Exception as error:
            pytest.fail(f"{document['kind']} {document['metadata']['name']}: {error}")


def test_names_shared_between_the_instance_and_the_manifests_agree():
    config = launcher_config()
    kustomize = kustomization()
    assert config["job_namespace"] == kustomize["namespace"]
    generated = {generator["name"]: generator["files"] for generator in kustomize["configMapGenerator"]}
    assert generated[config["instance_config_map"]] == ["dagster.yaml"]
    assert kustomize["generatorOptions"]["disableNameSuffixHash"], "the launcher names the instance ConfigMap exactly"
    for name in config["env_config_maps"]:
        manifest("ConfigMap", name)
    manifest("ServiceAccount", config["service_account_name"])
    for volume in config["volumes"]:
        manifest("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    (env,) = instructions("ENV")
    assert f"DAGSTER_HOME={config['dagster_home']}" in env.split(), "the image's DAGSTER_HOME is not the launcher's"
    for file in kustomize["resources"] + [file for files in generated.values() for file in files]:
        assert (K8S / file).is_file(), f"kustomization.yaml names a missing file: {file}"


def test_settings_config_map_validates_and_holds_no_secret():
    data = manifest("ConfigMap", launcher_config()["env_config_maps"][0])["data"]
    secret_looking = [key for key in data if re.search("KEY|TOKEN|PASSWORD|SECRET", key)]
    assert not secret_looking, f"secrets belong in a Secret, not the ConfigMap: {secret_looking}"
    assert not any("password=" in value.lower() for value in data.values()), "a password in a DSN"
    settings = load_settings({**data, "QC_TEACHER_API_KEY": "dummy", "QC_HF_TOKEN": "dummy"})
    assert settings.catalog.startswith("postgres:") and settings.data_path.startswith("s3://")
    mounts = {mount["mountPath"] for mount in launcher_config()["volume_mounts"]}
    assert str(settings.data_root) in mounts, "QC_DATA_DIR is not on the shared volume"


def test_dockerfile_copies_what_exists_and_installs_known_extras():
    for arguments in instructions("COPY"):
        *sources, _destination = shlex.split(arguments)
        for source in sources:
            assert (PROJECT_ROOT / source).exists(), f"COPY {source}: not in the repository"
    extras = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = [match for run in instructions("RUN") for match in re.findall(r"\.\[([\w,-]+)\]", run)]
    assert installs, "the image installs no extras"
    for extra in ",".join(installs).split(","):
        assert extra in extras, f"pip extra {extra!r} is not in pyproject's optional-dependencies"
    assert not re.search("KEY|TOKEN|PASSWORD|SECRET", " ".join(instructions("ENV") + instructions("ARG")))


def test_dockerfile_command_is_a_dagster_command_serving_an_importable_module():
    (cmd,) = instructions("CMD")
    module = parse_command(json.loads(cmd)).params["module_name"]
    assert module and importlib.util.find_spec(module) is not None, f"{module} is not importable"


def test_webserver_and_daemon_commands_parse_and_find_the_mounted_instance_and_workspace():
    dagster_home = launcher_config()["dagster_home"]
    generated = {generator["name"]: generator["files"] for generator in kustomization()["configMapGenerator"]}
    for name in ("dagster-webserver", "dagster-daemon"):
        pod = manifest("Deployment", name)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        mounts = {volume_of(volumes[mount["name"]]): mount["mountPath"] for mount in container["volumeMounts"]}
        assert mounts["dagster-instance"] == f"{dagster_home}/dagster.yaml", f"{name}: no dagster.yaml in DAGSTER_HOME"
        # The workspace ConfigMap holds deploy/k8s's files, so the pod's path maps onto them (the CLI checks existence).
        argv = [argument.replace(mounts["dagster-workspace"], str(K8S)) for argument in container["command"]]
        (workspace,) = parse_command(argv).params["workspace"]
        assert Path(workspace).name in generated["dagster-workspace"], f"{name} reads a workspace file it lacks"


def volume_of(volume: dict) -> str:
    """The ConfigMap or claim behind a pod volume."""
    return volume["configMap"]["name"] if "configMap" in volume else volume["persistentVolumeClaim"]["claimName"]


def test_asset_modules_import_no_code_location():
    """Imports flow one way: the code locations import the assets, the assets import qc_assets.execution for their
    tags, and no module under qc_assets/defs imports a code location, even inside a function."""
    code_locations = {"qc_assets.definitions", "qc_assets.deploy"}
    for path in (PROJECT_ROOT / "qc_assets" / "defs").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            assert not code_locations & set(names), f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} imports {names}"
    source = (PROJECT_ROOT / "qc_assets" / "execution.py").read_text(encoding="utf-8")
    assert not re.search(r"^\s*(from|import) qc_assets", source, re.MULTILINE), "qc_assets.execution must stay a leaf"


@pytest.mark.long(90)
def test_a_non_editable_install_runs_the_embedded_sample_from_any_directory(tmp_path):
    """`pip install .` (not editable) carries the sample corpus and labels and dagster.yaml: `qc run` finds them in
    the installed package, from a directory outside the checkout, with the checkout not on the path."""
    source = tmp_path / "source"  # a copy, so that the build's own files (build/, egg-info) stay out of the checkout
    shutil.copytree(
        PROJECT_ROOT / "qc_assets", source / "qc_assets", symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md", "dagster.yaml", "workspace.yaml"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    target = tmp_path / "installed"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("QC_") and key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)  # ahead of the venv's editable finder, which only answers what the path cannot

    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import qc_assets.paths as p, qc_assets.settings as s; print(s.__file__, p.PROJECT_ROOT, p.SAMPLE_CORPUS, "
            "p.SAMPLE_TEACHER_LABELS, s.load_settings().data_root, sep='\\n')",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    package = target / "qc_assets"
    assert probe.stdout.split() == [
        str(package / "settings.py"),
        str(package / "project"),
        str(package / "sample" / "corpus"),
        str(package / "sample" / "teacher" / SAMPLE_TEACHER_LABELS.name),
        str(elsewhere / "data"),
    ]

    # The corpus and teacher stage of the default run, on every sample shard: the rest of the graph reads only the lake.
    result = subprocess.run(
        [sys.executable, str(target / "bin" / "qc"), "run", "--select", "key:corpus or key:teacher_labels"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "4 runs in" in result.stdout and "0 failed; backfill COMPLETED_SUCCESS" in result.stdout, result.stdout
    assert f"from {package / 'sample' / 'corpus'}" in output, "the corpus was not read from the installed package"
    labels = len(SAMPLE_TEACHER_LABELS.read_text(encoding="utf-8").splitlines())
    assert re.search(rf"handwritten-sample\s*│\s*{labels}\s*│\s*64\s*│", result.stdout), result.stdout
    assert str(PROJECT_ROOT / "qc_assets") not in output, "something ran from the checkout"
    instance_config = elsewhere / "data" / "dagster" / "dagster.yaml"
    assert instance_config.read_bytes() == (PROJECT_ROOT / "dagster.yaml").read_bytes()
