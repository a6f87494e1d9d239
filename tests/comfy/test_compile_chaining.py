"""Core's TorchCompileModel chained into the pack's sampling nodes: the compiled UNet is what runs, and the
result is the uncompiled node's result.

TorchCompileModel clones the MODEL and adds an APPLY_MODEL wrapper (key "torch.compile") that swaps the
diffusion model for `torch.compile(diffusion_model, backend=...)` while the model runs. The pack's nodes clone
the MODEL again (InstructEdit, DualCFGSampler and IP2PGuider add a fused-attention override on CPU; the
P2PPairGenerator adds attn1 replace patches), so each case checks that the wrapper survives those clones and
that the compiled code actually executes.

Two backends:
- testing/compile_probe's registered backend, passed by name through the node's own `execute`: it records the
  graphs Dynamo captures and runs them eagerly, so results must be bit-identical to the uncompiled node, and
  each UNet call's compiled graph runs are counted (a model_function_wrapper, outside the compiled region).
- "inductor", chosen in the node's combo and run through ComfyUI's executor, on all three IP2P routes: the
  profiler shows inductor's compiled graph running once per UNet call, and the latents match within a float
  tolerance (inductor fuses and reorders float32 arithmetic).
"""

from __future__ import annotations

import pytest
import torch
from comfyui_ip2p.testing import chain_graphs
from comfyui_ip2p.testing.compile_probe import BACKEND, probe
from comfyui_ip2p.testing.threads import torch_threads

STEPS = 2
SAMPLING = {"steps": STEPS, "seed": 7, "sampler_name": "euler_ancestral", "scheduler": "normal",
            "image_guidance": 1.5, "text_guidance": 7.5}
FUSED = "scaled_dot_product_attention"
# Inductor vs eager, relative latent error. Inductor fuses and reorders float32 arithmetic (reductions in
# GroupNorm and softmax, matmul blocking: ~1e-7 relative per op); the s_T = 7.5 text term (a difference of two
# close predictions) and the ancestral steps amplify that: measured 4.3e-6 on every route here. 1e-4 leaves a
# ~20x margin and stays 10x below chain_graphs.CHANGED (1e-3, the smallest move the chaining tests count as a
# patch acting), so a compiled graph that dropped a patch or the seed would not pass as equal.
INDUCTOR_TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo_one_thread():
    """Dynamo's caches are per process: start and leave this module with none, so the per-function recompile
    limit does not depend on test order. One thread: the tiny model's ops gain nothing from a second one and
    spin at barriers while another process holds a core (measured: an edit 0.85 s instead of ~10 s)."""
    torch._dynamo.reset()
    with torch_threads(1):
        yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def ip2p(comfy_nodes, tiny_ip2p_ckpt) -> tuple:
    return tuple(comfy_nodes["LoadIP2PModel"].execute(tiny_ip2p_ckpt).result)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))


def compiled(comfy_nodes, model, backend: str = BACKEND):
    """Core's TorchCompileModel, called as ComfyUI's executor calls a V3 node."""
    return comfy_nodes["TorchCompileModel"].execute(model, backend).result[0]


def compare(comfy_nodes, model, run) -> tuple:
    """`run(model)` on the plain MODEL and on TorchCompileModel's output, each with its UNet calls logged:
    (plain output, compiled output, the compiled run's calls, the plain run's calls)."""
    counted, plain_calls = probe().count_unet_calls(model)
    plain = run(counted)
    counted, calls = probe().count_unet_calls(model)
    out = run(compiled(comfy_nodes, counted))
    return plain, out, calls, plain_calls


def assert_whole_unet_compiled(calls: list[list[int]], plain_calls: list[list[int]]) -> None:
    # One batched UNet call per step (the guider's contract), each running exactly one captured graph: the
    # whole UNet forward was captured, with no graph break and nothing left to eager Python.
    assert len(calls) == STEPS and all(len(graphs) == 1 for graphs in calls), calls
    assert plain_calls == [[]] * STEPS, "the uncompiled run must run no compiled graph (the count discriminates)"
    # The pack's CPU attention override (pipeline/attention.py) was traced into the compiled graph: ComfyUI's
    # own CPU kernel (sub-quadratic) calls no fused attention.
    assert FUSED in probe().operations_run(calls)


