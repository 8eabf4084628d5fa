"""Experiment configuration: dataclasses that every YAML file is validated against.

One experiment file per table entry (``experiments/<table>/<entry>.yaml``) is merged over
``base.yaml`` and then over command-line overrides (``train.seed=3``). Names follow the
papers: ``lambda_self``, ``b_knn``, ``lambda_depthg``, ``feature_samples`` (N),
``code_dim`` (Q), ``decay_step``, ``decay_factor``. An unknown key or a value of the wrong type
is an error that names the key and the file it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "SamplingConfig",
    "GuidanceConfig",
    "LHPConfig",
    "TrainConfig",
    "EvalConfig",
    "ExperimentConfig",
]


@dataclass
class DataConfig:
    """Dataset, crops and depth source (README: Data pipeline)."""

    dataset: str = "nyuv2"  # cocostuff27 | cityscapes27 | potsdam3 | nyuv2
    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    five_crop: bool = True
    crop_size: int = 224
    val_size: int = 320
    depth_source: str = "zoedepth"  # zoedepth | midas | sensor | image/perspective_plane | none | kbr | files | mde_features | semseg
    depth_weights: str | None = None
    depth_files: str | None = None  # files | kbr: folder of per-image maps <image key>.npy (repro.depth.files)
    resize: str = "bilinear"  # bilinear | nearest (R3: torchvision Resize, int() of the long side)
    train_crop_codec: str = "png"  # png | jpeg (R3: full-size training five-crops round-trip through JPEG)
    depth_scope: str = "crop"  # crop (eq. 4: depth of each crop) | image (R4: full image, then cropped)
    depth_encoding: str = "float"  # float [0, 1] | uint8 (R4: 0..255 integers) | int_cast (R5: {0, 1})
    depth_tta: bool = True  # estimator test-time augmentation (ZoeDepth infer: flip + reflect padding)
    knn_dropout: float = 0.0  # R11: Dropout2d(p) on the features before pooling for the kNN table
    score_void: bool = False  # R13 (NYUv2): score void as class 0 of 14 instead of ignoring it
    shard_size: int = 1000
    num_neighbors: int = 7  # positive drawn uniformly from kNN ranks 1..num_neighbors
    knn_k: int = 30
    train_subset: int = 0  # 0 = every image of train_split; N = its first N images (the smoke scale)
    val_subset: int = 0  # 0 = every image of val_split; N = its first N images (the smoke scale)


@dataclass
class ModelConfig:
    """Backbone F and head S (STEGO A.10)."""

    arch: str = "vit_small_patch8"  # vit_small_patch8 | vit_base_patch8
    checkpoint: str = ""
    pos_embed: str = "dino"  # dino (R2: DINO's interpolate_pos_encoding) | timm
    code_dim: int = 70  # Q
    backbone_precision: str = "default"  # default (train.precision in training, fp32 elsewhere) | bf16 | fp32
    dropout: float = 0.1
    dropout_target: bool = True


@dataclass
class LossConfig:
    """STEGO eq. 5 and DepthG eq. 7 (supplement Table 2)."""

    lambda_self: float = 0.0
    lambda_knn: float = 0.0
    lambda_random: float = 0.0
    b_self: float = 0.0
    b_knn: float = 0.0
    b_random: float = 0.0
    lambda_depthg: float = 0.0
    b_depthg: float = 0.0
    neg_samples: int = 5
    negative_perm: str = "derangement"  # derangement | super_perm (R10: STEGO's draw, not always a permutation)
    negative_coords: str = "own"  # own | knn (R10: negatives read at the kNN partner's sample coordinates)
    spatial_centering: bool = True
    keep_global_mean: bool = True
    zero_clamp: bool = True
    reduction: str = "mean"  # mean | sum
    depth_kernel: str = "product"  # product | released


@dataclass
class SamplingConfig:
    """Where features are read (DepthG sec. 3.4, supplement B.2)."""

    mode: str = "random"  # random | fps | full
    feature_samples: int = 11  # N
    decrease_every: int | None = None  # N schedule; None keeps N fixed
    n_min: int = 1
    released_n_start: int | None = None
    released_factor: float | None = None
    fps_order: str = "xy"  # xy | released
    fov_deg: float = 90.0


@dataclass
class GuidanceConfig:
    """Guidance scheduling (DepthG sec. 3.5): lambda_DepthG and b_DepthG decayed together."""

    decay_step: int | None = None
    decay_factor: float | None = None


@dataclass
class LHPConfig:
    """Local hidden positives (DepthG sec. 3.6, Table 6)."""

    enabled: bool = False
    propagation: str = "depth"  # depth (3D-LHP) | attention
    k: int = 8
    variant: str = "paper"  # paper | released
    weight: float = 1.0


@dataclass
class TrainConfig:
    """Optimisation (STEGO A.10, DepthG supplement A.1)."""

    max_steps: int = 7000
    step_unit: str = "batch"  # batch | released (docs/fidelity.md)
    batch_size: int = 32
    lr: float = 5e-4
    probe_lr: float = 5e-3
    seed: int = 0
    checkpoint_every: int = 500  # batches between resumable checkpoints (also saved on SIGTERM/SIGUSR1)
    keep_checkpoints: int = 1  # resumable checkpoints kept on disk
    val_every: int = 0  # batches between validations for the paper-style best-on-val pick; 0 = off
    log_every: int = 10  # batches between TensorBoard scalars
    hist_every: int = 100  # batches between correlation histograms (STEGO A.11)
    feature_cache_gb: float = 4.0  # frozen-backbone features kept in memory (never computed twice)
    feature_store: bool = False  # features of all training crops computed once into <work>/data (fp16, shared)
    num_workers: int = 4
    precision: str = "bf16"  # bf16 on GPU, fp32 on CPU | fp32


@dataclass
class EvalConfig:
    """Evaluation protocol (README: Training, evaluation and one table entry)."""

    crf: bool = True
    crf_processes: int = -1  # DenseCRF worker processes: 0 = in-process, -1 = every CPU of the job
    flip: bool = True  # R12: every published number was flip-averaged
    crf_image: str = "rgb"  # rgb | bgr_truncated (R12: the released CRF gets BGR, truncated to uint8)
    batch_size: int = 16
    num_figures: int = 4


@dataclass
class ExperimentConfig:
    """One table entry: what it reproduces, its hyperparameters and the paper's numbers.

    ``paper`` maps metric names (``unsup_acc``, ``unsup_miou``, ``linear_acc``, ``linear_miou``)
    to the published values, x100.
    """

    name: str = ""
    table: str = ""
    description: str = ""
    method: str = "depthg"  # depthg | stego | dino (raw backbone features, no head training)
    fidelity: str = "paper"  # paper | released (docs/fidelity.md; repro.config.fidelity)
    scale: str = "full"  # full | smoke (repro/config/scales.yaml: a config layer and the jobs' resources)
    fidelity_items: dict[str, str] = field(default_factory=dict)  # per-item profile, e.g. {R4: paper}
    fidelity_deviations: dict[str, str] = field(default_factory=dict)  # written by the loader: key -> what differs
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    lhp: LHPConfig = field(default_factory=LHPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paper: dict[str, float] = field(default_factory=dict)
