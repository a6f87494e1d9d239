"""The InstructPix2Pix trainer, shared by the TrainIP2P node and the command line. Pure torch.

It trains any `unet(x, t, context)` whose input x is the noised target latent concatenated with the raw
input-image latent, on batches from `training.data`: noise (or v) prediction MSE, the paper's conditioning
dropout, AdamW with a constant learning rate, gradient accumulation and clipping, EMA, optional gradient
checkpointing and autocast, data-parallel over torch.distributed, and a resumable state in which every
random number generator is captured at a step boundary.
"""

from __future__ import annotations

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
from .objective import NoiseSchedule
from .precision import autocast_dtype as precision_dtype

STATE_VERSION = 1


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
    """Epoch after epoch of seeded permutations; a batch may straddle two epochs."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size, self.generator = size, generator
        self.order: torch.Tensor | None = None
        self.cursor = 0

    def take(self, count: int) -> list[int]:
        taken: list[int] = []
        while len(taken) < count:
            if self.order is None or self.cursor >= self.size:
                self.order = torch.randperm(self.size, generator=self.generator)
                self.cursor = 0
            part = self.order[self.cursor:self.cursor + count - len(taken)]
            taken += part.tolist()
            self.cursor += len(part)
        return taken

    def state_dict(self) -> dict:
        return {"order": self.order, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.cursor = state["order"], state["cursor"]


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
        self.param_list = list(model.params.values())
        if not self.param_list:
            raise ValueError("nothing to train: the model has no trainable weights")
        self.generator = torch.Generator().manual_seed(config.seed)
        self.order = DataOrder(len(batches), self.generator)
        self.optimizer = make_optimizer(self.param_list, config)
        self.amp_dtype = autocast_dtype(config.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model.checkpoint_blocks)
        self.world.broadcast_parameters(self.param_list)
        self.ema = EMA(model.params, config.ema_decay) if config.uses_ema else None
        self.empty_context = batches.empty_context.to(self.device, torch.float32)
        self.step = 0
        self.losses: list[float] = []
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
        with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            prediction = self.model.unet(torch.cat([noisy, image], dim=1), t.float(), context)
        return F.mse_loss(prediction.float(), schedule.target(x0, noise, t).float())

    def train_step(self) -> float:
        cfg, world = self.config, self.world
        started = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64)
        # One draw for the whole step, sliced per micro-batch and process: any split of the same global batch
        # over accumulation and processes sees the same samples and random numbers.
        draws = self.draw(self.samples_per_step)
        for micro in range(cfg.grad_accumulation):
            start = (micro * world.size + world.rank) * cfg.batch_size
            mine = draws.part(start, start + cfg.batch_size)
            loss = self.loss(self.batches.batch(mine.indices, mine.uniforms), mine) / cfg.grad_accumulation
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach().double().cpu()
        world.average_gradients(self.param_list)
        self._apply_gradients()
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
            torch.nn.utils.clip_grad_norm_(self.param_list, self.config.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model.params)

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

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        """The weights to save: the EMA ones when asked for and kept, else the raw ones (detached views)."""
        if ema and self.ema is not None:
            return self.ema.weights()
        return {name: p.detach() for name, p in self.model.params.items()}

    def _rng_state(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order.state_dict()}

    def state_dict(self) -> dict:
        """Everything a resumed run needs, as of the last completed step (even mid-step after an interrupt)."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "config": self.config.to_dict(),
            "params": {name: p.detach().cpu().clone() for name, p in self.model.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": self._boundary,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "losses": list(self.losses),
            "seconds": self.seconds,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"training state version {state.get('version')} is not {STATE_VERSION}")
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
        for name, p in self.model.params.items():
            p.copy_(state["params"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["rng"]["generator"])
        self.order.load_state_dict(state["rng"]["order"])
        self.step, self.losses, self.seconds = state["step"], list(state["losses"]), state.get("seconds", 0.0)
        self._boundary = self._rng_state()
