"""Shared pytest fixtures: Python gRPC stubs generated from proto/, and a running lorad daemon.

The daemon fixture starts the real binary (build/server/lorad) on free loopback ports with the
tiny fixture model, waits for gRPC health to answer SERVING, and stops it with SIGINT.
"""
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILD = pathlib.Path(os.environ.get("LORAD_BUILD_DIR", ROOT / "build"))
LORAD = BUILD / "server" / "lorad"


def tiny_model_path() -> str:
    path = os.environ.get("LORAD_MODEL")
    if not path:
        pytest.fail("LORAD_MODEL is not set: run the tests through `make test`")
    return path


def long_context_model(folder) -> str:
    """A copy of the tiny fixture model in `folder` whose context holds 131,072 tokens (the
    weights are the same): a request of 100,000 new tokens there runs for a minute or more, so a
    test can count on it still running (the fixture's 1,024 tokens took 1-2 s on a fast machine,
    less than the waits of the tests that held one)."""
    import json
    import shutil

    folder = pathlib.Path(folder)
    if not (folder / "config.json").exists():
        shutil.copytree(tiny_model_path(), folder)
        config = json.loads((folder / "config.json").read_text())
        config["max_position_embeddings"] = 131072
        (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture(scope="session")
def stubs(tmp_path_factory):
    """Compiles proto/lorad/v1/*.proto with grpc_tools into a temp folder and imports them."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("py_gen")
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    import grpc_tools

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(
        ["protoc", f"-I{ROOT / 'proto'}", f"-I{well_known}", f"--python_out={out}",
         f"--grpc_python_out={out}", *protos]
    )
    assert rc == 0, "protoc failed on proto/"
    sys.path.insert(0, str(out))
    from lorad.v1 import adapters_pb2, adapters_pb2_grpc  # noqa: F401
    from lorad.v1 import inference_pb2, inference_pb2_grpc  # noqa: F401
    from lorad.v1 import training_pb2, training_pb2_grpc  # noqa: F401

    class Stubs:
        pass

    s = Stubs()
    for name, mod in list(locals().items()):
        if name.endswith("_pb2") or name.endswith("_pb2_grpc"):
            setattr(s, name, mod)
    return s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Daemon:
    def __init__(self, proc, grpc_address, http_address, log_path):
        self.proc = proc
        self.grpc_address = grpc_address
        self.http_address = http_address
        self.log_path = log_path

    def http_get(self, path: str):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{self.http_address}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def log(self) -> str:
        return pathlib.Path(self.log_path).read_text(errors="replace")


def start_daemon(tmp_path, *extra_args, config=None, model=None, preexec_fn=None):
    """Starts lorad (on `model`, else the tiny fixture model) and returns a Daemon once health
    answers SERVING (or fails the test)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    grpc_address = f"127.0.0.1:{free_port()}"
    http_address = f"127.0.0.1:{free_port()}"
    tmp_path.mkdir(parents=True, exist_ok=True)
    log_path = tmp_path / "lorad.log"
    args = [
        str(LORAD), "--config", str(config or ROOT / "deploy" / "lorad.yaml"),
        "--model", str(model or tiny_model_path()), "--grpc-address", grpc_address,
        "--http-address", http_address, "--data-dir", str(tmp_path / "data"), *extra_args,
    ]
    log = open(log_path, "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
    daemon = Daemon(proc, grpc_address, http_address, log_path)
    deadline = time.time() + 60
    with grpc.insecure_channel(grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"lorad exited with {proc.returncode} during start-up:\n{daemon.log()}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return daemon
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    proc.kill()
    pytest.fail(f"lorad did not become SERVING within 60 s:\n{daemon.log()}")


def stop_daemon(daemon: Daemon, sig=signal.SIGINT) -> int:
    if daemon.proc.poll() is None:
        daemon.proc.send_signal(sig)
        try:
            daemon.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait()
    return daemon.proc.returncode


@pytest.fixture
def daemon(tmp_path):
    d = start_daemon(tmp_path)
    yield d
    stop_daemon(d)
