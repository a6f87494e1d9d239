"""The trainer (training/, pure torch) on ComfyUI's objects: MODEL, CLIP and VAE in, a trained MODEL and
checkpoint files out. Used by the TrainIP2P node and the command line alike.

- The UNet trained is a float32 copy of the MODEL's diffusion model, built from the same model config,
  with the MODEL's patches (e.g. a LoRA loaded before training) merged in. The input MODEL is untouched.
- Full fine-tune: every UNet weight trains; the result is the input MODEL cloned with "set" patches, written
  as a single-file checkpoint (model.diffusion_model.*, cond_stage_model.*, first_stage_model.*) with
  ComfyUI's own save_checkpoint, so CheckpointLoaderSimple and LoadIP2PModel load it.
- LoRA: ComfyUI's own LoRA training adapters (comfy.weight_adapter, as its TrainLoraNode uses) on the
  attention projections, plus a full weight difference for the first convolution (the paper's new image
  channels start at zero, so a LoRA alone could never learn to look at the image). Saved in ComfyUI's LoRA
  key format (diffusion_model.<module>.lora_up/lora_down/alpha, <conv>.diff) for LoraLoaderModelOnly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import comfy.ldm.modules.attention
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sd
import comfy.utils
import torch

from ..dataset.formats import READ_FORMATS
from ..dataset.layouts import check_mapping
from ..dataset.paths import resolve_inside
from ..dataset.pixels import image_to_tensor
from ..dataset.records import EditRow
from ..training.config import TrainConfig
from ..training.data import PixelBatches, crop_flip, load_pair, make_batches, place, read_rows
from ..training.distributed import World
from ..training.files import save_bytes, save_file, save_safetensors, save_torch
from ..training.identity import RunIdentity, check_resumable, claim_run, dataset_fingerprint, weights_fingerprint
from ..training.latent_cache import DiskChunks, MemoryChunks, cache_key, choose_location, estimate_bytes
from ..training.plots import loss_curve, validation_grid
from ..training.trainer import Hooks, TrainableModel, Trainer, check_state_version
from .edit import SamplingSettings, decode, encode_text, sample, with_size
from .guider import make_guider, matching_text
from .lora import UNET_PREFIX, make_lora
from .memory import check_memory
from .trainee import (
    check_trainable,
    checkpoint_blocks,
    encode_images,
    encoders,
    noise_schedule,
    trainable_ip2p,
    trainee_unet,
    training_base,
)

log = logging.getLogger("comfyui_ip2p.training")


# --- files -------------------------------------------------------------------------------------------------

@dataclass
class RunFiles:
    """Where one named run writes: the model file, and a folder for its state, loss curve and validation."""

    model: Path
    run_dir: Path

    def __post_init__(self) -> None:
        if self.run_dir.name == LATENT_CACHE_DIR:
            raise ValueError(f"the name {LATENT_CACHE_DIR!r} is where latent caches are kept; choose another name")

    @property
    def state(self) -> Path:
        return self.run_dir / "state.pt"

    @property
    def loss_png(self) -> Path:
        return self.run_dir / "loss.png"

    @property
    def validation_png(self) -> Path:
        return self.run_dir / "validation.png"

    @property
    def identity(self) -> Path:
        return self.run_dir / "run.json"

    @property
    def cache_root(self) -> Path:
        """On-disk latent caches, shared by every run beside this one (one folder per cache key): the node's
        output/ip2p_train/latent_cache/, the command line's <output-dir>/latent_cache/."""
        return self.run_dir.parent / LATENT_CACHE_DIR


LATENT_CACHE_DIR = "latent_cache"


def png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def save_full_checkpoint(path: Path, model, clip, vae, metadata: dict[str, str],
                         dtype: torch.dtype = torch.float16) -> Path:
    """What comfy.sd.save_checkpoint writes (the model's own state_dict_for_saving key layout), in `dtype`:
    fp16 by default, like released checkpoints, instead of whatever precision the weights are held in."""
    # Loaded first, so LoRAs on the text encoder are merged into what is saved. A CLIP with no weights of
    # its own (load_model() None) saves a checkpoint without text encoders, as ComfyUI's loaders read them.
    patchers = [p for p in (model, clip.load_model()) if p is not None]
    comfy.model_management.load_models_gpu(patchers, force_patch_weights=True)
    state = model.model.state_dict_for_saving(clip.get_sd() or None, vae.get_sd(), None)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state.items()}
    return save_file(path, lambda tmp: comfy.utils.save_torch_file(state, tmp, metadata=metadata))


