"""scikit-learn's bundled handwritten digits: the embedded default dataset, no download."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from protocache.stores.errors import ProtocacheError

from ._common import stratified_split
from ._registry import Dataset, register_dataset

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class DigitsLoader:
    """Renders scikit-learn's 8x8 digit i as dark ink on white paper, RGB (picklable)."""

    def __init__(self):
        self._images = None

    def __call__(self, record: dict[str, Any]) -> Image.Image:
        if self._images is None:
            from sklearn.datasets import load_digits

            self._images = load_digits().images
        ink = self._images[record["index"]] / 16.0
        gray = np.round(255.0 * (1.0 - ink)).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")


@register_dataset("digits", loader=DigitsLoader())
def build_digits(root: Path | None = None, **options: Any) -> Dataset:
    """scikit-learn's bundled handwritten digits (1,797 images, 10 classes), no download.

    Row i is scikit-learn's image i. Split: stratified 80/20, seed 0.
    """
    from sklearn.datasets import load_digits

    if options:
        raise ProtocacheError(f"digits takes no options, got {sorted(options)}")
    labels = load_digits().target.astype(np.int64)
    split = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    records = [
        {"image_id": f"digits-{i:04d}", "path": f"sklearn:digits/{i}", "label": int(labels[i]),
         "class_name": str(int(labels[i])), "split": str(split[i]), "width": 8, "height": 8, "index": i}
        for i in range(len(labels))
    ]
    return Dataset("digits", records, [str(d) for d in range(10)], DigitsLoader(),
                   options={"test_fraction": DIGITS_TEST_FRACTION, "split_seed": DIGITS_SPLIT_SEED})
