"""Experiment registry: one YAML per row of SPEC section 6, each valid, with the paper's numbers."""

from __future__ import annotations

import argparse

import yaml

import pytest

from repro.config import ConfigError, load_config
from repro.cli.entries import add_list_command
from repro.config.entries import (EXPERIMENTS_DIR, TABLES, UnknownEntryError, entry_path,
                                   list_entries, load_entry)
from repro.method.schedules import feature_samples_schedule, guidance_schedule

COUNTS = {"table1": 7, "table2": 3, "table3": 4, "table4": 6, "table5": 3, "table6": 3, "supp3": 12,
          "supp4": 7, "supp5": 2, "supp6": 2, "demo": 1}

# SPEC section 6, written out independently of the YAML files: (unsup acc, unsup mIoU, linear acc, linear mIoU).
PAPER = {
    "table1/dino-vits8": (28.7, 11.3, 68.6, 33.9), "table1/stego-vits8": (48.3, 24.5, 74.4, 38.3),
    "table1/depthg-vits8": (56.3, 25.6, 73.7, 38.9), "table1/depthg-lhp-vits8": (55.1, 26.7, 73.9, 37.8),
    "table1/dino-vitb8": (30.5, 9.6, 66.8, 29.4), "table1/stego-vitb8": (56.9, 28.2, 76.1, 41.0),
    "table1/depthg-vitb8": (58.6, 29.0, 75.5, 41.6),
    "table2/dino-vitb8": (43.6, 11.8), "table2/stego-vitb8": (73.2, 21.0), "table2/depthg-vitb8": (81.6, 23.1),
    "table3/dino-vits8": (71.3,), "table3/stego-vits8": (77.0,), "table3/depthg-vits8": (80.4,),
    "table3/depthg-lhp-vits8": (80.4,),
    "table4/stego": (48.3, 24.5), "table4/depth-correlation": (51.2, 24.7), "table4/fps": (49.1, 24.6),
    "table4/3d-lhp": (48.5, 25.2), "table4/depthg": (56.3, 25.6), "table4/depthg-3d-lhp": (55.1, 26.7),
    "table5/zoedepth": (56.3, 25.6), "table5/midas": (53.0, 25.0), "table5/kbr": (50.6, 23.1),
    "table6/no-lhp": (56.3, 25.6), "table6/3d-lhp": (55.1, 26.7), "table6/attention-lhp": (52.6, 24.5),
    "supp3/stego-coco": (48.3, 24.5), "supp3/stego-potsdam": (77.0,),
    "supp3/depth-map-coco": (56.3, 25.6), "supp3/depth-map-potsdam": (80.4,),
    "supp3/mde-features-coco": (55.9, 25.4), "supp3/mde-features-potsdam": (69.3,),
    "supp3/image-plane-coco": (53.3, 22.8), "supp3/image-plane-potsdam": (71.1,),
    "supp3/perspective-plane-coco": (52.1, 23.7), "supp3/perspective-plane-potsdam": (67.4,),
    "supp3/semseg-map-coco": (52.8, 23.2), "supp3/semseg-map-potsdam": (80.4,),
    "supp4/n6": (52.6, 22.2), "supp4/n7": (52.6, 23.0), "supp4/n8": (54.2, 23.8), "supp4/n9": (56.3, 25.6),
    "supp4/n10": (53.4, 24.2), "supp4/n11": (54.3, 24.2), "supp4/n12": (54.1, 24.0),
    "supp5/no-scheduling": (49.4, 18.8), "supp5/scheduling": (56.3, 25.6),
}
METRICS = ("unsup_acc", "unsup_miou", "linear_acc", "linear_miou")

