"""The daemon as a user meets it: it starts on the tiny model, lists its services through
reflection, answers health checks, exposes parseable metrics, refuses bad configs with one
clear line and exit code 2, and stops cleanly on Ctrl-C / SIGTERM."""
import os
import re
import pathlib
import signal
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from conftest import LORAD, ROOT, free_port, start_daemon, stop_daemon, tiny_model_path

LORAD_SERVICES = {"lorad.v1.TrainingService", "lorad.v1.InferenceService", "lorad.v1.AdapterService"}


def list_services(address):
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        reply = next(iter(replies))
        return {s.name for s in reply.list_services_response.service}


def test_reflection_lists_the_three_services_and_health(daemon):
    names = list_services(daemon.grpc_address)
    assert LORAD_SERVICES <= names
    assert "grpc.health.v1.Health" in names


def test_health_is_serving_overall_and_per_service(daemon):
    with grpc.insecure_channel(daemon.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", *sorted(LORAD_SERVICES)]:
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="lorad.v1.Nothing"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    status, body = daemon.http_get("/healthz")
    assert (status, body.strip()) == (200, "serving")


def test_reflection_describes_the_api_messages(daemon):
    with grpc.insecure_channel(daemon.grpc_address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="lorad.v1.SamplingParams")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
        assert reply.file_descriptor_response.file_descriptor_proto, reply


def test_metrics_parse_and_count_rpcs_by_method_and_code(daemon, stubs):
    with grpc.insecure_channel(daemon.grpc_address) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        training = stubs.training_pb2_grpc.TrainingServiceStub(channel)
        training.ListJobs(stubs.training_pb2.ListJobsRequest(), timeout=5)
        with pytest.raises(grpc.RpcError) as err:
            training.GetJob(stubs.training_pb2.GetJobRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for bogus in ("/lorad.v1.TrainingService/Bogus", "/made.up.Service/X"):  # one label
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary(bogus)(b"", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

    # A call is counted once the server is done with it, which may be just after its client saw
    # the reply (a loaded machine): read until the last one is in, for a while.
    deadline = time.time() + 10
    while True:
        status, text = daemon.http_get("/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        requests = families["lorad_rpc_requests"]
        counts = {(s.labels["method"], s.labels["code"]): s.value for s in requests.samples
                  if s.name == "lorad_rpc_requests_total"}
        if counts.get(("unknown", "UNIMPLEMENTED"), 0) >= 2 or time.time() > deadline:
            break
        time.sleep(0.05)
    assert requests.type == "counter"
    assert counts.get(("grpc.health.v1.Health/Check", "OK"), 0) >= 1, (counts, text)
    assert counts[("lorad.v1.TrainingService/ListJobs", "OK")] == 1
    assert counts[("lorad.v1.TrainingService/GetJob", "INVALID_ARGUMENT")] == 1
    assert counts[("unknown", "UNIMPLEMENTED")] == 2
    assert not [m for m, _ in counts if "Bogus" in m or "made.up" in m], counts
    duration = families["lorad_rpc_duration_seconds"]
    assert duration.type == "histogram"
    buckets = [s for s in duration.samples if s.name.endswith("_bucket")
               and s.labels["method"] == "lorad.v1.TrainingService/ListJobs"]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 1
    build = families["lorad_build_info"].samples[0]
    assert build.value == 1 and build.labels["torch_version"].startswith("2.11")
    assert families["lorad_process_uptime_seconds"].samples[0].value > 0
    # Counts that only grow are counters (rate() applies), named with _total.
    for name in ["lorad_preemptions", "lorad_decode_graph_replays", "lorad_adapter_stack_builds",
                 "lorad_gpu_loop_seconds"]:
        assert families[name].type == "counter", name
        assert families[name].samples[0].name == name + "_total"


def run_lorad(*args, timeout=60):
    return subprocess.run([str(LORAD), *args], capture_output=True, text=True, timeout=timeout)


def test_slow_http_clients_do_not_starve_the_health_check(daemon):
    """300 connections (more than the 256 the HTTP server keeps) that send half a request each and
    trickle header lines: /healthz still answers (a thread per connection was held by each)."""
    import socket
    import threading

    host, port = daemon.http_address.split(":")
    slow = []
    done = threading.Event()

    def trickle():  # a header line now and then: each read's timeout starts again
        while not done.wait(0.5):
            for sock in slow:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass

    trickler = threading.Thread(target=trickle)
    try:
        for _ in range(300):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            slow.append(sock)
        trickler.start()
        status, body = daemon.http_get("/healthz")
        assert (status, body) == (200, "serving\n")
    finally:
        done.set()
        if trickler.is_alive():
            trickler.join()
        for sock in slow:
            sock.close()


def test_unknown_config_key_exits_2_naming_key_and_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  device: cpu\nserver:\n  grpc_adress: 127.0.0.1:1\n")
    result = run_lorad("--config", str(config), "--model", tiny_model_path())
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{config}:4" in lines[0] and "server.grpc_adress" in lines[0]


def test_wrong_type_and_out_of_range_exit_2(tmp_path):
    for body, key in [("server:\n  max_request_bytes: huge\n", "server.max_request_bytes"),
                      ("server:\n  shutdown_grace_seconds: -1\n", "server.shutdown_grace_seconds"),
                      ("logging:\n  level: loud\n", "logging.level")]:
        config = tmp_path / "bad.yaml"
        config.write_text(body)
        result = run_lorad("--config", str(config), "--model", tiny_model_path())
        assert result.returncode == 2, body
        assert key in result.stderr and f"{config}:" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_missing_or_non_model_folder_exits_2_with_one_line(tmp_path):
    for folder, words in [(tmp_path / "nope", "does not exist"), (ROOT / "deploy", "not a model folder")]:
        result = run_lorad("--config", str(ROOT / "deploy" / "lorad.yaml"), "--model", str(folder),
                           "--grpc-address", f"127.0.0.1:{free_port()}",
                           "--http-address", f"127.0.0.1:{free_port()}")
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "model.path" in lines[0], result.stderr


def test_start_up_errors_about_a_value_name_the_line_that_set_it(tmp_path):
    """A model folder that does not exist, or an adapter root that cannot be made, is named with
    the config line that set it; the adapter root is checked before the model loads (it was
    found after a load that takes minutes for a large model). lorad --version answers."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for body, words in [(f"model:\n  path: {tmp_path / 'nope'}\n", "cfg.yaml:2: model.path"),
                        (f"model:\n  path: {tiny_model_path()}\nstorage:\n"
                         f"  adapter_root: {blocker}/adapters\n",
                         "cfg.yaml:4: storage.adapter_root: cannot create")]:
        config = tmp_path / "cfg.yaml"
        config.write_text(body)
        result = run_lorad("--config", str(config), "--data-dir", str(tmp_path / "data"),
                           "--grpc-address", f"127.0.0.1:{free_port()}",
                           "--http-address", f"127.0.0.1:{free_port()}")
        assert result.returncode == 2, result.stderr
        assert f"{tmp_path}/{words}" in result.stderr, result.stderr
        assert "model loaded" not in result.stdout + result.stderr, result.stdout
    version = run_lorad("--version")
    assert version.returncode == 0 and version.stdout.startswith("lorad "), version


def test_print_config_keys_is_yaml_saying_what_each_key_accepts_and_matches_the_readme():
    """Every key with its default and, as a comment, what it accepts (the ranges were found only
    by being refused); the README's configuration table lists the same keys."""
    import yaml

    result = run_lorad("--print-config-keys")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all("  # " in line for line in lines), result.stdout
    printed = yaml.safe_load(result.stdout)
    assert printed["engine.max_running_requests"] == 64
    assert "engine.max_running_requests: 64  # an integer in [1, 4096]" in lines
    readme = (ROOT / "README.md").read_text()
    documented = {key for line in readme.splitlines() if line.startswith("| `")
                  for key in re.findall(r"`([a-z_]+\.[a-z_]+)`", line.split("|")[1])}
    assert documented == set(printed), (documented ^ set(printed))


def test_the_job_database_is_readable_by_its_owner_alone(tmp_path):
    """jobs.db holds every job's spec and inline examples: it was made 0644 (any local account
    could read a team's training data). A new one is 0600; one an operator opened up is said."""
    import stat

    d = start_daemon(tmp_path, "--set", "model.base_weights=none")
    db = tmp_path / "data" / "jobs.db"
    try:
        assert stat.S_IMODE(db.stat().st_mode) == 0o600, oct(db.stat().st_mode)
    finally:
        stop_daemon(d)
    db.chmod(0o644)
    d = start_daemon(tmp_path, "--set", "model.base_weights=none")
    try:
        assert f"{db} can be read by other accounts (mode 644)" in d.log(), d.log()
    finally:
        stop_daemon(d)


def test_taken_port_is_a_clear_error(tmp_path):
    first = start_daemon(tmp_path / "a")
    try:
        result = run_lorad("--model", tiny_model_path(), "--grpc-address", first.grpc_address,
                           "--http-address", f"127.0.0.1:{free_port()}",
                           "--data-dir", str(tmp_path / "b"))
        assert result.returncode == 1
        assert "server.grpc_address" in result.stderr and first.grpc_address in result.stderr
        assert "(port in use)" in result.stderr, result.stderr
        # Found before the model loads (minutes for a large one), not after.
        assert "model loaded" not in result.stdout + result.stderr, result.stdout
        # The HTTP port too: no second daemon shares it (scrapes would go to either one).
        result = run_lorad("--model", tiny_model_path(), "--grpc-address", f"127.0.0.1:{free_port()}",
                           "--http-address", first.http_address,
                           "--data-dir", str(tmp_path / "c"))
        assert result.returncode == 1, result.stderr
        assert "server.http_address" in result.stderr and first.http_address in result.stderr
    finally:
        stop_daemon(first)


def test_a_data_folder_whose_filesystem_takes_no_lock_is_said_so(tmp_path):
    """flock failing with ENOLCK (NFS without local locks, here a preloaded shim) is not another
    lorad holding the folder: the daemon says what failed and what to do."""
    source = tmp_path / "nolock.c"
    source.write_text("#include <errno.h>\n"
                      "int flock(int fd, int op) { (void)fd; (void)op; errno = ENOLCK; return -1; }\n")
    shim = tmp_path / "nolock.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(shim), str(source)], check=True)
    result = subprocess.run(
        [str(LORAD), "--model", tiny_model_path(), "--grpc-address", f"127.0.0.1:{free_port()}",
         "--http-address", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, LD_PRELOAD=str(shim)))
    assert result.returncode != 0
    assert "in use by another lorad" not in result.stderr, result.stderr
    assert "storage.data_dir" in result.stderr and "cannot lock it" in result.stderr, result.stderr
    assert "No locks available" in result.stderr and "local disk" in result.stderr, result.stderr


def test_a_config_refused_at_start_leaves_no_data_folder(tmp_path):
    """A token too short (checked as the daemon starts, not as the file is parsed) is refused
    before the data folder is made: nothing is left to clean up."""
    config = tmp_path / "short-token.yaml"
    config.write_text("auth:\n  tokens:\n    - {name: ci, role: admin, token: short}\n")
    data = tmp_path / "data"
    result = run_lorad("--config", str(config), "--model", tiny_model_path(),
                       "--grpc-address", f"127.0.0.1:{free_port()}",
                       "--http-address", f"127.0.0.1:{free_port()}", "--data-dir", str(data))
    assert result.returncode == 2, result.stderr
    assert f"{config}:3: auth.tokens[0]" in result.stderr, result.stderr
    assert not data.exists()


def test_adapter_records_that_cannot_be_read_stop_the_start(tmp_path):
    """The job database's adapter records unreadable (here a column renamed): the daemon does not
    start. It started and numbered every adapter's versions from 1 again, and a load was answered
    while its record kept the older, higher version."""
    import sqlite3

    stop_daemon(start_daemon(tmp_path))
    db = tmp_path / "data" / "jobs.db"
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE adapters RENAME COLUMN served TO served_renamed")
    result = run_lorad("--model", tiny_model_path(), "--grpc-address", f"127.0.0.1:{free_port()}",
                       "--http-address", f"127.0.0.1:{free_port()}",
                       "--data-dir", str(tmp_path / "data"))
    assert result.returncode != 0, result.stderr
    assert "adapter records" in result.stderr and str(db) in result.stderr, result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stop_signals_exit_cleanly(tmp_path, sig):
    """SIGHUP too: the terminal of `make run` closing (an SSH session dropped) killed lorad
    mid-step, an unclean stop that the crash-loop guard counted against the running job.
    Started with SIGHUP's default action whatever the test runner's (under nohup lorad keeps
    ignoring it, by design: test_a_daemon_started_to_ignore_hangups_outlives_its_terminal)."""
    d = start_daemon(tmp_path, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    assert stop_daemon(d, sig) == 0
    assert "stopped" in d.log()
    assert f"received {sig.name}, shutting down" in d.log()


def test_a_health_watch_sees_not_serving_and_does_not_hold_the_stop(tmp_path):
    """gRPC client-side health checking keeps a Health.Watch stream open: at a stop it is told
    NOT_SERVING and then ended, so the stop does not wait out the grace (here an hour) for it."""
    import threading

    d = start_daemon(tmp_path, "--set", "server.shutdown_grace_seconds=3600")
    seen, ended = [], threading.Event()
    channel = grpc.insecure_channel(d.grpc_address)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())

    def follow():
        try:
            for reply in watch:
                seen.append(reply.status)
        except grpc.RpcError:
            pass
        ended.set()

    threading.Thread(target=follow, daemon=True).start()
    try:
        deadline = time.time() + 30
        while not seen and time.time() < deadline:
            time.sleep(0.05)
        assert seen == [health_pb2.HealthCheckResponse.SERVING]
        assert stop_daemon(d, signal.SIGTERM) == 0  # waits at most 30 s
        assert ended.wait(timeout=30)
        assert seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING, seen
    finally:
        watch.cancel()
        channel.close()


def test_a_daemon_started_to_ignore_hangups_outlives_its_terminal(tmp_path):
    """`nohup lorad ...`: SIGHUP ignored from the start stays ignored (the stop signals' thread
    took it, and closing the terminal stopped the daemon nohup was meant to keep)."""
    d = start_daemon(tmp_path, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        d.proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert d.proc.poll() is None, d.log()
        with grpc.insecure_channel(d.grpc_address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert "SIGHUP" not in d.log()
    finally:
        assert stop_daemon(d) == 0


def test_a_log_pipe_whose_reader_has_gone_does_not_kill_the_shutdown(tmp_path):
    """`lorad | tee lorad.log` and Ctrl-C: tee dies first, and lorad's next log line went to a
    pipe without a reader; SIGPIPE killed it mid-shutdown (exit -13, no checkpoint written)."""
    import urllib.request

    http_address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [str(LORAD), "--config", str(ROOT / "deploy" / "lorad.yaml"), "--model", tiny_model_path(),
         "--grpc-address", f"127.0.0.1:{free_port()}", "--http-address", http_address,
         "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, "lorad did not start"
            try:
                with urllib.request.urlopen(f"http://{http_address}/healthz", timeout=1) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        proc.stdout.close()  # the reader goes
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_stop_signal_during_start_up_stops_at_once(tmp_path):
    """A model on slow storage: config.json arrives through a pipe that is never finished, so the
    daemon is still starting when SIGTERM comes. It stops at once, exit 0, without serving."""
    import os
    import threading

    model = tmp_path / "model"
    model.mkdir()
    for item in pathlib.Path(tiny_model_path()).iterdir():
        if item.name != "config.json":
            (model / item.name).symlink_to(item)
    os.mkfifo(model / "config.json")
    log_path = tmp_path / "lorad.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(LORAD), "--config", str(ROOT / "deploy" / "lorad.yaml"), "--model", str(model),
             "--grpc-address", f"127.0.0.1:{free_port()}",
             "--http-address", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "data")],
            stdout=log, stderr=subprocess.STDOUT)
    opened = threading.Event()
    writer = {}

    def open_pipe():  # returns once the daemon has opened config.json for reading
        writer["pipe"] = open(model / "config.json", "w")
        writer["pipe"].write('{"architectures": ["LlamaForCausalLM"],')
        writer["pipe"].flush()
        opened.set()

    threading.Thread(target=open_pipe, daemon=True).start()
    try:
        assert opened.wait(timeout=60), "lorad never opened config.json"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if "pipe" in writer:
            writer["pipe"].close()
    log_text = log_path.read_text()
    assert "received SIGTERM during start-up" in log_text, log_text
    assert "serving gRPC" not in log_text


def raw_http(daemon, request: bytes, timeout=10) -> bytes:
    """Sends `request` on a connection of its own and reads the reply until the server closes."""
    import socket

    host, port = daemon.http_address.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except OSError:  # the server may answer and close before a flood is all sent
            pass
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
        return reply


def test_the_http_port_answers_only_what_it_serves_and_bounds_a_request(daemon):
    """GET and HEAD of /metrics and /healthz; anything else a clear status; a request head over
    16 KiB (e.g. endless header lines: 2 GB of them once grew the daemon by 3 GB) is 431."""
    assert raw_http(daemon, b"GET /healthz HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\nserving\n")
    head = raw_http(daemon, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
    assert raw_http(daemon, b"GET /metrics?x=1 HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
    assert raw_http(daemon, b"GET /nope HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert raw_http(daemon, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert raw_http(daemon, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400")
    flood = b"GET /metrics HTTP/1.1\r\n" + b"X-A: " + b"a" * 8000 + b"\r\n"
    assert raw_http(daemon, flood * 200).startswith(b"HTTP/1.1 431")
    assert daemon.http_get("/healthz") == (200, "serving\n")


class BlackholeProxy:
    """A TCP proxy to `target` for one connection that forwards both ways until blackhole() is
    called, then drops everything either side sends, as a network path that died would (no FIN,
    no reset). `closed_by_target` is set when the target closes its side."""

    def __init__(self, target: str):
        import socket
        import threading

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.target = target
        self.dropping = threading.Event()
        self.closed_by_target = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def blackhole(self):
        self.dropping.set()

    def _serve(self):
        import socket
        import threading

        client, _ = self.listener.accept()
        host, port = self.target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))

        def pump(src, dst, on_eof):
            try:
                while data := src.recv(65536):
                    if not self.dropping.is_set():
                        dst.sendall(data)
            except OSError:
                pass
            on_eof()

        threading.Thread(target=pump, args=(client, upstream, lambda: None), daemon=True).start()
        pump(upstream, client, self.closed_by_target.set)


def test_a_client_gone_without_a_word_is_disconnected_by_keepalive(tmp_path):
    """A client whose network vanished sends no FIN: without server keepalive pings its connection
    (and any stream on it) would stay open for gRPC's default two hours."""
    d = start_daemon(tmp_path, "--set", "server.keepalive_seconds=1",
                     "--set", "server.keepalive_timeout_seconds=1")
    try:
        proxy = BlackholeProxy(d.grpc_address)
        with grpc.insecure_channel(proxy.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            proxy.blackhole()
            # A ping after 1 s quiet, closed 1 s later without its answer; slack for a busy CI.
            assert proxy.closed_by_target.wait(timeout=20), "lorad kept the dead connection open"
    finally:
        stop_daemon(d)


def test_the_open_files_limit_is_raised_so_a_connection_flood_cannot_kill_grpc(tmp_path):
    """Started with the soft open-files limit of a Docker or systemd service (here 256), lorad
    takes its hard limit: gRPC 1.51 stops accepting for good after one EMFILE, so a burst of
    connections above the soft limit would otherwise leave the port dead until a restart."""
    import resource
    import socket
    import time

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"this machine's hard open-files limit is {hard}: the test needs 1024")
    d = start_daemon(tmp_path, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                                     (256, hard)))
    try:
        limits = pathlib.Path(f"/proc/{d.proc.pid}/limits").read_text()
        line = next(l for l in limits.splitlines() if l.startswith("Max open files"))
        assert line.split()[3] == line.split()[4], line  # soft == hard
        host, port = d.grpc_address.rsplit(":", 1)
        flood = [socket.create_connection((host, int(port))) for _ in range(300)]
        time.sleep(1.0)  # the server accepts them (or fails to)
        for s in flood:
            s.close()
        with grpc.insecure_channel(d.grpc_address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop_daemon(d)
