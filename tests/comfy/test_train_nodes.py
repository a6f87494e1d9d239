"""TrainIP2P through ComfyUI's executor and on ComfyUI's objects, with the tiny random checkpoints."""

from __future__ import annotations

import statistics
import uuid

import pytest
import torch
from comfyui_ip2p.cli.runtime import run_prompt
from comfyui_ip2p.testing.comfy_run import checked
from comfyui_ip2p.testing.edit_rows import write_rows
from comfyui_ip2p.testing.synthetic import INSTRUCTION, invert_rows
from comfyui_ip2p.testing.threads import torch_threads

TRAIN = {"mode": "full", "steps": 4, "batch_size": 2, "grad_accumulation": 1, "learning_rate": 1e-4,
         "resolution": 32, "seed": 0, "ema_decay": 0.9, "cache_latents": True, "gradient_checkpointing": False,
         "lora_rank": 4, "checkpoint_every": 0, "validation_every": 0, "resume": False, "validation_count": 2,
         "validation_steps": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are small: a second thread gains little and spins on a busy machine."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def invert_dataset(comfy_base) -> str:
    name = f"train_invert_{uuid.uuid4().hex[:6]}"
    write_rows(invert_rows(16, size=32, seed=0), comfy_base / "output", name, "reference")
    return name


CREATED: list[str] = []


def unique(prefix: str) -> str:
    CREATED.append(f"{prefix}_{uuid.uuid4().hex[:6]}")
    return CREATED[-1]


@pytest.fixture(scope="module", autouse=True)
def remove_runs(comfy_base):
    """A full run leaves ~0.7 GB (fp32 resumable state and the checkpoint): drop them with the module."""
    yield
    import shutil

    for name in (run + suffix for run in CREATED for suffix in ("", "_again")):
        shutil.rmtree(comfy_base / "output" / "ip2p_train" / name, ignore_errors=True)
        shutil.rmtree(comfy_base / "output" / name, ignore_errors=True)
        for folder in ("checkpoints", "loras"):
            (comfy_base / "models" / folder / f"{name}.safetensors").unlink(missing_ok=True)


def train_graph(loader: str, checkpoint: str, dataset: str, name: str, **overrides) -> dict:
    widget = "checkpoint" if loader == "LoadIP2PModel" else "ckpt_name"
    return {
        "1": {"class_type": loader, "inputs": {widget: checkpoint}},
        "2": {"class_type": "LoadEditDataset", "inputs": {"dataset": f"output/{dataset}", "format": "auto",
                                                          "max_rows": 0, "preview_count": 2}},
        "3": {"class_type": "TrainIP2P", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                    "dataset": ["2", 0], "checkpoint_name": name,
                                                    **TRAIN, **overrides}},
    }


def with_edit(prompt: dict) -> dict:
    prompt["4"] = {"class_type": "InstructEdit", "inputs": {
        "model": ["3", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 2], "instruction": INSTRUCTION,
        "image_guidance": 1.5, "text_guidance": 7.5, "steps": 2, "seed": 0, "sampler_name": "euler_ancestral",
        "scheduler": "normal", "resolution": 64, "keep_input_size": True}}
    prompt["5"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "trained_edit"}}
    prompt["6"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 2], "filename_prefix": "validation"}}
    return prompt


def state_of(comfy_base, name: str) -> dict:
    return torch.load(comfy_base / "output" / "ip2p_train" / name / "state.pt", weights_only=True)


