"""Tests for repro.utils.env: the ``env.json`` record of a run."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

import repro
from repro.utils.env import PACKAGES, collect_env, git_info, write_env

REPO_ROOT = Path(__file__).resolve().parents[1]
KEYS = {
    "repro_version", "python", "platform", "hostname", "git_sha", "git_dirty", "packages",
    "cuda_available", "cuda_version", "cudnn_version", "device_count", "devices",
    "slurm_job_id", "slurm_array_job_id", "slurm_array_task_id", "slurm_job_name", "slurm_nodelist",
    "container",
}


def _in_checkout() -> bool:
    return shutil.which("git") is not None and subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True
    ).returncode == 0


def test_collect_env_keys_and_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME",
                "SLURM_JOB_NODELIST", "APPTAINER_CONTAINER", "SINGULARITY_CONTAINER"):
        monkeypatch.delenv(var, raising=False)
    env = collect_env()
    assert set(env) == KEYS
    assert env["repro_version"] == repro.__version__
    assert env["python"] == platform.python_version()
    assert set(env["packages"]) == set(PACKAGES) | {"faiss_dist"}
    assert env["packages"]["numpy"] == metadata.version("numpy")
    assert env["packages"]["torch"] == metadata.version("torch")
    # whichever faiss distribution is installed (faiss-cpu in CI, faiss-gpu in the container)
    assert env["packages"]["faiss_dist"] in ("faiss-cpu", "faiss-gpu")
    assert env["packages"]["faiss"] == metadata.version(env["packages"]["faiss_dist"])
    import torch

    assert env["cuda_available"] == torch.cuda.is_available()
    assert env["cuda_version"] == torch.version.cuda
    assert env["device_count"] == len(env["devices"])
    assert env["slurm_job_id"] is None and env["container"] is None


def test_collect_env_reads_slurm_and_container(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.delenv("APPTAINER_CONTAINER", raising=False)
    monkeypatch.setenv("SINGULARITY_CONTAINER", "/images/repro.sif")
    env = collect_env()
    assert (env["slurm_job_id"], env["slurm_array_job_id"], env["slurm_array_task_id"]) == ("4242", "4240", "2")
    assert env["container"] == "/images/repro.sif"
    monkeypatch.setenv("APPTAINER_CONTAINER", "/images/other.sif")
    assert collect_env()["container"] == "/images/other.sif"


def test_missing_package_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    real = metadata.version

    def fake(name: str) -> str:
        if name == "webdataset":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", fake)
    assert collect_env()["packages"]["webdataset"] is None


def test_write_env_json_round_trip(tmp_path: Path) -> None:
    out = write_env(tmp_path / "run" / "seed0" / "env.json")
    assert out == tmp_path / "run" / "seed0" / "env.json"
    assert [p.name for p in out.parent.iterdir()] == ["env.json"]  # no temporary file left
    data = json.loads(out.read_text())
    assert set(data) == KEYS
    fresh = json.loads(json.dumps(collect_env()))
    for volatile in ("git_sha", "git_dirty"):  # the checkout may change between the two calls
        data.pop(volatile), fresh.pop(volatile)
    assert data == fresh


@pytest.mark.skipif(not _in_checkout(), reason="tests are not running from a git checkout")
def test_git_sha_matches_checkout() -> None:
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    env = collect_env()
    if Path(repro.__file__).resolve().parents[1] != REPO_ROOT:
        pytest.skip("the imported repro package is not this checkout (installed elsewhere)")
    assert env["git_sha"] == head
    dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip() != ""
    assert env["git_dirty"] is dirty


def test_git_info_outside_a_checkout_is_none(tmp_path: Path) -> None:
    assert git_info(tmp_path) == {"sha": None, "dirty": None}
    assert git_info(tmp_path / "does-not-exist") == {"sha": None, "dirty": None}
