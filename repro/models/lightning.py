"""Read the PyTorch Lightning checkpoints published by STEGO and DepthG, and convert them into repro's parts.

Both projects publish checkpoints of their ``LitUnsupervisedSegmenter`` (``src/train_segmentation.py``;
data_manifests/released_checkpoints.yaml). Their ``state_dict`` holds the whole frozen DINO ViT (``net.model.<DINO key>``), the
segmentation head (``net.cluster1.0.*`` = linear branch, ``net.cluster2.{0,2}.*`` = MLP), the probes
(``cluster_probe.clusters``, ``linear_probe.*``), training-only parts (``train_cluster_probe.*``,
``decoder.*``) and, for DepthG runs with 3D-LHP, ``lhp_module.projection_head.{0,2}.*``. Their
``hyper_parameters`` are ``{"n_classes": K, "cfg": <pickled OmegaConf DictConfig>}``.

Nothing pickled is ever executed (:mod:`repro.models.safe_load`): ``torch.load(weights_only=True)``
with an explicit allowlist in which every OmegaConf class is an inert stand-in registered under the
OmegaConf global name (omegaconf itself is not needed), plus ``builtins.dict``,
``collections.defaultdict`` and ``typing.Any``; a file naming any other global is refused with
:class:`UnsafeCheckpointError` before anything is unpickled. The config objects become plain dicts.

:func:`read_lightning_checkpoint` reads a file, :func:`convert_checkpoint` checks the key layout
and builds the parts (:class:`ReleasedModel`): the DINO backbone state dict (official key names,
loaded by :class:`~repro.models.backbone.DinoBackbone`), :class:`~repro.models.heads.SegmentationHead`,
:class:`~repro.models.probes.ClusterProbe` (K + ``cfg.extra_clusters`` centroids),
:class:`~repro.models.probes.LinearProbe` and, if present, the LHP
:class:`~repro.models.heads.ProjectionHead` (never used by the released evaluation).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from repro.models.backbone import ARCHS, DinoBackbone
from repro.models.bundle import TrainedParts
from repro.models.heads import ProjectionHead, SegmentationHead
from repro.models.probes import ClusterProbe, LinearProbe
from repro.models.safe_load import (
    CheckpointFormatError, UnsafeCheckpointError, allowed_globals, safe_torch_load, to_plain
)
from repro.utils.errors import MissingFileError, UserError
from repro.utils.files import file_sha256

__all__ = [
    "CheckpointFormatError", "CheckpointLayoutError", "UnsafeCheckpointError", "allowed_globals", "LightningCheckpoint",
    "ReleasedModel", "read_lightning_checkpoint", "check_layout", "convert_checkpoint", "load_released",
    "write_random_checkpoint",
]


DATASET_NAMES = {"cocostuff27": "cocostuff27", "cityscapes": "cityscapes27", "potsdam": "potsdam3",
                 "potsdamraw": "potsdam3", "nyuv2": "nyuv2"}
"""``cfg.dataset_name`` of the released code -> repro dataset."""


class CheckpointLayoutError(UserError, ValueError):
    """A checkpoint whose state-dict keys or shapes do not match its saved config; the message names them."""


@dataclass
class LightningCheckpoint:
    """What a published checkpoint holds, read without executing pickled code.

    Attributes:
        path: the file. sha256: its SHA-256. size: its size in bytes.
        state_dict: parameter name -> tensor, in the file's order.
        hyper_parameters: ``{"n_classes": K, "cfg": {...}}`` as plain Python (the cfg as saved at
            the END of training: DepthG decays some values in place, see :attr:`ReleasedModel.notes`).
        lightning_version: ``pytorch-lightning_version``; global_step, epoch: the loop counters.
        top_level_keys: every top-level key of the checkpoint dict.
    """

    path: Path
    sha256: str
    size: int
    state_dict: dict[str, Tensor]
    hyper_parameters: dict[str, Any]
    lightning_version: str | None = None
    global_step: int | None = None
    epoch: int | None = None
    top_level_keys: list[str] = field(default_factory=list)
    callback_keys: str | None = None

    @property
    def layout(self) -> str:
        """How the file keys its callbacks: Lightning < 1.5 by class, later versions by string."""
        return {"class": "callbacks keyed by class, the layout of Lightning < 1.5",
                "string": "callbacks keyed by string, the layout of Lightning >= 1.5"}.get(self.callback_keys or "",
                                                                                           "no callback states")

    @property
    def cfg(self) -> dict[str, Any]:
        """The saved training config as a plain dict."""
        return self.hyper_parameters["cfg"]

    @property
    def n_classes(self) -> int:
        """K, the number of classes the probes were trained for."""
        return int(self.hyper_parameters["n_classes"])


def read_lightning_checkpoint(path: str | Path, *, extra_globals: Iterable[str] = ()) -> LightningCheckpoint:
    """Read a Lightning checkpoint of STEGO's or DepthG's ``LitUnsupervisedSegmenter`` without executing code.

    Args:
        path: the ``.ckpt`` file.
        extra_globals: further pickle globals to read as inert stand-ins
            (:func:`repro.models.safe_load.allowed_globals`).

    Returns:
        :class:`LightningCheckpoint` (tensors on the CPU, config as plain dicts).

    Raises:
        MissingFileError: the file does not exist.
        UnsafeCheckpointError: the pickle names a global outside the allowlist (all of them are listed;
            nothing was loaded).
        CheckpointFormatError: a truncated or corrupt file; one without ``state_dict`` /
            ``hyper_parameters`` (``n_classes``, ``cfg``); a state dict that is not a mapping of names to
            tensors; ``n_classes`` not a positive integer; hyper-parameters that are cyclic or nest deeper
            than :data:`~repro.models.safe_load.MAX_DEPTH`; NaN or infinite values in a tensor (each named
            with its count).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("published checkpoint", path, "download it: `repro released list` shows where "
                               "each published file is available")
    obj = safe_torch_load(path, extra_globals=extra_globals)
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path} holds a {type(obj).__name__}, not a Lightning checkpoint dict")
    missing = [k for k in ("state_dict", "hyper_parameters") if k not in obj]
    hparams = to_plain(obj.get("hyper_parameters", {}), where=f"{path}: hyper_parameters")
    missing += [f"hyper_parameters.{k}" for k in ("n_classes", "cfg") if not isinstance(hparams, dict) or k not in hparams]
    if missing:
        raise CheckpointFormatError(f"{path} is not a STEGO/DepthG Lightning checkpoint: missing {missing} "
                                    f"(top-level keys: {sorted(map(str, obj))})")
    if not isinstance(hparams["cfg"], dict):
        raise CheckpointFormatError(f"{path}: hyper_parameters.cfg is a {type(hparams['cfg']).__name__}, not a config")
    n_classes = hparams["n_classes"]
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes <= 0:
        raise CheckpointFormatError(f"{path}: hyper_parameters.n_classes is {n_classes!r}, not a positive integer "
                                    "(the number of classes the probes were trained for)")
    state = obj["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path}: state_dict is a {type(state).__name__}, not a mapping of parameter "
                                    "names to tensors")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointFormatError(f"{path}: state_dict entries that are not name -> tensor: {bad[:5]}")
    _check_finite(path, state)
    return LightningCheckpoint(
        path=path, sha256=file_sha256(path), size=path.stat().st_size, state_dict=dict(state), hyper_parameters=hparams,
        lightning_version=_plain_scalar(obj.get("pytorch-lightning_version")), global_step=obj.get("global_step"),
        epoch=obj.get("epoch"), top_level_keys=[str(k) for k in obj], callback_keys=_callback_keys(obj.get("callbacks")))


