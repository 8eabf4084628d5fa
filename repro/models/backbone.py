"""The frozen DINO ViT backbone F (Caron et al. 2021; STEGO A.10; DepthG sec. 3.1).

Weights are read from a local file in the official DINO format: a ``torch.save``-d state dict
with the ViT's own key names (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
``blocks.N.*``, ``norm.*``), e.g. ``dino_deitsmall8_300ep_pretrain.pth``. Full training
checkpoints (``{"teacher": {...}, "student": {...}}`` with ``module.``/``backbone.``
prefixes) are accepted too; their *teacher* weights are used, as STEGO does.

Nothing is downloaded at run time. The files every published STEGO/DepthG number used (docs/fidelity.md R1:
the released code loads the 300-epoch ViT-S/8, not the 800-epoch ``dino_deitsmall8_pretrain.pth``
that ``torch.hub``'s ``dino_vits8`` returns) come from::

    wget https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth
    wget https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth

Position embeddings are resized for other input sizes (320 px evaluation) exactly as DINO's own
``VisionTransformer.interpolate_pos_encoding`` does (docs/fidelity.md R2), not with timm's antialiased resampling.
"""

from __future__ import annotations

import math
import os
import types
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repro.utils.files import atomic_path
from repro.utils.errors import MissingFileError

__all__ = [
    "ARCHS", "DinoArch", "DinoBackbone", "POS_EMBED_MODES", "dino_interpolate_pos_encoding", "init_random_checkpoint",
    "last_block_attention", "load_dino_state_dict", "default_weights_dir",
]

PRECISIONS = ("default", "bf16", "fp32")
"""Frozen-backbone precision: ``default`` (whatever autocast the caller runs under), ``bf16`` (autocast to
bfloat16 on the input's device, CPU included), ``fp32`` (autocast disabled)."""
POS_EMBED_MODES = ("dino", "timm")
"""Position-embedding resizing: DINO's own (bicubic, +0.1 offset, docs/fidelity.md R2) or timm's antialiased resampling."""


@dataclass(frozen=True)
class DinoArch:
    """One DINO backbone: its timm architecture, official file name and feature size."""

    name: str
    timm_name: str
    filename: str
    url: str
    feature_dim: int
    patch_size: int = 8


ARCHS: dict[str, DinoArch] = {
    a.name: a
    for a in (
        DinoArch(
            "vit_small_patch8",
            "vit_small_patch8_224",
            "dino_deitsmall8_300ep_pretrain.pth",
            "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth",
            384,
        ),
        DinoArch(
            "vit_base_patch8",
            "vit_base_patch8_224",
            "dino_vitbase8_pretrain.pth",
            "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
            768,
        ),
    )
}


