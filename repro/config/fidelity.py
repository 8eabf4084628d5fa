"""The two fidelities of every table entry: the papers as written, and the released code as it ran.

One table, :data:`ITEMS`, maps each SPEC section 7 item (R1-R16, and repro's own readings R17-R23) to the config values it sets in the
``paper`` and the ``released`` profile, with its source on either side. The loader
(:func:`repro.config.loader.load_config`) resolves the profile of ``fidelity: paper | released`` into
the experiment config once; stages then read plain config values (``data.resize``,
``loss.negative_perm``, ...) and never a fidelity flag. ``repro fidelity`` prints this table.

Layering, later wins::

    base.yaml -> profile switches -> experiment file -> profile entry values -> --set

Switches are behaviours (R2, R3, R7, R9, ...; some only for some datasets or methods): an experiment
file that sets one on purpose wins, and the difference is recorded in ``fidelity_deviations``
(registered entries never do). Entry values restate an entry's own numbers as the released code ran
them (R14's run-script values, R6's Cityscapes sampling); they are chosen by conditions on the entry's
own config (dataset, backbone, method, ...), so they come after the experiment file, and only ``--set``
overrides them. ``fidelity_items: {R4: paper}`` takes single items from the other profile.

Sources: DepthG = leonsick/depthg @c284180 (``src/``, ``paper_reproduction.sh``, ``generate_depth.py``),
STEGO = mhamilton723/STEGO @eb4d6b5 (``src/``), DINO = facebookresearch/dino.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PROFILES", "UNSET", "Setting", "Item", "ITEMS", "item_ids", "get_item", "profile_layers",
           "controlled_keys", "format_table", "profiles_for"]

PROFILES = ("paper", "released")


def profiles_for(choice: str) -> tuple[str, ...]:
    """The profiles a ``--fidelity`` choice stands for: ``"both"`` is every one of :data:`PROFILES`.

    Raises:
        ValueError: for a name that is neither a profile nor ``"both"``.
    """
    if choice == "both":
        return PROFILES
    if choice not in PROFILES:
        raise ValueError(f"fidelity must be paper, released or both, got {choice!r}")
    return (choice,)


class _Unset:
    def __repr__(self) -> str:
        return "(entry)"


UNSET: Any = _Unset()
"""A profile that leaves a key as the entry sets it."""


@dataclass(frozen=True)
class Setting:
    """One config key set by an item, per profile.

    Attributes:
        key: dotted config key (``data.resize``).
        paper: value in the ``paper`` profile, or :data:`UNSET`.
        released: value in the ``released`` profile, or :data:`UNSET`.
        when: conditions on the entry's own config, ``{dotted key: allowed values}``; empty means always.
        entry_value: the value restates a number the entry file itself sets (applied after the file);
            otherwise it is a switch (applied before the file, so a file may deviate on purpose).
    """

    key: str
    paper: Any = UNSET
    released: Any = UNSET
    when: Mapping[str, tuple] = field(default_factory=dict)
    entry_value: bool = False

    def value(self, profile: str) -> Any:
        """The value of ``profile`` (``"paper"`` or ``"released"``)."""
        return self.paper if profile == "paper" else self.released

    def applies(self, config: Mapping[str, Any]) -> bool:
        """Whether every condition holds for a (nested, plain-dict) config."""
        return all(_lookup(config, key) in allowed for key, allowed in self.when.items())


@dataclass(frozen=True)
class Item:
    """One row of SPEC section 7: what the paper says, what the released code did, and the settings."""

    id: str
    component: str
    paper: str
    released: str
    settings: tuple[Setting, ...] = ()
    fact: str = ""  # for items with no config key: the fact both profiles share


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _when(**conditions: Any) -> dict[str, tuple]:
    """``_when(data__dataset="potsdam3")`` -> ``{"data.dataset": ("potsdam3",)}``."""
    return {k.replace("__", "."): v if isinstance(v, tuple) else (v,) for k, v in conditions.items()}


_COCO_S = _when(data__dataset="cocostuff27", model__arch="vit_small_patch8", method="depthg")
_COCO_B = _when(data__dataset="cocostuff27", model__arch="vit_base_patch8", method="depthg")
_CITY_B = _when(data__dataset="cityscapes27", model__arch="vit_base_patch8", method="depthg")
# R4 / R5 store depth maps; MDE features and segmentation maps (supp. Table 3, R18-R21) are not depth maps
# and the released code has no path for them, so both profiles keep them per crop, in float
_DEPTH_MAPS = _when(data__depth_source=("zoedepth", "midas", "sensor", "image_plane", "perspective_plane", "none",
                                        "kbr", "files"))
_POTS_S = _when(data__dataset="potsdam3", model__arch="vit_small_patch8", method="depthg")


def _released(when: dict[str, tuple], **values: Any) -> tuple[Setting, ...]:
    return tuple(Setting(k.replace("__", "."), released=v, when=when, entry_value=True) for k, v in values.items())


ITEMS: tuple[Item, ...] = (
    Item("R1", "ViT-S/8 weights",
         "'DINO ViT-S/8' (no file named)",
         "dino_deitsmall8_300ep_pretrain.pth (STEGO/DepthG src/modules.py DinoFeaturizer; pretrained_weights unset)",
         fact="dino_deitsmall8_300ep_pretrain.pth (both; repro.models.backbone.ARCHS)"),
    Item("R2", "pos-embed at 320 px",
         "not stated; every published number used DINO's interpolation",
         "DINO vision_transformer.py interpolate_pos_encoding: bicubic, scale (40+0.1)/28, no antialias",
         (Setting("model.pos_embed", "dino", "dino"),)),
    Item("R3", "image resizing",
         "bilinear (STEGO A.10); crops kept lossless",
         "T.Resize(size, NEAREST) for images and labels, int() width (src/utils.py get_transform); "
         "train five-crops saved as JPEG at PIL's default quality (src/crop_datasets.py)",
         (Setting("data.resize", "bilinear", "nearest"), Setting("data.train_crop_codec", "png", "jpeg"))),
    Item("R4", "depth maps",
         "eq. 4: the estimator's depth of each crop, min-max to [0, 1]; ZoeD_N",
         "ZoeD_N on the FULL image with flip + reflect-pad TTA (generate_depth.py, zoe.infer), min-max per "
         "image, x255 -> uint8 PNG, five-cropped, Resize(224, NEAREST), fed as integers 0..255; NYUv2 sensor "
         "depth min-max per frame (src/data.py NYUv2)",
         (Setting("data.depth_scope", "crop", "image", when=_DEPTH_MAPS),
          Setting("data.depth_encoding", "float", "uint8", when=_DEPTH_MAPS),
          Setting("data.depth_tta", True, True))),
    Item("R5", "Potsdam depth",
         "real depth",
         "src/data.py Potsdam casts the [0, 1] depth to int64 (ToTargetTensor): values in {0, 1}; FPS picks "
         "the first cells in raster order, D = 0",
         (Setting("data.depth_encoding", released="int_cast", when={**_when(data__dataset="potsdam3"), **_DEPTH_MAPS}),)),
    Item("R6", "Cityscapes 'full feature map'",
         "no pointwise sampling: correlations over all 28x28 locations",
         "pointwise=False only switches spatial centring off; 11x11 random samples (depth_sampling=none)",
         _released(_when(sampling__mode="full"), sampling__mode="random", sampling__feature_samples=11,
                   loss__spatial_centering=False)),
    Item("R7", "depth-feature correlation",
         "eq. 5: D = d_i d_j at the sample points",
         "1-channel depth L2-normalised (D = 1 where depth > 0), whole map resized (src/modules.py)",
         (Setting("loss.depth_kernel", "product", "released"),)),
    Item("R8", "FPS",
         "sec. 3.4: pinhole back-projection, picks read at their cells",
         "start at 0, raster-order picks, tan(90) in radians, Z = -5 d, (row, col) in grid_sample's (x, y) "
         "slots (src/modules.py farthest_point_sampling_depth)",
         (Setting("sampling.fps_order", "xy", "released"),)),
    Item("R9", "step counting",
         "7000 steps = 7000 batches",
         "Lightning 2.0.1 with 3 optimisers: 3 counter steps per batch (7000 -> 2334 batches), schedules on the "
         "counter, N decayed as int(N x fps_sample_decay_factor), 0.9 where the run script sets no factor "
         "(src/configs/train_config.yml); STEGO's own runs: one step per batch",
         (Setting("train.step_unit", "batch", "released", when=_when(method="depthg")),
          Setting("sampling.released_factor", released=0.9, when=_when(method="depthg")),
          Setting("train.step_unit", "batch", "batch", when=_when(method=("stego", "dino"))))),
    Item("R10", "random negatives",
         "a shuffled batch in which no image meets itself, read at its own samples",
         "feats[perm] read at the kNN partner's coordinates; super_perm draws (not always a permutation) "
         "(STEGO src/modules.py ContrastiveCorrelationLoss)",
         (Setting("loss.negative_perm", "derangement", "super_perm"),
          Setting("loss.negative_coords", "own", "knn"))),
    Item("R11", "kNN table",
         "GAP of the backbone features",
         "precompute_knns.py never calls .eval(): GAP of Dropout2d(0.1)(features)",
         (Setting("data.knn_dropout", 0.0, 0.1),)),
    Item("R12", "evaluation",
         "flip not mentioned; CRF on the image",
         "always (net(x) + net(flip x).flip) / 2; CRF given the un-normalised image truncated to uint8 in BGR "
         "order (src/eval_segmentation.py, src/crf.py)",
         (Setting("eval.flip", True, True), Setting("eval.crf_image", "rgb", "bgr_truncated"))),
    Item("R13", "NYUv2 classes",
         "13 classes, 0 = void ignored",
         "n_classes = 14: void (0) scored as a class (src/data.py NYUv2)",
         (Setting("data.score_void", False, True, when=_when(data__dataset="nyuv2")),)),
    Item("R14", "run-script values",
         "supplement Table 2 (rounded), as the entry files give them",
         "paper_reproduction.sh: COCO ViT-S b_knn 0.025, b_random 0.761, N 11 x0.9 every 1000 counted steps; "
         "COCO ViT-B unrounded; Potsdam Q 90, batch 16, decay every 200 x1; LHP weight 0.2",
         _released(_COCO_S, loss__b_knn=0.025, loss__b_random=0.761, loss__lambda_random=0.7000000000000001)
         + _released({**_COCO_S, "sampling.feature_samples": (9,)}, sampling__feature_samples=11,
                     sampling__decrease_every=1000, sampling__released_factor=0.9)
         + _released(_COCO_B, loss__lambda_depthg=0.16026274975444096, loss__b_depthg=0.035909146298813595,
                     loss__lambda_self=0.23052367315917113, loss__b_self=0.12326312284078644,
                     loss__lambda_knn=1.0500945312858674, loss__b_knn=0.21028290947990444,
                     loss__lambda_random=0.2485038032028848, loss__b_random=0.9748103425096648,
                     model__code_dim=90, sampling__feature_samples=12, guidance__decay_step=300,
                     guidance__decay_factor=0.64, train__batch_size=32)
         + _released(_CITY_B, loss__lambda_random=0.5700000000000001, model__code_dim=100,
                     guidance__decay_step=400, guidance__decay_factor=0.8, train__batch_size=32)
         + _released(_POTS_S, model__code_dim=90, train__batch_size=16, guidance__decay_step=200,
                     guidance__decay_factor=1.0, sampling__feature_samples=11)
         + _released(_when(lhp__enabled=True), lhp__weight=0.2)),
    Item("R15", "3D-LHP",
         "sec. 3.6 (weights from relative 3D distance, not fully specified)",
         "1 % quantile of 3D distances, weight 1 - r, mean over P, projection head in no optimiser "
         "(src/modules.py LocalHiddenPositiveProjection)",
         (Setting("lhp.variant", "paper", "released"),)),
    Item("R16", "precision",
         "not stated (repro: bf16 autocast on a GPU)",
         "fp32",
         (Setting("train.precision", "bf16", "fp32"),)),
    Item("R17", "Potsdam unlabelled tiles",
         "not stated (the unlabelled_train tiles of IIC's Potsdam have no gt file)",
         "src/data.py Potsdam: a missing gt .mat (any split) becomes to_pil_image(torch.ones) = 255, mapped to -1: "
         "an all-ignored label map (the probes' mask in train_segmentation.py and utils.py UnsupervisedMetrics "
         "skip -1)",
         fact="a tile without gt in unlabelled_train / all is all -1 (ignored), as released; in labelled_train / "
              "labelled_test a missing gt file is an error (STEGO would ignore the tile silently)"),
    Item("R18", "MDE-feature guidance",
         "supp. B.1 / Table 3: 'feature maps from the penultimate layer of the monocular depth estimator' (no layer "
         "named, no code)",
         "no code path for it in leonsick/depthg",
         fact="the input of ZoeDepth's last metric-head layer (conditional_log_binomial): the relative head's 32 "
              "activations + the relative depth, 33 channels for ZoeD_N, read by a forward hook "
              "(repro.depth.hf.ZoeDepthFeatures); same processor and flip/pad TTA as for depth, resized to the crop "
              "and average-pooled to the crop/8 grid; not normalised (cosine similarity is scale-free); kept per crop in float "
              "in both profiles (R4/R5 apply to depth maps only)"),
    Item("R19", "guidance correlation of a multi-channel signal",
         "eq. 5 writes D = d_i d_j for a scalar depth; nothing for vectors",
         "depth_correlation(norm(d1), norm(d2)) in src/modules.py: L2 over channels then a dot product, i.e. the "
         "cosine similarity for C > 1",
         fact="C > 1 (MDE features, class fractions): D = cosine similarity of the per-location guidance vectors (a "
              "zero vector gives 0) in both kernels; C = 1 keeps eq. 5 (product) and R7 (released) exactly "
              "(repro.losses.depth_correlation_tensor)"),
    Item("R20", "FPS on a multi-channel signal",
         "sec. 3.4 back-projects a depth map; nothing for vectors",
         "farthest_point_sampling_depth back-projects depth only (fps_depth_feats, unused, adds feature distances)",
         fact="C > 1: FPS over points (X, Y, g / |g|): the cell's pinhole ray at unit depth (paper camera, "
              "sampling.fov_deg) and the unit guidance vector, so squared distances are the image-plane distance plus "
              "the cosine distance 2 - 2 cos; released order (R8) keeps its start, sorting and transposed coordinates "
              "(repro.sampling.guidance_points)"),
    Item("R21", "segmentation-map guidance",
         "supp. B.1 / Table 3: 'plugging the ground-truth segmentation maps into the guidance mechanism' (no encoding "
         "given)",
         "no code path for it in leonsick/depthg",
         fact="the crop's ground-truth class ids (K classes, -1 void) as one-hot vectors; pooled to the feature grid "
              "they are class fractions (void counts for no class; an all-void cell is a zero vector); D and FPS as "
              "R19/R20 (repro.guidance); 3D-LHP is refused for it and for MDE features (no depth to back-project)"),
    Item("R22", "depth maps computed elsewhere (KBR, files)",
         "Table 5: KBR depth maps, as the other estimators' (eq. 4: min-max per crop)",
         "generate_depth.py ran only ZoeDepth; the released profile treats supplied maps as it treats ZoeDepth's (R4)",
         fact="one (H, W) float map per full image, larger = farther, <data.depth_files>/<image key>.npy "
              "(repro.depth.files); per crop: cut with the crop box, resized like the crop, min-max normalised"),
    Item("R23", "frozen-backbone precision (model.backbone_precision)",
         "not stated", "fp32 (no autocast anywhere)", (),
         fact="default: the backbone runs under train.precision's autocast in training and in "
              "fp32 elsewhere (R16); model.backbone_precision=bf16 (or fp32) forces every pass of the frozen "
              "backbone (training, feature store, validation, evaluation; the kNN table stays fp32). Measured "
              "agreement, bf16 vs fp32 on a CPU (benchmarks/bench_backbone_precision.py, golden fixtures, "
              "seed-0 random ViT-S/8): features max |delta| 0.033 at 224 and 320 px (0.76 % of max |feature| "
              "4.4; mean |delta| 0.004); released evaluation flow on two NYUv2 frames (flip, both probes, "
              "DenseCRF): accuracy changes <= 0.05 points, mIoU <= 0.012 points, 0.13-0.36 % of pixels change "
              "label (STEGO and DepthG checkpoints)"),
)
"""SPEC section 7, item by item."""


def item_ids() -> list[str]:
    """``["R1", ..., "R23"]``."""
    return [item.id for item in ITEMS]


def get_item(item_id: str) -> Item:
    """The item with this id.

    Raises:
        KeyError: for an unknown id (the message lists the known ones).
    """
    for item in ITEMS:
        if item.id == item_id:
            return item
    raise KeyError(f"unknown fidelity item {item_id!r}; known: {', '.join(item_ids())}")


def _settings(fidelity: str, items: Mapping[str, str]) -> Iterator[tuple[Item, Setting, str]]:
    for item in ITEMS:
        profile = items.get(item.id, fidelity)
        for setting in item.settings:
            yield item, setting, profile


def _nest(dotted: str, value: Any) -> dict:
    head, _, rest = dotted.partition(".")
    return {head: _nest(rest, value) if rest else value}


def profile_layers(fidelity: str, entry: Mapping[str, Any], items: Mapping[str, str] | None = None
                   ) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """The profile's config layers for an entry.

    Args:
        fidelity: ``"paper"`` or ``"released"``.
        entry: the entry's own config as a nested plain dict (base and experiment file merged); the
            conditions of conditional settings are evaluated on it.
        items: per-item profile choices (``{"R4": "paper"}``) that replace ``fidelity`` for those items.

    Returns:
        ``(switches, entry_values)``: lists of ``(origin, nested dict)`` layers, ``origin`` naming
        the item (``"fidelity released R3"``), in item order (see the module docstring).

    Raises:
        ValueError: for an unknown profile.
    """
    items = dict(items or {})
    for name in [fidelity, *items.values()]:
        if name not in PROFILES:
            raise ValueError(f"unknown fidelity {name!r}; expected one of {PROFILES}")
    switches: list[tuple[str, dict]] = []
    entry_values: list[tuple[str, dict]] = []
    for item, setting, profile in _settings(fidelity, items):
        value = setting.value(profile)
        if value is UNSET or not setting.applies(entry):
            continue
        layer = (f"fidelity {profile} {item.id}", _nest(setting.key, value))
        (entry_values if setting.entry_value else switches).append(layer)
    return switches, entry_values


def controlled_keys(*, entry_values: bool = False) -> set[str]:
    """Config keys the profiles set as switches (or, with ``entry_values=True``, as restated entry values)."""
    return {s.key for item in ITEMS for s in item.settings if s.entry_value == entry_values}


def _fmt(value: Any) -> str:
    return "true" if value is True else "false" if value is False else str(value)


def format_table(ids: list[str] | None = None) -> str:
    """The fidelity table as plain text: per item, each key's value in both profiles, and the sources."""
    lines = []
    for item in ITEMS if not ids else [get_item(i) for i in ids]:
        lines.append(f"{item.id:4s} {item.component}")
        if item.fact:
            lines.append(f"       both profiles: {item.fact}")
        for s in item.settings:
            cond = " when " + ", ".join(f"{k} in {list(v)}" if len(v) > 1 else f"{k}={_fmt(v[0])}"
                                         for k, v in s.when.items()) if s.when else ""
            lines.append(f"       {s.key:28s} paper: {_fmt(s.paper):14s} released: {_fmt(s.released)}{cond}")
        lines.append(f"       paper:    {item.paper}")
        lines.append(f"       released: {item.released}")
    return "\n".join(lines)
