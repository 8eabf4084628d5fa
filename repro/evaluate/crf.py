"""Dense CRF post-processing of segmentation logits (STEGO appendix A.10).

STEGO (Hamilton et al., ICLR 2022, Sec. 3 and appendix A.10) refines its cluster and
linear-probe predictions with a fully connected CRF (Kraehenbuehl & Koltun, NeurIPS
2011) using PyDenseCRF: 10 mean-field iterations, appearance kernel weight ``a = 4``,
smoothness kernel weight ``b = 3``, ``theta_alpha = 67``, ``theta_beta = 3`` and
``theta_gamma = 1``. DepthG (Sick et al., CVPR 2024) uses the same post-processing.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from repro.utils.errors import UserError

__all__ = ["CRFPoolError", "CRFParams", "CRF_IMAGES", "crf_images", "denormalize_image", "dense_crf", "dense_crf_batch",
           "released_crf_image", "init_worker"]


class CRFPoolError(UserError, RuntimeError):
    """A DenseCRF worker process died (killed by a signal, out of memory) and the evaluation cannot finish."""


def pool_broken_message(processes: int | str) -> str:
    """The one-line explanation of a broken CRF pool, with the fix."""
    return (f"a DenseCRF worker process of the evaluation's pool ({processes} processes) died before finishing "
            "(killed by a signal or by the out-of-memory killer?); nothing was scored. Rerun; if it happens "
            "again, use fewer CRF processes (--set eval.crf_processes=0 runs the CRF in this process)")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CRF_IMAGES = ("rgb", "bgr_truncated")
"""How the CRF's appearance kernel sees the image: ``"rgb"``, the 8-bit RGB crop itself; or
``"bgr_truncated"``, the image exactly as the released STEGO/DepthG ``dense_crf`` builds it from the
normalised network input (docs/fidelity.md, R12; see :func:`released_crf_image`)."""


@dataclass(frozen=True)
class CRFParams:
    """Hyper-parameters of the dense CRF.

    Source: STEGO (Hamilton et al., ICLR 2022), appendix A.10.

    Attributes:
        iterations: Number of mean-field inference iterations (10).
        gaussian_sxy: Spatial std ``theta_gamma`` of the smoothness kernel, pixels (1).
        gaussian_compat: Weight ``b`` of the smoothness kernel (3).
        bilateral_sxy: Spatial std ``theta_alpha`` of the appearance kernel, pixels (67).
        bilateral_srgb: Colour std ``theta_beta`` of the appearance kernel, 0..255 RGB
            units (3).
        bilateral_compat: Weight ``a`` of the appearance kernel (4).
    """

    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0


def denormalize_image(image: torch.Tensor) -> np.ndarray:
    """Undo ImageNet normalisation and convert to an 8-bit RGB image.

    Args:
        image: Float tensor of shape ``(3, H, W)``, normalised with ImageNet mean
            ``(0.485, 0.456, 0.406)`` and std ``(0.229, 0.224, 0.225)`` (values of the
            un-normalised image in ``[0, 1]``).

    Returns:
        ``np.uint8`` array of shape ``(H, W, 3)``, values clipped to ``0..255``.

    Raises:
        ValueError: If ``image`` is not a floating-point tensor of shape ``(3, H, W)``.
    """
    image = torch.as_tensor(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"image must be a floating-point tensor, got dtype {image.dtype}")
    image = image.detach().to("cpu", torch.float32)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image * std + mean) * 255.0
    rgb = rgb.round().clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(rgb.permute(1, 2, 0).numpy())


def released_crf_image(image: torch.Tensor) -> np.ndarray:
    """The CRF image of the released code: un-normalised, x255 truncated to uint8, channels reversed (BGR).

    Replays ``np.array(VF.to_pil_image(unnorm(image_tensor)))[:, :, ::-1]`` of STEGO's and DepthG's
    ``src/crf.py`` (``dense_crf``): ``utils.UnNormalize`` (per channel ``x * std + mean`` in float32,
    in place), then torchvision's ``to_pil_image`` (``x * 255`` cast to uint8, i.e. truncated: a value
    that un-normalises to 254.99997 becomes 254), then the channel order reversed.

    Args:
        image: ``(3, H, W)`` float tensor, ImageNet-normalised RGB (the network input).

    Returns:
        ``np.uint8`` array ``(H, W, 3)`` in BGR order, C-contiguous.

    Raises:
        ValueError: if ``image`` is not a floating-point ``(3, H, W)`` tensor.
    """
    from torchvision.transforms.functional import to_pil_image

    image = torch.as_tensor(image)
    if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float tensor (3, H, W), got {image.dtype} {tuple(image.shape)}")
    x = image.detach().to("cpu", torch.float32).clone()
    for channel, mean, std in zip(x, IMAGENET_MEAN, IMAGENET_STD):
        channel.mul_(std).add_(mean)
    return np.ascontiguousarray(np.asarray(to_pil_image(x))[:, :, ::-1])


def crf_images(raw: np.ndarray, normalised: torch.Tensor, mode: str) -> np.ndarray:
    """The images a batch's CRF sees, per :data:`CRF_IMAGES`.

    Args:
        raw: ``(B, H, W, 3)`` uint8 RGB crops (used by ``"rgb"``).
        normalised: ``(B, 3, H, W)`` the same crops as the normalised network input (used by
            ``"bgr_truncated"``).
        mode: ``"rgb"`` or ``"bgr_truncated"``.

    Returns:
        ``(B, H, W, 3)`` uint8.

    Raises:
        ValueError: for an unknown ``mode``.
    """
    if mode == "rgb":
        return np.asarray(raw)
    if mode == "bgr_truncated":
        return np.stack([released_crf_image(img) for img in normalised])
    raise ValueError(f"crf_image must be one of {CRF_IMAGES}, got {mode!r}")


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must have dtype uint8 (0..255 RGB), got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    # pydensecrf needs a C-contiguous, *writeable* buffer (PIL-backed arrays are read-only).
    return np.require(image, requirements=["C_CONTIGUOUS", "WRITEABLE"])


def _prepare_logits(logits: torch.Tensor | np.ndarray, height: int, width: int) -> np.ndarray:
    """Upsample ``(K, h, w)`` logits to ``(H, W)`` and return softmax probs ``(K, H, W)``."""
    t = torch.as_tensor(logits)
    if t.ndim != 3:
        raise ValueError(f"logits must have shape (K, h, w), got {tuple(t.shape)}")
    if t.shape[0] < 1 or t.shape[1] < 1 or t.shape[2] < 1:
        raise ValueError(f"logits must be non-empty, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"logits must be floating point, got dtype {t.dtype}")
    # Always copy into a fresh torch-owned buffer: SIMD kernels can round differently for
    # differently aligned inputs (e.g. numpy views), and results must not depend on that.
    t = t.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)
    if tuple(t.shape[1:]) != (height, width):
        t = F.interpolate(t[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return torch.softmax(t, dim=0).numpy()


def dense_crf(
    image: np.ndarray,
    logits: torch.Tensor | np.ndarray,
    params: CRFParams = CRFParams(),
) -> np.ndarray:
    """Refine per-pixel class logits with a fully connected CRF.

    The logits are bilinearly upsampled (``align_corners=False``) to the image size if
    needed, turned into probabilities with a softmax over ``K``, converted to unary
    potentials with ``pydensecrf.utils.unary_from_softmax`` and refined with a Gaussian
    (smoothness) and a bilateral (appearance) pairwise term.

    Source: STEGO (Hamilton et al., ICLR 2022), appendix A.10; dense CRF of
    Kraehenbuehl & Koltun (NeurIPS 2011), Eq. 3.

    Args:
        image: ``np.uint8`` RGB image of shape ``(H, W, 3)``.
        logits: Float tensor/array of shape ``(K, h, w)`` (any resolution).
        params: CRF hyper-parameters.

    Returns:
        ``np.float32`` array of shape ``(K, H, W)``: per-pixel class probabilities
        (summing to 1 over ``K``).

    Raises:
        ValueError: If ``image`` is not a uint8 ``(H, W, 3)`` array, or ``logits`` is not
            a 3-D floating-point array.
    """
    # Imported lazily so that importing repro.evaluate does not need the C extension.
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    image = _check_image(image)
    height, width = image.shape[:2]
    probs = _prepare_logits(logits, height, width)
    num_classes = probs.shape[0]

    unary = np.ascontiguousarray(unary_from_softmax(probs), dtype=np.float32)
    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=image,
        compat=params.bilateral_compat,
    )
    q = crf.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(num_classes, height, width)


def init_worker() -> None:
    """Pool initializer: one torch thread per worker process (the pool parallelises)."""
    torch.set_num_threads(1)


def _crf_worker(args: tuple[np.ndarray, np.ndarray, CRFParams]) -> np.ndarray:
    """Pool worker (module level so that it pickles under the "spawn" start method)."""
    image, logits, params = args
    return dense_crf(image, logits, params)


def dense_crf_batch(
    images: np.ndarray | Sequence[np.ndarray],
    logits: torch.Tensor | np.ndarray,
    params: CRFParams = CRFParams(),
    processes: int = 0,
) -> np.ndarray:
    """Apply :func:`dense_crf` to every image of a batch, optionally in parallel.

    Source: STEGO (Hamilton et al., ICLR 2022), appendix A.10 (STEGO also runs the CRF
    over a batch with a process pool).

    Args:
        images: ``np.uint8`` array of shape ``(B, H, W, 3)`` or a length-``B`` list of
            ``(H, W, 3)`` uint8 arrays (all of the same size).
        logits: Float tensor/array of shape ``(B, K, h, w)``.
        params: CRF hyper-parameters.
        processes: ``0`` runs serially in this process; ``> 0`` uses a
            ``multiprocessing`` pool of that many workers. Results are identical and in
            input order either way. Workers are started with the "spawn" method (safe
            with torch's thread pools), which costs a few seconds of start-up per call.

    Returns:
        ``np.float32`` array of shape ``(B, K, H, W)`` of probabilities.

    Raises:
        ValueError: If the batch sizes differ, ``logits`` is not 4-D, the images differ
            in size or are not uint8 ``(H, W, 3)``, or ``processes < 0``.
    """
    if processes < 0:
        raise ValueError(f"processes must be >= 0, got {processes}")
    image_list = [images[i] for i in range(len(images))]
    for img in image_list:
        _check_image(img)
    if isinstance(logits, torch.Tensor):
        logits_np = logits.detach().to("cpu", torch.float32).numpy()
    else:
        logits_np = np.asarray(logits)
    if logits_np.ndim != 4:
        raise ValueError(f"logits must have shape (B, K, h, w), got {logits_np.shape}")
    if logits_np.shape[0] != len(image_list):
        raise ValueError(
            f"batch sizes differ: {len(image_list)} images but logits of shape {logits_np.shape}"
        )
    sizes = {img.shape for img in image_list}
    if len(sizes) > 1:
        raise ValueError(f"all images must have the same shape, got {sorted(sizes)}")
    if not image_list:
        return np.zeros((0, logits_np.shape[1], 0, 0), dtype=np.float32)

    jobs = [(np.ascontiguousarray(img), np.ascontiguousarray(lg), params)
            for img, lg in zip(image_list, logits_np)]
    if processes == 0:
        outputs = [_crf_worker(job) for job in jobs]
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(processes=min(processes, len(jobs)), initializer=init_worker) as pool:
            outputs = pool.map(_crf_worker, jobs)
    return np.stack(outputs, axis=0)
