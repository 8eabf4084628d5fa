"""Tests for the container recipes: ``Containerfile`` (OCI) and ``apptainer.def``.

* hadolint (the binary installed from requirements.lock) finds nothing in Containerfile;
* both recipes install the same pins (base image, lock files, faiss, pip);
* ``@pytest.mark.container``: the real Containerfile is built with buildah from a local
  Debian bookworm base and a tiny requirements file, and ``repro --version`` runs inside.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

import repro

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTAINERFILE = REPO_ROOT / "Containerfile"
APPTAINER_DEF = REPO_ROOT / "apptainer.def"
LOCK = REPO_ROOT / "requirements.lock"
GPU_LOCK = REPO_ROOT / "requirements-gpu.lock"

BASE_TAG = "localhost/repro-test-base:bookworm"  # kept in buildah's storage across runs
IMAGE_TAG = "localhost/repro-test:latest"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
PIN = re.compile(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)")


def _pins(text: str) -> dict[str, str]:
    """``name==version`` pins in a text, names normalised (PEP 503), comments skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        for name, version in PIN.findall(line):
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out


def _containerfile_args() -> dict[str, str]:
    """Default values of the ``ARG NAME=value`` lines of Containerfile."""
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", CONTAINERFILE.read_text(), re.M))


def _apptainer_section(name: str) -> str:
    """Body of one ``%name`` section of apptainer.def."""
    text = APPTAINER_DEF.read_text()
    match = re.search(rf"^%{name}\s*\n(.*?)(?=^%\w+|\Z)", text, re.M | re.S)
    assert match, f"apptainer.def has no %{name} section"
    return match.group(1)


# --------------------------------------------------------------------------- lint, pins


def test_hadolint_containerfile_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.is_file():
        hadolint = Path(shutil.which("hadolint") or "")
    assert hadolint.is_file(), "hadolint not installed: it is pinned in requirements.lock, run `make setup`"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(CONTAINERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_recipes_use_same_base_image() -> None:
    base = _containerfile_args()["BASE_IMAGE"]
    header = APPTAINER_DEF.read_text().split("%", 1)[0]
    assert re.search(r"^Bootstrap:\s*docker\s*$", header, re.M)
    from_line = re.search(r"^From:\s*(\S+)\s*$", header, re.M)
    assert from_line, "apptainer.def has no From: line"
    assert from_line.group(1) == base
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", base) and not base.endswith(":latest"), (
        f"base image must be pinned by an explicit tag, got {base!r}"
    )


def test_recipes_install_the_same_lock_files() -> None:
    args = _containerfile_args()
    assert args["REQUIREMENTS"] == LOCK.name
    assert args["GPU_REQUIREMENTS"] == GPU_LOCK.name
    files = _apptainer_section("files")
    for lock in (LOCK, GPU_LOCK):
        assert re.search(rf"^\s*{re.escape(lock.name)}\s", files, re.M), f"%files lacks {lock.name}"
    post = _apptainer_section("post")
    container = CONTAINERFILE.read_text()
    # Both drop faiss-cpu from the CI set and install the GPU overlay beside it.
    drop = "sed '/^faiss-cpu==/d'"
    assert drop in container and drop in post
    assert "requirements-gpu.lock" in post
    assert re.search(r"pip install --no-cache-dir --no-deps /opt/repro-src\b", post)
    assert re.search(r"pip install --no-cache-dir --no-deps /tmp/wheels/repro-\*\.whl", container)


def test_recipes_pin_the_same_versions() -> None:
    lock = _pins(LOCK.read_text())
    gpu = _pins(GPU_LOCK.read_text())
    # faiss-gpu replaces faiss-cpu at the same version; pydensecrf2 comes from the lock.
    assert gpu["faiss-gpu"] == lock["faiss-cpu"] == _pins((REPO_ROOT / "requirements.in").read_text())["faiss-cpu"]
    assert "pydensecrf2" in lock and "pydensecrf2" not in gpu
    assert not set(gpu) & (set(lock) - {"faiss-cpu"}), "the GPU overlay must not re-pin packages of the lock"
    # Whatever the recipes pin inline (pip itself) is pinned identically in both, and
    # nothing in them overrides a version of the lock files.
    container_pins = _pins(CONTAINERFILE.read_text())
    apptainer_pins = _pins(APPTAINER_DEF.read_text())
    assert container_pins == apptainer_pins
    assert "pip" in container_pins
    for name, version in container_pins.items():
        assert lock.get(name, version) == version and gpu.get(name, version) == version, name