def _plain_scalar(value: Any) -> str | None:
    return value if isinstance(value, str) or value is None else f"<{type(value).__name__}>"


def _callback_keys(callbacks: Any) -> str | None:
    """``"class"`` when Lightning < 1.5 keyed the callback states by their class, ``"string"`` after, else None."""
    if not isinstance(callbacks, dict) or not callbacks:
        return None
    return "class" if any(isinstance(k, type) for k in callbacks) else "string"


def _check_finite(path: Path, state: dict[str, Tensor]) -> None:
    """Refuse NaN or infinite values in any floating-point tensor, naming each tensor and its count."""
    bad = []
    for name, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                bad.append(f"{name} ({count} of {tensor.numel()} values)")
    if bad:
        more = f" (+{len(bad) - 5} more tensors)" if len(bad) > 5 else ""
        raise CheckpointFormatError(f"{path}: non-finite (NaN or infinite) values in {len(bad)} tensor(s): "
                                    f"{', '.join(bad[:5])}{more}; the file is corrupt or the training diverged: "
                                    "it cannot be scored")


# ------------------------------------------------------------------------------------------ conversion
TRAINING_ONLY_PREFIXES = ("train_cluster_probe.", "decoder.")
"""State-dict parts that only training uses; ignored by the conversion (as by the released evaluation)."""
DINO_DEPTH_PREFIXES = ("net.depth_downscaling.", "net.cross_attn.", "net.no_depth_embed.")
DEPTHG_DECAYED_KEYS = ("depth_feat_weight", "depth_feat_shift", "feature_samples", "depth_sampling", "lhp_weight")
"""DepthG cfg values its training loop overwrites in place (guidance decay, FPS sample schedule, LHP)."""


