"""Memory: work too large for the device fails at once with a clear message (not an opaque out-of-memory error,
a killed process or hours of swapping), normal work still runs, and ComfyUI's model unloading really frees
the models after our nodes ran (nothing of ours keeps a reference to them)."""

from __future__ import annotations

import gc
import time
import uuid
import weakref

import pytest
import torch
from comfyui_ip2p.cli.runtime import run_prompt
from comfyui_ip2p.dataset.records import EditRow
from comfyui_ip2p.testing.comfy_run import checked
from comfyui_ip2p.testing.edit_rows import write_rows
from comfyui_ip2p.testing.tiny_clip import write_tiny_clip
from PIL import Image

SAMPLING = {"steps": 2, "seed": 0, "sampler_name": "euler", "scheduler": "normal"}
EDIT = {"instruction": "make it winter", "image_guidance": 1.5, "text_guidance": 7.5, **SAMPLING}
P2P = {"samples_per_pair": 1, "seed": 3, "p_min": 0.1, "p_max": 0.9, "cfg_min": 7.5, "cfg_max": 15.0,
       "batch_size": 1, "caption_pairs": "a red barn || a blue barn || make it blue", **SAMPLING}
FAIL_FAST_S = 60  # generous for a busy 2-core machine; measured a few seconds


def loader(checkpoint: str) -> dict:
    return {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": checkpoint}}


def edit_graph(checkpoint: str, width: int, height: int, resolution: int, output: str = "PreviewImage") -> dict:
    return {"1": loader(checkpoint),
            "2": {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": 1,
                                                         "color": 0x507090}},
            "3": {"class_type": "InstructEdit", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                           "image": ["2", 0], "resolution": resolution,
                                                           "keep_input_size": True, **EDIT}},
            "4": {"class_type": output, "inputs": {"images": ["3", 0]}}}


def timed_failure(prompt: dict, node: str) -> tuple[str, float]:
    started = time.monotonic()
    result = run_prompt(prompt)
    elapsed = time.monotonic() - started
    assert not result.ok, "work far too large for this machine must be refused"
    assert result.error["node_type"] == node, result.error
    return result.error["exception_message"], elapsed


def test_a_native_8192_edit_fails_fast_naming_the_size_and_the_fix(comfy_nodes, tiny_ip2p_ckpt):
    message, elapsed = timed_failure(edit_graph(tiny_ip2p_ckpt, 8192, 8192, resolution=0), "InstructEdit")
    assert message.startswith("InstructEdit: the edit is too large for this CPU: "), message
    assert "8192x8192" in message and "GiB" in message and "but only" in message, message
    assert "lower `resolution`" in message, message
    assert elapsed < FAIL_FAST_S, f"refused only after {elapsed:.0f} s"


def test_a_normal_edit_still_runs(comfy_nodes, tiny_ip2p_ckpt):
    result = checked(run_prompt(edit_graph(tiny_ip2p_ckpt, 80, 48, resolution=64)))
    assert len(result.outputs["4"]["images"]) == 1


