"""Bad inputs to every node, as a table of named cases run through ComfyUI's real executor (in-process).

Odd tensors and rows reach our nodes through the test-only probe nodes (testing/probe_nodes.py), as any
upstream node could produce them. Each case either succeeds with a documented result, or is refused with a
validation error (ComfyUI's min/max/type checks) or an execution error that starts with our node's name and
says what to do. Never a bare torch/numpy exception, a hang, NaN output or a crash.

Documented decisions:
- RGBA drops alpha, grayscale becomes RGB, any size from 1x1 up is edited and returned at the input size.
- An empty instruction is a valid edit (the instruction-free prediction), as in the paper's unconditional branch.
- Text longer than 16 CLIP windows (~1200 tokens) or 20k characters is refused (it is pasted by mistake or
  hostile, and costs a text-encoder pass per window plus wider cross-attention at every step).
- Both guidance scales 0 is a valid, if useless, edit (the unconditional prediction).
"""

from __future__ import annotations

import contextlib
import pickle
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from comfyui_ip2p.cli.runtime import RunResult, run_prompt
from comfyui_ip2p.testing import probe_nodes
from comfyui_ip2p.testing.probe_nodes import inspected
from comfyui_ip2p.testing.tiny_clip import write_tiny_clip
from comfyui_ip2p.testing.tiny_models import write_sdxl_checkpoint

SAMPLING = {"steps": 2, "seed": 0, "sampler_name": "euler", "scheduler": "normal"}


@dataclass
class Names:
    """What the graphs refer to: checkpoint names in the shared base, CLIP-filter weights, a dataset."""

    ip2p: str
    t2i: str
    sdxl: str
    clip_weights: str
    dataset: str
    bad: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def prepared(comfy_base: Path, tiny_ip2p_ckpt: str, tiny_t2i_ckpt: str) -> Iterator[Names]:
    """Probe nodes registered; a tiny SDXL-family checkpoint, broken checkpoint files, CLIP-filter weights
    and a small dataset in the session's base folder (the checkpoints are removed afterwards)."""
    from comfyui_ip2p.testing.edit_rows import write_rows
    from comfyui_ip2p.testing.synthetic import invert_rows

    probe_nodes.register()
    tag = uuid.uuid4().hex[:6]
    checkpoints = comfy_base / "models" / "checkpoints"
    sdxl = f"tiny_sdxl_{tag}.safetensors"
    write_sdxl_checkpoint(checkpoints / sdxl, seed=3)
    good = (checkpoints / tiny_ip2p_ckpt).read_bytes()
    bad = {"truncated": good[: len(good) // 2], "header_only": good[:100], "empty": b"",
           "random_bytes": bytes(range(256)) * 40}
    files = {kind: f"bad_{kind}_{tag}.safetensors" for kind in bad}
    for kind, data in bad.items():
        (checkpoints / files[kind]).write_bytes(data)
    dataset = f"bad_inputs_{tag}"
    write_rows(invert_rows(4, size=32, seed=0), comfy_base / "output", dataset, "reference")
    clip = write_tiny_clip(comfy_base / "models" / "clip_filter", "tiny_clip", seed=0)
    try:
        yield Names(tiny_ip2p_ckpt, tiny_t2i_ckpt, sdxl, clip, f"output/{dataset}", files)
    finally:
        for name in [sdxl, *files.values()]:
            (checkpoints / name).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def names(comfy_base, comfy_nodes, tiny_ip2p_ckpt, tiny_t2i_ckpt) -> Iterator[Names]:
    with prepared(comfy_base, tiny_ip2p_ckpt, tiny_t2i_ckpt) as prepared_names:
        yield prepared_names


# --- graph pieces -------------------------------------------------------------------------------------------


def cached(ckpt: str) -> dict:
    return {"class_type": "IP2PProbeCheckpoint", "inputs": {"ckpt_name": ckpt}}


def image(**overrides) -> dict:
    inputs = {"batch": 1, "height": 24, "width": 40, "channels": 3, "fill": "random", "seed": 0}
    return {"class_type": "IP2PProbeImage", "inputs": {**inputs, **overrides}}


def rows(**overrides) -> dict:
    inputs = {"count": 2, "input_caption": "a house", "instruction": "make it winter",
              "output_caption": "a house in winter", "image_size": 32, "channels": 3, "seed": 0}
    return {"class_type": "IP2PProbeRows", "inputs": {**inputs, **overrides}}


def inspect(source: list) -> dict:
    return {"class_type": "IP2PProbeInspect", "inputs": {"images": source}}


def preview(source: list) -> dict:
    return {"class_type": "PreviewAny", "inputs": {"source": source}}


def edit(n: Names, img: dict | None = None, model: str | None = None, clip: str | None = None, **overrides) -> dict:
    inputs = {"model": ["1", 0], "clip": ["2", 1], "vae": ["2", 2], "image": ["3", 0],
              "instruction": "make it winter", "image_guidance": 1.5, "text_guidance": 7.5, **SAMPLING,
              "resolution": 64, "keep_input_size": True}
    return {"1": cached(model or n.ip2p), "2": cached(clip or n.ip2p), "3": img or image(),
            "4": {"class_type": "InstructEdit", "inputs": {**inputs, **overrides}}, "9": inspect(["4", 0])}


def dual_cfg(n: Names, model: str | None = None, **overrides) -> dict:
    inputs = {"model": ["1", 0], "positive": ["5", 0], "negative": ["6", 0], "image_guidance": 1.5,
              "text_guidance": 7.5, **SAMPLING, "denoise": 1.0, "image": ["3", 0], "vae": ["1", 2]}
    return {"1": cached(model or n.ip2p), "3": image(),
            "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "make it winter"}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
            "4": {"class_type": "DualCFGSampler", "inputs": {**inputs, **overrides}}, "9": preview(["4", 0])}


def grid(n: Names, **overrides) -> dict:
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["3", 0], "instruction": "snow",
              "image_guidance_values": "1.0, 1.5", "text_guidance_values": "7.5", **SAMPLING, "resolution": 64}
    return {"1": cached(n.ip2p), "3": image(),
            "4": {"class_type": "IP2PGuidanceGrid", "inputs": {**inputs, **overrides}}, "9": inspect(["4", 0])}


