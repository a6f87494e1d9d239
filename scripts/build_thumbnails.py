"""Builds the template thumbnails example_workflows/<name>.jpg: what each template makes, not its graph.

    .runtime/venv/bin/python scripts/build_thumbnails.py                      # illustrations unless a real
    .runtime/venv/bin/python scripts/build_thumbnails.py --checkpoint NAME    #   checkpoint is found / named

ComfyUI's template browser shows <name>.jpg beside <name>.json. Like core's templates, each thumbnail puts the
template's input image (ComfyUI's input/example.png, the image every template's Load Image names) beside the
result, with the instruction written above.

- With a real InstructPix2Pix checkpoint (`--checkpoint NAME` in models/checkpoints, or the first 8-channel
  safetensors found there that is not one of the pack's random test models), the edit templates of its family are
  run for real (through the headless edit command, on the template's own JSON) and the thumbnail shows the model's
  output, labelled with the checkpoint's name: an SD1.x checkpoint runs the three SD1.5 edit templates, an SDXL
  one (CosXL Edit) the SDXL template.
- Without one (the development machines hold only random test models, whose output is noise), the result
  panel is an ILLUSTRATION of the requested edit drawn with plain PIL operations (colour changes, snow, a
  sunset sky), and every such picture says so on its face.
- build_dataset and train are always illustrated: a dataset row (input image, instruction, edited image) and
  a fine-tuned model's edit; producing them for real takes an LLM, a text-to-image model and a training run.

Each file is a 512 x 512 JPEG of a few tens of KB.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont, ImageOps

PACK = Path(__file__).resolve().parent.parent
WORKFLOWS = PACK / "example_workflows"
SIDE = 512
PANEL = 244
BACKGROUND = (30, 32, 36)
TEXT = (236, 236, 236)
MUTED = (160, 164, 172)
ACCENT = (255, 196, 0)
RANDOM_MODEL_KEY = "comfyui_ip2p.random_model"  # safetensors metadata of the pack's random test models
CONV_IN = "diffusion_model.input_blocks.0.0.weight"
SIZE_EMBEDDING = "diffusion_model.label_emb.0.0.weight"  # SDXL's size embedding; SD1.x UNets have none


# --- where things are ---------------------------------------------------------------------------------------
def comfyui_folder(given: Path | None) -> Path | None:
    candidates = [given, os.environ.get("COMFYUI_PATH"), os.environ.get("COMFYUI_DIR"), PACK / ".runtime" / "ComfyUI"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "main.py").is_file():
            return Path(candidate)
    return None


def safetensors_header(path: Path) -> dict:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100_000_000:
            raise ValueError("header too large")
        return json.loads(handle.read(length))


def real_ip2p_checkpoints(folder: Path) -> list[str]:
    """Names (relative to models/checkpoints) of 8-channel safetensors that are not the pack's random models."""
    found = []
    for path in sorted(folder.rglob("*.safetensors")):
        try:
            header = safetensors_header(path)
        except (OSError, ValueError, struct.error):
            continue
        if is_random_model(path):
            continue
        shapes = [entry["shape"] for key, entry in header.items() if key.endswith(CONV_IN)]
        if shapes and len(shapes[0]) == 4 and shapes[0][1] == 8:
            found.append(path.relative_to(folder).as_posix())
    return found


def is_sdxl_checkpoint(path: Path) -> bool:
    try:
        return any(key.endswith(SIZE_EMBEDDING) for key in safetensors_header(path))
    except (OSError, ValueError, struct.error):
        return False


def is_random_model(path: Path) -> bool:
    try:
        return RANDOM_MODEL_KEY in safetensors_header(path).get("__metadata__", {})
    except (OSError, ValueError, struct.error):
        return False


