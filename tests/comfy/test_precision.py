"""The compute precision (issue: speed beyond the peers): the CPU check, the MODEL patch through the pack's nodes
and the trainer. Core's routes under the same patch are compared in tests/comfy/test_chaining.py."""

from __future__ import annotations

import pytest
import torch
from comfyui_ip2p.cli.runtime import run_prompt

EDIT = {"image_guidance": 1.5, "text_guidance": 7.5, "steps": 4, "seed": 3, "sampler_name": "euler",
        "scheduler": "normal", "resolution": 64, "keep_input_size": False}
# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 2e-3 per product). Over a 3-4 step Euler run of random
# tiny weights the result moved by 2.4e-2 (edit latent) and 3.8e-2 (P2P images, cfg 2) relative in measurement on
# an fp32-emulating CPU; 0.1 leaves room for other CPUs' bf16 kernels (AMX accumulates differently) while still
# failing a run that bf16 broke (such a result moves by O(1)).
BF16_EDIT = 0.1


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("flags,native", [("fpu sse avx2 amx_bf16 amx_tile", True), ("fpu avx512f avx512_bf16", True),
                                          ("fpu sse sse2 avx2 avx512f", False)])
def test_cpu_check_reads_the_flags(tmp_path, monkeypatch, flags, native):
    from comfyui_ip2p.training import precision

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nvendor_id\t: Genuine\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t: none\n")
    assert precision.cpu_flags(str(info)) == frozenset(flags.split())
    assert precision.cpu_flags(str(tmp_path / "missing")) == frozenset()
    monkeypatch.delenv(precision.CPU_BF16_OVERRIDE, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags.split()))
    assert precision.cpu_has_native_bf16() is native
    assert precision.autocast_dtype("auto", "cpu") == (torch.bfloat16 if native else None)
    monkeypatch.setenv(precision.CPU_BF16_OVERRIDE, "0" if native else "1")
    assert precision.cpu_has_native_bf16() is not native, "the override wins over the flags"


def test_choices_per_device(monkeypatch):
    from comfyui_ip2p.training import precision
    from comfyui_ip2p.training.trainer import autocast_dtype as training_dtype

    monkeypatch.setenv(precision.CPU_BF16_OVERRIDE, "0")
    assert precision.autocast_dtype("fp32", "cpu") is None
    assert precision.autocast_dtype("bf16", "cpu") == torch.bfloat16
    assert precision.autocast_dtype("auto", "cpu") is None
    assert precision.autocast_dtype("auto", "cuda") is None, "the edit keeps ComfyUI's GPU dtype"
    assert precision.autocast_dtype("auto", "cuda", gpu_auto=torch.bfloat16) == torch.bfloat16
    assert training_dtype("auto", torch.device("cpu")) is None
    monkeypatch.setenv(precision.CPU_BF16_OVERRIDE, "1")
    assert training_dtype("auto", torch.device("cpu")) == torch.bfloat16, "training uses bf16 on such CPUs"
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        precision.autocast_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.autocast_dtype("int8", "cpu")


@pytest.fixture(scope="module")
def ip2p(comfy_nodes, tiny_ip2p_ckpt):
    from comfyui_ip2p.pipeline.loading import load_ip2p

    return load_ip2p(tiny_ip2p_ckpt)


def linear_dtypes(model) -> tuple[list, object]:
    """Records the output dtype of the UNet's first attention projection on each call."""
    seen: list[torch.dtype] = []
    module = next(m for name, m in model.model.diffusion_model.named_modules() if name.endswith("attn1.to_q"))
    return seen, module.register_forward_hook(lambda _m, _args, out: seen.append(out.dtype))


def edit(comfy_nodes, parts, model, image):
    return comfy_nodes["InstructEdit"].execute(model, parts[1], parts[2], image, "make it winter", **EDIT).result


def test_edit_under_each_precision(comfy_nodes, ip2p, monkeypatch):
    model = ip2p[0]
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    node = comfy_nodes["IP2PComputePrecision"]
    seen, handle = linear_dtypes(model)
    try:
        plain = edit(comfy_nodes, ip2p, model, image)
        assert set(seen) == {torch.float32}
        exact = edit(comfy_nodes, ip2p, node.execute(model, "fp32").result[0], image)
        monkeypatch.setenv("IP2P_CPU_BF16", "0")
        fallback = edit(comfy_nodes, ip2p, node.execute(model, "auto").result[0], image)
        assert set(seen) == {torch.float32}, "fp32, and auto without native bf16, compute in fp32"
        seen.clear()
        bf16_model = node.execute(model, "bf16").result[0]
        bf16 = edit(comfy_nodes, ip2p, bf16_model, image)
        assert seen and set(seen) == {torch.bfloat16}, "bf16 must reach the UNet's layers"
        seen.clear()
        back = edit(comfy_nodes, ip2p, node.execute(bf16_model, "fp32").result[0], image)
        assert set(seen) == {torch.float32}, "a later fp32 choice removes the earlier bf16"
    finally:
        handle.remove()
    for result in (exact, fallback, back):
        assert torch.equal(result[1]["samples"], plain[1]["samples"]) and torch.equal(result[0], plain[0])
    error = relative(bf16[1]["samples"], plain[1]["samples"])
    print(f"edit latent bf16 vs fp32: {error:.2e} relative")
    assert 0 < error < BF16_EDIT, error
    assert model.wrappers == ip2p[0].wrappers and not any(
        "comfyui_ip2p.precision" in keys for keys in model.wrappers.values()), "the input MODEL is untouched"


