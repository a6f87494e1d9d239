"""Hypothesis fuzz of the node types through ComfyUI's real executor (in-process).

Every widget is drawn in and out of its declared range, as odd strings (unicode, NUL, lone surrogates, "nan",
"inf") and as NaN/inf floats; image inputs come from the probe image node in odd shapes and fills. The property
for every run: it either succeeds with outputs of the documented shape and finite values, or fails in
ComfyUI's validation, or fails in *our* node with an IP2PNodeError whose message starts with the node's id.
A bare torch/numpy/PIL exception, an error in another node, or a crash fails the test.

derandomize=True makes the examples the same on every run (reproducible CI); example counts keep the whole
file at about a minute on two cores.
"""

from __future__ import annotations

import math
import re
import shutil
import uuid

import pytest
from comfyui_ip2p.cli.runtime import RunResult, run_prompt
from comfyui_ip2p.testing.openai_server import FakeOpenAIServer
from comfyui_ip2p.testing.probe_nodes import FILLS, inspected
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_inputs import cached, image, inspect, prepared, preview, rows

OUR_NODES = {"LoadIP2PModel", "ConvertToIP2P", "InstructEdit", "DualCFGSampler", "IP2PGuider", "IP2PGuidanceGrid",
             "IP2PReferenceResize", "P2PPairGenerator", "GenerateEditInstructions", "CLIPDirectionFilter",
             "CLIPEditMetrics", "SaveEditDataset", "LoadEditDataset", "TrainIP2P", "IP2PAutoGuidance",
             "IP2PComputePrecision", "EditRowsFromImages", "DatasetInfo"}
TAG = f"fz{uuid.uuid4().hex[:6]}"
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])



@pytest.fixture(scope="module")
def names(comfy_base, comfy_nodes, tiny_ip2p_ckpt, tiny_t2i_ckpt):
    """Probe nodes, checkpoints (also SDXL-family and broken ones), CLIP weights and a dataset."""
    with prepared(comfy_base, tiny_ip2p_ckpt, tiny_t2i_ckpt) as prepared_names:
        yield prepared_names


# --- widget strategies --------------------------------------------------------------------------------------

ODD_STRINGS = ["", "nan", "inf", "-inf", "1e400", " 2 ", "abc", "\x00", "\ud800", "\u202e\u2744", "../../etc",
               "/etc/passwd", "x" * 30_000]


def floats(low: float, high: float) -> st.SearchStrategy:
    """In range, anywhere (NaN and inf included), or a string ComfyUI will try float() on."""
    return st.one_of(st.floats(low, high), st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from(ODD_STRINGS))


def ints(cheap_low: int, cheap_high: int, low: int, high: int) -> st.SearchStrategy:
    """Small valid values (so runs stay cheap), the edges just outside the range, and odd strings/floats."""
    return st.one_of(st.integers(cheap_low, cheap_high),
                     st.sampled_from([low - 1, high + 1, -(2**70), "nan", "1.5", "abc", 2.5, None]))


def texts(max_size: int = 80) -> st.SearchStrategy:
    return st.one_of(st.text(max_size=max_size), st.sampled_from(ODD_STRINGS))


def combo(*valid: str) -> st.SearchStrategy:
    return st.sampled_from([*valid, "not-an-option"])


SAMPLERS = combo("euler", "euler_ancestral", "dpmpp_2m", "ddim")
SCHEDULERS = combo("normal", "karras", "simple")
images = st.builds(image, batch=st.integers(0, 2), height=st.sampled_from([1, 7, 24]),
                   width=st.sampled_from([1, 13, 40]), channels=st.integers(1, 5), fill=st.sampled_from(FILLS),
                   seed=st.integers(0, 3))
row_nodes = st.builds(rows, count=st.integers(0, 3), input_caption=texts(30), output_caption=texts(30),
                      instruction=texts(30), image_size=st.sampled_from([0, 1, 7, 32]), channels=st.integers(1, 4))


def sampling() -> dict:
    return {"steps": ints(1, 2, 1, 1000), "seed": ints(0, 2**64 - 1, 0, 2**64 - 1), "sampler_name": SAMPLERS,
            "scheduler": SCHEDULERS}


# --- the property -------------------------------------------------------------------------------------------


