"""Cityscapes-27: Cityscapes fine annotations with the 27 classes used by IIC/PiCIE/STEGO/DepthG.

Layout (official ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``)::

    root/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png
    root/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png

The 27 classes are the Cityscapes labelIds 7..33 (``road`` .. ``bicycle``) in labelId order,
i.e. label = labelId - 7; labelIds 0..6 (unlabeled, ego vehicle, rectification border, out of
roi, static, dynamic, ground) and -1 (license plate) become -1. This is the "27 class"
evaluation of STEGO (its ``first_nonvoid = 7``). Source: Cordts et al., Cityscapes (CVPR 2016),
``cityscapesscripts/helpers/labels.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from repro.data.datasets.base import IGNORE, BaseDataset, Sample, make_key, read_png, read_rgb, require_dir

__all__ = ["Cityscapes27", "cityscapes_label_ids_to_27", "CITYSCAPES27_CLASS_NAMES", "FIRST_LABEL_ID",
           "list_frames"]

FIRST_LABEL_ID = 7
CITYSCAPES27_CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge",
    "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky",
    "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
FIX = ("register at https://www.cityscapes-dataset.com and download leftImg8bit_trainvaltest.zip and "
       "gtFine_trainvaltest.zip (see data_manifests/cityscapes27.yaml)")


def cityscapes_label_ids_to_27(label: np.ndarray) -> np.ndarray:
    """Map Cityscapes labelIds to the 27-class indices.

    Args:
        label: ``(H, W)`` integer labelIds as stored in ``*_gtFine_labelIds.png``.

    Returns:
        ``(H, W)`` int64: labelIds 7..33 -> 0..26, everything else -> -1 (:data:`IGNORE`).
    """
    label = np.asarray(label).astype(np.int64)
    out = label - FIRST_LABEL_ID
    out[(out < 0) | (out >= len(CITYSCAPES27_CLASS_NAMES))] = IGNORE
    return out


def list_frames(root: Path, split: str) -> list[tuple[str, str]]:
    """``(city, stem)`` of every ``<stem>_leftImg8bit.png`` under ``root/leftImg8bit/<split>``, sorted."""
    frames = []
    split_dir = root / "leftImg8bit" / split
    with os.scandir(split_dir) as cities:
        for city in cities:
            if not city.is_dir():
                continue
            with os.scandir(city.path) as files:
                frames.extend((city.name, f.name[: -len(IMAGE_SUFFIX)]) for f in files
                              if f.name.endswith(IMAGE_SUFFIX))
    return sorted(frames)


class Cityscapes27(BaseDataset):
    """Cityscapes with the 27 classes labelId 7..33 (2,975 train / 500 val fine-annotated frames).

    Args:
        root: folder with ``leftImg8bit/`` and ``gtFine/``.
        split: ``"train"`` or ``"val"``.

    Raises:
        ValueError: for another split (the test split has no public labels).
        MissingFileError: if ``root`` or ``root/leftImg8bit/<split>`` is missing; a missing label
            file is reported when the sample is loaded.
    """

    name = "cityscapes27"
    num_classes = 27
    class_names = CITYSCAPES27_CLASS_NAMES

    def __init__(self, root: str | Path, split: str) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"Cityscapes27: split must be 'train' or 'val', got {split!r}")
        super().__init__(root, split)
        require_dir(self.root, "Cityscapes root folder", FIX)
        require_dir(self.root / "leftImg8bit" / split, f"Cityscapes leftImg8bit/{split} folder", FIX)
        self._items = [{"key": make_key(self.name, split, stem), "city": city, "stem": stem}
                       for city, stem in list_frames(self.root, split)]

    def _load(self, item: dict) -> tuple[Sample, dict[str, Path]]:
        city, stem = item["city"], item["stem"]
        image_path = self.root / "leftImg8bit" / self.split / city / f"{stem}{IMAGE_SUFFIX}"
        label_path = self.root / "gtFine" / self.split / city / f"{stem}{LABEL_SUFFIX}"
        image = read_rgb(image_path, "Cityscapes image", FIX)
        label = cityscapes_label_ids_to_27(read_png(label_path, "Cityscapes gtFine labelIds map", FIX))
        meta = {"dataset": self.name, "split": self.split, "city": city, "stem": stem,
                "image": self._rel(image_path), "label": self._rel(label_path)}
        return Sample(item["key"], image, label, None, meta), {"image": image_path, "label": label_path}
