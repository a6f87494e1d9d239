"""CLIP direction filter: scores, thresholds, top-k, preprocessing and a tiny random open_clip model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
from comfyui_ip2p.dataset import clip_filter
from comfyui_ip2p.dataset.clip_filter import ClipFilterConfig, ClipScores

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

# Smallest CLIP that OpenAI's state-dict loader can rebuild: it infers 1 head per 64 channels.
TINY_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}


def basis(index: int, dim: int = 4) -> torch.Tensor:
    vector = torch.zeros(1, dim)
    vector[0, index] = 1.0
    return vector


def scores_of(sim_0, sim_1, sim_dir, sim_image) -> ClipScores:
    return ClipScores(
        *(torch.tensor(values, dtype=torch.float32) for values in (sim_0, sim_1, sim_dir, sim_image))
    )


# --- scores on synthetic embeddings --------------------------------------------------------------------


def test_scores_of_a_45_degree_edit():
    # I0 = T0 = e0; I1 halfway between e0 and e1; T1 = e1. Scaled to check normalisation happens inside.
    image_0, text_0 = 3 * basis(0), 0.5 * basis(0)
    image_1, text_1 = 7 * (basis(0) + basis(1)), 2 * basis(1)
    scores = clip_filter.clip_scores(image_0, image_1, text_0, text_1)
    inv_sqrt2 = 1 / math.sqrt(2)
    assert scores.sim_0.item() == pytest.approx(1.0, abs=1e-6)
    assert scores.sim_1.item() == pytest.approx(inv_sqrt2, abs=1e-6)
    assert scores.sim_image.item() == pytest.approx(inv_sqrt2, abs=1e-6)
    # I1n - I0 = (1/√2 - 1, 1/√2), T1 - T0 = (-1, 1): cos = 1 / sqrt(4 - 2√2) = cos(22.5°).
    assert scores.sim_dir.item() == pytest.approx(math.cos(math.pi / 8), abs=1e-6)


def test_scores_of_orthogonal_and_opposite_directions():
    image_0 = torch.cat([basis(0), basis(0)])
    image_1 = torch.cat([basis(1), basis(1)])
    text_0 = torch.cat([basis(2), basis(1)])
    text_1 = torch.cat([basis(3), basis(0)])
    scores = clip_filter.clip_scores(image_0, image_1, text_0, text_1)
    assert scores.sim_0.tolist() == [0.0, 0.0]
    assert scores.sim_1.tolist() == [0.0, 0.0]
    assert scores.sim_image.tolist() == [0.0, 0.0]
    # e1 - e0 against e3 - e2 is orthogonal; against e0 - e1 it is exactly opposite.
    assert scores.sim_dir.tolist() == pytest.approx([0.0, -1.0], abs=1e-6)


def test_identical_images_or_captions_give_zero_direction_not_nan():
    image = torch.tensor([[0.6, 0.8, 0.0], [0.6, 0.8, 0.0]])
    text_0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    text_1 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    edited = torch.tensor([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0]])
    same_images = clip_filter.clip_scores(image, image, text_0, text_1)
    assert same_images.sim_dir.tolist() == [0.0, 0.0]
    assert same_images.sim_image.tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    same_captions = clip_filter.clip_scores(image, edited, text_0, text_1)
    assert same_captions.sim_dir[1].item() == 0.0
    assert not torch.isnan(same_captions.sim_dir).any()


def test_zero_feature_vector_scores_zero():
    zero = torch.zeros(1, 4)
    scores = clip_filter.clip_scores(zero, basis(1), basis(0), basis(1))
    assert scores.sim_0.item() == 0.0
    assert scores.sim_image.item() == 0.0


def test_scores_reject_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        clip_filter.clip_scores(basis(0), basis(1), basis(0), basis(1, dim=5))


def test_half_precision_features_are_scored_in_float32():
    scores = clip_filter.clip_scores(basis(0).half(), basis(1).half(), basis(0).half(), basis(1).half())
    assert scores.sim_dir.dtype == torch.float32
    assert scores.sim_dir.item() == pytest.approx(1.0, abs=1e-6)


# --- thresholds and top-k per caption pair -------------------------------------------------------------


def test_default_thresholds_are_the_reference_codes():
    config = ClipFilterConfig()
    assert (config.min_sim_0, config.min_sim_1, config.min_sim_dir, config.min_sim_image) == (
        0.2,
        0.2,
        0.2,
        0.7,
    )
    assert config.max_per_group == 4


def test_each_threshold_is_inclusive_and_each_can_reject():
    scores = scores_of(
        sim_0=[0.2, 0.19, 0.9, 0.9, 0.9],
        sim_1=[0.2, 0.9, 0.19, 0.9, 0.9],
        sim_dir=[0.2, 0.9, 0.9, 0.19, 0.9],
        sim_image=[0.7, 0.9, 0.9, 0.9, 0.69],
    )
    result = clip_filter.filter_pairs(scores)
    assert result.passed.tolist() == [True, False, False, False, False]
    assert result.kept.tolist() == [0]


def test_paper_image_threshold_is_stricter_than_the_codes():
    scores = scores_of(sim_0=[0.3], sim_1=[0.3], sim_dir=[0.3], sim_image=[0.72])
    assert clip_filter.filter_pairs(scores).kept.tolist() == [0]
    paper = ClipFilterConfig(min_sim_image=0.75)
    assert clip_filter.filter_pairs(scores, config=paper).kept.tolist() == []


def test_nan_scores_never_pass():
    scores = scores_of(sim_0=[float("nan")], sim_1=[0.9], sim_dir=[0.9], sim_image=[0.9])
    assert clip_filter.filter_pairs(scores).kept.tolist() == []


def test_top_k_per_group_sorts_by_direction_and_breaks_ties_by_index():
    # Group "b" appears first. Rows 6 and 8 fail sim_0 despite the best sim_dir.
    groups = ["b", "a", "a", "b", "a", "a", "a", "a", "a", "b"]
    sim_dir = [0.4, 0.5, 0.9, 0.3, 0.5, 0.7, 0.99, 0.5, 0.99, 0.4]
    sim_0 = [0.5] * 10
    sim_0[6] = sim_0[8] = 0.1
    scores = scores_of(sim_0=sim_0, sim_1=[0.5] * 10, sim_dir=sim_dir, sim_image=[0.8] * 10)
    result = clip_filter.filter_pairs(scores, groups)
    # "b": 0 (0.4) and 9 (0.4) tie -> lower index first, then 3 (0.3).
    # "a": 2 (0.9), 5 (0.7), then the 0.5 ties 1, 4, 7 in index order, cut at four -> 7 dropped.
    assert result.kept.tolist() == [0, 9, 3, 2, 5, 1, 4]
    assert result.passed.sum().item() == 8


def test_group_cap_of_none_keeps_every_survivor_and_none_groups_means_one_group():
    scores = scores_of(
        sim_0=[0.5] * 6, sim_1=[0.5] * 6, sim_dir=[0.3, 0.6, 0.4, 0.9, 0.1, 0.5], sim_image=[0.8] * 6
    )
    uncapped = clip_filter.filter_pairs(scores, config=ClipFilterConfig(max_per_group=None))
    assert uncapped.kept.tolist() == [3, 1, 5, 2, 0]
    capped = clip_filter.filter_pairs(scores, config=ClipFilterConfig(max_per_group=2))
    assert capped.kept.tolist() == [3, 1]
    assert clip_filter.filter_pairs(scores, config=ClipFilterConfig(max_per_group=0)).kept.tolist() == []


def test_group_ids_may_be_a_tensor_or_tuples():
    scores = scores_of(sim_0=[0.5] * 4, sim_1=[0.5] * 4, sim_dir=[0.3, 0.6, 0.4, 0.9], sim_image=[0.8] * 4)
    one_each = ClipFilterConfig(max_per_group=1)
    from_tensor = clip_filter.filter_pairs(scores, torch.tensor([7, 3, 7, 3]), one_each)
    from_tuples = clip_filter.filter_pairs(scores, [("x", "y"), ("u", "v"), ("x", "y"), ("u", "v")], one_each)
    assert from_tensor.kept.tolist() == from_tuples.kept.tolist() == [2, 3]


def test_group_count_must_match():
    scores = scores_of(sim_0=[0.5], sim_1=[0.5], sim_dir=[0.5], sim_image=[0.8])
    with pytest.raises(ValueError, match="group ids"):
        clip_filter.filter_pairs(scores, ["a", "b"])


# --- preprocessing -------------------------------------------------------------------------------------


def test_constant_colour_maps_to_normalised_constant():
    colour = (0.25, 0.5, 0.75)
    images = torch.tensor(colour).expand(2, 37, 53, 3)
    pixels = clip_filter.to_clip_input(images, size=16)
    assert pixels.shape == (2, 3, 16, 16)
    for channel, value in enumerate(colour):
        expected = (value - MEAN[channel]) / STD[channel]
        # Only float32 rounding in the resampling separates the result from the exact value.
        torch.testing.assert_close(pixels[:, channel], torch.full((2, 16, 16), expected), atol=1e-5, rtol=0)


def test_inputs_in_zero_one_reach_clip_normalisation_unscaled():
    # Black and white must land on -mean/std and (1-mean)/std: no [-1, 1] rescaling on the way.
    black_white = torch.stack([torch.zeros(8, 8, 3), torch.ones(8, 8, 3)])
    pixels = clip_filter.to_clip_input(black_white, size=8)
    assert pixels[0, 0, 0, 0].item() == pytest.approx(-1.7922625, abs=1e-6)
    assert pixels[1, 0, 0, 0].item() == pytest.approx(1.9303361, abs=1e-6)


def test_landscape_and_portrait_are_centre_cropped():
    # Three 16-pixel bands of 0, 0.5, 1 along the long side; the shorter side is already 16 (no resampling).
    bands = torch.tensor([0.0, 0.5, 1.0]).repeat_interleave(16)
    landscape = bands.view(1, 1, 48, 1).expand(1, 16, 48, 3)
    portrait = bands.view(1, 48, 1, 1).expand(1, 48, 16, 3)
    expected = torch.tensor([(0.5 - m) / s for m, s in zip(MEAN, STD, strict=True)]).view(1, 3, 1, 1)
    for image in (landscape, portrait):
        pixels = clip_filter.to_clip_input(image, size=16)
        torch.testing.assert_close(pixels, expected.expand(1, 3, 16, 16), atol=1e-6, rtol=0)


def test_shorter_side_resize_keeps_aspect_then_crops():
    resized = clip_filter.resize_shorter_side(torch.rand(1, 3, 30, 50), 12)
    assert resized.shape == (1, 3, 12, 20)
    assert resized.min() >= 0.0 and resized.max() <= 1.0
    assert clip_filter.to_clip_input(torch.rand(3, 30, 50, 3), size=12).shape == (3, 3, 12, 12)


def test_an_image_is_resized_once_on_its_way_to_clip():
    # Rows are fitted to CLIP's size before batching (pipeline/clip_filter.py); the encoder must not resize them
    # again, so scoring a fitted image and the original gives the same CLIP input to the bit.
    image = torch.rand(1, 30, 50, 3, generator=torch.Generator().manual_seed(4))
    for mode in ("shortest", "squash"):
        fitted = clip_filter.fit_to_clip(image, 12, mode)
        assert fitted.shape == (1, 12, 12, 3)
        again = clip_filter.fit_to_clip(fitted, 12, mode)
        assert torch.equal(again, fitted) and again.data_ptr() == fitted.data_ptr()  # the same pixels, not a copy
        assert torch.equal(clip_filter.to_clip_input(fitted, 12, resize_mode=mode),
                           clip_filter.to_clip_input(image, 12, resize_mode=mode))


def test_grey_and_rgba_images_become_rgb():
    grey = torch.full((1, 8, 8, 1), 0.5)
    rgba = torch.cat([torch.full((1, 8, 8, 3), 0.5), torch.zeros(1, 8, 8, 1)], dim=-1)
    rgb = clip_filter.to_clip_input(torch.full((1, 8, 8, 3), 0.5), size=8)
    torch.testing.assert_close(clip_filter.to_clip_input(grey, size=8), rgb)
    torch.testing.assert_close(clip_filter.to_clip_input(rgba, size=8), rgb)


def test_preprocess_rejects_channels_first():
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        clip_filter.to_clip_input(torch.rand(1, 3, 16, 16), size=8)


# --- the encoder on a tiny random open_clip model ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.CLIP(**TINY_CONFIG).eval()


@pytest.fixture(scope="module")
def encoder(tiny_model) -> clip_filter.ClipEncoder:
    return clip_filter.ClipEncoder(tiny_model)


def test_encoder_reads_the_models_preprocessing(encoder):
    assert encoder.preprocess == {"size": 32, "mean": MEAN, "std": STD, "resize_mode": "shortest"}


def test_image_features_are_unit_and_batching_does_not_change_them(encoder):
    images = torch.rand(5, 40, 56, 3, generator=torch.Generator().manual_seed(1))
    batched = encoder.encode_images(images, batch_size=2)
    one_by_one = encoder.encode_images(images, batch_size=1)
    assert batched.shape == (5, 16)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)


def test_repeated_captions_are_encoded_once_with_the_same_features(encoder):
    captions = ["a photo of a dog", "a dog in the snow", "a photo of a dog"]
    features = encoder.encode_texts(captions, batch_size=1)
    assert features.shape == (3, 16)
    assert torch.equal(features[0], features[2])
    torch.testing.assert_close(features[1], encoder.encode_texts(["a dog in the snow"])[0])
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))


def test_score_pairs_end_to_end(encoder):
    generator = torch.Generator().manual_seed(2)
    images_0 = torch.rand(4, 36, 36, 3, generator=generator)
    images_1 = torch.rand(4, 36, 36, 3, generator=generator)
    images_1[3] = images_0[3]
    captions_0 = ["a cat", "a cat", "a house", "a tree"]
    captions_1 = ["a cat wearing a hat", "a cat wearing a hat", "a house at night", "a tree in winter"]
    scores = encoder.score_pairs(images_0, images_1, captions_0, captions_1, batch_size=3)
    for values in (scores.sim_0, scores.sim_1, scores.sim_dir, scores.sim_image):
        assert values.shape == (4,)
        assert bool(((values >= -1) & (values <= 1)).all())
    assert scores.sim_image[3].item() == pytest.approx(1.0, abs=1e-6)
    assert scores.sim_dir[3].item() == 0.0
    assert set(scores.row(0)) == {"clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image"}


def test_filter_image_pairs_groups_by_caption_pair(encoder):
    generator = torch.Generator().manual_seed(3)
    images_0 = torch.rand(6, 32, 32, 3, generator=generator)
    images_1 = torch.rand(6, 32, 32, 3, generator=generator)
    captions_0 = ["a cat"] * 4 + ["a house"] * 2
    captions_1 = ["a dog"] * 4 + ["a house at night"] * 2
    keep_all = ClipFilterConfig(min_sim_0=-1, min_sim_1=-1, min_sim_dir=-1, min_sim_image=-1, max_per_group=3)
    # Scored and filtered as the node does: pairs grouped by their (caption, edited caption).
    scores = encoder.score_pairs(images_0, images_1, captions_0, captions_1)
    result = clip_filter.filter_pairs(scores, list(zip(captions_0, captions_1, strict=True)), keep_all)
    kept = result.kept.tolist()
    cat_rows, house_rows = kept[:3], kept[3:]
    assert set(cat_rows) < {0, 1, 2, 3} and sorted(house_rows) == [4, 5]
    best_cats = torch.sort(result.scores.sim_dir[:4], descending=True).indices[:3].tolist()
    assert cat_rows == best_cats


def test_score_pairs_rejects_count_mismatch(encoder):
    with pytest.raises(ValueError, match="pair counts differ"):
        encoder.score_pairs(torch.rand(2, 8, 8, 3), torch.rand(2, 8, 8, 3), ["a"], ["b"])


# --- loading weights from disk, never from the network -------------------------------------------------


def test_missing_weights_raise_a_clear_offline_error(tmp_path):
    with pytest.raises(clip_filter.ClipWeightsNotFoundError) as caught:
        clip_filter.load_clip_model(tmp_path)
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    for needle in ("ViT-L-14.pt", "open_clip_pytorch_model.bin", "models/clip_filter/", "offline"):
        assert needle in message
    with pytest.raises(FileNotFoundError, match="my/models/place/"):
        clip_filter.load_clip_model(tmp_path / "absent", hint="my/models/place/")


def state_dict_as_torchscript(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Save tensors under their dotted names in a TorchScript archive, the layout of OpenAI's CLIP files."""
    root = torch.nn.Module()
    for key, tensor in state_dict.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, torch.nn.Module())
            module = getattr(module, name)
        module.register_buffer(leaf, tensor.clone())
    torch.jit.save(torch.jit.script(root), str(path))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_loads_an_openai_torchscript_file_from_the_folder(tmp_path, tiny_model):
    # OpenAI's loader stores weights in fp16; round ours first so the comparison can be exact.
    reference = open_clip.CLIP(**TINY_CONFIG).eval()
    reference.load_state_dict({k: v.half().float() for k, v in tiny_model.state_dict().items()})
    state_dict_as_torchscript(reference.state_dict(), tmp_path / "ViT-L-14.pt")
    encoder = clip_filter.load_clip_model(tmp_path)
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(4))
    pixels = clip_filter.to_clip_input(images, size=32)
    with torch.no_grad():
        expected = clip_filter.normalize(reference.encode_image(pixels))
    torch.testing.assert_close(encoder.encode_images(images), expected, atol=1e-5, rtol=1e-5)


def test_loads_an_open_clip_state_dict_for_a_registered_config(tmp_path, tiny_model):
    # A throwaway named config stands in for ViT-L-14, whose real size would make this test slow.
    config_file = tmp_path / "config" / "ip2p-test-tiny-clip.json"
    config_file.parent.mkdir()
    config_file.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config_file)
    torch.save(tiny_model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    encoder = clip_filter.load_clip_model(tmp_path, model_name="ip2p-test-tiny-clip", quick_gelu=True)
    captions = ["a red car", "a blue car"]
    tokens = open_clip.SimpleTokenizer(context_length=16)(captions)
    with torch.no_grad():
        expected = clip_filter.normalize(tiny_model.encode_text(tokens))
    torch.testing.assert_close(encoder.encode_texts(captions), expected)