def test_instruct_edit_runs_the_compiled_unet(comfy_nodes, ip2p, pixels):
    _, clip, vae = ip2p

    def run(model, seed: int = SAMPLING["seed"]):
        images, latent = comfy_nodes["InstructEdit"].execute(model, clip, vae, pixels, "make it winter",
                                                             resolution=64, keep_input_size=False,
                                                             **{**SAMPLING, "seed": seed}).result
        return images, latent["samples"]

    (images, latent), (c_images, c_latent), calls, plain_calls = compare(comfy_nodes, ip2p[0], run)
    assert_whole_unet_compiled(calls, plain_calls)
    assert torch.equal(c_latent, latent) and torch.equal(c_images, images)
    # Another edit on the compiled MODEL reuses the graph: the node puts nothing new into what Dynamo guards
    # on (a fresh object per run would recompile each edit until Dynamo's recompile limit, 8, and then run
    # that function eagerly for the rest of the process without an error).
    captured = len(probe().graphs)
    counted, calls = probe().count_unet_calls(ip2p[0])
    run(compiled(comfy_nodes, counted), seed=8)
    assert len(probe().graphs) == captured and all(len(graphs) == 1 for graphs in calls), calls


def test_dual_cfg_sampler_runs_the_compiled_unet(comfy_nodes, ip2p, pixels):
    from comfyui_ip2p.pipeline.edit import encode_text

    _, clip, vae = ip2p
    positive, negative = encode_text(clip, "make it winter"), encode_text(clip, "")

    def run(model):
        return comfy_nodes["DualCFGSampler"].execute(model, positive, negative, image=pixels, vae=vae, denoise=1.0,
                                                     **SAMPLING).result[0]["samples"]

    plain, out, calls, plain_calls = compare(comfy_nodes, ip2p[0], run)
    assert_whole_unet_compiled(calls, plain_calls)
    assert torch.equal(out, plain)


def test_ip2p_guider_with_sampler_custom_advanced_runs_the_compiled_unet(comfy_nodes, ip2p, pixels):
    import comfy.patcher_extension
    from comfyui_ip2p.pipeline.edit import encode_image, encode_text

    _, clip, vae = ip2p
    positive, negative = encode_text(clip, "make it winter"), encode_text(clip, "")
    latent = {"samples": torch.zeros_like(encode_image(vae, pixels))}
    guiders = []

    def run(model):
        guider = comfy_nodes["IP2PGuider"].execute(model, positive, negative, 1.5, 7.5, image=pixels,
                                                   vae=vae).result[0]
        guiders.append(guider)
        sigmas = comfy_nodes["BasicScheduler"].execute(model, "normal", STEPS, 1.0).result[0]
        noise = comfy_nodes["RandomNoise"].execute(SAMPLING["seed"]).result[0]
        sampler = comfy_nodes["KSamplerSelect"].execute(SAMPLING["sampler_name"]).result[0]
        return comfy_nodes["SamplerCustomAdvanced"].execute(noise, guider, sampler, sigmas, latent).result[0]

    plain, out, calls, plain_calls = compare(comfy_nodes, ip2p[0], run)
    assert_whole_unet_compiled(calls, plain_calls)
    assert torch.equal(out["samples"], plain["samples"])
    # The guider samples with its own clone (the fused-attention override); the wrapper travelled with it.
    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    assert guiders[1].model_patcher.get_wrappers(apply_model, "torch.compile")
    assert not guiders[0].model_patcher.get_wrappers(apply_model, "torch.compile")


def test_bit_exact_comparison_tells_the_attention_kernels_apart(comfy_nodes, ip2p, pixels):
    """What makes the exact equalities above meaningful: the same edit on ComfyUI's sub-quadratic attention
    (its CPU default; set here as a user's override, which the pack leaves alone) differs from the fused
    kernel's in the last bits. So a compiled graph that had lost the pack's override could not match exactly."""
    import comfy.ldm.modules.attention as attention

    model, clip, vae = ip2p
    sub_quad = model.clone()
    sub_quad.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = (
        lambda _func, *args, **kwargs: attention.attention_sub_quad(*args, **kwargs))

    def latent(m):
        return comfy_nodes["InstructEdit"].execute(m, clip, vae, pixels, "make it winter", resolution=64,
                                                   keep_input_size=False, **SAMPLING).result[1]["samples"]

    fused, other = latent(model), latent(sub_quad)
    assert not torch.equal(fused, other)
    assert chain_graphs.relative(fused, other) < 1e-4  # the same edit: only the kernels' rounding differs


