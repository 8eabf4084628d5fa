"""Load a ``torch.save`` file without executing pickled code: the weights-only reader plus inert stand-ins.

``torch.load(weights_only=True)`` refuses every pickled global that torch does not allowlist. The
published STEGO/DepthG checkpoints pickle OmegaConf config objects; instead of importing omegaconf
(or falling back to ``weights_only=False``), each allowlisted OmegaConf class is replaced by an inert
:class:`PickledStandIn` registered under the OmegaConf global name: it keeps the pickled state and runs
nothing. :func:`to_plain` turns those objects into plain dicts and lists.

The names PyTorch Lightning itself puts into checkpoints are inert stand-ins too
(:data:`LIGHTNING_GLOBALS`): Lightning before 1.5 keyed ``checkpoint["callbacks"]`` by the callback
*class* (``ModelCheckpoint``, ``EarlyStopping``, ``LearningRateMonitor``; Lightning PR #7187,
``_legacy_state_key``), and ``torch.torch_version.TorchVersion`` (a ``str`` subclass) appears where a
torch version was saved; no flag is needed for them.

Before loading, :func:`safe_torch_load` disassembles the pickle without running it
(``torch.serialization.get_unsafe_globals_in_checkpoint`` for the zip format, :mod:`pickletools` for the
legacy format) and refuses a file that names any global outside the allowlist, listing them all, so
nothing of such a file is ever unpickled.
"""

from __future__ import annotations

import _compat_pickle
import collections
import copyreg
import pickle
import pickletools
import typing
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from repro.utils.errors import UserError

__all__ = ["CheckpointFormatError", "UnsafeCheckpointError", "OMEGACONF_GLOBALS", "LIGHTNING_GLOBALS", "PickledStandIn",
           "allowed_globals", "to_plain", "safe_torch_load", "MAX_DEPTH", "MAX_NODES"]


class CheckpointFormatError(UserError, ValueError):
    """A file that is not a complete checkpoint (truncated, corrupt, not torch.save, top-level keys missing)."""


class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
    """A checkpoint whose pickle references a global outside the allowlist; nothing of it was loaded."""


OMEGACONF_GLOBALS = (
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata", "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode", "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode",
)
"""OmegaConf classes read as inert stand-ins (the released files use DictConfig, ContainerMetadata,
Metadata and AnyNode; list values and typed nodes of other OmegaConf versions use the rest)."""

LIGHTNING_GLOBALS = tuple(
    f"{package}.callbacks.{module}.{cls}" for package in ("pytorch_lightning", "lightning.pytorch")
    for module, cls in (("model_checkpoint", "ModelCheckpoint"), ("early_stopping", "EarlyStopping"),
                        ("lr_monitor", "LearningRateMonitor"))) + ("torch.torch_version.TorchVersion",)
"""Names Lightning pickles into checkpoints, read as inert stand-ins without any flag: the callback classes
that Lightning < 1.5 used as the keys of ``checkpoint["callbacks"]`` (``pytorch_lightning.`` and
``lightning.pytorch.`` spellings) and ``torch.torch_version.TorchVersion`` (read back as its string)."""

