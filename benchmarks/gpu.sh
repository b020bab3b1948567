#!/usr/bin/env bash
# SDXL-size Diffusion-DPO LoRA train step on one GPU: 1024 px (128x128 latents), 1 pair, bf16 weights + bf16 autocast,
# random weights (nothing is downloaded), with and without gradient checkpointing.
#
#   benchmarks/gpu.sh                              # on a GPU machine: --device cuda --size sdxl
#   benchmarks/gpu.sh --device cpu --size tiny     # smoke test of the same code path on a CPU
#   benchmarks/gpu.sh --memory                     # the per-family memory / speed table (benchmarks/memory.py's
#                                                  # estimate, then measured: benchmarks/memory_measure.py)
#
# Prints, per setting: (1) a process that runs only row (a), diffalign's training step, so its peak
# torch.cuda.max_memory_allocated is the whole step (target: < 24 GB with gradient checkpointing), then
# (2) the a/b/c comparison of train_step.py (ratios vs the naive recipe and the compute floor), then the levers
# table (bf16 is already on via --dtype; compile is left out: run levers.py --compile by hand).
# Results go to benchmarks/results/gpu-*.json (or $OUT/ if set). Extra arguments (--steps, --warmup, --threads)
# go last to every call, so they override the defaults here.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
SIZE=sdxl
EXTRA=()
MEMORY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --size) SIZE="$2"; shift 2 ;;
    --memory) MEMORY=1; shift ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
PY="${PYTHON:-python}"
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
COMMON=(--size "$SIZE" --device "$DEVICE" --dtype bfloat16 --pairs 1 --steps 5 --warmup 2)

if [[ "$DEVICE" == cuda* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

if [[ "$MEMORY" == 1 ]]; then
  echo "=== memory accounting (estimate, no weights) ==="
  "$PY" benchmarks/memory.py --json "$RESULTS/memory-estimate.json"
  echo
  echo "=== measured on $DEVICE: SD1.5@512, SDXL@1024, SD3.5-M@1024, FLUX.1-dev@1024 x fp32/bf16/bf16+ckpt/int8+ckpt ==="
  (cd benchmarks && PYTHONPATH="${PYTHONPATH:-..}" "$PY" memory_measure.py --device "$DEVICE" \
    --json "../$RESULTS/memory-measured-$DEVICE.json" ${EXTRA[@]+"${EXTRA[@]}"})
  exit 0
fi
"$PY" -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"

for GC in off on; do
  FLAG=(--precision bf16 --quiet)
  if [[ "$GC" == on ]]; then FLAG+=(--gradient-checkpointing); fi
  echo
  echo "=== $SIZE, gradient checkpointing $GC: row (a) alone (its peak = the training process's peak) ==="
  "$PY" benchmarks/train_step.py "${COMMON[@]}" "${FLAG[@]}" --rows a \
    --json "$RESULTS/gpu-$SIZE-$DEVICE-gc_$GC-a.json" ${EXTRA[@]+"${EXTRA[@]}"}
  echo
  echo "=== $SIZE, gradient checkpointing $GC: a vs b (naive) vs c (floor) ==="
  "$PY" benchmarks/train_step.py "${COMMON[@]}" "${FLAG[@]}" --rows abc \
    --json "$RESULTS/gpu-$SIZE-$DEVICE-gc_$GC-abc.json" ${EXTRA[@]+"${EXTRA[@]}"}
done

echo
echo "=== $SIZE levers (row a; bf16 weights) ==="
"$PY" benchmarks/levers.py "${COMMON[@]}" --json "$RESULTS/gpu-$SIZE-$DEVICE-levers.json" ${EXTRA[@]+"${EXTRA[@]}"}

echo
echo "=== summary: $SIZE DPO-LoRA, 1 pair, bf16 ==="
"$PY" - "$RESULTS" "$SIZE" "$DEVICE" <<'EOF'
import json, sys
results, size, device = sys.argv[1:]
for gc in ("off", "on"):
    r = json.load(open(f"{results}/gpu-{size}-{device}-gc_{gc}-a.json"))
    peak = r["process_peak_bytes"] / 1e9
    step = r["rows"]["a"]["median_s"]
    verdict = ("ok" if peak < 24 else "MISSED") if gc == "on" else "-"
    print(f"gradient checkpointing {gc:3}: {step:7.3f} s/step, process peak {peak:6.2f} GB (target < 24 GB with it on: {verdict})")
EOF
