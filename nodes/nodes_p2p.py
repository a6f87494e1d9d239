"""Dataset creation: Prompt-to-Prompt image pairs from caption pairs (the paper's pair generator)."""

from __future__ import annotations

import comfy.samplers
from comfy_api.v0_0_2 import io

from ..dataset.instructions import skipped_text
from ..dataset.node_stats import STATS_KEY
from ..pipeline.p2p import P2PSettings, generate_pairs, pairs_from_rows, parse_caption_pairs, screen_pairs
from .errors import named_errors
from .types import EditRows
from .widgets import seed_input


class P2PPairGenerator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="P2PPairGenerator",
            display_name="Prompt-to-Prompt Pair Generator (InstructPix2Pix)",
            category="InstructPix2Pix/dataset",
            description=(
                "Draws before/after image pairs for an instruction-editing dataset, as the paper did: for each "
                "caption pair the input and output captions are sampled together from the same noise, and the "
                "edited image reuses the source image's self-attention for the first p of the steps, so the two "
                "images differ mostly where the captions differ. p and CFG are drawn per sample."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A text-to-image model (Load Checkpoint), e.g. Stable Diffusion "
                                                "1.5; not an InstructPix2Pix model."),
                io.Clip.Input("clip", tooltip="The model's text encoder."),
                io.Vae.Input("vae", tooltip="The model's VAE, to decode the pairs."),
                io.Int.Input("samples_per_pair", default=4, min=1, max=1000,
                             tooltip="Image pairs per caption pair, each with its own seed, p and CFG. The paper "
                                     "drew 100 and kept the best 4 after CLIP filtering."),
                io.Int.Input("steps", default=20, min=1, max=1000,
                             tooltip="Denoising steps. The paper used 100 Euler-ancestral steps."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8,
                             tooltip="Image width (512 for SD1.5, 1024 for SDXL)."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Image height."),
                seed_input(tooltip="Sample n uses seed + n for its noise; p and CFG are drawn from this seed, "
                                   "so a rerun gives the same pairs."),
                io.Float.Input("p_min", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Lowest fraction of steps that share attention. Higher p keeps the edited "
                                       "image closer to the source. Paper: p ~ U(0.1, 0.9)."),
                io.Float.Input("p_max", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="Highest fraction of steps that share attention."),
                io.Float.Input("cfg_min", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Lowest classifier-free guidance scale. Paper: cfg ~ U(7.5, 15)."),
                io.Float.Input("cfg_max", default=15.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Highest classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler_ancestral",
                               tooltip="Any ComfyUI sampler; both images get the same noise at every step. "
                                       "The paper used euler_ancestral."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                               tooltip="Any ComfyUI scheduler."),
                io.Int.Input("batch_size", default=4, min=1, max=256,
                             tooltip="Samples per model call (each is 2 images x 2 CFG branches). Lowered "
                                     "automatically when memory is short; results do not depend on it."),
                EditRows.Input("rows", optional=True,
                               tooltip="Caption pairs as dataset rows, e.g. from GenerateEditInstructions. A row "
                                       "the text encoder refuses (e.g. a caption far too long) is skipped, and "
                                       "listed with its reason in the node's text; the others go on."),
                io.String.Input("caption_pairs", multiline=True, default="", optional=True,
                                tooltip="Caption pairs typed in, one per line: "
                                        "'input caption || output caption || instruction' (instruction optional). "
                                        "Used together with `rows` when both are given."),
                io.String.Input("negative", multiline=True, default="", optional=True,
                                tooltip="Negative prompt for the unconditional branch (the paper used none)."),
            ],
            outputs=[
                EditRows.Output(display_name="rows", tooltip="One row per sample: captions, instruction, both "
                                                             "images, seed, p and cfg."),
                io.Image.Output(display_name="input_images", tooltip="The source images, in row order."),
                io.Image.Output(display_name="edited_images", tooltip="The edited images, in row order."),
            ],
        )

    @classmethod
    @named_errors("P2PPairGenerator")
    def execute(cls, model, clip, vae, rows=None, caption_pairs="", negative="", **kwargs) -> io.NodeOutput:
        # Rows made by another node may hold one bad caption among many: that row is skipped with its reason.
        # Pairs typed into caption_pairs are the user's own text: a bad one is refused, to be fixed right away.
        from_rows, skipped = pairs_from_rows(rows or [])
        from_rows, refused = screen_pairs(clip, from_rows)
        pairs = from_rows + parse_caption_pairs(caption_pairs or "")
        result = generate_pairs(model, clip, vae, pairs, settings_from(kwargs, negative), allow_empty=rows is not None)
        stats = result.stats(len(pairs) + len(skipped) + len(refused), [*skipped, *refused])
        text = summary_text(stats)
        return io.NodeOutput(result.rows, result.input_images, result.edited_images,
                             ui={"text": (text,), STATS_KEY: [stats]})


def summary_text(stats: dict) -> str:
    """What the node made and every row it skipped, by reason (the same counts as `stats`)."""
    text = f"{stats['rows']} image pairs from {stats['pairs']} caption pairs"
    if stats["skipped"]:
        text += f"; skipped by reason: {skipped_text(stats['skipped'])}"
        text += "".join(f"\n  skipped: {caption!r}: {reason}" for caption, reason in stats["skipped_rows"])
    return text


def settings_from(kwargs: dict, negative: str) -> P2PSettings:
    return P2PSettings(
        samples_per_pair=kwargs["samples_per_pair"], steps=kwargs["steps"], width=kwargs["width"],
        height=kwargs["height"], seed=kwargs["seed"], p_range=(kwargs["p_min"], kwargs["p_max"]),
        cfg_range=(kwargs["cfg_min"], kwargs["cfg_max"]), sampler_name=kwargs["sampler_name"],
        scheduler=kwargs["scheduler"], batch_size=kwargs["batch_size"], negative=negative or "")


NODES = [P2PPairGenerator]