def unet_weights(model) -> dict[str, torch.Tensor]:
    import comfy.model_management

    comfy.model_management.load_models_gpu([model], force_patch_weights=True)
    return {k: v.detach().float().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def prediction(model, seed: int = 0) -> torch.Tensor:
    import comfy.model_management

    gen = torch.Generator().manual_seed(seed)
    x, context = torch.randn(2, 8, 4, 4, generator=gen), torch.randn(2, 77, 768, generator=gen)
    comfy.model_management.load_models_gpu([model])
    with torch.no_grad():
        return model.model.diffusion_model(x, timesteps=torch.tensor([10.0, 500.0]), context=context).clone()


@pytest.fixture(scope="module")
def full_run(comfy_nodes, comfy_base, tiny_ip2p_ckpt, invert_dataset) -> tuple[str, object]:
    """One uninterrupted full fine-tune through the executor, chained into InstructEdit."""
    name = unique("full")
    result = run_prompt(with_edit(train_graph("LoadIP2PModel", tiny_ip2p_ckpt, invert_dataset, name)))
    return name, checked(result)


def test_trained_model_edits_right_away_and_the_checkpoint_holds_the_ema_weights(comfy_nodes, comfy_base,
                                                                                tiny_ip2p_ckpt, full_run):
    from comfyui_ip2p.pipeline.loading import load_ip2p

    name, result = full_run
    assert result.outputs["5"]["images"] and result.outputs["6"]["images"]
    run_dir = comfy_base / "output" / "ip2p_train" / name
    assert {"state.pt", "loss.png", "loss.json", "validation.png"} <= {p.name for p in run_dir.iterdir()}
    state = state_of(comfy_base, name)
    assert state["step"] == 4 and len(state["losses"]) == 4

    loaded = unet_weights(comfy_nodes["CheckpointLoaderSimple"]().load_checkpoint(f"{name}.safetensors")[0])
    original = unet_weights(load_ip2p(tiny_ip2p_ckpt)[0])
    again = unet_weights(load_ip2p(f"{name}.safetensors")[0])
    ema, raw = state["ema"]["shadow"], state["params"]
    assert loaded.keys() == ema.keys()
    for key in ("input_blocks.0.0.weight", "out.2.weight", "input_blocks.1.1.proj_in.weight"):
        saved = ema[key].half().float()  # written in fp16, like released checkpoints
        assert torch.equal(loaded[key], saved) and torch.equal(again[key], saved)
        assert not torch.equal(saved, raw[key].half().float()), "the checkpoint must hold the EMA weights"
        assert not torch.equal(loaded[key], original[key]), "training must change the weights"


def test_cancel_writes_a_resumable_state_and_the_rerun_matches_an_uninterrupted_run(comfy_nodes, comfy_base,
                                                                                    tiny_ip2p_ckpt,
                                                                                    invert_dataset, full_run):
    import comfy.model_management

    reference = state_of(comfy_base, full_run[0])
    name = unique("cancel")
    prompt = train_graph("LoadIP2PModel", tiny_ip2p_ckpt, invert_dataset, name, validation_count=0)

    def cancel_at_step_2(event, data):
        if event == "progress" and data.get("node") == "3" and data.get("value") == 2:
            comfy.model_management.interrupt_current_processing(True)

    stopped = run_prompt(prompt, on_event=cancel_at_step_2)
    assert not stopped.ok and stopped.error is not None
    assert state_of(comfy_base, name)["step"] == 2
    assert (comfy_base / "models" / "checkpoints" / f"{name}.safetensors").is_file()

    prompt["3"]["inputs"]["resume"] = True
    checked(run_prompt(prompt))
    resumed = state_of(comfy_base, name)
    assert resumed["step"] == 4 and resumed["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    for key in reference["params"]:
        torch.testing.assert_close(resumed["params"][key], reference["params"][key], rtol=0, atol=1e-6)


def test_lora_loads_with_lora_loader_and_equals_the_node_model(comfy_nodes, comfy_base, tiny_ip2p_ckpt,
                                                              invert_dataset):
    from comfyui_ip2p.pipeline.loading import load_ip2p

    model, clip, vae = load_ip2p(tiny_ip2p_ckpt)
    before = prediction(model)
    name = unique("lora")
    dataset = {"path": str(comfy_base / "output" / invert_dataset), "format": "reference"}
    settings = {**TRAIN, "mode": "lora", "steps": 3, "learning_rate": 1e-2, "validation_count": 0}
    trained, loss, _validation, file_name = comfy_nodes["TrainIP2P"].execute(
        model, clip, vae, dataset, name, **settings).result
    assert file_name == f"{name}.safetensors"
    assert (comfy_base / "models" / "loras" / file_name).is_file()
    assert loss.shape[0] == 1 and loss.shape[-1] == 3

    from safetensors import safe_open

    with safe_open(str(comfy_base / "models" / "loras" / file_name), "pt") as handle:
        keys = list(handle.keys())
    assert any(k.endswith(".attn2.to_k.lora_up.weight") for k in keys)
    assert "diffusion_model.input_blocks.0.0.diff" in keys

    again = comfy_nodes["TrainIP2P"].execute(model, clip, vae, dataset, name + "_again", **settings).result[3]
    loras = comfy_base / "models" / "loras"
    with safe_open(str(loras / file_name), "pt") as first, safe_open(str(loras / again), "pt") as second:
        assert all(torch.equal(first.get_tensor(k), second.get_tensor(k)) for k in keys), "same seed, same LoRA"

    loader = comfy_nodes["LoraLoaderModelOnly"]()
    via_loader = loader.load_lora_model_only(model, file_name, 1.0)[0]
    assert torch.equal(prediction(model), before), "the input MODEL must stay untouched"
    with_lora = prediction(via_loader)
    assert (with_lora - before).abs().max() > 1e-3, "the LoRA must change the output"
    torch.testing.assert_close(prediction(trained), with_lora, rtol=1e-4, atol=1e-4)


def test_text_to_image_model_trains_from_the_papers_init(comfy_nodes, comfy_base, tiny_t2i_ckpt, invert_dataset):
    from comfyui_ip2p.pipeline.loading import load_ip2p

    name = unique("from_t2i")
    prompt = train_graph("CheckpointLoaderSimple", tiny_t2i_ckpt, invert_dataset, name, steps=1, ema_decay=0.0,
                         validation_count=0)
    checked(run_prompt(prompt))
    conv_in = unet_weights(load_ip2p(f"{name}.safetensors")[0])["input_blocks.0.0.weight"]
    assert conv_in.shape[1] == 8
    image_channels = conv_in[:, 4:].abs().max().item()
    # Zero before training; one AdamW step moves each weight by at most ~lr.
    assert 0 < image_channels < 1e-3


def test_bad_checkpoint_name_is_refused_naming_the_node(comfy_nodes, comfy_base, tiny_ip2p_ckpt, invert_dataset):
    result = run_prompt(train_graph("LoadIP2PModel", tiny_ip2p_ckpt, invert_dataset, "../outside"))
    assert not result.ok
    assert result.error["exception_message"].startswith("TrainIP2P: checkpoint_name '../outside'")


def test_batched_text_encoding_equals_encoding_one_by_one(comfy_base, tiny_ip2p_ckpt):
    from comfyui_ip2p.pipeline.edit import encode_text
    from comfyui_ip2p.pipeline.loading import load_ip2p
    from comfyui_ip2p.pipeline.trainee import encode_texts

    clip = load_ip2p(tiny_ip2p_ckpt)[1]
    texts = ["make it winter", "", "turn the sky pink and add a boat"]
    batched = encode_texts(clip, texts)
    for i, text in enumerate(texts):
        torch.testing.assert_close(batched[i], encode_text(clip, text)[0][0][0].float(), rtol=1e-4, atol=1e-4)


def test_cached_latents_equal_encoding_every_step_on_the_real_vae(comfy_base, tiny_ip2p_ckpt):
    from comfyui_ip2p.pipeline.loading import load_ip2p
    from comfyui_ip2p.pipeline.trainee import encoders
    from comfyui_ip2p.training.data import LatentBatches, PixelBatches

    _, clip, vae = load_ip2p(tiny_ip2p_ckpt)
    rows = invert_rows(4, size=32, seed=5)
    uniforms = torch.tensor([[0.1, 0.2, 0.9], [0.5, 0.5, 0.1], [0.9, 0.9, 0.2], [0.3, 0.7, 0.7]])
    pixel = PixelBatches(rows, encoders(clip, vae), 32).batch([0, 1, 2, 3], uniforms)
    cached = LatentBatches(rows, encoders(clip, vae), 32).batch([0, 1, 2, 3], uniforms)
    for field in ("image", "target", "context"):
        torch.testing.assert_close(getattr(pixel, field), getattr(cached, field), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_training_learns_to_invert_colours(comfy_base, tiny_ip2p_ckpt):
    """Held-out shapes: after training, the edit is much closer to the inverted image than before."""
    from comfyui_ip2p.dataset.pixels import image_to_tensor
    from comfyui_ip2p.pipeline.edit import SamplingSettings, edit_latents, encode_text
    from comfyui_ip2p.pipeline.loading import load_ip2p
    from comfyui_ip2p.pipeline.train import RunFiles, run_training
    from comfyui_ip2p.pipeline.trainee import encode_images
    from comfyui_ip2p.training.config import TrainConfig

    name = unique("learn")
    write_rows(invert_rows(32, size=32, seed=0), comfy_base / "output", name, "reference")
    model, clip, vae = load_ip2p(tiny_ip2p_ckpt)
    held_out = invert_rows(4, size=32, seed=99)
    source = encode_images(vae, torch.stack([image_to_tensor(r.input_image).permute(2, 0, 1) for r in held_out]))
    target = encode_images(vae, torch.stack([image_to_tensor(r.edited_image).permute(2, 0, 1) for r in held_out]))
    positive, negative = encode_text(clip, INSTRUCTION), encode_text(clip, "")
    settings = SamplingSettings(steps=10, seed=3, sampler_name="euler", image_scale=1.0, text_scale=1.0)

    def edit_error(m) -> float:
        return (edit_latents(m, positive, negative, source, settings) - target).pow(2).mean().item()

    def x0_error(m, t: int = 10) -> float:
        """The edit as the model predicts it in one step from a lightly noised target (fixed noise)."""
        import comfy.model_management

        sigma = m.get_model_object("model_sampling").sigmas[t].double()
        alpha = float(1.0 / (1.0 + sigma**2))
        x0 = target * 0.18215
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
        noisy = alpha**0.5 * x0 + (1 - alpha) ** 0.5 * noise
        context = positive[0][0].expand(len(held_out), -1, -1)
        comfy.model_management.load_models_gpu([m])
        with torch.no_grad():
            eps = m.model.diffusion_model(torch.cat([noisy, source], 1), timesteps=torch.full((4,), float(t)),
                                          context=context)
        return ((noisy - (1 - alpha) ** 0.5 * eps) / alpha**0.5 - x0).pow(2).mean().item()

    before, before_x0 = edit_error(model), x0_error(model)
    config = TrainConfig(steps=60, batch_size=8, resolution=32, learning_rate=1e-3, ema_decay=0.0)
    files = RunFiles(model=comfy_base / "models" / "checkpoints" / f"{name}.safetensors",
                     run_dir=comfy_base / "output" / "ip2p_train" / name)
    outcome = run_training(model, clip, vae, {"path": str(comfy_base / "output" / name)}, config, files)
    losses = state_of(comfy_base, name)["losses"]
    assert statistics.mean(losses[-10:]) < 0.3 * statistics.mean(losses[:10])
    after, after_x0 = edit_error(outcome.model), x0_error(outcome.model)
    assert after < before / 10, (before, after)
    assert after_x0 < before_x0 / 3, (before_x0, after_x0)


def test_the_handles_column_mapping_is_checked_again(comfy_base, invert_dataset):
    from comfyui_ip2p.pipeline.train import confined_dataset

    path = str(comfy_base / "output" / invert_dataset)
    mapping = {"input_image": "source_img", "edited_image": "target_img", "instruction": "instruction"}
    assert confined_dataset({"path": path, "format": "mapped", "mapping": mapping})["mapping"] == mapping
    assert confined_dataset({"path": path, "format": "reference"})["mapping"] is None
    for forged, expected in (({**mapping, "pixels": "x"}, "unknown field 'pixels'"),
                             ({**mapping, "instruction": "a\nb"}, "control characters"),
                             ("input_image=a", "must be a dict")):
        with pytest.raises(ValueError, match=expected):
            confined_dataset({"path": path, "format": "mapped", "mapping": forged})