def get_arch(name: str) -> DinoArch:
    """Look up an architecture by name (``vit_small_patch8`` or ``vit_base_patch8``).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown backbone arch {name!r}; known: {sorted(ARCHS)}") from None


def default_weights_dir() -> Path:
    """Folder holding weight files: ``$REPRO_WEIGHTS`` or ``./weights``."""
    return Path(os.environ.get("REPRO_WEIGHTS", "weights"))


def _create_vit(arch: DinoArch) -> nn.Module:
    # No classifier head, final norm kept, position embeddings interpolated for 320 px inputs.
    return timm.create_model(arch.timm_name, pretrained=False, num_classes=0, dynamic_img_size=True)


def dino_interpolate_pos_encoding(pos_embed: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """Resize ViT position embeddings to a ``grid_h x grid_w`` patch grid the way DINO does.

    Bicubic ``F.interpolate`` (a = -0.75, no antialias) of the square patch grid with
    ``scale_factor = ((grid_h + 0.1) / sqrt(N), (grid_w + 0.1) / sqrt(N))``; the +0.1 keeps the
    floor of the output size at the wanted grid. A square grid of the training size is returned
    unchanged. Source: facebookresearch/dino ``vision_transformer.py``,
    ``VisionTransformer.interpolate_pos_encoding`` (copied into STEGO's and DepthG's ``src/dino/``).

    Args:
        pos_embed: ``(1, 1 + N, C)`` embeddings, class token first, ``N`` a square number (784 = 28x28).
        grid_h: patch rows of the input (image height / patch size).
        grid_w: patch columns of the input.

    Returns:
        ``(1, 1 + grid_h * grid_w, C)``, class token first, patches in row-major order.

    Raises:
        ValueError: if ``N`` is not a square number or the grid is empty.
    """
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position embedding holds {n} patch tokens, not a square grid")
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"patch grid must be non-empty, got {grid_h}x{grid_w}")
    if grid_h == grid_w == side:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((grid_h + 0.1) / math.sqrt(n), (grid_w + 0.1) / math.sqrt(n)),
                         mode="bicubic")
    if tuple(grid.shape[-2:]) != (grid_h, grid_w):  # the +0.1 guard of DINO; cannot fail for sane sizes
        raise ValueError(f"interpolated grid {tuple(grid.shape[-2:])} != requested {(grid_h, grid_w)}")
    return torch.cat((pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


def _dino_pos_embed(vit: nn.Module, x: Tensor) -> Tensor:
    """Replacement for timm's ``VisionTransformer._pos_embed`` (``x``: ``(B, H, W, C)`` patch tokens)."""
    b, h, w, c = x.shape
    key = (h, w, x.device, x.dtype)
    cache = vit.__dict__.setdefault("_repro_pos_cache", {})
    if key not in cache:  # the backbone is frozen: one interpolation per grid size
        cache[key] = dino_interpolate_pos_encoding(vit.pos_embed, h, w).to(dtype=x.dtype)
    tokens = torch.cat((vit.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)), dim=1)
    return vit.pos_drop(tokens + cache[key])


def _fetch_hint(arch: DinoArch, path: Path) -> str:
    return (
        f"wget -O {path} {arch.url}   "
        f"(or, for tests and demos only: repro weights init-random --arch {arch.name} --out {path})"
    )


