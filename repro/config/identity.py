"""What identifies a run: its resolved config (with the fidelity profile), and a safe run name.

Two runs of one entry are the same experiment (their seeds may be averaged) exactly when their
resolved configs agree on every key that can change a number. :data:`NOT_IDENTITY` lists the
keys that cannot: the seed (it is what varies across seeds), where files live on this machine
(``data.root``, ``model.checkpoint``, ``data.depth_weights``, ``data.depth_files``), descriptive text, and
bookkeeping that leaves the computation unchanged (worker counts, cache sizes, log and
checkpoint intervals, batch size of the evaluation, figures). Everything else, including
``fidelity`` and every switch it resolves to, is part of the identity. Keys added after runs were
recorded (:data:`ADDED_KEYS`) take part only where they differ from the value that reproduces the
computation from before they existed, so a record's hashes stay valid.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

__all__ = ["NOT_IDENTITY", "ADDED_KEYS", "flat_config", "identity", "config_hash", "config_diff",
           "describe_diff", "check_run_name", "content_mismatch"]

NOT_IDENTITY = frozenset({
    "name", "table", "description", "paper",
    "train.seed",
    "data.root", "data.depth_weights", "data.depth_files", "model.checkpoint",
    "train.num_workers", "train.feature_cache_gb", "train.log_every", "train.hist_every",
    "train.checkpoint_every", "train.keep_checkpoints",
    "eval.crf_processes", "eval.batch_size", "eval.num_figures",
})
"""Config keys that do not take part in a run's identity (see the module docstring)."""

ADDED_KEYS: dict[str, object] = {"scale": "full", "data.train_subset": 0, "data.val_subset": 0,
                                  "model.backbone_precision": "default"}
"""Keys added after runs were recorded, with the value that computes what the runs without the key
computed: at that value they are left out of the identity, so earlier run folders and records keep
their hashes."""

_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def flat_config(config: Any) -> dict[str, Any]:
    """A config as ``{"section.key": value}`` (an :class:`~repro.config.ExperimentConfig` or its dict).

    ``paper`` (a mapping of published numbers) stays one value.
    """
    if not isinstance(config, Mapping):
        from repro.config.loader import config_to_dict

        config = config_to_dict(config)

    def walk(data: Mapping, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in data.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping) and name != "paper":
                out.update(walk(value, f"{name}."))
            else:
                out[name] = value
        return out

    return walk(config, "")


def identity(config: Any) -> dict[str, Any]:
    """The keys of :func:`flat_config` that identify a run (all but :data:`NOT_IDENTITY`)."""
    return {k: v for k, v in flat_config(config).items()
            if k not in NOT_IDENTITY and not (k in ADDED_KEYS and v == ADDED_KEYS[k])}


def config_hash(config: Any) -> str:
    """Short sha256 (12 hex digits) of a run's identity: equal hashes, same experiment.

    Args:
        config: an ``ExperimentConfig`` or its dict (e.g. a loaded ``config.yaml``).

    Returns:
        12 lowercase hex digits of the sha256 of the identity as canonical JSON.
    """
    text = json.dumps(identity(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _strip_content(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _strip_content(v) for k, v in value.items() if not str(k).endswith("_sha256")}
    return value


def _content_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _content_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")] if a != b and prefix.rstrip(".").endswith("_sha256") else []


def content_mismatch(recorded: Any, params: Any) -> list[str] | None:
    """The content keys (``*_sha256``, at any depth) on which recorded stage params differ from ``params``.

    Returns:
        None when the params differ in anything else too (or are equal); else the differing keys,
        e.g. ``["checkpoint_sha256"]``: the same settings, other input bytes.
    """
    if recorded == params or not isinstance(recorded, Mapping) or not isinstance(params, Mapping):
        return None
    if _strip_content(recorded) != _strip_content(params):
        return None
    return _content_diff(recorded, params) or None


def config_diff(config: Any, reference: Any) -> dict[str, tuple[Any, Any]]:
    """Identity keys on which ``config`` differs from ``reference``: ``{key: (value, reference value)}``.

    Args:
        config: the run's config (object or dict).
        reference: e.g. the registered entry in the same fidelity.
    """
    a, b = identity(config), identity(reference)
    names = sorted(set(a) | set(b))
    return {k: (a.get(k), b.get(k)) for k in names if a.get(k) != b.get(k)}


def describe_diff(diff: Mapping[str, tuple[Any, Any]], limit: int = 4) -> str:
    """``"loss.b_knn=0.1, train.max_steps=100"`` (the run's values), at most ``limit`` keys then ``+N more``."""
    items = [f"{k}={json.dumps(v[0]) if not isinstance(v[0], str) else v[0]}" for k, v in diff.items()]
    shown = ", ".join(items[:limit])
    return shown + (f", +{len(items) - limit} more" if len(items) > limit else "")


def check_run_name(name: str, origin: str = "config key 'name'") -> str:
    """Return ``name`` if it is a safe relative run name, else raise.

    A safe name is one or more ``/``-separated parts, each starting with a letter or digit and
    made of letters, digits, ``.``, ``_`` and ``-`` (so no ``..``, no absolute path, no
    backslash, no empty part): the run folder ``<work>/<name>/...`` then always stays inside the
    work folder.

    Raises:
        ConfigError: naming the value, where it came from and the fix.
    """
    from repro.config.loader import ConfigError

    parts = PurePosixPath(name).parts if name else ()
    if (not name or name.startswith("/") or "\\" in name or name != "/".join(parts)
            or not all(_NAME_PART.match(p) for p in parts)):
        raise ConfigError(f"{origin}: run name {name!r} is not a safe relative name (parts of letters, digits, "
                          "'.', '_', '-' separated by '/', no '..', no leading '/'); e.g. --set name=table1/my-variant")
    return name
