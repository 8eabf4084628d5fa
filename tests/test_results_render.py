"""RESULTS.md that cannot go stale: the committed file, model index and figures are what the record and today's
registry render; stale records listed once; smoke runs only in their pipeline-check block; the model index."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from repro.config import TABLES
from repro.config.entries import list_entries, load_entry
from repro.config.identity import config_hash
from repro.results.modelindex import validate, validate_file
from repro.results.compare import check_stale, default_outputs, render_results
from repro.results.figures import figure_digest, read_digest
from repro.results.document import read_results
from results_runs import BACKBONE_SHA, numbers, write_checkpoint_score, write_run

REPO = Path(__file__).resolve().parents[1]
ENTRY = "table1/depthg-vits8"


@pytest.fixture(scope="module")
def figs(tmp_path_factory):
    """One figures folder for the tests that do not look at figures: a figure whose numbers were drawn before is
    not drawn again (:func:`repro.results.figures.write_figure`), which keeps full regenerations quick."""
    return tmp_path_factory.mktemp("figures")


def block(text, name):
    return text[text.index(f"<!-- repro:begin {name} -->"):text.index(f"<!-- repro:end {name} -->")]


def blocks(text):
    return dict(re.findall(r"<!-- repro:begin ([\w.-]+) -->(.*?)<!-- repro:end \1 -->", text, flags=re.DOTALL))


def test_the_committed_results_model_index_and_figures_are_current():
    """CI: a registry change (or a hand edit) without `repro compare` in the same commit fails here."""
    assert check_stale(REPO / "RESULTS.md") == []
    assert validate_file(REPO / "results" / "model-index.yml") == []


def _v2_file(tmp_path: Path, seeds_for: dict[str, dict] | None = None) -> Path:
    """A RESULTS.md in the format of the previous renderer whose every group names a config hash the registry no
    longer has (what the committed file on main held: 49 entries x 2 empty groups), a retired `released` table
    block with its entries, and the demo's record under its current config."""
    demo_hash = config_hash(load_entry("demo/nyuv2-mini"))
    seeds_for = seeds_for or {}
    entries = {}
    empty = {"unsup_acc": {"mean": None, "std": None, "n": 0}}
    for name in [*list_entries(), "released/depthg-cocostuff-vits8"]:
        groups = {}
        for fid in ("paper", "released"):
            seeds = seeds_for.get(f"{name} {fid}", {})
            groups[fid] = {"config": "0ld" + name.encode().hex()[:9], "status": "pending", "metrics": empty,
                           "best_on_val": {}, "seeds": seeds}
        entries[name] = {"table": name.split("/")[0], "tolerance": 1.0, "paper": {}, "fidelities": groups,
                         "variants": [], "released_checkpoint": None}
    seed = {"final": numbers(32.1), "best_on_val": {}, "env": "e1", "host": "h1"}
    entries["demo/nyuv2-mini"]["fidelities"]["paper"] = {"config": demo_hash, "status": "1 done", "metrics": {},
                                                         "best_on_val": {}, "seeds": {"0": seed}}
    record = {"format": "repro-results/2", "envs": {"e1": {"python": "3.11.7"}}, "entries": entries}
    text = ("# Results\n\n<!-- repro:begin table1 -->\nold table\n<!-- repro:end table1 -->\n\n"
            "<!-- repro:begin released -->\n## released: a table the registry dropped\n<!-- repro:end released -->\n\n"
            "<!-- repro:begin json -->\n```json\n" + json.dumps(record) + "\n```\n<!-- repro:end json -->\n")
    out = tmp_path / "RESULTS.md"
    out.write_text(text)
    return out


def test_stale_empty_groups_add_no_rows_and_a_dropped_table_is_retired(figs, tmp_path):
    """Issue 20: `repro compare --work-dir EMPTY --out COPY_OF_RESULTS.md` added 245 rows 'recorded with config
    ... (the registered entry changed since)', each empty: groups that carried nothing were kept as variants."""
    out = _v2_file(tmp_path)
    render_results(tmp_path / "empty", out, figures=figs)
    text = out.read_text()
    assert "recorded with config" not in text and "registered entry changed" not in text
    assert "None." in block(text, "superseded") and "None recorded." in block(text, "overrides")
    for key in TABLES:
        names = list_entries(key)
        rows = [line for line in block(text, key).splitlines() if line.startswith("| `")]
        assert len(rows) == 2 * len(names), key  # one row per entry and fidelity, nothing doubled (no best on val)
    assert "<!-- repro:begin released -->" not in text and "old table" not in text
    record = read_results(out)
    assert "released/depthg-cocostuff-vits8" not in record["entries"] and record["superseded"] == []
    assert record["entries"]["demo/nyuv2-mini"]["fidelities"]["paper"]["seeds"]["0"]["final"] == numbers(32.1)
    again = out.read_text()
    render_results(tmp_path / "empty", out, figures=figs)
    assert out.read_text() == again and check_stale(out, figures=figs) == []


