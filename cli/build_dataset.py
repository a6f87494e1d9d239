"""Headless, sharded dataset building: the shipped build_dataset workflow as a command, a share per process.

    python -m comfyui_ip2p.cli.build_dataset --captions captions.txt --name my_dataset \\
        --checkpoint v1-5-pruned-emaonly.safetensors --base-url http://127.0.0.1:8000/v1 --model MODEL
    torchrun --nproc_per_node 8 -m comfyui_ip2p.cli.build_dataset ...        (or: accelerate launch -m ...)

Rank k of W (RANK / WORLD_SIZE / LOCAL_RANK, as torchrun and accelerate set them; 0 of 1 when unset) takes
captions[k::W] and runs the SAME workflow as the canvas (example_workflows/build_dataset.json: LLM instructions ->
Prompt-to-Prompt pairs -> CLIP filter -> SaveEditDataset) through ComfyUI's executor in-process, a chunk of
captions at a time, into its own shard `output/<name>.shards/rank-<k>`. Then the ranks meet (torch.distributed
with gloo when the launcher set MASTER_ADDR/MASTER_PORT, else status files in the shards folder) and rank 0
merges every shard into `output/<name>` with the dataset writer: each (group, sample) exactly once, so merging
again adds nothing.

Resuming: a chunk is recorded as done, with a fingerprint of its settings, once its rows are saved and every
caption got a usable LLM answer or a final one (an edit identical to the caption after every re-ask). A chunk
whose captions got no usable answer for transport or format reasons is not recorded, so a rerun asks exactly those
captions again (the others come from the LLM cache, and the writer skips rows already saved) and merges again.
Resume with the same number of processes and chunk size (checked).

One bad row never stops the build: a caption or answer a node refuses (too many CLIP windows, images that are not
finite) is skipped with its reason, and the chunk, the rank and the merge go on. Every count and decision comes
from data, never from the nodes' wording: their counts under the ui key STATS_KEY (dataset/node_stats.py), and a
chunk without one usable LLM answer is the NoUsableInstructionsError that GenerateEditInstructions raises (the
canvas shows its message), recognised by its class and read for the counts it carries. The builder prints every
skipped row by reason.

Exit codes: 0 every caption gave its rows (the paper's own drops aside: identical edits, duplicates, the CLIP
filter); 3 (EXIT_PARTIAL) the dataset was merged but rows are missing: captions without a usable LLM answer (a
rerun of the same command asks exactly those again) or rows a node refused (listed with their reason: fix or
remove those captions); 1 an error, nothing merged; 2 a command-line error (argparse).

Seeds: chunk c of rank k is chunk c*W + k overall; its samples get seed + (c*W + k) * chunk_size *
samples_per_pair + n, so no two samples anywhere start from the same noise.

Across machines, ComfyUI's output folder must be one shared filesystem: rank 0 reads every shard (checked).
The API key comes from an environment variable or a key file, never from the command line.

This module is the command: arguments, ComfyUI, the workflow, running the chunks, printing. The plan, the shard
folders, the per-chunk records and the merge are dataset/sharding.py; the ranks meet through training/rendezvous.py.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..dataset.formats import DIFFUSERS, FORMATS
from ..dataset.instruction_format import read_captions
from ..dataset.instructions import NoUsableInstructionsError, skipped_text
from ..dataset.key_hosts import HOSTS_ENV, host_of
from ..dataset.node_stats import STATS_KEY
from ..dataset.sharding import (
    LLM,
    P2P,
    SAMPLES_PER_CHUNK,
    BuildError,
    Chunk,
    ChunkOutcome,
    Layout,
    RankStatus,
    check_plan,
    check_shards_visible,
    chunk_size_for,
    fingerprint,
    merge_counts,
    merge_shards,
    outcome_of,
    plan_chunks,
    rank_share,
    read_json,
    record_chunk,
    shard_rows,
)
from ..training import rendezvous
from ..training.distributed import World, pick_device
from ..training.distributed import launched_world as training_world
from . import runtime
from .workflow import WorkflowError

PACK = Path(__file__).resolve().parent.parent
WORKFLOW = PACK / "example_workflows" / "build_dataset.json"
# The key read from --api-key-file travels to the node through this process's environment only.
KEY_ENV = "IP2P_BUILD_DATASET_API_KEY"
PROGRESS_EVERY_S = 15.0
# After this many chunks in a row without a single usable LLM answer, the endpoint is taken to be down.
MAX_DEAD_CHUNKS = 3
EXIT_OK, EXIT_ERROR, EXIT_PARTIAL = 0, 1, 3  # 2 is argparse's, for a command-line error
CLIP, SAVE = "CLIPDirectionFilter", "SaveEditDataset"
NEEDED = ("CheckpointLoaderSimple", LLM, P2P, CLIP, SAVE)
# Canvas previews: in a headless run they would only fill the temp folder with every image.
DROPPED = {"PreviewImage"}


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="comfyui-ip2p-build-dataset",
        description="Build an instruction-editing dataset (captions -> LLM edits -> Prompt-to-Prompt pairs -> "
                    "CLIP filter) with the shipped workflow, sharded over the processes of torchrun or "
                    "accelerate launch. Options left out keep the workflow's values. The API key is read from "
                    "--api-key-env or --api-key-file, never from the command line.",
        epilog=f"Exit codes: {EXIT_OK} every caption gave its rows; {EXIT_PARTIAL} partial: merged, but rows are "
               "missing (captions without a usable LLM answer, asked again by rerunning the same command, or rows "
               f"a node refused, listed with their reasons); {EXIT_ERROR} error, nothing merged; 2 bad arguments.")
    add = parser.add_argument
    add("--captions", type=Path, required=True, help="captions file: .txt (one a line), .jsonl or .csv")
    add("--name", required=True, help="dataset folder inside ComfyUI's output folder (subfolders with /)")
    add("--checkpoint", help="text-to-image checkpoint: a name in models/checkpoints or a path to one")
    add("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    add("--model", help="the model name the endpoint serves")
    add("--mode", choices=("chat", "completion"), help="chat (any chat model) or completion (the paper's format)")
    add("--api-key-env", help="NAME of the environment variable holding the API key (ends in API_KEY)")
    add("--api-key-file", type=Path, help="file holding the API key (one line); takes precedence")
    add("--concurrency", type=int, help="LLM requests in flight per process")
    add("--clip-weights", help="CLIP weights: a name in models/clip_filter or a path to one")
    for name in ("sim-0", "sim-1", "sim-dir", "sim-image"):
        add(f"--min-{name}", type=float, help=f"CLIP filter threshold min_{name.replace('-', '_')} (-1 keeps all)")
    add("--top-k", type=int, help="most pairs kept per caption pair (0 keeps all that pass)")
    add("--samples-per-pair", type=int, help="image pairs drawn per caption pair")
    add("--steps", type=int, help="denoising steps per pair")
    add("--size", type=int, help="image width and height in pixels (multiple of 8)")
    add("--seed", type=int, help="base seed; every rank and chunk gets its own disjoint seeds from it")
    add("--sampler", help="ComfyUI sampler name (the paper: euler_ancestral)")
    add("--scheduler", help="ComfyUI scheduler name")
    add("--batch-size", type=int, help="P2P samples per model call")
    add("--format", choices=FORMATS, default=DIFFUSERS, help="dataset format (default: %(default)s)")
    add("--image-format", choices=("png", "jpg"), help="image encoding in the dataset")
    add("--chunk-size", type=int, default=0,
        help=f"captions per workflow run (default: about {SAMPLES_PER_CHUNK} samples per run)")
    add("--base-dir", type=Path, help="ComfyUI base directory (models/, output/); default: the ComfyUI folder")
    add("--workflow", type=Path, default=WORKFLOW, help="workflow to run (UI or API format)")
    add("--run-id", help="id shared by the ranks of one launch, for the file-based meeting when no "
                         "MASTER_ADDR is set (default: the launcher's job id)")
    add("--sync-timeout-h", type=float, default=72.0,
        help="hours the ranks wait for each other at the end (default: %(default)s)")
    runtime.add_verbose_option(parser)
    return parser.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Widget values set by the command line, per node class; None means the workflow's own value."""
    size = args.size
    wanted = {
        "CheckpointLoaderSimple": {"ckpt_name": args.checkpoint},
        "GenerateEditInstructions": {"captions_file": "none", "base_url": args.base_url, "model": args.model,
                                     "mode": args.mode, "api_key_env": args.api_key_env,
                                     "concurrency": args.concurrency, "cache": True},
        "P2PPairGenerator": {"samples_per_pair": args.samples_per_pair, "steps": args.steps, "width": size,
                             "height": size, "sampler_name": args.sampler, "scheduler": args.scheduler,
                             "batch_size": args.batch_size},
        "CLIPDirectionFilter": {"clip_weights": args.clip_weights, "min_sim_0": args.min_sim_0,
                                "min_sim_1": args.min_sim_1, "min_sim_dir": args.min_sim_dir,
                                "min_sim_image": args.min_sim_image, "top_k": args.top_k},
        "SaveEditDataset": {"format": args.format, "image_format": args.image_format},
    }
    if args.api_key_file is not None:
        wanted["GenerateEditInstructions"].update(api_key_env=KEY_ENV, api_key_file="")
    return {kind: {k: v for k, v in values.items() if v is not None} for kind, values in wanted.items()}