def load_dino_state_dict(path: str | Path, arch: DinoArch | str) -> dict[str, Tensor]:
    """Read a DINO checkpoint file and return the backbone state dict with official key names.

    Args:
        path: the ``.pth`` file.
        arch: the architecture (or its name) the file is for; used for the error message.

    Returns:
        State dict with keys like ``blocks.0.attn.qkv.weight``; classifier-head keys dropped.

    Raises:
        MissingFileError: if the file does not exist (the message gives the download command).
        ValueError: if the file is not a state dict in a known DINO layout.
    """
    arch = get_arch(arch) if isinstance(arch, str) else arch
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"DINO {arch.name} checkpoint", path, _fetch_hint(arch, path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "teacher" in obj:
        obj = obj["teacher"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a DINO state dict (name -> tensor), got {type(obj).__name__}")
    state = {}
    for key, value in obj.items():
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        if not key.startswith("head."):
            state[key] = value
    return state


class DinoBackbone(nn.Module):
    """Frozen DINO ViT returning patch features ``(B, C, H/8, W/8)`` (CLS token dropped).

    Features are the last block's tokens after the final LayerNorm (STEGO A.10 "final layer
    of spatially varying features"). The module is permanently in eval mode with gradients
    disabled; ``forward`` runs under ``torch.no_grad``.

    Args:
        arch: ``"vit_small_patch8"`` (C=384) or ``"vit_base_patch8"`` (C=768).
        checkpoint: path to the DINO weights file (official format, see module docstring), or an
            already loaded backbone state dict with official DINO key names.
        pos_embed: ``"dino"`` (DINO's ``interpolate_pos_encoding``, what every published number
            used, docs/fidelity.md R2) or ``"timm"`` (timm's antialiased ``resample_abs_pos_embed``). Both
            leave 224 px inputs unchanged.
        precision: one of :data:`PRECISIONS` (``model.backbone_precision``); features are float32 in every case.

    Raises:
        MissingFileError: if the checkpoint file is missing.
        ValueError: if its keys or shapes do not match the architecture, or ``pos_embed`` is unknown.
    """

    def __init__(self, arch: str, checkpoint: str | Path | dict[str, Tensor], pos_embed: str = "dino",
                 precision: str = "default") -> None:
        super().__init__()
        if pos_embed not in POS_EMBED_MODES:
            raise ValueError(f"pos_embed must be one of {POS_EMBED_MODES}, got {pos_embed!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.arch = get_arch(arch)
        self.vit = _create_vit(self.arch)
        if pos_embed == "dino":
            self.vit._pos_embed = types.MethodType(_dino_pos_embed, self.vit)
        if isinstance(checkpoint, dict):
            state, checkpoint = checkpoint, "the given state dict"
        else:
            state = load_dino_state_dict(checkpoint, self.arch)
        expected = self.vit.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(
                f"{checkpoint} does not match DINO {self.arch.name}: missing keys {missing[:5]}, "
                f"unexpected keys {unexpected[:5]}, wrong shapes {wrong[:5]}"
            )
        self.vit.load_state_dict(state, strict=True)
        self.vit.requires_grad_(False)
        super().train(False)

    @property
    def feature_dim(self) -> int:
        """Channel count C of the returned features."""
        return self.arch.feature_dim

    @property
    def patch_size(self) -> int:
        """Patch size in pixels (8)."""
        return self.arch.patch_size

    def train(self, mode: bool = True) -> DinoBackbone:
        """Keep the frozen backbone in eval mode whatever the caller asks (no dropout, fixed norms)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Compute patch features.

        Args:
            images: ``(B, 3, H, W)`` ImageNet-normalised float images, H and W multiples of 8.

        Returns:
            ``(B, C, H/8, W/8)`` features (28x28 at 224 px, 40x40 at 320 px).

        Raises:
            ValueError: if the input is not ``(B, 3, H, W)`` with H, W divisible by 8.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} must be a multiple of the patch size {p}")
        if self.precision == "default":
            tokens = self.vit.forward_features(images)  # (B, prefix + h*w, C), after the final norm
        else:  # model.backbone_precision: bf16 autocast, or none at all (fp32) whatever the caller runs under
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                tokens = self.vit.forward_features(images)
            tokens = tokens.float()
        patches = tokens[:, self.vit.num_prefix_tokens :, :]
        return patches.transpose(1, 2).reshape(images.shape[0], -1, h // p, w // p)


@torch.no_grad()
def last_block_attention(backbone: DinoBackbone, images: Tensor) -> tuple[Tensor, Tensor]:
    """Patch features and the last block's patch-to-patch self-attention (for attention LHP).

    The attention is recomputed from the input of the last block's attention layer (captured
    with a forward hook on its ``norm1``): ``softmax(q k^T / sqrt(d))`` averaged over heads,
    CLS row and column removed (Hidden Positives' local propagation; DepthG Table 6).

    Args:
        backbone: the frozen DINO backbone.
        images: ``(B, 3, H, W)`` normalised images, H and W multiples of 8.

    Returns:
        ``(features (B, C, H/8, W/8), attention (B, P, P))`` with ``P = H/8 * W/8``; rows sum
        to at most 1 (the CLS column is dropped).
    """
    captured: list[Tensor] = []
    block = backbone.vit.blocks[-1]
    handle = block.norm1.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        feats = backbone(images)
    finally:
        handle.remove()
    x = captured[-1]
    attn_layer = block.attn
    b, n, _ = x.shape
    qkv = attn_layer.qkv(x).reshape(b, n, 3, attn_layer.num_heads, attn_layer.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn_layer.q_norm(qkv[0]), attn_layer.k_norm(qkv[1])
    attention = ((q * attn_layer.scale) @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)
    prefix = backbone.vit.num_prefix_tokens
    return feats, attention[:, prefix:, prefix:]


def init_random_checkpoint(arch: str, out: str | Path, *, seed: int = 0) -> Path:
    """Write a randomly initialised backbone in the official DINO checkpoint format.

    For tests and demos on machines without the real weights: the file loads through the
    same code path as the real one, but the features are meaningless.

    Args:
        arch: architecture name (see :data:`ARCHS`).
        out: output path; written atomically (temporary file, then rename).
        seed: torch seed for the initialisation.

    Returns:
        The output path.

    Raises:
        ValueError: for an unknown architecture.
    """
    spec = get_arch(arch)
    torch.manual_seed(seed)
    state = {k: v.clone() for k, v in _create_vit(spec).state_dict().items()}
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    return Path(out)
