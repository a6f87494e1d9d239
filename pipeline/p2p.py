"""Prompt-to-Prompt image pairs on ComfyUI's machinery, as InstructPix2Pix generated its training data.

For every caption pair (input caption, output caption) and every sample, the source image (input caption) and
the edited image (output caption) are denoised together in one model batch laid out as
`[source_1..source_K, edited_1..edited_K]`:
- both images of a sample start from the same noise and receive the same ancestral noise at every step;
- each sample has its own p ~ U(p_min, p_max) and cfg ~ U(cfg_min, cfg_max); CFG is applied per row;
- at step i of N, while p > i / (N - 1), every self-attention layer of the edited image uses the source's
  queries and keys with its own values: attention(q_src, k_src, v_edit) (algorithms/p2p_attention.py). That is
  one call of ComfyUI's optimized attention over the whole batch; no attention matrix is ever built here.

The sharing is an attn1 replace patch on a clone of the MODEL (`patch_sharing`), so the caller's model is
never modified, earlier attn1 replace patches still run (they receive the rewritten q and k), and attention
overrides set by other nodes still apply. On CPU, where ComfyUI's default kernel builds the attention matrix,
`sharing_model` selects PyTorch's fused kernel through such an override. The patch reads the step from the
`sample_sigmas`/`sigmas` that ComfyUI's sampler puts into transformer_options, and the batch layout from
`cond_or_uncond`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import comfy.k_diffusion.sampling
import comfy.ldm.modules.attention
import comfy.model_management
import comfy.samplers
import comfy.utils
import latent_preview
import numpy as np
import torch
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..algorithms.p2p_attention import (
    CFG_RANGE,
    P_RANGE,
    AttentionFn,
    blocks_src_index,
    sample_p2p_params,
    shared_attention,
    sharing_on,
)
from ..algorithms.seeds import row_seed
from ..dataset.instructions import excerpt
from ..dataset.pixels import tensor_to_image
from ..dataset.records import EditRow
from . import memory
from .attention import with_fused_attention
from .edit import SamplingSettings, decode, encode_text, sigmas_for
from .guider import matching_text
from .loading import is_ip2p
from .noise import SharedNoise, shared_noise_sampler_object

LATENT_SCALE = 8

BlockKey = tuple[str, int, int]


# ---------------------------------------------------------------------------------------------------------
# Inputs: caption pairs and the per-sample plan
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionPair:
    input_caption: str
    output_caption: str
    instruction: str = ""
    group: str = ""


@dataclass(frozen=True)
class P2PSettings:
    samples_per_pair: int = 4
    steps: int = 20
    width: int = 512
    height: int = 512
    seed: int = 0
    p_range: tuple[float, float] = P_RANGE
    cfg_range: tuple[float, float] = CFG_RANGE
    sampler_name: str = "euler_ancestral"
    scheduler: str = "normal"
    batch_size: int = 4
    negative: str = ""


@dataclass(frozen=True)
class SamplePlan:
    """One sample: which caption pair, its noise seed, its sharing fraction p and its CFG scale."""

    pair: int
    seed: int
    p: float
    cfg: float


def parse_caption_pairs(text: str) -> list[CaptionPair]:
    """One pair per line: `input caption || output caption` with an optional `|| instruction`."""
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = [part.strip() for part in line.split("||")]
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            raise ValueError(f"caption_pairs line {number} ({line.strip()[:60]!r}) is not "
                             "'input caption || output caption || instruction' (the instruction may be left out)")
        pairs.append(CaptionPair(parts[0], parts[1], parts[2] if len(parts) == 3 else ""))
    return pairs


# Why a row was skipped; stable labels, counted per label (the detail goes into the list of skipped rows).
EMPTY_CAPTION = "empty input or output caption"
TEXT_REFUSED = "caption refused by the text encoder"
NOT_FINITE = "images not finite (NaN or infinite values)"


@dataclass(frozen=True)
class SkippedRow:
    """A row of the input that gave no pairs, and why. One bad row must not cost the rest of the batch."""

    caption: str
    label: str
    detail: str = ""

    def as_list(self) -> list[str]:
        return [excerpt(self.caption), f"{self.label}: {self.detail}" if self.detail else self.label]


def pairs_from_rows(rows: Sequence[EditRow]) -> tuple[list[CaptionPair], list[SkippedRow]]:
    """Caption pairs of the rows another node made; rows with an empty caption are skipped, not fatal."""
    pairs, skipped = [], []
    for row in rows:
        if not row.input_caption.strip() or not row.output_caption.strip():
            skipped.append(SkippedRow(row.input_caption or row.output_caption, EMPTY_CAPTION))
            continue
        pairs.append(CaptionPair(row.input_caption, row.output_caption, row.instruction, row.group))
    return pairs, skipped


def screen_pairs(clip, pairs: Sequence[CaptionPair]) -> tuple[list[CaptionPair], list[SkippedRow]]:
    """The pairs whose captions the text encoder accepts, and the others with the encoder's reason.

    Each caption is encoded once here and the result dropped: holding every embedding of a large chunk would
    cost more memory than the second, batched encoding costs time. Without a CLIP nothing is screened: the
    generation then refuses the missing CLIP itself, for every pair.
    """
    if clip is None:
        return list(pairs), []
    refusals: dict[str, str] = {}
    usable, skipped = [], []
    for pair in pairs:
        for caption in (pair.input_caption, pair.output_caption):
            if caption not in refusals:
                refusals[caption] = _refusal(clip, caption)
        reason = refusals[pair.input_caption] or refusals[pair.output_caption]
        if reason:
            skipped.append(SkippedRow(pair.input_caption, TEXT_REFUSED, reason))
        else:
            usable.append(pair)
    return usable, skipped


def _refusal(clip, caption: str) -> str:
    """The text encoder's refusal of `caption` (too long, too many CLIP windows), or "" when it is accepted."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    try:
        encode_text(clip, caption)
    except ValueError as error:
        return str(error)
    return ""