def load_key_file(path: Path | None) -> None:
    """Puts the key from `path` into this process's environment for the node; it never enters the graph."""
    if path is None:
        return
    try:
        key = path.expanduser().read_text(encoding="utf-8").strip()
    except OSError as error:
        raise BuildError(f"cannot read --api-key-file {path}: {error.strerror}") from None
    if not key:
        raise BuildError(f"--api-key-file {path} is empty: put the API key on its first line")
    os.environ[KEY_ENV] = key


def trust_key_host(base_url: str) -> None:
    """The user typed --base-url on this command line, so the key may go there (a workflow alone may not
    send it to a new host: dataset/key_hosts.py)."""
    host = host_of(base_url)
    if host:
        known = os.environ.get(HOSTS_ENV, "")
        os.environ[HOSTS_ENV] = f"{known},{host}" if known else host


# ---------------------------------------------------------------------------------------------------------
# Ranks and captions
# ---------------------------------------------------------------------------------------------------------


def launched_world(env: Mapping[str, str]) -> World:
    """This process's place as torchrun / accelerate describe it (one process when nothing is set)."""
    try:
        return training_world(env)
    except ValueError as error:
        raise BuildError(str(error)) from None


def read_caption_file(path: Path) -> tuple[list[str], int]:
    """Captions in file order with repeats removed (one run would drop them too); and how many repeats."""
    if not path.is_file():
        raise BuildError(f"--captions {path} is not a file")
    try:
        captions = read_captions(path)
    except ValueError as error:
        raise BuildError(f"--captions {path}: {error}") from None
    unique = list(dict.fromkeys(captions))
    if not unique:
        raise BuildError(f"--captions {path} holds no captions: write one caption per line")
    return unique, len(captions) - len(unique)


