"""The data stages pass ``data.depth_tta`` whatever the depth source: sources without a network accept it."""

from __future__ import annotations

import json

import numpy as np

from repro.data import get_dataset
from repro.data.pipeline import depth_stage, prepare_stage
from repro.depth import get_estimator, image_plane, perspective_plane


def test_planes_and_sensor_take_the_tta_switch(shared_data, tmp_path):
    for tta in (True, False):
        assert get_estimator("sensor", tta=tta).kind == "metric"
        for name in ("image_plane", "perspective_plane"):
            est = get_estimator(name, tta=tta)
            out = est.predict(np.zeros((2, 48, 64, 3), np.uint8))
            assert tuple(out.shape) == (2, 48, 64)
    nyu = get_dataset("nyuv2", shared_data / "nyuv2-mini", "test")
    crops = prepare_stage(nyu, tmp_path / "crops", five_crop=False, size=32, progress=False)
    want = {"image_plane": image_plane(32, 32), "perspective_plane": perspective_plane(32, 32)}
    for name, expected in want.items():  # the stage as prepare_data calls it for the supp. Table 3 placebos
        out = depth_stage(crops, tmp_path / name, source=name, tta=True, progress=False)
        keys = json.loads((out / "index.json").read_text())["params"]
        assert keys["source"] == name
        first = sorted(p for p in out.glob("*.npy"))[0]
        np.testing.assert_allclose(np.load(first), np.asarray(expected, np.float32), atol=1e-6)