def plan_samples(pair_count: int, settings: P2PSettings) -> list[SamplePlan]:
    """Deterministic per-sample parameters: seed + global sample index, p and cfg from a seed-keyed generator.

    Sample n always gets the same seed, p and cfg for a given node seed, whatever the batch size.
    """
    count = pair_count * settings.samples_per_pair
    generator = torch.Generator().manual_seed(row_seed(settings.seed))
    params = sample_p2p_params(count, generator, settings.p_range, settings.cfg_range)
    return [
        SamplePlan(pair=n // settings.samples_per_pair, seed=row_seed(settings.seed, n),
                   p=float(params.p[n]), cfg=float(params.cfg[n]))
        for n in range(count)
    ]


def check_settings(settings: P2PSettings) -> None:
    for name, (low, high) in (("p", settings.p_range), ("cfg", settings.cfg_range)):
        # NaN passes every comparison below (and ComfyUI's min/max checks) and would give NaN images.
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"{name}_min and {name}_max must be finite numbers, got {low} and {high}")
        if low > high:
            raise ValueError(f"{name}_min ({low}) is larger than {name}_max ({high}); swap them")
    if settings.width % LATENT_SCALE or settings.height % LATENT_SCALE:
        raise ValueError(f"width and height must be multiples of {LATENT_SCALE}, "
                         f"got {settings.width}x{settings.height}")
    if settings.samples_per_pair < 1 or settings.steps < 1 or settings.batch_size < 1:
        raise ValueError("samples_per_pair, steps and batch_size must be at least 1")


def check_t2i_unet(model) -> None:
    """Prompt-to-Prompt here needs a 4-channel SD-family UNet; InstructPix2Pix models draw no pairs."""
    if model is None:
        raise ValueError("no MODEL: connect the MODEL output of Load Checkpoint (a text-to-image model)")
    if is_ip2p(model):
        raise ValueError("the MODEL is an InstructPix2Pix model (8 input channels); the pairs are drawn by a "
                         "text-to-image model. Load the base text-to-image checkpoint (e.g. Stable Diffusion 1.5) "
                         "with Load Checkpoint and connect that MODEL")
    if not isinstance(model.model.diffusion_model, UNetModel):
        raise ValueError(f"{type(model.model.diffusion_model).__name__} models are not supported: self-attention "
                         "sharing needs a Stable Diffusion UNet (SD1.x, SD2.x or SDXL)")
    channels = model.model.model_config.unet_config.get("in_channels")
    if channels != 4:
        raise ValueError(f"expected a 4-channel text-to-image UNet, got {channels} input channels")


