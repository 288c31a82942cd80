"""What deploys: every manifest in cluster/ parses, has the fields its kind requires and runs
real commands; the launcher installs the wheel `make dist` builds, which ships tune_configs/;
the image's build context holds no local state; the Makefile cleans up and shows pip's errors."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from pipelines.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
PYPROJECT = (ROOT / "pyproject.toml").read_text()  # read as text: tomllib is not in Python 3.10
VERSION = re.search(r'^version = "([^"]+)"', PYPROJECT, flags=re.M).group(1)
CRON = re.compile(r"^(\S+\s+){4}\S+$")
RUNTIME_ENV_KEYS = {"working_dir", "py_modules", "pip", "uv", "conda", "env_vars", "excludes", "container", "image_uri", "config"}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def check_unlearn_command(command: str) -> None:
    words = shlex.split(command)
    assert words[0] == "unlearn", command
    build_parser().parse_args(words[1:])  # exits (SystemExit) on an unknown flag or command


def check_pod_template(template: dict, gpu: bool) -> None:
    containers = template["spec"]["containers"]
    assert containers and all(c["image"] for c in containers)
    volumes = {v["name"] for v in template["spec"].get("volumes", [])}
    for container in containers:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes
    limits = containers[0]["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == gpu


def check_ray_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    check_pod_template(head["template"], gpu=False)
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        check_pod_template(group["template"], gpu=True)


def check_ray_job_spec(spec: dict) -> None:
    check_unlearn_command(spec["entrypoint"])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= RUNTIME_ENV_KEYS
    assert "MLFLOW_TRACKING_URI" in runtime_env["env_vars"]
    # several nodes: Ray Train/Tune state on the volume every pod mounts
    mounts = {m["mountPath"] for m in spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert any(runtime_env["env_vars"]["AMNESIS_RAY_STORAGE"].startswith(m) for m in mounts)
    assert spec["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(spec["rayClusterSpec"])


def test_raycluster():
    manifest = load("kuberay/raycluster.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    assert manifest["metadata"]["name"]
    check_ray_cluster_spec(manifest["spec"])


def test_rayjob():
    manifest = load("kuberay/rayjob-forget.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    check_ray_job_spec(manifest["spec"])


def test_raycronjob():
    manifest = load("kuberay/raycronjob-requests.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCronJob")
    assert CRON.match(manifest["spec"]["schedule"])
    check_ray_job_spec(manifest["spec"]["jobTemplate"])
    assert "requests process" in manifest["spec"]["jobTemplate"]["entrypoint"]
    assert "AMNESIS_LEDGER_URL" in yaml.safe_load(manifest["spec"]["jobTemplate"]["runtimeEnvYAML"])["env_vars"]


def test_cluster_launcher():
    config = load("ray-cluster.yaml")
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "max_workers"):
        assert key in config, key
    assert config["provider"]["type"] and config["auth"]["ssh_user"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for node_type in types.values():
        assert {"node_config", "resources", "min_workers", "max_workers"} <= set(node_type)
        assert node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values())
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])


def launcher_wheel() -> tuple[str, str]:
    """(the local directory the launcher mounts, the wheel file its setup installs from it)."""
    config = load("ray-cluster.yaml")
    (remote, local), = config["file_mounts"].items()
    installs = [c for c in config["setup_commands"] if "pip install" in c]
    assert len(installs) == 1
    wheel = re.search(rf"{re.escape(remote)}/([^\s\"\[]+\.whl)\[([a-z,]+)\]", installs[0])
    assert wheel, installs[0]
    assert set(wheel.group(2).split(",")) >= {"all", "postgres"}
    return local, wheel.group(1)


def test_cluster_launcher_installs_the_wheel_and_fails_loudly():
    config = load("ray-cluster.yaml")
    local, wheel = launcher_wheel()
    assert local == "./dist"  # what `make dist` writes
    assert wheel == f"amnesis-{VERSION}-py3-none-any.whl"
    for command in config["setup_commands"]:
        assert not re.search(r"\|\|\s*(true|:)|;\s*true|\bset \+e", command), command
    assert "unlearn --version" in config["setup_commands"]  # the jobs' entrypoint is on PATH


def test_one_ray_release_everywhere():
    """The launcher's pin, the image's base and every KubeRay rayVersion name one Ray release."""
    pinned = re.search(r"ray\[[a-z,]+\]==([\d.]+)", " ".join(load("ray-cluster.yaml")["setup_commands"])).group(1)
    base = re.search(r"rayproject/ray:([\d.]+)-", (CLUSTER / "Dockerfile").read_text()).group(1)
    versions = set()
    for path in KUBERAY:
        versions.update(re.findall(r'rayVersion: "([\d.]+)"', path.read_text()))
    assert versions == {pinned} == {base}


def test_images_are_tagged_with_the_project_version():
    images = set()
    for path in KUBERAY:
        images.update(re.findall(r"image: (\S+)", path.read_text()))
    assert images and {image.rsplit(":", 1)[1] for image in images} <= {VERSION, f"{VERSION}-gpu"}


def values_of(key: str, node) -> list:
    """Every value under `key` anywhere in a parsed manifest."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [x for v in node.values() for x in values_of(key, v)]
    if isinstance(node, list):
        return [x for v in node for x in values_of(key, v)]
    return []


