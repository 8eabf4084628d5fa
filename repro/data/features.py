"""A feature store: the frozen backbone's features of every training crop, computed once, shared by runs.

The backbone is frozen, so its output for a crop never changes. With ``train.feature_store`` set,
``repro run`` computes the features of all training crops once per (crops, backbone) into
``<work>/data/<dataset>/features-<crops>-<arch>/`` and every entry and seed that trains on those crops
reads them from there instead of running the ViT again:

- ``features.npy``: ``(N, C, h, w)`` float16 (NumPy format, memory-mapped when read), rows in the
  order of ``index.json``'s ``keys``;
- ``index.json``: keys, shape, the crops folder and backbone file it was made from, and the
  sha256 of ``features.npy`` (checked once when a run first opens the store, then recorded).

float16 rounds each feature to ~5e-4 relative, so runs with a store differ from runs without one in
the last digits; both are deterministic. The folder is written under a temporary name and renamed
when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from repro.data.crops import iter_crops
from repro.data.stages import INDEX, existing, finish
from repro.data.transforms import images_to_tensor
from repro.utils.errors import UserError
from repro.utils.files import file_sha256
from repro.utils.iterate import batched

__all__ = ["FeatureStore", "feature_store_stage", "FeatureStoreError"]

FEATURES = "features.npy"


class FeatureStoreError(UserError, RuntimeError):
    """A feature store that is incomplete, modified or made from other inputs; the message names it."""


@torch.no_grad()
def feature_store_stage(crops: str | Path, out: str | Path, backbone, *, params: dict, batch_size: int = 32,
                        device: str | torch.device = "cpu", progress: bool = True) -> Path:
    """Compute ``backbone(crop)`` for every training crop into a store (see module docstring).

    Args:
        crops: a finished training crops folder (``repro prepare``).
        out: the store folder to create; an existing store made with the same ``params`` is reused.
        backbone: ``(B, 3, H, W) -> (B, C, h, w)``, the frozen DINO backbone.
        params: what identifies the store (shard folder, arch, backbone sha256); recorded and compared.
        batch_size: crops per forward pass.
        device: where the backbone runs.
        progress: show a progress bar.

    Returns:
        The store folder.

    Raises:
        FileExistsError: ``out`` holds a store made from other inputs.
        FileNotFoundError: an incomplete crops folder.
    """
    out = Path(out)
    if existing(out, params):
        return out
    crops_index = Path(crops) / INDEX
    if not crops_index.is_file():
        raise FileNotFoundError(f"{crops} is not a finished crops folder (no {INDEX}); run `repro prepare`")
    keys = json.loads(crops_index.read_text())["keys"]
    if not keys:
        raise FileNotFoundError(f"{crops} holds no crops")
    partial = out.with_name(f".{out.name}.partial")  # the data stages run under the data folder's lock
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    array = None
    done = 0
    bar = tqdm(total=len(keys), desc="features", unit="img", disable=not progress)
    for batch in batched(iter_crops(crops), batch_size):  # streamed: one batch of decoded crops in memory
        feats = backbone(images_to_tensor([c.image for c in batch], device)).float().cpu().numpy()
        if array is None:
            array = np.lib.format.open_memmap(partial / FEATURES, mode="w+", dtype=np.float16,
                                              shape=(len(keys), *feats.shape[1:]))
        array[done : done + len(batch)] = feats.astype(np.float16)
        done += len(batch)
        bar.update(len(batch))
    bar.close()
    array.flush()
    shape = list(array.shape)
    del array
    return finish(partial, out, {"params": params, "keys": keys, "shape": shape, "dtype": "float16",
                                  "sha256": file_sha256(partial / FEATURES)})


class FeatureStore:
    """Read-only access to a store by crop key (memory-mapped; nothing is loaded up front).

    Args:
        folder: a finished store.
        verify: check the sha256 of ``features.npy`` once (recorded in ``verified.json`` with the
            file's size and mtime, so later opens only compare those).

    Raises:
        FeatureStoreError: missing index, a modified or truncated file.
    """

    def __init__(self, folder: str | Path, *, verify: bool = True) -> None:
        self.folder = Path(folder)
        try:
            self.index = json.loads((self.folder / INDEX).read_text())
        except (OSError, ValueError) as exc:
            raise FeatureStoreError(f"feature store {self.folder} is incomplete ({exc}); remove it to rebuild") from None
        path = self.folder / FEATURES
        if verify:
            self._verify(path)
        self.array = np.load(path, mmap_mode="r")
        if list(self.array.shape) != self.index["shape"]:
            raise FeatureStoreError(f"{path} has shape {self.array.shape}, its index says {self.index['shape']}")
        self.row = {key: i for i, key in enumerate(self.index["keys"])}

    def _verify(self, path: Path) -> None:
        stamp = {"bytes": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns, "sha256": self.index["sha256"]}
        record = self.folder / "verified.json"
        if record.is_file() and json.loads(record.read_text()) == stamp:
            return
        if file_sha256(path) != self.index["sha256"]:
            raise FeatureStoreError(f"{path} does not match its checksum (modified or truncated); remove "
                                    f"{self.folder} to rebuild it")
        record.write_text(json.dumps(stamp))

    def __len__(self) -> int:
        return len(self.row)

    def get(self, keys: list[str]) -> torch.Tensor:
        """Features ``(B, C, h, w)`` float32 of the named crops.

        Raises:
            KeyError: a key that is not in the store.
        """
        missing = [k for k in keys if k not in self.row]
        if missing:
            raise KeyError(f"crops {missing[:3]} are not in the feature store {self.folder}; rebuild it")
        rows = np.array([self.row[k] for k in keys])
        return torch.from_numpy(np.ascontiguousarray(self.array[rows])).float()
