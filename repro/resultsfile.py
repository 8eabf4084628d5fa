"""The RESULTS.md file: its marked blocks and their markdown, its machine-readable record, and the
check of a fresh run against that record (:func:`check_against`, used by ``repro check-results``).

RESULTS.md consists of generated blocks between ``<!-- repro:begin NAME -->`` and
``<!-- repro:end NAME -->`` (one per table, ``env`` and ``json``); text outside the markers is
never touched, so hand-written notes survive regeneration. A file whose markers do not pair up
(a begin without its end, an end without its begin, a name twice, one block inside another), or
whose ``json`` block was deleted while other generated blocks remain, is refused with an error
naming the line: regenerating it would duplicate or lose blocks, so it is left untouched.

The ``json`` block (format ``repro-results/2``) is the record that ``repro check-results``
compares a fresh run with and that ``repro compare`` merges new runs into::

    {"format": "repro-results/2",
     "envs": {ENV_ID: {flattened env.json without per-run keys}},
     "entries": {ENTRY: {
        "table": ..., "tolerance": 1.0 | {metric: points}, "paper": {metric: value},
        "fidelities": {"paper" | "released": GROUP},
        "variants": [GROUP + {"fidelity", "label"}],
        "released_checkpoint": {"file", "sha256", "metrics": {metric: value}} | null}}}
    GROUP = {"config": CONFIG_HASH | null, "status": "...",
             "metrics": {metric: {"mean", "std", "n"}}, "best_on_val": {...},
             "seeds": {SEED: {"final": {metric: value}, "best_on_val": {...}, "env": ENV_ID, "host": ...}}}

Numbers are percentages (x100). ``tolerance`` may be edited by hand (one number, or one per
metric); regeneration keeps it. A record of the older format ``repro-results/1`` is read too
(its aggregates are kept as ``legacy`` until runs of the entry replace them).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

__all__ = ["FORMAT", "METRICS", "FIDELITIES", "check_markers", "splice", "read_results", "parse_record", "dump_record",
           "check_against", "table_block", "env_block", "json_block"]

FORMAT = "repro-results/2"
METRICS = ("unsup_acc", "unsup_miou", "linear_acc", "linear_miou")
FIDELITIES = ("paper", "released")
LABELS = {"unsup_acc": "U. Acc", "unsup_miou": "U. mIoU", "linear_acc": "L. Acc", "linear_miou": "L. mIoU"}
_MARKER = re.compile(r"<!-- repro:(?P<kind>begin|end) (?P<name>[\w.-]+) -->")
_BLOCK = re.compile(r"<!-- repro:begin (?P<name>[\w.-]+) -->\n?(?P<body>.*?)<!-- repro:end (?P=name) -->", re.DOTALL)
_JSON = re.compile(r"```json\n(?P<body>.*?)\n```", re.DOTALL)


def check_markers(text: str, path: str | Path) -> list[str]:
    """Check that the markers pair up; return the block names in file order.

    Raises:
        ValueError: naming the file, the line and the marker, for a begin without its end (or a
            block opened inside another), an end without its begin, or a block name used twice;
            and when generated blocks exist but the ``json`` block is gone. The message says the
            file was left unchanged and how to repair it.
    """
    names: list[str] = []
    open_name, open_line = None, 0
    for match in _MARKER.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        kind, name = match["kind"], match["name"]
        where = f"{path}:{line}: {match.group(0)}"
        if kind == "begin":
            if open_name is not None:
                raise ValueError(f"{path}:{open_line}: block {open_name!r} has no end marker before {where}; add "
                                 f"'<!-- repro:end {open_name} -->' where the block ends (the file was not changed)")
            if name in names:
                raise ValueError(f"{where}: block {name!r} appears twice; delete one copy (the file was not changed)")
            open_name, open_line = name, line
        else:
            if open_name != name:
                raise ValueError(f"{where}: end marker without its begin marker; restore '<!-- repro:begin {name} -->' "
                                 "or delete the stray marker (the file was not changed)")
            names.append(name)
            open_name = None
    if open_name is not None:
        raise ValueError(f"{path}:{open_line}: block {open_name!r} has no end marker; add "
                         f"'<!-- repro:end {open_name} -->' where the block ends (the file was not changed)")
    if names and "json" not in names:
        raise ValueError(f"{path}: the machine-readable 'json' block is missing (its recorded numbers and tolerances "
                         "would be lost); restore it, e.g. from git, or remove every repro:begin/end block to start a "
                         "new record (the file was not changed)")
    return names


def _wrap(name: str, body: str) -> str:
    return f"<!-- repro:begin {name} -->\n{body}<!-- repro:end {name} -->"


def splice(text: str, blocks: dict[str, str], order: list[str]) -> str:
    """Replace the marked blocks present in ``text``; insert the others next to their neighbours in ``order``.

    ``text`` must have passed :func:`check_markers`.
    """
    present = {m.group("name") for m in _BLOCK.finditer(text)}
    text = _BLOCK.sub(lambda m: _wrap(m.group("name"), blocks[m.group("name")])
                      if m.group("name") in blocks else m.group(0), text)
    for name in [n for n in order if n in blocks and n not in present]:
        idx = order.index(name)
        before = [n for n in order[:idx] if n in present]
        after = [n for n in order[idx + 1:] if n in present]
        if before:
            end = f"<!-- repro:end {before[-1]} -->"
            pos = text.index(end) + len(end)
            text = text[:pos] + "\n\n" + _wrap(name, blocks[name]) + text[pos:]
        elif after:
            pos = text.index(f"<!-- repro:begin {after[0]} -->")
            text = text[:pos] + _wrap(name, blocks[name]) + "\n\n" + text[pos:]
        else:
            text = text.rstrip("\n") + "\n\n" + _wrap(name, blocks[name]) + "\n"
        present.add(name)
    return text


def _migrate_v1(data: dict) -> dict:
    """``repro-results/1`` (aggregates per entry, no fidelity, no seeds) -> the current format."""
    entries = {}
    for name, rec in data["entries"].items():
        metrics = rec.get("metrics") or {}
        group = {"config": None, "status": rec.get("status", "pending"), "seeds": {},
                 "metrics": {m: {k: s.get(k) for k in ("mean", "std", "n")} for m, s in metrics.items()},
                 "best_on_val": {m: {k: s.get(k) for k in ("mean", "std", "n")}
                                 for m, s in (rec.get("best_on_val") or {}).items()}}
        group["legacy"] = any((s.get("n") or 0) > 0 for s in metrics.values())
        entries[name] = {"table": rec.get("table"), "tolerance": rec.get("tolerance"),
                         "paper": {m: s["paper"] for m, s in metrics.items() if s.get("paper") is not None},
                         "fidelities": {"paper": group} if group["legacy"] else {}, "variants": [],
                         "released_checkpoint": None}
    return {"format": FORMAT, "envs": {}, "entries": entries}


def parse_record(text: str, path: str | Path) -> dict:
    """The record of a RESULTS.md text (see the module docstring); format 1 is converted.

    Raises:
        ValueError: no ``json`` block, invalid JSON, an unknown format or no ``entries`` mapping.
    """
    block = next((m.group("body") for m in _BLOCK.finditer(text) if m.group("name") == "json"), None)
    fenced = _JSON.search(block) if block is not None else None
    if fenced is None:
        raise ValueError(f"{path}: no machine-readable block (<!-- repro:begin json --> with a ```json fence)")
    try:
        data = json.loads(fenced.group("body"))
    except ValueError as exc:
        raise ValueError(f"{path}: the json block is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise ValueError(f"{path}: the json block has no 'entries' mapping")
    if data.get("format") == "repro-results/1":
        return _migrate_v1(data)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown record format {data.get('format')!r} (expected {FORMAT!r})")
    data.setdefault("envs", {})
    return data


def read_results(path: str | Path) -> dict:
    """Parse the machine-readable block of a RESULTS.md back (only that block is read).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: see :func:`parse_record`.
    """
    return parse_record(Path(path).read_text(), path)


def dump_record(record: dict) -> str:
    """Valid JSON with one entry per line (diff-friendly); NaN/inf are refused, not written."""
    envs = [f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True, allow_nan=False)}" for k, v in sorted(record["envs"].items())]
    rows = [f" {json.dumps(k)}: {json.dumps(v, allow_nan=False)}" for k, v in sorted(record["entries"].items())]
    return (f'{{"format": {json.dumps(record["format"])},\n "envs": {{' + ("\n" + ",\n".join(envs) + "\n " if envs else "")
            + '},\n "entries": {\n' + ",\n".join(rows) + "\n}}")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(stats: dict | None) -> str:
    if not stats or not stats.get("n"):
        return "–"
    return f"{stats['mean']:.1f}" if stats.get("std") is None else f"{stats['mean']:.1f} ± {stats['std']:.1f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(name: str, rec: dict) -> list[tuple[str, str, dict, bool]]:
    """``(label, fidelity, group, is_main)`` in display order: each fidelity, then its variants."""
    rows = []
    for fid in FIDELITIES:
        rows.append((f"`{name}`", fid, rec["fidelities"].get(fid) or {}, True))
        rows += [(f"`{name}` [{_cell(v['label'])}]", fid, v, False) for v in rec["variants"] if v["fidelity"] == fid]
    return rows


def _table_md(names: list[str], record: dict, metrics: list[str], best: bool) -> str:
    kind = "best on val" if best else "reproduced"
    cols = ("paper", kind, "Δ") if best else ("paper", "released ckpt", kind, "Δ")
    head = ["entry", "fidelity"] + [f"{LABELS[m]} {c}" for m in metrics for c in cols] + ["n"]
    head += [] if best else ["status", "released ckpt sha256"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        rec = record["entries"][name]
        ckpt = rec.get("released_checkpoint") or {}
        for label, fid, group, main in _rows(name, rec):
            cells = [label, fid]
            for m in metrics:
                stats, paper = (group.get("best_on_val" if best else "metrics") or {}).get(m), rec["paper"].get(m)
                delta = "–" if paper is None or not (stats or {}).get("n") else f"{stats['mean'] - paper:+.1f}"
                value = (ckpt.get("metrics") or {}).get(m)
                cells += ["–" if paper is None else f"{paper:.1f}"]
                cells += [] if best else ["–" if value is None or not main else f"{value:.1f}"]
                cells += [_fmt(stats), delta]
            cells.append(str(max([(s or {}).get("n") or 0 for s in (group.get("metrics") or {}).values()] or [0])))
            if not best:
                sha = ckpt.get("sha256") or ""
                cells += [_cell(group.get("status") or "pending"), f"`{sha[:12]}` (n = 1)" if main and ckpt and sha else
                          ("n = 1" if main and ckpt else "–")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_block(key: str, title: str, names: list[str], record: dict) -> str:
    """The markdown of one table (final checkpoint and best on val) from the record."""
    entries = [record["entries"][n] for n in names]
    wanted = {m for e in entries for m in e["paper"]} or {m for e in entries for g in e["fidelities"].values()
                                                          for m, s in (g.get("metrics") or {}).items() if s.get("n")}
    metrics = [m for m in METRICS if m in wanted] or list(METRICS)
    return (f"## {key}: {title}\n\n"
            "Final checkpoint: mean ± sample std over seeds; n = finished seeds; Δ = reproduced − paper. One row per "
            "fidelity profile (`paper`: as the papers describe it; `released`: as the released code ran). "
            "`released ckpt`: the published checkpoint evaluated by `repro eval` (n = 1, sha256 in the last column). "
            "A row `entry [key=value]` holds runs whose config differs from the registered entry in those keys; "
            "`recorded` seeds were kept from the previous record (not in the work dir read).\n\n"
            f"{_table_md(names, record, metrics, best=False)}\n\n"
            "Best on val (paper-style selection): the checkpoint with the best validation score. The papers' "
            "validation set is also their test set, so these numbers are optimistic; the final-checkpoint "
            "table above is the primary result.\n\n"
            f"{_table_md(names, record, metrics, best=True)}\n")


def env_block(record: dict) -> str:
    """Environments of every recorded seed; per-run keys (host, SLURM ids) do not split groups."""
    groups: dict[str, tuple[list[str], set[str]]] = {}
    for name, rec in sorted(record["entries"].items()):
        for label, fid, group, _ in _rows(name, rec):
            for seed, s in (group.get("seeds") or {}).items():
                runs, hosts = groups.setdefault(s.get("env", "?"), ([], set()))
                runs.append(f"{label.strip('`').replace('` [', ' [')} {fid} seed{seed}")
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
    return ("## Machine-readable record\n\nUsed by `repro check-results` and merged into by `repro compare`: per entry "
            "and fidelity the config hash, the per-seed numbers and their mean, std and n (final checkpoint and best "
            "on val), variants, the published checkpoint's numbers, the paper's values, and the tolerance (absolute "
            "points; a number or one per metric; edit it here, regeneration keeps it) a fresh run must meet.\n\n"
            "```json\n" + dump_record(record) + "\n```\n")


def check_against(results: dict, entry: str, summary: dict[str, float], *, fidelity: str = "paper",
                  config_hash: str | None = None) -> list[str]:
    """Compare a fresh run's numbers with the recorded ones (the machine-readable record only).

    Args:
        results: the dict from :func:`read_results`.
        entry: entry name, e.g. ``demo/nyuv2-mini``.
        summary: the fresh run's ``metrics.json`` ``summary`` (metric -> value, x100).
        fidelity: the fresh run's fidelity profile; its recorded group is the reference.
        config_hash: the fresh run's :func:`repro.identity.config_hash`; a recorded group made
            with another config is a failure (the numbers would not be comparable).

    Returns:
        One message per failure; empty when every metric of :data:`METRICS` is recorded, present
        and finite in ``summary``, and within the tolerance of the recorded mean.
    """
    record = results.get("entries", {}).get(entry)
    if record is None:
        return [f"{entry}: no recorded numbers in the results file"]
    group = (record.get("fidelities") or {}).get(fidelity)
    if not group or not any((s.get("n") or 0) > 0 for s in (group.get("metrics") or {}).values()):
        return [f"{entry} ({fidelity}): nothing recorded yet (no finished runs when the results file was written)"]
    tol = record.get("tolerance")
    if not (_finite(tol) or (isinstance(tol, dict) and all(_finite(v) for v in tol.values()))):
        return [f"{entry}: no valid tolerance recorded ({tol!r}); set a number or one per metric"]
    recorded = group.get("config")
    if config_hash is not None and recorded is not None and recorded != config_hash:
        return [f"{entry} ({fidelity}): recorded with config {recorded}, the fresh run has config {config_hash}; "
                "the numbers are not comparable (regenerate the record with `repro compare` after a run of this config)"]
    failures = []
    for metric in METRICS:
        mean = (group.get("metrics", {}).get(metric) or {}).get("mean")
        limit = tol.get(metric) if isinstance(tol, dict) else tol
        fresh = summary.get(metric)
        if not _finite(mean):
            failures.append(f"{entry}: {metric} has no recorded value")
        elif fresh is None:
            failures.append(f"{entry}: {metric} missing from the fresh run (recorded {mean:.2f})")
        elif not _finite(fresh):
            failures.append(f"{entry}: {metric} = {fresh} in the fresh run (recorded {mean:.2f})")
        elif limit is None:
            failures.append(f"{entry}: no tolerance recorded for {metric}")
        elif abs(fresh - mean) > limit:
            failures.append(f"{entry}: {metric} = {fresh:.2f}, recorded {mean:.2f} "
                            f"(Δ {fresh - mean:+.2f}, tolerance ±{limit:g})")
    return failures
