"""Published STEGO/DepthG Lightning checkpoints: safe reading, conversion and the released evaluation protocol.

Against ``../shared/golden/released-checkpoints/`` (see its README): checkpoints written by the released
``LitUnsupervisedSegmenter`` classes with random weights (backbone keys removed; refilled here from the
seed-0 random DINO checkpoint) and the outputs of the released ``eval_segmentation.py`` flow on two
real NYUv2 frames.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repro.data.transforms import images_to_tensor
from repro.evaluate.crf import crf_images, dense_crf_batch, released_crf_image
from repro.evaluate.metrics import ConfusionMatrix, compute_metrics
from repro.evaluate.protocol import evaluate_segmentation, predict_logits
from repro.models.backbone import DinoBackbone
from repro.models.lightning import (
    CheckpointFormatError, CheckpointLayoutError, UnsafeCheckpointError, convert_checkpoint, load_released,
    read_lightning_checkpoint,
)
from repro.models.safe_load import PickledStandIn, allowed_globals

MODELS = ("stego", "depthg")
MARGIN = 1e-3  # compare argmaxes where the released top-1 minus top-2 log-probability exceeds this (near-ties exist)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------ fixtures


def _json(golden, name):
    return json.loads((golden / name).read_text())


def _fixture_ckpt(golden, model):
    return golden / f"{model}_vits8_random_nobackbone.ckpt"


class _OmegaConfNamesPickler(pickle._Pickler):
    """Pickles the inert stand-ins under their OmegaConf global names, so a rewritten file has the released globals."""

    def save_global(self, obj, name=None):
        if isinstance(obj, type) and issubclass(obj, PickledStandIn) and obj.global_name:
            module, _, qualname = obj.global_name.rpartition(".")
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


_PICKLE_MODULE = types.SimpleNamespace(__name__="omegaconf_names_pickle", Pickler=_OmegaConfNamesPickler)


def _raw(path):
    """The checkpoint dict with its OmegaConf objects as inert stand-ins (weights-only reader, allowlist)."""
    with torch.serialization.safe_globals(allowed_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _refill(raw, dino_state, golden, model):
    """Insert every DINO key K as net.model.K, in the order of the complete checkpoint's layout."""
    layout = _json(golden, f"{model}_vits8_state_dict_layout.json")["state_dict_layout_full"]
    full = {**{f"net.model.{k}": v for k, v in dino_state.items()}, **raw["state_dict"]}
    raw["state_dict"] = collections.OrderedDict((item["key"], full[item["key"]]) for item in layout)
    return raw


@pytest.fixture(scope="module")
def complete(golden, dino_state, tmp_path_factory):
    """The complete checkpoint files (backbone refilled), written with the released pickle globals."""
    folder = tmp_path_factory.mktemp("complete")
    out = {}
    for model in MODELS:
        raw = _refill(_raw(_fixture_ckpt(golden, model)), dino_state, golden, model)
        out[model] = folder / f"{model}_vits8_random.ckpt"
        torch.save(raw, out[model], pickle_module=_PICKLE_MODULE)
    return out


@pytest.fixture(scope="module")
def released(complete):
    """The complete checkpoints imported through the real code path (read the file, convert)."""
    return {model: load_released(path) for model, path in complete.items()}


@pytest.fixture(scope="module")
def outputs(golden):
    return {model: dict(np.load(golden / f"{model}_vits8_eval_nyuv2.npz")) for model in MODELS}


# ------------------------------------------------------------------------------------------ refill and import
@pytest.mark.parametrize("model", MODELS)
def test_refilled_backbone_matches_the_recorded_checksums_and_layout(golden, dino_state, model):
    record = _json(golden, f"{model}_vits8_dropped_backbone.json")
    sums = record["checksums_float64"]
    assert abs(dino_state["pos_embed"].double().sum().item() - sums["pos_embed_sum"]) < 1e-6
    assert abs(dino_state["blocks.0.attn.qkv.weight"].double().sum().item() - sums["blocks.0.attn.qkv.weight_sum"]) < 1e-6
    assert abs(dino_state["norm.weight"].double().sum().item() - sums["norm.weight_sum"]) < 1e-6
    dropped = json.loads(record["dropped_keys"]) if isinstance(record["dropped_keys"], str) else record["dropped_keys"]
    assert [d["key"] for d in dropped] == [f"net.model.{k}" for k in dino_state]
    raw = _refill(_raw(_fixture_ckpt(golden, model)), dino_state, golden, model)
    layout = _json(golden, f"{model}_vits8_state_dict_layout.json")["state_dict_layout_full"]
    assert [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in raw["state_dict"].items()] == \
        [(d["key"], d["shape"], d["dtype"]) for d in layout]