def test_a_huge_latent_fails_before_sampling(comfy_nodes, tiny_ip2p_ckpt):
    prompt = {"1": loader(tiny_ip2p_ckpt),
              "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "make it winter"}},
              "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
              "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 8192, "height": 8192, "batch_size": 1}},
              "5": {"class_type": "DualCFGSampler", "inputs": {
                  "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "image_latent": ["4", 0],
                  "image_guidance": 1.5, "text_guidance": 7.5, "denoise": 1.0, **SAMPLING}},
              "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}}
    message, elapsed = timed_failure(prompt, "DualCFGSampler")
    assert message.startswith("DualCFGSampler: the edit is too large for this CPU: sampling it needs about "), message
    assert "8192x8192" in message and "To fix:" in message, message
    assert elapsed < FAIL_FAST_S


def test_a_guidance_grid_too_large_fails_fast(comfy_nodes, tiny_ip2p_ckpt):
    prompt = {"1": loader(tiny_ip2p_ckpt),
              "2": {"class_type": "EmptyImage", "inputs": {"width": 256, "height": 256, "batch_size": 1, "color": 0}},
              "3": {"class_type": "IP2PGuidanceGrid", "inputs": {
                  "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0],
                  "instruction": "make it winter", "image_guidance_values": "1.0, 1.5",
                  "text_guidance_values": "5, 7.5", "resolution": 4096, **SAMPLING}},
              "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    message, elapsed = timed_failure(prompt, "IP2PGuidanceGrid")
    assert message.startswith("IP2PGuidanceGrid: the edit is too large for this CPU"), message
    assert elapsed < FAIL_FAST_S


def test_pairs_too_large_fail_fast(comfy_nodes, tiny_t2i_ckpt):
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_t2i_ckpt}},
              "2": {"class_type": "P2PPairGenerator", "inputs": {
                  "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "width": 4096, "height": 4096, **P2P}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}}}
    message, elapsed = timed_failure(prompt, "P2PPairGenerator")
    assert message.startswith("P2PPairGenerator: the pair generation is too large for this CPU"), message
    assert "lower width and height" in message, message
    assert elapsed < FAIL_FAST_S


def test_running_out_of_memory_while_sampling_becomes_the_same_clear_message(comfy_nodes, tiny_ip2p_ckpt):
    """A real allocation failure inside the model call (one a wrong estimate would let through), from an
    oversized tensor requested through ComfyUI's own UNet wrapper hook."""
    model, clip, vae = comfy_nodes["LoadIP2PModel"].execute(tiny_ip2p_ckpt).result
    greedy = model.clone()

    def allocate_too_much(apply_model, args):
        torch.empty(1 << 50, dtype=torch.uint8)  # a petabyte: the CPU allocator refuses it for real
        return apply_model(args["input"], args["timestep"], **args["c"])

    greedy.set_model_unet_function_wrapper(allocate_too_much)
    image = torch.rand(1, 48, 80, 3)
    with pytest.raises(ValueError) as caught:
        comfy_nodes["InstructEdit"].execute(greedy, clip, vae, image, resolution=64, keep_input_size=True, **EDIT)
    message = str(caught.value)
    assert message.startswith("InstructEdit: the edit ran out of memory while sampling (RuntimeError: "), message
    assert "can't allocate memory" in message and "To fix: lower `resolution`" in message, message
    # The model itself is unharmed: the same edit without the hook runs.
    out = comfy_nodes["InstructEdit"].execute(model, clip, vae, image, resolution=64, keep_input_size=True, **EDIT)
    assert out.result[0].shape == (1, 48, 80, 3)


def test_on_a_cpu_short_of_memory_the_vae_works_in_tiles_instead_of_failing(comfy_nodes, tiny_ip2p_ckpt,
                                                                             monkeypatch):
    """A photo whose VAE pass ComfyUI estimates above the free memory is still edited: the VAE encodes and
    decodes in tiles (ComfyUI's own tiled VAE) rather than the process being killed or the edit refused."""
    import comfy.model_management as mm
    from comfyui_ip2p.pipeline import edit, memory

    _model, _clip, vae = comfy_nodes["LoadIP2PModel"].execute(tiny_ip2p_ckpt).result
    pixels = torch.rand(1, 640, 576, 3, generator=torch.Generator().manual_seed(0))
    assert not memory.encode_needs_tiles(vae, pixels), "with this machine's memory no tiles are needed"
    with torch.inference_mode():
        plain = edit.encode_image(vae, pixels)
    needed = int(vae.memory_used_encode([1, 3, 640, 576], vae.vae_dtype))
    monkeypatch.setattr(mm, "get_free_memory", lambda *args, **kwargs: needed // 2)  # a machine with less
    assert memory.encode_needs_tiles(vae, pixels)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        tiled = edit.encode_image(vae, pixels)
        assert torch.equal(tiled, vae.encode_tiled(pixels)) and not torch.equal(tiled, plain)
        assert memory.decode_needs_tiles(vae, plain)
        images = edit.decode(vae, plain, (576, 640))
    assert tiled.shape == plain.shape and torch.allclose(tiled, plain, atol=0.25)
    assert images.shape == (1, 640, 576, 3) and torch.isfinite(images).all()


# --- ComfyUI's unloading frees our models ------------------------------------------------------------------


def live_model_objects() -> list[object]:
    """Every ModelPatcher alive in this process, and the model each one wraps."""
    import comfy.model_patcher

    gc.collect()
    patchers = [o for o in gc.get_objects() if isinstance(o, comfy.model_patcher.ModelPatcher)]
    return patchers + [p.model for p in patchers]


def assert_unloading_frees_what_ran(prompt: dict) -> int:
    """Runs `prompt`; then ComfyUI's unload must leave no model object created by the run alive."""
    import comfy.model_management as mm

    before = {id(o) for o in live_model_objects()}
    checked(run_prompt(prompt))
    created = [weakref.ref(o) for o in live_model_objects() if id(o) not in before]
    mm.unload_all_models()
    mm.soft_empty_cache()
    gc.collect()
    alive = [type(ref()).__name__ for ref in created if ref() is not None]
    assert alive == [], f"still referenced after ComfyUI unloaded every model: {alive}"
    return len(created)


def test_unloading_frees_the_edit_model(comfy_nodes, tiny_ip2p_ckpt):
    assert_unloading_frees_what_ran(edit_graph(tiny_ip2p_ckpt, 80, 48, resolution=64))


def test_unloading_frees_the_pair_generator_model(comfy_nodes, tiny_t2i_ckpt):
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_t2i_ckpt}},
              "2": {"class_type": "P2PPairGenerator", "inputs": {
                  "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "width": 64, "height": 64, **P2P}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 2]}}}
    assert_unloading_frees_what_ran(prompt)


@pytest.mark.slow
def test_unloading_frees_the_trained_model(comfy_nodes, comfy_base, tiny_ip2p_ckpt):
    name = f"mem_train_{uuid.uuid4().hex[:8]}"
    rows = [EditRow("a square", "make it red", "a red square", Image.new("RGB", (32, 32), (9 * i, 90, 30)),
                    Image.new("RGB", (32, 32), (200, 9 * i, 30)), seed=i) for i in range(4)]
    write_rows(rows, comfy_base / "input", name, "reference", image_format="png")
    train = {"mode": "lora", "steps": 2, "batch_size": 2, "grad_accumulation": 1, "learning_rate": 1e-4,
             "resolution": 32, "seed": 0, "ema_decay": 0.9, "cache_latents": True, "gradient_checkpointing": False,
             "lora_rank": 4, "checkpoint_every": 0, "validation_every": 0, "resume": False, "validation_count": 1,
             "validation_steps": 1}
    prompt = {"1": loader(tiny_ip2p_ckpt),
              "2": {"class_type": "LoadEditDataset", "inputs": {"dataset": f"input/{name}", "format": "auto",
                                                                "max_rows": 0, "preview_count": 1}},
              "3": {"class_type": "TrainIP2P", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                          "dataset": ["2", 0], "checkpoint_name": name, **train}},
              "4": {"class_type": "InstructEdit", "inputs": {"model": ["3", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                             "image": ["2", 2], "resolution": 64,
                                                             "keep_input_size": True, **EDIT}},
              "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}}
    try:
        assert_unloading_frees_what_ran(prompt)
    finally:
        (comfy_base / "models" / "loras" / f"{name}.safetensors").unlink(missing_ok=True)


def test_unloading_frees_the_clip_filter_model(comfy_nodes, comfy_base):
    weights = write_tiny_clip(comfy_base / "models" / "clip_filter", f"mem_clip_{uuid.uuid4().hex[:6]}", seed=1)
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}},
              "2": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1,
                                                           "color": 0xFFFFFF}},
              "3": {"class_type": "CLIPEditMetrics", "inputs": {
                  "input_images": ["1", 0], "edited_images": ["2", 0], "input_caption": "a black square",
                  "output_caption": "a white square", "clip_weights": weights, "batch_size": 1}},
              "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 4]}}}
    assert assert_unloading_frees_what_ran(prompt) >= 2, "the CLIP model runs under a ComfyUI ModelPatcher"