# --- validation --------------------------------------------------------------------------------------------

class Validator:
    """Edits the same first dataset rows with the current (EMA) weights through ComfyUI's sampler."""

    def __init__(self, session: Session, rows: Sequence[EditRow], count: int, steps: int) -> None:
        self.session = session
        self.rows = list(rows[:count])  # only the first rows are read
        size = session.config.resolution
        self.inputs, self.targets = [], []
        for row in self.rows:
            source, target = load_pair(row, size)
            where = place(torch.zeros(3), source.shape[1], source.shape[2], size, False, False)
            self.inputs.append(crop_flip(source, where, size))
            self.targets.append(crop_flip(target, where, size))
        clip, vae = session.clip, session.vae
        self.image_latents = encode_images(vae, torch.stack(self.inputs)) if self.rows else None
        model, side = session.source, size
        self.positives = [with_size(model, encode_text(clip, row.instruction), side, side) for row in self.rows]
        self.negative = with_size(model, encode_text(clip, ""), side, side)
        self.settings = SamplingSettings(steps=steps, seed=0)
        self.history: list[tuple[int, list[torch.Tensor]]] = []

    def __call__(self, trainer: Trainer) -> None:
        if not self.rows:
            return
        self.history.append((trainer.step, list(self.session.edit(trainer, self))))

    def grid(self):
        if not self.history:
            return None
        return validation_grid(self.inputs, self.targets, self.history, [r.instruction for r in self.rows])