@pytest.mark.parametrize("model", MODELS)
def test_reading_the_released_file_needs_no_omegaconf_and_yields_plain_config(golden, model):
    path = _fixture_ckpt(golden, model)
    ckpt = read_lightning_checkpoint(path)
    assert "omegaconf" not in sys.modules
    assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (ckpt.lightning_version, ckpt.global_step, ckpt.epoch, ckpt.n_classes) == ("2.0.1.post0", 7000, 0, 27)
    assert ckpt.cfg == _json(golden, "provenance_and_results.json")[model]["cfg_used"]
    assert type(ckpt.cfg) is dict and all(not isinstance(v, PickledStandIn) for v in ckpt.cfg.values())
    assert list(ckpt.state_dict) == [d["key"] for d in _json(golden, f"{model}_vits8_state_dict_layout.json")
                                     ["state_dict_layout_full"] if not d["key"].startswith("net.model.")]


def test_rewritten_complete_file_has_exactly_the_released_pickle_globals(golden, complete):
    wanted = _json(golden, "provenance_and_results.json")["stego"]["loading"]["unsafe_globals_in_checkpoint"]
    for path in (_fixture_ckpt(golden, "stego"), complete["stego"], complete["depthg"]):
        assert sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) == sorted(wanted)


@pytest.mark.parametrize("model", MODELS)
def test_import_converts_every_part(released, golden, dino_state, model):
    m = released[model]
    assert (m.arch, m.n_classes, m.code_dim, m.extra_clusters, m.project) == ("vit_small_patch8", 27, 70, 0, model)
    assert m.parts.projection is None and m.parts.cluster_probe.num_clusters == 27
    raw = _raw(_fixture_ckpt(golden, model))["state_dict"]
    head = m.parts.head.state_dict()
    for ours, theirs in (("linear.weight", "net.cluster1.0.weight"), ("mlp.0.bias", "net.cluster2.0.bias"),
                         ("mlp.2.weight", "net.cluster2.2.weight")):
        assert torch.equal(head[ours], raw[theirs])
    assert torch.equal(m.parts.cluster_probe.clusters, raw["cluster_probe.clusters"])
    assert torch.equal(m.parts.linear_probe.conv.bias, raw["linear_probe.bias"])
    assert all(torch.equal(m.backbone_state[k], v) for k, v in dino_state.items())
    record = m.provenance()
    assert record["global_step"] == 7000 and record["lightning_version"] == "2.0.1.post0" and len(record["sha256"]) == 64
    assert any("train_cluster_probe" in n for n in m.notes)
    assert any("decayed" in n and "depth_feat_weight" in n for n in m.notes) == (model == "depthg")


# ------------------------------------------------------------------------------------------ released outputs
def test_head_on_the_stored_features_reproduces_the_stored_code(released, outputs):
    out = outputs["stego"]  # only the STEGO file stores the backbone features
    with torch.no_grad():
        code = released["stego"].parts.head(torch.from_numpy(out["feats_noflip"]))[1]
    assert (code - torch.from_numpy(out["code_noflip"])).abs().max().item() < 1e-5


def test_upsampling_the_stored_code_reproduces_the_stored_upsampled_code(outputs):
    out = outputs["stego"]
    up = F.interpolate(torch.from_numpy(out["code"]), (320, 320), mode="bilinear", align_corners=False).numpy()
    ref = out["code_upsampled_f16"]
    assert np.all(np.abs(up - ref.astype(np.float32)) <= np.spacing(np.abs(ref)).astype(np.float32) / 2 + 1e-6)