def holds(result: RunResult, node: str, check_ok) -> None:
    assert node in OUR_NODES
    if result.ok:
        check_ok(result)
        return
    if result.node_errors:  # ComfyUI's validation refused the graph before running anything
        assert result.error and result.error.get("type") == "prompt_outputs_failed_validation", result.error
        return
    error = result.error
    assert error is not None, "failed without an error"
    message = error.get("exception_message", "")
    assert error.get("node_type") == node, f"failed in {error.get('node_type')}, not {node}: {message}"
    assert error.get("exception_type", "").endswith("IP2PNodeError"), (error.get("exception_type"), message)
    assert message.startswith(f"{node}: "), message


def image_report(result: RunResult, node_id: str = "9") -> dict:
    report = inspected(result, node_id)
    assert report["finite"], report
    if report["min"] is not None:
        assert 0.0 <= report["min"] <= report["max"] <= 1.0, report
    return report


def preview_text(result: RunResult, node_id: str = "9") -> str:
    return result.outputs[node_id]["text"][0]


# --- one fuzz per node type ---------------------------------------------------------------------------------


@settings(FUZZ, max_examples=14)
@given(img=images, instruction=texts(), negative=texts(), s_i=floats(0, 100), s_t=floats(0, 100),
       resolution=st.sampled_from([0, 64, 100, -64, 5000, "nan"]), keep=st.booleans(),
       variations=ints(1, 2, 1, 64), data=st.fixed_dictionaries(sampling()))
def test_instruct_edit(names, img, instruction, negative, s_i, s_t, resolution, keep, variations, data):
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["3", 0], "instruction": instruction,
              "negative": negative, "image_guidance": s_i, "text_guidance": s_t, "resolution": resolution,
              "keep_input_size": keep, "variations": variations, **data}
    graph = {"1": cached(names.ip2p), "3": img, "4": {"class_type": "InstructEdit", "inputs": inputs},
             "9": inspect(["4", 0])}

    def ok(result):
        shape = image_report(result)["shape"]
        source = img["inputs"]
        assert shape[0] == source["batch"] * int(variations) and shape[3] == 3
        if keep:
            assert shape[1:3] == [source["height"], source["width"]]

    holds(run_prompt(graph), "InstructEdit", ok)


@settings(FUZZ, max_examples=10)
@given(img=images, with_image=st.booleans(), s_i=floats(0, 100), s_t=floats(0, 100), denoise=floats(0, 1),
       data=st.fixed_dictionaries(sampling()))
def test_dual_cfg_sampler(names, img, with_image, s_i, s_t, denoise, data):
    inputs = {"model": ["1", 0], "positive": ["5", 0], "negative": ["6", 0], "image_guidance": s_i,
              "text_guidance": s_t, "denoise": denoise, "vae": ["1", 2], **data}
    if with_image:
        inputs["image"] = ["3", 0]
    graph = {"1": cached(names.ip2p), "3": img,
             "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "make it winter"}},
             "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
             "4": {"class_type": "DualCFGSampler", "inputs": inputs},
             "7": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
             "9": inspect(["7", 0])}
    holds(run_prompt(graph), "DualCFGSampler", lambda result: image_report(result))


@settings(FUZZ, max_examples=8)
@given(img=images, mask_img=images, feather=ints(0, 8, 0, 256), data=st.fixed_dictionaries(sampling()))
def test_instruct_edit_with_mask(names, img, mask_img, feather, data):
    """Masks of any size, batch and fill (NaN included), made from a probe image by core's ImageToMask."""
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["3", 0], "instruction": "snow",
              "image_guidance": 1.5, "text_guidance": 7.5, "resolution": 64, "keep_input_size": True,
              "mask": ["6", 0], "mask_feather": feather, **data}
    graph = {"1": cached(names.ip2p), "3": img, "5": mask_img,
             "6": {"class_type": "ImageToMask", "inputs": {"image": ["5", 0], "channel": "red"}},
             "4": {"class_type": "InstructEdit", "inputs": inputs}, "9": inspect(["4", 0])}
    result = run_prompt(graph)
    if not result.ok and result.error and result.error.get("node_type") == "ImageToMask":
        return  # core's own node refused the probe image (e.g. one channel): nothing reached ours
    holds(result, "InstructEdit", lambda result: image_report(result))


