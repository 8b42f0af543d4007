#!/usr/bin/env bash
# Installs musetalk-warm into ./.venv: system tools (ffmpeg, espeak-ng) via apt-get
# when they are missing, then the package with its test extras. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v ffprobe >/dev/null 2>&1 || need+=(ffmpeg)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing system packages: ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "please install: ${need[*]} (no apt-get on this machine)" >&2
    exit 1
  fi
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned to 2.13.0. On a CUDA machine, install a CUDA build of that version into
# .venv first (see README, "Real MuseTalk weights"); pip then keeps it.
.venv/bin/python -m pip install -q -e ".[test]"
echo "installed: $(.venv/bin/musetalk-warm --version)"
