"""``repro plan TABLE...``: what a reproduction costs, projected from a measured stage profile.

A *profile* is the JSON written by ``benchmarks/bench_stages.py`` on some hardware: the throughput
of every stage (prepare, depth, shards, loader, kNN search, backbone, training step, validation,
evaluation parts, CRF). The plan multiplies those rates by the work each run does, read from the
entry's resolved config in each fidelity and the dataset sizes in ``data_manifests/``
(:mod:`repro.cluster.costs`), and sums hours per entry, per table and in total:

* **GPU-h**: stages that run on the accelerator (backbone passes, depth networks, training steps,
  head and upsampling in evaluation) -- wall hours on one device of the profile. With a profile
  measured on a CPU they are hours on that CPU, and the plan says so.
* **CPU-h**: stages that only use CPUs (prepare, shards, the training loader, DenseCRF, a faiss-cpu
  kNN search) -- core-hours (wall time of the measurement x the cores it used).

Data stages are shared exactly as ``repro run`` shares them (one folder per
:func:`repro.runs.entry.data_paths` identity), so they are counted once per plan and once per table.
Without ``--profile`` (or ``$REPRO_PROFILE``) the plan uses the default profile shipped in
``benchmarks/profiles/`` and says loudly that it was not measured on the target hardware.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from repro.config.fidelity import profiles_for
from repro.cluster.costs import (PROFILE_SCHEMA, StageHours, WORK, DataStage, PlanError, Profile, data_stages, dataset_sizes,
                               feature_dim, hours_by_stage, peak_memory, run_costs)

__all__ = ["PROFILE_SCHEMA", "DEFAULT_PROFILE", "PlanError", "Profile", "RunPlan", "Plan", "load_profile",
           "default_profile_path", "make_plan", "format_plan", "print_plan", "plan_targets"]

DEFAULT_PROFILE = "published-amp-pt240-rtx4090.json"
"""File name of the default profile in ``benchmarks/profiles/``: PUBLISHED RTX 4090 figures and derivations
(``benchmarks/published_profiles.py``), not a measurement; the plan says so."""
FEATURE_STORE_MODES = ("auto", "on", "off", "config")

PRODUCE = ("name a shipped one (published-amp-pt240-rtx4090, published-amp-pt240-rtx3090, published-fp32-v100, "
           "cpu-2core) or measure one on the target hardware: `benchmarks/gpu_check.sh` (on a GPU node; writes "
           "build/gpu-check/profile.json) or `python benchmarks/bench_stages.py --out PROFILE.json`, then "
           "`repro plan all --profile PROFILE.json`")


@dataclass
class RunPlan(StageHours):
    """One entry in one fidelity, all seeds: its settings and hours per stage (seeds included)."""

    entry: str
    fidelity: str
    table: str
    batches: int
    batch_size: int
    val_every: int
    crf: bool
    flip: bool
    n_train: int
    n_val: int
    step_profile: str
    data: list[str]
    gpu_by_stage: dict[str, float]
    cpu_by_stage: dict[str, float]
    peak_gib: dict[str, float] = field(default_factory=dict)


@dataclass
class Plan:
    """Runs grouped by table, the shared data folders (counted once), storage and notes."""

    profile: Profile
    seeds: int
    fidelities: tuple[str, ...]
    runs: list[RunPlan] = field(default_factory=list)
    data: dict[str, DataStage] = field(default_factory=dict)
    storage: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    store_note: str = ""

    @property
    def tables(self) -> dict[str, list[RunPlan]]:
        """table -> its runs, in plan order."""
        out: dict[str, list[RunPlan]] = {}
        for run in self.runs:
            out.setdefault(run.table, []).append(run)
        return out

    def data_idents(self, table: str | None) -> list[str]:
        """The shared data folders the runs of ``table`` (or of every table) use, sorted (sums in a fixed order)."""
        if table is None:
            return sorted(self.data)
        return sorted({ident for run in self.runs if run.table == table for ident in run.data})

    def data_hours(self, table: str | None) -> tuple[float, float]:
        idents = self.data_idents(table)
        return (sum(self.data[i].gpu_h for i in idents), sum(self.data[i].cpu_h for i in idents))

    def totals(self, table: str | None) -> tuple[float, float, dict[str, float], dict[str, float]]:
        """GPU-h, CPU-h and hours by stage of one table (or of everything), shared data counted once."""
        runs = self.runs if table is None else [run for run in self.runs if run.table == table]
        idents = self.data_idents(table)
        gpu: dict[str, float] = defaultdict(float)
        cpu: dict[str, float] = defaultdict(float)
        for item in [*runs, *(self.data[i] for i in idents)]:
            for k, v in item.gpu_by_stage.items():
                gpu[k] += v
            for k, v in item.cpu_by_stage.items():
                cpu[k] += v
        return sum(gpu.values()), sum(cpu.values()), dict(gpu), dict(cpu)

    def attributed(self) -> dict[str, tuple[float, float]]:
        """``table -> (GPU-h, CPU-h)`` with every shared data folder booked to the FIRST table using it, so the
        tables add up to the total (the shares printed by :func:`format_plan`)."""
        owner: dict[str, str] = {}
        for run in self.runs:
            for ident in run.data:
                owner.setdefault(ident, run.table)
        out = {t: [0.0, 0.0] for t in self.tables}
        for run in self.runs:
            out[run.table][0] += run.gpu_h
            out[run.table][1] += run.cpu_h
        for ident, table in owner.items():
            out[table][0] += self.data[ident].gpu_h
            out[table][1] += self.data[ident].cpu_h
        return {t: (g, c) for t, (g, c) in out.items()}

    def to_dict(self) -> dict:
        gpu, cpu, g_st, c_st = self.totals(None)
        return {"profile": str(self.profile.path), "profile_is_default": self.profile.is_default,
                "profile_device": self.profile.device, "seeds": self.seeds, "fidelities": list(self.fidelities),
                "projection": True, "total": {"gpu_h": gpu, "cpu_h": cpu, "gpu_by_stage": g_st, "cpu_by_stage": c_st},
                "tables": {t: dict(zip(("gpu_h", "cpu_h", "gpu_by_stage", "cpu_by_stage"), self.totals(t)))
                           for t in self.tables},
                "runs": [dataclasses.asdict(r) for r in self.runs],
                "data": {k: {**dataclasses.asdict(v), "gpu_h": v.gpu_h, "cpu_h": v.cpu_h} for k, v in self.data.items()},
                "feature_store_bytes": {f"{c}|{a}": b for (c, a), (_, b) in self.storage.items()},
                "feature_store": self.store_note, "published": bool(self.profile.data.get("published")),
                "warnings": self.warnings}


def make_plan(groups: dict[str, list[str]], profile: Profile, *, seeds: int = 3,
              fidelities: tuple[str, ...] = ("paper", "released"), overrides=(), feature_store: str = "config") -> Plan:
    """The plan of the entries in ``groups`` (``{table: [entry, ...]}``) in every fidelity, ``seeds`` each.

    ``feature_store``: ``"config"`` (each entry as configured), ``"on"`` / ``"off"`` (``train.feature_store``
    for every entry), or ``"auto"``: both, and the cheaper in accelerator hours is returned, its
    ``store_note`` naming the choice, the other total and the ``--set`` that ``repro launch`` needs.

    Raises:
        PlanError: bad seeds, a profile missing a needed stage, or a split without a count.
        UnknownEntryError / ConfigError: from loading the entries.
    """
    from repro.config.entries import load_entry
    from repro.runs.workdir import data_paths
    from repro.method.schedules import training_batches

    if seeds < 1:
        raise PlanError(f"--seeds must be >= 1, got {seeds}")
    if feature_store not in FEATURE_STORE_MODES:
        raise PlanError(f"--feature-store must be one of {', '.join(FEATURE_STORE_MODES)}, got {feature_store!r}")
    if feature_store == "auto":
        on, off = (make_plan(groups, profile, seeds=seeds, fidelities=fidelities, overrides=overrides,
                             feature_store=m) for m in ("on", "off"))
        best, other = (on, off) if on.totals(None)[0] <= off.totals(None)[0] else (off, on)
        size = sum(b for _, b in on.storage.values()) / 1e9
        best.store_note = (f"feature store {'ON' if best is on else 'OFF'} (--feature-store auto: the cheaper; "
                           f"{'with' if best is off else 'without'} it: {_h(other.totals(None)[0])} accelerator h); "
                           + (f"launch with `--set train.feature_store=true` ({size:,.1f} GB on disk)" if best is on
                              else "launch as configured"))
        return best
    if feature_store in ("on", "off"):
        overrides = (*overrides, f"train.feature_store={'true' if feature_store == 'on' else 'false'}")
    plan = Plan(profile, seeds, tuple(fidelities))
    plan.store_note = {"on": "feature store ON for every entry (--feature-store on)",
                       "off": "feature store OFF (--feature-store off)",
                       "config": "feature store as each entry configures it"}[feature_store]
    notes: list[str] = []
    for table, names in groups.items():
        for name in names:
            for fid in fidelities:
                cfg = load_entry(name, [f"fidelity={fid}", *overrides])
                n_train, n_val, source = dataset_sizes(cfg)
                costs, key, relaxed = run_costs(cfg, profile, n_train, n_val, notes)
                if relaxed:
                    notes.append(f"{name} ({fid}): training step costed with the profile's {key} (differs in "
                                 f"{', '.join(relaxed)})")
                if source != "data_manifests":
                    notes.append(f"{name}: dataset sizes from the {source}")
                stages = data_stages(cfg, profile, n_train, n_val, notes)
                plan.data.update(stages)
                t = cfg.train
                run = RunPlan(name, fid, table, training_batches(t.max_steps, t.step_unit), t.batch_size, t.val_every,
                              cfg.eval.crf, cfg.eval.flip, n_train, n_val, key, sorted(stages),
                              hours_by_stage(costs.gpu, seeds), hours_by_stage(costs.cpu, seeds),
                              peak_memory(cfg))
                plan.runs.append(run)
                c = feature_dim(cfg.model.arch)
                crops = n_train * (5 if cfg.data.five_crop else 1)
                label = str(data_paths(cfg, WORK).crops.relative_to(WORK / "data"))
                plan.storage[(label, cfg.model.arch)] = (crops, crops * 28 * 28 * c * 2)
    plan.warnings = list(dict.fromkeys(notes))
    gpu_total, cpu_total, _, _ = plan.totals(None)
    if not math.isfinite(gpu_total + cpu_total):
        raise PlanError(f"stage profile {profile.path} holds a zero or invalid rate")
    return plan


def default_profile_path() -> Path:
    """``$REPRO_PROFILES/<DEFAULT_PROFILE>`` if set, else ``benchmarks/profiles/`` of the checkout."""
    folder = os.environ.get("REPRO_PROFILES")
    base = Path(folder) if folder else Path(__file__).resolve().parents[2] / "benchmarks" / "profiles"
    return base / DEFAULT_PROFILE


def load_profile(path: str | Path | None = None) -> Profile:
    """Read a stage profile.

    Args:
        path: a JSON file written by ``benchmarks/bench_stages.py`` (or ``benchmarks/published_profiles.py``),
            or the NAME of one in ``benchmarks/profiles/`` (``published-amp-pt240-rtx3090``); ``None`` reads ``$REPRO_PROFILE``
            or, failing that, the shipped default (:func:`default_profile_path`; ``Profile.is_default``).

    Raises:
        PlanError: missing or unreadable file, or not a stage profile (names the file and the fix).
    """
    default = path is None and not os.environ.get("REPRO_PROFILE")
    path = Path(path if path is not None else os.environ.get("REPRO_PROFILE") or default_profile_path())
    named = default_profile_path().parent / (path.name if path.suffix == ".json" else f"{path.name}.json")
    if not path.is_file() and len(path.parts) == 1 and named.is_file():  # a NAME of benchmarks/profiles/
        path = named
    if not path.is_file():
        raise PlanError(f"stage profile {path} not found; {PRODUCE}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PlanError(f"stage profile {path} is not readable JSON ({exc}); {PRODUCE}") from exc
    if not isinstance(data, dict) or data.get("schema") != PROFILE_SCHEMA or not isinstance(data.get("stages"), dict):
        raise PlanError(f"{path} is not a stage profile (schema {data.get('schema') if isinstance(data, dict) else None!r}, "
                        f"expected {PROFILE_SCHEMA!r}); {PRODUCE}")
    return Profile(path, data, is_default=default)


def plan_targets(targets: Sequence[str]) -> dict[str, list[str]]:
    """Expand ``all`` (every table of ``make reproduce-all``: all but ``demo``), table keys and entry names."""
    from repro.config.entries import TABLES
    from repro.cluster.launch import resolve_targets

    expanded: list[str] = []
    for target in targets:
        expanded += [t for t in TABLES if t != "demo"] if target == "all" else [target]
    return resolve_targets(expanded)


def _h(hours: float) -> str:
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.1f}" if hours >= 1 else f"{hours:.2f}"


def _dominant(by_stage: dict[str, float]) -> str:
    total = sum(by_stage.values())
    if total <= 0:
        return "-"
    stage = max(by_stage, key=by_stage.__getitem__)
    return f"{stage} {100 * by_stage[stage] / total:.0f}%"


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def units(profile: Profile) -> tuple[str, str]:
    """Column labels ``(accelerator stages, CPU stages)``, each naming its unit and device: ``GPU-h@RTX 4090`` only
    for a profile measured or estimated on a GPU; a CPU-measured profile's accelerator stages are ``h@CPU``
    (wall hours of the CPU that ran them); CPU stages are always core-hours ``core-h@CPU``."""
    meta = profile.data
    if profile.device == "cuda":
        return f"GPU-h@{meta.get('device_label') or meta.get('device_name') or 'GPU'}", "core-h@CPU"
    return f"h@CPU({meta.get('threads', '?')}thr)", "core-h@CPU"


def _banner(profile: Profile) -> list[str]:
    meta, shown = profile.data, _shown(profile.path)
    acc, cpu = units(profile)
    if meta.get("published"):
        lines = [f"profile: {shown} -- PUBLISHED throughput for {meta.get('device_name', '?')} (compiled "
                 f"{meta.get('created', '?')}; sources and every derived factor inside the file), NOT measured on "
                 "your GPU: `benchmarks/gpu_check.sh` measures one, then `repro plan all --profile "
                 "build/gpu-check/profile.json`"]
    else:
        where = (f"{meta.get('device', '?')} ({meta.get('device_name', '?')}, {meta.get('threads', '?')} threads, "
                 f"load average {meta.get('load_avg', '?')})")
        lines = [f"profile: {shown} -- MEASURED on {where} at {meta.get('created', '?')}"]
    if profile.is_default:
        lines.insert(0, f"no --profile (or $REPRO_PROFILE): using the default profile {DEFAULT_PROFILE}")
    if meta.get("tiny") or meta.get("quick"):
        lines.append(f"WARNING: this profile was measured with {'--tiny (toy image sizes)' if meta.get('tiny') else '--quick'}"
                     f"; {'its hours mean nothing' if meta.get('tiny') else 'its rates are single, noisy repetitions'}")
    if profile.device != "cuda":
        lines.append(f"{acc}: the accelerator stages were measured on this profile's CPU, so they are wall hours on "
                     "that CPU (there is no GPU figure in this plan)")
    lines.append(f"units: {acc} = wall hours of the accelerator stages on one device; {cpu} = CPU core-hours "
                 "(prepare, shards, loader, store reads, DenseCRF, CPU kNN)")
    return lines


def _share(part: float, total: float) -> str:
    return f"{100 * part / total:4.0f}%" if total > 0 else "   -"


def format_plan(plan: Plan) -> str:
    """The plan as text: banner, one row per (entry, fidelity), shared data, table totals, total with each table's
    and each stage's share, peak accelerator memory, feature store, notes."""
    gpu, cpu = units(plan.profile)
    w = max(len(gpu), 9)
    lines = _banner(plan.profile)
    lines.append(f"seeds {plan.seeds}, fidelities {'+'.join(plan.fidelities)}; hours are per entry and fidelity "
                 f"for all seeds; data stages are listed once per folder and counted once; {plan.store_note}")
    head = (f"{'entry':30s} {'fidelity':8s} {'batches':>7s} {'batch':>5s} {'val':>4s} {'crf':>3s} {'flip':>4s} "
            f"{'n_val':>6s} {gpu:>{w}s} {cpu:>10s} {'peak GiB':>8s}  dominant (accelerator | CPU)")
    for table, runs in plan.tables.items():
        lines += ["", f"# {table}", head]
        for run in runs:
            peak = max(run.peak_gib.values()) if run.peak_gib else float("nan")
            lines.append(f"{run.entry:30s} {run.fidelity:8s} {run.batches:7d} {run.batch_size:5d} {run.val_every:4d} "
                         f"{'y' if run.crf else 'n':>3s} {'y' if run.flip else 'n':>4s} {run.n_val:6d} "
                         f"{_h(run.gpu_h):>{w}s} {_h(run.cpu_h):>10s} {peak:8.1f}  {_dominant(run.gpu_by_stage)} | "
                         f"{_dominant(run.cpu_by_stage)}")
        gpu_t, cpu_t, g_st, c_st = plan.totals(table)
        data_gpu, data_cpu = plan.data_hours(table)
        lines.append(f"{'shared data of ' + table:30s} {'':8s} {len(plan.data_idents(table)):7d} folders "
                     f"{'':19s} {_h(data_gpu):>{w}s} {_h(data_cpu):>10s}")
        lines.append(f"{table + ' total':30s} {'':48s} {_h(gpu_t):>{w}s} {_h(cpu_t):>10s}  {_dominant(g_st)} | "
                     f"{_dominant(c_st)}")
    lines += ["", "shared data stages (each counted once):"]
    for ident, stage in sorted(plan.data.items()):
        lines.append(f"  {stage.stage:8s} {gpu} {_h(stage.gpu_h):>7s}  {cpu} {_h(stage.cpu_h):>7s}  {stage.label}")
    gpu_t, cpu_t, g_st, c_st = plan.totals(None)
    lines += ["", f"TOTAL ({len(plan.runs)} entry x fidelity, {len(plan.runs) * plan.seeds} runs, "
                  f"{len(plan.data)} shared data folders): {gpu} {_h(gpu_t)}, {cpu} {_h(cpu_t)} (PROJECTION)",
              f"dominant stage: {gpu} {_dominant(g_st)}; {cpu} {_dominant(c_st)}",
              f"share by table (each shared data folder booked to the first table using it):"]
    for table, (g, c) in plan.attributed().items():
        lines.append(f"  {table:10s} {gpu} {_h(g):>7s} {_share(g, gpu_t)}   {cpu} {_h(c):>7s} {_share(c, cpu_t)}")
    lines.append("share by stage:")
    for name, hours in sorted(g_st.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:18s} {gpu} {_h(hours):>7s} {_share(hours, gpu_t)}")
    for name, hours in sorted(c_st.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:18s} {cpu} {_h(hours):>7s} {_share(hours, cpu_t)}")
    peaks: dict[str, float] = {}
    for run in plan.runs:
        for stage, gib in run.peak_gib.items():
            peaks[stage] = max(peaks.get(stage, 0.0), gib)
    measured = {k: v.get("cuda_peak_mib") for k, v in plan.profile.data["stages"].items()
                if k.startswith("memory/") and v.get("cuda_peak_mib")}
    lines.append("peak accelerator memory per stage, largest over the runs (DERIVED: repro.cluster.costs.peak_memory; "
                 "training at batch B x 2 views at 224 px, evaluation at 320 px): "
                 + ", ".join(f"{k} {v:.1f} GiB" for k, v in sorted(peaks.items()))
                 + ("; measured by the profile: " + ", ".join(f"{k} {v / 1024:.1f} GiB" for k, v in sorted(measured.items()))
                    if measured else ""))
    lines.append("several GPUs per run: not offered (repro launch refuses --gpus > 1: one process per job); many "
                 "single-GPU array tasks are the cheaper shape, each run's peak memory fits one GPU")
    for check in plan.profile.data.get("checks", {}).values():  # published statements, not used for any rate
        figure = "not stated" if check.get("figure") is None else f"{check['figure']:g} {check.get('unit', '')}"
        lines.append(f"published figure to compare (not used for a rate): {figure} -- {check['row']} ({check['where']})")
    lines.append(f"{plan.store_note}")
    lines.append("feature store (fp16 features of every training crop, crops x 28 x 28 x C x 2 bytes; optional: "
                 "--feature-store off):")
    for (crops, arch), (n, size) in sorted(plan.storage.items()):
        lines.append(f"  {crops:60s} {arch:17s} {n:>9,d} crops {size / 1e9:8.1f} GB")
    lines.append(f"  total {sum(s for _, s in plan.storage.values()) / 1e9:.1f} GB")
    if plan.warnings:
        lines += ["", "notes:"] + [f"  - {w}" for w in plan.warnings]
    return "\n".join(lines)


def print_plan(targets: Sequence[str], *, seeds: int = 3, fidelity: str = "both", overrides: Sequence[str] = (),
               profile: str | Path | None = None, json_out: str | Path | None = None,
               feature_store: str = "auto") -> Plan:
    """Build the plan of ``targets``, print it, optionally write it as JSON; return it."""
    try:
        fidelities = profiles_for(fidelity)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    plan = make_plan(plan_targets(targets), load_profile(profile), seeds=seeds, fidelities=fidelities,
                     overrides=overrides, feature_store=feature_store)
    print(format_plan(plan))
    if json_out:
        from repro.utils.files import atomic_path

        with atomic_path(json_out, suffix=".json") as tmp:
            Path(tmp).write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    return plan
