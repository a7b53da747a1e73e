#!/usr/bin/env bash
# Sourced by bench/run_*_on_device.sh: the GPU machine has CUDA, CMake, ninja and torch
# (/opt/torch/.venv) but not the engine's C++ dependencies, which .device-debs-engine/ carries as
# Debian packages (see bench/run_engine_bench_on_device.sh for how to fill it).
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
    for deb in .device-debs-engine/*.deb; do dpkg -x "$deb" "$DEPS"; done
    # The .pc files name /usr; point them at the prefix.
    sed -i "s|=/usr|=$DEPS/usr|" "$DEPS"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc
    export PKG_CONFIG_PATH="$DEPS/usr/lib/x86_64-linux-gnu/pkgconfig"
    local pkgconf=()
    command -v pkg-config > /dev/null || pkgconf=(-DPKG_CONFIG_EXECUTABLE="$DEPS/usr/bin/pkgconf")
    local torch_cmake
    torch_cmake=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
    timeout 120 cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DLORAD_BUILD_SERVER=OFF -DLORAD_TESTS=OFF -DLORAD_ENGINE_BENCH=ON -DLORAD_CUDA=ON \
      -DLORAD_CUDA_ARCHS=90 -DCUDAToolkit_ROOT=/usr/local/cuda \
      -DCMAKE_PREFIX_PATH="$torch_cmake;$DEPS/usr" "${pkgconf[@]}" &&
      timeout 330 cmake --build "$BUILD" --target "$@" -j14
  } > "$log" 2>&1
}