@settings(FUZZ, max_examples=8)
@given(img=images, with_image=st.booleans(), s_i=floats(0, 100), s_t=floats(0, 100))
def test_ip2p_guider(names, img, with_image, s_i, s_t):
    inputs = {"model": ["1", 0], "positive": ["5", 0], "negative": ["6", 0], "image_guidance": s_i,
              "text_guidance": s_t, "vae": ["1", 2]}
    if with_image:
        inputs["image"] = ["3", 0]
    graph = {"1": cached(names.ip2p), "3": img,
             "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "make it winter"}},
             "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
             "4": {"class_type": "IP2PGuider", "inputs": inputs},
             "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
             "11": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
             "12": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 1,
                                                               "denoise": 1.0}},
             "13": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "14": {"class_type": "SamplerCustomAdvanced",
                    "inputs": {"noise": ["10", 0], "guider": ["4", 0], "sampler": ["11", 0], "sigmas": ["12", 0],
                               "latent_image": ["13", 0]}},
             "7": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["1", 2]}},
             "9": inspect(["7", 0])}
    result = run_prompt(graph)
    if not result.ok and result.error and result.error.get("node_type") == "SamplerCustomAdvanced":
        # the guider itself was built; only a batch that cannot pair with the 1-image latent may fail there
        assert img["inputs"]["batch"] > 1, result.error
        return
    holds(result, "IP2PGuider", lambda result: image_report(result))


@settings(FUZZ, max_examples=8)
@given(img=images, image_values=st.one_of(texts(20), st.sampled_from(["1, 1.5", "0", "1;2"])),
       text_values=st.one_of(texts(20), st.sampled_from(["7.5", "1, 2, 3"])), data=st.fixed_dictionaries(sampling()))
def test_guidance_grid(names, img, image_values, text_values, data):
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["3", 0], "instruction": "snow",
              "image_guidance_values": image_values, "text_guidance_values": text_values, "resolution": 64, **data}
    graph = {"1": cached(names.ip2p), "3": img, "4": {"class_type": "IP2PGuidanceGrid", "inputs": inputs},
             "9": inspect(["4", 0])}
    holds(run_prompt(graph), "IP2PGuidanceGrid", lambda result: image_report(result))


@settings(FUZZ, max_examples=6)
@given(img=images, image_values=st.one_of(texts(20), st.sampled_from(["1, 1.5", "0"])),
       text_values=st.one_of(texts(20), st.sampled_from(["7.5", "1, 2"])), minimum=floats(-1, 1),
       captions=st.one_of(st.tuples(texts(20), texts(20)), st.just(("", ""))), data=st.fixed_dictionaries(sampling()))
def test_auto_guidance(names, img, image_values, text_values, minimum, captions, data):
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["3", 0], "instruction": "snow",
              "image_guidance_values": image_values, "text_guidance_values": text_values, "resolution": 64,
              "clip_weights": names.clip_weights, "min_image_similarity": minimum, "input_caption": captions[0],
              "output_caption": captions[1], **data}
    graph = {"1": cached(names.ip2p), "3": img, "4": {"class_type": "IP2PAutoGuidance", "inputs": inputs},
             "9": inspect(["4", 3])}

    def ok(result):
        shape = image_report(result)["shape"]
        assert shape[0] == 1 and shape[3] == 3

    holds(run_prompt(graph), "IP2PAutoGuidance", ok)


@settings(FUZZ, max_examples=12)
@given(img=images, resolution=ints(64, 256, 64, 4096))
def test_reference_resize(names, img, resolution):
    graph = {"3": img, "4": {"class_type": "IP2PReferenceResize", "inputs": {"image": ["3", 0],
                                                                            "resolution": resolution}},
             "9": inspect(["4", 0])}

    def ok(result):
        shape = image_report(result)["shape"]
        assert shape[0] == img["inputs"]["batch"] and shape[3] == 3
        assert shape[1] % 64 == 0 and shape[2] % 64 == 0

    holds(run_prompt(graph), "IP2PReferenceResize", ok)


@settings(FUZZ, max_examples=8)
@given(model=st.sampled_from(["t2i", "ip2p", "sdxl"]), pairs=st.one_of(texts(60), st.just("a cat || a dog")),
       p=st.tuples(floats(0, 1), floats(0, 1)), cfg=st.tuples(floats(0, 100), floats(0, 100)),
       size=st.tuples(ints(64, 64, 64, 4096), ints(64, 72, 64, 4096)), samples=ints(1, 2, 1, 1000),
       data=st.fixed_dictionaries(sampling()))
