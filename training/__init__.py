"""The InstructPix2Pix trainer, pure torch (no ComfyUI import), shared by the TrainIP2P node and the CLI.

config (hyper-parameters), data (lazy dataset rows -> augmented, encoded batches), latent_cache (latents and
text embeddings encoded once, in memory or in memory-mapped chunk files on disk), dropout (the paper's
conditioning dropout), objective (noising and eps/v targets), ema, trainer (the loop, accumulation,
clipping, autocast, masked loss, DistributedDataParallel, resumable state and data order), distributed (the
process's place, its device and the process group of every multi-process command), rendezvous (processes
meeting at the end of a job), files (atomic writes), plots (loss curve, validation grid), identity (run ids and
resume fingerprints). The ComfyUI side is pipeline/train.py (with pipeline/trainee.py, lora.py and memory.py);
the command line is cli/train.py.
"""