# DepthG supplement Table 2 / STEGO weights (SPEC section 5):
# (lambda_depthg, lambda_self, lambda_knn, lambda_random, b_depthg, b_self, b_knn, b_random)
DEPTHG_COCO_S = (0.19, 0.58, 0.36, 0.70, 0.03, 0.07, 0.02, 0.76)
DEPTHG_COCO_B = (0.16, 0.23, 1.05, 0.24, 0.03, 0.12, 0.21, 0.97)
DEPTHG_CITY_B = (0.09, 0.95, 1.02, 0.57, 0.03, 0.39, 0.25, 0.26)
DEPTHG_POTS_S = (0.13, 0.61, 0.34, 0.72, 0.14, 0.2, 0.09, 0.63)
STEGO = {"cocostuff27/vit_small_patch8": (0.67, 0.25, 0.63, 0.08, 0.02, 0.66),
         "cocostuff27/vit_base_patch8": (0.10, 1.00, 0.15, 0.12, 0.20, 1.00),
         "cityscapes27/vit_base_patch8": (1.00, 0.58, 0.91, 0.46, 0.18, 0.31),
         "potsdam3/vit_small_patch8": (0.67, 0.25, 0.63, 0.08, 0.02, 0.76)}

ALL = list_entries()


def weights(cfg):
    l = cfg.loss
    return (l.lambda_depthg, l.lambda_self, l.lambda_knn, l.lambda_random, l.b_depthg, l.b_self, l.b_knn, l.b_random)


def test_every_row_of_spec_section6_has_one_entry_per_table():
    assert set(COUNTS) == set(TABLES)
    for table, count in COUNTS.items():
        names = list_entries(table)
        assert len(names) == count, (table, names)
        assert names == sorted(names) and all(n.startswith(f"{table}/") for n in names)
    assert len(ALL) == sum(COUNTS.values()) == 50 and ALL == sorted(ALL)
    assert set(PAPER) | {"supp6/zoedepth", "supp6/sensor", "demo/nyuv2-mini"} == set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_every_entry_validates_and_names_itself(name):
    path = entry_path(name)
    assert path.parent.parent == EXPERIMENTS_DIR
    cfg = load_config(path)
    assert cfg == load_entry(name)
    assert cfg.name == name and cfg.description and "\n" not in cfg.description
    assert cfg.table and set(cfg.paper) <= set(METRICS)
    if name != "demo/nyuv2-mini":
        assert cfg.data.root.startswith("${REPRO_DATA}/")
    # the run code can evaluate both schedules for this config at the first and the last step
    for step in (0, 6999):
        feature_samples_schedule(step, cfg.sampling.feature_samples, decrease_every=cfg.sampling.decrease_every,
                                 released_factor=cfg.sampling.released_factor, step_unit=cfg.train.step_unit)
        guidance_schedule(step, cfg.loss.lambda_depthg, cfg.loss.b_depthg, cfg.guidance.decay_step,
                          cfg.guidance.decay_factor, step_unit=cfg.train.step_unit)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_numbers_match_spec_section6(name):
    paper = load_entry(name).paper
    # Table 4 prints mIoU before Acc; PAPER always holds (acc, mIoU, ...)
    assert paper == pytest.approx(dict(zip(METRICS, PAPER[name])))


def test_nyuv2_entries_report_unsupervised_miou():
    assert load_entry("supp6/zoedepth").paper == {"unsup_miou": 26.1}
    assert load_entry("supp6/sensor").paper == {"unsup_miou": 26.2}
    assert load_entry("demo/nyuv2-mini").paper == {}


