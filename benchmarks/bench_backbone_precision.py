"""bf16 vs fp32 frozen backbone (``model.backbone_precision``): agreement on the golden fixtures, on this machine.

1. Features: the seed-0 random DINO ViT-S/8 of ``../shared/golden/released/item1_backbone_vits8.npz`` on its
   224 and 320 px images, ``precision="bf16"`` (autocast to bfloat16, on the CPU here) against ``"fp32"`` and
   against the released code's fp32 features: max |delta| and max |delta| / max |feature|.
2. Evaluation: the released evaluation flow of ``../shared/golden/released-checkpoints`` (STEGO and DepthG
   ViT-S/8 checkpoints with random weights, two real NYUv2 frames: backbone, flip, upsampling, both probes,
   DenseCRF) through :func:`repro.evaluate.protocol.evaluate_segmentation` with each precision; the change
   of accuracy and mIoU (points) and of the predicted pixels.

Usage: ``python benchmarks/bench_backbone_precision.py [--out FILE.json]`` (about a minute on one core).
The numbers are recorded in ``repro/config/fidelity.py`` (item R23).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def feature_agreement(golden: Path) -> dict:
    from repro.data.transforms import images_to_tensor
    from repro.models.backbone import DinoBackbone, init_random_checkpoint

    g = dict(np.load(golden / "released" / "item1_backbone_vits8.npz"))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = init_random_checkpoint("vit_small_patch8", Path(tmp) / "random.pth", seed=0)
        nets = {p: DinoBackbone("vit_small_patch8", path, precision=p) for p in ("fp32", "bf16")}
        for size in (224, 320):
            x = images_to_tensor(g[f"img_uint8_{size}"])
            f32, b16 = nets["fp32"](x), nets["bf16"](x)
            released = torch.from_numpy(g[f"feat_released_{size}"])
            scale = float(f32.abs().max())
            out[str(size)] = {"max_abs_bf16_vs_fp32": float((b16 - f32).abs().max()),
                              "max_rel_bf16_vs_fp32": float((b16 - f32).abs().max()) / scale,
                              "mean_abs_bf16_vs_fp32": float((b16 - f32).abs().mean()),
                              "max_abs_fp32_vs_released": float((f32 - released).abs().max()),
                              "max_abs_bf16_vs_released": float((b16 - released).abs().max()),
                              "max_abs_feature": scale}
    return out


def eval_agreement(golden: Path) -> dict:
    import test_released_checkpoints as trc

    from repro.evaluate.protocol import evaluate_segmentation
    from repro.models.backbone import init_random_checkpoint
    from repro.models.lightning import load_released

    folder = golden / "released-checkpoints"
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        dino = torch.load(init_random_checkpoint("vit_small_patch8", Path(tmp) / "dino.pth", seed=0), weights_only=True)
        for model in trc.MODELS:
            raw = trc._refill(trc._raw(trc._fixture_ckpt(folder, model)), dino, folder, model)
            ckpt = Path(tmp) / f"{model}.ckpt"
            torch.save(raw, ckpt, pickle_module=trc._PICKLE_MODULE)
            m = load_released(ckpt)
            rec = dict(np.load(folder / f"{model}_vits8_eval_nyuv2.npz"))
            samples = [{"key": str(int(f)), "image": img, "label": lab.astype(np.int64)}
                       for f, img, lab in zip(rec["frames"], rec["img_uint8"], rec["label"])]
            results = {}
            for precision in ("fp32", "bf16"):
                backbone = m.backbone()
                backbone.precision = precision
                results[precision] = evaluate_segmentation(
                    samples, backbone, m.parts.head, m.parts.cluster_probe, m.parts.linear_probe, batch_size=2,
                    crf=True, flip=True, crf_image="bgr_truncated", keep_predictions=True)
            a, b = results["fp32"], results["bf16"]
            out[model] = {}
            for name in ("cluster", "linear"):
                ma, mb = getattr(a, name), getattr(b, name)
                pa, pb = np.stack(a.predictions[name]), np.stack(b.predictions[name])
                out[model][name] = {"accuracy_fp32": ma.accuracy, "accuracy_bf16": mb.accuracy,
                                    "miou_fp32": ma.miou, "miou_bf16": mb.miou,
                                    "delta_accuracy_points": mb.accuracy - ma.accuracy,
                                    "delta_miou_points": mb.miou - ma.miou,
                                    "pixels_changed": float((pa != pb).mean())}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", type=Path, default=REPO.parent / "shared" / "golden")
    parser.add_argument("--out", type=Path, help="also write the report as JSON")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    report = {"device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "features": feature_agreement(args.golden), "evaluation": eval_agreement(args.golden)}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        from repro.utils.files import atomic_path

        with atomic_path(args.out, suffix=".json") as tmp:
            Path(tmp).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
