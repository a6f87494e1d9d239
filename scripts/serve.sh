#!/usr/bin/env bash
# Opens the ComfyUI web UI with this pack installed: http://127.0.0.1:${PORT:-8188}
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/scripts/setup.sh"
# shellcheck disable=SC1091
source "${IP2P_RUNTIME:-$repo/.runtime}/env.sh"
cd "$COMFYUI_PATH"
cpu=()
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || cpu=(--cpu)
exec python main.py "${cpu[@]}" --listen 127.0.0.1 --port "${PORT:-8188}" --disable-auto-launch "$@"