def test_headline_hyperparameters_follow_supplement_table2():
    for name, expected, q in (("table1/depthg-vits8", DEPTHG_COCO_S, 70), ("table1/depthg-vitb8", DEPTHG_COCO_B, 90),
                              ("table2/depthg-vitb8", DEPTHG_CITY_B, 100), ("table3/depthg-vits8", DEPTHG_POTS_S, 70)):
        cfg = load_entry(name)
        assert weights(cfg) == pytest.approx(expected) and cfg.model.code_dim == q, name
        assert cfg.method == "depthg" and cfg.train.max_steps == 7000 and cfg.train.batch_size == 32
    coco_s, coco_b = load_entry("table1/depthg-vits8"), load_entry("table1/depthg-vitb8")
    city, pots = load_entry("table2/depthg-vitb8"), load_entry("table3/depthg-vits8")
    assert (coco_s.sampling.mode, coco_s.sampling.feature_samples, coco_s.sampling.decrease_every) == ("fps", 9, 3000)
    assert (coco_s.guidance.decay_step, coco_s.guidance.decay_factor) == (250, 0.6)
    assert (coco_b.sampling.mode, coco_b.sampling.feature_samples, coco_b.sampling.decrease_every) == ("fps", 12, None)
    assert (coco_b.guidance.decay_step, coco_b.guidance.decay_factor) == (300, 0.64)
    assert city.sampling.mode == "full" and (city.guidance.decay_step, city.guidance.decay_factor) == (400, 0.8)
    assert (pots.sampling.mode, pots.sampling.feature_samples, pots.guidance.decay_step) == ("fps", 11, None)
    assert coco_s.data.five_crop and city.data.five_crop and not pots.data.five_crop
    assert coco_b.model.arch == city.model.arch == "vit_base_patch8" and pots.model.arch == "vit_small_patch8"


def test_all_coco_vits_depthg_rows_share_the_table2_weights_except_switched_off_depth_loss():
    for name in ALL:
        cfg = load_entry(name)
        if cfg.method == "depthg" and cfg.data.dataset == "cocostuff27" and cfg.model.arch == "vit_small_patch8":
            got = weights(cfg)
            if name in ("table4/fps", "table4/3d-lhp"):
                assert got[0] == 0.0 and got[1:4] + got[5:] == DEPTHG_COCO_S[1:4] + DEPTHG_COCO_S[5:]
            else:
                assert got == pytest.approx(DEPTHG_COCO_S), name


def test_stego_and_dino_rows():
    for name in ALL:
        cfg = load_entry(name)
        key = f"{cfg.data.dataset}/{cfg.model.arch}"
        if cfg.method == "stego":
            l = cfg.loss
            assert (l.lambda_self, l.lambda_knn, l.lambda_random, l.b_self, l.b_knn, l.b_random) == STEGO[key], name
            assert l.lambda_depthg == 0.0 and cfg.sampling.mode == "random" and cfg.sampling.feature_samples == 11
            assert cfg.data.depth_source == "none"
            assert cfg.train.batch_size == (16 if cfg.data.dataset == "potsdam3" else 32)
        if name.split("/")[1].startswith("dino"):
            assert cfg.method == "dino" and cfg.data.depth_source == "none"
    assert load_entry("table2/stego-vitb8").model.code_dim == 100


def test_ablation_rows_express_exactly_their_component():
    def flags(name):
        cfg = load_entry(name)
        return cfg.loss.lambda_depthg > 0, cfg.sampling.mode, cfg.lhp.enabled and cfg.lhp.propagation

    assert flags("table4/stego") == (False, "random", False)
    assert flags("table4/depth-correlation") == (True, "random", False)
    assert flags("table4/fps") == (False, "fps", False)
    assert flags("table4/3d-lhp") == (False, "random", "depth")
    assert flags("table4/depthg") == (True, "fps", False)
    assert flags("table4/depthg-3d-lhp") == (True, "fps", "depth")
    assert flags("table6/no-lhp") == (True, "fps", False)
    assert flags("table6/3d-lhp") == (True, "fps", "depth")
    assert flags("table6/attention-lhp") == (True, "fps", "attention")
    assert flags("table1/depthg-lhp-vits8") == flags("table3/depthg-lhp-vits8") == (True, "fps", "depth")


