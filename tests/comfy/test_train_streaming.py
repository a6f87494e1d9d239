"""Training that streams, measured in real processes: the trainer's peak RSS on 200 and on 2,000 rows (64 px,
hub-style parquet) differs by less than 10 %, with the latent cache on disk and without latent caching.

The rows are 64 px pairs; the cached run trains at 16 px, because encoding 8,000 images at 64 px through the
tiny checkpoint's VAE takes minutes on two CPU cores (at 16 px, seconds), and all rows share one instruction,
because its text encoder is a full-size CLIP (a quarter second per distinct text). LoRA mode keeps the saved
state small, so the peak is the trainer's, not the final write's.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest
from comfyui_ip2p.dataset.records import EditRow
from comfyui_ip2p.testing.synthetic import invert_rows

pytestmark = pytest.mark.slow

SMALL, LARGE = 200, 2000
CHUNK_ROWS = 256  # training.latent_cache.CHUNK_ROWS
# Runs the command line in this interpreter and reports the peak resident set of the training itself: the
# high-water mark is reset (Linux clear_refs 5) when the dataset is opened, after ComfyUI's boot and the model load
# (whose transient copies would otherwise be the peak of every run).
WRAPPER = """
import json, sys
import comfyui_ip2p.training.data as data
from comfyui_ip2p.cli.train import main

def status_kb(field):
    with open('/proc/self/status') as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ':'))

opened, at_open = data.read_rows, []

def read_rows(*args, **kwargs):
    with open('/proc/self/clear_refs', 'w') as handle:
        handle.write('5')
    at_open.append(status_kb('VmRSS'))
    return opened(*args, **kwargs)

data.read_rows = read_rows
code = main(sys.argv[1:])
print(json.dumps({'event': 'peak_rss', 'kb': status_kb('VmHWM'), 'at_open_kb': at_open[0]}), flush=True)
sys.exit(code)
"""
def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def many_rows(count: int) -> list[EditRow]:
    """`count` rows over 32 distinct 64 px pairs stored as PNG bytes (cheap to write), each its own seed."""
    pairs = [(png(r.input_image), png(r.edited_image)) for r in invert_rows(32, size=64, seed=0)]
    return [EditRow("shapes", "invert the colours", "inverted shapes", *pairs[i % len(pairs)], seed=i)
            for i in range(count)]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, comfy_base, tiny_ip2p_ckpt):
    from comfyui_ip2p.testing.public_layouts import write_layout

    root = tmp_path_factory.mktemp("streaming")
    rows = many_rows(LARGE)
    paths = {SMALL: write_layout("diffusers", root / "small", rows[:SMALL]),
             LARGE: write_layout("diffusers", root / "large", rows, shards=2)}
    yield {"root": root, "checkpoint": comfy_base / "models" / "checkpoints" / tiny_ip2p_ckpt, **paths}
    shutil.rmtree(root, ignore_errors=True)


def peak_rss_mb(datasets: dict, rows: int, out: str, resolution: int, *options: str) -> tuple[float, float, list]:
    """(peak RSS of the training in MB, its growth over the RSS when the dataset was opened, the run's events).

    The growth is printed, not asserted: it moves by tens of MB from run to run with when Python and the
    allocator give memory back."""
    argv = [sys.executable, "-c", WRAPPER, "--model", str(datasets["checkpoint"]), "--dataset", str(datasets[rows]),
            "--output-dir", str(datasets["root"] / out), "--name", "run", "--steps", "2", "--batch-size", "2",
            "--resolution", str(resolution), "--mode", "lora", "--lora-rank", "4", "--ema-decay", "0",
            "--validation-every", "0", "--threads", "1", "--no-resume", *options]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    peak = next(e for e in events if e["event"] == "peak_rss")
    return peak["kb"] / 1024, (peak["kb"] - peak["at_open_kb"]) / 1024, events


def test_peak_rss_does_not_grow_with_the_dataset_with_the_latent_cache_on_disk(datasets):
    small, small_growth, _ = peak_rss_mb(datasets, SMALL, "disk_small", 16, "--cache-location", "disk")
    large, large_growth, events = peak_rss_mb(datasets, LARGE, "disk_large", 16, "--cache-location", "disk")
    done = next(e for e in events if e["event"] == "done")
    assert done["cached"] and done["cache_location"] == "disk"
    chunks = list((datasets["root"] / "disk_large" / "latent_cache").glob("*/chunk-*.pt"))
    assert len(chunks) == -(-LARGE // CHUNK_ROWS)
    print(f"peak RSS, latent cache on disk: {small:.0f} MB ({SMALL} rows), {large:.0f} MB ({LARGE} rows); "
          f"above the RSS at opening: {small_growth:.1f} MB, {large_growth:.1f} MB")
    assert abs(large - small) < 0.1 * small, (small, large)


def test_peak_rss_does_not_grow_with_the_dataset_without_latent_caching(datasets):
    small, small_growth, _ = peak_rss_mb(datasets, SMALL, "pixels_small", 64, "--no-cache-latents")
    large, large_growth, events = peak_rss_mb(datasets, LARGE, "pixels_large", 64, "--no-cache-latents")
    assert next(e for e in events if e["event"] == "done")["cache_location"] == "none"
    print(f"peak RSS, no latent cache: {small:.0f} MB ({SMALL} rows), {large:.0f} MB ({LARGE} rows); "
          f"above the RSS at opening: {small_growth:.1f} MB, {large_growth:.1f} MB")
    assert abs(large - small) < 0.1 * small, (small, large)
