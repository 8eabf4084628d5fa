"""Load a ``torch.save`` file without executing pickled code: the weights-only reader plus inert stand-ins.

``torch.load(weights_only=True)`` refuses every pickled global that torch does not allowlist. The
published STEGO/DepthG checkpoints pickle OmegaConf config objects; instead of importing omegaconf
(or falling back to ``weights_only=False``), each allowlisted OmegaConf class is replaced by an inert
:class:`PickledStandIn` registered under the OmegaConf global name: it keeps the pickled state and runs
nothing. :func:`to_plain` turns those objects into plain dicts and lists.

Before loading, :func:`safe_torch_load` disassembles the pickle
(``torch.serialization.get_unsafe_globals_in_checkpoint``) and refuses a file that names any global
outside the allowlist, listing them all, so nothing of such a file is ever unpickled.
"""

from __future__ import annotations

import collections
import copyreg
import pickle
import typing
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["CheckpointFormatError", "UnsafeCheckpointError", "OMEGACONF_GLOBALS", "PickledStandIn", "allowed_globals",
           "to_plain", "safe_torch_load"]


class CheckpointFormatError(ValueError):
    """A file that is not a complete checkpoint (truncated, corrupt, not torch.save, top-level keys missing)."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint whose pickle references a global outside the allowlist; nothing of it was loaded."""


OMEGACONF_GLOBALS = (
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata", "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode", "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode",
)
"""OmegaConf classes read as inert stand-ins (the released files use DictConfig, ContainerMetadata,
Metadata and AnyNode; list values and typed nodes of other OmegaConf versions use the rest)."""

_PLAIN_GLOBALS: dict[str, Any] = {"builtins.dict": dict, "collections.defaultdict": collections.defaultdict,
                                  "typing.Any": typing.Any}
"""Harmless real objects the OmegaConf metadata references (``dict()``, ``defaultdict(dict)``, ``Any``)."""


class PickledStandIn:
    """Inert stand-in for a pickled class: keeps the constructor arguments and the pickled state, runs nothing.

    One subclass per allowlisted global name (``global_name``). ``NEWOBJ``/``REDUCE`` create an
    instance, ``BUILD`` stores the state; pickling it again writes the same reduce tuple.
    """

    global_name: ClassVar[str] = ""

    def __new__(cls, *args: Any) -> PickledStandIn:
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __reduce_ex__(self, protocol: int) -> tuple:
        return copyreg.__newobj__, (type(self), *self.args), self.state

    def __repr__(self) -> str:
        return f"<stand-in for {self.global_name}>"


_STAND_INS: dict[str, type[PickledStandIn]] = {}


def _stand_in(name: str) -> type[PickledStandIn]:
    if name not in _STAND_INS:
        _STAND_INS[name] = type(name.rsplit(".", 1)[-1], (PickledStandIn,), {"global_name": name,
                                                                              "__module__": __name__})
    return _STAND_INS[name]


def allowed_globals(extra: Iterable[str] = ()) -> list[tuple[Any, str]]:
    """The allowlist for ``torch.serialization.safe_globals``: ``(object, global name)`` pairs.

    Args:
        extra: further global names to read as inert :class:`PickledStandIn` objects (e.g. the
            class of a Lightning callback that an old checkpoint uses as a dict key). A stand-in
            never runs code of the class it replaces.

    Returns:
        Stand-ins for :data:`OMEGACONF_GLOBALS` and ``extra``, plus ``builtins.dict``,
        ``collections.defaultdict`` and ``typing.Any``.
    """
    names = list(dict.fromkeys([*OMEGACONF_GLOBALS, *extra]))
    return [(_stand_in(n), n) for n in names] + [(obj, n) for n, obj in _PLAIN_GLOBALS.items()]


def to_plain(obj: Any) -> Any:
    """Turn stand-ins of OmegaConf containers and nodes (and the containers around them) into plain Python.

    A ``DictConfig`` becomes a dict, a ``ListConfig`` a list, a value node its value; interpolations
    stay the strings they were (``"${...}"``); any other stand-in becomes ``"<global name>"``.
    """
    if isinstance(obj, PickledStandIn):
        state = obj.state if isinstance(obj.state, dict) else {}
        name = obj.global_name
        if name.endswith(("DictConfig", "ListConfig")):
            return to_plain(state.get("_content"))
        if name.startswith("omegaconf.nodes."):
            return to_plain(state.get("_val"))
        return f"<{name}>"
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (str, int, float, bool)) else k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist() if obj.numel() <= 16 else f"<tensor {tuple(obj.shape)}>"
    return obj


def _unsafe_globals(path: Path, allow: list[tuple[Any, str]]) -> list[str]:
    with torch.serialization.safe_globals(allow):
        try:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception as exc:  # noqa: BLE001 - any failure to read the archive is a format error
            raise CheckpointFormatError(f"{path}: cannot read the checkpoint's pickle ({type(exc).__name__}: {exc}); "
                                        "the file is corrupt or truncated: download it again") from None


def _format_of(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(4)
    if zipfile.is_zipfile(path):
        return "zip"
    if head[:2] == b"\x80\x02":
        return "legacy"
    if head[:2] == b"PK":
        raise CheckpointFormatError(f"{path} ({path.stat().st_size} bytes) is a truncated ZIP archive (no end-of-"
                                    "archive record): the download or copy stopped early; download it again")
    raise CheckpointFormatError(f"{path} is not a torch.save checkpoint (starts with {head!r}); expected a "
                                "PyTorch Lightning .ckpt file")


def safe_torch_load(path: str | Path, *, extra_globals: Iterable[str] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU with :func:`allowed_globals` and clear errors.

    Args:
        path: an existing ``torch.save`` file (zip format; legacy files go straight to the reader).
        extra_globals: further global names read as inert stand-ins.

    Returns:
        The unpickled object; OmegaConf objects are :class:`PickledStandIn` instances.

    Raises:
        UnsafeCheckpointError: the pickle names globals outside the allowlist (all listed; nothing loaded).
        CheckpointFormatError: a truncated, corrupt or non-torch file.
    """
    path = Path(path)
    allow = allowed_globals(extra_globals)
    if _format_of(path) == "zip":
        unsafe = _unsafe_globals(path, allow)
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path} refers to pickled globals outside the allowlist: {', '.join(unsafe)}. Nothing was loaded "
                "(reading them could run code). If one is a plain data class (e.g. a Lightning callback class "
                "used as a dict key), `repro released import --allow-global NAME` reads it as an inert stand-in.")
    try:
        with torch.serialization.safe_globals(allow):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{path}: refused by the weights-only reader: "
                                    f"{str(exc).strip().splitlines()[-1]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointFormatError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc}); the file "
                                    "is corrupt or truncated: download it again") from None
