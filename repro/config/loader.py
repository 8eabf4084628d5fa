"""Load, merge and validate experiment configs (YAML -> :class:`ExperimentConfig`).

Layers, later wins: ``base.yaml`` (shipped with the package), the fidelity profile's behaviour
switches, the experiment file, the profile's entry-dependent values, the scale's layer
(:mod:`repro.config.scales`; none for ``scale: full``), then ``key.sub=value`` overrides from the
command line (:mod:`repro.config.fidelity` explains the profile layers). Each
layer is validated on its own, so an unknown key, a wrong type or a value out of range names the
file (or "command line") it came from.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from repro.config.fidelity import PROFILES, item_ids, profile_layers
from repro.config.scales import FULL, SCALES_FILE, get_scale
from repro.config.schema import ExperimentConfig
from repro.utils.errors import UserError
from repro.utils.files import atomic_path

__all__ = ["ConfigError", "load_config", "config_to_dict", "save_config", "BASE_CONFIG", "RANGES"]

BASE_CONFIG = Path(__file__).with_name("base.yaml")

CHOICES: dict[str, tuple[str, ...]] = {
    "method": ("depthg", "stego", "dino"),
    "scale": ("full", "smoke"),
    "fidelity": ("paper", "released"),
    "data.dataset": ("cocostuff27", "cityscapes27", "potsdam3", "nyuv2"),
    # kbr / files: per-image maps computed elsewhere (data.depth_files, repro.depth.files); mde_features,
    # semseg: DepthG supplement Table 3's other guidance signals (repro.method.guidance)
    "data.depth_source": ("zoedepth", "midas", "sensor", "image_plane", "perspective_plane", "none",
                          "kbr", "mde_features", "semseg", "files"),
    "data.resize": ("bilinear", "nearest"),
    "data.train_crop_codec": ("png", "jpeg"),
    "data.depth_scope": ("crop", "image"),
    "data.depth_encoding": ("float", "uint8", "int_cast"),
    "model.arch": ("vit_small_patch8", "vit_base_patch8"),
    "model.pos_embed": ("dino", "timm"),
    "loss.reduction": ("mean", "sum"),
    "loss.depth_kernel": ("product", "released"),
    "loss.negative_perm": ("derangement", "super_perm"),
    "loss.negative_coords": ("own", "knn"),
    "sampling.mode": ("random", "fps", "full"),
    "sampling.fps_order": ("xy", "released"),
    "lhp.propagation": ("depth", "attention"),
    "lhp.variant": ("paper", "released"),
    "train.step_unit": ("batch", "released"),
    "train.precision": ("bf16", "fp32"),
    "model.backbone_precision": ("default", "bf16", "fp32"),
    "eval.crf_image": ("rgb", "bgr_truncated"),
}

RANGES: dict[str, tuple[float | None, float | None, str]] = {
    # key: (lowest allowed, highest allowed, what the bound means); None = unbounded; bounds inclusive
    "data.crop_size": (8, None, "pixels, a multiple of the patch size 8"),
    "data.val_size": (8, None, "pixels, a multiple of the patch size 8"),
    "data.shard_size": (1, None, "crops per shard"),
    "data.num_neighbors": (1, None, "the partner is drawn from ranks 1..num_neighbors"),
    "data.knn_k": (2, None, "neighbours kept per crop"),
    "data.train_subset": (0, None, "images (0 = every image of the split)"),
    "data.val_subset": (0, None, "images (0 = every image of the split)"),
    "data.knn_dropout": (0.0, 0.99, "a dropout probability"),
    "model.code_dim": (1, None, "code channels Q"),
    "model.dropout": (0.0, 0.99, "a dropout probability"),
    "loss.neg_samples": (0, None, "negative draws"),
    "sampling.feature_samples": (2, None, "N, samples per side (N x N)"),
    "sampling.decrease_every": (1, None, "steps between N decreases"),
    "sampling.n_min": (1, None, "the smallest N"),
    "sampling.released_n_start": (1, None, "N"),
    "sampling.released_factor": (1e-9, 1.0, "a decay factor in (0, 1]"),
    "sampling.fov_deg": (1e-9, 179.999, "degrees in (0, 180)"),
    "guidance.decay_step": (1, None, "steps between decays"),
    "guidance.decay_factor": (1e-9, 1.0, "a decay factor in (0, 1]"),
    "lhp.k": (0, None, "neighbours per cell"),
    "lhp.weight": (0.0, None, "a loss weight"),
    "train.max_steps": (1, None, "training steps"),
    "train.batch_size": (2, None, "images per batch (random negatives need two)"),
    "train.lr": (1e-12, None, "a learning rate"),
    "train.probe_lr": (1e-12, None, "a learning rate"),
    "train.checkpoint_every": (1, None, "batches between checkpoints"),
    "train.keep_checkpoints": (1, None, "checkpoints kept"),
    "train.val_every": (0, None, "batches between validations (0 = off)"),
    "train.log_every": (1, None, "batches between log lines"),
    "train.hist_every": (0, None, "batches between histograms (0 = off)"),
    "train.feature_cache_gb": (0.0, None, "GiB"),
    "train.num_workers": (0, None, "loader processes"),
    "eval.crf_processes": (-1, None, "processes (0 = in-process, -1 = every CPU)"),
    "eval.batch_size": (1, None, "images per batch"),
    "eval.num_figures": (0, None, "figures"),
}
"""Ranges of numeric keys (checked per layer, so the error names the file the value came from)."""


class ConfigError(UserError, ValueError):
    """An invalid config value; the message names the key and where it came from."""


def _check_value(value: Any, hint: Any, key: str, origin: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: '{key}' must be a mapping, got {type(value).__name__}")
        return _check_mapping(value, hint, key, origin)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_value(value, inner, key, origin)
    if typing.get_origin(hint) is dict:
        inner = typing.get_args(hint)[1]
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{origin}: '{key}' must be a mapping of names to {inner.__name__} values")
        return {k: _check_value(v, inner, f"{key}.{k}", origin) for k, v in value.items()}
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if not ok:
        raise ConfigError(f"{origin}: '{key}' must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{origin}: '{key}' must be one of {CHOICES[key]}, got {value!r}")
    if key in RANGES:
        lo, hi, meaning = RANGES[key]
        if (lo is not None and value < lo) or (hi is not None and value > hi) or value != value:
            low = "> 0" if lo is not None and 0 < lo < 1e-6 else f">= {lo:g}"
            bounds = low if hi is None else f"{low} and <= {hi:g}"
            raise ConfigError(f"{origin}: '{key}' must be {bounds} ({meaning}), got {value!r}")
        if key in ("data.crop_size", "data.val_size") and value % 8:
            raise ConfigError(f"{origin}: '{key}' must be a multiple of 8 (the ViT patch size), got {value!r}")
    return float(value) if hint is float else value


def _check_mapping(data: dict, cls: type, prefix: str, origin: str) -> dict:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{origin}: unknown key '{dotted}' (known: {', '.join(sorted(names))})")
        out[key] = _check_value(value, hints[key], dotted, origin)
    return out


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "paper":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def _parse_override(text: str) -> dict:
    if "=" not in text:
        raise ConfigError(f"command line: override {text!r} must look like key.sub=value")
    dotted, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"command line: the value of '{dotted.strip()}' is not a valid YAML value: {raw!r} "
                          f"({problem})") from None
    nested: dict = {}
    cursor = nested
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def _build(cls: type, data: dict) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            hint = typing.get_type_hints(cls)[f.name]
            kwargs[f.name] = _build(hint, data[f.name]) if dataclasses.is_dataclass(hint) else data[f.name]
    return cls(**kwargs)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (), *,
                base: str | Path | None = BASE_CONFIG, resolve_fidelity: bool | None = None) -> ExperimentConfig:
    """Load an experiment config and resolve its fidelity profile.

    Args:
        path: the experiment YAML (None: base and overrides only).
        overrides: ``key.sub=value`` strings (values parsed as YAML scalars).
        base: the base YAML (None to skip).
        resolve_fidelity: apply the ``fidelity`` profile (:mod:`repro.config.fidelity`); ``False``
            reads an already resolved config (a run's ``config.yaml``) as it is. Default: resolve
            unless ``base`` is None (a saved, complete config is read with ``base=None``).

    Returns:
        The validated :class:`ExperimentConfig`; ``fidelity_deviations`` lists every key whose
        value differs from what its profile prescribes (an explicit choice, recorded).

    Raises:
        ConfigError: unknown key, wrong type, value outside its choices or range, unknown fidelity
            or fidelity item; the message names the key and the file (or "command line").
        FileNotFoundError: if a config file is missing.
    """
    def checked(origin: str, data: dict) -> tuple[str, dict]:
        data = _check_mapping(data, ExperimentConfig, "", origin)
        _check_fidelity_items(data, origin)
        return origin, data

    base_layers = [checked(str(base), _read_yaml(Path(base)))] if base is not None else []
    file_layers = [checked(str(path), _read_yaml(Path(path)))] if path is not None else []
    cli = [checked("command line", _parse_override(o)) for o in overrides]
    entry: dict = {}
    for _, data in base_layers + file_layers + cli:
        entry = _merge(entry, data)
    if resolve_fidelity is False or (resolve_fidelity is None and base is None):
        return _build(ExperimentConfig, entry)
    fidelity, items = entry.get("fidelity", "paper"), entry.get("fidelity_items", {})
    unconditional, conditional = profile_layers(fidelity, entry, items)
    scale = get_scale(entry.get("scale", FULL))
    scaled = [checked(f"{SCALES_FILE.name} ({scale.name})", scale.config)] if scale.config else []
    merged: dict = {}
    for _, data in base_layers + unconditional + file_layers + conditional + scaled + cli:
        merged = _merge(merged, data)
    merged["fidelity_deviations"] = _deviations(merged, unconditional + conditional + scaled)
    return _build(ExperimentConfig, merged)


def _check_fidelity_items(data: dict, origin: str) -> None:
    for item_id, profile in (data.get("fidelity_items") or {}).items():
        if item_id not in item_ids():
            raise ConfigError(f"{origin}: unknown fidelity item 'fidelity_items.{item_id}' "
                              f"(known: {', '.join(item_ids())})")
        if profile not in PROFILES:
            raise ConfigError(f"{origin}: 'fidelity_items.{item_id}' must be one of {PROFILES}, got {profile!r}")


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("paper", "fidelity_items", "fidelity_deviations"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _deviations(merged: dict, profile: list[tuple[str, dict]]) -> dict[str, str]:
    """Keys whose final value differs from the value the (last applicable) profile layer sets."""
    final = _flat(merged)
    wanted: dict[str, tuple[str, Any]] = {}
    for origin, layer in profile:
        for key, value in _flat(layer).items():
            wanted[key] = (origin, value)
    return {key: f"{origin} sets {value!r}; this config has {final.get(key)!r}"
            for key, (origin, value) in sorted(wanted.items()) if final.get(key) != value}


def config_to_dict(config: ExperimentConfig) -> dict:
    """Plain-dict form of a config (for YAML/JSON output)."""
    return dataclasses.asdict(config)


def save_config(config: ExperimentConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return Path(path)
