"""Cancel (ComfyUI's interrupt) during editing, pair generation, CLIP filtering, dataset writing and training.

For each: the work stops within one model step (counted by a process-wide forward hook on the real model
modules), the MODEL handed to the node is exactly as before (options, patches, wrappers, weights), a normal run
afterwards gives the result of a run that never saw a cancel, and every file on disk is whole.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui_ip2p.cli.runtime import run_prompt
from comfyui_ip2p.dataset.formats import load_rows
from comfyui_ip2p.dataset.paths import is_temp
from comfyui_ip2p.dataset.records import EditRow
from comfyui_ip2p.testing.comfy_run import checked
from comfyui_ip2p.testing.edit_rows import random_rows, write_rows
from comfyui_ip2p.testing.threads import torch_threads
from comfyui_ip2p.testing.tiny_clip import write_tiny_clip
from PIL import Image

# Generous: one tiny-model step takes well under a second; a cancel that waits for the run to end takes many.
PROMPT_S = 10.0
EDIT = {"steps": 6, "seed": 7, "sampler_name": "euler_ancestral", "scheduler": "normal"}


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


# --- measuring a cancel --------------------------------------------------------------------------------------


class CancelProbe:
    """Counts forwards of modules of `kinds` in the whole process; fires ComfyUI's interrupt at the n-th one.

    The n-th forward is the one in flight when the user presses cancel; `after` counts the ones that started
    later (the promise is at most one).
    """

    def __init__(self, kinds: tuple[type, ...], cancel_at: int | None) -> None:
        self.kinds = kinds
        self.cancel_at = cancel_at
        self.calls = 0
        self.after = 0
        self.interrupted_at: float | None = None
        self.handle = None

    def interrupt(self) -> None:
        import comfy.model_management

        self.interrupted_at = time.monotonic()
        comfy.model_management.interrupt_current_processing(True)

    def _hook(self, module, args) -> None:
        if not isinstance(module, self.kinds):
            return
        if _meta_inputs(args):
            return  # TrainIP2P's memory pre-flight traces the UNet's shapes on the meta device: no model call
        self.calls += 1
        if self.interrupted_at is not None:
            self.after += 1
        elif self.calls == self.cancel_at:
            self.interrupt()

    def seconds_since_interrupt(self) -> float:
        assert self.interrupted_at is not None, "the cancel never fired: the run was shorter than expected"
        return time.monotonic() - self.interrupted_at

    def __enter__(self) -> CancelProbe:
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        import comfy.model_management

        self.handle.remove()
        # A node that never looked at the flag would leave it set for the next prompt: do not hide that
        # behind a leaked flag failing some later test, the assertions on `after` catch it here.
        comfy.model_management.interrupt_current_processing(False)


def _meta_inputs(args: tuple) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_meta for a in args)


def unet_kinds() -> tuple[type, ...]:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return (UNetModel,)


def cancelled_directly(run: Callable[[], object], kinds: tuple[type, ...], cancel_at: int) -> CancelProbe:
    """Runs a node's execute with a cancel at the `cancel_at`-th model forward; it must raise the interrupt."""
    import comfy.model_management

    with CancelProbe(kinds, cancel_at) as probe, pytest.raises(comfy.model_management.InterruptProcessingException):
        run()
    assert probe.seconds_since_interrupt() < PROMPT_S
    assert probe.after <= 1, f"{probe.after} model calls after the cancel"
    return probe


def cancelled_in_executor(prompt: dict, kinds: tuple[type, ...], cancel_at: int | None = None,
                          on_progress: Callable[[CancelProbe, dict], None] | None = None) -> CancelProbe:
    """Runs a graph through ComfyUI's executor and cancels it mid-way; it must end as interrupted."""

    with CancelProbe(kinds, cancel_at) as probe:
        def on_event(event, data):
            if event == "progress" and on_progress is not None and probe.interrupted_at is None:
                on_progress(probe, data)

        result = run_prompt(prompt, on_event=on_event)
        elapsed = probe.seconds_since_interrupt()
    assert not result.ok
    assert any(event == "execution_interrupted" for event, _ in result.events), result.error
    assert elapsed < PROMPT_S
    assert probe.after <= 1, f"{probe.after} model calls after the cancel"
    return probe