@pytest.mark.parametrize("model", MODELS)
def test_released_crf_on_the_stored_code_is_identical_with_the_released_image(released, outputs, model):
    m, out = released[model], outputs[model]
    x = images_to_tensor(out["img_uint8"])
    up = F.interpolate(torch.from_numpy(out["code"]), (320, 320), mode="bilinear", align_corners=False)
    with torch.no_grad():
        logs = {"cluster": torch.log_softmax(m.parts.cluster_probe.similarities(up) * 2.0, 1),
                "linear": torch.log_softmax(m.parts.linear_probe(up), 1)}
    for name, log_probs in logs.items():
        assert np.array_equal(log_probs.argmax(1).numpy(), out[f"{name}_argmax"])
        refined = dense_crf_batch(crf_images(out["img_uint8"], x, "bgr_truncated"), log_probs).argmax(1)
        assert np.array_equal(refined, out[f"crf_{name}_argmax"])
        plain_rgb = dense_crf_batch(crf_images(out["img_uint8"], x, "rgb"), log_probs).argmax(1)
        assert not np.array_equal(plain_rgb, out[f"crf_{name}_argmax"])  # the image convention matters


def test_released_crf_image_is_truncated_bgr(outputs):
    img = outputs["stego"]["img_uint8"][0]
    x = images_to_tensor(img[None])[0]
    ours = released_crf_image(x)
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    unnorm = x.permute(1, 2, 0).numpy() * std + mean  # float32, as utils.UnNormalize
    expected = np.floor(unnorm * np.float32(255)).astype(np.uint8)[:, :, ::-1]
    assert np.array_equal(ours, expected)
    diff = ours.astype(int) - img[:, :, ::-1].astype(int)
    assert set(np.unique(diff)) <= {-1, 0} and (diff == -1).any()  # truncation loses 1 where x*255 rounds below


@pytest.mark.parametrize("model", MODELS)
def test_released_metrics_from_the_released_predictions(golden, outputs, model):
    out, rel = outputs[model], _json(golden, "provenance_and_results.json")[model]
    label = torch.from_numpy(out["label"].astype(np.int64))  # 0..13, 0 = void counted, scored as 27 classes
    for prefix, block in (("crf_", "metrics_with_crf"), ("", "metrics_without_crf")):
        for name, matching in (("cluster", "hungarian"), ("linear", "identity")):
            cm = ConfusionMatrix(27, 27)
            cm.update(torch.from_numpy(out[f"{prefix}{name}_argmax"].astype(np.int64)), label)
            metrics = compute_metrics(cm, matching=matching)
            assert metrics.accuracy == pytest.approx(rel[block][f"final/{name}/Accuracy"], abs=1e-4)
            assert metrics.miou == pytest.approx(rel[block][f"final/{name}/mIoU"], abs=1e-4)


@pytest.mark.parametrize("model", MODELS)
def test_full_released_protocol_agrees_with_the_released_outputs(golden, released, outputs, model):
    """Backbone + head + flip + upsampling + probes + CRF through repro's evaluation (needs SPEC R2)."""
    m, out = released[model], outputs[model]
    backbone = m.backbone()
    x = images_to_tensor(out["img_uint8"])
    with torch.no_grad():
        code1 = m.parts.head(backbone(x))[1]
        code = 0.5 * (code1 + m.parts.head(backbone(x.flip(-1)))[1].flip(-1))
    assert (code1 - torch.from_numpy(out["code_noflip"])).abs().max().item() < 1e-4  # measured 5e-6 (|code| <= 5)
    assert (code - torch.from_numpy(out["code"])).abs().max().item() < 1e-4
    cluster_log, linear_log = predict_logits(backbone, m.parts.head, m.parts.cluster_probe, m.parts.linear_probe, x,
                                             (320, 320), flip=True, log_probs=True)
    for name, log_probs in (("cluster", cluster_log), ("linear", linear_log)):
        sure = out[f"{name}_margin_f16"].astype(np.float32) > MARGIN
        assert (log_probs.argmax(1).numpy() == out[f"{name}_argmax"])[sure].mean() >= 0.999
    samples = [{"key": str(int(f)), "image": img, "label": lab.astype(np.int64)}
               for f, img, lab in zip(out["frames"], out["img_uint8"], out["label"])]
    result = evaluate_segmentation(samples, backbone, m.parts.head, m.parts.cluster_probe, m.parts.linear_probe,
                                   batch_size=2, crf=True, flip=True, crf_image="bgr_truncated", keep_predictions=True)
    rel = _json(golden, "provenance_and_results.json")[model]["metrics_with_crf"]
    for name, metrics in (("cluster", result.cluster), ("linear", result.linear)):
        sure = out[f"crf_{name}_margin_f16"].astype(np.float32) > MARGIN
        assert (np.stack(result.predictions[name]) == out[f"crf_{name}_argmax"])[sure].mean() >= 0.999
        # one pixel is 0.0005 points of accuracy; measured: identical predictions, metrics equal to 1e-6
        assert metrics.accuracy == pytest.approx(rel[f"final/{name}/Accuracy"], abs=0.01)
        assert metrics.miou == pytest.approx(rel[f"final/{name}/mIoU"], abs=0.01)


