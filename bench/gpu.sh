#!/usr/bin/env bash
# The GPU figures in one short run (a few minutes) on any CUDA machine.
#
#   On a CUDA machine with this repository set up (or with the package registries reachable):
#       bash bench/gpu.sh
#       bash bench/gpu.sh sdxl      (only the SDXL-InstructPix2Pix line, when the device time is short)
#       bash bench/gpu.sh compile   (only TorchCompileModel, eager vs inductor, ours and core's graph)
#   For a CUDA machine without network access, first, on a set-up machine with the registries:
#       bash bench/gpu.sh --prepare
#     copies ComfyUI's code (no models) and the three wheels a bare CUDA image usually lacks (torchsde,
#     trampoline, diffusers) into .runtime/gpu-carry/ (git-ignored with the rest of .runtime/, about 30 MB);
#     copy the repository with that folder to the CUDA machine and run `bash bench/gpu.sh` there.
#
# On the CUDA machine it uses, in this order: a working .runtime/venv with CUDA; else the machine's python3 (its
# own CUDA torch) + the carried ComfyUI + wheels; else `bash scripts/setup.sh` (needs the registries).
# It prints the benchmark tables and, when $OUT names a folder, also leaves the JSON and logs there.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
carry=$repo/.runtime/gpu-carry
workdir=${IP2P_BENCH_WORKDIR:-/tmp/ip2p-bench-gpu}
BENCH_TIMEOUT=${IP2P_BENCH_TIMEOUT:-200}  # seconds for the main edit line; each line has its own cap (sum ~11 min, typical far less)

log() { printf '[gpu.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

prepare() {
  local py=$repo/.runtime/venv/bin/python comfy=$repo/.runtime/ComfyUI
  [ -f "$comfy/main.py" ] || { log "no $comfy: run bash scripts/setup.sh first"; exit 2; }
  rm -rf "$carry" && mkdir -p "$carry/ComfyUI" "$carry/wheels"
  # Code only: models/ (checkpoints written by tests), outputs, tests and the pack's own link stay here.
  tar -C "$comfy" --exclude=./models --exclude=./output --exclude=./input --exclude=./temp --exclude=./user \
      --exclude=./tests --exclude=./tests-unit --exclude=__pycache__ --exclude=./custom_nodes/comfyui_ip2p \
      -cf - . | tar -C "$carry/ComfyUI" -xf -
  # Pure-Python wheels for a CUDA image's Python 3.12; --no-deps: such an image has the rest.
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$carry/wheels" \
      torchsde==0.2.6 trampoline==0.1.2 diffusers==0.42.1
  log "ready: $(du -sh "$carry" | cut -f1) in $carry; carry .runtime/gpu-carry"
}

venv_ok() {
  [ -x .runtime/venv/bin/python ] && .runtime/venv/bin/python -c \
    "import torch, comfyui_ip2p; assert torch.cuda.is_available()" 2>/dev/null
}

write_stub() {
  # A stand-in package for an import the benchmark never uses and the image lacks: ComfyUI imports PyAV at
  # start-up for its video types (its wheel, ~40 MB, is left out to keep the carried folder small); the pack
  # imports `openai` when it registers its dataset nodes (the real one needs httpx2 and pydantic, absent
  # there). Attributes are placeholder classes; any real use raises.
  local site=$1 dir
  shift
  for dir in "$@"; do
    mkdir -p "$site/$dir"
    cat >"$site/$dir/__init__.py" <<'EOF'
class _Missing:
    def __init__(self, *args, **kwargs):
        raise ImportError(f"{__name__} is not installed on this machine (bench/gpu.sh stand-in)")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (_Missing,), {})
EOF
  done
}

