#!/usr/bin/env bash
# The GPU checks, as one short run on a lent GPU machine (see tools/device_kit.sh):
# the CUDA path's results against the CPU reference, then the engine on CUDA next to the
# stock miner. Everything it prints also lands in $OUT. About 4 minutes, 9 at most.
# DEVICE=cpu runs the same steps here, as a dry run of the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-$(command -v python3 || command -v python)}
log="$OUT/device_check.log"
exec > >(tee -a "$log") 2>&1
echo "== $(date -u +%FT%TZ) device check, DEVICE=$DEVICE"
command -v nvidia-smi >/dev/null && nvidia-smi -L
missing=()
for mod in av multiprocess dill cryptography h2; do
  $PY -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ -d .device/wheels ] || { echo "missing ${missing[*]} and no .device/wheels: carry .device"; exit 2; }
  $PY -m pip install -q --no-index --no-deps --find-links .device/wheels \
    av multiprocess dill cryptography cffi pycparser h2 hpack hyperframe || exit 2
fi
if [ -x .device/nginx/nginx ] && ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  export ENGINE_NGINX=$PWD/.device/nginx/nginx
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import torch, av, httpx; print('python', __import__('sys').version.split()[0], \
'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'av', av.__version__, \
'httpx', httpx.__version__)"
rc=0
if [ "$DEVICE" != cpu ]; then
  echo "== CUDA path against the CPU reference"
  timeout 180 $PY -m pytest -q -p no:cacheprovider -rs tests/test_end_to_end.py -k cuda || rc=1
fi
echo "== bench, seed profile, stats processor, device $DEVICE"
timeout 150 $PY -m engine bench --profile seed --runs 2 --device "$DEVICE" \
  --contenders engine-warm,stock,limit --budget 100 --json "$OUT/bench-$DEVICE-stats.json" || rc=1
for sws in 1 4; do   # is one swscale thread (measured on 2 cores) still right on many?
  echo "== bench, null processor, ENGINE_SWS_THREADS=$sws"
  ENGINE_SWS_THREADS=$sws timeout 110 $PY -m engine bench --profile seed --runs 2 \
    --device "$DEVICE" --processor engine.processors:null --contenders engine-warm,limit \
    --budget 80 --json "$OUT/bench-$DEVICE-null-sws$sws.json" || rc=1
done
echo "== done, rc=$rc"
exit $rc
