"""Turns the browser tests' screenshots into the README images (docs/images/*.jpg, each well under 300 KB).

    bash scripts/test.sh tests/browser        # writes test-artifacts/browser/*.png
    .runtime/venv/bin/python tests/browser/update_images.py

Template thumbnails show what a template makes, not its graph: scripts/build_thumbnails.py builds them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

PACK = Path(__file__).resolve().parents[2]
SHOTS = PACK / "test-artifacts" / "browser"
# README picture name -> screenshot it is made from
README_IMAGES = {
    "edit_in_comfyui.jpg": "queued_instruct_edit.png",
    "template_browser.jpg": "templates.png",
}


def save_jpeg(image: Image.Image, path: Path, quality: int = 85) -> None:
    image.convert("RGB").save(path, "JPEG", quality=quality, optimize=True, progressive=True)
    size = path.stat().st_size
    if size >= 300_000:
        raise SystemExit(f"{path} is {size} bytes; keep committed pictures under 300 KB")
    print(f"wrote {path.relative_to(PACK)} ({size // 1024} KB)")


def readme_images() -> None:
    target = PACK / "docs" / "images"
    target.mkdir(parents=True, exist_ok=True)
    for name, shot in README_IMAGES.items():
        with Image.open(SHOTS / shot) as image:
            save_jpeg(image, target / name, quality=80)


if __name__ == "__main__":
    readme_images()
    sys.exit(0)