# ---------------------------------------------------------------------------------------------------------
# Attention sharing patch
# ---------------------------------------------------------------------------------------------------------


def self_attention_keys(diffusion_model: UNetModel) -> list[BlockKey]:
    """(block name, block number, transformer index) of every transformer block, as ComfyUI names them."""
    groups = [("input", list(diffusion_model.input_blocks)), ("output", list(diffusion_model.output_blocks))]
    if diffusion_model.middle_block is not None:
        groups.append(("middle", [diffusion_model.middle_block]))
    keys = []
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    keys += [(name, number, index) for index in range(len(layer.transformer_blocks))]
    return keys


def step_index(sigma: float, schedule: torch.Tensor) -> int:
    """The 0-based step whose interval [schedule[i+1], schedule[i]] holds sigma (schedule: N+1 descending).

    Intermediate model calls of multi-stage samplers (heun, dpm_2, ...) count as the step they belong to.
    """
    steps = schedule.numel() - 1
    reached = int((schedule[:-1] >= sigma * (1.0 - 1e-5)).sum())
    return min(max(reached - 1, 0), max(steps - 1, 0))


class ShareSchedule:
    """Which edited rows share their source's attention at the current model call.

    `p` holds one value per sample of the model batch. The model input is one or more chunks (CFG conds,
    see `cond_or_uncond`), each laid out `[sources; edits]` of len(p) rows each. The row index is computed
    once per model call and cached, so attention layers do not wait on the device.
    """

    def __init__(self, p: Sequence[float]) -> None:
        self.p = [float(value) for value in p]
        self._sigmas: torch.Tensor | None = None
        self._step = 0
        self._schedule_ref: torch.Tensor | None = None
        self._schedule = torch.zeros(0)
        self._indices: dict[tuple, torch.Tensor | None] = {}

    def current_step(self, options: dict) -> tuple[int, int]:
        sigmas, schedule = options.get("sigmas"), options.get("sample_sigmas")
        if sigmas is None or schedule is None:
            raise ValueError("Prompt-to-Prompt sharing runs only inside a ComfyUI sampler (no sample_sigmas in "
                             "transformer_options)")
        if schedule is not self._schedule_ref:
            self._schedule_ref, self._schedule = schedule, schedule.detach().float().cpu()
            self._sigmas = None
        if sigmas is not self._sigmas:
            self._sigmas, self._step = sigmas, step_index(float(sigmas.reshape(-1)[0]), self._schedule)
        return self._step, self._schedule.numel() - 1

    def sharing(self, options: dict) -> tuple[bool, ...]:
        step, steps = self.current_step(options)
        return tuple(sharing_on(step, steps, p) for p in self.p)

    def src_index(self, options: dict, batch: int, device: torch.device) -> torch.Tensor | None:
        """Long [batch] on `device` (row -> row whose q, k it uses), or None when no row shares."""
        share = self.sharing(options)
        chunks = max(len(options.get("cond_or_uncond", [0])), 1)
        key = (share, batch, chunks, str(device))
        if key not in self._indices:
            self._indices[key] = self._build_index(share, batch, chunks, device)
        return self._indices[key]

    def _build_index(self, share: tuple[bool, ...], batch: int, chunks: int, device) -> torch.Tensor | None:
        if not any(share):
            return None
        samples = len(self.p)
        if batch != chunks * 2 * samples:
            raise ValueError(f"Prompt-to-Prompt sharing expected {chunks} chunk(s) of {2 * samples} rows "
                             f"([sources; edits]), got a batch of {batch}")
        shared = blocks_src_index(batch, chunks)
        rows = torch.arange(batch)
        edit_shares = torch.tensor([False] * samples + list(share)).repeat(chunks)
        return torch.where(edit_shares, shared, rows).to(device)