# ------------------------------------------------------------------------------------------ bad files
class _Payload:
    """An arbitrary class whose unpickling would run code (write a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class _Plain:
    """An arbitrary class (its instance pickles as GLOBAL + NEWOBJ + BUILD)."""

    def __init__(self):
        self.value = 1


class _MyOrderedDict(collections.OrderedDict):
    pass


@pytest.mark.parametrize("kind,name", [("function-call", "open"), ("class-instance", "_Plain"),
                                       ("dict-subclass", "_MyOrderedDict")])
def test_a_global_outside_the_allowlist_is_refused_and_nothing_runs(tmp_path, golden, kind, name):
    marker = tmp_path / "ran"
    raw = _raw(_fixture_ckpt(golden, "stego"))
    raw["callbacks"] = {"function-call": _Payload(marker), "class-instance": _Plain(),
                        "dict-subclass": _MyOrderedDict(a=1)}[kind]
    path = tmp_path / "bad.ckpt"
    torch.save(raw, path, pickle_module=_PICKLE_MODULE)
    with pytest.raises(UnsafeCheckpointError, match=rf"outside the allowlist: \S*{name}\b") as err:
        read_lightning_checkpoint(path)
    assert "Nothing was loaded" in str(err.value) and not marker.exists()


def test_truncated_and_non_checkpoint_files_are_clear_errors(tmp_path, complete):
    data = complete["stego"].read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        read_lightning_checkpoint(cut)
    other = tmp_path / "notes.ckpt"
    other.write_text("not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="not a torch.save checkpoint"):
        read_lightning_checkpoint(other)


def test_missing_top_level_keys_are_named(tmp_path):
    path = tmp_path / "weights_only.ckpt"
    torch.save({"state_dict": {"linear_probe.bias": torch.zeros(27)}, "global_step": 3}, path)
    with pytest.raises(CheckpointFormatError, match=r"missing \['hyper_parameters'"):
        read_lightning_checkpoint(path)


def test_missing_keys_and_wrong_shapes_name_the_first_mismatching_keys(golden, dino_state):
    base = read_lightning_checkpoint(_fixture_ckpt(golden, "stego"))
    base.state_dict = {**{f"net.model.{k}": v for k, v in dino_state.items()}, **base.state_dict}
    broken = copy.copy(base)
    broken.state_dict = {k: v for k, v in base.state_dict.items()
                         if k not in ("net.model.blocks.3.attn.qkv.weight", "linear_probe.bias")}
    with pytest.raises(CheckpointLayoutError, match=r"missing keys \['net.model.blocks.3.attn.qkv.weight', "
                                                    r"'linear_probe.bias'\]"):
        convert_checkpoint(broken)
    broken.state_dict = {**base.state_dict, "cluster_probe.clusters": torch.zeros(26, 70)}
    with pytest.raises(CheckpointLayoutError, match=r"wrong shapes \['cluster_probe.clusters \(26, 70\) "
                                                    r"\(expected \(27, 70\)\)'\]"):
        convert_checkpoint(broken)


def test_lhp_head_is_converted_and_reported_dino_depth_is_refused(golden, dino_state):
    base = read_lightning_checkpoint(_fixture_ckpt(golden, "depthg"))
    base.state_dict = {**{f"net.model.{k}": v for k, v in dino_state.items()}, **base.state_dict}
    lhp = copy.copy(base)
    lhp.state_dict = {**base.state_dict, **{f"lhp_module.projection_head.{i}.weight": torch.randn(70, 70, 1, 1)
                                            for i in (0, 2)},
                      **{f"lhp_module.projection_head.{i}.bias": torch.randn(70) for i in (0, 2)}}
    m = convert_checkpoint(lhp)
    assert torch.equal(m.parts.projection.net[2].bias, lhp.state_dict["lhp_module.projection_head.2.bias"])
    assert any("never uses it" in n for n in m.notes)
    depth = copy.copy(base)
    depth.hyper_parameters = {**base.hyper_parameters, "cfg": {**base.cfg, "arch": "dino_depth"}}
    with pytest.raises(CheckpointLayoutError, match="arch='dino_depth'.*DinoFeaturizerWithDepth"):
        convert_checkpoint(depth)
    depth.hyper_parameters = base.hyper_parameters
    depth.state_dict = {**base.state_dict, "net.no_depth_embed.weight": torch.zeros(1, 384)}
    with pytest.raises(CheckpointLayoutError, match="unexpected keys.*dino_depth"):
        convert_checkpoint(depth)


def test_extra_clusters_give_a_larger_cluster_probe(golden, dino_state):
    ckpt = read_lightning_checkpoint(_fixture_ckpt(golden, "stego"))
    ckpt.state_dict = {**{f"net.model.{k}": v for k, v in dino_state.items()}, **ckpt.state_dict,
                       "cluster_probe.clusters": torch.randn(29, 70)}
    ckpt.hyper_parameters = {**ckpt.hyper_parameters, "cfg": {**ckpt.cfg, "extra_clusters": 2}}
    m = convert_checkpoint(ckpt)
    assert m.parts.cluster_probe.num_clusters == 29 and m.parts.linear_probe.num_classes == 27


def test_backbone_from_a_state_dict_equals_the_backbone_from_its_file(tmp_path, dino_state):
    path = tmp_path / "dino.pth"
    torch.save(dino_state, path)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(DinoBackbone("vit_small_patch8", dino_state)(x), DinoBackbone("vit_small_patch8", path)(x))
    with pytest.raises(ValueError, match="the given state dict does not match"):
        DinoBackbone("vit_small_patch8", {k: v for k, v in dino_state.items() if k != "norm.bias"})


# ------------------------------------------------------------------------------------------ registry, CLI, launch
def test_registry_lists_the_seven_published_files_with_their_entries():
    from repro.config.entries import entry_path
    from repro.runs.released import load_registry

    registry = load_registry()
    assert sorted((r.project, r.file) for r in registry) == sorted(
        [("stego", "cocostuff27_vit_base_5.ckpt"), ("stego", "cityscapes_vit_base_1.ckpt"),
         ("stego", "potsdam_test.ckpt"), ("depthg", "cocostuff_vits.ckpt"), ("depthg", "cocostuff_vitb.ckpt"),
         ("depthg", "cityscapes_vitb.ckpt"), ("depthg", "potsdam_vits.ckpt")])
    for r in registry:
        assert entry_path(r.entry).is_file() and r.sha256 == ""  # never invented: empty until a file is checked
        assert r.url.startswith("https://marhamilresearch4.blob.core.windows.net/stego-public/saved_models/" + r.file
                                if r.project == "stego" else "https://drive.google.com/drive/folders/")


def test_released_list_shows_what_is_present(tmp_path, complete, capsys):
    from repro.cli.main import main

    (tmp_path / "potsdam_test.ckpt").write_bytes(complete["stego"].read_bytes())
    assert main(["released", "list", "--dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("potsdam_test.ckpt" in line and "present (sha256 not recorded yet" in line for line in lines)
    assert sum("missing" in line for line in lines) == 6
    assert any("wget -O" in line and "cityscapes_vit_base_1.ckpt" in line for line in lines)


def test_released_import_prints_the_provenance_and_writes_the_parts(tmp_path, complete, capsys):
    from repro.cli.main import main

    assert main(["released", "import", str(complete["depthg"]), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    sha = hashlib.sha256(complete["depthg"].read_bytes()).hexdigest()
    assert ("Lightning 2.0.1.post0 (callbacks keyed by string, the layout of Lightning >= 1.5), global_step 7000, "
            "epoch 0") in out and sha in out and "decayed" in out
    record = json.loads((tmp_path / "out" / "checkpoint.json").read_text())
    assert record["sha256"] == sha and record["hyper_parameters"]["cfg"]["depth_feat_weight"] == 0.19
    backbone = DinoBackbone("vit_small_patch8", tmp_path / "out" / "backbone.pth")  # the DINO file format
    assert backbone.feature_dim == 384
    parts = torch.load(tmp_path / "out" / "parts.pt", weights_only=True)
    raw = _raw(complete["depthg"])["state_dict"]
    assert torch.equal(parts["head"]["mlp.2.weight"], raw["net.cluster2.2.weight"])
    assert parts["meta"]["sha256"] == sha and parts["meta"]["step"] == 7000


def _nyuv2_checkpoint(path, golden, dino_state):
    """The golden STEGO checkpoint cut to NYUv2's 13 classes (cfg dataset_name nyuv2), written in the released format."""
    raw = _refill(_raw(_fixture_ckpt(golden, "stego")), dino_state, golden, "stego")
    for key in ("cluster_probe.clusters", "train_cluster_probe.clusters", "linear_probe.weight", "linear_probe.bias"):
        raw["state_dict"][key] = raw["state_dict"][key][:13].clone()
    raw["hyper_parameters"]["n_classes"] = 13
    raw["hyper_parameters"]["cfg"].state["_content"]["dataset_name"].state["_val"] = "nyuv2"
    torch.save(raw, path, pickle_module=_PICKLE_MODULE)
    return path