def test_p2p_pair_generator(names, model, pairs, p, cfg, size, samples, data):
    inputs = {"model": ["1", 0], "clip": ["2", 1], "vae": ["2", 2], "samples_per_pair": samples, "width": size[0],
              "height": size[1], "p_min": p[0], "p_max": p[1], "cfg_min": cfg[0], "cfg_max": cfg[1],
              "batch_size": 2, "caption_pairs": pairs, **data}
    graph = {"1": cached(getattr(names, model)), "2": cached(names.t2i),
             "4": {"class_type": "P2PPairGenerator", "inputs": inputs}, "9": inspect(["4", 2])}

    def ok(result):
        shape = image_report(result)["shape"]
        assert shape[1:] == [int(size[1]), int(size[0]), 3]

    holds(run_prompt(graph), "P2PPairGenerator", ok)


@settings(FUZZ, max_examples=10)
@given(checkpoint=st.one_of(st.sampled_from(["ip2p", "t2i", "sdxl", "truncated", "header_only", "empty",
                                             "random_bytes"]), texts(30)))
def test_load_ip2p_model(names, checkpoint):
    known = {"ip2p": names.ip2p, "t2i": names.t2i, "sdxl": names.sdxl, **names.bad}
    graph = {"4": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": known.get(checkpoint, checkpoint)}},
             "9": preview(["4", 0])}
    holds(run_prompt(graph), "LoadIP2PModel", lambda result: None)


