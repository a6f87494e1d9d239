"""The paper's CLIP direction filter for generated image pairs.

InstructPix2Pix (Brooks et al., 2022, section 3.1.2) keeps a generated pair only if CLIP agrees that each
image matches its caption, that the change between the images follows the change between the captions,
and that the two images are still alike. With I0, I1 the image features and T0, T1 the caption features
(all L2-normalised):

    sim_0     = cos(I0, T0)            >= 0.2
    sim_1     = cos(I1, T1)            >= 0.2
    sim_dir   = cos(I1 - I0, T1 - T0)  >= 0.2
    sim_image = cos(I0, I1)            >= 0.7

The reference code (timothybrooks/instruct-pix2pix, generate_img_dataset.py) uses 0.7 for sim_image; the
paper's text says 0.75. We default to the code's value because that is what made the released dataset.
Survivors are sorted by sim_dir and at most 4 are kept per caption pair.

Images reach CLIP in [0, 1] before CLIP's own mean/std normalisation. The reference metrics script feeds
[-1, 1] images into that normalisation, which shifts every pixel; we do not copy that.

Scoring and filtering work on plain tensors. The encoder wraps an open_clip model and never downloads: the
weights come from a local file the caller names.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# OpenAI CLIP's normalisation constants; open_clip uses the same defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_MODEL_NAME = "ViT-L-14"
DEFAULT_WEIGHTS_HINT = "models/clip_filter/"

# Feature vectors shorter than this count as zero: the direction between identical images.
_ZERO_NORM = 1e-8


# ---------------------------------------------------------------------------------------------------------
# Scoring and filtering on embeddings
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipScores:
    """The four per-pair CLIP scores, each a float32 tensor of shape [N]."""

    sim_0: torch.Tensor
    sim_1: torch.Tensor
    sim_dir: torch.Tensor
    sim_image: torch.Tensor

    def __len__(self) -> int:
        return self.sim_0.shape[0]

    def row(self, index: int) -> dict[str, float]:
        """One pair's scores under the dataset row's column names."""
        return {
            "clip_sim_0": float(self.sim_0[index]),
            "clip_sim_1": float(self.sim_1[index]),
            "clip_sim_dir": float(self.sim_dir[index]),
            "clip_sim_image": float(self.sim_image[index]),
        }


@dataclass(frozen=True)
class ClipFilterConfig:
    """Thresholds (inclusive) and the per-caption-pair cap. Defaults are the reference code's."""

    min_sim_0: float = 0.2
    min_sim_1: float = 0.2
    min_sim_dir: float = 0.2
    # The paper's text says 0.75; the reference code that built the dataset uses 0.7.
    min_sim_image: float = 0.7
    # None keeps every survivor.
    max_per_group: int | None = 4


@dataclass(frozen=True)
class FilterResult:
    """kept: indices of kept pairs, grouped by caption pair (in order of first appearance), best sim_dir
    first within a group. passed: which pairs met all four thresholds, before the per-group cap."""

    kept: torch.Tensor
    passed: torch.Tensor
    scores: ClipScores


