"""COCO-Stuff-27: the curated COCO-Stuff subset of IIC used by PiCIE, STEGO and DepthG.

Layout (official COCO images + COCO-Stuff ``stuffthingmaps``; curated lists from PiCIE)::

    root/images/{train2017,val2017}/<id>.jpg
    root/annotations/stuffthingmaps_trainval2017/{train2017,val2017}/<id>.png   (fine ids 0..181, 255 unlabelled)
    curated_root/curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse_7.txt    (one 12-digit id per line)
    curated_root/fine_to_coarse_dict.json

``root/annotations/{train2017,val2017}/`` (STEGO's layout) is accepted for the label maps too.
The 182 fine classes map to 27 coarse classes (12 "things" then 15 "stuff" categories) through
``fine_index_to_coarse_index`` of the json; 255 and unmapped values become -1.
Sources: Caesar et al., COCO-Stuff (CVPR 2018); Ji et al., IIC (ICCV 2019); Cho et al.,
PiCIE (CVPR 2021) ``curated/``; Hamilton et al., STEGO (ICLR 2022).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from repro.data.sample import (IGNORE, BaseDataset, DatasetError, Sample, make_key, read_png, read_rgb, require_dir,
                               require_file)

__all__ = [
    "CocoStuff27",
    "coco_fine_to_coarse",
    "load_fine_to_coarse",
    "read_id_list",
    "COCO_FINE_NAMES",
    "COCO27_CLASS_NAMES",
    "CURATED_LIST",
]

CURATED_LIST = "curated/{folder}/Coco164kFull_Stuff_Coarse_7.txt"
MAPPING_JSON = "fine_to_coarse_dict.json"
FIX_IMAGES = ("download train2017.zip / val2017.zip from http://images.cocodataset.org/zips/ and "
              "stuffthingmaps_trainval2017.zip from https://github.com/nightrome/cocostuff (releases); "
              "see data_manifests/cocostuff27.yaml")
FIX_CURATED = ("get curated/ and fine_to_coarse_dict.json from https://github.com/janghyuncho/PiCIE "
               "(see data_manifests/cocostuff27.yaml)")

# The 182 COCO-Stuff fine classes in label-map order (label value = official 1-based id - 1):
# 91 thing ids (including the 11 ids COCO never annotated) followed by 91 stuff classes.
COCO_FINE_NAMES: tuple[str, ...] = tuple(s.strip() for s in """
person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light, fire hydrant,
street sign, stop sign, parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant, bear,
zebra, giraffe, hat, backpack, umbrella, shoe, eye glasses, handbag, tie, suitcase, frisbee, skis,
snowboard, sports ball, kite, baseball bat, baseball glove, skateboard, surfboard, tennis racket,
bottle, plate, wine glass, cup, fork, knife, spoon, bowl, banana, apple, sandwich, orange, broccoli,
carrot, hot dog, pizza, donut, cake, chair, couch, potted plant, bed, mirror, dining table, window,
desk, toilet, door, tv, laptop, mouse, remote, keyboard, cell phone, microwave, oven, toaster, sink,
refrigerator, blender, book, clock, vase, scissors, teddy bear, hair drier, toothbrush, hair brush,
banner, blanket, branch, bridge, building-other, bush, cabinet, cage, cardboard, carpet,
ceiling-other, ceiling-tile, cloth, clothes, clouds, counter, cupboard, curtain, desk-stuff, dirt,
door-stuff, fence, floor-marble, floor-other, floor-stone, floor-tile, floor-wood, flower, fog,
food-other, fruit, furniture-other, grass, gravel, ground-other, hill, house, leaves, light, mat,
metal, mirror-stuff, moss, mountain, mud, napkin, net, paper, pavement, pillow, plant-other,
plastic, platform, playingfield, railing, railroad, river, road, rock, roof, rug, salad, sand, sea,
shelf, sky-other, skyscraper, snow, solid-other, stairs, stone, straw, structural-other, table,
tent, textile-other, towel, tree, vegetable, wall-brick, wall-concrete, wall-other, wall-panel,
wall-stone, wall-tile, wall-wood, water-other, waterdrops, window-blind, window-other, wood
""".split(","))

# Coarse index order of fine_to_coarse_dict.json (as used by STEGO's evaluation): 12 thing
# categories, then 15 stuff categories. Checked against the json by load_fine_to_coarse().
COCO27_CLASS_NAMES: tuple[str, ...] = (
    "electronic-things", "appliance-things", "food-things", "furniture-things", "indoor-things",
    "kitchen-things", "accessory-things", "animal-things", "outdoor-things", "person-things",
    "sports-things", "vehicle-things",
    "ceiling-stuff", "floor-stuff", "food-stuff", "furniture-stuff", "rawmaterial-stuff", "textile-stuff",
    "wall-stuff", "window-stuff", "building-stuff", "ground-stuff", "plant-stuff", "sky-stuff",
    "solid-stuff", "structural-stuff", "water-stuff",
)


def _mapping_lut(mapping: Mapping | np.ndarray) -> np.ndarray:
    """A 256-entry int64 lookup table (fine id -> coarse id, -1 elsewhere) from any mapping form."""
    if isinstance(mapping, np.ndarray):
        lut = np.full(256, IGNORE, dtype=np.int64)
        lut[: min(256, mapping.size)] = mapping.astype(np.int64)[:256]
        lut[255] = IGNORE
        return lut
    if "fine_index_to_coarse_index" in mapping:
        mapping = mapping["fine_index_to_coarse_index"]
    lut = np.full(256, IGNORE, dtype=np.int64)
    for fine, coarse in mapping.items():
        fine = int(fine)
        if not 0 <= fine < 255:
            raise ValueError(f"fine id {fine} outside 0..254 in the fine->coarse mapping")
        lut[fine] = int(coarse)
    return lut


def coco_fine_to_coarse(label: np.ndarray, mapping: Mapping | np.ndarray) -> np.ndarray:
    """Map a COCO-Stuff fine label map (0..181, 255 unlabelled) to the 27 coarse classes.

    Args:
        label: ``(H, W)`` integer array of fine ids as stored in ``stuffthingmaps`` PNGs.
        mapping: ``fine_index_to_coarse_index`` (``{"0": 9, ...}``; str or int keys), the whole
            ``fine_to_coarse_dict.json`` dict, or a lookup array indexed by fine id.

    Returns:
        ``(H, W)`` int64 coarse ids in ``[0, 27)``; 255, unmapped ids and values outside
        0..255 become -1 (:data:`IGNORE`).
    """
    lut = _mapping_lut(mapping)
    label = np.asarray(label)
    out = np.full(label.shape, IGNORE, dtype=np.int64)
    inside = (label >= 0) & (label < 256)
    out[inside] = lut[label[inside].astype(np.int64)]
    return out


def load_fine_to_coarse(path: str | Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """Read ``fine_to_coarse_dict.json`` and derive the coarse class names in coarse-index order.

    The coarse name of coarse index ``c`` is ``fine_name_to_coarse_name[COCO_FINE_NAMES[f]]`` for
    every fine id ``f`` with ``fine_index_to_coarse_index[f] == c``; all such ``f`` must agree.

    Args:
        path: the json file.

    Returns:
        ``(lut, names)``: 256-entry int64 lookup table and the 27 coarse names.

    Raises:
        MissingFileError: if the file does not exist.
        DatasetError: if the json lacks a key, or names and indices disagree.
    """
    path = require_file(path, "COCO-Stuff fine_to_coarse_dict.json", FIX_CURATED)
    data = json.loads(path.read_text())
    try:
        index_map = {int(k): int(v) for k, v in data["fine_index_to_coarse_index"].items()}
        name_map = data["fine_name_to_coarse_name"]
    except KeyError as exc:
        raise DatasetError(f"{path}: missing key {exc}") from exc
    names: dict[int, str] = {}
    for fine, coarse in sorted(index_map.items()):
        if fine >= len(COCO_FINE_NAMES) or COCO_FINE_NAMES[fine] not in name_map:
            raise DatasetError(f"{path}: fine id {fine} has no entry in fine_name_to_coarse_name")
        cname = name_map[COCO_FINE_NAMES[fine]]
        if names.setdefault(coarse, cname) != cname:
            raise DatasetError(f"{path}: coarse index {coarse} is both {names[coarse]!r} and {cname!r}")
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"{path}: coarse indices are not contiguous: {sorted(names)}")
    return _mapping_lut(index_map), tuple(names[c] for c in range(len(names)))


def read_id_list(path: str | Path) -> list[str]:
    """Read a curated id list (one COCO image id per line, blank lines skipped).

    Raises:
        MissingFileError: if the file does not exist.
    """
    path = require_file(path, "COCO-Stuff-27 curated id list", FIX_CURATED)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def label_dir(root: Path, folder: str) -> Path:
    """The stuffthingmaps folder of ``folder`` (``train2017``/``val2017``): official or STEGO layout."""
    official = root / "annotations" / "stuffthingmaps_trainval2017" / folder
    stego = root / "annotations" / folder
    return stego if not official.is_dir() and stego.is_dir() else official


class CocoStuff27(BaseDataset):
    """COCO-Stuff-27 curated split (49,629 train / 2,175 val images), 27 coarse classes.

    Args:
        root: folder with ``images/`` and ``annotations/`` (see module docstring).
        split: ``"train"`` or ``"val"``.
        curated_root: folder with ``curated/`` and ``fine_to_coarse_dict.json``; default ``root``.

    Raises:
        ValueError: for another split.
        MissingFileError: if ``root``, the curated list or the json is missing (items' files are
            checked when loaded).
        DatasetError: if the json is inconsistent or disagrees with :data:`COCO27_CLASS_NAMES`.
    """

    name = "cocostuff27"
    num_classes = 27
    class_names = COCO27_CLASS_NAMES

    def __init__(self, root: str | Path, split: str, *, curated_root: str | Path | None = None) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"CocoStuff27: split must be 'train' or 'val', got {split!r}")
        super().__init__(root, split)
        require_dir(self.root, "COCO-Stuff root folder", FIX_IMAGES)
        self.curated_root = Path(curated_root) if curated_root is not None else self.root
        folder = f"{split}2017"
        json_path = self.curated_root / MAPPING_JSON
        self.lut, names = load_fine_to_coarse(json_path)
        if names != COCO27_CLASS_NAMES:
            raise DatasetError(f"{json_path}: coarse classes {names} differ from the expected {COCO27_CLASS_NAMES}")
        self.image_dir = self.root / "images" / folder
        self.label_dir = label_dir(self.root, folder)
        ids = sorted(read_id_list(self.curated_root / CURATED_LIST.format(folder=folder)))
        self._items = [{"key": make_key(self.name, split, i), "id": i} for i in ids]

    def _load(self, item: dict) -> tuple[Sample, dict[str, Path]]:
        image_path = self.image_dir / f"{item['id']}.jpg"
        label_path = self.label_dir / f"{item['id']}.png"
        image = read_rgb(image_path, "COCO image", FIX_IMAGES)
        raw = read_png(label_path, "COCO-Stuff stuffthingmap", FIX_IMAGES)
        label = coco_fine_to_coarse(raw, self.lut)
        meta = {"dataset": self.name, "split": self.split, "id": item["id"],
                "image": self._rel(image_path), "label": self._rel(label_path)}
        return (Sample(item["key"], image, label, None, meta), {"image": image_path, "label": label_path})
