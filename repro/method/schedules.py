"""Step schedules of DepthG: guidance scheduling (sec. 3.5) and the N schedule (supplement B.2).

All functions are pure functions of the 0-based batch index ``step`` (the number of
optimisation steps already taken), so a resumed run computes the same values as an
uninterrupted one.

``step_unit="batch"`` (default) is the paper's reading: one step is one batch.
``step_unit="released"`` reproduces docs/fidelity.md, the released Lightning code: with three
optimisers stepped manually per batch, ``global_step`` advances by 3 per batch, so at batch
``t`` the code sees ``global_step = 3 t``; it compares that counter against the schedule's
step sizes and against ``max_steps`` (so "7000 steps" are ``ceil(7000 / 3) = 2334`` batches),
and it applies each update *after* the loss of that batch has been computed.
"""

from __future__ import annotations

import math

__all__ = [
    "STEP_UNITS",
    "RELEASED_STEPS_PER_BATCH",
    "training_batches",
    "guidance_factor",
    "guidance_schedule",
    "feature_samples_schedule",
]

STEP_UNITS = ("batch", "released")
RELEASED_STEPS_PER_BATCH = 3


def _check(step: int, step_unit: str) -> None:
    if step_unit not in STEP_UNITS:
        raise ValueError(f"step_unit must be one of {STEP_UNITS}, got {step_unit!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def training_batches(max_steps: int, step_unit: str = "batch") -> int:
    """Number of batches a run of ``max_steps`` "steps" trains for.

    Args:
        max_steps: the configured number of training steps (supplement Table 2: 7000).
        step_unit: ``"batch"`` or ``"released"`` (see module docstring).

    Returns:
        ``max_steps`` for ``"batch"``; ``ceil(max_steps / 3)`` for ``"released"``.

    Raises:
        ValueError: on an unknown step unit or negative ``max_steps``.
    """
    _check(max_steps, step_unit)
    return max_steps if step_unit == "batch" else math.ceil(max_steps / RELEASED_STEPS_PER_BATCH)


def _events_before(step: int, every: int, step_unit: str, *, include_zero: bool = False) -> int:
    """How many schedule updates have been applied before the loss of batch ``step``."""
    if every <= 0:
        raise ValueError(f"schedule interval must be positive, got {every}")
    if step_unit == "batch":
        return step // every
    # released: the update fires after batch t when 3t % every == 0 (and t > 0 unless
    # include_zero), i.e. every `every / gcd(3, every)` batches; count batches t < step.
    period = every // math.gcd(RELEASED_STEPS_PER_BATCH, every)
    fired = (step - 1) // period + 1 if step > 0 else 0  # t in [0, step) with t % period == 0
    return fired if include_zero else max(fired - 1, 0)


def guidance_factor(step: int, decay_step: int | None, decay_factor: float | None, *, step_unit: str = "batch") -> float:
    """Multiplier of ``lambda_DepthG`` and ``b_DepthG`` at a step (DepthG sec. 3.5).

    Exponential decay: every ``decay_step`` steps both are multiplied by ``decay_factor``,
    so the factor is ``decay_factor ** floor(step / decay_step)`` in the paper's reading.

    Args:
        step: 0-based batch index.
        decay_step: steps between decays (Table 2: 250, 300, 400); ``None`` disables decay.
        decay_factor: multiplier per decay (Table 2: 0.6, 0.64, 0.8); ``None`` disables decay.
        step_unit: ``"batch"`` or ``"released"``.

    Returns:
        The factor in (0, 1].

    Raises:
        ValueError: on a negative step, unknown unit, or non-positive interval.
    """
    _check(step, step_unit)
    if decay_step is None or decay_factor is None:
        return 1.0
    return float(decay_factor) ** _events_before(step, decay_step, step_unit)


def guidance_schedule(
    step: int,
    lambda_depthg: float,
    b_depthg: float,
    decay_step: int | None,
    decay_factor: float | None,
    *,
    step_unit: str = "batch",
) -> tuple[float, float]:
    """Scheduled ``(lambda_DepthG, b_DepthG)`` at a step: both decayed together (DepthG sec. 3.5).

    Args:
        step: 0-based batch index.
        lambda_depthg: initial weight of the depth-feature correlation loss.
        b_depthg: initial bias of that loss.
        decay_step: see :func:`guidance_factor`.
        decay_factor: see :func:`guidance_factor`.
        step_unit: ``"batch"`` or ``"released"``.

    Returns:
        ``(lambda_depthg * g, b_depthg * g)`` with ``g = guidance_factor(...)``.

    Raises:
        ValueError: as :func:`guidance_factor`.
    """
    g = guidance_factor(step, decay_step, decay_factor, step_unit=step_unit)
    return lambda_depthg * g, b_depthg * g


def feature_samples_schedule(
    step: int,
    n_start: int,
    *,
    decrease_every: int | None = None,
    decrease_by: int = 1,
    n_min: int = 1,
    released_n_start: int | None = None,
    released_factor: float | None = None,
    step_unit: str = "batch",
) -> int:
    """Number of feature samples per side, N, at a step (supplement B.2 and Table 4).

    Paper reading (``step_unit="batch"``): N starts at ``n_start`` and decreases by
    ``decrease_by`` every ``decrease_every`` steps, never below ``n_min`` (COCO ViT-S: 9,
    minus 1 every 3000 steps). ``decrease_every=None`` keeps N fixed.

    Released reading (``step_unit="released"``): the code multiplies N by ``released_factor``
    and truncates to int whenever ``global_step % decrease_every == 0`` *including step 0*
    (its own comment: this is why the ViT-S runs effectively start at 9 rather than the
    configured 11), evaluated after each batch's loss. Starting from ``released_n_start``
    (default ``n_start``), batch 0 therefore trains with the configured value.

    Args:
        step: 0-based batch index.
        n_start: N at step 0 (paper) / the configured value (released).
        decrease_every: steps between decreases; ``None`` for a fixed N.
        decrease_by: paper reading: amount subtracted per event.
        n_min: lower bound.
        released_n_start: released reading: configured N (e.g. 11); defaults to ``n_start``.
        released_factor: released reading: multiplicative factor (e.g. 0.9); required then.
        step_unit: ``"batch"`` or ``"released"``.

    Returns:
        N for the loss of batch ``step``.

    Raises:
        ValueError: on bad arguments (including a missing ``released_factor``).
    """
    _check(step, step_unit)
    if n_start < 1 or n_min < 1:
        raise ValueError(f"N must be >= 1, got n_start={n_start}, n_min={n_min}")
    if decrease_every is None:
        return n_start
    if step_unit == "batch":
        return max(n_start - decrease_by * _events_before(step, decrease_every, "batch"), n_min)
    if released_factor is None:
        raise ValueError("step_unit='released' needs released_factor (the released code's multiplicative N decay)")
    n = released_n_start if released_n_start is not None else n_start
    for _ in range(_events_before(step, decrease_every, "released", include_zero=True)):
        n = max(int(n * released_factor), n_min)
    return n
