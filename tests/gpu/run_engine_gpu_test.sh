#!/usr/bin/env bash
# The Engine's GPU loop test (tests/gpu/engine_gpu_test.cpp) on the GPU machine: builds it with the
# engine (bench/device_build.sh) and runs it on the tiny fixture model, logs under $OUT.
#   run(command="OUT=$OUT bash tests/gpu/run_engine_gpu_test.sh",
#       carry=[".device-debs", ".device-debs-engine"])
# .device-debs/ holds GoogleTest (tests/gpu/run_on_device.sh); .device-debs-engine/ the engine's
# dependencies (bench/run_engine_bench_on_device.sh) and tiny-model/, the fixture model folder
# (copied from ~/.cache/lorad/tiny-llama, which `make test` writes).
set -uo pipefail
OUT=${OUT:-/tmp/lorad-engine-gpu-test-out}
mkdir -p "$OUT"
source bench/device_build.sh
[ -f .device-debs-engine/tiny-model/config.json ] ||
  { echo "carry .device-debs-engine/tiny-model/ (see the top of this script)"; exit 1; }
build_and_report "$OUT/engine-gpu-build.log" engine_gpu_test
[ $BUILD_RC -eq 0 ] || exit 1
LORAD_TINY_MODEL=$ROOT/.device-debs-engine/tiny-model LORAD_QA_DATA=$ROOT/tests/fixtures/qa_small.jsonl \
  timeout "${TEST_TIMEOUT_S:-400}" "$BUILD/engine_gpu_test" --gtest_output="xml:$OUT/engine_gpu_test.xml" \
  > "$OUT/engine_gpu_test.log" 2>&1
rc=$?
grep -E "^\[ +(OK|FAILED|PASSED) |max relative|Failure" -A3 "$OUT/engine_gpu_test.log" | head -n 60
exit $rc