def test_stale_groups_with_seeds_and_retired_entries_are_listed_once_as_superseded(figs, tmp_path):
    seed = {"final": numbers(40.0), "best_on_val": {}, "env": "e1", "host": "h1", "date": "2024-05-02T10:00:00+00:00"}
    out = _v2_file(tmp_path, {f"{ENTRY} paper": {"0": seed, "1": {**seed, "final": numbers(42.0)}},
                              "released/depthg-cocostuff-vits8 released": {"3": seed}})
    render_results(None, out, figures=figs)
    text = out.read_text()
    superseded = block(text, "superseded")
    lines = [line for line in superseded.splitlines() if line.startswith("| `")]
    assert len(lines) == 2
    assert lines[0].startswith("| `released/depthg-cocostuff-vits8` | released | `0ld") and \
        "| 2024-05-02 | the entry is no longer registered | 40.0 (1) |" in lines[0]
    assert lines[1].startswith(f"| `{ENTRY}` | paper | `0ld") and \
        "| 2024-05-02 | the registered entry changed since | 41.0 ± 1.4 (2) |" in lines[1]
    assert "41.0 ± 1.4" not in block(text, "table1") and block(text, "table1").count(f"| `{ENTRY}`") == 2
    render_results(tmp_path / "empty", out, figures=figs)
    assert out.read_text() == text


def test_a_registry_change_without_regeneration_fails_the_check(tmp_path, monkeypatch):
    import repro.results.record as rr

    work = tmp_path / "runs"
    write_run(work, ENTRY, 0, "done", numbers(50.0))
    out = render_results(work, tmp_path / "RESULTS.md")
    assert check_stale(out) == []
    today = rr.reference_hash
    monkeypatch.setattr(rr, "reference_hash", lambda e, f: "feedfacecafe" if e == ENTRY else today(e, f))
    failures = check_stale(out)
    assert any(f.startswith(f"{out} is stale: ") and "repro compare --record-only" in f for f in failures), failures
    assert any("model-index.yml is stale" in f for f in failures)
    assert any("table1.png is stale" in f for f in failures)  # its seed moved to the superseded list
    render_results(None, out)  # the same commit regenerates them
    assert check_stale(out) == [] and read_results(out)["superseded"][0]["config"] == config_hash(load_entry(ENTRY))


def test_check_names_a_hand_edit_a_missing_index_and_a_stale_figure(tmp_path):
    work = tmp_path / "runs"
    write_run(work, ENTRY, 0, "done", numbers(50.0))
    out = render_results(work, tmp_path / "RESULTS.md")
    figures, index = default_outputs(out)
    text = out.read_text()
    out.write_text(text.replace("| 56.3 · – · 50.0 (1) · Δ -6.3 |", "| 56.3 · – · 56.0 (1) · Δ -0.3 |"))
    (failure,) = check_stale(out)
    assert "is stale: 2 differing line(s)" in failure and "-| `table1/depthg-vits8`" in failure
    out.write_text(text)
    index.unlink()
    shutil.copy(figures / "table2.png", figures / "table1.png")
    failures = check_stale(out)
    assert len(failures) == 2 and f"{index} is missing" in failures[0] and "table1.png is stale" in failures[1]


