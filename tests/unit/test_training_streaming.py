"""Training that streams, pure torch on toy encoders: the resumable data order, lazy rows, the latent cache on disk
(bit-identical to memory, resumable, keyed), the masked loss, the module DistributedDataParallel wraps and
where FSDP is refused."""

from __future__ import annotations

import io
from collections.abc import Sequence

import pytest
import torch
from comfyui_ip2p.dataset.records import EditRow
from comfyui_ip2p.testing.synthetic import (
    ToyUNet,
    invert_rows,
    scaled_linear_alphas_cumprod,
    toy_encode_images,
    toy_encode_texts,
)
from comfyui_ip2p.testing.threads import torch_threads
from comfyui_ip2p.training.config import TrainConfig
from comfyui_ip2p.training.data import Encoders, LatentBatches, PixelBatches, make_batches
from comfyui_ip2p.training.latent_cache import (
    DiskChunks,
    MemoryChunks,
    cache_key,
    choose_location,
    estimate_bytes,
    memory_budget,
)
from comfyui_ip2p.training.objective import NoiseSchedule, weighted_mse
from comfyui_ip2p.training.parallel import TrainedWeights
from comfyui_ip2p.training.trainer import DataOrder, TrainableModel, Trainer
from PIL import Image

ENCODERS = Encoders(toy_encode_images, toy_encode_texts)
BASE = {"resolution": 16, "batch_size": 4, "steps": 6, "learning_rate": 1e-3, "ema_decay": 0.0, "precision": "fp32"}


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


