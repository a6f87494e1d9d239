"""The trainer's pure pieces: conditioning dropout, EMA, noise target, augmentation, atomic files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from comfyui_ip2p.testing.synthetic import (
    invert_rows,
    scaled_linear_alphas_cumprod,
    toy_encode_images,
    toy_encode_texts,
)
from comfyui_ip2p.training.config import TrainConfig, resume_mismatches
from comfyui_ip2p.training.data import (
    Encoders,
    LatentBatches,
    PixelBatches,
    crop_flip,
    crop_latent,
    fit_size,
    place,
    read_rows,
)
from comfyui_ip2p.training.dropout import apply_dropout, dropout_masks
from comfyui_ip2p.training.ema import EMA, warmup_decay
from comfyui_ip2p.training.files import save_file, save_safetensors
from comfyui_ip2p.training.objective import NoiseSchedule

PACK = Path(__file__).resolve().parents[2]


def test_each_dropout_band_is_five_percent_of_samples():
    n = 400_000
    r = torch.rand(n, generator=torch.Generator().manual_seed(0))
    drop_text, drop_image = dropout_masks(r, 0.05)
    bands = {"text only": drop_text & ~drop_image, "both": drop_text & drop_image,
             "image only": ~drop_text & drop_image, "neither": ~drop_text & ~drop_image}
    expected = {"text only": 0.05, "both": 0.05, "image only": 0.05, "neither": 0.85}
    for name, mask in bands.items():
        p = expected[name]
        tolerance = 5 * math.sqrt(p * (1 - p) / n)
        assert abs(mask.float().mean().item() - p) < tolerance, name


def test_dropped_text_gets_the_empty_embedding_and_dropped_image_a_zero_latent():
    context = torch.randn(4, 77, 16)
    image = torch.randn(4, 4, 8, 8)
    empty = torch.randn(1, 77, 16)
    drop_text = torch.tensor([True, False, True, False])
    drop_image = torch.tensor([False, True, True, False])
    new_context, new_image = apply_dropout(context, image, empty, drop_text, drop_image)
    for i in range(4):
        assert torch.equal(new_context[i], empty[0] if drop_text[i] else context[i])
        assert torch.equal(new_image[i], torch.zeros_like(image[i]) if drop_image[i] else image[i])


def test_ema_warmup_follows_the_reference_formula():
    assert warmup_decay(0.9999, 1) == pytest.approx(2 / 11)
    assert warmup_decay(0.9999, 90) == pytest.approx(91 / 100)
    assert warmup_decay(0.9999, 10**7) == 0.9999
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = EMA({"w": weight}, decay=0.5)
    with torch.no_grad():
        weight.fill_(1.0)
    ema.update({"w": weight})  # decay min(0.5, 2/11) = 2/11: moves 9/11 of the way
    assert torch.allclose(ema.weights()["w"], torch.full((3,), 9 / 11))
    ema.update({"w": weight})  # decay min(0.5, 3/12) = 1/4
    assert torch.allclose(ema.weights()["w"], torch.full((3,), 9 / 11 + (1 - 9 / 11) * 0.75))


def test_ema_swap_puts_raw_weights_back():
    weight = torch.nn.Parameter(torch.ones(2))
    ema = EMA({"w": weight}, decay=0.9)
    with torch.no_grad():
        weight.fill_(5.0)
    with ema.swapped_in({"w": weight}):
        assert torch.equal(weight.detach(), torch.ones(2))
    assert torch.equal(weight.detach(), torch.full((2,), 5.0))


def test_noisy_sample_and_v_target_match_the_ddpm_definitions():
    schedule = NoiseSchedule(scaled_linear_alphas_cumprod(), "v")
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    a = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    assert torch.allclose(schedule.noisy(x0, noise, t), a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-6)
    assert torch.allclose(schedule.target(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0, atol=1e-6)
    assert torch.equal(NoiseSchedule(schedule.alphas_cumprod, "eps").target(x0, noise, t), noise)


@pytest.mark.parametrize("size, expected", [((512, 512), (256, 256)), ((640, 480), (336, 256)),
                                            ((300, 900), (256, 768)), ((257, 256), (256, 256))])
def test_fit_size_keeps_the_short_side_at_the_resolution_on_the_8_pixel_grid(size, expected):
    assert fit_size(*size, 256) == expected


def test_latent_crop_and_flip_equal_encoding_the_augmented_pixels():
    # 8x8 average pooling is exactly equivariant to aligned crops and flips, so any mismatch is a bug in the
    # offsets of the latent path.
    image = torch.rand(3, 32, 56)
    plain, mirrored = toy_encode_images(image[None])[0], toy_encode_images(image.flip(-1)[None])[0]
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        where = place(torch.rand(3, generator=generator), 32, 56, 24, True, True)
        assert where.top % 8 == 0 and where.left % 8 == 0 and where.top <= 8 and where.left <= 32
        expected = toy_encode_images(crop_flip(image, where, 24)[None])[0]
        assert torch.allclose(crop_latent(plain, mirrored, where, 24), expected, atol=1e-6)


def rectangular_rows(count: int):
    rows = invert_rows(count, size=40, seed=3)
    for row in rows:  # 40x24 images: room for one latent column of horizontal crop at resolution 16
        row.input_image = row.input_image.resize((40, 24))
        row.edited_image = row.edited_image.resize((40, 24))
    return rows


def test_cached_latent_batches_equal_encoding_every_step():
    rows = rectangular_rows(6)
    encoders = Encoders(toy_encode_images, toy_encode_texts)
    pixels, latents = PixelBatches(rows, encoders, 16), LatentBatches(rows, encoders, 16)
    uniforms = torch.rand(6, 3, generator=torch.Generator().manual_seed(2))
    a, b = pixels.batch(list(range(6)), uniforms), latents.batch(list(range(6)), uniforms)
    for name in ("target", "image", "context"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-6), name
    assert not torch.allclose(a.image, a.target)  # input and target really are different images


@pytest.mark.parametrize("fmt", ["reference", "diffusers", "public"])
def test_every_dataset_format_reads_into_training_rows(tmp_path, fmt):
    from comfyui_ip2p.testing.edit_rows import write_rows

    write_rows(invert_rows(3, size=16), tmp_path, "ds", fmt)
    rows = read_rows(tmp_path / "ds")
    assert len(rows) == 3 and rows[0].instruction == "invert the colours"
    batches = PixelBatches(rows, Encoders(toy_encode_images, toy_encode_texts), 16)
    assert batches.batch([0, 1], torch.rand(2, 3)).image.shape == (2, 4, 2, 2)


def test_a_missing_dataset_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_rows(tmp_path / "missing")


def test_failed_write_leaves_the_previous_file_and_no_temp(tmp_path):
    target = tmp_path / "model.safetensors"
    save_safetensors({"w": torch.ones(2)}, target)
    before = target.read_bytes()

    def crash(tmp: str) -> None:
        Path(tmp).write_bytes(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_file(target, crash)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_stale_temp_of_a_killed_writer_is_cleaned(tmp_path):
    target = tmp_path / "state.pt"
    (tmp_path / ".state.pt.tmp-12345").write_bytes(b"killed mid-write")
    save_file(target, lambda tmp: Path(tmp).write_text("ok"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_config_refuses_bad_values_and_reports_resume_mismatches():
    with pytest.raises(ValueError, match="multiple of 8"):
        TrainConfig(resolution=100)
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(mode="dora")
    saved = TrainConfig(batch_size=2).to_dict()
    assert resume_mismatches(saved, TrainConfig(batch_size=4)) == ["batch_size"]
    assert resume_mismatches(saved, TrainConfig(batch_size=2, steps=99, learning_rate=5e-5)) == []


def test_training_package_does_not_import_comfy():
    modules = [p.stem for p in (PACK / "training").glob("*.py") if p.stem != "__init__"]
    code = ("import json, sys\n"
            f"for m in {modules!r}:\n"
            "    __import__('comfyui_ip2p.training.' + m)\n"
            "print(json.dumps(sorted(k for k in sys.modules if k == 'comfy' or k.startswith('comfy.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
