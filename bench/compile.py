"""Seconds per InstructPix2Pix edit with core's TorchCompileModel (inductor) in front of the edit, for our
InstructEdit and for core's hand-wired graph, each against its uncompiled self, in one process.

    source .runtime/env.sh && python bench/compile.py --size tiny --res 256 --steps 4 --threads 1
    source .runtime/env.sh && python bench/compile.py --device cuda --size full --res 512 --steps 20

Four variants on one loaded random checkpoint (bench/edit.py's `sd15_layout`, same image, s_I 1.5, s_T 7.5,
euler_ancestral, normal scheduler, one seed):
  ours        InstructEdit.execute on the loaded MODEL/CLIP/VAE
  ours+tc     the same MODEL through TorchCompileModel(backend) first
  core        core nodes by hand: CLIPTextEncode x2 -> InstructPixToPixConditioning -> DualCFGGuider (regular,
              cfg_conds s_T, cfg_cond2_negative s_I) -> SamplerCustomAdvanced -> VAEDecode: the same edit as ours
  core+tc     the same through TorchCompileModel(backend)

Unlike edit.py (one interpreter per variant), everything runs in one process so the compiled and the eager
timings share the machine's state: a compiled variant's first edit (the compilation) is timed on its own, then
`--repeats` rounds time one edit of each variant in turn (alternating spreads other people's load evenly on a
shared machine); medians are reported, with ratios against `core`, the anchor. Two phases: (1) ours, ours+tc
and core, (2) core and core+tc; `core` is timed in both and its runs pooled. The phases keep core+tc's
compilation away from ours+tc's timing: where core's graph breaks (on CPU its sub-quadratic attention asks
psutil for free memory in every attention call), Dynamo marks the UNet's forward code to run eagerly for the
whole process, so every compiled MODEL sampled afterwards, ours included, runs the UNet as many small graphs.
Compiled regions per UNet call are counted from the profiler ("Torch-Compiled Region" events, one untimed
1-step edit at the end of each phase, and once more for ours+tc after core+tc was compiled): 1 means Dynamo
captured the whole UNet; more means graph breaks split it (the parts between run eagerly).
A benchmark, never a test: the correctness of the chaining is tests/comfy/test_compile_chaining.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import CpuClock, call_node, fmt, format_table, median, ratio, timed
from edit import (
    IMAGE_SCALE,
    REPO,
    SAMPLER,
    SCHEDULER,
    TEXT_SCALE,
    Context,
    LoopProbe,
    boot_comfy,
    comfy_dtypes,
    core_graph_edit,
    instruct_edit,
    load_comfy_models,
    load_image,
    prepare,
)

ANCHOR = "core"
Edit = Callable[[Any, int], torch.Tensor]  # (MODEL, steps) -> IMAGE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny", help="random model layout")
    parser.add_argument("--res", type=int, default=256, help="square edit resolution (multiple of 64)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps of every timed edit")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (one edit per variant each)")
    parser.add_argument("--backend", choices=("inductor", "cudagraphs"), default="inductor",
                        help="TorchCompileModel's backend (its two choices; cudagraphs needs CUDA)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch's default); 1 is steadier on a busy 2-core machine")
    parser.add_argument("--attention", choices=("default", "pytorch"), default="default",
                        help="ComfyUI's attention: its own choice (on CPU sub-quadratic, which the pack's "
                             "nodes replace by the fused kernel) or PyTorch's fused SDPA for every variant")
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep inductor's on-disk caches (TORCHINDUCTOR_CACHE_DIR or /tmp/torchinductor_<user>): "
                             "'compile s' then shows a repeat compilation; by default a fresh cache dir in the "
                             "workdir, so it shows a first-time compilation")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="ComfyUI base dir for the checkpoint and image: kept and reused when given")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output; default bench/results/compile-<size>-<res>.json")
    args = parser.parse_args(argv)
    if args.res % 64:
        parser.error("--res must be a multiple of 64 (the reference resize rounds to 64)")
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1")
    if args.backend == "cudagraphs" and args.device != "cuda":
        parser.error("--backend cudagraphs needs --device cuda")
    return args


# --- the two edits -------------------------------------------------------------------------------------------

# --- measuring -----------------------------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    edit: Edit
    model: Any  # the MODEL the edit gets (compiled variants: TorchCompileModel's output)
    probe: LoopProbe
    compiled: bool
    runs: list[float] = field(default_factory=list)
    cpu: CpuClock = field(default_factory=CpuClock)
    first_edit: float | None = None  # the warm-up edit; compiled variants compile in it
    graphs: dict[str, int] = field(default_factory=dict)
    regions_per_call: int | None = None
    output: torch.Tensor | None = None

    def run(self, steps: int) -> torch.Tensor:
        return self.edit(self.model, steps)


def dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": sum(counters["graph_break"].values())}


def make_variants(ctx: Context, model, clip, vae) -> list[Variant]:
    (compiled,) = call_node(ctx.nodes["TorchCompileModel"], model=model, backend=ctx.args.backend)
    variants = []
    for name, edit in (("ours", instruct_edit(ctx, clip, vae)), ("core", core_graph_edit(ctx, clip, vae))):
        for is_compiled, base in ((False, model), (True, compiled)):
            probe = LoopProbe(ctx.device)
            label = f"{name}+tc" if is_compiled else name
            # LoopProbe clones the MODEL (TorchCompileModel's wrapper travels with the clone) to time the loop.
            variants.append(Variant(label, edit, probe.instrument(base, count_calls=False), probe, is_compiled))
    return variants


def warm_up(variant: Variant, steps: int, device: str) -> None:
    """First edit: for a compiled variant this is where Dynamo traces and the backend compiles."""
    before = dynamo_counts()
    variant.first_edit, _ = timed(lambda: variant.run(steps), device)
    after = dynamo_counts()
    variant.graphs = {key: after[key] - before[key] for key in after}
    variant.probe.loops.clear()
    print(f"[compile] {variant.name}: first edit {variant.first_edit:.2f} s, {variant.graphs}", file=sys.stderr,
          flush=True)


def count_regions(variant: Variant) -> int:
    """Compiled frames entered in one UNet call: one untimed 1-step edit under the profiler (one batched UNet
    call per step for both graphs; edit.py counts it)."""
    timed_loops = len(variant.probe.loops)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        variant.run(1)
    del variant.probe.loops[timed_loops:]  # this 1-step loop is not one of the timed edits
    return sum(event.name.startswith("Torch-Compiled Region") for event in profile.events())


def phase(ctx: Context, variants: list[Variant]) -> None:
    """Warm-up (compilation) of the variants not yet run, alternating timed rounds, then the region count."""
    steps = ctx.args.steps
    for variant in variants:
        if variant.first_edit is None:
            warm_up(variant, steps, ctx.device)
    for _ in range(ctx.args.repeats):
        for variant in variants:
            with variant.cpu:
                seconds, variant.output = timed(lambda v=variant: v.run(steps), ctx.device)
            variant.runs.append(seconds)
    for variant in variants:
        if variant.compiled:
            variant.regions_per_call = count_regions(variant)
    # Figures as soon as a phase ends, so a run stopped by a timeout (bench/gpu.sh) still reports them.
    print("[compile] phase: " + "; ".join(f"{v.name} {fmt(median(v.runs))} s/edit" for v in variants),
          file=sys.stderr, flush=True)


def measure(ctx: Context, variants: list[Variant]) -> int:
    """Both phases; returns ours+tc's compiled regions per UNet call once core+tc has been compiled."""
    by_name = {v.name: v for v in variants}
    with torch.inference_mode():
        phase(ctx, [by_name["ours"], by_name["ours+tc"], by_name["core"]])
        phase(ctx, [by_name["core"], by_name["core+tc"]])
        return count_regions(by_name["ours+tc"])


