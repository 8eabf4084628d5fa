"""The data side of the two fidelities (SPEC 7: R3, R4, R5, R11, R13) on the real NYUv2 and Potsdam samples.

Every released variant is checked against the torchvision / PIL calls the released code made
(DepthG ``src/crop_datasets.py``, ``src/data.py``, ``src/utils.py get_transform``, ``generate_depth.py``,
``src/precompute_knns.py``), or against the golden outputs of that code (``../shared/golden``).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms.functional import five_crop, to_tensor

from repro.data import get_dataset
from repro.data.crops import iter_crops, make_crops
from repro.data.datasets.registry import class_names_for, num_classes_for
from repro.data.image_depth import crop_image_depth, encode_map, image_depth_stage, load_image_depth
from repro.data.knn import load_knn, search_knn
from repro.data.pipeline import depth_stage, knn_stage, prepare_stage, shards_stage
from repro.data.shards import ShardRandomAccess, iter_shards
from repro.depth import get_estimator
from repro.depth.encoding import quantize_estimate, unit_to_uint8
from repro.depth.hf import save_random_model
from sample_helpers import FirstN


def released_transform(res: int, is_label: bool):
    """``src/utils.py get_transform(res, is_label, "center")`` without the final tensor conversion."""
    return T.Compose([T.Resize(res, Image.NEAREST), T.CenterCrop(res)])


def released_store(arr: torch.Tensor) -> np.ndarray:
    """``src/crop_datasets.py``: a [0, 1] tensor crop (C, H, W) -> uint8 array as saved."""
    out = arr.float().mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()
    return out.squeeze(-1) if out.shape[-1] == 1 else out


def jpeg_reread(arr: np.ndarray) -> Image.Image:
    """``img_as_pil.save(path, 'JPEG')`` then ``CroppedDataset``'s ``Image.open(path).convert('RGB')``."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@pytest.fixture(scope="module")
def nyu(shared_data):
    return get_dataset("nyuv2", shared_data / "nyuv2-mini", "test", require_depth=True)


@pytest.fixture(scope="module")
def zoe_dir(tmp_path_factory):
    return save_random_model("zoedepth", tmp_path_factory.mktemp("zoedepth-nyu-tiny"))


# ---------------------------------------------------------------- R3: resizing and JPEG five-crops


def test_released_train_crops_are_the_released_calls_bit_for_bit(nyu, shared_data):
    """NEAREST + int() width + JPEG five-crops: every crop of the 10 frames equals the released chain."""
    img_tf, lab_tf = released_transform(224, False), released_transform(224, True)
    for i in range(len(nyu)):
        sample = nyu[i]
        ours = make_crops(sample, five_crop=True, size=224, resize="nearest", codec="jpeg")
        rgb = to_tensor(Image.open(shared_data / "nyuv2-mini" / sample.meta["image"]).convert("RGB"))
        raw = torch.as_tensor(np.array(Image.open(shared_data / "nyuv2-mini" / sample.meta["label"])),
                              dtype=torch.int64).unsqueeze(0)  # ToTargetTensor: 0 = void .. 13
        for crop, img_c, lab_c in zip(ours, five_crop(rgb, [240, 320]), five_crop(raw, [240, 320])):
            expected = np.asarray(img_tf(jpeg_reread(released_store(img_c))))
            assert np.array_equal(crop.image, expected), crop.key
            stored = (lab_c + 1).permute(1, 2, 0).to(torch.uint8).numpy().squeeze(-1)  # label + 1 as PNG
            label = np.asarray(lab_tf(Image.fromarray(stored))).astype(np.int64) - 1  # CroppedDataset: -1
            assert np.array_equal(crop.label + 1, label), crop.key  # void (-1 here) is the released 0
            assert crop.meta["crop_box"][2:] == [240, 320] and crop.meta["image_key"] == sample.key


