"""Paths from hostile workflows: every input of our nodes that names a file or folder, fed absolute paths, '..',
symlinks that lead out of ComfyUI's folders and odd Unicode, through ComfyUI's executor (and, for a few, the real
HTTP server). Nothing outside the base's input, output, temp, models and user folders is read or written: a
sentinel folder beside the base (a secret text, a secret-coloured image, a whole dataset) stays byte-identical
and never shows up in an output, and every refusal names the node and says what to do."""

from __future__ import annotations

import http.client
import json
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from comfyui_ip2p.cli.runtime import format_error, run_prompt
from comfyui_ip2p.dataset.records import EditRow
from comfyui_ip2p.testing.comfy_run import checked
from comfyui_ip2p.testing.comfy_server import upload
from comfyui_ip2p.testing.edit_rows import write_rows
from comfyui_ip2p.testing.openai_server import FakeOpenAIServer
from PIL import Image

TAG = uuid.uuid4().hex[:8]
SECRET_TEXT = f"IP2P-SENTINEL-{uuid.uuid4().hex}"
SECRET_RGB = (13, 201, 77)
ALLOWED_TOP = {"input", "output", "temp", "models", "user"}
PLAIN_NAME_HINT = "use a plain relative folder name"


def secret_image(size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), SECRET_RGB)


def plain_image(seed: int, size: int = 16) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 120, (size, size, 3), dtype=np.uint8))


def rows(images, count: int = 2) -> list[EditRow]:
    return [EditRow(f"a photo {i}", "make it winter", f"a photo {i} in winter", images(i), images(i + 100), seed=i)
            for i in range(count)]


def shows_secret(path: Path) -> bool:
    """Whether an image file is mostly the sentinel's colour (it was read from outside the base)."""
    try:
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    except OSError:
        return False
    return bool((np.abs(pixels - SECRET_RGB).max(axis=-1) <= 3).mean() > 0.5)


