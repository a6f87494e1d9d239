"""Sharding a dataset build over processes: the plan, the shard folders, the per-chunk records and the merge.

Rank k of W takes captions[k::W] (rank_share), in chunks (plan_chunks); chunk c of rank k is chunk c*W + k
overall and its samples get seed + (c*W + k) * chunk_size * samples_per_pair + n, so no two samples anywhere start
from the same noise. Each rank writes its own shard, `<name>.shards/rank-<k>` (Layout); a chunk is recorded as done
with a fingerprint of its settings (record_chunk) once its rows are saved and no caption is left to ask again, so
a rerun skips it. The counts of a chunk come from the nodes' counts as data (dataset/node_stats.py; outcome_of),
those of a rank add up in RankStatus, and rank 0 merges every shard into `<name>` with the dataset writer
(merge_shards): each (group, sample) exactly once, so merging again adds nothing.

Pure data code, no ComfyUI import: cli/build_dataset.py runs the chunks through ComfyUI; training/rendezvous.py
lets the ranks meet at the end.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..algorithms.seeds import row_seed
from .formats import iter_rows, open_writer
from .paths import atomic_write_json, resolve_inside
from .writer import read_manifest

# Images of a whole chunk are held in memory between the nodes: about this many samples per chunk.
SAMPLES_PER_CHUNK = 256
# Per-sample seeds stay inside a signed 64-bit integer (the P2P node's limit and the dataset's int64 column).
LLM, P2P = "GenerateEditInstructions", "P2PPairGenerator"
# Inputs that change where requests go or how fast a chunk runs, never which rows it makes.
NOT_FINGERPRINTED = {
    ("GenerateEditInstructions", "base_url"), ("GenerateEditInstructions", "api_key_env"),
    ("GenerateEditInstructions", "api_key_file"), ("GenerateEditInstructions", "concurrency"),
    ("GenerateEditInstructions", "cache"), ("P2PPairGenerator", "batch_size"), ("CLIPDirectionFilter", "batch_size"),
}


class BuildError(RuntimeError):
    """A failure the user can act on; the message says what to do."""


class Place(Protocol):
    """A process's place among those of one launch (training.distributed.World is one)."""

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...


# ---------------------------------------------------------------------------------------------------------
# Shares and chunks
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    index: int  # within this rank
    captions: tuple[str, ...]
    seed: int  # the P2P seed of its first sample


def rank_share(captions: Sequence[str], world: Place) -> list[str]:
    """This rank's captions: every W-th one, so appending captions later leaves earlier shares unchanged."""
    return list(captions[world.rank::world.size])


def chunk_size_for(requested: int, samples_per_pair: int) -> int:
    return requested if requested > 0 else max(1, SAMPLES_PER_CHUNK // max(samples_per_pair, 1))


def plan_chunks(share: Sequence[str], world: Place, chunk_size: int, samples_per_pair: int,
                seed: int) -> list[Chunk]:
    """Chunks of this rank's share; chunk c is chunk c*W + rank overall and owns the seeds of that slot."""
    chunks = []
    for index, start in enumerate(range(0, len(share), chunk_size)):
        overall = index * world.size + world.rank
        first_seed = row_seed(seed, overall * chunk_size * samples_per_pair)
        chunks.append(Chunk(index, tuple(share[start:start + chunk_size]), first_seed))
    return chunks


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
    """The JSON object in `path`; {} when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def check_plan(layout: Layout, world: Place, chunk_size: int, fmt: str) -> None:
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


def shard_rows(path: Path) -> int:
    manifest = read_manifest(path)
    return int(manifest.get("rows", 0)) if manifest else 0


# ---------------------------------------------------------------------------------------------------------
# Counts: a chunk's outcome, a rank's status
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


def merge_counts(*counts: Mapping[str, int]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for table in counts:
        for reason, count in table.items():
            merged[reason] = merged.get(reason, 0) + int(count)
    return merged


def outcome_of(llm: Mapping[str, Any], p2p: Mapping[str, Any], new_rows: int, note: str = "") -> ChunkOutcome:
    """A chunk's outcome from the LLM and P2P nodes' counts (dataset/node_stats.py) and the rows it added.

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


def record_chunk(layout: Layout, rank: int, done: dict[str, Any], chunk: Chunk, mark: str,
                 outcome: ChunkOutcome) -> None:
    """Marks `chunk` done; what it skipped is kept with it, so a rerun that skips the chunk still reports it."""
    done[str(chunk.index)] = {"fingerprint": mark, "captions": len(chunk.captions), "rows": outcome.new_rows,
                              "skipped": outcome.skipped, "skipped_rows": outcome.skipped_rows,
                              "refused": outcome.refused}
    atomic_write_json(layout.progress(rank), {"chunks": done})


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

    def add(self, outcome: ChunkOutcome) -> None:
        """The counts of a chunk run now."""
        self.new_rows += outcome.new_rows
        self.fetched += outcome.fetched
        self.cached += outcome.cached
        self.unanswered += outcome.unanswered
        self.add_skips(outcome.skipped, outcome.skipped_rows, outcome.refused)


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