class Session:
    """One run's ComfyUI-side objects: the MODEL it starts from, its training copy, encoders, adapters."""

    def __init__(self, model, clip, vae, config: TrainConfig, device: torch.device | None = None) -> None:
        self.source = trainable_ip2p(model)
        self.clip, self.vae = clip, vae
        self.device = device or comfy.model_management.get_torch_device()
        schedule = noise_schedule(self.source)
        self.config = config.replace(prediction=schedule.prediction)
        self.base = training_base(self.source, self.device)
        unet = self.base.diffusion_model
        self.adapters = None
        if config.mode == "lora":
            # ComfyUI's adapters draw their initial weights from torch's global generator: seed it, so the same
            # seed gives the same LoRA.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                self.adapters = make_lora(unet, config.lora_rank, config.lora_alpha)
        if self.adapters is None:
            unet.requires_grad_(True)
            params = dict(unet.named_parameters())
        else:
            params = self.adapters.params()
        self.trainable = TrainableModel(unet=trainee_unet(self.base), params=params, schedule=schedule,
                                        latent_scale=float(self.base.latent_format.scale_factor),
                                        checkpoint_blocks=checkpoint_blocks(unet))

    @property
    def pooled_text(self) -> bool:
        """SDXL-family models also take the pooled text embedding (see trainee.ComfyUNet)."""
        return self.trainable.unet.size_y is not None

    @property
    def latent_channels(self) -> int:
        return int(self.base.latent_format.latent_channels)

    def edit(self, trainer: Trainer, validator: Validator) -> list[torch.Tensor]:
        """Validation edits [3, H, W] with the weights the checkpoint would hold."""
        patcher = comfy.model_patcher.ModelPatcher(self.base, load_device=self.device, offload_device=self.device)
        if self.adapters is not None:
            for name, adapter in self.adapters.modules.items():
                patcher.add_weight_wrapper(f"{UNET_PREFIX}{name}.weight", adapter)
        use_ema = self.config.save_ema and trainer.ema is not None
        swap = trainer.ema.swapped_in(self.trainable.params) if use_ema else contextlib.nullcontext()
        edits = []
        try:
            with swap, torch.no_grad():
                self.trainable.unet.eval()
                for i, positive in enumerate(validator.positives):
                    latent = validator.image_latents[i:i + 1]
                    guider = make_guider(patcher, positive, validator.negative, latent, 1.5, 7.5)
                    # no canvas preview for validation samples
                    samples = sample(guider, torch.zeros_like(latent), validator.settings, callback=lambda *_: None)
                    edits.append(decode(self.vae, samples)[0].permute(2, 0, 1))
        finally:
            release(patcher)
            if self.adapters is not None:
                self.adapters.attach(self.base.diffusion_model)
            self.trainable.unet.train()
        return edits

    def trained_model(self, weights: dict[str, torch.Tensor]):
        """A MODEL with the trained weights: the input cloned with patches, like LoraLoader does."""
        if self.adapters is not None:
            return comfy.sd.load_lora_for_models(self.source, None, self.lora_file(weights), 1.0, 0.0)[0]
        dtype = self.source.model.get_dtype()
        offload = self.source.offload_device
        patches = {UNET_PREFIX + k: ("set", (v.detach().to(offload, dtype, copy=True),)) for k, v in weights.items()}
        model = self.source.clone()
        model.add_patches(patches, 1.0)
        return model

    def lora_file(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = SAVE_DTYPES[self.config.save_precision]
        out = {key: value.detach().to("cpu", dtype) for key, value in weights.items()}
        for name, adapter in self.adapters.modules.items():
            if hasattr(adapter, "lora_up"):
                out[f"{UNET_PREFIX}{name}.alpha"] = torch.tensor(float(self.adapters.alpha))
        return out

    def save_model(self, path: Path, weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        if self.adapters is not None:
            return save_safetensors(self.lora_file(weights), path, metadata)
        return save_full_checkpoint(path, self.trained_model(weights), self.clip, self.vae, metadata,
                                    SAVE_DTYPES[self.config.save_precision])


def release(patcher) -> None:
    """Drops a temporary patcher from ComfyUI's list of loaded models."""
    for loaded in list(comfy.model_management.current_loaded_models):
        if loaded.model is patcher:
            comfy.model_management.current_loaded_models.remove(loaded)
            loaded.model_unload()


# --- the run -----------------------------------------------------------------------------------------------

@dataclass
class TrainOutcome:
    model: object
    loss_image: torch.Tensor
    validation_image: torch.Tensor
    model_path: Path
    step: int
    finished: bool
    stats: dict = field(default_factory=dict)


Progress = Callable[[Trainer, float], None]


def metadata_for(trainer: Trainer, dataset: dict, identity: RunIdentity) -> dict[str, str]:
    info = {"config": trainer.config.to_dict(), "step": trainer.step, "dataset": dataset,
            "weights": "ema" if trainer.config.save_ema and trainer.ema is not None else "raw"}
    return {"comfyui_ip2p.training": json.dumps(info), **identity.metadata()}


def write_outputs(session: Session, trainer: Trainer, files: RunFiles, dataset: dict, identity: RunIdentity,
                  validator: Validator | None) -> None:
    """Model file, resumable state, loss curve and validation grid (rank 0 only). A sharded (FSDP) run's weights
    and state are gathered from every process's parts: all of them call this, rank 0 writes."""
    if not (trainer.world.is_main or trainer.sharded):
        return
    weights = trainer.weights(ema=session.config.save_ema, main_only=True)
    state = trainer.state_dict()
    if not trainer.world.is_main:
        return
    # run.json before the model file: a model file carrying this run id is then always recognised as ours.
    save_bytes(identity.record(), files.identity)
    session.save_model(files.model, weights, metadata_for(trainer, dataset, identity))
    save_torch({**state, "fingerprint": identity.fingerprint}, files.state)
    save_bytes(png_bytes(loss_curve(trainer.losses)), files.loss_png)
    save_bytes(json.dumps(trainer.losses).encode("utf-8"), files.run_dir / "loss.json")
    grid = validator.grid() if validator is not None else None
    if grid is not None:
        save_bytes(png_bytes(grid), files.validation_png)
    log.info("step %d: saved %s and the training state", trainer.step, files.model)


def load_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def encoders_fingerprint(clip, vae) -> str:
    """The VAE's and text encoder's weights (sampled, as weights_fingerprint does), and the patches on the text
    encoder (a LoRA loaded onto the CLIP changes its embeddings, not its state dict): a disk cache is reused only
    by the encoders that wrote it."""
    tensors = {f"vae.{k}": v for k, v in vae.get_sd().items() if isinstance(v, torch.Tensor)}
    tensors.update({f"clip.{k}": v for k, v in clip.get_sd().items() if isinstance(v, torch.Tensor)})
    patcher = getattr(clip, "patcher", None)
    patched = str(patcher.patches_uuid) if patcher is not None and patcher.patches else ""
    return weights_fingerprint(tensors) + patched


def latent_store(session: Session, clip, vae, rows: Sequence[EditRow], dataset_print: str, files: RunFiles,
                 text_shape: tuple[int, ...]) -> MemoryChunks | DiskChunks:
    """Where the latent cache lives: in memory, or (the setting, or "auto" beyond the memory budget) in
    files.cache_root/<key>/, keyed by the dataset, the encoders, the resolution and the pooled text flag."""
    config = session.config
    estimated = estimate_bytes(len(rows), config.resolution, session.latent_channels, text_shape)
    location = choose_location(config.cache_location, estimated)
    log.info("latent cache: about %.2f GB, kept %s", estimated / 2**30,
             "in memory" if location == "memory" else f"on disk in {files.cache_root}")
    if location == "memory":
        return MemoryChunks()
    key = cache_key(dataset_print, encoders_fingerprint(clip, vae), config.resolution, session.pooled_text)
    describe = {"dataset": str(getattr(rows, "path", "")), "rows": len(rows), "resolution": config.resolution,
                "pooled_text": session.pooled_text}
    return DiskChunks(files.cache_root / key, describe=describe)


def training_batches(session: Session, clip, vae, rows: Sequence[EditRow], dataset_print: str, files: RunFiles,
                     world: World, on_cache: Callable[[int, int], None] | None) -> PixelBatches:
    config = session.config
    codecs = encoders(clip, vae, session.pooled_text)
    store = None
    if config.cache_latents:
        text_shape = tuple(codecs.encode_texts([""]).shape)
        store = latent_store(session, clip, vae, rows, dataset_print, files, text_shape)
    return make_batches(rows, codecs, config.resolution, config.cache_latents, config.random_crop,
                        config.random_flip, progress=on_cache, store=store, world=world)


def cache_location(batches: PixelBatches) -> str:
    store = getattr(batches, "store", None)
    return "none" if store is None else ("disk" if isinstance(store, DiskChunks) else "memory")


def check_connected(model, clip) -> None:
    """What the node's inputs must be before any work: a trainable MODEL and, when connected, its own family's
    CLIP (an SD1.5 CLIP on an SDXL model would otherwise fail deep in the UNet)."""
    check_trainable(model)
    if clip is not None:
        matching_text(model, encode_text(clip, ""))


def check_fits(model, vae, config: TrainConfig, world: World) -> None:
    if config.parallel == "fsdp" and world.size > 1:
        # The estimate holds every weight's gradient, AdamW state and EMA on one device: what FSDP splits.
        log.info("parallel fsdp: the memory check (one whole model per process) is skipped")
        return
    check_memory(model, vae, config, comfy.model_management.get_torch_device())


def run_training(model, clip, vae, dataset: dict, config: TrainConfig, files: RunFiles, *, resume: bool = True,
                 world: World | None = None, on_step: Progress | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 on_cache: Callable[[int, int], None] | None = None,
                 on_saved: Callable[[Trainer], None] | None = None) -> TrainOutcome:
    """Trains (or resumes) a run and returns the trained MODEL with its pictures and file paths.

    Interrupted (ComfyUI's cancel, or `should_stop`), it writes the model file and the resumable state of
    the last completed step before re-raising / returning unfinished. Refused before any work: a model file of
    that name that this run did not write, and a run that cannot fit in memory; refused before training: a saved
    state (with `resume`) trained from another model or dataset.
    """
    world = world or World()
    identity = claim_run(files.model, files.identity)
    check_connected(model, clip)
    with torch.inference_mode(False), torch.enable_grad():
        # Inside: the probe's (meta) weights must not be inference tensors, which autograd refuses to save.
        check_fits(model, vae, config, world)
        session = Session(model, clip, vae, config)
        rows = read_rows(dataset["path"], dataset.get("format"), dataset.get("mapping"))
        dataset_print = dataset_fingerprint(dataset["path"], rows)
        # Of the model as connected (patches merged), before a resumed state replaces any weight.
        identity.fingerprint = {"model": weights_fingerprint(session.base.diffusion_model.state_dict()),
                                "dataset": dataset_print}
        state = load_state(files.state) if resume else None
        if state is not None:
            check_state_version(state)
            check_resumable(state, identity, files.state)
        started = time.perf_counter()
        batches = training_batches(session, clip, vae, rows, dataset_print, files, world, on_cache)
        cache_seconds = time.perf_counter() - started
        if session.device.type == "cuda":
            # The source MODEL was loaded only to copy its patched weights: give its VRAM to training.
            comfy.model_management.unload_all_models()
            comfy.model_management.soft_empty_cache()
        trainer = Trainer(session.config, session.trainable, batches, session.device, world,
                          latent_channels=session.latent_channels)
        if state is not None:
            trainer.load_state_dict(state)
            log.info("resumed %s at step %d", files.state, trainer.step)
        validator = Validator(session, rows, config.validation_count, config.validation_steps) \
            if config.validation_every and world.is_main else None

        saved_at = [-1]

        def checkpoint(current: Trainer) -> None:
            write_outputs(session, current, files, dataset, identity, validator)
            saved_at[0] = current.step
            if on_saved is not None and world.is_main:
                on_saved(current)
            world.barrier()

        hooks = Hooks(on_step=on_step, should_stop=should_stop, on_checkpoint=checkpoint,
                      on_validation=validator)
        try:
            finished = trainer.train(hooks)
        except comfy.model_management.InterruptProcessingException:
            write_outputs(session, trainer, files, dataset, identity, validator)
            raise
        if validator is not None and (not validator.history or validator.history[-1][0] != trainer.step):
            validator(trainer)
            saved_at[0] = -1  # the grid changed
        if saved_at[0] != trainer.step:
            checkpoint(trainer)
        weights = trainer.weights(ema=session.config.save_ema)
        trained = session.trained_model(weights)
    grid = validator.grid() if validator is not None else None
    stats = {"cache_seconds": cache_seconds, "train_seconds": trainer.seconds,
             "samples_per_second": trainer.samples_per_step * len(trainer.losses) / max(trainer.seconds, 1e-9),
             "cached": session.config.cache_latents, "cache_location": cache_location(batches)}
    if world.size > 1:
        # Reported by every rank of a data-parallel run, where it must be equal (the ranks never drift apart).
        stats["weights_fingerprint"] = weights_fingerprint(trainer.weights(ema=False))
    return TrainOutcome(model=trained, loss_image=image_to_tensor(loss_curve(trainer.losses))[None],
                        validation_image=image_to_tensor(grid)[None] if grid is not None else torch.zeros(1, 64, 64, 3),
                        model_path=files.model, step=trainer.step, finished=finished, stats=stats)


# --- the node's side: ComfyUI folders, progress, cancel ----------------------------------------------------

def plain_name(name: str) -> str:
    """A checkpoint name the user typed, as a bare file stem (no folders, no extension)."""
    stem = name.strip().removesuffix(".safetensors")
    if not stem or stem in (".", "..") or any(c in stem for c in '/\\:*?"<>|\0'):
        raise ValueError(f"checkpoint_name {name!r} must be a plain file name such as 'my_ip2p_finetune'")
    return stem


def node_files(name: str, mode: str) -> RunFiles:
    """LoRAs go to models/loras, full checkpoints to models/checkpoints; state and pictures to
    output/ip2p_train/<name>/ (not in a model folder, where the state would show up as a checkpoint)."""
    import folder_paths

    stem = plain_name(name)
    root = folder_paths.get_folder_paths("loras" if mode == "lora" else "checkpoints")[0]
    # resolve_inside also refuses control/invisible characters, over-long names and symlinks that lead out
    # of the folder: the state, pictures and model are written only inside ComfyUI's folders.
    example = "a plain file name such as 'my_ip2p_finetune'"
    model = resolve_inside(root, f"{stem}.safetensors", "checkpoint_name", example)
    run_dir = resolve_inside(folder_paths.get_output_directory(), f"ip2p_train/{stem}", "checkpoint_name", example)
    return RunFiles(model=model, run_dir=run_dir)


DATASET_ROOTS = ("output", "input")
DATASET_FORMATS = ("auto", *READ_FORMATS)
NOT_A_HANDLE = ("dataset must be a dataset handle from Load Edit Dataset (or Save Edit Dataset's dataset output); "
                "connect one of them")
# One text for every path outside, never the path or anything found there: a workflow must not learn from the
# message whether some file exists on this machine.
OUTSIDE = ("the dataset handle points outside ComfyUI's input and output folders; connect Load Edit Dataset (or "
           "Save Edit Dataset's dataset output), which hands out only datasets inside them")


def confined_dataset(handle: object) -> dict:
    """The dataset handle re-resolved inside ComfyUI's output or input folder, with a known format.

    A handle normally comes from Load/Save Edit Dataset, but a workflow file can write any literal in its place
    ({"path": "/home/me/photos", ...}): trained on, its images would come out in output/ as validation pictures.
    So its path gets the same checks as a typed dataset name (resolve_inside: no '..', no symlinks out).
    """
    if not isinstance(handle, dict) or not isinstance(handle.get("path"), str) or not handle["path"].strip():
        raise ValueError(NOT_A_HANDLE)
    fmt = handle.get("format") or "auto"
    if not isinstance(fmt, str) or fmt not in DATASET_FORMATS:
        raise ValueError(f"the dataset handle's format {str(fmt)[:40]!r} is not one of {', '.join(DATASET_FORMATS)}; "
                         "connect Load Edit Dataset, which sets it")
    # A workflow can write any mapping too: re-checked (allowed fields, short plain column names).
    mapping = None if handle.get("mapping") is None else check_mapping(handle["mapping"])
    return {"path": str(_inside_dataset_roots(handle["path"])), "format": fmt, "mapping": mapping}


def _inside_dataset_roots(path: str) -> Path:
    import folder_paths

    example = "a dataset inside ComfyUI's output or input folder, as Load Edit Dataset lists it"
    roots = [(name, folder_paths.get_directory_by_type(name)) for name in DATASET_ROOTS]
    if os.path.isabs(path):
        # Purely textual until the path is known to be inside a root: nothing outside is ever looked at.
        absolute = Path(os.path.abspath(path))
        for name, root in roots:
            for form in {Path(os.path.abspath(root)), Path(os.path.realpath(root))}:
                if absolute.is_relative_to(form):  # the root itself: resolve_inside says so
                    return _existing(resolve_inside(root, absolute.relative_to(form).as_posix(), "dataset", example),
                                     name)
        raise ValueError(OUTSIDE)
    for _name, root in roots:  # a relative path names a dataset as Load Edit Dataset does: output first
        found = resolve_inside(root, path, "dataset", example)
        if found.exists():
            return found
    raise FileNotFoundError(f"no dataset {path!r} in ComfyUI's output or input folder")


def _existing(path: Path, root_name: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path.name!r} in ComfyUI's {root_name} folder")
    return path


def progress_text(text: str, node_id: str | None) -> None:
    try:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node_id)
    except (ImportError, AttributeError):
        pass  # no server (headless run): the progress bar and the log still report


def node_progress(total: int, node_id: str | None, every_s: float = 2.0) -> Progress:
    """Progress bar at every step; loss text and the live loss curve as preview every few seconds."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(total, node_id=node_id)
    last = [0.0]

    def report(trainer: Trainer, loss: float) -> None:
        preview = None
        now = time.monotonic()
        if now - last[0] >= every_s or trainer.step >= total:
            last[0] = now
            preview = ("PNG", loss_curve(trainer.losses), 512)
            progress_text(f"step {trainer.step}/{total}  loss {loss:.4f}", node_id)
            log.info("step %d/%d loss %.4f", trainer.step, total, loss)
        bar.update_absolute(trainer.step, total, preview)
        comfy.model_management.throw_exception_if_processing_interrupted()

    return report


def train_from_node(model, clip, vae, dataset: dict, config: TrainConfig, name: str, resume: bool,
                    node_id: str | None = None) -> TrainOutcome:
    dataset = confined_dataset(dataset)
    files = node_files(name, config.mode)
    outcome = run_training(model, clip, vae, dataset, config, files, resume=resume,
                           on_step=node_progress(config.steps, node_id))
    stats = outcome.stats
    summary = (f"{outcome.step} steps, {stats['samples_per_second']:.2f} samples/s"
               + (f", latents cached in {stats['cache_seconds']:.1f} s" if stats["cached"] else "")
               + f"; saved {files.model.name}")
    progress_text(summary, node_id)
    log.info("TrainIP2P: %s", summary)
    return outcome