@dataclass
class ReleasedModel:
    """A published checkpoint converted into repro's parts.

    Attributes:
        arch: repro backbone name (``vit_small_patch8`` / ``vit_base_patch8``).
        backbone_state: DINO state dict (official key names) for :class:`DinoBackbone`.
        parts: head, cluster probe (K + extra centroids), linear probe (K), LHP projection head or None.
        project: ``"stego"`` or ``"depthg"`` (DepthG's cfg has the depth-guidance keys).
        n_classes, code_dim, extra_clusters: K, Q and the extra centroids of the saved cfg.
        notes: findings to report (ignored keys, LHP head present, DepthG's decayed cfg values).
        checkpoint: what was read.
    """

    arch: str
    backbone_state: dict[str, Tensor]
    parts: TrainedParts
    project: str
    n_classes: int
    code_dim: int
    extra_clusters: int
    notes: list[str]
    checkpoint: LightningCheckpoint

    def backbone(self, pos_embed: str = "dino") -> DinoBackbone:
        """The frozen DINO backbone with the checkpoint's own weights (no separate download).

        Args:
            pos_embed: position-embedding resampling, ``"dino"`` (the released code's, docs/fidelity.md R2) or ``"timm"``.
        """
        return DinoBackbone(self.arch, self.backbone_state, pos_embed=pos_embed)

    def provenance(self) -> dict[str, Any]:
        """The record of this file for ``metrics.json`` and ``repro released import``."""
        c = self.checkpoint
        return {"file": c.path.name, "path": str(c.path), "sha256": c.sha256, "size_bytes": c.size,
                "project": self.project, "lightning_version": c.lightning_version, "global_step": c.global_step,
                "epoch": c.epoch, "lightning_layout": c.layout, "arch": self.arch, "n_classes": self.n_classes,
                "code_dim": self.code_dim,
                "extra_clusters": self.extra_clusters, "lhp_head": self.parts.projection is not None,
                "notes": list(self.notes), "hyper_parameters": c.hyper_parameters}


def _cfg(ckpt: LightningCheckpoint, key: str) -> Any:
    if key not in ckpt.cfg:
        raise CheckpointLayoutError(f"{ckpt.path}: the saved cfg has no {key!r}; it is not a STEGO/DepthG "
                                    "LitUnsupervisedSegmenter config")
    return ckpt.cfg[key]


def _arch_of(ckpt: LightningCheckpoint) -> str:
    model_type, patch = _cfg(ckpt, "model_type"), _cfg(ckpt, "dino_patch_size")
    arch = f"{model_type}_patch{patch}"
    if arch not in ARCHS:
        raise CheckpointLayoutError(f"{ckpt.path}: cfg model_type={model_type!r}, dino_patch_size={patch!r} is "
                                    f"not a supported backbone (supported: {sorted(ARCHS)})")
    for key, wanted in (("arch", "dino"), ("dino_feat_type", "feat"), ("projection_type", "nonlinear")):
        if _cfg(ckpt, key) != wanted:
            what = ("DepthG's depth-fused featurizer (DinoFeaturizerWithDepth), which repro does not implement"
                    if ckpt.cfg[key] == "dino_depth" else "a variant repro does not implement")
            raise CheckpointLayoutError(f"{ckpt.path}: cfg {key}={ckpt.cfg[key]!r} is {what}; supported: "
                                        f"{key}={wanted!r}")
    return arch