def test_fp16_on_cpu_is_refused_naming_the_node(comfy_nodes, tiny_ip2p_ckpt):
    result = run_prompt({"1": {"class_type": "LoadIP2PModel", "inputs": {"checkpoint": tiny_ip2p_ckpt}},
                         "2": {"class_type": "IP2PComputePrecision",
                               "inputs": {"model": ["1", 0], "precision": "fp16"}},
                         "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}})
    assert not result.ok
    message = result.error["exception_message"]
    assert message.startswith("IP2PComputePrecision: ") and "CUDA" in message and "bf16" in message


def test_p2p_pairs_under_bf16(comfy_nodes, comfy_base, tiny_t2i_ckpt):
    import comfy.sd

    path = str(comfy_base / "models/checkpoints" / tiny_t2i_ckpt)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)[:3]
    # cfg 2, not the paper's 7.5: guidance multiplies the two branches' rounding differences by the scale
    settings = {"steps": 3, "width": 64, "height": 64, "seed": 11, "p_min": 0.5, "p_max": 0.5, "cfg_min": 2.0,
                "cfg_max": 2.0, "sampler_name": "euler", "scheduler": "normal", "batch_size": 1}

    def pair(m):
        return comfy_nodes["P2PPairGenerator"].execute(m, clip, vae, caption_pairs="a red barn || a blue barn",
                                                       samples_per_pair=1, **settings).result

    plain = pair(model)
    seen, handle = linear_dtypes(model)
    try:
        bf16 = pair(comfy_nodes["IP2PComputePrecision"].execute(model, "bf16").result[0])
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.bfloat16}, "the P2P sampler must run the model in bf16"
    for index in (1, 2):  # input and edited images
        error = relative(bf16[index], plain[index])
        print(f"P2P image {index} bf16 vs fp32: {error:.2e} relative")
        assert 0 < error < BF16_EDIT, (index, error)


def test_training_loss_curve_in_bf16_follows_fp32(comfy_base, ip2p):
    """Same seed, data, noise and timesteps: only the rounding differs, so the bf16 run's per-step losses follow
    the fp32 run's. Bound: each step's loss within BF16_LOSS (relative); measured 5e-3 on this task (4 LoRA steps):
    the losses themselves vary by ~30% between steps, so a 5% bound still catches a curve that bf16 changed."""
    import uuid

    from comfyui_ip2p.pipeline.train import RunFiles, run_training
    from comfyui_ip2p.testing.edit_rows import write_rows
    from comfyui_ip2p.testing.synthetic import invert_rows
    from comfyui_ip2p.training.config import TrainConfig

    name = f"precision_{uuid.uuid4().hex[:6]}"
    write_rows(invert_rows(8, size=32, seed=2), comfy_base / "output", name, "reference")
    curves = {}
    for precision in ("fp32", "bf16"):
        run = f"{name}_{precision}"
        files = RunFiles(model=comfy_base / "models" / "loras" / f"{run}.safetensors",
                         run_dir=comfy_base / "output" / "ip2p_train" / run)
        config = TrainConfig(steps=4, batch_size=2, resolution=32, learning_rate=1e-3, ema_decay=0.0,
                             mode="lora", lora_rank=4, precision=precision)
        run_training(ip2p[0], ip2p[1], ip2p[2], {"path": str(comfy_base / "output" / name)}, config, files)
        curves[precision] = torch.load(files.state, weights_only=True)["losses"]
    fp32, bf16 = torch.tensor(curves["fp32"]), torch.tensor(curves["bf16"])
    assert not torch.equal(fp32, bf16), "bf16 must have been used"
    worst = ((bf16 - fp32).abs() / fp32).max().item()
    print(f"bf16 vs fp32 training loss, worst step: {worst:.2e} relative")
    assert worst < BF16_LOSS, (worst, curves)


BF16_LOSS = 5e-2
