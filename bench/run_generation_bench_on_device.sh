#!/usr/bin/env bash
# Issue 5's benchmark (and issue 3's NF4 memory figure) on the GPU machine, in one call: the GPU
# kernel tests, then a random-init Llama-3-8B-shaped model (vocabulary 128256), 128 prompt + 128
# new tokens, greedy, repetition penalty 1.3, batch 1 and 32, on the base, on one adapter and on 4
# mixed adapters: lorad's InferenceEngine (NF4 base, paged decode kernel, CUDA graphs, BGMV) next
# to transformers + PEFT generate (4-bit base when the run carries bitsandbytes, else bf16), plus the
# batch-1 bandwidth bound, a graph-replay check and the TTFT of a 2048-token prompt.
#
#   run(command="bash bench/run_generation_bench_on_device.sh",
#       carry=[".device-debs", ".device-debs-engine", ".device-python"])
# .device-python/ (bench/fetch_bitsandbytes.sh, optional) makes the baseline the 4-bit one.
#
# .device-debs/ holds GoogleTest (tests/gpu/run_on_device.sh), .device-debs-engine/ the engine's
# dependencies (bench/run_engine_bench_on_device.sh says how to fill both). Writes under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/lorad-generation-bench-out}
DATE=${BENCH_DATE:-$(date +%F)}
SHAPE=${BENCH_SHAPE:-8b}
mkdir -p "$OUT"
source bench/device_build.sh
MODEL=$WORK/model-$SHAPE

log "model ($SHAPE) and kernel tests"
rm -f "$WORK/model.done"
("$PY" bench/make_bench_model.py --out "$MODEL" --shape "$SHAPE" --vocab 128256 \
  --tokenizer-from .device-debs-engine/tiny-tokenizer > "$OUT/model.log" 2>&1
 touch "$WORK/model.done") &
MODEL_PID=$!
# The kernel tests and benchmarks build beside the engine and run once the model is written
# (the GEMV benchmark must have the GPU to itself).
# BENCH_GPU_TESTS=0 skips them (a repeat run of the benchmark alone).
if [ "${BENCH_GPU_TESTS:-1}" = 1 ]; then
  (OUT=$OUT/gpu-tests JOBS=4 BEFORE_TESTS="while [ ! -f $WORK/model.done ]; do sleep 2; done" \
    bash tests/gpu/run_on_device.sh > "$OUT/gpu-tests.log" 2>&1) &
else
  mkdir -p "$OUT/gpu-tests" && echo "(skipped)" > "$OUT/gpu-tests/summary.txt"
  true &
fi
TESTS_PID=$!

build_and_report "$OUT/build.log" generation_bench
wait $TESTS_PID
log "gpu tests: $(grep -E '^\[  (PASSED|FAILED)|skipped' "$OUT/gpu-tests/summary.txt" | tr '\n' ' ')"
wait $MODEL_PID
log "model: $(tail -1 "$OUT/model.log")"

RESULT=$OUT/$DATE-$DEVICE_TAG-generation-$SHAPE.txt
{
  echo "# Generation: lorad InferenceEngine vs transformers + PEFT generate, same run (issue 5)"
  echo "# date: $DATE; device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
  echo "# model: random-init Llama, $SHAPE shape ($(tail -1 "$OUT/model.log")); tokenizer of the tiny fixture model"
  echo "# $("$PY" -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")')"
  baseline_note
  echo "# 128 random prompt ids + 128 new tokens, greedy, repetition penalty 1.3; adapters rank 16;"
  echo "# 'adapters 1' = every request on one adapter, 'adapters 4' = request i on adapter i % 4"
  echo "# gpu kernel tests in the same call: $(grep -E '^\[  (PASSED|FAILED)' "$OUT/gpu-tests/summary.txt" | tr '\n' ' ')"
  echo
} > "$RESULT"
run() {  # run LIMIT_S COMMAND...
  local limit=$1
  shift
  echo "\$ ${*#$ROOT/}" >> "$RESULT"
  timeout "$limit" "$@" >> "$RESULT" 2>&1 || echo "!! exit $?" >> "$RESULT"
  echo >> "$RESULT"
  log "$(basename "$1") done"
}
if [ $BUILD_RC -eq 0 ]; then
  # BENCH_ARGS: extra generation_bench flags (e.g. --profile_phases=1 for a per-phase breakdown).
  run 170 "$BUILD/generation_bench" --model="$MODEL" --batches=1,32 --adapters=4 \
    --repetition_penalty=1.3 --kv_cache_mib=8192 ${BENCH_ARGS:-}
  # The torch ops instead of the fused layer kernels (what the fusion buys), batch 1.
  # BENCH_VARIANTS=0 skips the two variants below (a short call).
  [ "${BENCH_VARIANTS:-1}" = 1 ] && [ $SECONDS -lt 360 ] && run 60 "$BUILD/generation_bench" --model="$MODEL" --batches=1 \
    --adapters=0 --repetition_penalty=1.3 --fused_layer_ops=0 --variant=torch-layer-ops \
    --verify_graphs=0 --ttft_prompt_tokens=0 --kv_cache_mib=8192
  # Batch 32 through dequantize + cuBLAS (the path before the tensor-core 4-bit kernel).
  [ "${BENCH_VARIANTS:-1}" = 1 ] && [ $SECONDS -lt 330 ] && run 60 "$BUILD/generation_bench" --model="$MODEL" --batches=32 \
    --adapters=0 --repetition_penalty=1.3 --gemv_max_rows=8 --variant=dequant-cublas \
    --verify_graphs=0 --ttft_prompt_tokens=0 --kv_cache_mib=8192
fi
# BENCH_HF=0 skips the baseline (a diagnosis run).
[ "${BENCH_HF:-1}" = 1 ] && run $((570 - SECONDS)) "$PY" bench/hf_baseline.py generate --model "$MODEL" --batches 1,32 \
  --adapters 4 --repetition-penalty 1.3
"$PY" bench/engine_bench_report.py generate "$RESULT" >> "$RESULT" 2>&1
cp "$OUT"/gpu-tests/*.txt "$OUT/" 2>/dev/null
log done
cat "$RESULT"
