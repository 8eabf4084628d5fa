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
from repro.config.entries import load_entry
from repro.config.identity import config_hash
from repro.cli.results import add_compare_command
from repro.results.compare import collect_runs, render_results
from repro.results.document import check_against, read_results
from results_runs import ENV, numbers, write_checkpoint_score, write_run

REPO = Path(__file__).resolve().parents[1]
DONE = {  # table1/depthg-vits8, paper 56.3 / 25.6 / 73.7 / 38.9
    0: {"unsup_acc": 55.12, "unsup_miou": 24.93, "linear_acc": 73.05, "linear_miou": 38.44},
    1: {"unsup_acc": 57.48, "unsup_miou": 26.01, "linear_acc": 74.11, "linear_miou": 39.02},
}
BEST = {0: {"unsup_acc": 58.0, "unsup_miou": 26.5}, 1: {"unsup_acc": 59.1, "unsup_miou": 27.3}}
PAPER = {"unsup_acc": 56.3, "unsup_miou": 25.6, "linear_acc": 73.7, "linear_miou": 38.9}


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
    return f"{mean:.1f} ± {std:.1f} ({len(values)})", f"Δ {mean - PAPER[metric]:+.1f}", mean


def block(text, name):
    return text[text.index(f"<!-- repro:begin {name} -->"):text.index(f"<!-- repro:end {name} -->")]


def row(text, entry, fidelity="paper", nth=0, name=None):
    """The nth table row of ``entry`` and ``fidelity`` (in block ``name`` only, when given)."""
    text = block(text, name) if name else text
    return [line for line in text.splitlines() if line.startswith(f"| `{entry}`")
            and f" | {fidelity} |" in line][nth]


def test_collect_runs_reads_states_per_fidelity(work):
    runs = collect_runs(work, "table1/depthg-vits8", "paper")
    assert [(r.seed, r.state) for r in runs] == [(0, "done"), (1, "done"), (2, "running")]
    assert runs[1].summary == DONE[1] and runs[1].best == BEST[1] and runs[0].env == ENV
    assert runs[0].config == config_hash(load_entry("table1/depthg-vits8")) and runs[0].diff == {}
    assert runs[0].resources == {"world_size": 1, "batch_size": 32, "accelerator": "NVIDIA H100 80GB HBM3",
                                 "accelerator_count": 1, "wall_s": 7200.0, "accelerator_s": 7200.0}
    assert [r.state for r in collect_runs(work, "table1/stego-vits8", "paper")] == ["failed"]
    assert collect_runs(work, "table1/dino-vits8", "paper") == []
    assert collect_runs(work, "table1/depthg-vits8", "released") == []
    write_run(work, "table1/depthg-vits8", 0, "done", DONE[0], fidelity="released")
    (released,) = collect_runs(work, "table1/depthg-vits8", "released")
    assert released.config == config_hash(load_entry("table1/depthg-vits8", ["fidelity=released"])) != runs[0].config


