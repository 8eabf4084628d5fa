"""Dataset manifests (``data_manifests/<name>.yaml``) and checks of local dataset copies against them.

A manifest records class names, ignore handling, split sizes, the expected layout, sha256 of
small list files and where to download everything. :func:`verify_dataset` compares a local copy
with it and returns human-readable lines such as
``"FAIL train: expected 49,629 image+label pairs, found 49,100; first missing: 000000000139 (...)"``.
A copy that holds fewer images than the published split, every one of them complete (its lists name
only files that exist), is a subset: ``"ok   val: subset: 8 of 2,175 images, layout OK"``, distinct
from a broken copy (a listed file missing), which stays a failure.
Existence checks list each folder once (``os.scandir``) and test set membership, so checking the
52k COCO files takes well under a second on a local disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from repro.data.datasets.cityscapes import IMAGE_SUFFIX, LABEL_SUFFIX, list_frames
from repro.data.datasets.cocostuff import (
    check_mapping_file, find_mapping_file, label_dir as coco_label_dir, read_id_list
)
from repro.data.datasets.nyuv2 import NYUv2
from repro.data.datasets.potsdam import IIC_SPLIT_FILES
from repro.utils.errors import DatasetError, MissingFileError
from repro.utils.files import file_sha256

__all__ = ["VerifyReport", "load_manifest", "manifest_dir", "verify_dataset"]

STEGO_FULL_LIST = "Coco164kFull_Stuff_Coarse.txt"
"""The curated list of STEGO's ``cocostuff/`` copy that its ``Coco`` dataset reads with ``subset=None``."""


def manifest_dir() -> Path:
    """``$REPRO_MANIFESTS`` if set (the container images set it), else ``data_manifests/`` at the
    repository root (two levels above this package)."""
    if os.environ.get("REPRO_MANIFESTS"):
        return Path(os.environ["REPRO_MANIFESTS"])
    return Path(__file__).resolve().parents[3] / "data_manifests"


def load_manifest(name: str) -> dict:
    """Read ``data_manifests/<name>.yaml``.

    Args:
        name: dataset name, e.g. ``"cocostuff27"``.

    Returns:
        The parsed YAML mapping.

    Raises:
        MissingFileError: if the manifest file (or the folder) does not exist.
    """
    path = manifest_dir() / f"{name}.yaml"
    if not path.is_file():
        raise MissingFileError(f"dataset manifest for {name!r}", path,
                               "run from a checkout of the repository (data_manifests/ lives at its root)")
    with path.open() as f:
        return yaml.safe_load(f)


@dataclass
class VerifyReport:
    """Result of :func:`verify_dataset`.

    Attributes:
        name: dataset name.
        root: the checked root folder.
        ok: True if every check passed.
        lines: one human-readable line per check, prefixed ``"ok  "``, ``"FAIL"`` or ``"info"``.
        subsets: ``{split: (found, published)}`` for every split that holds fewer images than the
            published one, all of them complete.
    """

    name: str
    root: str
    ok: bool = True
    lines: list[str] = field(default_factory=list)
    subsets: dict[str, tuple[int, int]] = field(default_factory=dict)

    def subset(self, split: str, found: int, expected: int) -> None:
        """Record a split that is a complete subset of the published one (does not affect ``ok``)."""
        self.subsets[split] = (found, expected)
        self.lines.append(f"ok   {split}: subset: {found:,} of {expected:,} images, layout OK")

    def summary(self) -> str:
        """One closing line: ``layout OK`` (complete), ``subset: N of M images, layout OK`` or ``FAILED``."""
        if not self.ok:
            return f"{self.name}: FAILED: the copy at {self.root} is broken (see the FAIL lines)"
        if self.subsets:
            found = sum(f for f, _ in self.subsets.values())
            expected = sum(e for _, e in self.subsets.values())
            return (f"{self.name}: subset: {found:,} of {expected:,} images, layout OK "
                    f"(splits {', '.join(self.subsets)} hold fewer images than published)")
        return f"{self.name}: layout OK"

    def check(self, passed: bool, message: str) -> bool:
        """Record one check; a failure makes the report not ok."""
        self.ok = self.ok and passed
        self.lines.append(f"{'ok  ' if passed else 'FAIL'} {message}")
        return passed

    def info(self, message: str) -> None:
        """Record a line that does not affect ``ok``."""
        self.lines.append(f"info {message}")


def _names(folder: Path) -> set[str]:
    """File names in ``folder`` (empty set if it does not exist)."""
    try:
        with os.scandir(folder) as it:
            return {e.name for e in it}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _count_line(report: VerifyReport, split: str, what: str, expected: int | None, found: int,
                first_missing: str | None) -> None:
    tail = f"; first missing: {first_missing}" if first_missing else ""
    if expected is None:
        report.info(f"{split}: found {found:,} {what} (no expected count in the manifest){tail}")
        if first_missing:
            report.check(False, f"{split}: listed files missing{tail}")
    elif 0 < found < expected and not first_missing:
        report.subset(split, found, expected)
    else:
        report.check(found == expected and not first_missing,
                     f"{split}: expected {expected:,} {what}, found {found:,}{tail}")


