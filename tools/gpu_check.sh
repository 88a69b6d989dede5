#!/usr/bin/env bash
# The GPU path of issue 22 in one command (`make gpu-check`), meant to finish in under 8 minutes on one H200:
#
#   1. build the CUDA extension (torch.ops.toolkit_ops with CUDA kernels);
#   2. check every compiled op against the reference on CUDA: forward, backward, double backward, fp16/32/64, and
#      the fake kernels torch.compile traces with (tools/ops_check.py);
#   3. count host-device syncs in the engine's inner loop, per precision (tools/sync_check.py);
#   4. short refine.py and distill.py runs on the shipped Fashion-MNIST models in fp32, bf16 and fp16 (and refine
#      with --compile);
#   5. the speed benchmark on CUDA at the small and the CIFAR-10 size (bench/speed.py, eager, then torch.compile).
#
# Every step runs under a time limit and the script goes on after a failure; the last lines are a summary table
# (PASS / FAIL / TIMEOUT per step, seconds), and the exit status is 1 if any step did not pass. Logs and results go
# to $OUT (default gpu-check-out/): one .log per step, bench-*.json (the benchmarks' JSON lines), summary.txt.
#
#   PYTHON=python3       an interpreter with a CUDA build of torch and this project's dependencies
#   OUT=dir              where logs and results go
#   GPU_CHECK_BENCH=0    leave out step 5
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
OUT="${OUT:-gpu-check-out}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
START=$(date +%s)
FAILED=0

# step NAME LIMIT_SECONDS COMMAND...: run it with a time limit, its output in $OUT/NAME.log, one summary line.
step() {
    local name="$1" limit="$2"
    shift 2
    local t0=$(date +%s) status
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then status=PASS; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=TIMEOUT; else status="FAIL($rc)"; fi
    [ $rc -eq 0 ] || FAILED=1
    tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
    printf '%-28s %-10s %5d s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" | tee -a "$SUMMARY"
}

"$PY" - <<'PYEOF' || { echo "gpu_check: needs a CUDA build of torch with a visible GPU and the project's dependencies (PYTHON=...)"; exit 2; }
import sys
import click, numpy, torch  # noqa: F401  (the project's own imports follow in the steps)
if torch.version.cuda is None or not torch.cuda.is_available():
    sys.exit(1)
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name()}, '
      f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB')
PYEOF
command -v nvidia-smi > /dev/null && nvidia-smi -L

export TOOLKIT_OPS_IMPL=auto
step build-cuda-ops 300 "$PY" -c "
from torch_utils.ops import _plugin
covered = _plugin.covered_devices(required=True)
assert 'cuda' in covered, f'built without CUDA kernels: {sorted(covered)} (is nvcc / CUDA_HOME there?)'
print('toolkit_ops built and loaded for', sorted(covered))"
step ops-check 120 "$PY" tools/ops_check.py --device cuda
for precision in fp32 bf16 fp16; do
    step "sync-check-$precision" 60 "$PY" tools/sync_check.py --device cuda --precision "$precision" --steps 3
done

NET=embedded/fmnist-stylegan2-240kimg.pkl
TEACHER=embedded/fmnist-edm-492kimg.pkl
SHORT="--kimg=0.128 --batch=32 --tick=0.064 --snap=1 --grid=16 --glr=1e-4 --lr=1e-4 --device=cuda --no-progress"
for precision in fp32 bf16 fp16; do
    step "refine-$precision" 90 "$PY" refine.py --network=$NET --teacher=$TEACHER $SHORT --precision=$precision \
        --outdir="$OUT/runs"
    step "distill-$precision" 90 "$PY" distill.py --teacher=embedded/fmnist-edm.pkl $SHORT --precision=$precision \
        --outdir="$OUT/runs"
done
step refine-bf16-compile 150 "$PY" refine.py --network=$NET --teacher=$TEACHER $SHORT --precision=bf16 --compile \
    --outdir="$OUT/runs"

if [ "${GPU_CHECK_BENCH:-1}" != 0 ]; then
    step bench-eager 120 "$PY" bench/speed.py --device=cuda --configs=small,cifar10 --batch=8 --repeats=10 --compiled=none
    tail -n 1 "$OUT/bench-eager.log" > "$OUT/bench-eager.json"
    left=$(( 470 - ($(date +%s) - START) ))
    if [ $left -ge 60 ]; then  # Compilation of the CIFAR-10 networks takes minutes: only in the time left.
        step bench-compile "$left" "$PY" bench/speed.py --device=cuda --configs=cifar10 --batch=8 --repeats=10 \
            --compiled=fastest
        tail -n 1 "$OUT/bench-compile.log" > "$OUT/bench-compile.json"
    else
        printf '%-28s %-10s\n' bench-compile "SKIPPED (${left}s left)" | tee -a "$SUMMARY"
    fi
fi

echo "gpu_check: $(( $(date +%s) - START )) s in all; results in $OUT" | tee -a "$SUMMARY"
cat "$SUMMARY"
exit $FAILED