def test_every_volume_claim_the_manifests_use_is_defined():
    claims, defined = set(), {}
    for path in KUBERAY:
        for manifest in yaml.safe_load_all(path.read_text()):
            claims.update(values_of("claimName", manifest))
            if manifest["kind"] == "PersistentVolumeClaim":
                defined[manifest["metadata"]["name"]] = manifest["spec"]
    assert claims == {"amnesis-shared"} and set(defined) == claims
    spec = defined["amnesis-shared"]
    assert spec["accessModes"] == ["ReadWriteMany"]  # pods on several nodes write it at once
    assert spec["resources"]["requests"]["storage"] and spec["storageClassName"]


def test_the_image_installs_the_project_with_postgres_and_checks_it():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    install = re.search(r'pip install [^\n]*"([^"]+)\[([a-z,]+)\]"', dockerfile)
    assert install and set(install.group(2).split(",")) >= {"all", "postgres"}
    assert "|| true" not in dockerfile and "unlearn --version" in dockerfile
    postgres = re.search(r"^postgres = \[(.*)\]$", PYPROJECT, flags=re.M).group(1)
    assert '"psycopg[binary]' in postgres and "ledger" in postgres


def requirement(name: str) -> Requirement:
    (text,) = re.findall(rf'"({re.escape(name)}(?:\[[a-z,]+\])?[<>=!~][^"]*)"', PYPROJECT)
    return Requirement(text)


@pytest.mark.parametrize(
    "name,releases",
    [("torch", ["2.14.1", "2.15.0"]), ("torchvision", ["0.29.2", "0.30.0"]), ("ray", ["2.60.0"]),
     ("mlflow", ["3.17.2", "3.18.0"])],
)
def test_dependency_ranges_admit_this_machines_and_current_releases(name, releases):
    """This machine's releases (kept installable) and PyPI's newest when this was written, with
    the torchvision that pairs with torch 2.15."""
    specifier = requirement(name).specifier
    assert all(specifier.contains(release) for release in releases), specifier


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_local_state_out_of_the_image():
    patterns = dockerignore()
    for required in (".git", ".venv", "mlruns", "runs", "mlflow.db", "requests.db", "benchmarks/cache"):
        assert required in patterns, required
    assert "**/__pycache__" in patterns


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule for these simple patterns: `**/P` matches at any depth, others at the root."""
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, p[3:]) if p.startswith("**/") else fnmatch.fnmatch(relative, p) for p in patterns)


def copy_build_context(target: Path) -> Path:
    """The repository as `docker build` sees it through .dockerignore."""
    patterns = dockerignore()

    def skip(directory: str, names: list[str]) -> list[str]:
        base = Path(directory).relative_to(ROOT).as_posix()
        return [n for n in names if ignored(n if base == "." else f"{base}/{n}", patterns)]

    return Path(shutil.copytree(ROOT, target, ignore=skip))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from the image's build context (what `make dist` and the Dockerfile build)."""
    root = tmp_path_factory.mktemp("wheel")
    context = copy_build_context(root / "context")
    assert not (context / ".venv").exists() and not (context / ".git").exists()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(root / "dist"), str(context)], check=True, timeout=300)
    (built,) = (root / "dist").glob("*.whl")
    return built


