#!/usr/bin/env bash
# Builds only lorad_kernels, the GPU tests and the benchmarks (LORAD_KERNELS_ONLY=ON: CUDA and
# GoogleTest, nothing else) on the GPU machine, runs them, and writes every log under $OUT.
# The machine has no network: GoogleTest comes from the Debian packages in .device-debs/ (fetched
# here with `apt-get download libgtest-dev googletest`, carried with the run), unpacked with
# dpkg -x into a private prefix.
#   usage (repository root): bash tests/gpu/run_on_device.sh
#   env: GTEST_FILTER (a subset of the tests), BENCHES (default: nf4_gemv_bench lora_bgmv_bench),
#   PROFILE_LAYER, NCU_SKIP (see the end), BEFORE_TESTS, OUT, BUILD
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$ROOT/build-device/out}
BUILD=${BUILD:-/tmp/lorad-kernels-build}
PREFIX=/tmp/lorad-gtest
JOBS=${JOBS:-$(nproc)}
mkdir -p "$OUT" "$PREFIX"
export PATH=/usr/local/cuda/bin:$PATH

step() { echo "=== $* ($(date +%T))" | tee -a "$OUT/summary.txt"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv \
  | tee -a "$OUT/summary.txt"
nvcc --version | tail -n 2 | tee -a "$OUT/summary.txt"

step "googletest"
for deb in "$ROOT"/.device-debs/*.deb; do dpkg -x "$deb" "$PREFIX" || exit 1; done
GTEST_DIR=$(dirname "$(find "$PREFIX" -name GTestConfig.cmake | head -n 1)")

step "configure"
GENERATOR=()
command -v ninja > /dev/null && GENERATOR=(-G Ninja)
cmake -S "$ROOT" -B "$BUILD" "${GENERATOR[@]}" -DLORAD_KERNELS_ONLY=ON -DLORAD_CUDA_ARCHS=90 \
  -DCMAKE_BUILD_TYPE=Release -DGTest_DIR="$GTEST_DIR" > "$OUT/configure.log" 2>&1 \
  || { tail -n 40 "$OUT/configure.log"; exit 1; }

step "build"
cmake --build "$BUILD" -j "$JOBS" > "$OUT/build.log" 2>&1 || { grep -E "error" -A3 "$OUT/build.log" | head -n 60; exit 1; }
grep -E "spill|registers" "$OUT/build.log" > "$OUT/ptxas.txt" || true

status=0
# BEFORE_TESTS: a command to run first (e.g. wait until the GPU is free of other work, so the
# benchmarks below time the kernels alone).
[ -n "${BEFORE_TESTS:-}" ] && bash -c "$BEFORE_TESTS"
step "gpu_tests"
timeout "${GPU_TEST_TIMEOUT_S:-420}" "$BUILD/tests/gpu/gpu_tests" --gtest_output="xml:$OUT/gpu_tests.xml" \
  > "$OUT/gpu_tests.log" 2>&1 || status=1
grep -E "^\[  (PASSED|FAILED) |^\[==========\]|^\[  FAILED  \]" "$OUT/gpu_tests.log" \
  | tee -a "$OUT/summary.txt"
grep -B2 -A6 "Failure" "$OUT/gpu_tests.log" | head -n 80

for bench in ${BENCHES-nf4_gemv_bench lora_bgmv_bench}; do
  step "$bench"
  timeout 120 "$BUILD/bench/$bench" > "$OUT/$bench.txt" 2>&1 || status=1
  cat "$OUT/$bench.txt"
done
# PROFILE_LAYER=<nf4_gemv_bench layer names, e.g. "down_proj gate/up_proj">: Nsight Compute on
# the tensor-core kernel's second launch for each layer (batch 1, the planner's split), with the
# warps' stall reasons, saved as $OUT/ncu-<layer>.txt. NCU_SKIP=0: the first launch instead (32
# rows: the bench's agreement check).
NCU=$(ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
if [ -n "${PROFILE_LAYER:-}" ] && [ -n "$NCU" ]; then
  for layer in $PROFILE_LAYER; do
    step "ncu nf4_mma ($layer)"
    log_file="$OUT/ncu-${layer//\//-}.txt"
    sections=(--section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis
      --section Occupancy --section SchedulerStats --section LaunchStats --section SourceCounters)
    metrics="regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
    metrics+=",l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_pipe_lsu_wavefronts_mem_lg.sum"
    metrics+=",l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,lts__t_sectors_srcunit_tex_op_read.sum"
    metrics+=",l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,smsp__inst_executed.sum"
    # The stall reasons as extra metrics; without them should this ncu not know one.
    NF4_BENCH_LAYER=$layer timeout 300 "$NCU" -k regex:nf4_mma_kernel -s "${NCU_SKIP:-1}" -c 1 \
      --clock-control none "${sections[@]}" --metrics "$metrics" \
      "$BUILD/bench/nf4_gemv_bench" > "$log_file" 2>&1 ||
      NF4_BENCH_LAYER=$layer timeout 300 "$NCU" -k regex:nf4_mma_kernel -s "${NCU_SKIP:-1}" -c 1 \
        --clock-control none "${sections[@]}" "$BUILD/bench/nf4_gemv_bench" >> "$log_file" 2>&1 ||
      status=1
    grep -E "Duration|Eligible|Issued Warp|Warp Cycles Per Issued|stalled_(long|short|mio|math|wait|barrier|lg|tex|not_sel|no_inst|drain|dispatch)" \
      "$log_file" | head -n 30
  done
fi
step "done (status $status)"
exit $status
