"""The processes of one launch meet at the end of a long job: each hands in a small status (a JSON-able dict) and
rank 0 gets them all.

- one process: SoloSync, nothing to wait for;
- the launcher set MASTER_ADDR / MASTER_PORT (torchrun, accelerate launch): TorchSync, a gloo process group
  (training/distributed.py init_world; CPU tensors only, so no GPU memory is taken);
- otherwise: FileSync, status files in a folder every process sees, tagged with a run id shared by the ranks of
  one launch (a status left by an earlier run never counts).

Used by cli/build_dataset.py. No ComfyUI import here.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ..dataset.paths import atomic_write_json
from ..dataset.sharding import read_json
from .distributed import World, close_world, init_world

POLL_S = 2.0
# Job ids that launchers and schedulers put in every process's environment: the run id of FileSync by default.
RUN_ID_VARIABLES = ("IP2P_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")


class RendezvousError(RuntimeError):
    """The processes could not meet; the message says which are missing or what is needed."""


class Sync(Protocol):
    def gather(self, status: dict) -> list[dict] | None:
        """Every process's status on rank 0, in rank order; None on the other ranks."""

    def close(self) -> None: ...


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
        self.world = init_world(world, use_cuda=False, timeout=timeout)

    def gather(self, status: dict) -> list[dict] | None:
        statuses: list[Any] = [None] * self.world.size
        self.dist.all_gather_object(statuses, status)
        return statuses if self.world.rank == 0 else None

    def close(self) -> None:
        close_world(self.world)


class FileSync:
    """Status files (status_path(rank), in a folder every process sees); rank 0 waits for all of this run's."""

    def __init__(self, world: World, status_path: Callable[[int], Path], run_id: str,
                 timeout: datetime.timedelta) -> None:
        self.world, self.status_path, self.run_id = world, status_path, run_id
        self.timeout_s = timeout.total_seconds()
        own = status_path(world.rank)
        own.parent.mkdir(parents=True, exist_ok=True)
        # A status left by an earlier run must not count as this run's.
        own.unlink(missing_ok=True)

    def gather(self, status: dict) -> list[dict] | None:
        atomic_write_json(self.status_path(self.world.rank), {**status, "run_id": self.run_id})
        if self.world.rank != 0:
            return None
        return wait_for_statuses(self.status_path, self.world.size, self.run_id, self.timeout_s)

    def close(self) -> None:
        pass


def wait_for_statuses(status_path: Callable[[int], Path], size: int, run_id: str, timeout_s: float,
                      poll_s: float = POLL_S) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = {rank: read_json(status_path(rank)) for rank in range(size)}
        ready = {rank: s for rank, s in found.items() if s.get("run_id") == run_id}
        if len(ready) == size:
            return [ready[rank] for rank in range(size)]
        if time.monotonic() >= deadline:
            missing = sorted(set(range(size)) - set(ready))
            raise RendezvousError(f"ranks {missing} did not report within {timeout_s:.0f} s (run id {run_id!r}): "
                                  "check their logs, then rerun every rank to continue where they stopped")
        time.sleep(poll_s)


def launcher_run_id(env: Mapping[str, str]) -> str:
    """The job id the launcher or scheduler gave every process of this launch ("" when none)."""
    return next((env[v] for v in RUN_ID_VARIABLES if env.get(v)), "")


def rendezvous(world: World, env: Mapping[str, str], status_path: Callable[[int], Path], run_id: str,
               timeout: datetime.timedelta) -> Sync:
    """How this launch's processes meet: alone, through the launcher's process group, or through status files."""
    if world.size == 1:
        return SoloSync()
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return TorchSync(world, timeout)
    if not run_id:
        raise RendezvousError("WORLD_SIZE > 1 without MASTER_ADDR/MASTER_PORT and without a run id shared by "
                              "every rank")
    return FileSync(world, status_path, run_id, timeout)
