"""The RESULTS.md file: its marked blocks, its machine-readable record and the record's bookkeeping,
and the check of a fresh run against that record (:func:`check_against`, used by ``repro check-results``).

RESULTS.md consists of generated blocks between ``<!-- repro:begin NAME -->`` and
``<!-- repro:end NAME -->`` (the reading guide, one per table, override runs, superseded records,
the smoke pipeline check, ``env`` and ``json``); text outside the markers is never touched, so
hand-written notes survive regeneration. A file whose markers do not pair up (a begin without its
end, an end without its begin, a name twice, one block inside another), or whose ``json`` block was
deleted while other generated blocks remain, is refused with an error naming the line: regenerating
it would duplicate or lose blocks, so it is left untouched.

The ``json`` block (format ``repro-results/3``) is the record every generated block is rendered
from (a pure function of it and the registry, which is what makes ``repro compare --check`` possible),
that ``repro compare`` merges new runs into and that ``repro check-results`` compares a fresh run with::

    {"format": "repro-results/3",
     "envs": {ENV_ID: {flattened env.json without per-run keys}},
     "entries": {ENTRY: {
        "table": ..., "tolerance": 1.0 | {metric: points}, "paper": {metric: value},
        "fidelities": {"paper" | "released": GROUP},
        "variants": [GROUP + {"fidelity", "label"}],           runs with user overrides
        "released_checkpoint": {"file", "sha256", "metrics": {metric: value}} | null}},
     "superseded": [GROUP + {"entry", "fidelity", "reason"}]}  recorded under a config no longer registered
    GROUP = {"config": CONFIG_HASH | null, "status": "2 done, 1 failed",
             "metrics": {metric: {"mean", "std", "n"}}, "best_on_val": {...},
             "seeds": {SEED: {"final": {metric: value}, "best_on_val": {...}, "env": ENV_ID, "host": ...,
                              "date": ISO-8601, "run": "<entry>/<fidelity>/seed<S>", "backbone_sha256": ...,
                              "resources": {"world_size", "batch_size", "accelerator", "accelerator_count",
                                            "wall_s", "accelerator_s"}}},
             "runs": {SEED: {"state": "running" | "failed" | "pending", "run", "reason", "date"}}}

``seeds`` hold finished runs (every metric finite); ``runs`` what else was seen of a seed the last
time its work dir was read (a failed seed keeps its run folder and reason). Numbers are percentages
(x100). ``tolerance`` may be edited by hand (one number, or one per metric); regeneration keeps it.
Records of the older formats ``repro-results/1`` and ``/2`` are read too (:func:`parse_record`).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

__all__ = ["FORMAT", "METRICS", "FIDELITIES", "LABELS", "check_markers", "splice", "read_results", "parse_record",
           "dump_record", "check_against", "aggregate", "finalize_group", "group_status", "new_group", "finite"]

FORMAT = "repro-results/3"
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


def splice(text: str, blocks: dict[str, str], order: list[str], remove: frozenset[str] | set[str] = frozenset()) -> str:
    """Replace the marked blocks present in ``text``; insert the others next to their neighbours in ``order``.

    Blocks named in ``remove`` (e.g. a table key the registry no longer has) are deleted with the blank
    lines after them. ``text`` must have passed :func:`check_markers`.
    """
    for name in remove:
        text = re.sub(rf"<!-- repro:begin {re.escape(name)} -->.*?<!-- repro:end {re.escape(name)} -->\n*", "", text,
                      flags=re.DOTALL)
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


def finite(value) -> bool:
    """A real number (not bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def aggregate(values) -> dict:
    """Mean and sample standard deviation (n - 1) of per-seed values.

    Args:
        values: one finite number per finished seed (non-finite values are a caller's bug:
            :func:`finalize_group` moves such seeds to ``runs`` as failed first).

    Returns:
        ``{"mean": float | None, "std": float | None, "n": int}``; ``std`` is None for n < 2.
    """
    values = [float(v) for v in values]
    n = len(values)
    return {"mean": statistics.fmean(values) if n else None,
            "std": statistics.stdev(values) if n > 1 else None, "n": n}


def new_group(config: str | None) -> dict:
    """An empty GROUP (see the module docstring) for ``config``."""
    return {"config": config, "status": "pending", "metrics": {}, "best_on_val": {}, "seeds": {}, "runs": {}}


def group_status(group: dict) -> str:
    """``"2 done, 1 running, 1 failed"`` from a group's seeds and runs; ``pending`` when it has neither."""
    seeds, runs = group.get("seeds") or {}, (group.get("runs") or {}).values()
    parts = [f"{len(seeds)} done"] if seeds else []
    if group.get("legacy"):
        parts = [group.get("legacy_status") or "recorded (format 1)"]
    parts += [f"{n} {state}" for state in ("running", "failed", "pending") if (n := sum(r.get("state") == state
                                                                                        for r in runs))]
    return ", ".join(parts) or "pending"


def _rounded(value: float) -> float:
    return round(float(value), 4)


def finalize_group(group: dict) -> dict:
    """Check every recorded seed, then recompute the group's aggregates and status (in place; returned).

    A seed whose final numbers lack a metric of :data:`METRICS` or hold a non-finite value (NaN, inf;
    also one written into the record by hand) is a failed seed: it leaves ``seeds`` and is listed
    under ``runs`` with the reason, so it is shown, named with its run folder, and never averaged.
    """
    group.setdefault("seeds", {})
    group.setdefault("runs", {})
    for key, seed in list(group["seeds"].items()):
        final, best = seed.get("final") or {}, seed.get("best_on_val") or {}
        bad = [f"final {m}" for m in METRICS if not finite(final.get(m))]
        bad += [f"best_on_val {m}" for m, v in best.items() if not finite(v)]
        if bad:
            del group["seeds"][key]
            group["runs"][key] = {"state": "failed", "run": seed.get("run") or f"seed{key}",
                                  "reason": "recorded numbers missing or not finite: " + ", ".join(bad),
                                  **({"date": seed["date"]} if seed.get("date") else {})}
    group["seeds"] = dict(sorted(group["seeds"].items(), key=lambda kv: (len(kv[0]), kv[0])))
    group["runs"] = dict(sorted(group["runs"].items(), key=lambda kv: (len(kv[0]), kv[0])))
    if not group.get("legacy"):
        seeds = list(group["seeds"].values())
        group["metrics"] = {m: _stats([s["final"][m] for s in seeds]) for m in METRICS}
        names = [m for m in METRICS if any(m in (s.get("best_on_val") or {}) for s in seeds)]
        group["best_on_val"] = {m: _stats([s["best_on_val"][m] for s in seeds if m in s["best_on_val"]])
                                for m in names}
    group["status"] = group_status(group)
    return group


def _stats(values: list[float]) -> dict:
    return {k: _rounded(v) if isinstance(v, float) else v for k, v in aggregate(values).items()}


def _migrate_v1(data: dict) -> dict:
    """``repro-results/1`` (aggregates per entry, no fidelity, no seeds) -> the current format.

    Its aggregates cannot be attributed to a config: they become ``superseded`` groups (legacy, no seeds).
    """
    entries, superseded = {}, []
    for name, rec in data["entries"].items():
        metrics = rec.get("metrics") or {}
        entries[name] = {"table": rec.get("table"), "tolerance": rec.get("tolerance"),
                         "paper": {m: s["paper"] for m, s in metrics.items() if s.get("paper") is not None},
                         "fidelities": {}, "variants": [], "released_checkpoint": None}
        if any((s.get("n") or 0) > 0 for s in metrics.values()):
            superseded.append({**new_group(None), "entry": name, "fidelity": "paper", "legacy": True,
                               "legacy_status": str(rec.get("status") or "recorded (format 1)"),
                               "reason": "recorded in format 1, before runs were identified by their config",
                               "metrics": {m: {k: s.get(k) for k in ("mean", "std", "n")} for m, s in metrics.items()}})
    return {"format": FORMAT, "envs": {}, "entries": entries, "superseded": superseded}


_STALE_LABEL = "recorded with config "


def _migrate_v2(data: dict) -> dict:
    """``repro-results/2`` -> the current format: stale-config variants become ``superseded`` groups."""
    superseded = []
    for name, rec in data["entries"].items():
        kept = []
        for variant in rec.get("variants") or []:
            if str(variant.get("label", "")).startswith(_STALE_LABEL):
                group = {k: v for k, v in variant.items() if k != "label"}
                superseded.append({**group, "entry": name, "reason": "the registered entry changed since"})
            else:
                kept.append(variant)
        rec["variants"] = kept
        for group in [*(rec.get("fidelities") or {}).values(), *kept]:
            group.setdefault("runs", {})
    return {"format": FORMAT, "envs": data.get("envs") or {}, "entries": data["entries"], "superseded": superseded}


def parse_record(text: str, path: str | Path) -> dict:
    """The record of a RESULTS.md text (see the module docstring); formats 1 and 2 are converted.

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
    if data.get("format") == "repro-results/2":
        return _migrate_v2(data)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown record format {data.get('format')!r} (expected {FORMAT!r})")
    data.setdefault("envs", {})
    data.setdefault("superseded", [])
    return data


def read_results(path: str | Path) -> dict:
    """Parse the machine-readable block of a RESULTS.md back (only that block is read).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: see :func:`parse_record`.
    """
    return parse_record(Path(path).read_text(), path)


def _jsonable(value):
    """``value`` with every non-finite float replaced by its name (``"nan"``, ``"inf"``): JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


_ENTRY_KEYS = ("table", "tolerance", "paper", "fidelities", "variants", "released_checkpoint")
_GROUP_KEYS = ("entry", "fidelity", "label", "config", "reason", "status", "legacy", "legacy_status", "metrics",
               "best_on_val", "seeds", "runs")


def _ordered(data: dict, keys: tuple[str, ...]) -> dict:
    """``data`` with ``keys`` first in that order, the rest sorted: one spelling per record, whatever built it."""
    return {**{k: data[k] for k in keys if k in data}, **{k: data[k] for k in sorted(data) if k not in keys}}


def _canonical_group(group: dict) -> dict:
    group = _ordered(group, _GROUP_KEYS)
    for part in ("seeds", "runs"):
        if isinstance(group.get(part), dict):
            group[part] = dict(sorted(group[part].items(), key=lambda kv: (len(kv[0]), kv[0])))
    return group


def _canonical_entry(rec: dict) -> dict:
    rec = _ordered(rec, _ENTRY_KEYS)
    if isinstance(rec.get("fidelities"), dict):
        rec["fidelities"] = {k: _canonical_group(g) for k, g in sorted(rec["fidelities"].items())}
    if isinstance(rec.get("variants"), list):
        rec["variants"] = [_canonical_group(g) for g in rec["variants"]]
    return rec


def dump_record(record: dict) -> str:
    """Valid JSON with one entry (one superseded group) per line, diff-friendly, canonical key order (equal
    records give equal text); never NaN/inf (see :func:`_jsonable`)."""
    record = _jsonable(record)
    envs = [f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True, allow_nan=False)}" for k, v in sorted(record["envs"].items())]
    rows = [f" {json.dumps(k)}: {json.dumps(_canonical_entry(v), allow_nan=False)}"
            for k, v in sorted(record["entries"].items())]
    old = [f"  {json.dumps(_canonical_group(g), allow_nan=False)}" for g in record.get("superseded") or []]
    return (f'{{"format": {json.dumps(record["format"])},\n "envs": {{' + ("\n" + ",\n".join(envs) + "\n " if envs else "")
            + '},\n "entries": {\n' + ",\n".join(rows) + "\n},\n \"superseded\": ["
            + ("\n" + ",\n".join(old) + "\n " if old else "") + "]}")


