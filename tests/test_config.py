"""Config schema and loader: defaults, layering, fidelity preset, and errors that name key and file."""

from __future__ import annotations

import pytest
import yaml

from repro.config import ConfigError, ExperimentConfig, load_config, save_config

COCO_VITS = {
    "name": "table1/depthg-vits8",
    "table": "table1",
    "data": {"dataset": "cocostuff27", "root": "data/cocostuff"},
    "loss": {"lambda_depthg": 0.19, "lambda_self": 0.58, "lambda_knn": 0.36, "lambda_random": 0.70,
             "b_depthg": 0.03, "b_self": 0.07, "b_knn": 0.02, "b_random": 0.76},
    "sampling": {"feature_samples": 9, "decrease_every": 3000},
    "guidance": {"decay_step": 250, "decay_factor": 0.6},
    "paper": {"unsup_acc": 56.3, "unsup_miou": 25.6, "linear_acc": 73.7, "linear_miou": 38.9},
}


def write(tmp_path, data, name="entry.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_base_defaults_follow_the_papers():
    cfg = load_config()
    assert isinstance(cfg, ExperimentConfig)
    assert (cfg.train.lr, cfg.train.probe_lr, cfg.train.batch_size, cfg.train.max_steps) == (5e-4, 5e-3, 32, 7000)
    assert (cfg.loss.neg_samples, cfg.model.dropout, cfg.data.crop_size, cfg.data.val_size) == (5, 0.1, 224, 320)
    assert cfg.fidelity == "paper" and cfg.loss.depth_kernel == "product" and cfg.train.step_unit == "batch"


def test_experiment_and_overrides_layer_over_the_base(tmp_path):
    cfg = load_config(write(tmp_path, COCO_VITS), ["train.seed=3", "sampling.feature_samples=10"])
    assert cfg.loss.lambda_depthg == 0.19 and cfg.loss.b_random == 0.76
    assert cfg.guidance.decay_step == 250 and cfg.guidance.decay_factor == 0.6
    assert cfg.train.seed == 3 and cfg.sampling.feature_samples == 10
    assert cfg.sampling.decrease_every == 3000 and cfg.model.code_dim == 70  # untouched base value
    assert cfg.paper["unsup_miou"] == 25.6


def test_released_profile_switches_and_explicit_file_values_win(tmp_path):
    cfg = load_config(write(tmp_path, {**COCO_VITS, "fidelity": "released"}))
    assert (cfg.loss.depth_kernel, cfg.sampling.fps_order, cfg.train.step_unit, cfg.lhp.variant) == (
        "released", "released", "released", "released")
    assert (cfg.data.resize, cfg.data.train_crop_codec, cfg.data.depth_scope, cfg.data.depth_encoding) == (
        "nearest", "jpeg", "image", "uint8")
    assert (cfg.loss.negative_perm, cfg.loss.negative_coords, cfg.data.knn_dropout) == ("super_perm", "knn", 0.1)
    assert (cfg.eval.flip, cfg.eval.crf_image, cfg.train.precision) == (True, "bgr_truncated", "fp32")
    assert cfg.fidelity_deviations == {}
    cfg = load_config(write(tmp_path, {**COCO_VITS, "fidelity": "released", "train": {"step_unit": "batch"}}))
    assert cfg.train.step_unit == "batch" and cfg.loss.depth_kernel == "released"
    assert "released R9" in cfg.fidelity_deviations["train.step_unit"]


def test_paper_profile_keeps_the_papers_reading_and_shared_protocol_facts(tmp_path):
    cfg = load_config(write(tmp_path, COCO_VITS))
    assert (cfg.data.resize, cfg.data.depth_scope, cfg.loss.negative_perm, cfg.loss.depth_kernel) == (
        "bilinear", "crop", "derangement", "product")
    assert (cfg.model.pos_embed, cfg.eval.flip) == ("dino", True)  # R2 and R12 hold in both profiles
    assert (cfg.loss.b_knn, cfg.sampling.feature_samples) == (0.02, 9)


def test_run_script_values_follow_the_entry_and_yield_to_the_command_line(tmp_path):
    released = load_config(write(tmp_path, {**COCO_VITS, "fidelity": "released"}))
    # paper_reproduction.sh, "COCOStuff Vit-S": pos_inter_shift=0.025 neg_inter_shift=0.761, N 11 x0.9 / 1000
    assert (released.loss.b_knn, released.loss.b_random, released.loss.lambda_self) == (0.025, 0.761, 0.58)
    assert (released.sampling.feature_samples, released.sampling.decrease_every,
            released.sampling.released_factor) == (11, 1000, 0.9)
    cli = load_config(write(tmp_path, {**COCO_VITS, "fidelity": "released"}), ["loss.b_knn=0.3"])
    assert cli.loss.b_knn == 0.3 and "R14" in cli.fidelity_deviations["loss.b_knn"]
    other = {**COCO_VITS, "fidelity": "released", "data": {"dataset": "potsdam3", "root": "x"}}
    potsdam = load_config(write(tmp_path, other))
    assert potsdam.loss.b_knn == 0.02 and potsdam.data.depth_encoding == "int_cast"  # R14 is COCO-only; R5
    assert (potsdam.model.code_dim, potsdam.train.batch_size) == (90, 16)


def test_single_items_can_come_from_the_other_profile(tmp_path):
    cfg = load_config(write(tmp_path, {**COCO_VITS, "fidelity": "released"}), ["fidelity_items.R4=paper"])
    assert (cfg.data.depth_scope, cfg.data.depth_encoding, cfg.data.resize) == ("crop", "float", "nearest")
    with pytest.raises(ConfigError, match="command line: unknown fidelity item 'fidelity_items.R99'"):
        load_config(None, ["fidelity_items.R99=paper"])
    path = write(tmp_path, {**COCO_VITS, "fidelity": "exact"}, name="bad.yaml")
    with pytest.raises(ConfigError, match=f"{path}: 'fidelity' must be one of"):
        load_config(path)


@pytest.mark.parametrize("override,message", [
    ("guidance.decay_factor=5", "'guidance.decay_factor' must be > 0 and <= 1"),
    ("train.max_steps=0", "'train.max_steps' must be >= 1"),
    ("train.checkpoint_every=0", "'train.checkpoint_every' must be >= 1"),
    ("model.code_dim=0", "'model.code_dim' must be >= 1"),
    ("train.batch_size=-4", "'train.batch_size' must be >= 2"),
    ("sampling.feature_samples=1", "'sampling.feature_samples' must be >= 2"),
    ("data.crop_size=225", "'data.crop_size' must be a multiple of 8"),
    ("train.max_steps=[1,2", "the value of 'train.max_steps' is not a valid YAML value"),
])
def test_values_are_checked_by_meaning_and_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, COCO_VITS), [override])
    assert message in str(err.value) and str(err.value).startswith("command line")


