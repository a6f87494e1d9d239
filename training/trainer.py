"""The InstructPix2Pix trainer, shared by the TrainIP2P node and the command line. Pure torch.

It trains any `unet(x, t, context)` whose input x is the noised target latent concatenated with the raw
input-image latent, on batches from `training.data`: noise (or v) prediction MSE (optionally weighted by the
rows' masks), the paper's conditioning dropout, AdamW with a constant learning rate, gradient accumulation and
clipping, EMA, optional gradient checkpointing and autocast, data-parallel through DistributedDataParallel or
sharded through FSDP2 (`fully_shard`, config.parallel "fsdp"), and a resumable state in which every random number
generator and the data order are captured at a step boundary. The saved weights and state are whole tensors in
both cases (an FSDP run gathers its shards), so either kind of run, or one process, resumes the other's.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import TrainConfig, resume_mismatches
from .data import Batch, PixelBatches
from .distributed import World
from .dropout import apply_dropout, dropout_masks
from .ema import EMA
from .objective import NoiseSchedule, weighted_mse
from .parallel import data_parallel, fully_sharded, gathered, local_shard, shard_of
from .precision import autocast_dtype as precision_dtype

# 2: the data order is (epoch, position), regenerated from the seed (1 stored a permutation drawn from the step's
# generator).
STATE_VERSION = 2

log = logging.getLogger("comfyui_ip2p.training")


@dataclass
class TrainableModel:
    """What the trainer trains. `params` are the weights the optimizer updates (all UNet weights for a full
    fine-tune, the adapter weights for LoRA), named as they are saved."""

    unet: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    schedule: NoiseSchedule
    latent_scale: float
    checkpoint_blocks: list[torch.nn.Module] = field(default_factory=list)


@dataclass
class Hooks:
    on_step: Callable[[Trainer, float], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_checkpoint: Callable[[Trainer], None] | None = None
    on_validation: Callable[[Trainer], None] | None = None


@dataclass
class Draws:
    """Every random number of one micro-batch, drawn for the global batch in a fixed order."""

    indices: list[int]
    uniforms: torch.Tensor  # [N, 3]: crop top, crop left, flip
    dropout: torch.Tensor  # [N]
    timesteps: torch.Tensor  # [N]
    noise: torch.Tensor  # [N, C, h, w]

    def part(self, start: int, stop: int) -> Draws:
        return Draws(self.indices[start:stop], self.uniforms[start:stop], self.dropout[start:stop],
                     self.timesteps[start:stop], self.noise[start:stop])


class DataOrder:
    """Epoch after epoch of seeded permutations of the rows; a batch may straddle two epochs.

    The state is two integers, (epoch, position): epoch e's permutation is regenerated from (seed, e) by a
    generator of its own, so a resumed run continues the same epoch at the same place, and every row is drawn
    exactly once per epoch however the run was interrupted. Only the permutation of the current epoch is held
    (an int64 per row)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.epoch, self.position = 0, 0
        self._permutation: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._permutation is None or self._permutation[0] != epoch:
            digest = hashlib.blake2b(f"{self.seed}:{epoch}".encode(), digest_size=8).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest, "big") >> 1)
            self._permutation = (epoch, torch.randperm(self.size, generator=generator))
        return self._permutation[1]

    def take(self, count: int) -> list[int]:
        taken: list[int] = []
        while len(taken) < count:
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
            part = self.permutation(self.epoch)[self.position:self.position + count - len(taken)]
            taken += part.tolist()
            self.position += len(part)
        return taken

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.size:
            raise ValueError(f"the saved data order (epoch {epoch}, position {position}) does not fit a dataset of "
                             f"{self.size} rows")
        self.epoch, self.position = epoch, position


def check_state_version(state: dict) -> None:
    """Refuses a state this version cannot continue, saying what to do."""
    version = state.get("version")
    if version != STATE_VERSION:
        raise ValueError(f"the saved training state has version {version}, this trainer reads version "
                         f"{STATE_VERSION} (the data order is now kept as epoch + position), so it cannot be "
                         "continued; set resume off (or choose another checkpoint_name) to start the run over")


def enable_gradient_checkpointing(blocks: list[torch.nn.Module]) -> None:
    """Recomputes each block's activations in the backward pass instead of keeping them."""
    for block in blocks:
        if getattr(block, "_ip2p_checkpointed", False):
            continue
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
        block._ip2p_checkpointed = True


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused where PyTorch has a fused kernel for these parameters (CPU and CUDA float weights): one
    kernel instead of a loop over tensors, ~3x faster on CPU and without the temporaries of the foreach path."""
    options = {"lr": config.learning_rate, "betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_eps,
               "weight_decay": config.weight_decay}
    try:
        return torch.optim.AdamW(params, fused=True, **options)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, **options)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = plain fp32. "auto" is bf16 on GPUs and CPUs that compute it natively, else fp32."""
    device = torch.device(device)
    gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision_dtype(precision, device.type, gpu_auto=torch.bfloat16 if gpu_bf16 else None)


