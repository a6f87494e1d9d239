"""Data-parallel training over torch.distributed (torchrun or `accelerate launch` set the environment).

Every process draws the same random numbers for the whole global batch and trains on its own slice of it (so
across processes each row is trained once per epoch); the trainer wraps the trained weights in PyTorch's
DistributedDataParallel (training/parallel.py `data_parallel`), which averages the gradients in buckets while the
backward pass runs, before clipping, so every process takes the same optimizer step and the run equals a single
process with the same global batch (up to float summation order). With config.parallel "fsdp" the trainer shards
a full fine-tune's weights, gradients and AdamW state over the processes instead (FSDP2, training/parallel.py
`fully_sharded`), with the same data split. Only rank 0 writes files. DeepSpeed is not wired (docs/distributed.md).

Also the one place for what every command launched on several processes needs: the process's place (World,
launched_world), its GPU (pick_device) and the process group (init_world, close_world), used by cli/train.py
and, through training/rendezvous.py, by cli/build_dataset.py.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

# How long a collective waits for the slowest process before it fails.
GROUP_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def tag(self) -> str:
        return f"[rank {self.rank}/{self.size}]"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @torch.no_grad()
    def average(self, value: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return value
        device = value.device
        # NCCL reduces only GPU tensors.
        value = value.to("cuda") if dist.get_backend() == "nccl" else value.clone()
        dist.all_reduce(value)
        return (value / self.size).to(device)


def launched_world(env: Mapping[str, str] | None = None) -> World:
    """The process's place as torchrun / accelerate describe it in the environment (1 process if unset)."""
    env = os.environ if env is None else env
    try:
        world = World(rank=int(env.get("RANK", "0")), size=int(env.get("WORLD_SIZE", "1")),
                      local_rank=int(env.get("LOCAL_RANK", "0")))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (the launcher sets them)") from None
    if world.size < 1 or not 0 <= world.rank < world.size:
        raise ValueError(f"RANK {world.rank} is outside WORLD_SIZE {world.size}")
    return world


def pick_device(world: World) -> bool:
    """True when CUDA is available; on a machine with several GPUs each process takes the one of its local rank
    (ComfyUI and torch then use the current device)."""
    use_cuda = torch.cuda.is_available()
    if use_cuda and torch.cuda.device_count() > 1:
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
    return use_cuda


def init_world(world: World, use_cuda: bool, timeout: datetime.timedelta = GROUP_TIMEOUT) -> World:
    """Joins the process group (NCCL on GPUs, gloo on CPUs) when more than one process was launched; the launcher's
    MASTER_ADDR / MASTER_PORT say where the processes meet."""
    if world.size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size, timeout=timeout)
    return world


def close_world(world: World) -> None:
    if world.active:
        dist.destroy_process_group()