def check_against(results: dict, entry: str, summary: dict[str, float], *, fidelity: str = "paper",
                  config_hash: str | None = None) -> list[str]:
    """Compare a fresh run's numbers with the recorded ones (the machine-readable record only).

    Args:
        results: the dict from :func:`read_results`.
        entry: entry name, e.g. ``demo/nyuv2-mini``.
        summary: the fresh run's ``metrics.json`` ``summary`` (metric -> value, x100).
        fidelity: the fresh run's fidelity profile; its recorded group is the reference.
        config_hash: the fresh run's :func:`repro.config.identity.config_hash`; a recorded group made
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
    if not (finite(tol) or (isinstance(tol, dict) and all(finite(v) for v in tol.values()))):
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
        if not finite(mean):
            failures.append(f"{entry}: {metric} has no recorded value")
        elif fresh is None:
            failures.append(f"{entry}: {metric} missing from the fresh run (recorded {mean:.2f})")
        elif not finite(fresh):
            failures.append(f"{entry}: {metric} = {fresh} in the fresh run (recorded {mean:.2f})")
        elif limit is None:
            failures.append(f"{entry}: no tolerance recorded for {metric}")
        elif abs(fresh - mean) > limit:
            failures.append(f"{entry}: {metric} = {fresh:.2f}, recorded {mean:.2f} "
                            f"(Δ {fresh - mean:+.2f}, tolerance ±{limit:g})")
    return failures
