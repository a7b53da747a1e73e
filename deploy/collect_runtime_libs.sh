#!/usr/bin/env bash
# Copies the lorad binary and every shared library it loads (libtorch, gRPC, protobuf, ...) into
# one folder tree, so the Docker runtime stage needs no compilers, venv or -dev packages:
#
#   deploy/collect_runtime_libs.sh BUILD_DIR DEST   ->  DEST/bin/{lorad,loradctl}, DEST/lib/*.so*
#   deploy/collect_runtime_libs.sh BUILD_DIR --list ->  prints the libraries it would copy
#
# lorad in DEST/bin finds the libraries it names in DEST/lib through its RUNPATH
# ($ORIGIN/../lib), not through the build's venv under the builder's home; a RUNPATH does not
# reach the libraries' own dependencies (gRPC's, ICU's), so run it with
# LD_LIBRARY_PATH=DEST/lib as the image and deploy/lorad.service do, or they come from the host.
# `make install` (PREFIX=/opt/lorad) uses it for a service run by another account.
# LINK=1 hard-links the libraries where DEST is on their filesystem (a test's quick copy).
#
# ldd sees only the libraries linked at build time. torch dlopen()s more once it runs (cuDNN's
# libcudnn_*.so.9 pieces, libnvrtc*, libcaffe2_nvrtc.so, libtorch_cuda_linalg.so with cuSOLVER,
# libnvJitLink, ...), so every library of the torch wheel's lib folder and of the nvidia/*/lib
# folders beside it (the CUDA wheels torch was built against) is copied too: a few GB, but no
# CUDA op fails later for a library that only loads on first use.
#
# The NVIDIA driver libraries (libcuda, libnvidia-*) are left out: the NVIDIA container runtime
# mounts the host's. glibc's own libraries are left out: the runtime image has them.
set -euo pipefail
BUILD="${1:?usage: collect_runtime_libs.sh BUILD_DIR DEST}"
DEST="${2:?usage: collect_runtime_libs.sh BUILD_DIR DEST}"
BIN="$BUILD/server/lorad"
[[ -x "$BIN" ]] || { echo "collect_runtime_libs.sh: $BIN not built (run make build)" >&2; exit 2; }

LDD="$(ldd "$BIN")"
missing=$(awk '/not found/ {print $1}' <<< "$LDD")
if [[ -n "$missing" ]]; then
  echo "collect_runtime_libs.sh: unresolved libraries: $missing" >&2
  exit 1
fi
# The venv's torch/lib is where ldd found libc10.so; its CUDA wheels are in site-packages/nvidia.
c10="$(awk '$1 == "libc10.so" {print $3}' <<< "$LDD")"
[[ -n "$c10" ]] || { echo "collect_runtime_libs.sh: $BIN does not link libc10.so (torch)" >&2; exit 1; }
torch_lib="$(realpath "$(dirname "$c10")")"
shopt -s nullglob
dlopened=()
for f in "$torch_lib"/*.so* "$(dirname "$(dirname "$torch_lib")")"/nvidia/*/lib/*.so*; do
  case "$(basename "$f")" in
    libtorch_python.so) ;;  # torch's Python bindings: needs libpython, never loaded by lorad
    # Multi-node plug-ins: they need MPI, UCX, libfabric or ibverbs, which the image lacks, and
    # one GPU never loads them.
    nvshmem_bootstrap_*|nvshmem_transport_*|libcufile_rdma.so*) ;;
    *) [[ -f "$f" ]] && dlopened+=("$f") ;;
  esac
done

# One file per name: ldd reaches some of the same libraries by other paths (torch/lib/../../nvidia).
declare -A seen=()
libs=()
while read -r lib; do
  [[ -n "$lib" ]] || continue
  name="$(basename "$lib")"
  case "$name" in
    libc.so*|libm.so*|libdl.so*|librt.so*|libpthread.so*|ld-linux*|libcuda.so*|libnvidia-*) ;;
    *) [[ -n "${seen[$name]:-}" ]] || { seen[$name]=1; libs+=("$lib"); } ;;
  esac
done < <(awk '/=> \// {print $3}' <<< "$LDD"; printf '%s\n' "${dlopened[@]}")
if [[ "$DEST" == "--list" ]]; then
  printf '%s\n' "${libs[@]}"
  exit 0
fi
mkdir -p "$DEST/bin" "$DEST/lib"
cp "$BIN" "$DEST/bin/lorad"
# The command-line client too (it links nothing lorad does not): `docker compose exec lorad
# loradctl ...` needs no client built on the host.
if [[ -x "$BUILD/clients/loradctl" ]]; then cp "$BUILD/clients/loradctl" "$DEST/bin/loradctl"; fi
if [[ "${LINK:-}" == 1 ]] && cp -L --link "${libs[@]}" "$DEST/lib/" 2>/dev/null; then :; else
  cp -L "${libs[@]}" "$DEST/lib/"
fi
# The build's RUNPATH names the venv's torch/lib (and CUDA's folders): replaced, in place, by the
# folder beside bin/. (CMake edits ELF files without patchelf; the new path is shorter.)
set_runpath="$(mktemp --suffix=.cmake)"
trap 'rm -f "$set_runpath"' EXIT
cat > "$set_runpath" <<'CMAKE'
file(READ_ELF "${FILE}" RUNPATH runpath)
if(runpath)  # loradctl links no library of the venv: it has none
  file(RPATH_SET FILE "${FILE}" NEW_RPATH "$ORIGIN/../lib")
endif()
CMAKE
for bin in "$DEST"/bin/*; do cmake -DFILE="$bin" -P "$set_runpath"; done
echo "collected ${#libs[@]} libraries into $DEST/lib"
