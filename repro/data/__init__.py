"""Dataset adapters, the common :class:`Sample` record and dataset manifests.

Adapters: :class:`CocoStuff27`, :class:`Cityscapes27`, :class:`Potsdam3`, :class:`NYUv2`
(look them up by name with :func:`get_dataset`). Manifests in ``data_manifests/`` describe the
expected layout, split sizes, checksums and download locations; :func:`verify_dataset` checks a
local copy against them.
"""

from __future__ import annotations

from repro.data.datasets.base import IGNORE, FirstImages, Sample
from repro.data.datasets.cityscapes import Cityscapes27, cityscapes_label_ids_to_27
from repro.data.datasets.cocostuff import CocoStuff27, coco_fine_to_coarse
from repro.data.datasets.manifest import VerifyReport, load_manifest, verify_dataset
from repro.data.datasets.nyuv2 import NYUv2
from repro.data.datasets.potsdam import Potsdam3, potsdam_merge_6_to_3
from repro.data.datasets.registry import DATASETS, get_dataset
from repro.utils.errors import DatasetError

__all__ = [
    "IGNORE",
    "Sample",
    "DatasetError",
    "FirstImages",
    "CocoStuff27",
    "Cityscapes27",
    "Potsdam3",
    "NYUv2",
    "coco_fine_to_coarse",
    "cityscapes_label_ids_to_27",
    "potsdam_merge_6_to_3",
    "DATASETS",
    "get_dataset",
    "load_manifest",
    "verify_dataset",
    "VerifyReport",
]
