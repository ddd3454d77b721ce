#!/usr/bin/env bash
# Every GPU check of docs/performance.md in one command that ends before a deadline: the GPU
# tests, bench/mfu.py's debug preset (the GPU-over-CPU speed-up) and its 1b preset (the MFU
# target), with logs and JSON results copied to one folder.
#
#   bash bench/run_gpu.sh [--deadline-s 540] [--out DIR] [--wheels DIR] [--python PY]
#
# --deadline-s  seconds the whole script may take (default 540). The 1b preset runs last and
#               gets what the tests and the debug preset left, less one setting's timeout, as
#               its --budget-s: bench/mfu.py starts no setting after that and still writes its
#               JSON, so nothing is cut off mid-write.
# --out         where logs and result JSONs are copied (default: bench/results only).
# --wheels      a folder of wheels (e.g. torchao) installed into a private target folder first,
#               for a GPU image that lacks them and has no network.
# --python      the interpreter with CUDA torch (default: $PYTHON or python3).
#
# Exit status: 0 when all three ran (whatever the MFU), 1 when a stage failed, 2 without CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."

deadline_s=540
out=""
wheels=""
py=${PYTHON:-python3}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --deadline-s) deadline_s=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    --python) py=$2; shift 2 ;;
    *) echo "bench/run_gpu.sh: unknown argument '$1' (valid: --deadline-s N, --out DIR," \
         "--wheels DIR, --python PY)" >&2; exit 2 ;;
  esac
done
if ! [[ $deadline_s =~ ^[0-9]+$ ]] || (( deadline_s < 240 )); then
  echo "bench/run_gpu.sh: --deadline-s must be a whole number of seconds >= 240, got" \
    "'$deadline_s'" >&2
  exit 2
fi

start=$SECONDS
logs=${out:-$(mktemp -d)}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n $wheels ]]; then
  site=$(mktemp -d)
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl \
    || { echo "bench/run_gpu.sh: installing the wheels in $wheels failed" >&2; exit 1; }
  export PYTHONPATH="$PYTHONPATH:$site"
fi

if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "bench/run_gpu.sh needs a CUDA GPU: torch.cuda.is_available() is False for $py" >&2
  exit 2
fi
"$py" - <<'EOF' | tee "$logs/gpu-environment.txt"
import importlib.util, torch
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
for name in ("flash_attn", "torchao", "triton"):
    print(f"{name}: {'importable' if importlib.util.find_spec(name) else 'missing'}")
EOF

failed=0
left() { echo $(( deadline_s - (SECONDS - start) )); }

# 1. The GPU tests (they skip nothing on a float8-capable GPU with torchao). tests/gpu only: the
#    CPU suite's modules import packages a GPU image may lack (datasets), which would fail the
#    collection of the whole run.
echo "== GPU tests"
timeout 150 "$py" -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 \
  | tee "$logs/gpu-tests.log"
(( PIPESTATUS[0] == 0 )) || failed=1

# 2. Debug preset on the GPU: compile, attention backends and micro-batch, divided by the newest
#    committed CPU figures of the same settings.
echo "== bench/mfu.py, debug preset ($(left) s left)"
"$py" bench/mfu.py --steps 10 --warmup 3 --axes compile,attention,micro_batch_size \
  --budget-s 60 --setting-timeout 60 2>&1 | tee "$logs/mfu-debug.log"
(( PIPESTATUS[0] == 0 )) || failed=1

# 3. 1b preset, the target, with what is left: no setting starts later than one setting's
#    timeout before the deadline. The attention axis only where flash_attn is there: otherwise
#    it would hold just eager, whose [L, L] float32 scores at seq 4096 make it the slowest row
#    (the debug preset measures it).
axes_1b=compile,loss_chunk_tokens,micro_batch_size,float8,activation_checkpoint
if "$py" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('flash_attn') else 1)"
then
  axes_1b+=",attention"
fi
setting_timeout=150
budget=$(( $(left) - setting_timeout - 15 ))
echo "== bench/mfu.py, 1b preset (budget ${budget} s)"
if (( budget < 60 )); then
  echo "bench/run_gpu.sh: only ${budget} s left for the 1b preset; rerun with a larger" \
    "--deadline-s" >&2
  failed=1
else
  "$py" bench/mfu.py --preset 1b --warmup 2 --steps 5 --axes "$axes_1b" --budget-s "$budget" \
    --setting-timeout "$setting_timeout" 2>&1 | tee "$logs/mfu-1b.log"
  (( PIPESTATUS[0] == 0 )) || failed=1
fi

today=$(date +%F)
if [[ -n $out ]]; then
  shopt -s nullglob
  for f in bench/results/mfu-*"$today".json; do
    [[ $f == *-cpu-* ]] || cp "$f" "$out/"
  done
fi
echo "== done in $(( SECONDS - start )) s; logs in $logs"
exit "$failed"