def normalize(features: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows in float32; an all-zero row stays zero instead of becoming NaN."""
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True).clamp_min(_ZERO_NORM)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of [N, D] tensors; 0 where either row has (near) zero length."""
    a, b = a.float(), b.float()
    norm_a = a.norm(dim=-1)
    norm_b = b.norm(dim=-1)
    defined = (norm_a > _ZERO_NORM) & (norm_b > _ZERO_NORM)
    dot = (a * b).sum(dim=-1)
    cos = dot / (norm_a * norm_b).clamp_min(_ZERO_NORM**2)
    # Rounding can push |cos| a hair past 1; downstream code relies on the [-1, 1] range.
    return torch.where(defined, cos.clamp(-1.0, 1.0), torch.zeros_like(cos))


def clip_scores(
    image_0: torch.Tensor, image_1: torch.Tensor, text_0: torch.Tensor, text_1: torch.Tensor
) -> ClipScores:
    """The four scores for N pairs from [N, D] features; features need not be normalised."""
    shapes = {tuple(t.shape) for t in (image_0, image_1, text_0, text_1)}
    if len(shapes) != 1 or image_0.dim() != 2:
        raise ValueError(f"expected four [N, D] feature tensors of one shape, got {sorted(shapes)}")
    i0, i1, t0, t1 = (normalize(t) for t in (image_0, image_1, text_0, text_1))
    return ClipScores(
        sim_0=cosine(i0, t0),
        sim_1=cosine(i1, t1),
        # Identical images give a zero direction: sim_dir 0, which fails any positive threshold.
        sim_dir=cosine(i1 - i0, t1 - t0),
        sim_image=cosine(i0, i1),
    )


def passes_thresholds(scores: ClipScores, config: ClipFilterConfig) -> torch.Tensor:
    """Bool [N]: all four scores at or above their thresholds (NaN never passes)."""
    return (
        (scores.sim_0 >= config.min_sim_0)
        & (scores.sim_1 >= config.min_sim_1)
        & (scores.sim_dir >= config.min_sim_dir)
        & (scores.sim_image >= config.min_sim_image)
    )


def group_codes(groups: Sequence[Hashable] | torch.Tensor) -> torch.Tensor:
    """Map group ids (any hashables) to 0..G-1 in order of first appearance."""
    if isinstance(groups, torch.Tensor):
        groups = groups.tolist()
    codes: dict[Hashable, int] = {}
    return torch.tensor([codes.setdefault(g, len(codes)) for g in groups], dtype=torch.long)


def top_k_per_group(
    candidates: torch.Tensor, ranking: torch.Tensor, codes: torch.Tensor, k: int | None
) -> torch.Tensor:
    """From candidate indices keep the k best by `ranking` (descending) in each group.

    Ties keep the lower index first, like the reference's stable Python sort. The result is ordered by
    group code, then by ranking.
    """
    by_rank = torch.sort(ranking[candidates], descending=True, stable=True).indices
    ordered = candidates[by_rank]
    by_group = torch.sort(codes[ordered], stable=True).indices
    ordered = ordered[by_group]
    if k is None or ordered.numel() == 0:
        return ordered
    group = codes[ordered]
    position = torch.arange(ordered.numel())
    starts_group = torch.ones_like(group, dtype=torch.bool)
    starts_group[1:] = group[1:] != group[:-1]
    group_start = torch.cummax(torch.where(starts_group, position, 0), dim=0).values
    return ordered[position - group_start < k]


def filter_pairs(
    scores: ClipScores,
    groups: Sequence[Hashable] | torch.Tensor | None = None,
    config: ClipFilterConfig | None = None,
) -> FilterResult:
    """Apply the thresholds, then keep the best `max_per_group` pairs by sim_dir per caption pair.

    groups: one id per pair naming its caption pair; None puts every pair in one group.
    """
    config = config or ClipFilterConfig()
    if config.max_per_group is not None and config.max_per_group < 0:
        raise ValueError(f"max_per_group must be >= 0 or None, got {config.max_per_group}")
    count = len(scores)
    codes = torch.zeros(count, dtype=torch.long) if groups is None else group_codes(groups)
    if codes.numel() != count:
        raise ValueError(f"got {codes.numel()} group ids for {count} pairs")
    passed = passes_thresholds(scores, config).cpu()
    candidates = passed.nonzero().squeeze(1)
    kept = top_k_per_group(candidates, scores.sim_dir.cpu(), codes, config.max_per_group)
    return FilterResult(kept=kept, passed=passed, scores=scores)


# ---------------------------------------------------------------------------------------------------------
# Image preprocessing (ComfyUI IMAGE -> CLIP input)
# ---------------------------------------------------------------------------------------------------------


def resize_shorter_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of [B, C, H, W] so the shorter side is `size`, keeping the aspect ratio.

    The longer side is truncated like torchvision's Resize(int) that open_clip's transform uses.
    """
    height, width = images.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    new_size = (size, new_long) if height <= width else (new_long, size)
    if new_size == (height, width):
        return images
    resized = F.interpolate(images, size=new_size, mode="bicubic", align_corners=False, antialias=True)
    # Bicubic overshoots; PIL's uint8 path clips, and CLIP was trained on images in [0, 1].
    return resized.clamp(0.0, 1.0)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Central size x size window of [B, C, H, W] (H, W >= size), offsets rounded like torchvision."""
    height, width = images.shape[-2:]
    top = round((height - size) / 2)
    left = round((width - size) / 2)
    return images[..., top : top + size, left : left + size]


def fit_to_clip(images: torch.Tensor, size: int, resize_mode: str = "shortest") -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] in [0, 1] -> RGB [B, size, size, 3] in [0, 1], sized as the CLIP model wants.

    The one resize an image gets on its way to CLIP: an image already size x size passes through untouched, so
    images fitted early (to stack rows of different sizes into one batch) are not resized again by the encoder.
    resize_mode "shortest" (OpenAI CLIP): shorter side to `size`, then centre crop. "squash": stretch.
    """
    if images.dim() != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected IMAGE [B, H, W, C] with C in 1/3/4, got {tuple(images.shape)}")
    if resize_mode not in ("shortest", "squash"):
        raise ValueError(f"unsupported resize_mode {resize_mode!r}: use 'shortest' or 'squash'")
    pixels = images[..., :3] if images.shape[-1] >= 3 else images.expand(*images.shape[:-1], 3)
    pixels = pixels.float()
    if pixels.shape[1:3] == (size, size):
        return pixels
    pixels = pixels.permute(0, 3, 1, 2)
    if resize_mode == "shortest":
        pixels = center_crop(resize_shorter_side(pixels, size), size)
    else:
        pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
    return pixels.permute(0, 2, 3, 1)


def to_clip_input(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    resize_mode: str = "shortest",
) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] in [0, 1] -> CLIP pixel input [B, 3, size, size] (fit_to_clip, then CLIP's
    mean/std). The [0, 1] range is what CLIP's mean/std expect; nothing rescales it to [-1, 1].
    """
    pixels = fit_to_clip(images, size, resize_mode).permute(0, 3, 1, 2)
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


