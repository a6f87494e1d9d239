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

from .paths import open_dataset_file, read_dataset_bytes

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


# The most pixels a dataset image may have. PIL reads only the header on open, so the size is known before
# any pixel is decoded: a 25 KB PNG can claim 8192x8192 (200 MB decoded, 800 MB as a float preview), and a few
# of them killed the server. 64 MP is 8000x8000, far above any training resolution; raise it with the
# environment variable for huge source photos.
MAX_IMAGE_PIXELS_ENV = "IP2P_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
# Image files are read whole only to copy them into a dataset; no real image file is near this.
MAX_IMAGE_FILE_BYTES = 1024 * 1024 * 1024


class ImageTooLargeError(ValueError):
    """An image whose header claims more pixels than a dataset image may have (a decompression bomb?)."""


def max_image_pixels() -> int:
    try:
        return max(1, int(os.environ.get(MAX_IMAGE_PIXELS_ENV, DEFAULT_MAX_IMAGE_PIXELS)))
    except ValueError:
        return DEFAULT_MAX_IMAGE_PIXELS


def check_pixels(image: Image.Image, what: str = "an image") -> Image.Image:
    """`image` (opened, not decoded) if its header's size is within the pixel budget; refused otherwise."""
    width, height = image.size
    budget = max_image_pixels()
    if width * height > budget:
        raise ImageTooLargeError(
            f"{what} is {width}x{height} ({width * height / 1e6:.1f} megapixels), more than the "
            f"{budget / 1e6:g} megapixels a dataset image may have, so it was not decoded (a decompression "
            f"bomb?); resize the image, or raise the limit with the environment variable {MAX_IMAGE_PIXELS_ENV}"
        )
    return image


def open_header(data: bytes, what: str = "an image") -> Image.Image:
    """Encoded bytes opened lazily (header only) and checked against the pixel budget."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # PIL's own guard, at twice its warning size
        raise ImageTooLargeError(f"{what}: {error}") from None
    return check_pixels(image, what)


def open_image(source: ImageSource, what: str | None = None) -> Image.Image:
    """Any image source as a decoded PIL image, its size checked before decoding.

    Files are read through paths.open_dataset_file: a regular file, inside its dataset when the path carries
    one (paths.DatasetPath), opened without blocking.
    """
    if isinstance(source, Image.Image):
        # Readers hand out lazily opened images: check before the first access decodes them.
        return check_pixels(source, what or "an image")
    if isinstance(source, bytes | bytearray | memoryview):
        image = open_header(bytes(source), what or "an image")
        image.load()
        return image
    if isinstance(source, str | os.PathLike):
        with open_dataset_file(source) as handle:
            try:
                image = Image.open(handle)
            except Image.DecompressionBombError as error:
                raise ImageTooLargeError(f"{what or _file_label(source)}: {error}") from None
            check_pixels(image, what or _file_label(source))
            image.load()  # while the handle is open; PIL keeps the pixels, not the file
            return image
    raise TypeError(f"not an image: {type(source).__name__}; give a PIL image, a file path or encoded bytes")


def _file_label(path: str | os.PathLike) -> str:
    root = getattr(path, "dataset_root", None)
    if root is not None:
        try:
            return f"the image {Path(path).relative_to(root).as_posix()!r} of the dataset {root}"
        except ValueError:
            pass
    return f"the image {Path(path).name!r}"


# PIL format names by the file suffixes writers accept.
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


def encoded_format(data: bytes) -> str | None:
    """The PIL format name of encoded image bytes, or None when PIL cannot identify them."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def encode_image(source: ImageSource, fmt: str) -> bytes:
    """The image encoded as `fmt` ("PNG", "JPEG", ...).

    Files and bytes already in `fmt` are passed through untouched, so copying a JPEG dataset does not
    recompress it. JPEG is written at quality 100 without chroma subsampling, like the reference generator.
    """
    fmt = fmt.upper()
    raw = raw_bytes(source)
    if raw is not None and encoded_format(raw) == fmt:
        # Passed through undecoded, still checked: a copied dataset must not carry a bomb on to its readers.
        open_header(raw, _file_label(source) if isinstance(source, str | os.PathLike) else "an image")
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
        return read_dataset_bytes(source, max_bytes=MAX_IMAGE_FILE_BYTES)
    return None