def test_paper_crops_are_torchvision_bilinear_without_jpeg(nyu):
    sample = nyu[0]
    ours = make_crops(sample, five_crop=True, size=224, resize="bilinear", codec="png")
    released = make_crops(sample, five_crop=True, size=224, resize="nearest", codec="jpeg")
    for crop, box in zip(ours, [c.meta["crop_box"] for c in ours]):
        top, left, h, w = box
        pil = Image.fromarray(np.ascontiguousarray(sample.image[top : top + h, left : left + w]))
        expected = np.asarray(T.Compose([T.Resize(224), T.CenterCrop(224)])(pil))  # bilinear, int() width
        assert np.array_equal(crop.image, expected)
    assert all(not np.array_equal(a.image, b.image) for a, b in zip(ours, released))
    assert all(np.array_equal(a.label, b.label) for a, b in zip(ours, released))  # labels: nearest in both


def test_released_val_crops_equal_the_golden_released_inputs(nyu, shared_golden):
    """320 px NEAREST val crops of frames 0001/0002 = the released eval inputs (img_uint8, label)."""
    golden = np.load(shared_golden / "released-checkpoints" / "depthg_vits8_eval_nyuv2.npz")
    assert golden["frames"].tolist() == [1, 2]
    for i in range(2):
        crop = make_crops(nyu[i], five_crop=False, size=320, resize="nearest", codec="jpeg")[0]  # never JPEG
        assert np.array_equal(crop.image, golden["img_uint8"][i])
        assert np.array_equal(crop.label + 1, golden["label"][i])  # R13: void scored as 0
        assert crop.meta["crop_box"] == [0, 0, 480, 640] and "codec" not in crop.meta


# ---------------------------------------------------------------- R13: void scored as class 0 of 14


def test_score_void_shifts_labels_at_prepare(nyu, tmp_path, shared_golden):
    two = FirstN(nyu, 2)
    crops = prepare_stage(two, tmp_path / "val", five_crop=False, size=320, resize="nearest", score_void=True,
                          progress=False)
    index = json.loads((crops / "index.json").read_text())
    assert index["num_classes"] == 14 and index["class_names"][0] == "void"
    assert index["class_names"][1:] == list(nyu.class_names)
    golden = np.load(shared_golden / "released-checkpoints" / "depthg_vits8_eval_nyuv2.npz")
    for i, crop in enumerate(iter_crops(crops)):
        assert np.array_equal(crop.label, golden["label"][i]) and crop.label.min() >= 0
    from repro.config.schema import ExperimentConfig

    config = ExperimentConfig()
    config.data.dataset = "nyuv2"
    assert num_classes_for(config) == 13 and class_names_for(config) == tuple(nyu.class_names)
    config.data.score_void = True
    assert num_classes_for(config) == 14 and class_names_for(config.data)[0] == "void"


# ---------------------------------------------------------------- R4: NYUv2 sensor depth per full frame


@pytest.fixture(scope="module")
def sensor_chain(nyu, tmp_path_factory):
    work = tmp_path_factory.mktemp("released-sensor")
    crops = prepare_stage(nyu, work / "crops", five_crop=True, size=224, resize="nearest", codec="jpeg",
                          score_void=True, progress=False)
    per_image = image_depth_stage(nyu, work / "depth-image", source="sensor", store="uint8", progress=False)
    depth = depth_stage(crops, work / "depth", source="sensor", scope="image", encoding="uint8",
                        image_depth=per_image, resize="nearest", progress=False)
    shards = shards_stage(crops, depth, work / "shards", shard_size=16, depth_source="sensor")
    return work, crops, per_image, depth, shards


def test_released_sensor_depth_equals_the_golden_depth_uint8(sensor_chain, shared_golden):
    """item4 ``depth_uint8`` = frames 0001 and 0009, crops tl and tr (found by exhaustive search)."""
    _, _, _, depth, shards = sensor_chain
    golden = np.load(shared_golden / "released" / "item4_depth_fps.npz")["depth_uint8"][:, 0]
    access = ShardRandomAccess(shards)
    for g, key in zip(golden, ["nyuv2_test_0001_tl", "nyuv2_test_0001_tr", "nyuv2_test_0009_tl", "nyuv2_test_0009_tr"]):
        assert np.array_equal(unit_to_uint8(np.load(depth / f"{key}.npy")), g), key
        travelled = access.get(key)["depth"]  # what the trainer reads: float32 k / 255, lossless
        assert travelled.dtype == np.float32 and np.array_equal(travelled, np.load(depth / f"{key}.npy"))
        assert np.array_equal(np.round(travelled * 255).astype(np.uint8), g)