def _expected_shapes(arch: str, code_dim: int, n_classes: int, extra: int) -> dict[str, tuple[int, ...]]:
    spec = ARCHS[arch]
    with torch.device("meta"):
        import timm

        vit = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
    shapes = {f"net.model.{k}": tuple(v.shape) for k, v in vit.state_dict().items()}
    c, q = spec.feature_dim, code_dim
    shapes.update({
        "net.cluster1.0.weight": (q, c, 1, 1), "net.cluster1.0.bias": (q,),
        "net.cluster2.0.weight": (c, c, 1, 1), "net.cluster2.0.bias": (c,),
        "net.cluster2.2.weight": (q, c, 1, 1), "net.cluster2.2.bias": (q,),
        "cluster_probe.clusters": (n_classes + extra, q),
        "linear_probe.weight": (n_classes, q, 1, 1), "linear_probe.bias": (n_classes,),
    })
    return shapes


_LHP_SHAPES = {"lhp_module.projection_head.0.weight": "qq11", "lhp_module.projection_head.0.bias": "q",
               "lhp_module.projection_head.2.weight": "qq11", "lhp_module.projection_head.2.bias": "q"}


def check_layout(ckpt: LightningCheckpoint, arch: str, code_dim: int, extra: int) -> list[str]:
    """Compare the state dict with the layout its cfg implies.

    Returns:
        Notes on ignored parts (training-only keys, the LHP head).

    Raises:
        CheckpointLayoutError: naming the first missing keys (in layout order), the first keys with a
            wrong shape and the first unexpected keys (in file order), with counts.
    """
    expected = _expected_shapes(arch, code_dim, ckpt.n_classes, extra)
    q = code_dim
    expected.update({k: (q, q, 1, 1) if v == "qq11" else (q,) for k, v in _LHP_SHAPES.items()
                     if any(s.startswith("lhp_module.") for s in ckpt.state_dict)})
    state = ckpt.state_dict
    missing = [k for k in expected if k not in state]
    wrong = [f"{k} {tuple(v.shape)} (expected {expected[k]})" for k, v in state.items()
             if k in expected and tuple(v.shape) != expected[k]]
    unexpected = [k for k in state if k not in expected and not k.startswith(TRAINING_ONLY_PREFIXES)]
    not_float = [k for k in expected if k in state and not state[k].is_floating_point()]
    if missing or wrong or unexpected or not_float:
        depth = [k for k in unexpected if k.startswith(DINO_DEPTH_PREFIXES)]
        parts = [f"{label} {items[:5]}{f' (+{len(items) - 5} more)' if len(items) > 5 else ''}"
                 for label, items in (("missing keys", missing), ("wrong shapes", wrong),
                                      ("unexpected keys", unexpected), ("non-float tensors", not_float)) if items]
        hint = (" The net.depth_downscaling/cross_attn keys belong to DepthG's arch=dino_depth featurizer, which "
                "repro does not implement." if depth else "")
        raise CheckpointLayoutError(
            f"{ckpt.path} does not match the layout of its cfg ({arch}, code dim {q}, {ckpt.n_classes} classes + "
            f"{extra} extra clusters): " + "; ".join(parts) + "." + hint)
    ignored = sorted({k.split(".")[0] for k in state if k.startswith(TRAINING_ONLY_PREFIXES)})
    notes = [f"ignored training-only parts: {', '.join(ignored)}"] if ignored else []
    if any(k.startswith("lhp_module.") for k in state):
        notes.append("lhp_module.projection_head converted to the LHP projection head; the released evaluation "
                     "(and repro's) never uses it: scores come from net, cluster_probe and linear_probe")
    return notes


