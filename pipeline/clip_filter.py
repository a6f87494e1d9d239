"""The CLIP filter's ComfyUI side: weights in `models/clip_filter/` (registered here, extendable in
extra_model_paths.yaml), the loaded encoder under ComfyUI's model memory, row images decoded and scored in
batches over dataset/clip_filter.py, and the edit metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch
from comfy.patcher_extension import CallbacksMP
from PIL import Image

from ..dataset import clip_filter
from ..dataset.clip_filter import ClipEncoder, ClipFilterConfig, ClipScores, ClipWeightsNotFoundError
from ..dataset.paths import file_stamp
from ..dataset.pixels import image_to_tensor
from ..dataset.records import EditRow, open_image
from .settings import check_finite

CLIP_FOLDER = "clip_filter"
DEFAULT_CLIP_WEIGHTS = "ViT-L-14.pt"
CLIP_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def register_clip_folder() -> None:
    folder_paths.add_model_folder_path(CLIP_FOLDER, os.path.join(folder_paths.models_dir, CLIP_FOLDER))


register_clip_folder()




def clip_weight_choices() -> list[str]:
    """The default ViT-L-14.pt first (listed even when absent, so the node can say where to put it)."""
    files = [f for f in folder_paths.get_filename_list(CLIP_FOLDER) if f.lower().endswith(CLIP_WEIGHT_SUFFIXES)]
    return [DEFAULT_CLIP_WEIGHTS, *(f for f in files if f != DEFAULT_CLIP_WEIGHTS)]


def clip_weights_path(name: str) -> Path:
    path = folder_paths.get_full_path(CLIP_FOLDER, name)
    if path is not None:
        return Path(path)
    folders = ", ".join(folder_paths.get_folder_paths(CLIP_FOLDER))
    raise ClipWeightsNotFoundError(
        f"CLIP weights {name!r} not found in {folders}. Put OpenAI's CLIP {DEFAULT_CLIP_WEIGHTS} (the paper's "
        "filter) there, or other open_clip weights with a <same name>.json open_clip model config beside them. "
        "Nothing is downloaded (this machine may be offline): copy the file there yourself."
    )


def _sidecar_config(weights: Path) -> tuple[Path, dict] | None:
    sidecar = weights.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        config = json.loads(sidecar.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{sidecar.name} is not JSON ({error})") from None
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(config if isinstance(config, dict) else {})
    if missing:
        raise ValueError(f"{sidecar.name} is not an open_clip model config: it lacks {', '.join(sorted(missing))}")
    return sidecar, config


def build_encoder(weights: Path, precision: str) -> ClipEncoder:
    """ViT-L-14 (OpenAI, QuickGELU) unless a `<stem>.json` open_clip config sits beside the weights."""
    sidecar = _sidecar_config(weights)
    architecture = f"{weights.stem}.json" if sidecar else clip_filter.DEFAULT_MODEL_NAME
    try:
        if sidecar is None:
            return clip_filter.load_clip_model(weights, precision=precision, hint=str(weights.parent))
        import open_clip

        # open_clip registers a config file under its stem; the model is then built by that name.
        open_clip.add_model_config(sidecar[0])
        return clip_filter.load_clip_model(weights, model_name=weights.stem, precision=precision,
                                           quick_gelu=bool(sidecar[1].get("quick_gelu", False)),
                                           hint=str(weights.parent))
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, KeyError) as error:
        # A state dict of another architecture fails deep inside open_clip with a tensor-shape message.
        raise ValueError(
            f"{weights.name} does not load as {architecture} ({str(error)[:300]}). For weights of another "
            f"CLIP architecture put its open_clip model config beside them as {weights.stem}.json"
        ) from error


_ENCODERS: OrderedDict[tuple, tuple[ClipEncoder, comfy.model_patcher.ModelPatcher]] = OrderedDict()
_ENCODER_CACHE_SIZE = 1  # ViT-L/14 is 1.7 GB in fp32; one loaded filter model is plenty


def load_encoder(name: str) -> ClipEncoder:
    """The CLIP encoder for weights file `name`, kept between runs and placed by ComfyUI's model manager."""
    weights = clip_weights_path(name)
    device = mm.get_torch_device()
    precision = "fp16" if mm.should_use_fp16(device) else "fp32"
    key = (str(weights.resolve()), file_stamp(weights), file_stamp(weights.with_suffix(".json")), precision)
    if key in _ENCODERS:
        _ENCODERS.move_to_end(key)
    else:
        # Evict first, so two CLIP models are never in memory at once; ComfyUI's model manager holds only
        # weak references and lets go of an evicted one.
        while len(_ENCODERS) >= _ENCODER_CACHE_SIZE:
            _ENCODERS.popitem(last=False)
        encoder = build_encoder(weights, precision)
        patcher = comfy.model_patcher.ModelPatcher(encoder.model, load_device=device,
                                                   offload_device=mm.text_encoder_offload_device())
        patcher.add_callback(CallbacksMP.ON_DETACH, _forget_when_unloaded(key))
        _ENCODERS[key] = (encoder, patcher)
    encoder, patcher = _ENCODERS[key]
    # A full load: ComfyUI's partial (low-VRAM) loading only knows its own layer types.
    mm.load_models_gpu([patcher], force_full_load=True)
    return encoder


