#!/usr/bin/env bash
# bitsandbytes for the GPU machine, which has transformers and PEFT but not bitsandbytes and no
# network: downloads the wheel pinned in deploy/requirements.txt (for the machine's Python 3.12)
# on this machine and unpacks it into .device-python/ with only its CPU and CUDA 13 libraries
# (about 6 MB of the wheel's 43: what a run may carry is limited). The device scripts put
# .device-python/ on PYTHONPATH (bench/device_build.sh), so bench/hf_baseline.py can measure the
# notebook's 4-bit QLoRA (load_in_4bit, 8-bit AdamW) instead of bf16 LoRA.
#
#   bash bench/fetch_bitsandbytes.sh
#   run(command=..., carry=[".device-debs", ".device-debs-engine", ".device-python"])
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(sed -n 's/^bitsandbytes==//p' deploy/requirements.txt)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
PIP=${PIP:-pip}
"$PIP" download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_24_x86_64 -d "$TMP" "bitsandbytes==$VERSION"
rm -rf .device-python
mkdir -p .device-python
python3 -m zipfile -e "$TMP"/bitsandbytes-*.whl .device-python
find .device-python/bitsandbytes -name 'libbitsandbytes_*.so' \
  ! -name 'libbitsandbytes_cpu.so' ! -name 'libbitsandbytes_cuda13*.so' -delete
echo "bitsandbytes $VERSION in .device-python/: $(du -sh .device-python | cut -f1)"
