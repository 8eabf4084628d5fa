"""What a training run keeps between batches and across restarts: random streams, checkpoints, signals.

A checkpoint is a folder ``train/checkpoints/step_<N>/`` written under a temporary name and renamed
when complete. It holds ``state.pt`` (the trained parts, the optimisers and the loop state: batch
counter and best-on-val record) and one ``rng_rank<r>.pt`` per process (its random streams). Every
file is plain tensors and Python types, written with ``torch.save`` and read with
``torch.load(weights_only=True)``: loading a checkpoint never unpickles arbitrary objects, so a crafted
file in a run folder cannot execute code. Anything else in the folder is ignored.

Every random stream the loop uses is a :class:`torch.Generator` held by :class:`TrainState`
(``sampling``: sample locations, FPS starts and random negatives; ``dropout``: the head's channel
dropout). Nothing depends on the global RNG, so building a backbone for validation, or anything else
that touches the global RNG, cannot change what a resumed run computes.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
from pathlib import Path

import torch
from torch import Tensor, nn

from repro.utils.errors import UserError

__all__ = ["TrainState", "FeatureCache", "PreemptionGuard", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint"]

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read safely or does not fit the run; the message names the file."""


class TrainState:
    """Loop state of one process: batch counter, best-on-val record, and its random streams.

    Args:
        seed: the run's seed; process ``r`` of a multi-process run uses ``seed + 7919 r`` so the
            processes draw different samples.
    """

    STREAMS = ("sampling", "dropout")

    def __init__(self, seed: int) -> None:
        self.step = 0
        self.best: dict = {}
        self.generators = {name: torch.Generator().manual_seed(seed * 2 + i) for i, name in enumerate(self.STREAMS)}

    @property
    def generator(self) -> torch.Generator:
        """The sampling stream (sample locations, FPS starts, negatives)."""
        return self.generators["sampling"]

    def rng_state(self) -> dict[str, Tensor]:
        """The random streams (per process)."""
        return {name: g.get_state() for name, g in self.generators.items()}

    def load_rng_state(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`rng_state` output."""
        for name, g in self.generators.items():
            g.set_state(state[name])


class FeatureCache:
    """Frozen-backbone outputs by crop id, up to a memory budget (the backbone never changes).

    Args:
        compute: ``(ids (B,), images (B, 3, H, W) uint8) -> tensor or tuple of tensors`` with batch first.
        budget_gb: memory for cached entries; entries beyond it are computed every time.
    """

    def __init__(self, compute, budget_gb: float) -> None:
        self.compute = compute
        self.budget = int(budget_gb * 2**30)
        self.used = 0
        self.entries: dict[int, tuple[Tensor, ...]] = {}
        self.hits = self.misses = 0

    def __call__(self, ids: Tensor, images: Tensor) -> tuple[Tensor, ...]:
        """Outputs for a batch: cached rows reused, the rest computed in one pass.

        Args:
            ids: ``(B,)`` crop ids.
            images: ``(B, 3, H, W)`` the loader's uint8 images (read only for the misses), or None when
                ``compute`` does not need them (features from a store).
        """
        keys = ids.tolist()
        todo = [i for i, k in enumerate(keys) if k not in self.entries]
        fresh: dict[int, tuple[Tensor, ...]] = {}
        if todo:
            out = self.compute(ids[todo], None if images is None else images[todo])
            out = out if isinstance(out, tuple) else (out,)
            for row, i in enumerate(todo):
                fresh[keys[i]] = tuple(t[row] for t in out)
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        for k, value in fresh.items():
            size = sum(t.numel() * t.element_size() for t in value)
            if k not in self.entries and self.used + size <= self.budget:
                self.entries[k] = tuple(t.clone() for t in value)
                self.used += size
        rows = [self.entries.get(k) or fresh[k] for k in keys]
        return tuple(torch.stack([r[j] for r in rows]) for j in range(len(rows[0])))


class PreemptionGuard:
    """Turn SIGTERM/SIGUSR1 into a flag the loop checks after each batch.

    After the loop has saved a checkpoint it calls :meth:`forward`, which hands the signal
    to the handler that was installed before (submitit's requeue handler under SLURM), or,
    if that was the default action, re-raises it so the process ends as signalled.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionGuard:
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: checkpointing after this batch", signum)
        self.signum = signum

    def forward(self) -> None:
        """Pass the caught signal on (see class docstring)."""
        signum, previous = self.signum, self.previous.get(self.signum)
        self.__exit__()
        if callable(previous):
            previous(signum, None)
        if previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


def _step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete ``step_*`` folder (temporary ``.tmp_step_*`` folders never count)."""
    done = sorted(folder.glob("step_*"), key=_step_of) if folder.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(folder: Path, step: int, modules: dict[str, nn.Module], optimizers: list[torch.optim.Optimizer],
                    state: TrainState, *, rank: int = 0, world: int = 1, keep: int = 1, barrier=lambda: None) -> Path:
    """Write ``step_<step>/`` (see module docstring) atomically; keep the newest ``keep`` checkpoints.

    Process 0 writes the shared state, every process its random streams; ``barrier`` synchronises them.

    Returns:
        The checkpoint folder.
    """
    final, tmp = folder / f"step_{step:07d}", folder / f".tmp_step_{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save({"rank": rank, "world": world, "step": step, "streams": state.rng_state()}, tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save({"step": step, "best": state.best, "modules": {k: m.state_dict() for k, m in modules.items()},
                    "optimizers": [opt.state_dict() for opt in optimizers]}, tmp / STATE_FILE)
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(folder.glob("step_*"), key=_step_of)[:-max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _read(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {path.parent} is not a checkpoint of this repro version; "
                              f"remove {path.parent.parent} to train from the start")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain values "
                              f"({str(exc).splitlines()[0]}); checkpoints are never unpickled with arbitrary code") from None
    except Exception as exc:  # truncated or garbled bytes fail in many ways inside the unpickler
        raise CheckpointError(f"cannot read {path} ({type(exc).__name__}: {exc}); remove {path.parent} to resume from an older checkpoint "
                              "or train from the start") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dict")
    return payload


def load_checkpoint(path: Path, modules: dict[str, nn.Module], optimizers: list[torch.optim.Optimizer],
                    state: TrainState, *, rank: int = 0) -> None:
    """Restore a :func:`save_checkpoint` folder into the parts, optimisers and loop state (weights only).

    Raises:
        CheckpointError: a missing, unreadable or unsafe file, or one that does not fit the run.
    """
    shared = _read(path / STATE_FILE)
    streams = _read(path / f"rng_rank{rank}.pt")
    try:
        for name, module in modules.items():
            module.load_state_dict(shared["modules"][name])
        if len(shared["optimizers"]) != len(optimizers):
            raise ValueError(f"{len(shared['optimizers'])} optimiser states for {len(optimizers)} optimisers")
        for opt, opt_state in zip(optimizers, shared["optimizers"]):
            opt.load_state_dict(opt_state)
        state.load_rng_state(streams["streams"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} does not fit this run's config ({exc}); was it trained with another one?") from None
    state.step, state.best = int(shared["step"]), dict(shared["best"])
