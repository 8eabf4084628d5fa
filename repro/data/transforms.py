"""Image tensors for the DINO backbone: ImageNet normalisation (DINO's training statistics)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "images_to_tensor"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def images_to_tensor(images: Sequence[np.ndarray] | np.ndarray, device: torch.device | str | None = None) -> Tensor:
    """Stack uint8 RGB images into a normalised float batch.

    Args:
        images: ``B`` arrays ``(H, W, 3)`` uint8 of equal size, or one ``(B, H, W, 3)`` array.
        device: target device.

    Returns:
        ``(B, 3, H, W)`` float32, ``(x / 255 - mean) / std`` per channel.

    Raises:
        ValueError: if the images are not uint8 ``(H, W, 3)`` of one size.
    """
    batch = np.stack(list(images)) if not isinstance(images, np.ndarray) else images
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (B, H, W, 3), got {batch.dtype} {batch.shape}")
    x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
