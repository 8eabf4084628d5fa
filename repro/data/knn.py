"""kNN table of training crops (STEGO sec. 3.3, README: Data pipeline).

Global-average-pooled backbone features of every training crop at 224 px, cosine similarity,
top-30 kept (rank 0 is the crop itself). At train time the positive is drawn uniformly from
ranks 1..7. Search is exact inner product on L2-normalised features with faiss
(``IndexFlatIP``; on a GPU when faiss was built with GPU support).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm import tqdm
from torch import nn

from repro.utils.files import atomic_path
from repro.data.transforms import images_to_tensor

__all__ = ["pooled_features", "search_knn", "KnnTable", "save_knn", "load_knn"]


@torch.no_grad()
def pooled_features(
    backbone: nn.Module, batches: Iterable[Sequence[np.ndarray]], device: torch.device | str = "cpu",
    *, dropout: float = 0.0, seed: int = 0,
) -> np.ndarray:
    """Global-average-pooled, L2-normalised backbone features (STEGO sec. 3.3: GAP(f)).

    With ``dropout > 0`` the features are ``GAP(Dropout2d(dropout)(f))`` with the dropout ACTIVE
    (docs/fidelity.md, R11: the released ``precompute_knns.py`` never called ``.eval()``, and
    ``DinoFeaturizer`` returns ``self.dropout(image_feat)``). The masks are drawn by
    ``torch.nn.Dropout2d`` from the global generator seeded with ``seed`` inside
    ``torch.random.fork_rng`` (the caller's random state is left untouched), one draw per batch
    in order, so the same seed, batch size and device give the same features.

    Args:
        backbone: maps ``(B, 3, H, W)`` normalised images to ``(B, C, h, w)`` features.
        batches: iterable of lists of ``(224, 224, 3)`` uint8 images.
        device: where the backbone runs.
        dropout: channel dropout probability p in [0, 1) (0.1 in the released code); 0 = off.
        seed: seed of the dropout masks.

    Returns:
        ``(N, C)`` float32, unit L2 norm per row.

    Raises:
        ValueError: if ``dropout`` is not in [0, 1).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"kNN feature dropout must be in [0, 1), got {dropout}")
    drop = nn.Dropout2d(dropout).train() if dropout > 0 else None
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    out = []
    with torch.random.fork_rng(devices=cuda_devices, enabled=drop is not None):  # manual_seed reseeds them all
        if drop is not None:
            torch.manual_seed(seed)
        for images in batches:
            feats = backbone(images_to_tensor(images, device))
            if drop is not None:
                feats = drop(feats)
            out.append(torch.nn.functional.normalize(feats.mean(dim=(2, 3)).float(), dim=1).cpu().numpy())
    if not out:
        raise ValueError("no images to compute kNN features from (the shard folder is empty)")
    return np.concatenate(out).astype(np.float32)


def search_knn(features: np.ndarray, k: int = 30, *, block: int = 16384, progress: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of every row among all rows (faiss ``IndexFlatIP``, on a GPU when faiss has one).

    The search is exact, as the released ``precompute_knns.py`` (a full similarity matrix, top-k);
    queries go in blocks of ``block`` rows, so memory beyond the index itself stays bounded
    (``block x k`` results and faiss's tiles): 248k COCO crops x 768 channels fit a normal node.
    Blocking cannot change the result: each query's top-k is computed against all rows.

    Args:
        features: ``(N, C)`` float32, L2-normalised rows.
        k: neighbours kept per row, including the row itself (30).
        block: queries per search call.
        progress: show a progress bar over the blocks.

    Returns:
        ``(indices (N, k) int64, similarities (N, k) float32)``, most similar first.

    Raises:
        ValueError: if ``features`` is not 2-D, has fewer than ``k`` rows, or ``block < 1``.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (N, C), got {features.shape}")
    n = features.shape[0]
    if n < k:
        raise ValueError(f"need at least k={k} crops for a top-{k} table, got {n}")
    features = np.ascontiguousarray(features, dtype=np.float32)
    index = faiss.IndexFlatIP(features.shape[1])
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:  # faiss-gpu on a cluster
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    index.add(features)
    idx, sims = np.empty((n, k), dtype=np.int64), np.empty((n, k), dtype=np.float32)
    for start in tqdm(range(0, n, block), desc="knn search", unit="block", disable=not progress):
        s, i = index.search(features[start:start + block], k)
        sims[start:start + block], idx[start:start + block] = s, i
    return idx, sims


@dataclass
class KnnTable:
    """Neighbour table keyed by sample key.

    Attributes:
        keys: ``N`` sample keys, in feature order.
        indices: ``(N, k)`` neighbour rows (rank 0 = the crop itself).
        similarities: ``(N, k)`` cosine similarities.
        meta: how the table was made (backbone, checkpoint, shard folder, k).
    """

    keys: list[str]
    indices: np.ndarray
    similarities: np.ndarray
    meta: dict

    def __post_init__(self) -> None:
        self._row = {key: i for i, key in enumerate(self.keys)}

    def draw_partner(self, key: str, rng: np.random.Generator, num_neighbors: int = 7) -> str:
        """Key of a positive drawn uniformly from ranks ``1..num_neighbors`` (STEGO: 7).

        Raises:
            KeyError: for an unknown key.
            ValueError: if the table keeps fewer than ``num_neighbors + 1`` columns.
        """
        if num_neighbors >= self.indices.shape[1]:
            raise ValueError(f"table keeps {self.indices.shape[1]} neighbours, cannot draw from top-{num_neighbors}")
        row = self._row[key]
        return self.keys[int(self.indices[row, rng.integers(1, num_neighbors + 1)])]


def save_knn(path: str | Path, table: KnnTable) -> None:
    """Write the table atomically as ``.npz`` (keys, indices, similarities, JSON meta)."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, keys=np.array(table.keys), indices=table.indices, similarities=table.similarities,
                 meta=np.array(json.dumps(table.meta, sort_keys=True)))


def load_knn(path: str | Path) -> KnnTable:
    """Read a table written by :func:`save_knn` and check it.

    Raises:
        FileNotFoundError: if the file is missing (run ``repro knn``).
        ValueError: naming the file, if it cannot be read, misses an array, has duplicate keys,
            ``indices``/``similarities`` are not ``(N, k)`` with ``N`` = number of keys, or an
            index is outside ``[0, N)`` (a partner would point at no crop).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"kNN table {path} not found; build it with `repro knn`")
    fix = "remove it and rerun `repro knn` (or `repro run`)"
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, indices, sims = [str(k) for k in data["keys"]], data["indices"], data["similarities"]
            meta = json.loads(str(data["meta"]))
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"kNN table {path} is unreadable ({exc}); {fix}") from exc
    n = len(keys)
    if len(set(keys)) != n:
        raise ValueError(f"kNN table {path} lists a key twice; {fix}")
    if not np.issubdtype(indices.dtype, np.integer) or indices.ndim != 2 or indices.shape[0] != n:
        raise ValueError(f"kNN table {path}: indices must be ({n}, k) integers, got {indices.dtype} {indices.shape}; {fix}")
    if sims.shape != indices.shape:
        raise ValueError(f"kNN table {path}: similarities {sims.shape} do not match indices {indices.shape}; {fix}")
    bad = (indices < 0) | (indices >= n)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"kNN table {path}: {int(bad.sum())} neighbour index(es) outside [0, {n}), first at row {row} "
                         f"({keys[row]}) rank {col}: {int(indices[row, col])}; {fix}")
    return KnnTable(keys, indices, sims, meta)