@pytest.mark.parametrize(
    "patch,message",
    [
        ({"loss": {"lambda_slef": 0.5}}, "unknown key 'loss.lambda_slef'"),
        ({"batchsize": 32}, "unknown key 'batchsize'"),
        ({"train": {"max_steps": "7000"}}, "'train.max_steps' must be int"),
        ({"train": {"max_steps": True}}, "'train.max_steps' must be int"),
        ({"loss": {"b_knn": "0.2"}}, "'loss.b_knn' must be float"),
        ({"data": {"dataset": "ade20k"}}, "'data.dataset' must be one of"),
        ({"sampling": 9}, "'sampling' must be a mapping"),
    ],
)
def test_bad_configs_name_the_key_and_the_file(tmp_path, patch, message):
    path = write(tmp_path, {**COCO_VITS, **patch}, name="broken.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_bad_override_names_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match="command line: unknown key 'train.sed'"):
        load_config(write(tmp_path, COCO_VITS), ["train.sed=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.seed"])


def test_ints_are_accepted_for_floats_and_none_for_optionals(tmp_path):
    cfg = load_config(write(tmp_path, {"loss": {"b_random": 1}, "guidance": {"decay_step": None}}))
    assert cfg.loss.b_random == 1.0 and isinstance(cfg.loss.b_random, float)
    assert cfg.guidance.decay_step is None


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, COCO_VITS), ["train.seed=7"])
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(saved, base=None, resolve_fidelity=False) == cfg
    released = load_config(write(tmp_path, {**COCO_VITS, "fidelity": "released"}), ["loss.b_knn=0.3"])
    saved = save_config(released, tmp_path / "run2" / "config.yaml")
    assert load_config(saved, base=None, resolve_fidelity=False) == released
