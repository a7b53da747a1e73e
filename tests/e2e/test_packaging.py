"""The Docker image is a thin wrapper around scripts CI runs: the runtime-library collector finds
every library lorad needs, and the Dockerfile only calls files that exist."""
import os
import re
import subprocess

from conftest import BUILD, ROOT


def test_runtime_library_collector_resolves_everything():
    result = subprocess.run(["bash", str(ROOT / "deploy/collect_runtime_libs.sh"), str(BUILD), "--list"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    names = [line.rsplit("/", 1)[-1] for line in result.stdout.split()]
    for needed in ["libtorch_cpu.so", "libc10.so", "libgrpc++.so", "libprotobuf.so"]:
        assert any(n.startswith(needed) for n in names), (needed, names)
    assert not any(n.startswith("libcuda.so") for n in names)  # the driver comes from the host


def test_installed_tree_runs_without_the_build_venv(tmp_path):
    """The build's lorad finds libtorch through a RUNPATH into the builder's venv (under a home
    a service account cannot read, and gone with ~/.cache): the installed tree carries its
    libraries and finds them beside it. LINK=1 hard-links them (4 GB otherwise)."""
    prefix = tmp_path / "opt-lorad"
    result = subprocess.run(["make", "-s", "install", f"PREFIX={prefix}",
                             f"BUILD_DIR={BUILD}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "LINK": "1"})
    assert result.returncode == 0, result.stderr
    elf = subprocess.run(["readelf", "-d", str(prefix / "bin" / "lorad")], capture_output=True,
                         text=True, timeout=60)
    assert re.search(r"RUNPATH.*\[\$ORIGIN/\.\./lib\]", elf.stdout), elf.stdout
    # No LD_LIBRARY_PATH, no venv: what a systemd unit's environment gives it.
    for binary in ("lorad", "loradctl"):
        ran = subprocess.run([str(prefix / "bin" / binary), "--version"], capture_output=True,
                             text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
        assert ran.returncode == 0 and ran.stdout.startswith(binary + " "), ran.stderr
    loaded = subprocess.run(["ldd", str(prefix / "bin" / "lorad")], capture_output=True,
                            text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    torch_line = next(line for line in loaded.stdout.splitlines() if "libtorch_cpu.so" in line)
    assert str(prefix / "bin" / ".." / "lib") in torch_line, torch_line
    # With the unit's LD_LIBRARY_PATH, every library comes from the tree but glibc's and the
    # driver's (a RUNPATH does not reach the libraries' own dependencies).
    for binary in ("lorad", "loradctl"):
        loaded = subprocess.run(["ldd", str(prefix / "bin" / binary)], capture_output=True,
                                text=True, timeout=60,
                                env={"PATH": "/usr/bin:/bin",
                                     "LD_LIBRARY_PATH": str(prefix / "lib")})
        for line in loaded.stdout.splitlines():
            if "=>" not in line or "linux-vdso" in line:
                continue
            name, path = line.split("=>")[0].strip(), line.split("=>")[1].split("(")[0].strip()
            if re.match(r"lib(c|m|dl|rt|pthread|cuda|nvidia-.*)\.so", name):
                continue
            assert path.startswith(str(prefix)), (binary, line)
    # The unit stops lorad as compose does, never restarts a bad config, and does not send the
    # SIGHUP a reload would (lorad stops cleanly on it).
    unit = (ROOT / "deploy" / "lorad.service").read_text()
    for line in ("ExecStart=/opt/lorad/bin/lorad ", "TimeoutStopSec=60", "Restart=on-failure",
                 "RestartPreventExitStatus=2", "LimitNOFILE=65536", "StartLimitBurst=5",
                 "Environment=LD_LIBRARY_PATH=/opt/lorad/lib"):
        assert "\n" + line in unit, line
    assert "\nExecReload" not in unit


def test_dockerfile_calls_only_existing_scripts_and_make_targets():
    dockerfile = (ROOT / "docker/Dockerfile").read_text()
    for script in re.findall(r"(deploy/[\w./-]+)", dockerfile):
        assert (ROOT / script).exists(), script
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"make (\w+)", dockerfile):
        assert re.search(rf"^{target}:", makefile, re.M), target
    compose = (ROOT / "docker/compose.yaml").read_text()
    # The GPU comes from the device reservation (a `runtime: nvidia` fails on hosts without that
    # runtime registered), and docker stop leaves time for the training checkpoint.
    assert "capabilities: [gpu]" in compose and "runtime: nvidia" not in compose
    assert "stop_grace_period" in compose


def test_make_run_serves_the_model_the_readme_names():
    """The README's `make run MODEL=<folder>` passes that folder, once (lorad refuses --model
    given twice); without MODEL, the tiny model setup.sh made."""
    def run_line(*args):
        out = subprocess.run(["make", "-n", "-s", "run", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return next(line for line in out.stdout.splitlines() if "server/lorad" in line)

    named = run_line("MODEL=/models/Llama-3.2-1B-Instruct")
    assert named.count("--model") == 1 and '--model "/models/Llama-3.2-1B-Instruct"' in named
    assert '--model "$LORAD_MODEL"' in run_line()
    assert "make run MODEL=" in (ROOT / "README.md").read_text()
