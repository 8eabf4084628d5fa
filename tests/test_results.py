"""``repro compare``: RESULTS.md from run directories per fidelity, runs identified by their config,
recorded numbers kept, the published-checkpoint column, marker-preserving regeneration, the record."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

import pytest

from repro.config import TABLES
from repro.config.loader import save_config
from repro.config.registry import load_entry
from repro.identity import config_hash
from repro.results import add_compare_command, collect_runs, render_results
from repro.resultsfile import check_against, read_results

REPO = Path(__file__).resolve().parents[1]
DONE = {  # table1/depthg-vits8, paper 56.3 / 25.6 / 73.7 / 38.9
    0: {"unsup_acc": 55.12, "unsup_miou": 24.93, "linear_acc": 73.05, "linear_miou": 38.44},
    1: {"unsup_acc": 57.48, "unsup_miou": 26.01, "linear_acc": 74.11, "linear_miou": 39.02},
}
BEST = {0: {"unsup_acc": 58.0, "unsup_miou": 26.5}, 1: {"unsup_acc": 59.1, "unsup_miou": 27.3}}
PAPER = {"unsup_acc": 56.3, "unsup_miou": 25.6, "linear_acc": 73.7, "linear_miou": 38.9}
ENV = {"python": "3.11.9", "torch": "2.4.1", "git_sha": "0123abcd", "gpu": {"name": "NVIDIA H100", "count": 1}, "hostname": "node1"}


def numbers(acc, miou=20.0):
    return {"unsup_acc": acc, "unsup_miou": miou, "linear_acc": 70.0, "linear_miou": 30.0}


def write_run(work, entry, seed, state, summary=None, best=None, log=None, fidelity="paper", overrides=(),
              config=True):
    """A run folder as `repro run` leaves it: config.yaml (the registered entry + overrides), status, metrics."""
    run = work / entry / fidelity / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    if config:
        save_config(load_entry(entry, [f"fidelity={fidelity}", f"train.seed={seed}", *overrides]), run / "config.yaml")
    log = log or str(run / "train.log")
    (run / "status.json").write_text(json.dumps({"state": state, "stage": "train", "log": log,
                                                 "updated": "2024-06-01T12:00:00"}))
    if summary is not None:
        (run / "metrics.json").write_text(json.dumps({
            "entry": entry, "seed": seed, "summary": summary, "final": {"step": 7000},
            "best_on_val": {"summary": best or {}, "step": 3500}, "env": ENV}))
    return run


@pytest.fixture
def work(tmp_path):
    work = tmp_path / "runs"
    for seed, summary in DONE.items():
        write_run(work, "table1/depthg-vits8", seed, "done", summary, BEST[seed])
    write_run(work, "table1/depthg-vits8", 2, "running")
    write_run(work, "table1/stego-vits8", 0, "failed", log="logs/stego-seed0.log")
    # table1/dino-vits8 has no run directory: pending
    return work


def expected(metric, source=DONE):
    values = [source[s][metric] for s in sorted(source)]
    mean, std = statistics.fmean(values), statistics.stdev(values)
    return f"{mean:.1f} ± {std:.1f}", f"{mean - PAPER[metric]:+.1f}", mean


def row(text, entry, fidelity="paper", nth=0, variant=None):
    start = f"| `{entry}` [{variant}] | {fidelity} |" if variant else f"| `{entry}` | {fidelity} |"
    return [line for line in text.splitlines() if line.startswith(start)][nth]


def test_collect_runs_reads_states_per_fidelity(work):
    runs = collect_runs(work, "table1/depthg-vits8", "paper")
    assert [(r.seed, r.state) for r in runs] == [(0, "done"), (1, "done"), (2, "running")]
    assert runs[1].summary == DONE[1] and runs[1].best == BEST[1] and runs[0].env == ENV
    assert runs[0].config == config_hash(load_entry("table1/depthg-vits8")) and runs[0].diff == {}
    assert [r.state for r in collect_runs(work, "table1/stego-vits8", "paper")] == ["failed"]
    assert collect_runs(work, "table1/dino-vits8", "paper") == []
    assert collect_runs(work, "table1/depthg-vits8", "released") == []
    write_run(work, "table1/depthg-vits8", 0, "done", DONE[0], fidelity="released")
    (released,) = collect_runs(work, "table1/depthg-vits8", "released")
    assert released.config == config_hash(load_entry("table1/depthg-vits8", ["fidelity=released"])) != runs[0].config


def test_render_mean_std_delta_status_and_fidelity_rows(work, tmp_path):
    out = render_results(work, tmp_path / "RESULTS.md", tables=["table1"])
    text = out.read_text()
    final = row(text, "table1/depthg-vits8")
    for metric in PAPER:
        mean_std, delta, _ = expected(metric)
        assert f"| {PAPER[metric]:.1f} | – | {mean_std} | {delta} |" in final, (metric, final)
    assert final.endswith("| 2 | 2 done, 1 running | – |")
    assert row(text, "table1/depthg-vits8", "released").endswith("| 0 | pending | – |")  # every entry, both profiles
    assert "1 failed (seed0: `logs/stego-seed0.log`)" in row(text, "table1/stego-vits8")
    assert row(text, "table1/dino-vits8").endswith("| 0 | pending | – |") and "| 28.7 | – | – | – |" in row(
        text, "table1/dino-vits8")
    assert "Best on val (paper-style selection)" in text and "U. Acc best on val" in text
    best = row(text, "table1/depthg-vits8", nth=1)
    mean_std, delta, _ = expected("unsup_acc", BEST)
    assert f"| 56.3 | {mean_std} | {delta} |" in best and "| 38.9 | – | – |" in best
    assert "## Environment" in text and "| `torch` | 2.4.1 |" in text and "| `gpu.name` | NVIDIA H100 |" in text
    assert "| `git_sha` | 0123abcd |" in text and "| runs | 2 |" in text and "| distinct hosts | 1 |" in text
    assert "node1" not in text  # hosts are told apart, never named
    assert "- env 1: table1/depthg-vits8 paper seed0, table1/depthg-vits8 paper seed1" in text
    assert "<!-- repro:begin table1 -->" in text and "<!-- repro:begin table2 -->" not in text
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_seeds_run_with_different_overrides_are_not_averaged(tmp_path):
    """Attack: seeds with different --set overrides were averaged into one row and into the record."""
    work = tmp_path / "runs"
    write_run(work, "table1/depthg-vits8", 0, "done", numbers(50.0))
    write_run(work, "table1/depthg-vits8", 1, "done", numbers(30.0), overrides=["loss.b_knn=0.1"])
    write_run(work, "table1/depthg-vits8", 2, "done", numbers(32.0), overrides=["loss.b_knn=0.1"])
    write_run(work, "table1/depthg-vits8", 3, "done", numbers(99.0), config=False)
    out = render_results(work, tmp_path / "RESULTS.md", tables=["table1"])
    text = out.read_text()
    assert "| 56.3 | – | 50.0 | -6.3 |" in row(text, "table1/depthg-vits8") and "| 1 | 1 done |" in row(
        text, "table1/depthg-vits8")
    variant = row(text, "table1/depthg-vits8", variant="loss.b_knn=0.1")
    assert "| 56.3 | – | 31.0 ± 1.4 | -25.3 |" in variant and "| 2 | 2 done |" in variant
    assert "| 99.0 |" in row(text, "table1/depthg-vits8", variant="config.yaml missing")
    record = read_results(out)["entries"]["table1/depthg-vits8"]
    main = record["fidelities"]["paper"]
    assert main["metrics"]["unsup_acc"] == {"mean": 50.0, "std": None, "n": 1} and list(main["seeds"]) == ["0"]
    assert main["config"] == config_hash(load_entry("table1/depthg-vits8"))
    labels = {v["label"]: v for v in record["variants"]}
    assert labels["loss.b_knn=0.1"]["metrics"]["unsup_acc"]["n"] == 2
    assert labels["loss.b_knn=0.1"]["config"] == config_hash(load_entry("table1/depthg-vits8", ["loss.b_knn=0.1"]))
    assert check_against(read_results(out), "table1/depthg-vits8", numbers(50.2)) == []


def test_recorded_numbers_survive_a_work_dir_without_the_run(work, tmp_path):
    """Attack: compare over a work dir without a run turned its recorded numbers into 'pending'."""
    out = render_results(work, tmp_path / "RESULTS.md", tables=["table1"])
    before = read_results(out)["entries"]["table1/depthg-vits8"]["fidelities"]["paper"]
    render_results(tmp_path / "empty", out, tables=["table1"])
    after = read_results(out)["entries"]["table1/depthg-vits8"]["fidelities"]["paper"]
    assert after["metrics"] == before["metrics"] and after["seeds"] == before["seeds"]
    assert after["status"] == "2 recorded" and row(out.read_text(), "table1/depthg-vits8").endswith(
        "| 2 | 2 recorded | – |")
    assert "- env 1: table1/depthg-vits8 paper seed0, table1/depthg-vits8 paper seed1" in out.read_text()
    # a later work dir with seed 0 rerun and seed 2 new: seed 0 replaced, seed 1 kept, seed 2 added
    later = tmp_path / "later"
    write_run(later, "table1/depthg-vits8", 0, "done", numbers(60.0))
    write_run(later, "table1/depthg-vits8", 2, "done", numbers(61.0))
    render_results(later, out, tables=["table1"])
    merged = read_results(out)["entries"]["table1/depthg-vits8"]["fidelities"]["paper"]
    assert sorted(merged["seeds"]) == ["0", "1", "2"] and merged["status"] == "2 done, 1 recorded"
    assert merged["metrics"]["unsup_acc"]["mean"] == pytest.approx(statistics.fmean([60.0, DONE[1]["unsup_acc"], 61.0]))


def test_the_demo_record_of_this_repository_survives_and_still_checks(tmp_path):
    out = shutil.copy(REPO / "RESULTS.md", tmp_path / "RESULTS.md")
    recorded = read_results(out)["entries"]["demo/nyuv2-mini"]["fidelities"]["paper"]
    means = {m: s["mean"] for m, s in recorded["metrics"].items()}
    assert set(means) == {"unsup_acc", "unsup_miou", "linear_acc", "linear_miou"}
    render_results(tmp_path / "no-runs-here", out)
    again = read_results(out)["entries"]["demo/nyuv2-mini"]["fidelities"]["paper"]
    assert again["metrics"] == recorded["metrics"] and again["config"] == recorded["config"]
    demo = load_entry("demo/nyuv2-mini")
    assert check_against(read_results(out), "demo/nyuv2-mini", means, config_hash=config_hash(demo)) == []
    assert f"| – | {means['unsup_acc']:.1f} |" in row(out.read_text(), "demo/nyuv2-mini")


def test_released_checkpoint_column(work, tmp_path):
    folder = work / "table1/depthg-vits8/released-checkpoint"
    folder.mkdir(parents=True)
    sha = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    (folder / "metrics.json").write_text(json.dumps({"summary": {"unsup_acc": 56.1, "unsup_miou": 25.2, "linear_acc":
                                                                 73.9, "linear_miou": 38.7},
                                                     "checkpoint": {"file": "cocostuff27_vit_base_5.ckpt", "sha256": sha}}))
    out = render_results(work, tmp_path / "RESULTS.md", tables=["table1"])
    text = out.read_text()
    assert "U. Acc released ckpt" in text
    for fid in ("paper", "released"):
        line = row(text, "table1/depthg-vits8", fid)
        assert "| 56.3 | 56.1 |" in line and "| 38.9 | 38.7 |" in line and line.endswith(f"| `{sha[:12]}` (n = 1) |")
    assert row(text, "table1/stego-vits8").endswith("| – |") and "| 48.3 | – |" in row(text, "table1/stego-vits8")
    shutil.rmtree(folder)
    render_results(work, out, tables=["table1"])  # not in this work dir any more: the recorded value stays
    assert read_results(out)["entries"]["table1/depthg-vits8"]["released_checkpoint"]["sha256"] == sha


def test_registered_config_change_moves_the_record_to_a_variant(work, tmp_path):
    out = render_results(work, tmp_path / "RESULTS.md", tables=["table1"])
    text = out.read_text()
    current = config_hash(load_entry("table1/depthg-vits8"))
    out.write_text(text.replace(current, "0123456789ab"))  # as if the runs had used an older registered config
    render_results(tmp_path / "empty", out, tables=["table1"])
    record = read_results(out)["entries"]["table1/depthg-vits8"]
    assert record["fidelities"]["paper"]["metrics"]["unsup_acc"]["n"] == 0
    (variant,) = record["variants"]
    assert variant["config"] == "0123456789ab" and "registered entry changed" in variant["label"]
    assert variant["metrics"]["unsup_acc"]["n"] == 2


def test_hand_written_text_and_tolerances_survive_regeneration(work, tmp_path):
    out = tmp_path / "RESULTS.md"
    render_results(work, out, tables=["table1"])
    text = out.read_text()
    text = "Intro written by hand.\n\n" + text.replace("<!-- repro:begin env -->",
                                                       "Note between blocks.\n\n<!-- repro:begin env -->")
    text = text.replace('"table1/depthg-vits8": {"table": "table1", "tolerance": 1.0',
                        '"table1/depthg-vits8": {"table": "table1", "tolerance": {"unsup_acc": 0.5}')
    out.write_text(text + "\nClosing remark by hand.\n")
    write_run(work, "table1/depthg-vits8", 2, "done", numbers(60.0))  # seed 2 finishes
    render_results(work, out, tables=["table1"], tolerance=3.0)
    render_results(work, out, tables=["table1"], tolerance=3.0)
    text = out.read_text()
    for note in ("Intro written by hand.", "Note between blocks.", "Closing remark by hand."):
        assert text.count(note) == 1
    assert text.index("Intro written by hand.") < text.index("<!-- repro:begin table1 -->")
    assert text.index("<!-- repro:end table1 -->") < text.index("Note between blocks.") < text.index(
        "<!-- repro:begin env -->")
    assert text.rstrip().endswith("Closing remark by hand.")
    assert text.count("<!-- repro:begin table1 -->") == text.count("<!-- repro:end json -->") == 1
    acc = statistics.fmean([DONE[0]["unsup_acc"], DONE[1]["unsup_acc"], 60.0])
    assert f"| 56.3 | – | {acc:.1f} ± " in row(text, "table1/depthg-vits8")
    assert row(text, "table1/depthg-vits8").endswith("| 3 | 3 done | – |")
    entries = read_results(out)["entries"]
    tolerances = {name: entries[name]["tolerance"] for name in ("table1/depthg-vits8", "table1/dino-vits8")}
    assert tolerances == {"table1/depthg-vits8": {"unsup_acc": 0.5}, "table1/dino-vits8": 1.0}


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("<!-- repro:end table1 -->", ""), "block 'table1' has no end marker"),
    (lambda t: t.replace("<!-- repro:begin env -->", ""), "end marker without its begin marker"),
    (lambda t: t[:t.index("<!-- repro:begin json -->")] + t[t.index("<!-- repro:end json -->") + 23:],
     "'json' block is missing"),
    (lambda t: t.replace("<!-- repro:end json -->", ""), "block 'json' has no end marker"),
    (lambda t: t + "\n<!-- repro:begin table1 -->\nold\n<!-- repro:end table1 -->\n", "appears twice"),
])
def test_hand_broken_markers_are_an_error_and_leave_the_file_untouched(work, tmp_path, edit, message):
    """Attack: a deleted end marker duplicated the block; a deleted JSON block reset the tolerances."""
    out = render_results(work, tmp_path / "RESULTS.md", tables=["table1"], tolerance=2.5)
    broken = edit(out.read_text())
    out.write_text(broken)
    with pytest.raises(ValueError, match=message) as info:
        render_results(work, out, tables=["table1"])
    assert "the file was not changed" in str(info.value) and str(out) in str(info.value)
    assert out.read_text() == broken and sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md", "runs"]


def test_missing_blocks_are_inserted_in_table_order(work, tmp_path):
    out = tmp_path / "RESULTS.md"
    render_results(work, out, tables=["table3"])
    render_results(work, out, tables=["table1"])
    text = out.read_text()
    order = [text.index(f"<!-- repro:begin {n} -->") for n in ("table1", "table3", "env", "json")]
    assert order == sorted(order)
    entries = read_results(out)["entries"]
    assert "table3/depthg-vits8" in entries and "table1/depthg-vits8" in entries  # merged, not replaced


def test_check_against_fails_on_nan_missing_and_other_configs(work, tmp_path):
    results = read_results(render_results(work, tmp_path / "RESULTS.md", tables=["table1"], tolerance=1.0))
    means = {m: s["mean"] for m, s in results["entries"]["table1/depthg-vits8"]["fidelities"]["paper"]["metrics"].items()}
    assert check_against(results, "table1/depthg-vits8", {m: v + 0.9 for m, v in means.items()}) == []
    failures = check_against(results, "table1/depthg-vits8", {**means, "unsup_acc": means["unsup_acc"] - 1.5})
    assert len(failures) == 1 and "unsup_acc" in failures[0] and "-1.50" in failures[0]
    nan = check_against(results, "table1/depthg-vits8", {**means, "unsup_miou": float("nan")})  # attack: NaN passed
    assert len(nan) == 1 and "unsup_miou = nan" in nan[0]
    missing = {k: v for k, v in means.items() if k != "linear_miou"}
    assert ["linear_miou" in f for f in check_against(results, "table1/depthg-vits8", missing)] == [True]
    assert "no recorded numbers" in check_against(results, "demo/unknown", means)[0]
    assert "nothing recorded yet" in check_against(results, "table1/dino-vits8", means)[0]
    assert "nothing recorded yet" in check_against(results, "table1/depthg-vits8", means, fidelity="released")[0]
    other = check_against(results, "table1/depthg-vits8", means, config_hash="ffffffffffff")
    assert len(other) == 1 and "not comparable" in other[0]
    results["entries"]["table1/depthg-vits8"]["tolerance"] = {"unsup_acc": 0.1, "unsup_miou": 5, "linear_acc": 5,
                                                              "linear_miou": 5}
    assert ["unsup_acc" in f for f in check_against(results, "table1/depthg-vits8",
                                                     {m: v + 0.9 for m, v in means.items()})] == [True]


def test_nan_metrics_make_a_failed_run_and_a_valid_record(tmp_path):
    work = tmp_path / "runs"
    write_run(work, "table1/depthg-vits8", 0, "done", {**numbers(50.0), "unsup_miou": float("nan")})
    out = render_results(work, tmp_path / "RESULTS.md", tables=["table1"])
    assert "1 failed (seed0: " in row(out.read_text(), "table1/depthg-vits8") and "non-finite unsup_miou" in out.read_text()
    assert read_results(out)["entries"]["table1/depthg-vits8"]["fidelities"]["paper"]["seeds"] == {}


def test_compare_command(work, tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="repro")
    add_compare_command(parser.add_subparsers(dest="command"))
    out = tmp_path / "R.md"
    monkeypatch.setenv("REPRO_WORK", str(work))
    args = parser.parse_args(["compare", "--out", str(out), "--tables", "table1", "supp6"])
    assert args.func(args) == 0 and "wrote" in capsys.readouterr().out
    text = out.read_text()
    assert "<!-- repro:begin supp6 -->" in text and "2 done, 1 running" in text
    args = parser.parse_args(["compare", "--work-dir", str(tmp_path / "nowhere"), "--out", str(out)])
    assert args.func(args) == 0 and "recorded numbers kept" in capsys.readouterr().out
    text = out.read_text()
    assert text.count("<!-- repro:begin ") == len(TABLES) + 2  # every table, env, json
    assert row(text, "table1/depthg-vits8").endswith("| 2 | 2 recorded | – |")
    assert row(text, "table1/dino-vits8").endswith("| 0 | pending | – |")


def test_environment_groups_ignore_per_run_keys(work, tmp_path):
    run = write_run(work, "table3/depthg-vits8", 0, "done", numbers(79.0))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["env"] = {**ENV, "hostname": "node2", "slurm_job_id": "77"}
    (run / "metrics.json").write_text(json.dumps(metrics))
    run = write_run(work, "table3/depthg-vits8", 1, "done", numbers(80.0))
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["env"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "env.json").write_text(json.dumps({**ENV, "torch": "2.5.0"}))  # env.json when metrics has no env
    text = render_results(work, tmp_path / "RESULTS.md", tables=["table1", "table3"]).read_text()
    assert "| runs | 3 | 1 |" in text and "| distinct hosts | 2 | 1 |" in text
    assert "| `torch` | 2.4.1 | 2.5.0 |" in text and "slurm_job_id" not in text
    assert "- env 2: table3/depthg-vits8 paper seed1" in text


def test_check_results_fails_on_a_nan_fresh_run(tmp_path, monkeypatch):
    """Attack: `check-results` passed when the fresh run's metrics were NaN."""
    import repro.run
    from repro.regression import ENTRY, check_results

    out = shutil.copy(REPO / "RESULTS.md", tmp_path / "RESULTS.md")
    recorded = read_results(out)["entries"][ENTRY]["fidelities"]["paper"]["metrics"]

    def fresh_run(entry, *, work_dir, quiet, overrides):  # what run_entry leaves, with a NaN metric
        run = Path(work_dir) / entry / "paper" / "seed0"
        run.mkdir(parents=True)
        save_config(repro.run.resolve_entry(entry, overrides=overrides), run / "config.yaml")
        summary = {m: s["mean"] for m, s in recorded.items()}
        (run / "metrics.json").write_text(json.dumps({"summary": {**summary, "unsup_miou": float("nan")}}))
        return run

    monkeypatch.setattr(repro.run, "run_entry", fresh_run)
    summary, failures = check_results(out, tmp_path / "data", work_dir=tmp_path / "w", checkpoint=tmp_path / "ckpt.pth")
    assert failures == [f"{ENTRY}: unsup_miou = nan in the fresh run (recorded {recorded['unsup_miou']['mean']:.2f})"]
