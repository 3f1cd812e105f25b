#!/usr/bin/env bash
# The GPU checks of issues 22 and 21 as one prepared device call: CUDA tests, then each benchmark, each phase
# under its own time limit so that one slow phase cannot eat the call; JSON and one log under $OUT.
#
#   device run:  bash benchmarks/device_check.sh [PHASE ...]      carry: [".whl"] (from benchmarks/device_wheels.sh)
#   dry run here: ARPO_CHECK_DEVICE=cpu bash benchmarks/device_check.sh      (--quick shapes, same commands)
#
# Phases (default: all, in this order; roughly 9 minutes on an H200 by the limits below, so split them over two
# calls when a rerun must fit): env tests tree stats decode step dist serve. Limits in seconds: LIMIT_<PHASE>.
# `step` takes its shape from ARPO_TRAIN_STEP (see arpo/bench/train_step.py; default: the issue's 32 x 16).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/arpo_device_check}
mkdir -p "$OUT"
DEVICE=${ARPO_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" ARPO_NO_EXT=1 PYTHONUNBUFFERED=1
QUICK=()
[ "$DEVICE" = cuda ] || QUICK=(--quick)
LOG="$OUT/check.log"
ALL=(env tests tree stats decode step dist serve)
PHASES=("$@")
[ ${#PHASES[@]} -gt 0 ] || PHASES=("${ALL[@]}")

phase() {  # phase NAME LIMIT COMMAND...: run under `timeout`, output to the log, one status line to stdout
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "==== $name (limit ${limit}s): $*" >>"$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - start ))s$([ $rc -eq 124 ] && echo ' (time limit)')"
}
bench() {  # bench NAME LIMIT WORKLOAD [ARGS...]: `arpo bench` with its JSON in $OUT/NAME.json
  local name=$1 limit=$2
  shift 2
  phase "$name" "$limit" "$PY" -m arpo bench "$@" --device "$DEVICE" "${QUICK[@]}" --out "$OUT/$name.json"
}

for p in "${PHASES[@]}"; do
  case $p in
    env)
      phase env "${LIMIT_ENV:-60}" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
        || true; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.is_available())'; \
        if [ -d .whl ]; then $PY -m pip install -q --no-index --find-links .whl fastapi uvicorn pydantic httptools; fi"
      ;;
    tests)  # what runs compiled only on CUDA: kernels at production tiles, the model vs HF in bf16, packing
      phase tests "${LIMIT_TESTS:-180}" "$PY" -m pytest -q -x -p no:cacheprovider tests/kernels tests/model \
        tests/algo tests/trainer/test_trainer_parts.py tests/trainer/test_checkpoint.py
      ;;
    tree) bench tree_attention "${LIMIT_TREE:-90}" tree-attention ;;
    stats) bench token_stats "${LIMIT_STATS:-90}" token-stats --only linear ;;
    decode) bench decode "${LIMIT_DECODE:-90}" decode ;;
    step) bench train_step "${LIMIT_STEP:-240}" train-step ;;
    dist)  # issue 22 item 4: FSDP2 (nccl on CUDA) beside the engine, two steps of the embedded model
      rm -rf /tmp/arpo_dist
      phase dist "${LIMIT_DIST:-120}" "$PY" -m arpo train --nproc 1 train.steps=2 sft.steps=10 train.batch_prompts=4 \
        train.mini_batch_prompts=4 train.run_dir=/tmp/arpo_dist
      cp /tmp/arpo_dist/summary.json "$OUT/dist_summary.json" 2>/dev/null
      ;;
    serve) bench serve "${LIMIT_SERVE:-120}" serve ;;
    *) echo "unknown phase '$p' (phases: ${ALL[*]})"; exit 2 ;;
  esac
done
tail -n 60 "$LOG"