def test_smoke_runs_only_fill_the_pipeline_check_block(figs, tmp_path):
    """Contract 2: smoke runs (under <work>/smoke/ or with scale: smoke) go into one block headed as a pipeline
    check, one row per (entry, fidelity) naming the entry verbatim; no other block, the index or a figure changes."""
    plain, smoky = tmp_path / "plain", tmp_path / "smoky"
    for work in (plain, smoky):
        write_run(work, ENTRY, 0, "done", numbers(55.0), numbers(56.0))
    write_run(smoky, ENTRY, 0, "done", numbers(3.0), smoke=True)
    write_run(smoky, ENTRY, 1, "failed", smoke=True, error="RuntimeError: boom")
    write_run(smoky, "table3/depthg-vits8", 0, "done", numbers(4.0), fidelity="released", smoke=True)
    write_run(smoky, "table2/stego-vitb8", 5, "done", numbers(5.0), smoke=True)
    shutil.move(smoky / "smoke" / "table2/stego-vitb8", smoky / "table2/stego-vitb8")  # the main tree, scale: smoke
    write_checkpoint_score(smoky, ENTRY, numbers(6.0), "ab" * 32, smoke=True)
    a = render_results(plain, tmp_path / "a" / "RESULTS.md", figures=figs)
    drawn = {p.name: p.stat().st_mtime_ns for p in figs.iterdir()}
    b = render_results(smoky, tmp_path / "b" / "RESULTS.md", figures=figs)
    ta, tb = blocks(a.read_text()), blocks(b.read_text())
    assert "smoke" not in ta and set(tb) - set(ta) == {"smoke"}
    assert {k: v for k, v in tb.items() if k != "smoke"} == ta
    assert default_outputs(a)[1].read_text() == default_outputs(b)[1].read_text()
    assert {p.name: p.stat().st_mtime_ns for p in figs.iterdir()} == drawn  # every figure already current
    smoke = tb["smoke"]
    assert "## Pipeline check (smoke scale, not results)" in smoke
    rows = [line for line in smoke.splitlines() if line.startswith("| `")]
    assert rows == [
        f"| `{ENTRY}` | paper | 1 done, 1 failed (seed 1: RuntimeError: boom) | 3.0 (1) | 20.0 (1) | 70.0 (1) | 30.0 (1) |",
        f"| `{ENTRY}` | released-checkpoint | scored | 6.0 (1) | 20.0 (1) | 70.0 (1) | 30.0 (1) |",
        "| `table2/stego-vitb8` | paper | 1 done | 5.0 (1) | 20.0 (1) | 70.0 (1) | 30.0 (1) |",
        "| `table3/depthg-vits8` | released | 1 done | 4.0 (1) | 20.0 (1) | 70.0 (1) | 30.0 (1) |"]
    assert read_results(b)["entries"][ENTRY]["released_checkpoint"] is None
    before = b.read_text()
    render_results(tmp_path / "empty", b, figures=figs)  # no smoke runs here: the block stays as it was
    assert b.read_text() == before and check_stale(b, figures=figs) == []


def test_model_index_records_provenance_and_validates(tmp_path):
    work = tmp_path / "runs"
    for seed in (0, 1):
        write_run(work, ENTRY, seed, "done", numbers(55.0 + 2 * seed, 25.0), numbers(57.0))
    write_run(work, ENTRY, 2, "done", numbers(50.0), fidelity="released", processes=4)
    write_checkpoint_score(work, ENTRY, numbers(56.1), "9f" * 32, "cocostuff_vits.ckpt")
    out = render_results(work, tmp_path / "RESULTS.md", tables=["table1"])
    index = yaml.safe_load(default_outputs(out)[1].read_text())
    assert validate(index) == []
    models = {m["Name"]: m for m in index["Models"]}
    assert len(models) == 2 * len(list_entries()) and {c["Name"] for c in index["Collections"]} == set(TABLES)
    paper = models[f"{ENTRY} [paper]"]
    assert paper["Seeds"] == [0, 1] and paper["Status"] == "2 done" and paper["Fidelity"] == "paper"
    assert paper["Config"] == {"File": "repro/config/experiments/table1/depthg-vits8.yaml",
                               "Hash": config_hash(load_entry(ENTRY)), "Method": "depthg", "Batch Size Per Process": 32,
                               "World Size": 1, "Effective Batch Size": 32}
    assert paper["Training Resources"] == {"Accelerator": "NVIDIA H100 80GB HBM3 x 1", "Wall Hours": 4.0,
                                           "Accelerator Hours": 4.0}
    assert paper["Data"]["Manifest"] == "data_manifests/cocostuff27.yaml"
    assert re.fullmatch(r"[0-9a-f]{64}", paper["Data"]["Manifest sha256"])
    assert paper["Weights"] == {"Backbone": "dino_deitsmall8_300ep_pretrain.pth", "Backbone sha256": BACKBONE_SHA,
                                "Released Checkpoint": "cocostuff_vits.ckpt", "Released Checkpoint sha256": "9f" * 32}
    assert paper["Software"] == {"torch": "2.4.1", "CUDA (torch build)": "12.4"}
    acc = paper["Results"][0]["Metrics"][0]
    assert acc == {"Metric": "unsup_acc", "Quoted": {"Paper": acc["Quoted"]["Paper"], "Table": "Table 1",
                                                     "Row": "+ Ours, ViT-S/8", "Column": "Unsupervised Acc.",
                                                     "Value": 56.3},
                   "Released Checkpoint": 56.1, "Mean": 56.0, "Std": 1.4142, "N": 2, "Per Seed": {0: 55.0, 1: 57.0},
                   "Best On Val Mean": 57.0, "Delta To Paper": -0.3}
    assert "CVPR 2024" in acc["Quoted"]["Paper"]
    released = models[f"{ENTRY} [released]"]
    assert released["Config"]["World Size"] == 4 and released["Config"]["Effective Batch Size"] == 128
    assert released["Training Resources"] == {"Accelerator": "NVIDIA H100 80GB HBM3 x 4", "Wall Hours": 2.0,
                                              "Accelerator Hours": 8.0}
    pending = models["table5/kbr [paper]"]
    assert pending["Seeds"].startswith("pending: ") and pending["Training Resources"]["Wall Hours"].startswith("pending: ")
    assert pending["Weights"]["Released Checkpoint"] == "pending: no published checkpoint for this entry"
    potsdam = models["supp3/depth-map-potsdam [paper]"]["Results"][0]["Metrics"][0]["Quoted"]
    assert (potsdam["Table"], potsdam["Row"], potsdam["Column"]) == ("Supplement Table 3", "Depth Map", "Potsdam Accuracy")
    n9 = models["supp4/n9 [paper]"]["Results"][0]["Metrics"][1]["Quoted"]
    assert (n9["Row"], n9["Column"], n9["Value"]) == ("U. mIoU", "N 9", 25.6)  # transposed table