# ---------------------------------------------------------------------------------------------------------
# The workflow as an API prompt
# ---------------------------------------------------------------------------------------------------------


def load_prompt(path: Path) -> dict[str, dict]:
    """The workflow as an API-format prompt without canvas previews (needs ComfyUI's nodes loaded)."""
    from .workflow import object_info_in_process, ui_to_api

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BuildError(f"cannot read workflow {path}: {error}") from None
    prompt = ui_to_api(data, object_info_in_process()) if "nodes" in data else data
    return {k: v for k, v in prompt.items() if v.get("class_type") not in DROPPED}


def node_ids(prompt: Mapping[str, dict]) -> dict[str, str]:
    """class_type -> node id for the nodes this command drives; each must appear exactly once."""
    ids = {}
    for kind in NEEDED:
        found = [node_id for node_id, node in prompt.items() if node.get("class_type") == kind]
        if len(found) != 1:
            raise WorkflowError(f"the workflow must hold exactly one {kind} node, it holds {len(found)}")
        ids[kind] = found[0]
    return ids


def set_inputs(prompt: dict[str, dict], ids: Mapping[str, str], values: Mapping[str, Mapping[str, Any]]) -> None:
    for kind, inputs in values.items():
        node = prompt[ids[kind]]
        for name, value in inputs.items():
            if isinstance(node["inputs"].get(name), list):
                raise WorkflowError(f"{kind} input {name!r} is connected to another node in the workflow; "
                                    "this command sets it itself: make it a plain widget")
            node["inputs"][name] = value