def template(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def widgets(workflow: dict, node_type: str) -> list[list]:
    return [node.get("widgets_values") or [] for node in workflow["nodes"] if node["type"] == node_type]


def instruction_of(workflow: dict) -> str:
    """The instruction the template asks for: InstructEdit's first widget, or the non-empty CLIPTextEncode."""
    for values in widgets(workflow, "InstructEdit"):
        return values[0]
    texts = [values[0] for values in widgets(workflow, "CLIPTextEncode") if values and values[0].strip()]
    if not texts:
        raise SystemExit("the template names no instruction")
    return texts[0]


def input_image_name(workflow: dict) -> str:
    names = [values[0] for values in widgets(workflow, "LoadImage") if values]
    return names[0] if names else "example.png"


# --- the input picture ----------------------------------------------------------------------------------------
def fallback_picture() -> Image.Image:
    """A flat drawing in the spirit of ComfyUI's example.png, when no ComfyUI input folder is around."""
    image = Image.new("RGB", (768, 768), (94, 148, 255))
    draw = ImageDraw.Draw(image)
    for x, y in ((150, 90), (600, 110)):
        for dx in (-60, 0, 60):
            draw.ellipse((x + dx - 50, y - 30, x + dx + 50, y + 30), fill=(255, 255, 255))
    draw.pieslice((-300, 380, 1100, 1400), 180, 360, fill=(94, 255, 103))
    draw.rectangle((0, 760, 768, 768), fill=(94, 255, 103))
    draw.polygon(((300, 300), (470, 300), (420, 560), (350, 560)), fill=(120, 80, 60))
    draw.ellipse((250, 160, 520, 340), fill=(60, 140, 70))
    return image


def load_input(comfyui: Path | None, name: str) -> Image.Image:
    path = comfyui / "input" / name if comfyui else None
    if path and path.is_file():
        with Image.open(path) as image:
            return image.convert("RGB")
    print(f"note: no {name} in ComfyUI's input folder; drawing a stand-in picture", file=sys.stderr)
    return fallback_picture()


# --- illustrations: plain PIL operations ---------------------------------------------------------------------
def hue_mask(image: Image.Image, low: int, high: int, min_saturation: int = 60, min_value: int = 60) -> Image.Image:
    """255 where the hue (0..255 scale) lies in [low, high] with enough saturation and brightness."""
    h, s, v = image.convert("HSV").split()
    hue = h.point(lambda x: 255 if low <= x <= high else 0)
    sat = s.point(lambda x: 255 if x >= min_saturation else 0)
    val = v.point(lambda x: 255 if x >= min_value else 0)
    return ImageChops.multiply(ImageChops.multiply(hue, sat), val)


def sky_mask(image: Image.Image) -> Image.Image:
    """The sky: bright blue regions touching the top edge (flood-filled from it), plus the clouds inside."""
    blue = hue_mask(image, 130, 185, min_saturation=40, min_value=150)
    white = ImageOps.invert(hue_mask(image, 0, 255, min_saturation=12, min_value=0)).point(
        lambda x: 255 if x else 0)  # clouds: grey to white with hardly any colour (skin has more)
    bright = image.convert("L").point(lambda x: 255 if x > 200 else 0)
    candidate = ImageChops.lighter(blue, ImageChops.multiply(white, bright))
    marked = candidate.point(lambda x: 128 if x else 0)
    for x in range(0, marked.width, 4):
        if marked.getpixel((x, 0)) == 128:
            ImageDraw.floodfill(marked, (x, 0), 255)
    return marked.point(lambda x: 255 if x == 255 else 0)


def vertical_gradient(size: tuple[int, int], stops: list[tuple[float, tuple[int, int, int]]]) -> Image.Image:
    width, height = size
    column = Image.new("RGB", (1, height))
    for y in range(height):
        t = y / max(1, height - 1)
        for (t0, c0), (t1, c1) in itertools.pairwise(stops):
            if t0 <= t <= t1:
                f = (t - t0) / max(1e-6, t1 - t0)
                column.putpixel((0, y), tuple(round(a + (b - a) * f) for a, b in zip(c0, c1, strict=True)))
                break
    return column.resize((width, height))


def keep_shading(base: Image.Image, colour: Image.Image) -> Image.Image:
    """`colour` modulated by the base's own light and shade (so drawn or photographed detail stays)."""
    light = base.convert("L")
    mean = sum(i * n for i, n in enumerate(light.histogram())) / (light.width * light.height)
    gain = light.point(lambda x: max(0, min(255, round(128 + (x - mean) * 0.6))))
    return ImageChops.overlay(colour, Image.merge("RGB", (gain, gain, gain)))


def snowflakes(image: Image.Image, count: int, seed: int = 0) -> Image.Image:
    out = image.copy()
    draw = ImageDraw.Draw(out)
    rng = random.Random(seed)
    for _ in range(count):
        x, y, r = rng.uniform(0, out.width), rng.uniform(0, out.height), rng.uniform(1.5, 4.5)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 255, 255))
    return out.filter(ImageFilter.GaussianBlur(0.6))


