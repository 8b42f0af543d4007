#!/usr/bin/env bash
# Installs musetalk-warm into ./.venv: system tools (ffmpeg, espeak-ng, and chromium for
# the browser test) via apt-get when they are missing, then the package with its test
# extras. Safe to re-run.
# APT_LOCK_WAIT (seconds, default 300): how long to wait for another apt/dpkg to finish.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "==> $*"; }
lock_wait=${APT_LOCK_WAIT:-300}
retry_every=${APT_RETRY_EVERY:-10}

# apt-get update has no lock timeout of its own on older apt: retry it while the lock is busy.
apt_retry() {
  local deadline=$((SECONDS + lock_wait))
  until "$@"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "apt-get still failing after ${lock_wait}s (another package manager busy?): $*" >&2
      return 1
    fi
    echo "    apt is busy or failed; retrying in ${retry_every} s (up to ${lock_wait}s)"
    sleep "$retry_every"
  done
}

need=()
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v ffprobe >/dev/null 2>&1 || need+=(ffmpeg)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    apt=($sudo env DEBIAN_FRONTEND=noninteractive apt-get -o "DPkg::Lock::Timeout=${lock_wait}")
    step "updating the apt package lists"
    apt_retry "${apt[@]}" update -q
    step "installing system packages: ${need[*]}"
    apt_retry "${apt[@]}" install -y -q "${need[@]}"
  else
    echo "please install: ${need[*]} (no apt-get on this machine)" >&2
    exit 1
  fi
else
  step "ffmpeg, espeak-ng and chromium are installed"
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $("$python" --version)"
  "$python" -m venv .venv
fi
step "upgrading pip"
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned to 2.13.0. On a CUDA machine, install a CUDA build of that version into
# .venv first (see README, "Real MuseTalk weights"); pip then keeps it.
step "installing musetalk-warm and its dependencies into .venv (a few minutes the first time)"
# One line per package fetched, so a long install is never silent (pip's own errors still show).
.venv/bin/python -m pip install --progress-bar off -e ".[test]" \
  | { grep --line-buffered -E '^(Collecting|Successfully installed)' || true; }
echo "installed: $(.venv/bin/musetalk-warm --version)"
