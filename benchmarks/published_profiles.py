"""Stage profiles built from PUBLISHED throughput (no measurement on the target GPU): ``benchmarks/profiles/published-*.json``.

``repro plan`` needs a rate for every stage on the target hardware. Until ``benchmarks/gpu_check.sh``
has measured them there, these profiles start from figures other people published, each one named
with its source inside the profile (``sources``), and derive the rest with documented factors
(``factors``); every stage record says ``source`` (a published figure) or ``derived`` (the formula).

Published figures used (nothing else is a GPU figure):

* timm ``results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv`` and ``...-rtx3090.csv``
  (huggingface/pytorch-image-models): inference samples/s with AMP (fp16 autocast), large batch, fused
  attention, for ``vit_small_patch8_224`` (DINO ViT-S/8's architecture), ``vit_base_patch8_224`` (ViT-B/8)
  and ``beit_large_patch16_384`` (the encoder of MiDaS v3.1 BEiT-L-384, which ZoeDepth's ZoeD_N uses).
* The DINO paper (Caron et al., ICCV 2021, Table 2, column "im/s": one V100, fp32): ViT-S/8 180 im/s,
  ViT-B/8 63 im/s.

Derivations (``factors``):

* **fp32 vs AMP** on Ampere/Ada: 0.5 -- NVIDIA's peak FP32 (CUDA cores) is half the peak FP16
  tensor-core rate with FP32 accumulation on the RTX 3090 (35.6 vs 71 TFLOPS) and RTX 4090
  (82.6 vs 165.2 TFLOPS); PyTorch does not use TF32 for matmuls by default.
* **bf16 vs AMP**: 1.0 -- bf16 and fp16 tensor cores have the same rate on Ampere and Ada (timm's AMP
  is fp16). On the V100 (no bf16 tensor cores) bf16 is priced at the fp32 rate.
* **320 px vs 224 px**: the ratio of ViT forward MACs, ``L (12 N D^2 + 2 N^2 D)`` with ``N`` tokens
  (``(S/8)^2 + 1``) and width ``D`` (:func:`vit_macs`); 2.6x (ViT-S/8), 2.4x (ViT-B/8).
* **batch**: factor 1.0 -- the published rates are at batch 768-1024; the runs feed 64 crops of 785
  tokens (training), 32 crops (store, kNN) or 8-32 images of 1601 tokens (evaluation), >= 25k token
  rows per matmul, assumed saturated.
* **everything else on the GPU** (the training step on cached features, validation, the evaluation
  head, upsampling and probes, the depth networks, faiss-gpu's exact kNN search): the rate measured
  on this project's CPU (``benchmarks/profiles/cpu-2core.json``) times the GPU/CPU speed-up of the
  published network closest to it (the same backbone at the same size; BEiT-L-384 for depth, whose
  CPU rate was measured here for this purpose: ``CPU_BEIT``). This assumes the work is
  compute-proportional; small-kernel launch overhead is not modelled, so these stages are optimistic.
* CPU stages (prepare, shards, the loader, store reads, DenseCRF, ...) are copied from the CPU profile
  as core-seconds per item.

Run ``python benchmarks/published_profiles.py`` to rewrite the profiles (``--check``: fail if a
committed one differs). ``tests/test_plan.py`` re-derives every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROFILES = HERE / "profiles"
CPU_PROFILE = "cpu-2core.json"
SCHEMA = "repro-stage-profile/1"
COMPILED = "2026-12-03"
"""Date the published figures were collected into these profiles (not a measurement date)."""

TIMM = "huggingface/pytorch-image-models results/"
SOURCES = {
    "timm-4090-vits8": {"figure": 1790.17, "unit": "img/s", "where": TIMM + "benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv",
                        "row": "vit_small_patch8_224 (line 872): infer_samples_per_sec 1790.17, img 224, batch 1024"},
    "timm-4090-vitb8": {"figure": 659.1, "unit": "img/s", "where": TIMM + "benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv",
                        "row": "vit_base_patch8_224 (line 1176): infer_samples_per_sec 659.1, img 224, batch 768"},
    "timm-4090-beitl384": {"figure": 274.3, "unit": "img/s",
                           "where": TIMM + "benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv",
                           "row": "beit_large_patch16_384 (line 1315): infer_samples_per_sec 274.3, img 384, batch 1024"},
    "timm-3090-vits8": {"figure": 1031.53, "unit": "img/s", "where": TIMM + "benchmark-infer-amp-nchw-pt240-cu124-rtx3090.csv",
                        "row": "vit_small_patch8_224 (line 935): infer_samples_per_sec 1031.53, img 224, batch 1024"},
    "timm-3090-vitb8": {"figure": 364.14, "unit": "img/s", "where": TIMM + "benchmark-infer-amp-nchw-pt240-cu124-rtx3090.csv",
                        "row": "vit_base_patch8_224 (line 1208): infer_samples_per_sec 364.14, img 224, batch 1024"},
    "timm-3090-beitl384": {"figure": 146.92, "unit": "img/s",
                           "where": TIMM + "benchmark-infer-amp-nchw-pt240-cu124-rtx3090.csv",
                           "row": "beit_large_patch16_384 (line 1341): infer_samples_per_sec 146.92, img 384, batch 1024"},
    "dino-v100-vits8": {"figure": 180.0, "unit": "img/s", "where": "Caron et al., Emerging Properties in Self-Supervised "
                        "Vision Transformers (DINO), ICCV 2021, Table 2", "row": "ViT-S/8, column im/s (one V100, fp32)"},
    "dino-v100-vitb8": {"figure": 63.0, "unit": "img/s", "where": "Caron et al., Emerging Properties in Self-Supervised "
                        "Vision Transformers (DINO), ICCV 2021, Table 2", "row": "ViT-B/8, column im/s (one V100, fp32)"},
}
SOURCES["midas-3090-beitl384"] = {
    "figure": 13.0, "unit": "img/s", "where": "isl-org/MiDaS README.md, model table (line 160)",
    "row": "v3.1 BEiT-L-384 (ZoeD_N's depth network): 13 FPS on an RTX 3090 (inference at the training resolution)"}
CHECKS = {  # published statements a profile can be compared against; not used to derive a rate
    "timm-3090-vits8-pt113": {"figure": 478.05, "unit": "img/s",
                              "where": TIMM + "benchmark-infer-amp-nchw-pt113-cu117-rtx3090.csv",
                              "row": "vit_small_patch8_224 (line 745), batch 512: torch 1.13, attention not fused"},
    "timm-3090-vitb8-pt113": {"figure": 199.59, "unit": "img/s",
                              "where": TIMM + "benchmark-infer-amp-nchw-pt113-cu117-rtx3090.csv",
                              "row": "vit_base_patch8_224 (line 841), batch 256: torch 1.13, attention not fused"},
    "stego-v100-train": {"figure": 2.0, "unit": "h", "where": "Hamilton et al., STEGO, ICLR 2022, sec. 3.3",
                         "row": "one STEGO training run takes under 2 h on one V100 (the paper's upper bound)"},
    "depthg-train": {"figure": None, "unit": "h", "where": "Sick et al., DepthG, CVPR 2024 and supplement",
                     "row": "no training time or GPU-hours stated"},
}
CPU_BEIT = {"rate": None, "unit": "img/s", "threads": 1, "batch": 1,
            "command": "timm.create_model('beit_large_patch16_384').eval(); best of 3 forwards of (1, 3, 384, 384) "
                       "under torch.inference_mode, torch.set_num_threads(1), on the CPU of cpu-2core.json"}
"""BEiT-L-384 measured on this project's CPU (the anchor of the depth networks' GPU/CPU speed-up)."""

GPUS = {
    "published-amp-pt240-rtx4090": {"device_name": "NVIDIA GeForce RTX 4090", "label": "RTX 4090",
                                    "vit_small_patch8": "timm-4090-vits8", "vit_base_patch8": "timm-4090-vitb8",
                                    "beit": "timm-4090-beitl384", "published_precision": "amp", "fp32": 0.5,
                                    "fp32_why": "NVIDIA Ada whitepaper, RTX 4090: peak FP32 82.6 TFLOPS vs FP16 tensor "
                                                "with FP32 accumulate 165.2 TFLOPS"},
    "published-amp-pt240-rtx3090": {"device_name": "NVIDIA GeForce RTX 3090", "label": "RTX 3090",
                                    "vit_small_patch8": "timm-3090-vits8", "vit_base_patch8": "timm-3090-vitb8",
                                    "beit": "timm-3090-beitl384", "published_precision": "amp", "fp32": 0.5,
                                    "fp32_why": "NVIDIA GA102 whitepaper, RTX 3090: peak FP32 35.6 TFLOPS vs FP16 tensor "
                                                "with FP32 accumulate 71 TFLOPS"},
    "published-fp32-v100": {"device_name": "NVIDIA Tesla V100", "label": "V100",
                            "vit_small_patch8": "dino-v100-vits8", "vit_base_patch8": "dino-v100-vitb8",
                            "beit": None, "published_precision": "fp32", "fp32": 1.0,
                            "fp32_why": "the DINO figures are fp32"},
}
ARCH_SHAPE = {"vit_small_patch8": (12, 384), "vit_base_patch8": (12, 768)}
"""(blocks, width) of DINO ViT-S/8 and ViT-B/8."""


def vit_macs(arch: str, size: int, patch: int = 8) -> float:
    """Multiply-accumulates of one ViT forward at ``size`` x ``size`` px: ``L (12 N D^2 + 2 N^2 D)``.

    Per block: q, k, v and output projections ``4 N D^2``, the MLP (hidden ``4D``) ``8 N D^2``, the
    attention products ``q k^T`` and ``a v`` ``2 N^2 D``; ``N = (size / patch)^2 + 1`` (class token).
    """
    blocks, d = ARCH_SHAPE[arch]
    n = (size // patch) ** 2 + 1
    return blocks * (12 * n * d * d + 2 * n * n * d)


def _gpu_rates(name: str, spec: dict) -> tuple[dict, dict]:
    """``{(arch, size, precision): (rate, how)}`` of the backbone and the factors used."""
    factors = {"fp32_vs_published": {"value": spec["fp32"], "why": spec["fp32_why"]},
               "bf16_vs_amp": {"value": 1.0 if spec["published_precision"] == "amp" else None,
                               "why": "bf16 and fp16 tensor cores have the same peak rate on Ampere and Ada"
                               if spec["published_precision"] == "amp" else
                               "Volta has no bf16 tensor cores: bf16 is priced at the fp32 rate"},
               "batch": {"value": 1.0, "why": "published at batch 768-1024; the runs' matmuls have >= 25k token rows"}}
    rates = {}
    for arch in ARCH_SHAPE:
        src = SOURCES[spec[arch]]
        ratio = vit_macs(arch, 320) / vit_macs(arch, 224)
        factors[f"320px_{arch}"] = {"value": ratio, "why": "vit_macs(320) / vit_macs(224): L (12 N D^2 + 2 N^2 D), "
                                    "N = (S/8)^2 + 1"}
        if spec["published_precision"] == "amp":
            base = {"bf16": (src["figure"], f"{spec[arch]} x bf16_vs_amp"),
                    "fp32": (src["figure"] * spec["fp32"], f"{spec[arch]} x fp32_vs_published")}
        else:
            base = {"fp32": (src["figure"], spec[arch]), "bf16": (src["figure"], f"{spec[arch]} (bf16 at the fp32 rate)")}
        for prec, (rate, how) in base.items():
            rates[arch, 224, prec] = (rate, how)
            rates[arch, 320, prec] = (rate / ratio, f"{how} / 320px_{arch}")
    return rates, factors


def _beit_fp32(spec: dict, rates: dict) -> tuple[float, str]:
    """BEiT-L-384 fp32 rate on the GPU: published (AMP x fp32 factor), or for the V100 the RTX 3090's scaled by
    the V100/3090 ratio of ViT-B/8 fp32 rates."""
    if spec["beit"] is not None:
        return SOURCES[spec["beit"]]["figure"] * spec["fp32"], f"{spec['beit']} x fp32_vs_published"
    ref = GPUS["published-amp-pt240-rtx3090"]
    v3090 = SOURCES[ref["vit_base_patch8"]]["figure"] * ref["fp32"]
    ratio = rates["vit_base_patch8", 224, "fp32"][0] / v3090
    return (SOURCES[ref["beit"]]["figure"] * ref["fp32"] * ratio,
            "timm-3090-beitl384 x 0.5 x (dino-v100-vitb8 / (timm-3090-vitb8 x 0.5))")


def _anchor(key: str, rec: dict) -> tuple[str, int, str] | str | None:
    """The published network a CPU-measured GPU stage scales with: ``(arch, size, precision)``, ``"beit"`` or None."""
    parts = key.split("/")
    if parts[0] == "train":
        sig = rec.get("signature", {})
        return sig["arch"], 224, "bf16" if sig.get("fidelity") == "paper" else "fp32"  # docs/fidelity.md R16: paper bf16
    if parts[0] in ("val", "eval") and parts[1] in ARCH_SHAPE:
        return parts[1], 320, "fp32"
    if parts[0] == "store" and parts[2] == "write":
        return parts[1], 224, "fp32"
    if parts[0] == "depth" and parts[2] == "full":
        return "beit"
    return None


def build(name: str, cpu: dict, cpu_beit_rate: float) -> dict:
    """The published profile ``name`` (a key of :data:`GPUS`) from the CPU profile ``cpu``."""
    spec = GPUS[name]
    rates, factors = _gpu_rates(name, spec)
    beit_gpu, beit_how = _beit_fp32(spec, rates)
    beit_3090 = _beit_fp32(GPUS["published-amp-pt240-rtx3090"], rates)[0]
    midas_gpu = SOURCES["midas-3090-beitl384"]["figure"] * beit_gpu / beit_3090
    midas_cpu = 2 * cpu["stages"]["depth/midas/full/crop"]["rate"]  # measured with flip TTA: two forwards per map
    factors["depth_speedup"] = {
        "value": midas_gpu / midas_cpu,
        "why": f"MiDaS v3.1 BEiT-L-384 forwards/s on this GPU: midas-3090-beitl384 (13 FPS, RTX 3090) x the timm "
               f"BEiT-L-384 ratio of this GPU to the 3090 ({beit_gpu:.4g} / {beit_3090:.4g}) = {midas_gpu:.4g}, over "
               f"the forwards/s of depth/midas/full/crop on the CPU ({midas_cpu:.4g}). The published FPS is at batch "
               "1; repro batches 8 maps per call, so this is conservative"}
    factors["depth_speedup_encoder_bound"] = {
        "value": beit_gpu / cpu_beit_rate,
        "why": f"NOT USED (an optimistic bound): BEiT-L-384 encoder throughput at batch 1024 on the GPU ({beit_how} = "
               f"{beit_gpu:.4g} img/s) / on the CPU (CPU_BEIT, {cpu_beit_rate:.4g} img/s)"}
    stages: dict[str, dict] = {}
    for (arch, size, prec), (rate, how) in sorted(rates.items()):
        stages[f"backbone/{arch}/{size}/{prec}"] = {"rate": rate, "unit": "img/s", "kind": "gpu", "device": "cuda",
                                                    "cores": 1, "derived": how}
    for key, rec in cpu["stages"].items():
        if key.startswith("backbone/") or "/tiny/" in key or key.startswith("memory/") or key.endswith("end_to_end"):
            continue  # backbone: published above; tiny models, CPU memory, CPU end-to-end: not GPU figures
        if rec.get("kind") == "cpu":
            stages[key] = {**rec, "source": f"measured: {CPU_PROFILE} (this project's CPU, core-seconds per item)"}
            continue
        anchor = _anchor(key, rec)
        if anchor is None:
            raise ValueError(f"{CPU_PROFILE}: GPU stage {key!r} has no published anchor; add it to _anchor")
        if anchor == "beit":
            speed, how = factors["depth_speedup"]["value"], "depth_speedup"
        else:
            cpu_key = f"backbone/{anchor[0]}/{anchor[1]}/fp32"  # the CPU runs fp32 (autocast is CUDA-only)
            speed = rates[anchor][0] / cpu["stages"][cpu_key]["rate"]
            how = f"backbone/{anchor[0]}/{anchor[1]}/{anchor[2]} here / {cpu_key} in {CPU_PROFILE}"
        stages[key] = {**{k: v for k, v in rec.items() if k not in ("seconds", "reps", "items")},
                       "rate": rec["rate"] * speed, "device": "cuda",
                       "derived": f"{CPU_PROFILE} rate {rec['rate']:.6g} {rec['unit']} x {speed:.6g} ({how})"}
    knn = {}
    for c, fit in cpu["knn_fit"].items():
        arch = {"384": "vit_small_patch8", "768": "vit_base_patch8"}[c]
        speed = rates[arch, 224, "fp32"][0] / cpu["stages"][f"backbone/{arch}/224/fp32"]["rate"]
        knn[c] = {"a": fit["a"] / speed, "b": fit["b"], "kind": "gpu", "device": "cuda", "cores": 1,
                  "derived": f"{CPU_PROFILE} knn_fit a / {speed:.6g} (faiss-gpu exact search: GEMMs, scaled as the "
                             f"fp32 {arch} backbone)"}
    return {"schema": SCHEMA, "published": True, "created": COMPILED, "measured": None,
            "command": "python benchmarks/published_profiles.py", "device": "cuda", "device_name": spec["device_name"],
            "device_label": spec["label"], "cpu": cpu.get("cpu"), "threads": cpu.get("threads"),
            "torch": name.split("-")[2] if spec["published_precision"] == "amp" else None,
            "note": "PUBLISHED figures and derivations, not a measurement on this GPU: benchmarks/gpu_check.sh "
                    "measures one (see benchmarks/published_profiles.py for every factor)",
            "sources": {k: SOURCES[k] for k in sorted({spec["vit_small_patch8"], spec["vit_base_patch8"]}
                                                       | ({spec["beit"]} if spec["beit"] else set())
                                                       | {"midas-3090-beitl384", "timm-3090-beitl384"}
                                                       | ({"timm-3090-vitb8", "timm-3090-beitl384"}
                                                          if spec["beit"] is None else set()))},
            "checks": CHECKS, "cpu_beit": {**CPU_BEIT, "rate": cpu_beit_rate}, "factors": factors,
            "settings": cpu.get("settings"), "stages": stages, "knn_fit": knn}


def cpu_beit_rate() -> float:
    """The committed CPU measurement of BEiT-L-384 (``profiles/cpu-2core.json`` ``extra.beit_large_patch16_384``)."""
    rec = json.loads((PROFILES / CPU_PROFILE).read_text()).get("extra", {}).get("beit_large_patch16_384")
    if not rec:
        raise SystemExit(f"{PROFILES / CPU_PROFILE} has no extra.beit_large_patch16_384 measurement")
    return float(rec["rate"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed profile differs from a rebuild")
    args = parser.parse_args(argv)
    from repro.utils.files import atomic_path

    cpu = json.loads((PROFILES / CPU_PROFILE).read_text())
    beit = cpu_beit_rate()
    stale = []
    for name in GPUS:
        text = json.dumps(build(name, cpu, beit), indent=1) + "\n"
        path = PROFILES / f"{name}.json"
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
            continue
        with atomic_path(path, suffix=".json") as tmp:
            Path(tmp).write_text(text)
        print(f"wrote {path}")
    if stale:
        print("stale (rerun python benchmarks/published_profiles.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
