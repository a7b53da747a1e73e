#!/usr/bin/env bash
# The trainer issue's benchmark on the GPU machine, in one call: random-init Llama-3.2-1B- and
# Llama-3-8B-shaped models (vocabulary 128256), batch 2 x 2048 tokens, LoRA r=16 on all seven projections, gradient
# checkpointing on both sides; lorad's QLoRA trainer (NF4 base, 8-bit AdamW) next to the
# transformers + PEFT LoRA loop (4-bit QLoRA when the run carries bitsandbytes, else bf16). Prints tokens/s,
# peak memory and their ratios; never asserts a timing.
#
#   run(command="bash bench/run_trainer_bench_on_device.sh",
#       carry=[".device-debs-engine", ".device-python"])
# .device-python/ (bench/fetch_bitsandbytes.sh, optional) makes the baseline the notebook's
# QLoRA: 4-bit base by bitsandbytes and its 8-bit AdamW.
#
# .device-debs-engine/ is filled as bench/run_engine_bench_on_device.sh says.
#
# env: BENCH_SHAPES (default "1b 8b"); BENCH_GPU_TESTS=1 also builds and runs the GPU kernel tests
# (tests/gpu/run_on_device.sh, needs .device-debs carried) before the benchmark starts;
# BENCH_TORCH_OPS=1 also runs lorad's trainer with the reference torch ops in place of the fused
# layer ops (a same-run before/after); PROFILE_STEPS=N then profiles N more steps kernel by kernel.
set -uo pipefail
OUT=${OUT:-/tmp/lorad-trainer-bench-out}
DATE=${BENCH_DATE:-$(date +%F)}
SHAPES=${BENCH_SHAPES:-1b 8b}
mkdir -p "$OUT"
source bench/device_build.sh

if [ "${BENCH_GPU_TESTS:-0}" = 1 ]; then
  (OUT=$OUT/gpu-tests JOBS=4 bash tests/gpu/run_on_device.sh > "$OUT/gpu-tests.log" 2>&1) &
else
  true &
fi
TESTS_PID=$!

for shape in $SHAPES; do
  "$PY" bench/make_bench_model.py --out "$WORK/model-$shape" --shape "$shape" --vocab 128256 \
    --tokenizer-from .device-debs-engine/tiny-tokenizer > "$OUT/model-$shape.log" 2>&1
done &
MODEL_PID=$!
"$PY" bench/make_bench_dataset.py --out "$WORK/train.jsonl" --rows 64 --min-chars 40000 \
  > "$OUT/dataset.log" 2>&1

build_and_report "$OUT/build.log" trainer_bench
wait $MODEL_PID
wait $TESTS_PID  # the GPU to the benchmark alone
[ -f "$OUT/gpu-tests/summary.txt" ] &&
  log "gpu tests: $(grep -E '^\[  (PASSED|FAILED)' "$OUT/gpu-tests/summary.txt" | tr '\n' ' ')"

