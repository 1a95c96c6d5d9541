#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one script, under 8 minutes on one GPU:
#   1. kdzoo speed, kd resnet18 <- resnet50 at 32 px, batch 256, bf16 autocast, channels_last,
#      with the teacher cache: (a) student step, (b) teacher forward, (c) kd step, (e) kd step
#      served by the cache; eager, then --compile;
#   2. the same kd step through torchdistill (benchmarks/compare_torchdistill.py; skipped with a
#      note when the bench extra is not installed);
#   3. a 1-GPU NCCL run: kdzoo run --nproc 1 (torchrun, one process) of kd with the cache.
# Then benchmarks/gpu_results.py writes the "gpu" section of benchmarks/RESULTS.md, naming the device.
#
#   bash benchmarks/gpu.sh                 # on a machine with a CUDA GPU (kdzoo installed)
#   bash benchmarks/gpu.sh --cpu-dry-run   # tiny sizes on the CPU, eager only; writes to a temporary
#                                          # RESULTS.md: checks that every step runs (tests/test_gpu_script.py)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=$(mktemp -d "${TMPDIR:-/tmp}/kdzoo-gpu.XXXXXX")
if [ "${1:-}" = "--cpu-dry-run" ]; then
    DEVICE=cpu MODEL=test_resnet TEACHER=test_resnet SIZE=16 BATCH=8 STEPS=2 ROUNDS=1 WARMUP=1
    TRAIN=64 RUN_STEPS=4 COMPILE=0 RESULTS="$OUT/RESULTS.md"
else
    DEVICE=cuda MODEL=resnet18 TEACHER=resnet50 SIZE=32 BATCH=256 STEPS=40 ROUNDS=8 WARMUP=5
    TRAIN=10000 RUN_STEPS=200 COMPILE=1 RESULTS=benchmarks/RESULTS.md
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible; use --cpu-dry-run')"
fi
echo "kdzoo gpu.sh: device $DEVICE, outputs in $OUT"

PAIR=(--method kd --model "$MODEL" --teacher "$TEACHER" --input-size "$SIZE" --batch-size "$BATCH" --device "$DEVICE")
TIMING=(--steps "$STEPS" --rounds "$ROUNDS" --warmup "$WARMUP")

# 1. the step, eager and compiled, with and without the cache (phase (e) is the cached step)
kdzoo speed "${PAIR[@]}" "${TIMING[@]}" --teacher-cache --json > "$OUT/speed_eager.json"
if [ "$COMPILE" = 1 ]; then
    kdzoo speed "${PAIR[@]}" "${TIMING[@]}" --teacher-cache --compile --json > "$OUT/speed_compile.json"
fi

# 2. the same kd step under torchdistill
if python -c "import torchdistill" 2>/dev/null; then
    python benchmarks/compare_torchdistill.py --methods kd --model "$MODEL" --teacher "$TEACHER" \
        --input-size "$SIZE" --batch-size "$BATCH" --device "$DEVICE" "${TIMING[@]}" --json > "$OUT/torchdistill.json"
else
    echo "torchdistill is not installed (pip install -e \".[bench]\"): its comparison is left out"
fi

# 3. one GPU under torchrun + NCCL (gloo on the CPU), with the cache; the teacher is trained first (cached)
kdzoo run --nproc 1 "${PAIR[@]}" --teacher-cache --train-size "$TRAIN" --test-size 1000 --epochs 1 \
    --teacher-epochs 1 --max-steps "$RUN_STEPS" --output "$OUT/runs" > "$OUT/run.log" 2>&1 \
    || { tail -n 20 "$OUT/run.log"; exit 1; }

python benchmarks/gpu_results.py "$OUT" --write "$RESULTS"