def test_p2p_pair_generator_runs_compiled_code(comfy_nodes, tiny_t2i_ckpt):
    model, clip, vae = comfy_nodes["CheckpointLoaderSimple"]().load_checkpoint(tiny_t2i_ckpt)[:3]
    settings = {"steps": STEPS, "width": 64, "height": 64, "seed": 11, "p_min": 0.1, "p_max": 0.9,
                "cfg_min": 7.5, "cfg_max": 15.0, "sampler_name": "euler_ancestral", "scheduler": "normal",
                "batch_size": 2}

    def run(m):
        return comfy_nodes["P2PPairGenerator"].execute(m, clip, vae, caption_pairs="a cat || a dog",
                                                       samples_per_pair=2, **settings).result

    (rows, sources, edits), (c_rows, c_sources, c_edits), calls, plain_calls = compare(comfy_nodes, model, run)
    assert plain_calls == [[]] * STEPS
    # Every UNet call (one batch per step: 2 samples x source/edit x cond/uncond) ran compiled graphs.
    # Not one whole-UNet graph: the attention-sharing patch turns tensors into Python numbers (the step in
    # ShareSchedule.current_step/step_index, the index checks in check_src_index/is_identity), which breaks the
    # graph inside the UNet's block loop, so Dynamo runs that loop eagerly and compiles the blocks and layers
    # under it as separate graphs (~36-54 per call measured). The sharing itself is unchanged:
    assert len(calls) == STEPS and all(calls), calls
    assert torch.equal(c_sources, sources) and torch.equal(c_edits, edits)
    assert [(r.seed, r.p, r.cfg) for r in c_rows] == [(r.seed, r.p, r.cfg) for r in rows]
    # Each run patches a fresh clone with new sharing objects; that must not recompile per run (a recompile per
    # run reaches Dynamo's recompile limit, 8, after which it runs the function eagerly without an error). The
    # second run adds one small graph (the share-index bookkeeping: arange, setitem) once; from then on the
    # captured graphs serve every run. (Other p draws may add a few graphs once, for sharing patterns not met
    # before: measured 31 graphs after the first of three 4-batch, 10-step runs with fresh draws, none later.)
    for _ in range(2):
        captured = len(probe().graphs)
        counted, calls = probe().count_unet_calls(model)
        run(compiled(comfy_nodes, counted))
        assert len(calls) == STEPS and all(calls), calls
    assert len(probe().graphs) == captured, "the third run compiled again"


def route_graph(chain: dict, checkpoint: str, backend: str | None) -> dict:
    """The three IP2P routes of tests/comfy/test_chaining.py on LoadIP2PModel's MODEL, through
    TorchCompileModel when `backend` is given."""
    graph = chain_graphs.base_graph(chain)
    graph["ckpt"] = {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": checkpoint}}
    model = ["ckpt", 0]
    if backend is not None:
        graph["compile"] = {"class_type": "TorchCompileModel", "inputs": {"model": model, "backend": backend}}
        model = ["compile", 0]
    # The empty starting latent the guider route samples from (core's node makes one of the image's size).
    graph["c_ip2p"] = {"class_type": "InstructPixToPixConditioning",
                       "inputs": {"positive": ["pos", 0], "negative": ["neg", 0], "vae": ["ckpt", 2],
                                  "pixels": ["img", 0]}}
    chain_graphs.add_our_routes(graph, model, 1.5, 7.5)
    return graph


def compiled_region_runs(profile) -> dict[str, int]:
    events = [event.name for event in profile.events()]
    return {"dynamo": sum(name.startswith("Torch-Compiled Region") for name in events),
            "inductor": sum(name.startswith("## Call CompiledFxGraph") for name in events)}


@pytest.mark.slow
def test_inductor_through_the_executor_matches_the_uncompiled_routes(comfy_base, comfy_nodes, tiny_ip2p_ckpt):
    """The user's path: "inductor" picked in TorchCompileModel's combo, validated and run by ComfyUI's
    executor, feeding InstructEdit, DualCFGSampler and IP2PGuider -> SamplerCustomAdvanced."""
    from PIL import Image

    Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(3)).numpy() * 255)
                    .astype("uint8")).save(comfy_base / "input/compile.png")
    chain = {"ckpt": tiny_ip2p_ckpt, "image": "compile.png"}
    plain = chain_graphs.latents(comfy_base, route_graph(chain, tiny_ip2p_ckpt, None))
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out = chain_graphs.latents(comfy_base, route_graph(chain, tiny_ip2p_ckpt, "inductor"))
    unet_calls = len(chain_graphs.OUR_ROUTES) * chain_graphs.STEPS  # one batched call per step and route
    # Each UNet call entered one Dynamo-compiled frame and ran one inductor-compiled graph: nothing eager.
    assert compiled_region_runs(profile) == {"dynamo": unet_calls, "inductor": unet_calls}
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == breaks
    for route in chain_graphs.OUR_ROUTES:
        error = chain_graphs.relative(out[route], plain[route])
        assert error < INDUCTOR_TOLERANCE, f"{route}: inductor differs from eager by {error:.2e}"