def chunk_prompt(base: Mapping[str, dict], ids: Mapping[str, str], chunk: Chunk, shard_name: str) -> dict:
    prompt = copy.deepcopy(dict(base))
    set_inputs(prompt, ids, {
        LLM: {"captions": "\n".join(chunk.captions)},
        P2P: {"seed": chunk.seed},
        SAVE: {"dataset_name": shard_name},
    })
    return prompt


def with_model_names(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "checkpoint": model_file(args.checkpoint, "checkpoints"),
                                 "clip_weights": model_file(args.clip_weights, "clip_filter")})


def model_file(value: str | None, folder: str) -> str | None:
    """A model name as ComfyUI lists it. A path to a file is served by adding its folder to ComfyUI's `folder`;
    anything else (e.g. "sd15/model.safetensors" inside models/) stays a name for ComfyUI to check."""
    if value is None or ("/" not in value and os.sep not in value):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        return value
    import folder_paths

    folder_paths.add_model_folder_path(folder, str(path.parent.resolve()))
    return path.name


# ---------------------------------------------------------------------------------------------------------
# One rank's work
# ---------------------------------------------------------------------------------------------------------


def node_stats(outputs: Mapping[str, Any], node_id: str, kind: str) -> dict[str, Any]:
    """A node's counts from its ui output (STATS_KEY): data, so no rewording of a message can break it."""
    found = outputs.get(node_id, {}).get(STATS_KEY) or []
    if not found or not isinstance(found[0], dict):
        raise BuildError(f"the workflow's {kind} node reported no counts ({STATS_KEY}): use this pack's {kind} "
                         "node, or update the pack")
    return found[0]


def clip_note(clip: Mapping[str, Any]) -> str:
    pairs = int(clip.get("pairs", 0))
    if not pairs:
        return "no rows to filter"
    return f"kept {clip.get('kept', 0)} of {pairs} pairs from {clip.get('caption_pairs', 0)} caption pairs"


def chunk_outcome(result: runtime.RunResult, ids: Mapping[str, str]) -> ChunkOutcome:
    """A chunk's outcome from the run's data: the nodes' counts, or, when GenerateEditInstructions got no usable
    answer at all, the counts its NoUsableInstructionsError carries (zero rows; the later nodes did not run).
    Any other failure stops the rank with ComfyUI's message."""
    if not result.ok:
        empty = result.raised(NoUsableInstructionsError)
        if empty is None or (result.error or {}).get("node_id") != ids[LLM]:
            raise BuildError(runtime.format_error(result))
        return outcome_of(getattr(empty, "stats", {}), {}, new_rows=0)
    llm = node_stats(result.outputs, ids[LLM], LLM)
    p2p = node_stats(result.outputs, ids[P2P], P2P)
    clip = node_stats(result.outputs, ids[CLIP], CLIP)
    save = node_stats(result.outputs, ids[SAVE], SAVE)
    return outcome_of(llm, p2p, int(save["new_rows"]), clip_note(clip))


def run_chunk(prompt: dict, ids: Mapping[str, str], tag: str) -> ChunkOutcome:
    printer = runtime.progress_printer(prompt, every_s=PROGRESS_EVERY_S, prefix=tag)
    return chunk_outcome(runtime.run_prompt(prompt, on_event=printer, handled=(NoUsableInstructionsError,)), ids)


