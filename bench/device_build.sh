#!/usr/bin/env bash
# Sourced by bench/run_*_on_device.sh (from the repository root): the places and helpers they
# share, and the engine build. The GPU machine has CUDA, CMake, ninja and torch (/opt/torch/.venv)
# but not the engine's C++ dependencies, which .device-debs-engine/ carries as Debian packages
# (see bench/run_engine_bench_on_device.sh for how to fill it).
ROOT=$(pwd)
PY=/opt/torch/.venv/bin/python
[ -x "$PY" ] || PY=python3
DEPS=/tmp/lorad-bench-deps  # the unpacked .device-debs-engine/
WORK=/tmp/lorad-bench       # models and datasets
BUILD=$ROOT/build-device-bench
export PYTHONUNBUFFERED=1
# bitsandbytes, when the run carries it (bench/fetch_bitsandbytes.sh): the 4-bit QLoRA baselines.
if [ -d "$ROOT/.device-python" ]; then
  export PYTHONPATH="$ROOT/.device-python${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$DEPS" "$WORK"
# The card in results files' names ("h100", "h200"; "gpu" for another): runs may land on either.
DEVICE_TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 |
  grep -o -i 'h[0-9]00' | head -n 1 | tr 'A-Z' 'a-z')
DEVICE_TAG=${DEVICE_TAG:-gpu}
log() { echo "[$(date +%H:%M:%S)] $*"; }
# A results-file line saying which base the transformers baseline has (hf_baseline.py --base auto).
baseline_note() {
  if [ -n "${BENCH_BASELINES:-}" ] && [[ " $BENCH_BASELINES " != *" nf4 "* ]] &&
    [[ " $BENCH_BASELINES " != *" auto "* ]]; then
    echo "# the baseline's base model is bf16 (BENCH_BASELINES=$BENCH_BASELINES), not 4-bit"
  elif "$PY" -c 'import bitsandbytes' > /dev/null 2>&1; then
    echo "# bitsandbytes $("$PY" -c 'import bitsandbytes; print(bitsandbytes.__version__)') carried: the baseline's base model is 4-bit NF4 (QLoRA)"
  else
    echo "# bitsandbytes is NOT installed on this machine: the baseline's base model is bf16, not 4-bit"
  fi
}
#
#   build_engine_bench LOG TARGET...
# unpacks them into $DEPS (never into /), configures $BUILD for the engine benchmarks (sm_90,
# RelWithDebInfo, no server, no tests) and builds TARGETs, all output into LOG; returns the exit
# code. Needs PY, DEPS and BUILD set; exports LD_LIBRARY_PATH for the binaries.
build_engine_bench() {
  local log=$1
  shift
  export LD_LIBRARY_PATH="$DEPS/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  {
    # .device-debs/ (GoogleTest), when carried, for tests/gpu/engine_gpu_test.cpp.
    for deb in .device-debs-engine/*.deb .device-debs/*.deb; do
      [ -f "$deb" ] && dpkg -x "$deb" "$DEPS"
    done
    # The .pc files name /usr; point them at the prefix.
    sed -i "s|=/usr|=$DEPS/usr|" "$DEPS"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc
    export PKG_CONFIG_PATH="$DEPS/usr/lib/x86_64-linux-gnu/pkgconfig"
    local pkgconf=()
    command -v pkg-config > /dev/null || pkgconf=(-DPKG_CONFIG_EXECUTABLE="$DEPS/usr/bin/pkgconf")
    local torch_cmake
    torch_cmake=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
    # Ninja rebuilds by time stamps, but a later call copies the tree in with the time stamps it
    # has here, which may be older than objects an earlier call built from other contents (an
    # A/B's old side): touch every source whose contents changed since the last build here.
    mkdir -p "$BUILD"
    find CMakeLists.txt bench engine kernels proto server tests -type f \( -name '*.cpp' \
      -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.proto' -o -name '*.cmake' \
      -o -name CMakeLists.txt \) 2> /dev/null | xargs md5sum | sort > "$BUILD/sources.md5.new"
    if [ -f "$BUILD/sources.md5" ]; then
      comm -13 "$BUILD/sources.md5" "$BUILD/sources.md5.new" | awk '{print $2}' | xargs -r touch
    fi
    mv "$BUILD/sources.md5.new" "$BUILD/sources.md5"
    timeout 120 cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DLORAD_BUILD_SERVER=OFF -DLORAD_TESTS=OFF -DLORAD_ENGINE_BENCH=ON -DLORAD_CUDA=ON \
      -DLORAD_CUDA_ARCHS=90 -DCUDAToolkit_ROOT=/usr/local/cuda \
      -DCMAKE_PREFIX_PATH="$torch_cmake;$DEPS/usr" "${pkgconf[@]}" &&
      timeout 330 cmake --build "$BUILD" --target "$@" -j14
  } > "$log" 2>&1
}

#   build_and_report LOG TARGET...
# build_engine_bench, then its exit code in BUILD_RC, a log line, and the log's tail on failure.
build_and_report() {
  build_engine_bench "$@"
  BUILD_RC=$?
  log "build exit $BUILD_RC (log: $(basename "$1"))"
  [ $BUILD_RC -eq 0 ] || tail -40 "$1"
}

# A/B runs (bench/prepare_ab.sh wrote $AB): puts one side's files in place, copying $AB/<side>/
# over the tree (bench/ excepted: both builds measure with the working tree's benchmarks) and
# removing the files that side does not have.
AB=.device-ab
swap_to() {  # swap_to old|new
  local side=$1 gone
  [ "$side" = old ] && gone=$AB/added.txt || gone=$AB/deleted.txt
  (cd "$AB/$side" && find . -type f | sed 's|^\./||') | grep -v '^bench/' |
    while read -r f; do mkdir -p "$(dirname "$f")" && cp "$AB/$side/$f" "$f"; done
  grep -v '^bench/' "$gone" | while read -r f; do rm -f "$f"; done
}

#   build_both_sides TARGET
# builds TARGET for the working tree ("new") and for $AB's old side into /tmp/TARGET-new and
# /tmp/TARGET-old (logs $OUT/build-new.log, build-old.log), leaving the tree as new; sets NEW_RC
# and OLD_RC.
build_both_sides() {
  local target=$1
  build_and_report "$OUT/build-new.log" "$target"
  NEW_RC=$BUILD_RC
  cp "$BUILD/$target" "/tmp/$target-new" 2> /dev/null
  swap_to old
  build_and_report "$OUT/build-old.log" "$target"
  OLD_RC=$BUILD_RC
  cp "$BUILD/$target" "/tmp/$target-old" 2> /dev/null
  swap_to new
}

# The header of an A/B results file: what was compared, on what, with which builds.
ab_header() {  # ab_header TITLE
  echo "# $1 A/B, same call: old = $(head -1 "$AB/rev.txt"), new = the working tree"
  echo "# date: $DATE; device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
  echo "# model: random-init Llama, $SHAPE shape ($(tail -1 "$OUT/model.log"))"
  echo "# builds: new exit $NEW_RC, old exit $OLD_RC; rounds: $ROUNDS, each old then new"
  sed 's/^/# /' "$AB/rev.txt"
}

# The random-init model of shape $SHAPE at $MODEL (log $OUT/model.log).
make_model() {
  "$PY" bench/make_bench_model.py --out "$MODEL" --shape "$SHAPE" --vocab 128256 \
    --tokenizer-from .device-debs-engine/tiny-tokenizer > "$OUT/model.log" 2>&1
}

# The start of an A/B run: $AB must be there (bench/prepare_ab.sh); sets MODEL.
ab_start() {
  [ -f "$AB/rev.txt" ] || { echo "no $AB/: run bench/prepare_ab.sh REV first and carry $AB"; exit 1; }
  MODEL=$WORK/model-$SHAPE
}