def test_depth_and_guidance_sources():
    sources = {n: load_entry(n).data.depth_source for n in ALL}
    assert [sources[f"table5/{s}"] for s in ("zoedepth", "midas", "kbr")] == ["zoedepth", "midas", "kbr"]
    for row, src in (("depth-map", "zoedepth"), ("mde-features", "mde_features"), ("image-plane", "image_plane"),
                     ("perspective-plane", "perspective_plane"), ("semseg-map", "semseg"), ("stego", "none")):
        assert sources[f"supp3/{row}-coco"] == sources[f"supp3/{row}-potsdam"] == src
        assert load_entry(f"supp3/{row}-coco").data.dataset == "cocostuff27"
        assert load_entry(f"supp3/{row}-potsdam").data.dataset == "potsdam3"
    assert load_entry("table5/kbr").data.depth_files == "${REPRO_DATA}/depth-kbr/cocostuff"
    assert "data.depth_files" in load_entry("table5/kbr").description
    for name in ("supp3/mde-features-coco", "supp3/mde-features-potsdam"):
        assert "penultimate-layer feature maps" in load_entry(name).description
    for name in ("supp3/semseg-map-coco", "supp3/semseg-map-potsdam"):
        assert "class fractions" in load_entry(name).description
    assert sources["supp6/zoedepth"] == "zoedepth" and sources["supp6/sensor"] == "sensor"
    assert load_entry("supp6/sensor").data.val_split == "test"


def test_n_and_scheduling_rows():
    for n in range(6, 13):
        cfg = load_entry(f"supp4/n{n}")
        assert cfg.sampling.feature_samples == n and cfg.sampling.mode == "fps" and cfg.sampling.decrease_every == 3000
    off, on = load_entry("supp5/no-scheduling"), load_entry("supp5/scheduling")
    assert off.guidance.decay_step is None and off.loss.lambda_depthg == 0.19
    assert (on.guidance.decay_step, on.guidance.decay_factor) == (250, 0.6)


def test_every_entry_exists_in_both_fidelities_and_no_file_repeats_a_switch():
    from repro.config.fidelity import controlled_keys

    switches = controlled_keys()
    for name in list_entries():
        raw = yaml.safe_load(entry_path(name).read_text())
        flat = {f"{section}.{key}" for section, block in raw.items() if isinstance(block, dict) for key in block}
        assert not (flat & switches), f"{name} repeats profile switches {sorted(flat & switches)}"
        assert "fidelity" not in raw, name
        paper, released = load_entry(name), load_entry(name, ["fidelity=released"])
        assert (paper.fidelity, released.fidelity) == ("paper", "released")
        assert paper.fidelity_deviations == {} and released.fidelity_deviations == {}
        assert paper.paper == released.paper and paper.name == released.name
        assert (released.data.resize, released.loss.negative_perm, released.eval.crf_image) == (
            "nearest", "super_perm", "bgr_truncated")


def test_released_profile_restates_the_run_script():
    # paper_reproduction.sh of leonsick/depthg, written out independently of repro.config.fidelity
    vitb = load_entry("table1/depthg-vitb8", ["fidelity=released"])
    assert (vitb.loss.lambda_depthg, vitb.loss.b_depthg) == (0.16026274975444096, 0.035909146298813595)
    assert (vitb.loss.lambda_self, vitb.loss.b_self) == (0.23052367315917113, 0.12326312284078644)
    assert (vitb.loss.lambda_knn, vitb.loss.b_knn) == (1.0500945312858674, 0.21028290947990444)
    assert (vitb.loss.lambda_random, vitb.loss.b_random) == (0.2485038032028848, 0.9748103425096648)
    assert (vitb.model.code_dim, vitb.sampling.feature_samples, vitb.guidance.decay_step,
            vitb.guidance.decay_factor) == (90, 12, 300, 0.64)
    city = load_entry("table2/depthg-vitb8", ["fidelity=released"])
    assert (city.sampling.mode, city.sampling.feature_samples, city.loss.spatial_centering) == ("random", 11, False)
    assert load_entry("table2/depthg-vitb8").sampling.mode == "full"
    pots = load_entry("table3/depthg-vits8", ["fidelity=released"])
    assert (pots.model.code_dim, pots.train.batch_size, pots.guidance.decay_step, pots.guidance.decay_factor,
            pots.data.depth_encoding) == (90, 16, 200, 1.0, "int_cast")
    coco = load_entry("table1/depthg-vits8", ["fidelity=released"])
    assert (coco.loss.b_knn, coco.loss.b_random, coco.train.step_unit) == (0.025, 0.761, "released")
    assert (coco.sampling.feature_samples, coco.sampling.released_factor, coco.sampling.decrease_every) == (11, 0.9, 1000)
    assert feature_samples_schedule(1, 11, decrease_every=1000, released_factor=0.9, step_unit="released") == 9
    assert load_entry("table1/depthg-lhp-vits8", ["fidelity=released"]).lhp.weight == 0.2
    stego = load_entry("table1/stego-vits8", ["fidelity=released"])
    assert stego.train.step_unit == "batch" and stego.loss.negative_coords == "knn"  # STEGO's Lightning: 1 step/batch

