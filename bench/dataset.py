"""Speed of the dataset engine, as ratios measured in one run (one process, variants alternated).

    .runtime/venv/bin/python bench/dataset.py                    # CPU, tiny random model: ~3-5 min on 2 cores
    .runtime/venv/bin/python bench/dataset.py --device cuda --model full --sizes 512 --steps 20 --sections p2p

Sections (--sections p2p,clip,llm):
  p2p   Prompt-to-Prompt pair generation, one sample = [source; edit] x [cond; uncond], euler_ancestral, all on
        the same loaded model, sigmas and start noise; every attention call on PyTorch's fused SDPA unless said:
          plain      the same two images without sharing (ComfyUI's CFGGuider, scalar CFG)
          fused      P2P with p = 1 (sharing at every step but the last; all of a 1-step run), a CFG per row,
                     sharing as attention(q_src, k_src, v_edit) (pipeline/p2p.py's patch, SharedSelfAttention)
          explicit   the same sharing through an explicit softmax(q k^T / sqrt(d)) @ v, as Prompt-to-Prompt
                     implementations that edit the attention probabilities do
          shipped    P2P exactly as P2PPairGenerator samples (pipeline.p2p.sharing_model picks the kernel);
                     shipped / fused > 1 on CPU means the pipeline is not on the fused kernel
        plain and shipped run at --plain-size only. Time is the sampling loop (median of --repeats); memory is
        the peak above the level before the loop (RSS high-water mark reset through /proc/self/clear_refs on
        CPU, torch's CUDA peak on GPUs); "whole-process" ratios add the resident model to both sides.
  clip  CLIP filter scoring (pipeline.clip_filter.score_rows: decode, resize, encode, four scores) of
        --clip-pairs pairs: batches of 32 vs one pair per call; random CLIP (tiny, or ViT-B-32's shape).
  llm   Instruction generation (dataset.instructions.generate_instructions) for --llm-captions captions
        against testing.openai_server.FakeOpenAIServer with --llm-delay s per request: concurrency 8 vs 1.

Targets (from the issue): fused / plain <= 1.05x in time and peak memory (sharing adds no FLOPs); explicit /
fused large at 512 px (4096 tokens, a 4 x 8 x 4096 x 4096 attention matrix per self-attention call).
A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from common import fmt, format_table, ratio, synchronize

REPO = Path(__file__).resolve().parent.parent
SAMPLER, SCHEDULER, CFG = "euler_ancestral", "normal", 7.5
CAPTIONS = ("a photograph of a house by a lake", "a photograph of a house by a lake in winter")
TINY_CLIP = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=("tiny", "full"), default="tiny", help="random SD1.5 t2i layout")
    parser.add_argument("--sections", default="p2p,clip,llm")
    parser.add_argument("--sizes", default="256,512", help="P2P image sizes in px (comma list)")
    parser.add_argument("--plain-size", type=int, default=256, help="size at which plain and shipped also run")
    parser.add_argument("--steps", default="1", help="sampling steps per size (comma list, or one for all)")
    parser.add_argument("--repeats", default="2,1", help="timed runs per variant and size (median reported)")
    parser.add_argument("--samples", type=int, default=1, help="P2P samples per model batch")
    parser.add_argument("--clip", choices=("tiny", "ViT-B-32"), default="tiny")
    parser.add_argument("--clip-pairs", type=int, default=64)
    parser.add_argument("--llm-captions", type=int, default=32)
    parser.add_argument("--llm-delay", type=float, default=0.1, help="seconds the fake server waits per request")
    parser.add_argument("--precision", choices=("fp32", "auto", "bf16", "fp16"), default="fp32",
                        help="compute precision of every P2P variant (the Compute Precision patch)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: steady on a shared machine; 0 keeps torch's choice)")
    parser.add_argument("--workdir", type=Path, default=None, help="ComfyUI base dir to use (default: a temp dir)")
    return parser.parse_args(argv)


def per_size(text: str, count: int) -> list[int]:
    values = [int(v) for v in text.split(",")]
    return values * count if len(values) == 1 else values[:count]


# --- memory ---------------------------------------------------------------------------------------------------

def _status_mb(name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS, so one variant's leftovers do not hide the next one's peak."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak on GPUs, RSS high-water mark on CPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.mb = float("nan")

    def __enter__(self) -> PeakMemory:
        _trim_heap()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated() / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self._base = _status_mb("VmRSS")
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20 - self._base
        else:
            self.mb = _status_mb("VmHWM") - self._base


def measure(call: Callable[[], Any], device: str) -> tuple[float, float]:
    """(seconds, peak MB above the start) of one call."""
    with PeakMemory(device) as memory:
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        seconds = time.perf_counter() - start
    return seconds, memory.mb


# --- ComfyUI ----------------------------------------------------------------------------------------------------

def boot(args: argparse.Namespace) -> Path:
    from comfyui_ip2p.cli import runtime
    from comfyui_ip2p.testing.comfy_server import link_pack

    base = args.workdir or Path(tempfile.mkdtemp(prefix="ip2p-bench-dataset-"))
    link_pack(base)
    runtime.boot(base, cpu=args.device == "cpu")
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    return base


def load_t2i(base: Path, size: str) -> tuple:
    import comfy.sd
    from comfyui_ip2p.testing.tiny_models import write_checkpoint

    path = base / "models" / "checkpoints" / f"bench_t2i_{size}.safetensors"
    if not path.exists():
        write_checkpoint(path, "t2i", size, seed=3)
    return tuple(comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3])


def always_sdpa(model):
    """A clone whose every attention call runs on PyTorch's fused SDPA (ComfyUI's CPU default builds matrices)."""
    import comfy.ldm.modules.attention as attention

    def override(_func, *args, **kwargs):
        return attention.attention_pytorch(*args, **kwargs)

    patched = model.clone()
    patched.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return patched


class PairSampler:
    """The ways to draw one batch of pairs, on the same model, conds, sigmas and start noise."""

    def __init__(self, model, clip, samples: int) -> None:
        from comfyui_ip2p.pipeline.edit import encode_text
        from comfyui_ip2p.pipeline.p2p import stack_conditioning

        self.model, self.samples = model, samples
        self.sdpa = always_sdpa(model)
        source, edit = (encode_text(clip, caption) for caption in CAPTIONS)
        self.positive = stack_conditioning([source] * samples + [edit] * samples)
        self.negative = encode_text(clip, "")

    def guider(self, variant: str):
        import comfy.samplers
        from comfyui_ip2p.pipeline.p2p import P2PGuider, patch_sharing, sharing_model
        from comfyui_ip2p.testing.attention import explicit_attention

        if variant == "plain":
            guider = comfy.samplers.CFGGuider(self.sdpa)
            guider.set_cfg(CFG)
            return guider
        p = [1.0] * self.samples
        if variant == "shipped":
            model = sharing_model(self.model, p)
        else:
            model = patch_sharing(self.sdpa, p, attn_fn=explicit_attention if variant == "explicit" else None)
        guider = P2PGuider(model)
        guider.set_cfg([CFG] * 2 * self.samples)
        return guider

    def run(self, variant: str, size: int, steps: int) -> torch.Tensor:
        import comfy.samplers
        from comfyui_ip2p.pipeline.edit import SamplingSettings, sigmas_for
        from comfyui_ip2p.pipeline.noise import SharedNoise, shared_noise_sampler_object

        sigmas = sigmas_for(self.model, SamplingSettings(steps=steps, scheduler=SCHEDULER))
        noise = SharedNoise(list(range(self.samples)), (4, size // 8, size // 8))
        start = noise.draw()
        guider = self.guider(variant)
        guider.set_conds(self.positive, self.negative)
        if variant == "plain":
            sampler = comfy.samplers.sampler_object(SAMPLER)
        else:
            sampler = shared_noise_sampler_object(SAMPLER, noise, sigmas)
        return guider.sample(start, torch.zeros_like(start), sampler, sigmas, seed=0, disable_pbar=True)


# --- sections ---------------------------------------------------------------------------------------------------

P2P_VARIANTS = ("plain", "fused", "explicit", "shipped")


def bench_p2p(args: argparse.Namespace, base: Path) -> list[dict[str, Any]]:
    from comfyui_ip2p.pipeline.precision import with_precision

    model, clip, _vae = load_t2i(base, args.model)
    pairs = PairSampler(with_precision(model, args.precision), clip, args.samples)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    with torch.no_grad():
        for variant in P2P_VARIANTS:  # warm-up: model on the device, kernels chosen, patches built once
            pairs.run(variant, 64, 1)
        for size, steps, repeats in zip(sizes, per_size(args.steps, len(sizes)), per_size(args.repeats, len(sizes)),
                                        strict=True):
            variants = P2P_VARIANTS if size == args.plain_size else ("fused", "explicit")
            runs: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
            for _ in range(repeats):
                for variant in variants:  # alternated, so load swings hit every variant alike
                    runs[variant].append(measure(lambda v=variant, px=size, n=steps: pairs.run(v, px, n),
                                                 args.device))
                    print(f"  p2p {size}px {variant}: {runs[variant][-1][0]:.2f} s, "
                          f"+{runs[variant][-1][1]:.0f} MB", flush=True)
            results.append({"size": size, "steps": steps, "repeats": repeats, "samples": args.samples,
                            **{v: {"seconds": statistics.median(r[0] for r in runs[v]),
                                   "peak_mb": statistics.median(r[1] for r in runs[v])} for v in variants}})
    return results


def random_rows(count: int) -> list:
    import numpy as np
    from comfyui_ip2p.dataset.records import EditRow
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for n in range(count):
        images = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(2)]
        rows.append(EditRow(f"{CAPTIONS[0]} {n}", "make it winter", f"{CAPTIONS[1]} {n}", *images, seed=n))
    return rows


def clip_encoder(args: argparse.Namespace):
    """A random CLIP (nothing downloaded) in the ClipEncoder the filter node uses."""
    import open_clip
    from comfyui_ip2p.dataset.clip_filter import ClipEncoder

    torch.manual_seed(1)
    if args.clip == "tiny":
        return ClipEncoder(open_clip.CLIP(**TINY_CLIP).to(args.device))
    model = open_clip.create_model(args.clip, pretrained=None, device=args.device)
    return ClipEncoder(model, tokenizer=open_clip.get_tokenizer(args.clip))


def bench_clip(args: argparse.Namespace) -> dict[str, Any]:
    from comfyui_ip2p.pipeline import clip_filter as clip_work

    encoder = clip_encoder(args)
    rows = random_rows(args.clip_pairs)
    clip_work.score_rows(encoder, rows[:4], 4)  # warm-up
    seconds: dict[int, list[float]] = {32: [], 1: []}
    with torch.no_grad():
        for _ in range(3):
            for batch in seconds:
                start = time.perf_counter()
                clip_work.score_rows(encoder, rows, batch)
                seconds[batch].append(time.perf_counter() - start)
    return {"clip": args.clip, "pairs": len(rows),
            **{f"batch_{b}": len(rows) / statistics.median(s) for b, s in seconds.items()}}


def bench_llm(args: argparse.Namespace) -> dict[str, Any]:
    from comfyui_ip2p.dataset.instructions import generate_instructions
    from comfyui_ip2p.dataset.llm_client import Endpoint
    from comfyui_ip2p.testing.openai_server import FakeOpenAIServer

    result: dict[str, Any] = {"captions": args.llm_captions, "delay_s": args.llm_delay}
    with FakeOpenAIServer(delay=args.llm_delay) as server:
        endpoint = Endpoint(model="fake-model", base_url=server.base_url, api_key_env=None)
        for concurrency in (1, 8):
            captions = [f"a photograph of house number {n} (run {concurrency})" for n in range(args.llm_captions)]
            start = time.perf_counter()
            done = generate_instructions(captions, endpoint, concurrency=concurrency, cache_path=None)
            seconds = time.perf_counter() - start
            if done.stats.ok != len(captions):
                raise RuntimeError(f"instruction generation failed: {done.stats.summary()}")
            result[f"concurrency_{concurrency}"] = len(captions) / seconds
        result["max_in_flight"] = server.max_in_flight
    return result


# --- report -----------------------------------------------------------------------------------------------------

def _get(result: dict[str, Any], variant: str, key: str) -> float | None:
    return result[variant][key] if variant in result else None


def _x(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else fmt(value, spec) + "x"


def p2p_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        seconds = {v: _get(r, v, "seconds") for v in P2P_VARIANTS}
        peak = {v: _get(r, v, "peak_mb") for v in P2P_VARIANTS}
        whole = {v: None if peak[v] is None else peak[v] + r["base_mb"] for v in P2P_VARIANTS}
        rows.append([
            f"{r['size']} px, {r['steps']} step(s)",
            " / ".join(fmt(seconds[v], ".2f") for v in P2P_VARIANTS),
            " / ".join(fmt(peak[v], ".0f") for v in P2P_VARIANTS),
            _x(ratio(seconds["fused"], seconds["plain"]) if seconds["plain"] else None, ".3f"),
            _x(ratio(whole["fused"], whole["plain"]) if whole["plain"] else None, ".3f"),
            _x(ratio(seconds["explicit"], seconds["fused"])),
            _x(ratio(peak["explicit"], peak["fused"]), ".1f"),
            _x(ratio(seconds["shipped"], seconds["fused"]) if seconds["shipped"] else None),
        ])
    headers = ["size", "s: plain / fused / explicit / shipped", "peak +MB: same order", "fused/plain time",
               "fused/plain whole-process peak", "explicit/fused time", "explicit/fused +MB", "shipped/fused time"]
    return format_table(headers, rows)


def throughput_table(clip: dict[str, Any] | None, llm: dict[str, Any] | None) -> str:
    rows = []
    if clip:
        rows.append([f"CLIP filter ({clip['clip']} random CLIP, {clip['pairs']} pairs)", "pairs/s",
                     f"{clip['batch_32']:.1f} (batch 32)", f"{clip['batch_1']:.1f} (one by one)",
                     fmt(ratio(clip["batch_32"], clip["batch_1"]), ".1f") + "x"])
    if llm:
        rows.append([f"instructions ({llm['captions']} captions, {llm['delay_s']} s/request, "
                     f"max {llm['max_in_flight']} in flight)", "captions/s", f"{llm['concurrency_8']:.1f} (8 at once)",
                     f"{llm['concurrency_1']:.1f} (sequential)",
                     fmt(ratio(llm["concurrency_8"], llm["concurrency_1"]), ".1f") + "x"])
    return format_table(["what", "unit", "ours", "baseline", "speed-up"], rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sections = set(args.sections.split(","))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base = boot(args) if sections & {"p2p", "clip"} else None
    results: dict[str, Any] = {"device": args.device, "model": args.model, "threads": torch.get_num_threads(),
                               "torch": torch.__version__,
                               "date": datetime.now(UTC).isoformat(timespec="seconds")}
    if "p2p" in sections:
        results["p2p"] = bench_p2p(args, base)
        # Whole-process peak ratio: the model and everything else resident count for both variants alike.
        resident = _status_mb("VmRSS") if args.device == "cpu" else torch.cuda.memory_allocated() / 2**20
        for r in results["p2p"]:
            r["base_mb"] = resident
    if "clip" in sections:
        results["clip"] = bench_clip(args)
    if "llm" in sections:
        results["llm"] = bench_llm(args)
    tables = []
    if "p2p" in results:
        title = (f"P2P on the {args.model} random SD1.5 model, {args.device}, {args.samples} sample(s) = "
                 f"{4 * args.samples} UNet rows per step, {SAMPLER}, {torch.get_num_threads()} CPU thread(s):")
        tables.append(title + "\n" + p2p_table(results["p2p"]))
    if "clip" in results or "llm" in results:
        tables.append(throughput_table(results.get("clip"), results.get("llm")))
    print("\n\n".join(tables))
    print(f"\n({time.perf_counter() - started:.0f} s in all)")
    out = REPO / "bench" / "results" / f"dataset-{args.device}-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**results, "tables": tables}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