def build_shard(args: argparse.Namespace, captions: Sequence[str], world: World, layout: Layout,
                status: RankStatus) -> None:
    """Runs this rank's chunks into its shard; fills `status` as it goes (it is reported even on failure)."""
    base = load_prompt(args.workflow)
    ids = node_ids(base)
    set_inputs(base, ids, overrides_from(with_model_names(args)))
    p2p = base[ids[P2P]]["inputs"]
    samples = int(p2p["samples_per_pair"])
    chunk_size = chunk_size_for(args.chunk_size, samples)
    seed = int(args.seed if args.seed is not None else p2p["seed"])
    chunks = plan_chunks(rank_share(captions, world), world, chunk_size, samples, seed)
    status.captions, status.chunks = sum(len(c.captions) for c in chunks), len(chunks)
    check_plan(layout, world, chunk_size, args.format)
    run_chunks(chunks, base, ids, layout, world, status)
    status.shard_rows = shard_rows(layout.shard(world.rank))


def run_chunks(chunks: Sequence[Chunk], base: Mapping[str, dict], ids: Mapping[str, str], layout: Layout,
               world: World, status: RankStatus) -> None:
    """Each chunk not yet done with these settings; a chunk is recorded as done once its rows are saved and no
    caption is left to ask again."""
    done = read_json(layout.progress(world.rank)).get("chunks", {})
    dead = 0
    for position, chunk in enumerate(chunks):
        prompt = chunk_prompt(base, ids, chunk, layout.shard_name(world.rank))
        mark = fingerprint(prompt)
        earlier = done.get(str(chunk.index), {})
        if earlier.get("fingerprint") == mark:
            status.skipped += 1
            # What that run skipped is still missing from the dataset: report it again.
            status.add_skips(earlier.get("skipped", {}), earlier.get("skipped_rows", []), earlier.get("refused", 0))
            continue
        started = time.monotonic()
        outcome = run_chunk(prompt, ids, world.tag)
        status.add(outcome)
        print(chunk_line(world.tag, chunk, len(chunks), outcome, time.monotonic() - started), flush=True)
        if outcome.complete:
            record_chunk(layout, world.rank, done, chunk, mark, outcome)
            dead = 0
            continue
        status.incomplete += 1
        dead = dead + 1 if outcome.fetched + outcome.cached == 0 else 0
        if dead >= MAX_DEAD_CHUNKS:
            left = len(chunks) - position - 1
            status.incomplete += left
            status.notes.append(f"stopped after {dead} chunks in a row without a single usable LLM answer "
                                f"({outcome.note}); {left} later chunks not run. Check --base-url, --model, --mode "
                                "and the key, then rerun the same command to continue")
            return


def chunk_line(tag: str, chunk: Chunk, total: int, outcome: ChunkOutcome, seconds: float) -> str:
    """The same counts, in the same words, as GenerateEditInstructions' own summary."""
    skipped = f", skipped by reason: {skipped_text(outcome.skipped)}" if outcome.skipped else ""
    again = f", {outcome.unanswered} captions to ask again" if outcome.unanswered else ""
    note = f"; {outcome.note}" if outcome.note else ""
    return (f"{tag} chunk {chunk.index + 1}/{total}: {len(chunk.captions)} captions, {outcome.new_rows} new rows, "
            f"LLM ({outcome.cached} cached, {outcome.fetched} fetched){again}{skipped}{note} ({seconds:.1f} s)")


# ---------------------------------------------------------------------------------------------------------
# Meeting at the end, merging (rank 0)
# ---------------------------------------------------------------------------------------------------------


def make_sync(world: World, layout: Layout, args: argparse.Namespace, env: Mapping[str, str]) -> rendezvous.Sync:
    run_id = args.run_id or rendezvous.launcher_run_id(env)
    try:
        return rendezvous.rendezvous(world, env, layout.status, run_id,
                                     datetime.timedelta(hours=args.sync_timeout_h))
    except rendezvous.RendezvousError as error:
        raise BuildError(f"{error}: give every rank the same --run-id (or launch with torchrun / accelerate "
                         "launch)") from None


def summary(layout: Layout, statuses: Sequence[dict], added: int, total: int, fmt: str) -> str:
    lines = [f"dataset {layout.name}: {total} rows ({added} new) in {layout.merged} ({fmt}), "
             f"from {sum(s['captions'] for s in statuses)} captions on {len(statuses)} processes"]
    for s in statuses:
        notes = "; ".join(s.get("notes", []))
        lines.append(f"  rank {s['rank']}: {s['captions']} captions, {s['chunks'] - s['skipped']} of {s['chunks']} "
                     f"chunks run ({s['skipped']} already done, {s['incomplete']} incomplete), {s['shard_rows']} rows "
                     f"in its shard ({s['new_rows']} new), LLM ({s['cached']} cached, {s['fetched']} fetched), "
                     f"{s['seconds']:.1f} s{'; ' + notes if notes else ''}")
    lines += skipped_lines(statuses)
    return "\n".join(lines)