class SharedSelfAttention:
    """attn1 replace patch running algorithms/p2p_attention.shared_attention: edited rows take their source's q and
    k; one fused attention call for the batch.

    `previous` is the attn1 replace patch this one displaces (it then gets the rewritten q and k);
    `attn_fn(q, k, v, heads)` replaces ComfyUI's optimized attention (tests pass an explicit softmax).
    """

    def __init__(self, schedule: ShareSchedule, previous: Callable | None = None,
                 attn_fn: AttentionFn | None = None) -> None:
        self.schedule = schedule
        self.previous = previous
        self.attn_fn = attn_fn

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        index = self.schedule.src_index(extra_options, q.shape[0], q.device)
        return shared_attention(q, k, v, extra_options["n_heads"], index, self.attention(extra_options))

    def attention(self, extra_options: dict) -> AttentionFn:
        """What attends once the rows have their shared q and k: the displaced patch, the caller's attn_fn, or
        ComfyUI's optimized attention (looked up at call time: ComfyUI picks it at start-up, packs may swap it)."""
        if self.previous is not None:
            return lambda q, k, v, heads: self.previous(q, k, v, extra_options)  # noqa: ARG005 (ComfyUI's callback signature)
        if self.attn_fn is not None:
            return self.attn_fn
        attention = comfy.ldm.modules.attention.optimized_attention
        return lambda q, k, v, heads: attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                                transformer_options=extra_options)


def sharing_model(model, p: Sequence[float]):
    """The model the pairs are sampled with: sharing patched, attention on a fused kernel where ComfyUI's
    default would build the attention matrix (CPU); `model` itself is untouched."""
    return patch_sharing(with_fused_attention(model), p)


def patch_sharing(model, p: Sequence[float], attn_fn: AttentionFn | None = None):
    """A clone of `model` whose self-attention shares per `p` (one value per sample); `model` is untouched."""
    patched = model.clone()
    schedule = ShareSchedule(p)
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    for name, number, index in self_attention_keys(patched.model.diffusion_model):
        previous = existing.get((name, number, index), existing.get((name, number)))
        patched.set_model_attn1_replace(SharedSelfAttention(schedule, previous, attn_fn), name, number, index)
    return patched


# ---------------------------------------------------------------------------------------------------------
# Guidance with one CFG scale per row
# ---------------------------------------------------------------------------------------------------------


class P2PGuider(comfy.samplers.CFGGuider):
    """CFG with a scale per batch row, through ComfyUI's own cond batching and CFG hooks.

    Mirrors comfy.samplers.sampling_function (calc-cond-batch override, pre- and post-CFG functions) with
    a [B, 1, ...] tensor as cond_scale; the unconditional branch always runs (no cfg == 1 shortcut).
    """

    def set_cfg(self, cfg) -> None:  # type: ignore[override]
        self.cfg = torch.as_tensor(cfg, dtype=torch.float32).flatten()

    def predict_noise(self, x, timestep, model_options=None, seed=None):  # noqa: ARG002 (ComfyUI's callback signature)
        # Checked once per model call so a cancel lands within one step, whatever the sampler.
        comfy.model_management.throw_exception_if_processing_interrupted()
        model_options = model_options if model_options is not None else {}
        conds = [self.conds.get("positive"), self.conds.get("negative")]
        if "sampler_calc_cond_batch_function" in model_options:
            args = {"conds": conds, "input": x, "sigma": timestep, "model": self.inner_model,
                    "model_options": model_options}
            out = model_options["sampler_calc_cond_batch_function"](args)
        else:
            out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        scale = self.row_scales(x)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            args = {"conds": conds, "conds_out": out, "cond_scale": scale, "timestep": timestep, "input": x,
                    "sigma": timestep, "model": self.inner_model, "model_options": model_options}
            out = fn(args)
        return comfy.samplers.cfg_function(self.inner_model, out[0], out[1], scale, x, timestep,
                                           model_options=model_options, cond=conds[0], uncond=conds[1])

    def row_scales(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.numel() != x.shape[0]:
            raise ValueError(f"{self.cfg.numel()} CFG scales for a batch of {x.shape[0]}")
        return self.cfg.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))