# --- small GPUs: partial loading counted as ComfyUI counts it ---------------------------------------------

SDXL_WEIGHT_BYTES = 2_567_463_684 * 2  # SDXL's UNet parameters in float16


class SDXLOnACard:
    """An SDXL-sized MODEL on a (pretend) CUDA card: ComfyUI's SDXL_instructpix2pix class gives the memory
    estimate; the weights' size is the full SDXL UNet's, none of it loaded on the card yet."""

    def __init__(self, patcher):
        self.patcher, self.model = patcher, patcher.model
        self.load_device, self.offload_device = torch.device("cuda", 0), torch.device("cpu")

    def model_size(self) -> int:
        return SDXL_WEIGHT_BYTES

    def loaded_size(self) -> int:
        return 0

    def get_model_object(self, name):
        return self.patcher.get_model_object(name)


@pytest.fixture()
def card(monkeypatch):
    """`card(gib, vram_state=NORMAL_VRAM, reserve_gib=None)`: ComfyUI's device-memory functions report a card of
    that size, all of it free, in that VRAM state (as --highvram / --lowvram / --novram set it)."""
    import comfy.model_management as mm

    # ComfyUI's estimate without fused attention (the larger of its two formulas), whatever this machine runs.
    monkeypatch.setattr(mm, "xformers_enabled", lambda: False)
    monkeypatch.setattr(mm, "pytorch_attention_flash_attention", lambda: False)
    monkeypatch.setattr(mm, "lowvram_available", True)

    def make(size_gib: float, vram_state=mm.VRAMState.NORMAL_VRAM, reserve_gib: float | None = None) -> None:
        size = int(size_gib * 1024**3)
        monkeypatch.setattr(mm, "get_total_memory", lambda *args, **kwargs: size)
        monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False:
                            (size, size) if torch_free_too else size)
        monkeypatch.setattr(mm, "vram_state", vram_state)
        if reserve_gib is not None:  # --reserve-vram
            monkeypatch.setattr(mm, "EXTRA_RESERVED_VRAM", int(reserve_gib * 1024**3))

    return make


