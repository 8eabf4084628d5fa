"""Published checkpoints: malformed or non-finite content, Lightning's own pickled names, the saved cfg vs the entry.

Every file here is a golden released-checkpoint fixture (``../shared/golden/released-checkpoints/``) read
through the weights-only reader and written back with one change, in the released pickle globals.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from test_released_checkpoints import _PICKLE_MODULE, _fixture_ckpt, _OmegaConfNamesPickler, _raw, _refill
from torch.torch_version import TorchVersion

from repro.cli.main import main
from repro.models.lightning import CheckpointFormatError, UnsafeCheckpointError, read_lightning_checkpoint
from repro.models.safe_load import LIGHTNING_GLOBALS, _stand_in, to_plain




_LEGACY_MODULE = types.SimpleNamespace(  # the legacy writer also calls pickle_module.dump (magic number, sys info)
    __name__=_PICKLE_MODULE.__name__, Pickler=_OmegaConfNamesPickler,
    dump=lambda obj, fh, protocol=2: _OmegaConfNamesPickler(fh, protocol).dump(obj))


def _save(raw, path, **kwargs):
    legacy = kwargs.get("_use_new_zipfile_serialization") is False
    torch.save(raw, path, pickle_module=_LEGACY_MODULE if legacy else _PICKLE_MODULE, **kwargs)
    return path


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("repro: error: "), err
    return err[0]


# ------------------------------------------------------------------------------------------ non-finite tensors
@pytest.mark.parametrize("key,value,count", [("net.cluster2.2.weight", float("nan"), 3),
                                             ("cluster_probe.clusters", float("nan"), 1),
                                             ("net.model.blocks.0.attn.qkv.weight", float("inf"), 2)])
def test_non_finite_tensors_are_refused_naming_the_tensor_and_the_count(tmp_path, golden, dino_state, capsys, key,
                                                                        value, count):
    """Attack: NaN in the head or the centroids, or Inf in a backbone weight, was imported with rc 0."""
    raw = _refill(_raw(_fixture_ckpt(golden, "stego")), dino_state, golden, "stego")
    tensor = raw["state_dict"][key].clone()
    tensor.view(-1)[:count] = value
    raw["state_dict"][key] = tensor
    path = _save(raw, tmp_path / "nonfinite.ckpt")
    assert main(["released", "import", str(path)]) == 2
    line = _error_line(capsys)
    assert f"non-finite (NaN or infinite) values in 1 tensor(s): {key} ({count} of {tensor.numel()} values)" in line
    work = tmp_path / "work"
    assert main(["eval-released", "demo/nyuv2-mini", "--checkpoint", str(path), "--work-dir", str(work)]) == 2
    assert f"{key} ({count} of" in _error_line(capsys) and not work.exists()  # refused before anything is prepared


# ------------------------------------------------------------------------------------------ malformed structures
def test_a_list_state_dict_is_a_clear_error(tmp_path, golden, capsys):
    """Attack: state_dict stored as a list gave AttributeError: 'list' object has no attribute 'items'."""
    raw = _raw(_fixture_ckpt(golden, "stego"))
    raw["state_dict"] = list(raw["state_dict"].values())
    assert main(["released", "import", str(_save(raw, tmp_path / "list.ckpt"))]) == 2
    assert "state_dict is a list, not a mapping of parameter names to tensors" in _error_line(capsys)


@pytest.mark.parametrize("n_classes", ["27abc", "27", 0, -3, 27.5, True, None])
def test_n_classes_must_be_a_positive_integer(tmp_path, golden, capsys, n_classes):
    """Attack: n_classes="27abc" gave ValueError: invalid literal for int()."""
    raw = _raw(_fixture_ckpt(golden, "stego"))
    raw["hyper_parameters"]["n_classes"] = n_classes
    assert main(["released", "import", str(_save(raw, tmp_path / "n.ckpt"))]) == 2
    assert f"hyper_parameters.n_classes is {n_classes!r}, not a positive integer" in _error_line(capsys)


def test_cyclic_and_deep_hyper_parameters_are_refused_without_recursion(tmp_path, golden, capsys, monkeypatch):
    """Attack: a self-referencing or 3,000-deep hyper_parameters structure gave RecursionError."""
    raw = _raw(_fixture_ckpt(golden, "stego"))
    loop: dict = {"a": 1}
    loop["self"] = loop
    raw["hyper_parameters"]["extra"] = loop
    assert main(["released", "import", str(_save(raw, tmp_path / "cyclic.ckpt"))]) == 2
    assert "hyper_parameters refers to itself (a cyclic dict)" in _error_line(capsys)
    deep: list = []
    for _ in range(3000):
        deep = [deep]
    raw["hyper_parameters"]["extra"] = deep
    monkeypatch.setattr(sys, "getrecursionlimit", sys.getrecursionlimit)  # restored after the test
    sys.setrecursionlimit(20000)  # only for writing the fixture (the pickler recurses)
    try:
        path = _save(raw, tmp_path / "deep.ckpt")
    finally:
        sys.setrecursionlimit(1000)
    assert main(["released", "import", str(path)]) == 2
    assert "hyper_parameters nests deeper than 100 levels" in _error_line(capsys)


def test_to_plain_is_iterative_keeps_order_and_shared_subtrees():
    shared = {"x": [1, 2]}
    value = {"b": shared, "a": [shared, (3, {"c": torch.tensor([1.5])})]}
    assert to_plain(value) == {"b": {"x": [1, 2]}, "a": [{"x": [1, 2]}, [3, {"c": [1.5]}]]}
    assert list(to_plain(value)) == ["b", "a"]
    blowup: list = [0]
    for _ in range(40):  # 2**40 paths through 40 shared lists
        blowup = [blowup, blowup]
    with pytest.raises(CheckpointFormatError, match="more than 1000000 values"):
        to_plain(blowup)


# ------------------------------------------------------------------------------------------ refused globals named
class _Plain:
    def __init__(self):
        self.value = 1


@pytest.mark.parametrize("legacy", [True, False])
def test_a_refused_global_is_named_in_both_file_formats_and_nothing_runs(tmp_path, golden, legacy):
    """Attack: a non-zip (legacy) pickle was refused with only a link to torch's docs, not the refused global."""
    raw = _raw(_fixture_ckpt(golden, "stego"))
    raw["callbacks"] = {"x": _Plain()}
    path = _save(raw, tmp_path / "bad.ckpt", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError, match=r"outside the allowlist: \S*_Plain\. Nothing was loaded"):
        read_lightning_checkpoint(path)


