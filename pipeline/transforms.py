"""What the backbone sees: the resize rule, pixel-space views (flip, noise) and normalisation.

An image reaches the backbone in three steps, each kept apart so that views and reports
can hook in between:

1. ``geometry_transform``: PIL -> PIL at the model's input size. Two rules (the store's
   ``preprocessing["resize"]``):

   * ``stretch``: resize the image straight to the input's H x W (aspect ratio not kept,
     no centre crop) with the backbone's interpolation. Used for images cropped to a
     bounding box (CUB; Cars with ``crop=true``), as ProtoPNet, PIP-Net and Huang et al.'s
     EvalProtoPNet do (``Resize((size, size))`` of the cropped box): every annotated part
     inside the box stays in the picture.
   * ``timm``: the backbone's own eval transform (optional border trim, resize by
     ``1 / crop_pct``, centre crop or pad), which cuts the ends of a wide box.

2. ``to_pixels``: PIL -> float tensor [3, H, W] in [0, 1] (torchvision's ``to_tensor``);
   ``make_view`` turns it into the hflip / noise view in this pixel space.
3. ``normalize``: ``(x - mean) / std`` with the backbone's own mean and std, the same ops
   as torchvision's ``Normalize``, so a clean ``timm`` view is bit-identical to
   ``timm.data.create_transform(**data_config)``.

The extraction loop splits steps 2-3 across processes: its decode workers stop at uint8 pixels
(``ModelInputTransform.pixels_uint8``, a quarter of the bytes) and ``BatchNormalizer`` runs
``to_tensor``'s and ``Normalize``'s float32 ops, in their order, on a whole batch in the main
process, so the backbone gets the same values bit for bit.

The noise view is Huang et al.'s stability perturbation (hqhQAQ/EvalProtoPNet,
``util/eval_interpretability.py``): on an ImageNet-normalised image ``(p - m_c) / s_c``
it adds i.i.d. Gaussian noise of std 0.2 per element, each draw clipped to [-0.25, 0.25]
(the clip bounds the noise, not the perturbed image, which may leave the valid range).
Adding ``n`` in normalised units is adding ``n * s_c`` to the pixel image, so here the
noise is per channel N(0, (0.2 s_c)^2) clipped to +-0.25 s_c (s = ImageNet std) added to
the [0, 1] pixel image, which is not clipped either; the result is then normalised with
the backbone's own mean/std. The noise is the same for every backbone, and for a backbone
with ImageNet normalisation it equals the reference's perturbation exactly.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from protocache.stores.errors import ProtocacheError

RESIZE_MODES = ("auto", "stretch", "timm")
# timm.data's IMAGENET_DEFAULT_MEAN / _STD, the normalisation the reference's noise is defined under.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NOISE_SIGMA = 0.2  # the reference's std, in ImageNet-normalised units
NOISE_CLIP = 0.25  # the reference's eps: each noise draw clipped to +-eps, in ImageNet-normalised units
_TIMM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode", "crop_border_pixels")


def resolve_resize(option: str, extract_defaults: dict[str, Any] | None = None) -> str:
    """`stretch` or `timm`: `auto` takes the dataset's recommendation (stretch for box crops), else timm."""
    if option not in RESIZE_MODES:
        raise ProtocacheError(f"bad --resize {option!r}: choose auto (stretch for datasets cropped to a bounding "
                              "box, timm otherwise), stretch or timm")
    if option != "auto":
        return option
    return str((extract_defaults or {}).get("resize", "timm"))


def resize_mode(data_config: dict[str, Any]) -> str:
    """The resize rule of a preprocessing config (stores made before the rule was recorded used timm's)."""
    mode = data_config.get("resize") or "timm"
    if mode not in ("stretch", "timm"):
        raise ProtocacheError(f"unknown resize rule {mode!r} in the preprocessing config (expected stretch or timm)")
    return mode


def preprocessing_config(data_config: dict[str, Any], resize: str) -> dict[str, Any]:
    """The backbone's data config as recorded in a store (JSON lists) with the resize rule added."""
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()}
    out["resize"] = resize
    return out


def _input_hw(data_config: dict[str, Any]) -> tuple[int, int]:
    size = data_config.get("input_size", 224)
    if isinstance(size, int):
        return size, size
    size = tuple(int(v) for v in size)
    return size[-2], size[-1]


def geometry_transform(data_config: dict[str, Any]):
    """PIL -> PIL at the model's input size, by the config's resize rule (see the module docstring)."""
    from timm.data.transforms import str_to_interp_mode
    from torchvision import transforms

    interpolation = data_config.get("interpolation") or "bilinear"
    if resize_mode(data_config) == "stretch":
        return transforms.Resize(_input_hw(data_config), interpolation=str_to_interp_mode(interpolation))
    import timm.data

    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data_config.items() if k in _TIMM_KEYS}
    steps = timm.data.create_transform(**cfg, is_training=False, normalize=False).transforms
    if type(steps[-1]).__name__ != "MaybePILToTensor":  # the last step converts to a tensor: drop it
        raise ProtocacheError(f"unexpected last step {type(steps[-1]).__name__} in timm's eval transform")
    return transforms.Compose(steps[:-1])


