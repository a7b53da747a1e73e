#!/usr/bin/env bash
# Builds lorad's engine benchmarks on the GPU machine and runs them next to their transformers +
# PEFT baselines, all in one call (the device is lent by the minute):
#
#   run(command="bash bench/run_engine_bench_on_device.sh",
#       carry=[".device-debs-engine", ".device-python"])
#
# The machine has CUDA, CMake, ninja and torch (/opt/torch/.venv) but not the engine's C++
# dependencies, so .device-debs-engine/ (ignored; see the apt-get download line below) carries
# Debian packages of abseil, RE2, nlohmann-json and pkgconf, unpacked into a private prefix (never
# into /), and the tiny fixture model's tokenizer files (tiny-tokenizer/). Fill it here with:
#   mkdir -p .device-debs-engine/tiny-tokenizer && cd .device-debs-engine &&
#   apt-get download libabsl-dev libabsl20220623 libre2-dev libre2-9 nlohmann-json3-dev \
#     pkgconf pkgconf-bin libpkgconf3 &&
#   cp ~/.cache/lorad/tiny-llama/{tokenizer.model,tokenizer_config.json,special_tokens_map.json} \
#     tiny-tokenizer/
#
# Writes under $OUT: 2026-12-01-<device>-trainer.txt, 2026-12-01-<device>-generation.txt (each: device,
# versions, the raw outputs of both sides and the ratio table) and build.log. Every step has its
# own time limit, so one that hangs still leaves the others' results. Never asserts a timing.
set -uo pipefail
OUT=${OUT:-/tmp/lorad-engine-bench-out}
DATE=${BENCH_DATE:-2026-12-01}
SHAPE=${BENCH_SHAPE:-1b}
mkdir -p "$OUT"
source bench/device_build.sh
MODEL=$WORK/model-$SHAPE

# ---- the model, on the GPU, while the C++ builds on the CPUs --------------------------------------
log "generating the $SHAPE random model"
"$PY" bench/make_bench_model.py --out "$MODEL" --shape "$SHAPE" \
  --tokenizer-from .device-debs-engine/tiny-tokenizer > "$OUT/model.log" 2>&1 &
MODEL_PID=$!
"$PY" bench/make_bench_dataset.py --out "$WORK/train.jsonl" --rows 128 >> "$OUT/model.log" 2>&1

# ---- dependencies into a private prefix, then the build ------------------------------------------
log "building"
build_and_report "$OUT/build.log" trainer_bench generation_bench
wait $MODEL_PID
log "model: $(tail -1 "$OUT/model.log")"

header() {  # what every results file starts with
  echo "# $1"
  echo "# date: $DATE; device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
  echo "# model: random-init Llama, $SHAPE shape ($(tail -1 "$OUT/model.log")); tokenizer of the tiny fixture model"
  echo "# $("$PY" -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")' 2>&1)"
  baseline_note
  echo "# lorad build: $([ $BUILD_RC -eq 0 ] && echo ok || echo "FAILED (exit $BUILD_RC), see build.log")"
  echo
}

# Runs one benchmark with a time limit, its output into the file, its exit code noted.
bench() {  # bench FILE LIMIT_S COMMAND...
  local file=$1 limit=$2
  shift 2
  echo "\$ ${*#$ROOT/}" >> "$file"
  timeout "$limit" "$@" >> "$file" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || echo "!! exit code $rc$([ $rc -eq 124 ] && echo ' (time limit)')" >> "$file"
  echo >> "$file"
  log "$(basename "$1") ... exit $rc"
}

# ---- the runs: the core comparisons first, the extras while the call's time lasts ----------------
TRAIN=$OUT/$DATE-$DEVICE_TAG-trainer.txt
GEN=$OUT/$DATE-$DEVICE_TAG-generation.txt
header "Training throughput: lorad Trainer (QLoRA) vs transformers + PEFT LoRA loop, same run" > "$TRAIN"
echo "# LoRA r=16 alpha=16 dropout 0 on all seven projections; micro-batch 2 x seq 512; grad_accum 1; lr 2e-4; 3 warm-up steps then 10 timed" >> "$TRAIN"
echo "# lorad: gradient checkpointing is not implemented yet (TrainingJobConfig), so both sides keep all activations; the baseline with checkpointing is shown for reference" >> "$TRAIN"
echo >> "$TRAIN"
header "Generation throughput: lorad InferenceEngine (NF4 base, paged KV, multi-LoRA) vs transformers generate, same run" > "$GEN"
echo "# 128 random prompt ids + 128 new tokens per request (EOS ignored / min_new_tokens), greedy; adapters: 4 random rank-16 adapters, request i on adapter i % 4 (PEFT: adapter_names)" >> "$GEN"
echo "# decode tok/s = batch * 127 / (time after every request's first token); e2e tok/s = batch * 128 / (submit -> last token)" >> "$GEN"
echo >> "$GEN"
LORAD_OK=$([ $BUILD_RC -eq 0 ] && echo 1 || echo 0)
trainer() {  # trainer BASE OPTIMIZER
  [ "$LORAD_OK" = 1 ] && bench "$TRAIN" 100 "$BUILD/trainer_bench" --model="$MODEL" \
    --data="$WORK/train.jsonl" --base=$1 --optimizer=$2 --output_dir="$WORK/train-$1-$2"
}
# Issue 4: QLoRA with 8-bit AdamW against the bf16 PEFT loop.
trainer nf4 adamw_8bit
trainer nf4 adamw
bench "$TRAIN" 100 "$PY" bench/hf_baseline.py train --model "$MODEL"
# Issue 5: batch 1, 8, 32, base and 4 mixed adapters, on both sides.
[ "$LORAD_OK" = 1 ] &&
  bench "$GEN" 150 "$BUILD/generation_bench" --model="$MODEL" --batches=1,8,32 --adapters=4
bench "$GEN" 150 "$PY" bench/hf_baseline.py generate --model "$MODEL" --batches 1,8,32 --adapters 4
# Extras, each only if the call still has time (the run's limit is 600 s).
[ $SECONDS -lt 470 ] && bench "$TRAIN" 60 "$PY" bench/hf_baseline.py train --model "$MODEL" \
  --gradient-checkpointing
[ $SECONDS -lt 480 ] && trainer none adamw
"$PY" bench/engine_bench_report.py train "$TRAIN" >> "$TRAIN" 2>&1
"$PY" bench/engine_bench_report.py generate "$GEN" >> "$GEN" 2>&1

log "done"
cat "$TRAIN" "$GEN" | grep -v "^step "