@settings(FUZZ, max_examples=3)
@given(model=st.sampled_from(["ip2p", "t2i", "sdxl"]))
def test_convert_to_ip2p(names, model):
    inputs = {"model": ["4", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["3", 0], "instruction": "snow",
              "image_guidance": 1.5, "text_guidance": 7.5, "steps": 1, "seed": 0, "sampler_name": "euler",
              "scheduler": "normal", "resolution": 64, "keep_input_size": True}
    graph = {"1": cached(names.t2i), "2": cached(getattr(names, model)), "3": image(),
             "4": {"class_type": "ConvertToIP2P", "inputs": {"model": ["2", 0]}},
             "5": {"class_type": "InstructEdit", "inputs": inputs}, "9": inspect(["5", 0])}
    # A converted SD1.5 model edits (it predicts what the original predicts). The SDXL-family KOALA converts too
    # (to SDXL_instructpix2pix); the SD1.5 CLIP this graph gives it is then refused by InstructEdit.
    result = run_prompt(graph)
    if model == "sdxl":
        assert not result.ok and "2048" in result.error.get("exception_message", ""), result.error
    holds(result, "InstructEdit" if model == "sdxl" else "ConvertToIP2P", lambda done: image_report(done))


@pytest.fixture(scope="module")
def run_names(comfy_base):
    """Everything the training and saving fuzz writes starts with TAG; removed with the module."""
    yield TAG
    for folder in ("models/checkpoints", "models/loras", "output", "output/ip2p_train"):
        for path in (comfy_base / folder).glob(f"{TAG}*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


@settings(FUZZ, max_examples=4)
@given(name=texts(20), mode=combo("full", "lora"), lr=floats(1e-7, 1.0), ema=floats(0, 0.99999),
       grad_norm=floats(0, 100), resolution=st.sampled_from([16, 12, 0, 4096 * 4]), precision=combo("auto", "fp32"))
def test_train_ip2p(names, run_names, comfy_base, name, mode, lr, ema, grad_norm, resolution, precision):
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["3", 0],
              "checkpoint_name": run_names + name, "mode": mode, "steps": 1, "batch_size": 1, "grad_accumulation": 1,
              "learning_rate": lr, "resolution": resolution, "seed": 0, "ema_decay": ema, "cache_latents": True,
              "gradient_checkpointing": False, "lora_rank": 1, "checkpoint_every": 0, "validation_every": 0,
              "resume": False, "validation_count": 0, "validation_steps": 1, "max_grad_norm": grad_norm,
              "precision": precision}
    graph = {"1": cached(names.ip2p), "3": {"class_type": "LoadEditDataset", "inputs": {
        "dataset": names.dataset, "format": "auto", "max_rows": 0, "preview_count": 0}},
             "4": {"class_type": "TrainIP2P", "inputs": inputs}, "9": preview(["4", 3])}

    def ok(result):
        folder = comfy_base / "models" / ("loras" if mode == "lora" else "checkpoints")
        written = folder / preview_text(result)
        assert written.resolve().parent == folder.resolve() and written.is_file()
        from safetensors.torch import load_file

        assert all(bool(t.float().isfinite().all()) for t in load_file(written).values()), "NaN weights saved"

    holds(run_prompt(graph), "TrainIP2P", ok)


@settings(FUZZ, max_examples=10)
@given(row_node=row_nodes, thresholds=st.lists(floats(-1, 1), min_size=4, max_size=4), top_k=ints(0, 3, 0, 10000),
       batch=ints(1, 4, 1, 1024))
def test_clip_direction_filter(names, row_node, thresholds, top_k, batch):
    inputs = {"rows": ["5", 0], "clip_weights": names.clip_weights, "top_k": top_k, "batch_size": batch,
              **dict(zip(("min_sim_0", "min_sim_1", "min_sim_dir", "min_sim_image"), thresholds, strict=True))}
    graph = {"5": row_node, "4": {"class_type": "CLIPDirectionFilter", "inputs": inputs}, "9": inspect(["4", 1])}

    def ok(result):
        assert image_report(result)["shape"][0] <= row_node["inputs"]["count"]

    holds(run_prompt(graph), "CLIPDirectionFilter", ok)


@settings(FUZZ, max_examples=10)
@given(first=images, second=images, caption=texts(), batch=ints(1, 4, 1, 1024))
def test_clip_edit_metrics(names, first, second, caption, batch):
    inputs = {"input_images": ["2", 0], "edited_images": ["3", 0], "input_caption": caption,
              "output_caption": "a house in winter", "clip_weights": names.clip_weights, "batch_size": batch}
    graph = {"2": first, "3": second, "4": {"class_type": "CLIPEditMetrics", "inputs": inputs},
             "9": preview(["4", 2])}

    def ok(result):
        sim_dir = float(preview_text(result))
        assert math.isfinite(sim_dir) and -1.0001 <= sim_dir <= 1.0001

    holds(run_prompt(graph), "CLIPEditMetrics", ok)


@settings(FUZZ, max_examples=10)
@given(row_node=row_nodes, name=texts(30), fmt=combo("diffusers", "public", "reference"), image_format=combo("png",
                                                                                                          "jpg"))
def test_save_edit_dataset(names, run_names, comfy_base, row_node, name, fmt, image_format):
    inputs = {"rows": ["5", 0], "dataset_name": run_names + name, "format": fmt, "image_format": image_format}
    graph = {"5": row_node, "4": {"class_type": "SaveEditDataset", "inputs": inputs}, "9": preview(["4", 0])}
    output = (comfy_base / "output").resolve()

    def ok(result):
        folder = (output / preview_text(result)).resolve()
        assert folder.is_relative_to(output) and folder.is_dir(), folder

    holds(run_prompt(graph), "SaveEditDataset", ok)


@settings(FUZZ, max_examples=10)
@given(pick=st.booleans(), fmt=combo("auto", "diffusers", "public", "reference"), max_rows=ints(0, 3, 0, 10_000_000),
       preview_count=ints(0, 3, 0, 64), override=texts(40))
def test_load_edit_dataset(names, pick, fmt, max_rows, preview_count, override):
    inputs = {"dataset": names.dataset if pick else "output/missing", "format": fmt, "max_rows": max_rows,
              "preview_count": preview_count, "dataset_override": override}
    graph = {"4": {"class_type": "LoadEditDataset", "inputs": inputs}, "9": inspect(["4", 2])}

    def ok(result):
        assert image_report(result)["shape"][0] <= int(preview_count)

    holds(run_prompt(graph), "LoadEditDataset", ok)


@settings(FUZZ, max_examples=8)
@given(fmt=combo("auto", "reference", "magicbrush", "pairs", "mapped"),
       mapping=st.one_of(texts(40), st.sampled_from(["", "input_image=a, edited_image=b, instruction=c", "mask=x",
                                                      "input_image=a,input_image=b", "=,=", "instruction=\x00"])))
def test_load_edit_dataset_column_mapping(names, fmt, mapping):
    inputs = {"dataset": names.dataset, "format": fmt, "max_rows": 0, "preview_count": 1, "column_mapping": mapping}
    graph = {"4": {"class_type": "LoadEditDataset", "inputs": inputs}, "9": inspect(["4", 2])}
    holds(run_prompt(graph), "LoadEditDataset", lambda result: image_report(result))


@settings(FUZZ, max_examples=10)
@given(first=images, same_size=st.booleans(), second=images, mask_img=st.one_of(st.none(), images),
       instructions=texts(60), captions=st.one_of(texts(40), st.just("a\nb")))
def test_edit_rows_from_images(names, first, same_size, second, mask_img, instructions, captions):
    """Any two probe batches; half the time the edits in the inputs' batch and size, so pairs get past the checks."""
    if same_size:
        second = image(**{**second["inputs"], **{k: first["inputs"][k] for k in ("batch", "height", "width")}})
    inputs = {"input_images": ["2", 0], "edited_images": ["3", 0], "instructions": instructions,
              "input_captions": captions}
    graph = {"2": first, "3": second, "4": {"class_type": "EditRowsFromImages", "inputs": inputs},
             "9": preview(["4", 1])}
    if mask_img is not None:
        graph["5"] = mask_img
        graph["6"] = {"class_type": "ImageToMask", "inputs": {"image": ["5", 0], "channel": "red"}}
        inputs["mask"] = ["6", 0]
    result = run_prompt(graph)
    if not result.ok and result.error and result.error.get("node_type") == "ImageToMask":
        return  # core's own node refused the probe image (e.g. one channel): nothing reached ours

    def ok(result):
        assert re.match(r"^\d+ rows \(\d+x\d+\) from \d+ input and \d+ edited images", preview_text(result))

    holds(result, "EditRowsFromImages", ok)


@settings(FUZZ, max_examples=6)
@given(bins=ints(1, 50, 1, 1000), forged=st.one_of(st.none(), texts(40)))
def test_dataset_info(names, bins, forged):
    """The handle from Load Edit Dataset, or a handle a workflow file forged (any path text)."""
    graph = {"3": {"class_type": "LoadEditDataset", "inputs": {"dataset": names.dataset, "format": "auto",
                                                               "max_rows": 0, "preview_count": 0}},
             "4": {"class_type": "DatasetInfo", "inputs": {"dataset": ["3", 0], "bins": bins}},
             "9": inspect(["4", 1])}
    if forged is not None:  # a literal in the link's place, as a workflow file can write it
        del graph["3"]
        graph["4"]["inputs"]["dataset"] = {"path": forged, "format": "auto"}

    def ok(result):
        assert image_report(result)["shape"] == [1, 500, 800, 3]

    holds(run_prompt(graph), "DatasetInfo", ok)


@pytest.fixture(scope="module")
def llm():
    with FakeOpenAIServer() as server:
        yield server


@settings(FUZZ, max_examples=10)
@given(captions=texts(120), mode=combo("chat", "completion"), temperature=floats(0, 2), penalty=floats(-2, 2),
       max_tokens=ints(16, 64, 16, 4096), concurrency=ints(1, 2, 1, 64), key_env=texts(20), key_file=texts(20),
       url=st.sampled_from(["server", "", "ftp://x/v1", "http://[::1", "\x00"]))
def test_generate_edit_instructions(names, llm, captions, mode, temperature, penalty, max_tokens, concurrency,
                                    key_env, key_file, url):
    inputs = {"captions": captions, "captions_file": "none", "base_url": llm.base_url if url == "server" else url,
              "model": "fake", "mode": mode, "api_key_env": key_env, "api_key_file": key_file,
              "temperature": temperature, "frequency_penalty": penalty, "max_tokens": max_tokens,
              "concurrency": concurrency, "cache": False, "request_seed": 0}
    graph = {"4": {"class_type": "GenerateEditInstructions", "inputs": inputs}, "9": preview(["4", 1])}

    def ok(result):
        assert re.match(r"^\d+ rows from \d+ captions", preview_text(result)), preview_text(result)

    holds(run_prompt(graph), "GenerateEditInstructions", ok)