MAX_DEPTH = 100
"""Deepest nesting :func:`to_plain` accepts (the released configs are 2 levels deep)."""
MAX_NODES = 1_000_000
"""Most values :func:`to_plain` visits (bounds shared references that would expand exponentially)."""

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
        extra: further global names to read as inert :class:`PickledStandIn` objects. A stand-in
            never runs code of the class it replaces.

    Returns:
        Stand-ins for :data:`OMEGACONF_GLOBALS`, :data:`LIGHTNING_GLOBALS` and ``extra``, plus
        ``builtins.dict``, ``collections.defaultdict`` and ``typing.Any``.
    """
    names = list(dict.fromkeys([*OMEGACONF_GLOBALS, *LIGHTNING_GLOBALS, *extra]))
    return [(_stand_in(n), n) for n in names] + [(obj, n) for n, obj in _PLAIN_GLOBALS.items()]


def _plain_key(key: Any) -> Any:
    if isinstance(key, type) and issubclass(key, PickledStandIn):
        return key.global_name  # a class used as a dict key (Lightning < 1.5 callbacks)
    return key if isinstance(key, (str, int, float, bool)) else str(key)


def to_plain(obj: Any, *, where: str = "the pickled object", max_depth: int = MAX_DEPTH,
             max_nodes: int = MAX_NODES) -> Any:
    """Turn stand-ins of OmegaConf containers and nodes (and the containers around them) into plain Python.

    A ``DictConfig`` becomes a dict, a ``ListConfig`` a list, a value node its value; interpolations
    stay the strings they were (``"${...}"``); a ``TorchVersion`` its string; a class stand-in used
    as a dict key its global name; any other stand-in ``"<global name>"``. Walked without recursion.

    Args:
        obj: what :func:`safe_torch_load` returned, or a part of it.
        where: how error messages name ``obj`` (e.g. ``"<file>: hyper_parameters"``).
        max_depth, max_nodes: bounds on nesting and on the number of values visited.

    Raises:
        CheckpointFormatError: a structure that refers to itself (cyclic), nests deeper than
            ``max_depth`` or holds more than ``max_nodes`` values.
    """
    root: list[Any] = [None]
    on_path: set[int] = set()
    stack: list[tuple] = [(obj, 0, root, 0)]
    visited = 0
    while stack:
        item = stack.pop()
        if item[0] is _EXIT:
            on_path.discard(item[1])
            continue
        value, depth, parent, slot = item
        visited += 1
        if visited > max_nodes:
            raise CheckpointFormatError(f"{where} holds more than {max_nodes} values (shared references that expand "
                                        "without bound?); not a STEGO/DepthG config")
        while isinstance(value, PickledStandIn):
            state = value.state if isinstance(value.state, dict) else {}
            name = value.global_name
            if name.endswith(("DictConfig", "ListConfig")):
                value = state.get("_content")
            elif name.startswith("omegaconf.nodes."):
                value = state.get("_val")
            elif name == "torch.torch_version.TorchVersion" and value.args and isinstance(value.args[0], str):
                value = value.args[0]
            else:
                value = f"<{name}>"
        if isinstance(value, Tensor):
            parent[slot] = value.tolist() if value.numel() <= 16 else f"<tensor {tuple(value.shape)}>"
            continue
        if not isinstance(value, (dict, list, tuple)):
            parent[slot] = value
            continue
        if id(value) in on_path:
            raise CheckpointFormatError(f"{where} refers to itself (a cyclic {type(value).__name__}); not a "
                                        "STEGO/DepthG config: the file is corrupt or crafted")
        if depth >= max_depth:
            raise CheckpointFormatError(f"{where} nests deeper than {max_depth} levels; not a STEGO/DepthG config "
                                        "(whose cfg is 2 levels deep): the file is corrupt or crafted")
        on_path.add(id(value))
        stack.append((_EXIT, id(value)))
        if isinstance(value, dict):
            out: Any = {_plain_key(k): None for k in value}
            children = [(v, depth + 1, out, _plain_key(k)) for k, v in value.items()]
        else:
            out = [None] * len(value)
            children = [(v, depth + 1, out, i) for i, v in enumerate(value)]
        parent[slot] = out
        stack.extend(reversed(children))
    return root[0]


_EXIT = object()


def _legacy_globals(path: Path) -> set[str]:
    """Every global a legacy (non-zip) ``torch.save`` file names, read by :mod:`pickletools` without running it.

    The legacy format is five pickles in a row (magic number, protocol, system info, the object, the
    storage keys), then raw storage bytes. ``STACK_GLOBAL`` takes its names from the last two strings
    pushed or fetched from the memo; one whose names cannot be resolved that way is reported as such.
    """
    found: set[str] = set()
    with open(path, "rb") as fh:
        for _ in range(5):
            memo: dict[Any, Any] = {}
            strings: list[Any] = []
            for op, arg, _pos in pickletools.genops(fh):
                if op.name in ("GLOBAL", "INST"):
                    found.add(_py3_name(*str(arg).split(" ", 1)))
                elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                                 "BINSTRING", "STRING"):
                    strings.append(arg)
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[arg] = strings[-1] if strings else None
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    strings.append(memo.get(arg))
                elif op.name == "STACK_GLOBAL":
                    module, name = (strings[-2:] if len(strings) >= 2 else [None, None])
                    ok = isinstance(module, str) and isinstance(name, str)
                    found.add(f"{module}.{name}" if ok else "<STACK_GLOBAL with names not known statically>")
    return found


def _py3_name(module: str, name: str = "") -> str:
    """``module.name`` as the unpickler resolves it (protocol < 3 files write Python 2 names: ``__builtin__``)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module),
                                                                    name))
    return f"{module}.{name}"


def _torch_allowed() -> set[str]:
    from torch import _weights_only_unpickler as wou

    return set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals())


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
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # a pickle: legacy torch.save
        return "legacy"
    if head[:2] == b"PK":
        raise CheckpointFormatError(f"{path} ({path.stat().st_size} bytes) is a truncated ZIP archive (no end-of-"
                                    "archive record): the download or copy stopped early; download it again")
    raise CheckpointFormatError(f"{path} is not a torch.save checkpoint (starts with {head!r}); expected a "
                                "PyTorch Lightning .ckpt file")


def safe_torch_load(path: str | Path, *, extra_globals: Iterable[str] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU with :func:`allowed_globals` and clear errors.

    Args:
        path: an existing ``torch.save`` file (zip or legacy format; both are disassembled first).
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
    else:
        try:
            names = _legacy_globals(path)
        except Exception as exc:  # noqa: BLE001 - any failure to disassemble is a format error
            raise CheckpointFormatError(f"{path}: cannot read the checkpoint's pickle ({type(exc).__name__}: {exc}); "
                                        "the file is corrupt or truncated: download it again") from None
        with torch.serialization.safe_globals(allow):
            unsafe = sorted(names - {n for _, n in allow} - _torch_allowed())
    if unsafe:
        raise UnsafeCheckpointError(
            f"{path} refers to pickled globals outside the allowlist: {', '.join(unsafe)}. Nothing was loaded "
            "(reading them could run code). If one is a plain data class used as a dict key, "
            "`repro released import --allow-global NAME` reads it as an inert stand-in.")
    try:
        with torch.serialization.safe_globals(allow):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{path}: refused by the weights-only reader: "
                                    f"{str(exc).strip().splitlines()[-1]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointFormatError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc}); the file "
                                    "is corrupt or truncated: download it again") from None