def test_demo_entry():
    cfg = load_entry("demo/nyuv2-mini")
    assert cfg.data.dataset == "nyuv2" and cfg.data.root == "../shared/data/nyuv2-mini"
    assert (cfg.data.train_split, cfg.data.val_split, cfg.data.depth_source, cfg.data.five_crop) == (
        "test", "test", "sensor", True)
    assert "same" in cfg.description.lower()
    assert cfg.model.arch == "vit_small_patch8" and cfg.model.checkpoint == ""
    assert weights(cfg) == pytest.approx(DEPTHG_POTS_S)
    assert (cfg.sampling.mode, cfg.sampling.feature_samples) == ("fps", 7)
    # a short run (its length is tuned with the trainer), checkpointed a few times
    assert cfg.train.batch_size == 8 and cfg.train.max_steps <= 500
    assert cfg.train.checkpoint_every < cfg.train.max_steps and cfg.train.max_steps % cfg.train.checkpoint_every == 0
    assert cfg.eval.crf and cfg.eval.num_figures == 4


def test_unknown_names_raise_with_close_matches():
    with pytest.raises(KeyError) as err:
        entry_path("table1/depthg-vit8")
    assert isinstance(err.value, UnknownEntryError)
    assert "unknown experiment 'table1/depthg-vit8'" in str(err.value) and "table1/depthg-vits8" in str(err.value)
    with pytest.raises(UnknownEntryError, match="table3/depthg-vits8"):
        load_entry("depthg-vits8")
    with pytest.raises(UnknownEntryError, match="unknown table 'table7'"):
        list_entries("table7")
    with pytest.raises(UnknownEntryError):
        entry_path("../base")


def test_load_entry_accepts_a_path_and_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(entry_path("table3/depthg-vits8").read_text())
    cfg = load_entry(str(path), ["train.seed=4"])
    assert cfg.train.seed == 4 and cfg.paper == {"unsup_acc": 80.4}
    assert load_entry("table3/depthg-vits8", ["sampling.feature_samples=7"]).sampling.feature_samples == 7
    with pytest.raises(ConfigError, match="command line"):
        load_entry("table3/depthg-vits8", ["train.sed=4"])
    with pytest.raises(FileNotFoundError):
        load_entry(str(tmp_path / "missing.yaml"))


def test_list_command_prints_one_line_per_entry(capsys):
    parser = argparse.ArgumentParser(prog="repro")
    add_list_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["list", "table1"])
    assert args.func(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(lines) == 8 and all("/paper" in l and "/released" in l for l in lines[:7])
    row = next(line for line in lines if line.startswith("table1/depthg-vits8 "))
    assert all(s in row for s in ("depthg", "cocostuff27", "vit_small_patch8", "unsup_acc=56.3", "linear_miou=38.9"))
    args = parser.parse_args(["list"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert sum(1 for line in out.splitlines() if "/" in line.split(" ")[0]) == 50
    assert out.index("supp4/n6 ") < out.index("supp4/n10 ")
    with pytest.raises(SystemExit):
        parser.parse_args(["list", "table9"])
