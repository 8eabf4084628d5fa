"""``results/model-index.yml``: one machine-readable record per entry and fidelity, in the style of
paperswithcode's model-index and OpenMMLab's metafiles (``Collections`` per paper table, ``Models``
with ``Config``, ``Training Resources``, ``Weights`` and ``Results``).

It is rendered from the record in RESULTS.md and today's registry (nothing else), so it can be
checked for staleness like RESULTS.md itself. As in OpenMMLab's metafile check, no value is null or
empty: whatever is not known yet is the string ``pending: <reason>`` (:func:`validate` enforces it).
Per model: the entry; per metric the paper's table, row, column and quoted value, the published
checkpoint's score, mean, std, n and the per-seed values; the fidelity and seeds; the config hash,
batch per process, world size and effective batch; accelerator type x count, measured wall- and
accelerator-hours; the dataset manifest's and the backbone's and published checkpoint's sha256;
torch and CUDA (torch's build) versions.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import yaml

from repro.config.entries import TABLES, entry_path, list_entries
from repro.config.papertables import paper_cell, paper_citation, paper_order
from repro.results.document import FIDELITIES, METRICS
from repro.results.runs import registered_config
from repro.utils.files import file_sha256

__all__ = ["INDEX_FORMAT", "build_index", "dump_index", "validate", "validate_file"]

INDEX_FORMAT = "repro-model-index/1"
DATASET_NAMES = {"cocostuff27": "COCO-Stuff-27", "cityscapes27": "Cityscapes-27", "potsdam3": "Potsdam-3",
                 "nyuv2": "NYUv2"}
TASKS = {"unsup": "Unsupervised Semantic Segmentation (cluster probe, Hungarian matching)",
         "linear": "Semantic Segmentation (linear probe)"}
_NO_SEED = "pending: no finished seed yet"
_REPO = Path(__file__).resolve().parents[2]


def _pending(reason: str) -> str:
    return f"pending: {reason}"


@functools.lru_cache(maxsize=None)
def _manifest(dataset: str) -> tuple[str, str]:
    from repro.data.datasets.manifest import manifest_dir

    path = manifest_dir() / f"{dataset}.yaml"
    shown = f"data_manifests/{dataset}.yaml"
    return shown, file_sha256(path) if path.is_file() else _pending(f"{shown} not found")


def _common(seeds: dict, get, what: str):
    """One value shared by every seed; ``pending`` naming the seeds without it; ``mixed: ...`` if they differ."""
    if not seeds:
        return _NO_SEED
    values = {k: get(s) for k, s in seeds.items()}
    missing = [k for k, v in values.items() if v is None or v == ""]
    if missing:
        return _pending(f"{what} not recorded for seed {', '.join(missing)} (recorded before repro-results/3)")
    distinct = sorted({str(v) for v in values.values()})
    if len(distinct) == 1:
        return next(iter(values.values()))
    return "mixed: " + "; ".join(f"{d} (seed {', '.join(k for k, v in values.items() if str(v) == d)})"
                                 for d in distinct)


def _hours(seeds: dict, key: str, what: str):
    if not seeds:
        return _NO_SEED
    missing = [k for k, s in seeds.items() if not isinstance((s.get("resources") or {}).get(key), (int, float))]
    if missing:
        return _pending(f"{what} not recorded for seed {', '.join(missing)}")
    return round(sum(s["resources"][key] for s in seeds.values()) / 3600.0, 4)


def _accelerator(seed: dict):
    res = seed.get("resources") or {}
    if "accelerator" not in res:
        return None
    if not res.get("accelerator_count"):
        return "none (CPU)" if res["accelerator"].startswith("none") else None
    return f"{res['accelerator']} x {res['accelerator_count']}"


def _effective_batch(seed: dict):
    res = seed.get("resources") or {}
    if "batch_size" in res and "world_size" in res:
        return res["batch_size"] * res["world_size"]
    return None


def _value(v) -> float:
    return round(float(v), 4)


def _metric(table: str, name: str, metric: str, rec: dict, group: dict, published, quoted_values: dict) -> dict:
    paper = quoted_values.get(metric)
    cell = paper_cell(table, name, metric)
    stats = (group.get("metrics") or {}).get(metric) or {}
    best = (group.get("best_on_val") or {}).get(metric) or {}
    ckpt = (rec.get("released_checkpoint") or {}).get("metrics") or {}
    seeds = group.get("seeds") or {}
    if cell is not None and paper is not None:
        quoted = {"Paper": cell.paper, "Table": cell.table, "Row": cell.row, "Column": cell.column,
                  "Value": _value(paper)}
    else:
        quoted = _pending("this entry's paper value is not placed in repro/config/paper_tables.yaml"
                          if paper is not None else "the paper quotes no value for this metric of this entry")
    n = int(stats.get("n") or 0)
    return {
        "Metric": metric,
        "Quoted": quoted,
        "Released Checkpoint": _value(ckpt[metric]) if metric in ckpt else _pending(
            "no published checkpoint for this entry" if published is None and not ckpt else
            f"not scored yet (`repro eval-released {name}`)"),
        "Mean": _value(stats["mean"]) if n else _NO_SEED,
        "Std": _value(stats["std"]) if n > 1 else _pending("needs at least two finished seeds"),
        "N": n,
        "Per Seed": {int(k): _value(s["final"][metric]) for k, s in seeds.items()} or _NO_SEED,
        "Best On Val Mean": _value(best["mean"]) if best.get("n") else _NO_SEED,
        "Delta To Paper": _value(stats["mean"] - paper) if n and paper is not None else _pending(
            "needs a paper value and a finished seed"),
    }


def _model(table: str, name: str, fid: str, record: dict, registry) -> dict:
    from repro.models.backbone import get_arch
    from repro.runs.released import find_published

    config = registered_config(name, fid)
    rec = record["entries"].get(name) or {}
    group = (rec.get("fidelities") or {}).get(fid) or {}
    seeds = group.get("seeds") or {}
    envs = record.get("envs") or {}
    manifest, manifest_sha = _manifest(config.data.dataset)
    published = find_published(name, registry)
    ckpt = rec.get("released_checkpoint") or {}
    if ckpt.get("sha256"):
        ckpt_sha = ckpt["sha256"]
    elif published is not None and published.sha256:
        ckpt_sha = published.sha256
    elif published is not None:
        ckpt_sha = _pending(f"{published.file} not checked yet (`repro released import`)")
    else:
        ckpt_sha = _pending("no published checkpoint for this entry")
    metrics = [m for m in METRICS if m in config.paper] or list(METRICS)
    results = []
    for prefix in ("unsup", "linear"):
        chosen = [m for m in metrics if m.startswith(prefix)]
        if chosen:
            results.append({"Task": TASKS[prefix], "Dataset": DATASET_NAMES.get(config.data.dataset, config.data.dataset),
                            "Metrics": [_metric(table, name, m, rec, group, published, config.paper) for m in chosen]})
    return {
        "Name": f"{name} [{fid}]",
        "Entry": name,
        "In Collection": table,
        "Fidelity": fid,
        "Status": group.get("status") if group.get("status") not in (None, "", "pending") else _pending(
            "no run of this entry and fidelity recorded yet"),
        "Seeds": sorted(int(k) for k in seeds) or _NO_SEED,
        "Config": {"File": entry_path(name).relative_to(_REPO).as_posix(),
                   "Hash": group.get("config") or _pending("not recorded"),
                   "Method": config.method,
                   "Batch Size Per Process": int(config.train.batch_size),
                   "World Size": _common(seeds, lambda s: (s.get("resources") or {}).get("world_size"), "world size"),
                   "Effective Batch Size": _common(seeds, _effective_batch, "batch x world size")},
        "Training Resources": {"Accelerator": _common(seeds, _accelerator, "accelerator"),
                               "Wall Hours": _hours(seeds, "wall_s", "wall time"),
                               "Accelerator Hours": _hours(seeds, "accelerator_s", "accelerator time")},
        "Data": {"Dataset": config.data.dataset, "Manifest": manifest, "Manifest sha256": manifest_sha},
        "Weights": {"Backbone": get_arch(config.model.arch).filename,
                    "Backbone sha256": _common(seeds, lambda s: s.get("backbone_sha256"), "backbone sha256"),
                    "Released Checkpoint": published.file if published is not None else _pending(
                        "no published checkpoint for this entry"),
                    "Released Checkpoint sha256": ckpt_sha},
        "Software": {"torch": _common(seeds, lambda s: envs.get(s.get("env"), {}).get("packages.torch"), "torch"),
                     "CUDA (torch build)": _common(seeds, lambda s: _cuda(envs.get(s.get("env"), {})), "CUDA")},
        "Results": results,
    }


def _cuda(env: dict):
    if not env:
        return None
    return env.get("cuda_version") or "none (CPU build)"


def build_index(record: dict, figures: dict[str, str] | None = None) -> dict:
    """The model index of every registered entry in both fidelities, from a normalised record.

    Args:
        record: the RESULTS.md record after :func:`repro.results.record.normalise`.
        figures: table key -> the figure's path relative to the repository (optional).
    """
    from repro.runs.released import load_registry

    registry = load_registry()
    collections, models = [], []
    for table, title in TABLES.items():
        names = paper_order(table, list_entries(table))
        if not names:
            continue
        collections.append({"Name": table, "Title": title,
                            "Paper": paper_citation(table) or _pending("not a paper table (pipeline demo)"),
                            "Figure": (figures or {}).get(table) or _pending("no figure written")})
        models += [_model(table, name, fid, record, registry) for name in names for fid in FIDELITIES]
    return {"Format": INDEX_FORMAT,
            "Generated": "by `repro compare` from the record in RESULTS.md and the registry; do not edit by hand",
            "Collections": collections, "Models": models}


def dump_index(index: dict) -> str:
    """YAML text (keys in order, unicode kept, wide lines); deterministic for equal input."""
    return yaml.safe_dump(index, sort_keys=False, allow_unicode=True, width=200, default_flow_style=False)


_REQUIRED = {"Name", "Entry", "In Collection", "Fidelity", "Status", "Seeds", "Config", "Training Resources",
             "Data", "Weights", "Software", "Results"}
_NESTED = {"Config": {"File", "Hash", "Method", "Batch Size Per Process", "World Size", "Effective Batch Size"},
           "Training Resources": {"Accelerator", "Wall Hours", "Accelerator Hours"},
           "Data": {"Dataset", "Manifest", "Manifest sha256"},
           "Weights": {"Backbone", "Backbone sha256", "Released Checkpoint", "Released Checkpoint sha256"},
           "Software": {"torch", "CUDA (torch build)"}}
_METRIC_KEYS = {"Metric", "Quoted", "Released Checkpoint", "Mean", "Std", "N", "Per Seed", "Best On Val Mean",
                "Delta To Paper"}
_QUOTED_KEYS = {"Paper", "Table", "Row", "Column", "Value"}


def _leaves(value, where: str, errors: list[str]) -> None:
    """No null, no empty string/list/mapping, no non-finite number, and a ``pending`` always with its reason."""
    if value is None:
        errors.append(f"{where}: null")
    elif isinstance(value, bool):
        return
    elif isinstance(value, float) and not math.isfinite(value):
        errors.append(f"{where}: {value} is not a finite number")
    elif isinstance(value, str):
        if not value.strip():
            errors.append(f"{where}: empty string")
        elif value.strip().lower().startswith("pending") and not value.startswith("pending: ") or value == "pending: ":
            errors.append(f"{where}: {value!r}: a pending value must read 'pending: <reason>'")
    elif isinstance(value, dict):
        if not value:
            errors.append(f"{where}: empty mapping")
        for k, v in value.items():
            _leaves(v, f"{where}.{k}", errors)
    elif isinstance(value, list):
        if not value:
            errors.append(f"{where}: empty list")
        for i, v in enumerate(value):
            _leaves(v, f"{where}[{i}]", errors)


def _number_or_pending(value, where: str, errors: list[str], kind=(int, float)) -> None:
    if not (isinstance(value, kind) and not isinstance(value, bool)) and not (
            isinstance(value, str) and (value.startswith("pending: ") or value.startswith("mixed: "))):
        errors.append(f"{where}: {value!r} is neither a number nor 'pending: <reason>'")


def validate(index: object) -> list[str]:
    """Check a loaded model index against its schema; one message per violation (empty: valid).

    Checked: the format tag; the keys of every collection, model, nested section and metric; that
    every model names a known collection and fidelity; numbers where numbers belong (or ``pending:``);
    the quoted paper value's table/row/column/value; and, everywhere, no null, empty or non-finite value.
    """
    errors: list[str] = []
    if not isinstance(index, dict):
        return ["the model index is not a mapping"]
    if index.get("Format") != INDEX_FORMAT:
        errors.append(f"Format: {index.get('Format')!r} (expected {INDEX_FORMAT!r})")
    _leaves(index, "index", errors)
    collections = {c.get("Name") for c in index.get("Collections") or [] if isinstance(c, dict)}
    for i, c in enumerate(index.get("Collections") or []):
        if not isinstance(c, dict) or set(c) != {"Name", "Title", "Paper", "Figure"}:
            errors.append(f"Collections[{i}]: keys {sorted(c) if isinstance(c, dict) else c!r}")
    for i, m in enumerate(index.get("Models") or []):
        where = f"Models[{i}] ({m.get('Name') if isinstance(m, dict) else '?'})"
        if not isinstance(m, dict):
            errors.append(f"{where}: not a mapping")
            continue
        if set(m) != _REQUIRED:
            errors.append(f"{where}: keys differ from the schema: missing {sorted(_REQUIRED - set(m))}, "
                          f"unknown {sorted(set(m) - _REQUIRED)}")
            continue
        if m["In Collection"] not in collections:
            errors.append(f"{where}: In Collection {m['In Collection']!r} is not a collection")
        if m["Fidelity"] not in FIDELITIES:
            errors.append(f"{where}: Fidelity {m['Fidelity']!r}")
        for section, keys in _NESTED.items():
            if not isinstance(m[section], dict) or set(m[section]) != keys:
                errors.append(f"{where}.{section}: keys {sorted(m[section]) if isinstance(m[section], dict) else '?'}"
                              f" (expected {sorted(keys)})")
        for key in ("Batch Size Per Process", "World Size", "Effective Batch Size"):
            _number_or_pending(m["Config"].get(key), f"{where}.Config.{key}", errors, int)
        for key in ("Wall Hours", "Accelerator Hours"):
            _number_or_pending(m["Training Resources"].get(key), f"{where}.Training Resources.{key}", errors)
        if not isinstance(m["Seeds"], (list, str)):
            errors.append(f"{where}.Seeds: {m['Seeds']!r}")
        for j, result in enumerate(m["Results"] or []):
            for k, metric in enumerate(result.get("Metrics") or [] if isinstance(result, dict) else []):
                mw = f"{where}.Results[{j}].Metrics[{k}]"
                if not isinstance(metric, dict) or set(metric) != _METRIC_KEYS:
                    errors.append(f"{mw}: keys {sorted(metric) if isinstance(metric, dict) else metric!r}")
                    continue
                if metric["Metric"] not in METRICS:
                    errors.append(f"{mw}: unknown metric {metric['Metric']!r}")
                quoted = metric["Quoted"]
                if isinstance(quoted, dict):
                    if set(quoted) != _QUOTED_KEYS:
                        errors.append(f"{mw}.Quoted: keys {sorted(quoted)} (expected {sorted(_QUOTED_KEYS)})")
                    _number_or_pending(quoted.get("Value"), f"{mw}.Quoted.Value", errors)
                elif not (isinstance(quoted, str) and quoted.startswith("pending: ")):
                    errors.append(f"{mw}.Quoted: {quoted!r}")
                for key in ("Released Checkpoint", "Mean", "Std", "Best On Val Mean", "Delta To Paper"):
                    _number_or_pending(metric[key], f"{mw}.{key}", errors)
                if not isinstance(metric["N"], int) or metric["N"] < 0:
                    errors.append(f"{mw}.N: {metric['N']!r}")
    return errors


def validate_file(path: str | Path) -> list[str]:
    """:func:`validate` of a YAML file (a missing or unparsable file is one message)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        return [f"{path}: {exc}"]
    return [f"{path}: {e}" for e in validate(data)]
