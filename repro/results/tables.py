"""The markdown of RESULTS.md's generated blocks, each a pure function of the record (and the registry's labels).

Every metric cell of a table has one fixed form, legended above each table::

    paper · released checkpoint · reproduced mean ± std (n) · Δ reproduced − paper

e.g. ``56.3 · 56.1 · 55.9 ± 1.2 (3) · Δ -0.4``; ``–`` marks a part that does not exist yet (no published
checkpoint scored, no finished seed). Tables have at most 10 columns: entry, fidelity, one cell per
metric the paper quotes, status. Runs with user overrides, superseded records and smoke runs have blocks
of their own and never appear in a table's rows.
"""

from __future__ import annotations

from repro.config.papertables import entry_label
from repro.results.document import FIDELITIES, LABELS, METRICS, aggregate, dump_record

__all__ = ["CELL_LEGEND", "table_metrics", "about_block", "table_block", "overrides_block", "superseded_block",
           "smoke_block", "env_block", "json_block", "format_cell", "used_envs"]

CELL_LEGEND = ("Each metric cell reads **paper · released checkpoint · reproduced mean ± std (n) · Δ**: the paper's "
               "number; the published checkpoint scored by `repro eval-released`; the mean ± sample std over the n "
               "finished seeds (final checkpoint); Δ = reproduced − paper. `–`: nothing there yet. Percent.")

HYPERPARAMETER_NOTE = (
    "The published configurations are the outputs of hyper-parameter searches that the papers do not report "
    "(for example `neg_inter_weight=0.2485038032028848`, λ_random of the COCO-Stuff ViT-B run in DepthG's "
    "`paper_reproduction.sh`, printed as 0.24 in supplement Table 2), and nothing says what those searches "
    "cost. A retrain here reproduces the final configuration, not the search that found it.")