# --- "the MODEL is unpatched" ----------------------------------------------------------------------------


def tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()


def describe(value) -> object:
    """A comparable picture of model_options and friends: structure, tensor digests, object identities."""
    if isinstance(value, dict):
        return {repr(k): describe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [describe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tensor_digest(value))
    if isinstance(value, str | int | float | bool | type(None)):
        return value
    return (type(value).__name__, id(value))


def weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor_digest(tensor).encode())
    return digest.hexdigest()


def model_fingerprint(model) -> dict:
    """Everything a node could leave behind on a ModelPatcher and its torch model."""
    import comfy.ldm.modules.attention

    modules = model.model.named_modules()
    return {
        "model_options": describe(model.model_options),
        "patches": {k: len(v) for k, v in model.patches.items()},
        "object_patches": describe(model.object_patches),
        "weight_wrapper_patches": describe(model.weight_wrapper_patches),
        "wrappers": describe(model.wrappers),
        "callbacks": describe(model.callbacks),
        "attachments": describe(model.attachments),
        "hooks": (describe(model.hook_patches), repr(model.current_hooks)),
        "weight_functions": [name for name, m in modules
                             if getattr(m, "weight_function", None) or getattr(m, "bias_function", None)],
        "grad": [name for name, p in model.model.named_parameters() if p.requires_grad],
        "weights": weights_digest(model.model),
        "optimized_attention": comfy.ldm.modules.attention.optimized_attention,
    }


# --- inputs ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ip2p(comfy_nodes, tiny_ip2p_ckpt) -> tuple:
    from comfyui_ip2p.pipeline.loading import load_ip2p

    return load_ip2p(tiny_ip2p_ckpt)


@pytest.fixture(scope="module")
def t2i(comfy_nodes, comfy_base, tiny_t2i_ckpt) -> tuple:
    import comfy.sd

    path = str(comfy_base / "models/checkpoints" / tiny_t2i_ckpt)
    return tuple(comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)[:3])


def load_image(comfy_base: Path, name: str) -> torch.Tensor:
    """What ComfyUI's LoadImage gives for an RGB file."""
    pixels = np.asarray(Image.open(comfy_base / "input" / name).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels)[None]


def as_saved(images: torch.Tensor) -> np.ndarray:
    """The 8-bit pixels SaveImage writes for the first image of a batch."""
    return np.clip(255.0 * images[0].cpu().numpy(), 0, 255).astype(np.uint8)


def saved_image(comfy_base: Path, result, node_id: str) -> np.ndarray:
    info = result.outputs[node_id]["images"][0]
    return np.asarray(Image.open(comfy_base / "output" / info["subfolder"] / info["filename"]))


def edit_inputs() -> dict:
    return {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0]}


def loaders(ckpt: str, image: str) -> dict:
    return {"1": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": ckpt}},
            "2": {"class_type": "LoadImage", "inputs": {"image": image}}}


def save(images: list, prefix: str) -> dict:
    return {"class_type": "SaveImage", "inputs": {"images": images, "filename_prefix": prefix}}


# Each case: the graph (its image comes from node "9") and the same work run directly on a held MODEL.

def instruct_edit_case(nodes, ckpt, image_name, model, clip, vae, image):
    values = {"instruction": "make it winter", "image_guidance": 1.5, "text_guidance": 7.5, **EDIT,
              "resolution": 64, "keep_input_size": True}
    graph = {**loaders(ckpt, image_name),
             "3": {"class_type": "InstructEdit", "inputs": {**edit_inputs(), **values}},
             "9": save(["3", 0], "cancel_edit")}
    return graph, lambda: nodes["InstructEdit"].execute(model, clip, vae, image, **values).result[0]