def winter(image: Image.Image) -> Image.Image:
    """Snow on green and yellow-green ground, a grey winter sky, everything cooler, falling snow."""
    ground = hue_mask(image, 45, 120, min_saturation=50).filter(ImageFilter.GaussianBlur(2))
    snow = keep_shading(image, Image.new("RGB", image.size, (238, 244, 252)))
    out = Image.composite(snow, image, ground)
    sky = sky_mask(image).filter(ImageFilter.GaussianBlur(2))
    out = Image.composite(vertical_gradient(image.size, [(0, (150, 164, 184)), (1, (206, 214, 226))]), out, sky)
    grey = ImageOps.grayscale(out).convert("RGB")
    out = Image.blend(out, grey, 0.35)
    out = ImageChops.multiply(out, Image.new("RGB", image.size, (222, 234, 255)))
    return snowflakes(out, count=image.width * image.height // 2500)


def pink_sky(image: Image.Image, mask: Image.Image | None = None) -> Image.Image:
    mask = sky_mask(image) if mask is None else mask
    pink = vertical_gradient(image.size, [(0, (236, 120, 178)), (0.6, (255, 178, 206)), (1, (255, 214, 226))])
    clouds = image.convert("L").point(lambda x: 255 if x > 235 else 0).filter(ImageFilter.GaussianBlur(1))
    sky = Image.composite(Image.new("RGB", image.size, (255, 236, 244)), pink, clouds)
    return Image.composite(sky, image, mask)


def sunset(image: Image.Image) -> Image.Image:
    mask = sky_mask(image)
    box = mask.getbbox() or (0, 0, image.width, image.height // 2)
    stops = [(0, (58, 36, 110)), (0.35, (170, 60, 120)), (0.7, (250, 120, 60)), (1, (255, 200, 90))]
    sky = vertical_gradient(image.size, stops)
    sun_x, sun_y, radius = box[0] + (box[2] - box[0]) * 0.75, box[1] + (box[3] - box[1]) * 0.72, image.width * 0.09
    glow = Image.new("L", image.size, 0)
    ImageDraw.Draw(glow).ellipse((sun_x - radius * 2.2, sun_y - radius * 2.2, sun_x + radius * 2.2,
                                  sun_y + radius * 2.2), fill=150)
    glow = glow.filter(ImageFilter.GaussianBlur(radius))
    sky = Image.composite(Image.new("RGB", image.size, (255, 226, 150)), sky, glow)
    ImageDraw.Draw(sky).ellipse((sun_x - radius, sun_y - radius, sun_x + radius, sun_y + radius),
                                fill=(255, 244, 200))
    clouds = image.convert("L").point(lambda x: 255 if x > 235 else 0).filter(ImageFilter.GaussianBlur(1))
    sky = Image.composite(Image.new("RGB", image.size, (255, 170, 150)), sky, clouds)
    out = Image.composite(sky, image, mask)
    warm = ImageChops.multiply(out, Image.new("RGB", image.size, (255, 196, 160)))
    return Image.composite(out, warm, mask)  # the sky keeps its colours, the rest takes the evening light


def night(image: Image.Image) -> Image.Image:
    mask = sky_mask(image)
    sky = vertical_gradient(image.size, [(0, (8, 12, 40)), (1, (34, 44, 96))])
    draw = ImageDraw.Draw(sky)
    rng = random.Random(1)
    for _ in range(image.width * image.height // 4000):
        x, y = rng.uniform(0, image.width), rng.uniform(0, image.height)
        draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=(255, 255, 230))
    moon_x, moon_y, r = image.width * 0.82, image.height * 0.16, image.width * 0.06
    draw.ellipse((moon_x - r, moon_y - r, moon_x + r, moon_y + r), fill=(250, 246, 220))
    dark = ImageChops.multiply(image, Image.new("RGB", image.size, (70, 84, 150)))
    return Image.composite(sky, dark, mask)


# --- layout ---------------------------------------------------------------------------------------------------
def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for name in (("DejaVuSans-Bold.ttf", "Arial Bold.ttf") if bold else ("DejaVuSans.ttf", "Arial.ttf")):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: int, size: int, bold: bool = False):
    """The largest font (from `size` down) that fits `text` on one line of `width`."""
    while size > 10:
        face = font(size, bold)
        if draw.textlength(text, font=face) <= width:
            return face
        size -= 1
    return font(10, bold)


def centred(draw: ImageDraw.ImageDraw, x: float, y: float, text: str, face, fill=TEXT) -> None:
    draw.text((x, y), text, font=face, fill=fill, anchor="mt")


def square(image: Image.Image, side: int) -> Image.Image:
    return ImageOps.fit(image, (side, side), Image.LANCZOS)


def stamp(panel: Image.Image, text: str = "ILLUSTRATION") -> Image.Image:
    """A band across the bottom of a panel saying what it is."""
    out = panel.convert("RGBA")
    band = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(band)
    height = max(18, panel.height // 9)
    draw.rectangle((0, panel.height - height, panel.width, panel.height), fill=(0, 0, 0, 165))
    face = fit_text(draw, text, panel.width - 12, height - 6, bold=True)
    draw.text((panel.width / 2, panel.height - height / 2), text, font=face, fill=(*ACCENT, 255), anchor="mm")
    return Image.alpha_composite(out, band).convert("RGB")


def arrow(draw: ImageDraw.ImageDraw, x: float, y: float, size: float = 14) -> None:
    draw.ellipse((x - size, y - size, x + size, y + size), fill=BACKGROUND, outline=TEXT, width=2)
    draw.polygon(((x - size * 0.4, y - size * 0.5), (x + size * 0.55, y), (x - size * 0.4, y + size * 0.5)),
                 fill=TEXT)


def header(canvas: Image.Image, instruction: str) -> None:
    draw = ImageDraw.Draw(canvas)
    face = fit_text(draw, f"\u201c{instruction}\u201d", SIDE - 24, 34, bold=True)
    centred(draw, SIDE / 2, 30, f"\u201c{instruction}\u201d", face)


def footer(canvas: Image.Image, lines: list[tuple[str, tuple[int, int, int]]], top: int) -> None:
    draw = ImageDraw.Draw(canvas)
    y = top
    for text, colour in lines:
        face = fit_text(draw, text, SIDE - 24, 21, bold=colour == ACCENT)
        centred(draw, SIDE / 2, y, text, face, fill=colour)
        y += face.size + 14


def side_by_side(before: Image.Image, after: Image.Image, instruction: str, before_label: str, after_label: str,
                 notes: list[tuple[str, tuple[int, int, int]]]) -> Image.Image:
    canvas = Image.new("RGB", (SIDE, SIDE), BACKGROUND)
    header(canvas, instruction)
    top, gap = 92, SIDE - 2 * PANEL - 16
    canvas.paste(square(before, PANEL), (8, top))
    canvas.paste(after.resize((PANEL, PANEL), Image.LANCZOS), (8 + PANEL + gap, top))
    draw = ImageDraw.Draw(canvas)
    arrow(draw, SIDE / 2, top + PANEL / 2)
    label = font(20)
    centred(draw, 8 + PANEL / 2, top + PANEL + 10, before_label, label, fill=MUTED)
    centred(draw, 8 + PANEL * 1.5 + gap, top + PANEL + 10, after_label, label, fill=MUTED)
    footer(canvas, notes, top + PANEL + 58)
    return canvas


ILLUSTRATED = ("illustration: drawn with PIL, not model output", ACCENT)


def edit_panel(image: Image.Image, edited: Image.Image | None, illustrate: Callable[[Image.Image], Image.Image]):
    """(panel, label): the real edit when there is one, else the illustration, stamped."""
    if edited is not None:
        return edited, "edit"
    return stamp(square(illustrate(square(image, 512)), PANEL)), "edit (illustration)"


def masked_input(image: Image.Image) -> Image.Image:
    """The input as the mask editor shows it: the painted region (the sky) tinted."""
    picture = square(image, 512)
    tint = Image.blend(picture, Image.new("RGB", picture.size, (40, 40, 40)), 0.55)
    return Image.composite(tint, picture, sky_mask(picture))


# --- the six templates ------------------------------------------------------------------------------------------
def thumb_instruct_edit(image: Image.Image, edited: Image.Image | None, model_note: str | None) -> Image.Image:
    instruction = instruction_of(template("instruct_edit"))
    panel, label = edit_panel(image, edited, winter)
    return side_by_side(image, panel, instruction, "input", label,
                        [("Load Image \u2192 Instruct Edit \u2192 Save Image", TEXT),
                         (model_note, MUTED) if model_note else ILLUSTRATED])


def thumb_instruct_edit_masked(image: Image.Image, edited: Image.Image | None, model_note: str | None):
    instruction = instruction_of(template("instruct_edit_masked"))
    panel, label = edit_panel(image, edited, lambda picture: pink_sky(picture))
    return side_by_side(masked_input(image), panel, instruction, "input + painted mask", label,
                        [("only the painted region changes", TEXT),
                         (model_note, MUTED) if model_note else ILLUSTRATED])


def thumb_instruct_edit_advanced(image: Image.Image, edited: Image.Image | None, model_note: str | None):
    instruction = instruction_of(template("instruct_edit_advanced"))
    panel, label = edit_panel(image, edited, sunset)
    return side_by_side(image, panel, instruction, "input", label,
                        [("FreeU \u2192 Dual CFG Sampler \u2192 upscale", TEXT),
                         (model_note, MUTED) if model_note else ILLUSTRATED])


def thumb_instruct_edit_sdxl(image: Image.Image, edited: Image.Image | None, model_note: str | None):
    instruction = instruction_of(template("instruct_edit_sdxl"))
    panel, label = edit_panel(image, edited, night)
    return side_by_side(image, panel, instruction, "input", label,
                        [("CosXL Edit (SDXL) at 1024 \u2192 Instruct Edit", TEXT),
                         (model_note, MUTED) if model_note else ILLUSTRATED])


def dataset_row(canvas: Image.Image, top: int, image: Image.Image, instruction: str | None, effect,
                side: int = 150) -> None:
    """One row as the dataset stores it: input image, instruction, edited image."""
    draw = ImageDraw.Draw(canvas)
    left = 16
    canvas.paste(square(image, side), (left, top))
    right = SIDE - 16 - side
    canvas.paste(stamp(square(effect(square(image, 512)), side)), (right, top))
    middle = (left + side + right) / 2
    arrow(draw, middle, top + side / 2 + (14 if instruction else 0), size=12)
    if not instruction:
        return
    face = fit_text(draw, f"\u201c{instruction}\u201d", right - left - side - 16, 19, bold=True)
    centred(draw, middle, top + side / 2 - 24, f"\u201c{instruction}\u201d", face)


def thumb_build_dataset(image: Image.Image, edited: Image.Image | None, model_note: str | None):
    canvas = Image.new("RGB", (SIDE, SIDE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    centred(draw, SIDE / 2, 14, "your own edit dataset", fit_text(draw, "your own edit dataset", SIDE - 24, 30, True))
    caption, edited_caption = "a drawing of a girl on a green hill", "a drawing of a girl on a green hill at night"
    rows = [("caption", caption), ("LLM instruction", "make it night"), ("edited caption", edited_caption)]
    y = 60
    for key, value in rows:
        face = fit_text(draw, f"{key}: {value}", SIDE - 32, 18)
        draw.text((16, y), f"{key}: ", font=face, fill=MUTED)
        draw.text((16 + draw.textlength(f"{key}: ", font=face), y), value, font=face, fill=TEXT)
        y += 26
    dataset_row(canvas, y + 8, image, None, night, side=200)
    label = font(17)
    centred(draw, 16 + 100, y + 214, "input image", label, fill=MUTED)
    centred(draw, SIDE - 16 - 100, y + 214, "edited image (P2P)", label, fill=MUTED)
    footer(canvas, [("LLM \u2192 Prompt-to-Prompt \u2192 CLIP filter \u2192 dataset", TEXT), ILLUSTRATED], y + 250)
    return canvas


def thumb_train(image: Image.Image, edited: Image.Image | None, model_note: str | None):
    canvas = Image.new("RGB", (SIDE, SIDE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    title = "fine-tune on your edit pairs"
    centred(draw, SIDE / 2, 12, title, fit_text(draw, title, SIDE - 24, 28, True))
    label = font(17)
    centred(draw, SIDE / 2, 52, "dataset rows", label, fill=MUTED)
    dataset_row(canvas, 76, image, "make it night", night, side=118)
    dataset_row(canvas, 204, image, "make the sky pink", pink_sky, side=118)
    draw.line((16, 336, SIDE - 16, 336), fill=(70, 74, 80), width=2)
    instruction = instruction_of(template("train"))
    centred(draw, SIDE / 2, 346, "Train InstructPix2Pix \u2192 the trained model edits", label, fill=MUTED)
    dataset_row(canvas, 372, image, instruction, winter, side=118)
    draw.text((16, SIDE - 20), "illustration", font=font(13), fill=ACCENT)
    return canvas


THUMBNAILS = {
    "instruct_edit": thumb_instruct_edit,
    "instruct_edit_masked": thumb_instruct_edit_masked,
    "instruct_edit_advanced": thumb_instruct_edit_advanced,
    "instruct_edit_sdxl": thumb_instruct_edit_sdxl,
    "build_dataset": thumb_build_dataset,
    "train": thumb_train,
}
# The templates run for real, by the model family their checkpoint must be (True: SDXL).
RUN_FOR_REAL = {"instruct_edit": False, "instruct_edit_masked": False, "instruct_edit_advanced": False,
                "instruct_edit_sdxl": True}


# --- the real edit ---------------------------------------------------------------------------------------------
def real_edit(name: str, image: Image.Image, checkpoint: str, base_dir: Path | None, work: Path) -> Image.Image:
    """Runs the template's own JSON through the headless edit command and returns the saved picture."""
    from comfyui_ip2p.cli import edit

    source = work / f"{name}_input.png"
    picture = square(image, 512)
    if name == "instruct_edit_masked":  # Load Image takes the painted mask from the alpha channel (0 = painted)
        picture = picture.convert("RGBA")
        picture.putalpha(ImageOps.invert(sky_mask(picture.convert("RGB"))))
    picture.save(source)
    output = work / f"{name}_edit.png"
    argv = ["--workflow", str(WORKFLOWS / f"{name}.json"), "--image", str(source), "--checkpoint", checkpoint,
            "--instruction", instruction_of(template(name)), "--output", str(output), "--seed", "0"]
    if base_dir:
        argv += ["--base-dir", str(base_dir)]
    edit.run(edit.parse_args(argv))
    with Image.open(output) as result:
        return result.convert("RGB")


def save_jpeg(image: Image.Image, path: Path) -> int:
    image.convert("RGB").save(path, "JPEG", quality=72, optimize=True, progressive=True)
    return path.stat().st_size


def pick_checkpoints(given: str | None, base: Path | None) -> dict[bool, str]:
    """The checkpoint each family's templates run with (True: SDXL): the one named, or the first real one found."""
    folder = base / "models" / "checkpoints" if base else None
    found = real_ip2p_checkpoints(folder) if folder and folder.is_dir() and not given else []
    names = [given] if given else found
    picked: dict[bool, str] = {}
    for name in names:
        picked.setdefault(bool(folder) and is_sdxl_checkpoint(folder / name), name)
    return picked


def model_note(checkpoint: str, base: Path | None) -> str:
    if base and is_random_model(base / "models" / "checkpoints" / checkpoint):
        return "the pack's RANDOM test model: noise, not an edit"
    return f"{Path(checkpoint).stem}, seed 0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="InstructPix2Pix checkpoint name in models/checkpoints to run the edit "
                                             "templates with (default: the first real one found there)")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI folder (default: $COMFYUI_PATH, .runtime/ComfyUI)")
    parser.add_argument("--base-dir", type=Path, help="ComfyUI base directory holding models/ and input/")
    parser.add_argument("--illustrate", action="store_true", help="never run a model, even if one is found")
    parser.add_argument("--out-dir", type=Path, default=WORKFLOWS, help="where to write <name>.jpg")
    parser.add_argument("--only", nargs="*", choices=sorted(THUMBNAILS), help="build only these thumbnails")
    args = parser.parse_args(argv)

    comfyui = comfyui_folder(args.comfyui)
    base = args.base_dir or comfyui
    image = load_input(base or comfyui, input_image_name(template("instruct_edit")))
    checkpoints = {} if args.illustrate else pick_checkpoints(args.checkpoint, base)
    for sdxl, family in ((False, "SD1.x"), (True, "SDXL")):
        chosen = checkpoints.get(sdxl)
        print(f"{family} edit templates: {'run with ' + chosen if chosen else 'illustrated (no real checkpoint)'}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in THUMBNAILS.items():
            if args.only and name not in args.only:
                continue
            edited = note = None
            checkpoint = checkpoints.get(RUN_FOR_REAL[name]) if name in RUN_FOR_REAL else None
            if checkpoint:
                edited = real_edit(name, image, checkpoint, args.base_dir, Path(tmp))
                note = model_note(checkpoint, base)
            size = save_jpeg(build(image, edited, note), args.out_dir / f"{name}.jpg")
            print(f"wrote {args.out_dir / f'{name}.jpg'} ({size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
