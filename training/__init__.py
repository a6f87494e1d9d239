"""The InstructPix2Pix trainer, pure torch (no ComfyUI import), shared by the TrainIP2P node and the CLI.

config (hyper-parameters), data (datasets -> augmented, encoded batches; latent cache), dropout (the paper's
conditioning dropout), objective (noising and eps/v targets), ema, trainer (the loop, accumulation,
clipping, autocast, resumable state), distributed (data-parallel over torch.distributed), files (atomic
writes), plots (loss curve, validation grid), synthetic (a learnable toy task and toy model), cli (command
line; boots ComfyUI only when it runs). The ComfyUI side is pipeline/train_glue.py.
"""