def test_dockerignore_keeps_what_the_build_copies() -> None:
    """Every COPY source of the Containerfile survives .dockerignore (a quick static check)."""
    ignore = (REPO_ROOT / ".dockerignore").read_text()
    for needed in ("pyproject.toml", "README.md", "requirements*.lock", "repro/"):
        assert f"!{needed}" in ignore


# --------------------------------------------------------------------------- real build

# What the fast test build installs: `repro --version` must run with these alone.
TINY_IMPORTS = {"yaml"}  # PyYAML (repro.config, imported while the CLI parser is built)


def test_version_needs_only_the_tiny_requirements() -> None:
    """``repro --version`` imports no third-party module beyond PyYAML (no torch, numpy...)."""
    code = (
        "import sys\n"
        "from repro.cli.main import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "mods = {m.split('.')[0] for m in sys.modules}\n"
        "print(' '.join(sorted(m for m in mods - set(sys.stdlib_module_names)\n"
        "                      if not m.startswith('_') and m not in ('repro', 'cython_runtime'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"repro {repro.__version__}"
    imported = set(lines[1].split()) if len(lines) > 1 else set()
    assert imported <= TINY_IMPORTS, (
        f"`repro --version` now imports {sorted(imported - TINY_IMPORTS)}: keep heavy imports inside the "
        "command functions, or add the package to the tiny requirements of test_containerfile_builds_and_runs"
    )


def _sh(cmd: list[str], timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"command failed ({result.returncode}): {' '.join(cmd)}\n"
            f"--- stdout (tail)\n{result.stdout[-4000:]}\n--- stderr (tail)\n{result.stderr[-4000:]}"
        )
    return result


def _ensure_tool(tool: str, package: str) -> str | None:
    """Path of ``tool``; installs the Debian ``package`` with apt-get if missing (root only)."""
    found = shutil.which(tool)
    if found or not shutil.which("apt-get") or os.geteuid() != 0:
        return found
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    try:
        if subprocess.run(install, capture_output=True, timeout=600, env=env).returncode != 0:
            # empty or stale package lists (fresh machine): update once, then try again
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=300, env=env)
            subprocess.run(install, capture_output=True, timeout=600, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return shutil.which(tool)


@pytest.fixture(scope="session")
def buildah() -> str:
    path = _ensure_tool("buildah", "buildah")
    if path is None:
        pytest.skip("buildah is not installed and `apt-get install buildah` did not provide it")
    probe = subprocess.run([path, "images"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"buildah cannot use its storage here: {probe.stderr.strip()[-300:]}")
    return path


@pytest.fixture(scope="session")
def debian_base(buildah: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local Debian bookworm (minbase) image, made once with debootstrap and then reused."""
    if _sh([buildah, "inspect", "--type", "image", BASE_TAG], check=False).returncode == 0:
        return BASE_TAG
    debootstrap = _ensure_tool("debootstrap", "debootstrap")
    if debootstrap is None:
        pytest.skip("debootstrap is not installed and `apt-get install debootstrap` did not provide it")
    work = tmp_path_factory.mktemp("debian-base")
    rootfs = work / "rootfs"
    _sh([debootstrap, "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR], timeout=1200)
    for leftover in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        leftover.unlink()
    tarball = work / "rootfs.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(rootfs, arcname=".")
    shutil.rmtree(rootfs, ignore_errors=True)
    ctr = _sh([buildah, "from", "scratch"]).stdout.strip()
    try:
        _sh([buildah, "add", ctr, str(tarball), "/"])
        _sh([buildah, "config", "--cmd", "/bin/bash", ctr])
        _sh([buildah, "commit", "--rm", ctr, BASE_TAG])
    except BaseException:
        _sh([buildah, "rm", ctr], check=False)
        raise
    tarball.unlink()
    return BASE_TAG


def _host_ca_mounts(work: Path) -> list[str]:
    """``buildah bud -v`` options that let pip inside the build trust this host's CA bundle.

    Needed only where TLS goes through an intercepting proxy whose CA the host trusts
    (``PIP_CERT`` / ``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE``); the image itself is not
    changed: the bundle and a pip.conf naming it are bind-mounted for the RUN steps.
    """
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        bundle = os.environ.get(var)
        if bundle and Path(bundle).is_file():
            conf = work / "pip.conf"
            conf.write_text("[global]\ncert = /etc/pip-host-ca.pem\n")
            return ["-v", f"{Path(bundle).resolve()}:/etc/pip-host-ca.pem:ro", "-v", f"{conf}:/etc/pip.conf:ro"]
    return []


def _build_context(dest: Path) -> None:
    """The files the Containerfile copies, plus tiny requirement files for a fast build."""
    for name in ("Containerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, dest / name)
    shutil.copytree(REPO_ROOT / "repro", dest / "repro", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(REPO_ROOT / "data_manifests", dest / "data_manifests")
    shutil.copytree(REPO_ROOT / "benchmarks" / "profiles", dest / "benchmarks" / "profiles")
    lock = _pins(LOCK.read_text())
    # `repro --version` needs the standard library only; PyYAML exercises a real install
    # from the pinned set, and the faiss-cpu line checks that the recipe drops it.
    (dest / "requirements.tiny.lock").write_text(f"PyYAML=={lock['pyyaml']}\nfaiss-cpu=={lock['faiss-cpu']}\n")
    (dest / "requirements-gpu.tiny.lock").write_text(f"packaging=={lock['packaging']}\n")


@pytest.mark.container
def test_containerfile_builds_and_runs(buildah: str, debian_base: str, tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    _build_context(context)
    _sh([
        buildah, "bud", "--isolation=chroot", "--layers", "--force-rm", *_host_ca_mounts(tmp_path),
        "--build-arg", f"BASE_IMAGE={debian_base}",
        "--build-arg", "REQUIREMENTS=requirements.tiny.lock",
        "--build-arg", "GPU_REQUIREMENTS=requirements-gpu.tiny.lock",
        "-f", str(context / "Containerfile"), "-t", IMAGE_TAG, str(context),
    ], timeout=1800)

    name = f"repro-test-{uuid.uuid4().hex[:8]}"
    _sh([buildah, "from", "--name", name, IMAGE_TAG])
    try:
        def run(*cmd: str) -> str:
            return _sh([buildah, "run", "--isolation", "chroot", name, "--", *cmd], timeout=300).stdout

        assert run("repro", "--version").strip() == f"repro {repro.__version__}"
        frozen = set(run("pip", "list", "--format=freeze").split())
        lock = _pins(LOCK.read_text())
        assert f"PyYAML=={lock['pyyaml']}" in frozen
        assert f"packaging=={lock['packaging']}" in frozen
        assert f"repro=={repro.__version__}" in frozen
        assert not any(p.startswith("faiss-cpu==") for p in frozen), frozen
        env = run("sh", "-c", "echo $REPRO_WEIGHTS $REPRO_DATA $REPRO_WORK; pwd").split()
        assert env == ["/mnt/weights", "/mnt/data", "/mnt/work", "/mnt/work"]
        # The installed package finds the dataset manifests (used by `repro data verify`).
        assert run("sh", "-c", 'ls "$REPRO_MANIFESTS"').split() == sorted(p.name for p in (REPO_ROOT / "data_manifests").iterdir())
        # ... and the stage profiles `repro plan` falls back to
        profiles = sorted(p.name for p in (REPO_ROOT / "benchmarks" / "profiles").iterdir())
        assert run("sh", "-c", 'ls "$REPRO_PROFILES"').split() == profiles
        # Non-editable: the package lives in the virtualenv, not in a source tree.
        where = run("python", "-c", "import repro; print(repro.__file__)").strip()
        assert where.startswith("/opt/venv/lib/python3.11/site-packages/repro/"), where
        assert run("sh", "-c", "command -v g++ || echo none").strip() == "none"
    finally:
        _sh([buildah, "rm", name], check=False)
    entrypoint = _sh([buildah, "inspect", "--type", "image", "--format",
                      "{{.OCIv1.Config.Entrypoint}}", IMAGE_TAG]).stdout.strip()
    assert entrypoint == "[repro]"
