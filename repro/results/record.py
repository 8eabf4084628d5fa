"""The record behind RESULTS.md: runs read from a work dir (:mod:`repro.results.runs`) merged into it, and the
record brought in line with today's registry.

Runs are identified by what they ran (:mod:`repro.config.identity`): seeds are averaged only when their saved
configs agree on every identity key. A run whose config equals the registered entry in its fidelity
joins the entry's group; one whose config equals a config the entry was registered with before joins
that superseded group; every other config is a run with user overrides (a variant, labelled with the
keys it overrides). A run without a readable ``config.yaml`` cannot be attributed and is a variant too.
Smoke runs never enter the record.

:func:`normalise` is the only place the registry changes the record: a group recorded under a config
the entry no longer has moves to ``superseded`` (empty ones are dropped: they carry nothing), so the
tables never show a row twice, and it is idempotent, so rendering the record again changes nothing.
"""

from __future__ import annotations

from pathlib import Path

from repro.config.entries import list_entries
from repro.config.identity import describe_diff
from repro.results.document import FIDELITIES, FORMAT, finalize_group, new_group
from repro.results.runs import SeedRun, collect_checkpoint, collect_runs, env_identity, reference_hash, \
    registered_config, registered_paper

__all__ = ["merge_entry", "normalise", "new_record"]


def _relative(path: Path, work_dir: Path) -> str:
    """A run folder as ``<entry>/<fidelity>/seed<S>`` (relative to the work dir: RESULTS.md names no machine path)."""
    try:
        return path.relative_to(work_dir).as_posix()
    except ValueError:
        return path.name


def _merge_runs(group: dict, runs: list[SeedRun], work_dir: Path, envs: dict) -> dict:
    """Merge this work dir's runs of one config into its group: a done seed replaces its recorded one."""
    group = {**new_group(group.get("config")), **group}
    seeds, others = dict(group.get("seeds") or {}), dict(group.get("runs") or {})
    for run in runs:
        key = str(run.seed)
        where = _relative(run.path, work_dir)
        if run.state == "done":
            env_id, kept, host = env_identity(run.env)
            envs[env_id] = kept
            seed = {"final": {k: round(v, 4) for k, v in run.summary.items()},
                    "best_on_val": {k: round(v, 4) for k, v in run.best.items()}, "env": env_id, "host": host,
                    "run": where}
            seed.update({k: v for k, v in (("date", run.date), ("backbone_sha256", run.backbone_sha256)) if v})
            if run.resources:
                seed["resources"] = run.resources
            seeds[key] = seed
            others.pop(key, None)
        else:
            state = {"state": run.state, "run": where}
            if run.reason:
                state["reason"] = run.reason
            if run.state == "failed" and run.log:
                state["log"] = _relative(Path(run.log), work_dir) if Path(run.log).is_absolute() else run.log
            if run.date:
                state["date"] = run.date
            others[key] = state
    group["seeds"], group["runs"] = seeds, others
    return finalize_group(group)


def new_record() -> dict:
    """An empty record of the current format."""
    return {"format": FORMAT, "envs": {}, "entries": {}, "superseded": []}


def _superseded_hashes(record: dict, name: str, fid: str) -> set:
    return {g.get("config") for g in record.get("superseded") or []
            if g.get("entry") == name and g.get("fidelity") == fid and g.get("config")}


def merge_entry(record: dict, name: str, table: str, work_dir: Path, tolerance: float) -> None:
    """Merge the runs of one registered entry found in ``work_dir`` into ``record`` (in place).

    Run at the full scale only (smoke runs never enter the record). Call :func:`normalise` afterwards.
    """
    previous = record["entries"].get(name) or {}
    rec = {"table": table, "tolerance": previous.get("tolerance", tolerance), "paper": registered_paper(name),
           "fidelities": dict(previous.get("fidelities") or {}), "variants": list(previous.get("variants") or []),
           "released_checkpoint": collect_checkpoint(work_dir, name) or previous.get("released_checkpoint")}
    if rec["tolerance"] is None:
        rec["tolerance"] = tolerance
    references = {fid: registered_config(name, fid) for fid in FIDELITIES}
    for fid in FIDELITIES:
        ref_hash = reference_hash(name, fid)
        runs = collect_runs(work_dir, name, fid, references=references)
        main = rec["fidelities"].get(fid) or new_group(ref_hash)
        old_main = main.get("config")
        if old_main != ref_hash:  # recorded under the entry's former config: normalise() moves it aside
            if main.get("seeds") or main.get("legacy"):
                record["superseded"].append({**main, "entry": name, "fidelity": fid,
                                             "reason": "the registered entry changed since"})
            main = new_group(ref_hash)
        rec["fidelities"][fid] = _merge_runs(main, [r for r in runs if r.config == ref_hash], work_dir, record["envs"])
        # configs this entry was registered with before: their runs are superseded, not override runs
        stale = _superseded_hashes(record, name, fid) | ({old_main} - {None, ref_hash})
        for r in (r for r in runs if r.config in stale):
            group = next((g for g in record["superseded"]
                          if (g.get("entry"), g.get("fidelity"), g.get("config")) == (name, fid, r.config)), None)
            if group is None:
                group = {**new_group(r.config), "entry": name, "fidelity": fid,
                         "reason": "the registered entry changed since"}
                record["superseded"].append(group)
            group.update(_merge_runs(group, [r], work_dir, record["envs"]))
        by_label: dict[tuple, list[SeedRun]] = {}
        for r in (r for r in runs if r.config != ref_hash and r.config not in stale):
            label = r.config_error or describe_diff(r.diff) or f"config {r.config}"
            by_label.setdefault((r.config, label), []).append(r)
        for (config, label), group_runs in by_label.items():
            old = next((v for v in rec["variants"] if (v.get("fidelity"), v.get("config"), v.get("label"))
                        == (fid, config, label)), None)
            if old is not None:
                rec["variants"].remove(old)
            rec["variants"].append({**_merge_runs(old or new_group(config), group_runs, work_dir, record["envs"]),
                                    "fidelity": fid, "label": label})
    record["entries"][name] = rec


