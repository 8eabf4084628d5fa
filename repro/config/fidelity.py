"""The two fidelities of every table entry: the papers as written, and the released code as it ran.

One table, :data:`ITEMS`, maps each docs/fidelity.md item (R1-R23, and repro's own readings R17-R23) to the
config values it sets in the ``paper`` and the ``released`` profile, with its source on either side: the
paper passage (:attr:`Item.passage`) and the released lines (:attr:`Item.source`). The loader
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
STEGO = mhamilton723/STEGO @eb4d6b5 (``src/``), DINO = facebookresearch/dino @7c446df (its HEAD when the
line numbers were read; no commit was pinned before). Every ``path:line`` in :attr:`Item.source` is a line of
these commits. :func:`fidelity_markdown` renders the table as ``docs/fidelity.md`` (see :data:`REGENERATE`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PROFILES", "UNSET", "Setting", "Item", "ITEMS", "item_ids", "get_item", "profile_layers",
           "controlled_keys", "format_table", "profiles_for", "SOURCE_REPOS", "OWN_READING", "NO_PASSAGE",
           "REGENERATE", "fidelity_markdown"]

PROFILES = ("paper", "released")

SOURCE_REPOS = ("STEGO", "DepthG", "DINO", "ZoeDepth", "MiDaS")
"""Repository names an :attr:`Item.source` part may start with."""

OWN_READING = "not in the released code"
"""How an :attr:`Item.source` starts where the released code has no path to emulate."""

NO_PASSAGE = "not in the papers"
"""How an :attr:`Item.passage` starts where the reading is repro's own."""

REGENERATE = ('python -c "from repro.config.fidelity import fidelity_markdown; '
              'print(fidelity_markdown(), end=\'\')" > docs/fidelity.md')
