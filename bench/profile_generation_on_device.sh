#!/usr/bin/env bash
# Where a decode step's time goes, kernel by kernel, on the GPU machine: builds generation_bench
# and runs it under Nsight Systems (CUDA graph nodes traced one by one), batch 1 on one adapter
# and batch 32 on 4 mixed adapters, then prints the kernel summary of each. A diagnosis tool,
# not a benchmark: tracing slows every launch, so read the shares, not the times.
# Without nsys (the H200 machine has only Nsight Compute): ncu times PROFILE_KERNELS kernels of
# eager decode steps one by one (each alone on the GPU, so launch gaps and overlap are not in
# it), and bench/kernel_time_summary.py adds them up per kernel.
#
#   run(command="bash bench/profile_generation_on_device.sh",
#       carry=[".device-debs", ".device-debs-engine"])
#
# env: PROFILE_PLAIN, BEFORE_PROFILE (see below), PROFILE_CASES (default "1:1 32:4", batch:adapters), PROFILE_NEW_TOKENS (default 64),
# PROFILE_SKIP / PROFILE_KERNELS (ncu: launches skipped, then timed; default 15000 / 900).
set -uo pipefail
OUT=${OUT:-/tmp/lorad-generation-profile-out}
SHAPE=${BENCH_SHAPE:-8b}
mkdir -p "$OUT"
source bench/device_build.sh
MODEL=$WORK/model-$SHAPE

log "model ($SHAPE) and build"
"$PY" bench/make_bench_model.py --out "$MODEL" --shape "$SHAPE" --vocab 128256 \
  --tokenizer-from .device-debs-engine/tiny-tokenizer > "$OUT/model.log" 2>&1 &
MODEL_PID=$!
build_and_report "$OUT/build.log" generation_bench
wait $MODEL_PID
log "model: $(tail -1 "$OUT/model.log")"
[ $BUILD_RC -eq 0 ] || exit 1

# BEFORE_PROFILE: a command to run first (e.g. wait for GPU tests started beside this script).
[ -n "${BEFORE_PROFILE:-}" ] && bash -c "$BEFORE_PROFILE"
# PROFILE_PLAIN=1: first the untraced benchmark of the same cases (the real speeds).
if [ "${PROFILE_PLAIN:-0}" = 1 ]; then
  timeout 200 "$BUILD/generation_bench" --model="$MODEL" --batches=1,32 --adapters=4 \
    --repetition_penalty=1.3 --ttft_prompt_tokens=0 --kv_cache_mib=8192 > "$OUT/plain.txt" 2>&1
  grep -v "^RESULT" "$OUT/plain.txt"
fi
NSYS=$(ls /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda/bin/nsys \
  /opt/nvidia/nsight-systems*/bin/nsys 2>/dev/null | head -n 1)
command -v nsys > /dev/null && [ -z "$NSYS" ] && NSYS=$(command -v nsys)
NCU=$(ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
log "nsys: ${NSYS:-none}; ncu: ${NCU:-none}"
for c in ${PROFILE_CASES:-1:1 32:4}; do
  batch=${c%%:*}
  adapters=${c##*:}
  args=(--model="$MODEL" --batches="$batch" --adapters="$adapters" --adapter_cases="$adapters"
    --repetition_penalty=1.3
    --new_tokens="${PROFILE_NEW_TOKENS:-64}" --verify_graphs=0 --ttft_prompt_tokens=0 --forward_alone=
    --kv_cache_mib=8192)
  name=b${batch}-a${adapters}
  if [ -n "$NSYS" ]; then
    timeout 200 "$NSYS" profile --cuda-graph-trace=node --trace=cuda -o "$OUT/$name" -f true \
      "$BUILD/generation_bench" "${args[@]}" > "$OUT/$name.log" 2>&1
    timeout 120 "$NSYS" stats --report cuda_gpu_kern_sum --format csv -o "$OUT/$name" \
      "$OUT/$name.nsys-rep" >> "$OUT/$name.log" 2>&1
    rm -f "$OUT/$name.nsys-rep" "$OUT/$name.sqlite"
    log "$name: $(grep -c . "$OUT/${name}_cuda_gpu_kern_sum.csv" 2>/dev/null) kernel rows"
    head -n 40 "$OUT/${name}_cuda_gpu_kern_sum.csv" 2>/dev/null | cut -c1-220
  elif [ -n "$NCU" ]; then
    timeout 400 "$NCU" --metrics gpu__time_duration.sum --cache-control none --clock-control none \
      --launch-skip "${PROFILE_SKIP:-15000}" --launch-count "${PROFILE_KERNELS:-900}" --csv \
      --print-units base "$BUILD/generation_bench" "${args[@]}" --cuda_graphs=0 \
      > "$OUT/$name.csv" 2> "$OUT/$name.log"
    log "$name: ncu exit $?"
    "$PY" bench/kernel_time_summary.py "$OUT/$name.csv" | tee "$OUT/$name-summary.txt"
  else
    timeout 200 "$BUILD/generation_bench" "${args[@]}" --profile_phases=1 > "$OUT/$name.log" 2>&1
    cat "$OUT/$name.log"
  fi
done
log done