def test_the_wheel_is_the_one_the_launcher_installs_and_ships_tune_configs(wheel):
    assert wheel.name == launcher_wheel()[1]
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.name for p in (ROOT / "tune_configs").glob("*.yaml")}
    assert configs >= {"ptn.yaml", "potion.yaml", "tpe.yaml"}
    assert {f"tune_configs/{name}" for name in configs} <= names
    assert "pipelines/cli/__init__.py" in names and "unlearning/__init__.py" in names
    migrations = {f"pipelines/ledger_migrations/versions/{p.name}"
                  for p in (ROOT / "pipelines" / "ledger_migrations" / "versions").glob("*.py")}
    assert migrations and migrations <= names  # the ledger upgrades itself from an installed wheel
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "cluster/"))]


def test_search_configs_resolve_by_name_from_the_installed_wheel(wheel, tmp_path):
    """`--search ptn` in a directory that holds no tune_configs/, with only the wheel's files."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--target", str(target), str(wheel)], check=True, timeout=300)
    script = (
        "import pipelines.search as s\n"
        "for name in ('ptn', 'potion', 'potion_ptn', 'tpe'):\n"
        "    config = s.load_search_config(name)\n"
        "    print(name, config.search, config.importance_kind)\n"
        "print(s.__file__)\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    # potion_ptn, potion's earlier name, still finds its config; ptn reads the request's kind (None)
    assert lines[:4] == ["ptn ptn None", "potion ptn l2_norm", "potion_ptn ptn l2_norm", "tpe tpe fisher"]
    assert Path(lines[4]).is_relative_to(target)  # the installed copy answered, not the repository


def test_make_clean_removes_what_the_commands_write_and_keeps_the_environment(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path)
    written = ["mlflow.db", "requests.db", "mlruns/1/a", "mlartifacts/x", "runs/original/model.json",
               "demo-output/run/report.json", ".forget-3.partial-k2j4/model.json", "dist/a.whl", "build/lib/x"]
    for relative in written:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x")
    kept = ["venv-marker", ".venv/bin/python", "benchmarks/cache/models/m", "my-notes.txt"]
    for relative in kept:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x")
    subprocess.run(["make", "--no-print-directory", "clean"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    left = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert left == {"Makefile", *kept}


def test_the_makefile_never_hides_a_failing_pip():
    recipes = [line.strip() for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("\t")]
    pip_lines = [line for line in recipes if "pip " in line]
    assert pip_lines
    for line in pip_lines:
        assert "|" not in line and "|| true" not in line and not line.startswith("-"), line


def test_runtime_env():
    runtime_env = load("runtime_env.yaml")
    assert set(runtime_env) <= RUNTIME_ENV_KEYS
    assert {"MLFLOW_TRACKING_URI", "AMNESIS_LEDGER_URL"} <= set(runtime_env["env_vars"])


@pytest.mark.parametrize("doc", ["docs/cluster.md", "README.md"])
def test_documented_commands_are_valid(doc):
    text = (ROOT / doc).read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("#")[0].strip()
            if " -- unlearn " in line:
                line = "unlearn " + line.split(" -- unlearn ", 1)[1]
            if line.startswith("unlearn "):
                commands.append(line)
    assert commands, f"{doc} shows no unlearn command"
    for command in commands:
        check_unlearn_command(command)
