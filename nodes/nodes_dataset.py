"""Dataset nodes: LLM-written edit instructions, the CLIP direction filter and metrics, saving and loading
datasets. The work is in pipeline/instructions.py, clip_filter.py and datasets.py over dataset/ (pure code)."""

from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from ..algorithms.seeds import REQUEST_SEED_MAX
from ..dataset.clip_filter import ClipFilterConfig
from ..dataset.formats import DIFFUSERS, FORMATS, READ_FORMATS
from ..dataset.instruction_format import MODES
from ..dataset.node_stats import STATS_KEY, clip_filter_stats, save_stats
from ..pipeline import clip_filter as clip_work
from ..pipeline import datasets, instructions
from .errors import named_errors
from .types import EditDataset, EditRows
from .widgets import seed_input

CATEGORY = "InstructPix2Pix/dataset"
EXAMPLE_CAPTIONS = (
    "a photograph of a girl riding a horse\n"
    "an oil painting of a lighthouse at dusk\n"
    "a cozy living room with a fireplace"
)


def clip_weights_input() -> io.Combo.Input:
    return io.Combo.Input(
        "clip_weights", options=clip_work.clip_weight_choices(), default=clip_work.DEFAULT_CLIP_WEIGHTS,
        tooltip="CLIP weights from models/clip_filter. The paper used OpenAI's ViT-L/14: put its ViT-L-14.pt "
                "there (nothing is downloaded). Other open_clip weights need a <same name>.json open_clip "
                "model config beside them.")


def threshold_input(name: str, default: float, what: str) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=-1.0, max=1.0, step=0.01, round=0.001,
                          tooltip=f"{what} Pairs below this are dropped (inclusive). -1 keeps all.")


class GenerateEditInstructions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GenerateEditInstructions",
            display_name="Generate Edit Instructions (LLM)",
            category=CATEGORY,
            description=(
                "Asks a language model for one edit per caption, as the paper did with fine-tuned GPT-3: each "
                "caption becomes (caption, instruction, edited caption). Works with any OpenAI-compatible "
                "server (OpenAI, vLLM, llama.cpp, Ollama). Answers are cached on disk, so a rerun or a run "
                "after a crash or a cancel never pays twice. The API key is never a widget: it comes from an "
                "environment variable or a key file, so it cannot end up in saved workflows or images."
            ),
            inputs=[
                io.String.Input("captions", multiline=True, default=EXAMPLE_CAPTIONS,
                                tooltip="Image captions, one per line. Ignored when captions_file is set."),
                io.Combo.Input("captions_file", options=instructions.caption_file_choices(),
                               default=instructions.NO_FILE,
                               tooltip="A .txt (one caption a line), .jsonl (field 'caption') or .csv (column "
                                       "'caption') file from ComfyUI's input folder; 'none' uses the captions "
                                       "text."),
                io.String.Input("base_url", default="http://127.0.0.1:8000/v1",
                                tooltip="The OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM), "
                                        "http://127.0.0.1:11434/v1 (Ollama), https://api.openai.com/v1. A key is "
                                        "only sent to api.openai.com, this machine, and the hosts listed in "
                                        "user/__ip2p_keys/allowed_hosts.txt, and to other machines only over "
                                        "https."),
                io.String.Input("model", default="Qwen/Qwen2.5-7B-Instruct",
                                tooltip="The model name the endpoint serves (vLLM: the model it was started with; "
                                        "OpenAI: e.g. gpt-4o-mini)."),
                io.Combo.Input("mode", options=list(reversed(MODES)), default="chat",
                               tooltip="chat: any chat model, taught the paper's format by a few examples. "
                                       "completion: the paper's raw prompt (caption + '\\n##\\n') for a model "
                                       "fine-tuned on it."),
                io.String.Input("api_key_env", default="OPENAI_API_KEY",
                                tooltip="NAME of the environment variable holding the key (not the key). Only "
                                        "names ending in API_KEY are read. Local servers need no key."),
                io.String.Input("api_key_file", default="",
                                tooltip="Optional: name of a file holding the key, in ComfyUI's user/__ip2p_keys/ "
                                        "folder (never served over HTTP). Takes precedence over api_key_env."),
                io.Float.Input("temperature", default=0.7, min=0.0, max=2.0, step=0.05,
                               tooltip="Sampling temperature; the paper used 0.7."),
                io.Float.Input("frequency_penalty", default=0.1, min=-2.0, max=2.0, step=0.05,
                               tooltip="Frequency penalty; the paper used 0.1."),
                io.Int.Input("max_tokens", default=256, min=16, max=4096,
                             tooltip="Longest answer; the paper used 256. An answer cut at this length is asked "
                                     "again, then reported."),
                io.Int.Input("concurrency", default=4, min=1, max=64,
                             tooltip="Requests in flight at once. Raise for fast servers, lower on rate limits."),
                io.Boolean.Input("cache", default=True,
                                 tooltip="Keep every answer in output/ip2p_cache/instructions.jsonl and reuse it: "
                                         "reruns cost nothing, and a cancel or crash loses nothing."),
                seed_input("request_seed", maximum=REQUEST_SEED_MAX, control_after_generate=False, optional=True,
                           tooltip="0 sends no seed. Another value is sent as the request seed and is a new "
                                   "cache entry: the way to draw different edits for the same captions."),
            ],
            outputs=[
                EditRows.Output(display_name="rows", tooltip="(caption, instruction, edited caption) rows, no "
                                                             "images yet: feed them to P2PPairGenerator."),
                io.String.Output(display_name="summary", tooltip="How many rows, cache hits, drops and failures."),
            ],
        )

    @classmethod
    @named_errors("GenerateEditInstructions")
    def execute(cls, captions, captions_file, base_url, model, mode, api_key_env, api_key_file, temperature,
                frequency_penalty, max_tokens, concurrency, cache, request_seed=0) -> io.NodeOutput:
        caption_list = instructions.collect_captions(captions, captions_file)
        endpoint = instructions.endpoint_from(base_url, model, api_key_env, api_key_file)
        sampling = instructions.sampling_from(temperature, frequency_penalty, max_tokens, request_seed)
        rows, summary, stats = instructions.run_instructions(caption_list, endpoint, mode, sampling, concurrency, cache)
        # The counts travel as data beside the text, so readers never parse the wording.
        return io.NodeOutput(rows, summary, ui={"text": (summary,), STATS_KEY: [stats]})