def tree(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder` (not following symlinks): kind, size, mtime, link target."""
    found = {}
    for here, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            path = Path(here) / name
            stat = path.lstat()
            target = os.readlink(path) if path.is_symlink() else None
            found[str(path.relative_to(folder))] = (stat.st_mode, stat.st_size, stat.st_mtime_ns, target)
    return found


@pytest.fixture(scope="module")
def sentinel(comfy_base) -> Path:
    """A folder beside the base that no node may read or write: a secret, a secret image, two datasets."""
    folder = comfy_base.parent / f"sentinel_{TAG}"
    folder.mkdir()
    (folder / "secret.txt").write_text(SECRET_TEXT + "\n")
    (folder / "captions.txt").write_text(f"{SECRET_TEXT} caption\n")
    secret_image().save(folder / "secret.png")
    (folder / "model.safetensors").write_bytes(SECRET_TEXT.encode())
    (folder / "train_dir").mkdir()
    write_rows(rows(lambda i: secret_image()), folder, "dataset", "diffusers")
    write_rows(rows(lambda i: secret_image()), folder, "refds", "reference", image_format="png")
    return folder


@pytest.fixture(autouse=True)
def nothing_escapes(comfy_base, sentinel):
    """After every test: the sentinel is untouched, the base changed only in ComfyUI's folders, no image
    written during the test shows the sentinel's pixels and no file holds its secret text."""
    sentinel_before = tree(sentinel)
    base_before = tree(comfy_base)
    siblings_before = set(os.listdir(comfy_base.parent))
    yield
    assert tree(sentinel) == sentinel_before, "a file outside the base was written"
    base_after = tree(comfy_base)
    changed = [rel for rel, entry in base_after.items() if base_before.get(rel) != entry]
    outside = [rel for rel in changed if Path(rel).parts[0] not in ALLOWED_TOP
               and not rel.startswith("comfyui-server-")]  # the test harness's server log
    assert outside == [], f"written outside input/output/temp/models/user: {outside}"
    new_siblings = set(os.listdir(comfy_base.parent)) - siblings_before
    assert all(name.startswith("test_") for name in new_siblings), f"new beside the base: {new_siblings}"
    for rel in changed:
        path = comfy_base / rel
        if path.is_file() and not path.is_symlink():
            assert not (path.suffix in (".png", ".jpg", ".webp") and shows_secret(path)), f"{rel} shows the secret"
            if path.stat().st_size < 50_000_000:
                assert SECRET_TEXT.encode() not in path.read_bytes(), f"{rel} holds the sentinel's secret"


@pytest.fixture(scope="module")
def source_dataset(comfy_base) -> str:
    name = f"paths_src_{TAG}"
    write_rows(rows(plain_image), comfy_base / "input", name, "reference", image_format="png")
    return name


def link(path: Path, target: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target, target_is_directory=target.is_dir())
    return path


def refused(result, node: str) -> str:
    """The executor's error text for a run that must have failed inside `node`."""
    assert not result.ok, f"{node} accepted a hostile value"
    assert result.error and result.error.get("node_type") == node, format_error(result)
    message = result.error["exception_message"]
    assert message.startswith(f"{node}: "), message
    assert SECRET_TEXT not in message
    return message


def blocked(result, node: str) -> str:
    """A run with a combo value outside the node's list. ComfyUI 0.3.75 does not check V3 combo values
    against their options (its validator only checks old-style list inputs), so such a value reaches the node,
    which must refuse it itself; a ComfyUI that validates refuses it earlier, naming the node too."""
    if result.node_errors:
        texts = [f"{info['class_type']}: {e['message']} {e.get('details', '')}"
                 for info in result.node_errors.values() for e in info["errors"]]
        assert any(text.startswith(node) for text in texts), texts
        return "\n".join(texts)
    return refused(result, node)


# --- SaveEditDataset.dataset_name ----------------------------------------------------------------------------

def save_graph(source: str, name: str) -> dict:
    return {"1": {"class_type": "LoadEditDataset", "inputs": {"dataset": f"input/{source}", "format": "auto",
                                                              "max_rows": 0, "preview_count": 1}},
            "2": {"class_type": "SaveEditDataset", "inputs": {"rows": ["1", 1], "dataset_name": name,
                                                              "format": "diffusers", "image_format": "png"}}}


HOSTILE_NAMES = {
    "dotdot": f"../escape_{TAG}",
    "dotdot inside": f"x/../../escape_{TAG}",
    "absolute": f"/tmp/ip2p_escape_{TAG}",
    "drive": f"C:\\escape_{TAG}",
    "unc": f"\\\\server\\share\\escape_{TAG}",
    "backslash dotdot": f"..\\escape_{TAG}",
    "fullwidth dots": f"\uff0e\uff0e/escape_{TAG}",
    "fullwidth slash": f"..\uff0fescape_{TAG}",
    "two dot leader": f"\u2025/escape_{TAG}",
    "nul": f"a\x00b_{TAG}",
    "rtl override": f"evil\u202egnp_{TAG}",
    "zero width": f"a\u200bb_{TAG}",
    "newline": f"a\nb_{TAG}",
    "300 chars": "x" * 300,
    "con": "CON",
    "nul device": "nul.txt",
    "aux in folder": f"ok_{TAG}/Aux",
    "trailing dot": f"trail_{TAG}.",
    "trailing space": f"trail_{TAG} /x",
    "only dots": "...",
    "dot": ".",
    "dotdot alone": "..",
    "empty": "",
    "spaces": "   ",
}


@pytest.mark.parametrize("case", list(HOSTILE_NAMES))
def test_hostile_dataset_names_are_refused_naming_the_node(comfy_nodes, source_dataset, case):
    result = run_prompt(save_graph(source_dataset, HOSTILE_NAMES[case]))
    message = refused(result, "SaveEditDataset")
    assert "dataset name" in message and PLAIN_NAME_HINT in message
    assert not Path(f"/tmp/ip2p_escape_{TAG}").exists()


ODD_BUT_INSIDE = {
    "percent-encoded dots are literal": (f"%2e%2e/pct_{TAG}", f"%2e%2e/pct_{TAG}"),
    "emoji": (f"emoji_\U0001f3a8_{TAG}", f"emoji_\U0001f3a8_{TAG}"),
    "NFD is stored as NFC": (f"cafe\u0301_{TAG}", f"caf\u00e9_{TAG}"),
    "leading dots": (f"..dots_{TAG}", f"..dots_{TAG}"),
    "subfolder": (f"sub_{TAG}/a/b", f"sub_{TAG}/a/b"),
}


@pytest.mark.parametrize("case", list(ODD_BUT_INSIDE))
def test_odd_but_harmless_names_land_inside_the_output_folder(comfy_nodes, comfy_base, source_dataset, case):
    name, stored = ODD_BUT_INSIDE[case]
    result = checked(run_prompt(save_graph(source_dataset, name)))
    assert result.outputs["2"]["text"] == [f"2 new rows, 2 in total, in output/{stored} (diffusers)"]
    folder = comfy_base / "output" / stored
    assert (folder / ".ip2p_dataset.json").is_file()
    assert folder.resolve().is_relative_to((comfy_base / "output").resolve())


def test_format_combos_given_paths_are_refused(comfy_nodes, comfy_base, source_dataset):
    """ComfyUI 0.3.75 passes any value to a V3 combo, so format pickers must not become file names."""
    for field, value in (("format", f"../../escape_{TAG}"), ("image_format", f"../escape_{TAG}.png"),
                         ("image_format", "/tmp/x")):
        graph = save_graph(source_dataset, f"fmt_{TAG}")
        graph["2"]["inputs"][field] = value
        message = refused(run_prompt(graph), "SaveEditDataset")
        assert ("unknown format" in message or "image_format must be" in message), message
    graph = load_graph(f"input/{source_dataset}")
    graph["1"]["inputs"]["format"] = "/etc/passwd"
    assert "unknown dataset format '/etc/passwd'" in refused(run_prompt(graph), "LoadEditDataset")


def test_nfc_and_nfd_spellings_are_one_dataset(comfy_nodes, comfy_base, source_dataset):
    nfc, nfd = f"r\u00e9sum\u00e9_{TAG}", f"re\u0301sume\u0301_{TAG}"
    checked(run_prompt(save_graph(source_dataset, nfc)))
    again = checked(run_prompt(save_graph(source_dataset, nfd)))
    assert again.outputs["2"]["text"] == [f"0 new rows, 2 in total, in output/{nfc} (diffusers)"]
    assert not any(p.name == nfd for p in (comfy_base / "output").iterdir())


def test_a_symlink_in_output_leading_out_is_not_written_through(comfy_nodes, comfy_base, sentinel, source_dataset):
    escape = link(comfy_base / "output" / f"link_{TAG}", sentinel)
    try:
        message = refused(run_prompt(save_graph(source_dataset, f"link_{TAG}/new_ds")), "SaveEditDataset")
        assert "through a symlink" in message and PLAIN_NAME_HINT in message
        # A symlinked dataset folder itself (its name points straight out) is refused the same way.
        message = refused(run_prompt(save_graph(source_dataset, f"link_{TAG}")), "SaveEditDataset")
        assert "through a symlink" in message
    finally:
        escape.unlink()
    assert not (sentinel / "new_ds").exists()


@pytest.mark.parametrize("fmt", ["reference", "diffusers"])
def test_resuming_a_dataset_holding_a_link_out_writes_nothing_through_it(comfy_nodes, comfy_base, sentinel,
                                                                         source_dataset, fmt):
    name = f"holds_link_{fmt}_{TAG}"
    write_rows(rows(plain_image, 1), comfy_base / "output", name, fmt, image_format="png")
    # A pair folder (reference) or the shard folder's file (diffusers) that points outside.
    inner = comfy_base / "output" / name / ("0000001" if fmt == "reference" else "data/extra.parquet")
    link(inner, sentinel / ("train_dir" if fmt == "reference" else "secret.txt"))
    graph = save_graph(source_dataset, name)
    graph["2"]["inputs"]["format"] = fmt
    try:
        message = refused(run_prompt(graph), "SaveEditDataset")
    finally:
        inner.unlink()  # later tests of the session walk the output folder
    assert "a symlink leading outside the dataset folder" in message and "replace the link" in message


# --- LoadEditDataset.dataset / dataset_override --------------------------------------------------------------

def load_graph(dataset: str, override: str = "") -> dict:
    return {"1": {"class_type": "LoadEditDataset", "inputs": {"dataset": dataset, "format": "auto", "max_rows": 0,
                                                              "preview_count": 2, "dataset_override": override}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 2]}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 3]}}}


def outside_overrides(comfy_base: Path, sentinel: Path) -> list[str]:
    dataset = sentinel / "dataset"
    from_input = os.path.relpath(dataset, comfy_base / "input")
    from_output = os.path.relpath(dataset, comfy_base / "output")
    return [str(dataset), from_input, f"input/{from_input}", f"output/{from_output}", f"output/./{from_output}",
            f"{from_input.replace('/', chr(92))}", f"input/{sentinel.name}/../{from_input}",
            f"input/\uff0e\uff0e/\uff0e\uff0e/{sentinel.name}/dataset", "/etc", "../../../../../../../etc"]


def test_dataset_override_cannot_reach_a_dataset_outside_the_base(comfy_nodes, comfy_base, sentinel,
                                                                  source_dataset):
    for override in outside_overrides(comfy_base, sentinel):
        message = refused(run_prompt(load_graph(f"input/{source_dataset}", override)), "LoadEditDataset")
        assert "dataset name" in message or "no dataset" in message, message


def test_a_choice_outside_the_list_is_refused(comfy_nodes, comfy_base, sentinel):
    dataset = sentinel / "dataset"
    for choice in (str(dataset), f"input/{os.path.relpath(dataset, comfy_base / 'input')}"):
        blocked(run_prompt(load_graph(choice)), "LoadEditDataset")
    # The extra layer below the executor's list check: the node itself refuses the same values.
    node = comfy_nodes["LoadEditDataset"]
    for choice in (str(dataset), f"input/{os.path.relpath(dataset, comfy_base / 'input')}"):
        with pytest.raises(ValueError, match=r"^LoadEditDataset: "):
            node.execute(dataset=choice, format="auto", max_rows=0, preview_count=1)


def test_symlinked_datasets_and_pair_folders_leading_out_are_refused(comfy_nodes, comfy_base, sentinel,
                                                                     source_dataset):
    whole = link(comfy_base / "input" / f"linked_ds_{TAG}", sentinel / "dataset")
    # A reference dataset of our own whose pair folder is a symlink to the outside one's.
    partial = comfy_base / "input" / f"partial_ds_{TAG}"
    write_rows(rows(plain_image, 1), comfy_base / "input", partial.name, "reference", image_format="png")
    pair = next(p for p in partial.iterdir() if p.name.isdigit())
    renamed = pair.rename(partial / "moved_away")
    link(pair, sentinel / "refds" / "0000000")
    try:
        message = refused(run_prompt(load_graph(f"input/{source_dataset}", f"input/linked_ds_{TAG}")),
                          "LoadEditDataset")
        assert "through a symlink" in message
        message = refused(run_prompt(load_graph(f"input/{source_dataset}", f"input/{partial.name}")),
                          "LoadEditDataset")
        # refused before anything in the linked folder (prompt.json, metadata.jsonl) is read
        assert "the pair folder" in message and "leads outside it" in message and "not links" in message
    finally:
        whole.unlink()
        pair.unlink()
        renamed.rename(pair)


def hostile_parquet(folder: Path, sentinel: Path) -> Path:
    """A public-layout parquet whose image cells name files instead of holding bytes: one absolute, one
    climbing out with '..' (what a downloaded or uploaded dataset can say)."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    climb = os.path.relpath(sentinel / "secret.png", folder)
    table = pa.table({
        "original_prompt": ["a", "b"], "edit_prompt": ["x", "y"], "edited_prompt": ["c", "d"],
        "original_image": pa.array([{"bytes": None, "path": str(sentinel / "secret.png")},
                                    {"bytes": None, "path": climb}], image),
        "edited_image": pa.array([{"bytes": None, "path": climb}] * 2, image),
    })
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.parquet"
    pq.write_table(table, path)
    return path


def test_a_dataset_whose_image_paths_lead_out_is_refused(comfy_nodes, comfy_base, sentinel, source_dataset):
    name = f"evil_parquet_{TAG}"
    hostile_parquet(comfy_base / "input" / name, sentinel)
    message = refused(run_prompt(load_graph(f"input/{name}")), "LoadEditDataset")
    assert "outside the dataset folder" in message
    # Copying it into a new dataset must not carry the outside image along either.
    copy = save_graph(source_dataset, f"copied_{TAG}")
    copy["1"]["inputs"]["dataset"] = f"input/{name}"
    refused(run_prompt(copy), "LoadEditDataset")
    assert not (comfy_base / "output" / f"copied_{TAG}").exists()


# --- TrainIP2P.checkpoint_name ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_dataset(comfy_base) -> str:
    name = f"paths_train_{TAG}"
    write_rows(rows(plain_image, 2), comfy_base / "output", name, "reference", image_format="png")
    return name


def train_graph(ckpt: str, dataset: str, name: str) -> dict:
    settings = {"mode": "full", "steps": 1, "batch_size": 1, "grad_accumulation": 1, "learning_rate": 1e-4,
                "resolution": 16, "seed": 0, "ema_decay": 0.0, "cache_latents": True,
                "gradient_checkpointing": False, "lora_rank": 4, "checkpoint_every": 0, "validation_every": 0,
                "resume": True, "validation_count": 0, "validation_steps": 1}
    return {"1": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": ckpt}},
            "2": {"class_type": "LoadEditDataset", "inputs": {"dataset": f"output/{dataset}", "format": "auto",
                                                              "max_rows": 0, "preview_count": 0}},
            "3": {"class_type": "TrainIP2P", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                        "dataset": ["2", 0], "checkpoint_name": name, **settings}}}


HOSTILE_CHECKPOINTS = [f"../escape_{TAG}", f"/tmp/ip2p_escape_{TAG}", f"sub/{TAG}", f"C:\\{TAG}", "..",
                       f"a\nb_{TAG}", f"evil\u202egnp_{TAG}", "y" * 300, "CON", f"trail_{TAG}.", "\x00"]


@pytest.mark.slow
def test_hostile_checkpoint_names_are_refused_before_training(comfy_nodes, comfy_base, tiny_ip2p_ckpt,
                                                              train_dataset):
    checkpoints = set(os.listdir(comfy_base / "models" / "checkpoints"))
    for name in HOSTILE_CHECKPOINTS:
        started = time.monotonic()
        message = refused(run_prompt(train_graph(tiny_ip2p_ckpt, train_dataset, name)), "TrainIP2P")
        assert "checkpoint_name" in message and "my_ip2p_finetune" in message, message
        assert time.monotonic() - started < 60
    assert set(os.listdir(comfy_base / "models" / "checkpoints")) == checkpoints


@pytest.mark.slow
def test_training_does_not_write_through_symlinks_leading_out(comfy_nodes, comfy_base, sentinel, tiny_ip2p_ckpt,
                                                              train_dataset):
    run_link = link(comfy_base / "output" / "ip2p_train" / f"run_{TAG}", sentinel / "train_dir")
    model_link = link(comfy_base / "models" / "checkpoints" / f"model_{TAG}.safetensors",
                      sentinel / "model.safetensors")
    try:
        for name in (f"run_{TAG}", f"model_{TAG}"):
            message = refused(run_prompt(train_graph(tiny_ip2p_ckpt, train_dataset, name)), "TrainIP2P")
            assert "through a symlink" in message, message
    finally:
        run_link.unlink()
        model_link.unlink()


# --- Model and weight pickers: LoadIP2PModel.checkpoint, clip_weights --------------------------------------------

def test_model_pickers_accept_only_listed_names(comfy_nodes, comfy_base, sentinel):
    to_sentinel = os.path.relpath(sentinel / "model.safetensors", comfy_base / "models" / "checkpoints")
    names = [str(sentinel / "model.safetensors"), to_sentinel, f"diffusers/{os.path.relpath(sentinel, comfy_base)}",
             "diffusers/..", "diffusers/../checkpoints", f"diffusers/{sentinel}"]
    for name in names:
        graph = {"1": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": name}},
                 "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
        blocked(run_prompt(graph), "LoadIP2PModel")
    # Below the executor's list check, the loader itself refuses them too.
    for name in names:
        with pytest.raises(ValueError, match=r"^LoadIP2PModel: (no diffusers folder|checkpoint .* is not in)"):
            comfy_nodes["LoadIP2PModel"].execute(checkpoint=name)
    weights = os.path.relpath(sentinel / "model.safetensors", comfy_base / "models" / "clip_filter")
    for name in (weights, str(sentinel / "model.safetensors")):
        metrics = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                                 "color": 0}},
                   "2": {"class_type": "CLIPEditMetrics", "inputs": {
                       "input_images": ["1", 0], "edited_images": ["1", 0], "input_caption": "a",
                       "output_caption": "b", "clip_weights": name, "batch_size": 1}},
                   "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 4]}}}
        blocked(run_prompt(metrics), "CLIPEditMetrics")
        for node in ("CLIPEditMetrics", "CLIPDirectionFilter"):
            cls = comfy_nodes[node]
            with pytest.raises(ValueError, match=rf"^{node}: CLIP weights .* not found"):
                if node == "CLIPEditMetrics":
                    import torch

                    cls.execute(torch.zeros(1, 8, 8, 3), torch.zeros(1, 8, 8, 3), "a", "b", name, 1)
                else:
                    cls.execute([EditRow("a", "b", "c", plain_image(0), plain_image(1))], name, -1.0, -1.0, -1.0,
                                -1.0, 0, 1)


# --- GenerateEditInstructions: captions_file, api_key_file, the answer cache ---------------------------------------

def instruction_graph(server: FakeOpenAIServer, **overrides) -> dict:
    inputs = {"captions": f"a red car {uuid.uuid4().hex[:6]}", "captions_file": "none",
              "base_url": server.base_url, "model": "fake-model", "mode": "chat", "api_key_env": "",
              "api_key_file": "", "temperature": 0.7, "frequency_penalty": 0.1, "max_tokens": 256,
              "concurrency": 1, "cache": False, "request_seed": 0, **overrides}
    return {"1": {"class_type": "GenerateEditInstructions", "inputs": inputs},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}


def no_secret_sent(server: FakeOpenAIServer) -> None:
    for request in server.requests:
        assert SECRET_TEXT.encode() not in request.raw_body
        assert SECRET_TEXT not in json.dumps(request.headers)


def test_captions_file_cannot_read_outside_the_input_folder(comfy_nodes, comfy_base, sentinel):
    caps = link(comfy_base / "input" / f"caps_{TAG}.txt", sentinel / "captions.txt")
    try:
        with FakeOpenAIServer() as llm:
            choices = comfy_nodes["GenerateEditInstructions"].INPUT_TYPES()["required"]["captions_file"][1]["options"]
            assert caps.name in choices  # listed (it is in input/), yet never read through
            message = refused(run_prompt(instruction_graph(llm, captions_file=caps.name)), "GenerateEditInstructions")
            assert "captions_file" in message and "through a symlink" in message
            outside = [str(sentinel / "captions.txt"), os.path.relpath(sentinel / "captions.txt", comfy_base / "input")]
            for name in outside:
                blocked(run_prompt(instruction_graph(llm, captions_file=name)), "GenerateEditInstructions")
                with pytest.raises(ValueError, match=r"^GenerateEditInstructions: captions_file .* must name a file"):
                    comfy_nodes["GenerateEditInstructions"].execute(**instruction_graph(llm, captions_file=name)["1"]
                                                                    ["inputs"])
            assert llm.requests == []
    finally:
        caps.unlink()


def test_api_key_file_cannot_read_outside_the_keys_folder(comfy_nodes, comfy_base, sentinel):
    keys = comfy_base / "user" / "__ip2p_keys"
    keys.mkdir(parents=True, exist_ok=True)
    linked = link(keys / f"link_{TAG}.key", sentinel / "secret.txt")
    climb = os.path.relpath(sentinel / "secret.txt", keys)
    try:
        with FakeOpenAIServer() as llm:
            for name in (linked.name, climb, str(sentinel / "secret.txt"), f"..\\..\\..\\{sentinel.name}\\secret.txt",
                         f"\uff0e\uff0e/{climb}", f"a\x00{TAG}", f"a\u202e{TAG}"):
                message = refused(run_prompt(instruction_graph(llm, api_key_file=name)), "GenerateEditInstructions")
                assert "api_key_file" in message and "must name a file inside" in message, message
            assert llm.requests == []
    finally:
        linked.unlink()


def test_the_answer_cache_is_not_written_through_a_symlink_leading_out(comfy_nodes, comfy_base, sentinel):
    cache = comfy_base / "output" / "ip2p_cache"
    aside = cache.with_name(f"ip2p_cache_aside_{TAG}")
    had_cache = cache.exists()
    if had_cache:
        cache.rename(aside)
    link(cache, sentinel / "train_dir")
    try:
        with FakeOpenAIServer() as llm:
            message = refused(run_prompt(instruction_graph(llm, cache=True)), "GenerateEditInstructions")
            assert "LLM answer cache" in message and "through a symlink" in message, message
    finally:
        cache.unlink()
        if had_cache:
            aside.rename(cache)


# --- Through the real HTTP server ------------------------------------------------------------------------------

def outcome(server, prompt: dict) -> str:
    """'' when the prompt ran; else ComfyUI's refusal (validation) or the node's exception message."""
    try:
        prompt_id = server.queue(prompt)
    except RuntimeError as error:
        return str(error)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = server.get(f"/history/{prompt_id}").get(prompt_id, {}).get("status", {})
        if status.get("completed") is not None:
            errors = [data.get("exception_message", "") for event, data in status.get("messages", [])
                      if event == "execution_error"]
            return "\n".join(errors) if status.get("status_str") != "success" else ""
        time.sleep(0.2)
    raise TimeoutError(f"prompt {prompt_id} did not finish")


@pytest.mark.server
def test_over_http_hostile_names_and_planted_datasets_are_refused(comfy_server, comfy_base, sentinel, tmp_path,
                                                                  source_dataset):
    for name in (f"../escape_{TAG}", f"/tmp/ip2p_escape_{TAG}", f"a\u202eb_{TAG}"):
        text = outcome(comfy_server, save_graph(source_dataset, name))
        assert "SaveEditDataset: dataset name" in text and PLAIN_NAME_HINT in text, text
    text = outcome(comfy_server, load_graph(f"input/{source_dataset}", str(sentinel / "dataset")))
    assert "LoadEditDataset: dataset name" in text and "absolute path" in text, text
    # A combo value outside the list: refused by /prompt's validation or, as in ComfyUI 0.3.75, by the node.
    text = outcome(comfy_server, load_graph(str(sentinel / "dataset")))
    assert "LoadEditDataset: dataset name" in text or ("POST /prompt -> 400" in text and "LoadEditDataset" in text)

    # A remote user uploads a parquet "image" whose cells point at files outside the base, then loads it.
    planted = hostile_parquet(tmp_path / "plant", sentinel)
    subfolder = f"planted_{TAG}"
    assert upload(comfy_server, planted.read_bytes(), "train.parquet", subfolder)["subfolder"] == subfolder
    text = outcome(comfy_server, load_graph(f"input/{subfolder}"))
    assert "LoadEditDataset: a row of the dataset" in text and "outside the dataset folder" in text, text
    history = json.dumps(comfy_server.get("/history"))
    assert SECRET_TEXT not in history and SECRET_TEXT not in comfy_server.log_tail(10**7)


def raw_get(server, path: str) -> tuple[int, bytes]:
    """GET with the path sent byte for byte (no client-side normalisation of '..')."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_host=False, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.server
def test_the_web_folder_serves_nothing_outside_it(comfy_server, comfy_base, sentinel):
    status, body = raw_get(comfy_server, "/extensions/comfyui_ip2p/docs/LoadIP2PModel.md")
    assert status == 200 and body.startswith(b"# Load InstructPix2Pix Model")  # the docs route itself works
    pack_file = b"[tool.pytest.ini_options]"  # in pyproject.toml, one folder above web/
    climb = "/".join([".."] * (len(sentinel.parts) + 4))
    target = f"{climb}{sentinel}/secret.txt"
    paths = ["/extensions/comfyui_ip2p/../pyproject.toml", "/extensions/comfyui_ip2p/docs/../../pyproject.toml",
             "/extensions/comfyui_ip2p/%2e%2e/pyproject.toml", "/extensions/comfyui_ip2p/..%2fpyproject.toml",
             "/extensions/comfyui_ip2p/%2e%2e%2fpyproject.toml", "/extensions/comfyui_ip2p/%252e%252e/pyproject.toml",
             "/extensions/comfyui_ip2p/..%5cpyproject.toml", "/extensions/comfyui_ip2p/docs/..\\..\\pyproject.toml",
             f"/extensions/comfyui_ip2p/{target}", f"/extensions/comfyui_ip2p/{target.replace('..', '%2e%2e')}",
             f"/extensions/comfyui_ip2p/{target.replace('/', '%2f')}",
             f"/extensions/comfyui_ip2p/{sentinel}/secret.txt", f"/extensions/comfyui_ip2p//{sentinel}/secret.txt",
             "/extensions/comfyui_ip2p/../../../../../etc/passwd"]
    for path in paths:
        status, body = raw_get(comfy_server, path)
        assert pack_file not in body and SECRET_TEXT.encode() not in body and b"root:x:0:0" not in body, (path, status)