class LazyRows(Sequence):
    """A dataset that may only be indexed, as dataset.source's rows are: listing it whole is a test failure."""

    def __init__(self, rows: list[EditRow]) -> None:
        self.rows, self.reads = rows, [0] * len(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if not isinstance(index, int):
            raise AssertionError("the trainer must read rows one at a time")
        self.reads[index] += 1
        return self.rows[index]

    def __iter__(self):
        raise AssertionError("the trainer must not iterate (list) the whole dataset")


def masked_rows(count: int, size: int = 40, seed: int = 3) -> list[EditRow]:
    """Rectangular 40x24 pairs (crop room), two instructions, a mask on every other row."""
    rows = invert_rows(count, size=size, seed=seed)
    for i, row in enumerate(rows):
        row.input_image = row.input_image.resize((40, 24))
        row.edited_image = row.edited_image.resize((40, 24))
        row.instruction = "invert the colours" if i % 3 else "make it negative"
        if i % 2 == 0:
            mask = Image.new("L", (40, 24), 0)
            mask.paste(255, (4 + i, 3, 25 + i, 17))
            row.mask = mask
    return rows


def trainer_for(config: TrainConfig, rows, store=None) -> Trainer:
    unet = ToyUNet(seed=0)
    model = TrainableModel(unet=unet, params=dict(unet.named_parameters()),
                           schedule=NoiseSchedule(scaled_linear_alphas_cumprod(), "eps"), latent_scale=0.5)
    batches = make_batches(rows, ENCODERS, config.resolution, config.cache_latents, store=store)
    return Trainer(config, model, batches, "cpu")


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- data order ------------------------------------------------------------------------------------------------

def test_data_order_resumed_mid_epoch_draws_every_row_once_per_epoch():
    straight = DataOrder(10, seed=7)
    drawn = straight.take(4) + straight.take(4) + straight.take(4) + straight.take(8)  # 2 epochs
    first = DataOrder(10, seed=7)
    part = first.take(4) + first.take(4)
    state = first.state_dict()
    assert state == {"epoch": 0, "position": 8}  # two integers, whatever the dataset size
    resumed = DataOrder(10, seed=7)
    resumed.load_state_dict(state)
    part += resumed.take(4) + resumed.take(8)
    assert part == drawn
    assert sorted(drawn[:10]) == sorted(drawn[10:]) == list(range(10))
    assert drawn[:10] != drawn[10:]  # each epoch its own permutation
    assert DataOrder(10, seed=8).take(10) != drawn[:10]


def test_trainer_resumed_mid_epoch_trains_every_row_once_per_epoch():
    rows = invert_rows(12, size=16, seed=0)
    config = TrainConfig(**{**BASE, "steps": 6})  # 3 steps of 4 rows per epoch
    straight, seen = trainer_for(config, rows), []
    straight.train(hooks=_recorder(seen))
    first, killed = trainer_for(config.replace(steps=2), rows), []
    first.train(hooks=_recorder(killed))
    resumed, rest = trainer_for(config, rows), []
    resumed.load_state_dict(roundtrip(first.state_dict()))
    resumed.train(hooks=_recorder(rest))
    assert killed + rest == seen
    for epoch in (seen[:12], seen[12:]):
        assert sorted(epoch) == list(range(12))
    assert straight.losses == resumed.losses


def _recorder(seen: list[int]):
    from comfyui_ip2p.training.trainer import Hooks

    return Hooks(on_step=lambda trainer, _loss: seen.extend(trainer.step_rows))


def test_an_older_state_is_refused_with_what_to_do():
    trainer = trainer_for(TrainConfig(**{**BASE, "steps": 1}), invert_rows(4, size=16))
    trainer.train()
    state = {**trainer.state_dict(), "version": 1}
    with pytest.raises(ValueError, match=r"version 1.*set resume off"):
        trainer_for(TrainConfig(**BASE), invert_rows(4, size=16)).load_state_dict(state)


# --- lazy rows and the latent cache ---------------------------------------------------------------------------

def test_batches_read_rows_one_at_a_time_and_the_cache_reads_each_once():
    rows = LazyRows(invert_rows(6, size=16))
    LatentBatches(rows, ENCODERS, 16)
    assert rows.reads == [1] * 6
    PixelBatches(rows, ENCODERS, 16).batch([2, 5], torch.rand(2, 3))
    assert rows.reads == [1, 1, 2, 1, 1, 2]


def all_batches(batches, count: int) -> list:
    uniforms = torch.rand(count, 3, generator=torch.Generator().manual_seed(4))
    return [batches.batch([i, (i * 5) % count], uniforms[[i, (i * 5) % count]]) for i in range(count)]


def assert_batches_equal(a: list, b: list) -> None:
    for x, y in zip(a, b, strict=True):
        for name in ("target", "image", "context", "mask"):
            left, right = getattr(x, name), getattr(y, name)
            assert (left is None and right is None) or torch.equal(left, right), name


def test_disk_cache_batches_are_bit_identical_to_the_memory_cache(tmp_path):
    rows = masked_rows(10)
    memory = LatentBatches(rows, ENCODERS, 16, store=MemoryChunks(chunk_rows=4))
    disk = LatentBatches(LazyRows(rows), ENCODERS, 16, store=DiskChunks(tmp_path / "cache", chunk_rows=4))
    assert sorted(p.name for p in (tmp_path / "cache").glob("chunk-*.pt")) == [
        "chunk-000000.pt", "chunk-000001.pt", "chunk-000002.pt"]
    assert_batches_equal(all_batches(memory, 10), all_batches(disk, 10))
    reopened = LatentBatches(LazyRows(rows), ENCODERS, 16, store=DiskChunks(tmp_path / "cache", chunk_rows=4))
    assert_batches_equal(all_batches(memory, 10), all_batches(reopened, 10))
    assert all_batches(disk, 10)[0].mask is not None


def test_cached_masks_equal_masks_of_the_augmented_pixels():
    rows = masked_rows(6)
    uniforms = torch.rand(6, 3, generator=torch.Generator().manual_seed(2))
    pixels = PixelBatches(rows, ENCODERS, 16).batch(list(range(6)), uniforms)
    cached = LatentBatches(rows, ENCODERS, 16).batch(list(range(6)), uniforms)
    assert torch.equal(pixels.mask, cached.mask)
    assert torch.equal(cached.mask[1], torch.ones(1, 2, 2))  # a row without a mask weighs 1 everywhere
    assert 0 < cached.mask[0].sum() < 4
    for name in ("target", "image", "context"):
        assert torch.allclose(getattr(pixels, name), getattr(cached, name), atol=1e-6), name


class Crash(Exception):  # noqa: N818 (reads as the event it stands for)
    pass


def test_a_cache_killed_mid_chunk_reuses_complete_chunks_and_rewrites_the_rest(tmp_path):
    rows, folder = masked_rows(10), tmp_path / "cache"
    calls = [0]

    def failing(pixels):
        calls[0] += 1
        if calls[0] == 3:  # chunk 1 is complete after two calls (4 pairs per call)
            (folder / ".chunk-000002.pt.tmp-99999").write_bytes(b"half a chunk")  # a killed writer's leftover
            raise Crash
        return toy_encode_images(pixels)

    with pytest.raises(Crash):
        LatentBatches(rows, Encoders(failing, toy_encode_texts), 16, store=DiskChunks(folder, chunk_rows=4))
    assert sorted(p.name for p in folder.glob("chunk-*")) == ["chunk-000000.pt", "chunk-000001.pt"]

    encoded: list[int] = []

    def counting(pixels):
        encoded.append(pixels.shape[0])
        return toy_encode_images(pixels)

    resumed = LatentBatches(rows, Encoders(counting, toy_encode_texts), 16, store=DiskChunks(folder, chunk_rows=4))
    assert encoded == [8]  # only the last chunk's 2 rows (4 images each) were encoded again
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert_batches_equal(all_batches(resumed, 10), all_batches(LatentBatches(rows, ENCODERS, 16), 10))


def test_the_cache_key_changes_with_dataset_encoders_resolution_and_pooling():
    base = cache_key("dataset-a", "vae-1", 256, False)
    assert base == cache_key("dataset-a", "vae-1", 256, False)
    others = {cache_key("dataset-b", "vae-1", 256, False), cache_key("dataset-a", "vae-2", 256, False),
              cache_key("dataset-a", "vae-1", 512, False), cache_key("dataset-a", "vae-1", 256, True)}
    assert base not in others and len(others) == 4


def test_auto_goes_to_disk_beyond_the_memory_budget(monkeypatch):
    size = estimate_bytes(1000, 256, 4, (77, 768))
    assert size == 4 * 1000 * (4 * 4 * 32 * 32 + 77 * 768 + 32 * 32)
    assert choose_location("auto", size, budget=size) == "memory"
    assert choose_location("auto", size + 1, budget=size) == "disk"
    assert choose_location("memory", size + 1, budget=size) == "memory"
    monkeypatch.setenv("IP2P_CACHE_MEMORY_GB", "0.5")
    assert memory_budget() == 2**29
    with pytest.raises(ValueError, match="cache_location"):
        choose_location("ssd", 1)


def test_training_from_the_disk_cache_equals_training_from_memory(tmp_path):
    config = TrainConfig(**{**BASE, "steps": 3})
    rows = masked_rows(8)
    memory = trainer_for(config, rows, MemoryChunks(chunk_rows=4))
    disk = trainer_for(config, LazyRows(rows), DiskChunks(tmp_path / "c", chunk_rows=4))
    memory.train()
    disk.train()
    assert memory.losses == disk.losses
    for name, p in memory.model.params.items():
        assert torch.equal(p, disk.model.params[name]), name


# --- masked loss ----------------------------------------------------------------------------------------------

def test_an_all_ones_mask_gives_the_plain_loss_and_zero_outside_weight_ignores_outside():
    gen = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 4, 4, 4, generator=gen)
    plain = torch.nn.functional.mse_loss(prediction, target)
    assert torch.allclose(weighted_mse(prediction, target, torch.ones(3, 1, 4, 4), 0.1), plain, rtol=1e-6)
    mask = torch.zeros(3, 1, 4, 4)
    mask[..., :2, :] = 1.0
    changed = prediction.clone()
    changed[..., 2:, :] += 5.0  # only outside the mask
    assert weighted_mse(changed, target, mask, 0.0) == weighted_mse(prediction, target, mask, 0.0)
    assert weighted_mse(changed, target, mask, 0.1) > weighted_mse(prediction, target, mask, 0.1)
    inside = (prediction - target)[..., :2, :].pow(2).mean()
    assert torch.allclose(weighted_mse(prediction, target, mask, 0.0), inside, rtol=1e-6)