use_carried() {
  local site=/tmp/ip2p-site
  log "using the image's python3 + carried ComfyUI and wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$carry"/wheels/*.whl
  python3 -c "import av" 2>/dev/null || { log "stand-in: av"; write_stub "$site" av av/container av/subtitles \
      av/subtitles/stream; }
  python3 -c "import openai" 2>/dev/null || { log "stand-in: openai"; write_stub "$site" openai; }
  ln -sfn "$repo" "$site/comfyui_ip2p"  # what the editable install does: the repo root is the package
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" COMFYUI_PATH="$carry/ComfyUI"
  PY=python3
}

pick_python() {
  if venv_ok; then
    PY=.runtime/venv/bin/python
  elif [ -f "$carry/ComfyUI/main.py" ] && compgen -G "$carry/wheels/*.whl" >/dev/null; then
    use_carried
  else
    log "no runtime: bash scripts/setup.sh"
    bash scripts/setup.sh
    PY=.runtime/venv/bin/python
  fi
}

collect() {
  [ -n "${OUT:-}" ] || return 0
  cp bench/results/edit-full-512*.json bench/results/edit-sdxl-full-1024.json bench/results/dataset-cuda-full.json \
      bench/results/train-*.json bench/results/compile-full-512.json "$OUT/" 2>/dev/null || true
  tar -C "$workdir" -czf "$OUT/child-logs.tgz" $(cd "$workdir" 2>/dev/null && ls log-*.txt 2>/dev/null) \
      2>/dev/null || true
}

sdxl_bench() {
  # SDXL-InstructPix2Pix at its native 1024x1024, 30 steps: SDXL's full UNet layout, 8 input channels, random
  # weights (2.57B parameters, written once as a ~5 GB fp16 file in the workdir and loaded by ComfyUI's own
  # detection), our InstructEdit against diffusers' StableDiffusionXLInstructPix2PixPipeline on the same weights;
  # stub SDXL text embeddings and a TAESD VAE on both sides. Prints s/step for each and the ratio.
  timeout "${IP2P_BENCH_SDXL_TIMEOUT:-150}" "$PY" bench/edit.py --family sdxl --device cuda --size full \
      --res 1024 --steps 30 --repeats 2 --workdir "$workdir" || log "edit.py --family sdxl exited with status $?"
}

compile_bench() {
  # Core's TorchCompileModel (inductor) on the full SD1.5-IP2P layout at 512 px, 20 steps: ours and core's graph,
  # each eager and compiled, compile time apart. Opt-in (`bash bench/gpu.sh compile`): it does not fit the
  # default run's budget.
  timeout "${IP2P_BENCH_COMPILE_TIMEOUT:-300}" "$PY" bench/compile.py --device cuda --size full --res 512 \
      --steps 20 --repeats 2 --workdir "$workdir" || log "compile.py exited with status $?"
}

main() {
  if [ "${1:-}" = "--prepare" ]; then prepare; return; fi
  [ -n "${OUT:-}" ] && exec > >(tee -a "$OUT/gpu.log") 2>&1
  export PYTHONUNBUFFERED=1
  pick_python
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
  "$PY" -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))"
  trap collect EXIT
  mkdir -p bench/results "$workdir"
  if [ "${1:-}" = "sdxl" ]; then sdxl_bench; return; fi
  if [ "${1:-}" = "compile" ]; then compile_bench; return; fi

  # Edit latency, full SD1.5-IP2P shapes (random weights) at 512x512; 20 and 100 steps after one load per
  # variant. Paper anchor: ~9 s per 100-step edit on an A100; our target: < 1.5 s. The s_I = 1 variant runs
  # last: if time runs out, the progress lines on stderr still hold every finished variant's figures.
  timeout "$BENCH_TIMEOUT" "$PY" bench/edit.py --device cuda --size full --res 512 --steps 20,100 \
      --repeats 3 --variants a,b,c,d,a1 --workdir "$workdir" || log "edit.py exited with status $?"

  # The guidance grid: 9 cells in one batched run vs nine single edits (batching should win clearly on a GPU),
  # and the full-resolution detail transfer's added time at 2048x1536.
  timeout 60 "$PY" bench/edit.py --device cuda --size full --res 512 --steps 20 --grid --workdir "$workdir" \
      || log "edit.py --grid exited with status $?"
  timeout 45 "$PY" bench/edit.py --device cuda --size full --res 512 --steps 20 --detail --workdir "$workdir" \
      || log "edit.py --detail exited with status $?"

  # Precision: the 20-step edit under the Compute Precision patch, bf16 and fp16 autocast on top of ComfyUI's
  # loaded dtype, each with the fp32-patch-free edit (a32) of the same seed for the error and PSNR line.
  for precision in bf16 fp16; do
    timeout 60 "$PY" bench/edit.py --device cuda --size full --res 512 --steps 20 --variants a,a32 \
        --precision "$precision" --workdir "$workdir" --out "bench/results/edit-full-512-$precision.json" \
        || log "edit.py --precision $precision exited with status $?"
  done

  # Dataset engine: P2P pairs at 512 px, 100 steps (pairs per minute), and training samples/s at 256 px.
  timeout 60 "$PY" bench/dataset.py --device cuda --model full --sections p2p --sizes 512 --steps 100 \
      --repeats 1 || log "dataset.py exited with status $?"
  timeout 60 "$PY" bench/train.py --device cuda --size full --res 256 --batch 16 --steps 10 --warmup 2 \
      --variants recipe,ours_cached --precision auto --workdir "$workdir/train" \
      || log "train.py exited with status $?"
  # Training that streams: lazy rows + the latent cache in memory-mapped files on disk vs rows in a list and the
  # cache in memory, 2000 rows at 256 px (samples/s and whole-run peak RSS as ratios; target >= 0.95x the speed).
  timeout 150 "$PY" bench/train.py --device cuda --size full --res 256 --batch 16 --steps 10 --warmup 2 \
      --rows 2000 --precision auto --workdir "$workdir/train" || log "train.py --rows exited with status $?"

  sdxl_bench
}

main "$@"
