"""The trainer's behaviour on a toy UNet and toy encoders: learning, dropout as the UNet sees it, EMA,
reproducibility, accumulation, resume (also from an interrupted step), gradient checkpointing, and
data-parallel processes against one process."""

from __future__ import annotations

import io
import os
import socket
import statistics

import pytest
import torch
import torch.multiprocessing as mp
from comfyui_ip2p.testing.synthetic import (
    ToyUNet,
    invert_rows,
    scaled_linear_alphas_cumprod,
    toy_encode_images,
    toy_encode_texts,
)
from comfyui_ip2p.testing.threads import torch_threads
from comfyui_ip2p.training.config import TrainConfig
from comfyui_ip2p.training.data import Encoders, make_batches
from comfyui_ip2p.training.distributed import World
from comfyui_ip2p.training.objective import NoiseSchedule
from comfyui_ip2p.training.trainer import Hooks, TrainableModel, Trainer

ROWS = invert_rows(12, size=16, seed=0)
# fp32: these tests compare exact arithmetic (accumulation, resume, DDP); auto would be bf16 on AMX CPUs.
BASE = {"resolution": 16, "batch_size": 4, "steps": 6, "learning_rate": 1e-3, "ema_decay": 0.99, "precision": "fp32"}


@pytest.fixture(autouse=True)
def one_thread():
    """The toy model's ops are tiny: threads only add overhead (and spin on a busy machine)."""
    with torch_threads(1):
        yield


def make_trainer(config: TrainConfig, unet: torch.nn.Module | None = None, world: World | None = None,
                 rows=ROWS) -> Trainer:
    unet = unet or ToyUNet(seed=0)
    model = TrainableModel(unet=unet, params=dict(unet.named_parameters()),
                           schedule=NoiseSchedule(scaled_linear_alphas_cumprod(), config.prediction),
                           latent_scale=0.5, checkpoint_blocks=list(getattr(unet, "blocks", [])))
    batches = make_batches(rows, Encoders(toy_encode_images, toy_encode_texts), config.resolution,
                           config.cache_latents, config.random_crop, config.random_flip)
    return Trainer(config, model, batches, "cpu", world)


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.params.items()}


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), key


def test_loss_falls_on_a_learnable_task():
    trainer = make_trainer(TrainConfig(**{**BASE, "steps": 120, "learning_rate": 3e-3}))
    trainer.train()
    first, last = statistics.mean(trainer.losses[:10]), statistics.mean(trainer.losses[-10:])
    assert last < 0.5 * first, (first, last)


class Recorder(ToyUNet):
    def __init__(self) -> None:
        super().__init__(seed=0)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, context):
        self.seen.append((x[:, 4:].detach().clone(), context.detach().clone()))
        return super().forward(x, t, context)


def test_unet_sees_the_empty_prompt_and_zero_images_at_the_paper_rates():
    unet = Recorder()
    trainer = make_trainer(TrainConfig(**{**BASE, "batch_size": 64, "steps": 40, "learning_rate": 1e-6}), unet)
    trainer.train()
    images = torch.cat([x for x, _ in unet.seen])
    contexts = torch.cat([c for _, c in unet.seen])
    empty = toy_encode_texts([""])[0]
    text_dropped = torch.tensor([torch.equal(c, empty) for c in contexts])
    image_dropped = images.flatten(1).abs().amax(1) == 0
    n = len(contexts)
    assert n == 64 * 40
    tolerance = 5 * (0.05 * 0.95 / n) ** 0.5
    for mask, name in ((text_dropped & ~image_dropped, "text"), (text_dropped & image_dropped, "both"),
                       (~text_dropped & image_dropped, "image")):
        assert abs(mask.float().mean().item() - 0.05) < tolerance, name
    instruction = toy_encode_texts(["invert the colours"])[0]
    assert all(torch.equal(c, instruction) for c in contexts[~text_dropped])


def test_ema_weights_follow_the_decay_from_the_raw_weight_history():
    history = []
    trainer = make_trainer(TrainConfig(**{**BASE, "steps": 8, "ema_decay": 0.8}))
    start = weights(trainer)
    trainer.train(Hooks(on_step=lambda t, loss: history.append(weights(t))))
    for name in ("out.weight", "blocks.0.conv1.bias"):
        expected = start[name].clone()
        for n, raw in enumerate(history, start=1):
            decay = min(0.8, (1 + n) / (10 + n))
            expected = decay * expected + (1 - decay) * raw[name]
        ema, raw = trainer.weights(ema=True)[name], trainer.weights(ema=False)[name]
        assert torch.allclose(ema, expected, atol=1e-6)
        assert (ema - raw).abs().max() > 1e-4  # the EMA lags the raw weights


