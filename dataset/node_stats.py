"""What the dataset nodes report as data: their counts, beside the text they show on the canvas.

Each dataset node puts one dict of counts under the ui key STATS_KEY of its output (ComfyUI keeps it in the
prompt's history and hands it to in-process runners). Readers such as the headless builder (cli/build_dataset.py)
take every count and decision from these dicts, never from the nodes' wording, so a reworded message breaks
nothing:

- GenerateEditInstructions: InstructionStats.as_dict() (dataset/instructions.py). With no usable row at all it
  raises NoUsableInstructionsError instead, which carries the same dict as `stats`.
- P2PPairGenerator: {"pairs", "rows", "skipped": {label: count}, "skipped_rows": [[caption, reason], ...]}
  (pipeline/p2p.py PairResult.stats).
- CLIPDirectionFilter: clip_filter_stats below.
- SaveEditDataset: save_stats below.

Plain JSON values only. No ComfyUI import here.
"""

from __future__ import annotations

from typing import Any

STATS_KEY = "ip2p_stats"


def clip_filter_stats(pairs: int, kept: int, caption_pairs: int) -> dict[str, Any]:
    """CLIPDirectionFilter: image pairs in, pairs kept, caption pairs (groups) they came from."""
    return {"pairs": pairs, "kept": kept, "caption_pairs": caption_pairs}


def save_stats(path: str, fmt: str, new_rows: int, total: int) -> dict[str, Any]:
    """SaveEditDataset: the dataset (relative to the output folder), its format, rows added by this run, rows in
    the dataset now."""
    return {"path": path, "format": fmt, "new_rows": new_rows, "total": total}