# --- report --------------------------------------------------------------------------------------------------

def relative(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    if a is None or b is None:
        return None
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def summary(variant: Variant, steps: int) -> dict[str, Any]:
    edit = median(variant.runs)
    out = {"seconds_per_edit": edit, "seconds_per_step": median(variant.probe.loops) / steps, "runs": variant.runs,
           "cpu_seconds_per_edit": median(variant.cpu.samples), "first_edit_seconds": variant.first_edit,
           "dynamo": variant.graphs, "compiled_regions_per_unet_call": variant.regions_per_call}
    # The compilation's cost: the first edit beyond an ordinary one (tracing + the backend's code generation).
    out["compile_seconds"] = variant.first_edit - edit if variant.compiled and variant.first_edit else None
    return out


def table(summaries: dict[str, dict[str, Any]]) -> str:
    anchor = summaries[ANCHOR]
    rows = []
    for name, s in summaries.items():
        eager = summaries[name.removesuffix("+tc")]
        rows.append([
            name, fmt(s["seconds_per_edit"]), fmt(s["seconds_per_step"], ".4f"), fmt(s["cpu_seconds_per_edit"]),
            f"{fmt(ratio(s['seconds_per_edit'], anchor['seconds_per_edit']), '.2f')} / "
            f"{fmt(ratio(s['seconds_per_step'], anchor['seconds_per_step']), '.2f')}",
            f"{fmt(ratio(s['seconds_per_edit'], eager['seconds_per_edit']), '.2f')} / "
            f"{fmt(ratio(s['seconds_per_step'], eager['seconds_per_step']), '.2f')}",
            fmt(s["compile_seconds"], ".1f"),
            "-" if s["compiled_regions_per_unet_call"] is None else str(s["compiled_regions_per_unet_call"]),
            "-" if not s["dynamo"].get("graphs") else f"{s['dynamo']['graphs']} / {s['dynamo']['graph_breaks']}",
        ])
    headers = ["variant", "s/edit", "s/step", "CPU s/edit", "vs core edit/step", "vs eager edit/step",
               "compile s", "compiled regions/UNet call", "graphs / breaks"]
    return format_table(headers, rows)


def report(args: argparse.Namespace, summaries: dict[str, dict[str, Any]], errors: dict[str, float | None],
           dtypes: dict[str, str]) -> str:
    title = (f"TorchCompileModel({args.backend}) chained into the edit: {args.size} SD1.5-IP2P (random), "
             f"{args.res}x{args.res}, {args.steps} steps, {SAMPLER}/{SCHEDULER}, s_I {IMAGE_SCALE}, s_T {TEXT_SCALE}, "
             f"{args.device}, attention {args.attention}, threads {args.threads or torch.get_num_threads()}, "
             f"median of {args.repeats} alternating rounds; dtypes {dtypes}")
    notes = ["s/step = the sampling loop only; 'compile s' = first compiled edit minus the median edit.",
             "compiled regions/UNet call: 1 = the whole UNet in one compiled graph; more = graph breaks. ours+tc "
             f"after core+tc was compiled: {summaries['ours+tc']['compiled_regions_per_unet_call_after_core_compiled']}"
             " (timed before that, in phase 1).",
             "max relative image difference: " + ", ".join(f"{k} {fmt(v, '.2e')}" for k, v in errors.items())]
    return "\n".join([title, table(summaries), *notes])


def save_json(args: argparse.Namespace, summaries: dict, errors: dict, text: str) -> Path:
    out = args.out or REPO / "bench" / "results" / f"compile-{args.size}-{args.res}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"settings": settings, "torch": torch.__version__, "variants": summaries, "image_errors": errors,
               "table": text}
    out.write_text(json.dumps(payload, indent=2))
    return out


