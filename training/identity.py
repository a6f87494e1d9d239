"""Whose files a training run may replace, and which saved state it may resume. Pure torch and files.

- Ownership: a run of a name has a run id, kept in `<run folder>/run.json` and in the safetensors metadata of every
  model file it writes. A model file is the run's own only when the two agree; a file the user put there (or
  downloaded, even one trained by this pack elsewhere) has no matching run.json beside it, so it is never replaced.
- Resume: the resumable state records a fingerprint of the model the run started from and of its dataset; a
  state resumes only when the connected model and dataset give the same fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..dataset.records import EditRow

RUN_ID_KEY = "comfyui_ip2p.run_id"
# Values sampled per weight tensor for a fingerprint.
FINGERPRINT_SAMPLES = 1024
# Dataset rows whose texts go into the dataset fingerprint.
FINGERPRINT_ROWS = 8
RESUME_FIX = "choose another checkpoint_name, or set resume off to start it over (its files are then replaced)"


@dataclass
class RunIdentity:
    """Who writes a run's files (`run_id`, kept for the life of a name) and from what (`fingerprint`: the model
    and dataset a resumed run must be given again)."""

    run_id: str
    fingerprint: dict[str, str] = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        """What goes into the model file's safetensors metadata."""
        return {RUN_ID_KEY: self.run_id}

    def record(self) -> bytes:
        """The contents of run.json."""
        return json.dumps({"run_id": self.run_id}).encode("utf-8")


def recorded_run_id(record: Path) -> str | None:
    """The run id in a run.json; None when it is absent or unreadable."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        value = json.loads(record.read_text(encoding="utf-8")).get("run_id")
        return value if isinstance(value, str) and value else None
    return None


def model_file_run_id(path: Path) -> str | None:
    """The run id in a safetensors file's header; None for any other file (only the header is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return (handle.metadata() or {}).get(RUN_ID_KEY)
    except Exception:  # not a safetensors file (or not a file at all): certainly not ours
        return None


def claim_run(model: Path, record: Path) -> RunIdentity:
    """The identity of the run that writes `model`; refuses a model file that exists and is not its own output.

    Refused rather than written under a new numbered name (as SaveImage does): the name is how a run is resumed
    and how its result is loaded back (LoadIP2PModel, LoraLoader, the node's checkpoint_name output), so a
    silently renamed result would be found by nobody, and every queue of a shared workflow would add another
    multi-gigabyte file. The user decides: another name, or the file moved away.
    """
    recorded = recorded_run_id(record)
    if os.path.lexists(model) and (recorded is None or model_file_run_id(model) != recorded):
        raise ValueError(f"{model} already exists and was not written by this training run; choose another "
                         "checkpoint_name, or move or delete that file")
    return RunIdentity(recorded or uuid.uuid4().hex)


def weights_fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """Names, shapes and an evenly strided sample of every tensor.

    A different checkpoint, model family or merged LoRA (a dense change of whole projections) changes it, and
    it costs O(number of tensors): a few milliseconds even for SD1.5, where hashing every weight would read
    gigabytes at every start.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(weights):
        tensor = weights[name]
        flat = tensor.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES]
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()


def dataset_fingerprint(path: str | os.PathLike, rows: Sequence[EditRow]) -> str:
    """Where the dataset is, how many rows it has, what its first rows say and, for a lazy source
    (dataset.source.RowSource), its files' names, sizes and times (`fingerprint()`, which reads no image)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([os.path.realpath(path), len(rows)]).encode())
    files = getattr(rows, "fingerprint", None)
    if callable(files):
        digest.update(str(files()).encode())
    for index in range(min(FINGERPRINT_ROWS, len(rows))):
        row = rows[index]
        digest.update(json.dumps([row.input_caption, row.instruction, row.output_caption]).encode())
    return digest.hexdigest()


def check_resumable(state: dict, identity: RunIdentity, state_path: Path) -> None:
    """A saved state resumes only with the model and dataset it was trained from; refused, never resumed blindly."""
    saved = state.get("fingerprint")
    run = repr(state_path.parent.name)
    if not isinstance(saved, dict):
        raise ValueError(f"the saved run {run} ({state_path}) does not record which model and dataset it was "
                         f"trained from (saved by an older version), so it cannot be resumed; {RESUME_FIX}")
    differs = [part for part in ("model", "dataset") if saved.get(part) != identity.fingerprint.get(part)]
    if differs:
        raise ValueError(f"the saved run {run} ({state_path}) was trained from a different {' and '.join(differs)} "
                         f"than the one connected now; {RESUME_FIX}")