"""The shell command that rewrites ``docs/fidelity.md`` from :data:`ITEMS`."""


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
    """One row of docs/fidelity.md: what the paper says, what the released code did, and the settings.

    Attributes:
        id: ``"R1"`` ... ``"R23"``.
        component: what the item is about, in a few words.
        paper: the ``paper`` profile's reading of the papers.
        released: what the released code did.
        settings: the config keys the item sets, per profile.
        fact: for items with no config key, the fact both profiles share.
        source: the released lines the item emulates, ``"<repo> <path>:<line>[-<line>]"`` parts joined by
            ``"; "`` (repo one of :data:`SOURCE_REPOS`, commits in the module docstring), or a sentence
            starting with :data:`OWN_READING` where the released code has no such path.
        passage: where the paper profile's reading comes from: paper, section / equation / table and a
            short quote, or a sentence starting with :data:`NO_PASSAGE` for repro's own readings.
    """

    id: str
    component: str
    paper: str
    released: str
    settings: tuple[Setting, ...] = ()
    fact: str = ""
    source: str = ""
    passage: str = ""


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
         fact="dino_deitsmall8_300ep_pretrain.pth (both; repro.models.backbone.ARCHS)",
         source="DepthG src/modules.py:43-44; DepthG src/modules.py:65-68; DepthG src/configs/local_config.yml:76; "
                "STEGO src/modules.py:37-38; STEGO src/modules.py:59-62; STEGO src/configs/train_config.yml:44",
         passage='DepthG §4: "We use the DINO [7] backbones ViT-Small (ViT-S) and ViT-Base (ViT-B), which were '
                 'pre-trained in a self-supervised manner on ImageNet-1k" (no weights file named)'),
    Item("R2", "pos-embed at 320 px",
         "not stated; every published number used DINO's interpolation",
         "DINO vision_transformer.py interpolate_pos_encoding: bicubic, scale (40+0.1)/28, no antialias",
         (Setting("model.pos_embed", "dino", "dino"),),
         source="DepthG src/dino/vision_transformer.py:179-199; STEGO src/dino/vision_transformer.py:176-196; "
                "DINO vision_transformer.py:174-194",
         passage='DepthG supp. A.1, Table 1: "Training Size 224×224", "Test Size 320×320" (how the position '
                 "embedding is resized to 320 px is not stated)"),
    Item("R3", "image resizing",
         "bilinear (STEGO A.10); crops kept lossless",
         "T.Resize(size, NEAREST) for images and labels, int() width (src/utils.py get_transform); "
         "train five-crops saved as JPEG at PIL's default quality (src/crop_datasets.py)",
         (Setting("data.resize", "bilinear", "nearest"), Setting("data.train_crop_codec", "png", "jpeg")),
         source="DepthG src/utils.py:174-182; STEGO src/utils.py:175-183; DepthG src/crop_datasets.py:199; "
                "DepthG src/crop_datasets.py:221; STEGO src/crop_datasets.py:122",
         passage='STEGO A.10: "All image resizing uses bilinear interpolation and resizing of target tensors for '
                 'evaluation uses nearest neighbor interpolation."'),
    Item("R4", "depth maps",
         "eq. 4: the estimator's depth of each crop, min-max to [0, 1]; ZoeD_N",
         "ZoeD_N on the FULL image with flip + reflect-pad TTA (generate_depth.py, zoe.infer), min-max per "
         "image, x255 -> uint8 PNG, five-cropped, Resize(224, NEAREST), fed as integers 0..255; NYUv2 sensor "
         "depth min-max per frame (src/data.py NYUv2)",
         (Setting("data.depth_scope", "crop", "image", when=_DEPTH_MAPS),
          Setting("data.depth_encoding", "float", "uint8", when=_DEPTH_MAPS),
          Setting("data.depth_tta", True, True)),
         source="DepthG src/zoedepth/models/zoedepth/config_zoedepth.json:49; DepthG generate_depth.py:164; "
                "DepthG src/zoedepth/models/depth_model.py:131-144; DepthG generate_depth.py:232-240; "
                "DepthG src/crop_datasets.py:185-204; DepthG src/data.py:894-895; DepthG src/data.py:621-627",
         passage='DepthG §3.2, eq. 4: "Given a cropped RGB image x_i, we use the monocular depth estimator M '
                 'together with average pooling to predict depth d_i ∈ [0, 1]"'),
    Item("R5", "Potsdam depth",
         "real depth",
         "src/data.py Potsdam casts the [0, 1] depth to int64 (ToTargetTensor): values in {0, 1}; FPS picks "
         "the first cells in raster order, D = 0",
         (Setting("data.depth_encoding", released="int_cast",
                  when={**_when(data__dataset="potsdam3"), **_DEPTH_MAPS}),),
         source="DepthG src/data.py:193; DepthG src/data.py:226; DepthG src/utils.py:143-145; "
                "DepthG src/modules.py:1014-1025",
         passage='DepthG supp. C.3 / Fig. 4: "We use ZoeDepth [1] to predict on the Potsdam aerial images."'),
    Item("R6", "Cityscapes 'full feature map'",
         "no pointwise sampling: correlations over all 28x28 locations",
         "pointwise=False only switches spatial centring off; 11x11 random samples (depth_sampling=none)",
         _released(_when(sampling__mode="full"), sampling__mode="random", sampling__feature_samples=11,
                   loss__spatial_centering=False),
         source="DepthG paper_reproduction.sh:11; DepthG src/modules.py:1236-1239; DepthG src/modules.py:1319-1321; "
                "DepthG src/configs/local_config.yml:84",
         passage='DepthG §4.2: "do not sample point-wise but use the full feature map for our learning process along '
                 'with the full depth map"'),
    Item("R7", "depth-feature correlation",
         "eq. 5: D = d_i d_j at the sample points",
         "1-channel depth L2-normalised (D = 1 where depth > 0), whole map resized (src/modules.py)",
         (Setting("loss.depth_kernel", "product", "released"),),
         source="DepthG src/modules.py:1256-1278; DepthG src/modules.py:789-790; DepthG src/modules.py:1334-1336",
         passage='DepthG §3.3, eq. 5: "D_hw,uv = d_i^hw d_j^uv" ... "where (h, w) and (u, v) represent the pixel '
                 'positions in the depth maps"'),
    Item("R8", "FPS",
         "sec. 3.4: pinhole back-projection, picks read at their cells",
         "start at 0, raster-order picks, tan(90) in radians, Z = -5 d, (row, col) in grid_sample's (x, y) "
         "slots (src/modules.py farthest_point_sampling_depth)",
         (Setting("sampling.fps_order", "xy", "released"),),
         source="DepthG src/modules.py:988-996; DepthG src/modules.py:999-1037; DepthG src/modules.py:939-985; "
                "DepthG src/modules.py:822-825",
         passage='DepthG §3.4: "we transform the downsampled depth map d(x_i) into a point cloud" ... "converted to '
                 '2D sampling indices for the feature maps"'),
    Item("R9", "step counting",
         "7000 steps = 7000 batches",
         "Lightning 2.0.1 with 3 optimisers: 3 counter steps per batch (7000 -> 2334 batches), schedules on the "
         "counter, N decayed as int(N x fps_sample_decay_factor), 0.9 where the run script sets no factor "
         "(src/configs/local_config.yml, the config train_segmentation.py loads); STEGO's own runs: one step per "
         "batch",
         (Setting("train.step_unit", "batch", "released", when=_when(method="depthg")),
          Setting("sampling.released_factor", released=0.9, when=_when(method="depthg")),
          Setting("train.step_unit", "batch", "batch", when=_when(method=("stego", "dino")))),
         source="DepthG requirements.txt:111; DepthG src/train_segmentation.py:446-449; "
                "DepthG src/train_segmentation.py:537-547; DepthG src/train_segmentation.py:356-359; "
                "DepthG src/train_segmentation.py:370-375; DepthG src/train_segmentation.py:550; "
                "DepthG src/configs/local_config.yml:23-25; DepthG src/configs/local_config.yml:41; "
                "STEGO src/train_segmentation.py:228-230",
         passage='DepthG supp. A.2, Table 2: "Training Steps 7000"; supp. B.2: "N is reduced by 1 at every 3000 '
                 'steps"'),
    Item("R10", "random negatives",
         "a shuffled batch in which no image meets itself, read at its own samples",
         "feats[perm] read at the kNN partner's coordinates; super_perm draws (not always a permutation) "
         "(STEGO src/modules.py ContrastiveCorrelationLoss)",
         (Setting("loss.negative_perm", "derangement", "super_perm"),
          Setting("loss.negative_coords", "own", "knn")),
         source="STEGO src/modules.py:291-295; STEGO src/modules.py:382-385; DepthG src/modules.py:1184-1188; "
                "DepthG src/modules.py:1340-1343",
         passage='STEGO §3.3: "We also sample random images, x^rand, by shuffling x and ensuring that no image '
                 'matched with itself."'),
    Item("R11", "kNN table",
         "GAP of the backbone features",
         "precompute_knns.py never calls .eval(): GAP of Dropout2d(0.1)(features)",
         (Setting("data.knn_dropout", 0.0, 0.1),),
         source="STEGO src/precompute_knns.py:50-55; STEGO src/modules.py:115-116; "
                "DepthG src/precompute_knns.py:55-60; DepthG src/modules.py:128-130; "
                "DepthG src/precompute_knns.py:15-21; DepthG src/precompute_knns.py:108",
         passage='STEGO §3.3: "We first use our backbone to extract global image features by global average pooling '
                 '(GAP) our spatial features: GAP(f)."'),
    Item("R12", "evaluation",
         "flip not mentioned; CRF on the image",
         "always (net(x) + net(flip x).flip) / 2; CRF given the un-normalised image truncated to uint8 in BGR "
         "order (src/eval_segmentation.py, src/crf.py)",
         (Setting("eval.flip", True, True), Setting("eval.crf_image", "rgb", "bgr_truncated")),
         source="DepthG src/eval_segmentation.py:150-152; DepthG src/eval_segmentation.py:156-159; "
                "DepthG src/crf.py:22-23; DepthG src/utils.py:140; STEGO src/eval_segmentation.py:124-128; "
                "STEGO src/crf.py:23",
         passage='STEGO §3.3: "After clustering, we refine these labels with a CRF to improve their spatial '
                 'resolution further." (no paper mentions flip averaging)'),
    Item("R13", "NYUv2 classes",
         "13 classes, 0 = void ignored",
         "n_classes = 14: void (0) scored as a class (src/data.py NYUv2)",
         (Setting("data.score_void", False, True, when=_when(data__dataset="nyuv2")),),
         source="DepthG src/data.py:1014-1024; DepthG src/utils.py:226",
         passage='DepthG supp. B.4: "we evaluate our model on the NYUv2 [4] semantic segmentation dataset" (the '
                 "class count is not stated; 13 classes + void is the usual seg13 reading)"),
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
         + _released(_when(lhp__enabled=True), lhp__weight=0.2),
         source="DepthG paper_reproduction.sh:5; DepthG paper_reproduction.sh:8; DepthG paper_reproduction.sh:11; "
                "DepthG paper_reproduction.sh:14; DepthG src/configs/local_config.yml:32",
         passage='DepthG supp. A.2, Table 2: "Table 2 shows the collection of hyperparameters that are specific for '
                 'our results on various datasets" (values given to two decimals)'),
    Item("R15", "3D-LHP",
         "sec. 3.6 (weights from relative 3D distance, not fully specified)",
         "1 % quantile of 3D distances, weight 1 - r, mean over P, projection head in no optimiser "
         "(src/modules.py LocalHiddenPositiveProjection)",
         (Setting("lhp.variant", "paper", "released"),),
         source="DepthG src/modules.py:273-339; DepthG src/train_segmentation.py:340-344; "
                "DepthG src/train_segmentation.py:537-547",
         passage='DepthG §3.6: "propagating the learning signal to the closest patches in 3D space proportional to '
                 'their relative distances, using the point cloud"'),
    Item("R16", "precision",
         "not stated (repro: bf16 autocast on a GPU)",
         "fp32",
         (Setting("train.precision", "bf16", "fp32"),),
         source="DepthG src/train_segmentation.py:698-713; STEGO src/train_segmentation.py:482-496",
         passage="not in the papers (STEGO A.10 names PyTorch v1.7 and PyTorch Lightning, no numeric precision); "
                 "repro's reading: bf16 autocast on a GPU"),
    Item("R17", "Potsdam unlabelled tiles",
         "not stated (the unlabelled_train tiles of IIC's Potsdam have no gt file)",
         "src/data.py Potsdam: a missing gt .mat (any split) becomes to_pil_image(torch.ones) = 255, mapped to -1: "
         "an all-ignored label map (the probes' mask in train_segmentation.py and utils.py UnsupervisedMetrics "
         "skip -1)",
         fact="a tile without gt in unlabelled_train / all is all -1 (ignored), as released; in labelled_train / "
              "labelled_test a missing gt file is an error (STEGO would ignore the tile silently)",
         source="DepthG src/data.py:173-177; DepthG src/data.py:163-167; DepthG src/data.py:231-235; "
                "DepthG src/train_segmentation.py:424; DepthG src/utils.py:226; STEGO src/data.py:157-158",
         passage="not in the papers; repro's reading: a Potsdam tile without a gt file (IIC's unlabelled_train) is "
                 "an unlabelled image, all pixels ignored"),
    Item("R18", "MDE-feature guidance",
         "supp. B.1 / Table 3: 'feature maps from the penultimate layer of the monocular depth estimator' (no layer "
         "named, no code)",
         "no training path for it in leonsick/depthg: generate_depth.py --save_features writes ZoeDepth's "
         "core_out tensors (out_conv = the relative head's 32 activations) per image, but nothing reads them",
         fact="the input of ZoeDepth's last metric-head layer (conditional_log_binomial): the relative head's 32 "
              "activations + the relative depth, 33 channels for ZoeD_N, read by a forward hook "
              "(repro.depth.hf.ZoeDepthFeatures); same processor and flip/pad TTA as for depth, resized to the crop "
              "and average-pooled to the crop/8 grid; not normalised (cosine similarity is scale-free); kept per "
              "crop in float in both profiles (R4/R5 apply to depth maps only)",
         source="not in the released code: DepthG generate_depth.py:219-227 (--save_features) writes the MDE's "
                "core_out tensors per image and src/zoedepth/models/zoedepth/zoedepth_v1.py:195 returns the bin "
                "embedding as feats, but nothing in src/ reads either; repro hooks the input of "
                "conditional_log_binomial (zoedepth_v1.py:171-186 in the copy DepthG ships)",
         passage='DepthG supp. B.1 / Table 3: "the use of feature maps from the penultimate layer of the monocular '
                 'depth estimator (MDE)"'),
    Item("R19", "guidance correlation of a multi-channel signal",
         "eq. 5 writes D = d_i d_j for a scalar depth; nothing for vectors",
         "depth_correlation(norm(d1), norm(d2)) in src/modules.py: L2 over channels then a dot product, i.e. the "
         "cosine similarity for C > 1",
         fact="C > 1 (MDE features, class fractions): D = cosine similarity of the per-location guidance vectors (a "
              "zero vector gives 0) in both kernels; C = 1 keeps eq. 5 (product) and R7 (released) exactly "
              "(repro.method.losses.depth_correlation_tensor)",
         source="DepthG src/modules.py:1265; DepthG src/modules.py:789-790; DepthG src/modules.py:812-814",
         passage='DepthG §3.3, eq. 5: "D_hw,uv = d_i^hw d_j^uv" (a scalar depth); a multi-channel signal is not in '
                 "the papers, repro's reading: the cosine similarity"),
    Item("R20", "FPS on a multi-channel signal",
         "sec. 3.4 back-projects a depth map; nothing for vectors",
         "farthest_point_sampling_depth back-projects depth only (fps_depth_feats, unused, adds feature distances)",
         fact="C > 1: FPS over points (X, Y, g / |g|): the cell's pinhole ray at unit depth (paper camera, "
              "sampling.fov_deg) and the unit guidance vector, so squared distances are the image-plane distance plus "
              "the cosine distance 2 - 2 cos; released order (R8) keeps its start, sorting and transposed coordinates "
              "(repro.method.sampling.guidance_points)",
         source="DepthG src/modules.py:999-1037; DepthG src/modules.py:1124-1180",
         passage='DepthG §3.4: "we transform the downsampled depth map d(x_i) into a point cloud"; a multi-channel '
                 "signal is not in the papers, repro's reading: ray plus unit guidance vector"),
    Item("R21", "segmentation-map guidance",
         "supp. B.1 / Table 3: 'plugging the ground-truth segmentation maps into the guidance mechanism' (no encoding "
         "given)",
         "no code path for it in leonsick/depthg",
         fact="the crop's ground-truth class ids (K classes, -1 void) as one-hot vectors; pooled to the feature grid "
              "they are class fractions (void counts for no class; an all-void cell is a zero vector); D and FPS as "
              "R19/R20 (repro.method.guidance); 3D-LHP is refused for it and for MDE features (no depth to back-project)",
         source="not in the released code: its one label path, use_true_labels (src/train_segmentation.py:219-221), "
                "puts one-hot labels in place of the backbone features, not of the depth guidance",
         passage='DepthG supp. B.1 / Table 3: "We further try plugging the ground-truth segmentation maps into the '
                 'guidance mechanism."'),
    Item("R22", "depth maps computed elsewhere (KBR, files)",
         "Table 5: KBR depth maps, as the other estimators' (eq. 4: min-max per crop)",
         "generate_depth.py makes ZoeDepth maps and MiDaS (DPT_Large) maps, min-max then inverted; KBR maps are "
         "read as supplied (src/data.py: mean of the 3 channels, min-max per image); the released profile treats "
         "supplied maps as it treats ZoeDepth's (R4)",
         fact="one (H, W) float map per full image, larger = farther, <data.depth_files>/<image key>.npy "
              "(repro.depth.files); per crop: cut with the crop box, resized like the crop, min-max normalised",
         source="DepthG src/data.py:342-343; DepthG src/data.py:401-408; DepthG src/data.py:197-203; "
                "DepthG generate_depth.py:97-113; DepthG generate_depth.py:192-197; "
                "DepthG src/crop_datasets.py:185-204",
         passage='DepthG §5 / Table 5: "we first generate depth maps for COCO-Stuff 27 using each of the introduced '
                 'models"; supp. C.4: "All maps are Min-Max normalized."'),
    Item("R23", "frozen-backbone precision (model.backbone_precision)",
         "not stated", "fp32 (no autocast anywhere)", (),
         fact="default: the backbone runs under train.precision's autocast in training and in "
              "fp32 elsewhere (R16); model.backbone_precision=bf16 (or fp32) forces every pass of the frozen "
              "backbone (training, feature store, validation, evaluation; the kNN table stays fp32). Measured "
              "agreement, bf16 vs fp32 on a CPU (benchmarks/bench_backbone_precision.py, golden fixtures, "
              "seed-0 random ViT-S/8): features max |delta| 0.033 at 224 and 320 px (0.76 % of max |feature| "
              "4.4; mean |delta| 0.004); released evaluation flow on two NYUv2 frames (flip, both probes, "
              "DenseCRF): accuracy changes <= 0.05 points, mIoU <= 0.012 points, 0.13-0.36 % of pixels change "
              "label (STEGO and DepthG checkpoints)",
         source="DepthG src/train_segmentation.py:698-713; DepthG src/eval_segmentation.py:150-152; "
                "DepthG src/precompute_knns.py:94-96",
         passage="not in the papers; repro's reading: an opt-in precision for the frozen backbone, measured against "
                 "fp32 (the released code ran fp32 throughout)"),
)
"""docs/fidelity.md, item by item."""


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