header() {
  echo "# QLoRA training throughput, lorad vs transformers + PEFT, same run"
  echo "# date: $DATE; device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader)"
  echo "# $("$PY" -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")')"
  echo "# batch 2 x 2048 tokens, r=16 alpha=16 on all seven projections, gradient checkpointing on both sides,"
  echo "# 3 warm-up steps then 8 timed. lorad: NF4 base + 8-bit AdamW (QLoRA). Baselines: hf_baseline.py --base"
  echo "# ${BENCH_BASELINES:-auto} (nf4: 4-bit base + bitsandbytes' 8-bit AdamW; bf16: bf16 base + torch AdamW;"
  echo "# auto: nf4 when bitsandbytes is carried, else bf16)."
  baseline_note
  echo
}
run() {  # run LIMIT_S COMMAND...
  local limit=$1
  shift
  echo "\$ ${*#$ROOT/}" >> "$RESULT"
  timeout "$limit" "$@" >> "$RESULT" 2>&1 || echo "!! exit $?" >> "$RESULT"
  echo >> "$RESULT"
}
for shape in $SHAPES; do
  RESULT=$OUT/$DATE-$DEVICE_TAG-trainer-$shape-2x2048${BENCH_OFFLOAD:+-offload}.txt
  header > "$RESULT"
  log "shape $shape: $(tail -1 "$OUT/model-$shape.log")"
  echo "## shape $shape: $(tail -1 "$OUT/model-$shape.log")" >> "$RESULT"
  [ $BUILD_RC -eq 0 ] && run 150 "$BUILD/trainer_bench" --model="$WORK/model-$shape" \
    --data="$WORK/train.jsonl" --base=nf4 --optimizer=adamw_8bit --micro_batch=2 --seq=2048 \
    --warmup=3 --steps=8 --gradient_checkpointing=1 --output_dir="$WORK/out-$shape" \
    --profile_steps="${PROFILE_STEPS:-0}"
  [ $BUILD_RC -eq 0 ] && [ "${BENCH_TORCH_OPS:-0}" = 1 ] && run 150 "$BUILD/trainer_bench" \
    --model="$WORK/model-$shape" --data="$WORK/train.jsonl" --base=nf4 --optimizer=adamw_8bit \
    --micro_batch=2 --seq=2048 --warmup=3 --steps=8 --gradient_checkpointing=1 \
    --layer_ops=torch --output_dir="$WORK/out-$shape-torch-ops" \
    --profile_steps="${PROFILE_STEPS:-0}"
  # BENCH_OFFLOAD=1: also with the checkpointed layer inputs in pinned host memory.
  [ $BUILD_RC -eq 0 ] && [ "${BENCH_OFFLOAD:-0}" = 1 ] && run 150 "$BUILD/trainer_bench" \
    --model="$WORK/model-$shape" --data="$WORK/train.jsonl" --base=nf4 --optimizer=adamw_8bit \
    --micro_batch=2 --seq=2048 --warmup=3 --steps=8 --gradient_checkpointing=1 \
    --offload_activations=1 --output_dir="$WORK/out-$shape-offload"
  # BENCH_KEEP_LAYERS="2 4": also with the last N layers keeping their activations (no recompute).
  for keep in ${BENCH_KEEP_LAYERS:-}; do
    [ $BUILD_RC -eq 0 ] && run 150 "$BUILD/trainer_bench" --model="$WORK/model-$shape" \
      --data="$WORK/train.jsonl" --base=nf4 --optimizer=adamw_8bit --micro_batch=2 --seq=2048 \
      --warmup=3 --steps=8 --gradient_checkpointing=1 --keep_activations_layers="$keep" \
      --output_dir="$WORK/out-$shape-keep-$keep"
  done
  # BENCH_OFFLOAD_KEEP="6 9 6:12": also offloaded, with the last N layers keeping their
  # activations (the device memory the offloaded inputs leave spent on skipping recomputes);
  # N:M also has M checkpointed layers keep their MLP's gate and up on the host (keep_mlp_layers).
  # BENCH_MEMORY_CAP_GIB=10: these runs may reserve no more than that (trainer_bench).
  for spec in ${BENCH_OFFLOAD_KEEP:-}; do
    keep=${spec%%:*}
    mlp=0
    [ "$spec" != "$keep" ] && mlp=${spec#*:}
    [ $BUILD_RC -eq 0 ] && run 150 "$BUILD/trainer_bench" --model="$WORK/model-$shape" \
      --data="$WORK/train.jsonl" --base=nf4 --optimizer=adamw_8bit --micro_batch=2 --seq=2048 \
      --warmup=3 --steps=8 --gradient_checkpointing=1 --offload_activations=1 \
      --keep_activations_layers="$keep" --keep_mlp_layers="$mlp" \
      --memory_cap_gib="${BENCH_MEMORY_CAP_GIB:-0}" \
      --output_dir="$WORK/out-$shape-offload-keep-$keep-mlp-$mlp"
  done
  # BENCH_PACKING=1: also short examples (about 100 tokens) packed several to a row, kept apart.
  if [ $BUILD_RC -eq 0 ] && [ "${BENCH_PACKING:-0}" = 1 ]; then
    "$PY" bench/make_bench_dataset.py --out "$WORK/short.jsonl" --rows 4000 --min-chars 400 \
      > "$OUT/dataset-short.log" 2>&1
    run 150 "$BUILD/trainer_bench" --model="$WORK/model-$shape" --data="$WORK/short.jsonl" \
      --base=nf4 --optimizer=adamw_8bit --micro_batch=2 --seq=2048 --warmup=3 --steps=8 \
      --gradient_checkpointing=1 --packing=1 --output_dir="$WORK/out-$shape-packing"
  fi
  # BENCH_BASELINES (default auto): hf_baseline.py --base for each baseline, e.g. "bf16 nf4" for
  # both the issue's bf16 LoRA loop and the 4-bit QLoRA one.
  for hf_base in ${BENCH_BASELINES:-auto}; do
    run 240 "$PY" bench/hf_baseline.py train --model "$WORK/model-$shape" --micro-batch 2 \
      --seq 2048 --warmup 3 --steps 8 --gradient-checkpointing --base "$hf_base"
  done
  rm -rf "$WORK/model-$shape"
  "$PY" bench/engine_bench_report.py train "$RESULT" >> "$RESULT" 2>&1
  grep -v "^step " "$RESULT"
done
log done
