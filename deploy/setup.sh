#!/usr/bin/env bash
# Installs everything lorad needs to build, run and test, and nothing twice.
#
#   deploy/setup.sh            # Debian packages + Python venv (libtorch, reference stack) + tiny model
#   deploy/setup.sh --no-apt   # skip Debian packages (e.g. inside a prepared image)
#   deploy/setup.sh --no-model # skip the tiny fixture model (e.g. the Docker build stage)
#
# Idempotent and quick when everything is present: Debian packages are checked with dpkg-query,
# the venv is rebuilt only when deploy/requirements.txt changes, the tiny model only when its
# generator changes. Everything lands in $LORAD_CACHE (default ~/.cache/lorad), outside the
# checkout, so fresh clones and CI runs on the same machine re-use it.
#
# Ends its stdout with the variables the Makefile needs, one `export NAME=value` line each,
# quoted for bash (a LORAD_CACHE with spaces stays one word), for build/setup.env:
#   export LORAD_VENV=...  export LORAD_MODEL=...  export LORAD_TORCH_CMAKE=...
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${LORAD_CACHE:-$HOME/.cache/lorad}"
VENV="$CACHE/venv"
MODEL_DIR="$CACHE/tiny-llama"
DO_APT=1
DO_MODEL=1
for arg in "$@"; do
  case "$arg" in
    --no-apt) DO_APT=0 ;;
    --no-model) DO_MODEL=0 ;;
    *) echo "setup.sh: unknown option '$arg' (known: --no-apt, --no-model)" >&2; exit 2 ;;
  esac
done

log() { echo "[setup] $*" >&2; }

# ---- Debian packages ---------------------------------------------------------------------------
APT_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  libsentencepiece-dev libyaml-cpp-dev libgtest-dev libgmock-dev nlohmann-json3-dev
  libre2-dev libsqlite3-dev libssl-dev libcli11-dev libspdlog-dev libfmt-dev
  libicu-dev openssl
  curl  # a test sends a gRPC call no gRPC library can (HTTP/2 with a header of its choosing)
  python3 python3-venv python3-dev
)

if [[ $DO_APT == 1 ]]; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    # The lock timeout waits for apt on a fresh VM (unattended-upgrades) instead of failing at
    # once. `env` sets the variable after sudo, whose env_reset would drop it if set before.
    APT=(env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600)
    [[ $(id -u) != 0 ]] && APT=(sudo "${APT[@]}")
    "${APT[@]}" update -qq
    "${APT[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    log "Debian packages: all present"
  fi
fi

# ---- Python venv: libtorch + reference stack ---------------------------------------------------
mkdir -p "$CACHE"
REQ="$ROOT/deploy/requirements.txt"
REQ_HASH="$(sha256sum "$REQ" | cut -c1-16)"
if [[ ! -f "$VENV/.lorad-req-$REQ_HASH" ]] && compgen -G "$VENV/.lorad-req-*" > /dev/null &&
  "$VENV/bin/python" -c 'import torch' 2> /dev/null; then
  # A complete venv for an older requirements file: pip installs what changed.
  log "updating the Python venv in $VENV to deploy/requirements.txt"
  if "$VENV/bin/pip" install -q --no-cache-dir -r "$REQ"; then
    rm -f "$VENV"/.lorad-req-*
    touch "$VENV/.lorad-req-$REQ_HASH"
  fi
fi
if [[ ! -f "$VENV/.lorad-req-$REQ_HASH" ]]; then
  PY="${LORAD_PYTHON:-python3}"
  log "creating Python venv in $VENV with $($PY --version 2>&1) (torch + reference stack; a few GB)"
  # venvs hard-code their own path, so it is built in place; the marker file written last says
  # it is complete, and a venv without it (an interrupted install) is rebuilt from scratch.
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q --no-cache-dir -r "$REQ"
  touch "$VENV/.lorad-req-$REQ_HASH"
else
  log "Python venv: up to date ($VENV)"
fi

TORCH_CMAKE="$("$VENV/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"

# ---- tiny fixture model ------------------------------------------------------------------------
if [[ $DO_MODEL == 1 ]]; then
  GEN="$ROOT/tests/fixtures/make_tiny_model.py"
  GEN_HASH="$(cat "$GEN" "$ROOT/tests/fixtures/tiny_corpus.txt" | sha256sum | cut -c1-16)"
  if [[ ! -f "$MODEL_DIR/.lorad-gen-$GEN_HASH" ]]; then
    log "generating the tiny fixture model in $MODEL_DIR"
    rm -rf "$MODEL_DIR.tmp"
    "$VENV/bin/python" "$GEN" --out "$MODEL_DIR.tmp" >&2
    touch "$MODEL_DIR.tmp/.lorad-gen-$GEN_HASH"
    rm -rf "$MODEL_DIR"
    mv "$MODEL_DIR.tmp" "$MODEL_DIR"
  else
    log "tiny model: up to date ($MODEL_DIR)"
  fi
fi

printf 'export %s=%q\n' LORAD_VENV "$VENV" LORAD_MODEL "$MODEL_DIR" LORAD_TORCH_CMAKE "$TORCH_CMAKE"