def _forget_when_unloaded(key: tuple):
    """A detach callback: once ComfyUI unloads the encoder (to free memory, or "unload models"), the cache lets go
    of it too, so its memory is really freed instead of being kept alive here."""

    def forget(patcher: comfy.model_patcher.ModelPatcher, unpatch_all: bool) -> None:  # noqa: ARG001 (ComfyUI's callback signature)
        entry = _ENCODERS.get(key)
        if entry is None or entry[1] is not patcher:
            return
        # ComfyUI is in the middle of unloading it (free_memory): its finalizer, which would drop the model's
        # entry from ComfyUI's list as soon as the model dies, is detached right after this callback anyway.
        # Detach it now, or the model dying when we let go would shorten that list under free_memory's loop.
        for loaded in mm.current_loaded_models:
            finalizer = getattr(loaded, "model_finalizer", None)
            if loaded.model is patcher and finalizer is not None:
                finalizer.detach()
        del _ENCODERS[key]

    return forget


def _concat_scores(parts: list[ClipScores]) -> ClipScores:
    fields = ("sim_0", "sim_1", "sim_dir", "sim_image")
    return ClipScores(*(torch.cat([getattr(p, f) for p in parts]) for f in fields))


# What decoding a row's image may raise: a corrupt or truncated file, a decompression bomb, an unknown format.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def score_rows(encoder: ClipEncoder, rows: Sequence[EditRow], batch_size: int,
               skipped: list[tuple[int, str]] | None = None) -> ClipScores:
    """The four scores of every row, `batch_size` pairs at a time (images are decoded only per batch).

    With a `skipped` list, a row whose images do not decode is left out of the scores and noted there as
    (row index, reason), so one broken file does not stop the rest; without one, it raises.
    """
    missing = [i for i, r in enumerate(rows) if r.input_image is None or r.edited_image is None]
    if missing:
        raise ValueError(f"{len(missing)} of {len(rows)} rows have no images yet: generate the image pairs "
                         "first (connect the rows through P2PPairGenerator)")
    bar = comfy.utils.ProgressBar(len(rows))
    parts = []
    for start in range(0, len(rows), batch_size):
        mm.throw_exception_if_processing_interrupted()
        batch = []
        for index in range(start, min(start + batch_size, len(rows))):
            pair = _decoded_pair(rows[index], encoder.preprocess, index, skipped)
            if pair is not None:
                batch.append((rows[index], *pair))
        if batch:
            inputs = torch.cat([inputs for _, inputs, _ in batch])
            edits = torch.cat([edits for _, _, edits in batch])
            parts.append(encoder.score_pairs(inputs, edits, [r.input_caption for r, _, _ in batch],
                                             [r.output_caption for r, _, _ in batch], batch_size))
        bar.update_absolute(min(start + batch_size, len(rows)), len(rows))
    if not parts:
        return ClipScores(*(torch.zeros(0) for _ in range(4)))
    return _concat_scores(parts)


