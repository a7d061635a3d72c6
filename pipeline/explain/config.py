"""What an explain report is asked for (ExplainConfig) and what it wrote (ExplainResult).

Kept free of torch and PIL imports so the CLI can read the fields' defaults and help cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

REPORT_MARKER = "report.json"  # written into every report folder; marks a folder as ours to replace
IMAGE_DIR = "img"


@dataclass
class ExplainConfig:
    """A static HTML report of a fitted head: prototype gallery and "this looks like that" evidence."""

    run: str = ""
    """A run folder written by `protocache fit-head`."""

    out: str = ""
    """Report folder; open OUT/index.html in a browser."""

    images: int = 8
    """Images of --split to explain (mixing correct and wrong predictions)."""

    split: str = "test"
    """Split the explained images come from."""

    seed: int = 0
    """Seed of the choice of explained images."""

    patches: int = 5
    """Training patches shown beside each prototype of an explained image (the gallery always
    shows the 10 images purity is scored on)."""

    top_prototypes: int = 5
    """Prototypes shown per explained image and class."""

    max_prototypes: int | None = None
    """Show only the N most important prototypes in the gallery (default: all the head uses)."""

    train_split: str = "train"
    """Split the gallery's patches come from."""

    batch_size: int = 64
    """Images per batch."""

    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""

    root: str | None = None
    """Dataset folder, if it moved since extraction (default: the folder the store recorded)."""

    patch_cells: float = 3.0
    """Side of a patch crop in token cells (but see patch_min_fraction)."""

    patch_min_fraction: float = 0.25
    """Smallest side of a patch crop, as a fraction of the input side."""

    patch_px: int = 128
    """Side of a patch PNG in pixels."""

    lazy_images: bool | None = None
    """loading="lazy" on the page's images; None: only for large reports (over 400 PNG files)."""

    def validate(self) -> None:
        """Every number in its range (pipeline/config.py's rules) and --out writable, before any work."""
        from protocache.pipeline.config import check_values, check_writable

        check_values(self, "explain", flags=True)
        if self.out:
            check_writable(self.out, "--out")


@dataclass
class ExplainResult:
    """Where the report is and what it holds."""

    index: str
    out: str
    prototypes_shown: int
    prototypes_used: int
    images_explained: int
    correct: int
    wrong: int
    png_files: int
    seconds: float
