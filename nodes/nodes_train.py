"""Training node: fine-tune an InstructPix2Pix model (full or LoRA) on an edit dataset, inside the graph."""

from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from ..pipeline.train import train_from_node
from ..training.config import CACHE_LOCATIONS, TrainConfig
from .errors import named_errors
from .types import EditDataset
from .widgets import seed_input


class TrainIP2P(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TrainIP2P",
            display_name="Train InstructPix2Pix",
            category="InstructPix2Pix/training",
            description=(
                "Fine-tunes an InstructPix2Pix model on an edit dataset with the paper's recipe (conditioning "
                "dropout, AdamW, EMA), fully or as a LoRA. A text-to-image model starts from the paper's init "
                "(as ConvertToIP2P). Writes a checkpoint (models/checkpoints, or models/loras for LoRA) that "
                "Load Checkpoint / LoadIP2PModel / LoraLoader load, and a resumable state: cancel and queue "
                "again with the same name to continue. The trained MODEL plugs straight into InstructEdit."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to train: an InstructPix2Pix model, or a text-to-image "
                                                "SD1.x model (widened to 8 input channels first, as the paper)."),
                io.Clip.Input("clip", tooltip="The model's text encoder (frozen; encodes the instructions)."),
                io.Vae.Input("vae", tooltip="The model's VAE (frozen; encodes input and edited images)."),
                EditDataset.Input("dataset", tooltip="An edit dataset from Load Edit Dataset (any format it reads)."),
                io.String.Input("checkpoint_name", default="ip2p_finetune",
                                tooltip="File name of the result (no folder). The same name with resume on "
                                        "continues an earlier run of it. A file of that name that this node did "
                                        "not write for that run is never replaced: the run is refused."),
                io.Combo.Input("mode", options=["full", "lora"], default="full",
                               tooltip="full: every UNet weight trains. lora: small adapters on the attention "
                                       "projections plus the first convolution; a few MB, loads with LoraLoader."),
                io.Int.Input("steps", default=1000, min=1, max=10_000_000,
                             tooltip="Optimizer steps in total (a resumed run continues up to this number)."),
                io.Int.Input("batch_size", default=4, min=1, max=1024,
                             tooltip="Samples per micro-batch. Effective batch = batch_size x grad_accumulation "
                                     "(the paper used 1024)."),
                io.Int.Input("grad_accumulation", default=1, min=1, max=1024,
                             tooltip="Micro-batches summed per optimizer step: a larger effective batch in the "
                                     "same memory."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5, round=1e-7,
                               tooltip="AdamW learning rate, constant (paper: 1e-4; LoRA often 1e-4 to 1e-3)."),
                io.Int.Input("resolution", default=256, min=16, max=2048, step=8,
                             tooltip="Training resolution (square crops). The paper trained at 256."),
                seed_input(tooltip="Seed of data order, augmentation, dropout, timesteps and noise: the same seed "
                                   "and inputs give the same model (keep it fixed to resume a run)."),
                io.Float.Input("ema_decay", default=0.9999, min=0.0, max=0.99999, step=0.0001, round=0.00001,
                               tooltip="EMA of the weights (paper 0.9999, with warm-up). The saved model holds the "
                                       "EMA weights. 0 turns EMA off (saves memory; for short runs)."),
                io.Boolean.Input("cache_latents", default=True,
                                 tooltip="Encode every image and instruction once, then train from the cache "
                                         "(much faster; augmentations applied to the latents). Where the cache "
                                         "lives: cache_location."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Recompute activations in the backward pass: less memory, ~30% slower."),
                io.Int.Input("lora_rank", default=16, min=1, max=512,
                             tooltip="LoRA rank (mode lora only). Higher = more capacity, bigger file."),
                io.Int.Input("checkpoint_every", default=500, min=0, max=10_000_000,
                             tooltip="Write the checkpoint and the resumable state every N steps (0 = at the end "
                                     "only). Cancelling also writes both."),
                io.Int.Input("validation_every", default=0, min=0, max=10_000_000,
                             tooltip="Edit the first dataset rows every N steps and add them to the validation "
                                     "grid (0 = once, at the end)."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue the saved run of this checkpoint_name if there is one (only with "
                                         "the model and dataset it was trained from); off starts over and "
                                         "overwrites it."),
                io.Int.Input("validation_count", default=4, min=0, max=64, optional=True,
                             tooltip="How many dataset rows the validation grid edits."),
                io.Int.Input("validation_steps", default=20, min=1, max=200, optional=True,
                             tooltip="Sampling steps of each validation edit."),
                io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip="Gradient clipping norm (0 = off)."),
                io.Boolean.Input("random_flip", default=True, optional=True,
                                 tooltip="Mirror input and target together at random (the paper did)."),
                io.Combo.Input("precision", options=["auto", "fp32", "bf16", "fp16"], default="auto",
                               optional=True,
                               tooltip="auto: bf16 autocast on GPUs that have it, fp32 on CPU."),
                io.Combo.Input("cache_location", options=list(CACHE_LOCATIONS), default="auto", optional=True,
                               tooltip="Where the latent cache lives. auto: in memory while it fits a quarter of "
                                       "the free RAM, else on disk. disk: memory-mapped files under "
                                       "output/ip2p_train/latent_cache/ (reused by later runs on the same dataset "
                                       "and VAE, and after a crash). Same results either way."),
                io.Boolean.Input("masked_loss", default=False, optional=True,
                                 tooltip="Rows with a mask (MagicBrush, UltraEdit) weigh the loss by it: full "
                                         "inside the edited region, outside_mask_weight elsewhere. Rows without "
                                         "a mask train as usual."),
                io.Float.Input("outside_mask_weight", default=0.1, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="With masked_loss: the loss weight outside the mask (0 ignores it; 1 is "
                                       "the plain loss)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The trained model (EMA weights), ready for "
                                                              "InstructEdit."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step (and smoothed)."),
                io.Image.Output(display_name="validation", tooltip="Rows: input, target, edits after each "
                                                                   "validation."),
                io.String.Output(display_name="checkpoint_name",
                                 tooltip="The written file, as the checkpoint (or LoRA) loaders list it."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    @named_errors("TrainIP2P")
    def execute(cls, model, clip, vae, dataset, checkpoint_name, mode, steps, batch_size, grad_accumulation,
                learning_rate, resolution, seed, ema_decay, cache_latents, gradient_checkpointing, lora_rank,
                checkpoint_every, validation_every, resume, validation_count=4, validation_steps=20,
                max_grad_norm=1.0, random_flip=True, precision="auto", cache_location="auto", masked_loss=False,
                outside_mask_weight=0.1) -> io.NodeOutput:
        config = TrainConfig(
            steps=steps, batch_size=batch_size, grad_accumulation=grad_accumulation, learning_rate=learning_rate,
            resolution=resolution, seed=seed, ema_decay=ema_decay, cache_latents=cache_latents,
            gradient_checkpointing=gradient_checkpointing, mode=mode, lora_rank=lora_rank,
            lora_alpha=float(lora_rank), checkpoint_every=checkpoint_every,
            validation_every=validation_every or (steps if validation_count else 0),
            validation_count=validation_count, validation_steps=validation_steps, max_grad_norm=max_grad_norm,
            random_flip=random_flip, precision=precision, cache_location=cache_location, masked_loss=masked_loss,
            outside_mask_weight=outside_mask_weight)
        outcome = train_from_node(model, clip, vae, dataset, config, checkpoint_name, resume,
                                  node_id=cls.hidden.unique_id if cls.hidden else None)
        return io.NodeOutput(outcome.model, outcome.loss_image, outcome.validation_image, outcome.model_path.name,
                             ui=ui.PreviewImage(outcome.loss_image, cls=cls))


NODES = [TrainIP2P]
