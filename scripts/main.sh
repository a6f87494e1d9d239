#!/usr/bin/env bash
# The main job: set up (cached) and run the shipped edit workflow headless through ComfyUI.
#   bash scripts/main.sh [--image photo.jpg] [--instruction "make it winter"] [--output edited.png] [...]
# `bash scripts/main.sh --help` lists every option.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/scripts/setup.sh"
# shellcheck disable=SC1091
source "${IP2P_RUNTIME:-$repo/.runtime}/env.sh"
cd "$repo"
exec python -m comfyui_ip2p.cli.edit "$@"