def _decoded_pair(row: EditRow, preprocess: dict, index: int,
                  skipped: list[tuple[int, str]] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    # Fitted to CLIP's input size here, so rows of any size stack into one batch; the encoder then leaves them be.
    try:
        return tuple(clip_filter.fit_to_clip(image_to_tensor(open_image(image))[None], preprocess["size"],
                                             preprocess["resize_mode"])
                     for image in (row.input_image, row.edited_image))
    except DECODE_ERRORS as error:
        if skipped is None:
            raise
        skipped.append((index, f"image does not decode ({type(error).__name__}: {str(error)[:200]})"))
        return None


def filter_rows(
    rows: Sequence[EditRow], weights: str, config: ClipFilterConfig, batch_size: int
) -> tuple[list[EditRow], str]:
    """The rows that pass, best sim_dir first per caption pair, with their scores filled in; and a report."""
    check_finite(min_sim_0=config.min_sim_0, min_sim_1=config.min_sim_1, min_sim_dir=config.min_sim_dir,
                 min_sim_image=config.min_sim_image)
    if not rows:
        return [], "no rows to filter"
    skipped: list[tuple[int, str]] = []
    scores = score_rows(load_encoder(weights), rows, batch_size, skipped)
    gone = {index for index, _ in skipped}
    scored = [row for index, row in enumerate(rows) if index not in gone]
    skips = "".join(f"\nskipped row {i} ({rows[i].input_caption[:60]!r}): {reason}" for i, reason in skipped)
    if not scored:
        return [], f"kept 0 of {len(rows)} pairs: no row's images decoded{skips}"
    result = clip_filter.filter_pairs(scores, [r.group for r in scored], config)
    kept = [dataclasses.replace(scored[i], **scores.row(i)) for i in result.kept.tolist()]
    return kept, filter_report(scored, scores, result, config) + skips


def filter_report(rows: Sequence[EditRow], scores: ClipScores, result, config: ClipFilterConfig) -> str:
    fails = {
        "sim_0": int((scores.sim_0 < config.min_sim_0).sum()),
        "sim_1": int((scores.sim_1 < config.min_sim_1).sum()),
        "sim_dir": int((scores.sim_dir < config.min_sim_dir).sum()),
        "sim_image": int((scores.sim_image < config.min_sim_image).sum()),
    }
    kept = result.kept
    capped = int(result.passed.sum()) - kept.numel()
    lines = [
        f"kept {kept.numel()} of {len(rows)} pairs from {len({r.group for r in rows})} caption pairs",
        "below threshold: " + ", ".join(f"{k} {v}" for k, v in fails.items()) + " (a pair can fail several)",
        f"passed but over the top-k per caption pair: {capped}",
    ]
    if kept.numel():
        means = {name: float(getattr(scores, name)[kept].mean()) for name in fails}
        lines.append("mean of kept: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    return "\n".join(lines)


def edit_metrics(
    weights: str, inputs: torch.Tensor, edits: torch.Tensor, input_caption: str, output_caption: str,
    batch_size: int,
) -> tuple[ClipScores, str]:
    """The paper's metrics for edits of `inputs` (one input image may serve a whole batch of edits)."""
    for name, images in (("input_images", inputs), ("edited_images", edits)):
        if images.shape[0] == 0:  # the means of no scores are NaN
            raise ValueError(f"{name} is an empty batch: connect at least one image")
        if not torch.isfinite(images).all():
            raise ValueError(f"{name} contain NaN or infinite values: check the node that made them")
    if inputs.shape[0] == 1 and edits.shape[0] > 1:
        inputs = inputs.expand(edits.shape[0], *inputs.shape[1:])
    if inputs.shape[0] != edits.shape[0]:
        raise ValueError(f"{inputs.shape[0]} input images for {edits.shape[0]} edited images: give one input "
                         "image, or as many as edits, in the same order")
    count = edits.shape[0]
    encoder = load_encoder(weights)
    scores = encoder.score_pairs(inputs, edits, [input_caption] * count, [output_caption] * count, batch_size)
    means = {name: float(getattr(scores, name).mean()) for name in ("sim_0", "sim_1", "sim_dir", "sim_image")}
    report = (
        f"{count} edits: CLIP direction similarity (sim_dir) {means['sim_dir']:.4f}, "
        f"CLIP image similarity (sim_image) {means['sim_image']:.4f}, "
        f"input image~caption (sim_0) {means['sim_0']:.4f}, edit~edited caption (sim_1) {means['sim_1']:.4f}"
    )
    return scores, report