def test_eval_released_writes_released_checkpoint_metrics_and_skips_a_rerun(tmp_path, golden, dino_state, complete,
                                                                            shared_data, capsys):
    from repro.cli.main import main
    from repro.cluster.jobs import ReleasedJob

    ckpt = _nyuv2_checkpoint(tmp_path / "nyuv2_vits8.ckpt", golden, dino_state)
    work = tmp_path / "work"
    sets = [f"data.root={shared_data / 'nyuv2-mini'}", "data.score_void=false", "eval.crf=false"]
    args = ["eval-released", "demo/nyuv2-mini", "--checkpoint", str(ckpt), "--work-dir", str(work)]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    assert "unsup Acc" in capsys.readouterr().out
    path = work / "demo" / "nyuv2-mini" / "released-checkpoint" / "metrics.json"
    metrics = json.loads(path.read_text())
    assert metrics["label"] == "released-checkpoint" and metrics["seed"] is None
    assert metrics["checkpoint"]["file"] == ckpt.name
    assert metrics["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert metrics["checkpoint"]["global_step"] == 7000 and metrics["released-checkpoint"]["step"] == 7000
    assert metrics["protocol"]["flip"] is True and metrics["protocol"]["fidelity"] == "released"
    assert set(metrics["summary"]) == {"unsup_acc", "unsup_miou", "linear_acc", "linear_miou"}
    assert metrics["summary"] == metrics["released-checkpoint"]["summary"]
    crops = sorted((work / "data" / "nyuv2").glob("crops-*/*.label.npy"))
    labelled = sum(int((np.load(p) >= 0).sum()) for p in crops)
    assert metrics["num_images"] == len(crops) == 10
    assert np.asarray(metrics["released-checkpoint"]["cluster"]["confusion"]).sum() == labelled
    stamp = path.stat().st_mtime_ns
    job = ReleasedJob("demo/nyuv2-mini", str(ckpt), str(work), tuple(sets))
    assert job() == str(path) and path.stat().st_mtime_ns == stamp  # same file, same protocol: skipped
    with pytest.raises(ValueError, match="has 27 classes but nyuv2"):
        main(["eval-released", "demo/nyuv2-mini", "--checkpoint", str(complete["stego"]), "--work-dir", str(work),
              "--set", f"data.root={shared_data / 'nyuv2-mini'}", "--set", "data.score_void=false"])


def test_launch_released_plans_one_task_per_present_file(tmp_path, complete):
    from repro.cluster.jobs import ReleasedJob
    from repro.cluster.launch import LaunchError
    from repro.cluster.launch import launch_released

    folder = tmp_path / "released"
    folder.mkdir()
    with pytest.raises(LaunchError, match="no published checkpoint found"):
        launch_released(folder=folder, executor="local", work_dir=tmp_path / "work", dry_run=True)
    for name in ("potsdam_test.ckpt", "cocostuff_vits.ckpt"):
        (folder / name).write_bytes(complete["stego"].read_bytes())
    launched = launch_released(folder=folder, executor="local", work_dir=tmp_path / "work", dry_run=True)
    assert sorted(j.entry for j in launched) == ["table1/depthg-vits8", "table3/stego-vits8"]
    record = json.loads(launched[0].record.read_text())
    assert sorted(j["file"] for j in record["jobs"]) == sorted(str(folder / n) for n in ("cocostuff_vits.ckpt",
                                                                                           "potsdam_test.ckpt"))
    cmd = ReleasedJob("table3/stego-vits8", str(folder / "potsdam_test.ckpt"), str(tmp_path / "work"),
                      sif="repro.sif").command()
    assert cmd[cmd.index("--bind") + 1] == str(folder) and cmd[cmd.index("repro.sif") + 1:][:2] == ["repro", "eval-released"]
