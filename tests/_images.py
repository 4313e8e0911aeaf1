"""Tiny test inputs written by the tests themselves: random-pixel ImageFolder trees and preprocessing configs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["preprocess_config", "write_imagefolder"]


def write_imagefolder(root: Path, classes: Sequence[str] = ("ant", "bee", "cow"), per_class: int = 3,
                      size: tuple[int, int] = (20, 20)) -> Path:
    """``root/<class>/<i>.png``: ``per_class`` random RGB images of ``size`` (H, W) per class; returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def preprocess_config(inp: Path, out: Path, **kw: Any) -> Any:
    """A fast CPU ``PreprocessConfig``: timm's tiny ``test_resnet`` (random init), 32-px tiles at 2 µm/px."""
    from preprocessing.config import PreprocessConfig

    base = dict(input=str(inp), output=str(out), target_mpp=2.0, patch_size=32, encoder="test_resnet",
                weights="random", workers=0, batch_size=64, device="cpu", seg_mpp=4.0, progress=False,
                min_tissue=0.5)
    base.update(kw)
    return PreprocessConfig(**base)