def test_released_sensor_depth_against_the_released_calls_on_every_frame(sensor_chain, nyu, shared_data):
    """The released chain (mm PNG / 1e4, min-max per frame, x255 + 0.5, five-crop, NEAREST) on all 10 frames.

    The released code divided 1e-4 m integers by 1e4; repro's metres come from mm / 1000. The two
    round exact ties (x * 255 = k + 0.5) differently: 2 of 10 frames differ there, by one level.
    """
    _, _, per_image, depth, _ = sensor_chain
    tf = released_transform(224, True)
    differing = {}
    for i in range(len(nyu)):
        sample = nyu[i]
        mm = np.array(Image.open(shared_data / "nyuv2-mini" / sample.meta["depth"]))
        d = to_tensor(Image.open(shared_data / "nyuv2-mini" / sample.meta["depth"])).float() / 1e4
        d = (d - d.min()) / (d.max() - d.min())
        frame = released_store(d)
        ours = load_image_depth(per_image, sample.key)
        diff = ours.astype(int) - frame
        exact = (mm - mm.min()) / (mm.max() - mm.min()) * 255  # float64
        tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-4
        assert np.abs(diff).max(initial=0) <= 1 and tie[diff != 0].all()
        if diff.any():
            differing[sample.key] = int((diff != 0).sum())
        for key, crop in zip(["tl", "tr", "bl", "br", "c"], five_crop(d, [240, 320])):
            released = np.asarray(tf(Image.fromarray(released_store(crop))))
            stored = unit_to_uint8(np.load(depth / f"{sample.key}_{key}.npy"))
            if sample.key not in differing:
                assert np.array_equal(stored, released), f"{sample.key}_{key}"
    assert sorted(differing) == ["nyuv2_test_0018", "nyuv2_test_0028"]


def test_image_scope_depth_is_cut_not_renormalised(sensor_chain):
    _, crops, per_image, depth, _ = sensor_chain
    index = json.loads((depth / "index.json").read_text())
    assert index["encoding"] == "uint8" and index["params"]["scope"] == "image"
    lows, highs = [], []
    for crop in iter_crops(crops):
        k = unit_to_uint8(np.load(depth / f"{crop.key}.npy"))
        lows.append(k.min())
        highs.append(k.max())
        full = json.loads((per_image / "index.json").read_text())["ranges"][crop.meta["image_key"]]
        assert index["ranges"][crop.key] == full  # the image's range, not the crop's
    assert max(lows) > 0 and min(highs) < 255  # per-crop min-max would give 0 and 255 everywhere


# ---------------------------------------------------------------- R4: ZoeD_N on the full image


def test_image_scope_zoedepth_equals_generate_depth_then_the_released_crops(nyu, zoe_dir, tmp_path):
    two = FirstN(nyu, 2)
    crops = prepare_stage(two, tmp_path / "crops", five_crop=True, size=224, resize="nearest", codec="jpeg",
                          progress=False)
    per_image = image_depth_stage(two, tmp_path / "image", source="zoedepth", weights=zoe_dir, tta=True,
                                  store="uint8", progress=False)
    depth = depth_stage(crops, tmp_path / "depth", source="zoedepth", weights=zoe_dir, scope="image",
                        encoding="uint8", image_depth=per_image, resize="nearest", progress=False)
    zoe = get_estimator("zoedepth", zoe_dir, device="cpu", tta=True)  # ZoeDepth infer: flip + reflect pad
    tf = released_transform(224, True)
    raws = zoe.predict([two[0].image, two[1].image]).numpy()  # one batch, as the stage ran them
    for i in range(2):
        sample, raw = two[i], raws[i]
        x = (raw - raw.min()) / (raw.max() - raw.min())  # generate_depth.py, NumPy float32
        png = (x * 255).astype(np.uint8)
        assert np.array_equal(load_image_depth(per_image, sample.key), png)
        t = to_tensor(Image.fromarray(png))  # crop_datasets.py reads the PNG as k / 255
        for name, crop in zip(["tl", "tr", "bl", "br", "c"], five_crop(t, [240, 320])):
            released = np.asarray(tf(Image.fromarray(released_store(crop))))
            assert np.array_equal(unit_to_uint8(np.load(depth / f"{sample.key}_{name}.npy")), released)