class CLIPDirectionFilter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CLIPDirectionFilter",
            display_name="CLIP Direction Filter (InstructPix2Pix)",
            category=CATEGORY,
            description=(
                "The paper's filter for generated pairs: keeps a pair when CLIP finds each image matches its "
                "caption (sim_0, sim_1), the change between the images follows the change between the captions "
                "(sim_dir) and the images stay alike (sim_image); then keeps the best top_k by sim_dir per "
                "caption pair. The scores are stored in the rows."
            ),
            inputs=[
                EditRows.Input("rows", tooltip="Rows with images, e.g. from P2PPairGenerator."),
                clip_weights_input(),
                threshold_input("min_sim_0", 0.2, "Input image vs input caption (paper 0.2)."),
                threshold_input("min_sim_1", 0.2, "Edited image vs edited caption (paper 0.2)."),
                threshold_input("min_sim_dir", 0.2, "Image change vs caption change (paper 0.2)."),
                threshold_input("min_sim_image", 0.7, "Input image vs edited image (reference code 0.7; the "
                                                      "paper's text says 0.75)."),
                io.Int.Input("top_k", default=4, min=0, max=10000,
                             tooltip="Most pairs kept per caption pair, best sim_dir first (paper 4). 0 keeps "
                                     "every pair that passes."),
                io.Int.Input("batch_size", default=32, min=1, max=1024,
                             tooltip="Pairs scored per CLIP call; lower it if memory is short."),
            ],
            outputs=[
                EditRows.Output(display_name="rows", tooltip="The kept rows with clip_sim_* filled in, grouped by "
                                                             "caption pair, best first."),
                io.Image.Output(display_name="input_images", tooltip="Input images of the kept rows."),
                io.Image.Output(display_name="edited_images", tooltip="Edited images of the kept rows."),
                io.String.Output(display_name="report", tooltip="How many pairs each threshold dropped."),
            ],
        )

    @classmethod
    @named_errors("CLIPDirectionFilter")
    def execute(cls, rows, clip_weights, min_sim_0, min_sim_1, min_sim_dir, min_sim_image, top_k,
                batch_size) -> io.NodeOutput:
        config = ClipFilterConfig(min_sim_0, min_sim_1, min_sim_dir, min_sim_image, top_k or None)
        kept, report = clip_work.filter_rows(rows, clip_weights, config, batch_size)
        inputs = datasets.preview_batch([r.input_image for r in kept], len(kept))
        edits = datasets.preview_batch([r.edited_image for r in kept], len(kept))
        stats = clip_filter_stats(len(rows), len(kept), len({r.group for r in rows}))
        return io.NodeOutput(kept, inputs, edits, report, ui={"text": (report,), STATS_KEY: [stats]})


class CLIPEditMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CLIPEditMetrics",
            display_name="CLIP Edit Metrics (InstructPix2Pix)",
            category=CATEGORY,
            description=(
                "The paper's evaluation metrics for any edit: CLIP direction similarity (how well the change "
                "in the image follows the change in the caption) and CLIP image similarity (how much of the "
                "input is kept), plus each image's agreement with its caption. Means over the batch."
            ),
            inputs=[
                io.Image.Input("input_images", tooltip="The images before the edit (one image serves a whole "
                                                       "batch of edits)."),
                io.Image.Input("edited_images", tooltip="The edited images, in the same order."),
                io.String.Input("input_caption", multiline=True, default="a photograph of a house",
                                tooltip="Caption of the input image."),
                io.String.Input("output_caption", multiline=True, default="a photograph of a house in winter",
                                tooltip="Caption the edited image should match."),
                clip_weights_input(),
                io.Int.Input("batch_size", default=32, min=1, max=1024, tooltip="Images per CLIP call."),
            ],
            outputs=[
                io.Float.Output(display_name="sim_0", tooltip="Mean cos(input image, input caption)."),
                io.Float.Output(display_name="sim_1", tooltip="Mean cos(edited image, output caption)."),
                io.Float.Output(display_name="sim_dir", tooltip="Mean CLIP direction similarity."),
                io.Float.Output(display_name="sim_image", tooltip="Mean CLIP image similarity."),
                io.String.Output(display_name="report", tooltip="The four means, labelled."),
            ],
        )

    @classmethod
    @named_errors("CLIPEditMetrics")
    def execute(cls, input_images, edited_images, input_caption, output_caption, clip_weights,
                batch_size) -> io.NodeOutput:
        scores, report = clip_work.edit_metrics(clip_weights, input_images, edited_images, input_caption,
                                           output_caption, batch_size)
        means = [float(getattr(scores, name).mean()) for name in ("sim_0", "sim_1", "sim_dir", "sim_image")]
        return io.NodeOutput(*means, report, ui=ui.PreviewText(report))


class SaveEditDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaveEditDataset",
            display_name="Save Edit Dataset (InstructPix2Pix)",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Writes rows as a dataset folder inside ComfyUI's output folder. Resumable: saving to the same "
                "name again adds only the rows that are not there yet, and a crash or cancel keeps every row "
                "written so far. diffusers: parquet that datasets.load_dataset and diffusers' "
                "train_instruct_pix2pix.py read as they are; public: the columns of the paper's published "
                "dataset; reference: the paper's folder layout (seeds.json + pair folders)."
            ),
            inputs=[
                EditRows.Input("rows", tooltip="Rows with images (from CLIPDirectionFilter or P2PPairGenerator)."),
                io.String.Input("dataset_name", default="ip2p_dataset",
                                tooltip="Folder name inside the output folder (subfolders with /). Absolute "
                                        "paths and '..' are refused."),
                io.Combo.Input("format", options=list(FORMATS), default=DIFFUSERS,
                               tooltip="diffusers (parquet: input_image, edit_prompt, edited_image), public "
                                       "(parquet: original_prompt, original_image, edit_prompt, edited_prompt, "
                                       "edited_image) or reference (the paper's layout)."),
                io.Combo.Input("image_format", options=["png", "jpg"], default="png",
                               tooltip="png is lossless; jpg (quality 100) is what the reference wrote. The "
                                       "reference layout always gets the .jpg files its code reads; png adds "
                                       "lossless copies beside them."),
            ],
            outputs=[
                io.String.Output(display_name="path", tooltip="The dataset folder, relative to the output folder."),
                io.Int.Output(display_name="rows_written", tooltip="Rows added by this run (existing ones are "
                                                                   "skipped)."),
                EditDataset.Output(display_name="dataset", tooltip="The dataset on disk, for training nodes."),
            ],
        )

    @classmethod
    @named_errors("SaveEditDataset")
    def execute(cls, rows, dataset_name, format, image_format) -> io.NodeOutput:
        path, written, total = datasets.save_rows(rows, dataset_name, format, image_format)
        handle = {"path": str(datasets.output_root() / path), "format": format, "mapping": None}
        text = f"{written} new rows, {total} in total, in output/{path} ({format})"
        if total == 0:
            text += datasets.EMPTY_DATASET_NOTE
        # The counts travel as data beside the text (dataset/node_stats.py), so readers never parse the wording.
        stats = save_stats(path, format, written, total)
        return io.NodeOutput(path, written, handle, ui={"text": (text,), STATS_KEY: [stats]})


class LoadEditDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadEditDataset",
            display_name="Load Edit Dataset (InstructPix2Pix)",
            category=CATEGORY,
            description=(
                "Opens an instruction-editing dataset from ComfyUI's input or output folder: the formats this "
                "pack writes, the paper's released parquet, MagicBrush, HQ-Edit, UltraEdit, hub-style folders of "
                "parquet shards, a plain folder of image pairs, and any parquet through a column mapping. Gives "
                "a handle for training, the rows (read lazily: opening a huge dataset costs little memory) and "
                "previews of the first pairs."
            ),
            inputs=[
                io.Combo.Input("dataset", options=datasets.dataset_choices(),
                               tooltip="Datasets found in the output and input folders (dataset folders, "
                                       ".parquet files, folders of hub shards or of image pairs)."),
                io.Combo.Input("format", options=["auto", *READ_FORMATS], default="auto",
                               tooltip="auto detects the layout from the files and columns (mapped when a "
                                       "column_mapping is given); or name it."),
                io.Int.Input("max_rows", default=0, min=0, max=10_000_000,
                             tooltip="Rows in the rows output: the first max_rows, or all when 0. Rows are read "
                                     "only when a node uses them, so even all rows of a huge dataset cost little "
                                     "memory here."),
                io.Int.Input("preview_count", default=4, min=0, max=64,
                             tooltip="How many of the first pairs to return as preview images (only these are "
                                     "decoded)."),
                io.String.Input("dataset_override", default="", optional=True,
                                tooltip="Type a dataset instead of picking one: 'output/<name>', 'input/<name>' "
                                        "or a bare name (looked up in output, then input). Useful for a dataset "
                                        "saved after the list was made."),
                io.String.Input("column_mapping", default="", optional=True,
                                tooltip="For a parquet dataset whose columns are not a known layout: which column "
                                        "holds what, e.g. input_image=source_img, edited_image=target_img, "
                                        "instruction=instruction, mask=mask_img (input_image, edited_image and "
                                        "instruction required; mask, input_caption, output_caption optional). "
                                        "Empty: detect the layout."),
            ],
            outputs=[
                EditDataset.Output(display_name="dataset", tooltip="{path, format, mapping} handle for training "
                                                                   "and Dataset Info."),
                EditRows.Output(display_name="rows", tooltip="The rows (up to max_rows), read when used."),
                io.Image.Output(display_name="input_images", tooltip="Inputs of the first preview_count rows."),
                io.Image.Output(display_name="edited_images", tooltip="Edits of the first preview_count rows."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, dataset, dataset_override="", **kwargs):  # noqa: ARG003 (ComfyUI's callback signature)
        # Reload when a writer added rows since the last run, although the inputs did not change.
        try:
            return datasets.dataset_stamp(datasets.resolve_dataset(dataset, dataset_override))
        except (ValueError, OSError):
            return float("nan")  # never equal to itself: run, and let execute report the problem

    @classmethod
    @named_errors("LoadEditDataset")
    def execute(cls, dataset, format, max_rows, preview_count, dataset_override="",
                column_mapping="") -> io.NodeOutput:
        path = datasets.resolve_dataset(dataset, dataset_override)
        handle, rows = datasets.load_dataset_rows(path, format, max_rows, column_mapping)
        preview = rows[:preview_count]  # reads only these rows
        return io.NodeOutput(handle, rows,
                             datasets.load_preview([r.input_image for r in preview], preview_count),
                             datasets.load_preview([r.edited_image for r in preview], preview_count))


NODES = [GenerateEditInstructions, CLIPDirectionFilter, CLIPEditMetrics, SaveEditDataset, LoadEditDataset]
