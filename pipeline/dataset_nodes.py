"""ComfyUI glue for the dataset nodes: ComfyUI's folders, progress, interrupts and model memory around the pure
code in dataset/ (instructions, CLIP filter, formats).

Where things live (all through folder_paths, whatever a workflow says):
- caption files: ComfyUI's input folder;
- API key files: `user/__ip2p_keys/`, a ComfyUI *system user* folder that no HTTP endpoint serves (the input
  and output folders are readable through /view, and `user/<name>/` through /userdata);
- the LLM answer cache: `output/ip2p_cache/instructions.jsonl` (the temp folder is wiped at start-up, so a
  cache there would not survive the crash it is meant for);
- CLIP filter weights: `models/clip_filter/` (registered below, extendable in extra_model_paths.yaml);
- datasets: written inside the output folder only; read from the input or the output folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import urllib.parse
from collections import OrderedDict
from collections.abc import Sequence
from itertools import islice
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
import numpy as np
import torch
import torch.nn.functional as F
from comfy.patcher_extension import CallbacksMP
from PIL import Image

from ..dataset import clip_filter
from ..dataset.clip_filter import ClipEncoder, ClipFilterConfig, ClipScores, ClipWeightsNotFoundError
from ..dataset.format_reference import SEEDS_NAME
from ..dataset.formats import FORMATS, detect_format, iter_rows, open_writer
from ..dataset.instructions import (
    CAPTION_SUFFIXES,
    Endpoint,
    InstructionStats,
    MissingAPIKeyError,
    RetryPolicy,
    Sampling,
    as_captions,
    generate_instructions,
    read_captions,
)
from ..dataset.key_hosts import check_key_destination
from ..dataset.llm_client import RATE_LIMITED, UNAVAILABLE, resolve_api_key
from ..dataset.paths import resolve_inside
from ..dataset.records import EditRow, open_image
from ..dataset.writer import MANIFEST_NAMES, WriterBusyError, write_failure

NO_FILE = "none"
CACHE_DIR = "ip2p_cache"
KEYS_USER = "ip2p_keys"
CLIP_FOLDER = "clip_filter"
DEFAULT_CLIP_WEIGHTS = "ViT-L-14.pt"
CLIP_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
DATASET_ROOTS = ("output", "input")

# Only variables named like API keys may be read: a shared workflow could otherwise name any secret in the
# environment (cloud credentials, tokens) and send it as the bearer token to a base_url of its choosing.
_KEY_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*API_KEY$", re.IGNORECASE)
# An API key is sent as one HTTP header token: visible ASCII, no spaces, no line breaks.
_KEY_TEXT = re.compile(r"[\x21-\x7e]+")
_SCAN_LIMIT = 2000  # entries looked at per folder level when listing datasets or caption files
# Seconds one LLM request may take, and the retry policy of the node (module-level so tests can shorten them).
LLM_TIMEOUT_S = 60.0
LLM_RETRY = RetryPolicy()
_PARQUET_SCAN_LIMIT = 200


def register_clip_folder() -> None:
    folder_paths.add_model_folder_path(CLIP_FOLDER, os.path.join(folder_paths.models_dir, CLIP_FOLDER))


register_clip_folder()


# ---------------------------------------------------------------------------------------------------------
# Instructions
# ---------------------------------------------------------------------------------------------------------


def caption_file_choices() -> list[str]:
    """NO_FILE, then every .txt/.jsonl/.csv under the input folder (relative, with / separators)."""
    root = Path(folder_paths.get_input_directory())
    found: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            (Path(folder) / name).relative_to(root).as_posix()
            for name in sorted(files)
            if name.lower().endswith(CAPTION_SUFFIXES) and not name.startswith(".")
        ]
        if len(found) >= _SCAN_LIMIT:
            break
    return [NO_FILE, *found]


def collect_captions(text: str, captions_file: str) -> list[str]:
    """Captions from the chosen input-folder file, else from the text (one per line).

    The text is split here, never handed to `as_captions` as one string, which would read a one-line text
    ending in .txt as a path anywhere on disk.
    """
    if captions_file and captions_file != NO_FILE:
        root = folder_paths.get_input_directory()
        path = _inside(root, captions_file, "captions_file")
        if not path.is_file():
            raise FileNotFoundError(f"captions_file {captions_file!r} is not a file in the input folder {root}")
        captions = read_captions(path)
        source = f"captions_file {captions_file!r}"
    else:
        captions = as_captions(text.splitlines())
        source = "captions"
    if not captions:
        raise ValueError(f"{source} holds no captions: write one caption per line, or choose a captions_file")
    return captions


def _inside(root: str | os.PathLike, name: str, what: str) -> Path:
    try:
        return resolve_inside(root, name)
    except ValueError as error:
        raise ValueError(f"{what} {name!r} must name a file inside {root}: {error}") from None


def key_env_name(name: str) -> str | None:
    name = name.strip()
    if not name:
        return None
    if not _KEY_ENV_NAME.match(name):
        raise ValueError(
            f"api_key_env must be the NAME of an environment variable ending in API_KEY (e.g. OPENAI_API_KEY), "
            f"got {name!r}; other variables are not read, so a shared workflow cannot send them anywhere"
        )
    return name


def keys_directory() -> Path:
    return Path(folder_paths.get_system_user_directory(KEYS_USER))


def key_file_path(name: str) -> Path | None:
    """The key file `name` in user/__ip2p_keys/, or None for no file."""
    name = name.strip()
    if not name:
        return None
    root = keys_directory()
    path = _inside(root, name, "api_key_file")
    if not path.is_file():
        raise FileNotFoundError(
            f"api_key_file {name!r} not found: put the key (one line) into {root / name} "
            "(that folder is never served over HTTP, unlike input/ and output/)"
        )
    return path


def endpoint_from(base_url: str, model: str, api_key_env: str, api_key_file: str) -> Endpoint:
    if not base_url.strip().lower().startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
    try:
        host = urllib.parse.urlsplit(base_url.strip()).hostname
    except ValueError as error:  # e.g. an unclosed IPv6 bracket
        host = None
        reason = str(error)
    else:
        reason = "no host name"
    if not host:
        raise ValueError(f"base_url {base_url!r} is not a valid URL ({reason}): write it like "
                         "http://127.0.0.1:8000/v1")
    if not model.strip():
        raise ValueError("model is empty: give the model name the endpoint serves")
    endpoint = Endpoint(model=model.strip(), base_url=base_url.strip(), api_key_env=key_env_name(api_key_env),
                        api_key_file=key_file_path(api_key_file), timeout=LLM_TIMEOUT_S)
    check_api_key(endpoint)
    return endpoint


def check_api_key(endpoint: Endpoint) -> None:
    """Refuses a key bound for a host the user has not allowed (dataset/key_hosts.py), and a key that is not
    one header token, without ever quoting it.

    A key file with a second line (a comment, another key) or a key with a space inside fails in the HTTP
    client with "Illegal header value b'Bearer <key>...'": the whole key would land in the node's error, the
    server log and /history, and redacting the exact key does not catch the escaped form.
    """
    try:
        key = resolve_api_key(endpoint.api_key_env, endpoint.api_key_file)
    except MissingAPIKeyError as error:
        raise ValueError(str(error)) from None
    if key is None:
        return
    source = (f"api_key_file {Path(endpoint.api_key_file).name!r}" if endpoint.api_key_file
              else f"the environment variable {endpoint.api_key_env}")
    check_key_destination(endpoint.base_url, keys_directory(), source)
    if not _KEY_TEXT.fullmatch(key):
        raise ValueError(f"the API key in {source} is not one line of visible ASCII characters (a second line, "
                         "a comment or a space in it?): put only the key, on one line")


def instruction_cache_path() -> Path:
    # Checked like a dataset name: a symlinked ip2p_cache leading out of the output folder is refused.
    return resolve_inside(folder_paths.get_output_directory(), f"{CACHE_DIR}/instructions.jsonl",
                          "the LLM answer cache", f"real files in output/{CACHE_DIR} (or cache off)")


def sampling_from(temperature: float, frequency_penalty: float, max_tokens: int, seed: int) -> Sampling:
    check_finite(temperature=temperature, frequency_penalty=frequency_penalty)
    # Seed 0 sends none: servers that do not know the parameter are not bothered with it.
    return Sampling(temperature=temperature, frequency_penalty=frequency_penalty, max_tokens=max_tokens,
                    seed=seed or None)


# Loggers of the HTTP stack whose DEBUG records print whole response headers and bodies (ComfyUI's
# --verbose DEBUG turns them on): an endpoint that echoes the API key would put it into the log file.
_HTTP_LOGGERS = ("httpx", "httpcore", "httpcore2", "openai")


@contextlib.contextmanager
def http_debug_logs_off():
    """Raises the HTTP stack's loggers to INFO while requests carry the key; restores them after."""
    loggers = [logging.getLogger(name) for name in _HTTP_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _Progress:
    """generate_instructions' progress(done, total) onto a ComfyUI progress bar made on the first call."""

    def __init__(self) -> None:
        self.bar: comfy.utils.ProgressBar | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(total)
        self.bar.update_absolute(done, total)


STATS_KEY = "ip2p_stats"  # the nodes' ui entry holding their counts as data (read by the headless builder)
# Set by the headless builder for its own process: a chunk without one usable answer then gives zero rows and its
# counts instead of an error that would stop the whole rank. An environment variable, not a node input, because
# it is the running program's choice, not the workflow's (and the shipped workflow's widgets stay as they are).
EMPTY_OK_ENV = "IP2P_INSTRUCTIONS_EMPTY_OK"


def run_instructions(
    captions: list[str], endpoint: Endpoint, mode: str, sampling: Sampling, concurrency: int, use_cache: bool,
) -> tuple[list[EditRow], str, dict]:
    """Rows without images, a summary and the counts as data. A cancel keeps every answer received so far in the
    cache. With no usable row it raises (the canvas then shows why), unless EMPTY_OK_ENV is set to 1."""
    cache_path = instruction_cache_path() if use_cache else None
    try:
        with http_debug_logs_off():
            result = generate_instructions(
                captions, endpoint, mode=mode, sampling=sampling, retry=LLM_RETRY, concurrency=concurrency,
                cache_path=cache_path, progress=_Progress(), should_cancel=mm.processing_interrupted)
    except MissingAPIKeyError as error:
        raise ValueError(f"{error}; or name a key file in {keys_directory()} with api_key_file") from None
    except OSError as error:
        # Appending to the answer cache failed (full disk): no new request starts, and every answer cached
        # before is kept, so the rerun after freeing space asks only for what is missing.
        raise ValueError(f"could not write the instruction cache {cache_path}: {write_failure(error)}. Free "
                         "space and run again (answers cached before are kept), or turn cache off") from error
    if result.cancelled:
        mm.throw_exception_if_processing_interrupted()
    if not result.rows and os.environ.get(EMPTY_OK_ENV) != "1":
        raise ValueError(f"no usable instructions: {_stats_text(result.stats)}. What to do: "
                         f"{_advice(result.stats)}")
    rows = [EditRow(r.input_caption, r.instruction, r.output_caption, None, None) for r in result.rows]
    where = f"cached in {cache_path}" if cache_path else "cache off"
    return rows, f"{_stats_text(result.stats)} ({where}){_skip_list(result.stats.skipped_captions)}", \
        result.stats.as_dict()


def _stats_text(stats: InstructionStats) -> str:
    """The counts, why requests failed, and what a rerun will do about it."""
    text = stats.summary()
    if stats.reasons:
        text += "; reasons: " + "; ".join(stats.reasons)
    if any("truncated at max_tokens" in reason for reason in stats.reasons):
        text += " (raise max_tokens to get whole answers)"
    if stats.unanswered:
        text += (f". {stats.unanswered} captions got no usable answer; they are not cached and are asked again on "
                 "the next run (answers already received are kept)")
    return text


def _skip_list(skipped: list[list[str]]) -> str:
    """One line per caption that gave no row, with its reason (the counts by reason are in the summary)."""
    return "".join(f"\n  skipped: {caption!r}: {reason}" for caption, reason in skipped)


def _advice(stats: InstructionStats) -> str:
    """What to do when no caption gave a row, from the kinds of failures seen."""
    kinds = set(stats.failure_kinds)
    if RATE_LIMITED in kinds:
        return ("the endpoint is rate limiting: lower concurrency, wait and run again (answers received so far "
                "are cached)")
    if UNAVAILABLE in kinds:
        return ("the endpoint is down, overloaded or too slow: check that it is running, wait and run again "
                "(answers received so far are cached)")
    return ("check base_url, model and mode (chat for chat models, completion for models fine-tuned on the "
            "paper's format)")


# ---------------------------------------------------------------------------------------------------------
# CLIP filter and metrics
# ---------------------------------------------------------------------------------------------------------


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


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def load_encoder(name: str) -> ClipEncoder:
    """The CLIP encoder for weights file `name`, kept between runs and placed by ComfyUI's model manager."""
    weights = clip_weights_path(name)
    device = mm.get_torch_device()
    precision = "fp16" if mm.should_use_fp16(device) else "fp32"
    key = (str(weights.resolve()), _stamp(weights), _stamp(weights.with_suffix(".json")), precision)
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

    def forget(patcher: comfy.model_patcher.ModelPatcher, unpatch_all: bool) -> None:
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


def to_tensor(source) -> torch.Tensor:
    """Any row image (PIL, path, bytes) as a ComfyUI IMAGE [1, H, W, 3] in [0, 1]."""
    pixels = np.asarray(open_image(source).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).unsqueeze(0)


def clip_square(image: torch.Tensor, preprocess: dict) -> torch.Tensor:
    """[1, H, W, 3] -> [1, S, S, 3] with the model's own resize, so images of any size stack into one batch."""
    size = preprocess["size"]
    pixels = image.permute(0, 3, 1, 2)
    if preprocess["resize_mode"] == "squash":
        pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
    else:
        pixels = clip_filter.center_crop(clip_filter.resize_shorter_side(pixels, size), size)
    return pixels.permute(0, 2, 3, 1)


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
    try:
        return (clip_square(to_tensor(row.input_image), preprocess),
                clip_square(to_tensor(row.edited_image), preprocess))
    except DECODE_ERRORS as error:
        if skipped is None:
            raise
        skipped.append((index, f"image does not decode ({type(error).__name__}: {str(error)[:200]})"))
        return None


def check_finite(**settings: float) -> None:
    """NaN passes ComfyUI's min/max checks and every comparison; refuse it (and inf) by the setting's name."""
    for name, value in settings.items():
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")


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


# ---------------------------------------------------------------------------------------------------------
# Datasets on disk
# ---------------------------------------------------------------------------------------------------------


def output_root() -> Path:
    return Path(folder_paths.get_output_directory()).resolve()


def save_rows(rows: Sequence[EditRow], name: str, fmt: str, image_format: str) -> tuple[str, int, int]:
    """Writes (or resumes) dataset `name` inside the output folder: (path relative to it, new rows, total)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    missing = sum(1 for r in rows if r.input_image is None or r.edited_image is None)
    if missing:
        raise ValueError(f"{missing} of {len(rows)} rows have no images: connect the rows through "
                         "P2PPairGenerator (and CLIPDirectionFilter) before saving")
    root = output_root()
    bar = comfy.utils.ProgressBar(max(len(rows), 1))
    written = 0
    try:
        writer = open_writer(root, name, fmt, image_format=image_format)
    except WriterBusyError as error:
        raise ValueError(str(error)) from None
    # The writer keeps every row added before an interrupt or a failed write; a rerun skips them.
    try:
        with writer:
            for index, row in enumerate(rows):
                mm.throw_exception_if_processing_interrupted()
                written += writer.add(row)
                bar.update_absolute(index + 1, len(rows))
    except OSError as error:
        where = writer.path.relative_to(root).as_posix()
        raise ValueError(
            f"could not write the dataset output/{where}: {write_failure(error)}. The {len(writer)} rows saved "
            "before are complete and kept; free space and run again: only the missing rows are added"
        ) from error
    return writer.path.relative_to(root).as_posix(), written, len(writer)


# Said when a save ends with no rows: `datasets` (5.x) cannot load an empty split, so diffusers' training
# script fails on such a folder with "doesn't contain any data files"; this is the pack's word on why.
EMPTY_DATASET_NOTE = (". The dataset has no rows yet: datasets.load_dataset and diffusers' train_instruct_pix2pix.py "
                      "refuse an empty dataset. Save rows into it first (fewer pairs dropped by CLIPDirectionFilter "
                      "with lower thresholds?)")


def _looks_like_dataset(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".parquet"
    if any((path / name).is_file() for name in (*MANIFEST_NAMES, SEEDS_NAME)):
        return True
    # A bounded look: this runs for every entry of the output folder whenever the node list is built.
    return any(p.suffix == ".parquet" for folder in (path, path / "data") if folder.is_dir()
               for p in islice(folder.iterdir(), _PARQUET_SCAN_LIMIT))


def dataset_choices() -> list[str]:
    """Datasets in the output and input folders (two levels deep), as `output/<name>` or `input/<name>`."""
    found = []
    for root_name in DATASET_ROOTS:
        root = Path(folder_paths.get_directory_by_type(root_name))
        if root.is_dir():
            found += [f"{root_name}/{rel}" for rel in _datasets_under(root)]
    return found or [NO_FILE]


def _datasets_under(root: Path, depth: int = 2) -> list[str]:
    found = []
    for entry in sorted(islice(root.iterdir(), _SCAN_LIMIT)):
        if entry.name.startswith((".", "_")) or entry.name == CACHE_DIR:
            continue
        if entry.is_symlink() and not entry.resolve().is_relative_to(root.resolve()):
            continue  # loading refuses it anyway; listing it would mean looking outside ComfyUI's folders
        if _looks_like_dataset(entry):
            found.append(entry.name)
        elif entry.is_dir() and depth > 1:
            found += [f"{entry.name}/{rel}" for rel in _datasets_under(entry, depth - 1)]
    return found


def resolve_dataset(choice: str, override: str) -> Path:
    """`override` if given, else `choice`: `output/<name>`, `input/<name>`, or a bare name (output, then input)."""
    name = (override or "").strip() or choice
    if not name or name == NO_FILE:
        raise ValueError("no dataset chosen: pick one from the list or type its name into dataset_override")
    head, _, rest = name.replace("\\", "/").partition("/")
    roots = [head] if head in DATASET_ROOTS and rest else list(DATASET_ROOTS)
    relative = rest if head in DATASET_ROOTS and rest else name
    for root_name in roots:
        path = resolve_inside(folder_paths.get_directory_by_type(root_name), relative)
        if path.exists():
            return path
    raise FileNotFoundError(f"no dataset {name!r} in ComfyUI's {' or '.join(roots)} folder")


def dataset_stamp(path: Path) -> tuple:
    """Changes whenever a writer adds rows (shards, pair folders, manifest), so ComfyUI reloads then."""
    candidates = [path, *(path / name for name in MANIFEST_NAMES), path / SEEDS_NAME, path / "data"]
    return tuple(_stamp(p) for p in candidates)


def load_dataset_rows(path: Path, fmt: str, max_rows: int) -> tuple[str, list[EditRow]]:
    fmt = detect_format(path) if fmt == "auto" else fmt
    rows = list(islice(iter_rows(path, fmt), max_rows or None))
    return fmt, rows


# LoadEditDataset's previews: at most this many pixels per output batch (16 MP = 192 MB as float32), and per
# image; a dataset of huge photos gets smaller previews instead of an out-of-memory kill.
PREVIEW_BATCH_PIXELS = 16_000_000
PREVIEW_IMAGE_PIXELS = 4_000_000


def load_preview(sources: Sequence, count: int) -> torch.Tensor:
    """The first `count` images as one IMAGE batch, each shrunk to the preview budget right after decoding.

    Every image's size is checked before it is decoded (records.open_image refuses one over the dataset pixel
    budget), and images are decoded one at a time, so memory stays near one image plus the bounded batch.
    """
    chosen = [s for s in list(sources)[:count] if s is not None]
    if not chosen:
        return torch.zeros(0, 64, 64, 3)
    budget = min(PREVIEW_IMAGE_PIXELS, PREVIEW_BATCH_PIXELS // len(chosen))
    images = []
    for source in chosen:
        mm.throw_exception_if_processing_interrupted()
        images.append(_preview_image(source, budget))
    return preview_batch(images, len(images))


def _preview_image(source, budget: int) -> Image.Image:
    image = open_image(source)
    width, height = image.size
    scale = math.sqrt(budget / (width * height))
    if scale < 1.0:
        image = image.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.Resampling.LANCZOS)
    return image.convert("RGB")


def preview_batch(sources: Sequence, limit: int) -> torch.Tensor:
    """The first `limit` images as one IMAGE batch, at the first image's size; empty when none."""
    images = [open_image(s).convert("RGB") for s in list(sources)[:limit] if s is not None]
    if not images:
        return torch.zeros(0, 64, 64, 3)
    size = images[0].size
    same = [im if im.size == size else im.resize(size, Image.Resampling.LANCZOS) for im in images]
    return torch.cat([to_tensor(im) for im in same])


__all__ = [
    "caption_file_choices",
    "clip_weight_choices",
    "collect_captions",
    "dataset_choices",
    "edit_metrics",
    "endpoint_from",
    "filter_rows",
    "load_dataset_rows",
    "load_encoder",
    "preview_batch",
    "resolve_dataset",
    "run_instructions",
    "sampling_from",
    "save_rows",
]
