"""``repro run`` / ``repro eval`` on the real NYUv2 sample under attack: two runs of one folder at once,
a failed attempt retried with a corrected config, a full disk, unsafe run names, and an evaluation
config that differs from the run's."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import repro.utils.files
import repro.training.loop
from repro.cli.main import main
from repro.runs.entry import resolve_entry, run_dir_for, run_entry
from repro.utils.errors import RunBusyError
from sample_helpers import quick_demo_overrides, random_dino

ENTRY = "demo/nyuv2-mini"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def done(shared_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("robust-run")
    overrides = quick_demo_overrides(shared_data, random_dino(work), "train.max_steps=4", "train.val_every=0",
                                     "eval.crf=false", "eval.num_figures=0", "eval.flip=false")
    run_dir = run_entry(ENTRY, work_dir=work, overrides=overrides, quiet=True)
    return work, overrides, run_dir


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def cli_args(work, overrides, *extra):
    return ["--work-dir", str(work), "--quiet", *[a for o in [*overrides, *extra] for a in ("--set", o)]]


def test_a_second_identical_run_fails_clearly_while_the_first_holds_the_folder(done):
    """Attack: two identical `repro run` at once both trained the same run folder."""
    work, overrides, _ = done
    name = ["name=robust/concurrent"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen([sys.executable, "-m", "repro", "run", ENTRY, *cli_args(work, overrides, *name)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = run_dir_for(resolve_entry(ENTRY, overrides=overrides + name), work)
    deadline = time.monotonic() + 300
    # wait for everything read below: the first run's lock, its status and its config.yaml (written after the status)
    while not ((run_dir / ".lock").is_file() and (run_dir / ".lock").read_text().startswith(f"{first.pid}@")
               and (run_dir / "status.json").is_file() and (run_dir / "config.yaml").is_file()):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.05)
    config_before = (run_dir / "config.yaml").read_bytes()
    with pytest.raises(RunBusyError, match=rf"{run_dir} is in use by {first.pid}@"):
        run_entry(ENTRY, work_dir=work, overrides=overrides + name, quiet=True)
    assert (run_dir / "config.yaml").read_bytes() == config_before
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output
    assert status(run_dir)["state"] == "done"  # the second attempt did not touch the first's status
    stamp = (run_dir / "model.pt").stat().st_mtime_ns
    assert run_entry(ENTRY, work_dir=work, overrides=overrides + name, quiet=True) == run_dir  # now free: all skipped
    assert (run_dir / "model.pt").stat().st_mtime_ns == stamp


def test_a_failed_attempt_is_retried_in_place_with_a_corrected_config(done, monkeypatch):
    """Attack: a run that failed deep inside training blocked the corrected rerun ('different config')."""
    work, overrides, _ = done
    name = "name=robust/retry"

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x384 and 0x70)")

    monkeypatch.setattr(repro.training.loop, "train", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run_entry(ENTRY, work_dir=work, overrides=overrides + [name, "model.code_dim=7"], quiet=True)
    run_dir = run_dir_for(resolve_entry(ENTRY, overrides=overrides + [name]), work)
    assert status(run_dir)["state"] == "failed" and "shapes cannot be multiplied" in status(run_dir)["error"]
    monkeypatch.undo()
    assert run_entry(ENTRY, work_dir=work, overrides=overrides + [name, "train.max_steps=2"], quiet=True,
                     until="train") == run_dir
    assert status(run_dir)["state"] == "done" and (run_dir / "model.pt").is_file()
    assert "max_steps: 2" in (run_dir / "config.yaml").read_text() and "code_dim: 70" in (run_dir / "config.yaml").read_text()
    with pytest.raises(FileExistsError, match="different config.*model.pt"):  # now it holds results: refused
        run_entry(ENTRY, work_dir=work, overrides=overrides + [name, "train.max_steps=3"], quiet=True)


def test_disk_full_during_training_is_recorded_as_failed(done, monkeypatch):
    """Attack: a full disk mid-run left status.json at 'running' (writing the failure failed too)."""
    work, overrides, _ = done
    overrides = overrides + ["train.max_steps=2"]
    name = "name=robust/disk-full"
    full = {"now": False}
    real_mkstemp = repro.utils.files.tempfile.mkstemp

    def no_space(*args, **kwargs):
        full["now"] = True
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1] if len(args) > 1 else ""))

    def mkstemp(*args, **kwargs):
        if full["now"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(repro.training.loop, "save_checkpoint", no_space)
    monkeypatch.setattr(repro.utils.files.tempfile, "mkstemp", mkstemp)
    with pytest.raises(OSError, match="No space left on device"):
        run_entry(ENTRY, work_dir=work, overrides=overrides + [name], quiet=True)
    run_dir = run_dir_for(resolve_entry(ENTRY, overrides=overrides + [name]), work)
    record = status(run_dir)
    assert record["state"] == "failed" and record["stage"] == "train" and "No space left on device" in record["error"]
    monkeypatch.undo()
    assert run_entry(ENTRY, work_dir=work, overrides=overrides + [name], quiet=True, until="train") == run_dir
    assert status(run_dir)["state"] == "done"  # space back: the same folder goes on


@pytest.mark.parametrize("name", ["../../../../somewhere", "ABSOLUTE", "table1/../../x", "a//b", "..", "a\\b", "", " "])
def test_unsafe_run_names_are_refused(done, tmp_path, name, capsys):
    """Attack: --set name=../../../../somewhere created the run folder outside the work dir."""
    _, overrides, _ = done
    work = tmp_path / "deep" / "er" / "work"
    work.mkdir(parents=True)
    name = str(tmp_path / "absolute") if name == "ABSOLUTE" else name
    assert main(["run", ENTRY, "--until", "prepare", *cli_args(work, overrides, f"name={name}")]) == 2
    assert "not a safe relative name" in capsys.readouterr().err  # a one-line error, no traceback
    assert [p for p in tmp_path.rglob("*") if p != work and p not in work.parents] == []


def test_eval_never_overwrites_the_metrics_of_another_config(done, capsys):
    """Attack: `repro eval` with another config overwrote metrics.json while config.yaml described the run."""
    work, overrides, run_dir = done
    before = (run_dir / "metrics.json").read_bytes()
    host = repro.utils.files.owner_tag().split("@")[1]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = run_dir / f".metrics.flip-true.json.{dead.pid}@{host}.x7k2.tmp"  # a killed earlier eval's temp file
    leftover.write_text("{")
    assert main(["eval", ENTRY, *cli_args(work, overrides, "loss.b_knn=0.5")]) == 2
    assert re.search(r"differs from the run's .*config.yaml in what was trained: loss.b_knn=0.5",
                     capsys.readouterr().err)
    assert main(["eval", ENTRY, "--flip", *cli_args(work, overrides)]) == 0
    assert "metrics.flip-true.json" in capsys.readouterr().out
    assert (run_dir / "metrics.json").read_bytes() == before and not leftover.exists()
    flipped = json.loads((run_dir / "metrics.flip-true.json").read_text())
    assert flipped["variant"] == "flip-true" and flipped["protocol"]["flip"] is True
    assert flipped["config_hash"] != json.loads(before)["config_hash"]
    assert main(["eval", ENTRY, *cli_args(work, overrides)]) == 0  # the run's own config: metrics.json
    again = json.loads((run_dir / "metrics.json").read_text())
    assert again["final"]["summary"] == json.loads(before)["final"]["summary"] and "variant" not in again


def _killed_crf_worker(job):
    """Stands in for the CRF job in a pool process: the process dies as if killed (no exception, no result)."""
    os._exit(9)


def test_a_killed_crf_worker_fails_the_evaluation_with_one_line_and_status_failed(done, monkeypatch, capsys):
    """Attack: a CRF worker killed during evaluation gave a raw BrokenProcessPool traceback; status.json said done."""
    import repro.evaluate.protocol

    work, overrides, run_dir = done
    monkeypatch.setattr(repro.evaluate.protocol, "_crf_argmax", _killed_crf_worker)  # pickled by reference
    assert main(["eval", ENTRY, *cli_args(work, overrides, "eval.crf=true", "eval.crf_processes=2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("repro: error: a DenseCRF worker process of the evaluation's pool "
                                               "(2 processes) died"), err
    assert status(run_dir)["state"] == "failed" and status(run_dir)["stage"] == "eval"
    assert "CRFPoolError" in status(run_dir)["error"]
    monkeypatch.undo()
    assert main(["eval", ENTRY, *cli_args(work, overrides)]) == 0  # retried: the folder says done again
    assert status(run_dir)["state"] == "done"


def test_eval_without_a_run_or_without_its_data_is_one_line_or_rebuilds_the_data(shared_data, tmp_path, capsys):
    """`repro eval` where nothing ran: one line naming the fix (was a FileNotFoundError traceback)."""
    from repro.cli.main import main

    rc = main(["eval", "demo/nyuv2-mini", "--work-dir", str(tmp_path / "empty"),
               "--set", f"data.root={shared_data / 'nyuv2-mini'}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("repro: error:") and "repro run" in err and "Traceback" not in err


def test_a_stage_index_that_is_not_json_is_named_with_the_folder_to_remove(tmp_path):
    from repro.data.stages import read_params

    index = tmp_path / "features-x" / "index.json"
    index.parent.mkdir()
    index.write_text('{"params": {"crops": ')  # an interrupted write
    with pytest.raises(FileExistsError, match=r"index.json is not valid JSON .*remove .*features-x"):
        read_params(index)
    index.write_text("[1, 2]")
    with pytest.raises(FileExistsError, match="holds a list, not a stage index"):
        read_params(index)
    index.write_text('{"params": {"k": 3}}')
    assert read_params(index) == {"k": 3}