def test_render_compact_cells_status_and_fidelity_rows(work, tmp_path):
    out = render_results(work, tmp_path / "RESULTS.md", tables=["table1"])
    text = out.read_text()
    final = row(text, "table1/depthg-vits8")
    assert final.startswith("| `table1/depthg-vits8` (+ Ours, ViT-S/8) | paper |")
    for metric in PAPER:
        mean_std, delta, _ = expected(metric)
        assert f"| {PAPER[metric]:.1f} · – · {mean_std} · {delta} |" in final, (metric, final)
    assert final.endswith("| 2 done, 1 running |")
    table1 = block(text, "table1")
    header = next(line for line in table1.splitlines() if line.startswith("| entry |"))
    assert header == "| entry | fidelity | U. Acc | U. mIoU | L. Acc | L. mIoU | status |"  # 7 columns
    assert "paper · released checkpoint · reproduced mean ± std (n) · Δ" in table1  # the legend of the fixed form
    assert row(text, "table1/depthg-vits8", "released").endswith("| 56.3 · – · – · – | 25.6 · – · – · – | "
                                                                 "73.7 · – · – · – | 38.9 · – · – · – | pending |")
    assert "1 failed (see below)" in row(text, "table1/stego-vits8")
    assert "- `table1/stego-vits8` paper seed 0 failed: run folder `table1/stego-vits8/paper/seed0`" in text
    assert "log `logs/stego-seed0.log`" in text
    assert row(text, "table1/dino-vits8").endswith("| 28.7 · – · – · – | 11.3 · – · – · – | 68.6 · – · – · – | "
                                                   "33.9 · – · – · – | pending |")
    # rows in the paper's order: DINO, STEGO, + Ours, + Ours w/ 3D-LHP (ViT-S), then ViT-B
    order = [table1.index(f"| `table1/{n}`") for n in ("dino-vits8", "stego-vits8", "depthg-vits8",
                                                        "depthg-lhp-vits8", "dino-vitb8")]
    assert order == sorted(order)
    assert "Best on val (paper-style selection" in text
    best = row(text, "table1/depthg-vits8", nth=1)
    mean_std, delta, _ = expected("unsup_acc", BEST)
    assert best == f"| `table1/depthg-vits8` | paper | {mean_std} · {delta} | " + \
        f"{expected('unsup_miou', BEST)[0]} · {expected('unsup_miou', BEST)[1]} | – · – | – · – |"
    assert "## Environment" in text and "| `packages.torch` | 2.4.1 |" in text
    assert "| `devices` | [\"NVIDIA H100 80GB HBM3\"] |" in text
    assert "| `git_sha` | 0123abcd |" in text and "| runs | 2 |" in text and "| distinct hosts | 1 |" in text
    assert "node1" not in text  # hosts are told apart, never named
    assert "- env 1: table1/depthg-vits8 paper seed0, table1/depthg-vits8 paper seed1" in text
    assert "<!-- repro:begin table1 -->" in text and "<!-- repro:begin table2 -->" not in text
    assert "![table1: " in text and "](results/figures/table1.png)" in text
    assert (tmp_path / "results" / "figures" / "table1.png").is_file()
    assert (tmp_path / "results" / "model-index.yml").is_file()
    assert not [p for p in out.parent.rglob("*") if ".tmp" in p.name]


def test_seeds_run_with_different_overrides_are_not_averaged_nor_in_a_table_row(tmp_path):
    """Attack: seeds with different --set overrides were averaged into one row and into the record."""
    work = tmp_path / "runs"
    write_run(work, "table1/depthg-vits8", 0, "done", numbers(50.0))
    write_run(work, "table1/depthg-vits8", 1, "done", numbers(30.0), overrides=["loss.b_knn=0.1"])
    write_run(work, "table1/depthg-vits8", 2, "done", numbers(32.0), overrides=["loss.b_knn=0.1"])
    write_run(work, "table1/depthg-vits8", 3, "done", numbers(99.0), config=False)
    out = render_results(work, tmp_path / "RESULTS.md", tables=["table1"])
    text = out.read_text()
    assert "| 56.3 · – · 50.0 (1) · Δ -6.3 |" in row(text, "table1/depthg-vits8") and row(
        text, "table1/depthg-vits8").endswith("| 1 done |")
    table1 = block(text, "table1")
    assert "31.0" not in table1 and "99.0" not in table1 and "b_knn" not in table1  # override runs: no table row
    assert [line for line in table1.splitlines() if line.startswith("| `table1/depthg-vits8`")
            and " | paper |" in line] == [row(text, "table1/depthg-vits8")]  # one row (no best-on-val numbers)
    overrides = block(text, "overrides")
    variant = next(line for line in overrides.splitlines() if "loss.b_knn=0.1" in line)
    assert variant.startswith("| `table1/depthg-vits8` | paper | loss.b_knn=0.1 | 31.0 ± 1.4 (2) |")
    assert variant.endswith("| 2 done |")
    assert "| config.yaml missing | 99.0 (1) |" in overrides
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
    first = out.read_text()
    before = read_results(out)["entries"]["table1/depthg-vits8"]["fidelities"]["paper"]
    render_results(tmp_path / "empty", out, tables=["table1"])
    after = read_results(out)["entries"]["table1/depthg-vits8"]["fidelities"]["paper"]
    assert after == before and after["status"] == "2 done, 1 running"
    assert out.read_text() == first  # the file renders from its record alone: nothing read, nothing changed
    assert "- env 1: table1/depthg-vits8 paper seed0, table1/depthg-vits8 paper seed1" in out.read_text()
    # a later work dir with seed 0 rerun and seed 2 new: seed 0 replaced, seed 1 kept, seed 2 added
    later = tmp_path / "later"
    write_run(later, "table1/depthg-vits8", 0, "done", numbers(60.0))
    write_run(later, "table1/depthg-vits8", 2, "done", numbers(61.0))
    render_results(later, out, tables=["table1"])
    merged = read_results(out)["entries"]["table1/depthg-vits8"]["fidelities"]["paper"]
    assert sorted(merged["seeds"]) == ["0", "1", "2"] and merged["status"] == "3 done" and merged["runs"] == {}
    assert merged["metrics"]["unsup_acc"]["mean"] == pytest.approx(statistics.fmean([60.0, DONE[1]["unsup_acc"], 61.0]))


