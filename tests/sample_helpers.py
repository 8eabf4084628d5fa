"""Helpers shared by test modules: views of the real sample data, and a demo entry that runs in seconds."""

from __future__ import annotations

from pathlib import Path

from repro.models.backbone import init_random_checkpoint


class FirstN:
    """The first n images of a dataset adapter (keeps depth estimation and training short)."""

    def __init__(self, dataset, n):
        self.dataset, self.n = dataset, n
        self.name, self.split = dataset.name, f"{dataset.split}-first{n}"
        self.num_classes, self.class_names = dataset.num_classes, dataset.class_names

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.dataset[i]

    def keys(self):
        return self.dataset.keys()[: self.n]


def random_dino(work: Path) -> Path:
    """A random-weight ViT-S/8 checkpoint in the official DINO format, written to ``work/dino_random.pth``."""
    return init_random_checkpoint("vit_small_patch8", work / "dino_random.pth")


def quick_demo_overrides(shared_data: Path, checkpoint: Path, *extra: str) -> list[str]:
    """``--set`` values that make ``demo/nyuv2-mini`` take seconds, then ``extra``.

    The NYUv2 sample, the given backbone checkpoint, no loader workers, 112 px training crops and
    160 px validation crops (14x14 and 20x20 feature maps: the code path of a real run, about 4x
    faster on a CPU).
    """
    return [f"data.root={shared_data / 'nyuv2-mini'}", f"model.checkpoint={checkpoint}", "train.num_workers=0",
            "data.crop_size=112", "data.val_size=160", *extra]