# ---------------------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------------------


class ClipWeightsNotFoundError(FileNotFoundError):
    """The CLIP filter's weights are not on disk; nothing is ever downloaded."""


def weight_file_names(model_name: str) -> tuple[str, ...]:
    """File names looked for in a weights folder, in order of preference."""
    return (
        f"{model_name}.pt",  # OpenAI's TorchScript release, e.g. ViT-L-14.pt
        "open_clip_pytorch_model.bin",  # open_clip / Hugging Face layout
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.safetensors",
    )


def find_weights(location: str | Path, model_name: str, hint: str = DEFAULT_WEIGHTS_HINT) -> Path:
    """The weights file at `location` (a file, or a folder holding one of the known names)."""
    path = Path(location)
    if path.is_file():
        return path
    names = weight_file_names(model_name)
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
    raise ClipWeightsNotFoundError(
        f"CLIP filter weights for {model_name} not found at '{path}'. Put {names[0]} (OpenAI's release) or "
        f"{names[1]} (open_clip format) into {hint} . This machine is offline: the weights are never "
        "downloaded, they must already be on disk."
    )


def is_torchscript_archive(path: Path) -> bool:
    """OpenAI's CLIP .pt files are TorchScript archives, which torch.load(weights_only=True) refuses."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def load_clip_model(
    location: str | Path,
    model_name: str = DEFAULT_MODEL_NAME,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    quick_gelu: bool = True,
    hint: str = DEFAULT_WEIGHTS_HINT,
) -> ClipEncoder:
    """Build an encoder from a local weights file or folder; raises ClipWeightsNotFoundError if absent.

    quick_gelu: OpenAI's CLIP (the paper's filter) was trained with QuickGELU; pass False for LAION weights
    in open_clip format. TorchScript files from OpenAI carry their own architecture and ignore it.
    """
    import open_clip  # deferred: scoring and filtering do not need open_clip's slow import

    weights = find_weights(location, model_name, hint)
    if is_torchscript_archive(weights):
        # A path (never a tag) so load_openai_model cannot fall back to its download.
        model = open_clip.load_openai_model(str(weights.resolve()), precision=precision, device=device)
    else:
        model = open_clip.create_model(
            model_name,
            pretrained=str(weights.resolve()),
            precision=precision,
            device=device,
            force_quick_gelu=quick_gelu,
        )
    return ClipEncoder(model, tokenizer=open_clip.get_tokenizer(model_name))


def model_preprocess(model: torch.nn.Module) -> dict[str, Any]:
    """Input size, mean, std and resize mode the model was trained with, OpenAI's where unknown."""
    visual = getattr(model, "visual", model)
    config = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = config.get("size", getattr(visual, "image_size", 224))
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"non-square CLIP input {tuple(size)} is not supported")
        size = size[0]
    return {
        "size": int(size),
        "mean": tuple(config.get("mean", getattr(visual, "image_mean", None) or CLIP_MEAN)),
        "std": tuple(config.get("std", getattr(visual, "image_std", None) or CLIP_STD)),
        "resize_mode": config.get("resize_mode", "shortest"),
    }