_INTRO = f"""\
# Fidelity items

Generated from `repro.config.fidelity.ITEMS`; do not edit by hand. Regenerate from the repository root with:

```sh
{REGENERATE}
```

## Two profiles

Every table entry runs in one of two fidelity profiles:

- `paper`: the papers as written (DepthG CVPR 2024 with its supplement, STEGO ICLR 2022), plus the protocol
  facts no paper states but every published number used: the 300-epoch ViT-S/8 weights (R1), DINO's own
  position-embedding interpolation (R2) and flip-averaged evaluation (R12).
- `released`: what the released code did when it produced the published numbers, line for line where it
  differs from the papers.

An experiment picks one with `fidelity: paper` or `fidelity: released`. The loader turns the profile into
plain config values once (`data.resize`, `loss.negative_perm`, ...); no stage reads a fidelity flag. The
config is built in layers, each later one winning:

1. `base.yaml`;
2. the profile's switches, i.e. behaviours (R3's resizing, R9's step counting, ...), some only for some
   datasets or methods;
3. the experiment file: a switch it sets on purpose beats the profile, and the difference is recorded in
   `fidelity_deviations` (registered entries have none);
4. the profile's entry values: an entry's own numbers restated as the released code ran them (R6's
   Cityscapes sampling, R14's run-script values), picked by conditions on the entry's own config (dataset,
   backbone, method, ...), hence after the experiment file;
5. `--set` overrides, the only thing that beats an entry value.

`fidelity_items: {{R4: paper}}` takes single items from the other profile. `repro fidelity` prints the same
table as plain text.

## Reading an item

- **Paper passage**: where the `paper` reading comes from (paper, section / equation / table, short
  quote). "{NO_PASSAGE}" marks a reading that is repro's own.
- **Released source**: the released lines the item emulates, as `<repo> <path>:<line>`, at DepthG =
  leonsick/depthg @c284180, STEGO = mhamilton723/STEGO @eb4d6b5, DINO = facebookresearch/dino @7c446df.
  "{OWN_READING}" marks an item with no released path to emulate.
- **Settings**: the config keys the item sets in each profile; "(entry)" leaves the key as the entry sets
  it; "when" lists the conditions on the entry's config, and "entry value" marks a restated entry number
  (layer 4) rather than a switch (layer 2). Items without keys state the fact both profiles share.
"""