def test_a_legacy_file_with_only_allowed_globals_reads_like_the_zip_file(tmp_path, golden):
    raw = _raw(_fixture_ckpt(golden, "stego"))
    zipped = read_lightning_checkpoint(_save(raw, tmp_path / "zip.ckpt"))
    legacy = read_lightning_checkpoint(_save(raw, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False))
    assert legacy.hyper_parameters == zipped.hyper_parameters and list(legacy.state_dict) == list(zipped.state_dict)
    assert all(torch.equal(legacy.state_dict[k], v) for k, v in zipped.state_dict.items())


def test_stack_global_names_are_resolved_statically(tmp_path):
    from repro.models.safe_load import safe_torch_load

    path = tmp_path / "proto4.pt"
    torch.save({"x": _Plain()}, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    assert b"\x93" in path.read_bytes()  # STACK_GLOBAL, its names pushed as strings (memoized) before it
    with pytest.raises(UnsafeCheckpointError, match=r"outside the allowlist: \S*_Plain\b"):
        safe_torch_load(path)


# ------------------------------------------------------------------------------------------ Lightning layouts
def _pre_15(raw, spelling="pytorch_lightning"):
    """The checkpoint in the layout of Lightning 1.4: callback states keyed by the callback class."""
    names = [n for n in LIGHTNING_GLOBALS if n.startswith(spelling + ".")]
    state = next(iter(raw["callbacks"].values()))
    raw["callbacks"] = {_stand_in(names[0]): state, _stand_in(names[1]): {"wait_count": 0, "patience": 3},
                        _stand_in(names[2]): {}}
    raw["pytorch-lightning_version"] = "1.4.9"
    raw["torch_version"] = TorchVersion("1.7.1")
    return raw


@pytest.mark.parametrize("spelling", ["pytorch_lightning", "lightning.pytorch"])
def test_pre_15_class_keyed_callbacks_are_read_without_a_flag(tmp_path, golden, dino_state, capsys, spelling):
    """Attack: a checkpoint in the Lightning < 1.5 layout was refused unless --allow-global was given."""
    raw = _pre_15(_refill(_raw(_fixture_ckpt(golden, "stego")), dino_state, golden, "stego"), spelling)
    path = _save(raw, tmp_path / "lightning14.ckpt")
    pickled = path.read_bytes()
    assert f"{spelling}.callbacks.model_checkpoint".encode() in pickled and b"TorchVersion" in pickled
    assert main(["released", "import", str(path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "Lightning 1.4.9 (callbacks keyed by class, the layout of Lightning < 1.5)" in out
    record = json.loads((tmp_path / "out" / "checkpoint.json").read_text())
    assert record["lightning_version"] == "1.4.9" and record["lightning_layout"].startswith("callbacks keyed by class")


def test_other_globals_in_the_lightning_layout_are_still_refused(tmp_path, golden):
    raw = _pre_15(_raw(_fixture_ckpt(golden, "stego")))
    raw["callbacks"][_stand_in("pytorch_lightning.callbacks.Checkpointer")] = {}
    refused = r"outside the allowlist: pytorch_lightning\.callbacks\.Checkpointer\."
    with pytest.raises(UnsafeCheckpointError, match=refused):
        read_lightning_checkpoint(_save(raw, tmp_path / "other.ckpt"))
    ok = read_lightning_checkpoint(_save(_pre_15(_raw(_fixture_ckpt(golden, "stego"))), tmp_path / "ok.ckpt"))
    assert ok.callback_keys == "class" and ok.lightning_version == "1.4.9"
    assert to_plain(TorchVersion("1.7.1")) == "1.7.1"


# ------------------------------------------------------------------------------------------ saved cfg vs the entry
def test_import_compares_the_saved_cfg_with_the_entry_and_records_it(tmp_path, golden, dino_state, capsys):
    """Missing: the checkpoint's saved cfg was never compared with the registered entry's config."""
    raw = _refill(_raw(_fixture_ckpt(golden, "depthg")), dino_state, golden, "depthg")
    content = raw["hyper_parameters"]["cfg"].state["_content"]
    content["depth_feat_weight"].state["_val"] = 0.0152  # what a finished run saves: decayed in place
    content["lr"].state["_val"] = 0.001
    path = _save(raw, tmp_path / "depthg.ckpt")
    assert main(["released", "import", str(path), "--entry", "table1/depthg-vits8", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "saved cfg vs table1/depthg-vits8 (released): 2 difference(s)" in out
    assert ("loss.lambda_depthg: saved 0.0152 (cfg depth_feat_weight, saved after DepthG's in-place decay), "
            "entry 0.19") in out
    assert "train.lr: saved 0.001 (cfg lr), entry 0.0005" in out
    record = json.loads((tmp_path / "o" / "checkpoint.json").read_text())["cfg_vs_entry"]
    assert record["entry"] == "table1/depthg-vits8" and record["fidelity"] == "released"
    assert record["differences"] == [
        {"key": "train.lr", "cfg_keys": ["lr"], "saved": 0.001, "entry": 0.0005, "after_decay": False},
        {"key": "loss.lambda_depthg", "cfg_keys": ["depth_feat_weight"], "saved": 0.0152, "entry": 0.19,
         "after_decay": True}]


def test_a_registered_file_is_compared_with_its_registered_entry(tmp_path, golden, dino_state, capsys):
    raw = _refill(_raw(_fixture_ckpt(golden, "depthg")), dino_state, golden, "depthg")
    path = _save(raw, tmp_path / "cocostuff_vits.ckpt")  # the registered file name of table1/depthg-vits8
    assert main(["released", "import", str(path)]) == 0
    out = capsys.readouterr().out
    assert "saved cfg vs table1/depthg-vits8 (released): no difference in the compared keys" in out
    stego = _save(_refill(_raw(_fixture_ckpt(golden, "stego")), dino_state, golden, "stego"), tmp_path / "s.ckpt")
    assert main(["released", "import", str(stego)]) == 0
    assert "saved cfg not compared: not a registered file; pass --entry ENTRY" in capsys.readouterr().out