# --- main ----------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> str:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    nodes = boot_comfy(args, with_nodes=True)
    started = time.perf_counter()
    prepare(args)
    ctx = Context(args, args.workdir, args.device, load_image(args), nodes)
    model, clip, vae = load_comfy_models(ctx)
    print(f"[compile] checkpoint ready and loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr,
          flush=True)
    variants = make_variants(ctx, model, clip, vae)
    ours_after_core = measure(ctx, variants)
    by_name = {v.name: v for v in variants}
    summaries = {v.name: summary(v, args.steps) for v in variants}
    errors = {"ours+tc vs ours": relative(by_name["ours+tc"].output, by_name["ours"].output),
              "core+tc vs core": relative(by_name["core+tc"].output, by_name["core"].output),
              "ours vs core": relative(by_name["ours"].output, by_name["core"].output)}
    summaries["ours+tc"]["compiled_regions_per_unet_call_after_core_compiled"] = ours_after_core
    text = report(args, summaries, errors, comfy_dtypes(model, clip, vae))
    print(text)
    print(f"[compile] JSON: {save_json(args, summaries, errors, text)}", file=sys.stderr)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    temporary = args.workdir is None
    args.workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="ip2p-bench-compile-"))).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not args.warm_cache:
        # Emptied first: a kept --workdir would otherwise hand the second run a warm cache. Inductor reads the
        # variable when it first caches, long after this point.
        cache = args.workdir / "inductor-cache"
        shutil.rmtree(cache, ignore_errors=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    run(args)
    if temporary:
        shutil.rmtree(args.workdir, ignore_errors=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # As edit.py's children: skip interpreter teardown (ComfyUI's ModelPatcher.__del__ raises at shutdown).
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
