"""Random-weight stand-ins for missing weights files, at a scale that allows them (``smoke``).

A smoke run checks the plumbing of an entry on a new cluster before its weights are downloaded. Where
a file the entry needs is missing -- the DINO checkpoint, the ZoeDepth / MiDaS ``save_pretrained``
folder, a published STEGO/DepthG checkpoint -- :func:`with_stand_ins` writes a randomly initialised
one in the official format under ``<work>/<scale>/weights/`` (never where real weights live, so a
full-scale run can never pick one up) and points the config at it, saying so on stderr every time.
At the ``full`` scale nothing is replaced and a missing file stays the clear error it always was.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from filelock import FileLock

from repro.config.scales import get_scale, scale_root
from repro.config.schema import ExperimentConfig

__all__ = ["with_stand_ins", "stand_in_dir", "released_stand_in", "STAND_IN_PREFIX"]

STAND_IN_PREFIX = "random-"
"""File-name prefix of every stand-in (so a run's ``env.json`` shows which weights were random)."""


def stand_in_dir(work_dir: str | Path, scale: str) -> Path:
    """``<work>/<scale>/weights``: where a scale's stand-ins live."""
    return scale_root(work_dir, scale) / "weights"


def _say(what: str, missing: Path, stand_in: Path) -> None:
    print(f"repro: RANDOM {what} (smoke scale: {missing} is missing): using the stand-in {stand_in}; "
          "its numbers check the pipeline, not the method", file=sys.stderr)


def _ensure(path: Path, write) -> Path:
    """Create ``path`` with ``write(path)`` once, under a file lock (array tasks share stand-ins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            write(path)
    return path


def _dino(config: ExperimentConfig, folder: Path) -> ExperimentConfig:
    from repro.models.backbone import get_arch, init_random_checkpoint
    from repro.training.loop import resolve_checkpoint

    wanted = resolve_checkpoint(config)
    if wanted.is_file():
        return config
    arch = get_arch(config.model.arch)
    stand_in = _ensure(folder / f"{STAND_IN_PREFIX}{arch.filename}", lambda p: init_random_checkpoint(arch.name, p))
    _say(f"{arch.name} backbone", wanted, stand_in)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, checkpoint=str(stand_in)))


def _depth(config: ExperimentConfig, folder: Path) -> ExperimentConfig:
    from repro.depth import hf
    from repro.utils.errors import MissingFileError
    from repro.models.backbone import default_weights_dir

    kind = config.data.depth_source
    if kind not in hf.DEFAULT_WEIGHTS:
        return config
    wanted = Path(config.data.depth_weights) if config.data.depth_weights else \
        default_weights_dir() / hf.DEFAULT_WEIGHTS[kind].name
    try:
        hf.check_weights_dir(kind, wanted)
        return config
    except MissingFileError:
        pass

    def write(path: Path) -> None:
        partial = path.with_name(path.name + ".partial")
        hf.save_random_model(kind, partial, tiny=True)
        partial.rename(path)

    stand_in = _ensure(folder / f"{STAND_IN_PREFIX}{wanted.name}", write)
    _say(f"{kind} depth estimator (tiny architecture)", wanted, stand_in)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, depth_weights=str(stand_in)))


def with_stand_ins(config: ExperimentConfig, work_dir: str | Path) -> ExperimentConfig:
    """``config`` with random stand-ins for its missing weights, if its scale allows them (else unchanged).

    Args:
        config: a resolved config.
        work_dir: the work folder (stand-ins go to :func:`stand_in_dir`).

    Returns:
        The config, with ``model.checkpoint`` / ``data.depth_weights`` pointing at stand-ins where the
        files they name (or the defaults under ``$REPRO_WEIGHTS``) are missing. Neither key is part of a
        run's identity, so a later rerun with the real files resumes the same run folder.
    """
    if not get_scale(config.scale).stand_ins:
        return config
    folder = stand_in_dir(work_dir, config.scale)
    return _depth(_dino(config, folder), folder)


def released_stand_in(wanted: Path, config: ExperimentConfig, work_dir: str | Path, *, n_classes: int,
                      lhp: bool = False) -> Path:
    """A random-weight published checkpoint (Lightning layout of STEGO/DepthG) for a missing ``wanted`` file.

    Args:
        wanted: the missing published file (its name is kept, prefixed with ``random-``).
        config: the entry's resolved config (backbone, code dimension, method).
        work_dir: the work folder.
        n_classes: K of the checkpoint.
        lhp: include DepthG's ``lhp_module.projection_head``.

    Raises:
        ValueError: the config's scale does not allow stand-ins.
    """
    from repro.models.lightning import DATASET_NAMES, write_random_checkpoint

    if not get_scale(config.scale).stand_ins:
        raise ValueError(f"scale {config.scale!r} does not allow random stand-ins for {wanted}")
    path = stand_in_dir(work_dir, config.scale) / "released" / f"{STAND_IN_PREFIX}{wanted.name}"
    _ensure(path, lambda p: write_random_checkpoint(p, arch=config.model.arch, code_dim=config.model.code_dim,
                                                    n_classes=n_classes, depthg=config.method == "depthg", lhp=lhp,
                                                    dataset_name=next(k for k, v in DATASET_NAMES.items()
                                                                      if v == config.data.dataset)))
    _say("published checkpoint", wanted, path)
    return path