def stack_conditioning(per_row: Sequence[list]) -> list:
    """One conditioning whose embedding has one row per entry (each a batch-1 ComfyUI conditioning).

    Embeddings of different token counts are repeated to a common length, as ComfyUI itself does when it
    batches conds (attention over repeated keys and values is unchanged).
    """
    embeddings = [cond[0][0] for cond in per_row]
    length = int(np.lcm.reduce([e.shape[1] for e in embeddings]))
    embedding = torch.cat([e.repeat(1, length // e.shape[1], 1) for e in embeddings])
    options = {}
    pooled = [cond[0][1].get("pooled_output") for cond in per_row]
    if all(p is not None for p in pooled):
        options["pooled_output"] = torch.cat(pooled)
    return [[embedding, options]]


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------


@dataclass
class P2PResult:
    rows: list[EditRow]
    input_images: torch.Tensor
    edited_images: torch.Tensor
    skipped: list[SkippedRow] = field(default_factory=list)

    def stats(self, pairs: int, skipped_before: Sequence[SkippedRow] = ()) -> dict:
        """The counts as plain data (the node's ui output, read by the headless builder)."""
        everything = [*skipped_before, *self.skipped]
        counts: dict[str, int] = {}
        for row in everything:
            counts[row.label] = counts.get(row.label, 0) + 1
        return {"pairs": pairs, "rows": len(self.rows), "skipped": counts,
                "skipped_rows": [row.as_list() for row in everything]}


class PairProgress:
    """One progress bar over all batches; the preview shows a sample's source and edit side by side."""

    def __init__(self, model, total_steps: int) -> None:
        self.bar = comfy.utils.ProgressBar(total_steps)
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        self.done = 0

    def callback(self, samples: int, steps: int) -> Callable:
        start = self.done
        self.done += steps

        def update(step, x0, x, total_steps):  # noqa: ARG001 (ComfyUI's callback signature)
            preview = None
            if self.previewer is not None:
                pair = torch.cat([x0[:1], x0[samples:samples + 1]], dim=-1)
                preview = self.previewer.decode_latent_to_preview_image("JPEG", pair)
            self.bar.update_absolute(start + step + 1, None, preview)

        return update


def fit_batch_size(model, requested: int, latent_shape: Sequence[int]) -> int:
    """Samples per model batch (2 images x 2 CFG branches each) that fit the free memory, at most `requested`."""
    device = model.load_device
    free = comfy.model_management.get_free_memory(device) - max(0, model.model_size() - model.loaded_size())
    batch = requested
    while batch > 1 and model.model.memory_required([4 * batch, *latent_shape]) * 1.5 > free:
        batch = max(1, batch // 2)
    return batch


def sample_batch(model, positive: list, negative: list, plans: Sequence[SamplePlan], sigmas: torch.Tensor,
                 settings: P2PSettings, latent_shape: Sequence[int], callback=None) -> torch.Tensor:
    """Latents `[sources; edits]` of one model batch."""
    guider = P2PGuider(sharing_model(model, [plan.p for plan in plans]))
    guider.set_conds(positive, negative)
    guider.set_cfg([plan.cfg for plan in plans] * 2)
    noise = SharedNoise([plan.seed for plan in plans], latent_shape)
    start = noise.draw()
    sampler = shared_noise_sampler_object(settings.sampler_name, noise, sigmas)
    samples = memory.run_out_of_memory_safe(lambda: guider.sample(
        start, torch.zeros_like(start), sampler, sigmas, callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=plans[0].seed),
        "the pair generation", memory.P2P_ADVICE)
    return samples.to(comfy.model_management.intermediate_device())


@dataclass
class _Run:
    """What every batch of one generate_pairs call shares."""

    model: object
    clip: object
    vae: object
    pairs: Sequence[CaptionPair]
    settings: P2PSettings
    negative: list
    sigmas: torch.Tensor
    latent_shape: tuple[int, int, int]
    progress: PairProgress
    embeddings: dict[str, list]


@torch.no_grad()
def generate_pairs(model, clip, vae, pairs: Sequence[CaptionPair], settings: P2PSettings,
                   allow_empty: bool = False) -> P2PResult:
    """`settings.samples_per_pair` image pairs per caption pair, in caption-pair order.

    A sample whose images come out non-finite is skipped (listed in the result), not fatal. No pairs is an
    error unless `allow_empty` (the rows came from another node, which may have had none to give).
    """
    check_t2i_unet(model)
    check_settings(settings)
    if not pairs and not allow_empty:
        raise ValueError("no caption pairs: connect `rows` (e.g. from GenerateEditInstructions) or fill in "
                         "`caption_pairs`")
    if vae is None:
        raise ValueError("no VAE: connect the VAE output of Load Checkpoint")
    if not pairs:
        empty = torch.zeros(0, settings.height, settings.width, 3)
        return P2PResult([], empty, empty.clone())
    plans = plan_samples(len(pairs), settings)
    channels = model.get_model_object("latent_format").latent_channels
    latent_shape = (channels, settings.height // LATENT_SCALE, settings.width // LATENT_SCALE)
    batch = fit_batch_size(model, settings.batch_size, latent_shape)
    memory.check_sampling(model, latent_shape, "the pair generation", memory.P2P_ADVICE, rows=2)
    run = _Run(model, clip, vae, pairs, settings, negative=matching_text(model, encode_text(clip, settings.negative)),
               sigmas=sigmas_for(model, SamplingSettings(steps=settings.steps, scheduler=settings.scheduler)),
               latent_shape=latent_shape, progress=PairProgress(model, -(-len(plans) // batch) * settings.steps),
               embeddings={})
    results = [generate_batch(run, plans[start:start + batch]) for start in range(0, len(plans), batch)]
    return P2PResult([row for batch_result in results for row in batch_result.rows],
                     torch.cat([r.input_images for r in results]), torch.cat([r.edited_images for r in results]),
                     [skip for r in results for skip in r.skipped])


def generate_batch(run: _Run, plans: Sequence[SamplePlan]) -> P2PResult:
    count = len(plans)
    pairs = [run.pairs[plan.pair] for plan in plans]
    captions = [pair.input_caption for pair in pairs] + [pair.output_caption for pair in pairs]
    positive = stack_conditioning(encode_captions(run.clip, captions, run.embeddings))
    latents = sample_batch(run.model, positive, run.negative, plans, run.sigmas, run.settings, run.latent_shape,
                           run.progress.callback(count, run.settings.steps))
    images = decode(run.vae, latents)
    sources, edits = images[:count], images[count:]
    # A sample that diverged (fp16 overflow, a model patch gone wrong) is dropped alone, with its seed named.
    finite = [bool(torch.isfinite(sources[n]).all() and torch.isfinite(edits[n]).all()) for n in range(count)]
    keep = [n for n in range(count) if finite[n]]
    rows = [pair_row(pairs[n], plans[n], sources[n], edits[n]) for n in keep]
    skipped = [SkippedRow(pairs[n].input_caption, NOT_FINITE, f"seed {plans[n].seed}") for n in range(count)
               if not finite[n]]
    index = torch.tensor(keep, dtype=torch.long)
    return P2PResult(rows, sources.index_select(0, index), edits.index_select(0, index), skipped)


def encode_captions(clip, captions: Sequence[str], cache: dict[str, list]) -> list[list]:
    """Conditioning per caption; `cache` keeps only this batch's captions (a pair's samples are consecutive)."""
    current = {caption: cache.get(caption) or encode_text(clip, caption) for caption in dict.fromkeys(captions)}
    cache.clear()
    cache.update(current)
    return [current[caption] for caption in captions]


def pair_row(pair: CaptionPair, plan: SamplePlan, source: torch.Tensor, edited: torch.Tensor) -> EditRow:
    return EditRow(input_caption=pair.input_caption, instruction=pair.instruction,
                   output_caption=pair.output_caption, input_image=tensor_to_image(source),
                   edited_image=tensor_to_image(edited), seed=plan.seed, p=plan.p, cfg=plan.cfg, group=pair.group)
