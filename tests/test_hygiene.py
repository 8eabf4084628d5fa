"""Files as a team expects them: umask-honouring outputs, no leftovers of killed writers, ``python -m repro``,
and a package that installs without deprecation banners."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from repro.utils.files import atomic_path, owner_tag, remove_stale
from repro.cli.main import main
from repro.config.loader import save_config
from repro.config.entries import load_entry
from repro.data import get_dataset
from repro.data.knn import KnnTable, save_knn
from repro.data.pipeline import prepare_stage, shards_stage
from repro.evaluate.report import write_json

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o002, 0o022])
def test_outputs_honour_the_umask_like_open(tmp_path, umask, mask):
    """Attack: every output file was written 0600 (mkstemp), unreadable by a team sharing REPRO_WORK."""
    umask(mask)
    with open(tmp_path / "plain.txt", "w") as fh:  # the reference: what a normal open gives
        fh.write("x")
    want = mode(tmp_path / "plain.txt")
    assert want == 0o666 & ~mask
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
    write_json(tmp_path / "metrics.json", {"a": 1})
    save_config(load_entry("demo/nyuv2-mini"), tmp_path / "config.yaml")
    save_knn(tmp_path / "knn.npz", KnnTable(["a", "b"], np.array([[0, 1], [1, 0]]), np.ones((2, 2), np.float32), {}))
    for name in ("a.txt", "metrics.json", "config.yaml", "knn.npz"):
        assert mode(tmp_path / name) == want, name
    os.chmod(tmp_path / "metrics.json", 0o640)  # an existing file keeps its mode, as with open(path, "w")
    write_json(tmp_path / "metrics.json", {"a": 2})
    assert mode(tmp_path / "metrics.json") == 0o640 and json.loads((tmp_path / "metrics.json").read_text()) == {"a": 2}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_writes_remove_temp_files_of_dead_writers_only(tmp_path):
    host = owner_tag().split("@")[1]
    dead, alive = dead_pid(), os.getppid()
    stale = tmp_path / f".metrics.json.{dead}@{host}.k3j2l1.tmp"
    live = tmp_path / f".metrics.json.{alive}@{host}.a1b2c3.tmp"
    elsewhere = tmp_path / f".metrics.json.{dead}@another-node.q9w8e7.tmp"  # cannot be checked from here: kept
    other = tmp_path / f".config.yaml.{dead}@{host}.x1y2z3.tmp"  # another output's: left to its own writer
    for p in (stale, live, elsewhere, other):
        p.write_text("half written")
    write_json(tmp_path / "metrics.json", {"ok": True})
    assert not stale.exists() and live.exists() and elsewhere.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["metrics.json"]
    assert remove_stale(tmp_path, "config.yaml") == [other]


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from repro.data.pipeline import iter_crops
    from repro.data.shards import write_shards

    crops, out, ready = (Path(a) for a in sys.argv[1:])

    def items():
        for i, crop in enumerate(iter_crops(crops)):
            if i == 12:
                ready.write_text("12 samples written")
                time.sleep(600)  # killed here, mid-shard
            yield crop, None

    write_shards(items(), out, shard_size=5)
""")


def test_killed_shards_writer_leaves_nothing_after_the_next_run(shared_data, tmp_path):
    """Attack: kill -9 during the shards stage left its .partial-<pid> folder forever."""
    nyu = get_dataset("nyuv2", shared_data / "nyuv2-mini", "test")
    crops = prepare_stage(nyu, tmp_path / "crops", five_crop=True, size=32, progress=False)
    out, ready = tmp_path / "shards", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(crops), str(out), str(ready)], env=ENV)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "writer did not start"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith(".shards.partial-")]
    assert partial.name == f".shards.partial-{proc.pid}@{owner_tag().split('@')[1]}"
    assert len(list(partial.glob("shard-*.tar"))) == 3 and not out.exists()
    shards_stage(crops, None, out, shard_size=5)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert json.loads((out / "index.json").read_text())["count"] == 50


def test_python_dash_m_repro_is_the_repro_command(capsys):
    proc = subprocess.run([sys.executable, "-m", "repro", "list", "demo"], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert main(["list", "demo"]) == 0
    assert proc.stdout == capsys.readouterr().out and "demo/nyuv2-mini" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "repro", "no-such-command"], capture_output=True, text=True, env=ENV,
                         timeout=300)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_package_metadata_builds_without_deprecation_banners(tmp_path):
    """The licence is an SPDX string; building the metadata (what pip install does) warns about nothing."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "repro").mkdir()
    (tmp_path / "repro" / "__init__.py").write_text("")
    out = tmp_path / "meta"
    out.mkdir()
    code = ("import sys; from setuptools import build_meta; "
            "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Deprecat" not in proc.stderr + proc.stdout, proc.stderr
    metadata = (out / proc.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: MIT" in metadata.splitlines()