@pytest.mark.parametrize("size_gib", [6, 8])
def test_a_1024_sdxl_edit_on_a_small_card_is_accepted_when_comfyui_would_stream_the_weights(card, size_gib):
    import comfy.model_management as mm
    from comfyui_ip2p.pipeline import memory
    from comfyui_ip2p.testing.tiny_models import tiny_sdxl_ip2p

    model = SDXLOnACard(tiny_sdxl_ip2p())
    latent = (4, 128, 128)  # 1024x1024
    compute = memory.sampling_memory(model, latent)
    card(size_gib)
    keep_free = max(mm.minimum_inference_memory(), compute + mm.extra_reserved_memory())
    # On 6 GiB the weights do not fit beside what sampling needs: ComfyUI loads part and streams the rest.
    assert (SDXL_WEIGHT_BYTES + keep_free > mm.get_free_memory()) == (size_gib == 6)
    memory.check_sampling(model, latent, "the edit")

    card(size_gib, vram_state=mm.VRAMState.NO_VRAM)  # --novram: every weight streamed
    memory.check_sampling(model, latent, "the edit")

    card(size_gib, vram_state=mm.VRAMState.HIGH_VRAM)  # --highvram: ComfyUI loads every weight
    if size_gib == 6:
        with pytest.raises(memory.EditTooLargeError,
                           match=r"needs about \d+\.\d GiB \(ComfyUI's estimate.* only 6\.0 GiB"):
            memory.check_sampling(model, latent, "the edit")
    else:
        memory.check_sampling(model, latent, "the edit")


@pytest.mark.parametrize("size_gib", [6, 8])
def test_a_small_card_refuses_only_what_comfyui_could_not_run(card, size_gib):
    from comfyui_ip2p.pipeline import memory
    from comfyui_ip2p.testing.tiny_models import tiny_sdxl_ip2p

    model = SDXLOnACard(tiny_sdxl_ip2p())
    card(size_gib)
    # 2560x2560: one row's computing memory alone is larger than the card.
    with pytest.raises(memory.EditTooLargeError,
                       match=rf"needs about \d+\.\d GiB with the weights streamed .* only {size_gib}\.0 GiB"):
        memory.check_sampling(model, (4, 320, 320), "the edit")
    # --reserve-vram keeps memory back for other programs: ComfyUI then has too little left for 1024x1024.
    card(size_gib, reserve_gib=size_gib - 1)
    with pytest.raises(memory.EditTooLargeError, match=rf"only {size_gib}\.0 GiB"):
        memory.check_sampling(model, (4, 128, 128), "the edit")
