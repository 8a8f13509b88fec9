#!/usr/bin/env bash
# Everything the engine, its demo and its tests need on a fresh Debian machine.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v aria2c >/dev/null 2>&1 || need_apt+=(aria2)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v ffmpeg >/dev/null 2>&1 || need_apt+=(ffmpeg)   # bench --model-bound's ffmpeg-cli peer
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  # Debian starts nginx as a service on install; the engine runs its own instances.
  $SUDO systemctl disable --now nginx >/dev/null 2>&1 || $SUDO service nginx stop >/dev/null 2>&1 || true
  $SUDO pkill -f "nginx: master process /usr/sbin/nginx" >/dev/null 2>&1 || true
fi

PY=${PYTHON:-$(command -v python || command -v python3)}
# The CPU build of torch (a local file here); an unpinned torch would pull a CUDA build.
$PY -c "import torch" >/dev/null 2>&1 || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test,bench,cluster]"