def to_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float tensor [3, H, W] in [0, 1] (what timm's eval transform normalises)."""
    from torchvision.transforms import functional

    return functional.to_tensor(image)


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(pixels - mean) / std per channel, as torchvision's Normalize computes it."""
    from torchvision.transforms import functional

    return functional.normalize(pixels, list(mean), list(std))


def pixels_from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [0, 1] (channels-last strides), the values of to_pixels:
    to_tensor converts to float, then divides by 255."""
    return pixels.movedim(-1, -3).to(torch.get_default_dtype()).div(255)


class BatchNormalizer:
    """A batch of model-input pixels -> the backbone's normalised input, on its device and in its memory layout.

    Bit-identical to ``normalize(to_pixels(image))`` per image: the same float32 ops in the same order
    (to float, / 255, - mean, / std), each rounded alike whatever the layout. The divisors are device
    tensors, not Python numbers: CUDA divides by a CPU scalar as a multiplication by its reciprocal,
    which can differ from a division in the last bit.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu",
                 channels_last: bool = False):
        dtype = torch.get_default_dtype()
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.scale = torch.full((1, 1, 1, 1), 255, dtype=dtype, device=self.device)
        self.mean = torch.as_tensor(list(mean), dtype=dtype, device=self.device).view(1, -1, 1, 1)
        self.std = torch.as_tensor(list(std), dtype=dtype, device=self.device).view(1, -1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] pixels, or float [B, 3, H, W] pixels in [0, 1] (a noise view) -> float [B, 3, H, W]."""
        x = pixels.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:  # HWC uint8 permuted is already channels-last: no copy for CNNs
            x = x.permute(0, 3, 1, 2).to(self.scale.dtype, memory_format=self.memory_format).div_(self.scale)
        else:
            x = x.to(self.scale.dtype, memory_format=self.memory_format, copy=True)
        mean, std = self._rows(x.shape[-1])
        return x.sub_(mean).div_(std)

    def _rows(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as [1, 3, 1, W] in the batch's memory format: in channels-last memory a [1, 3, 1, 1]
        operand repeats every 3 values, which torch's CPU kernels run element by element (3x the time of
        the whole rest of the normalisation); a full row lets them vectorise."""
        if getattr(self, "_width", None) != width:
            self._width = width
            self._mean_row, self._std_row = (v.expand(1, v.shape[1], 1, width).contiguous(memory_format=self.memory_format)
                                             for v in (self.mean, self.std))
        return self._mean_row, self._std_row


class ModelInputTransform:
    """PIL image -> the normalised tensor the backbone gets (picklable, for DataLoader workers)."""

    def __init__(self, data_config: dict[str, Any]):
        self.data_config = dict(data_config)
        self.geometry = geometry_transform(self.data_config)
        self.mean, self.std = tuple(self.data_config["mean"]), tuple(self.data_config["std"])

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The model-input image in [0, 1], before any view and normalisation."""
        return to_pixels(self.geometry(_rgb(image)))

    def pixels_uint8(self, image: Image.Image) -> torch.Tensor:
        """The model-input image as uint8 [H, W, 3]: what `pixels` holds before its division by 255."""
        return torch.from_numpy(np.array(self.geometry(_rgb(image)), dtype=np.uint8))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return normalize(pixels, self.mean, self.std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.pixels(image))


def _rgb(image: Image.Image) -> Image.Image:
    """The loaders' one decode rule (`datasets._common.to_rgb`: alpha on white, 16-bit scaled), a no-op on
    what they return; a PIL image handed in directly gets it too."""
    if not isinstance(image, Image.Image):
        raise ProtocacheError(f"expected a PIL image, got a {type(image).__name__}; decode files with "
                              "protocache.pipeline.model.decode_image (or pass the path where a path is taken)")
    from .datasets._common import to_rgb

    return to_rgb(image)


# ---------------------------------------------------------------------------- views
def noise_sigma_pixels(sigma: float = NOISE_SIGMA) -> list[float]:
    """Per-channel std of the noise view in [0, 1] pixel units: sigma (ImageNet-normalised units) x ImageNet std."""
    return [sigma * s for s in IMAGENET_STD]


def noise_definition(sigma: float = NOISE_SIGMA) -> dict[str, Any]:
    """The noise view's definition, as recorded in a store's fingerprint."""
    return {
        "space": "pixel",
        "reference": "hqhQAQ/EvalProtoPNet perturb_img: N(0, std^2) per element of the ImageNet-normalised "
                     "image, each draw clipped to +-eps, image not clipped",
        "sigma_imagenet_normalised": sigma,
        "clip_imagenet_normalised": NOISE_CLIP,
        "imagenet_std": list(IMAGENET_STD),
        "sigma_pixels": noise_sigma_pixels(sigma),
        "clip_pixels": [NOISE_CLIP * s for s in IMAGENET_STD],
        "image_clipped": False,
        "seed": "sha256(image_id/noise)",
    }


def noise_generator(image_id: str, view: str = "noise") -> torch.Generator:
    """Per-image seed, so a noise view is the same whoever extracts the image, and when."""
    seed = int.from_bytes(hashlib.sha256(f"{image_id}/{view}".encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(seed)


def pixel_noise(shape: Sequence[int], image_id: str, sigma: float = NOISE_SIGMA) -> torch.Tensor:
    """The noise view's residual [3, H, W] in pixel units: the reference's clipped draw times the ImageNet std."""
    draw = torch.randn(tuple(shape), generator=noise_generator(image_id), dtype=torch.float32) * sigma
    draw.clamp_(-NOISE_CLIP, NOISE_CLIP)
    return draw * torch.tensor(IMAGENET_STD, dtype=torch.float32).view(-1, 1, 1)


def make_view(pixels: torch.Tensor, view: str, image_id: str, sigma: float = NOISE_SIGMA) -> torch.Tensor:
    """One view of a model-input pixel image [3, H, W] in [0, 1] (normalise afterwards)."""
    if view == "clean":
        return pixels
    if view == "hflip":
        return torch.flip(pixels, dims=[-1])
    if view == "noise":
        return pixels + pixel_noise(pixels.shape, image_id, sigma)  # not clipped to [0, 1], as the reference
    raise ProtocacheError(f"unknown view {view!r}")
