"""The training loop: frozen DINO features, STEGO + DepthG losses, probes, Accelerate.

One batch (SPEC sections 1-2, DepthG sec. 3): anchors and their kNN partners go through the
frozen backbone (features are cached in memory, never computed twice) and the head; sample
locations are drawn by FPS on the depth map, uniformly at random, or the full map is used;
``L_STEGO + lambda_DepthG L_DepthG`` (DepthG eq. 7, guidance scheduled, sec. 3.5) trains the
head, optionally plus the 3D-LHP (or attention-LHP) term through the projection head
(sec. 3.6); the cluster and linear probes train on the detached code with their own
optimisers. ``method: dino`` trains only the probes on the raw features.

Checkpoints (``accelerator.save_state``) are written every ``train.checkpoint_every`` batches
and when SIGTERM or SIGUSR1 arrives; a restarted run loads the newest one and continues
bit-for-bit as the uninterrupted run would (data order, partner draws, sample locations,
dropout and optimiser states are all restored). ``model.pt`` holds the final parts,
``best.pt`` the paper-style best-on-val parts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from repro.config.schema import ExperimentConfig
from repro.data.knn import load_knn
from repro.data.registry import DATASETS
from repro.data.training import TrainingCrops
from repro.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from repro.lhp import lhp_mix, lhp_weights_3d, lhp_weights_attention
from repro.losses import LossWeights, stego_depthg_loss
from repro.models.backbone import DinoBackbone, last_block_attention
from repro.models.bundle import TrainedParts, build_parts, save_parts
from repro.sampling import depth_to_points, fps_grid_coords, pool_depth, random_grid_coords
from repro.schedules import feature_samples_schedule, guidance_schedule, training_batches

__all__ = ["train", "TrainState", "FeatureCache", "PreemptionGuard", "resolve_checkpoint"]

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
FINAL, BEST = "model.pt", "best.pt"


class TrainState:
    """Loop state saved with every checkpoint: batch counter, sampling RNG, best-on-val record."""

    def __init__(self, seed: int) -> None:
        self.step = 0
        self.best: dict = {}
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        """Checkpointable state (Accelerate calls this in ``save_state``)."""
        return {"step": self.step, "best": self.best, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output."""
        self.step, self.best = int(state["step"]), dict(state["best"])
        self.generator.set_state(state["generator"])


class FeatureCache:
    """Frozen-backbone outputs by crop id, up to a memory budget (the backbone never changes).

    Args:
        compute: ``images (B, 3, H, W) float -> tensor or tuple of tensors`` with batch first.
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
            images: ``(B, 3, H, W)`` normalised images (read only for the misses).
        """
        keys = ids.tolist()
        todo = [i for i, k in enumerate(keys) if k not in self.entries]
        fresh: dict[int, tuple[Tensor, ...]] = {}
        if todo:
            out = self.compute(images[todo])
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


def resolve_checkpoint(config: ExperimentConfig):
    """The DINO checkpoint path of a config: ``model.checkpoint`` or the weights folder default."""
    from repro.models.backbone import default_weights_dir, get_arch

    return Path(config.model.checkpoint) if config.model.checkpoint else default_weights_dir() / get_arch(config.model.arch).filename


