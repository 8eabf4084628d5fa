"""ZoeDepth and MiDaS (DPT) depth estimators through HuggingFace transformers, offline only.

DepthG precomputes a depth map per training crop with a monocular estimator; ZoeDepth gave
the best results and MiDaS the second best (supplement Table 3). Both load from a LOCAL
folder in the ``save_pretrained`` layout (``config.json``, ``model.safetensors``,
``preprocessor_config.json``) with ``local_files_only=True``; nothing is fetched at run time.

* :class:`ZoeDepthEstimator`: ``ZoeDepthForDepthEstimation``; default ``Intel/zoedepth-nyu``, the
  official conversion of ZoeD_N (``ZoeD_M12_N``), which the released DepthG ``generate_depth.py``
  ran; metric depth in metres.
* :class:`MidasEstimator`: ``DPTForDepthEstimation`` (MiDaS v3 = DPT, e.g.
  ``Intel/dpt-hybrid-midas``); relative inverse depth (disparity up to scale and shift).

Pre-processing is the checkpoint's own image processor (rescale, ZoeDepth's reflect padding,
keep-aspect resize to a multiple of 32, normalisation, all read from ``preprocessor_config.json``).

Test-time augmentation (``tta=True``, ``data.depth_tta``) follows ZoeDepth's own
``DepthModel.infer(x)`` (isl-org/ZoeDepth ``zoedepth/models/depth_model.py``; DepthG vendors the
same file as ``src/zoedepth/models/depth_model.py``): defaults ``pad_input=True``,
``with_flip_aug=True``. Per pass the [0, 1] image is reflect-padded by ``int(sqrt(h / 2) * 3)`` rows
and ``int(sqrt(w / 2) * 3)`` columns on each side (here: the processor's ``do_pad``, applied
after rescaling and before resizing, as ZoeDepth pads before its internal resize), the metric
output is upsampled BICUBIC (``align_corners=False``) to the padded size and the padding is cut
off; the second pass does the same on the horizontally flipped image (flipped before padding)
and is flipped back; the two are averaged. ``tta=False`` is a single pass without padding
(``infer(pad_input=False, with_flip_aug=False)``). ZoeDepth's ``infer_pil`` is ``infer`` on
``ToTensor(pil)``; the processor's ``rescale`` (x * 1/255) differs from ``ToTensor``'s x / 255 by at
most one float32 rounding. MiDaS: ``tta`` averages with the flipped pass (no padding); its output
is resized back bilinearly.

:func:`save_random_model` writes a tiny randomly initialised model plus its image processor in
the same layout, for tests and demos without internet.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from repro.depth.base import DepthEstimator, ImageBatch, as_image_list
from repro.utils.errors import MissingFileError

__all__ = ["ZoeDepthEstimator", "ZoeDepthFeatures", "MidasEstimator", "save_random_model", "DEFAULT_WEIGHTS", "HUB_REPOS"]

#: Official checkpoints (HuggingFace Hub ids) of the two estimators.
HUB_REPOS = {"zoedepth": "Intel/zoedepth-nyu", "midas": "Intel/dpt-hybrid-midas"}
#: Default local folders, inside the weights folder ($REPRO_WEIGHTS, default ./weights).
DEFAULT_WEIGHTS = {"zoedepth": Path("weights/zoedepth-nyu"), "midas": Path("weights/dpt-hybrid-midas")}
_CLASSES = {"zoedepth": ("ZoeDepthForDepthEstimation", "ZoeDepthImageProcessor"),
            "midas": ("DPTForDepthEstimation", "DPTImageProcessor")}
_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")


def _fix(kind: str, folder: Path) -> str:
    repo = HUB_REPOS[kind]
    model_cls, proc_cls = _CLASSES[kind]
    return (f"huggingface-cli download {repo} --local-dir {folder}   (or `hf download ...`; or on a machine "
            f"with internet: python -c \"from transformers import {model_cls}, {proc_cls}; "
            f"{model_cls}.from_pretrained('{repo}').save_pretrained('{folder}'); "
            f"{proc_cls}.from_pretrained('{repo}').save_pretrained('{folder}')\" and copy the folder here)")


def check_weights_dir(kind: str, weights_dir: str | Path) -> Path:
    """Check that a local ``save_pretrained`` folder holds config, weights and image processor.

    Args:
        kind: ``"zoedepth"`` or ``"midas"`` (names the download command in the error).
        weights_dir: the folder.

    Returns:
        The folder as a :class:`~pathlib.Path`.

    Raises:
        MissingFileError: naming the missing folder/file and the download command.
    """
    folder = Path(weights_dir)
    what = f"{kind} weights folder ({HUB_REPOS[kind]})"
    if not folder.is_dir():
        raise MissingFileError(what, folder, _fix(kind, folder))
    for needed in ("config.json", "preprocessor_config.json"):
        if not (folder / needed).is_file():
            raise MissingFileError(f"{what}: {needed}", folder / needed, _fix(kind, folder))
    if not any((folder / f).is_file() for f in _MODEL_FILES):
        raise MissingFileError(f"{what}: model weights ({' / '.join(_MODEL_FILES)})", folder, _fix(kind, folder))
    return folder


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _HFDepthEstimator(DepthEstimator):
    """Shared loading, pre-processing and test-time augmentation of the transformers estimators."""

    def __init__(self, weights_dir: str | Path, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, *, tta: bool = False) -> None:
        import transformers

        self.weights_dir = check_weights_dir(self.name, weights_dir)
        model_cls, proc_cls = (getattr(transformers, n) for n in _CLASSES[self.name])
        self.device = torch.device(device) if device is not None else _default_device()
        self.dtype = dtype
        self.tta = tta
        self.processor = proc_cls.from_pretrained(self.weights_dir, local_files_only=True)
        model = model_cls.from_pretrained(self.weights_dir, local_files_only=True, dtype=dtype)
        self.model = model.to(self.device).eval().requires_grad_(False)

    def _pass(self, imgs: list, height: int, width: int, *, flip: bool) -> Tensor:
        """One forward pass at the input size: ``(B, height, width)`` float32 (flipped back if ``flip``)."""
        # writable C-contiguous copies (the processor wraps them with torch.from_numpy)
        imgs = [np.require(img[:, ::-1] if flip else img, requirements=["C", "W"]) for img in imgs]
        inputs = self.processor(images=imgs, return_tensors="pt", input_data_format="channels_last",
                                device=str(self.device), **self._processor_kwargs())
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        pred = self.model(pixel_values=pixel_values).predicted_depth.float()
        out = self._to_input_size(pred, height, width)
        return out.flip(-1) if flip else out

    def _processor_kwargs(self) -> dict:
        return {}

    def _to_input_size(self, pred: Tensor, height: int, width: int) -> Tensor:
        """Bilinear resize of ``(B, h', w')`` to ``(B, height, width)``."""
        return F.interpolate(pred[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]

    def predict(self, images: ImageBatch) -> Tensor:
        """Raw prediction at the input resolution (averaged with the flipped pass when :attr:`tta`).

        Args:
            images: ``B`` RGB images of one size, ``(H, W, 3)`` uint8 (list or tensor).

        Returns:
            ``(B, H, W)`` float32 on :attr:`device`: metres (ZoeDepth) or relative inverse
            depth (MiDaS).

        Raises:
            TypeError / ValueError: for non-uint8, non-RGB or mixed-size images.
        """
        imgs = as_image_list(images)
        if len({img.shape for img in imgs}) != 1:
            raise ValueError(f"images in one batch must share a size, got {sorted({i.shape for i in imgs})}")
        height, width = imgs[0].shape[:2]
        with torch.inference_mode():
            out = self._pass(imgs, height, width, flip=False)
            if self.tta:
                out = (out + self._pass(imgs, height, width, flip=True)) / 2
            return out


class ZoeDepthEstimator(_HFDepthEstimator):
    """ZoeDepth metric depth (DepthG's best depth source, supplement Table 3), as ZoeDepth's ``infer`` runs it.

    Args:
        weights_dir: local ``save_pretrained`` folder, e.g. of ``Intel/zoedepth-nyu`` (ZoeD_N).
        device: torch device; default CUDA when available, else CPU.
        dtype: model dtype (float16/bfloat16 on GPU to save memory); output is float32.
        tta: ZoeDepth's test-time augmentation (reflect padding + horizontal flip, module
            docstring); off: one pass without padding.

    Raises:
        MissingFileError: if the folder, its config, weights or processor config is missing.
    """

    name = "zoedepth"
    kind = "metric"

    def _processor_kwargs(self) -> dict:
        return {"do_pad": self.tta}

    def _to_input_size(self, pred: Tensor, height: int, width: int) -> Tensor:
        """Bicubic upsampling to the (padded) input size, then the padding is cut off (``infer``).

        The pad per side is ``int(sqrt(size / 2) * 3)`` of the input height/width, as in
        ``ZoeDepthImageProcessor`` and ZoeDepth's ``_infer_with_pad_aug``.
        """
        pad_h, pad_w = (int(math.sqrt(height / 2) * 3), int(math.sqrt(width / 2) * 3)) if self.tta else (0, 0)
        full = F.interpolate(pred[:, None], size=(height + 2 * pad_h, width + 2 * pad_w), mode="bicubic",
                             align_corners=False)[:, 0]
        return full[:, pad_h : pad_h + height, pad_w : pad_w + width]


class ZoeDepthFeatures(ZoeDepthEstimator):
    """ZoeDepth's penultimate-layer feature maps, the "MDE features" guidance (DepthG supp. B.1, Table 3).

    The features are the input of the metric head's last layer (``metric_head.conditional_log_binomial``,
    whose bin probabilities the head sums with the bin centres into metric depth): the relative
    head's ``num_relative_features`` activations (32 for ZoeD_N) concatenated with the relative
    depth, ``C = num_relative_features + 1`` channels at half the network's input resolution. The
    paper says only "feature maps from the penultimate layer of the monocular depth estimator"; this
    reading is fidelity item R18. They are read by a forward pre-hook, so the network runs exactly as
    for depth (same processor, padding and flip test-time augmentation, averaged per channel), then
    resized to the input size like the depth output and average-pooled to the feature grid.

    Args: as :class:`ZoeDepthEstimator`.

    Raises:
        MissingFileError: if the weights folder is incomplete.
    """

    name = "zoedepth"
    kind = "features"

    def _pass(self, imgs: list, height: int, width: int, *, flip: bool) -> Tensor:
        """``(B, C, height, width)`` penultimate features of one pass (flipped back if ``flip``)."""
        captured: list[Tensor] = []
        layer = self.model.metric_head.conditional_log_binomial
        handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
        try:
            imgs = [np.require(img[:, ::-1] if flip else img, requirements=["C", "W"]) for img in imgs]
            inputs = self.processor(images=imgs, return_tensors="pt", input_data_format="channels_last",
                                    device=str(self.device), **self._processor_kwargs())
            self.model(pixel_values=inputs["pixel_values"].to(self.device, self.dtype))
        finally:
            handle.remove()
        feats = captured[-1].float()
        b, c = feats.shape[:2]
        out = self._to_input_size(feats.reshape(b * c, *feats.shape[2:]), height, width).reshape(b, c, height, width)
        return out.flip(-1) if flip else out

    def features(self, images: ImageBatch, grid: tuple[int, int]) -> Tensor:
        """Penultimate-layer features of each image, average-pooled to ``grid``.

        Args:
            images: ``B`` RGB images of one size, ``(H, W, 3)`` uint8.
            grid: ``(h, w)`` output grid (the crop's DINO patch grid, ``H / 8``).

        Returns:
            ``(B, C, h, w)`` float32 on :attr:`device` (activations, no unit; C = 33 for ZoeD_N).

        Raises:
            TypeError / ValueError: as :meth:`predict`.
        """
        full = self.predict(images)
        return F.adaptive_avg_pool2d(full, (int(grid[0]), int(grid[1])))


class MidasEstimator(_HFDepthEstimator):
    """MiDaS v3 (DPT) relative inverse depth (DepthG's second-best source, supplement Table 3).

    The output is disparity-like (larger = nearer, unknown scale and shift);
    :meth:`~repro.depth.base.DepthEstimator.to_depth` inverts it (our choice, documented there).

    Args:
        weights_dir: local ``save_pretrained`` folder, e.g. of ``Intel/dpt-hybrid-midas``.
        device, dtype: as for :class:`ZoeDepthEstimator`.
        tta: average with the prediction of the horizontally flipped input (no padding).

    Raises:
        MissingFileError: if the folder, its config, weights or processor config is missing.
    """

    name = "midas"
    kind = "relative_inverse"


def _tiny_config(kind: str, tiny: bool):
    import transformers as tf

    if kind == "zoedepth":
        if not tiny:
            return tf.ZoeDepthConfig()  # BEiT-L/16 backbone, one NYU head: the ZoeD_N layout
        backbone = tf.BeitConfig(
            image_size=384, patch_size=16, hidden_size=96, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=192, use_relative_position_bias=True, reshape_hidden_states=False,
            out_features=["stage1", "stage2", "stage3", "stage4"])
        # one metric head (NYU, 10 m), like ZoeD_N / Intel/zoedepth-nyu
        bins = [{"n_bins": 16, "min_depth": 1e-3, "max_depth": 10.0}]
        return tf.ZoeDepthConfig(
            backbone_config=backbone, neck_hidden_sizes=[24, 48, 96, 96], fusion_hidden_size=32,
            bottleneck_features=32, num_relative_features=8, bin_embedding_dim=16, num_attractors=[4, 4, 2, 1],
            bin_configurations=bins, num_patch_transformer_layers=4, patch_transformer_hidden_size=128,
            patch_transformer_intermediate_size=256, patch_transformer_num_attention_heads=4)
    if not tiny:  # MiDaS v3 DPT-Large (ViT-L/16)
        return tf.DPTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                            backbone_out_indices=[5, 11, 17, 23], neck_hidden_sizes=[256, 512, 1024, 1024])
    return tf.DPTConfig(
        image_size=384, patch_size=16, hidden_size=96, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=192, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[24, 48, 96, 96],
        fusion_hidden_size=32)


def _processor(kind: str):
    import transformers as tf

    half = [0.5, 0.5, 0.5]
    if kind == "zoedepth":
        return tf.ZoeDepthImageProcessor(do_pad=True, do_resize=True, size={"height": 384, "width": 512},
                                         keep_aspect_ratio=True, ensure_multiple_of=32, resample=2,
                                         do_normalize=True, image_mean=half, image_std=half)
    # square input: transformers' DPT neck reshapes the ViT tokens to a square grid (non-backbone models)
    return tf.DPTImageProcessor(do_resize=True, size={"height": 384, "width": 384}, keep_aspect_ratio=False,
                                ensure_multiple_of=1, resample=3, do_normalize=True, image_mean=half, image_std=half)


def save_random_model(kind: str, out_dir: str | Path, *, tiny: bool = True, seed: int = 0) -> Path:
    """Write a randomly initialised ZoeDepth or DPT (MiDaS) model and its image processor.

    The folder has the ``save_pretrained`` layout of the real checkpoints, so
    :class:`ZoeDepthEstimator` / :class:`MidasEstimator` load it through exactly the same path.
    Its predictions are meaningless (NOT pretrained); it exists for tests and offline demos.

    Tiny configs (``tiny=True``, about 1 M parameters, ~0.2-0.5 s per 384x512 forward on 2 CPU
    cores): a 4-layer ViT/BEiT with hidden size 96, 4 heads, MLP 192, patch 16; neck sizes
    ``[24, 48, 96, 96]``, fusion 32. ZoeDepth: one metric head (NYU, 10 m, 16 bins), as ZoeD_N
    (``Intel/zoedepth-nyu``). Weights of every
    convolution/linear layer are redrawn with std ``1 / sqrt(fan_in)`` (biases std 0.1) so the
    output varies with the image (the library's small default init gives a constant ZoeDepth
    map); the last DPT convolution gets bias +1 so that its final ReLU does not zero the map.
    ``tiny=False`` writes full-size random models (BEiT-L ZoeDepth, ViT-L DPT).

    Processors: ZoeDepth 384x512, keep aspect ratio, multiple of 32, reflect padding,
    bilinear; DPT 384x384 square (aspect NOT kept: transformers' DPT without a separate backbone
    reshapes the ViT tokens to a square grid, so non-square inputs fail), bicubic; both
    mean = std = 0.5.

    Args:
        kind: ``"zoedepth"`` or ``"midas"``.
        out_dir: folder to create (or overwrite files in).
        tiny: tiny config (default) or full size.
        seed: seed of the random weights (same seed -> identical files' tensors).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: for an unknown ``kind``.
    """
    import transformers as tf

    if kind not in _CLASSES:
        raise ValueError(f"unknown depth model kind {kind!r}; expected one of {sorted(_CLASSES)}")
    out = Path(out_dir)
    torch.manual_seed(seed)
    model = getattr(tf, _CLASSES[kind][0])(_tiny_config(kind, tiny)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d)):
                w = mod.weight
                fan_in = w.shape[0] * w[0, 0].numel() if isinstance(mod, torch.nn.ConvTranspose2d) else w[0].numel()
                w.copy_(torch.randn(w.shape, generator=gen) / math.sqrt(fan_in))
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.1)
        if kind == "midas":
            model.head.head[-2].bias.fill_(1.0)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    _processor(kind).save_pretrained(out)
    return out

