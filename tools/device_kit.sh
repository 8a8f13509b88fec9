#!/usr/bin/env bash
# Builds .device/ (ignored by git): what the GPU machine lacks for tools/device_check.sh.
# That machine reaches no registry and its image has PyTorch (CUDA) on Python 3.12 but no
# PyAV, multiprocess, cryptography or nginx, so they travel with the tree (`carry`).
# About 50 MB, under the 64 MiB a run may carry. Run here, then on the device:
#   run(command="bash tools/device_check.sh", carry=[".device"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
kit=.device
rm -rf "$kit"
mkdir -p "$kit/wheels" "$kit/nginx/lib"
PY=${PYTHON:-$(command -v python || command -v python3)}
# The versions installed here, so that both machines run the same decoder.
pins=$($PY -c "from importlib.metadata import version as v
print(' '.join(f'{n}=={v(n)}' for n in ('av', 'multiprocess', 'dill', 'cryptography', 'h2')))")
# No numpy, torch, httpx, psutil or opencv: the image has them. No decord: the check
# runs the default (PyAV) backend.
$PY -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$kit/wheels" $pins cffi pycparser hpack hyperframe
# Debian's nginx (TLS, HTTP/2, Range) and the libraries it links, so that it runs on
# whatever distribution the GPU machine has.
nginx=$(command -v nginx || echo /usr/sbin/nginx)
cp "$nginx" "$kit/nginx/nginx.bin"
ldd "$nginx" | awk '/=> \// && !/libc\.so/ {print $3}' | xargs -I{} cp -L {} "$kit/nginx/lib/"
cat > "$kit/nginx/nginx" <<'WRAP'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/lib" exec "$here/nginx.bin" "$@"
WRAP
chmod +x "$kit/nginx/nginx"
du -sh "$kit"