def test_depth_folders_of_one_profile_are_never_reused_by_the_other(nyu, zoe_dir, tmp_path):
    one = FirstN(nyu, 1)
    crops = prepare_stage(one, tmp_path / "crops", five_crop=True, size=224, resize="nearest", progress=False)
    floats = image_depth_stage(one, tmp_path / "image-float", source="sensor", store="float", progress=False)
    with pytest.raises(FileExistsError, match="sensor/uint8"):
        depth_stage(crops, tmp_path / "d", source="sensor", scope="image", encoding="uint8", image_depth=floats,
                    progress=False)
    with pytest.raises(FileExistsError, match="other parameters"):
        image_depth_stage(one, tmp_path / "image-float", source="sensor", store="uint8", progress=False)
    paper = depth_stage(crops, tmp_path / "d", source="sensor", scope="crop", encoding="float", progress=False)
    with pytest.raises(FileExistsError, match="other parameters"):
        depth_stage(crops, paper, source="sensor", scope="image", encoding="float", image_depth=floats, progress=False)
    image = depth_stage(crops, tmp_path / "d-image", source="sensor", scope="image", encoding="float",
                        image_depth=floats, resize="nearest", progress=False)
    shards_stage(crops, paper, tmp_path / "shards")
    with pytest.raises(FileExistsError, match="other parameters"):
        shards_stage(crops, image, tmp_path / "shards")
    crop_scope = np.load(paper / f"{one[0].key}_tl.npy")
    assert crop_scope.min() == 0 and crop_scope.max() == 1  # eq. 4: per crop
    assert not np.array_equal(crop_scope, np.load(image / f"{one[0].key}_tl.npy"))


# ---------------------------------------------------------------- R5: the Potsdam int cast


def test_potsdam_int_cast_is_totargettensor_of_the_resized_8bit_map(shared_data, zoe_dir, tmp_path):
    potsdam = get_dataset("potsdam3", shared_data / "potsdam-sample", "val")
    crops = prepare_stage(potsdam, tmp_path / "crops", five_crop=False, size=224, resize="nearest", progress=False)
    per_image = image_depth_stage(potsdam, tmp_path / "image", source="zoedepth", weights=zoe_dir, store="uint8",
                                  progress=False)
    depth = depth_stage(crops, tmp_path / "depth", source="zoedepth", scope="image", encoding="int_cast",
                        image_depth=per_image, resize="nearest", progress=False)
    png = load_image_depth(per_image, potsdam.keys()[0])
    # src/data.py Potsdam: to_tensor(PNG), target_transform on the TENSOR, ToTargetTensor (int64), .float()
    target = T.Compose([T.Resize(224, Image.NEAREST), T.CenterCrop(224)])(to_tensor(Image.fromarray(png)))
    released = torch.as_tensor(np.array(target), dtype=torch.int64).squeeze(0).float().numpy()
    ours = np.load(depth / f"{potsdam.keys()[0]}.npy")
    assert np.array_equal(ours, released) and set(np.unique(ours)) <= {0.0, 1.0}
    # 1 exactly where the 8-bit map is 255 after resizing: a hand map with a 255 block keeps it
    hand = np.full((200, 200), 254, np.uint8)
    hand[50:100, 20:60] = 255
    cast = crop_image_depth(hand, {"resized_to": 224}, encoding="int_cast", resize="nearest")
    assert cast.sum() > 0 and set(np.unique(cast)) == {0.0, 1.0}
    assert quantize_estimate(np.array([[1.0, 2.0], [2.0 - 1e-6, 3.0]], np.float32)).tolist() == [[0, 127], [127, 255]]


def test_encode_map_rules_per_source():
    rng = np.random.default_rng(0)
    d = (rng.random((30, 40)) * 9 + 1).astype(np.float32)
    assert encode_map(d, kind="metric", store="uint8").max() == 255  # truncation: only the maximum
    assert (encode_map(d, kind="metric", store="uint8") == 255).sum() == 1
    sensor = encode_map(d, kind="sensor", store="uint8")  # x255 + 0.5: rounds
    assert np.abs(sensor.astype(int) - encode_map(d, kind="metric", store="uint8")).max() == 1
    assert encode_map(np.ones((4, 4), np.float32), kind="normalized", store="uint8").min() == 255  # image plane
    with pytest.raises(ValueError, match="k / 255"):
        unit_to_uint8(np.array([[0.5]], np.float32))


