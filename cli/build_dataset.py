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
finite) is skipped with its reason, and the chunk, the rank and the merge go on. The counts come from the nodes'
`ip2p_stats` ui entry (data, never their wording); the builder prints every skipped row by reason.

Exit codes: 0 every caption gave its rows (the paper's own drops aside: identical edits, duplicates, the CLIP
filter); 3 (EXIT_PARTIAL) the dataset was merged but rows are missing: captions without a usable LLM answer (a
rerun of the same command asks exactly those again) or rows a node refused (listed with their reason: fix or
remove those captions); 1 an error, nothing merged; 2 a command-line error (argparse).

Seeds: chunk c of rank k is chunk c*W + k overall; its samples get seed + (c*W + k) * chunk_size *
samples_per_pair + n, so no two samples anywhere start from the same noise.

Across machines, ComfyUI's output folder must be one shared filesystem: rank 0 reads every shard (checked).
The API key comes from an environment variable or a key file, never from the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..dataset.formats import DIFFUSERS, FORMATS, iter_rows, open_writer
from ..dataset.instructions import read_captions
from ..dataset.key_hosts import HOSTS_ENV, host_of
from ..dataset.paths import atomic_write_json, resolve_inside
from ..dataset.writer import read_manifest
from ..training.distributed import World
from ..training.distributed import launched_world as training_world
from .workflow import WorkflowError

PACK = Path(__file__).resolve().parent.parent
WORKFLOW = PACK / "example_workflows" / "build_dataset.json"
# The key read from --api-key-file travels to the node through this process's environment only.
KEY_ENV = "IP2P_BUILD_DATASET_API_KEY"
# Images of a whole chunk are held in memory between the nodes: about this many samples per chunk.
SAMPLES_PER_CHUNK = 256
# Per-sample seeds stay inside a signed 64-bit integer (the P2P node's limit and the dataset's int64 column).
SEED_LIMIT = 2**63
POLL_S = 2.0
PROGRESS_EVERY_S = 15.0
# After this many chunks in a row without a single usable LLM answer, the endpoint is taken to be down.
MAX_DEAD_CHUNKS = 3
EXIT_OK, EXIT_ERROR, EXIT_PARTIAL = 0, 1, 3  # 2 is argparse's, for a command-line error
STATS_KEY = "ip2p_stats"  # the nodes' ui entry holding their counts as data (pipeline/instructions.STATS_KEY)
# pipeline/instructions.EMPTY_OK_ENV: in this process a chunk without one usable LLM answer gives zero rows and its
# counts (the chunk is then not recorded as done) instead of an error that would stop the rank.
EMPTY_OK_ENV = "IP2P_INSTRUCTIONS_EMPTY_OK"
LLM, P2P = "GenerateEditInstructions", "P2PPairGenerator"
NEEDED = ("CheckpointLoaderSimple", "GenerateEditInstructions", "P2PPairGenerator", "CLIPDirectionFilter",
          "SaveEditDataset")
# Canvas previews: in a headless run they would only fill the temp folder with every image.
DROPPED = {"PreviewImage"}
# Inputs that change where requests go or how fast a chunk runs, never which rows it makes.
NOT_FINGERPRINTED = {
    ("GenerateEditInstructions", "base_url"), ("GenerateEditInstructions", "api_key_env"),
    ("GenerateEditInstructions", "api_key_file"), ("GenerateEditInstructions", "concurrency"),
    ("GenerateEditInstructions", "cache"), ("P2PPairGenerator", "batch_size"), ("CLIPDirectionFilter", "batch_size"),
}
RUN_ID_VARIABLES = ("IP2P_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")


class BuildError(RuntimeError):
    """A failure the user can act on; the message says what to do."""


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
# Ranks, shares and chunks
# ---------------------------------------------------------------------------------------------------------


