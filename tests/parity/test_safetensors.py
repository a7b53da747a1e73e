"""A safetensors file lorad writes loads in the Python safetensors library with identical tensors
and metadata: the C++ parity test rewrites the reference file Python wrote, this checks it."""
import os
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import BUILD, ROOT, tiny_model_path

sys.path.insert(0, str(ROOT / "tests" / "parity"))
import reference_safetensors  # noqa: E402


def run_parity_test(gtest_filter: str, env: dict) -> None:
    binary = BUILD / "tests" / "parity_tests"
    assert binary.exists(), f"{binary} is missing: build the parity_tests target first"
    proc = subprocess.run([str(binary), f"--gtest_filter={gtest_filter}"], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[  PASSED  ] 1 test" in proc.stdout, proc.stdout


def test_file_written_by_lorad_loads_in_python(tmp_path):
    parity = tmp_path / "parity"
    (parity / "safetensors").mkdir(parents=True)
    reference_safetensors.write(parity / "safetensors", tiny_model_path())
    out = tmp_path / "out"
    run_parity_test("SafetensorsParity.RewritesPythonFile",
                    {"LORAD_PARITY_DIR": str(parity), "LORAD_SAFETENSORS_OUT": str(out)})

    path = out / "all_dtypes.safetensors"
    loaded = load_file(str(path))  # the Rust parser: strict about offsets, padding and coverage
    expected = reference_safetensors.tensors()
    assert sorted(loaded) == sorted(expected)
    for name, want in expected.items():
        assert loaded[name].dtype == want.dtype, name
        assert loaded[name].shape == want.shape, name
        assert torch.equal(loaded[name], want), name
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == reference_safetensors.METADATA
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0  # padded like the Python writer: mapped data stays aligned
