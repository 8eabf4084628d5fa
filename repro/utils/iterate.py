"""Small iteration helpers the standard library of the supported Python (3.11) lacks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["batched"]


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items of ``items`` (the last one shorter); ``itertools.batched`` of Python 3.12."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