def launched_world(env: Mapping[str, str]) -> World:
    """This process's place as torchrun / accelerate describe it (one process when nothing is set)."""
    try:
        return training_world(env)
    except ValueError as error:
        raise BuildError(str(error)) from None


@dataclass(frozen=True)
class Chunk:
    index: int  # within this rank
    captions: tuple[str, ...]
    seed: int  # the P2P seed of its first sample


def rank_share(captions: Sequence[str], world: World) -> list[str]:
    """This rank's captions: every W-th one, so appending captions later leaves earlier shares unchanged."""
    return list(captions[world.rank::world.size])


def chunk_size_for(requested: int, samples_per_pair: int) -> int:
    return requested if requested > 0 else max(1, SAMPLES_PER_CHUNK // max(samples_per_pair, 1))


def plan_chunks(share: Sequence[str], world: World, chunk_size: int, samples_per_pair: int,
                seed: int) -> list[Chunk]:
    """Chunks of this rank's share; chunk c is chunk c*W + rank overall and owns the seeds of that slot."""
    chunks = []
    for index, start in enumerate(range(0, len(share), chunk_size)):
        overall = index * world.size + world.rank
        first_seed = (seed + overall * chunk_size * samples_per_pair) % SEED_LIMIT
        chunks.append(Chunk(index, tuple(share[start:start + chunk_size]), first_seed))
    return chunks


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
# Folders: shards, the plan, per-rank progress and status
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    output: Path
    name: str

    def __post_init__(self) -> None:
        try:
            resolve_inside(self.output, self.name)
            resolve_inside(self.output, self.shards_name)
        except ValueError as error:
            raise BuildError(f"--name: {error}") from None

    @property
    def shards_name(self) -> str:
        return f"{self.name.rstrip('/')}.shards"

    @property
    def merged(self) -> Path:
        return resolve_inside(self.output, self.name)

    @property
    def shards(self) -> Path:
        return resolve_inside(self.output, self.shards_name)

    @property
    def plan(self) -> Path:
        return self.shards / "plan.json"

    def shard_name(self, rank: int) -> str:
        return f"{self.shards_name}/rank-{rank}"

    def shard(self, rank: int) -> Path:
        return self.shards / f"rank-{rank}"

    def progress(self, rank: int) -> Path:
        return self.shards / f"rank-{rank}.progress.json"

    def status(self, rank: int) -> Path:
        return self.shards / f"rank-{rank}.status.json"


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def check_plan(layout: Layout, world: World, chunk_size: int, fmt: str) -> None:
    """A resumed dataset must keep the caption -> rank -> chunk assignment, or groups would be drawn twice."""
    wanted = {"world_size": world.size, "chunk_size": chunk_size, "format": fmt}
    found = read_json(layout.plan)
    if found:
        differ = {k: found.get(k) for k in wanted if found.get(k) != wanted[k]}
        if differ:
            raise BuildError(
                f"{layout.name} was started with {json.dumps(found)}, this run has {json.dumps(wanted)}. Resume "
                "it with the same number of processes, --chunk-size and --format, or choose another --name")
        return
    layout.shards.mkdir(parents=True, exist_ok=True)
    atomic_write_json(layout.plan, wanted)


def fingerprint(prompt: Mapping[str, Any]) -> str:
    """What decides a chunk's rows: every node's class and inputs, less those in NOT_FINGERPRINTED."""
    material = {}
    for node_id, node in prompt.items():
        kind = node["class_type"]
        inputs = {k: v for k, v in node["inputs"].items() if (kind, k) not in NOT_FINGERPRINTED}
        material[node_id] = {"class_type": kind, "inputs": inputs}
    text = json.dumps(material, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def record_chunk(layout: Layout, rank: int, done: dict[str, Any], chunk: Chunk, mark: str,
                 outcome: ChunkOutcome) -> None:
    """Marks `chunk` done; what it skipped is kept with it, so a rerun that skips the chunk still reports it."""
    done[str(chunk.index)] = {"fingerprint": mark, "captions": len(chunk.captions), "rows": outcome.new_rows,
                              "skipped": outcome.skipped, "skipped_rows": outcome.skipped_rows,
                              "refused": outcome.refused}
    atomic_write_json(layout.progress(rank), {"chunks": done})


def shard_rows(path: Path) -> int:
    manifest = read_manifest(path)
    return int(manifest.get("rows", 0)) if manifest else 0


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
        "GenerateEditInstructions": {"captions": "\n".join(chunk.captions)},
        "P2PPairGenerator": {"seed": chunk.seed},
        "SaveEditDataset": {"dataset_name": shard_name},
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


@dataclass
class ChunkOutcome:
    complete: bool  # every caption got a usable or a final LLM answer: recorded as done
    new_rows: int = 0
    fetched: int = 0
    cached: int = 0
    unanswered: int = 0  # captions without a usable answer for a reason a rerun can fix: asked again then
    refused: int = 0  # rows a later node refused and skipped (a rerun refuses them again)
    skipped: dict[str, int] = field(default_factory=dict)  # every skipped row, by reason
    skipped_rows: list[list[str]] = field(default_factory=list)  # [node, caption, reason]
    note: str = ""


@dataclass
class RankStatus:
    rank: int
    ok: bool = True
    error: str = ""
    captions: int = 0
    chunks: int = 0
    skipped: int = 0  # chunks already done by an earlier run
    incomplete: int = 0  # chunks not recorded as done: run with unanswered captions, or not run at all
    new_rows: int = 0
    shard_rows: int = 0
    fetched: int = 0
    cached: int = 0
    unanswered: int = 0
    refused: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    skipped_rows: list[list[str]] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def add_skips(self, counts: Mapping[str, int], rows: Sequence[Sequence[str]], refused: int) -> None:
        for reason, count in counts.items():
            self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + int(count)
        self.skipped_rows += [list(row) for row in rows]
        self.refused += int(refused)


def node_stats(outputs: Mapping[str, Any], node_id: str, kind: str) -> dict[str, Any]:
    """A node's counts from its ui output (`ip2p_stats`): data, so no rewording of a message can break it."""
    found = outputs.get(node_id, {}).get(STATS_KEY) or []
    if not found or not isinstance(found[0], dict):
        raise BuildError(f"the workflow's {kind} node reported no counts ({STATS_KEY}): use this pack's {kind} "
                         "node, or update the pack")
    return found[0]


def merge_counts(*counts: Mapping[str, int]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for table in counts:
        for reason, count in table.items():
            merged[reason] = merged.get(reason, 0) + int(count)
    return merged


def outcome_of(llm: Mapping[str, Any], p2p: Mapping[str, Any], new_rows: int, note: str = "") -> ChunkOutcome:
    """A chunk's outcome from the LLM and P2P nodes' counts.

    Captions the LLM could not answer usably (transport or format) keep the chunk from being recorded as done.
    """
    unanswered = int(llm.get("unanswered", 0)) + int(llm.get("cancelled", 0))
    rows = [[LLM, caption, reason] for caption, reason in llm.get("skipped_captions", [])]
    rows += [[P2P, caption, reason] for caption, reason in p2p.get("skipped_rows", [])]
    reasons = "; ".join(llm.get("reasons", [])[:3])
    return ChunkOutcome(complete=unanswered == 0, new_rows=new_rows, fetched=int(llm.get("fetched", 0)),
                        cached=int(llm.get("cached", 0)), unanswered=unanswered,
                        refused=sum(int(c) for c in p2p.get("skipped", {}).values()),
                        skipped=merge_counts(llm.get("skipped", {}), p2p.get("skipped", {})), skipped_rows=rows,
                        note="; ".join(part for part in (note, reasons) if part))


def skipped_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items(), key=lambda kv: -kv[1]))


def progress_printer(tag: str, prompt: Mapping[str, dict]):
    last = [time.monotonic()]

    def on_event(event: str, data: Any) -> None:
        if event == "progress" and time.monotonic() - last[0] > PROGRESS_EVERY_S:
            last[0] = time.monotonic()
            node = prompt.get(str(data.get("node")), {}).get("class_type", "progress")
            print(f"{tag}   {node}: {data['value']}/{data['max']}", flush=True)

    return on_event


def run_chunk(prompt: dict, ids: Mapping[str, str], tag: str, shard: Path) -> ChunkOutcome:
    from . import runtime

    before = shard_rows(shard)
    result = runtime.run_prompt(prompt, on_event=progress_printer(tag, prompt))
    if not result.ok:
        raise BuildError(runtime.format_error(result))
    llm = node_stats(result.outputs, ids[LLM], LLM)
    p2p = node_stats(result.outputs, ids[P2P], P2P)
    clip = "\n".join(result.outputs.get(ids["CLIPDirectionFilter"], {}).get("text", []))
    # Rows added, from the shard's manifest: a count the writer keeps, not the Save node's wording.
    return outcome_of(llm, p2p, shard_rows(shard) - before, clip.split("\n", 1)[0])


def build_shard(args: argparse.Namespace, captions: Sequence[str], world: World, layout: Layout,
                status: RankStatus) -> None:
    """Runs this rank's chunks into its shard; fills `status` as it goes (it is reported even on failure)."""
    base = load_prompt(args.workflow)
    ids = node_ids(base)
    set_inputs(base, ids, overrides_from(with_model_names(args)))
    p2p = base[ids["P2PPairGenerator"]]["inputs"]
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
        outcome = run_chunk(prompt, ids, world.tag, layout.shard(world.rank))
        count_chunk(status, outcome)
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


def count_chunk(status: RankStatus, outcome: ChunkOutcome) -> None:
    status.new_rows += outcome.new_rows
    status.fetched += outcome.fetched
    status.cached += outcome.cached
    status.unanswered += outcome.unanswered
    status.add_skips(outcome.skipped, outcome.skipped_rows, outcome.refused)


def chunk_line(tag: str, chunk: Chunk, total: int, outcome: ChunkOutcome, seconds: float) -> str:
    """The same counts, in the same words, as GenerateEditInstructions' own summary."""
    skipped = f", skipped by reason: {skipped_text(outcome.skipped)}" if outcome.skipped else ""
    again = f", {outcome.unanswered} captions to ask again" if outcome.unanswered else ""
    note = f"; {outcome.note}" if outcome.note else ""
    return (f"{tag} chunk {chunk.index + 1}/{total}: {len(chunk.captions)} captions, {outcome.new_rows} new rows, "
            f"LLM ({outcome.cached} cached, {outcome.fetched} fetched){again}{skipped}{note} ({seconds:.1f} s)")


def pick_device(world: World) -> None:
    """One GPU per local rank, when the machine has several (ComfyUI uses torch's current device)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())


def boot_comfy(base_dir: Path | None) -> Path:
    """ComfyUI in this process; returns its output folder. Ranks sharing a base folder may race to set it up."""
    from . import runtime

    if base_dir is not None:
        with contextlib.suppress(FileExistsError):  # another rank linked the pack into custom_nodes first
            runtime.prepare_base(base_dir.resolve())
    runtime.boot(base_dir)
    runtime.load_nodes()
    import folder_paths

    return Path(folder_paths.get_output_directory()).resolve()


# ---------------------------------------------------------------------------------------------------------
# Meeting at the end
# ---------------------------------------------------------------------------------------------------------


class SoloSync:
    def gather(self, status: dict) -> list[dict]:
        return [status]

    def close(self) -> None:
        pass


class TorchSync:
    """torch.distributed over gloo (CPU tensors only: the statuses are small, and no GPU memory is taken)."""

    def __init__(self, world: World, timeout: datetime.timedelta) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.world = world
        dist.init_process_group("gloo", rank=world.rank, world_size=world.size, timeout=timeout)

    def gather(self, status: dict) -> list[dict] | None:
        statuses: list[Any] = [None] * self.world.size
        self.dist.all_gather_object(statuses, status)
        return statuses if self.world.rank == 0 else None

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


class FileSync:
    """Status files in the shards folder (which must be shared); rank 0 waits for all of this run's."""

    def __init__(self, world: World, layout: Layout, run_id: str, timeout: datetime.timedelta) -> None:
        self.world, self.layout, self.run_id = world, layout, run_id
        self.timeout_s = timeout.total_seconds()
        layout.shards.mkdir(parents=True, exist_ok=True)
        # A status left by an earlier run must not count as this run's.
        layout.status(world.rank).unlink(missing_ok=True)

    def gather(self, status: dict) -> list[dict] | None:
        atomic_write_json(self.layout.status(self.world.rank), {**status, "run_id": self.run_id})
        if self.world.rank != 0:
            return None
        return wait_for_statuses(self.layout, self.world.size, self.run_id, self.timeout_s)

    def close(self) -> None:
        pass


def wait_for_statuses(layout: Layout, size: int, run_id: str, timeout_s: float, poll_s: float = POLL_S) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = {rank: read_json(layout.status(rank)) for rank in range(size)}
        ready = {rank: s for rank, s in found.items() if s.get("run_id") == run_id}
        if len(ready) == size:
            return [ready[rank] for rank in range(size)]
        if time.monotonic() >= deadline:
            missing = sorted(set(range(size)) - set(ready))
            raise BuildError(f"ranks {missing} did not report within {timeout_s:.0f} s (run id {run_id!r}): "
                             "check their logs, then rerun every rank to continue where they stopped")
        time.sleep(poll_s)


def make_sync(world: World, layout: Layout, args: argparse.Namespace, env: Mapping[str, str]):
    timeout = datetime.timedelta(hours=args.sync_timeout_h)
    if world.size == 1:
        return SoloSync()
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return TorchSync(world, timeout)
    run_id = args.run_id or next((env[v] for v in RUN_ID_VARIABLES if env.get(v)), "")
    if not run_id:
        raise BuildError("WORLD_SIZE > 1 without MASTER_ADDR/MASTER_PORT: give every rank the same --run-id (or "
                         "launch with torchrun / accelerate launch)")
    return FileSync(world, layout, run_id, timeout)


# ---------------------------------------------------------------------------------------------------------
# Merging (rank 0)
# ---------------------------------------------------------------------------------------------------------


def check_shards_visible(layout: Layout, statuses: Sequence[dict]) -> None:
    for status in statuses:
        rank, expected = status["rank"], status.get("shard_rows", 0)
        if expected and shard_rows(layout.shard(rank)) < expected:
            raise BuildError(
                f"rank {rank} saved {expected} rows in {layout.shard(rank)}, but rank 0 sees "
                f"{shard_rows(layout.shard(rank))} there: across machines, ComfyUI's output folder must be one "
                "shared filesystem (--base-dir on it)")


def merge_shards(layout: Layout, size: int, fmt: str, image_format: str | None) -> tuple[int, int]:
    """Every shard's rows into the merged dataset, each (group, sample) once: (rows added, rows in total)."""
    options = {"image_format": image_format} if image_format else {}
    with open_writer(layout.output, layout.name, fmt, **options) as writer:
        added = 0
        for rank in range(size):
            shard = layout.shard(rank)
            if read_manifest(shard) is not None:
                added += writer.extend(iter_rows(shard, fmt))
    return added, len(writer)


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
        os.environ[EMPTY_OK_ENV] = "1"
        pick_device(world)
        layout = Layout(boot_comfy(args.base_dir), args.name)
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
