"""Training crops read from the shards in a seeded, resumable order, each with its kNN partner.

The order of one epoch is a seeded permutation of the shards, and inside every shard a seeded
permutation of its samples: the reader walks one shard file at a time (a whole-shard shuffle
buffer), so reads stay local to one file as in sequential streaming. Every draw is a pure
function of ``(seed, position)``, where ``position = batch * batch_size + i`` counts samples
from the start of training across epochs. A run resumed at batch ``t`` therefore sees exactly
the samples, and the kNN partners, that an uninterrupted run sees at batch ``t``, whatever the
number of loader workers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from repro.data.knn import KnnTable
from repro.data.shards import ShardError, ShardRandomAccess, read_index, verify_once

__all__ = ["TrainingCrops", "epoch_order"]


def epoch_order(shard_keys: list[list[str]], seed: int, epoch: int) -> list[str]:
    """Sample keys of one epoch: shards in a seeded order, each shard's samples shuffled.

    Args:
        shard_keys: the keys of every shard, in shard order.
        seed: run seed.
        epoch: 0-based epoch.

    Returns:
        All keys, each exactly once.
    """
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    order: list[str] = []
    for shard in rng.permutation(len(shard_keys)):
        keys = shard_keys[int(shard)]
        order.extend(keys[int(i)] for i in rng.permutation(len(keys)))
    return order


class TrainingCrops(Dataset):
    """Map from a sample position to an anchor crop and its kNN partner (STEGO sec. 3.3).

    Args:
        shards: a training shard folder (``repro shards``).
        knn: the kNN table of those shards (``repro knn``).
        seed: run seed; fixes the epoch orders and the partner draws.
        num_neighbors: the partner is drawn uniformly from kNN ranks ``1..num_neighbors`` (7).
        require_depth: fail if a crop has no depth map (FPS sampling and the DepthG loss need it).
        images: read and decode the crops' pixels; ``False`` when the backbone's features come from
            a feature store (the items then have no ``image``/``partner_image``).

    Items (``dataset[position]``) are dicts of tensors: ``index``/``partner_index`` (crop ids
    into :attr:`keys`), ``image``/``partner_image`` ``(3, H, W)`` uint8 (with ``images``), ``label`` ``(H, W)``
    int64 with -1 = ignore, and when present ``depth``/``partner_depth`` ``(H, W)`` float32
    in [0, 1].

    Raises:
        ShardError: if the shards fail their integrity check (sha256 and offsets, verified fully the
            first time a shard set is opened, see :func:`repro.data.shards.verify_once`), the
            shards and the kNN table do not hold the same crops, or a crop lacks the depth or
            label the run needs.
    """

    def __init__(self, shards: str | Path, knn: KnnTable, *, seed: int, num_neighbors: int = 7,
                 require_depth: bool = True, images: bool = True) -> None:
        verify_once(shards)
        self.shards = ShardRandomAccess(shards)
        index = read_index(shards)
        by_shard: list[list[str]] = [[] for _ in index["shards"]]
        for key, (shard, _fields) in index["keys"].items():
            by_shard[shard].append(key)
        self.shard_keys = [sorted(keys) for keys in by_shard]
        self.keys = [key for keys in self.shard_keys for key in keys]
        self.key_index = {key: i for i, key in enumerate(self.keys)}
        if set(knn.keys) != set(self.keys):
            missing = sorted(set(self.keys) ^ set(knn.keys))[:3]
            raise ShardError(f"kNN table and shards {shards} hold different crops (e.g. {missing}); rebuild with `repro knn`")
        self.knn = knn
        self.seed = seed
        self.num_neighbors = num_neighbors
        self.require_depth = require_depth
        self.images = images
        self._orders: dict[int, list[str]] = {}

    def __len__(self) -> int:
        """Crops per epoch (positions beyond it wrap into the next epoch)."""
        return len(self.keys)

    def key_at(self, position: int) -> str:
        """The anchor key at a sample position."""
        epoch, offset = divmod(position, len(self.keys))
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.shard_keys, self.seed, epoch)}  # keep one epoch cached
        return self._orders[epoch][offset]

    def _read(self, key: str) -> dict:
        sample = self.shards.get(key, image=self.images)
        if sample["depth"] is None and self.require_depth:
            raise ShardError(f"crop {key!r} in {self.shards.shard_dir} has no depth map; this run needs depth "
                             "(rebuild the shards with a depth folder: `repro depth`, then `repro shards --depth`)")
        return sample

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        key = self.key_at(position)
        partner = self.knn.draw_partner(key, np.random.default_rng([self.seed, position]), self.num_neighbors)
        anchor, positive = self._read(key), self._read(partner)
        if anchor["label"] is None:
            raise ShardError(f"crop {key!r} has no label; the linear probe needs labels")
        item = {
            "index": torch.tensor(self.key_index[key]),
            "partner_index": torch.tensor(self.key_index[partner]),
            "label": torch.from_numpy(anchor["label"]),
        }
        if self.images:
            item["image"] = torch.from_numpy(np.ascontiguousarray(anchor["image"].transpose(2, 0, 1)))
            item["partner_image"] = torch.from_numpy(np.ascontiguousarray(positive["image"].transpose(2, 0, 1)))
        if anchor["depth"] is not None and positive["depth"] is not None:
            item["depth"] = torch.from_numpy(anchor["depth"])
            item["partner_depth"] = torch.from_numpy(positive["depth"])
        return item