def _num(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def _reproduced(stats: dict | None) -> str:
    if not stats or not stats.get("n"):
        return "–"
    if stats.get("std") is None:
        return f"{stats['mean']:.1f} ({stats['n']})"
    return f"{stats['mean']:.1f} ± {stats['std']:.1f} ({stats['n']})"


def _delta(stats: dict | None, paper) -> str:
    if paper is None or not stats or not stats.get("n"):
        return "–"
    return f"Δ {stats['mean'] - paper:+.1f}"


def format_cell(paper, checkpoint, stats: dict | None) -> str:
    """One metric cell in the fixed form ``paper · released checkpoint · mean ± std (n) · Δ`` (module docstring)."""
    return " · ".join([_num(paper), _num(checkpoint), _reproduced(stats), _delta(stats, paper)])


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table_metrics(names: list[str], record: dict) -> list[str]:
    """The metrics a table shows: those its paper quotes for any entry (all four where none, e.g. the demo)."""
    wanted = {m for n in names for m in record["entries"][n].get("paper") or {}}
    return [m for m in METRICS if m in wanted] or list(METRICS)


def _entry_cell(table: str, name: str) -> str:
    label = entry_label(table, name)
    return f"`{name}`" + (f" ({_cell(label)})" if label else "")


def _failures(rows: list[tuple[str, str, dict]]) -> list[str]:
    """Bullet lines naming every failed seed with its run folder, reason and log."""
    lines = []
    for name, fid, group in rows:
        for seed, state in (group.get("runs") or {}).items():
            if state.get("state") != "failed":
                continue
            log = f"; log `{_cell(state['log'])}`" if state.get("log") else ""
            lines.append(f"- `{name}` {fid} seed {seed} failed: run folder `{_cell(state.get('run', '?'))}` (under the "
                         f"work dir): {_cell(state.get('reason') or 'no reason recorded')}{log}")
    return lines


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def about_block() -> str:
    """The reading guide: cell legend, fidelities, final vs best on val, the other sections, the searches note."""
    return "\n".join([
        "## How to read this file", "",
        f"- One table per paper table, one row per entry and fidelity profile. {CELL_LEGEND}",
        "- Fidelity `paper`: the method as the papers write it; `released`: as the released code ran (docs/fidelity.md, "
        "`repro fidelity`). Seeds are averaged only when their saved configs are identical (config hash).",
        "- The final checkpoint is the primary result. The papers picked checkpoints on the validation set, which is "
        "also their test set; those paper-style numbers are in a second, smaller table per table, labelled "
        "*best on val*, and are optimistic.",
        "- Each table links a figure (`results/figures/<table>.png`): per entry and metric the paper's value, the "
        "published checkpoint's and every seed's, with mean ± std, per fidelity; entries without runs read *pending*.",
        "- Runs whose config differs from the registered entry by user overrides are listed under *Runs with "
        "overrides*, records made under a config that is no longer registered under *Superseded*, and runs of the "
        "`smoke` scale under *Pipeline check*: none of them enters a table row.",
        "- `results/model-index.yml` holds the same record per entry in a model-index style (the paper's table, row, "
        "column and value, seeds, config hash, batch and world size, accelerators, measured hours, data manifest and "
        "weight digests, torch/CUDA versions). `repro compare --check` (part of `make check-results`) fails when this "
        "file, the index or a figure differs from what the record and today's registry render.",
        f"- {HYPERPARAMETER_NOTE}", ""])


def table_block(key: str, title: str, names: list[str], record: dict, figure: str | None) -> str:
    """The markdown of one table: legend, figure, final-checkpoint table, failed seeds, best-on-val table.

    Args:
        key: table key (``table1``).
        title: its title (:data:`repro.config.entries.TABLES`).
        names: its entries in display order (:func:`repro.config.papertables.paper_order`).
        record: the normalised record.
        figure: the figure's path relative to RESULTS.md (None: no figure).
    """
    metrics = table_metrics(names, record)
    head = ["entry", "fidelity"] + [LABELS[m] for m in metrics] + ["status"]
    rows, best_rows, groups = [], [], []
    for name in names:
        rec = record["entries"][name]
        paper = rec.get("paper") or {}
        ckpt = (rec.get("released_checkpoint") or {}).get("metrics") or {}
        for fid in FIDELITIES:
            group = (rec.get("fidelities") or {}).get(fid) or {}
            groups.append((name, fid, group))
            stats = group.get("metrics") or {}
            status = _cell(group.get("status") or "pending")
            if any(s.get("state") == "failed" for s in (group.get("runs") or {}).values()):
                status += " (see below)"
            rows.append([_entry_cell(key, name), fid]
                        + [format_cell(paper.get(m), ckpt.get(m), stats.get(m)) for m in metrics] + [status])
            best = group.get("best_on_val") or {}
            if any((best.get(m) or {}).get("n") for m in metrics):
                best_rows.append([f"`{name}`", fid] + [" · ".join([_reproduced(best.get(m)), _delta(best.get(m),
                                                                                                   paper.get(m))])
                                                       for m in metrics])
    out = [f"## {key}: {title}", "", CELL_LEGEND + " Final checkpoint.", ""]
    if figure:
        out += [f"![{key}: the paper's, the published checkpoint's and every seed's value per entry, metric and "
                f"fidelity]({figure})", ""]
    out += [_table(head, rows), ""]
    failed = _failures(groups)
    if failed:
        out += ["Failed seeds (not averaged):", "", *failed, ""]
    if best_rows:
        out += ["Best on val (paper-style selection on the validation set, which is also the test set: optimistic; "
                "the table above is the primary result). Cells: **best-on-val mean ± std (n) · Δ** to the paper.", "",
                _table(["entry", "fidelity"] + [LABELS[m] for m in metrics], best_rows), ""]
    else:
        out += ["Best on val (paper-style selection): no finished seed yet.", ""]
    return "\n".join(out)


def overrides_block(record: dict) -> str:
    """Runs whose config differs from their registered entry (user overrides): labelled, never in a table row."""
    head = ["entry", "fidelity", "overrides"] + [LABELS[m] for m in METRICS] + ["status"]
    rows, groups = [], []
    for name, rec in sorted(record["entries"].items()):
        for v in rec.get("variants") or []:
            stats = v.get("metrics") or {}
            groups.append((name, v.get("fidelity", "?"), v))
            rows.append([f"`{name}`", v.get("fidelity", "?"), _cell(v.get("label") or f"config {v.get('config')}")]
                        + [_reproduced(stats.get(m)) for m in METRICS] + [_cell(v.get("status") or "pending")])
    out = ["## Runs with overrides (not in the tables)", "",
           "Runs whose saved config differs from the registered entry in the keys named (e.g. `--set "
           "train.max_steps=100`). Cells: reproduced mean ± std (n), final checkpoint.", ""]
    out += [_table(head, rows), ""] if rows else ["None recorded.", ""]
    failed = _failures(groups)
    return "\n".join(out + (["Failed seeds:", "", *failed, ""] if failed else []))


def _dates(group: dict) -> str:
    dates = sorted(d[:10] for d in [*(s.get("date") for s in (group.get("seeds") or {}).values())] if d)
    if not dates:
        return "date not recorded"
    return dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"


def superseded_block(record: dict) -> str:
    """Records made under a config the registry no longer has: listed once, with hash and date."""
    head = ["entry", "fidelity", "config", "recorded", "why"] + [LABELS[m] for m in METRICS]
    rows = []
    for g in record.get("superseded") or []:
        stats = g.get("metrics") or {}
        rows.append([f"`{g.get('entry')}`", str(g.get("fidelity")), f"`{g.get('config') or 'none'}`", _dates(g),
                     _cell(g.get("reason") or "")] + [_reproduced(stats.get(m)) for m in METRICS])
    out = ["## Superseded (recorded under a config that is no longer registered)", "",
           "Kept so that nothing recorded is lost; not comparable with today's entries, never in the tables. A run "
           "of the registered config replaces nothing here. Cells: mean ± std (n).", ""]
    return "\n".join(out + ([_table(head, rows), ""] if rows else ["None.", ""]))


def smoke_block(rows: list[dict]) -> str:
    """The pipeline check: every smoke-scale run, one row per (entry, fidelity), entry named verbatim.

    Args:
        rows: from :func:`repro.results.runs.collect_smoke`.
    """
    head = ["entry", "fidelity", "status"] + [LABELS[m] for m in METRICS]
    table = []
    for row in rows:
        runs = row["runs"]
        if row["checkpoint"] is not None:
            values = {m: {"mean": v, "std": None, "n": 1} for m, v in row["checkpoint"].items()}
            status = "scored"
        else:
            done = [r for r in runs if r.state == "done"]
            values = {}
            for m in METRICS:
                xs = [r.summary[m] for r in done if m in r.summary]
                if xs:
                    values[m] = aggregate(xs)
            counts = [f"{n} {s}" for s in ("done", "running", "failed", "pending")
                      if (n := sum(r.state == s for r in runs))]
            status = ", ".join(counts)
            reasons = [f"seed {r.seed}: {r.reason}" for r in runs if r.state == "failed" and r.reason]
            status += f" ({'; '.join(reasons)})" if reasons else ""
        table.append([f"`{row['entry']}`", row["fidelity"], _cell(status)] + [_reproduced(values.get(m))
                                                                               for m in METRICS])
    return "\n".join(["## Pipeline check (smoke scale, not results)", "",
                      "Runs of the `smoke` scale (a few steps on a data subset) show that every stage runs end to "
                      "end on this cluster. Their numbers measure nothing and never enter a table, the figures or "
                      "the record. Cells: mean ± std (n).", "", _table(head, table), ""])


def _group_rows(record: dict):
    for name, rec in sorted(record["entries"].items()):
        for fid in FIDELITIES:
            yield name, fid, (rec.get("fidelities") or {}).get(fid) or {}
        for v in rec.get("variants") or []:
            yield f"{name} [{v.get('label')}]", v.get("fidelity"), v
    for g in record.get("superseded") or []:
        yield f"{g.get('entry')} [superseded {g.get('config')}]", g.get("fidelity"), g


def env_block(record: dict) -> str:
    """Environments of every recorded seed; per-run keys (host, SLURM ids) do not split groups."""
    groups: dict[str, tuple[list[str], set[str]]] = {}
    for label, fid, group in _group_rows(record):
        for seed, s in (group.get("seeds") or {}).items():
            runs, hosts = groups.setdefault(s.get("env", "?"), ([], set()))
            runs.append(f"{label} {fid} seed{seed}")
            hosts.add(s.get("host", "?"))
    lines = ["## Environment", "", "Software, git revision and hardware of the recorded runs (each run's `env` "
             "block or `env.json`), one column per distinct environment.", ""]
    if not groups:
        return "\n".join(lines + ["No finished runs yet."]) + "\n"
    cols = list(groups)
    envs = [record["envs"].get(c, {}) for c in cols]
    keys = sorted({k for env in envs for k in env})
    lines += ["| | " + " | ".join(f"env {i}" for i in range(1, len(cols) + 1)) + " |", "|---" * (len(cols) + 1) + "|",
              "| runs | " + " | ".join(str(len(groups[c][0])) for c in cols) + " |",
              "| distinct hosts | " + " | ".join(str(len(groups[c][1])) for c in cols) + " |"]
    lines += [f"| `{k}` | " + " | ".join(_cell(env.get(k, "–")) for env in envs) + " |" for k in keys]
    lines += [""] + [f"- env {i}: {', '.join(groups[c][0])}" for i, c in enumerate(cols, 1)]
    return "\n".join(lines) + "\n"


def json_block(record: dict) -> str:
    """The markdown of the machine-readable block."""
    return ("## Machine-readable record\n\nEvery block above is rendered from this record and the registry. Used by "
            "`repro check-results` and merged into by `repro compare`: per entry and fidelity the config hash, the "
            "per-seed numbers and provenance and their mean, std and n (final checkpoint and best on val), the runs "
            "seen but not finished, variants, the published checkpoint's numbers, the paper's values, and the "
            "tolerance (absolute points; a number or one per metric; edit it here, regeneration keeps it) a fresh "
            "run must meet; then the superseded groups.\n\n"
            "```json\n" + dump_record(record) + "\n```\n")


def used_envs(record: dict) -> set:
    """Environment ids referenced by any recorded seed (the others are dropped from the record)."""
    return {s.get("env") for _, _, g in _group_rows(record) for s in (g.get("seeds") or {}).values()}