def _normalise(images: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class _Step:
    """One training batch; holds the frozen backbone, the parts and the config."""

    def __init__(self, config: ExperimentConfig, backbone: DinoBackbone, parts: TrainedParts, state: TrainState,
                 device: torch.device) -> None:
        self.cfg, self.backbone, self.parts, self.state, self.device = config, backbone, parts, state, device
        attention = config.lhp.enabled and config.lhp.propagation == "attention"
        compute = (lambda x: last_block_attention(backbone, x)) if attention else backbone
        self.features = FeatureCache(torch.no_grad()(compute), config.train.feature_cache_gb)
        self.needs_depth = config.method != "dino" and (
            config.sampling.mode == "fps" or config.loss.lambda_depthg != 0
            or (config.lhp.enabled and config.lhp.propagation == "depth"))

    def fed_depth(self, depth01: Tensor) -> Tensor:
        """Depth as the method sees it, ``(B, H, W)`` in [0, 1] -> ``(B, 1, H, W)``.

        ``data.depth_encoding``: ``float`` feeds the [0, 1] map (DepthG eq. 4); ``uint8`` feeds the
        0..255 integers the released loader returned (SPEC R4; the shards hold them exactly as k/255);
        ``int_cast`` feeds the {0, 1} map of the released Potsdam loader (R5) as it is.
        """
        depth = depth01.to(self.device)[:, None]
        return torch.round(depth * 255.0) if self.cfg.data.depth_encoding == "uint8" else depth

    def coords(self, depth: Tensor | None, batch: int, n_side: int) -> Tensor | None:
        mode, gen = self.cfg.sampling.mode, self.state.generator
        if mode == "full":
            return None
        if mode == "random":
            return random_grid_coords(batch, n_side, generator=gen, device=self.device)
        return fps_grid_coords(depth, n_side, order=self.cfg.sampling.fps_order, generator=gen,
                               fov_deg=self.cfg.sampling.fov_deg)

    def lhp_weights(self, depth: Tensor | None, attention: Tensor | None, h: int, w: int) -> Tensor:
        if self.cfg.lhp.propagation == "attention":
            return lhp_weights_attention(attention, h, w)
        points = depth_to_points(depth, fov_deg=self.cfg.sampling.fov_deg, variant=self.cfg.lhp.variant)
        return lhp_weights_3d(points.reshape(points.shape[0], -1, 3), k=self.cfg.lhp.k, variant=self.cfg.lhp.variant)

    def __call__(self, batch: dict[str, Tensor], step: int, want_hist: bool) -> dict[str, Tensor]:
        cfg, p = self.cfg, self.parts
        out_a = self.features(batch["index"], _normalise(batch["image"].to(self.device)))
        out_k = self.features(batch["partner_index"], _normalise(batch["partner_image"].to(self.device)))
        f_raw, f_knn_raw = out_a[0].float(), out_k[0].float()
        f, s = p.head(f_raw)
        f_knn, s_knn = p.head(f_knn_raw)
        h, w = f.shape[-2:]
        if cfg.method == "dino":  # probes only, on the raw features
            return self._probes(s, batch, torch.zeros((), device=self.device), {})
        depth = depth_knn = depth_full = None
        if self.needs_depth:
            if "depth" not in batch:
                raise ValueError("this run needs depth (FPS, DepthG loss or 3D-LHP) but the shards have none")
            depth_full = self.fed_depth(batch["depth"])
            depth, depth_knn = pool_depth(depth_full, (h, w)), pool_depth(self.fed_depth(batch["partner_depth"]), (h, w))
        n_side = feature_samples_schedule(
            step, cfg.sampling.feature_samples, decrease_every=cfg.sampling.decrease_every, n_min=cfg.sampling.n_min,
            released_n_start=cfg.sampling.released_n_start, released_factor=cfg.sampling.released_factor,
            step_unit=cfg.train.step_unit)
        coords, coords_knn = self.coords(depth, f.shape[0], n_side), self.coords(depth_knn, f.shape[0], n_side)
        lam_d, b_d = guidance_schedule(step, cfg.loss.lambda_depthg, cfg.loss.b_depthg, cfg.guidance.decay_step,
                                       cfg.guidance.decay_factor, step_unit=cfg.train.step_unit)
        weights = LossWeights(cfg.loss.lambda_self, cfg.loss.lambda_knn, cfg.loss.lambda_random, cfg.loss.b_self,
                              cfg.loss.b_knn, cfg.loss.b_random, lam_d, b_d)
        # the product kernel reads depth at the samples (eq. 5); the released kernel takes the whole map (R7)
        loss_depth = depth_full if cfg.loss.depth_kernel == "released" else depth
        loss_opts = dict(depth_kernel=cfg.loss.depth_kernel, neg_samples=cfg.loss.neg_samples, generator=self.state.generator,
                         negative_perm=cfg.loss.negative_perm, negative_coords=cfg.loss.negative_coords,
                         spatial_centering=cfg.loss.spatial_centering, keep_global_mean=cfg.loss.keep_global_mean,
                         zero_clamp=cfg.loss.zero_clamp, reduction=cfg.loss.reduction)
        logs: dict[str, Tensor] = {"schedule/feature_samples": torch.tensor(float(n_side)),
                                   "schedule/lambda_depthg": torch.tensor(lam_d), "schedule/b_depthg": torch.tensor(b_d)}
        terms = stego_depthg_loss(f, s, f_knn, s_knn, weights, coords=coords, coords_knn=coords_knn,
                                  depth=loss_depth if lam_d != 0 else None, return_correlations=want_hist, **loss_opts)
        total = terms.total
        logs.update({f"loss/{k}": v.detach() for k, v in terms.terms.items()})
        logs.update({f"hist/{k}": v for k, v in terms.correlations.items()})
        if p.projection is not None:
            mixed = p.projection(lhp_mix(s, self.lhp_weights(depth, out_a[-1], h, w)))
            # released reading (SPEC 7.5): partner codes are only projected, not propagated.
            mixed_knn = p.projection(s_knn if cfg.lhp.variant == "released"
                                     else lhp_mix(s_knn, self.lhp_weights(depth_knn, out_k[-1], h, w)))
            lhp = stego_depthg_loss(f, mixed, f_knn, mixed_knn, weights, coords=coords, coords_knn=coords_knn,
                                    depth=loss_depth if lam_d != 0 else None, **loss_opts)
            total = total + cfg.lhp.weight * lhp.total
            logs["loss/lhp"] = lhp.total.detach()
        return self._probes(s, batch, total, logs)

    def _probes(self, s: Tensor, batch: dict[str, Tensor], total: Tensor, logs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Add the probes' losses (on the detached code) to the objective."""
        p, code = self.parts, s.detach()
        cluster_loss, _ = p.cluster_probe(code)
        linear_loss = p.linear_probe.loss(code, batch["label"].to(self.device))
        logs.update({"loss/total": total.detach(), "probe/cluster": cluster_loss.detach(), "probe/linear": linear_loss.detach()})
        logs["_objective"] = total + cluster_loss + linear_loss
        return logs


def _optimizers(config: ExperimentConfig, parts: TrainedParts) -> list[torch.optim.Optimizer]:
    """SPEC section 1: Adam for the head (lr 5e-4) and one Adam per probe (lr 5e-3)."""
    head_params = list(parts.head.parameters())
    if parts.projection is not None and config.lhp.variant == "paper":
        head_params += list(parts.projection.parameters())  # released: the projection head is in no optimiser
    optimizers = [torch.optim.Adam(parts.cluster_probe.parameters(), lr=config.train.probe_lr),
                  torch.optim.Adam(parts.linear_probe.parameters(), lr=config.train.probe_lr)]
    if head_params:
        optimizers.insert(0, torch.optim.Adam(head_params, lr=config.train.lr))
    return optimizers


def _latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(folder.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if folder.is_dir() else []
    return done[-1] if done else None


def _save_checkpoint(accelerator: Accelerator, folder: Path, step: int, keep: int) -> Path:
    """``save_state`` into a temporary folder, rename it into place, drop older ones."""
    final = folder / f"step_{step:07d}"
    tmp = folder / f".tmp_step_{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(folder.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[:-max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def train(config: ExperimentConfig, run_dir: str | Path, *, shards: str | Path, knn: str | Path,
          validate=None, quiet: bool = False, stop_after: int | None = None) -> Path:
    """Train one run; resume from its newest checkpoint if there is one.

    Args:
        config: the resolved experiment config.
        run_dir: the run folder; writes ``train/`` (checkpoints, TensorBoard), ``model.pt``, ``best.pt``.
        shards: training shard folder; knn: its kNN table (``.npz``).
        validate: optional ``callable(parts) -> float`` (unsupervised mIoU on val, no CRF) called every
            ``train.val_every`` batches for the paper-style best-on-val pick.
        quiet: no progress bar.
        stop_after: end (with a checkpoint) after this many batches in total; for tests.

    Returns:
        The path of ``model.pt`` (the final parts), or of the last checkpoint when stopped early.

    Raises:
        MissingFileError: missing DINO checkpoint. ShardError: unreadable shards or kNN mismatch.
    """
    run_dir = Path(run_dir)
    cfg = config
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(
        mixed_precision="bf16" if (cuda and cfg.train.precision == "bf16") else "no",
        log_with="tensorboard", project_config=ProjectConfiguration(project_dir=str(run_dir / "train"),
                                                                    logging_dir=str(run_dir / "train")))
    device = accelerator.device
    torch.manual_seed(cfg.train.seed)
    backbone = DinoBackbone(cfg.model.arch, resolve_checkpoint(cfg), pos_embed=cfg.model.pos_embed).to(device)
    dataset_cls = DATASETS[cfg.data.dataset]
    parts = build_parts(cfg, backbone.feature_dim, dataset_cls.num_classes).to(device)
    optimizers = _optimizers(cfg, parts)
    modules = list(parts.modules().values())
    # The parts are not wrapped (DDP would skip the probes' non-forward methods); gradients are
    # averaged across processes by hand below, and everything is checkpointed by registration.
    state = TrainState(cfg.train.seed + 7919 * accelerator.process_index)
    for obj in (*modules, *optimizers, state):
        accelerator.register_for_checkpointing(obj)
    ckpt_dir = run_dir / "train" / CHECKPOINTS
    latest = _latest_checkpoint(ckpt_dir)
    if latest is not None:
        accelerator.load_state(str(latest))
        log.info("resumed from %s (batch %d)", latest, state.step)
    total_batches = training_batches(cfg.train.max_steps, cfg.train.step_unit)
    end = min(total_batches, stop_after) if stop_after is not None else total_batches

    crops = TrainingCrops(shards, load_knn(knn), seed=cfg.train.seed, num_neighbors=cfg.data.num_neighbors,
                          require_depth=False)
    world, rank, bsz = accelerator.num_processes, accelerator.process_index, cfg.train.batch_size
    positions = [((t * world + rank) * bsz + i) for t in range(state.step, end) for i in range(bsz)]
    loader = DataLoader(crops, batch_size=bsz, sampler=positions, num_workers=min(cfg.train.num_workers, os.cpu_count() or 1),
                        generator=torch.Generator().manual_seed(cfg.train.seed),
                        persistent_workers=False, pin_memory=cuda)
    step_fn = _Step(cfg, backbone, parts, state, device)
    accelerator.init_trackers("tb")
    tracker = accelerator.get_tracker("tensorboard", unwrap=True) if accelerator.is_main_process else None
    bar = tqdm(total=end, initial=state.step, unit="step", disable=quiet or not accelerator.is_main_process,
               desc=f"train {cfg.name or 'run'}", dynamic_ncols=True)
    for m in modules:
        m.train()
    started, first = time.perf_counter(), state.step
    with PreemptionGuard() as guard:
        for batch in loader:
            step = state.step
            want_hist = cfg.train.hist_every > 0 and step % cfg.train.hist_every == 0
            with accelerator.autocast():
                logs = step_fn(batch, step, want_hist)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            accelerator.backward(logs.pop("_objective"))
            if accelerator.num_processes > 1:
                for prm in (q for m in modules for q in m.parameters() if q.grad is not None):
                    prm.grad = accelerator.reduce(prm.grad, reduction="mean")
            for opt in optimizers:
                opt.step()
            state.step = step + 1
            if not all(torch.isfinite(v).all() for k, v in logs.items() if k.startswith("loss/")):
                raise FloatingPointError(f"non-finite loss at batch {step}: { {k: float(v) for k, v in logs.items() if k.startswith('loss/')} }")
            if step % cfg.train.log_every == 0 or state.step == end:
                accelerator.log({k: float(v) for k, v in logs.items() if not k.startswith("hist/")}, step=step)
            if tracker is not None and want_hist:
                for k, v in logs.items():
                    if k.startswith("hist/"):
                        tracker.add_histogram(f"correlation/{k[5:]}", v.float().cpu().flatten(), step)
            bar.update(1)
            bar.set_postfix(loss=f"{float(logs['loss/total']):.3f}", refresh=False)
            if (validate is not None and accelerator.is_main_process and cfg.train.val_every > 0
                    and state.step % cfg.train.val_every == 0):
                miou = float(validate(parts))
                for m in modules:
                    m.train()
                accelerator.log({"val/unsup_miou": miou}, step=step)
                if miou > state.best.get("unsup_miou", -math.inf):
                    state.best = {"unsup_miou": miou, "step": state.step}
                    save_parts(run_dir / BEST, parts, {"step": state.step, "val_unsup_miou": miou, "arch": cfg.model.arch})
            due = state.step % cfg.train.checkpoint_every == 0 or state.step == end
            if due or guard.signum is not None:
                _save_checkpoint(accelerator, ckpt_dir, state.step, cfg.train.keep_checkpoints)
            if guard.signum is not None:
                bar.close()
                accelerator.end_training()
                guard.forward()
                return _latest_checkpoint(ckpt_dir)
    bar.close()
    elapsed = time.perf_counter() - started
    accelerator.end_training()
    if state.step < total_batches:
        return _latest_checkpoint(ckpt_dir)
    meta = {"step": state.step, "arch": cfg.model.arch, "method": cfg.method,
            "steps_per_s": (state.step - first) / elapsed if elapsed > 0 else None,
            "feature_cache": {"hits": step_fn.features.hits, "misses": step_fn.features.misses}}
    if accelerator.is_main_process:
        save_parts(run_dir / FINAL, parts, meta)
        (run_dir / "train" / "summary.json").write_text(json.dumps({**meta, "best": state.best}, indent=2))
    return run_dir / FINAL
