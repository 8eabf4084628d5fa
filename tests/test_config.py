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


def test_released_fidelity_preset_and_explicit_values_win(tmp_path):
    cfg = load_config(write(tmp_path, {**COCO_VITS, "fidelity": "released"}))
    assert (cfg.loss.depth_kernel, cfg.sampling.fps_order, cfg.train.step_unit, cfg.lhp.variant) == (
        "released", "released", "released", "released")
    cfg = load_config(write(tmp_path, {**COCO_VITS, "fidelity": "released", "train": {"step_unit": "batch"}}))
    assert cfg.train.step_unit == "batch" and cfg.loss.depth_kernel == "released"


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
    assert load_config(saved, base=None) == cfg
