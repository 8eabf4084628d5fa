"""The run environment record (``env.json``): versions, git sha, host, GPUs, scheduler.

Every run writes one next to its ``config.yaml`` (DESIGN "Conventions") so a number in
``metrics.json`` can be traced to the code and the software stack that produced it.
Collecting never fails: whatever cannot be found is ``None``.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import repro
from repro.utils.files import atomic_path

__all__ = ["PACKAGES", "collect_env", "file_record", "git_info", "write_env"]

#: Distributions whose versions are recorded (``faiss`` is whichever of faiss-cpu/-gpu is installed).
PACKAGES = ("torch", "torchvision", "timm", "transformers", "accelerate", "submitit", "faiss",
            "webdataset", "numpy", "scipy")
_FAISS_DISTS = ("faiss-gpu", "faiss-cpu", "faiss-gpu-cu12", "faiss")
_ENV_VARS = {
    "slurm_job_id": "SLURM_JOB_ID",
    "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
    "slurm_array_task_id": "SLURM_ARRAY_TASK_ID",
    "slurm_job_name": "SLURM_JOB_NAME",
    "slurm_nodelist": "SLURM_JOB_NODELIST",
}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
    except Exception:  # a broken installation must not stop a run
        return None


def _package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        if name == "faiss":
            found = [(d, v) for d in _FAISS_DISTS if (v := _version(d)) is not None]
            out["faiss"] = found[0][1] if found else None
            out["faiss_dist"] = found[0][0] if found else None
        else:
            out[name] = _version(name)
    return out


def _git(args: list[str], cwd: Path, timeout: float) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True,
                                timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def git_info(path: str | Path | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """Git commit of the source tree holding ``path`` (default: the ``repro`` package).

    Args:
        path: A folder inside the checkout; defaults to the installed package's folder.
        timeout: Seconds allowed per git call.

    Returns:
        ``{"sha": str | None, "dirty": bool | None}``: the ``HEAD`` commit and whether
        tracked files differ from it; both ``None`` when the folder is not in a git
        checkout (e.g. an installed wheel in a container), git is missing, or it times
        out. Never raises.
    """
    where = Path(path) if path is not None else Path(repro.__file__).resolve().parent
    sha = _git(["rev-parse", "HEAD"], where, timeout)
    if sha is None or not sha.strip():
        return {"sha": None, "dirty": None}
    # A wheel installed inside some other repository's tree must not report that repository.
    top = _git(["rev-parse", "--show-toplevel"], where, timeout)
    if path is None and top is not None:
        package_root = Path(repro.__file__).resolve().parents[1]
        if Path(top.strip()).resolve() != package_root:
            return {"sha": None, "dirty": None}
    status = _git(["status", "--porcelain", "--untracked-files=no"], where, timeout)
    return {"sha": sha.strip(), "dirty": None if status is None else bool(status.strip())}


def _cuda() -> dict[str, Any]:
    out: dict[str, Any] = {"cuda_available": None, "cuda_version": None, "cudnn_version": None,
                           "device_count": 0, "devices": []}
    try:
        import torch
    except Exception:
        return out
    try:
        out["cuda_version"] = torch.version.cuda
        out["cuda_available"] = bool(torch.cuda.is_available())
        if out["cuda_available"]:
            out["cudnn_version"] = torch.backends.cudnn.version()
            out["device_count"] = torch.cuda.device_count()
            out["devices"] = [torch.cuda.get_device_name(i) for i in range(out["device_count"])]
    except Exception:
        pass
    return out


def collect_env() -> dict[str, Any]:
    """Describe the environment of this process (JSON-serialisable).

    Returns:
        A dict with keys ``repro_version``, ``python``, ``platform``, ``hostname``,
        ``git_sha``, ``git_dirty``, ``packages`` (one entry per name in :data:`PACKAGES`,
        the version or ``None``, plus ``faiss_dist``: which faiss distribution),
        ``cuda_available``, ``cuda_version`` (torch's build), ``cudnn_version``, ``device_count``, ``devices`` (GPU names), ``slurm_job_id``,
        ``slurm_array_job_id``, ``slurm_array_task_id``, ``slurm_job_name``,
        ``slurm_nodelist`` (``None`` outside SLURM) and ``container`` (the image path from
        ``APPTAINER_CONTAINER`` / ``SINGULARITY_CONTAINER``, else ``None``).
        Nothing here raises: unknown values are ``None``.
    """
    git = git_info()
    env: dict[str, Any] = {
        "repro_version": repro.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "git_sha": git["sha"],
        "git_dirty": git["dirty"],
        "packages": _package_versions(),
    }
    env.update(_cuda())
    for key, var in _ENV_VARS.items():
        env[key] = os.environ.get(var) or None
    env["container"] = os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER") or None
    return env


def file_record(path: str | Path) -> dict[str, Any]:
    """``{"path", "name", "bytes", "sha256"}`` of a file, e.g. the backbone checkpoint a run loaded (docs/fidelity.md R1).

    Raises:
        OSError: if the file cannot be read.
    """
    from repro.utils.files import file_sha256

    path = Path(path)
    return {"path": str(path.resolve()), "name": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def write_env(path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write :func:`collect_env` (plus ``extra``) as JSON to ``path`` atomically (temporary file + rename).

    Args:
        path: Output file, e.g. ``<run>/env.json``; parent folders are created.
        extra: further JSON-serialisable entries, e.g. ``{"backbone_checkpoint": file_record(...)}``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: If the folder cannot be created or written.
    """
    data = {**collect_env(), **(extra or {})}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return Path(path)
