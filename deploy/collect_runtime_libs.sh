#!/usr/bin/env bash
# Copies the lorad binary and every shared library it loads (libtorch, gRPC, protobuf, ...) into
# one folder tree, so the Docker runtime stage needs no compilers, venv or -dev packages:
#
#   deploy/collect_runtime_libs.sh BUILD_DIR DEST   ->  DEST/bin/lorad, DEST/lib/*.so*
#   deploy/collect_runtime_libs.sh BUILD_DIR --list ->  prints the libraries it would copy
#
# The NVIDIA driver libraries (libcuda, libnvidia-*) are left out: the NVIDIA container runtime
# mounts the host's. glibc's own libraries are left out: the runtime image has them.
set -euo pipefail
BUILD="${1:?usage: collect_runtime_libs.sh BUILD_DIR DEST}"
DEST="${2:?usage: collect_runtime_libs.sh BUILD_DIR DEST}"
BIN="$BUILD/server/lorad"
[[ -x "$BIN" ]] || { echo "collect_runtime_libs.sh: $BIN not built (run make build)" >&2; exit 2; }

missing=$(ldd "$BIN" | awk '/not found/ {print $1}')
if [[ -n "$missing" ]]; then
  echo "collect_runtime_libs.sh: unresolved libraries: $missing" >&2
  exit 1
fi
libs=()
while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libdl.so*|librt.so*|libpthread.so*|ld-linux*|libcuda.so*|libnvidia-*) ;;
    *) libs+=("$lib") ;;
  esac
done < <(ldd "$BIN" | awk '/=> \// {print $3}')
if [[ "$DEST" == "--list" ]]; then
  printf '%s\n' "${libs[@]}"
  exit 0
fi
mkdir -p "$DEST/bin" "$DEST/lib"
cp "$BIN" "$DEST/bin/lorad"
cp -L "${libs[@]}" "$DEST/lib/"
echo "collected ${#libs[@]} libraries into $DEST/lib"
