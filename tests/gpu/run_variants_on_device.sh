#!/usr/bin/env bash
# Kernel experiments in one device call: builds the kernels, GPU tests and nf4_gemv_bench once per
# variant (VARIANTS: the CUDA compiler flags of each variant, variants separated by ';', e.g.
# "-DX=0; -DX=1 -DY=2"; builds in parallel),
# runs each variant's GPU tests (GTEST_FILTER), then the benchmark ROUNDS times per variant,
# alternating, so clock and thermal drift fall on every variant alike. Logs under $OUT/<n>/.
#   usage (repository root): VARIANTS="-DX=0; -DX=1 -DY=2" \
#     bash tests/gpu/run_variants_on_device.sh          (carry .device-debs, see run_on_device.sh)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$ROOT/build-device/out}
PREFIX=/tmp/lorad-gtest
IFS=';' read -r -a FLAGS <<< "${VARIANTS:?VARIANTS: the compiler flags of each variant}"
ROUNDS=${ROUNDS:-2}
BENCH=${BENCH:-nf4_gemv_bench}
export PATH=/usr/local/cuda/bin:$PATH
mkdir -p "$OUT" "$PREFIX"
for deb in "$ROOT"/.device-debs/*.deb; do dpkg -x "$deb" "$PREFIX" || exit 1; done
GTEST_DIR=$(dirname "$(find "$PREFIX" -name GTestConfig.cmake | head -n 1)")
jobs_each=$(($(nproc) / ${#FLAGS[@]} + 1))
echo "=== build ${#FLAGS[@]} variants ($(date +%T))"
for n in "${!FLAGS[@]}"; do
  mkdir -p "$OUT/$n"
  (CUDAFLAGS="${FLAGS[$n]}" cmake -S "$ROOT" -B "/tmp/lorad-variant-$n" -G Ninja \
    -DLORAD_KERNELS_ONLY=ON -DLORAD_CUDA_ARCHS=90 -DCMAKE_BUILD_TYPE=Release \
    -DGTest_DIR="$GTEST_DIR" > "$OUT/$n/configure.log" 2>&1 &&
    cmake --build "/tmp/lorad-variant-$n" -j "$jobs_each" > "$OUT/$n/build.log" 2>&1 ||
    echo "variant $n (${FLAGS[$n]}): build failed") &
done
wait
status=0
for n in ${TESTED-${!FLAGS[@]}}; do  # TESTED: the variants (numbers) whose tests run; default all
  echo "=== variant $n: ${FLAGS[$n]} ($(date +%T))"
  grep -E "spill|registers" "$OUT/$n/build.log" > "$OUT/$n/ptxas.txt" || true
  timeout 200 "/tmp/lorad-variant-$n/tests/gpu/gpu_tests" > "$OUT/$n/gpu_tests.log" 2>&1 || status=1
  grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]" "$OUT/$n/gpu_tests.log"
done
for round in $(seq "$ROUNDS"); do
  for n in "${!FLAGS[@]}"; do
    echo "=== $BENCH, round $round, variant $n: ${FLAGS[$n]} ($(date +%T))"
    timeout 120 "/tmp/lorad-variant-$n/bench/$BENCH" > "$OUT/$n/$BENCH-$round.txt" 2>&1 || status=1
    # The rows that matter for a comparison; the whole output stays in the file.
    awk '/^tensor-core kernel/ {n = 6} /^timeline/ {tl = 1} n-- > 0 || tl || /^decoder layer/' \
      "$OUT/$n/$BENCH-$round.txt"
  done
done
echo "=== done (status $status)"
exit $status