def convert_checkpoint(ckpt: LightningCheckpoint) -> ReleasedModel:
    """Convert a read checkpoint into repro's parts (see the module docstring for the key mapping).

    Args:
        ckpt: from :func:`read_lightning_checkpoint`.

    Returns:
        :class:`ReleasedModel`; the parts are in eval mode, float32, on the CPU.

    Raises:
        CheckpointLayoutError: an unsupported cfg (``arch=dino_depth``, ``KK`` features, a linear-only
            head, patch 16) or a state dict that does not match it (names the first mismatching keys).
    """
    arch = _arch_of(ckpt)
    k = ckpt.n_classes
    code_dim = int(_cfg(ckpt, "dim")) if ckpt.cfg.get("continuous", True) else k
    extra = int(ckpt.cfg.get("extra_clusters") or 0)
    notes = check_layout(ckpt, arch, code_dim, extra)
    s = {name: t.detach().to(torch.float32) for name, t in ckpt.state_dict.items()}
    feature_dim = ARCHS[arch].feature_dim
    head = SegmentationHead(feature_dim, code_dim)
    head.load_state_dict({"linear.weight": s["net.cluster1.0.weight"], "linear.bias": s["net.cluster1.0.bias"],
                          "mlp.0.weight": s["net.cluster2.0.weight"], "mlp.0.bias": s["net.cluster2.0.bias"],
                          "mlp.2.weight": s["net.cluster2.2.weight"], "mlp.2.bias": s["net.cluster2.2.bias"]})
    cluster = ClusterProbe(code_dim, k + extra)
    cluster.load_state_dict({"clusters": s["cluster_probe.clusters"]})
    linear = LinearProbe(code_dim, k)
    linear.load_state_dict({"conv.weight": s["linear_probe.weight"], "conv.bias": s["linear_probe.bias"]})
    projection = None
    if "lhp_module.projection_head.0.weight" in s:
        projection = ProjectionHead(code_dim)
        projection.load_state_dict({f"net.{i}.{p}": s[f"lhp_module.projection_head.{i}.{p}"]
                                    for i in (0, 2) for p in ("weight", "bias")})
    parts = TrainedParts(head, cluster, linear, projection)
    for module in parts.modules().values():
        module.eval()
    backbone_state = {name.removeprefix("net.model."): t for name, t in s.items() if name.startswith("net.model.")}
    depthg = "depth_feat_weight" in ckpt.cfg or "use_depth" in ckpt.cfg
    if depthg:
        decayed = [key for key in DEPTHG_DECAYED_KEYS if key in ckpt.cfg]
        notes.append("DepthG mutates its cfg during training: the saved " + ", ".join(decayed) + " are the values "
                     "at the end of training (decayed / scheduled), not the configured ones")
    return ReleasedModel(arch, backbone_state, parts, "depthg" if depthg else "stego", k, code_dim, extra, notes, ckpt)


def load_released(path: str | Path, *, extra_globals: Iterable[str] = ()) -> ReleasedModel:
    """:func:`read_lightning_checkpoint` then :func:`convert_checkpoint`."""
    return convert_checkpoint(read_lightning_checkpoint(path, extra_globals=extra_globals))


def write_random_checkpoint(out: str | Path, *, arch: str, code_dim: int, n_classes: int, dataset_name: str,
                            depthg: bool = False, lhp: bool = False, seed: int = 0) -> Path:
    """Write a random-weight checkpoint in the published Lightning layout (2.0.1.post0 top-level keys).

    For smoke runs and tests on machines without the published files: it reads through exactly the
    path of a published one (:func:`load_released`), but its scores are meaningless.

    Args:
        out: the file (written atomically).
        arch: ``vit_small_patch8`` or ``vit_base_patch8``.
        code_dim: Q. n_classes: K. dataset_name: the released ``cfg.dataset_name`` (e.g. ``cocostuff27``).
        depthg: add DepthG's guidance keys to the cfg. lhp: add ``lhp_module.projection_head``.
        seed: seed of the weights.

    Returns:
        ``out`` as a :class:`~pathlib.Path`.
    """
    from repro.utils.files import atomic_path

    gen = torch.Generator().manual_seed(seed)
    shapes = _expected_shapes(arch, code_dim, n_classes, 0)
    if lhp:
        shapes.update({k: (code_dim, code_dim, 1, 1) if v == "qq11" else (code_dim,) for k, v in _LHP_SHAPES.items()})
    state = {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in shapes.items()}
    model_type, patch = arch.rsplit("_patch", 1)
    cfg: dict[str, Any] = {"model_type": model_type, "dino_patch_size": int(patch), "arch": "dino",
                           "dino_feat_type": "feat", "projection_type": "nonlinear", "dim": code_dim,
                           "continuous": True, "extra_clusters": 0, "dataset_name": dataset_name}
    if depthg:
        cfg.update({"use_depth": True, "depth_feat_weight": 0.0, "depth_feat_shift": 0.0})
    payload = {"epoch": 0, "global_step": 0, "pytorch-lightning_version": "2.0.1.post0", "state_dict": state,
               "hyper_parameters": {"n_classes": n_classes, "cfg": cfg}}
    with atomic_path(out) as tmp:
        torch.save(payload, tmp)
    return Path(out)