def test_the_demo_record_of_this_repository_survives_and_still_checks(tmp_path):
    out = shutil.copy(REPO / "RESULTS.md", tmp_path / "RESULTS.md")
    recorded = read_results(out)["entries"]["demo/nyuv2-mini"]["fidelities"]["paper"]
    means = {m: s["mean"] for m, s in recorded["metrics"].items()}
    assert set(means) == {"unsup_acc", "unsup_miou", "linear_acc", "linear_miou"}
    render_results(tmp_path / "no-runs-here", out, tables=["demo"])
    again = read_results(out)["entries"]["demo/nyuv2-mini"]["fidelities"]["paper"]
    assert again["metrics"] == recorded["metrics"] and again["config"] == recorded["config"]
    demo = load_entry("demo/nyuv2-mini")
    assert check_against(read_results(out), "demo/nyuv2-mini", means, config_hash=config_hash(demo)) == []
    assert f"| – · – · {means['unsup_acc']:.1f} (1) · – |" in row(out.read_text(), "demo/nyuv2-mini")


def test_released_checkpoint_part_of_each_cell(work, tmp_path):
    sha = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    write_checkpoint_score(work, "table1/depthg-vits8", {"unsup_acc": 56.1, "unsup_miou": 25.2, "linear_acc": 73.9,
                                                         "linear_miou": 38.7}, sha, "cocostuff_vits.ckpt")
    out = render_results(work, tmp_path / "RESULTS.md", tables=["table1"])
    text = out.read_text()
    for fid in ("paper", "released"):
        line = row(text, "table1/depthg-vits8", fid)
        assert "| 56.3 · 56.1 · " in line and "| 38.9 · 38.7 · " in line
    assert "| 48.3 · – · – · – |" in row(text, "table1/stego-vits8")
    shutil.rmtree(work / "table1/depthg-vits8/released-checkpoint")
    render_results(work, out, tables=["table1"])  # not in this work dir any more: the recorded value stays
    assert read_results(out)["entries"]["table1/depthg-vits8"]["released_checkpoint"]["sha256"] == sha
    assert "| 56.3 · 56.1 · " in row(out.read_text(), "table1/depthg-vits8")


def test_registered_config_change_moves_the_record_to_superseded_once(work, tmp_path):
    out = render_results(work, tmp_path / "RESULTS.md", tables=["table1"])
    text = out.read_text()
    current = config_hash(load_entry("table1/depthg-vits8"))
    out.write_text(text.replace(current, "0123456789ab"))  # as if the runs had used an older registered config
    render_results(tmp_path / "empty", out, tables=["table1"])
    results = read_results(out)
    record = results["entries"]["table1/depthg-vits8"]
    assert record["fidelities"]["paper"]["metrics"]["unsup_acc"]["n"] == 0
    assert record["fidelities"]["paper"]["config"] == current and record["variants"] == []
    (old,) = results["superseded"]
    assert (old["entry"], old["fidelity"], old["config"]) == ("table1/depthg-vits8", "paper", "0123456789ab")
    assert old["metrics"]["unsup_acc"]["n"] == 2 and "registered entry changed" in old["reason"]
    text = out.read_text()
    assert row(text, "table1/depthg-vits8").endswith("| pending |")
    line = row(text, "table1/depthg-vits8", name="superseded")
    assert "| `0123456789ab` | 2024-06-01 |" in line and f"| {expected('unsup_acc')[0]} |" in line
    once = out.read_text()
    render_results(tmp_path / "empty", out, tables=["table1"])
    assert out.read_text() == once and once.count("0123456789ab`") == 1


