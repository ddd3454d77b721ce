#!/usr/bin/env bash
# Every GPU check of docs/performance.md in one command that ends before a deadline: the GPU
# tests, bench.mfu's debug preset (the GPU-over-CPU speed-up), bench.moe's GPU rows (an MoE with
# grouped_mm vs the expert loop vs the dense model of the same active parameters) and bench.mfu's
# 1b preset (the MFU target). Logs, worker logs and result JSONs are written into --out as they
# are produced (each mfu JSON is rewritten after every setting), so a run killed midway keeps
# what it measured.
#
#   bash bench/run_gpu.sh [--deadline-s 540] [--out DIR] [--wheels DIR] [--python PY]
#                         [--stages tests,debug,moe,1b] [--axes-1b LIST] [--dry-run]
#
# --deadline-s  seconds the whole script may take (default 540, at least 240). The GPU tests
#               get at most 150 s, the debug preset a third of what is then left (at most 150 s),
#               bench.moe a quarter of what is then left (at most 90 s; `timeout` ends it there)
#               and the 1b preset the rest less 10 s. Each bench.mfu run gets its share as its
#               own --deadline-s: it cuts a setting's timeout to what is left and starts none
#               that cannot finish, so nothing runs past the deadline.
# --out         the folder for logs and JSONs (default: a temporary folder); outside a dry run
#               the JSONs also go to bench/results.
# --wheels      a folder of wheels (e.g. torchao) installed into a private target folder first,
#               for a GPU image that lacks them and has no network.
# --python      the interpreter with CUDA torch (default: $PYTHON or python3).
# --stages      which of tests, debug, moe, 1b to run (default all four); `--stages 1b` gives
#               the 1b preset a whole window of its own.
# --axes-1b     the 1b preset's axes (default: compile, loss_chunk_tokens, micro_batch_size,
#               float8, activation_checkpoint, plus attention where flash_attn or a cuDNN
#               backend is there: otherwise that axis holds only eager, the slowest row).
# --dry-run     rehearse every stage on a machine without CUDA: the GPU tests are collected
#               (and skip), the debug preset runs a few eager one-step settings, bench.moe one
#               step of each contender of its CPU preset, the 1b preset a CPU-sized stand-in
#               model through the same plan, JSON and verdict code (its verdict: "unknown
#               peak", as a CPU has no peak); JSONs go to --out only.
#
# Setting timeouts (each cut to what is left of its stage): a compiled setting gets process
# start, CUDA init and a cold Inductor compile on top of its steps. Debug preset 90 s eager,
# 240 s compiled; 1b preset 240 s eager, 480 s compiled.
#
# Exit status: 0 when every stage ran (whatever the verdicts), 1 when one failed, 2 on bad
# arguments or without CUDA (outside --dry-run).
set -uo pipefail
cd "$(dirname "$0")/.."

deadline_s=540
out=""
wheels=""
py=${PYTHON:-python3}
stages=tests,debug,moe,1b
axes_1b=""
dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --deadline-s) deadline_s=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    --python) py=$2; shift 2 ;;
    --stages) stages=$2; shift 2 ;;
    --axes-1b) axes_1b=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    *) echo "bench/run_gpu.sh: unknown argument '$1' (valid: --deadline-s N, --out DIR," \
         "--wheels DIR, --python PY, --stages LIST, --axes-1b LIST, --dry-run)" >&2; exit 2 ;;
  esac
done
if ! [[ $deadline_s =~ ^[0-9]+$ ]] || (( deadline_s < 240 )); then
  echo "bench/run_gpu.sh: --deadline-s must be a whole number of seconds >= 240, got" \
    "'$deadline_s'" >&2
  exit 2