def _md_text(text: str) -> str:
    # ``<image key>`` would read as an HTML tag
    return text.replace("<", "\\<")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _md_value(value: Any) -> str:
    return "(entry)" if value is UNSET else f"`{_fmt(value)}`"


def _md_when(setting: Setting) -> str:
    conds = [f"`{k}` in {', '.join(_fmt(v) for v in vs)}" if len(vs) > 1 else f"`{k}` = {_fmt(vs[0])}"
             for k, vs in setting.when.items()]
    return "; ".join((["entry value"] if setting.entry_value else []) + conds) or "always"


def _md_item(item: Item) -> list[str]:
    if item.source.startswith(OWN_READING):
        source = _md_text(item.source)
    else:
        source = "; ".join(f"`{part}`" for part in item.source.split("; "))
    lines = [f"## {item.id} — {item.component}", "",
             f"- **Paper passage**: {_md_text(item.passage)}",
             f"- **Paper profile**: {_md_text(item.paper)}",
             f"- **Released code**: {_md_text(item.released)}",
             f"- **Released source**: {source}"]
    if item.fact:
        lines.append(f"- **Both profiles**: {_md_text(item.fact)}")
    if item.settings:
        lines += ["", "| key | paper | released | when |", "| --- | --- | --- | --- |"]
        lines += [f"| `{s.key}` | {_md_cell(_md_value(s.paper))} | {_md_cell(_md_value(s.released))} | "
                  f"{_md_cell(_md_when(s))} |" for s in item.settings]
    return lines + [""]


def fidelity_markdown() -> str:
    """The whole fidelity table as a Markdown document (the content of ``docs/fidelity.md``).

    An introduction to the two profiles and their layering, then one ``## R<n> — <component>`` section per
    item of :data:`ITEMS`: the paper passage, the paper profile's reading, what the released code did and
    where (:attr:`Item.source`), and a table of the item's settings or the fact both profiles share.

    Returns:
        The document: deterministic, no trailing spaces, ending with exactly one newline.
    """
    lines = _INTRO.splitlines() + [""]
    for item in ITEMS:
        lines += _md_item(item)
    return "\n".join(line.rstrip() for line in lines).rstrip("\n") + "\n"