def _verify_coco_mapping(report: VerifyReport, m: dict, curated_root: Path) -> None:
    """The optional fine_to_coarse_dict: absent -> the shipped table; present -> it must agree with it."""
    path = find_mapping_file(curated_root)
    if path is None:
        report.info("fine_to_coarse_dict.json/.pickle not present: repro's shipped 182->27 table is used "
                    "(the one STEGO hard-codes in src/data.py)")
        return
    try:
        check_mapping_file(path)
    except DatasetError as exc:
        report.check(False, str(exc))
        return
    report.check(True, f"{path.name}: agrees with the shipped 182->27 table")
    recorded = {e["path"]: e["sha256"] for e in m.get("files") or []}
    if path.name in recorded:
        digest = file_sha256(path)
        if digest == recorded[path.name]:
            report.check(True, f"{path.name}: sha256 matches")
        else:
            report.info(f"{path.name}: sha256 {digest} differs from the manifest's (same mapping, other encoding)")


def _verify_coco(report: VerifyReport, m: dict, root: Path, splits: list[str], curated_root: Path) -> None:
    _verify_coco_mapping(report, m, curated_root)
    recorded = {e["path"]: e["sha256"] for e in m.get("files") or []}
    for split in splits:
        spec = m["splits"][split]
        list_path = curated_root / spec["id_list"]
        if not report.check(list_path.is_file(), f"{split}: id list {spec['id_list']} "
                            + ("present" if list_path.is_file() else f"missing ({list_path})")):
            continue
        ids = read_id_list(list_path)
        shorter = len(ids) < spec["count"]
        if not shorter:
            report.check(len(ids) == spec["count"], f"{split}: expected {spec['count']:,} ids in the curated "
                         f"list, found {len(ids):,}")
        if spec["id_list"] in recorded:
            digest = file_sha256(list_path)
            if digest == recorded[spec["id_list"]]:
                report.check(True, f"{spec['id_list']}: sha256 matches")
            elif shorter:
                report.info(f"{split}: the curated list names {len(ids):,} of the {spec['count']:,} published ids "
                            "(a subset list, so its sha256 differs from the published file's)")
            else:
                report.check(False, f"{spec['id_list']}: sha256 {digest} != manifest {recorded[spec['id_list']]}")
        stego_list = curated_root / "curated" / spec["folder"] / STEGO_FULL_LIST
        if split == "train" and stego_list.is_file():
            report.info(f"train: curated/{spec['folder']}/{STEGO_FULL_LIST} ({len(read_id_list(stego_list)):,} ids) "
                        "is the list STEGO's code trains cocostuff27 on (src/data.py Coco, subset None); repro "
                        f"reads {spec['id_list']} (README: Data pipeline)")
        image_dir = root / "images" / spec["folder"]
        label_dir = coco_label_dir(root, spec["folder"])
        images, labels = _names(image_dir), _names(label_dir)
        found, first = 0, None
        for i in ids:
            img_ok, lab_ok = f"{i}.jpg" in images, f"{i}.png" in labels
            found += img_ok and lab_ok
            if first is None and not (img_ok and lab_ok):
                miss = image_dir / f"{i}.jpg" if not img_ok else label_dir / f"{i}.png"
                first = f"{i} ({miss.relative_to(root).as_posix()})"
        _count_line(report, split, f"{split} image+label pairs", spec["count"], found, first)


def _verify_cityscapes(report: VerifyReport, m: dict, root: Path, splits: list[str]) -> None:
    for split in splits:
        present = (root / "leftImg8bit" / split).is_dir()
        if not report.check(present, f"{split}: folder leftImg8bit/{split} " + ("present" if present else "missing")):
            continue
        frames = list_frames(root, split)
        labels_by_city: dict[str, set[str]] = {}
        found, first = 0, None
        for city, stem in frames:
            labels = labels_by_city.setdefault(city, _names(root / "gtFine" / split / city))
            if f"{stem}{LABEL_SUFFIX}" in labels:
                found += 1
            elif first is None:
                first = f"gtFine/{split}/{city}/{stem}{LABEL_SUFFIX}"
        report.info(f"{split}: {len(frames):,} *{IMAGE_SUFFIX} images")
        _count_line(report, split, f"{split} image+label pairs", m["splits"][split]["count"], found, first)