def resize(n: Names, img: dict | None = None) -> dict:
    return {"3": img or image(),
            "4": {"class_type": "IP2PReferenceResize", "inputs": {"image": ["3", 0], "resolution": 64}},
            "9": inspect(["4", 0])}


def p2p(n: Names, model: str | None = None, clip: str | None = None, **overrides) -> dict:
    inputs = {"model": ["1", 0], "clip": ["2", 1], "vae": ["2", 2], "samples_per_pair": 1, "steps": 1,
              "width": 64, "height": 64, "seed": 0, "p_min": 0.1, "p_max": 0.9, "cfg_min": 7.5, "cfg_max": 7.5,
              "sampler_name": "euler", "scheduler": "normal", "batch_size": 1, "caption_pairs": "a cat || a dog"}
    return {"1": cached(model or n.t2i), "2": cached(clip or n.t2i),
            "4": {"class_type": "P2PPairGenerator", "inputs": {**inputs, **overrides}}, "9": inspect(["4", 2])}


def load_model(n: Names, checkpoint: str) -> dict:
    return {"4": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": checkpoint}}, "9": preview(["4", 0])}


def converted_edit(n: Names, model: str, clip: str) -> dict:
    graph = edit(n, model=model, clip=clip)
    graph["5"] = {"class_type": "ConvertToIP2P", "inputs": {"model": ["1", 0]}}
    graph["4"]["inputs"]["model"] = ["5", 0]
    return graph


def train(n: Names, model: str | None = None, **overrides) -> dict:
    inputs = {"model": ["1", 0], "clip": ["2", 1], "vae": ["2", 2], "dataset": ["3", 0],
              "checkpoint_name": f"bad_inputs_{uuid.uuid4().hex[:6]}", "mode": "lora", "steps": 1, "batch_size": 1,
              "grad_accumulation": 1, "learning_rate": 1e-4, "resolution": 16, "seed": 0, "ema_decay": 0.0,
              "cache_latents": True, "gradient_checkpointing": False, "lora_rank": 1, "checkpoint_every": 0,
              "validation_every": 0, "resume": False, "validation_count": 0, "validation_steps": 1}
    return {"1": cached(model or n.ip2p), "2": cached(n.t2i),
            "3": {"class_type": "LoadEditDataset",
                  "inputs": {"dataset": n.dataset, "format": "auto", "max_rows": 0, "preview_count": 0}},
            "4": {"class_type": "TrainIP2P", "inputs": {**inputs, **overrides}}, "9": preview(["4", 3])}


def clip_filter(n: Names, rows_node: dict | None = None, **overrides) -> dict:
    inputs = {"rows": ["5", 0], "clip_weights": n.clip_weights, "min_sim_0": -1.0, "min_sim_1": -1.0,
              "min_sim_dir": -1.0, "min_sim_image": -1.0, "top_k": 0, "batch_size": 4}
    return {"5": rows_node or rows(), "4": {"class_type": "CLIPDirectionFilter",
                                            "inputs": {**inputs, **overrides}}, "9": inspect(["4", 1])}


def metrics(n: Names, first: dict, second: dict) -> dict:
    inputs = {"input_images": ["2", 0], "edited_images": ["3", 0], "input_caption": "a house",
              "output_caption": "a house in winter", "clip_weights": n.clip_weights, "batch_size": 4}
    return {"2": first, "3": second, "4": {"class_type": "CLIPEditMetrics", "inputs": inputs},
            "9": preview(["4", 4])}


def instructions(n: Names, **overrides) -> dict:
    # Refused before any request: the base_url is never contacted.
    inputs = {"captions": "a red car", "captions_file": "none", "base_url": "http://127.0.0.1:9/v1",
              "model": "m", "mode": "chat", "api_key_env": "", "api_key_file": "", "temperature": 0.7,
              "frequency_penalty": 0.1, "max_tokens": 64, "concurrency": 1, "cache": False, "request_seed": 0}
    return {"4": {"class_type": "GenerateEditInstructions", "inputs": {**inputs, **overrides}},
            "9": preview(["4", 1])}


def save(n: Names, rows_node: dict) -> dict:
    inputs = {"rows": ["5", 0], "dataset_name": f"bad_inputs_{uuid.uuid4().hex[:6]}", "format": "diffusers",
              "image_format": "png"}
    return {"5": rows_node, "4": {"class_type": "SaveEditDataset", "inputs": inputs},
            "6": {"class_type": "LoadEditDataset", "inputs": {"dataset": n.dataset, "dataset_override": ["4", 0],
                                                             "format": "auto", "max_rows": 0, "preview_count": 4}},
            "9": inspect(["6", 2])}


def load_dataset(n: Names, **overrides) -> dict:
    inputs = {"dataset": n.dataset, "format": "auto", "max_rows": 0, "preview_count": 2}
    return {"4": {"class_type": "LoadEditDataset", "inputs": {**inputs, **overrides}}, "9": inspect(["4", 2])}


# --- expectations -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ok:
    """Succeeds; the inspected IMAGE of node 9 has this shape and finite values in [0, 1]."""

    shape: tuple[int, ...]


@dataclass(frozen=True)
class Refused:
    """Fails in our node with IP2PNodeError("<node>: ..."), the message holding every word given."""

    node: str
    words: tuple[str, ...]


@dataclass(frozen=True)
class Invalid:
    """Refused by ComfyUI's validation before anything runs, on this input."""

    input_name: str
    words: tuple[str, ...]


@dataclass(frozen=True)
class Case:
    id: str
    graph: Callable[[Names], dict]
    expect: Ok | Refused | Invalid


def check(result: RunResult, expect: Ok | Refused | Invalid) -> None:
    if isinstance(expect, Ok):
        assert result.ok, result.error or result.node_errors
        report = inspected(result, "9")
        assert tuple(report["shape"]) == expect.shape
        assert report["finite"] and 0.0 <= report["min"] <= report["max"] <= 1.0, report
    elif isinstance(expect, Refused):
        assert not result.ok and result.error is not None, result.node_errors or "the run succeeded"
        message = result.error["exception_message"]
        assert result.error["node_type"] == expect.node
        assert result.error["exception_type"].endswith("IP2PNodeError"), (result.error["exception_type"], message)
        assert message.startswith(f"{expect.node}: "), message
        for word in expect.words:
            assert word in message, (word, message)
    else:
        assert not result.ok and result.error is not None and result.node_errors, "validation should refuse it"
        errors = [e for info in result.node_errors.values() for e in info["errors"]]
        assert any(e.get("extra_info", {}).get("input_name") == expect.input_name
                   and all(w in e["message"] for w in expect.words) for e in errors), errors


TOO_MANY_WINDOWS = "snow " * 1500  # ~1500 tokens, 7500 characters: 20 CLIP windows
LONG_BUT_FINE = "make it look like a snowy winter morning " * 20  # 160 tokens: 3 windows

CASES = [
    # -- InstructEdit: images --
    Case("edit-rgba", lambda n: edit(n, image(channels=4)), Ok((1, 24, 40, 3))),
    Case("edit-grayscale", lambda n: edit(n, image(channels=1)), Ok((1, 24, 40, 3))),
    Case("edit-1x1", lambda n: edit(n, image(height=1, width=1)), Ok((1, 1, 1, 3))),
    Case("edit-7x13", lambda n: edit(n, image(height=7, width=13)), Ok((1, 7, 13, 3))),
    Case("edit-7x13-native-size", lambda n: edit(n, image(height=7, width=13), resolution=0), Ok((1, 7, 13, 3))),
    Case("edit-batch2-variations2", lambda n: edit(n, image(batch=2), variations=2), Ok((4, 24, 40, 3))),
    # 8192x8192 at its native size: refused up front by the memory pre-flight (pipeline/memory.py), naming the
    # fix, before the VAE or sampler allocate anything. At resolution 512 it edits: see the slow test below.
    Case("edit-8192-native-size", lambda n: edit(n, image(height=8192, width=8192), resolution=0),
         Refused("InstructEdit", ("too large", "resolution"))),
    Case("edit-2-channels", lambda n: edit(n, image(channels=2)),
         Refused("InstructEdit", ("got 2", "convert the image to RGB"))),
    Case("edit-batch-0", lambda n: edit(n, image(batch=0)), Refused("InstructEdit", ("B >= 1",))),
    Case("edit-nan-pixels", lambda n: edit(n, image(fill="half_nan")), Refused("InstructEdit", ("NaN",))),
    Case("edit-inf-pixels", lambda n: edit(n, image(fill="inf")), Refused("InstructEdit", ("infinite",))),
    # -- InstructEdit: text --
    Case("edit-empty-instruction", lambda n: edit(n, instruction=""), Ok((1, 24, 40, 3))),
    Case("edit-unicode-instruction", lambda n: edit(n, instruction="mach es winterlich \u2744\ufe0f \u202e\x00"),
         Ok((1, 24, 40, 3))),
    Case("edit-long-instruction-3-windows", lambda n: edit(n, instruction=LONG_BUT_FINE), Ok((1, 24, 40, 3))),
    Case("edit-instruction-20-windows", lambda n: edit(n, instruction=TOO_MANY_WINDOWS),
         Refused("InstructEdit", ("20 CLIP windows", "shorten"))),
    Case("edit-instruction-100k-chars", lambda n: edit(n, instruction="x" * 100_000),
         Refused("InstructEdit", ("100000 characters",))),
    Case("edit-negative-100k-chars", lambda n: edit(n, negative="y" * 100_000),
         Refused("InstructEdit", ("100000 characters",))),
    # -- InstructEdit: scales and steps --
    Case("edit-scales-0", lambda n: edit(n, image_guidance=0.0, text_guidance=0.0), Ok((1, 24, 40, 3))),
    Case("edit-image-scale-nan-float", lambda n: edit(n, image_guidance=float("nan")),
         Refused("InstructEdit", ("image_guidance must be a finite number",))),
    Case("edit-text-scale-nan-string", lambda n: edit(n, text_guidance="nan"),
         Refused("InstructEdit", ("text_guidance must be a finite number",))),
    Case("edit-text-scale-inf-string", lambda n: edit(n, text_guidance="inf"),
         Invalid("text_guidance", ("bigger than max",))),
    Case("edit-text-scale-negative", lambda n: edit(n, text_guidance=-1.0),
         Invalid("text_guidance", ("smaller than min",))),
    Case("edit-image-scale-huge", lambda n: edit(n, image_guidance=1e30), Invalid("image_guidance", ("bigger",))),
    Case("edit-steps-0", lambda n: edit(n, steps=0), Invalid("steps", ("smaller than min",))),
    Case("edit-steps-nan-string", lambda n: edit(n, steps="nan"), Invalid("steps", ("INT",))),
    Case("edit-resolution-odd", lambda n: edit(n, resolution=100), Ok((1, 24, 40, 3))),
    # InstructEdit / DualCFGSampler: wrong model kinds
    Case("edit-t2i-model", lambda n: edit(n, model=n.t2i, clip=n.t2i),
         Refused("InstructEdit", ("text-to-image model", "ConvertToIP2P"))),
    Case("edit-sdxl-t2i-model", lambda n: edit(n, model=n.sdxl, clip=n.ip2p),
         Refused("InstructEdit", ("text-to-image model",))),
    Case("dualcfg-t2i-model", lambda n: dual_cfg(n, model=n.t2i),
         Refused("DualCFGSampler", ("text-to-image model",))),
    Case("dualcfg-scale-nan", lambda n: dual_cfg(n, text_guidance="nan"),
         Refused("DualCFGSampler", ("text_guidance must be a finite number",))),
    Case("dualcfg-no-image", lambda n: {**dual_cfg(n), "4": {**dual_cfg(n)["4"], "inputs": {
        k: v for k, v in dual_cfg(n)["4"]["inputs"].items() if k != "image"}}},
         Refused("DualCFGSampler", ("image_latent",))),
    # IP2PGuidanceGrid
    Case("grid-nan-value", lambda n: grid(n, text_guidance_values="7.5, nan"),
         Refused("IP2PGuidanceGrid", ("'nan'", "from 0 to 100"))),
    Case("grid-huge-value", lambda n: grid(n, image_guidance_values="1e308"),
         Refused("IP2PGuidanceGrid", ("'1e308'",))),
    Case("grid-empty-values", lambda n: grid(n, text_guidance_values=" , "),
         Refused("IP2PGuidanceGrid", ("at least one value",))),
    Case("grid-words", lambda n: grid(n, text_guidance_values="high"),
         Refused("IP2PGuidanceGrid", ("not a number",))),
    # IP2PReferenceResize
    Case("resize-rgba-1x1", lambda n: resize(n, image(channels=4, height=1, width=1)), Ok((1, 64, 64, 3))),
    Case("resize-nan", lambda n: resize(n, image(fill="nan")), Refused("IP2PReferenceResize", ("NaN",))),
    Case("resize-2-channels", lambda n: resize(n, image(channels=2)),
         Refused("IP2PReferenceResize", ("convert the image to RGB",))),
    Case("resize-batch-0", lambda n: resize(n, image(batch=0)), Refused("IP2PReferenceResize", ("B >= 1",))),
    # P2PPairGenerator
    Case("p2p-ip2p-model", lambda n: p2p(n, model=n.ip2p),
         Refused("P2PPairGenerator", ("InstructPix2Pix model", "Load Checkpoint"))),
    Case("p2p-sdxl-model-sd15-clip", lambda n: p2p(n, model=n.sdxl, clip=n.t2i),
         Refused("P2PPairGenerator", ("text encoder does not match the model", "768", "2048"))),
    Case("p2p-cfg-nan", lambda n: p2p(n, cfg_max="nan"), Refused("P2PPairGenerator", ("finite",))),
    Case("p2p-p-nan", lambda n: p2p(n, p_min="nan"), Refused("P2PPairGenerator", ("finite",))),
    Case("p2p-huge-caption", lambda n: p2p(n, caption_pairs="x" * 30_000 + " || y"),
         Refused("P2PPairGenerator", ("characters long",))),
    Case("p2p-cfg-0", lambda n: p2p(n, cfg_min=0.0, cfg_max=0.0), Ok((1, 64, 64, 3))),
    # Model loading and conversion
    Case("load-t2i", lambda n: load_model(n, n.t2i), Refused("LoadIP2PModel", ("text-to-image", "ConvertToIP2P"))),
    Case("load-sdxl-t2i", lambda n: load_model(n, n.sdxl), Refused("LoadIP2PModel", ("text-to-image",))),
    *[Case(f"load-{kind}-safetensors", lambda n, kind=kind: load_model(n, n.bad[kind]),
           Refused("LoadIP2PModel", ("not a readable safetensors file", "re-download")))
      for kind in ("truncated", "header_only", "empty", "random_bytes")],
    Case("load-missing-file", lambda n: load_model(n, "no_such_model.safetensors"),
         Refused("LoadIP2PModel", ("not in models/checkpoints",))),
    # An SDXL distillation converts (SDXL_instructpix2pix); the edit then refuses the SD1.5 CLIP it is given.
    Case("convert-sdxl-koala-edit-sd15-clip", lambda n: converted_edit(n, n.sdxl, clip=n.t2i),
         Refused("InstructEdit", ("does not match the model", "768", "2048"))),
    # TrainIP2P
    Case("train-sdxl-sd15-clip", lambda n: train(n, model=n.sdxl),
         Refused("TrainIP2P", ("does not match the model", "768", "2048"))),
    Case("train-lr-nan", lambda n: train(n, learning_rate="nan"), Refused("TrainIP2P", ("learning_rate", "finite"))),
    Case("train-grad-norm-nan", lambda n: train(n, max_grad_norm="nan"),
         Refused("TrainIP2P", ("max_grad_norm", "finite"))),
    Case("train-ema-nan", lambda n: train(n, ema_decay="nan"), Refused("TrainIP2P", ("ema_decay",))),
    Case("train-steps-0", lambda n: train(n, steps=0), Invalid("steps", ("smaller than min",))),
    # Dataset nodes
    Case("filter-threshold-nan", lambda n: clip_filter(n, min_sim_dir="nan"),
         Refused("CLIPDirectionFilter", ("min_sim_dir must be a finite number",))),
    Case("filter-rgba-1px-rows", lambda n: clip_filter(n, rows(channels=4, image_size=1)), Ok((2, 1, 1, 3))),
    Case("filter-rows-without-images", lambda n: clip_filter(n, rows(image_size=0)),
         Refused("CLIPDirectionFilter", ("no images yet", "P2PPairGenerator"))),
    Case("metrics-nan-images", lambda n: metrics(n, image(fill="nan"), image()),
         Refused("CLIPEditMetrics", ("input_images", "NaN"))),
    Case("metrics-2-channels", lambda n: metrics(n, image(channels=2), image()),
         Refused("CLIPEditMetrics", ("C in 1/3/4",))),
    Case("metrics-batch-0", lambda n: metrics(n, image(batch=0), image()),
         Refused("CLIPEditMetrics", ("input_images is an empty batch",))),
    Case("instructions-temperature-nan", lambda n: instructions(n, temperature="nan"),
         Refused("GenerateEditInstructions", ("temperature must be a finite number",))),
    Case("instructions-broken-url", lambda n: instructions(n, base_url="http://[::1/v1"),
         Refused("GenerateEditInstructions", ("not a valid URL", "http://127.0.0.1:8000/v1"))),
    Case("save-rows-without-images", lambda n: save(n, rows(image_size=0)),
         Refused("SaveEditDataset", ("no images", "P2PPairGenerator"))),
    Case("save-rgba-gray-1px-rows", lambda n: save(n, rows(channels=4, image_size=1)), Ok((2, 1, 1, 3))),
    Case("load-dataset-missing", lambda n: load_dataset(n, dataset_override="output/no_such_dataset"),
         Refused("LoadEditDataset", ("no_such_dataset",))),
    Case("instructions-only-blank-captions", lambda n: instructions(n, captions="\n \n\u3000"),
         Refused("GenerateEditInstructions", ("holds no captions",))),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(names, case: Case):
    check(run_prompt(case.graph(names)), case.expect)


def evil_payload(marker: Path):
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling creates the marker file

    return Payload()


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_pickle_checkpoint_with_code_is_refused_without_running_it(names, comfy_base, tmp_path, suffix):
    import torch

    marker = tmp_path / "payload_ran"
    # The payload is real: plain unpickling runs it.
    pickle.loads(pickle.dumps(evil_payload(tmp_path / "proof")))
    assert (tmp_path / "proof").exists()

    name = f"evil_{uuid.uuid4().hex[:6]}{suffix}"
    path = comfy_base / "models" / "checkpoints" / name
    payload = {"state_dict": {"model.diffusion_model.x": evil_payload(marker)}}
    try:
        if suffix == ".ckpt":
            torch.save(payload, path)  # zip container, as real .ckpt files are
        else:
            path.write_bytes(pickle.dumps(payload))  # a bare legacy pickle
        result = run_prompt(load_model(names, name))
        check(result, Refused("LoadIP2PModel", (name, "pickle", "arbitrary code", ".safetensors")))
        assert "weights_only` set to `False`" not in result.error["exception_message"], "must not advise unsafe"
        assert not marker.exists(), "the checkpoint's code ran"
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.slow
def test_8192_image_edits_at_512_and_comes_back_at_full_size(names):
    result = run_prompt(edit(names, image(height=8192, width=8192), resolution=512))
    check(result, Ok((1, 8192, 8192, 3)))
