"""What each model patch does through core's IP2P graph and through the pack's three edit routes.

    source .runtime/env.sh && python bench/chaining.py [--s-i 1.5] [--s-i 1.0]

For every sampler-hook patch node of ComfyUI that applies to SD1.5 (and LoRA, ControlNet-free model patches),
one graph runs core's hand-wired InstructPixToPixConditioning -> DualCFGGuider -> SamplerCustomAdvanced and the
pack's InstructEdit, DualCFGSampler and IP2PGuider -> SamplerCustomAdvanced on the same patched MODEL (a
two-level random SD1.5-IP2P model, 64 px, 3 Euler-ancestral steps). Printed per patch: how far the patch moves
each route's latent from the unpatched run (relative), and the largest relative difference from core's latent.
A correctness table, not a timing: the same figures the tests assert on.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def prepare(base: Path) -> dict:
    from comfyui_ip2p.cli import runtime
    from comfyui_ip2p.testing import probe_nodes
    from comfyui_ip2p.testing.comfy_server import link_pack
    from comfyui_ip2p.testing.tiny_models import write_checkpoint, write_lora

    for sub in ("models/checkpoints", "models/loras", "input", "output", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link_pack(base)
    runtime.boot(base, cpu=True)
    runtime.load_nodes()
    probe_nodes.register()
    ckpt = write_checkpoint(base / "models/checkpoints/chain_ip2p.safetensors", "ip2p", "two_level", seed=5)
    write_lora(base / "models/loras/chain_lora.safetensors", ckpt, seed=7)
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(base / "input/chain.png")
    return {"ckpt": ckpt.name, "image": "chain.png"}


def table(chain: dict, base: Path, s_i: float) -> list[str]:
    from comfyui_ip2p.testing.chain_graphs import (
        OUR_ROUTES,
        POST_AND_CFG_PATCHES,
        PRE_CFG_PATCHES,
        relative,
        run_all_routes,
    )

    cases = {**POST_AND_CFG_PATCHES, **PRE_CFG_PATCHES,
             "LoRA": [("LoraLoaderModelOnly", {"lora_name": "chain_lora.safetensors", "strength_model": 1.0})]}
    plain = run_all_routes(chain, base, [], s_i)
    lines = [f"s_I = {s_i}, s_T = 7.5",
             f"{'patch':24} {'core moved':>11} {'InstructEdit':>13} {'DualCFGSampler':>15} {'IP2PGuider':>11}"
             f" {'max |ours-core|':>16}"]
    for name, patches in cases.items():
        out = run_all_routes(chain, base, list(patches), s_i)
        moved = [relative(out[route], plain[route]) for route in ("core", *OUR_ROUTES)]
        error = max(relative(out[route], out["core"]) for route in OUR_ROUTES)
        lines.append(f"{name:24} {moved[0]:11.2e} {moved[1]:13.2e} {moved[2]:15.2e} {moved[3]:11.2e} {error:16.2e}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--s-i", type=float, action="append", help="image guidance (repeatable); default 1.5 1.0")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        chain = prepare(base)
        for s_i in args.s_i or [1.5, 1.0]:
            print("\n".join(table(chain, base, s_i)), flush=True)
            print()


if __name__ == "__main__":
    main()