def _verify_potsdam(report: VerifyReport, m: dict, root: Path, splits: list[str] | None) -> None:
    if (root / "imgs").is_dir():
        report.info("layout: iic (imgs/, gt/, <split>.txt)")
        imgs, gts = _names(root / "imgs"), _names(root / "gt")
        names = splits or list(m["splits"])
        for split in names:
            stem = IIC_SPLIT_FILES.get(split, split)
            spec = m["splits"].get(stem, {})
            path = root / f"{stem}.txt"
            if not path.is_file():
                if spec.get("optional"):
                    report.info(f"{split}: {stem}.txt not present (optional)")
                else:
                    report.check(False, f"{split}: split list {stem}.txt missing ({path})")
                continue
            ids = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
            labelled = not stem.startswith("unlabelled") and stem != "all"
            found, first = 0, None
            for i in ids:
                good = f"{i}.mat" in imgs and (not labelled or f"{i}.mat" in gts)
                found += good
                if first is None and not good:
                    first = f"{i} ({'imgs' if f'{i}.mat' not in imgs else 'gt'}/{i}.mat)"
            _count_line(report, stem, "ids" + (" with image+gt" if labelled else " with image"),
                        spec.get("count"), found, first)
            if spec.get("count") is not None and len(ids) > spec["count"]:
                report.check(False, f"{stem}: expected {spec['count']:,} ids listed, found {len(ids):,}")
    elif (root / "img_dir").is_dir():
        report.info("layout: mmseg (img_dir/, ann_dir/)")
        subs = [s for s in (splits or list(m.get("mmseg_splits", {}))) if (root / "img_dir" / s).is_dir()]
        for split in subs or [None]:
            img_dir = root / "img_dir" / split if split else root / "img_dir"
            ann = _names(root / "ann_dir" / split if split else root / "ann_dir")
            pngs = sorted(n for n in _names(img_dir) if n.endswith(".png"))
            missing = [n for n in pngs if n not in ann]
            expected = (m.get("mmseg_splits", {}).get(split) or {}).get("count") if split else None
            _count_line(report, split or "flat", "image+label pairs", expected, len(pngs) - len(missing),
                        f"ann_dir/{split + '/' if split else ''}{missing[0]}" if missing else None)
    else:
        report.check(False, f"no imgs/ (IIC layout) or img_dir/ (mmseg layout) under {root}")


def _verify_nyuv2(report: VerifyReport, m: dict, root: Path, splits: list[str]) -> None:
    for split in splits:
        try:
            ds = NYUv2(root, split)
        except (MissingFileError, DatasetError) as exc:
            report.check(False, f"{split}: {exc}".splitlines()[0])
            continue
        found, no_depth, first = 0, 0, None
        for item in ds._items:  # at most 1,449 images: plain is_file() is fast enough
            rgb_ok, lab_ok = (ds.root / item["rgb"]).is_file(), (ds.root / item["label"]).is_file()
            no_depth += not (ds.root / item["depth"]).is_file()
            found += rgb_ok and lab_ok
            if first is None and not (rgb_ok and lab_ok):
                first = item["rgb"] if not rgb_ok else item["label"]
        _count_line(report, split, f"{split} RGB+label images", m["splits"][split]["count"], found, first)
        if no_depth:
            report.info(f"{split}: {no_depth:,} images without a sensor depth file (depth=None)")


def verify_dataset(name: str, root: str | Path, *, splits: list[str] | None = None,
                   curated_root: str | Path | None = None) -> VerifyReport:
    """Check a local dataset copy against ``data_manifests/<name>.yaml``.

    Checks: COCO's curated lists have the recorded sha256 (a shorter list: a subset, info only) and
    an optional ``fine_to_coarse_dict.{json,pickle}`` agrees with the shipped 182->27 table; per
    split, the expected number of images (COCO: ids in the curated list and that each listed image
    and label file exists; Cityscapes: 2,975 / 500 image+label pairs; Potsdam: IIC split lists or
    mmseg folders; NYUv2: 795 / 654 RGB+label images), reporting the first missing file. Fewer
    images than published, none of the listed ones missing, is a subset (``subsets``, still ok).

    Args:
        name: dataset name (``cocostuff27``, ``cityscapes27``, ``potsdam3``, ``nyuv2``).
        root: dataset root folder.
        splits: splits to check; default all splits of the manifest.
        curated_root: COCO only: folder with ``curated/`` and the json (default ``root``).

    Returns:
        A :class:`VerifyReport`; ``ok`` is False if any check failed (a missing root included); a
        split with fewer images than published, all complete, is recorded in ``subsets`` and stays ok.

    Raises:
        MissingFileError: if the manifest itself is missing.
        ValueError: for an unknown dataset name.
    """
    m = load_manifest(name)
    root = Path(root)
    report = VerifyReport(name, str(root))
    if not report.check(root.is_dir(), f"root folder {root} " + ("exists" if root.is_dir() else "not found")):
        return report
    split_names = list(splits) if splits is not None else list(m["splits"])
    if name == "cocostuff27":
        _verify_coco(report, m, root, split_names, Path(curated_root) if curated_root else root)
    elif name == "cityscapes27":
        _verify_cityscapes(report, m, root, split_names)
    elif name == "potsdam3":
        _verify_potsdam(report, m, root, list(splits) if splits is not None else None)
    elif name == "nyuv2":
        _verify_nyuv2(report, m, root, split_names)
    else:
        raise ValueError(f"no verification for dataset {name!r}")
    return report