# ---------------------------------------------------------------- R11: dropout in the kNN features


def test_knn_dropout_is_torch_dropout2d_seeded(nyu, tmp_path):
    from repro.data.transforms import images_to_tensor
    from repro.models.backbone import DinoBackbone, init_random_checkpoint

    crops = prepare_stage(FirstN(nyu, 1), tmp_path / "crops", five_crop=True, size=224, progress=False)
    shards = shards_stage(crops, None, tmp_path / "shards")
    ckpt = init_random_checkpoint("vit_small_patch8", tmp_path / "dino.pth")
    images = [s["image"] for s in iter_shards(shards)]
    with torch.no_grad():
        feats = DinoBackbone("vit_small_patch8", ckpt)(images_to_tensor(images))
        plain = torch.nn.functional.normalize(feats.mean(dim=(2, 3)), dim=1).numpy()
        torch.manual_seed(7)
        dropped = torch.nn.Dropout2d(0.1).train()(feats)  # released: DinoFeaturizer's dropout, never .eval()
        dropped = torch.nn.functional.normalize(dropped.mean(dim=(2, 3)), dim=1).numpy()
    torch.manual_seed(123)
    p0 = load_knn(knn_stage(shards, tmp_path / "p0.npz", arch="vit_small_patch8", checkpoint=ckpt, k=5))
    after_p0 = torch.random.get_rng_state()
    torch.manual_seed(123)
    p1 = load_knn(knn_stage(shards, tmp_path / "p1.npz", arch="vit_small_patch8", checkpoint=ckpt, k=5,
                            dropout=0.1, seed=7))
    assert torch.equal(torch.random.get_rng_state(), after_p0)  # the dropout draws leave the caller's state alone
    again = load_knn(knn_stage(shards, tmp_path / "p1-again.npz", arch="vit_small_patch8", checkpoint=ckpt, k=5,
                               dropout=0.1, seed=7))
    for table, ref in ((p0, plain), (p1, dropped)):
        idx, sims = search_knn(ref, k=5)
        assert np.array_equal(table.indices, idx)
        np.testing.assert_allclose(table.similarities, sims, atol=1e-5)
    assert "dropout" not in p0.meta["params"]  # p = 0: the paper's table, params as before
    assert p1.meta["params"]["dropout"] == 0.1 and p1.meta["params"]["dropout_seed"] == 7
    assert np.array_equal(p1.indices, again.indices) and np.array_equal(p1.similarities, again.similarities)
    assert not np.allclose(p1.similarities, p0.similarities, atol=1e-4)


def test_cli_flags_build_the_released_sensor_data(sensor_chain, shared_data, tmp_path):
    from repro.cli.main import main

    _, crops, per_image, depth, _ = sensor_chain
    root = str(shared_data / "nyuv2-mini")
    assert main(["prepare", "nyuv2", "--root", root, "--split", "test", "--out", str(tmp_path / "crops"),
                 "--resize", "nearest", "--codec", "jpeg", "--score-void", "--quiet"]) == 0
    assert main(["depth", "--crops", str(tmp_path / "crops"), "--out", str(tmp_path / "depth"), "--source", "sensor",
                 "--scope", "image", "--encoding", "uint8", "--resize", "nearest", "--image-depth",
                 str(tmp_path / "image"), "--dataset", "nyuv2", "--root", root, "--split", "test", "--quiet"]) == 0
    for key in json.loads((crops / "index.json").read_text())["keys"]:
        assert (tmp_path / "crops" / f"{key}.img.png").read_bytes() == (crops / f"{key}.img.png").read_bytes()
        assert np.array_equal(np.load(tmp_path / "depth" / f"{key}.npy"), np.load(depth / f"{key}.npy"))
    with pytest.raises(SystemExit):
        main(["depth", "--crops", str(tmp_path / "crops"), "--out", str(tmp_path / "d2"), "--source", "sensor",
              "--scope", "image"])
