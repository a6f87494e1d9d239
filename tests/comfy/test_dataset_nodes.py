"""The dataset nodes in-process: instructions from a real local OpenAI-compatible server, the CLIP filter and
metrics on a tiny random open_clip model, and datasets saved and loaded in every format."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from comfyui_ip2p.cli.runtime import run_prompt
from comfyui_ip2p.dataset.clip_filter import ClipEncoder
from comfyui_ip2p.dataset.formats import FORMATS
from comfyui_ip2p.dataset.records import EditRow
from comfyui_ip2p.testing.comfy_run import checked
from comfyui_ip2p.testing.edit_rows import random_rows, write_rows
from comfyui_ip2p.testing.openai_server import FakeOpenAIServer, Reply
from comfyui_ip2p.testing.tiny_clip import TINY_CLIP, write_tiny_clip
from PIL import Image
from safetensors.torch import load_file

CLIP_NAME = "tiny_clip.safetensors"


@pytest.fixture(scope="module")
def tiny_clip(comfy_base, comfy_nodes) -> str:
    return write_tiny_clip(comfy_base / "models" / "clip_filter", "tiny_clip", seed=0)


@pytest.fixture(scope="module")
def reference_encoder(tiny_clip, comfy_base) -> ClipEncoder:
    """The same weights loaded by hand, without the node's loading path, to check the node's numbers."""
    model = open_clip.CLIP(**TINY_CLIP)
    model.load_state_dict(load_file(comfy_base / "models" / "clip_filter" / tiny_clip))
    return ClipEncoder(model)




def as_batch(images) -> torch.Tensor:
    return torch.cat([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None] for im in images])


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


# --- GenerateEditInstructions ------------------------------------------------------------------------------


@pytest.fixture()
def llm():
    with FakeOpenAIServer() as server:
        yield server


def instruction_inputs(server: FakeOpenAIServer, **overrides) -> dict:
    tag = uuid.uuid4().hex[:6]  # captions unique per test: the disk cache is shared by the whole session
    values = {"captions": f"a red car {tag}\na blue house {tag}\n\na green tree {tag}\n", "captions_file": "none",
              "base_url": server.base_url, "model": "fake-model", "mode": "chat", "api_key_env": "",
              "api_key_file": "", "temperature": 0.7, "frequency_penalty": 0.1, "max_tokens": 256,
              "concurrency": 2, "cache": False, "request_seed": 0}
    values.update(overrides)
    return values


def instruction_graph(inputs: dict) -> dict:
    return {"1": {"class_type": "GenerateEditInstructions", "inputs": inputs},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}


@pytest.mark.parametrize("mode", ["chat", "completion"])
def test_instructions_from_a_real_local_server(comfy_nodes, llm, mode):
    inputs = instruction_inputs(llm, mode=mode)
    rows, summary = comfy_nodes["GenerateEditInstructions"].execute(**inputs).result
    captions = [c for c in inputs["captions"].splitlines() if c]
    assert [(r.input_caption, r.instruction, r.output_caption) for r in rows] == [
        (c, "add snow", f"{c}, covered in snow") for c in captions]
    assert all(r.input_image is None and r.edited_image is None for r in rows)
    assert summary.startswith("3 rows from 3 captions")
    requests = llm.requests
    assert len(requests) == 3
    body = requests[0].body
    assert {body["temperature"], body["frequency_penalty"], body["max_tokens"]} == {0.7, 0.1, 256}
    assert body["stop"] == ["\nEND"] and "seed" not in body
    if mode == "chat":
        assert all(r.path == "/v1/chat/completions" for r in requests)
        assert body["messages"][0]["role"] == "system"
    else:
        assert all(r.path == "/v1/completions" for r in requests)
        assert sorted(r.body["prompt"] for r in requests) == sorted(c + "\n##\n" for c in captions)


def test_instructions_through_the_executor_report_progress_and_summary(comfy_nodes, llm):
    result = checked(run_prompt(instruction_graph(instruction_inputs(llm))))
    assert "3 rows from 3 captions" in result.outputs["2"]["text"][0]
    progress = [data["value"] for event, data in result.events if event == "progress" and data["max"] == 3]
    assert progress == [0, 1, 2, 3]


def test_rerun_is_answered_from_the_disk_cache(comfy_nodes, comfy_base, llm):
    inputs = instruction_inputs(llm, cache=True, request_seed=5)
    node = comfy_nodes["GenerateEditInstructions"]
    first, summary = node.execute(**inputs).result
    assert len(llm.requests) == 3 and llm.requests[0].body["seed"] == 5
    cache = comfy_base / "output" / "ip2p_cache" / "instructions.jsonl"
    assert cache.is_file() and "cached in" in summary
    llm.reset()
    second, summary = node.execute(**inputs).result
    assert llm.requests == [], "a rerun must not pay for answers it already has"
    assert [(r.instruction, r.output_caption) for r in second] == [(r.instruction, r.output_caption) for r in first]
    assert "(3 cached, 0 fetched)" in summary
    node.execute(**{**inputs, "request_seed": 6})
    assert len(llm.requests) == 3, "another request seed is another draw"


def test_cancel_keeps_every_finished_answer(comfy_nodes, llm):
    import comfy.model_management

    llm.set_delay(0.2)
    tag = uuid.uuid4().hex[:6]
    captions = "\n".join(f"caption {i} {tag}" for i in range(6))
    inputs = instruction_inputs(llm, captions=captions, concurrency=1, cache=True)

    interrupted = []

    def on_event(event, data):
        # Once only: ComfyUI's global progress hook still calls this during the rerun below.
        if event == "progress" and data["value"] >= 2 and not interrupted:
            interrupted.append(data["value"])
            comfy.model_management.interrupt_current_processing(True)

    cancelled = run_prompt(instruction_graph(inputs), on_event=on_event)
    assert not cancelled.ok
    assert any(event == "execution_interrupted" for event, _ in cancelled.events)
    paid = len(llm.requests)
    assert 2 <= paid < 6
    llm.reset()
    llm.set_delay(0.0)
    rows, summary = comfy_nodes["GenerateEditInstructions"].execute(**inputs).result
    assert len(rows) == 6
    assert len(llm.requests) == 6 - paid, "answers received before the cancel must come from the cache"
    assert f"({paid} cached, {6 - paid} fetched)" in summary


def test_api_key_comes_from_a_key_file_or_an_env_var_and_is_never_stored(comfy_nodes, comfy_base, llm,
                                                                          monkeypatch):
    key = f"sk-test-{uuid.uuid4().hex}"
    keys = comfy_base / "user" / "__ip2p_keys"
    keys.mkdir(parents=True, exist_ok=True)
    (keys / "llm.key").write_text(key + "\n")
    node = comfy_nodes["GenerateEditInstructions"]
    node.execute(**instruction_inputs(llm, api_key_file="llm.key", cache=True))
    assert {r.headers["authorization"] for r in llm.requests} == {f"Bearer {key}"}
    assert key not in (comfy_base / "output" / "ip2p_cache" / "instructions.jsonl").read_text()

    llm.reset()
    monkeypatch.setenv("IP2P_TEST_API_KEY", "env-key-123")
    node.execute(**instruction_inputs(llm, api_key_env="IP2P_TEST_API_KEY"))
    assert {r.headers["authorization"] for r in llm.requests} == {"Bearer env-key-123"}


@pytest.mark.parametrize(("overrides", "message"), [
    ({"api_key_env": "AWS_SECRET_ACCESS_KEY"}, "ending in API_KEY"),
    ({"api_key_file": "../../etc/passwd"}, "api_key_file '../../etc/passwd' must name a file inside"),
    ({"api_key_file": "/etc/hostname"}, "must name a file inside"),
    ({"api_key_file": "absent.key"}, "__ip2p_keys"),
    ({"captions_file": "../../etc/hosts.txt"}, "captions_file '../../etc/hosts.txt' must name a file inside"),
    ({"captions": " \n \n"}, "holds no captions"),
    ({"base_url": "file:///etc/passwd"}, "must start with http"),
])
def test_unsafe_or_empty_settings_are_refused_before_any_request(comfy_nodes, llm, overrides, message):
    with pytest.raises(ValueError, match=r"^GenerateEditInstructions: ") as caught:
        comfy_nodes["GenerateEditInstructions"].execute(**instruction_inputs(llm, **overrides))
    assert message in str(caught.value)
    assert llm.requests == []


def test_a_path_typed_as_caption_is_a_caption_not_a_file(comfy_nodes, llm):
    rows, _ = comfy_nodes["GenerateEditInstructions"].execute(
        **instruction_inputs(llm, captions="/etc/passwd.txt")).result
    assert [r.input_caption for r in rows] == ["/etc/passwd.txt"]


def test_captions_file_from_the_input_folder(comfy_nodes, comfy_base, llm):
    folder = unique("captions")
    (comfy_base / "input" / folder).mkdir()
    lines = [json.dumps({"caption": f"a cat on a sofa {folder}"}), json.dumps({"caption": f"a dog {folder}"})]
    (comfy_base / "input" / folder / "caps.jsonl").write_text("\n".join(lines) + "\n")
    choices = comfy_nodes["GenerateEditInstructions"].INPUT_TYPES()["required"]["captions_file"][1]["options"]
    assert choices[0] == "none" and f"{folder}/caps.jsonl" in choices
    rows, _ = comfy_nodes["GenerateEditInstructions"].execute(
        **instruction_inputs(llm, captions_file=f"{folder}/caps.jsonl")).result
    assert [r.input_caption for r in rows] == [f"a cat on a sofa {folder}", f"a dog {folder}"]


def test_an_endpoint_that_answers_nothing_usable_fails_with_the_reason(comfy_nodes, llm):
    llm.set_responder(lambda request: Reply.error(400, "model not found"))
    with pytest.raises(ValueError, match=r"^GenerateEditInstructions: no usable instructions.*HTTP 400"):
        comfy_nodes["GenerateEditInstructions"].execute(**instruction_inputs(llm))


# --- CLIPDirectionFilter and CLIPEditMetrics ---------------------------------------------------------------


def filter_inputs(clip: str, **overrides) -> dict:
    values = {"clip_weights": clip, "min_sim_0": -1.0, "min_sim_1": -1.0, "min_sim_dir": -1.0,
              "min_sim_image": -1.0, "top_k": 0, "batch_size": 3}
    values.update(overrides)
    return values


def reference_scores(encoder: ClipEncoder, rows: list[EditRow]):
    return encoder.score_pairs(as_batch([r.input_image for r in rows]), as_batch([r.edited_image for r in rows]),
                               [r.input_caption for r in rows], [r.output_caption for r in rows])


def test_filter_scores_every_pair_like_the_clip_model_does(comfy_nodes, tiny_clip, reference_encoder):
    rows = random_rows()
    kept, inputs, edits, report = comfy_nodes["CLIPDirectionFilter"].execute(rows, **filter_inputs(tiny_clip)).result
    expected = reference_scores(reference_encoder, rows)
    assert len(kept) == len(rows)
    by_seed = {r.seed: r for r in kept}
    for index, row in enumerate(rows):
        got = by_seed[row.seed]
        for name in ("sim_0", "sim_1", "sim_dir", "sim_image"):
            assert got.scores()[f"clip_{name}"] == pytest.approx(float(getattr(expected, name)[index]), abs=1e-5)
    assert inputs.shape == edits.shape == (10, 48, 48, 3)
    assert report.startswith("kept 10 of 10 pairs from 2 caption pairs")
    # within each caption pair the best direction comes first
    for group in {r.group for r in kept}:
        dirs = [r.clip_sim_dir for r in kept if r.group == group]
        assert dirs == sorted(dirs, reverse=True)


def test_filter_drops_below_each_threshold_and_caps_per_caption_pair(comfy_nodes, tiny_clip, reference_encoder):
    rows = random_rows()
    scores = reference_scores(reference_encoder, rows)
    node = comfy_nodes["CLIPDirectionFilter"]
    for name in ("sim_0", "sim_1", "sim_dir", "sim_image"):
        values = getattr(scores, name)
        # halfway between the two middle scores: a cut equal to one score would make the test hinge on its last bit
        ordered = values.sort().values
        cut = float(ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
        kept = node.execute(rows, **filter_inputs(tiny_clip, **{f"min_{name}": cut})).result[0]
        assert {r.seed for r in kept} == {rows[i].seed for i in range(len(rows)) if values[i] >= cut}, name
        assert 0 < len(kept) < len(rows)
    capped = node.execute(rows, **filter_inputs(tiny_clip, top_k=2)).result[0]
    for group in {r.group for r in rows}:
        group_dirs = sorted((float(scores.sim_dir[i]) for i, r in enumerate(rows) if r.group == group), reverse=True)
        assert [r.clip_sim_dir for r in capped if r.group == group] == pytest.approx(group_dirs[:2], abs=1e-5)
    required = node.INPUT_TYPES()["required"]
    defaults = [required[name][1]["default"] for name in ("min_sim_0", "min_sim_1", "min_sim_dir", "min_sim_image",
                                                          "top_k")]
    assert defaults == [0.2, 0.2, 0.2, 0.7, 4], "the reference code's thresholds and cap"


def test_filter_refuses_rows_without_images(comfy_nodes, tiny_clip):
    rows = [EditRow("a", "b", "c", None, None)]
    with pytest.raises(ValueError, match=r"^CLIPDirectionFilter: 1 of 1 rows have no images.*P2PPairGenerator"):
        comfy_nodes["CLIPDirectionFilter"].execute(rows, **filter_inputs(tiny_clip))


def test_missing_clip_weights_say_where_to_put_them(comfy_nodes, comfy_base, tiny_clip):
    folder = unique("no_clip")
    write_rows(random_rows(1, 2), comfy_base / "output", folder, "reference")
    prompt = {"1": {"class_type": "LoadEditDataset",
                    "inputs": {"dataset": "none", "format": "auto", "max_rows": 0, "preview_count": 1,
                               "dataset_override": f"output/{folder}"}},
              "2": {"class_type": "CLIPDirectionFilter",
                    "inputs": {"rows": ["1", 1], **filter_inputs("ViT-L-14.pt")}},
              "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}}}
    # ViT-L-14.pt is offered even when absent, so the shipped workflow validates and the node can explain.
    choices = comfy_nodes["CLIPDirectionFilter"].INPUT_TYPES()["required"]["clip_weights"][1]["options"]
    assert choices[0] == "ViT-L-14.pt" and tiny_clip in choices and "tiny_clip.json" not in choices
    datasets = comfy_nodes["LoadEditDataset"].INPUT_TYPES()["required"]["dataset"][1]["options"]
    prompt["1"]["inputs"]["dataset"] = datasets[0]
    result = run_prompt(prompt)
    assert not result.ok
    message = result.error["exception_message"]
    assert message.startswith("CLIPDirectionFilter: CLIP weights 'ViT-L-14.pt' not found in")
    assert str(comfy_base / "models" / "clip_filter") in message
    assert "downloaded" in message


def test_weights_that_do_not_fit_their_config_are_explained(comfy_nodes, comfy_base, tiny_clip):
    folder = comfy_base / "models" / "clip_filter"
    (folder / "mismatch.safetensors").write_bytes((folder / tiny_clip).read_bytes())
    (folder / "mismatch.json").write_text(json.dumps({**TINY_CLIP, "embed_dim": 32}))
    with pytest.raises(ValueError, match=r"^CLIPEditMetrics: mismatch.safetensors does not load as mismatch.json"):
        comfy_nodes["CLIPEditMetrics"].execute(torch.rand(1, 32, 32, 3), torch.rand(1, 32, 32, 3), "a", "b",
                                               "mismatch.safetensors", batch_size=1)


def test_clip_model_is_kept_between_runs_until_its_file_changes(comfy_nodes, comfy_base, tiny_clip):
    from comfyui_ip2p.pipeline.clip_filter import load_encoder

    first = load_encoder(tiny_clip)
    assert load_encoder(tiny_clip) is first
    weights = comfy_base / "models" / "clip_filter" / tiny_clip
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert load_encoder(tiny_clip) is not first


def test_edit_metrics_match_the_clip_model_and_broadcast_one_input(comfy_nodes, tiny_clip, reference_encoder):
    generator = torch.Generator().manual_seed(2)
    source = torch.rand(1, 48, 48, 3, generator=generator)
    edits = torch.rand(3, 40, 56, 3, generator=generator)
    node = comfy_nodes["CLIPEditMetrics"]
    sim_0, sim_1, sim_dir, sim_image, report = node.execute(source, edits, "a house", "a house in winter",
                                                            tiny_clip, batch_size=2).result
    expected = reference_encoder.score_pairs(source.expand(3, -1, -1, -1), edits, ["a house"] * 3,
                                             ["a house in winter"] * 3)
    for got, name in zip((sim_0, sim_1, sim_dir, sim_image), ("sim_0", "sim_1", "sim_dir", "sim_image"), strict=True):
        assert got == pytest.approx(float(getattr(expected, name).mean()), abs=1e-5)
    assert "CLIP direction similarity (sim_dir)" in report
    same = node.execute(source, source, "a house", "a house in winter", tiny_clip, batch_size=2).result
    assert same[3] == pytest.approx(1.0, abs=1e-5) and same[2] == 0.0
    with pytest.raises(ValueError, match=r"^CLIPEditMetrics: 2 input images for 3 edited images"):
        node.execute(source.expand(2, -1, -1, -1), edits, "a", "b", tiny_clip, batch_size=2)


# --- SaveEditDataset / LoadEditDataset ---------------------------------------------------------------------


def save(comfy_nodes, rows, name, fmt, image_format="png"):
    return comfy_nodes["SaveEditDataset"].execute(rows, name, fmt, image_format).result


def load(comfy_nodes, name, fmt="auto", max_rows=0, preview_count=4):
    return comfy_nodes["LoadEditDataset"].execute("none", fmt, max_rows, preview_count,
                                                  dataset_override=name).result


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_then_load_round_trip(comfy_nodes, comfy_base, fmt):
    rows = random_rows(2, 3)
    name = unique(f"runs/{fmt}")
    path, written, handle = save(comfy_nodes, rows, name, fmt)
    assert path == name and written == 6
    assert handle == {"path": str((comfy_base / "output" / name).resolve()), "format": fmt, "mapping": None}
    assert save(comfy_nodes, rows, name, fmt)[1] == 0, "saving again adds nothing"
    assert f"output/{name}" in comfy_nodes["LoadEditDataset"].INPUT_TYPES()["required"]["dataset"][1]["options"]

    dataset, loaded, inputs, edits = load(comfy_nodes, f"output/{name}", preview_count=4)
    assert dataset == {"path": handle["path"], "format": fmt, "mapping": None}
    assert len(loaded) == 6 and inputs.shape == edits.shape == (4, 48, 48, 3)
    originals = {r.seed: r for r in rows}
    for row in loaded:
        source = originals[row.seed]
        assert (row.input_caption, row.instruction, row.output_caption) == (
            source.input_caption, source.instruction, source.output_caption)
        assert (row.p, row.cfg) == pytest.approx((source.p, source.cfg))
        for got, want in ((row.input_image, source.input_image), (row.edited_image, source.edited_image)):
            pixels = np.asarray(Image.open(got) if isinstance(got, Path) else got)
            assert np.array_equal(pixels, np.asarray(want))
    assert len(load(comfy_nodes, name, max_rows=2, preview_count=0)[1]) == 2
    assert load(comfy_nodes, name, preview_count=0)[2].shape[0] == 0


def test_saved_parquet_loads_in_hugging_face_datasets(comfy_nodes, comfy_base, tmp_path):
    import datasets

    name = unique("hf")
    save(comfy_nodes, random_rows(1, 3), name, "diffusers", "jpg")
    loaded = datasets.load_dataset(str(comfy_base / "output" / name), cache_dir=str(tmp_path / "hf"))["train"]
    assert loaded.column_names[:3] == ["input_image", "edit_prompt", "edited_image"]
    assert len(loaded) == 3 and loaded[0]["edited_image"].size == (48, 48)


def test_save_resumes_adding_only_new_rows_and_load_notices(comfy_nodes):
    name = unique("resume")
    rows = random_rows(2, 3)
    loader = comfy_nodes["LoadEditDataset"]
    assert save(comfy_nodes, rows[:4], name, "reference")[1] == 4
    stamp = loader.fingerprint_inputs(dataset="none", format="auto", max_rows=0, preview_count=0,
                                      dataset_override=name)
    assert save(comfy_nodes, rows, name, "reference")[1] == 2
    assert len(load(comfy_nodes, name)[1]) == 6
    assert loader.fingerprint_inputs(dataset="none", dataset_override=name) != stamp, "ComfyUI must reload it"


def test_a_dataset_being_written_elsewhere_is_not_touched(comfy_nodes, comfy_base):
    from comfyui_ip2p.dataset.formats import open_writer

    name = unique("busy")
    with open_writer(comfy_base / "output", name, "diffusers"), pytest.raises(
            ValueError, match=r"^SaveEditDataset: another writer is writing"):
        save(comfy_nodes, random_rows(1, 1), name, "diffusers")


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/tmp/ip2p_escape", "C:\\escape", "\\\\server\\x",
                                  "..", "a/..", "", "name\x00", "CON"])
def test_hostile_dataset_names_are_refused(comfy_nodes, comfy_base, name):
    before = set(comfy_base.parent.iterdir())
    with pytest.raises(ValueError, match=r"^SaveEditDataset: dataset name"):
        save(comfy_nodes, random_rows(1, 1), name, "diffusers")
    assert set(comfy_base.parent.iterdir()) == before
    assert not Path("/tmp/ip2p_escape").exists()


@pytest.mark.parametrize("name", ["../../etc", "/etc", "output/../../etc", "input/../models"])
def test_hostile_dataset_names_are_refused_on_load(comfy_nodes, name):
    with pytest.raises(ValueError, match=r"^LoadEditDataset: "):
        load(comfy_nodes, name)


def test_missing_dataset_and_rows_without_images_are_explained(comfy_nodes):
    with pytest.raises(ValueError, match=r"^LoadEditDataset: no dataset 'nope' in ComfyUI's output or input"):
        load(comfy_nodes, "nope")
    with pytest.raises(ValueError, match=r"^SaveEditDataset: 1 of 1 rows have no images.*P2PPairGenerator"):
        save(comfy_nodes, [EditRow("a", "b", "c", None, None)], unique("empty"), "diffusers")


def test_load_filter_save_graph_through_the_executor(comfy_nodes, comfy_base, tiny_clip):
    source, target = unique("graph_in"), unique("graph_out")
    write_rows(random_rows(2, 4), comfy_base / "input", source, "reference")
    prompt = {"1": {"class_type": "LoadEditDataset",
                    "inputs": {"dataset": f"input/{source}", "format": "auto", "max_rows": 0, "preview_count": 2}},
              "2": {"class_type": "CLIPDirectionFilter", "inputs": {"rows": ["1", 1], **filter_inputs(tiny_clip,
                                                                                                       top_k=3)}},
              "3": {"class_type": "SaveEditDataset", "inputs": {"rows": ["2", 0], "dataset_name": target,
                                                                "format": "public", "image_format": "png"}}}
    result = checked(run_prompt(prompt))
    assert result.outputs["3"]["text"] == [f"6 new rows, 6 in total, in output/{target} (public)"]
    saved = load(comfy_nodes, target)
    assert saved[0]["format"] == "public" and len(saved[1]) == 6
    assert all(r.clip_sim_dir is not None for r in saved[1])