def test_runs_of_a_formerly_registered_config_stay_superseded(tmp_path, monkeypatch):
    """Runs made while the entry was registered with another config: after the registry changes they are
    listed once under Superseded (also when their folders are read again), never in a table or as overrides."""
    import repro.results.record as rr

    work, entry = tmp_path / "runs", "table1/depthg-vits8"
    old_hash = config_hash(load_entry(entry, ["loss.b_knn=0.1"]))
    for seed in (0, 1):
        write_run(work, entry, seed, "done", numbers(50.0 + seed), overrides=["loss.b_knn=0.1"])
    today = rr.reference_hash
    monkeypatch.setattr(rr, "reference_hash", lambda e, f: old_hash if (e, f) == (entry, "paper") else today(e, f))
    out = render_results(work, tmp_path / "RESULTS.md", tables=["table1"])  # registered then: its main rows
    assert read_results(out)["entries"][entry]["fidelities"]["paper"]["config"] == old_hash
    assert "| 56.3 · – · 50.5 ± 0.7 (2) · Δ -5.8 |" in row(out.read_text(), entry)
    monkeypatch.setattr(rr, "reference_hash", today)  # the registry changes (b_knn back to 0.02)
    for work_dir in (tmp_path / "empty", work, work):
        render_results(work_dir, out, tables=["table1"])
        results = read_results(out)
        assert [(g["config"], g["metrics"]["unsup_acc"]["n"]) for g in results["superseded"]] == [(old_hash, 2)]
        assert results["entries"][entry]["variants"] == []
        assert results["entries"][entry]["fidelities"]["paper"]["seeds"] == {}
        text = out.read_text()
        assert row(text, entry).endswith("| pending |") and text.count(f"`{old_hash}`") == 1
        assert "50.5" not in block(text, "table1") and "None recorded." in block(text, "overrides")


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
    assert f"| 56.3 · – · {acc:.1f} ± " in row(text, "table1/depthg-vits8")
    assert row(text, "table1/depthg-vits8").endswith("| 3 done |")
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
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=message) as info:
        render_results(work, out, tables=["table1"])
    assert "the file was not changed" in str(info.value) and str(out) in str(info.value)
    assert out.read_text() == broken and {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files


def test_missing_blocks_are_inserted_in_table_order(work, tmp_path):
    out = tmp_path / "RESULTS.md"
    render_results(work, out, tables=["table3"])
    render_results(work, out, tables=["table1"])
    text = out.read_text()
    order = [text.index(f"<!-- repro:begin {n} -->") for n in ("about", "table1", "table3", "overrides", "superseded",
                                                               "env", "json")]
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
    assert "1 failed (see below)" in row(out.read_text(), "table1/depthg-vits8")
    assert "non-finite final unsup_miou" in out.read_text()
    assert read_results(out)["entries"]["table1/depthg-vits8"]["fidelities"]["paper"]["seeds"] == {}


NAN_CASES = {
    "nan-final-finite-best": ({**numbers(50.0), "unsup_miou": float("nan")}, numbers(51.0), "final unsup_miou"),
    "inf-final": ({**numbers(50.0), "linear_acc": float("inf")}, numbers(51.0), "final linear_acc"),
    "nan-best-only": (numbers(50.0), {**numbers(51.0), "unsup_acc": float("nan")}, "best_on_val unsup_acc"),
}


@pytest.mark.parametrize("case", sorted(NAN_CASES))
@pytest.mark.parametrize("alone", [False, True], ids=["with-a-good-seed", "alone"])
def test_a_nan_or_infinite_seed_is_a_failed_seed_and_results_md_is_still_written(tmp_path, case, alone):
    """Issue 21: one NaN run broke `make results`: with a good seed beside it, `statistics.stdev` raised
    AttributeError ('float' object has no attribute 'numerator'); alone, the record's JSON raised
    ValueError (out of range float values). The final numbers' NaN hid behind the finite best-on-val ones."""
    final, best, what = NAN_CASES[case]
    work = tmp_path / "runs"
    if not alone:
        write_run(work, "table1/depthg-vits8", 0, "done", numbers(55.0), numbers(56.0))
    bad = write_run(work, "table1/depthg-vits8", 1, "done", final, best)
    out = render_results(work, tmp_path / "RESULTS.md", tables=["table1"])
    text = out.read_text()
    assert f"- `table1/depthg-vits8` paper seed 1 failed: run folder `table1/depthg-vits8/paper/seed1` (under the " \
           f"work dir): metrics.json: non-finite {what}" in text
    assert bad.relative_to(work).as_posix() == "table1/depthg-vits8/paper/seed1"
    group = read_results(out)["entries"]["table1/depthg-vits8"]["fidelities"]["paper"]
    assert list(group["seeds"]) == ([] if alone else ["0"]) and group["runs"]["1"]["state"] == "failed"
    assert row(text, "table1/depthg-vits8").endswith("(see below) |")
    if alone:
        assert row(text, "table1/depthg-vits8").startswith("| `table1/depthg-vits8` (+ Ours, ViT-S/8) | paper | "
                                                           "56.3 · – · – · – |")
    else:
        assert "| 56.3 · – · 55.0 (1) · Δ -1.3 |" in row(text, "table1/depthg-vits8")
    json.loads(block(text, "json").split("```json\n")[1].split("\n```")[0])  # strict JSON, no NaN token


def test_a_nan_written_into_the_record_by_hand_is_a_failed_seed(work, tmp_path):
    out = render_results(work, tmp_path / "RESULTS.md", tables=["table1"])
    text = out.read_text()
    out.write_text(text.replace('"final": {"unsup_acc": 55.12', '"final": {"unsup_acc": NaN', 1))
    render_results(tmp_path / "empty", out, tables=["table1"])
    group = read_results(out)["entries"]["table1/depthg-vits8"]["fidelities"]["paper"]
    assert list(group["seeds"]) == ["1"] and group["metrics"]["unsup_acc"] == {"mean": 57.48, "std": None, "n": 1}
    assert group["runs"]["0"]["reason"] == "recorded numbers missing or not finite: final unsup_acc"
    assert "- `table1/depthg-vits8` paper seed 0 failed: run folder `table1/depthg-vits8/paper/seed0`" in out.read_text()


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
    assert text.count("<!-- repro:begin ") == len(TABLES) + 5  # about, every table, overrides, superseded, env, json
    assert row(text, "table1/depthg-vits8").endswith("| 2 done, 1 running |")
    assert row(text, "table1/dino-vits8").endswith("| pending |")
    assert sorted(p.name for p in (tmp_path / "results" / "figures").iterdir()) == sorted(f"{k}.png" for k in TABLES)
    args = parser.parse_args(["compare", "--check", "--out", str(out)])
    assert args.func(args) == 0 and "are current" in capsys.readouterr().out
    out.write_text(text.replace("2 done, 1 running", "3 done"))
    assert args.func(args) == 1 and f"STALE {out} is stale" in capsys.readouterr().out
    args = parser.parse_args(["compare", "--record-only", "--out", str(out)])
    assert args.func(args) == 0 and "from the record only" in capsys.readouterr().out
    assert out.read_text() == text


def test_environment_groups_ignore_per_run_keys(work, tmp_path):
    run = write_run(work, "table3/depthg-vits8", 0, "done", numbers(79.0))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["env"] = {**ENV, "hostname": "node2", "slurm_job_id": "77"}
    (run / "metrics.json").write_text(json.dumps(metrics))
    run = write_run(work, "table3/depthg-vits8", 1, "done", numbers(80.0))
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["env"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    env = json.loads((run / "env.json").read_text())  # env.json when metrics has no env
    (run / "env.json").write_text(json.dumps({**env, "packages": {**ENV["packages"], "torch": "2.5.0"}}))
    text = render_results(work, tmp_path / "RESULTS.md", tables=["table1", "table3"]).read_text()
    assert "| runs | 3 | 1 |" in text and "| distinct hosts | 2 | 1 |" in text
    assert "| `packages.torch` | 2.4.1 | 2.5.0 |" in text and "slurm_job_id" not in text
    assert "backbone_checkpoint" not in block(text, "env")  # per-run: the file path names a machine
    assert "- env 2: table3/depthg-vits8 paper seed1" in text


def test_check_results_fails_on_a_nan_fresh_run(tmp_path, monkeypatch):
    """Attack: `check-results` passed when the fresh run's metrics were NaN."""
    import repro.runs.entry
    from repro.results.regression import ENTRY, check_results

    out = shutil.copy(REPO / "RESULTS.md", tmp_path / "RESULTS.md")
    recorded = read_results(out)["entries"][ENTRY]["fidelities"]["paper"]["metrics"]

    def fresh_run(entry, *, work_dir, quiet, overrides):  # what run_entry leaves, with a NaN metric
        run = Path(work_dir) / entry / "paper" / "seed0"
        run.mkdir(parents=True)
        save_config(repro.runs.entry.resolve_entry(entry, overrides=overrides), run / "config.yaml")
        summary = {m: s["mean"] for m, s in recorded.items()}
        (run / "metrics.json").write_text(json.dumps({"summary": {**summary, "unsup_miou": float("nan")}}))
        return run

    monkeypatch.setattr(repro.runs.entry, "run_entry", fresh_run)
    summary, failures = check_results(out, tmp_path / "data", work_dir=tmp_path / "w", checkpoint=tmp_path / "ckpt.pth")
    assert failures == [f"{ENTRY}: unsup_miou = nan in the fresh run (recorded {recorded['unsup_miou']['mean']:.2f})"]
