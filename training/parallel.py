"""How the trained weights meet several processes: DistributedDataParallel around exactly the trained weights
(`data_parallel`), or FSDP2 sharding of a full fine-tune (`fully_sharded`) with the helpers that gather whole
tensors for saving and split them again on resume. Used by training/trainer.py; pure torch."""

from __future__ import annotations

import torch

from .distributed import World


class TrainedWeights(torch.nn.Module):
    """The trained weights as one module around the UNet, for DistributedDataParallel: its parameters are exactly
    the trained ones (all UNet weights, or LoRA adapters that are not submodules of the UNet: ComfyUI applies them
    as weight functions), so DDP broadcasts and reduces those and nothing else; calling it calls the UNet."""

    def __init__(self, unet: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self.trained = torch.nn.ParameterList(params)
        self._unet = [unet]  # a list, so the UNet's frozen weights are not registered (nor broadcast)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self._unet[0](x, t, context)


def data_parallel(unet: torch.nn.Module, params: list[torch.nn.Parameter], device: torch.device):
    """DistributedDataParallel over the trained weights: gradients all-reduced (averaged) in buckets while the
    backward pass still runs; rank 0's weights are broadcast to every process when it is built."""
    from torch.nn.parallel import DistributedDataParallel

    module = TrainedWeights(unet, params)
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)  # the module has no buffers to sync


def fully_sharded(unet: torch.nn.Module, blocks: list[torch.nn.Module], params: dict[str, torch.nn.Parameter],
                  world: World, device: torch.device) -> dict[str, torch.nn.Parameter]:
    """FSDP2 over the UNet: each block (the layers it calls one by one) is a unit of its own, the UNet the root
    (its remaining weights: time embedding, first and last layers). Every weight, its gradient and the AdamW state
    built on it are then split over the processes along their first dimension; a block's weights are gathered for
    its forward and backward pass only, and the gradients reduce-scattered (averaged) during the backward pass.

    fully_shard replaces every parameter by a DTensor one: the returned dict holds those, under the same names.
    Only a full fine-tune can be sharded: every UNet weight must be one of `params` and the other way round."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    owners: dict[int, tuple[torch.nn.Module, str]] = {}
    for module in unet.modules():
        for attribute, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), (module, attribute))
    trained = {id(p) for p in params.values()}
    frozen = [name for name, p in unet.named_parameters() if id(p) not in trained]
    outside = [name for name, p in params.items() if id(p) not in owners]
    if frozen or outside:
        raise ValueError("parallel fsdp shards a full fine-tune: every UNet weight must train and every trained "
                         f"weight be the UNet's (e.g. {(frozen or outside)[0]} is not); use parallel ddp")
    with torch.no_grad():  # as DDP does: every process starts from rank 0's weights
        for param in params.values():
            dist.broadcast(param.data, 0)
    mesh = init_device_mesh(device.type, (world.size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(unet, mesh=mesh)
    return {name: getattr(*owners[id(p)]) for name, p in params.items()}


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded (DTensor) tensor, sharing its storage; a plain tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def gathered(like: torch.nn.Parameter, local: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """The whole tensor, on the CPU, of `local` sharded as `like` (a DTensor parameter) is; every process must
    call it (an all-gather), those without `keep` get None (one tensor at a time in flight)."""
    from torch.distributed.tensor import DTensor

    whole = DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                               stride=like.stride()).full_tensor()
    return whole.cpu() if keep else None


def shard_of(whole: torch.Tensor, like: torch.nn.Parameter) -> torch.Tensor:
    """This process's part of a whole tensor, as `like` (a DTensor parameter) is sharded: a DTensor."""
    from torch.distributed.tensor import distribute_tensor

    # Every process holds the whole tensor (the state file is read by all): each takes its part, no scatter.
    return distribute_tensor(whole.to(local_shard(like).device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)