fi
for s in ${stages//,/ }; do
  [[ $s == tests || $s == debug || $s == moe || $s == 1b ]] || {
    echo "bench/run_gpu.sh: unknown stage '$s' in --stages (valid: tests, debug, moe, 1b)" >&2
    exit 2
  }
done

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

if (( ! dry )) && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
then
  echo "bench/run_gpu.sh needs a CUDA GPU: torch.cuda.is_available() is False for $py" \
    "(--dry-run rehearses without one)" >&2
  exit 2
fi
"$py" - <<'PY' | tee "$logs/gpu-environment.txt"
import importlib.util, torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
else:
    print("no CUDA device: dry run on the CPU")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
for name in ("flash_attn", "torchao", "triton"):
    print(f"{name}: {'importable' if importlib.util.find_spec(name) else 'missing'}")
PY

failed=0
left() { echo $(( deadline_s - (SECONDS - start) )); }
has() { [[ ,$stages, == *,$1,* ]]; }
mode=()
(( dry )) && mode=(--dry-run)

# 1. The GPU tests (they skip nothing on a float8-capable GPU with torchao). tests/gpu only: the
#    CPU suite's modules import packages a GPU image may lack (datasets), which would fail the
#    collection of the whole run.
if has tests; then
  echo "== GPU tests ($(left) s left)"
  timeout 150 "$py" -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 \
    | tee "$logs/gpu-tests.log"
  (( PIPESTATUS[0] == 0 )) || failed=1
fi

# 2. Debug preset: compile, attention backends and micro-batch, divided by the newest committed
#    CPU figures of the same settings. A third of what is left, at most 150 s, when the 1b
#    preset follows.
if has debug; then
  share=$(( $(left) - 10 ))
  if has 1b; then
    share=$(( $(left) / 3 ))
    (( share > 150 )) && share=150
  fi
  args=(--steps 10 --warmup 3 --axes compile,attention,micro_batch_size)
  (( dry )) && args=(--steps 1 --warmup 1 --axes micro_batch_size --micro-batch-sizes 16
    --data.seq_len=64)
  echo "== bench.mfu, debug preset (deadline ${share} s; setting timeouts 90 s eager, 240 s" \
    "compiled)"
  if (( share < 60 )); then
    echo "bench/run_gpu.sh: only ${share} s left for the debug preset; skipped" >&2
    failed=1
  else
    "$py" -m bench.mfu "${args[@]}" --setting-timeout 90 --compile-timeout 240 \
      --deadline-s "$share" --out "$logs" "${mode[@]}" 2>&1 | tee "$logs/mfu-debug.log"
    (( PIPESTATUS[0] == 0 )) || failed=1
  fi
fi

# 3. bench.moe's GPU rows: bf16 tokens/s of a ~0.5B MoE (32 experts, top-4) with grouped_mm and
#    with the expert loop, and of its dense twin; eager, no compile. A quarter of what is left,
#    at most 90 s, when the 1b preset follows; `timeout` ends it there, its own deadline 15 s
#    earlier (process start and CUDA init come first). Its JSON goes to --out (and, outside a
#    dry run, to bench/results).
if has moe; then
  share=$(( $(left) - 10 ))
  if has 1b; then
    share=$(( $(left) / 4 ))
    (( share > 90 )) && share=90
  fi
  args=(--preset gpu --parts throughput --repeats 2 --warmup 3 --steps 8)
  (( dry )) && args=(--preset cpu --parts throughput --repeats 1 --warmup 1 --steps 1)
  echo "== bench.moe, GPU rows (deadline ${share} s)"
  if (( share < 45 )); then
    echo "bench/run_gpu.sh: only ${share} s left for bench.moe; skipped" >&2
    failed=1
  else
    timeout -k 5 "$share" "$py" -m bench.moe "${args[@]}" --deadline-s $(( share - 15 )) \
      --out "$logs" "${mode[@]}" 2>&1 | tee "$logs/moe.log"
    (( PIPESTATUS[0] == 0 )) || failed=1
  fi
fi

# 4. 1b preset, the target, with what is left. In a dry run: a CPU-sized stand-in model (same
#    preset otherwise), eager only (a cold compile on a CPU takes minutes).
if has 1b; then
  if [[ -z $axes_1b ]] && (( dry )); then
    axes_1b=attention
  elif [[ -z $axes_1b ]]; then
    axes_1b=compile,loss_chunk_tokens,micro_batch_size,float8,activation_checkpoint
    if "$py" -c "import importlib.util as u, sys; from bench.mfu_plan import CUDNN_BACKEND as c
sys.exit(0 if c or u.find_spec('flash_attn') else 1)"; then
      axes_1b+=",attention"
    fi
  fi
  args=(--preset 1b --warmup 2 --steps 5 --axes "$axes_1b")
  if (( dry )); then
    args=(--preset 1b --warmup 1 --steps 1 --axes "$axes_1b" --micro-batch-sizes 8
      --model.dim=64 --model.n_layers=2 --model.n_heads=4 --model.n_kv_heads=2
      --model.ffn_dim=128 --model.vocab_size=256 --model.max_seq_len=64 --data.seq_len=64)
  fi
  share=$(( $(left) - 10 ))
  echo "== bench.mfu, 1b preset (deadline ${share} s; setting timeouts 240 s eager, 480 s" \
    "compiled; axes $axes_1b)"
  if (( share < 120 )); then
    echo "bench/run_gpu.sh: only ${share} s left for the 1b preset; rerun with a larger" \
      "--deadline-s or --stages 1b" >&2
    failed=1
  else
    "$py" -m bench.mfu "${args[@]}" --setting-timeout 240 --compile-timeout 480 \
      --deadline-s "$share" --out "$logs" "${mode[@]}" 2>&1 | tee "$logs/mfu-1b.log"
    (( PIPESTATUS[0] == 0 )) || failed=1
  fi
fi

echo "== verdicts"
shopt -s nullglob
"$py" -m bench.mfu_report "$logs"/mfu*.json | tee "$logs/verdicts.txt"
echo "== done in $(( SECONDS - start )) s; logs and JSONs in $logs"
exit "$failed"