class Trainer:
    def __init__(self, config: TrainConfig, model: TrainableModel, batches: PixelBatches,
                 device: torch.device | str = "cpu", world: World | None = None, latent_channels: int = 4) -> None:
        self.config, self.model, self.batches = config, model, batches
        self.device = torch.device(device)
        self.world = world or World()
        self.latent_channels = latent_channels
        if not model.params:
            raise ValueError("nothing to train: the model has no trainable weights")
        self.generator = torch.Generator().manual_seed(config.seed)
        self.order = DataOrder(len(batches), config.seed)
        self.amp_dtype = autocast_dtype(config.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model.checkpoint_blocks)
        # Sharded: weights, gradients, AdamW state and EMA split over the processes (FSDP2).
        self.sharded = config.parallel == "fsdp" and self.world.active
        if config.parallel == "fsdp" and not self.sharded:
            log.info("parallel fsdp on one process: nothing to shard, the run trains the whole model here")
        if self.sharded:  # (config refuses fp16, whose gradient scaler is not wired for sharded gradients)
            model.params = fully_sharded(model.unet, model.checkpoint_blocks, model.params, self.world, self.device)
        self.param_list = list(model.params.values())
        self.optimizer = make_optimizer(self.param_list, config)
        # Before the EMA is made: DDP starts every process from rank 0's weights.
        self.ddp = data_parallel(model.unet, self.param_list, self.device) \
            if self.world.active and not self.sharded else None
        # Sharded, the EMA keeps this process's part of each weight.
        self.ema = EMA(self._local_params(), config.ema_decay) if config.uses_ema else None
        self.empty_context = batches.empty_context.to(self.device, torch.float32)
        self.step = 0
        self.losses: list[float] = []
        self.step_rows: list[int] = []  # the dataset rows this process trained on in the last step
        self.seconds = 0.0
        self._boundary = self._rng_state()

    # --- one step ---------------------------------------------------------------------------------------

    @property
    def samples_per_step(self) -> int:
        return self.config.batch_size * self.config.grad_accumulation * self.world.size

    def draw(self, count: int) -> Draws:
        side = self.config.resolution // 8
        gen = self.generator
        return Draws(
            indices=self.order.take(count),
            uniforms=torch.rand(count, 3, generator=gen),
            dropout=torch.rand(count, generator=gen),
            timesteps=torch.randint(0, self.model.schedule.num_timesteps, (count,), generator=gen),
            noise=torch.randn(count, self.latent_channels, side, side, generator=gen),
        )

    def loss(self, batch: Batch, draws: Draws) -> torch.Tensor:
        dev, schedule = self.device, self.model.schedule
        x0 = batch.target.to(dev, torch.float32) * self.model.latent_scale
        noise, t = draws.noise.to(dev), draws.timesteps.to(dev)
        drop_text, drop_image = dropout_masks(draws.dropout, self.config.dropout_prob)
        context, image = apply_dropout(batch.context.to(dev, torch.float32), batch.image.to(dev, torch.float32),
                                       self.empty_context, drop_text, drop_image)
        noisy = schedule.noisy(x0, noise, t)
        unet = self.ddp if self.ddp is not None else self.model.unet
        with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            prediction = unet(torch.cat([noisy, image], dim=1), t.float(), context)
        target = schedule.target(x0, noise, t).float()
        if self.config.masked_loss and batch.mask is not None:
            return weighted_mse(prediction.float(), target, batch.mask.to(dev, torch.float32),
                                self.config.outside_mask_weight)
        return F.mse_loss(prediction.float(), target)

    def train_step(self) -> float:
        cfg, world = self.config, self.world
        started = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64)
        # One draw for the whole step, sliced per micro-batch and process: any split of the same global batch
        # over accumulation and processes sees the same samples and random numbers.
        draws = self.draw(self.samples_per_step)
        rows: list[int] = []
        for micro in range(cfg.grad_accumulation):
            start = (micro * world.size + world.rank) * cfg.batch_size
            mine = draws.part(start, start + cfg.batch_size)
            rows += mine.indices
            # DDP all-reduces the gradients once per step, during the last micro-batch's backward pass; FSDP
            # reduce-scatters them then (keeping the earlier micro-batches' gradients and gathered weights whole).
            last = micro == cfg.grad_accumulation - 1
            if self.sharded and cfg.grad_accumulation > 1:
                self.model.unet.set_requires_gradient_sync(last)
                self.model.unet.set_reshard_after_backward(last)
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                loss = self.loss(self.batches.batch(mine.indices, mine.uniforms), mine) / cfg.grad_accumulation
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach().double().cpu()
        self._apply_gradients()
        self.step_rows = rows
        self.step += 1
        value = float(world.average(total))
        self.losses.append(value)
        self._boundary = self._rng_state()
        self.seconds += time.perf_counter() - started
        return value

    def _apply_gradients(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm > 0:
            # Sharded gradients (DTensors): the norm is the whole model's, reduced over the processes.
            torch.nn.utils.clip_grad_norm_(self.param_list, self.config.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self._local_params())

    # --- the loop -----------------------------------------------------------------------------------------

    def train(self, hooks: Hooks | None = None) -> bool:
        """Trains up to config.steps; False when `should_stop` ended it early (state is at a step boundary)."""
        hooks = hooks or Hooks()
        cfg = self.config
        self.model.unet.train()
        while self.step < cfg.steps:
            if hooks.should_stop is not None and hooks.should_stop():
                return False
            loss = self.train_step()
            if hooks.on_step is not None:
                hooks.on_step(self, loss)
            if cfg.validation_every and self.step % cfg.validation_every == 0 and hooks.on_validation:
                hooks.on_validation(self)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and hooks.on_checkpoint:
                hooks.on_checkpoint(self)
        return True

    # --- weights and state --------------------------------------------------------------------------------

    def _local_params(self) -> dict[str, torch.Tensor]:
        """The trained weights as this process holds them: whole, or its part of each when sharded."""
        return {name: local_shard(p.detach()) for name, p in self.model.params.items()}

    def _gathered(self, tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
        """Whole CPU tensors from this process's parts (named as the trained weights); a collective."""
        out = {}
        for name, p in self.model.params.items():
            whole = gathered(p, tensors[name], keep)
            if keep:
                out[name] = whole
        return out

    def weights(self, ema: bool = True, main_only: bool = False) -> dict[str, torch.Tensor]:
        """The weights to save: the EMA ones when asked for and kept, else the raw ones (detached views). Sharded,
        they are gathered whole onto the CPU of every process (of rank 0 only with `main_only`: the others get an
        empty dict): every process must call it."""
        local = self.ema.weights() if ema and self.ema is not None else self._local_params()
        if not self.sharded:
            return local
        return self._gathered(local, keep=self.world.is_main or not main_only)

    def _rng_state(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order.state_dict()}

    def _sharded_parts(self) -> tuple[dict, dict, dict | None]:
        """Parameters, optimizer state and EMA, gathered whole on rank 0 (the other processes take part and get
        empty dicts): the same tensors a one-process run saves."""
        keep = self.world.is_main
        params = self._gathered(self._local_params(), keep)
        optimizer = self.optimizer.state_dict()  # its per-weight dicts are the optimizer's own: not changed here
        optimizer["state"] = {
            index: {key: gathered(self.param_list[index], local_shard(value), keep)
                    if isinstance(value, torch.Tensor) and value.shape == self.param_list[index].shape else value
                    for key, value in per_param.items()}
            for index, per_param in optimizer["state"].items()}
        ema = None
        if self.ema is not None:
            ema = {"decay": self.ema.decay, "updates": self.ema.updates,
                   "shadow": self._gathered(self.ema.weights(), keep)}
        return params, optimizer, ema

    def state_dict(self) -> dict | None:
        """Everything a resumed run needs, as of the last completed step (even mid-step after an interrupt).
        Sharded, every process must call it; rank 0 gets the state (whole tensors), the others None."""
        if self.sharded:
            params, optimizer, ema = self._sharded_parts()
            if not self.world.is_main:
                return None
        else:
            params = {name: p.detach().cpu().clone() for name, p in self.model.params.items()}
            optimizer = self.optimizer.state_dict()
            ema = self.ema.state_dict() if self.ema is not None else None
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "config": self.config.to_dict(),
            "params": params,
            "optimizer": optimizer,
            "ema": ema,
            "rng": self._boundary,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "losses": list(self.losses),
            "seconds": self.seconds,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        check_state_version(state)
        mismatched = resume_mismatches(state["config"], self.config)
        if mismatched:
            details = ", ".join(f"{k}: saved {state['config'][k]!r}, now {getattr(self.config, k)!r}"
                                for k in mismatched)
            raise ValueError(f"the saved training state was made with other settings ({details}); "
                             "restore them, or start a new run under another name")
        missing = set(self.model.params) - set(state["params"])
        if missing:
            raise ValueError(f"the saved training state lacks {len(missing)} weights of this model "
                             f"(e.g. {min(missing)}): it belongs to another model or mode")
        optimizer, ema = state["optimizer"], state["ema"]
        if self.sharded:  # every process holds the whole saved tensors: each keeps its part of them
            for name, p in self.model.params.items():
                p.copy_(shard_of(state["params"][name], p))
            optimizer = {**optimizer, "state": {
                index: {key: shard_of(value, self.param_list[index])
                        if isinstance(value, torch.Tensor) and value.shape == self.param_list[index].shape else value
                        for key, value in per_param.items()}
                for index, per_param in optimizer["state"].items()}}
            if ema is not None:
                ema = {**ema, "shadow": {name: local_shard(shard_of(ema["shadow"][name], p))
                                         for name, p in self.model.params.items() if name in ema["shadow"]}}
        else:
            for name, p in self.model.params.items():
                p.copy_(state["params"][name])
        self.optimizer.load_state_dict(optimizer)
        if self.ema is not None and ema is not None:
            self.ema.load_state_dict(ema)
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["rng"]["generator"])
        self.order.load_state_dict(state["rng"]["order"])
        self.step, self.losses, self.seconds = state["step"], list(state["losses"]), state.get("seconds", 0.0)
        self._boundary = self._rng_state()
