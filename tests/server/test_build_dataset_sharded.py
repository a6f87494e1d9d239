"""The headless, sharded dataset builder: the shipped build_dataset workflow run by torchrun on 2 CPU
processes against a local OpenAI-compatible server, each rank taking its share, one merged dataset at the end.

The fast tests check the sharding plan (dataset/sharding.py), the meeting of the ranks (training/rendezvous.py),
the merge and how the command reads a chunk's outcome from the run's data, without ComfyUI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from comfyui_ip2p.cli import build_dataset as bd
from comfyui_ip2p.cli.runtime import RunResult
from comfyui_ip2p.dataset import sharding as sh
from comfyui_ip2p.dataset.formats import DIFFUSERS, load_rows
from comfyui_ip2p.dataset.instructions import IDENTICAL, InstructionStats, NoUsableInstructionsError
from comfyui_ip2p.dataset.node_stats import STATS_KEY, clip_filter_stats, save_stats
from comfyui_ip2p.dataset.records import EditRow
from comfyui_ip2p.testing.edit_rows import write_rows
from comfyui_ip2p.testing.openai_server import FakeOpenAIServer
from comfyui_ip2p.testing.tiny_clip import write_tiny_clip
from comfyui_ip2p.training import rendezvous as rz
from comfyui_ip2p.training.distributed import World
from PIL import Image

CAPTIONS = [
    "a photograph of a girl riding a horse",
    "an oil painting of a lighthouse at dusk",
    "a cozy living room with a fireplace",
    "a red sports car parked on a city street",
]
SAMPLES = 2



# ---------------------------------------------------------------------------------------------------------
# Fast: plan, meeting, merge
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3])
def test_every_caption_goes_to_one_rank_and_every_sample_seed_is_unique(size):
    captions = [f"caption {i}" for i in range(23)]
    chunk_size, samples = 4, 3
    seen, seeds = Counter(), Counter()
    for rank in range(size):
        world = World(rank, size)
        chunks = sh.plan_chunks(sh.rank_share(captions, world), world, chunk_size, samples, seed=7)
        for chunk in chunks:
            seen.update(chunk.captions)
            seeds.update(range(chunk.seed, chunk.seed + len(chunk.captions) * samples))
    assert seen == Counter(captions)
    assert max(seeds.values()) == 1 and len(seeds) == len(captions) * samples
    # Appending captions leaves every earlier caption with its rank, chunk and seeds (a rerun resumes).
    world = World(size - 1, size)
    before = sh.plan_chunks(sh.rank_share(captions, world), world, chunk_size, samples, seed=7)
    after = sh.plan_chunks(sh.rank_share([*captions, "new"], world), world, chunk_size, samples, seed=7)
    assert [c.seed for c in before] == [c.seed for c in after[:len(before)]]
    assert all(set(b.captions) <= set(a.captions) for b, a in zip(before, after, strict=False))


def test_launcher_environment_gives_the_rank():
    assert bd.launched_world({}) == World(0, 1, 0)
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert bd.launched_world(env) == World(3, 4, 1)
    with pytest.raises(bd.BuildError, match="outside WORLD_SIZE"):
        bd.launched_world({"RANK": "2", "WORLD_SIZE": "2"})


def test_fingerprint_ignores_speed_and_endpoint_but_not_what_makes_the_rows():
    prompt = {"1": {"class_type": "GenerateEditInstructions",
                    "inputs": {"captions": "a", "base_url": "http://a/v1", "concurrency": 4, "model": "m"}},
              "2": {"class_type": "P2PPairGenerator", "inputs": {"steps": 20, "batch_size": 4, "seed": 0}}}
    mark = sh.fingerprint(prompt)

    def changed(node: str, name: str, value) -> str:
        other = json.loads(json.dumps(prompt))
        other[node]["inputs"][name] = value
        return sh.fingerprint(other)

    assert changed("1", "base_url", "http://b/v1") == mark and changed("1", "concurrency", 8) == mark
    assert changed("2", "batch_size", 1) == mark
    assert changed("2", "steps", 50) != mark and changed("1", "captions", "b") != mark
    assert changed("1", "model", "n") != mark and changed("2", "seed", 1) != mark


def test_a_dataset_resumes_only_with_the_same_sharding(tmp_path):
    layout = sh.Layout(tmp_path, "ds")
    sh.check_plan(layout, World(0, 2), 8, DIFFUSERS)
    sh.check_plan(layout, World(1, 2), 8, DIFFUSERS)
    with pytest.raises(sh.BuildError, match="same number of processes"):
        sh.check_plan(layout, World(0, 3), 8, DIFFUSERS)
    with pytest.raises(sh.BuildError, match=r"contains '\.\.'"):
        sh.Layout(tmp_path, "../escape")


def test_file_meeting_waits_for_this_runs_statuses_only(tmp_path):
    layout = sh.Layout(tmp_path, "ds")
    timeout = timedelta(seconds=30)
    # A status left by an earlier run: it must not count.
    layout.shards.mkdir(parents=True)
    (layout.status(1)).write_text(json.dumps({"rank": 1, "run_id": "old"}))
    rank0 = rz.FileSync(World(0, 2), layout.status, "run-1", timeout)
    rank1 = rz.FileSync(World(1, 2), layout.status, "run-1", timeout)
    result = {}
    waiter = threading.Thread(target=lambda: result.update(statuses=rank0.gather({"rank": 0})))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "rank 0 went on before rank 1 reported"
    assert rank1.gather({"rank": 1}) is None
    waiter.join(10)
    assert [s["rank"] for s in result["statuses"]] == [0, 1]
    with pytest.raises(rz.RendezvousError, match=r"ranks \[0, 1\] did not report"):
        rz.wait_for_statuses(layout.status, 2, "run-2", timeout_s=0.2, poll_s=0.05)


def test_ranks_meet_alone_through_the_launchers_group_or_through_files_with_a_run_id(tmp_path):
    layout = sh.Layout(tmp_path, "ds")
    timeout = timedelta(seconds=30)
    assert isinstance(rz.rendezvous(World(0, 1), {}, layout.status, "", timeout), rz.SoloSync)
    assert isinstance(rz.rendezvous(World(0, 2), {}, layout.status, "job-7", timeout), rz.FileSync)
    assert rz.launcher_run_id({"SLURM_JOB_ID": "42"}) == "42"
    args = bd.parse_args(["--captions", "c.txt", "--name", "n"])
    with pytest.raises(bd.BuildError, match="same --run-id"):
        bd.make_sync(World(1, 2), layout, args, {})


def make_row(caption: str, seed: int) -> EditRow:
    image = Image.new("RGB", (8, 8), (seed * 40 % 256, 0, 0))
    return EditRow(caption, "add snow", f"{caption}, snowy", image, image, seed=seed)


def test_merge_writes_each_sample_once_and_again_adds_nothing(tmp_path):
    layout = sh.Layout(tmp_path, "merged")
    write_rows([make_row("a", 0), make_row("a", 1)], tmp_path, layout.shard_name(0), DIFFUSERS)
    # The same (group, sample) in two shards (a rerun that moved work) lands once.
    write_rows([make_row("b", 5), make_row("a", 1)], tmp_path, layout.shard_name(1), DIFFUSERS)
    assert sh.merge_shards(layout, 3, DIFFUSERS, None) == (3, 3)  # rank 2 had no captions: no shard
    assert sh.merge_shards(layout, 3, DIFFUSERS, None) == (0, 3)
    assert sorted((r.input_caption, r.seed) for r in load_rows(layout.merged)) == [("a", 0), ("a", 1), ("b", 5)]
    statuses = [{"rank": 0, "shard_rows": 2}, {"rank": 1, "shard_rows": 5}]
    with pytest.raises(sh.BuildError, match="shared filesystem"):
        sh.check_shards_visible(layout, statuses)


def test_the_api_key_never_travels_on_the_command_line(tmp_path):
    with pytest.raises(SystemExit):
        bd.parse_args(["--captions", "c.txt", "--name", "n", "--api-key", "sk-secret"])
    args = bd.parse_args(["--captions", "c.txt", "--name", "n", "--api-key-file", str(tmp_path / "key")])
    values = bd.overrides_from(args)["GenerateEditInstructions"]
    assert values["api_key_env"] == bd.KEY_ENV and values["api_key_file"] == ""
    with pytest.raises(bd.BuildError, match="cannot read --api-key-file"):
        bd.load_key_file(tmp_path / "key")


def test_a_chunk_with_failed_llm_requests_is_not_recorded_as_done():
    # Counts come as data (the nodes' ip2p_stats), never read out of their wording.
    llm = InstructionStats(requested=4, ok=3, fetched=2, cached=1, dropped_identical=1, skipped={IDENTICAL: 1},
                           skipped_captions=[["a cat", IDENTICAL]]).as_dict()
    p2p = {"pairs": 3, "rows": 6, "skipped": {}, "skipped_rows": []}
    done = sh.outcome_of(llm, p2p, new_rows=6)
    assert (done.complete, done.new_rows, done.fetched, done.cached, done.refused) == (True, 6, 2, 1, 0)
    assert done.skipped == {IDENTICAL: 1} and done.skipped_rows == [[sh.LLM, "a cat", IDENTICAL]]
    failed = sh.outcome_of({**llm, "ok": 2, "failed": 2, "unanswered": 2}, p2p, new_rows=4)
    assert not failed.complete and failed.unanswered == 2
    refused = sh.outcome_of(llm, {**p2p, "skipped": {"caption refused by the text encoder": 1},
                                  "skipped_rows": [["x" * 20, "caption refused by the text encoder: 22 windows"]]}, 4)
    assert refused.complete and refused.refused == 1
    assert refused.skipped == {IDENTICAL: 1, "caption refused by the text encoder": 1}


IDS = {"CheckpointLoaderSimple": "1", bd.LLM: "2", bd.P2P: "3", bd.CLIP: "4", bd.SAVE: "5"}
# What a builder reading the nodes' wording would take for counts and decisions.
LIES = "failed 9; 99 new rows, 77 in total; no usable instructions; kept 0 of 0 pairs"


def test_the_command_reads_a_chunks_counts_from_the_nodes_data_never_from_their_text():
    llm = InstructionStats(requested=3, ok=2, fetched=1, cached=1, failed=1, unanswered=1).as_dict()
    p2p = {"pairs": 2, "rows": 4, "skipped": {}, "skipped_rows": []}
    outputs = {node_id: {"text": [LIES]} for node_id in IDS.values()}
    for kind, stats in ((bd.LLM, llm), (bd.P2P, p2p), (bd.CLIP, clip_filter_stats(4, 3, 2)),
                        (bd.SAVE, save_stats("ds.shards/rank-0", DIFFUSERS, 3, 10))):
        outputs[IDS[kind]][STATS_KEY] = [stats]
    outcome = bd.chunk_outcome(RunResult(ok=True, outputs=outputs), IDS)
    assert (outcome.new_rows, outcome.fetched, outcome.cached, outcome.unanswered) == (3, 1, 1, 1)
    assert not outcome.complete and outcome.note == "kept 3 of 4 pairs from 2 caption pairs"
    # Without its counts as data a node's text is not read instead: the command says what is wrong.
    del outputs[IDS[bd.SAVE]][STATS_KEY]
    with pytest.raises(bd.BuildError, match="SaveEditDataset node reported no counts"):
        bd.chunk_outcome(RunResult(ok=True, outputs=outputs), IDS)


class IP2PNodeError(ValueError):
    """Stands for nodes/errors.py's error, which names the node and keeps the work's error as its cause."""


def as_comfyui_raises_it(stats: dict) -> IP2PNodeError:
    """GenerateEditInstructions' failure as the builder gets it: ComfyUI runs the pack from its own copy
    (custom_nodes/), so the cause is a class of the same name, not the class the builder imported."""
    copy = type(NoUsableInstructionsError.__name__, (ValueError,), {})
    cause = copy("words nobody parses")
    cause.stats = stats
    error = IP2PNodeError(f"GenerateEditInstructions: {cause}")
    error.__cause__ = cause
    return error


def failed_run(error: BaseException, node_id: str = "2") -> RunResult:
    return RunResult(ok=False, error={"node_id": node_id, "node_type": "GenerateEditInstructions",
                                      "exception_message": str(error), "exception_type": "nodes.IP2PNodeError"},
                     exception=error)


def test_a_chunk_without_one_usable_llm_answer_is_known_by_its_error_class_and_counted_from_its_data():
    stats = InstructionStats(requested=2, failed=2, unanswered=2, reasons=["HTTP 503: overloaded"]).as_dict()
    outcome = bd.chunk_outcome(failed_run(as_comfyui_raises_it(stats)), IDS)
    assert (outcome.complete, outcome.new_rows, outcome.unanswered, outcome.fetched, outcome.cached) == (
        False, 0, 2, 0, 0)
    assert outcome.note == "HTTP 503: overloaded", "the reasons come from the counts the error carries"
    # The canvas's very words without that error class: another failure, which stops the rank with its message.
    worded = IP2PNodeError("GenerateEditInstructions: no usable instructions: 0 rows from 2 captions")
    with pytest.raises(bd.BuildError, match="no usable instructions"):
        bd.chunk_outcome(failed_run(worded), IDS)
    # The error class from a node that is not the LLM node is no empty chunk either.
    with pytest.raises(bd.BuildError, match="words nobody parses"):
        bd.chunk_outcome(failed_run(as_comfyui_raises_it(stats), node_id=IDS[bd.P2P]), IDS)


def test_the_exit_code_says_partial_whenever_rows_are_missing(capsys):
    status = {"incomplete": 0, "unanswered": 0, "refused": 0}
    assert bd.partial_exit([status]) == bd.EXIT_OK
    assert bd.partial_exit([status, {**status, "incomplete": 1, "unanswered": 2}]) == bd.EXIT_PARTIAL
    assert "asks exactly those captions again" in capsys.readouterr().err
    assert bd.partial_exit([{**status, "refused": 1}]) == bd.EXIT_PARTIAL
    err = capsys.readouterr().err
    assert "refused by a node" in err and "asks exactly" not in err, "no claim of asking again what is not asked"


def test_a_missing_captions_file_fails_before_comfyui_starts(tmp_path):
    done = subprocess.run([sys.executable, "-m", "comfyui_ip2p.cli.build_dataset", "--captions",
                           str(tmp_path / "none.txt"), "--name", "x", "--base-dir", str(tmp_path / "base")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "--captions" in done.stderr and "is not a file" in done.stderr
    assert not (tmp_path / "base").exists()


# ---------------------------------------------------------------------------------------------------------
# End to end: torchrun, 2 CPU processes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_failing_rank_exits_non_zero_and_names_the_problem(comfy_base, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text(CAPTIONS[0] + "\n")
    done = subprocess.run([sys.executable, "-m", "comfyui_ip2p.cli.build_dataset", "--captions", str(captions),
                           "--name", f"failing/ds_{uuid.uuid4().hex[:8]}", "--checkpoint", "missing.safetensors",
                           "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--base-dir", str(comfy_base)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert "rank 0 failed" in done.stderr and "CheckpointLoaderSimple" in done.stderr
    assert "missing.safetensors" in done.stderr and "nothing merged" in done.stderr


def run_build(base: Path, llm: FakeOpenAIServer, args: argparse.Namespace) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*launcher, "-m", "comfyui_ip2p.cli.build_dataset", "--captions", str(args.captions),
           "--name", args.name, "--checkpoint", args.checkpoint, "--base-url", llm.base_url, "--model", "fake-model",
           "--api-key-file", str(args.key_file), "--clip-weights", args.clip_weights,
           "--samples-per-pair", str(SAMPLES), "--steps", "2", "--size", "64", "--batch-size", "4",
           "--min-sim-0", "-1", "--min-sim-1", "-1", "--min-sim-dir", "-1", "--min-sim-image", "-1",
           "--base-dir", str(base)]
    env = {k: v for k, v in os.environ.items() if not k.endswith("API_KEY")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@pytest.mark.slow
def test_torchrun_shards_the_workflow_and_merges_one_dataset(comfy_base, tiny_t2i_ckpt, tmp_path):
    import datasets

    key = f"sk-ip2p-sharded-{uuid.uuid4().hex}"
    (tmp_path / "key").write_text(key)
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join([*CAPTIONS, CAPTIONS[0]]) + "\n")  # a repeat is built once
    args = argparse.Namespace(captions=captions, name=f"sharded/ds_{uuid.uuid4().hex[:8]}", checkpoint=tiny_t2i_ckpt,
                              key_file=tmp_path / "key",
                              clip_weights=write_tiny_clip(comfy_base / "models" / "clip_filter", "tiny_clip_sharded",
                                                           seed=1))
    layout = sh.Layout(comfy_base / "output", args.name)

    with FakeOpenAIServer() as llm:
        first = run_build(comfy_base, llm, args)
        first_requests = list(llm.requests)
        # Rank 1 "crashed" after saving its rows but before recording its chunk as done: the rerun redoes
        # that chunk from the LLM cache and the writer skips the rows already saved.
        layout.progress(1).unlink()
        second = run_build(comfy_base, llm, args)
        second_requests = llm.requests[len(first_requests):]

    expected = len(CAPTIONS) * SAMPLES
    assert sorted(r.caption() for r in first_requests) == sorted(CAPTIONS)
    assert {r.headers.get("authorization") for r in first_requests} == {f"Bearer {key}"}
    for rank in (0, 1):
        shard = load_rows(layout.shard(rank))
        assert sorted({r.input_caption for r in shard}) == sorted(CAPTIONS[rank::2]), f"rank {rank} did its share"
        assert len(shard) == len(CAPTIONS[rank::2]) * SAMPLES
    rows = load_rows(layout.merged)
    assert len(rows) == expected and len({(r.group, r.seed) for r in rows}) == expected
    assert len({r.seed for r in rows}) == expected, "two samples started from the same noise"
    assert Counter(r.input_caption for r in rows) == dict.fromkeys(CAPTIONS, SAMPLES)
    assert all(r.output_caption == f"{r.input_caption}, covered in snow" and r.clip_sim_dir is not None for r in rows)
    loaded = datasets.load_dataset(str(layout.merged), cache_dir=str(tmp_path / "hf"))["train"]
    assert len(loaded) == expected and loaded[0]["input_image"].size == (64, 64)
    assert f"dataset {args.name}: {expected} rows ({expected} new)" in first.stdout
    assert "1 repeated captions skipped" in first.stdout

    assert second_requests == [], "the rerun paid for LLM requests again"
    assert len(load_rows(layout.merged)) == expected
    assert f"dataset {args.name}: {expected} rows (0 new)" in second.stdout
    assert "rank 0: 2 captions, 0 of 1 chunks run (1 already done" in second.stdout
    assert "rank 1: 2 captions, 1 of 1 chunks run" in second.stdout and "LLM (2 cached, 0 fetched)" in second.stdout
    outputs = [p for p in (comfy_base / "output").rglob("*") if p.is_file() and args.name.split("/")[1] in str(p)]
    assert all(key.encode() not in p.read_bytes() for p in outputs)
    assert key not in first.stdout + first.stderr + second.stdout + second.stderr
