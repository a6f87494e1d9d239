"""Rows from any workflow (EditRowsFromImages) and a dataset at a glance (DatasetInfo). The work is in
pipeline/rows.py."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..pipeline import rows as work
from .errors import named_errors
from .types import EditDataset, EditRows

CATEGORY = "InstructPix2Pix/dataset"


def lines_input(name: str, what: str, optional: bool) -> io.String.Input:
    return io.String.Input(name, multiline=True, default="", optional=optional,
                           tooltip=f"{what}, one per line: a single line serves every image, otherwise exactly one "
                                   "line per edited image, in the batch's order (blank lines are ignored).")


class EditRowsFromImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditRowsFromImages",
            display_name="Edit Rows From Images (InstructPix2Pix)",
            category=CATEGORY,
            description=(
                "Turns edits made with any nodes into dataset rows: input images, their edited versions and the "
                "instructions (optionally captions and a mask) become rows for Save Edit Dataset. Pixels are "
                "stored exactly as Save Image writes them, so a saved PNG dataset holds the very images of the "
                "graph. Running the same graph again and saving to the same dataset adds no duplicates."
            ),
            inputs=[
                io.Image.Input("input_images", tooltip="The images before the edit; a single image serves a whole "
                                                       "batch of edits of it."),
                io.Image.Input("edited_images", tooltip="The edited images, one row each, at the input images' "
                                                        "size."),
                lines_input("instructions", "Edit instructions", optional=False),
                lines_input("input_captions", "Optional captions of the input images", optional=True),
                lines_input("output_captions", "Optional captions of the edited images", optional=True),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional edit region(s) stored with the rows: one mask for all or one per "
                                      "edited image, at the images' size."),
            ],
            outputs=[
                EditRows.Output(display_name="rows", tooltip="One row per edited image, for Save Edit Dataset "
                                                             "(or CLIP Direction Filter)."),
                io.String.Output(display_name="summary", tooltip="How many rows, their size, caption pairs, masks."),
            ],
        )

    @classmethod
    @named_errors("EditRowsFromImages")
    def execute(cls, input_images, edited_images, instructions, input_captions="", output_captions="",
                mask=None) -> io.NodeOutput:
        texts = work.Texts(instructions, input_captions, output_captions)
        rows, summary = work.rows_from_images(input_images, edited_images, texts, mask)
        return io.NodeOutput(rows, summary, ui={"text": (summary,)})


class DatasetInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DatasetInfo",
            display_name="Dataset Info (InstructPix2Pix)",
            category=CATEGORY,
            description=(
                "Describes an edit dataset on disk without decoding an image, so it is quick on any size: format, "
                "row count, size on disk, columns, whether rows carry masks, and the CLIP scores (count, mean, "
                "min, median, max) with a histogram of each, clip_sim_dir first."
            ),
            inputs=[
                EditDataset.Input("dataset", tooltip="A dataset from Load Edit Dataset or Save Edit Dataset."),
                io.Int.Input("bins", default=40, min=1, max=1000, tooltip="Bars per histogram."),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="Format, rows, size, columns, masks, CLIP scores."),
                io.Image.Output(display_name="histogram",
                                tooltip=f"{work.HISTOGRAM_WIDTH}x{work.HISTOGRAM_HEIGHT}: one histogram per CLIP "
                                        "score (a note where the dataset has none)."),
                io.Int.Output(display_name="rows", tooltip="Rows in the dataset."),
                io.Int.Output(display_name="scored_rows", tooltip="Rows with a clip_sim_dir score."),
            ],
        )

    @classmethod
    @named_errors("DatasetInfo")
    def execute(cls, dataset, bins) -> io.NodeOutput:
        info = work.dataset_info(dataset, bins)
        return io.NodeOutput(info.report, info.histogram, info.rows, info.scored, ui={"text": (info.report,)})


NODES = [EditRowsFromImages, DatasetInfo]
