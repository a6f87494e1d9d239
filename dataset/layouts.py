"""The column layouts of the instruction-editing datasets the field publishes, and the explicit column mapping.

One table, `LAYOUTS`, says for every known parquet layout which hub column feeds which EditRow field, which
columns identify it, how its masks are encoded and where the mapping came from. Readers (dataset/source.py) go
through this table only; the writers of the two writable parquet layouts (dataset/format_parquet.py) take
their columns from here too, so what we write and what we read cannot drift apart.

Masks have one internal convention: `EditRow.mask` is an image whose white (255) pixels mark where the edit
happened, black (0) where the image stays. A layout that encodes its masks differently says so in `mask` and
the reader converts (MASK_WHITE: already ours; MASK_TRANSPARENT: MagicBrush's, see below).

Split selection for hub-style shard folders lives with the file listing (dataset/format_parquet.py,
`parquet_files`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DIFFUSERS = "diffusers"
PUBLIC = "public"
MAGICBRUSH = "magicbrush"
HQ_EDIT = "hq-edit"
ULTRAEDIT = "ultraedit"
MAPPED = "mapped"
PAIRS = "pairs"

# The white region of the mask is the edited region (our own convention, UltraEdit's, the pairs folder's).
MASK_WHITE = "white"
# MagicBrush: the mask image is the source image as RGBA whose edited region is transparent (alpha 0); an
# image without alpha is read by the card's words "(white region)", i.e. like MASK_WHITE.
MASK_TRANSPARENT = "transparent"

# Cell kinds: how a column's values become a field's value.
IMAGE, STRING, INT, FLOAT = "image", "string", "int", "float"


@dataclass(frozen=True)
class Column:
    name: str  # the column's name in the parquet file
    field: str  # EditRow attribute ("sample_id": the row key's second half; "key": part of the group, see Layout)
    kind: str  # image | string | int | float


@dataclass(frozen=True)
class Layout:
    name: str
    columns: tuple[Column, ...]  # every column the reader takes, in the published order
    required: frozenset[str]  # the columns that identify the layout (a file must have all of them)
    mask: str = MASK_WHITE
    # Columns joined (with the layout name) into EditRow.group, so rows get stable keys where the captions
    # alone do not tell them apart; empty: the group is derived from the captions (EditRow's default).
    group_from: tuple[str, ...] = ()
    source: str = ""  # where the mapping came from


# The columns the pack's own writers add to both writable layouts (round trip of everything an EditRow holds).
OWN_EXTRA_COLUMNS = (
    Column("mask", "mask", IMAGE),
    Column("group", "group", STRING),
    Column("seed", "seed", INT),
    Column("sample_id", "sample_id", INT),
    Column("p", "p", FLOAT),
    Column("cfg", "cfg", FLOAT),
    Column("clip_sim_0", "clip_sim_0", FLOAT),
    Column("clip_sim_1", "clip_sim_1", FLOAT),
    Column("clip_sim_dir", "clip_sim_dir", FLOAT),
    Column("clip_sim_image", "clip_sim_image", FLOAT),
)

# The writable layouts' columns: main columns first and in the published order (scripts that fall back to
# column positions still work), then ours. format_parquet.arrow_schema builds the written schema from these.
DIFFUSERS_COLUMNS = (
    Column("input_image", "input_image", IMAGE),
    Column("edit_prompt", "instruction", STRING),
    Column("edited_image", "edited_image", IMAGE),
    Column("input_caption", "input_caption", STRING),
    Column("output_caption", "output_caption", STRING),
    *OWN_EXTRA_COLUMNS,
)
PUBLIC_COLUMNS = (
    Column("original_prompt", "input_caption", STRING),
    Column("original_image", "input_image", IMAGE),
    Column("edit_prompt", "instruction", STRING),
    Column("edited_prompt", "output_caption", STRING),
    Column("edited_image", "edited_image", IMAGE),
    *OWN_EXTRA_COLUMNS,
)

# Ordered from the most specific to the least: detection takes the first layout whose required columns a file
# has, and tests/unit/test_dataset_layouts.py checks that each layout's hub columns match exactly one entry.
LAYOUTS: dict[str, Layout] = {
    ULTRAEDIT: Layout(
        ULTRAEDIT,
        (
            Column("source_caption", "input_caption", STRING),
            Column("edit_prompt", "instruction", STRING),
            Column("target_caption", "output_caption", STRING),
            Column("source_image", "input_image", IMAGE),
            Column("edited_image", "edited_image", IMAGE),
            Column("mask_image", "mask", IMAGE),
            Column("idx", "seed", INT),
            # UltraEdit scores its pairs the way the paper's ClipSimilarity does (sim_0: source image vs source
            # caption, sim_1: edited image vs target caption, directional, image-image), named source/target.
            Column("clip_sim_source", "clip_sim_0", FLOAT),
            Column("clip_sim_target", "clip_sim_1", FLOAT),
            Column("clip_sim_dir", "clip_sim_dir", FLOAT),
            Column("clip_sim_image", "clip_sim_image", FLOAT),
        ),
        frozenset({"source_image", "edited_image", "edit_prompt", "source_caption", "target_caption"}),
        MASK_WHITE,
        source=(
            "dataset cards of BleachNick/UltraEdit_500k and BleachNick/UltraEdit (free-form: mask_image and "
            "edit_object are null columns) and BleachNick/UltraEdit_Region_Based_100k (mask_image is an Image): "
            "clip_sim_source, clip_sim_target, clip_sim_dir, clip_sim_image, dinov2_sim, ssim (float64), "
            "source_caption, target_caption (string), idx (int64), edit_prompt, edit_object (string), "
            "source_image, edited_image, mask_image (Image). Splits are FreeForm_*/RegionBase, no train. "
            "Mask: white = edit region (the UltraEdit repo's example.py seeds an all-white mask for a free-form "
            "edit). dinov2_sim, ssim and edit_object have no EditRow field and are not read."
        ),
    ),
    MAGICBRUSH: Layout(
        MAGICBRUSH,
        (
            Column("img_id", "key", STRING),
            Column("turn_index", "seed", INT),
            Column("source_img", "input_image", IMAGE),
            Column("mask_img", "mask", IMAGE),
            Column("instruction", "instruction", STRING),
            Column("target_img", "edited_image", IMAGE),
        ),
        # mask_img is not required: an early revision of the dataset had no mask column.
        frozenset({"img_id", "turn_index", "source_img", "instruction", "target_img"}),
        MASK_TRANSPARENT,
        group_from=("img_id", "turn_index"),
        source=(
            "dataset card of osunlp/MagicBrush: img_id (string, the COCO id), turn_index (int32), source_img, "
            "mask_img, target_img (Image), instruction (string); splits train and dev. No captions. Mask: the "
            "card says 'free-form mask image (white region)'; the authors' answer in OSU-NLP-Group/MagicBrush "
            "issue #10 says mask_img is the masked source image as RGBA whose edited region is transparent, "
            "possibly at another resolution than the source. So: alpha 0 = edit, resized to the source image; "
            "an image without alpha is taken as white = edit. img_id + turn_index are the row's group (one "
            "edit per turn), turn_index its seed."
        ),
    ),
    HQ_EDIT: Layout(
        HQ_EDIT,
        (
            Column("input", "input_caption", STRING),
            Column("input_image", "input_image", IMAGE),
            Column("edit", "instruction", STRING),
            Column("output", "output_caption", STRING),
            Column("output_image", "edited_image", IMAGE),
        ),
        frozenset({"input", "input_image", "edit", "output", "output_image"}),
        source=(
            "dataset card of UCSC-VLAA/HQ-Edit: input (string, description of the input image), input_image "
            "(Image), edit (string), inverse_edit (string, the edit back; not read), output (string), "
            "output_image (Image); split train. No masks, no scores."
        ),
    ),
    PUBLIC: Layout(
        PUBLIC,
        PUBLIC_COLUMNS,
        frozenset({"original_prompt", "original_image", "edit_prompt", "edited_prompt", "edited_image"}),
        source=(
            "dataset card of timbrooks/instructpix2pix-clip-filtered: original_prompt, original_image, "
            "edit_prompt, edited_prompt, edited_image; the extra columns are this pack's own"
        ),
    ),
    DIFFUSERS: Layout(
        DIFFUSERS,
        DIFFUSERS_COLUMNS,
        frozenset({"input_image", "edit_prompt", "edited_image"}),
        source=(
            "the column defaults of diffusers examples/instruct_pix2pix/train_instruct_pix2pix.py "
            "(--original_image_column input_image, --edit_prompt_column edit_prompt, --edited_image_column "
            "edited_image), e.g. fusing/instructpix2pix-1000-samples; the extra columns are this pack's own"
        ),
    ),
}

PARQUET_LAYOUTS = tuple(LAYOUTS)


def layout_of_columns(names: set[str] | frozenset[str]) -> str | None:
    """The first (most specific) known layout whose identifying columns are all among `names`."""
    for layout in LAYOUTS.values():
        if layout.required <= names:
            return layout.name
    return None


def describe_layouts() -> str:
    """The known layouts and their identifying columns, for error messages."""
    parts = []
    for name, layout in LAYOUTS.items():
        identifying = [column.name for column in layout.columns if column.name in layout.required]
        parts.append(f"{name}: {', '.join(identifying)}")
    return "; ".join(parts)


# -------------------------------------------------------------------------------------------------------------
# The explicit column mapping ("mapped" layout)
# -------------------------------------------------------------------------------------------------------------

REQUIRED_FIELDS = ("input_image", "edited_image", "instruction")
OPTIONAL_FIELDS = ("mask", "input_caption", "output_caption")
MAPPING_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
FIELD_KINDS = {"input_image": IMAGE, "edited_image": IMAGE, "mask": IMAGE,
               "instruction": STRING, "input_caption": STRING, "output_caption": STRING}
# Parquet column names are free text, but a mapping travels in workflow files and node inputs: a short,
# printable name is all a real dataset needs, and anything else is refused before it reaches a message or a
# file read.
MAX_COLUMN_NAME = 128
MAX_MAPPING_TEXT = 4096
_COLUMN_NAME = re.compile(r"^[^\x00-\x1f\x7f,=]+$")
_EXAMPLE = "input_image=source_img, edited_image=target_img, instruction=instruction, mask=mask_img"


def parse_mapping(text: str) -> dict[str, str]:
    """`field=column, ...` as {field: column}; the fields input_image, edited_image and instruction are
    required, mask, input_caption and output_caption optional. Raises ValueError naming the bad part."""
    if not isinstance(text, str):
        raise ValueError(f"the column mapping must be text such as {_EXAMPLE!r}, got {type(text).__name__}")
    if len(text) > MAX_MAPPING_TEXT:
        raise ValueError(f"the column mapping is {len(text)} characters long, more than {MAX_MAPPING_TEXT}; "
                         f"write it as {_EXAMPLE!r}")
    mapping: dict[str, str] = {}
    for part in text.replace("\n", ",").split(","):
        if not part.strip():
            continue
        field, sep, column = part.partition("=")
        if not sep:
            raise ValueError(f"the column mapping part {part.strip()!r} has no '='; write field=column, such as "
                             f"{_EXAMPLE!r}")
        field, column = field.strip(), column.strip()
        if field in mapping:
            raise ValueError(f"the column mapping names the field {field!r} twice")
        mapping[field] = column
    return check_mapping(mapping)


def check_mapping(mapping: object) -> dict[str, str]:
    """A mapping from an untrusted place (a workflow's dataset handle) re-checked: a dict of known field
    names to short plain column names, with every required field. Returns a fresh plain dict."""
    if not isinstance(mapping, dict):
        raise ValueError(f"the column mapping must be a dict of field -> column name, got {type(mapping).__name__}")
    checked: dict[str, str] = {}
    for field, column in mapping.items():
        if not isinstance(field, str) or field not in MAPPING_FIELDS:
            shown = field if isinstance(field, str) and len(field) <= MAX_COLUMN_NAME else type(field).__name__
            raise ValueError(f"the column mapping names the unknown field {shown!r}; the fields are "
                             f"{', '.join(MAPPING_FIELDS)}")
        if not isinstance(column, str):
            raise ValueError(f"the column mapping gives the field {field!r} a {type(column).__name__}, not a column "
                             "name")
        if not column:
            raise ValueError(f"the column mapping gives the field {field!r} no column name")
        if len(column) > MAX_COLUMN_NAME:
            raise ValueError(f"the column mapping gives the field {field!r} a column name of {len(column)} "
                             f"characters, more than {MAX_COLUMN_NAME}")
        if not _COLUMN_NAME.match(column) or column != column.strip():
            raise ValueError(f"the column mapping gives the field {field!r} the column name {column!r}, which "
                             "holds control characters, ',', '=' or surrounding spaces")
        checked[field] = column
    missing = [field for field in REQUIRED_FIELDS if field not in checked]
    if missing:
        raise ValueError(f"the column mapping lacks the field(s) {', '.join(missing)}; it needs "
                         f"{', '.join(REQUIRED_FIELDS)} (and may give {', '.join(OPTIONAL_FIELDS)}), such as "
                         f"{_EXAMPLE!r}")
    return checked


def mapped_layout(mapping: dict[str, str]) -> Layout:
    """The Layout a checked mapping describes. Its masks are taken as white = edit (our convention)."""
    columns = tuple(Column(column, field, FIELD_KINDS[field]) for field, column in mapping.items())
    return Layout(MAPPED, columns, frozenset(mapping.values()), MASK_WHITE,
                  source="the column mapping given with the dataset")