def test_same_seed_same_weights_other_seed_other_weights():
    a, b = make_trainer(TrainConfig(**BASE)), make_trainer(TrainConfig(**BASE))
    c = make_trainer(TrainConfig(**{**BASE, "seed": 1}))
    for trainer in (a, b, c):
        trainer.train()
    assert_same(weights(a), weights(b))
    assert a.losses == b.losses
    assert any(not torch.equal(weights(a)[k], weights(c)[k]) for k in weights(a))


def test_accumulated_micro_batches_equal_one_big_batch():
    big = make_trainer(TrainConfig(**{**BASE, "batch_size": 4, "grad_accumulation": 1, "ema_decay": 0.0}))
    small = make_trainer(TrainConfig(**{**BASE, "batch_size": 2, "grad_accumulation": 2, "ema_decay": 0.0}))
    big.train()
    small.train()
    assert_same(weights(big), weights(small), atol=1e-5)


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_resumed_run_equals_an_uninterrupted_one():
    config = TrainConfig(**{**BASE, "steps": 6})
    straight = make_trainer(config)
    straight.train()
    first = make_trainer(config.replace(steps=3))
    first.train()
    resumed = make_trainer(config)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert resumed.step == 3
    resumed.train()
    assert_same(weights(straight), weights(resumed))
    assert_same(straight.weights(ema=True), resumed.weights(ema=True))
    assert straight.losses == resumed.losses


class Interrupted(Exception):  # noqa: N818 (reads as the event it stands for)
    pass


class FailsOnCall(ToyUNet):
    def __init__(self, call: int) -> None:
        super().__init__(seed=0)
        self.calls, self.fail_at = 0, call

    def forward(self, x, t, context):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Interrupted
        return super().forward(x, t, context)


def test_state_taken_mid_step_resumes_from_the_step_boundary():
    # Like a cancel in ComfyUI: the exception comes out of the UNet in the middle of step 4's second micro-batch.
    config = TrainConfig(**{**BASE, "batch_size": 2, "grad_accumulation": 2, "steps": 5})
    straight = make_trainer(config)
    straight.train()
    broken = make_trainer(config, FailsOnCall(call=3 * 2 + 2))
    with pytest.raises(Interrupted):
        broken.train()
    state = roundtrip(broken.state_dict())
    assert state["step"] == 3
    resumed = make_trainer(config)
    resumed.load_state_dict(state)
    resumed.train()
    assert_same(weights(straight), weights(resumed))


def test_resume_refuses_a_state_made_with_other_settings():
    first = make_trainer(TrainConfig(**{**BASE, "steps": 1}))
    first.train()
    other = make_trainer(TrainConfig(**{**BASE, "batch_size": 2}))
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(first.state_dict())


def test_gradient_checkpointing_changes_memory_not_results():
    plain = make_trainer(TrainConfig(**BASE))
    checkpointed = make_trainer(TrainConfig(**{**BASE, "gradient_checkpointing": True}))
    plain.train()
    checkpointed.train()
    assert_same(weights(plain), weights(checkpointed), atol=1e-6)


def test_v_prediction_trains_too():
    trainer = make_trainer(TrainConfig(**{**BASE, "prediction": "v", "steps": 3}))
    trainer.train()
    assert all(torch.isfinite(torch.tensor(trainer.losses)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        config = TrainConfig(**{**BASE, "batch_size": 2, "steps": 4})
        trainer = make_trainer(config, ToyUNet(seed=rank), World(rank=rank, size=2))  # rank 0's init wins
        trainer.train()
        torch.save({"weights": weights(trainer), "losses": trainer.losses}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    assert_same(ranks[0]["weights"], ranks[1]["weights"])  # lockstep: identical after every step
    single = make_trainer(TrainConfig(**{**BASE, "batch_size": 4, "steps": 4}))
    single.train()
    assert_same(ranks[0]["weights"], weights(single), atol=1e-5)
    assert ranks[0]["losses"] == pytest.approx(single.losses, rel=1e-5)