def _has_content(group: dict) -> bool:
    return bool(group.get("seeds") or group.get("legacy"))


def _absorb(target: dict, group: dict) -> None:
    """Add ``group``'s seeds and run states to ``target`` where ``target`` has none for that seed."""
    for part in ("seeds", "runs"):
        target.setdefault(part, {})
        for key, value in (group.get(part) or {}).items():
            target[part].setdefault(key, value)


def normalise(record: dict, names: list[str], *, prune: bool = False) -> dict:
    """Bring the record of ``names`` in line with today's registry (in place; returned). Idempotent.

    For each registered entry in ``names`` and fidelity: a main group recorded under another config
    moves to ``superseded`` (dropped when it holds no finished seed); a superseded group or variant
    whose config is the registered one again joins the main group; superseded groups are merged by
    (entry, fidelity, config); every group's seeds are checked and its aggregates recomputed
    (:func:`repro.results.document.finalize_group`); an entry without a record gets an empty one.
    With ``prune`` (a full regeneration), entries that are no longer registered at all move to
    ``superseded`` the same way, and their empty records are dropped.
    """
    record.setdefault("superseded", [])
    registered = set(list_entries())
    for name in (n for n in list(record["entries"]) if prune and n not in registered):
        rec = record["entries"].pop(name)
        for fid, group in (rec.get("fidelities") or {}).items():
            if _has_content(group):
                record["superseded"].append({**group, "entry": name, "fidelity": fid,
                                             "reason": "the entry is no longer registered"})
    for name in names:
        rec = record["entries"].setdefault(name, {"table": name.split("/")[0], "tolerance": 1.0, "paper": {},
                                                  "fidelities": {}, "variants": [], "released_checkpoint": None})
        rec["paper"] = registered_paper(name)
        rec.setdefault("variants", [])
        rec.setdefault("released_checkpoint", None)
        fidelities = rec.setdefault("fidelities", {})
        for fid in FIDELITIES:
            ref_hash = reference_hash(name, fid)
            main = fidelities.get(fid) or new_group(ref_hash)
            if main.get("config") != ref_hash:
                if _has_content(main):
                    record["superseded"].append({**main, "entry": name, "fidelity": fid,
                                                 "reason": "the registered entry changed since"})
                main = new_group(ref_hash)
            for group in [g for g in record["superseded"] if (g.get("entry"), g.get("fidelity"), g.get("config"))
                          == (name, fid, ref_hash)]:
                record["superseded"].remove(group)
                _absorb(main, group)
            for variant in [v for v in rec["variants"] if v.get("fidelity") == fid and v.get("config") == ref_hash]:
                rec["variants"].remove(variant)
                _absorb(main, variant)
            fidelities[fid] = finalize_group(main)
        for fid in [f for f in fidelities if f not in FIDELITIES]:
            del fidelities[fid]
        rec["variants"] = sorted((finalize_group(v) for v in rec["variants"] if _has_content(v) or v.get("runs")),
                                 key=lambda v: (FIDELITIES.index(v["fidelity"]) if v["fidelity"] in FIDELITIES else 9,
                                                str(v.get("label")), str(v.get("config"))))
    merged: dict[tuple, dict] = {}
    for group in record["superseded"]:
        key = (group.get("entry"), group.get("fidelity"), group.get("config"), bool(group.get("legacy")))
        if key in merged:
            _absorb(merged[key], group)
        else:
            merged[key] = {k: v for k, v in group.items() if k not in ("label",)}
    record["superseded"] = sorted((finalize_group(g) for g in merged.values() if _has_content(g)),
                                  key=lambda g: (str(g.get("entry")), str(g.get("fidelity")), str(g.get("config"))))
    return record