def dual_cfg_case(nodes, ckpt, image_name, model, clip, vae, image):
    from comfyui_ip2p.pipeline.edit import encode_text

    values = {"image_guidance": 1.5, "text_guidance": 7.5, "denoise": 1.0, **EDIT}
    graph = {**loaders(ckpt, image_name),
             "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "make it winter"}},
             "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
             "5": {"class_type": "DualCFGSampler",
                   "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "image": ["2", 0],
                              "vae": ["1", 2], **values}},
             "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
             "9": save(["6", 0], "cancel_dual")}

    def direct():
        latent = nodes["DualCFGSampler"].execute(model, encode_text(clip, "make it winter"), encode_text(clip, ""),
                                                 image=image, vae=vae, **values).result[0]
        return vae.decode(latent["samples"])

    return graph, direct


def guidance_grid_case(nodes, ckpt, image_name, model, clip, vae, image):
    values = {"instruction": "make it winter", "image_guidance_values": "1.0, 1.5", "text_guidance_values": "7.5",
              **EDIT, "steps": 4, "resolution": 64}
    graph = {**loaders(ckpt, image_name),
             "3": {"class_type": "IP2PGuidanceGrid", "inputs": {**edit_inputs(), **values}},
             "9": save(["3", 1], "cancel_grid")}
    return graph, lambda: nodes["IP2PGuidanceGrid"].execute(model, clip, vae, image, **values).result[1]


P2P = {"samples_per_pair": 2, "steps": 6, "width": 64, "height": 64, "seed": 11, "p_min": 0.1, "p_max": 0.9,
       "cfg_min": 7.5, "cfg_max": 15.0, "sampler_name": "euler_ancestral", "scheduler": "normal", "batch_size": 2,
       "caption_pairs": "a cat || a dog || make it a dog"}


def p2p_case(nodes, ckpt, model, clip, vae):
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
             "3": {"class_type": "P2PPairGenerator",
                   "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], **P2P}},
             "9": save(["3", 2], "cancel_p2p")}
    return graph, lambda: nodes["P2PPairGenerator"].execute(model, clip, vae, **P2P).result[2]


def output_files(comfy_base: Path) -> set[Path]:
    return {p for folder in ("output", "temp") for p in (comfy_base / folder).rglob("*") if p.is_file()}


def check_cancel_case(comfy_base, model, graph: dict, direct: Callable[[], torch.Tensor]) -> None:
    """The whole property for one sampling node: prompt stop, MODEL untouched, same result afterwards."""
    before = model_fingerprint(model)
    with torch.no_grad():
        reference = direct()
    assert model_fingerprint(model) == before, "a normal run must not change the MODEL"

    cancelled_directly(direct, unet_kinds(), cancel_at=2)
    after = model_fingerprint(model)
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    with torch.no_grad():
        again = direct()
    assert torch.equal(again, reference), "a run after a cancel must equal a run that never saw one"

    # The same through ComfyUI's executor, with models it loads itself; a cancelled prompt writes no file.
    files_before = output_files(comfy_base)
    cancelled_in_executor(graph, unet_kinds(), cancel_at=2)
    assert output_files(comfy_base) - files_before == set()
    result = checked(run_prompt(graph))
    got = saved_image(comfy_base, result, "9").astype(int)
    assert np.abs(got - as_saved(reference).astype(int)).max() <= 1


@pytest.mark.parametrize("case", [instruct_edit_case, dual_cfg_case, guidance_grid_case],
                         ids=["InstructEdit", "DualCFGSampler", "IP2PGuidanceGrid"])
def test_cancel_during_an_edit_stops_in_a_step_and_leaves_the_model_as_it_was(comfy_nodes, comfy_base,
                                                                               tiny_ip2p_ckpt, input_image, ip2p,
                                                                               case):
    model, clip, vae = ip2p
    graph, direct = case(comfy_nodes, tiny_ip2p_ckpt, input_image, model, clip, vae,
                         load_image(comfy_base, input_image))
    check_cancel_case(comfy_base, model, graph, direct)


