"""The built-in demo dataset: scikit-learn's bundled handwritten digits written out as an image folder.

Layout (no network needed):
    <out>/labeled/train/<digit>/*.png   labelled training images (validation is split from these)
    <out>/labeled/test/<digit>/*.png    held-out test images
    <out>/unlabeled/*.png               images without labels, for autoencoder pretraining
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

_logger = logging.getLogger(__name__)

DEMO_SIZE = 32  # The 8x8 digits are upscaled to this side.


def write_digits(out: str | Path, unlabeled_fraction: float = 0.3, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """Writes the digits as PNG files under `out` (skipped if already complete); returns `out/labeled`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    out = Path(out)
    marker = out / ".complete"
    if marker.is_file():
        return out / "labeled"
    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).astype(np.uint8)
    index = np.arange(len(images))
    labelled, unlabelled = train_test_split(
        index, test_size=unlabeled_fraction, stratify=digits.target, random_state=seed
    )
    train, test = train_test_split(
        labelled,
        test_size=test_fraction / (1 - unlabeled_fraction),
        stratify=digits.target[labelled],
        random_state=seed,
    )
    for part, ids in (("train", train), ("test", test)):
        for i in ids:
            _save(images[i], out / "labeled" / part / str(digits.target[i]) / f"digit_{i:04d}.png")
    for i in unlabelled:
        _save(images[i], out / "unlabeled" / f"digit_{i:04d}.png")
    marker.write_text(f"{len(train)} train, {len(test)} test, {len(unlabelled)} unlabeled\n")
    _logger.info("Wrote the digits demo set to %s: %s.", out, marker.read_text().strip())
    return out / "labeled"


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, "L").resize((DEMO_SIZE, DEMO_SIZE), Image.Resampling.BICUBIC).save(path)