def test_masked_loss_with_all_white_masks_trains_like_the_plain_loss():
    plain_rows = invert_rows(8, size=16, seed=1)
    white_rows = invert_rows(8, size=16, seed=1)
    for row in white_rows:
        row.mask = Image.new("L", (16, 16), 255)
    config = TrainConfig(**{**BASE, "steps": 2})
    plain = trainer_for(config, plain_rows)
    masked = trainer_for(config.replace(masked_loss=True), white_rows)
    plain.train()
    masked.train()
    assert masked.losses == pytest.approx(plain.losses, rel=1e-6)
    half = invert_rows(8, size=16, seed=1)
    for row in half:
        row.mask = Image.new("L", (16, 16), 0)
        row.mask.paste(255, (0, 0, 8, 16))
    other = trainer_for(config.replace(masked_loss=True, outside_mask_weight=0.0), half)
    other.train()
    assert other.losses != pytest.approx(plain.losses, rel=1e-3)


# --- what DistributedDataParallel wraps ---------------------------------------------------------------------

class AdaptedUNet(torch.nn.Module):
    """A frozen UNet whose trained weights live in adapters outside it (as ComfyUI's LoRA weight functions do)."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = ToyUNet(seed=0).requires_grad_(False)
        self.adapter = [torch.nn.Parameter(torch.zeros(4))]

    def forward(self, x, t, context):
        return self.unet(x, t, context) + self.adapter[0].view(1, 4, 1, 1)


def test_ddp_sees_exactly_the_trained_weights_even_when_they_are_not_submodules():
    model = AdaptedUNet()
    wrapped = TrainedWeights(model, model.adapter)
    assert list(wrapped.parameters()) == model.adapter
    full = ToyUNet(seed=0)
    assert len(list(TrainedWeights(full, list(full.parameters())).parameters())) == len(list(full.parameters()))
    x, t, c = torch.randn(2, 8, 2, 2), torch.tensor([1.0, 2.0]), torch.randn(2, 77, 16)
    assert torch.equal(wrapped(x, t, c), model(x, t, c))


def test_fsdp_is_refused_where_it_cannot_shard_and_one_process_trains_the_whole_model():
    for changes, words in (({"mode": "lora"}, "full fine-tune"), ({"precision": "fp16"}, "bf16"),
                           ({"validation_every": 5}, "validation_every 0"), ({"parallel": "zero3"}, "ddp, fsdp")):
        with pytest.raises(ValueError, match=words):
            TrainConfig(**{**BASE, "parallel": "fsdp", **changes})
    rows = invert_rows(8, size=16, seed=0)
    plain, sharded = trainer_for(TrainConfig(**BASE), rows), trainer_for(TrainConfig(**BASE, parallel="fsdp"), rows)
    plain.train()
    sharded.train()
    assert not sharded.sharded and sharded.losses == plain.losses