def test_cancel_during_pair_generation_stops_in_a_step_and_leaves_the_model_as_it_was(comfy_nodes, comfy_base,
                                                                                      tiny_t2i_ckpt, t2i):
    model, clip, vae = t2i
    graph, direct = p2p_case(comfy_nodes, tiny_t2i_ckpt, model, clip, vae)
    check_cancel_case(comfy_base, model, graph, direct)


# --- CLIP filter -----------------------------------------------------------------------------------------


def make_rows(groups: int, per_group: int) -> list[EditRow]:
    return random_rows(groups, per_group, size=32)


@pytest.fixture(scope="module")
def source_rows(comfy_base) -> tuple[str, list[EditRow]]:
    """30 rows as a reference-layout dataset in the input folder (png, so pixels compare exactly)."""
    name = unique("cancel_source")
    rows = make_rows(3, 10)
    write_rows(rows, comfy_base / "input", name, "reference", image_format="png")
    return name, rows


def load_graph(source: str, max_rows: int = 0) -> dict:
    return {"1": {"class_type": "LoadEditDataset", "inputs": {"dataset": f"input/{source}", "format": "auto",
                                                              "max_rows": max_rows, "preview_count": 0}}}


def save_node(rows: list, name: str, fmt: str) -> dict:
    return {"class_type": "SaveEditDataset", "inputs": {"rows": rows, "dataset_name": name, "format": fmt,
                                                         "image_format": "png"}}


def test_cancel_during_clip_filtering_stops_between_batches_and_writes_nothing(comfy_nodes, comfy_base,
                                                                                source_rows):
    import open_clip.transformer
    from comfyui_ip2p.pipeline.clip_filter import load_encoder

    weights = write_tiny_clip(comfy_base / "models" / "clip_filter", "tiny_clip_cancel", seed=3)
    source, rows = source_rows
    target = unique("cancel_filtered")
    filter_values = {"clip_weights": weights, "min_sim_0": -1.0, "min_sim_1": -1.0, "min_sim_dir": -1.0,
                     "min_sim_image": -1.0, "top_k": 0, "batch_size": 2}
    graph = {**load_graph(source),
             "2": {"class_type": "CLIPDirectionFilter", "inputs": {"rows": ["1", 1], **filter_values}},
             "3": save_node(["2", 0], target, "diffusers")}
    encoder = load_encoder(weights)
    before = weights_digest(encoder.model)

    def cancel_after_three_batches(probe: CancelProbe, data: dict) -> None:
        # The filter's bar counts rows (30); in-process bars carry no node id.
        if data["max"] == 30 and data["value"] >= 6:
            probe.interrupt()

    # Each batch of 2 pairs is one vision-tower call per side: 15 batches, so 30 calls in all.
    probe = cancelled_in_executor(graph, (open_clip.transformer.VisionTransformer,),
                                  on_progress=cancel_after_three_batches)
    assert probe.calls <= 2 * 3 + 2, f"{probe.calls} vision forwards: the filter went on after the cancel"
    assert not (comfy_base / "output" / target).exists(), "a cancelled filter must not reach the save"
    assert load_encoder(weights) is encoder and weights_digest(encoder.model) == before

    checked(run_prompt(graph))
    kept = load_rows(comfy_base / "output" / target)
    assert sorted((r.group, r.seed) for r in kept) == sorted((r.group, r.seed) for r in rows)
    expected = comfy_nodes["CLIPDirectionFilter"].execute(load_rows(comfy_base / "input" / source),
                                                          **filter_values).result[0]
    scores = {(r.group, r.seed): r.scores() for r in expected}
    for row in kept:
        assert row.scores() == pytest.approx(scores[(row.group, row.seed)], abs=1e-5)


# --- dataset writing -------------------------------------------------------------------------------------


def files_left(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if is_temp(p) or p.name.endswith(".tmp")]


