#!/usr/bin/env bash
# Sets up (cached) and runs every test suite plus the linter. Extra arguments go to pytest.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/scripts/setup.sh"
bash "$repo/scripts/setup_browser.sh" >/dev/null
# shellcheck disable=SC1091
source "${IP2P_RUNTIME:-$repo/.runtime}/env.sh"
cd "$repo"
ruff check .
python -m pytest -p no:cacheprovider -ra --durations=30 "$@"
