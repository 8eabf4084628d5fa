"""Tiny fake datasets in the layouts the datasets are *published* in, for tests and smoke rehearsals.

Every layout fact below comes from the original code or the dataset's documentation, never from
repro's adapters (``repro/data/*.py``), so that a test reading these fakes checks the adapters
against the published layouts. Images are small, contents random but seeded (same arguments, same
contents; only the creation dates in MATLAB v5 and gzip headers differ), and writing any one dataset
takes well under a second.

COCO-Stuff-27, STEGO's ``cocostuff/`` copy (:func:`write_cocostuff_stego`):
    ``images/{train2017,val2017}/<id>.jpg`` and ``annotations/{train2017,val2017}/<id>.png`` (no
    ``stuffthingmaps_trainval2017`` level), lists ``curated/<folder>/<list>.txt`` with one id per
    line, where ``<list>`` is ``Coco164kFull_Stuff_Coarse.txt`` (subset None: STEGO's cocostuff27
    training set), ``Coco164kFew_Stuff_6.txt`` (subset 6, cocostuff3) or
    ``Coco164kFull_Stuff_Coarse_7.txt`` (subset 7: the cocostuff27 validation set and cocostuff15):
    STEGO ``src/data.py`` class ``Coco`` (``__init__``: ``image_list``, ``split_dirs``,
    ``join(self.root, "curated", split_dir, self.image_list)``, the image and label paths) and
    ``ContrastiveSegDataset`` (``subset`` per dataset name); ``crop_datasets.py`` builds its crops
    from that same ``Coco`` dataset. STEGO ships no fine->coarse file: the table is hard-coded
    (``Coco.fine_to_coarse``). Labels are uint8 PNGs, fine ids 0..181 and 255 unlabelled
    (``label[label == 255] = -1`` in ``Coco.__getitem__``; PiCIE ``data/coco_eval_dataset.py``
    ``load_data`` docstring: "class labels are in [0 - 181] and 255 is unlabeled"). Ids are COCO's
    12-digit zero-padded image ids (COCO file names, e.g. ``000000000139.jpg``).

COCO-Stuff-27, PiCIE's layout (:func:`write_cocostuff_picie`):
    PiCIE ``README.md`` ("Preparing Dataset"): ``coco/images/{train2017,val2017}/``,
    ``coco/annotations/{train2017,val2017}/``, with ``curated/`` and ``fine_to_coarse_dict.pickle``
    moved into ``coco/``; ``data/coco_eval_dataset.py``: the list
    ``curated/{split}2017/Coco164kFull_Stuff_Coarse_7.txt``, the pickle's key
    ``fine_index_to_coarse_index`` (int keys). The published pickle (janghyuncho/PiCIE, also
    xu-ji/IIC ``code/datasets/segmentation/util/out/``, written by IIC's
    ``cocostuff_fine_to_coarse.py`` under Python 2) is a protocol-0 dict with the two keys
    ``fine_index_to_coarse_index`` and ``fine_name_to_coarse_name``; a JSON export of the same
    dict (``fine_to_coarse_dict.json``, string keys) is written on request.

Cityscapes (:func:`write_cityscapes`):
    torchvision ``datasets.Cityscapes`` (its docstring and ``_get_target_suffix``; STEGO's
    ``CityscapesSeg`` reads through it with ``mode="fine"``, ``target_type="semantic"``):
    ``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` and, beside every image,
    ``gtFine/<split>/<city>/<stem>_gtFine_{instanceIds,labelIds,color}.png`` and
    ``<stem>_gtFine_polygons.json``; splits ``train``, ``val`` and ``test`` in fine mode. Class ids
    and colours: :data:`CITYSCAPES_LABELS`, recorded from torchvision's ``Cityscapes.classes`` (from
    cityscapesScripts ``labels.py``; tests/test_published_layouts.py compares the two).
    cityscapesScripts ``json2labelImg.py`` / ``json2instanceImg.py``: labelIds 8-bit, instanceIds
    ``labelId * 1000 + k`` for classes with instances (16 bit), colour maps RGBA; polygons json
    ``{"imgHeight", "imgWidth", "objects": [{"label", "polygon"}]}``. The public ``test`` split
    withholds its labels: its gtFine maps are all 0 (unlabeled) here. City names are the real ones
    of each split (val: frankfurt, lindau, munster).

Potsdam, IIC's preprocessed copy (:func:`write_potsdam`; STEGO's ``potsdam.zip``):
    IIC ``code/datasets/segmentation/util/potsdam_prepare.py``: ``imgs/<name>.mat`` with variable
    ``img`` (200, 200, 4) uint8 RGBIR, ``gt/<name>.mat`` with ``gt`` (200, 200) int32 in 0..5
    (0 roads, 1 buildings, 2 vegetation, 3 tree, 4 car, 5 clutter: its ``colour_dict``) written only
    for tiles of the 24 source images with labels; names are a random permutation of the tile
    numbers (``save_names``), written ``"%d\\n"`` into ``labelled_train.txt``,
    ``labelled_test.txt`` and ``unlabelled_train.txt``. STEGO ``src/data.py`` class ``Potsdam``
    also reads ``all.txt`` (``split_files``) and keeps only the first 3 channels.

NYU Depth V2, labelled set (:func:`write_nyuv2`):
    ``nyu_depth_v2_labeled.mat`` is MATLAB v7.3, i.e. HDF5 behind a 512-byte MATLAB header
    (NYU Depth V2 page: "Labeled dataset ... Matlab .mat file"; MATLAB's v7.3 MAT-file format);
    MATLAB variables ``images`` (480, 640, 3, N) uint8, ``depths`` and ``rawDepths`` (480, 640, N)
    single metres, ``labels`` (480, 640, N) uint16 (0 unlabelled), which h5py shows with the axes
    reversed: (N, 3, W, H) and (N, W, H). ``splits.mat`` (NYU toolbox): ``trainNdxs`` (795, 1) and
    ``testNdxs`` (654, 1), 1-based, double. The 13-class labels of ankurhanda/nyuv2-meta-data:
    ``classMapping40.mat`` (``mapClass`` (1, 894), 1..40), ``class13Mapping.mat`` (struct
    ``classMapping13`` with ``labels13`` (1, 40) and ``classNames`` (1, 13)), and
    ``train_labels_13/nyuv2_train_class13.tgz`` / ``test_labels_13/nyuv2_test_class13.tgz`` with
    members ``new_nyu_class13_NNNN.png`` (NNNN the 1-based labelled index).
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["write_all", "write_cocostuff_stego", "write_cocostuff_picie", "write_cityscapes", "write_potsdam", "write_nyuv2",
           "nyuv2_content", "CITYSCAPES_LABELS", "PUBLISHED_FINE_TO_COARSE_RUNS", "published_fine_to_coarse",
           "STEGO_COCO_LISTS", "NYU13_NAMES"]

# STEGO src/data.py Coco.fine_to_coarse, as runs (first fine id, last fine id, coarse index); the same
# values as fine_index_to_coarse_index of PiCIE's fine_to_coarse_dict.pickle (checked when recorded).
PUBLISHED_FINE_TO_COARSE_RUNS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 9), (1, 8, 11), (9, 14, 8), (15, 24, 7), (25, 32, 6), (33, 42, 10), (43, 50, 5), (51, 60, 2),
    (61, 70, 3), (71, 76, 0), (77, 82, 1), (83, 90, 4), (91, 92, 17), (93, 93, 22), (94, 95, 20), (96, 96, 22),
    (97, 97, 15), (98, 98, 25), (99, 99, 16), (100, 100, 13), (101, 102, 12), (103, 104, 17), (105, 105, 23),
    (106, 107, 15), (108, 108, 17), (109, 109, 15), (110, 110, 21), (111, 111, 15), (112, 112, 25),
    (113, 117, 13), (118, 118, 22), (119, 119, 26), (120, 121, 14), (122, 122, 15), (123, 123, 22),
    (124, 125, 21), (126, 126, 24), (127, 127, 20), (128, 128, 22), (129, 129, 15), (130, 130, 17),
    (131, 131, 16), (132, 132, 15), (133, 133, 22), (134, 134, 24), (135, 135, 21), (136, 136, 17),
    (137, 137, 25), (138, 138, 16), (139, 139, 21), (140, 140, 17), (141, 141, 22), (142, 142, 16),
    (143, 144, 21), (145, 145, 25), (146, 146, 21), (147, 147, 26), (148, 148, 21), (149, 149, 24),
    (150, 150, 20), (151, 151, 17), (152, 152, 14), (153, 153, 21), (154, 154, 26), (155, 155, 15),
    (156, 156, 23), (157, 157, 20), (158, 158, 21), (159, 159, 24), (160, 160, 15), (161, 161, 24),
    (162, 162, 22), (163, 163, 25), (164, 164, 15), (165, 165, 20), (166, 167, 17), (168, 168, 22),
    (169, 169, 14), (170, 176, 18), (177, 178, 26), (179, 180, 19), (181, 181, 24),
)
STEGO_COCO_LISTS = ("Coco164kFull_Stuff_Coarse.txt", "Coco164kFew_Stuff_6.txt", "Coco164kFull_Stuff_Coarse_7.txt")
"""STEGO src/data.py Coco.image_list for subset None, 6 and 7."""
NYU13_NAMES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table",
               "tv", "wall", "window")
"""nyuv2-meta-data class13Mapping.mat classMapping13.classNames, in order."""

# torchvision Cityscapes.classes (cityscapesScripts helpers/labels.py): (name, labelId, colour) for
# labelIds 0..33; classes 24..33 (person .. bicycle) have instances.
CITYSCAPES_LABELS: tuple[tuple[str, int, tuple[int, int, int]], ...] = (
    ("unlabeled", 0, (0, 0, 0)), ("ego vehicle", 1, (0, 0, 0)), ("rectification border", 2, (0, 0, 0)),
    ("out of roi", 3, (0, 0, 0)), ("static", 4, (0, 0, 0)), ("dynamic", 5, (111, 74, 0)), ("ground", 6, (81, 0, 81)),
    ("road", 7, (128, 64, 128)), ("sidewalk", 8, (244, 35, 232)), ("parking", 9, (250, 170, 160)),
    ("rail track", 10, (230, 150, 140)), ("building", 11, (70, 70, 70)), ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)), ("guard rail", 14, (180, 165, 180)), ("bridge", 15, (150, 100, 100)),
    ("tunnel", 16, (150, 120, 90)), ("pole", 17, (153, 153, 153)), ("polegroup", 18, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)), ("traffic sign", 20, (220, 220, 0)), ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)), ("sky", 23, (70, 130, 180)), ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)), ("car", 26, (0, 0, 142)), ("truck", 27, (0, 0, 70)), ("bus", 28, (0, 60, 100)),
    ("caravan", 29, (0, 0, 90)), ("trailer", 30, (0, 0, 110)), ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)), ("bicycle", 33, (119, 11, 32)),
)
CITYSCAPES_FIRST_INSTANCE_ID = 24

_MATLAB_V73_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."


def published_fine_to_coarse() -> dict[int, int]:
    """``{fine id: coarse index}`` for the 182 fine ids, from :data:`PUBLISHED_FINE_TO_COARSE_RUNS`."""
    return {f: c for first, last, c in PUBLISHED_FINE_TO_COARSE_RUNS for f in range(first, last + 1)}


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _jpg(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="JPEG", quality=90)


def _blocks(rng: np.random.Generator, hw: tuple[int, int], values: Sequence[int], block: int = 8) -> np.ndarray:
    """An ``hw`` map of ``block``-pixel squares, each a random choice of ``values`` (uint8 or wider)."""
    h, w = hw
    grid = rng.choice(np.asarray(values), size=(-(-h // block), -(-w // block)))
    return np.kron(grid, np.ones((block, block), grid.dtype))[:h, :w]


def _rgb(rng: np.random.Generator, hw: tuple[int, int], channels: int = 3) -> np.ndarray:
    return rng.integers(0, 256, size=(*hw, channels), dtype=np.uint8)


def _coco_ids(rng: np.random.Generator, n: int) -> list[str]:
    return [f"{i:012d}" for i in sorted(rng.choice(600_000, size=n, replace=False).tolist())]


def _write_coco_split(root: Path, folder: str, ids: list[str], rng: np.random.Generator, hw: tuple[int, int]) -> None:
    fine_values = list(range(182)) + [255]
    for i in ids:
        _jpg(root / "images" / folder / f"{i}.jpg", _rgb(rng, hw))
        label = _blocks(rng, hw, fine_values).astype(np.uint8)
        label[:8, :8] = 255  # every map has an unlabelled corner
        _png(root / "annotations" / folder / f"{i}.png", label)


def write_cocostuff_stego(root: str | Path, n_train: int = 4, n_val: int = 3, *, size: tuple[int, int] = (64, 80),
                          seed: int = 0) -> Path:
    """STEGO's ``cocostuff/`` copy (``<pytorch_data_dir>/cocostuff``; module docstring): images, label maps
    and the three curated lists per folder; no fine->coarse file.

    Args:
        root: the ``cocostuff`` folder to create.
        n_train, n_val: images in ``train2017`` / ``val2017``; every list names all of them except
            ``Coco164kFew_Stuff_6.txt``, which names the first half.
        size: ``(H, W)`` of every image.
        seed: random seed of ids and contents.

    Returns:
        ``root``.
    """
    root, rng = Path(root), np.random.default_rng(seed)
    for folder, n in (("train2017", n_train), ("val2017", n_val)):
        ids = _coco_ids(rng, n)
        _write_coco_split(root, folder, ids, rng, size)
        for name in STEGO_COCO_LISTS:
            listed = ids[: max(1, n // 2)] if name == "Coco164kFew_Stuff_6.txt" else ids
            (root / "curated" / folder).mkdir(parents=True, exist_ok=True)
            (root / "curated" / folder / name).write_text("".join(f"{i}\n" for i in listed))
    return root


def write_cocostuff_picie(root: str | Path, n_train: int = 4, n_val: int = 3, *, size: tuple[int, int] = (64, 80),
                          seed: int = 0, mapping: Mapping | None = None, formats: Sequence[str] = ("pickle",)) -> Path:
    """PiCIE's ``datasets/coco/`` (module docstring): images, label maps, ``curated/`` with the
    ``Coco164kFull_Stuff_Coarse_7.txt`` lists and ``fine_to_coarse_dict.pickle``.

    Args:
        root: the ``coco`` folder to create.
        n_train, n_val: images per folder.
        size: ``(H, W)`` of every image.
        seed: random seed.
        mapping: the dict to store (e.g. the real PiCIE file's content, both keys); default
            ``{"fine_index_to_coarse_index": published_fine_to_coarse()}``.
        formats: ``"pickle"`` (protocol 0, as published) and/or ``"json"`` (string keys).

    Returns:
        ``root``.
    """
    root, rng = Path(root), np.random.default_rng(seed)
    for folder, n in (("train2017", n_train), ("val2017", n_val)):
        ids = _coco_ids(rng, n)
        _write_coco_split(root, folder, ids, rng, size)
        (root / "curated" / folder).mkdir(parents=True, exist_ok=True)
        (root / "curated" / folder / "Coco164kFull_Stuff_Coarse_7.txt").write_text("".join(f"{i}\n" for i in ids))
    data = dict(mapping) if mapping is not None else {"fine_index_to_coarse_index": published_fine_to_coarse()}
    as_int = {k: ({int(f): int(c) for f, c in v.items()} if k == "fine_index_to_coarse_index" else dict(v))
              for k, v in data.items()}
    for fmt in formats:
        if fmt == "pickle":
            (root / "fine_to_coarse_dict.pickle").write_bytes(pickle.dumps(as_int, protocol=0))
        elif fmt == "json":
            as_str = {k: ({str(f): c for f, c in v.items()} if k == "fine_index_to_coarse_index" else v)
                      for k, v in as_int.items()}
            (root / "fine_to_coarse_dict.json").write_text(json.dumps(as_str))
        else:
            raise ValueError(f"formats: 'pickle' or 'json', got {fmt!r}")
    return root


_CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt", "lindau"), "test": ("berlin",)}


def write_cityscapes(root: str | Path, per_city: int = 2, *, cities: Mapping[str, Sequence[str]] | None = None,
                     size: tuple[int, int] = (64, 128), seed: int = 0) -> Path:
    """The official Cityscapes tree ``leftImg8bit/`` + ``gtFine/`` with every gtFine file type and a
    ``test/`` split (module docstring).

    Args:
        root: the ``cityscapes`` folder to create.
        per_city: frames per city.
        cities: ``{split: city names}``; default two train, two val and one test city.
        size: ``(H, W)`` (the real frames are 1024 x 2048).
        seed: random seed.

    Returns:
        ``root``.
    """
    root, rng = Path(root), np.random.default_rng(seed)
    names = {cid: name for name, cid, _ in CITYSCAPES_LABELS}
    colours = {cid: colour for _, cid, colour in CITYSCAPES_LABELS}
    h, w = size
    for split, city_names in (cities or _CITIES).items():
        for city in city_names:
            for k in range(per_city):
                stem = f"{city}_{k:06d}_{19 + 20 * k:06d}"
                _png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", _rgb(rng, size))
                label = np.zeros(size, np.uint8)
                instance = np.zeros(size, np.uint16)
                objects = []
                if split != "test":
                    counts: dict[int, int] = {}
                    for _ in range(6):  # axis-aligned rectangles, later ones on top (json2labelImg draws in order)
                        cid = int(rng.integers(0, 34))
                        y0, x0 = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
                        y1, x1 = int(rng.integers(y0 + 4, h + 1)), int(rng.integers(x0 + 4, w + 1))
                        label[y0:y1, x0:x1] = cid
                        if cid >= CITYSCAPES_FIRST_INSTANCE_ID:
                            instance[y0:y1, x0:x1] = cid * 1000 + counts.setdefault(cid, 0)
                            counts[cid] += 1
                        else:
                            instance[y0:y1, x0:x1] = cid
                        objects.append({"label": names[cid], "polygon": [[x0, y0], [x1 - 1, y0], [x1 - 1, y1 - 1],
                                                                     [x0, y1 - 1]]})
                colour = np.zeros((*size, 4), np.uint8)
                colour[..., 3] = 255
                for cid in np.unique(label):
                    colour[label == cid, :3] = colours[int(cid)]
                gt = root / "gtFine" / split / city
                _png(gt / f"{stem}_gtFine_labelIds.png", label)
                _png(gt / f"{stem}_gtFine_instanceIds.png", instance)
                _png(gt / f"{stem}_gtFine_color.png", colour)
                (gt / f"{stem}_gtFine_polygons.json").write_text(
                    json.dumps({"imgHeight": h, "imgWidth": w, "objects": objects}, indent=4))
    return root


def write_potsdam(root: str | Path, n_labelled_train: int = 4, n_labelled_test: int = 2, n_unlabelled: int = 3, *,
                  size: int = 200, seed: int = 0, all_list: bool = True) -> Path:
    """IIC's preprocessed Potsdam as STEGO's ``potsdam/`` copy holds it (module docstring).

    Tiles are numbered ``0..n-1``; their names are a seeded permutation of those numbers (as IIC's
    ``save_names``). Unlabelled tiles have an ``imgs/`` file and no ``gt/`` file.

    Args:
        root: the ``potsdam`` folder to create.
        n_labelled_train, n_labelled_test, n_unlabelled: tiles per list.
        size: tile side (200 as published).
        seed: random seed.
        all_list: also write ``all.txt`` naming every tile (read by STEGO's ``"all"`` split).

    Returns:
        ``root``.
    """
    from scipy.io import savemat

    root, rng = Path(root), np.random.default_rng(seed)
    n = n_labelled_train + n_labelled_test + n_unlabelled
    names = rng.permutation(n)
    lists = {"labelled_train": names[:n_labelled_train],
             "labelled_test": names[n_labelled_train:n_labelled_train + n_labelled_test],
             "unlabelled_train": names[n_labelled_train + n_labelled_test:]}
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    (root / "gt").mkdir(parents=True, exist_ok=True)
    for split, ids in lists.items():
        for name in ids:
            savemat(root / "imgs" / f"{name}.mat", {"img": _rgb(rng, (size, size), channels=4)})
            if split != "unlabelled_train":
                savemat(root / "gt" / f"{name}.mat", {"gt": _blocks(rng, (size, size), range(6), 20).astype(np.int32)})
        (root / f"{split}.txt").write_text("".join(f"{int(i)}\n" for i in ids))
    if all_list:
        (root / "all.txt").write_text("".join(f"{int(i)}\n" for i in names))
    return root


def _write_v73(path: Path, variables: Mapping[str, tuple[np.ndarray, str]]) -> None:
    """HDF5 behind MATLAB's 512-byte v7.3 header; ``variables``: name -> (array in h5py axis order, MATLAB class)."""
    import h5py

    with h5py.File(path, "w", userblock_size=512) as h5:
        for name, (array, matlab_class) in variables.items():
            ds = h5.create_dataset(name, data=array, chunks=(1, *array.shape[1:]))
            ds.attrs["MATLAB_class"] = np.bytes_(matlab_class)
    with open(path, "r+b") as fh:  # text (116 bytes), subsystem offset (8), version 0x0200, endian "IM"
        fh.write(_MATLAB_V73_HEADER.ljust(116) + bytes(8) + b"\x00\x02IM")


def nyuv2_content(n_frames: int = 8, size: tuple[int, int] = (48, 64), seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays :func:`write_nyuv2` stores for these arguments (what a correct reading must give back).

    Returns:
        ``map_class`` (894,) and ``labels13`` (40,) float64 (nyuv2-meta-data's mapping), ``rgb``
        (N, H, W, 3) uint8, ``depth`` / ``raw_depth`` (N, H, W) float32 metres (raw: 0 = no reading),
        ``labels`` (N, H, W) uint16 894-class, ``label13`` (N, H, W) uint8 (0 unlabelled, 1..13).
    """
    rng = np.random.default_rng(seed)
    h, w = size
    labels13 = np.r_[np.arange(1, 14), rng.integers(1, 14, 27)].astype(np.float64)  # 40 -> 13, every class used
    map_class = rng.permutation(np.r_[np.arange(1, 41), rng.integers(1, 41, 894 - 40)]).astype(np.float64)
    lut = np.r_[0, labels13[map_class.astype(np.int64) - 1]].astype(np.uint8)  # 894-class label -> 13-class
    rgb = _rgb(rng, (n_frames, h, w))
    depth = rng.uniform(0.7, 9.5, size=(n_frames, h, w)).astype(np.float32)
    raw = np.where(rng.random((n_frames, h, w)) < 0.1, 0, depth).astype(np.float32)
    labels = _blocks(rng, (n_frames * h, w), range(0, 895)).reshape(n_frames, h, w).astype(np.uint16)
    return {"map_class": map_class, "labels13": labels13, "rgb": rgb, "depth": depth, "raw_depth": raw,
            "labels": labels, "label13": lut[labels]}


def write_nyuv2(root: str | Path, train: Sequence[int] = (2, 3, 6), test: Sequence[int] = (1, 4, 5), *,
                n_frames: int = 8, size: tuple[int, int] = (48, 64), seed: int = 0) -> Path:
    """The official NYUv2 labelled-set files and nyuv2-meta-data's 13-class labels (module docstring).

    Writes ``root/nyu_depth_v2_labeled.mat``, ``root/splits.mat`` and ``root/nyuv2-meta-data/``
    (``classMapping40.mat``, ``class13Mapping.mat``, ``train_labels_13/nyuv2_train_class13.tgz``,
    ``test_labels_13/nyuv2_test_class13.tgz``); the stored arrays are :func:`nyuv2_content`.

    Args:
        root: folder to create.
        train, test: 1-based frame indices of ``trainNdxs`` / ``testNdxs`` (frames in neither are in
            the .mat only).
        n_frames: frames N in the .mat (1,449 as published).
        size: ``(H, W)`` (480 x 640 as published).
        seed: random seed.

    Returns:
        ``root``.
    """
    from scipy.io import savemat

    root = Path(root)
    c = nyuv2_content(n_frames, size, seed)
    meta = root / "nyuv2-meta-data"
    (meta / "train_labels_13").mkdir(parents=True, exist_ok=True)
    (meta / "test_labels_13").mkdir(parents=True, exist_ok=True)
    savemat(meta / "classMapping40.mat", {"mapClass": c["map_class"][None, :]})
    names = np.empty((1, 13), dtype=object)
    names[0, :] = list(NYU13_NAMES)
    savemat(meta / "class13Mapping.mat", {"classMapping13": {"labels13": c["labels13"][None, :], "classNames": names}})
    _write_v73(root / "nyu_depth_v2_labeled.mat", {
        "images": (c["rgb"].transpose(0, 3, 2, 1).copy(), "uint8"),  # (N, 3, W, H)
        "depths": (c["depth"].transpose(0, 2, 1).copy(), "single"),
        "rawDepths": (c["raw_depth"].transpose(0, 2, 1).copy(), "single"),
        "labels": (c["labels"].transpose(0, 2, 1).copy(), "uint16"),
    })
    savemat(root / "splits.mat", {"trainNdxs": np.asarray(train, np.float64)[:, None],
                                  "testNdxs": np.asarray(test, np.float64)[:, None]})
    for split, idx in (("train", train), ("test", test)):
        with tarfile.open(meta / f"{split}_labels_13" / f"nyuv2_{split}_class13.tgz", "w:gz") as tar:
            for i in idx:
                buf = io.BytesIO()
                Image.fromarray(c["label13"][i - 1]).save(buf, format="PNG")
                info = tarfile.TarInfo(f"new_nyu_class13_{i:04d}.png")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
    return root


def write_all(data_root: str | Path, *, n_train: int = 4, n_val: int = 3, seed: int = 0) -> dict[str, Path]:
    """Every fake under one ``$REPRO_DATA``-style root, under the folder names the experiment files use.

    ``cocostuff/`` (STEGO's copy), ``cityscapes/`` (``n_train`` / ``n_val`` frames per split, over
    the default cities), ``potsdam/`` (``n_train`` labelled_train, ``n_val`` labelled_test and
    ``n_val`` unlabelled tiles) and ``nyuv2-published/`` (the official files, ``n_train`` train and
    ``n_val`` test frames; convert them with ``repro data convert nyuv2`` into ``nyuv2/``).

    Returns:
        ``{"cocostuff27" | "cityscapes27" | "potsdam3" | "nyuv2-published": folder}``.
    """
    root = Path(data_root)
    per_city = max(1, -(-max(n_train, n_val) // 2))
    return {
        "cocostuff27": write_cocostuff_stego(root / "cocostuff", n_train, n_val, seed=seed),
        "cityscapes27": write_cityscapes(root / "cityscapes", per_city, seed=seed),
        "potsdam3": write_potsdam(root / "potsdam", n_train, n_val, n_val, seed=seed),
        "nyuv2-published": write_nyuv2(root / "nyuv2-published", train=range(1, n_train + 1),
                                       test=range(n_train + 1, n_train + n_val + 1),
                                       n_frames=n_train + n_val, seed=seed),
    }


if __name__ == "__main__":  # python tests/published_datasets.py DATA_ROOT [N_TRAIN N_VAL]
    import sys

    args = sys.argv[1:]
    if len(args) not in (1, 3):
        sys.exit("usage: python tests/published_datasets.py DATA_ROOT [N_TRAIN N_VAL]")
    sizes = {"n_train": int(args[1]), "n_val": int(args[2])} if len(args) == 3 else {}
    for name, folder in write_all(args[0], **sizes).items():
        print(f"{name}: {folder}")