def check_whole(comfy_nodes, folder: Path, fmt: str, source: list[EditRow], tmp_path: Path) -> list[tuple]:
    """Every row on disk is complete and equals its source row; returns the keys in the order written."""
    from comfyui_ip2p.dataset.writer import read_manifest

    assert files_left(folder) == []
    by_key = {(r.group, r.seed): r for r in source}
    loaded = comfy_nodes["LoadEditDataset"].execute("none", "auto", 0, 0, dataset_override=str(
        folder.relative_to(folder.parents[1]))).result[1]
    for row in loaded:
        original = by_key[(row.group, row.seed)]
        assert (row.input_caption, row.instruction, row.output_caption) == (
            original.input_caption, original.instruction, original.output_caption)
        for stored, want in ((row.input_image, original.input_image), (row.edited_image, original.edited_image)):
            got = Image.open(stored) if isinstance(stored, Path) else stored
            assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
    keys = [(r.group, r.seed) for r in loaded]
    assert len(set(keys)) == len(keys), "a row is on disk twice"
    manifest = read_manifest(folder)
    assert manifest["clean"] is True and manifest["rows"] == len(keys)
    if fmt == "diffusers":
        import datasets

        hf = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / f"hf_{len(keys)}"))["train"]
        assert len(hf) == len(keys) and hf[0]["edited_image"].size == (32, 32)
    return keys


@pytest.mark.parametrize("fmt", ["diffusers", "reference"])
def test_cancel_while_saving_keeps_the_earlier_rows_and_every_row_written_so_far(comfy_nodes, comfy_base, tmp_path,
                                                                                source_rows, fmt):
    source, rows = source_rows
    target = unique(f"cancel_saved_{fmt}")
    folder = comfy_base / "output" / target
    first = run_prompt({**load_graph(source, max_rows=8), "2": save_node(["1", 1], target, fmt)})
    assert checked(first).outputs["2"]["text"] == [f"8 new rows, 8 in total, in output/{target} ({fmt})"]
    previous = check_whole(comfy_nodes, folder, fmt, rows, tmp_path)

    graph = {**load_graph(source), "2": save_node(["1", 1], target, fmt)}

    def cancel_at_row_15(probe: CancelProbe, data: dict) -> None:
        if data["max"] == 30 and data["value"] == 15:
            probe.interrupt()

    cancelled_in_executor(graph, unet_kinds(), on_progress=cancel_at_row_15)
    kept = check_whole(comfy_nodes, folder, fmt, rows, tmp_path)
    assert set(previous) <= set(kept), "rows of the earlier complete save were lost"
    # Rows 0-14 were handed to the writer before the cancel; at most the one in flight may follow.
    assert 15 <= len(kept) <= 16, len(kept)
    assert set(kept) == {(r.group, r.seed) for r in rows[:len(kept)]}

    again = checked(run_prompt(graph))
    assert again.outputs["2"]["text"] == [f"{30 - len(kept)} new rows, 30 in total, in output/{target} ({fmt})"]
    assert sorted(check_whole(comfy_nodes, folder, fmt, rows, tmp_path)) == sorted((r.group, r.seed) for r in rows)


# --- training --------------------------------------------------------------------------------------------

TRAIN = {"mode": "lora", "steps": 4, "batch_size": 2, "grad_accumulation": 1, "learning_rate": 1e-3,
         "resolution": 32, "seed": 0, "ema_decay": 0.9, "cache_latents": True, "gradient_checkpointing": False,
         "lora_rank": 4, "checkpoint_every": 0, "validation_every": 0, "resume": False, "validation_count": 0,
         "validation_steps": 2}


@pytest.fixture()
def one_thread():
    """The tiny model's ops are small: a second thread gains little and spins on a busy machine."""
    with torch_threads(1):
        yield


def run_files(comfy_base: Path, name: str) -> list[Path]:
    return [comfy_base / "models" / "loras" / f"{name}.safetensors",
            *sorted((comfy_base / "output" / "ip2p_train" / name).iterdir())]


