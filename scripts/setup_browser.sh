#!/usr/bin/env bash
# Installs what the browser tests (tests/browser) need, idempotently:
#   - Debian's chromium (apt-get; Playwright cannot download its own browser here),
#   - playwright (the Python driver) into the runtime venv made by scripts/setup.sh.
# Prints the chromium path on stdout. A second run with both present returns in well under a second.
#   IP2P_CHROMIUM=/path/to/chromium   use that browser instead of installing Debian's
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
runtime=${IP2P_RUNTIME:-$repo/.runtime}
venv=$runtime/venv
PLAYWRIGHT_PIN=playwright==1.65.0

log() { printf '[setup_browser] %s\n' "$*" >&2; }

find_chromium() {
  if [ -n "${IP2P_CHROMIUM:-}" ]; then
    [ -x "$IP2P_CHROMIUM" ] || { log "IP2P_CHROMIUM=$IP2P_CHROMIUM is not executable"; exit 2; }
    printf '%s\n' "$IP2P_CHROMIUM"
    return
  fi
  command -v chromium || command -v chromium-browser || true
}

install_chromium() {
  local found
  found=$(find_chromium)
  if [ -n "$found" ]; then
    printf '%s\n' "$found"
    return
  fi
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  log "installing Debian's chromium (apt-get)"
  local apt_log
  apt_log=$(mktemp)
  # apt and dpkg print hundreds of lines; keep them for a failure only
  if ! { "${sudo[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq \
      --no-install-recommends chromium fonts-dejavu-core; } >"$apt_log" 2>&1; then
    cat "$apt_log" >&2
    rm -f "$apt_log"
    log "apt-get could not install chromium"
    exit 2
  fi
  rm -f "$apt_log"
  found=$(find_chromium)
  [ -n "$found" ] || { log "chromium is still missing after apt-get install"; exit 2; }
  printf '%s\n' "$found"
}

install_playwright() {
  [ -x "$venv/bin/python" ] || { log "no venv at $venv: run scripts/setup.sh first"; exit 2; }
  if "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('playwright') != '${PLAYWRIGHT_PIN#*==}')" \
      2>/dev/null; then
    return
  fi
  log "installing $PLAYWRIGHT_PIN into $venv"
  # pip repeats a harmless line for every local index folder this machine lacks; keep its real messages.
  "$venv/bin/python" -m pip install --disable-pip-version-check --quiet "$PLAYWRIGHT_PIN" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) >&2
}

main() {
  install_playwright
  install_chromium
}

main "$@"
