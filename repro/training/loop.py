"""The training loop: frozen DINO features, STEGO + DepthG losses, probes, Accelerate.

One batch (README: What is implemented, DepthG sec. 3): anchors and their kNN partners go through the
frozen backbone (features are cached in memory, never computed twice) and the head; sample
locations are drawn by FPS on the depth map, uniformly at random, or the full map is used;
``L_STEGO + lambda_DepthG L_DepthG`` (DepthG eq. 7, guidance scheduled, sec. 3.5) trains the
head, optionally plus the 3D-LHP (or attention-LHP) term through the projection head
(sec. 3.6); the cluster and linear probes train on the detached code with their own
optimisers. ``method: dino`` trains only the probes on the raw features.

The trained parts and every loss, the probes' included, run through one module's ``forward``
(:class:`TrainModule`), which Accelerate wraps in DistributedDataParallel under
``accelerate launch --num_processes N``: the gradients are averaged across processes by DDP, each
process trains on its own slice of every global batch (the random negatives are drawn within
that slice, as in STEGO's multi-GPU runs), and evaluation runs on the main process only.

Checkpoints (:mod:`repro.training.state`: weights-only files, every random stream included) are
written every ``train.checkpoint_every`` batches and when SIGTERM or SIGUSR1 arrives; a restarted
run loads the newest one and continues bit-for-bit as the uninterrupted run would (data order,
partner draws, sample locations, dropout masks and optimiser states are all restored, with or
without validation). ``model.pt`` holds the final parts, ``best.pt`` the paper-style best-on-val parts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from repro.config.schema import ExperimentConfig
from repro.data.features import FeatureStore
from repro.data.knn import load_knn
from repro.data.datasets.registry import num_classes_for
from repro.data.train_crops import TrainingCrops
from repro.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from repro.method.guidance import check_guidance_config, fed_guidance, guidance_kind, pool_guidance
from repro.method.lhp import lhp_mix, lhp_weights_3d, lhp_weights_attention
from repro.method.losses import LossWeights, stego_depthg_loss
from repro.models.backbone import DinoBackbone, last_block_attention
from repro.models.bundle import TrainedParts, build_parts, save_parts
from repro.method.sampling import depth_to_points, fps_grid_coords, pool_depth, random_grid_coords
from repro.method.schedules import feature_samples_schedule, guidance_schedule, training_batches
from repro.training.state import (FeatureCache, PreemptionGuard, TrainState, latest_checkpoint, load_checkpoint,
                               save_checkpoint)

__all__ = ["train", "TrainModule", "TrainState", "FeatureCache", "PreemptionGuard", "resolve_checkpoint"]

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
FINAL, BEST = "model.pt", "best.pt"


def resolve_checkpoint(config: ExperimentConfig):
    """The DINO checkpoint path of a config: ``model.checkpoint`` or the weights folder default."""
    from repro.models.backbone import default_weights_dir, get_arch

    return Path(config.model.checkpoint) if config.model.checkpoint else default_weights_dir() / get_arch(config.model.arch).filename


def _normalise(images: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class TrainModule(nn.Module):
    """The trained parts and the whole objective of one batch, as one ``forward`` (DDP-wrappable).

    Args:
        config: the resolved experiment config.
        parts: head, probes and (for LHP) projection head.
        state: the loop state; its ``sampling`` stream draws sample locations and negatives, its
            ``dropout`` stream the head's dropout masks.
    """

    def __init__(self, config: ExperimentConfig, parts: TrainedParts, state: TrainState) -> None:
        super().__init__()
        self.cfg, self.state = config, state
        self.head, self.cluster_probe, self.linear_probe = parts.head, parts.cluster_probe, parts.linear_probe
        self.projection = parts.projection
        if hasattr(self.head, "generator"):
            self.head.generator = state.generators["dropout"]
        self.needs_depth = config.method != "dino" and (
            config.sampling.mode == "fps" or config.loss.lambda_depthg != 0
            or (config.lhp.enabled and config.lhp.propagation == "depth"))
        # MDE features / segmentation maps instead of depth (supp. B.1; repro.method.guidance)
        self.guidance = guidance_kind(config.data.depth_source)
        self.num_classes = num_classes_for(config) if self.guidance == "classes" else None
        check_guidance_config(config)

    def fed_depth(self, depth01: Tensor, device: torch.device) -> Tensor:
        """Depth as the method sees it, ``(B, H, W)`` in [0, 1] -> ``(B, 1, H, W)``.

        ``data.depth_encoding``: ``float`` feeds the [0, 1] map (DepthG eq. 4); ``uint8`` feeds the
        0..255 integers the released loader returned (docs/fidelity.md R4; the shards hold them exactly as k/255);
        ``int_cast`` feeds the {0, 1} map of the released Potsdam loader (R5) as it is.
        """
        depth = depth01.to(device)[:, None]
        return torch.round(depth * 255.0) if self.cfg.data.depth_encoding == "uint8" else depth

    def coords(self, depth: Tensor | None, batch: int, n_side: int, device: torch.device) -> Tensor | None:
        mode, gen = self.cfg.sampling.mode, self.state.generator
        if mode == "full":
            return None
        if mode == "random":
            return random_grid_coords(batch, n_side, generator=gen, device=device)
        return fps_grid_coords(depth, n_side, order=self.cfg.sampling.fps_order, generator=gen,
                               fov_deg=self.cfg.sampling.fov_deg)

    def lhp_weights(self, depth: Tensor | None, attention: Tensor | None, h: int, w: int) -> Tensor:
        if self.cfg.lhp.propagation == "attention":
            return lhp_weights_attention(attention, h, w)
        points = depth_to_points(depth, fov_deg=self.cfg.sampling.fov_deg, variant=self.cfg.lhp.variant)
        return lhp_weights_3d(points.reshape(points.shape[0], -1, 3), k=self.cfg.lhp.k, variant=self.cfg.lhp.variant)

    def forward(self, f_raw: Tensor, f_knn_raw: Tensor, batch: dict[str, Tensor], step: int, want_hist: bool,
                attention: Tensor | None = None, attention_knn: Tensor | None = None) -> dict[str, Tensor]:
        """Objective and logs of one batch.

        Args:
            f_raw: ``(B, C, h, w)`` frozen features of the anchors; f_knn_raw: of their kNN partners.
            batch: the loader's batch (``label``, and ``depth``/``partner_depth`` when present).
            step: the 0-based batch index (schedules).
            want_hist: also return the code correlations (``hist/*``).
            attention, attention_knn: ``(B, P, P)`` last-block attention for attention LHP.

        Returns:
            ``{"_objective": scalar to backpropagate, "loss/...", "probe/...", "schedule/...", "hist/..."}``.
        """
        cfg, device = self.cfg, f_raw.device
        f, s = self.head(f_raw)
        f_knn, s_knn = self.head(f_knn_raw)
        h, w = f.shape[-2:]
        if cfg.method == "dino":  # probes only, on the raw features
            return self._probes(s, batch, torch.zeros((), device=device), {})
        depth = depth_knn = depth_full = None
        if self.needs_depth:
            if "depth" not in batch:
                raise ValueError("this run needs depth (FPS, DepthG loss or 3D-LHP) but the shards have none")
            if self.guidance == "depth":
                depth_full = self.fed_depth(batch["depth"], device)
                depth = pool_depth(depth_full, (h, w))
                depth_knn = pool_depth(self.fed_depth(batch["partner_depth"], device), (h, w))
            else:  # (B, C, g, g) features or (B, K, H, W) one-hot classes, pooled to the grid
                depth_full = fed_guidance(batch["depth"].to(device), self.guidance, num_classes=self.num_classes)
                depth = pool_guidance(depth_full, (h, w))
                depth_knn = pool_guidance(fed_guidance(batch["partner_depth"].to(device), self.guidance,
                                                       num_classes=self.num_classes), (h, w))
        n_side = feature_samples_schedule(
            step, cfg.sampling.feature_samples, decrease_every=cfg.sampling.decrease_every, n_min=cfg.sampling.n_min,
            released_n_start=cfg.sampling.released_n_start, released_factor=cfg.sampling.released_factor,
            step_unit=cfg.train.step_unit)
        coords = self.coords(depth, f.shape[0], n_side, device)
        coords_knn = self.coords(depth_knn, f.shape[0], n_side, device)
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
        if self.projection is not None:
            mixed = self.projection(lhp_mix(s, self.lhp_weights(depth, attention, h, w)))
            # released reading (docs/fidelity.md R15): partner codes are only projected, not propagated.
            mixed_knn = self.projection(s_knn if cfg.lhp.variant == "released"
                                        else lhp_mix(s_knn, self.lhp_weights(depth_knn, attention_knn, h, w)))
            lhp = stego_depthg_loss(f, mixed, f_knn, mixed_knn, weights, coords=coords, coords_knn=coords_knn,
                                    depth=loss_depth if lam_d != 0 else None, **loss_opts)
            total = total + cfg.lhp.weight * lhp.total
            logs["loss/lhp"] = lhp.total.detach()
        return self._probes(s, batch, total, logs)

    def _probes(self, s: Tensor, batch: dict[str, Tensor], total: Tensor, logs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Add the probes' losses (on the detached code) to the objective."""
        code = s.detach()
        cluster_loss, _ = self.cluster_probe(code)
        linear_loss = self.linear_probe.loss(code, batch["label"].to(code.device))
        logs.update({"loss/total": total.detach(), "probe/cluster": cluster_loss.detach(), "probe/linear": linear_loss.detach()})
        logs["_objective"] = total + cluster_loss + linear_loss
        return logs


def _optimizers(config: ExperimentConfig, parts: TrainedParts) -> list[torch.optim.Optimizer]:
    """README: What is implemented: Adam for the head (lr 5e-4) and one Adam per probe (lr 5e-3)."""
    head_params = list(parts.head.parameters())
    if parts.projection is not None and config.lhp.variant == "paper":
        head_params += list(parts.projection.parameters())  # released: the projection head is in no optimiser
    optimizers = [torch.optim.Adam(parts.cluster_probe.parameters(), lr=config.train.probe_lr),
                  torch.optim.Adam(parts.linear_probe.parameters(), lr=config.train.probe_lr)]
    if head_params:
        optimizers.insert(0, torch.optim.Adam(head_params, lr=config.train.lr))
    return optimizers


def train(config: ExperimentConfig, run_dir: str | Path, *, shards: str | Path, knn: str | Path,
          validate=None, quiet: bool = False, stop_after: int | None = None,
          features: str | Path | None = None) -> Path:
    """Train one run; resume from its newest checkpoint if there is one.

    Args:
        config: the resolved experiment config.
        run_dir: the run folder; writes ``train/`` (checkpoints, TensorBoard), ``model.pt``, ``best.pt``.
        shards: training shard folder; knn: its kNN table (``.npz``).
        validate: optional ``callable(parts) -> float`` (unsupervised mIoU on val, no CRF) called every
            ``train.val_every`` batches for the paper-style best-on-val pick.
        quiet: no progress bar.
        stop_after: end (with a checkpoint) after this many batches in total; for tests.
        features: a feature store of the training crops (:mod:`repro.data.features`): the backbone's
            features are read from it instead of computed (not with attention LHP, which needs the
            backbone's attention as well).

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
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    torch.manual_seed(cfg.train.seed)  # the initial parameters; nothing in the loop uses the global RNG
    backbone = DinoBackbone(cfg.model.arch, resolve_checkpoint(cfg), pos_embed=cfg.model.pos_embed,
                            precision=cfg.model.backbone_precision).to(device)
    parts = build_parts(cfg, backbone.feature_dim, num_classes_for(cfg)).to(device)
    optimizers = _optimizers(cfg, parts)
    state = TrainState(cfg.train.seed + 7919 * rank)
    ckpt_dir = run_dir / "train" / CHECKPOINTS
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        load_checkpoint(latest, parts.modules(), optimizers, state, rank=rank)
        log.info("resumed from %s (batch %d)", latest, state.step)
    module = TrainModule(cfg, parts, state)
    model = accelerator.prepare_model(module) if world > 1 else module  # DDP averages the gradients
    total_batches = training_batches(cfg.train.max_steps, cfg.train.step_unit)
    end = min(total_batches, stop_after) if stop_after is not None else total_batches

    attention = cfg.lhp.enabled and cfg.lhp.propagation == "attention"
    if features is not None and attention:
        log.info("feature store %s not used: attention LHP needs the backbone's attention too", features)
    store = FeatureStore(features) if features is not None and not attention else None
    crops = TrainingCrops(shards, load_knn(knn), seed=cfg.train.seed, num_neighbors=cfg.data.num_neighbors,
                          require_depth=False, images=store is None)  # stored features: no pixels to decode
    bsz = cfg.train.batch_size
    positions = [((t * world + rank) * bsz + i) for t in range(state.step, end) for i in range(bsz)]
    loader = DataLoader(crops, batch_size=bsz, sampler=positions, num_workers=min(cfg.train.num_workers, os.cpu_count() or 1),
                        generator=torch.Generator().manual_seed(cfg.train.seed),
                        persistent_workers=False, pin_memory=cuda)

    def backbone_outputs(ids: Tensor, images: Tensor):
        if store is not None:
            return store.get([crops.keys[i] for i in ids.tolist()]).to(device)
        return last_block_attention(backbone, _normalise(images.to(device))) if attention else backbone(_normalise(images.to(device)))

    features = FeatureCache(torch.no_grad()(backbone_outputs), cfg.train.feature_cache_gb)
    accelerator.init_trackers("tb")
    tracker = accelerator.get_tracker("tensorboard", unwrap=True) if accelerator.is_main_process else None
    bar = tqdm(total=end, initial=state.step, unit="step", disable=quiet or not accelerator.is_main_process,
               desc=f"train {cfg.name or 'run'}", dynamic_ncols=True)
    model.train()
    started, first = time.perf_counter(), state.step

    def checkpoint() -> Path:
        return save_checkpoint(ckpt_dir, state.step, parts.modules(), optimizers, state, rank=rank, world=world,
                               keep=cfg.train.keep_checkpoints, barrier=accelerator.wait_for_everyone)

    with PreemptionGuard() as guard:
        for batch in loader:
            step = state.step
            want_hist = cfg.train.hist_every > 0 and step % cfg.train.hist_every == 0
            with accelerator.autocast():  # the frozen backbone too (bf16 on a GPU unless the profile says fp32)
                out_a = features(batch["index"], batch.get("image"))
                out_k = features(batch["partner_index"], batch.get("partner_image"))
                logs = model(out_a[0].float(), out_k[0].float(), batch, step, want_hist,
                             out_a[-1] if attention else None, out_k[-1] if attention else None)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            accelerator.backward(logs.pop("_objective"))
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
            if cfg.train.val_every > 0 and state.step % cfg.train.val_every == 0:
                if validate is not None and accelerator.is_main_process:  # main process only; the others wait
                    miou = float(validate(parts))
                    model.train()
                    accelerator.log({"val/unsup_miou": miou}, step=step)
                    if miou > state.best.get("unsup_miou", -math.inf):
                        state.best = {"unsup_miou": miou, "step": state.step}
                        save_parts(run_dir / BEST, parts, {"step": state.step, "val_unsup_miou": miou,
                                                           "arch": cfg.model.arch})
                accelerator.wait_for_everyone()
            if state.step % cfg.train.checkpoint_every == 0 or state.step == end or guard.signum is not None:
                checkpoint()
            if guard.signum is not None:
                bar.close()
                accelerator.end_training()
                guard.forward()
                return latest_checkpoint(ckpt_dir)
    bar.close()
    elapsed = time.perf_counter() - started
    if state.step < total_batches:
        accelerator.end_training()
        return latest_checkpoint(ckpt_dir)
    meta = {"step": state.step, "arch": cfg.model.arch, "method": cfg.method, "processes": world,
            "steps_per_s": (state.step - first) / elapsed if elapsed > 0 else None,
            "feature_cache": {"hits": features.hits, "misses": features.misses}}
    if accelerator.is_main_process:
        save_parts(run_dir / FINAL, parts, meta)
        (run_dir / "train" / "summary.json").write_text(json.dumps({**meta, "best": state.best}, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it also ends the process group
    return run_dir / FINAL
