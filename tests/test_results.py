"""``repro compare``: RESULTS.md from fake run directories, marker-preserving regeneration, JSON round trip."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest

from repro.config import TABLES
from repro.results import add_compare_command, check_against, collect_runs, read_results, render_results

DONE = {  # table1/depthg-vits8, paper 56.3 / 25.6 / 73.7 / 38.9
    0: {"unsup_acc": 55.12, "unsup_miou": 24.93, "linear_acc": 73.05, "linear_miou": 38.44},
    1: {"unsup_acc": 57.48, "unsup_miou": 26.01, "linear_acc": 74.11, "linear_miou": 39.02},
}
BEST = {0: {"unsup_acc": 58.0, "unsup_miou": 26.5}, 1: {"unsup_acc": 59.1, "unsup_miou": 27.3}}
PAPER = {"unsup_acc": 56.3, "unsup_miou": 25.6, "linear_acc": 73.7, "linear_miou": 38.9}
ENV = {"python": "3.11.9", "torch": "2.4.1", "git_sha": "0123abcd", "gpu": {"name": "NVIDIA H100", "count": 1}, "hostname": "node1"}


def write_run(work, entry, seed, state, summary=None, best=None, log=None):
    run = work / entry / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
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


def row(text, entry, nth=0):
    return [line for line in text.splitlines() if line.startswith(f"| `{entry}` |")][nth]


def test_collect_runs_reads_states(work):
    runs = collect_runs(work, "table1/depthg-vits8")
    assert [(r.seed, r.state) for r in runs] == [(0, "done"), (1, "done"), (2, "running")]
    assert runs[1].summary == DONE[1] and runs[1].best == BEST[1] and runs[0].env == ENV
    assert [r.state for r in collect_runs(work, "table1/stego-vits8")] == ["failed"]
    assert collect_runs(work, "table1/dino-vits8") == []


def test_render_mean_std_delta_and_status(work, tmp_path):
    out = render_results(work, tmp_path / "RESULTS.md", tables=["table1"])
    text = out.read_text()
    final = row(text, "table1/depthg-vits8")
    for metric in PAPER:
        mean_std, delta, _ = expected(metric)
        assert f"| {PAPER[metric]:.1f} | {mean_std} | {delta} |" in final, (metric, final)
    assert final.endswith("| 2 | 2 done, 1 running |")
    assert "1 failed (seed0: `logs/stego-seed0.log`)" in row(text, "table1/stego-vits8")
    assert row(text, "table1/dino-vits8").endswith("| 0 | pending |")
    assert "| 28.7 | – | – |" in row(text, "table1/dino-vits8")
    # best on val: separate, labelled table
    assert "Best on val (paper-style selection)" in text and "U. Acc best on val" in text
    best = row(text, "table1/depthg-vits8", nth=1)
    mean_std, delta, _ = expected("unsup_acc", BEST)
    assert f"| 56.3 | {mean_std} | {delta} |" in best
    assert "| 38.9 | – | – |" in best  # no best-on-val linear numbers in the fixture
    # environment section
    assert "## Environment" in text and "| `torch` | 2.4.1 |" in text and "| `gpu.name` | NVIDIA H100 |" in text
    assert "| `git_sha` | 0123abcd |" in text and "| runs | 2 |" in text and "| hosts | node1 |" in text
    assert "- env 1: table1/depthg-vits8 seed0, table1/depthg-vits8 seed1" in text
    assert "<!-- repro:begin table1 -->" in text and "<!-- repro:begin table2 -->" not in text
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_hand_written_text_survives_two_regenerations(work, tmp_path):
    out = tmp_path / "RESULTS.md"
    render_results(work, out, tables=["table1"])
    text = out.read_text()
    text = "Intro written by hand.\n\n" + text.replace("<!-- repro:begin env -->",
                                                       "Note between blocks.\n\n<!-- repro:begin env -->")
    out.write_text(text + "\nClosing remark by hand.\n")
    write_run(work, "table1/depthg-vits8", 2, "done", {"unsup_acc": 60.0}, {})  # seed 2 finishes
    render_results(work, out, tables=["table1"])
    render_results(work, out, tables=["table1"])
    text = out.read_text()
    for note in ("Intro written by hand.", "Note between blocks.", "Closing remark by hand."):
        assert text.count(note) == 1
    assert text.index("Intro written by hand.") < text.index("<!-- repro:begin table1 -->")
    assert text.index("<!-- repro:end table1 -->") < text.index("Note between blocks.") < text.index(
        "<!-- repro:begin env -->")
    assert text.rstrip().endswith("Closing remark by hand.")
    assert text.count("<!-- repro:begin table1 -->") == text.count("<!-- repro:end json -->") == 1
    acc = statistics.fmean([DONE[0]["unsup_acc"], DONE[1]["unsup_acc"], 60.0])
    assert f"| 56.3 | {acc:.1f} ± " in row(text, "table1/depthg-vits8")
    assert row(text, "table1/depthg-vits8").endswith("| 3 | 3 done |")


def test_missing_blocks_are_inserted_in_table_order(work, tmp_path):
    out = tmp_path / "RESULTS.md"
    render_results(work, out, tables=["table3"])
    render_results(work, out, tables=["table1"])
    text = out.read_text()
    order = [text.index(f"<!-- repro:begin {n} -->") for n in ("table1", "table3", "env", "json")]
    assert order == sorted(order)
    entries = read_results(out)["entries"]
    assert "table3/depthg-vits8" in entries and "table1/depthg-vits8" in entries  # merged, not replaced


def test_read_results_round_trips_and_keeps_recorded_tolerance(work, tmp_path):
    out = render_results(work, tmp_path / "RESULTS.md", tables=["table1", "demo"], tolerance=1.0)
    results = read_results(out)
    rec = results["entries"]["table1/depthg-vits8"]
    _, _, mean = expected("unsup_miou")
    assert rec["metrics"]["unsup_miou"]["mean"] == pytest.approx(mean, abs=1e-4)
    assert rec["metrics"]["unsup_miou"]["std"] == pytest.approx(statistics.stdev([24.93, 26.01]), abs=1e-4)
    assert rec["metrics"]["unsup_miou"]["n"] == 2 and rec["metrics"]["unsup_miou"]["paper"] == 25.6
    assert rec["best_on_val"]["unsup_acc"]["n"] == 2 and rec["tolerance"] == 1.0 and rec["table"] == "table1"
    pending = results["entries"]["table1/dino-vits8"]["metrics"]["unsup_acc"]
    assert pending == {"mean": None, "std": None, "n": 0, "paper": 28.7}
    assert results["entries"]["demo/nyuv2-mini"]["tolerance"] == 1.0
    # a tolerance edited in the file wins over the default on regeneration
    out.write_text(out.read_text().replace('"tolerance": 1.0', '"tolerance": 2.5'))
    render_results(work, out, tables=["table1"], tolerance=0.3)
    assert read_results(out)["entries"]["table1/depthg-vits8"]["tolerance"] == 2.5
    (tmp_path / "plain.md").write_text("# nothing generated here\n")
    with pytest.raises(ValueError, match="no machine-readable block"):
        read_results(tmp_path / "plain.md")


def test_check_against_flags_metrics_outside_tolerance(work, tmp_path):
    results = read_results(render_results(work, tmp_path / "RESULTS.md", tables=["table1"], tolerance=1.0))
    means = {m: s["mean"] for m, s in results["entries"]["table1/depthg-vits8"]["metrics"].items()}
    assert check_against(results, "table1/depthg-vits8", {m: v + 0.9 for m, v in means.items()}) == []
    fresh = {**means, "unsup_acc": means["unsup_acc"] - 1.5}
    failures = check_against(results, "table1/depthg-vits8", fresh)
    assert len(failures) == 1 and "unsup_acc" in failures[0] and "-1.50" in failures[0]
    missing = {k: v for k, v in means.items() if k != "linear_miou"}
    assert ["linear_miou" in f for f in check_against(results, "table1/depthg-vits8", missing)] == [True]
    assert "no recorded numbers" in check_against(results, "demo/unknown", means)[0]
    assert "nothing recorded yet" in check_against(results, "table1/dino-vits8", means)[0]


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
    assert args.func(args) == 0 and "all pending" in capsys.readouterr().out
    text = out.read_text()
    assert text.count("<!-- repro:begin ") == len(TABLES) + 2  # every table, env, json
    assert row(text, "table1/depthg-vits8").endswith("| 0 | pending |")


def test_environment_groups_ignore_per_run_keys(work, tmp_path):
    run = write_run(work, "table3/depthg-vits8", 0, "done", {"unsup_acc": 79.0})
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["env"] = {**ENV, "hostname": "node2", "slurm_job_id": "77"}
    (run / "metrics.json").write_text(json.dumps(metrics))
    run = write_run(work, "table3/depthg-vits8", 1, "done", {"unsup_acc": 80.0})
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["env"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "env.json").write_text(json.dumps({**ENV, "torch": "2.5.0"}))  # env.json when metrics has no env
    text = render_results(work, tmp_path / "RESULTS.md", tables=["table1", "table3"]).read_text()
    assert "| runs | 3 | 1 |" in text and "| hosts | node1, node2 | node1 |" in text
    assert "| `torch` | 2.4.1 | 2.5.0 |" in text and "slurm_job_id" not in text
    assert "- env 2: table3/depthg-vits8 seed1" in text
