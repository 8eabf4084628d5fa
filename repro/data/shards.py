"""WebDataset tar shards of prepared crops, with an index for checksums and random access.

A shard folder holds ``shard-000000.tar``, ... and ``index.json``. Each sample is stored
under its key with the fields

- ``img.png``: ``(H, W, 3)`` uint8 RGB, lossless PNG;
- ``label.png``: ``(H, W)`` uint8 class ids, 255 = ignore (only when the dataset has labels);
- ``depth.npy``: ``(H, W)`` float16 depth min-max normalised to [0, 1], or uint8 8-bit depth k
  (read back as ``k / 255``, lossless; docs/fidelity.md R4) (only with depth); for the other guidance
  signals (:mod:`repro.method.guidance`): ``(C, g, g)`` float16 MDE feature maps, or ``(H, W)`` int16
  class ids (-1 void) of a segmentation map, both read back as they are (float32 / int64);
- ``json``: metadata (dataset, split, crop box, raw depth range and source, ...).

``index.json`` records, per shard, the sample count, the sha256 and, per key, the byte
offset and size of every field inside the (uncompressed) tar. Training streams the shards
sequentially with ``webdataset``; the kNN partner of each anchor is then drawn at random and
read directly at its offsets (:class:`ShardRandomAccess`), which keeps STEGO's per-step
random draw from the top-7 neighbours without loading the dataset into memory.

The folder is written under a temporary name and renamed when complete, so a crash never
leaves a half-written folder that looks valid; the temporary folders of dead writers are removed
by the next write (:func:`repro.utils.files.remove_stale`).

Integrity on read: :func:`verify_once` checks every shard's sha256 and every indexed offset
against the tar member it points at, and records the verification (``verified.json``: the
index's sha256 and each shard's size and modification time) so that later opens only compare
file stats. A run opens its shards through it (the shards stage when reusing a shard set, and
:class:`~repro.data.train_crops.TrainingCrops`); :class:`ShardRandomAccess` additionally checks the
tar header in front of every field it reads, so an offset that points at another crop fails.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from repro.data.datasets.base import IGNORE, Sample
from repro.utils.errors import OutputExistsError, UserError
from repro.utils.files import atomic_path, file_sha256, owner_tag, remove_stale

__all__ = ["ShardError", "write_shards", "read_index", "verify_shards", "verify_once", "iter_shards",
           "ShardRandomAccess", "decode_fields"]

INDEX_NAME = "index.json"
VERIFIED_NAME = "verified.json"
FORMAT_VERSION = 1
LABEL_IGNORE_BYTE = 255


class ShardError(UserError, RuntimeError):
    """A shard is missing, truncated or corrupt; the message names the shard and key."""


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_sample(sample: Sample, depth01: np.ndarray | None) -> dict[str, bytes | str]:
    """Encode one crop as WebDataset fields.

    Args:
        sample: the crop; ``label`` int64 in ``[0, 255)`` or -1.
        depth01: ``(H, W)`` depth normalised to [0, 1] (stored as float16), uint8 8-bit depth
            (stored as it is), ``(C, g, g)`` MDE feature maps (float16), ``(H, W)`` int16 class ids, or None.

    Returns:
        A dict with ``__key__`` and the byte fields described in the module docstring.

    Raises:
        ValueError: if a label does not fit into uint8 or depth is outside [0, 1].
    """
    fields: dict[str, bytes | str] = {"__key__": sample.key, "img.png": _png(sample.image)}
    if sample.label is not None:
        label = sample.label
        if label.max(initial=-1) >= LABEL_IGNORE_BYTE or label.min(initial=0) < IGNORE:
            raise ValueError(f"{sample.key}: label values must be in [-1, 254] to store as PNG")
        fields["label.png"] = _png(np.where(label == IGNORE, LABEL_IGNORE_BYTE, label).astype(np.uint8))
    if depth01 is not None and (depth01.dtype == np.int16 or depth01.ndim == 3):  # class ids / MDE features
        if depth01.ndim == 3 and not np.isfinite(depth01).all():
            raise ValueError(f"{sample.key}: MDE feature maps must be finite")
        buf = io.BytesIO()
        np.save(buf, depth01 if depth01.dtype == np.int16 else depth01.astype(np.float16))
        fields["depth.npy"] = buf.getvalue()
    elif depth01 is not None:
        is_u8 = depth01.dtype == np.uint8
        if not is_u8 and (not np.isfinite(depth01).all() or depth01.min() < 0 or depth01.max() > 1):
            raise ValueError(f"{sample.key}: normalised depth must be finite and in [0, 1]")
        buf = io.BytesIO()
        np.save(buf, depth01 if is_u8 else depth01.astype(np.float16))
        fields["depth.npy"] = buf.getvalue()
    fields["json"] = json.dumps(sample.meta, sort_keys=True).encode()
    return fields


def decode_fields(key: str, fields: dict[str, bytes], *, image: bool = True) -> dict:
    """Decode raw field bytes into arrays.

    Args:
        key: the sample key (for error messages).
        fields: field name (``img.png``, ``label.png``, ``depth.npy``, ``json``) -> bytes.
        image: decode ``img.png``; with ``False`` it is not needed in ``fields`` and ``image`` is None
            (training on stored features never looks at the pixels).

    Returns:
        ``{"key", "image": (H, W, 3) uint8 or None, "label": (H, W) int64 with -1 ignore or None,
        "depth": (H, W) float32 in [0, 1], (C, g, g) float32 features, (H, W) int64 class ids, or None,
        "meta": dict}``.

    Raises:
        ShardError: if a field cannot be decoded (names the key).
    """
    try:
        pixels = np.asarray(Image.open(io.BytesIO(fields["img.png"])).convert("RGB")) if image else None
        label = None
        if "label.png" in fields:
            raw = np.asarray(Image.open(io.BytesIO(fields["label.png"]))).astype(np.int64)
            label = np.where(raw == LABEL_IGNORE_BYTE, IGNORE, raw)
        depth = None
        if "depth.npy" in fields:
            depth = np.load(io.BytesIO(fields["depth.npy"]))
            if depth.dtype == np.int16:  # class ids of a segmentation-map guidance
                depth = depth.astype(np.int64)
            else:
                depth = depth.astype(np.float32) / np.float32(255) if depth.dtype == np.uint8 else depth.astype(np.float32)
        meta = json.loads(fields["json"]) if "json" in fields else {}
    except (KeyError, OSError, ValueError) as exc:
        raise ShardError(f"sample {key!r}: cannot decode fields {sorted(fields)}: {exc}") from exc
    return {"key": key, "image": pixels, "label": label, "depth": depth, "meta": meta}


def write_shards(
    items: Iterable[tuple[Sample, np.ndarray | None]],
    out_dir: str | Path,
    *,
    shard_size: int = 1000,
    params: dict | None = None,
) -> dict:
    """Write ``(crop, depth01)`` pairs to shards in the given (deterministic) order.

    Args:
        items: crops and their normalised depth (or None), in the order to store.
        out_dir: the shard folder to create; must not exist yet.
        shard_size: samples per shard.
        params: what the shards were made from, recorded in the index (stage skipping).

    Returns:
        The index dict that was written to ``out_dir/index.json``.

    Raises:
        FileExistsError: if ``out_dir`` exists (remove it, or skip the stage).
        ValueError: on duplicate keys or unencodable samples.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise OutputExistsError(f"{out_dir} exists; remove it to rebuild the shards")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir.parent, out_dir.name)
    partial = out_dir.with_name(f".{out_dir.name}.partial-{owner_tag()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shards: list[dict] = []
    seen: set[str] = set()
    writer, writer_count, names = None, 0, []

    def close() -> None:
        if writer is not None:
            writer.close()
            path = partial / names[-1]
            shards.append({"name": names[-1], "sha256": file_sha256(path), "members": _member_offsets(path)})

    try:
        for sample, depth01 in items:
            if sample.key in seen:
                raise ValueError(f"duplicate sample key {sample.key!r}")
            seen.add(sample.key)
            if writer is None or writer_count == shard_size:
                close()
                names.append(f"shard-{len(names):06d}.tar")
                writer, writer_count = wds.TarWriter(str(partial / names[-1])), 0
            writer.write(encode_sample(sample, depth01))
            writer_count += 1
        close()
    except BaseException:
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written stays behind
        raise
    index = {
        "format": FORMAT_VERSION,
        "params": params,
        "count": sum(len(s["members"]) for s in shards),
        "shards": [{"name": s["name"], "sha256": s["sha256"], "count": len(s["members"])} for s in shards],
        "keys": {key: [i, fields] for i, s in enumerate(shards) for key, fields in s["members"].items()},
    }
    if not index["count"]:
        shutil.rmtree(partial, ignore_errors=True)
        raise ValueError(f"no samples to write into {out_dir} (the crops folder is empty)")
    (partial / INDEX_NAME).write_text(json.dumps(index))
    _record_verified(partial)  # the checksums were just computed from these files
    os.replace(partial, out_dir)
    return index


def _member_offsets(path: Path) -> dict[str, dict[str, list[int]]]:
    members: dict[str, dict[str, list[int]]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, _, field = info.name.partition(".")
            members.setdefault(key, {})[field] = [info.offset_data, info.size]
    return members


def _same_member(info: tarfile.TarInfo, name: str, size: int) -> bool:
    """The header in front of a field is that field's (a PAX header keeps the first 100 bytes of a long name)."""
    encoded = name.encode()
    return info.size == size and (info.name == name or (len(encoded) > 100 and info.name.encode() == encoded[:100]))


def read_index(shard_dir: str | Path) -> dict:
    """Load ``index.json`` of a shard folder.

    Raises:
        ShardError: if the folder or its index is missing or unreadable.
    """
    path = Path(shard_dir) / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ShardError(f"shard index {path} missing or unreadable ({exc}); rebuild with `repro shards`") from exc
    if index.get("format") != FORMAT_VERSION:
        raise ShardError(f"{path}: unknown shard format {index.get('format')!r}")
    return index


def verify_shards(shard_dir: str | Path) -> None:
    """Check every shard against the index: its sha256, and every indexed offset against the tar member there.

    Raises:
        ShardError: naming the first missing or modified shard, or the first key whose recorded
            offset does not point at its own member (e.g. at another crop).
    """
    shard_dir = Path(shard_dir)
    index = read_index(shard_dir)
    members: list[dict] = [{} for _ in index["shards"]]
    for key, (shard_idx, fields) in index["keys"].items():
        if not isinstance(shard_idx, int) or not 0 <= shard_idx < len(members):
            raise ShardError(f"{shard_dir / INDEX_NAME}: key {key!r} names shard {shard_idx!r}, which does not exist")
        members[shard_idx][key] = fields
    for shard, recorded in zip(index["shards"], members):
        path = shard_dir / shard["name"]
        if not path.is_file():
            raise ShardError(f"shard {path} is missing")
        if file_sha256(path) != shard["sha256"]:
            raise ShardError(f"shard {path} does not match its checksum (truncated or modified); rebuild it")
        actual = _member_offsets(path)
        for key, fields in recorded.items():
            for field, where in fields.items():
                if actual.get(key, {}).get(field) != list(where):
                    found = [f"{k}.{f}" for k, fs in actual.items() for f, w in fs.items() if w[0] == where[0]]
                    raise ShardError(f"{shard_dir / INDEX_NAME}: offset {where} of {key}.{field} in {path.name} points at "
                                     f"{found[0] if found else 'no member'}, not at {key}.{field}; rebuild the shards")
        if len(recorded) != shard["count"]:
            raise ShardError(f"{shard_dir / INDEX_NAME}: {shard['name']} indexes {len(recorded)} keys, count says "
                             f"{shard['count']}")


def _fingerprint(shard_dir: Path) -> dict:
    index = shard_dir / INDEX_NAME
    files = {}
    for shard in read_index(shard_dir)["shards"]:
        st = (shard_dir / shard["name"]).stat()
        files[shard["name"]] = [st.st_size, st.st_mtime_ns]
    return {"index_sha256": file_sha256(index), "shards": files}


def _record_verified(shard_dir: Path) -> None:
    with atomic_path(shard_dir / VERIFIED_NAME) as tmp:
        tmp.write_text(json.dumps(_fingerprint(shard_dir), sort_keys=True))


def verify_once(shard_dir: str | Path) -> bool:
    """Verify a shard set fully the first time, then only compare file stats with the record.

    The full check is :func:`verify_shards`; on success ``verified.json`` records the sha256 of
    ``index.json`` and each shard's size and modification time (nanoseconds). Later calls hash
    only ``index.json`` and stat the shards; any change triggers the full check again.

    Returns:
        True if the full check ran, False if the record matched.

    Raises:
        ShardError: see :func:`verify_shards`.
    """
    shard_dir = Path(shard_dir)
    record = shard_dir / VERIFIED_NAME
    try:
        current = _fingerprint(shard_dir)
        if record.is_file() and json.loads(record.read_text()) == current:
            return False
    except (OSError, ValueError):
        pass  # a missing shard or unreadable record: the full check names the problem
    verify_shards(shard_dir)
    try:
        _record_verified(shard_dir)
    except OSError:  # a read-only shard folder is verified on every open
        pass
    return True


def iter_shards(shard_dir: str | Path, *, verify: bool = False) -> Iterator[dict]:
    """Stream decoded samples from all shards in index order (webdataset).

    Args:
        shard_dir: the shard folder.
        verify: check the sha256 of every shard first.

    Yields:
        Decoded samples, see :func:`decode_fields`.

    Raises:
        ShardError: on a missing, truncated or corrupt shard (names the shard and last key)
            or a sample count that differs from the index. Nothing is skipped silently.
    """
    shard_dir = Path(shard_dir)
    index = read_index(shard_dir)
    if verify:
        verify_shards(shard_dir)
    for shard in index["shards"]:
        path = shard_dir / shard["name"]
        if not path.is_file():
            raise ShardError(f"shard {path} is missing")
        count, last_key = 0, None

        def reraise(exc: Exception, shard_path: Path = path) -> bool:
            raise ShardError(f"shard {shard_path}: read failed after key {last_key!r}: {exc}") from exc

        stream = wds.WebDataset(str(path), shardshuffle=False, handler=reraise, empty_check=False)
        for raw in stream:
            last_key = raw["__key__"]
            fields = {k: v for k, v in raw.items() if not k.startswith("__")}
            yield decode_fields(last_key, fields)
            count += 1
        if count != shard["count"]:
            raise ShardError(f"shard {path}: {count} samples read, index says {shard['count']} (truncated?)")


class ShardRandomAccess:
    """Read any sample by key through the byte offsets in the index (for kNN partners).

    Args:
        shard_dir: the shard folder.

    Raises:
        ShardError: if the index is missing.
    """

    def __init__(self, shard_dir: str | Path) -> None:
        self.shard_dir = Path(shard_dir)
        index = read_index(self.shard_dir)
        self.shard_names = [s["name"] for s in index["shards"]]
        self.keys: dict[str, list] = index["keys"]
        self._handles: dict[int, io.BufferedReader] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, key: str, *, image: bool = True) -> dict:
        """Decoded sample for ``key`` (see :func:`decode_fields`); ``image=False`` neither reads nor decodes the pixels.

        Raises:
            KeyError: for an unknown key.
            ShardError: if the bytes at the recorded offsets are missing or corrupt.
        """
        if key not in self.keys:
            raise KeyError(f"no sample {key!r} in {self.shard_dir}")
        shard_idx, fields = self.keys[key]
        fh = self._handles.get(shard_idx)
        if fh is None:
            path = self.shard_dir / self.shard_names[shard_idx]
            try:
                fh = self._handles[shard_idx] = open(path, "rb")
            except OSError as exc:
                raise ShardError(f"shard {path} cannot be opened: {exc}") from exc
        raw = {}
        for field, (offset, size) in fields.items():
            if field == "img.png" and not image:
                continue
            info = None
            if offset >= tarfile.BLOCKSIZE:
                fh.seek(offset - tarfile.BLOCKSIZE)
                with contextlib.suppress(tarfile.TarError):
                    info = tarfile.TarInfo.frombuf(fh.read(tarfile.BLOCKSIZE), tarfile.ENCODING, "surrogateescape")
            if info is None:
                raise ShardError(f"shard {self.shard_names[shard_idx]}: no tar header before the offset {offset} of "
                                 f"{key}.{field}; index and shard do not match, rebuild the shards")
            if not _same_member(info, f"{key}.{field}", size):
                raise ShardError(f"shard {self.shard_names[shard_idx]}: the offset {offset} of {key}.{field} points at "
                                 f"{info.name} ({info.size} bytes); index and shard do not match, rebuild the shards")
            raw[field] = fh.read(size)
            if len(raw[field]) != size:
                raise ShardError(f"shard {self.shard_names[shard_idx]}: sample {key!r} field {field} is truncated")
        return decode_fields(key, raw, image=image)

    def close(self) -> None:
        """Close open shard files."""
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def __getstate__(self) -> dict:  # file handles do not cross process boundaries
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