def check_run_files(comfy_base: Path, name: str) -> dict:
    """Every file of a run loads; no temporaries are left; returns the resumable state."""
    from safetensors.torch import load_file

    files = run_files(comfy_base, name)
    assert [p.name for p in files if p.name.endswith(".tmp") or p.name.startswith(".")] == []
    assert not list((comfy_base / "models" / "loras").glob(f".{name}*"))
    assert load_file(files[0]), "the LoRA file is empty"
    for png in (p for p in files if p.suffix == ".png"):
        Image.open(png).load()
    return torch.load(comfy_base / "output" / "ip2p_train" / name / "state.pt", weights_only=True)


# (settings, the UNet forward that is in flight at the cancel, the step the saved state must hold)
TRAIN_CANCELS = {
    # Forward 2 is training step 2: ComfyUI checks the interrupt inside every layer, so the step stops
    # mid-forward and is dropped whole; the state is the last completed step, never a half-applied one.
    "mid-step": ({}, 2, 1),
    # Steps 1-2 are forwards 1-2, then the validation edit at step 2 (3 sampling steps) runs forwards 3-5 with
    # the EMA weights swapped in and LoRA wrappers on a temporary patcher: the cancel lands in forward 4.
    "during-validation": ({"validation_every": 2, "validation_count": 1, "validation_steps": 3}, 4, 2),
}


@pytest.mark.parametrize("case", list(TRAIN_CANCELS))
def test_cancel_during_training_saves_a_whole_resumable_state_and_leaves_the_model_as_it_was(
        comfy_nodes, comfy_base, tiny_ip2p_ckpt, ip2p, one_thread, case):
    import shutil

    overrides, cancel_at, saved_step = TRAIN_CANCELS[case]
    settings = {**TRAIN, **overrides}
    model, clip, vae = ip2p
    dataset_name = unique("cancel_train_data")
    write_rows(make_rows(2, 4), comfy_base / "output", dataset_name, "reference", image_format="png")
    dataset = {"path": str(comfy_base / "output" / dataset_name), "format": "reference"}
    reference_name, name = unique("cancel_train_ref"), unique("cancel_train")
    node = comfy_nodes["TrainIP2P"]
    try:
        before = model_fingerprint(model)
        node.execute(model, clip, vae, dataset, reference_name, **settings)
        reference = check_run_files(comfy_base, reference_name)
        assert reference["step"] == 4

        cancelled_directly(lambda: node.execute(model, clip, vae, dataset, name, **settings), unet_kinds(),
                           cancel_at=cancel_at)
        after = model_fingerprint(model)
        assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        stopped = check_run_files(comfy_base, name)
        assert stopped["step"] == saved_step
        assert stopped["losses"] == pytest.approx(reference["losses"][:saved_step], rel=1e-6)

        # Resumed through ComfyUI's executor, from the files alone.
        graph = {"1": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": tiny_ip2p_ckpt}},
                 "2": {"class_type": "LoadEditDataset", "inputs": {"dataset": f"output/{dataset_name}",
                                                                   "format": "auto", "max_rows": 0,
                                                                   "preview_count": 0}},
                 "3": {"class_type": "TrainIP2P", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                             "dataset": ["2", 0], "checkpoint_name": name,
                                                             **settings, "resume": True}}}
        checked(run_prompt(graph))
        resumed = check_run_files(comfy_base, name)
        assert resumed["step"] == 4 and resumed["losses"] == pytest.approx(reference["losses"], rel=1e-5)
        for key, value in reference["params"].items():
            torch.testing.assert_close(resumed["params"][key], value, rtol=0, atol=1e-6)
        assert resumed["ema"]["updates"] == reference["ema"]["updates"] == 4
        for key, value in reference["ema"]["shadow"].items():
            torch.testing.assert_close(resumed["ema"]["shadow"][key], value, rtol=0, atol=1e-6)
    finally:
        for run in (reference_name, name):
            shutil.rmtree(comfy_base / "output" / "ip2p_train" / run, ignore_errors=True)
            (comfy_base / "models" / "loras" / f"{run}.safetensors").unlink(missing_ok=True)