def skipped_lines(statuses: Sequence[dict]) -> list[str]:
    """Every skipped row, by reason, with the node that skipped it."""
    counts = merge_counts(*(s.get("skipped_by_reason", {}) for s in statuses))
    if not counts:
        return []
    rows = [row for s in statuses for row in s.get("skipped_rows", [])]
    lines = [f"skipped {sum(counts.values())} rows, by reason: {skipped_text(counts)}"]
    lines += [f"  {node}: {caption!r}: {reason}" for node, caption, reason in rows]
    return lines


def finish(args: argparse.Namespace, layout: Layout, statuses: Sequence[dict]) -> int:
    failed = [s for s in statuses if not s["ok"]]
    for s in failed:
        print(f"error: rank {s['rank']} failed: {s['error']}", file=sys.stderr)
    if failed:
        print("error: nothing merged; fix the error and rerun the same command to continue", file=sys.stderr)
        return EXIT_ERROR
    check_shards_visible(layout, statuses)
    added, total = merge_shards(layout, len(statuses), args.format, args.image_format)
    print(summary(layout, statuses, added, total, args.format), flush=True)
    return partial_exit(statuses)


def partial_exit(statuses: Sequence[dict]) -> int:
    """EXIT_PARTIAL, with what is missing and what to do, when rows are missing; else EXIT_OK."""
    incomplete = sum(s["incomplete"] for s in statuses)
    unanswered = sum(s.get("unanswered", 0) for s in statuses)
    refused = sum(s.get("refused", 0) for s in statuses)
    if incomplete:
        print(f"partial (exit {EXIT_PARTIAL}): {unanswered} captions got no usable LLM answer and {incomplete} chunks "
              "are not recorded as done; every other row is merged. Rerun the same command: it asks exactly those "
              "captions again (answers already received are cached)", file=sys.stderr)
    if refused:
        print(f"partial (exit {EXIT_PARTIAL}): {refused} rows were refused by a node and skipped (listed above with "
              "their reasons); every other row is merged. A rerun refuses them again: shorten or remove those "
              "captions in --captions, then rerun", file=sys.stderr)
    return EXIT_PARTIAL if incomplete or refused else EXIT_OK


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------


def run_rank(args: argparse.Namespace, captions: Sequence[str], world: World, layout: Layout,
             notes: list[str]) -> RankStatus:
    status = RankStatus(rank=world.rank, notes=notes)
    started = time.monotonic()
    try:
        build_shard(args, captions, world, layout, status)
    except Exception as error:  # any failure: a rank must always report, or the others wait for it
        status.ok, status.error = False, str(error)
        if world.size > 1:  # rank 0 repeats it in the end; a rank's own log should show it too
            print(f"{world.tag} error: {error}", file=sys.stderr, flush=True)
    status.seconds = time.monotonic() - started
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        world = launched_world(os.environ)
        captions, repeats = read_caption_file(args.captions)
        load_key_file(args.api_key_file)
        trust_key_host(args.base_url)
        pick_device(world)
        layout = Layout(runtime.start(args.base_dir, verbose=args.verbose), args.name)
        sync = make_sync(world, layout, args, os.environ)
    except (BuildError, RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    notes = [f"{repeats} repeated captions skipped"] if repeats and world.rank == 0 else []
    status = run_rank(args, captions, world, layout, notes)
    try:
        statuses = sync.gather(asdict(status))
    except (BuildError, RuntimeError) as error:
        print(f"{world.tag} error: the ranks could not meet: {error}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        sync.close()
    if statuses is None:
        return EXIT_OK if status.ok else EXIT_ERROR
    try:
        return finish(args, layout, statuses)
    except (BuildError, ValueError, OSError) as error:
        print(f"error: merging failed: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
