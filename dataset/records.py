"""The one row type every dataset format reads into and writes from, and the image helpers around it.

A row is one (input image, edited image) sample of one caption pair. Samples of the same caption pair share
`group`; within a group a sample is named by its seed. `(group, sample_id)` is the key writers use to write
every row exactly once, also across a crash and a resume.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from PIL import Image

# A decoded image, a path to an image file, or the encoded bytes of one (PNG, JPEG, ...).
ImageSource: TypeAlias = Image.Image | str | os.PathLike | bytes

SCORE_FIELDS = ("p", "cfg", "clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")

# Content ids must stay clear of real seeds (< 2**32 in the reference) and fit a signed int64 column.
_CONTENT_ID_BITS = 62


@dataclass
class EditRow:
    """One instruction-editing sample.

    `group` is the caption-pair id shared by all samples of one (input caption, instruction, output caption);
    left empty it is derived from those three strings, so the same captions always land in the same group.
    Images are PIL images, paths or encoded bytes; `open_image` turns any of them into a PIL image.
    """

    input_caption: str
    instruction: str
    output_caption: str
    input_image: ImageSource
    edited_image: ImageSource
    mask: ImageSource | None = None
    seed: int | None = None
    p: float | None = None
    cfg: float | None = None
    clip_sim_0: float | None = None
    clip_sim_1: float | None = None
    clip_sim_dir: float | None = None
    clip_sim_image: float | None = None
    group: str = ""

    def __post_init__(self) -> None:
        for name in ("input_caption", "instruction", "output_caption"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, "")
            elif not isinstance(value, str):
                raise TypeError(f"EditRow.{name} must be a string, got {type(value).__name__}")
        if self.seed is not None:
            self.seed = int(self.seed)
        for name in SCORE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, float(value))
        if not self.group:
            self.group = caption_group(self.input_caption, self.instruction, self.output_caption)

    def scores(self) -> dict[str, float | None]:
        return {name: getattr(self, name) for name in SCORE_FIELDS}


def caption_group(input_caption: str, instruction: str, output_caption: str) -> str:
    """A stable caption-pair id: the same three strings give the same id in every process and format."""
    text = "\x1f".join((input_caption, instruction, output_caption))
    return "c" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def sample_id(row: EditRow) -> int:
    """The row's name inside its group: its seed, or for a seedless row a number derived from its pixels.

    Deriving it from content keeps a resumed conversion of a seedless dataset (e.g. the public parquet one)
    idempotent: adding the same row twice is recognised as a duplicate.
    """
    if row.seed is not None:
        return row.seed
    digest = hashlib.blake2b(digest_size=16)
    for image in (row.input_image, row.edited_image):
        pil = open_image(image)
        digest.update(f"{pil.mode}:{pil.size}".encode())
        digest.update(pil.tobytes())
    return int.from_bytes(digest.digest()[:8], "big") >> (64 - _CONTENT_ID_BITS)


def row_key(row: EditRow) -> tuple[str, int]:
    return row.group, sample_id(row)


def open_image(source: ImageSource) -> Image.Image:
    """Any image source as a decoded PIL image (loading a single-frame file also closes its handle)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, bytes | bytearray | memoryview):
        image = Image.open(io.BytesIO(bytes(source)))
    elif isinstance(source, str | os.PathLike):
        image = Image.open(source)
    else:
        raise TypeError(f"not an image: {type(source).__name__}; give a PIL image, a file path or encoded bytes")
    image.load()
    return image


# PIL format names by the file suffixes writers accept.
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


def encoded_format(data: bytes) -> str | None:
    """The PIL format name of encoded image bytes, or None when PIL cannot identify them."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except (OSError, ValueError):
        return None


def encode_image(source: ImageSource, fmt: str) -> bytes:
    """The image encoded as `fmt` ("PNG", "JPEG", ...).

    Files and bytes already in `fmt` are passed through untouched, so copying a JPEG dataset does not
    recompress it. JPEG is written at quality 100 without chroma subsampling, like the reference generator.
    """
    fmt = fmt.upper()
    raw = raw_bytes(source)
    if raw is not None and encoded_format(raw) == fmt:
        return raw
    image = open_image(source)
    if fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=100, subsampling=0)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def raw_bytes(source: ImageSource) -> bytes | None:
    """The encoded bytes behind a file path or bytes source; None for a PIL image."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if isinstance(source, str | os.PathLike):
        return Path(source).read_bytes()
    return None