@pytest.mark.parametrize("path, value, message", [
    (("Models", 0, "Seeds"), None, "null"),
    (("Models", 0, "Weights", "Backbone sha256"), "", "empty string"),
    (("Models", 0, "Training Resources", "Wall Hours"), "pending", "must read 'pending: <reason>'"),
    (("Models", 0, "Config", "World Size"), "four", "neither a number nor 'pending: <reason>'"),
    (("Models", 0, "Results", 0, "Metrics", 0, "Mean"), float("nan"), "not a finite number"),
    (("Models", 0, "Results", 0, "Metrics", 0, "Per Seed"), {}, "empty mapping"),
    (("Models", 0, "In Collection"), "table9", "is not a collection"),
])
def test_model_index_schema_refuses_null_empty_and_bare_pending(figs, tmp_path, path, value, message):
    out = render_results(None, tmp_path / "RESULTS.md", tables=["table1"], figures=figs)
    index = yaml.safe_load(default_outputs(out)[1].read_text())
    assert validate(index) == []
    broken = copy.deepcopy(index)
    target = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert any(message in e for e in validate(broken)), validate(broken)
    del broken["Models"][0]["Software"]
    assert any("missing ['Software']" in e for e in validate(broken))


def test_figures_show_every_seed_mark_pending_lanes_and_are_not_redrawn_when_current(tmp_path):
    work = tmp_path / "runs"
    for seed in (0, 1, 2):
        write_run(work, ENTRY, seed, "done", numbers(54.0 + seed))
    out = render_results(work, tmp_path / "RESULTS.md", tables=["table1"])
    figure = default_outputs(out)[0] / "table1.png"
    from PIL import Image

    with Image.open(figure) as image:
        assert image.format == "PNG" and image.size[0] > 1000 and "Software" not in image.text
    from repro.config.papertables import paper_order
    from repro.results.figures import figure_data
    from repro.results.tables import table_metrics

    record = read_results(out)
    names = paper_order("table1", list_entries("table1"))
    data = figure_data("table1", TABLES["table1"], names, table_metrics(names, record), record)
    assert read_digest(figure) == figure_digest(data)
    lane = next(x for x in data["lanes"] if (x["entry"], x["fidelity"]) == (ENTRY, "paper"))
    assert lane["seeds"]["unsup_acc"] == [54.0, 55.0, 56.0] and lane["paper"]["unsup_acc"] == 56.3
    assert lane["stats"]["unsup_acc"] == {"mean": 55.0, "std": 1.0, "n": 3}
    assert sum(not x["seeds"]["unsup_acc"] for x in data["lanes"]) == 2 * len(names) - 1  # the pending lanes
    stamp = figure.stat().st_mtime_ns
    render_results(tmp_path / "empty", out, tables=["table1"])
    assert figure.stat().st_mtime_ns == stamp  # current: not redrawn
    write_run(work, ENTRY, 3, "done", numbers(50.0))
    render_results(work, out, tables=["table1"])
    assert read_digest(figure) != figure_digest(data)


def test_every_quoted_number_is_placed_in_its_paper_table():
    """repro/config/paper_tables.yaml places every registered entry's quoted values (table, row, column), and names
    only registered entries: a new entry without its place would read 'pending' in the model index."""
    from repro.config.papertables import paper_cell, table_layout

    for key in TABLES:
        layout = table_layout(key) or {}
        placed = layout.get("columns" if layout.get("transposed") else "rows") or {}
        assert set(placed) <= set(list_entries(key)), key
        for name in list_entries(key):
            for metric in load_entry(name).paper:
                cell = paper_cell(key, name, metric)
                assert cell is not None and cell.row and cell.column and cell.table, (name, metric)
    assert paper_cell("table4", "table4/fps", "unsup_miou").column == "U. mIoU."
    assert paper_cell("demo", "demo/nyuv2-mini", "unsup_acc") is None