class ClipEncoder:
    """Encodes ComfyUI images and captions into L2-normalised CLIP features.

    Accepts any built open_clip model (a loaded ViT-L/14, or a tiny random one in tests). Without a
    tokenizer it uses CLIP's BPE tokenizer at the model's context length (bundled with open_clip, offline).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor] | None = None):
        self.model = model.eval()
        if tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            tokenizer = SimpleTokenizer(context_length=getattr(model, "context_length", 77))
        self.tokenizer = tokenizer
        self.preprocess = model_preprocess(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """IMAGE [B, H, W, C] in [0, 1] -> float32 [B, D] unit features, `batch_size` images per call."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        chunks = []
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(self.device)
            pixels = to_clip_input(batch, **self.preprocess).to(self.dtype)
            chunks.append(normalize(self.model.encode_image(pixels)))
        return torch.cat(chunks) if chunks else torch.empty(0, 0)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Captions -> float32 [N, D] unit features. Repeated captions are encoded once."""
        unique = list(dict.fromkeys(texts))
        chunks = []
        for start in range(0, len(unique), batch_size):
            tokens = self.tokenizer(unique[start : start + batch_size]).to(self.device)
            chunks.append(normalize(self.model.encode_text(tokens)))
        if not chunks:
            return torch.empty(0, 0)
        features = torch.cat(chunks)
        position = {text: i for i, text in enumerate(unique)}
        return features[torch.tensor([position[t] for t in texts], device=features.device)]

    def score_pairs(
        self,
        images_0: torch.Tensor,
        images_1: torch.Tensor,
        captions_0: Sequence[str],
        captions_1: Sequence[str],
        batch_size: int = 32,
    ) -> ClipScores:
        """The four scores for N (input image, edited image, input caption, edited caption) pairs."""
        count = images_0.shape[0]
        if not (images_1.shape[0] == len(captions_0) == len(captions_1) == count):
            raise ValueError(
                f"pair counts differ: {count} / {images_1.shape[0]} images, "
                f"{len(captions_0)} / {len(captions_1)} captions"
            )
        image_0 = self.encode_images(images_0, batch_size)
        image_1 = self.encode_images(images_1, batch_size)
        text_0 = self.encode_texts(captions_0)
        text_1 = self.encode_texts(captions_1)
        scores = clip_scores(image_0, image_1, text_0, text_1)
        return ClipScores(*(s.cpu() for s in (scores.sim_0, scores.sim_1, scores.sim_dir, scores.sim_image)))


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ClipEncoder",
    "ClipFilterConfig",
    "ClipScores",
    "ClipWeightsNotFoundError",
    "FilterResult",
    "clip_scores",
    "cosine",
    "filter_pairs",
    "find_weights",
    "fit_to_clip",
    "load_clip_model",
    "normalize",
    "to_clip_input",
]
